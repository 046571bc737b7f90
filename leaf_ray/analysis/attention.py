"""Attention on confounders: how much attention mass response positions put on known confounder tokens.

The paper's attention analysis claims that after LeaF less attention falls on confounder tokens. We measure
it teacher-forced, so every model is read on the very same positions:

- each sample is rendered with the chat template as (instruction, reference response)
  (``leaf_ray.data.chat.render``); the model runs one forward pass with ``output_attentions=True`` under the
  eager attention implementation (the fused kernels return no weights);
- **query positions** Q = the response tokens (``target_mask == 1``: the response and its end-of-turn token);
- **confounder columns** K = the instruction tokens whose characters overlap a confounder span (ground-truth
  distractor sentences here; ``leaf_ray.analysis.detection_quality.ground_truth_mask``);
- per sample::

      mass = 1/|Q| · Σ_{t∈Q} 1/(L·H) · Σ_{l=1..L} Σ_{h=1..H} Σ_{j∈K} A[l, h, t, j]

  (``A[l, h, t, :]`` is layer l, head h's softmax row of query t, which sums to 1 over the visible keys), i.e.
  the mean over layers and heads of the attention row, summed over the confounder columns, then averaged over
  the response positions; the benchmark reports the mean (± std) of that over samples.
- for scale, ``uniform`` is the same quantity for attention spread evenly over the visible keys:
  ``1/|Q| Σ_{t∈Q} |K ∩ [0, t]| / |[0, t]|`` (padding excluded).

Samples with no confounder token or no response token are skipped (their mass is undefined).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def confounder_attention_mass(attentions: "Sequence[torch.Tensor] | torch.Tensor", query_mask: "torch.Tensor",
                              key_mask: "torch.Tensor") -> "torch.Tensor":
    """Per-sample attention mass on confounder keys (module docstring formula).

    attentions: one ``[B, H, T, T]`` tensor per layer (as a model returns them) or a stacked ``[L, B, H, T, T]``.
    query_mask, key_mask: ``[B, T]`` bool (response positions; confounder token positions).
    Returns float32 ``[B]``; NaN for a sample without query positions.
    """
    import torch

    stacked = attentions if isinstance(attentions, torch.Tensor) else torch.stack(tuple(attentions))
    if stacked.dim() != 5:
        raise ValueError(f"attentions must be [L, B, H, T, T] (or a sequence of [B, H, T, T]), "
                         f"got shape {tuple(stacked.shape)}")
    _, batch, _, length, _ = stacked.shape
    for name, mask in (("query_mask", query_mask), ("key_mask", key_mask)):
        if tuple(mask.shape) != (batch, length):
            raise ValueError(f"{name} must be [B, T] = [{batch}, {length}], got {tuple(mask.shape)}")
    per_row = stacked.float().mean(dim=(0, 2))  # [B, T, T]: mean over layers and heads
    on_keys = (per_row * key_mask[:, None, :].float()).sum(-1)  # [B, T]: summed over confounder columns
    q = query_mask.float()
    return (on_keys * q).sum(-1) / q.sum(-1)  # mean over query positions (0/0 = NaN: no query)


def uniform_attention_mass(query_mask: "torch.Tensor", key_mask: "torch.Tensor",
                           attention_mask: "torch.Tensor") -> "torch.Tensor":
    """The mass uniform causal attention would put on the keys: mean over t∈Q of |K ∩ [0,t]| / |[0,t]|."""
    valid = attention_mask.float()
    seen = valid.cumsum(-1)  # visible (non-padding) keys up to t
    seen_keys = (key_mask.float() * valid).cumsum(-1)
    q = query_mask.float()
    return (seen_keys / seen.clamp(min=1) * q).sum(-1) / q.sum(-1)


@dataclass
class AttentionResult:
    """Mean (± std over samples) attention mass on confounder tokens, and the uniform-attention reference."""

    mass: float
    mass_std: float
    uniform: float
    samples: int

    def to_dict(self) -> dict:
        return {"mass": self.mass, "mass_std": self.mass_std, "uniform": self.uniform, "samples": self.samples}


def encode_for_attention(tokenizer, samples: Sequence[dict]) -> list[dict]:
    """Render (instruction, output) and mark confounder tokens: each sample needs ``instruction``, ``output``
    and ``confounder_spans`` (character spans relative to the instruction)."""
    from leaf_ray.analysis.detection_quality import ground_truth_mask
    from leaf_ray.data.chat import render

    encoded = []
    for s in samples:
        rendered = render(tokenizer, s["instruction"], s["output"])
        start = rendered.scored_span[0] - rendered.scored_origin  # text index of the instruction's character 0
        spans = [(a + start, b + start) for a, b in s["confounder_spans"]]
        encoded.append({"input_ids": rendered.input_ids, "query": [bool(m) for m in rendered.target_mask],
                        "keys": ground_truth_mask(rendered.offsets, spans)})
    return encoded


def measure_attention(model, tokenizer, samples: Sequence[dict], *, batch_size: int = 16) -> AttentionResult:
    """The attention mass on confounders of `model` over `samples` (see :func:`encode_for_attention`).

    The model is switched to eager attention (weights are returned) and run in eval mode without gradients.
    """
    import torch

    model.set_attn_implementation("eager")
    model.eval()
    masses: list[float] = []
    uniforms: list[float] = []
    encoded = [e for e in encode_for_attention(tokenizer, samples) if any(e["keys"]) and any(e["query"])]
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i:i + batch_size]
        width = max(len(e["input_ids"]) for e in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        query = torch.zeros((len(chunk), width), dtype=torch.bool)
        keys = torch.zeros((len(chunk), width), dtype=torch.bool)
        for b, e in enumerate(chunk):  # right padding: pad keys get zero weight, pad queries are not in Q
            n = len(e["input_ids"])
            input_ids[b, :n] = torch.tensor(e["input_ids"])
            attention_mask[b, :n] = 1
            query[b, :n] = torch.tensor(e["query"])
            keys[b, :n] = torch.tensor(e["keys"])
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True, use_cache=False)
        masses += confounder_attention_mass(out.attentions, query, keys).tolist()
        uniforms += uniform_attention_mass(query, keys, attention_mask).tolist()
    masses = [m for m in masses if not math.isnan(m)]
    if not masses:
        return AttentionResult(float("nan"), float("nan"), float("nan"), 0)
    return AttentionResult(mass=statistics.fmean(masses), mass_std=statistics.stdev(masses) if len(masses) > 1 else 0.0,
                           uniform=statistics.fmean(uniforms), samples=len(masses))


def measure_attention_of(model_dir: str, samples: Sequence[dict], *, batch_size: int = 16) -> AttentionResult:
    """:func:`measure_attention` for a ``save_pretrained`` directory (loaded via ``leaf_ray.models``)."""
    from leaf_ray.config import ModelRef
    from leaf_ray.models import load_model, load_tokenizer

    ref = ModelRef(path=str(model_dir))
    return measure_attention(load_model(ref), load_tokenizer(ref), samples, batch_size=batch_size)
