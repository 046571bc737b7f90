"""`leaf-ray bench focus`: does detection find real distractors, and does LeaF beat plain KD? Top to bottom:

1. **Task** (``leaf_ray.bench.focus_task``): arithmetic word problems with inserted distractor sentences whose
   character spans are known; splits prepare / train / validation / test written to ``<run dir>/task/``.
2. **Models** (``--prepare``, ``leaf_ray.bench.focus_prepare``): a tiny teacher trained with distractors and a
   smaller student trained on clean problems, from scratch, cached in ``<run dir>/models/``.
3. **Ingest + detection** on the ``train`` split with the real stages (``run_ingest``, ``run_detection``; the
   response level too when ``leaf_instr_resp`` is benchmarked).
4. **Detection quality** (``leaf_ray.analysis.detection_quality``): token precision / recall / F1 of the
   instruction-level confounder masks against the distractor spans, next to a random selection at the same
   rate; heatmaps of a few samples are logged to MLflow (``leaf_ray.analysis.heatmap.log_heatmaps``).
5. **Method quality**: the teacher and the pre-KD student are evaluated once (greedy decoding is
   deterministic); then for each seed (``run.seed + k``, which orders the distillation batches) and variant
   (KD w/o mask, LeaF instruction, LeaF instruction + response) the real ``run_distillation`` trains the
   student and ``run_evaluation`` scores the exported model on the test split with distractors
   (``focus_test``) and on the same problems without them (``focus_test_clean``), logging
   ``eval.<benchmark>.accuracy`` on the distillation run (tag ``leaf_ray.variant``), so
   ``leaf-ray compare --config configs/bench-focus.yaml --experiment <experiment>`` shows the same table.
6. **Attention on confounders** (``leaf_ray.analysis.attention``): mean attention mass from response positions
   onto the test problems' distractor tokens, for every model above; logged as ``attention.confounder_mass``.
7. Tables printed and written to ``<run dir>/report.md`` with the command that produced them.

Per-seed distillations run in ``<run dir>/seed-<k>/`` whose ``data`` and ``detect`` are links to the shared
ones; every stage leaves ``<run dir>/_stages/<stage>.json`` and is skipped on a rerun (resume). The run
directory is tied to its settings (``settings.json``): rerunning with other settings there is an error.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from leaf_ray.config import BenchmarkRef, LeafConfig, ModelRef
from leaf_ray.store import RunDir, parquet_files

if TYPE_CHECKING:
    from rich.console import Console

VARIANT_TITLES = {"teacher": "Teacher", "pre_kd": "Pre-KD", "kd": "KD w/o mask", "leaf_instr": "LeaF (Instr)",
                  "leaf_instr_resp": "LeaF (Instr & Resp)"}
TEST, TEST_CLEAN = "focus_test", "focus_test_clean"


class FocusBenchError(RuntimeError):
    pass


@dataclass
class FocusBenchResult:
    detection: list[dict]
    accuracy: dict[str, dict[str, list[float]]]  # variant -> benchmark -> per-seed accuracies
    attention: dict[str, list[dict]]  # variant -> per-seed AttentionResult dicts
    steps: dict[str, list[int]]  # variant -> per-seed optimizer steps
    seconds: dict[str, float] = field(default_factory=dict)
    report_path: Path | None = None


# =========================================================================== the recipe


def run_focus_bench(cfg: LeafConfig, *, prepare: bool = False, console: "Console | None" = None,
                    command: str | None = None) -> FocusBenchResult:
    from rich.console import Console

    console = console or Console()
    focus = cfg.bench.focus
    root = cfg.run.dir.expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    check_settings(cfg, root)

    # 1. task
    task_files = write_task(cfg, root / "task")

    # 2. models
    from leaf_ray.bench.focus_prepare import prepare_key, prepare_models

    models_dir = root / "models"
    marker = models_dir / "prepare.json"
    if prepare:
        console.rule("[bold]prepare: tiny teacher and student from scratch")
        prepared = prepare_models(focus, models_dir, console=console)
        if prepared.cached:
            console.print(f"[dim]prepared models reused from {models_dir}[/dim]")
    elif not (marker.is_file() and json.loads(marker.read_text()).get("key") == prepare_key(focus)):
        raise FocusBenchError(f"no prepared models for these settings in {models_dir}: run "
                              "`leaf-ray bench focus --prepare` (trains them once, then they are cached)")
    prepared_info = json.loads(marker.read_text())
    base = bench_config(cfg, root, task_files)
    seconds = {"prepare (once; cached after)": prepared_info.get("seconds", 0.0)}

    # MLflow: one parent run for the benchmark's own numbers (detection quality, heatmaps, settings).
    parent_id = parent_run(base, root)

    # 3. ingest + detection of the train split
    from leaf_ray.data.ingest import run_ingest
    from leaf_ray.detect.pipeline import run_detection

    def ingest() -> dict:
        report = run_ingest(base)
        report.print(console)
        return {"clean": report.clean, "splits": report.splits}

    stage(root, "ingest", console, ingest, seconds)
    det_cfg = base.model_copy(deep=True)
    det_cfg.detection.response.enabled = "leaf_instr_resp" in focus.variants
    stage(root, "detect", console, lambda: {"units": run_detection(det_cfg, console=console).units}, seconds)

    # 4. detection quality (+ heatmaps)
    detection = stage(root, "detection-quality", console,
                      lambda: {"rows": measure_detection(base, task_files, parent_id)}, seconds)["rows"]

    # 5 + 6. teacher and pre-KD once; every variant for every seed
    test_rows = read_task_split(task_files, "test")
    attention_samples = [{"instruction": r["instruction"], "output": r["output"],
                          "confounder_spans": r["distractor_spans"]} for r in test_rows[:focus.attention_samples]]
    accuracy: dict[str, dict[str, list[float]]] = {}
    attention: dict[str, list[dict]] = {}
    steps: dict[str, list[int]] = {}

    def record(variant: str, info: dict) -> None:
        for bench, acc in info["accuracy"].items():
            accuracy.setdefault(variant, {}).setdefault(bench, []).append(acc)
        attention.setdefault(variant, []).append(info["attention"])
        if info.get("steps") is not None:
            steps.setdefault(variant, []).append(info["steps"])

    for variant, ref in (("teacher", base.models.teacher), ("pre_kd", base.models.student)):
        record(variant, stage(root, f"evaluate-{variant}", console, lambda variant=variant, ref=ref: evaluate_model(
            base, ref, variant, None, attention_samples), seconds))
    for k in range(focus.seeds):
        seed_cfg = seed_config(base, root, k)
        for variant in focus.variants:
            def distill_and_evaluate(seed_cfg=seed_cfg, variant=variant) -> dict:
                from leaf_ray.distill.driver import run_distillation

                result = run_distillation(seed_cfg, variant=variant, console=console, parent_run_id=parent_id)
                info = evaluate_model(seed_cfg, ModelRef(path=str(result.export_dir)), variant,
                                      result.mlflow_run_id, attention_samples)
                return {**info, "steps": result.steps, "train_rows": result.train_rows,
                        "counterfactual_rows": result.counterfactual_rows, "run_id": result.mlflow_run_id}

            record(variant, stage(root, f"seed-{k}-{variant}", console, distill_and_evaluate, seconds))

    # 7. tables + report
    result = FocusBenchResult(detection, accuracy, attention, steps, seconds)
    print_tables(console, result)
    log_summary(base, parent_id, result)
    command = command or "leaf-ray " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result.report_path = write_report(root / "report.md", cfg, result, prepared_info, command,
                                      time.monotonic() - started)
    console.print(f"report: {result.report_path}")
    return result


# =========================================================================== steps, in call order


def settings_of(cfg: LeafConfig) -> dict[str, Any]:
    """What the results in a bench run directory depend on (everything but the seed count)."""
    tree = cfg.dump()
    tree["bench"]["focus"] = {k: v for k, v in tree["bench"]["focus"].items() if k != "seeds"}
    tree.pop("ray", None)
    return tree


def check_settings(cfg: LeafConfig, root: Path) -> None:
    path = root / "settings.json"
    settings = settings_of(cfg)
    if path.is_file():
        if json.loads(path.read_text()) != settings:
            raise FocusBenchError(f"{root} holds a focus benchmark run with other settings ({path}); use another "
                                  "run.name (or delete that directory) to run with these")
        return
    path.write_text(json.dumps(settings, indent=2))


def write_task(cfg: LeafConfig, out: Path) -> dict[str, Path]:
    """All splits as JSONL (full rows, with distractor spans), the test split in GSM8K layout with and without
    its distractors, for the evaluation's local `gsm8k` benchmarks."""
    from leaf_ray.bench.focus_task import clean_view, make_task, write_gsm8k_jsonl, write_jsonl

    focus = cfg.bench.focus
    task = make_task(focus.sizes.model_dump(), seed=focus.task_seed, max_number=focus.max_number)
    files = {split: write_jsonl(rows, out / f"{split}.jsonl") for split, rows in task.items()}
    files[TEST] = write_gsm8k_jsonl(task["test"], out / f"{TEST}.gsm8k.jsonl")
    files[TEST_CLEAN] = write_gsm8k_jsonl(clean_view(task["test"]), out / f"{TEST_CLEAN}.gsm8k.jsonl")
    return files


def read_task_split(task_files: dict[str, Path], split: str) -> list[dict]:
    from leaf_ray.bench.focus_task import read_jsonl

    return read_jsonl(task_files[split])


def bench_config(cfg: LeafConfig, root: Path, task_files: dict[str, Path]) -> LeafConfig:
    """The benchmark's view of `cfg`: the prepared models, the train split as the corpus, the test split as
    the benchmarks, one MLflow store in the run directory (all paths absolute)."""
    base = cfg.model_copy(deep=True)
    base.run.root_dir = str(root.parent)
    base.run.name = root.name
    models = root / "models"
    base.models.teacher = ModelRef(path=str(models / "teacher"))
    base.models.student = ModelRef(path=str(models / "student"))
    base.models.make_tiny_if_missing = False
    base.data.paths = [str(task_files["train"])]
    base.data.format = "jsonl"
    base.tracking.tracking_uri = base.tracking.tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
    base.evaluation.benchmarks = [BenchmarkRef(name=TEST, kind="math", format="gsm8k", path=str(task_files[TEST])),
                                  BenchmarkRef(name=TEST_CLEAN, kind="math", format="gsm8k",
                                               path=str(task_files[TEST_CLEAN]))]
    return base


def seed_config(base: LeafConfig, root: Path, k: int) -> LeafConfig:
    """`<root>/seed-<k>` (data/ and detect/ link to the shared ones) with run.seed + k."""
    seed_dir = root / f"seed-{k}"
    seed_dir.mkdir(exist_ok=True)
    for name in ("data", "detect"):
        link = seed_dir / name
        if not link.exists():
            os.symlink(os.path.relpath(root / name, seed_dir), link)
    cfg = base.model_copy(deep=True)
    cfg.run.root_dir, cfg.run.name = str(root), seed_dir.name
    cfg.run.seed = base.run.seed + k
    return cfg


def parent_run(cfg: LeafConfig, root: Path) -> str | None:
    if not cfg.tracking.enabled:
        return None
    from leaf_ray.tracking import log_config, setup_mlflow

    path = root / "_stages" / "mlflow_parent_run_id"
    if path.is_file():
        return path.read_text().strip()
    mlflow = setup_mlflow(cfg)
    with mlflow.start_run(run_name="bench-focus", tags={"leaf_ray.stage": "bench-focus",
                                                        "leaf_ray.run": cfg.run.name}) as run:
        log_config(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run.info.run_id)
    return run.info.run_id


def stage(root: Path, name: str, console: "Console", fn: Callable[[], dict], seconds: dict[str, float]) -> dict:
    """Run `fn` unless `<root>/_stages/<name>.json` exists; store what it returns there (atomically)."""
    marker = root / "_stages" / f"{name}.json"
    if marker.is_file():
        console.print(f"[dim]skip {name}: done ({marker})[/dim]")
        info = json.loads(marker.read_text())
        seconds[name] = info.get("seconds", 0.0)
        return info
    console.rule(f"[bold]{name}")
    t0 = time.monotonic()
    info = fn()
    seconds[name] = round(time.monotonic() - t0, 1)
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({**info, "seconds": seconds[name]}, indent=2, default=str))
    tmp.replace(marker)
    return info


def measure_detection(cfg: LeafConfig, task_files: dict[str, Path], parent_id: str | None) -> list[dict]:
    """P/R/F1 of the instruction-level confounder masks of `detect/scores` against the train split's
    distractor spans: over all scored samples, and over those with at least one distractor."""
    import pyarrow.parquet as pq

    from leaf_ray.analysis.detection_quality import detection_quality
    from leaf_ray.analysis.heatmap import log_heatmaps

    truth = {r["id"]: r["distractor_spans"] for r in read_task_split(task_files, "train")}
    files = parquet_files(RunDir.of(cfg).detect.scores)
    scores = pq.read_table(files, columns=["sample_id", "scope", "token_char_offsets", "confounder_mask"]).to_pylist()
    rows = [detection_quality(scores, truth, "all samples").to_dict(),
            detection_quality([r for r in scores if truth.get(r["sample_id"])], truth,
                              "with ≥ 1 distractor").to_dict()]
    if cfg.tracking.enabled and parent_id:
        log_heatmaps(cfg, cfg.bench.focus.heatmaps, run_id=parent_id, truth=truth)
        from mlflow.tracking import MlflowClient

        from leaf_ray.tracking import tracking_uri

        client = MlflowClient(tracking_uri(cfg))
        for row, prefix in zip(rows, ("detect_quality.all", "detect_quality.with_distractors")):
            for key in ("precision", "recall", "f1", "random_precision", "random_recall", "random_f1",
                        "selection_rate", "base_rate"):
                if row[key] is not None:
                    client.log_metric(parent_id, f"{prefix}.{key}", float(row[key]))
    return rows


def evaluate_model(cfg: LeafConfig, ref: ModelRef, variant: str, run_id: str | None,
                   attention_samples: list[dict]) -> dict:
    """Accuracy on both test benchmarks (`run_evaluation`, logged on `run_id` or a new run tagged `variant`)
    and the attention mass on the test distractors (logged on the same run)."""
    from leaf_ray.analysis.attention import measure_attention_of
    from leaf_ray.evaluate.runner import run_evaluation

    evaluation = run_evaluation(cfg, ref, label=variant, mlflow_run_id=run_id)
    attention = measure_attention_of(ref.path, attention_samples).to_dict()
    if cfg.tracking.enabled and evaluation.run_id:
        from mlflow.tracking import MlflowClient

        from leaf_ray.tracking import tracking_uri

        client = MlflowClient(tracking_uri(cfg))
        client.log_metric(evaluation.run_id, "attention.confounder_mass", attention["mass"])
        client.log_metric(evaluation.run_id, "attention.uniform_mass", attention["uniform"])
    return {"accuracy": {b.name: b.accuracy for b in evaluation.benchmarks}, "attention": attention,
            "eval_run_id": evaluation.run_id}


# =========================================================================== tables and report


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
               "attention on distractors", "steps"]


def method_rows(result: FocusBenchResult) -> list[list[str]]:
    rows = []
    for variant, title in VARIANT_TITLES.items():
        if variant not in result.accuracy:
            continue
        acc = result.accuracy[variant]
        gaps = [c - d for c, d in zip(acc.get(TEST_CLEAN, []), acc.get(TEST, []))]
        masses = [a["mass"] for a in result.attention.get(variant, [])]
        uniform = result.attention[variant][0]["uniform"] if result.attention.get(variant) else None
        steps = result.steps.get(variant)
        rows.append([title, str(len(acc.get(TEST, []))), fmt(acc.get(TEST, [])), fmt(acc.get(TEST_CLEAN, [])),
                     fmt(gaps), fmt(masses, scale=1.0, digits=3) + (f" (uniform {uniform:.3f})" if uniform else ""),
                     "—" if not steps else "/".join(str(s) for s in steps)])
    return rows


def print_tables(console: "Console", result: FocusBenchResult) -> None:
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
                          "tokens (teacher-forced, mean over layers and heads)")
    for head in METHOD_HEAD:
        table.add_column(head, justify="left" if head == "Method" else "right")
    for row in method_rows(result):
        table.add_row(*row, end_section=row[0] == "Teacher")
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
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
    text = f"""# `leaf-ray bench focus` report

Command: `{command}`

Task: one-step add/sub word problems, numbers 1–{focus.max_number}, distractor sentences with irrelevant numbers
(task seed {focus.task_seed}; {focus.sizes.prepare} prepare / {focus.sizes.train} train / {focus.sizes.test} test
problems; test problems carry 1–2 distractors). Prepared models (`--prepare`, recipe in
`leaf_ray/bench/focus_prepare.py`, {prepared['recipe']['steps']} steps each):

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
without them; {len(next(iter(result.steps.values()), []))} distillation seed(s) per variant (mean ± std),
{cfg.distill.epochs} epoch(s), lr {cfg.distill.lr}, λ = {cfg.distill.lambda_}. Attention = mean attention mass
from the response positions onto the distractor tokens of {focus.attention_samples} test problems
(teacher-forced reference solution, mean over layers and heads, summed over the distractor columns; uniform =
the mass if attention were spread evenly). Steps = optimizer steps per seed (LeaF trains on the originals plus
their counterfactuals, so it takes more steps per epoch than KD).

{method}

The same accuracies are in MLflow (experiment `{cfg.tracking.experiment}`, store `{cfg.tracking.tracking_uri or
(cfg.run.dir / 'mlflow.db')}`): `leaf-ray compare --config <this config> --experiment {cfg.tracking.experiment}`.

Wall time of this invocation: {seconds:.0f} s. Seconds per stage (when it ran; a rerun skips finished stages):
{timing}.
"""
    path.write_text(text, encoding="utf-8")
    return path
