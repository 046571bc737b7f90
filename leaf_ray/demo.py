"""`make demo`: the main job on the embedded default. Grows into the full chain (issue 6)."""

from __future__ import annotations

from rich.console import Console

from leaf_ray.config import LeafConfig


def run_demo(cfg: LeafConfig, console: Console) -> int:
    from leaf_ray.data.ingest import run_ingest
    from leaf_ray.models import ensure_tiny_pair

    console.rule("leaf-ray demo")
    ensure_tiny_pair(cfg)
    console.print(f"tiny models: {cfg.models.teacher.path}, {cfg.models.student.path}")
    report = run_ingest(cfg)
    report.print(console)
    return 0
