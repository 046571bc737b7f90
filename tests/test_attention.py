"""Attention mass on confounder tokens: the aggregation on a hand-built tensor, and a real tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from leaf_ray.analysis.attention import (
    confounder_attention_mass,
    encode_for_attention,
    measure_attention,
    uniform_attention_mass,
)


def test_mass_on_hand_built_tensor():
    # L=2 layers, B=1, H=2 heads, T=4 positions; queries = positions 2 and 3; confounder key = position 1.
    attn = torch.zeros(2, 1, 2, 4, 4)
    # layer 0: head 0 puts 0.5 on key 1 at both queries, head 1 puts 1.0 at query 2 and 0.0 at query 3
    attn[0, 0, 0, 2] = torch.tensor([0.5, 0.5, 0.0, 0.0])
    attn[0, 0, 0, 3] = torch.tensor([0.25, 0.5, 0.25, 0.0])
    attn[0, 0, 1, 2] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    attn[0, 0, 1, 3] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    # layer 1: every head and query puts 0.2 on key 1
    attn[1, 0, :, 2] = torch.tensor([0.8, 0.2, 0.0, 0.0])
    attn[1, 0, :, 3] = torch.tensor([0.4, 0.2, 0.2, 0.2])
    query = torch.tensor([[False, False, True, True]])
    keys = torch.tensor([[False, True, False, False]])
    # query 2: mean over (l, h) of [0.5, 1.0, 0.2, 0.2] = 0.475; query 3: [0.5, 0.0, 0.2, 0.2] = 0.225
    mass = confounder_attention_mass(attn, query, keys)
    assert mass.shape == (1,)
    assert mass.item() == pytest.approx((0.475 + 0.225) / 2)
    # the per-layer tuple a model returns gives the same number
    assert confounder_attention_mass((attn[0], attn[1]), query, keys).item() == pytest.approx(0.35)


def test_mass_sums_over_several_confounder_columns_and_is_nan_without_queries():
    attn = torch.full((1, 2, 1, 3, 3), 1 / 3)
    keys = torch.tensor([[True, True, False], [True, False, False]])
    query = torch.tensor([[False, False, True], [False, False, False]])
    mass = confounder_attention_mass(attn, query, keys)
    assert mass[0].item() == pytest.approx(2 / 3)
    assert math.isnan(mass[1].item())


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="query_mask"):
        confounder_attention_mass(torch.zeros(1, 1, 1, 3, 3), torch.zeros(1, 4, dtype=torch.bool),
                                  torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[L, B, H, T, T\]"):
        confounder_attention_mass(torch.zeros(1, 3, 3), torch.zeros(1, 3, dtype=torch.bool),
                                  torch.zeros(1, 3, dtype=torch.bool))


def test_uniform_reference_ignores_padding():
    query = torch.tensor([[False, False, True, True, False]])
    keys = torch.tensor([[True, False, False, False, False]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 0]])
    # t=2 sees 3 keys (1 confounder), t=3 sees 4 -> (1/3 + 1/4) / 2
    assert uniform_attention_mass(query, keys, attention_mask).item() == pytest.approx((1 / 3 + 1 / 4) / 2)


def test_tiny_model_end_to_end(tiny_pair, tiny_tokenizer):
    from leaf_ray.config import ModelRef
    from leaf_ray.models import load_model

    model = load_model(ModelRef(path=tiny_pair["student"]))
    instruction = "Ann has 3 pens. Bob is 9 years old. How many pens does Ann have?"
    distractor = "Bob is 9 years old."
    start = instruction.index(distractor)
    samples = [{"instruction": instruction, "output": "3\n\nThe answer is \\boxed{3}.",
                "confounder_spans": [[start, start + len(distractor)]]},
               {"instruction": "Cara has 5 cups. How many cups does Cara have?", "output": "5",
                "confounder_spans": []}]
    encoded = encode_for_attention(tiny_tokenizer, samples)
    marked = [tiny_tokenizer.decode([t]) for t, k in zip(encoded[0]["input_ids"], encoded[0]["keys"]) if k]
    assert "".join(marked).strip() == distractor
    assert not any(encoded[1]["keys"])
    result = measure_attention(model, tiny_tokenizer, samples, batch_size=2)
    assert result.samples == 1  # the sample without a confounder is skipped
    assert 0.0 < result.mass < 1.0 and 0.0 < result.uniform < 1.0
    # right padding changes nothing: a batch of two lengths = the mean of the two measured alone
    longer = {"instruction": "Dan is 7 years old. " + instruction, "output": samples[0]["output"],
              "confounder_spans": [[0, len("Dan is 7 years old.")], [s + 20 for s in samples[0]["confounder_spans"][0]]]}
    batched = measure_attention(model, tiny_tokenizer, [samples[0], longer], batch_size=2)
    singles = [measure_attention(model, tiny_tokenizer, [s], batch_size=1).mass for s in (samples[0], longer)]
    assert batched.samples == 2
    assert batched.mass == pytest.approx(sum(singles) / 2, abs=1e-5)
