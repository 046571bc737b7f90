"""DeepSpeed's JIT-compiled CPU ops, loaded at run time without ever waiting on a build lock.

On CPU, ``deepspeed.initialize`` loads the shared-memory collective op (``deepspeed_shm_comm``) through torch's
``cpp_extension.load``, which in **every** new process takes ``$TORCH_EXTENSIONS_DIR/<op>/lock`` (a
``FileBaton``: a file whose owner nobody records) and runs ninja to check the build. Two failures followed:

* **the op was compiled again at run time**: ``make`` built it with whichever ``ninja`` its PATH found (Debian's
  1.11), a Ray worker whose PATH starts with the venv's ``bin`` found pip's ninja 1.13, which calls the other's
  build log "too old", starts over and recompiles everything (two ``cc1plus``, 1 GB each, under memory pressure);
* **a process killed while it held the lock hung every later run**: ``FileBaton.wait`` polls forever for a
  file that only its dead owner would remove.

So here:

* ``make`` builds the op once (``python -m leaf_ray.distill.ds_ops``) into the venv's own extensions directory
  (``<venv>/torch_extensions``) with the venv's ninja first on PATH, and stamps it (torch, DeepSpeed, Python);
* at run time :func:`import_deepspeed` **loads that shared object directly** (``importlib``) and registers it
  with DeepSpeed's op cache: no torch lock, no ninja, no compiler;
* only where no up-to-date build exists is it built, under an ``flock`` (the kernel releases it when its owner
  dies, so a killed builder never blocks anyone; the lock file names its holder), waited for at most
  ``BUILD_WAIT_S`` with an error naming the lock and its holder; torch's own ``lock`` left in that directory is
  removed first (whoever holds our flock is the only builder).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

OPS = ("ShareMemCommBuilder",)  # what deepspeed.initialize loads on the CPU accelerator
STAMP = "leaf_ray_build.json"
BUILD_WAIT_S = 900.0  # the shm op builds in well under a minute alone; 15 min covers a loaded 2-core machine


class OpLockTimeout(RuntimeError):
    pass


def extensions_dir() -> Path:
    """Where torch builds extensions for this process: TORCH_EXTENSIONS_DIR, set to the venv's own if unset."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def build_stamp() -> dict[str, str]:
    """What a built op depends on: a build with another torch, DeepSpeed or Python is not loaded."""
    import deepspeed
    import torch

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "python": sys.version.split()[0],
            "prefix": sys.prefix}


def prebuilt(op_dir: Path, name: str) -> Path | None:
    """``<op_dir>/<name>.so`` when it was built (and stamped) for this environment."""
    so, stamp = op_dir / f"{name}.so", op_dir / STAMP
    try:
        return so if so.exists() and json.loads(stamp.read_text()) == build_stamp() else None
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def build_lock(lock_file: Path, wait_s: float = BUILD_WAIT_S):
    """An exclusive ``flock`` on ``lock_file`` (released by the kernel if its holder dies), waited for at most
    ``wait_s``; the file records its holder (host, pid) for the error a waiter gives."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = lock_file.read_text().strip() or "unknown"
                    raise OpLockTimeout(f"waited {wait_s:.0f} s for the op build lock {lock_file} (held by "
                                        f"{holder}, which is alive and still building)") from None
                time.sleep(0.5)
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the flock


def load_op(builder, op_dir: Path):
    """The op's module, registered in DeepSpeed's cache so ``builder.load()`` returns it: the prebuilt shared
    object loaded directly, else built here under :func:`build_lock`."""
    import importlib.util

    from deepspeed.ops.op_builder.builder import OpBuilder

    name = builder.NAME
    if name in OpBuilder._loaded_ops:
        return OpBuilder._loaded_ops[name]
    so = prebuilt(op_dir, name)
    if so is None:
        with build_lock(op_dir.parent / f"{name}.leaf_ray.lock"):
            so = prebuilt(op_dir, name)  # another process may have built it while we waited
            if so is None:
                return build_op(builder, op_dir)
    spec = importlib.util.spec_from_file_location(name, so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    OpBuilder._loaded_ops[name] = module
    return module


def build_op(builder, op_dir: Path):
    """torch's JIT build (call with :func:`build_lock` held): its stale ``lock`` removed, the venv's ninja first
    on PATH (the same ninja every time: two ninja versions discard each other's build log and rebuild)."""
    (op_dir / "lock").unlink(missing_ok=True)  # a killed torch build's baton: its owner cannot be alive
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    t0 = time.monotonic()
    module = builder.load(verbose=False)
    (op_dir / STAMP).write_text(json.dumps(build_stamp()))
    log.warning("built DeepSpeed's %s op in %.0f s (%s)", builder.NAME, time.monotonic() - t0, op_dir)
    return module


def load_cpu_ops(deepspeed) -> list[str]:
    """Load (or build once) the ops DeepSpeed's CPU accelerator needs; returns their names."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return []
    loaded = []
    for op in OPS:
        builder = accelerator.create_op_builder(op)
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            continue
        load_op(builder, extensions_dir() / builder.NAME)
        loaded.append(builder.NAME)
    return loaded


def import_deepspeed():
    """``import deepspeed`` with its CPU ops loaded without torch's build lock (see the module docstring)."""
    extensions_dir()
    import deepspeed

    load_cpu_ops(deepspeed)
    return deepspeed


def build_cpu_ops() -> None:
    """Build (or check) the ops ``deepspeed.initialize`` loads on CPU, once, right after installation."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    t0 = time.monotonic()
    names = load_cpu_ops(import_deepspeed())
    print(f"deepspeed: {', '.join(names) or 'no CPU op'} ready in {extensions_dir()} "
          f"({time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    build_cpu_ops()
