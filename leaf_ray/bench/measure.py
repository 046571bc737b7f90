"""Timing and peak memory of one callable, the same way on CUDA and on CPU (``leaf-ray bench gpu``).

Every measurement runs once untimed (warm-up), then ``repeats`` times; the fastest is kept. Peak memory is the
allocator's peak above what was allocated before (``torch.cuda`` statistics); on CPU a dispatch mode adds up
the bytes of the storages created and still alive, in one extra untimed run.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CpuPeak(TorchDispatchMode):
    """Peak bytes of CPU storages created by ops run under this mode and still alive (views and in-place
    results of existing storages are not new; a storage is released when its last tensor dies)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.refs: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)
        self.refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = tree_leaves((args, kwargs))
        existing = {id(t.untyped_storage()) for t in leaves if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in existing or key in self.live:
                continue
            self.live[key] = storage.nbytes()
            self.refs[key] = weakref.ref(storage, lambda _, k=key: self._release(k))
            self.current += self.live[key]
            self.peak = max(self.peak, self.current)
        return out


class PeakMemory:
    """``with PeakMemory(device) as pm: ...`` then ``pm.peak_bytes``: the peak above the memory in use at
    entry (CUDA allocator statistics; on CPU the storages created inside, see :class:`CpuPeak`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0
        self._mode = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._mode = CpuPeak()
            self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._mode.__exit__(*exc)
            self.peak_bytes = self._mode.peak
        return False


def measure(fn: Callable[[], object], device: torch.device, repeats: int,
            setup: Callable[[], None] | None = None) -> dict:
    """Warm-up once, then the fastest of ``repeats`` timed calls and the peak memory of one call.

    ``setup`` runs before every call, untimed. On CUDA the memory is read during the timed calls; on CPU in
    one more call (the dispatch mode that counts CPU memory would slow the timed ones)."""
    setup = setup or (lambda: None)
    setup()
    fn()
    sync(device)
    best = math.inf
    with PeakMemory(device) as mem:
        for _ in range(max(1, repeats)):
            setup()
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            best = min(best, time.perf_counter() - t0)
    if device.type != "cuda":
        setup()
        with PeakMemory(device) as mem:
            fn()
    return {"seconds": best, "peak_mem_bytes": int(mem.peak_bytes)}
