"""`make demo`: the whole chain on the embedded default (local Ray, tiny offline models, local MLflow)."""

from __future__ import annotations

from rich.console import Console

from leaf_ray.config import LeafConfig


def run_demo(cfg: LeafConfig, console: Console) -> int:
    from leaf_ray.pipeline import run_pipeline
    from leaf_ray.tracking import tracking_uri

    console.rule("leaf-ray demo")
    result = run_pipeline(cfg, console)
    console.rule("done")
    console.print(f"outputs:       {result.run_dir.resolve()}")
    console.print(f"comparison:    {result.run_dir.resolve() / 'comparison.md'}")
    console.print(f"MLflow store:  {tracking_uri(cfg)}")
    console.print(f"MLflow UI:     .venv/bin/mlflow ui --backend-store-uri {tracking_uri(cfg)} --port 5000")
    return 0
