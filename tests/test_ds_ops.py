"""DeepSpeed JIT op builds: a lock left by a killed build must not hang every later run."""

from __future__ import annotations

import os
import sys
import time

from leaf_ray.distill import ds_ops


def test_stale_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    stale = tmp_path / "deepspeed_shm_comm" / "lock"
    fresh = tmp_path / "cpu_adam" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir()
        lock.touch()
    old = time.time() - ds_ops.STALE_LOCK_S - 5
    os.utime(stale, (old, old))
    assert ds_ops.clear_stale_locks(tmp_path) == [stale]
    assert not stale.exists() and fresh.exists()


def test_extensions_dir_defaults_to_the_venv_and_respects_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert ds_ops.extensions_dir() == ds_ops.Path(sys.prefix) / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert ds_ops.extensions_dir() == tmp_path
