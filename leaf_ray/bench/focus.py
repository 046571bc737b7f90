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

from leaf_ray.bench.focus_controls import (
    PairedDiff,
    Variant,
    base_variants,
    best_variant,
    epochs_for_steps,
    kd_steps_for_flops,
    kd_steps_key,
    lambda_variants,
    paired_bootstrap_ci,
    run_flops,
)
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


# =========================================================================== the recipe


def run_focus_bench(cfg: LeafConfig, *, prepare: bool = False, console: "Console | None" = None,
                    command: str | None = None) -> FocusBenchResult:
    from rich.console import Console

    console = console or Console()
    if cfg.bench.focus.quick:
        cfg = quick_config(cfg)
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
    need_kd = "kd" in focus.variants or focus.steps_matched_kd or bool(focus.compute_matched)
    plan = base_variants((["kd"] if need_kd else []) + [v for v in focus.variants if v != "kd"], focus.tau_sweep,
                         base.detection.threshold.quantile)
    det_cfg = base.model_copy(deep=True)
    det_cfg.detection.response.enabled = any(v.source == "detect" and v.trainer == "leaf_instr_resp" for v in plan)
    stage(root, "detect", console, lambda: {"units": run_detection(det_cfg, console=console).units}, seconds)

    # 3b. the other counterfactual sources: detection at other τ, the full recipe, the oracle and random spans
    sources = {"detect": root}
    for source in sorted({v.source for v in plan if v.source} - {"detect"}):
        info = stage(root, f"source-{source}", console, lambda source=source: build_source(
            base, root, source, task_files, console), seconds)
        sources[source] = Path(info["dir"])

    # 4. detection quality (+ heatmaps)
    detection = stage(root, "detection-quality", console,
                      lambda: {"rows": measure_detection(base, task_files, parent_id)}, seconds)["rows"]

    # 5 + 6. teacher and pre-KD once; then every variant for every seed, each LeaF variant followed by its
    # steps-matched (and, where asked, compute-matched) KD control; then the λ sweep of the best variant
    test_rows = read_task_split(task_files, "test")
    attention_samples = [{"instruction": r["instruction"], "output": r["output"],
                          "confounder_spans": r["distractor_spans"]} for r in test_rows[:focus.attention_samples]]
    runs = VariantRuns(focus, attention_samples)
    for variant, ref in (("teacher", base.models.teacher), ("pre_kd", base.models.student)):
        runs.add(Variant(variant, VARIANT_TITLES[variant], variant), stage(
            root, f"evaluate-{variant}", console, lambda variant=variant, ref=ref: evaluate_model(
                base, ref, variant, None, attention_samples), seconds))

    def train(k: int, variant: Variant) -> dict:
        return runs.add(variant, stage(root, f"seed-{k}-{variant.key}", console, lambda: distill_variant(
            base, root, k, variant, sources, parent_id, attention_samples, kd_per_epoch, console), seconds), k)

    def kd_control(steps: int) -> Variant:
        """KD w/o mask run for `steps` optimizer steps (epochs raised so they are not cut short)."""
        runs.flops.setdefault(kd_steps_key(steps), {"total": run_flops(kd_flops["epoch"], steps, kd_per_epoch)})
        return Variant(kd_steps_key(steps), f"KD w/o mask, {steps} steps", "kd", steps=steps)

    def controls(k: int, variant: Variant, info: dict) -> None:
        accounting = runs.flops[variant.key] = flops_of(variant, info["steps"])
        if focus.steps_matched_kd:
            runs.match(variant, "steps", train(k, kd_control(info["steps"])))
        if variant.key in focus.compute_matched:
            n = kd_steps_for_flops(accounting["total"], kd_flops["epoch"], kd_per_epoch)
            runs.match(variant, "flops", train(k, kd_control(n)))

    kd = Variant("kd", VARIANT_TITLES["kd"], "kd")
    kd_per_epoch, kd_flops, flops_cache = 0, {}, {}

    def flops_of(variant: Variant, steps: int) -> dict:
        if variant.key not in flops_cache:  # rows and steps are the same for every seed
            flops_cache[variant.key] = stage(root, f"flops-{variant.key}", console, lambda: variant_flops(
                base, root, variant, sources, steps=steps, per_epoch=max(1, steps // base.distill.epochs),
                detection=focus.count_detection_flops), seconds)
        return flops_cache[variant.key]

    for k in range(focus.seeds):
        if not need_kd:
            for variant in plan:
                runs.flops[variant.key] = flops_of(variant, train(k, variant)["steps"])
            continue
        kd_info = train(k, kd)
        kd_per_epoch = max(1, kd_info["steps"] // base.distill.epochs)
        if not kd_flops:
            kd_flops = stage(root, "flops-kd", console, lambda kd_info=kd_info, per_epoch=kd_per_epoch: variant_flops(
                base, root, kd, sources, steps=kd_info["steps"], per_epoch=per_epoch, detection=False), seconds)
            runs.flops["kd"] = kd_flops
        for variant in plan:
            if variant.key == "kd":
                continue
            controls(k, variant, train(k, variant))
    best = best_variant(plan, {key: d["steps"].mean for key, d in runs.paired_diffs().items() if "steps" in d})
    if best is not None and focus.lambda_sweep:
        for variant in lambda_variants(best, focus.lambda_sweep, base.distill.lambda_):
            for k in range(focus.seeds):
                controls(k, variant, train(k, variant))
        runs.best = best.key

    # 7. tables + report
    result = runs.result(detection, seconds)
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
    import pyarrow.parquet as pq

    correct = {b.name: [int(c) for c in pq.read_table(b.predictions_path, columns=["correct"]).column(
        "correct").to_pylist()] for b in evaluation.benchmarks}
    return {"accuracy": {b.name: b.accuracy for b in evaluation.benchmarks}, "attention": attention,
            "eval_run_id": evaluation.run_id, "correct": correct}


def quick_config(cfg: LeafConfig) -> LeafConfig:
    """`--quick`: one seed, `bench.focus.quick_variants`, steps-matched KD only (no compute-matched KD), no τ/λ
    sweep, in `<run.name>-quick` (its own run directory: the settings differ)."""
    cfg = cfg.model_copy(deep=True)
    focus = cfg.bench.focus
    focus.quick = True
    focus.seeds = 1
    focus.variants = list(focus.quick_variants)
    focus.compute_matched = []  # steps-matched KD only: the quick run is for the headline comparison
    focus.tau_sweep = []
    focus.lambda_sweep = []
    if not cfg.run.name.endswith("-quick"):
        cfg.run.name = f"{cfg.run.name}-quick"
    return cfg


def link(target: Path, at: Path) -> None:
    """`at` -> `target` as a relative symlink (kept when it already exists)."""
    if not at.exists() and not at.is_symlink():
        at.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(target, at.parent), at)


def write_counterfactuals(directory: Path, rows: list[dict]) -> int:
    """Counterfactual rows in detection's schema as `directory` (one part; staged, then renamed in)."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from leaf_ray.detect.schema import COUNTERFACTUALS_SCHEMA

    staging = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=COUNTERFACTUALS_SCHEMA), staging / "part-00000.parquet")
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)
    return len(rows)


def build_source(base: LeafConfig, root: Path, source: str, task_files: dict[str, Path], console) -> dict:
    """The counterfactuals of `source` in `<root>/sources/<source>/detect/counterfactuals` (data/ links to the
    shared ingest): detection at another τ quantile (instruction level) or the full recipe (selection +
    verification, both levels), or the oracle / random-span controls (``focus_controls``)."""
    import pyarrow.parquet as pq

    from leaf_ray.bench.focus_controls import (
        oracle_counterfactuals,
        pruned_tokens,
        random_span_counterfactuals,
    )
    from leaf_ray.store import read_parquet_dir

    src_dir = root / "sources" / source
    link(root / "data", src_dir / "data")
    if source.startswith("detect-"):
        from leaf_ray.detect.pipeline import run_detection

        cfg = base.model_copy(deep=True)
        cfg.run.root_dir, cfg.run.name = str(root / "sources"), source
        if source == "detect-full":
            cfg.detection.selection = cfg.detection.verification = True
            cfg.detection.response.enabled = True
        else:
            cfg.detection.threshold.quantile = float(source[len("detect-q"):])
            cfg.detection.response.enabled = False
        report = run_detection(cfg, console=console)
        cfs = sum(pq.read_metadata(f).num_rows for f in parquet_files(src_dir / "detect" / "counterfactuals"))
        return {"dir": str(src_dir), "units": report.units, "counterfactuals": cfs}
    clean = read_parquet_dir(RunDir.of(base).clean, columns=["sample_id", "instruction", "output", "split"])
    originals = {r["sample_id"]: r for r in clean.to_pylist()}
    if source == "oracle":
        truth = {r["id"]: r["distractor_spans"] for r in read_task_split(task_files, "train")}
        rows = oracle_counterfactuals([{**r, "distractor_spans": truth[sid]} for sid, r in originals.items()])
        removed = {}
    elif source == "random":
        scores = read_parquet_dir(RunDir.of(base).detect.scores,
                                  columns=["sample_id", "scope", "token_char_offsets", "spans"]).to_pylist()
        rows = random_span_counterfactuals(scores, originals, base.bench.focus.random_seed)
        removed = pruned_tokens(scores)
    else:
        raise FocusBenchError(f"unknown counterfactual source {source!r}")
    n = write_counterfactuals(src_dir / "detect" / "counterfactuals", rows)
    return {"dir": str(src_dir), "counterfactuals": n,
            "pruned_spans": sum(len(v) for v in removed.values()),
            "pruned_tokens": sum(sum(v) for v in removed.values())}


def variant_run_config(base: LeafConfig, root: Path, k: int, variant: Variant, sources: dict[str, Path],
                       kd_per_epoch: int) -> LeafConfig:
    """`<root>/seed-<k>/<variant>/` (data/ -> the shared ingest, detect/ -> the variant's counterfactual source)
    with run.seed + k, the variant's λ, and for a KD control max_steps = its steps."""
    run_dir = root / f"seed-{k}" / variant.key
    link(root / "data", run_dir / "data")
    if variant.source:
        link(sources[variant.source] / "detect", run_dir / "detect")
    cfg = base.model_copy(deep=True)
    cfg.run.root_dir, cfg.run.name = str(root / f"seed-{k}"), variant.key
    cfg.run.seed = base.run.seed + k
    if variant.lambda_ is not None:
        cfg.distill.lambda_ = variant.lambda_
    if variant.steps is not None:
        cfg.distill.max_steps = variant.steps
        cfg.distill.epochs = epochs_for_steps(variant.steps, max(1, kd_per_epoch))
    return cfg


def distill_variant(base: LeafConfig, root: Path, k: int, variant: Variant, sources: dict[str, Path],
                    parent_id: str | None, attention_samples: list[dict], kd_per_epoch: int, console) -> dict:
    """Train (run_distillation, Stage 2 variant `variant.trainer`) and evaluate one variant for seed k; its
    MLflow run is tagged `leaf_ray.variant = variant.key` (what `leaf-ray compare` groups by)."""
    from leaf_ray.distill.driver import run_distillation

    cfg = variant_run_config(base, root, k, variant, sources, kd_per_epoch)
    result = run_distillation(cfg, variant=variant.trainer, console=console, parent_run_id=parent_id)
    if cfg.tracking.enabled and result.mlflow_run_id:
        from mlflow.tracking import MlflowClient

        from leaf_ray.tracking import tracking_uri

        client = MlflowClient(tracking_uri(cfg))
        for tag, value in (("leaf_ray.variant", variant.key), ("leaf_ray.trainer_variant", variant.trainer),
                           ("leaf_ray.bench.seed", str(k)), ("leaf_ray.variant_title", variant.title),
                           ("mlflow.runName", f"seed-{k}-{variant.key}")):
            client.set_tag(result.mlflow_run_id, tag, value)
    info = evaluate_model(cfg, ModelRef(path=str(result.export_dir)), variant.key, result.mlflow_run_id,
                          attention_samples)
    return {**info, "steps": result.steps, "train_rows": result.train_rows,
            "counterfactual_rows": result.counterfactual_rows, "run_id": result.mlflow_run_id}


def variant_flops(base: LeafConfig, root: Path, variant: Variant, sources: dict[str, Path], *, steps: int,
                  per_epoch: int, detection: bool) -> dict:
    """FLOPs of one variant's run (``focus_controls``): its train rows tokenised as the trainer does, a
    student training pass + a teacher forward per row, times steps / per_epoch; + Stage 1 saliency of both
    models per scored unit when `detection` (each unit counted at its original's rendered length: an upper
    bound for response-level units; selection/verification generation not counted)."""
    from transformers import AutoConfig

    from leaf_ray.bench.flops import Shape
    from leaf_ray.bench.focus_controls import detection_flops, distill_epoch_flops, run_flops
    from leaf_ray.distill.data import load_rows, tokenize_row
    from leaf_ray.models import load_tokenizer
    from leaf_ray.store import read_parquet_dir

    student = Shape.from_config(AutoConfig.from_pretrained(base.models.student.path))
    teacher = Shape.from_config(AutoConfig.from_pretrained(base.models.teacher.path))
    tokenizer = load_tokenizer(base.models.student)
    run_dir = sources[variant.source] if variant.source else root
    rows, _ = load_rows(run_dir, variant.trainer)
    lens, targets, original = [], [], {}
    for r in rows.to_pylist():
        ids, mask, _ = tokenize_row(tokenizer, r["instruction"], r["prefix"], r["response"], base.data.max_length)
        n_targets = int(sum(mask[1:]))
        if not r["is_counterfactual"]:
            original[r["group"]] = (len(ids), n_targets)
        if r["split"] == "train":
            lens.append(len(ids))
            targets.append(n_targets)
    epoch = distill_epoch_flops(lens, targets, student, teacher)
    out = {"epoch": epoch, "train_rows": len(lens), "train_tokens": sum(lens), "steps": steps,
           "per_epoch": per_epoch, "distill": run_flops(epoch, steps, per_epoch), "detection": 0.0}
    if detection and variant.source and variant.source.startswith("detect"):
        ids = read_parquet_dir(run_dir / "detect" / "scores", columns=["sample_id"]).column("sample_id").to_pylist()
        units = [original[i] for i in ids if i in original]
        out["detection"] = detection_flops([u[0] for u in units], [u[1] for u in units], student, teacher)
        out["detection_units"] = len(units)
    out["total"] = out["distill"] + out["detection"]
    return out


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
               "attention on distractors", "steps", "PFLOPs"]
DIFF_HEAD = ["Variant", "vs", "seeds × problems", "variant %", "KD %", "Δ (pp)", "95% CI (pp)"]


def ordered_keys(result: FocusBenchResult) -> list[str]:
    """Teacher, Pre-KD, KD, the LeaF variants in run order, then the KD controls by steps."""
    keys = list(result.titles) or ([v for v in VARIANT_TITLES if v in result.accuracy]
                                   + [v for v in result.accuracy if v not in VARIANT_TITLES])
    controls = sorted((k for k in keys if k.startswith("kd_") and k.endswith("steps")),
                      key=lambda k: int(k[3:-5]))
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
                     "—" if not flops else f"{flops['total'] / 1e15:.3f}"])
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
                          "tokens (teacher-forced, mean over layers and heads); PFLOPs = distillation (student "
                          "training + teacher forward on every row) + Stage 1 saliency, where counted")
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
without them; {focus.seeds} distillation seed(s) per variant (mean ± std), {cfg.distill.epochs} epoch(s),
lr {cfg.distill.lr}, λ = {cfg.distill.lambda_} unless named. Attention = mean attention mass
from the response positions onto the distractor tokens of {focus.attention_samples} test problems
(teacher-forced reference solution, mean over layers and heads, summed over the distractor columns; uniform =
the mass if attention were spread evenly). Steps = optimizer steps. KD controls ("KD w/o mask, N steps") are KD
run for N steps: steps-matched to a LeaF variant, or compute-matched (PFLOPs: student training + the
teacher's forward on every row, counterfactuals included{", + Stage 1 saliency of both models" if
focus.count_detection_flops else ""}; `leaf_ray/bench/focus_controls.py`).

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
