"""`make demo` (= `leaf-ray demo`): LeaF on the controlled focus task, one seed, with a run report.

The chain is `leaf_ray.experiments.focus.run.run_focus_bench` on `configs/demo.yaml`: the task's problems carry distractor
sentences whose character spans are known; a tiny teacher trained with distractors and a tiny student trained
without them are prepared on first use (cached in `<run dir>/models/`); then the real stages run on a local Ray
instance — ingest, detection (Stage 1), KD w/o mask and LeaF distillation (Stage 2, Ray Train + DeepSpeed),
evaluation — all tracked in MLflow. It prints the detection quality against the ground truth (next to a random
selection at the same rate) and the paper-shaped method table, writes `report.html` (`leaf_ray.experiments.focus.report`)
and logs it to MLflow. A rerun reuses the prepared models and skips every finished stage.

The random-model chain of the tests is `leaf-ray run --config configs/smoke.yaml`.
"""

from __future__ import annotations

import time

from rich.console import Console

from leaf_ray.config import LeafConfig


def run_demo(cfg: LeafConfig, console: Console) -> int:
    from leaf_ray import console as quiet
    from leaf_ray.experiments.focus.report import log_report, write_run_report
    from leaf_ray.experiments.focus.run import FocusBenchError, run_focus_bench
    from leaf_ray.tracking import tracking_uri

    root = cfg.run.dir.expanduser().resolve()
    log = quiet.attach(root)
    started = time.monotonic()
    console.rule("[bold]leaf-ray demo: LeaF on the focus task")
    console.print("Word problems with inserted distractor sentences (their character spans are known). A tiny teacher "
                  "trained with distractors, a tiny student trained without: does detection find the distractors, "
                  "and does distillation make the student robust to them?", highlight=False)
    if log is not None:
        console.print(f"[dim]Ray's own output: {log} (--verbose shows it here)[/dim]", highlight=False)
    try:
        result = run_focus_bench(cfg, prepare=True, console=console, command="leaf-ray demo")
        report = write_run_report(root)
        log_report(cfg, root, report)
    except FocusBenchError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        return 1
    except Exception as e:  # noqa: BLE001 - a failing stage: its error and where the full traceback and Ray's output are
        quiet.print_failure(console, e, "the demo")
        return 1
    console.rule(f"done in {time.monotonic() - started:.0f} s")
    uri = tracking_uri(cfg) if cfg.tracking.tracking_uri else f"sqlite:///{root / 'mlflow.db'}"
    rows = [("report", report), ("report (Markdown)", result.report_path), ("heatmaps", root / "detect" / "heatmaps"),
            ("outputs", root), ("MLflow store", uri),
            ("MLflow UI", f".venv/bin/mlflow ui --backend-store-uri {uri} --port 5000")]
    if log is not None:
        rows.append(("Ray's log", log))
    for name, value in rows:
        console.print(f"{name + ':':<19}{value}", highlight=False, soft_wrap=True)
    return 0
