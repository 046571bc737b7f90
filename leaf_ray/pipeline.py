"""`leaf-ray run`: the whole chain as one job, top to bottom.

    (teacher responses) -> ingest -> detection -> distillation (per variant) -> evaluation -> comparison

Everything lands under one run directory (`leaf_ray.store`). Each stage writes `<run dir>/_stages/<stage>.json` when its outputs
are complete; a rerun skips such stages (resume), so a killed job picks up at the stage it was in (stages are
themselves resumable inside). One MLflow parent run records the lineage; each stage logs a nested run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from leaf_ray.config import LeafConfig, ModelRef
from leaf_ray.store import RunDir, write_json_atomic


@dataclass
class ChainResult:
    run_dir: Path
    parent_run_id: str | None
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)


def _run_stage(cfg: LeafConfig, stage: str, fn: Callable[[], dict[str, Any]], console: Console,
               result: ChainResult) -> dict[str, Any]:
    """Run `fn` unless its success marker exists; record the outputs it returns in the marker."""
    marker = RunDir.of(cfg).stage_marker(stage)
    if marker.exists():
        info = json.loads(marker.read_text())
        console.print(f"[dim]skip {stage}: complete ({marker})[/dim]")
    else:
        console.rule(f"[bold]{stage}")
        t0 = time.time()
        info = fn()
        info["seconds"] = round(time.time() - t0, 1)
        marker.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(marker, info, default=str)  # a killed stage never looks complete
    result.stages[stage] = info
    return info


def _nested_run(cfg: LeafConfig, parent_id: str | None, stage: str, info: dict[str, Any]) -> None:
    """A nested MLflow run holding one stage's counts and outputs (lineage)."""
    if not cfg.tracking.enabled or parent_id is None:
        return
    import mlflow

    with mlflow.start_run(run_name=f"{cfg.run.name}-{stage}", nested=True, parent_run_id=parent_id,
                          tags={"leaf_ray.stage": stage, "leaf_ray.run": cfg.run.name}):
        flat = {k: v for k, v in info.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if flat:
            mlflow.log_metrics({f"{stage}.{k}": float(v) for k, v in flat.items()})
        mlflow.log_dict(info, f"{stage}.json")


def run_pipeline(cfg: LeafConfig, console: Console | None = None) -> ChainResult:
    from leaf_ray.raycluster import init_ray
    from leaf_ray.tiny_models import ensure_tiny_pair
    from leaf_ray.tracking import log_config, setup_mlflow

    console = console or Console()
    cfg.run.dir.mkdir(parents=True, exist_ok=True)
    (cfg.run.dir / "config.yaml").write_text(cfg.to_yaml())
    ensure_tiny_pair(cfg)
    init_ray(cfg)

    parent_id = None
    if cfg.tracking.enabled:
        mlflow = setup_mlflow(cfg)
        parent_file = cfg.run.dir / "_stages" / "mlflow_parent_run_id"
        if parent_file.exists():  # resume: keep logging under the same parent run
            parent_id = parent_file.read_text().strip()
        else:
            with mlflow.start_run(run_name=cfg.run.name, tags={"leaf_ray.stage": "chain",
                                                               "leaf_ray.run": cfg.run.name}) as run:
                parent_id = run.info.run_id
                log_config(cfg)
            parent_file.parent.mkdir(parents=True, exist_ok=True)
            parent_file.write_text(parent_id)
    result = ChainResult(run_dir=cfg.run.dir, parent_run_id=parent_id)

    # 1. Optional teacher responses (keeps only answers that check out), then ingestion.
    if cfg.pipeline.generate_teacher_responses:
        def teacher_responses():
            from leaf_ray.evaluate.teacher_responses import generate_teacher_responses

            return _as_dict(generate_teacher_responses(cfg))

        _nested_run(cfg, parent_id, "generate", _run_stage(cfg, "generate", teacher_responses, console, result))

    def ingest():
        from leaf_ray.data.ingest import run_ingest

        report = run_ingest(cfg)
        report.print(console)
        return _as_dict(report)

    _nested_run(cfg, parent_id, "ingest", _run_stage(cfg, "ingest", ingest, console, result))

    # 2. Stage 1: detection + counterfactuals (only when a LeaF variant needs them).
    leaf_variants = [v for v in cfg.pipeline.variants if v.startswith("leaf")]
    if leaf_variants:
        det_cfg = cfg
        if "leaf_instr_resp" in leaf_variants and not cfg.detection.response.enabled:
            det_cfg = cfg.model_copy(deep=True)
            det_cfg.detection.response.enabled = True

        def detect():
            from leaf_ray.detect.pipeline import run_detection

            return _as_dict(run_detection(det_cfg, console=console))

        _nested_run(cfg, parent_id, "detect", _run_stage(cfg, "detect", detect, console, result))

    # 3. Stage 2: one distillation per variant (KD w/o mask is the same trainer without counterfactuals).
    exported: dict[str, str] = {}
    run_ids: dict[str, str | None] = {}
    for variant in cfg.pipeline.variants:
        def distill(variant=variant):
            from leaf_ray.distill.driver import run_distillation

            return _as_dict(run_distillation(cfg, variant=variant, parent_run_id=parent_id, console=console))

        info = _run_stage(cfg, f"distill-{variant}", distill, console, result)
        exported[variant] = info["export_dir"]
        run_ids[variant] = info.get("mlflow_run_id")

    # 4. Evaluation: teacher, the student before KD, and every distilled variant. A distilled variant's
    #    scores go on its distillation run (so compare shows one row per run); the baselines get their own.
    if cfg.pipeline.evaluate:
        models = {"teacher": (cfg.models.teacher, None), "pre_kd": (cfg.models.student, None)}
        models.update({v: (ModelRef(path=str(p)), run_ids.get(v)) for v, p in exported.items()})
        for label, (ref, run_id) in models.items():
            def evaluate(label=label, ref=ref, run_id=run_id):
                from leaf_ray.evaluate.runner import run_evaluation

                return _as_dict(run_evaluation(cfg, ref, label=label, mlflow_run_id=run_id, console=console))

            _run_stage(cfg, f"evaluate-{label}", evaluate, console, result)
        if cfg.tracking.enabled:
            from leaf_ray.evaluate.compare import compare_experiment
            from leaf_ray.tracking import tracking_uri

            table = compare_experiment(tracking_uri(cfg), cfg.tracking.experiment)
            console.print(table.to_rich())
            (cfg.run.dir / "comparison.md").write_text(table.to_markdown(), encoding="utf-8")
            (cfg.run.dir / "comparison.csv").write_text(table.to_csv(), encoding="utf-8")
            result.stages["compare"] = {"markdown": str(cfg.run.dir / "comparison.md")}
    return result


def _as_dict(obj: Any) -> dict[str, Any]:
    """Stage reports are dataclasses or objects with `to_dict`; markers store them as JSON."""
    import dataclasses

    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj):
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return obj
    raise TypeError(f"stage returned {type(obj).__name__}; expected a dataclass, dict or .to_dict()")
