"""DeepSpeed's CPU op at run time: loaded from the build `make` made, never through torch's build lock, so a
process killed while it held a lock cannot hang the next run (leaf_ray/distill/ds_ops.py)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from leaf_ray.distill import ds_ops

HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from torch.utils.file_baton import FileBaton
    from leaf_ray.distill.ds_ops import build_lock
    op_dir = Path(sys.argv[1])
    with build_lock(op_dir.parent / "deepspeed_shm_comm.leaf_ray.lock"):
        assert FileBaton(str(op_dir / "lock")).try_acquire()  # torch's baton too, as a killed build leaves it
        print("held", flush=True)
        time.sleep(600)
""")

START_ENGINE = textwrap.dedent("""
    import time
    t0 = time.monotonic()
    import torch
    from leaf_ray.distill.inline import local_process_group
    from leaf_ray.distill.ds_ops import import_deepspeed
    local_process_group()
    deepspeed = import_deepspeed()
    from deepspeed.ops.op_builder.builder import OpBuilder
    model = torch.nn.Linear(4, 4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                      config={"train_batch_size": 1})
    print("engine", sorted(OpBuilder._loaded_ops), round(time.monotonic() - t0, 1), flush=True)
""")


def env_with(extensions):
    return {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


def test_a_sigkilled_lock_holder_does_not_delay_the_next_engine(tmp_path):
    """A process holding both locks (ours and torch's baton) is SIGKILLed; a DeepSpeed engine then starts at
    once: the op is loaded from the prebuilt shared object, torch's lock is never waited on."""
    installed = ds_ops.extensions_dir() / "deepspeed_shm_comm"
    if ds_ops.prebuilt(installed, "deepspeed_shm_comm") is None:
        pytest.fail(f"no stamped build in {installed}: `make venv` builds it (python -m leaf_ray.distill.ds_ops)")
    extensions = tmp_path / "ext"
    op_dir = extensions / "deepspeed_shm_comm"
    op_dir.mkdir(parents=True)
    for name in ("deepspeed_shm_comm.so", ds_ops.STAMP):
        shutil.copy2(installed / name, op_dir / name)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(op_dir)], stdout=subprocess.PIPE, text=True,
                              env=env_with(extensions))
    assert holder.stdout.readline().strip() == "held"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    assert (op_dir / "lock").exists()  # torch's baton outlives its owner
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", START_ENGINE], capture_output=True, text=True, timeout=120,
                          env=env_with(extensions))
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("engine"))
    assert "deepspeed_shm_comm" in line
    assert time.monotonic() - started < 60  # a hang detector (the bound is 30 s idle), not a speed claim
    assert not any(p.suffix == ".o" for p in op_dir.iterdir())  # nothing was compiled


def test_the_build_lock_is_free_when_its_holder_dies_and_names_a_live_one(tmp_path):
    lock = tmp_path / "op.leaf_ray.lock"
    op_dir = tmp_path / "op"
    op_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD.replace("deepspeed_shm_comm.leaf_ray.lock", "op.leaf_ray.lock"),
                               str(op_dir)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ds_ops.OpLockTimeout, match=rf"held by .*pid {holder.pid}.*alive"):
        with ds_ops.build_lock(lock, wait_s=1):
            pass
    holder.kill()
    holder.wait(timeout=30)
    t0 = time.monotonic()
    with ds_ops.build_lock(lock, wait_s=30):
        assert time.monotonic() - t0 < 5
        assert f"pid {os.getpid()}" in lock.read_text()


def test_a_build_for_another_environment_is_not_loaded(tmp_path):
    (tmp_path / "deepspeed_shm_comm.so").write_bytes(b"")
    (tmp_path / ds_ops.STAMP).write_text('{"torch": "0.0"}')
    assert ds_ops.prebuilt(tmp_path, "deepspeed_shm_comm") is None


def test_extensions_dir_defaults_to_the_venv_and_respects_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert ds_ops.extensions_dir() == ds_ops.Path(sys.prefix) / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert ds_ops.extensions_dir() == tmp_path
