"""A distillation run's MLflow record, read back through `MlflowClient` from a real `mlflow server`.

The server is started by the test on 127.0.0.1 (its own process group, `--workers 1`, sqlite backend, local
artifact destination) and its whole process group is stopped afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from leaf_ray.config import config_from_dict

STEPS = 2


@pytest.fixture
def mlflow_server(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "mlflow-server.log", "w")
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # setsid: stop the whole group later
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(tmp_path / 'mlflow-server.log').read_text()}")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.slow
def test_distillation_run_is_recorded_in_mlflow(ray_local, tiny_pair, tmp_path, mlflow_server):
    from mlflow import MlflowClient

    from leaf_ray.data.demo_corpus import write_synthetic_inputs
    from leaf_ray.distill.driver import run_distillation
    from leaf_ray.tracking import git_commit

    cfg = config_from_dict({
        "run": {"name": "mlf", "root_dir": str(tmp_path / "runs")},
        "models": {"teacher": {"path": tiny_pair["teacher"]}, "student": {"path": tiny_pair["student"]},
                   "make_tiny_if_missing": False},
        "data": {"max_length": 192},
        "tracking": {"tracking_uri": mlflow_server, "experiment": "leaf-ray-mlflow-test"},
        "distill": {"epochs": 1, "max_steps": STEPS, "global_batch_size": 4, "micro_batch_size": 2,
                    "warmup_steps": 0, "lr": 1e-3, "eval_every_steps": 1, "checkpoint_every_steps": 2,
                    "resources": {"num_workers": 1, "cpus_per_worker": 0.5}},
    }, "test")
    write_synthetic_inputs(cfg.run.dir, n=8, validation=2, max_chars=450, response_level=True)
    client = MlflowClient(mlflow_server)
    experiment_id = client.create_experiment("leaf-ray-mlflow-test")
    parent = client.create_run(experiment_id, run_name="mlf").info.run_id

    result = run_distillation(cfg, variant="leaf_instr_resp", parent_run_id=parent)

    run = client.get_run(result.mlflow_run_id)
    assert run.info.run_name == "mlf-leaf_instr_resp" and run.info.status == "FINISHED"
    assert run.info.experiment_id == experiment_id
    tags = run.data.tags
    assert tags["leaf_ray.variant"] == "leaf_instr_resp" and tags["leaf_ray.stage"] == "distill"
    assert tags["mlflow.parentRunId"] == parent

    params = run.data.params
    assert params["distill.lambda"] == "0.5" and params["distill.deepspeed.zero_stage"] == "0"
    assert params["distill.use_counterfactuals"] == "True" and params["run.name"] == "mlf"
    assert params["pkg.torch"].startswith("2.") and "pkg.deepspeed" in params and "pkg.ray" in params
    if git_commit():
        assert params["git.commit"] == git_commit()

    for key in ("loss", "kl_original", "kl_counterfactual", "lr", "grad_norm", "tokens_per_s", "val_loss"):
        points = client.get_metric_history(result.mlflow_run_id, key)
        assert sorted(m.step for m in points) == list(range(1, STEPS + 1)), key
    assert run.data.metrics["best_val_loss"] == pytest.approx(result.best_val_loss)
    assert run.data.metrics["data.train.counterfactual_rows"] == result.counterfactual_rows > 0
    lrs = [m.value for m in sorted(client.get_metric_history(result.mlflow_run_id, "lr"), key=lambda m: m.step)]
    assert lrs == pytest.approx([1e-3, 5e-4])  # cosine over 2 steps, no warm-up

    top = {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    assert {"config.yaml", "counterfactuals_sample.json", "model", "summary.json"} <= top
    model_files = {Path(a.path).name for a in client.list_artifacts(result.mlflow_run_id, "model")}
    assert {"config.json", "model.safetensors", "tokenizer.json", "leaf_ray_export.json"} <= model_files

    local = Path(client.download_artifacts(result.mlflow_run_id, "config.yaml", str(tmp_path / "dl")))
    logged = config_from_dict(yaml.safe_load(local.read_text()), "logged")
    assert logged.distill.max_steps == STEPS and logged.tracking.tracking_uri == mlflow_server
    sample = json.loads(Path(client.download_artifacts(result.mlflow_run_id, "counterfactuals_sample.json",
                                                       str(tmp_path / "dl"))).read_text())
    assert "removed_text" in sample["columns"] and len(sample["data"]) > 0
    scopes = {row[sample["columns"].index("scope")] for row in sample["data"]}
    assert scopes == {"instruction", "response:1"}  # Instr & Resp: both levels trained
