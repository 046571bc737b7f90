"""Detection quality against ground-truth confounders: token precision, recall, F1, and the random baseline.

**Ground truth.** A scored token is a true confounder when its characters overlap a known distractor span:
token ``[a, b)`` (offsets relative to the instruction, ``scores.token_char_offsets``) is positive iff
``b > a`` and ``a < end`` and ``b > start`` for some distractor span ``[start, end)``. With a byte-level BPE a
token carries its leading space (" Bob"), so a sentence's first token overlaps it and counts; the space
token that merely separates two sentences does not.

**Detected.** ``scores.confounder_mask`` (Δ ≤ τ, whitespace never a confounder).

**Scores** (micro-averaged: every scored token of every sample is one trial)::

    precision = TP / (TP + FP)      recall = TP / (TP + FN)      F1 = 2·P·R / (P + R)

**Random selection at the same rate.** Choose each of the N scored tokens independently with probability
``s = (TP + FP) / N`` (the detector's selection rate), ignoring content. With P ground-truth positives
(base rate ``π = P / N``) its expected true positives are ``s·P`` out of ``s·N`` selected, so

    precision_random = π          recall_random = s          F1_random = 2·π·s / (π + s)

(precision as the ratio of expectations; the same values hold for a uniformly random subset of exactly s·N
tokens). A detector is informative to the extent it beats these.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass


def ground_truth_mask(token_char_offsets: Sequence[Sequence[int]], spans: Iterable[Sequence[int]]) -> list[bool]:
    """True for each token whose characters ``[a, b)`` overlap one of ``spans`` (both relative to one text)."""
    spans = [(int(s), int(e)) for s, e in spans]
    return [b > a and any(a < e and b > s for s, e in spans) for a, b in token_char_offsets]


@dataclass
class PRF:
    """Token-level confusion counts and the scores derived from them (None where a denominator is 0)."""

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def tokens(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    @property
    def precision(self) -> float | None:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else None

    @property
    def recall(self) -> float | None:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else None

    @property
    def f1(self) -> float | None:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p is not None and r is not None and p + r > 0 else None

    @property
    def base_rate(self) -> float | None:
        """π = P / N: the share of tokens that are ground-truth confounders."""
        return (self.tp + self.fn) / self.tokens if self.tokens else None

    @property
    def selection_rate(self) -> float | None:
        """s = (TP + FP) / N: the share of tokens the detector selected."""
        return (self.tp + self.fp) / self.tokens if self.tokens else None

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens": self.tokens, "precision": self.precision, "recall": self.recall,
                "f1": self.f1, "base_rate": self.base_rate, "selection_rate": self.selection_rate}


def confusion(predicted: Sequence[bool], truth: Sequence[bool]) -> PRF:
    if len(predicted) != len(truth):
        raise ValueError(f"predicted mask has {len(predicted)} tokens, ground truth {len(truth)}")
    tp = sum(1 for p, t in zip(predicted, truth) if p and t)
    fp = sum(1 for p, t in zip(predicted, truth) if p and not t)
    fn = sum(1 for p, t in zip(predicted, truth) if t and not p)
    return PRF(tp, fp, fn, len(truth) - tp - fp - fn)


def add(a: PRF, b: PRF) -> PRF:
    return PRF(a.tp + b.tp, a.fp + b.fp, a.fn + b.fn, a.tn + b.tn)


@dataclass
class RandomBaseline:
    """Expected scores of selecting each token with probability `selection_rate` (module docstring)."""

    precision: float | None
    recall: float | None
    f1: float | None


def random_baseline(base_rate: float | None, selection_rate: float | None) -> RandomBaseline:
    """precision = π, recall = s, F1 = 2πs / (π + s)."""
    if base_rate is None or selection_rate is None:
        return RandomBaseline(None, None, None)
    f1 = 2 * base_rate * selection_rate / (base_rate + selection_rate) if base_rate + selection_rate else None
    return RandomBaseline(base_rate if selection_rate > 0 else None, selection_rate if base_rate > 0 else None, f1)


@dataclass
class DetectionQuality:
    """P/R/F1 of the detector over a set of samples, next to the random baseline at its selection rate."""

    name: str
    samples: int
    counts: PRF
    random: RandomBaseline
    distractors: int  # ground-truth distractor sentences
    distractors_hit: int  # ... with at least one detected token

    def to_dict(self) -> dict:
        return {"name": self.name, "samples": self.samples, **self.counts.to_dict(),
                "random_precision": self.random.precision, "random_recall": self.random.recall,
                "random_f1": self.random.f1, "distractors": self.distractors,
                "distractors_hit": self.distractors_hit}


def detection_quality(scores_rows: Iterable[dict], distractor_spans: dict[str, list[list[int]]],
                      name: str = "all", scope: str = "instruction") -> DetectionQuality:
    """Score the `scope` rows of `detect/scores` (dicts with sample_id, token_char_offsets, confounder_mask)
    against `distractor_spans[sample_id]` (instruction character spans). A row whose sample has no entry is
    an error naming it (the ground truth must cover every scored sample)."""
    total, samples, n_spans, hit = PRF(0, 0, 0, 0), 0, 0, 0
    for row in scores_rows:
        if row["scope"] != scope:
            continue
        sid = row["sample_id"]
        if sid not in distractor_spans:
            raise KeyError(f"scores row {sid!r} ({scope}): no ground-truth distractor spans for this sample")
        offsets, predicted = row["token_char_offsets"], [bool(x) for x in row["confounder_mask"]]
        spans = distractor_spans[sid]
        total = add(total, confusion(predicted, ground_truth_mask(offsets, spans)))
        samples += 1
        for span in spans:
            n_spans += 1
            hit += any(p and t for p, t in zip(predicted, ground_truth_mask(offsets, [span])))
    return DetectionQuality(name, samples, total, random_baseline(total.base_rate, total.selection_rate),
                            n_spans, hit)
