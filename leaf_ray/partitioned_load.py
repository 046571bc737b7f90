"""Loading a model so that no rank ever holds (or reads) the whole of it: each rank reads only its own
slices of the safetensors checkpoint, straight into the memory of its shard.

Why: `from_pretrained` on every rank, then sharding, costs N whole copies of the model in host memory during
load and N whole reads of the checkpoint (docs/large-teachers.md has the measurements). At 70B (141 GB in
bf16) on an 8-GPU node that does not fit next to anything else.

- :class:`SafetensorsCheckpoint`: reads element ranges ``[start, stop)`` of a flattened tensor with ``pread``
  (the safetensors layout is a little-endian u64 header length, a JSON header with each tensor's dtype, shape
  and byte offsets, then the raw row-major data), so a rank's slice of a parameter is one contiguous read. No
  file is memory-mapped: the pages a rank reads are not left mapped (and counted) in its address space. The
  bytes read are counted (`bytes_read`).
- :func:`load_fsdp_sharded`: the teacher gang. The model is built on the meta device (buffers real, so the
  non-persistent rotary ``inv_freq`` is computed as usual), sharded with FSDP2 by the caller's function,
  materialised with ``to_empty`` (buffers put back), and each rank's dim-0 shard of every parameter is filled
  from the checkpoint.
- :func:`load_zero3_partitioned`: DeepSpeed ZeRO-3 (teacher_mode zero3, ZeRO-3 student). The model is built
  under ``deepspeed.zero.Init`` (each parameter partitioned as its module is constructed, weight init skipped),
  then each rank's flat partition is filled from the checkpoint.

Tied weights are one parameter (filled once, from whichever of its names the checkpoint holds); a dtype other
than the checkpoint's is converted slice by slice; a GGUF model is read from its converted directory
(:func:`leaf_ray.models.converted_gguf_dir`). A checkpoint without safetensors files makes
:func:`has_safetensors` false: callers then fall back to ``from_pretrained`` on every rank.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    pass


def checkpoint_dir(ref) -> Path:
    """The directory the weights of `ref` are read from (a GGUF file: its converted copy)."""
    from leaf_ray.models import converted_gguf_dir, resolve_local_path

    return converted_gguf_dir(ref) if ref.gguf_file else resolve_local_path(ref.path, "model")


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    return [single] if single.is_file() else []


def has_safetensors(ref) -> bool:
    return bool(safetensors_files(checkpoint_dir(ref)))


class SafetensorsCheckpoint:
    """The tensors of a safetensors checkpoint (one file or an indexed set), read by element ranges."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        files = safetensors_files(self.path)
        if not files:
            raise CheckpointError(f"{self.path} has no model.safetensors nor model.safetensors.index.json")
        self.entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        for file in files:
            with open(file, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
            data_start = 8 + header_len
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in SAFETENSORS_DTYPES:
                    raise CheckpointError(f"{file}: tensor {name!r} has dtype {info['dtype']}, which leaf-ray "
                                          f"cannot read (known: {sorted(SAFETENSORS_DTYPES)})")
                begin, end = info["data_offsets"]
                self.entries[name] = (file, SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]),
                                      data_start + begin, end - begin)
        self.bytes_read = 0
        self._fds: dict[Path, int] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][2]

    def total_bytes(self) -> int:
        return sum(e[4] for e in self.entries.values())

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def read_flat(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        """Elements ``[start, stop)`` of tensor `name` flattened, converted to `out`'s dtype and written into
        `out` (1-D, ``stop - start`` elements, any device)."""
        file, dtype, shape, offset, nbytes = self.entries[name]
        numel = math.prod(shape)
        if not 0 <= start <= stop <= numel:
            raise CheckpointError(f"{name}: elements [{start}, {stop}) out of range of {numel}")
        if out.numel() != stop - start:
            raise CheckpointError(f"{name}: {stop - start} elements read into a tensor of {out.numel()}")
        if stop == start:
            return
        direct = out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous()
        buf = out if direct else torch.empty(stop - start, dtype=dtype)
        view = memoryview(buf.view(-1).view(torch.uint8).numpy())
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(file, os.O_RDONLY)
        itemsize = nbytes // max(numel, 1)
        pos, done = offset + start * itemsize, 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], pos + done)
            if n <= 0:
                raise CheckpointError(f"{file}: unexpected end of file reading {name!r}")
            done += n
        self.bytes_read += done
        if not direct:
            out.copy_(buf.view(-1))


def _param_names(model: torch.nn.Module) -> dict[int, list[str]]:
    """Every name of every parameter (tied weights: one parameter, several names), by id."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _checkpoint_name(ckpt: SafetensorsCheckpoint, names: list[str], shape: tuple[int, ...]) -> str:
    for name in names:
        if name in ckpt:
            if tuple(ckpt.shape(name)) != tuple(shape):
                raise CheckpointError(f"{ckpt.path}: tensor {name!r} has shape {list(ckpt.shape(name))}, the "
                                      f"model's parameter has {list(shape)}; the config and weights differ")
            return name
    raise CheckpointError(f"{ckpt.path}: no tensor for parameter {' / '.join(names)}")


def _build_kwargs(ref, dtype: str):
    from transformers import AutoConfig

    path = checkpoint_dir(ref)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    return path, config, getattr(torch, dtype)


def load_fsdp_sharded(ref, dtype: str, shard, device: torch.device | str = "cpu"):
    """`ref`'s model built on the meta device, sharded by ``shard(model)`` (FSDP2 ``fully_shard`` on its
    units; returns the model), then each rank's shard of every parameter read from the checkpoint. Returns
    ``(model, bytes read by this rank)``."""
    from accelerate import init_empty_weights
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from transformers import AutoModelForCausalLM

    path, config, torch_dtype = _build_kwargs(ref, dtype)
    # Parameters on meta, buffers real: rotary inv_freq (non-persistent) is computed by the module as usual.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    # init_empty_weights registers a new meta parameter at every assignment, which unties tied embeddings
    model.tie_weights()
    model = shard(model)
    buffers = dict(model.named_buffers())
    model.to_empty(device=device)  # allocates each rank's shards only (and overwrites buffers: put back)
    for name, buf in buffers.items():
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = buf.to(device)
    names = _param_names(model)  # after sharding and to_empty: both replace the parameters
    if getattr(config, "tie_word_embeddings", False) and len(names) != len(list(model.parameters())):
        raise CheckpointError("tied embeddings came apart while the model was sharded")
    with SafetensorsCheckpoint(path) as ckpt, torch.no_grad():
        for name, buf in buffers.items():
            if name in ckpt:  # a persistent buffer that the checkpoint holds
                ckpt.read_flat(name, 0, buf.numel(), model.get_buffer(name).view(-1))
        for p in model.parameters():
            source = _checkpoint_name(ckpt, names[id(p)], tuple(p.shape))
            if isinstance(p, DTensor):
                local = p.to_local()
                local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
                row = math.prod(p.shape[1:])
                if any(o for o in offset[1:]) or tuple(local_shape[1:]) != tuple(p.shape[1:]):
                    raise CheckpointError(f"{source}: only dim-0 shards are read slice by slice")
                start = offset[0] * row
                ckpt.read_flat(source, start, start + local.numel(), local.view(-1))
            else:
                ckpt.read_flat(source, 0, p.numel(), p.data.view(-1))
        return model, ckpt.bytes_read


@contextlib.contextmanager
def zero3_init(ds_config: dict, dtype: torch.dtype, device: torch.device | str = "cpu"):
    """Modules constructed inside are partitioned by ZeRO-3 as they are built, their weight init skipped
    (the same contexts transformers enters under its DeepSpeed integration), their partitions on `device`.

    Import the modules' classes before entering (:func:`load_zero3_partitioned` does): zero.Init hooks
    ``nn.Module.__init_subclass__``, so a class defined inside has DeepSpeed's copy of its ``__init__`` taken
    before any class decorator runs, and on exit DeepSpeed puts that undecorated ``__init__`` back. Under
    transformers 5.25 with `kernels` installed, ``@use_kernelized_func`` (Qwen2Attention, LlamaAttention, ...)
    wraps ``__init__`` to set ``_kernel_funcs``, which its ``forward`` reads: every such module built after the
    context in that process (the whole-loaded teacher, the validation copy) then fails with "object has no
    attribute '_kernel_funcs'"."""
    import os

    import deepspeed
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    # The parameters' dtype comes from the config's bf16/fp16 sections: zero.Init's own `dtype` argument turns
    # float32 into bfloat16 on an accelerator without fp16 (its CPU one), so it is checked, not passed.
    precision = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else \
        torch.float16 if ds_config.get("fp16", {}).get("enabled") else torch.float32
    if precision != dtype:
        raise ValueError(f"ZeRO-3 partitions would be {precision} (the DeepSpeed config's precision), not the "
                         f"requested {dtype}")
    # zero.Init reads the world size from DeepSpeed's comm layer: join it to the torch process group first
    # (deepspeed.initialize would do so only later), else it checks the batch sizes against a world of 1.
    deepspeed.init_distributed()
    # zero.Init puts partitions on the accelerator's device number LOCAL_RANK, which under Ray Train need not
    # be the index of the GPU this worker was given (the reason for deepspeed_args in leaf_ray.distill.engines)
    device = torch.device(device)
    local_rank = os.environ.get("LOCAL_RANK")
    if device.type == "cuda":
        os.environ["LOCAL_RANK"] = str(device.index or 0)
    try:
        with no_init_weights(), prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=ds_config):
            yield
    finally:
        if device.type == "cuda":
            if local_rank is None:
                os.environ.pop("LOCAL_RANK", None)
            else:
                os.environ["LOCAL_RANK"] = local_rank


def load_zero3_partitioned(ref, dtype: str, ds_config: dict, device: torch.device | str = "cpu"):
    """`ref`'s model built under ``deepspeed.zero.Init`` (ZeRO-3 partitions on `device`, never whole on a
    rank), then each rank's flat partition of every parameter read from the checkpoint. Returns
    ``(model, bytes read)``."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    path, config, torch_dtype = _build_kwargs(ref, dtype)
    # the model's classes defined (its modeling module imported) outside zero.Init: see zero3_init
    MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    with zero3_init(ds_config, torch_dtype, device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.tie_weights()  # as transformers does after zero.Init: the partitioned head and embedding are one again
    names = _param_names(model)
    with SafetensorsCheckpoint(path) as ckpt, torch.no_grad():
        for p in model.parameters():
            source = _checkpoint_name(ckpt, names[id(p)], tuple(p.ds_shape))
            part = p.ds_tensor.data.view(-1)
            rank = dist.get_rank(group=getattr(p, "ds_process_group", None))
            start = min(part.numel() * rank, p.ds_numel)
            stop = min(start + part.numel(), p.ds_numel)
            ckpt.read_flat(source, start, stop, part[:stop - start])
            part[stop - start:].zero_()  # the padding of the last partition
        for name, buf in model.named_buffers():
            if name in ckpt:
                ckpt.read_flat(name, 0, buf.numel(), buf.data.view(-1))
        return model, ckpt.bytes_read
