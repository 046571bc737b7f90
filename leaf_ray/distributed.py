"""Devices, process groups and collectives: the one rule every stage follows (docs/cuda-audit.md).

**The rule.** Every collective that leaf-ray issues itself goes through this module, which puts the tensor on
the device of the group's backend: CUDA (the current device) for NCCL, CPU for gloo. NCCL has no CPU tensors,
gloo no CUDA ones, so a metric sum built on the CPU cannot reach a collective unmoved. Collectives inside
libraries (DeepSpeed's gradient all-reduce, FSDP2's all-gathers) run on the tensors they own, which live on the
engine's device. A test (tests/test_distributed.py) checks that no module outside this one calls
``torch.distributed`` collectives directly.

**Devices.** A process computes on the GPU Ray assigned to it, never on one it merely sees: under Ray Train
``ray.train.torch.get_device()``; in a Ray actor the first visible GPU when Ray gave it one
(``ray.get_gpu_ids()``; Ray narrows ``CUDA_VISIBLE_DEVICES`` to it); in a plain process (inline runs) the current
CUDA device when the run asks for a GPU. The process's current CUDA device is set to it, so NCCL, DeepSpeed
(``device_rank``) and FSDP agree.

**DeepSpeed's accelerator** is chosen once per process from the run's device (``DS_ACCELERATOR``), before
``import deepspeed``: it is cached for the process's life, so a CPU accelerator left by an earlier run in the
same process is refused with a clear error, not silently used for a GPU run.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch


class DeviceError(RuntimeError):
    """A run asked for a device that this process cannot use as asked."""


# --------------------------------------------------------------------------- devices


def backend_for(device: torch.device | str) -> str:
    """The process-group backend of a group whose ranks compute on ``device``: nccl on CUDA, gloo on CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def device_for_backend(backend: str, cuda_index: int | None = None) -> torch.device:
    """Where a collective's tensor must live for a group with ``backend``: a group with NCCL and no CPU backend
    (``nccl``) takes CUDA tensors only; gloo, or a mixed ``cpu:gloo,cuda:nccl`` group, takes CPU tensors."""
    parts = {part.split(":")[-1] for part in backend.lower().split(",")}
    if "nccl" in parts and "gloo" not in parts:
        return torch.device("cuda", torch.cuda.current_device() if cuda_index is None else cuda_index)
    return torch.device("cpu")


def collective_device(group=None) -> torch.device:
    import torch.distributed as dist

    return device_for_backend(str(dist.get_backend(group)))


def use_device(device: torch.device) -> torch.device:
    """Make ``device`` this process's current CUDA device (a no-op on CPU); returns it."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def ray_actor_device(num_gpus: float) -> torch.device:
    """The device of a Ray actor or task that asked for ``num_gpus``: its (first) assigned GPU, else the CPU.

    A CPU actor on a GPU node computes on the CPU even where CUDA is visible to it."""
    if num_gpus <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"this actor asked for {num_gpus:g} GPU(s) but CUDA is not available in it "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    return use_device(torch.device("cuda", 0))  # Ray narrows CUDA_VISIBLE_DEVICES to the assigned GPUs


def process_device() -> torch.device:
    """The device of a model held by this process when the caller has no GPU count at hand: inside a Ray
    worker the GPU Ray assigned to it (none: the CPU, even on a GPU node); outside Ray (inline runs) the
    current CUDA device where one is visible."""
    import sys

    if not torch.cuda.is_available():
        return torch.device("cpu")
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized() and ray._private.worker.global_worker.mode == ray.WORKER_MODE:
        return use_device(torch.device("cuda", 0)) if ray.get_gpu_ids() else torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def ray_train_device(use_gpu: bool) -> torch.device:
    """A Ray Train worker's device (``ray.train.torch.get_device()``, which maps the GPU Ray assigned to this
    worker into the CUDA_VISIBLE_DEVICES it shares with the node's other workers), made current."""
    if not use_gpu:
        return torch.device("cpu")
    import ray.train.torch

    device = ray.train.torch.get_device()
    if isinstance(device, list):  # several GPUs per worker: the first computes
        device = device[0]
    return use_device(device)


def inline_device(use_gpu: bool) -> torch.device:
    """The device of an inline run (the calling process): the current CUDA device when the run asks for a GPU."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError("the run asks for a GPU (use_gpu / num_gpus) but CUDA is not available in this process")
    return use_device(torch.device("cuda", torch.cuda.current_device()))


# --------------------------------------------------------------------------- DeepSpeed's accelerator


def deepspeed_accelerator(device: torch.device) -> str:
    """Choose DeepSpeed's accelerator for ``device`` (``DS_ACCELERATOR``) before it is first used here.

    DeepSpeed caches its accelerator for the life of the process: one already chosen differently is an error
    that says so (an inline CPU run followed by a GPU run in one process), never a silent CPU engine."""
    wanted = "cuda" if device.type == "cuda" else "cpu"
    chosen = _deepspeed_accelerator_in_use()
    if chosen is not None and chosen != wanted:
        raise DeviceError(f"DeepSpeed's accelerator in this process is already {chosen!r}; this run needs "
                          f"{wanted!r}. Run it in a fresh process (DeepSpeed fixes its accelerator once).")
    os.environ["DS_ACCELERATOR"] = wanted
    return wanted


def _deepspeed_accelerator_in_use() -> str | None:
    import sys

    module = sys.modules.get("deepspeed.accelerator.real_accelerator")
    accelerator = getattr(module, "ds_accelerator", None) if module else None
    return accelerator.device_name() if accelerator is not None else None


# --------------------------------------------------------------------------- process groups and collectives


def init_group(device: torch.device, *, rank: int, world_size: int, init_method: str | None = None,
               store=None, timeout_s: float | None = None) -> str:
    """Join (or create) the default process group for ranks on ``device``; returns its backend. On CUDA the
    group is bound to the device (NCCL's communicator is created eagerly, and barriers use it)."""
    import torch.distributed as dist

    backend = backend_for(device)
    kwargs = {"backend": backend, "rank": rank, "world_size": world_size}
    if init_method is not None:
        kwargs["init_method"] = init_method
    if store is not None:
        kwargs["store"] = store
    if timeout_s is not None:
        kwargs["timeout"] = timedelta(seconds=timeout_s)
    if device.type == "cuda":
        kwargs["device_id"] = use_device(device)
    dist.init_process_group(**kwargs)
    return backend


def all_reduce_sum(values: dict[str, float], group=None) -> dict[str, float]:
    """``values`` summed over the ranks (float64, on the group's device)."""
    import torch.distributed as dist

    keys = list(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return dict(zip(keys, tensor.cpu().tolist()))


def barrier(group=None) -> None:
    """A barrier on the group's device (NCCL's needs the current device named, else it guesses one by rank)."""
    import torch.distributed as dist

    device = collective_device(group)
    if device.type == "cuda":
        dist.barrier(group=group, device_ids=[device.index])
    else:
        dist.barrier(group=group)
