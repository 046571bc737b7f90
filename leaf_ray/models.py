"""Model and tokenizer loading from local paths only, the tiny offline pair, and compatibility checks.

Loading is always ``from_pretrained(local_path)`` (plus ``gguf_file=``). A hub id or a missing path is an
error before anything touches the network.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports stay lazy so the CLI starts fast
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

    from leaf_ray.config import ModelRef

# Nothing is ever downloaded at run time (DESIGN §2).
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


def load_tokenizer(ref: "ModelRef") -> "PreTrainedTokenizerFast":
    from transformers import AutoTokenizer

    path = resolve_local_path(ref.tokenizer_path or ref.path, "tokenizer")
    kwargs = {"local_files_only": True}
    if ref.gguf_file and not ref.tokenizer_path:
        kwargs["gguf_file"] = ref.gguf_file
    tok = AutoTokenizer.from_pretrained(str(path), **kwargs)
    if not tok.is_fast:
        raise ModelLoadError(f"tokenizer at {path} is not a fast tokenizer; offsets are required")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(ref: "ModelRef", *, device_map=None, max_memory=None, dtype: str | None = None) -> "PreTrainedModel":
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_local_path(ref.path, "model")
    kwargs = {"local_files_only": True, "dtype": getattr(torch, dtype or ref.dtype)}
    if ref.gguf_file:
        if not (path / ref.gguf_file).is_file():
            raise ModelLoadError(f"gguf file {ref.gguf_file!r} not found in {path}")
        kwargs["gguf_file"] = ref.gguf_file
    if device_map is not None:
        kwargs["device_map"] = device_map
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


def vocab_size_of(model_or_config) -> int:
    cfg = getattr(model_or_config, "config", model_or_config)
    return int(cfg.vocab_size)


def check_distill_compatible(teacher_tok, student_tok, teacher_vocab: int, student_vocab: int) -> None:
    """Distillation compares distributions token by token: both must use one vocabulary.

    A teacher whose output vocab is larger than the student's (padding rows) is allowed with a warning and
    truncated by the loss; a smaller one, or different tokenizers, is an error naming both sizes.
    """
    if teacher_vocab < student_vocab:
        raise ModelCompatibilityError(
            f"teacher vocab size {teacher_vocab} is smaller than student vocab size {student_vocab}; "
            "distillation needs the teacher to cover every student token"
        )
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise ModelCompatibilityError(
            f"teacher and student tokenizers differ (teacher vocab {len(teacher_tok)} tokens, student vocab "
            f"{len(student_tok)} tokens; model vocab sizes {teacher_vocab} / {student_vocab}); distillation "
            "needs one shared tokenizer"
        )
    if teacher_vocab > student_vocab:
        warnings.warn(
            f"teacher vocab size {teacher_vocab} > student vocab size {student_vocab}: teacher logits are "
            "truncated to the student's vocabulary",
            stacklevel=2,
        )


# --------------------------------------------------------------------------- the tiny offline pair

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

TINY_TEACHER = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2)
TINY_STUDENT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1)


def _tokenizer_corpus(extra_texts: list[str] | None = None) -> list[str]:
    from leaf_ray.data.demo_corpus import generate_problems

    texts = []
    for p in generate_problems(200, seed=1234):
        texts += [p["instruction"], p["output"]]
    texts += extra_texts or []
    # Non-ASCII so byte-level merges include common accented / CJK pieces.
    texts += ["Café crème brûlée naïve — “quotes” 数学 问题 ½ × ÷ ≤ ≥ π"] * 5
    return texts


def train_tiny_tokenizer(vocab_size: int = 2048, extra_texts: list[str] | None = None,
                         seed_texts: list[str] | None = None) -> "PreTrainedTokenizerFast":
    """A byte-level BPE (any UTF-8 text round-trips; offsets are character offsets) with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False: a token's offsets include its leading space, so offsets tile the text.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(seed_texts if seed_texts is not None else _tokenizer_corpus(extra_texts), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>", bos_token=None,
        unk_token=None, additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(tokenizer, arch: str = "qwen2", seed: int = 0, **sizes) -> "PreTrainedModel":
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), max_position_embeddings=4096, head_dim=64,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  bos_token_id=None, tie_word_embeddings=False, dtype="float32")
    common.update(sizes)
    assert common["hidden_size"] // common["num_attention_heads"] == 64, "vLLM on CPU needs head_dim 64"
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        raise ValueError(f"unknown tiny arch {arch!r} (qwen2 | llama)")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def make_tiny_pair(out_dir: str | Path, arch: str = "qwen2", seed: int = 0, vocab_size: int = 2048) -> dict:
    """Build and save `out_dir/teacher` and `out_dir/student` sharing one offline-trained tokenizer."""
    out = Path(out_dir)
    tok = train_tiny_tokenizer(vocab_size)
    paths = {}
    for role, sizes, s in (("teacher", TINY_TEACHER, seed), ("student", TINY_STUDENT, seed + 1)):
        model = make_tiny_model(tok, arch=arch, seed=s, **sizes)
        d = out / role
        model.save_pretrained(d)
        tok.save_pretrained(d)
        paths[role] = str(d)
    (out / "leaf_ray_tiny.json").write_text(json.dumps({"arch": arch, "seed": seed, "vocab": len(tok)}))
    return paths


def ensure_tiny_pair(cfg) -> None:
    """Demo convenience: build the tiny pair at the configured paths if they are missing."""
    t, s = Path(cfg.models.teacher.path), Path(cfg.models.student.path)
    if t.exists() and s.exists():
        return
    if not cfg.models.make_tiny_if_missing or t.parent != s.parent:
        return
    make_tiny_pair(t.parent)
