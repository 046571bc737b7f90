"""Per-token saliency g_i = ||dL/de_i||: batching, padding side, frozen parameters, dtypes, checkpointing."""

from __future__ import annotations

import pytest
import torch

from leaf_ray.config import ModelRef
from leaf_ray.data.chat import render
from leaf_ray.detect.saliency import position_ids_from_mask, token_saliency
from leaf_ray.models import load_model
from leaf_ray.tiny_models import make_tiny_model

SAMPLES = [
    ("Tom has 3 apples and buys 4 more. How many apples?", "3 + 4 = 7.\n\nThe answer is \\boxed{7}."),
    ("What is 2 + 2?", "\\boxed{4}"),
    ("A train travels 60 km per hour for 2 hours and then 30 km per hour for 1 hour. How far does it go?",
     "60 * 2 = 120 km.\n\n30 * 1 = 30 km.\n\nTotal 150 km, \\boxed{150}."),
]


@pytest.fixture(scope="module")
def student(tiny_pair):
    return load_model(ModelRef(path=tiny_pair["student"]))


@pytest.fixture(scope="module")
def teacher(tiny_pair):
    return load_model(ModelRef(path=tiny_pair["teacher"]))


@pytest.fixture(scope="module")
def llama(tiny_tokenizer):
    """A second architecture with eager attention and attention dropout > 0, left in train mode as built:
    token_saliency must turn dropout off itself."""
    model = make_tiny_model(tiny_tokenizer, arch="llama", seed=3, hidden_size=128, intermediate_size=256,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                            attention_dropout=0.3)
    model.set_attn_implementation("eager")
    assert model.training
    return model


@pytest.fixture(scope="module")
def rendered(tiny_tokenizer):
    return [render(tiny_tokenizer, instruction, response) for instruction, response in SAMPLES]


def pad_batch(samples, pad_id: int, side: str):
    """(input_ids, attention_mask, target_mask), padded on `side`."""
    length = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    attention = torch.zeros(len(samples), length, dtype=torch.long)
    target = torch.zeros(len(samples), length, dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s.input_ids)
        cols = slice(length - n, length) if side == "left" else slice(0, n)
        ids[b, cols] = torch.tensor(s.input_ids)
        attention[b, cols] = 1
        target[b, cols] = torch.tensor(s.target_mask)
    return ids, attention, target


def real_tokens(out, attention, b):
    return out.grad_norm[b][attention[b].bool()]


@pytest.mark.parametrize("model_name", ["student", "teacher", "llama"])
def test_batched_equals_per_sample_and_padding_sides_agree(request, model_name, rendered, tiny_tokenizer):
    model = request.getfixturevalue(model_name)
    assert len({len(s.input_ids) for s in rendered}) == len(rendered)  # different lengths
    pad = tiny_tokenizer.pad_token_id
    batches = {side: pad_batch(rendered, pad, side) for side in ("right", "left")}
    outs = {side: token_saliency(model, *batch) for side, batch in batches.items()}
    for b, sample in enumerate(rendered):
        alone = token_saliency(model, *pad_batch([sample], pad, "right"))
        assert alone.grad_norm.dtype == torch.float32 and alone.loss.dtype == torch.float32
        assert alone.grad_norm.shape == (1, len(sample.input_ids))
        assert (alone.grad_norm > 0).any()
        for side, (_, attention, _) in batches.items():
            torch.testing.assert_close(real_tokens(outs[side], attention, b), alone.grad_norm[0],
                                       atol=1e-5, rtol=0)
            torch.testing.assert_close(outs[side].loss[b], alone.loss[0], atol=1e-5, rtol=0)
            assert (outs[side].grad_norm[b][attention[b] == 0] == 0).all()  # padding scores 0
        assert int(alone.num_targets[0]) == sum(sample.target_mask)
    # The loss is the mean response CE: checked against the model's own loss on one unpadded sample.
    sample = rendered[0]
    ids = torch.tensor([sample.input_ids])
    labels = ids.masked_fill(torch.tensor([sample.target_mask]) == 0, -100)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        reference = model(input_ids=ids, labels=labels).loss
    model.train(was_training)
    torch.testing.assert_close(outs["right"].loss[0], reference.float(), atol=1e-5, rtol=0)


def test_gradient_follows_causality(student, rendered, tiny_tokenizer):
    """Token i's embedding reaches only logits >= i, which predict tokens > i: g_i = 0 when no target lies
    after i (the last target itself, and anything after it), g_i > 0 before."""
    sample = rendered[1]
    ids, attention, target = pad_batch([sample], tiny_tokenizer.pad_token_id, "right")
    last_target = int(target[0].nonzero().max())
    target[0, last_target] = 0  # the final token (EOS) is now context after every target
    out = token_saliency(student, ids, attention, target)
    new_last = int(target[0].nonzero().max())
    assert (out.grad_norm[0, new_last:] == 0).all()
    assert (out.grad_norm[0, :new_last] > 0).all()


def test_parameters_frozen_no_grad_allocated_and_state_restored(student, rendered, tiny_tokenizer):
    params = list(student.parameters())
    for i, p in enumerate(params):  # a mixed state must come back exactly
        p.requires_grad_(i % 2 == 0)
    student.train()
    student.model.layers[0].eval()
    seen = {}

    def spy(module, args, output):
        seen["any_param_requires_grad"] = any(p.requires_grad for p in student.parameters())
        seen["any_module_training"] = any(m.training for m in student.modules())

    handle = student.model.layers[-1].register_forward_hook(spy)
    try:
        token_saliency(student, *pad_batch(rendered, tiny_tokenizer.pad_token_id, "left"))
    finally:
        handle.remove()
    assert seen == {"any_param_requires_grad": False, "any_module_training": False}
    assert all(p.grad is None for p in params)
    assert [p.requires_grad for p in params] == [i % 2 == 0 for i in range(len(params))]
    assert student.training and not student.model.layers[0].training and student.model.layers[1].training
    student.eval()
    for p in params:
        p.requires_grad_(True)


def test_works_under_inference_mode(student, rendered, tiny_tokenizer):
    batch = pad_batch(rendered, tiny_tokenizer.pad_token_id, "right")
    expected = token_saliency(student, *batch)
    with torch.inference_mode():
        inference_batch = tuple(t.clone() for t in batch)
        got = token_saliency(student, *inference_batch)
    torch.testing.assert_close(got.grad_norm, expected.grad_norm, atol=0, rtol=0)


@pytest.mark.parametrize("model_name", ["student", "llama"])
def test_gradient_checkpointing_same_numbers_and_recomputes(request, model_name, rendered, tiny_tokenizer):
    model = request.getfixturevalue(model_name)
    batch = pad_batch(rendered, tiny_tokenizer.pad_token_id, "left")
    calls = []
    handle = model.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    try:
        plain = token_saliency(model, *batch)
        plain_calls = len(calls)
        checkpointed = token_saliency(model, *batch, gradient_checkpointing=True)
    finally:
        handle.remove()
    assert plain_calls == 1 and len(calls) - plain_calls == 2  # forward + recomputation in backward
    torch.testing.assert_close(checkpointed.grad_norm, plain.grad_norm, atol=1e-5, rtol=0)
    torch.testing.assert_close(checkpointed.loss, plain.loss, atol=1e-5, rtol=0)
    assert "forward" not in model.model.layers[0].__dict__  # wrapper removed


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_close_to_float32(tiny_pair, student, rendered, tiny_tokenizer, dtype):
    half = load_model(ModelRef(path=tiny_pair["student"], force_dtype=True), dtype=dtype)  # bf16 itself under test
    assert half.dtype == getattr(torch, dtype)
    batch = pad_batch(rendered, tiny_tokenizer.pad_token_id, "right")
    reference = token_saliency(student, *batch)
    got = token_saliency(half, *batch)
    assert got.grad_norm.dtype == torch.float32 and got.loss.dtype == torch.float32
    assert torch.isfinite(got.grad_norm).all()
    scale = reference.grad_norm.max()
    assert (got.grad_norm - reference.grad_norm).abs().max() < 0.02 * scale
    torch.testing.assert_close(got.loss, reference.loss, atol=0.02, rtol=0)


def test_zero_targets_give_zero_loss_and_gradient(student, rendered, tiny_tokenizer):
    ids, attention, target = pad_batch(rendered, tiny_tokenizer.pad_token_id, "right")
    target[1] = 0
    out = token_saliency(student, ids, attention, target)
    assert out.loss[1] == 0 and (out.grad_norm[1] == 0).all() and out.num_targets[1] == 0
    assert torch.isfinite(out.grad_norm).all() and torch.isfinite(out.loss).all()
    alone = token_saliency(student, *pad_batch([rendered[0]], tiny_tokenizer.pad_token_id, "right"))
    torch.testing.assert_close(real_tokens(out, attention, 0), alone.grad_norm[0], atol=1e-5, rtol=0)
    none = token_saliency(student, ids, attention, torch.zeros_like(target))
    assert (none.loss == 0).all() and (none.grad_norm == 0).all()


def test_bad_masks_are_rejected(student, rendered, tiny_tokenizer):
    ids, attention, target = pad_batch(rendered, tiny_tokenizer.pad_token_id, "right")
    bad = target.clone()
    bad[2, 0] = 1
    with pytest.raises(ValueError, match=r"target_mask\[:, 0\].*rows \[2\]"):
        token_saliency(student, ids, attention, bad)
    bad = target.clone()
    bad[1, -1] = 1  # row 1 is the shortest: its last column is padding
    with pytest.raises(ValueError, match=r"padding.*rows \[1\]"):
        token_saliency(student, ids, attention, bad)
    with pytest.raises(ValueError, match="attention_mask shape"):
        token_saliency(student, ids, attention[:, :-1], target)


def test_position_ids_ignore_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 1, 2, 2, 2]])
    assert torch.equal(position_ids_from_mask(mask), expected)


@pytest.mark.parametrize("side", ["left", "right"])
def test_length_groups_same_numbers_fewer_padded_tokens(student, rendered, tiny_tokenizer, side):
    """max_padding splits a mixed-length batch into length groups, each cut to its own columns: the same
    norms and losses, one forward per group, none of them as long as the batch unless it holds the longest."""
    from leaf_ray.detect.saliency import length_groups

    samples = rendered + rendered[:2]
    batch = pad_batch(samples, tiny_tokenizer.pad_token_id, side)
    lengths = [len(s.input_ids) for s in samples]
    groups = length_groups(lengths, 0.1)
    assert sorted(i for g in groups for i in g) == list(range(len(samples))) and len(groups) > 1
    for g in groups:
        longest = max(lengths[i] for i in g)
        assert len(g) * longest <= 1.1 * sum(lengths[i] for i in g) or len(g) == 1
    widths = []
    handle = student.model.layers[0].register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))
    try:
        whole = token_saliency(student, *batch)
        widths.clear()
        grouped = token_saliency(student, *batch, max_padding=0.1)
    finally:
        handle.remove()
    assert len(widths) == len(groups) and min(widths) < batch[0].shape[1]
    torch.testing.assert_close(grouped.grad_norm, whole.grad_norm, atol=1e-5, rtol=0)
    torch.testing.assert_close(grouped.loss, whole.loss, atol=1e-5, rtol=0)
    assert torch.equal(grouped.num_targets, whole.num_targets)
    assert (grouped.grad_norm[~batch[1].bool()] == 0).all()
