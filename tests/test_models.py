"""Tiny offline models through the real loading path, clear load errors, compatibility, character offsets."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from leaf_ray.config import ModelRef
from leaf_ray.data.chat import render
from leaf_ray.models import (
    ModelCompatibilityError,
    ModelLoadError,
    check_distill_compatible,
    load_model,
    load_tokenizer,
    vocab_size_of,
)
from leaf_ray.tiny_models import train_tiny_tokenizer


def test_tiny_pair_shapes_and_shared_tokenizer(tiny_pair):
    teacher, student = (load_model(ModelRef(path=tiny_pair[r])) for r in ("teacher", "student"))
    t_tok, s_tok = (load_tokenizer(ModelRef(path=tiny_pair[r])) for r in ("teacher", "student"))
    assert t_tok.get_vocab() == s_tok.get_vocab()
    assert vocab_size_of(teacher) == vocab_size_of(student) == len(s_tok) == 2048
    for model in (teacher, student):
        cfg = model.config
        assert cfg.head_dim == 64 and cfg.hidden_size // cfg.num_attention_heads == 64
    assert teacher.config.num_hidden_layers > student.config.num_hidden_layers
    assert teacher.num_parameters() > student.num_parameters()
    assert s_tok.is_fast and s_tok.chat_template and s_tok.eos_token == "<|im_end|>"
    check_distill_compatible(t_tok, s_tok, vocab_size_of(teacher), vocab_size_of(student))  # no error


def test_round_trip_save_load_keeps_logits_and_generates(tiny_pair, tmp_path):
    ref = ModelRef(path=tiny_pair["student"])
    model, tok = load_model(ref), load_tokenizer(ref)
    model.eval()
    ids = tok("Tom has 3 apples and buys 4 more. How many?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "copy")
    tok.save_pretrained(tmp_path / "copy")
    copy_ref = ModelRef(path=str(tmp_path / "copy"))
    reloaded, reloaded_tok = load_model(copy_ref).eval(), load_tokenizer(copy_ref)
    with torch.no_grad():
        after = reloaded(input_ids=ids).logits
    assert torch.equal(before, after)
    assert reloaded_tok("naïve 数学")["input_ids"] == tok("naïve 数学")["input_ids"]
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], tokenize=False,
                                     add_generation_prompt=True)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = reloaded.generate(**enc, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert out.shape[1] == enc["input_ids"].shape[1] + 5
    assert torch.equal(out[:, :enc["input_ids"].shape[1]], enc["input_ids"])


def test_dtype_is_applied(tiny_pair):
    forced = load_model(ModelRef(path=tiny_pair["student"], dtype="bfloat16", force_dtype=True))
    assert next(forced.parameters()).dtype == torch.bfloat16


def test_bf16_on_a_cpu_without_native_bf16_computes_in_fp32(tiny_pair, caplog, monkeypatch):
    from leaf_ray import models

    monkeypatch.setattr(models, "_logged_fallbacks", set())
    native = models.cpu_has_native("bfloat16")
    with caplog.at_level("WARNING", logger="leaf_ray"):
        model = load_model(ModelRef(path=tiny_pair["student"], dtype="bfloat16"))
        load_model(ModelRef(path=tiny_pair["teacher"], dtype="bfloat16"))
    expected = torch.bfloat16 if native else torch.float32
    assert next(model.parameters()).dtype == expected
    lines = [r.getMessage() for r in caplog.records if "native bfloat16" in r.getMessage()]
    assert len(lines) == (0 if native else 1)  # one clear line per process, not one per model
    # the decision itself, independent of this machine's CPU
    monkeypatch.setattr(models, "cpu_has_native", lambda dtype: dtype == "float32")
    assert models.compute_dtype("bfloat16", on_cpu=True) == "float32"
    assert models.compute_dtype("bfloat16", on_cpu=True, force=True) == "bfloat16"
    assert models.compute_dtype("bfloat16", on_cpu=False) == "bfloat16"  # GPUs keep the configured dtype
    assert models.compute_precision("bf16", on_cpu=True) == "fp32"
    assert models.compute_precision("fp16", on_cpu=False) == "fp16"


@pytest.mark.parametrize("loader", [load_model, load_tokenizer])
def test_hub_id_is_refused_without_network(loader):
    with pytest.raises(ModelLoadError) as err:
        loader(ModelRef(path="Qwen/Qwen2.5-0.5B-Instruct"))
    msg = str(err.value)
    assert "'Qwen/Qwen2.5-0.5B-Instruct'" in msg and "hub id" in msg and "never downloads" in msg


@pytest.mark.parametrize("loader", [load_model, load_tokenizer])
def test_missing_local_path_is_named(loader, tmp_path):
    missing = str(tmp_path / "no" / "such" / "model")
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        loader(ModelRef(path=missing))
    assert missing in str(err.value)


def test_missing_gguf_file_is_named(tiny_pair):
    with pytest.raises(ModelLoadError, match="gguf file 'model.gguf' not found"):
        load_model(ModelRef(path=tiny_pair["student"], gguf_file="model.gguf"))


def test_compatibility_error_names_both_vocab_sizes(tiny_tokenizer):
    small = train_tiny_tokenizer(vocab_size=1024)
    assert len(small) != len(tiny_tokenizer)
    # A student with a different tokenizer (smaller vocab) than the teacher.
    with pytest.raises(ModelCompatibilityError) as err:
        check_distill_compatible(tiny_tokenizer, small, len(tiny_tokenizer), len(small))
    assert str(len(tiny_tokenizer)) in str(err.value) and str(len(small)) in str(err.value)
    # One tokenizer, but a checkpoint with fewer embedding rows than the tokenizer has tokens.
    with pytest.raises(ModelCompatibilityError) as err:
        check_distill_compatible(tiny_tokenizer, tiny_tokenizer, 2000, 2048)
    assert "teacher vocab size 2000 is smaller than its tokenizer's 2048 tokens" in str(err.value)
    with pytest.raises(ModelCompatibilityError, match="student vocab size 1999"):
        check_distill_compatible(tiny_tokenizer, tiny_tokenizer, 2048, 1999)


def test_padded_vocab_rows_are_cut_to_the_tokenizer_length(tiny_tokenizer):
    # The Qwen2.5 case: one tokenizer, checkpoints padded to different row counts (152064 vs 151936).
    # Either side may be the larger: both are cut to len(tokenizer).
    assert check_distill_compatible(tiny_tokenizer, tiny_tokenizer, 2112, 2048) == len(tiny_tokenizer) == 2048
    assert check_distill_compatible(tiny_tokenizer, tiny_tokenizer, 2048, 2112) == 2048
    assert check_distill_compatible(tiny_tokenizer, tiny_tokenizer, 2176, 2112) == 2048


def test_models_check_cli(tiny_pair, tmp_path):
    from typer.testing import CliRunner

    from leaf_ray.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["models", "check", "--set", f"models.teacher.path={tiny_pair['teacher']}",
                             "--set", f"models.student.path={tiny_pair['student']}"])
    assert ok.exit_code == 0 and "vocab 2048" in ok.output
    bad = runner.invoke(app, ["models", "check", "--set", "models.teacher.path=org/some-model",
                              "--set", f"models.student.path={tiny_pair['student']}"])
    assert bad.exit_code == 1 and "hub id" in bad.output


def test_make_tiny_writes_a_loadable_pair(tmp_path):
    from leaf_ray.tiny_models import make_tiny_pair

    paths = make_tiny_pair(tmp_path, arch="llama", vocab_size=512)
    model = load_model(ModelRef(path=paths["student"]))
    assert model.config.model_type == "llama" and model.config.vocab_size == len(
        load_tokenizer(ModelRef(path=paths["teacher"])))
    assert json.loads((tmp_path / "leaf_ray_tiny.json").read_text())["arch"] == "llama"


# --------------------------------------------------------------------------- character offsets

TEXT = "Café crème — 数学 problem: 3 × 4 = 12, naïve “q”"


def test_offsets_tile_text_and_slices_decode_to_each_token(tiny_tokenizer):
    enc = tiny_tokenizer(TEXT, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    assert offsets[0][0] == 0 and offsets[-1][1] == len(TEXT)
    for (_, end), (start, _) in itertools.pairwise(offsets):
        assert end == start  # contiguous, no gaps, no overlaps
    for token_id, (a, b) in zip(enc["input_ids"], offsets):
        assert b > a and tiny_tokenizer.decode([token_id]) == TEXT[a:b]
    pieces = {TEXT[a:b].strip() for a, b in offsets}
    assert {"Café", "—", "数学"} <= pieces  # seen in training: whole tokens


def test_offsets_of_characters_split_across_byte_tokens_still_tile(tiny_tokenizer):
    """Characters unseen in training (Ω, ∑, 😀) are split into byte tokens that share the character's
    offsets; grouping overlapping tokens gives spans that tile the text and decode exactly."""
    text = "Ω ∑ 😀 sum"
    enc = tiny_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    groups: list[list] = []  # [start, end, token ids]
    for token_id, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
        if groups and a < groups[-1][1]:
            groups[-1][1] = max(groups[-1][1], b)
            groups[-1][2].append(token_id)
        else:
            groups.append([a, b, [token_id]])
    assert any(len(g[2]) > 1 for g in groups)
    assert groups[0][0] == 0 and groups[-1][1] == len(text)
    for (_, end, _), (start, _, _) in itertools.pairwise(groups):
        assert end == start
    for a, b, ids in groups:
        assert tiny_tokenizer.decode(ids) == text[a:b]


def _covered_text(text: str, offsets, token_idx: list[int]) -> str:
    """The characters the tokens cover; byte tokens of one character share its offsets (counted once)."""
    ranges = sorted(offsets[i] for i in token_idx)
    start, end = ranges[0]
    for a, b in ranges[1:]:
        assert a <= end, f"gap in covered characters at {end}..{a}"
        end = max(end, b)
    return text[start:end]


@pytest.mark.parametrize("instruction", [
    "Anna buys 3 pencils — each costs 2€. How much does she pay?",
    "数学: 1 + 1 = ?",
    "Hi",  # shorter than any template-specific token count
])
def test_render_locates_the_instruction_exactly(tiny_tokenizer, instruction):
    response = "She pays 6€.\n\nThe answer is \\boxed{6}."
    r = render(tiny_tokenizer, instruction, response)
    assert r.text[r.scored_span[0]:r.scored_span[1]] == instruction
    assert _covered_text(r.text, r.offsets, r.scored_token_idx) == instruction
    assert r.scored_token_idx == list(range(r.scored_token_idx[0], r.scored_token_idx[-1] + 1))
    targets = [i for i, m in enumerate(r.target_mask) if m]
    assert _covered_text(r.text, r.offsets, targets) == response + tiny_tokenizer.eos_token
    assert r.input_ids == tiny_tokenizer(r.text, add_special_tokens=False)["input_ids"]


def test_render_prefix_scores_the_response_prefix(tiny_tokenizer):
    prefix, rest = "Step one: 3 + 4 = 7.\n\n", "Step two: the answer is 7."
    r = render(tiny_tokenizer, "Add 3 and 4.", rest, scored="prefix", prefix=prefix)
    assert r.text[r.scored_span[0]:r.scored_span[1]] == prefix
    targets = [i for i, m in enumerate(r.target_mask) if m]
    assert _covered_text(r.text, r.offsets, targets) == rest + tiny_tokenizer.eos_token
