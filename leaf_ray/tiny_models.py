"""The tiny offline teacher/student pair: a byte-level BPE tokenizer trained on the built-in corpus and
randomly initialised Qwen2/Llama models around it (tests, the smoke chain, the benchmarks' defaults).

It sits above `leaf_ray.data` (its tokenizer reads the demo corpus) and `leaf_ray.models` (which only loads).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast


CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

TINY_TEACHER = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
                "num_attention_heads": 4, "num_key_value_heads": 2}
TINY_STUDENT = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_key_value_heads": 1}


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
                         seed_texts: list[str] | None = None) -> PreTrainedTokenizerFast:
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


def make_tiny_model(tokenizer, arch: str = "qwen2", seed: int = 0, **sizes) -> PreTrainedModel:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = {"vocab_size": len(tokenizer), "max_position_embeddings": 4096, "head_dim": 64,
              "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
              "bos_token_id": None, "tie_word_embeddings": False, "dtype": "float32"}
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
