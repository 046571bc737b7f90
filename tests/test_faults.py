"""Hard faults, injected for real on the tiny pair and a local Ray: SIGKILL of a Ray Train worker, of the
distillation driver, of a saliency actor and of a generation actor; a real `mlflow server` stopped mid-run or
missing at start; a full and a read-only run directory; a second writer on the same run directory.

Each fault test checks the guarantee docs/faults.md states: the final student equals an
uninterrupted run (the tolerance of tests/test_trainer.py's crash test), every detection unit is committed
exactly once, tracking failures never stop training, and errors name the path or server. Processes are
found among this test process's descendants (the session's Ray) or by their own temp dir, never by name
machine-wide, and none may be left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from ray_processes import (
    BIN,
    TRAIN_POLL_ENV,
    cluster_pids,
    free_ports,
    kill_and_reap,
    kill_distill_then_rerun,
)
from run_data import read_dir, write_clean
from test_detect_pipeline import clean_rows
from test_trainer import INLINE, STEPS, assert_curves_match, distill, make_cfg
from test_trainer import assert_same_weights as assert_same_student

from leaf_ray.detect.schema import DetectionError
from leaf_ray.distill.data import DistillDataError
from leaf_ray.store import DetectPaths

DETECT_POOLS = {"student_pool": {"num_cpus": 0.5, "batch_size": 2},
                "teacher_pool": {"num_cpus": 0.5, "batch_size": 2}, "units_per_part": 2}


# --------------------------------------------------------------------------- helpers


def session_ray_processes(marker: str) -> list:
    """Live processes of this session's Ray (descendants of this test process) whose title names `marker`
    (Ray titles a worker `ray::<actor class>...`)."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE and marker in " ".join(p.cmdline()):
                out.append(p)
    return out


class KillWhen(threading.Thread):
    """Once `condition()` holds, SIGKILL one live process titled `marker` (then run `after()`); keeps
    recording every pid titled `marker` until stopped, so a restart shows as a new pid."""

    def __init__(self, condition, marker: str, after=None, timeout_s: float = 600):
        super().__init__(daemon=True)
        self.condition, self.marker, self.after, self.timeout_s = condition, marker, after, timeout_s
        self.killed: int | None = None
        self.seen: set[int] = set()
        self.after_result = None
        self.done = threading.Event()

    def run(self):
        deadline = time.monotonic() + self.timeout_s
        while not self.done.is_set() and time.monotonic() < deadline:
            procs = session_ray_processes(self.marker)
            self.seen |= {p.pid for p in procs}
            if self.killed is None and procs and self.condition():
                self.killed = procs[0].pid
                os.kill(self.killed, signal.SIGKILL)
                if self.after is not None:
                    try:
                        self.after_result = self.after()
                    except Exception as e:  # noqa: BLE001 - the test asserts on it
                        self.after_result = e
            time.sleep(0.02)

    def stop(self):
        self.done.set()
        self.join(timeout=30)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def checkpoint(out_dir: Path, step: int) -> Path:
    return out_dir / "ray" / f"checkpoint-step{step:07d}"


def registered_checkpoint(out_dir: Path, step: int) -> bool:
    """Whether Ray Train's controller has registered the checkpoint of `step` (it writes its snapshot when it
    does). A worker's report is registered when the controller next polls the worker group, so a checkpoint
    directory can exist for a moment before a restart would resume from it."""
    snapshot = out_dir / "ray" / "checkpoint_manager_snapshot.json"
    with contextlib.suppress(OSError, ValueError):
        results = json.loads(snapshot.read_text())["checkpoint_results"]
        return checkpoint(out_dir, step).name in {r["checkpoint_dir_name"] for r in results}
    return False


def loss_steps(cfg, run_id: str) -> list[int]:
    from mlflow import MlflowClient

    from leaf_ray.tracking import tracking_uri

    return sorted(m.step for m in MlflowClient(tracking_uri(cfg)).get_metric_history(run_id, "loss"))


def one_line(text: str) -> str:
    """Rich wraps long messages; compare without whitespace."""
    return "".join(text.split())


class MlflowServer:
    """A real `mlflow server` on a free port, in its own process group (stopped by signalling that group)."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, free_ports(1)[0], None
        root.mkdir(parents=True, exist_ok=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 180):
        log = open(self.root / "server.log", "a")  # noqa: SIM115 - the server writes it until stopped
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.url}/health", timeout=5):
                return
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server not up"
            time.sleep(0.5)

    def stop(self):
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=15)
        deadline = time.monotonic() + 30
        while (left := cluster_pids(self.proc.pid, str(self.root))) and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.3)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        assert not cluster_pids(self.proc.pid, str(self.root)), "mlflow server processes left behind"
        self.proc = None


@contextlib.contextmanager
def mounted(target: Path, *options: str):
    """`mount <options> <target>` for the block; unmounted afterwards (lazily, should a reader linger)."""
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", *options, str(target)], check=True, capture_output=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)


# --------------------------------------------------------------------------- distillation


@pytest.fixture(scope="module")
def baseline(ray_local, tiny_pair, tmp_path_factory):
    """The uninterrupted run every distillation fault is compared with."""
    cfg = make_cfg(tmp_path_factory.mktemp("fault-baseline"), tiny_pair, "zero0")
    return cfg, distill(cfg)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigkill_of_a_train_worker_restarts_the_group_from_the_checkpoint(baseline, tiny_pair, tmp_path):
    base_cfg, base = baseline
    cfg = make_cfg(tmp_path, tiny_pair, "worker-kill")  # distill.max_failures = 1
    out = cfg.run.dir / "distill" / "leaf_instr"
    # mid-epoch, after a checkpoint
    with KillWhen(lambda: registered_checkpoint(out, 2), "RayTrainWorker") as killer:
        result = distill(cfg)
    assert killer.killed is not None, "no Ray Train worker was killed"
    assert killer.seen - {killer.killed}, "no worker restarted"
    assert len(killer.seen) > 2, f"the group was not restarted: {sorted(killer.seen)}"  # 2 workers + new ones
    assert result.steps == STEPS
    steps = loss_steps(cfg, result.mlflow_run_id)
    assert set(steps) == set(range(1, STEPS + 1)) and steps.count(1) == 1  # continued from step 2, not step 0
    assert_curves_match(cfg, result, base_cfg, base, rel=1e-4)
    assert_same_student(result, base)


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_sigkill_of_the_driver_then_the_same_command_resumes(baseline, tiny_pair, tmp_path):
    from typer.testing import CliRunner

    from leaf_ray.cli import app

    base_cfg, base = baseline
    cfg = make_cfg(tmp_path, tiny_pair, "driver-kill")
    out = cfg.run.dir / "distill" / "leaf_instr"
    config_file = cfg.run.dir / "config.yaml"
    config_file.write_text(cfg.to_yaml())
    temp_dir = tempfile.mkdtemp(prefix="lrdis-", dir="/tmp")  # the driver's own Ray: found by its temp dir
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=temp_dir, **TRAIN_POLL_ENV)
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "driver.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "leaf_ray.cli", "distill", "--config", str(config_file)],
                                env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while not (out / "mlflow_run_id").exists():  # opened after the lock, before training
            assert proc.poll() is None, f"distill exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "distill did not start within 400 s"
            time.sleep(0.05)
        # A second writer while this one runs is refused (the lock is the first thing the command takes).
        with pytest.raises(DistillDataError, match="another distillation run is writing here"):
            distill(cfg)
        while not registered_checkpoint(out, 2):  # mid-epoch, after a checkpoint
            assert proc.poll() is None, f"distill exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no registered step-2 checkpoint within 400 s"
            time.sleep(0.01)
        # The driver and the local Ray it started are lost at once, as with its machine: Ray's workers run in
        # their own sessions and would otherwise finish the last steps of this tiny run before Ray reaps them.
        for pid in cluster_pids(proc.pid, temp_dir) | {proc.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    finally:
        left = kill_and_reap(proc, temp_dir)
    assert not left, f"processes of the killed distill driver survived: {sorted(left)}"
    assert not (out / "summary.json").exists(), "the kill must land before the run finished"

    again = CliRunner().invoke(app, ["distill", "--config", str(config_file)])  # the same command
    assert again.exit_code == 0, again.output
    result = distill(cfg)  # now complete: returns the run without training
    assert result.steps == STEPS
    steps = loss_steps(cfg, result.mlflow_run_id)
    assert set(steps) == set(range(1, STEPS + 1)) and steps.count(1) == 1  # resumed from the checkpoint
    assert_curves_match(cfg, result, base_cfg, base, rel=1e-4)
    assert_same_student(result, base)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_of_an_in_process_run_then_the_same_command_resumes(baseline, tiny_pair, tmp_path):
    """distill.inline_max_rows: the run trains in the `leaf-ray distill` process itself; SIGKILL it once its
    step-2 checkpoint is in <out>/checkpoints, run the same command: it resumes there, every step logged
    once from step 2 on, and ends with the uninterrupted student."""
    base_cfg, base = baseline
    cfg = make_cfg(tmp_path, tiny_pair, "inline-kill", **INLINE)
    out = kill_distill_then_rerun(cfg, tmp_path, wait_s=240)
    assert "ray" not in {p.name for p in out.iterdir()}  # it never started Ray Train
    result = distill(cfg)  # now complete: returns the run without training
    assert result.steps == STEPS
    steps = loss_steps(cfg, result.mlflow_run_id)
    assert set(steps) == set(range(1, STEPS + 1)) and steps.count(1) == 1 and steps.count(2) == 1
    assert_curves_match(cfg, result, base_cfg, base, rel=1e-4)
    assert_same_student(result, base)


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_tracking_server_stopped_mid_run_never_stops_training(baseline, tiny_pair, tmp_path, caplog):
    from mlflow import MlflowClient

    from leaf_ray.tracking import pending_metrics_file

    base_cfg, base = baseline
    server = MlflowServer(tmp_path / "mlflow-server")
    server.start()
    try:
        cfg = make_cfg(tmp_path, tiny_pair, "server-stop")
        cfg.tracking.tracking_uri = server.url
        out = cfg.run.dir / "distill" / "leaf_instr"
        stopper = threading.Thread(target=lambda: (wait_for(lambda: checkpoint(out, 2).is_dir()), server.stop()),
                                   daemon=True)
        stopper.start()
        with caplog.at_level("WARNING"):
            stopped = distill(cfg)  # no crash
        stopper.join(timeout=60)
        assert server.proc is None, "the server was not stopped during the run"
        warnings = [r for r in caplog.records if "does not answer" in r.getMessage()]
        assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
        assert server.url in warnings[0].getMessage() and "run the same command again" in warnings[0].getMessage()
        assert stopped.steps == STEPS and stopped.mlflow_run_id is None
        assert (out / "model" / "model.safetensors").exists()
        assert pending_metrics_file(out).exists()  # the steps after the stop, kept for later

        server.start()  # back, same store: the same command logs what was kept and finishes the run
        result = distill(cfg)
        assert result.mlflow_run_id and not pending_metrics_file(out).exists()
        assert MlflowClient(server.url).get_run(result.mlflow_run_id).info.status == "FINISHED"
        assert_curves_match(cfg, result, base_cfg, base, rel=1e-4)
        assert_same_student(result, base)
    finally:
        server.stop()


def wait_for(condition, timeout_s: float = 400):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.02)


def test_a_missing_tracking_server_is_a_clear_error_before_any_work(tiny_pair, tmp_path):
    from leaf_ray.tracking import TrackingError

    cfg = make_cfg(tmp_path, tiny_pair, "no-server")
    cfg.tracking.tracking_uri = f"http://127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(TrackingError, match=r"MLflow tracking server http://127\.0\.0\.1:\d+ does not answer"):
        distill(cfg)
    assert time.monotonic() - started < 30
    assert not (cfg.run.dir / "distill").exists()  # nothing started, nothing written


# --------------------------------------------------------------------------- detection and generation


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigkill_of_a_saliency_actor_mid_stream_loses_and_duplicates_nothing(ray_local, cfg_factory):
    from leaf_ray.detect.pipeline import run_detection
    from leaf_ray.detect.stages import committed_units

    cfg = cfg_factory(detection=DETECT_POOLS)
    rows = clean_rows(12)
    write_clean(cfg, rows)
    out = DetectPaths.of(cfg)
    # After the kill, while the stream recovers, a second detection on the same directory is refused.
    with KillWhen(lambda: len(committed_units(out)) >= 1, "SaliencyScorer",
                  after=lambda: run_detection(cfg)) as killer:
        report = run_detection(cfg)
    assert killer.killed is not None, "no saliency actor was killed"
    assert isinstance(killer.after_result, DetectionError), killer.after_result
    assert "another detection run is writing here" in str(killer.after_result)
    assert report.units == len(rows)
    scores = read_dir(out.scores)
    assert Counter(s["sample_id"] for s in scores) == Counter({r["sample_id"]: 1 for r in rows})
    cfs = read_dir(out.counterfactuals)
    keys = [(c["sample_id"], c["span_index"]) for c in cfs]
    assert len(keys) == len(set(keys))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_of_a_generation_actor_mid_stream_loses_and_duplicates_nothing(ray_local, cfg_factory, tiny_pair):
    import ray.data

    from leaf_ray.config import GenerationConfig, ModelRef
    from leaf_ray.data.demo_corpus import generate_problems
    from leaf_ray.generate.backends import TransformersBackend
    from leaf_ray.generate.pipeline import generate_dataset

    cfg = cfg_factory(generation={"backend": "transformers", "max_new_tokens": 16,
                                  "pool": {"batch_size": 1, "min_actors": 1, "max_actors": 1, "num_cpus": 0.5}})
    prompts = [p["instruction"] for p in generate_problems(10, seed=11)]
    ds = generate_dataset(cfg, cfg.models.teacher, ray.data.from_items(
        [{"k": i, "instruction": p} for i, p in enumerate(prompts)], override_num_blocks=len(prompts)),
        "instruction", "response")
    got = []
    with KillWhen(lambda: len(got) >= 1, "GenerateUDF") as killer:
        for row in ds.iter_rows():
            got.append(row)  # noqa: PERF402 - the killer watches it grow while the stream runs
    assert killer.killed is not None, "no generation actor was killed"
    assert sorted(r["k"] for r in got) == list(range(len(prompts)))  # every row exactly once
    expected = TransformersBackend(ModelRef(path=tiny_pair["teacher"]),
                                   GenerationConfig(max_new_tokens=16)).generate(prompts)
    assert [r["response"] for r in sorted(got, key=lambda r: r["k"])] == expected


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_full_run_directory_names_the_path_and_commits_no_half_part(ray_local, cfg_factory, tmp_path):
    import pyarrow.parquet as pq

    from leaf_ray.detect.pipeline import run_detection
    from leaf_ray.detect.stages import committed_units, recover_interrupted_commits

    with mounted(tmp_path / "runs", "-t", "tmpfs", "-o", "size=16m", "tmpfs"):
        cfg = cfg_factory(detection=DETECT_POOLS)
        rows = clean_rows(10)
        write_clean(cfg, rows)
        out = DetectPaths.of(cfg)
        filler = tmp_path / "runs" / "filler"

        def fill():  # the disk fills up once the first part is committed
            with contextlib.suppress(OSError), open(filler, "wb") as f:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()

        filling = threading.Thread(target=lambda: (wait_for(lambda: len(committed_units(out)) >= 1), fill()),
                                   daemon=True)
        filling.start()
        with pytest.raises(Exception) as failed:  # Ray wraps it; the message is what matters
            run_detection(cfg)
        filling.join(timeout=60)
        message = str(failed.value)
        assert "No space left on device" in message and "cannot commit a part of" in message, message
        assert str(out.root) in message, message
        filler.unlink()
        # What the next run does first: drop the half-commits, then skip what is committed. Every part left
        # is whole, every dependent part has its commit (scores) part, and the committed units are those rows.
        recover_interrupted_commits(out)
        assert not out.tmp.exists()
        committed_parts = {p.stem for p in out.scores.glob("*.parquet")}
        for d in (out.scores, out.counterfactuals, out.quarantine):
            for part in d.glob("*.parquet"):
                pq.read_metadata(part)
                assert part.stem in committed_parts, part
        scores = read_dir(out.scores)
        assert 1 <= len(scores) < len(rows)
        assert committed_units(out) == {(s["sample_id"], s["scope"]) for s in scores}
        assert len(scores) == len({s["sample_id"] for s in scores})  # nothing twice


def test_a_read_only_run_directory_is_a_clear_error_naming_the_path(cfg_factory, tmp_path):
    from typer.testing import CliRunner

    from leaf_ray.cli import app

    cfg = cfg_factory(detection=DETECT_POOLS)
    write_clean(cfg, clean_rows(2))
    config_file = tmp_path / "config.yaml"
    config_file.write_text(cfg.to_yaml())
    run_dir = cfg.run.dir
    with mounted(run_dir, "--bind", str(run_dir)):
        subprocess.run(["mount", "-o", "remount,ro,bind", str(run_dir)], check=True, capture_output=True)
        for verb, path in (("detect", run_dir / "detect"), ("distill", run_dir / "distill")):
            result = CliRunner().invoke(app, [verb, "--config", str(config_file)])
            assert result.exit_code == 1, (verb, result.output)
            assert "Read-only file system" in result.output and one_line(str(path)) in one_line(result.output), (
                verb, result.output)
