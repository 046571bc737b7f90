"""`ray job submit` against a real head: what a user does with jobs/ on a cluster, its job server on loopback.

The head (`ray start --head` with a dashboard, token auth disabled) is private to this module: its own temp
dir, free ports, stopped by signalling exactly its processes (tests/ray_processes.py), so it neither joins
nor disturbs another Ray instance on this machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from ray_processes import BIN, private_head, ray_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_head():
    with private_head(num_cpus=2, dashboard=True) as head:
        yield head.dashboard_url


def _submit(address: str, entrypoint: list[str], timeout_s: float = 600) -> tuple[str, subprocess.CompletedProcess]:
    """`ray job submit` from the repository root, exactly as jobs/README.md shows; waits for the end."""
    job_id = f"leaf-ray-test-{uuid.uuid4().hex[:8]}"
    done = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", job_id,
         "--runtime-env", "jobs/runtime_env.yaml", "--", *entrypoint],
        cwd=ROOT, env=ray_env(), check=False, capture_output=True, text=True, timeout=timeout_s)
    return job_id, done


def _status(address: str, job_id: str, submitted: subprocess.CompletedProcess) -> str:
    from ray.job_submission import JobSubmissionClient

    try:
        return str(JobSubmissionClient(address).get_job_status(job_id).value)
    except RuntimeError as e:  # the submission itself failed: show what `ray job submit` said
        raise AssertionError(f"{e}\n{submitted.stdout[-3000:]}\n{submitted.stderr[-3000:]}") from None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ray_job_submit_runs_the_demo_chain_on_the_cluster(ray_head, tiny_pair, tmp_path):
    """The smoke chain (configs/smoke.yaml: ingest -> detect -> distill -> evaluate -> compare), made small."""
    runs = tmp_path / "runs"
    job_id, done = _submit(ray_head, [
        "python", "jobs/run.py", "--config", "configs/smoke.yaml",
        "--set", f"run.root_dir={runs}", "--set", "run.name=submitted",
        "--set", f"models.student.path={tiny_pair['student']}",
        "--set", f"models.teacher.path={tiny_pair['teacher']}",
        "--set", "models.make_tiny_if_missing=false", "--set", "data.demo.size=12",
        "--set", "pipeline.variants=[leaf_instr]", "--set", "distill.max_steps=2",
        "--set", "generation.max_new_tokens=8",
        "--set", "evaluation.benchmarks=[{name: gsm_symbolic, format: gsm_symbolic, limit: 2}]"],
        timeout_s=1200)
    assert _status(ray_head, job_id, done) == "SUCCEEDED", done.stdout[-4000:] + done.stderr[-4000:]

    # Every stage ran inside the job and wrote its outputs where the config said.
    import pyarrow.parquet as pq

    run_dir = runs / "submitted"
    data = run_dir / "data"
    clean = pq.read_table(data / "clean")
    manifest = json.loads((data / "ingest_manifest.json").read_text())
    assert clean.num_rows == manifest["counts"]["clean"] == 12
    assert manifest["counts"]["read"] == 12 and manifest["counts"]["quarantined"] == 0
    stages = {p.stem for p in (run_dir / "_stages").glob("*.json")}
    assert {"ingest", "detect", "distill-leaf_instr", "evaluate-teacher", "evaluate-pre_kd",
            "evaluate-leaf_instr"} <= stages, stages
    scores = pq.read_table(run_dir / "detect" / "scores")
    assert set(scores.column("sample_id").to_pylist()) == set(clean.column("sample_id").to_pylist())
    assert (run_dir / "distill" / "leaf_instr" / "model" / "config.json").is_file()
    table = (run_dir / "comparison.md").read_text()
    assert "LeaF (Instr)" in table and "Pre-KD" in table and "gsm_symbolic" in table
    assert "comparison" in done.stdout or "LeaF comparison" in done.stdout  # the job's output reached us


@pytest.mark.slow
def test_ray_job_submit_config_error_fails_the_job_with_the_key(ray_head):
    job_id, done = _submit(ray_head, ["python", "jobs/detect.py", "--config", "configs/smoke.yaml",
                                      "--set", "distill.lr=-1"], timeout_s=300)
    assert _status(ray_head, job_id, done) == "FAILED"
    assert done.returncode != 0
    logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", ray_head, job_id],
                          env=ray_env(), check=False, capture_output=True, text=True, timeout=60).stdout
    assert "jobs/detect.py: error: invalid config" in logs and "distill.lr" in logs, logs[-2000:]


# --------------------------------------------------------------------------- without a cluster


def test_runtime_env_uploads_only_the_code():
    """What `--runtime-env jobs/runtime_env.yaml` would upload from this checkout, walked with Ray's own
    packaging rules (excludes + .gitignore): small, and none of the virtualenvs or run outputs."""
    from collections import Counter

    import yaml
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, _dir_travel, _get_excludes

    runtime_env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    assert runtime_env["working_dir"] == "."
    assert runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    sizes: Counter = Counter()

    def add(path: Path) -> None:
        if path.is_file() and not path.is_symlink():
            sizes[path.relative_to(ROOT).parts[0]] += path.stat().st_size

    _dir_travel(ROOT, [_get_excludes(ROOT, runtime_env["excludes"])], add, include_gitignore=True)
    assert {"leaf_ray", "jobs", "configs"} <= set(sizes)
    assert not {".venv", ".git", "runs"} & set(sizes), sizes
    total_mib = sum(sizes.values()) / 2**20
    assert total_mib < min(64, GCS_STORAGE_MAX_SIZE / 2**20 / 4), (
        f"the job would upload {total_mib:.0f} MiB; largest: {sizes.most_common(5)} "
        "(exclude them in jobs/runtime_env.yaml)")



@pytest.mark.parametrize("job", ["run", "ingest", "detect", "distill", "evaluate"])
def test_entrypoints_exit_non_zero_on_config_errors(job, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill:\n  lr: -1\n  no_such_key: 3\n")
    for args, expected in (([], "distill.lr"), ([], "distill.no_such_key: unknown key"),
                           (["--set", "run"], "expected dotted.key=value")):
        out = subprocess.run([sys.executable, f"jobs/{job}.py", "--config", str(bad), *args], cwd=ROOT,
                             env=ray_env(), check=False, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stderr
        assert f"jobs/{job}.py: error:" in out.stderr and expected in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    missing = subprocess.run([sys.executable, f"jobs/{job}.py", "--config", str(tmp_path / "nope.yaml")],
                             cwd=ROOT, env=ray_env(), check=False, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "config file not found" in missing.stderr
