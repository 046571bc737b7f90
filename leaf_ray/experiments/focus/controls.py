"""The pure pieces of focus benchmark v2 (issue 12): control counterfactuals, the paired bootstrap, FLOP
accounting, and the plan of variants. No Ray, no MLflow, no training: ``leaf_ray/experiments/focus/run.py`` calls these.

**Oracle counterfactuals** (:func:`oracle_counterfactuals`): one counterfactual per ground-truth distractor
sentence, the instruction with exactly that sentence and the one space separating it from its neighbour removed
(the space before it, as a byte-level BPE token carries it: " Bob owns 9 cups."; the space after it when the
sentence opens the instruction). Removing all of a problem's distractors this way gives its clean instruction.

**Random-span counterfactuals** (:func:`random_span_counterfactuals`): for every instruction-level span the
detector pruned, a span of the *same number of tokens* at a uniformly random position in the same
instruction's tokens, removed through the same ``leaf_ray.detect.pruning.make_counterfactuals`` — so per sample
the control prunes as many spans, of the same token lengths, as detection did, only not where detection put
them. Seeded per (seed, sample id, span index): the same draw on every run.

Both write rows of ``leaf_ray.detect.schema.COUNTERFACTUALS_SCHEMA`` (scope ``instruction``), the file
detection writes, so the unchanged Stage 2 trainer consumes them.

**Paired bootstrap** (:func:`paired_bootstrap_ci`): ``diff[s][i] = correct_variant[s][i] - correct_kd[s][i]``
for seed s and test problem i (the same seeds and problems on both sides). One bootstrap replicate resamples
the seeds with replacement *and* the problems with replacement (one problem draw shared by all seeds, which
keeps the pairing), and takes the mean of the resampled diffs; the CI is the percentile interval of the
replicates. With one seed only the problems are resampled.

**FLOPs** (``leaf_ray.bench.flops``: matmuls only, from the shapes): one distillation epoch costs, per
training row of T tokens with n target tokens, a student training pass (forward + full backward) and a frozen
teacher forward, both with n LM-head rows — the teacher's forward on the counterfactual rows included. A run of
``steps`` optimizer steps is ``steps / steps_per_epoch`` of that. Stage 1 detection, where it is counted, is a
saliency pass (forward + input-only backward) of both models per scored unit. Compute-matched KD is KD run for
``round(F_variant / F_kd_per_step)`` steps. On-policy rows add the student's sampling
(:func:`generation_flops`: one forward over prompt + response with a KV cache, the dataset's response length
standing in for the sampled one), times ``distill.on_policy_fraction`` for ``mixed``.

**On-policy variants** (``kd_on``, ``leaf_instr_on``, ``kd_mixed``, ``leaf_instr_mixed``): ``distill.policy``
on / mixed with the same trainer. Their KD controls (:func:`control_policy`): LeaF on-policy against KD
on-policy for the same steps or FLOPs (does LeaF add anything on top?); KD on-policy against off-policy KD
(does sampling transfer more of the teacher?).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# --------------------------------------------------------------------------- control counterfactuals


def _cf_row(sample_id: str, span_index: int, start: int, end: int, instruction: str, output: str,
            split: str | None) -> dict:
    return {"sample_id": sample_id, "scope": "instruction", "span_index": span_index, "char_start": start,
            "char_end": end, "removed_text": instruction[start:end], "instruction": instruction[:start] + instruction[end:],
            "response_prefix": "", "output": output, "split": split}


def oracle_range(instruction: str, span: Sequence[int]) -> tuple[int, int]:
    """The characters an oracle removes for distractor ``span = [start, end)``: the sentence plus one
    separating space (before it; after it when it opens the text)."""
    start, end = int(span[0]), int(span[1])
    if not 0 <= start < end <= len(instruction):
        raise ValueError(f"distractor span {tuple(span)} is not inside an instruction of {len(instruction)} chars")
    if start > 0 and instruction[start - 1] == " ":
        return start - 1, end
    if end < len(instruction) and instruction[end] == " ":
        return start, end + 1
    return start, end


def oracle_counterfactuals(rows: Iterable[dict]) -> list[dict]:
    """Rows with ``sample_id``, ``instruction``, ``output``, ``split`` and ``distractor_spans`` -> one
    counterfactual row per distractor span (a row without distractors has none)."""
    out = []
    for r in rows:
        for k, span in enumerate(r.get("distractor_spans") or []):
            a, b = oracle_range(r["instruction"], span)
            out.append(_cf_row(r["sample_id"], k, a, b, r["instruction"], r["output"], r.get("split")))
    return out


def span_rng(seed: int, sample_id: str, span_index: int) -> random.Random:
    key = hashlib.sha256(f"{seed}\x00{sample_id}\x00{span_index}".encode()).digest()
    return random.Random(int.from_bytes(key[:8], "big"))


def random_span_counterfactuals(scores_rows: Iterable[dict], originals: dict[str, dict], seed: int) -> list[dict]:
    """For each instruction-scope ``detect/scores`` row (``sample_id``, ``token_char_offsets``, ``spans`` =
    [first, last_exclusive] token ranges), one counterfactual per detected span: a random window of the same
    token length over the instruction's tokens. ``originals[sample_id]`` gives ``instruction``, ``output``,
    ``split``."""
    from leaf_ray.detect.pruning import make_counterfactuals

    out = []
    for row in scores_rows:
        if row["scope"] != "instruction" or not row["spans"]:
            continue
        original = originals[row["sample_id"]]
        offsets = [tuple(o) for o in row["token_char_offsets"]]
        n = len(offsets)
        windows = []
        for k, (first, last) in enumerate(row["spans"]):
            length = int(last) - int(first)
            start = span_rng(seed, row["sample_id"], k).randint(0, n - length)
            windows.append((start, start + length))
        for k, cf in enumerate(make_counterfactuals(original["instruction"], offsets, windows)):
            out.append(_cf_row(row["sample_id"], k, cf.char_start, cf.char_end, original["instruction"],
                               original["output"], original.get("split")))
    return out


def pruned_tokens(scores_rows: Iterable[dict]) -> dict[str, list[int]]:
    """sample id -> token length of each instruction-scope span (what the random control reproduces)."""
    return {r["sample_id"]: [int(b) - int(a) for a, b in r["spans"]] for r in scores_rows
            if r["scope"] == "instruction"}


# --------------------------------------------------------------------------- statistics


@dataclass
class PairedDiff:
    mean: float  # mean paired difference (variant - control), a fraction in [-1, 1]
    low: float
    high: float
    seeds: int
    problems: int

    def to_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "seeds": self.seeds,
                "problems": self.problems}


def paired_bootstrap_ci(variant: Sequence[Sequence[float]], control: Sequence[Sequence[float]], *,
                        resamples: int = 2000, level: float = 0.95, seed: int = 0) -> PairedDiff:
    """95% (``level``) percentile bootstrap CI of mean(variant - control), both ``[seed][problem]`` 0/1
    correctness in the same seed and problem order (module docstring)."""
    import numpy as np

    v, c = np.asarray(variant, dtype=float), np.asarray(control, dtype=float)
    if v.ndim != 2 or v.shape != c.shape or v.size == 0:
        raise ValueError(f"variant and control must be non-empty [seeds, problems] arrays of one shape, got "
                         f"{v.shape} and {c.shape}")
    diff = v - c
    s, p = diff.shape
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for b in range(resamples):  # a [s, p] gather per replicate: small (seeds x test problems)
        seeds = rng.integers(0, s, size=s) if s > 1 else np.zeros(1, dtype=int)
        probs = rng.integers(0, p, size=p)
        means[b] = diff[np.ix_(seeds, probs)].mean()
    alpha = (1.0 - level) / 2
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return PairedDiff(float(diff.mean()), float(low), float(high), s, p)


# --------------------------------------------------------------------------- FLOP accounting


def distill_epoch_flops(seq_lens: Sequence[int], target_tokens: Sequence[int], student, teacher) -> float:
    """One epoch over these training rows: student forward + full backward and the frozen teacher's forward
    (``leaf_ray.bench.flops.Shape`` each), LM-head rows = target tokens."""
    from leaf_ray.bench.flops import forward_flops, training_flops

    heads = int(sum(target_tokens))
    return training_flops(student, seq_lens, heads) + forward_flops(teacher, seq_lens, heads)


def generation_flops(seq_lens: Sequence[int], target_tokens: Sequence[int], student) -> float:
    """The student sampling a response to every row's prompt: with a KV cache each token's matmuls run once,
    so one forward over prompt + response, LM-head rows = response tokens."""
    from leaf_ray.bench.flops import forward_flops

    return forward_flops(student, seq_lens, int(sum(target_tokens)))


def detection_flops(seq_lens: Sequence[int], target_tokens: Sequence[int], student, teacher) -> float:
    """Stage 1 over these scored units: a saliency pass of both models."""
    from leaf_ray.bench.flops import saliency_flops

    heads = int(sum(target_tokens))
    return saliency_flops(student, seq_lens, heads) + saliency_flops(teacher, seq_lens, heads)


def run_flops(epoch_flops: float, steps: int, steps_per_epoch: int) -> float:
    """A run of `steps` optimizer steps: that fraction of epochs (the last epoch may be partial)."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    return epoch_flops * steps / steps_per_epoch


def kd_steps_for_flops(target_flops: float, kd_epoch_flops: float, kd_steps_per_epoch: int) -> int:
    """KD optimizer steps whose FLOPs come closest to `target_flops` (at least 1)."""
    per_step = kd_epoch_flops / kd_steps_per_epoch
    return max(1, round(target_flops / per_step))


def epochs_for_steps(steps: int, steps_per_epoch: int) -> int:
    """Epochs to configure so a run with ``max_steps = steps`` is not cut short by the epoch count."""
    return max(1, math.ceil(steps / steps_per_epoch))


# --------------------------------------------------------------------------- the plan of variants


@dataclass(frozen=True)
class Variant:
    """One row of the method table. ``trainer`` is the Stage 2 variant (kd / leaf_instr / leaf_instr_resp);
    ``source`` names the counterfactuals it trains on (None for KD); KD controls carry ``steps``."""

    key: str  # MLflow tag leaf_ray.variant, run directory, stage name
    title: str
    trainer: str
    source: str | None = None  # "detect" | "detect-q<q>" | "detect-full" | "oracle" | "random"
    lambda_: float | None = None  # None: distill.lambda
    steps: int | None = None  # KD controls: distill.max_steps
    control: bool = False  # oracle / random: bounds, not contenders for "best"
    policy: str = "off"  # distill.policy: off (fixed responses) | on (the student's samples) | mixed


POLICY_TITLES = {"off": "KD w/o mask", "on": "On-policy KD", "mixed": "Mixed KD"}


def control_policy(variant: Variant) -> str:
    """The policy of a variant's KD controls: an on-policy (or mixed) LeaF variant is matched against KD of the
    same policy (does LeaF add anything on top?); on-policy (or mixed) KD itself against off-policy KD (does
    sampling transfer more?)."""
    return "off" if variant.trainer == "kd" else variant.policy


def fmt_q(q: float) -> str:
    return f"{q:.2f}"


def kd_steps_key(steps: int, policy: str = "off") -> str:
    return f"kd_{steps}steps" if policy == "off" else f"kd_{policy}_{steps}steps"


def parse_kd_steps_key(key: str) -> tuple[str, int] | None:
    """``kd_126steps`` -> ("off", 126), ``kd_on_126steps`` -> ("on", 126); None for any other key."""
    match = re.fullmatch(r"kd_(?:(on|mixed)_)?(\d+)steps", key)
    return (match.group(1) or "off", int(match.group(2))) if match else None


def kd_control(steps: int, policy: str = "off") -> Variant:
    """KD (of `policy`) run for `steps` optimizer steps: a steps- or compute-matched control."""
    return Variant(kd_steps_key(steps, policy), f"{POLICY_TITLES[policy]}, {steps} steps", "kd", steps=steps,
                   policy=policy)


def base_variants(variants: Sequence[str], tau_sweep: Sequence[float], base_quantile: float) -> list[Variant]:
    """The LeaF variants of ``bench.focus.variants`` (and KD at the default epochs), then the τ sweep of
    LeaF (Instr) (a quantile equal to ``detection.threshold.quantile`` is LeaF (Instr) itself)."""
    table = {
        "kd": Variant("kd", "KD w/o mask", "kd"),
        "leaf_instr": Variant("leaf_instr", "LeaF (Instr)", "leaf_instr", "detect"),
        "leaf_instr_resp": Variant("leaf_instr_resp", "LeaF (Instr & Resp)", "leaf_instr_resp", "detect"),
        "leaf_full": Variant("leaf_full", "LeaF full recipe (Instr & Resp, selection + verification)",
                             "leaf_instr_resp", "detect-full"),
        "oracle": Variant("oracle", "Oracle LeaF (ground-truth spans)", "leaf_instr", "oracle", control=True),
        "random_span": Variant("random_span", "Random-span LeaF (same tokens per sample)", "leaf_instr", "random",
                               control=True),
        # On-policy distillation (docs/on-policy.md): the student samples its own responses to the same prompts
        # (originals, and for LeaF their counterfactuals) and the teacher scores those tokens.
        "kd_on": Variant("kd_on", "On-policy KD", "kd", policy="on"),
        "leaf_instr_on": Variant("leaf_instr_on", "On-policy LeaF (Instr)", "leaf_instr", "detect", policy="on"),
        "kd_mixed": Variant("kd_mixed", "Mixed KD (on- and off-policy micro-batches)", "kd", policy="mixed"),
        "leaf_instr_mixed": Variant("leaf_instr_mixed", "Mixed LeaF (Instr)", "leaf_instr", "detect",
                                    policy="mixed"),
    }
    out = [table[v] for v in variants]
    for q in tau_sweep:
        if math.isclose(q, base_quantile):
            continue
        out.append(Variant(f"leaf_instr_q{fmt_q(q)}", f"LeaF (Instr), τ quantile {fmt_q(q)}", "leaf_instr",
                           f"detect-q{fmt_q(q)}"))
    return out


def lambda_variants(best: Variant, lambdas: Sequence[float], base_lambda: float) -> list[Variant]:
    """λ sweep of the best variant (λ = ``distill.lambda`` is the variant itself)."""
    return [Variant(f"{best.key}_lam{lam:.1f}", f"{best.title}, λ = {lam:.1f}", best.trainer, best.source,
                    lambda_=lam, policy=best.policy) for lam in lambdas if not math.isclose(lam, base_lambda)]


def best_variant(candidates: Sequence[Variant], mean_diff: dict[str, float]) -> Variant | None:
    """The non-control LeaF variant with the largest mean paired difference over its steps-matched KD."""
    scored = [v for v in candidates if v.source and not v.control and v.key in mean_diff]  # LeaF only
    return max(scored, key=lambda v: mean_diff[v.key]) if scored else None
