"""Model and tokenizer loading from local paths only, and compatibility checks.

The tiny offline pair of the tests and the smoke chain is built by `leaf_ray.tiny_models`.

Loading is always ``from_pretrained(local_path)`` (plus ``gguf_file=``). A hub id or a missing path is an
error before anything touches the network.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports stay lazy so the CLI starts fast
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

    from leaf_ray.config import ModelRef

# Nothing is ever downloaded at run time (docs/design.md §3).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class ModelLoadError(RuntimeError):
    pass


class ModelCompatibilityError(ValueError):
    pass


DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def resolve_local_path(path: str, what: str = "model") -> Path:
    """Return `path` as an existing directory, or raise naming why (hub id or missing path)."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    looks_like_hub_id = (
        not path.startswith((".", "/", "~")) and path.count("/") == 1 and not Path(path.split("/")[0]).exists()
    )
    if looks_like_hub_id:
        raise ModelLoadError(
            f"{what} path {path!r} does not exist locally and looks like a hub id; leaf-ray never downloads "
            f"at run time. Download it once (e.g. `huggingface-cli download {path} --local-dir DIR`) and set "
            f"the local DIR in the config."
        )
    raise ModelLoadError(f"{what} path {path!r} does not exist")


def _gguf_cache_root() -> Path:
    return Path(os.environ.get("LEAF_RAY_GGUF_CACHE", Path.home() / ".cache" / "leaf-ray" / "gguf"))


def converted_gguf_dir(ref: ModelRef) -> Path:
    """A GGUF checkpoint converted once to a `save_pretrained` directory (model + tokenizer) and reused.

    transformers de-quantizes a GGUF file on every load (SmolLM2-135M: ~45 s of CPU, and again in every
    actor); the conversion is cached under ``$LEAF_RAY_GGUF_CACHE`` (default ``~/.cache/leaf-ray/gguf``),
    keyed by the file's absolute path, size and mtime, written to a temporary directory and renamed into
    place, so concurrent actors never read a half-written copy.
    """
    import hashlib

    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_local_path(ref.path, "model") / ref.gguf_file
    if not src.is_file():
        raise ModelLoadError(f"gguf file {ref.gguf_file!r} not found in {src.parent}")
    stat = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = _gguf_cache_root() / f"{src.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    kwargs = {"local_files_only": True, "gguf_file": ref.gguf_file}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), dtype="float32", **kwargs)
        # the weights are de-quantized already: save them as a plain float32 checkpoint
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(src.parent), **kwargs).save_pretrained(tmp)
    try:
        os.rename(tmp, out)
    except OSError:  # another process converted it first: theirs is as good
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_tokenizer(ref: ModelRef) -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer

    if ref.gguf_file and not ref.tokenizer_path:
        path = converted_gguf_dir(ref)
    else:
        path = resolve_local_path(ref.tokenizer_path or ref.path, "tokenizer")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not tok.is_fast:
        raise ModelLoadError(f"tokenizer at {path} is not a fast tokenizer; offsets are required")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def cpu_has_native(dtype: str) -> bool:
    """Whether this CPU runs `dtype` matmuls natively (bf16: AVX512-BF16 or AMX; fp16: AMX-FP16).

    Without it, oneDNN/ATen emulate them: a bfloat16 saliency pass of a 0.5B model took 83 s against 3 s in
    float32 on our AVX2 machines (torch profiler: aten::mm / aten::bmm).
    """
    import torch

    if dtype == "float32":
        return True
    if dtype == "bfloat16":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    if dtype == "float16":
        return bool(torch.cpu._is_amx_fp16_supported())
    raise ValueError(f"unknown dtype {dtype!r}")


_logged_fallbacks: set[str] = set()


def compute_dtype(requested: str, *, on_cpu: bool, force: bool = False, what: str = "model") -> str:
    """The dtype to compute in: `requested`, except bfloat16/float16 on a CPU without native support, which
    runs in float32 (one log line per process and dtype) unless `force` (``models.<role>.force_dtype``)."""
    if force or not on_cpu or cpu_has_native(requested):
        return requested
    if requested not in _logged_fallbacks:
        _logged_fallbacks.add(requested)
        import logging

        logging.getLogger("leaf_ray").warning(
            "%s: this CPU has no native %s matmuls (no AVX512-BF16/AMX); computing in float32 instead "
            "(about 25x faster here). Set models.<role>.force_dtype=true to keep %s.", what, requested, requested)
    return "float32"


PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def compute_precision(precision: str, *, on_cpu: bool, force: bool = False) -> str:
    """:func:`compute_dtype` for DeepSpeed's precision names (fp32 | bf16 | fp16)."""
    dtype = compute_dtype(PRECISIONS[precision], on_cpu=on_cpu, force=force, what="distill.deepspeed.precision")
    return {v: k for k, v in PRECISIONS.items()}[dtype]


def model_dtype(ref: ModelRef, dtype: str | None = None, *, on_cpu: bool) -> str:
    """The dtype `ref`'s model is loaded in: `dtype` (or `ref.dtype`) through :func:`compute_dtype`."""
    return compute_dtype(dtype or ref.dtype, on_cpu=on_cpu, force=ref.force_dtype, what=f"model {ref.path}")


def load_model(ref: ModelRef, *, device_map=None, max_memory=None, dtype: str | None = None,
               device: str | None = None) -> PreTrainedModel:
    """`ref`'s model from local disk. Its dtype is `dtype` (or `ref.dtype`), through :func:`compute_dtype`
    when it will run on a CPU: `device` "cpu" (a CPU actor on a GPU node too), or, when `device` is not given,
    no `device_map` and no visible GPU."""
    import torch
    from transformers import AutoModelForCausalLM

    if ref.gguf_file:
        path = converted_gguf_dir(ref)
    else:
        path = resolve_local_path(ref.path, "model")
    on_cpu = device == "cpu" if device is not None else device_map is None and not torch.cuda.is_available()
    kwargs = {"local_files_only": True, "dtype": getattr(torch, model_dtype(ref, dtype, on_cpu=on_cpu))}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


def vocab_size_of(model_or_config) -> int:
    cfg = getattr(model_or_config, "config", model_or_config)
    return int(cfg.vocab_size)


def check_distill_compatible(teacher_tok, student_tok, teacher_vocab: int, student_vocab: int) -> int:
    """Distillation compares distributions token by token: both models must use one tokenizer. Returns the
    number of real tokens, ``len(tokenizer)``, to which both models' logits are cut.

    A model's vocab_size may exceed the tokenizer's length: those rows are padding (Qwen2.5 pads 151665
    tokens to 151936 or 152064 rows, differently per size) and are cut, so teacher and student may differ
    there. A vocab_size smaller than the tokenizer, or different tokenizers, is an error naming both sizes.
    """
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise ModelCompatibilityError(
            f"teacher and student tokenizers differ (teacher vocab {len(teacher_tok)} tokens, student vocab "
            f"{len(student_tok)} tokens; model vocab sizes {teacher_vocab} / {student_vocab}); distillation "
            "needs one shared tokenizer"
        )
    n_tokens = len(student_tok)
    for role, vocab in (("teacher", teacher_vocab), ("student", student_vocab)):
        if vocab < n_tokens:
            raise ModelCompatibilityError(
                f"{role} vocab size {vocab} is smaller than its tokenizer's {n_tokens} tokens: token ids >= "
                f"{vocab} have no embedding row; the checkpoint and tokenizer do not belong together"
            )
    return n_tokens


def model_config(ref: ModelRef):
    """The model's transformers config, without loading weights (GGUF: from its converted directory)."""
    from transformers import AutoConfig

    path = converted_gguf_dir(ref) if ref.gguf_file else resolve_local_path(ref.path, "model")
    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def check_pair(models) -> int:
    """Teacher and student of ``cfg.models`` can be distilled together (:func:`check_distill_compatible`);
    returns the shared tokenizer's length. Used by ``leaf-ray models check`` and before training starts."""
    return check_distill_compatible(load_tokenizer(models.teacher), load_tokenizer(models.student),
                                    vocab_size_of(model_config(models.teacher)),
                                    vocab_size_of(model_config(models.student)))


# --------------------------------------------------------------------------- the tiny offline pair
