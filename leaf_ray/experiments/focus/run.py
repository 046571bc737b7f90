"""`leaf-ray bench focus`: does detection find real distractors, and does LeaF beat plain KD? Top to bottom:

1. **Task** (``leaf_ray.experiments.focus.task``): arithmetic word problems with inserted distractor sentences whose
   character spans are known; splits prepare / train / validation / test written to ``<run dir>/task/``.
2. **Models** (``--prepare``, ``leaf_ray.experiments.focus.prepare``): a tiny teacher trained with distractors and a
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
7. Tables printed and written to ``<run dir>/report.md`` with the command that produced them
   (:mod:`leaf_ray.experiments.focus.results`).

Per-seed distillations run in ``<run dir>/seed-<k>/`` whose ``data`` and ``detect`` are links to the shared
ones; every stage leaves ``<run dir>/_stages/<stage>.json`` and is skipped on a rerun (resume). The run
directory is tied to its settings (``settings.json``): rerunning with other settings there is an error.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leaf_ray.config import BenchmarkRef, LeafConfig, ModelRef
from leaf_ray.experiments.focus.controls import (
    Variant,
    base_variants,
    best_variant,
    control_policy,
    epochs_for_steps,
    kd_control,
    kd_steps_for_flops,
    lambda_variants,
    run_flops,
)
from leaf_ray.experiments.focus.results import (
    TEST,
    TEST_CLEAN,
    VARIANT_TITLES,
    FocusBenchResult,
    VariantRuns,
    log_summary,
    print_tables,
    write_report,
)
from leaf_ray.store import RunDir, parquet_files, write_json_atomic

if TYPE_CHECKING:
    from rich.console import Console

class FocusBenchError(RuntimeError):
    pass


# =========================================================================== the recipe


def run_focus_bench(cfg: LeafConfig, *, prepare: bool = False, console: Console | None = None,
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
    from leaf_ray.experiments.focus.prepare import prepare_key, prepare_models

    models_dir = root / "models"
    marker = models_dir / "prepare.json"
    if prepare:
        console.rule("[bold]prepare: the tiny teacher and student (trained from scratch once, then cached)")
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
                base, ref, variant, None, attention_samples, console), seconds))

    def train(k: int, variant: Variant) -> dict:
        return runs.add(variant, stage(root, f"seed-{k}-{variant.key}", console, lambda: distill_variant(
            base, root, k, variant, sources, parent_id, attention_samples, kd_per_epoch, console), seconds), k)

    def kd_epoch_flops(policy: str) -> float:
        """FLOPs of one KD epoch of `policy` (on-policy adds the student's sampling)."""
        if policy == "off":
            return kd_flops["epoch"]
        variant = Variant(f"kd_{policy}", f"KD {policy}", "kd", policy=policy)
        return flops_of(variant, kd_per_epoch * base.distill.epochs)["epoch"]

    def control(k: int, steps: int, policy: str) -> dict:
        """KD of `policy` run for `steps` optimizer steps (epochs raised so they are not cut short); the seed's
        own KD run when that is the same run."""
        if policy == "off" and steps == kd_runs[k]["steps"]:
            return kd_runs[k]
        variant = kd_control(steps, policy)
        runs.flops.setdefault(variant.key, {"total": run_flops(kd_epoch_flops(policy), steps, kd_per_epoch)})
        return train(k, variant)

    def controls(k: int, variant: Variant, info: dict) -> None:
        accounting = runs.flops[variant.key] = flops_of(variant, info["steps"])
        policy = control_policy(variant)
        if focus.steps_matched_kd:
            runs.match(variant, "steps", control(k, info["steps"], policy))
        if variant.key in focus.compute_matched:
            n = kd_steps_for_flops(accounting["total"], kd_epoch_flops(policy), kd_per_epoch)
            runs.match(variant, "flops", control(k, n, policy))

    kd = Variant("kd", VARIANT_TITLES["kd"], "kd")
    kd_per_epoch, kd_flops, flops_cache, kd_runs = 0, {}, {}, {}

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
        kd_info = kd_runs[k] = train(k, kd)
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
    # What the stage markers do not hold, for `leaf-ray report`: table titles and FLOP totals per variant.
    write_json_atomic(root / "results.json", {
        "titles": result.titles, "flops": {k: {"total": v["total"]} for k, v in result.flops.items()}})
    print_tables(console, result)
    log_summary(base, parent_id, result)
    command = command or "leaf-ray " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result.report_path = write_report(root / "report.md", cfg, result, prepared_info, command,
                                      time.monotonic() - started)
    console.print(f"report: {result.report_path}")
    return result


# =========================================================================== steps, in call order


def settings_of(cfg: LeafConfig) -> dict[str, Any]:
    """What the results in a bench run directory depend on (everything but the seed count and where the
    prepared models are cached)."""
    tree = cfg.dump()
    tree["bench"]["focus"] = {k: v for k, v in tree["bench"]["focus"].items() if k not in ("seeds", "models_cache")}
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
    from leaf_ray.experiments.focus.task import clean_view, make_task, write_gsm8k_jsonl, write_jsonl

    focus = cfg.bench.focus
    task = make_task(focus.sizes.model_dump(), seed=focus.task_seed, max_number=focus.max_number)
    files = {split: write_jsonl(rows, out / f"{split}.jsonl") for split, rows in task.items()}
    files[TEST] = write_gsm8k_jsonl(task["test"], out / f"{TEST}.gsm8k.jsonl")
    files[TEST_CLEAN] = write_gsm8k_jsonl(clean_view(task["test"]), out / f"{TEST_CLEAN}.gsm8k.jsonl")
    return files


def read_task_split(task_files: dict[str, Path], split: str) -> list[dict]:
    from leaf_ray.experiments.focus.task import read_jsonl

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


def stage(root: Path, name: str, console: Console, fn: Callable[[], dict], seconds: dict[str, float]) -> dict:
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
                   attention_samples: list[dict], console=None) -> dict:
    """Accuracy on both test benchmarks (`run_evaluation`, logged on `run_id` or a new run tagged `variant`)
    and the attention mass on the test distractors (logged on the same run)."""
    from leaf_ray.analysis.attention import measure_attention_of
    from leaf_ray.evaluate.runner import run_evaluation

    evaluation = run_evaluation(cfg, ref, label=variant, mlflow_run_id=run_id, console=console)
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
    verification, both levels), or the oracle / random-span controls (``controls``)."""
    import pyarrow.parquet as pq

    from leaf_ray.experiments.focus.controls import (
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
    cfg.distill.policy = variant.policy
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
                          attention_samples, console)
    return {**info, "steps": result.steps, "train_rows": result.train_rows,
            "counterfactual_rows": result.counterfactual_rows, "run_id": result.mlflow_run_id}


def variant_flops(base: LeafConfig, root: Path, variant: Variant, sources: dict[str, Path], *, steps: int,
                  per_epoch: int, detection: bool) -> dict:
    """FLOPs of one variant's run (``controls``): its train rows tokenised as the trainer does, a
    student training pass + a teacher forward per row, times steps / per_epoch; + Stage 1 saliency of both
    models per scored unit when `detection` (each unit counted at its original's rendered length: an upper
    bound for response-level units; selection/verification generation not counted)."""
    from transformers import AutoConfig

    from leaf_ray.bench.flops import Shape
    from leaf_ray.distill.data import load_rows, tokenize_row
    from leaf_ray.experiments.focus.controls import (
        detection_flops,
        distill_epoch_flops,
        generation_flops,
        run_flops,
    )
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
    sampled = {"off": 0.0, "on": 1.0, "mixed": base.distill.on_policy_fraction}[variant.policy]
    epoch += sampled * generation_flops(lens, targets, student)
    out = {"epoch": epoch, "train_rows": len(lens), "train_tokens": sum(lens), "steps": steps,
           "per_epoch": per_epoch, "distill": run_flops(epoch, steps, per_epoch), "detection": 0.0}
    if detection and variant.source and variant.source.startswith("detect"):
        ids = read_parquet_dir(run_dir / "detect" / "scores", columns=["sample_id"]).column("sample_id").to_pylist()
        units = [original[i] for i in ids if i in original]
        out["detection"] = detection_flops([u[0] for u in units], [u[1] for u in units], student, teacher)
        out["detection_units"] = len(units)
    out["total"] = out["distill"] + out["detection"]
    return out
