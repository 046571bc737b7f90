"""What ``leaf-ray bench focus`` measured, and how it is shown: the result of a run (:class:`FocusBenchResult`,
collected by :class:`VariantRuns`), its tables (console, ``report.md``, ``report.html`` through
:mod:`leaf_ray.experiments.focus.report`) and its MLflow summary metrics. The recipe is :mod:`leaf_ray.experiments.focus.run`."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from leaf_ray.config import LeafConfig
from leaf_ray.experiments.focus.controls import PairedDiff, Variant, paired_bootstrap_ci, parse_kd_steps_key

if TYPE_CHECKING:
    from rich.console import Console

VARIANT_TITLES = {"teacher": "Teacher", "pre_kd": "Pre-KD", "kd": "KD w/o mask", "leaf_instr": "LeaF (Instr)",
                  "leaf_instr_resp": "LeaF (Instr & Resp)"}
TEST, TEST_CLEAN = "focus_test", "focus_test_clean"



@dataclass
class FocusBenchResult:
    detection: list[dict]
    accuracy: dict[str, dict[str, list[float]]]  # variant -> benchmark -> per-seed accuracies
    attention: dict[str, list[dict]]  # variant -> per-seed AttentionResult dicts
    steps: dict[str, list[int]]  # variant -> per-seed optimizer steps
    seconds: dict[str, float] = field(default_factory=dict)
    report_path: Path | None = None
    titles: dict[str, str] = field(default_factory=dict)  # variant key -> table title, in table order
    diffs: dict[str, dict[str, PairedDiff]] = field(default_factory=dict)  # variant -> "steps"/"flops" -> CI
    controls: dict[str, dict[str, str]] = field(default_factory=dict)  # variant -> "steps"/"flops" -> KD key
    flops: dict[str, dict] = field(default_factory=dict)  # variant -> FLOP accounting (variant_flops)
    best: str | None = None  # the variant the λ sweep ran on
    quick: bool = False


class VariantRuns:
    """What the runs of every variant and seed returned, collected for the tables (a KD control that serves
    several LeaF variants is trained once and recorded once per seed)."""

    def __init__(self, focus, attention_samples: list[dict]):
        self.focus = focus
        self.titles: dict[str, str] = {}
        self.accuracy: dict[str, dict[str, list[float]]] = {}
        self.correct: dict[str, dict[int, list[int]]] = {}  # variant -> seed -> 0/1 per test problem
        self.attention: dict[str, list[dict]] = {}
        self.steps: dict[str, list[int]] = {}
        self.matches: dict[str, dict[str, dict[int, str]]] = {}  # variant -> kind -> seed -> control key
        self.flops: dict[str, dict] = {}
        self.best: str | None = None
        self._seen: set[tuple[str, int | None]] = set()

    def add(self, variant: Variant, info: dict, seed: int | None = None) -> dict:
        info = {**info, "key": variant.key, "seed": seed}
        if (variant.key, seed) in self._seen:
            return info
        self._seen.add((variant.key, seed))
        self.titles.setdefault(variant.key, variant.title)
        for bench, acc in info["accuracy"].items():
            self.accuracy.setdefault(variant.key, {}).setdefault(bench, []).append(acc)
        if info.get("correct", {}).get(TEST) is not None:
            self.correct.setdefault(variant.key, {})[seed] = [int(c) for c in info["correct"][TEST]]
        self.attention.setdefault(variant.key, []).append(info["attention"])
        if info.get("steps") is not None:
            self.steps.setdefault(variant.key, []).append(info["steps"])
        return info

    def match(self, variant: Variant, kind: str, control: dict) -> None:
        self.matches.setdefault(variant.key, {}).setdefault(kind, {})[control["seed"]] = control["key"]

    def paired_diffs(self) -> dict[str, dict[str, PairedDiff]]:
        out: dict[str, dict[str, PairedDiff]] = {}
        for key, kinds in self.matches.items():
            for kind, per_seed in kinds.items():
                seeds = [k for k in sorted(per_seed) if k in self.correct.get(key, {})
                         and k in self.correct.get(per_seed[k], {})]
                if not seeds:
                    continue
                out.setdefault(key, {})[kind] = paired_bootstrap_ci(
                    [self.correct[key][k] for k in seeds], [self.correct[per_seed[k]][k] for k in seeds],
                    resamples=self.focus.bootstrap_resamples, seed=0)
        return out

    def result(self, detection: list[dict], seconds: dict[str, float]) -> FocusBenchResult:
        controls = {key: {kind: next(iter(per_seed.values())) for kind, per_seed in kinds.items()}
                    for key, kinds in self.matches.items()}
        return FocusBenchResult(detection, self.accuracy, self.attention, self.steps, seconds, titles=self.titles,
                                diffs=self.paired_diffs(), controls=controls, flops=self.flops, best=self.best,
                                quick=self.focus.quick)


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    mean, std = mean_std(values)
    if mean is None:
        return "—"
    return f"{scale * mean:.{digits}f}" + (f" ± {scale * std:.{digits}f}" if std is not None else "")


def pct(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}"


DETECTION_HEAD = ["samples", "tokens", "selected", "P", "R", "F1", "random P", "random R", "random F1",
                  "distractors hit"]


def detection_cells(row: dict) -> list[str]:
    return [str(row["samples"]), str(row["tokens"]), f"{pct(row['selection_rate'])}%",
            pct(row["precision"]), pct(row["recall"]), pct(row["f1"]), pct(row["random_precision"]),
            pct(row["random_recall"]), pct(row["random_f1"]),
            f"{row['distractors_hit']}/{row['distractors']}"]


METHOD_HEAD = ["Method", "seeds", "test (distractors) %", "test (clean) %", "gap (clean − distr.)",
               "attention on distractors", "steps", "TFLOPs"]
DIFF_HEAD = ["Variant", "vs", "seeds × problems", "variant %", "KD %", "Δ (pp)", "95% CI (pp)"]


def ordered_keys(result: FocusBenchResult) -> list[str]:
    """Teacher, Pre-KD, KD, the LeaF variants in run order, then the KD controls by steps."""
    keys = list(result.titles) or ([v for v in VARIANT_TITLES if v in result.accuracy]
                                   + [v for v in result.accuracy if v not in VARIANT_TITLES])
    order = {"off": 0, "on": 1, "mixed": 2}
    parsed = {k: p for k in keys if (p := parse_kd_steps_key(k))}
    controls = sorted(parsed, key=lambda k: (order[parsed[k][0]], parsed[k][1]))
    return [k for k in keys if k not in controls] + controls


def title_of(result: FocusBenchResult, key: str) -> str:
    return result.titles.get(key) or VARIANT_TITLES.get(key, key)


def method_rows(result: FocusBenchResult) -> list[list[str]]:
    rows = []
    for variant in ordered_keys(result):
        if variant not in result.accuracy:
            continue
        acc = result.accuracy[variant]
        gaps = [c - d for c, d in zip(acc.get(TEST_CLEAN, []), acc.get(TEST, []))]
        masses = [a["mass"] for a in result.attention.get(variant, [])]
        uniform = result.attention[variant][0]["uniform"] if result.attention.get(variant) else None
        steps = result.steps.get(variant)
        flops = result.flops.get(variant)
        rows.append([title_of(result, variant), str(len(acc.get(TEST, []))), fmt(acc.get(TEST, [])),
                     fmt(acc.get(TEST_CLEAN, [])), fmt(gaps),
                     fmt(masses, scale=1.0, digits=3) + (f" (uniform {uniform:.3f})" if uniform else ""),
                     "—" if not steps else "/".join(str(s) for s in sorted(set(steps))),
                     "—" if not flops else f"{flops['total'] / 1e12:.2f}"])
    return rows


def diff_rows(result: FocusBenchResult) -> list[list[str]]:
    rows = []
    for variant in ordered_keys(result):
        for kind, label in (("steps", "steps-matched KD"), ("flops", "compute-matched KD")):
            d = result.diffs.get(variant, {}).get(kind)
            if d is None:
                continue
            control = result.controls[variant][kind]
            rows.append([title_of(result, variant), f"{label} ({title_of(result, control)})",
                         f"{d.seeds} × {d.problems}", fmt(result.accuracy[variant][TEST]),
                         fmt(result.accuracy[control][TEST]), f"{100 * d.mean:+.1f}",
                         f"[{100 * d.low:+.1f}, {100 * d.high:+.1f}]"])
    return rows


def print_tables(console: Console, result: FocusBenchResult) -> None:
    from rich.table import Table

    table = Table(title="Detection quality: instruction tokens vs ground-truth distractor spans (train split)",
                  caption="P/R/F1 in %; random = expected value of selecting tokens at the same rate "
                          "(P = base rate, R = selection rate)")
    table.add_column("subset")
    for head in DETECTION_HEAD:
        table.add_column(head, justify="right")
    for row in result.detection:
        table.add_row(row["name"], *detection_cells(row))
    console.print(table)
    table = Table(title="Method quality: student accuracy on the held-out test split (greedy), attention mass",
                  caption="mean ± std over seeds; attention = mean mass from response positions onto distractor "
                          "tokens (teacher-forced, mean over layers and heads); TFLOPs = distillation (student "
                          "training + teacher forward on every row + the student's sampling on-policy) + Stage 1 "
                          "saliency, where counted")
    for head in METHOD_HEAD:
        table.add_column(head, justify="left" if head == "Method" else "right")
    for row in method_rows(result):
        table.add_row(*row, end_section=row[0] == VARIANT_TITLES["pre_kd"])
    console.print(table)
    rows = diff_rows(result)
    if rows:
        table = Table(title="Paired difference on the test split with distractors: variant − matched KD",
                      caption="same seeds and test problems; 95% percentile bootstrap CI (seeds and problems "
                              "resampled); pp = percentage points")
        for head in DIFF_HEAD:
            table.add_column(head, justify="left" if head in ("Variant", "vs") else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)


def log_summary(cfg: LeafConfig, parent_id: str | None, result: FocusBenchResult) -> None:
    if not (cfg.tracking.enabled and parent_id):
        return
    from mlflow.tracking import MlflowClient

    from leaf_ray.tracking import tracking_uri

    client = MlflowClient(tracking_uri(cfg))
    for variant, benches in result.accuracy.items():
        for bench, values in benches.items():
            mean, std = mean_std(values)
            client.log_metric(parent_id, f"summary.{variant}.{bench}.accuracy_mean", mean)
            if std is not None:
                client.log_metric(parent_id, f"summary.{variant}.{bench}.accuracy_std", std)
        mean, _ = mean_std([a["mass"] for a in result.attention.get(variant, [])])
        if mean is not None:
            client.log_metric(parent_id, f"summary.{variant}.attention.confounder_mass_mean", mean)
    for variant, kinds in result.diffs.items():
        for kind, d in kinds.items():
            for name, value in (("mean", d.mean), ("ci_low", d.low), ("ci_high", d.high)):
                client.log_metric(parent_id, f"paired_diff.{variant}.vs_{kind}_kd.{name}", value)
    for variant, f in result.flops.items():
        client.log_metric(parent_id, f"flops.{variant}.total", f["total"])
    if result.best:
        client.set_tag(parent_id, "leaf_ray.bench.best_variant", result.best)


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(path: Path, cfg: LeafConfig, result: FocusBenchResult, prepared: dict, command: str,
                 seconds: float) -> Path:
    focus = cfg.bench.focus
    teacher, student = prepared["teacher"], prepared["student"]

    def model_line(role: str, info: dict) -> str:
        s = info["sizes"]
        return (f"- {role}: {s['num_hidden_layers']} layers × {s['hidden_size']} hidden, {info['parameters'] / 1e6:.2f}M "
                f"parameters, final loss {info['final_loss']:.3f}, validation accuracy "
                f"{100 * info['accuracy_distractors']:.1f}% with distractors / {100 * info['accuracy_clean']:.1f}% "
                f"without ({info['seconds']:.0f} s)")

    detection = markdown_table(["subset"] + DETECTION_HEAD,
                               [[r["name"], *detection_cells(r)] for r in result.detection])
    method = markdown_table(METHOD_HEAD, method_rows(result))
    diffs = markdown_table(DIFF_HEAD, diff_rows(result)) if diff_rows(result) else "(no paired comparison ran)"
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
    quick = ("\n**`--quick` run**: 1 seed, variants " + ", ".join(focus.variants) + ", no τ/λ sweep.\n"
             if result.quick else "")
    best = (f"\nλ sweep on the best non-control variant by mean paired difference: `{result.best}`.\n"
            if result.best else "")
    text = f"""# `leaf-ray bench focus` report

Command: `{command}`
{quick}
Task: one-step add/sub word problems, numbers 1–{focus.max_number}, distractor sentences with irrelevant numbers
(task seed {focus.task_seed}; {focus.sizes.prepare} prepare / {focus.sizes.train} train / {focus.sizes.test} test
problems; test problems carry 1–2 distractors). Prepared models (`--prepare`, recipe in
`leaf_ray/experiments/focus/prepare.py`, {prepared['recipe']['steps']} steps each):

{model_line("teacher (trained with distractors)", teacher)}
{model_line("student (trained on clean problems)", student)}

## Detection quality

Instruction-level confounder tokens of `leaf-ray detect` on the train split ({cfg.detection.threshold.rule} rule,
q = {cfg.detection.threshold.quantile}, cap {cfg.detection.threshold.cap}) against the ground-truth distractor
sentences (a token is positive when its characters overlap one). Random = the expected scores of selecting
tokens at the detector's rate s with base rate π: precision π, recall s, F1 2πs/(π+s).

{detection}

## Method quality

Student accuracy (greedy, %) on the held-out test split with its distractors and on the same problems
without them; {focus.seeds} distillation seed(s) per variant (mean ± std), {cfg.distill.epochs} epoch(s),
lr {cfg.distill.lr}, λ = {cfg.distill.lambda_} unless named. Attention = mean attention mass
from the response positions onto the distractor tokens of {focus.attention_samples} test problems
(teacher-forced reference solution, mean over layers and heads, summed over the distractor columns; uniform =
the mass if attention were spread evenly). Steps = optimizer steps. KD controls ("KD w/o mask, N steps") are KD
run for N steps: steps-matched to a LeaF variant, or compute-matched; an on-policy (mixed) LeaF variant's
controls are on-policy (mixed) KD, on-policy KD's are off-policy KD (`distill.policy`, docs/on-policy.md)
(TFLOPs: student training + the teacher's forward on every row, counterfactuals included, + the student's
sampling for on-policy rows{", + Stage 1 saliency of both models" if
focus.count_detection_flops else ""}; `leaf_ray/experiments/focus/controls.py`).

{method}

## Paired differences

Variant − matched KD on the test split with distractors, per seed and problem (same seeds, same problems);
mean and 95% percentile bootstrap CI ({focus.bootstrap_resamples} replicates; seeds and problems resampled).
{best}
{diffs}

The same accuracies are in MLflow (experiment `{cfg.tracking.experiment}`, store `{cfg.tracking.tracking_uri or
(cfg.run.dir / 'mlflow.db')}`, tag `leaf_ray.variant` = the variant key):
`leaf-ray compare --config <this config> --experiment {cfg.tracking.experiment}`.

Wall time of this invocation: {seconds:.0f} s. Seconds per stage (when it ran; a rerun skips finished stages):
{timing}.
"""
    path.write_text(text, encoding="utf-8")
    return path
