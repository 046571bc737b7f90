"""Confounder tokens from teacher/student saliency (docs/design.md §1.1).

Over the n tokens of the scored span (instruction content, or the response prefix)::

    ĝ^M_i = (g^M_i - min_j g^M_j) / (max_j g^M_j - min_j g^M_j)      M in {teacher T, student S}
    Δ_i   = minmax(ĝ^T_i - ĝ^S_i)                                    in [0, 1]
    confounder_i  <=>  Δ_i <= τ  and token i is not whitespace-only

A low Δ means the student is sensitive to token i while the teacher is not. τ comes from a registered
threshold rule (``quantile``: τ = min(sorted(Δ)[⌊n·q⌋], cap), the reference release; ``absolute``: τ = tau).
A span is a maximal run of consecutive confounder tokens; a whitespace-only token ends a run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from leaf_ray.registry import THRESHOLD_RULES

# A threshold rule is ``fn(delta, threshold_cfg) -> τ``, registered as ``detection.threshold.rule: <name>``
# (docs/extending.md).
ThresholdRule = Callable[[torch.Tensor, object], float]


@THRESHOLD_RULES.register("quantile")
def quantile_threshold(delta: torch.Tensor, cfg) -> float:
    """τ = min(quantile_q(Δ), cap), q = ``cfg.quantile``, cap = ``cfg.cap``, over the n values of Δ.

    ``cfg.interpolation == "order_statistic"`` (default, the reference release's
    ``remove_confounding_tokens_math.py``): with Δ sorted ascending, τ_q = Δ_(⌊n·q⌋), 0-based, the index
    computed as Python's ``int(n * q)`` and clipped to n-1 (q = 1 gives the maximum).
    ``"linear"`` (numpy's default ``np.quantile``): h = (n-1)·q, τ_q = Δ_(⌊h⌋) + (h-⌊h⌋)·(Δ_(⌊h⌋+1) - Δ_(⌊h⌋)).
    The two differ whenever ⌊n·q⌋ ≠ (n-1)·q, e.g. n = 12, q = 0.1: Δ_(1) against 0.9·Δ_(1) + 0.1·Δ_(2).
    """
    q, values = float(cfg.quantile), delta.double().flatten()
    interpolation = getattr(cfg, "interpolation", "order_statistic")
    if interpolation == "order_statistic":
        ordered = torch.sort(values).values
        tau_q = ordered[min(int(values.numel() * q), values.numel() - 1)].item()
    elif interpolation == "linear":
        tau_q = torch.quantile(values, q, interpolation="linear").item()
    else:
        raise ValueError(f"detection.threshold.interpolation: unknown {interpolation!r} "
                         "(order_statistic | linear)")
    return min(tau_q, float(cfg.cap))


@THRESHOLD_RULES.register("absolute")
def absolute_threshold(delta: torch.Tensor, cfg) -> float:
    """τ = ``cfg.tau``, the same for every sample."""
    return float(cfg.tau)


def minmax(x) -> torch.Tensor:
    """(x - min x) / (max x - min x) over the whole 1-D vector, computed in float64.

    A constant vector (max = min, including a single token) has no spread to normalise: it maps to zeros.
    The result keeps x's floating dtype (float32 for integer or list input).
    """
    x = torch.as_tensor(x)
    out_dtype = x.dtype if x.is_floating_point() else torch.float32
    if x.dim() != 1:
        raise ValueError(f"minmax expects a 1-D vector, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        return x.to(out_dtype)
    if not torch.isfinite(x).all():
        raise ValueError("minmax: vector has non-finite values (NaN/inf gradient norms?)")
    x64 = x.double()
    lo, hi = x64.min(), x64.max()
    if hi == lo:
        return torch.zeros_like(x64).to(out_dtype)
    return ((x64 - lo) / (hi - lo)).to(out_dtype)


def runs(mask: Sequence[bool]) -> list[tuple[int, int]]:
    """Maximal runs of True as [(first, last_exclusive), ...] in increasing order."""
    spans, start = [], None
    for i, flag in enumerate(list(mask) + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            spans.append((start, i))
            start = None
    return spans


def is_whitespace_only(text: str) -> bool:
    """True for tokens with no visible character (spaces, newlines, tabs, Unicode spaces, or empty)."""
    return not text.strip()


@dataclass
class SpanScores:
    """Scores over the n scored tokens (index 0 = the span's first token).

    delta: float64 [n], Δ in [0, 1]. threshold: τ. confounder_mask: bool [n]. spans: confounder runs
    [(first, last_exclusive)]. student_normalized / teacher_normalized: ĝ^S, ĝ^T (float64 [n]).
    degenerate: True when ĝ^T - ĝ^S is constant (no token differs from another; no confounders).
    """

    delta: torch.Tensor
    threshold: float
    confounder_mask: torch.Tensor
    spans: list[tuple[int, int]]
    student_normalized: torch.Tensor
    teacher_normalized: torch.Tensor
    degenerate: bool


def score_span(student_grad_norm, teacher_grad_norm, token_texts: Sequence[str], threshold_cfg) -> SpanScores:
    """Δ, τ, confounder mask and spans for one sample's scored span (formulas in the module docstring).

    Inputs are raw gradient norms of the scored tokens only, both on the same tokens (project the teacher's
    first with :func:`leaf_ray.detect.cross_tokenizer.project_scores` if tokenizers differ).
    If ĝ^T - ĝ^S is constant (e.g. a one-token span) Δ is all zeros and would flag every token; there is no
    relative sensitivity to compare, so such a span is marked ``degenerate`` and gets no confounders.
    """
    student = torch.as_tensor(student_grad_norm, dtype=torch.float64).flatten()
    teacher = torch.as_tensor(teacher_grad_norm, dtype=torch.float64).flatten()
    n = len(token_texts)
    if student.numel() != n or teacher.numel() != n:
        raise ValueError(f"score_span: {student.numel()} student / {teacher.numel()} teacher scores for "
                         f"{n} token texts; all three must cover the same scored tokens")
    if n == 0:
        raise ValueError("score_span: the scored span has no tokens")
    rule = THRESHOLD_RULES.get(threshold_cfg.rule)
    student_normalized, teacher_normalized = minmax(student), minmax(teacher)
    raw_delta = teacher_normalized - student_normalized
    delta = minmax(raw_delta)
    threshold = float(rule(delta, threshold_cfg))
    degenerate = bool(raw_delta.max() == raw_delta.min())
    visible = torch.tensor([not is_whitespace_only(t) for t in token_texts], dtype=torch.bool)
    confounder_mask = (delta <= threshold) & visible & (not degenerate)
    return SpanScores(delta=delta, threshold=threshold, confounder_mask=confounder_mask,
                      spans=runs(confounder_mask.tolist()), student_normalized=student_normalized,
                      teacher_normalized=teacher_normalized, degenerate=degenerate)
