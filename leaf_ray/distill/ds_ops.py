"""DeepSpeed's JIT-compiled CPU ops, made safe to share between processes, venvs and killed runs.

On CPU, ``deepspeed.initialize`` always loads the shared-memory collective op (``deepspeed_shm_comm``), which
torch compiles on first use into ``$TORCH_EXTENSIONS_DIR/<op>/`` guarded by a ``lock`` file. Two traps:

* a process killed while it holds that lock (a failed job, a test timeout, Ctrl-C during the first build)
  leaves the file behind, and every later ``deepspeed.initialize`` on the machine waits for it **forever**;
* two venvs (a checkout and a CI clone, the main venv and the vLLM one) share ``~/.cache/torch_extensions``
  and rebuild over each other, since the build depends on the venv's torch and python paths.

So each venv gets its own extensions directory (``<venv>/torch_extensions`` unless TORCH_EXTENSIONS_DIR is
set), a lock older than any real build is removed with a warning, and ``make`` builds the op once at install
time (``python -m leaf_ray.distill.ds_ops``) so runs only take the lock for the up-to-date check.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

STALE_LOCK_S = 600.0  # the shm op builds in well under a minute; a lock this old has no living owner


def extensions_dir() -> Path:
    """Where torch builds extensions for this process: TORCH_EXTENSIONS_DIR, set to the venv's own if unset."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def clear_stale_locks(root: Path, max_age_s: float = STALE_LOCK_S) -> list[Path]:
    """Remove ``<root>/*/lock`` files older than ``max_age_s`` (left by a killed build); returns them."""
    removed = []
    now = time.time()
    for lock in root.glob("*/lock"):
        try:
            age = now - lock.stat().st_mtime
            if age > max_age_s:
                lock.unlink()
                removed.append(lock)
                log.warning("removed a stale torch extension build lock %s (%.0f s old: its build was killed)",
                            lock, age)
        except FileNotFoundError:  # another process got there first
            pass
    return removed


def import_deepspeed():
    """``import deepspeed`` after making its JIT op builds safe (see the module docstring)."""
    clear_stale_locks(extensions_dir())
    import deepspeed

    return deepspeed


def build_cpu_ops() -> None:
    """Build (or check) the ops ``deepspeed.initialize`` loads on CPU, once, e.g. right after installation."""
    deepspeed = import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        print("deepspeed: no shared-memory op to build on this accelerator")
        return
    t0 = time.monotonic()
    builder.load(verbose=False)
    print(f"deepspeed: {builder.NAME} ready in {extensions_dir()} ({time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    build_cpu_ops()
