"""A private `ray start --head` for tests that need a real head node (job server, fake autoscaler).

Isolation from other Ray instances on the machine: its own `--temp-dir` (a bare `ray.init()` elsewhere only
looks for clusters in the default temp dir), every port chosen free, and its own process group. It is stopped
by signalling exactly its processes: SIGTERM to `ray start --block` tears down what that command started
(what `ray stop` does, but for one cluster; `ray stop` has no per-cluster form and would stop every Ray process
on the machine), then SIGKILL for anything of this cluster still alive.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv: `ray`, and the `python` a job's entrypoint runs
# Ray Train's controller registers a reported checkpoint when it next polls the workers (every 2 s by default);
# the tests' optimizer steps take ~0.1 s, so the tests poll faster than a step: a SIGKILL test can then kill
# after a checkpoint is registered, as it would be within a step of real length.
TRAIN_POLL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}


@dataclass
class Head:
    gcs_address: str
    dashboard_url: str | None
    temp_dir: str
    env: dict[str, str]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ray_env(**extra: str) -> dict[str, str]:
    """The environment for `ray start` / `ray job submit`: no token auth, the venv first on PATH, no
    RAY_ADDRESS leaking in from the caller."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}:{env.get('PATH', '')}",
               DS_ACCELERATOR="cpu", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # nothing to drain on stop
    env.update(extra)
    return env


def cluster_pids(pgid: int, temp_dir: str) -> set[int]:
    """Live processes of one cluster: its process group, or anything whose command line or working directory
    names its temp dir (workers, agents, the nodes a fake autoscaler adds, job drivers, which Ray starts in
    their own sessions). Zombies are left out: they hold nothing and their parent reaps them."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if os.getpgid(int(proc.name)) == pgid:
                pids.add(int(proc.name))
                continue
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except (OSError, IndexError):
            continue
        if temp_dir in cmdline or cwd.startswith(temp_dir):
            pids.add(int(proc.name))
    return pids


def stop(head: subprocess.Popen, temp_dir: str, grace_s: float = 30.0) -> set[int]:
    """Stop one cluster; returns the processes still alive afterwards (expected: none)."""
    head.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=grace_s)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        left = cluster_pids(head.pid, temp_dir)
        if not left:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    if head.poll() is None:
        head.kill()
        head.wait(timeout=10)
    return cluster_pids(head.pid, temp_dir)


def kill_and_reap(proc: subprocess.Popen, temp_dir: str, grace_s: float = 60.0) -> set[int]:
    """SIGKILL a driver started in its own session and everything of its local Ray (found by `temp_dir`);
    remove `temp_dir`. Returns the processes that outlived `grace_s` (killed too, so none is left behind)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=grace_s)
    deadline = time.monotonic() + grace_s
    while (left := cluster_pids(proc.pid, temp_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:  # never leave processes behind, even when the caller's assertion fails
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)
    return left


def _start_once(args: list[str], env: dict[str, str], temp_dir: str, dashboard_url: str | None,
                timeout_s: float) -> tuple[subprocess.Popen, str | None]:
    """One `ray start --block`; returns (process, error). On error the caller stops the process."""
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "w") as log:
        head = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address_file = Path(temp_dir) / "ray_current_cluster"  # written once the head is up
    deadline = time.monotonic() + timeout_s
    while not address_file.exists():
        if head.poll() is not None:
            return head, f"ray start exited:\n{log_path.read_text()[-4000:]}"
        if time.monotonic() > deadline:
            return head, f"head not up after {timeout_s}s:\n{log_path.read_text()[-4000:]}"
        time.sleep(1)
    while dashboard_url:
        probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", dashboard_url], env=env,
                               check=False, capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            break
        if time.monotonic() > deadline:
            return head, f"job server not up at {dashboard_url}: {probe.stderr[-2000:]}"
        time.sleep(2)
    return head, None


@contextlib.contextmanager
def private_head(*, num_cpus: int, dashboard: bool = False, extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, gcs_port: int | None = None,
                 start_timeout_s: float = 240, attempts: int = 3, node_ip: str = "127.0.0.1") -> Iterator[Head]:
    """Start a head, wait until it (and, with `dashboard`, its job server) answers, yield, stop it.

    `ray start` gives its raylet a fixed 30 s to register with the GCS; on a heavily loaded machine that can
    fail, so a head that dies while starting is cleaned up and started afresh (up to `attempts` times)."""
    env = env or ray_env()
    errors = []
    for _ in range(attempts):
        # Short temp dir: Ray's socket paths must stay under the 107-byte limit of AF_UNIX.
        temp_dir = tempfile.mkdtemp(prefix="lrray-", dir="/tmp")
        ports = free_ports(9)
        port = gcs_port or ports[0]
        # On loopback, and RAY_ADDRESS names it for every process of this cluster: Ray code that looks a
        # cluster up by itself (Ray Train's placement-group cleaner) otherwise finds two instances on this
        # machine (this one and the test session's) and gives up.
        head_env = {**env, "RAY_ADDRESS": f"{node_ip}:{port}"}
        args = [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--node-ip-address={node_ip}",
                f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
                f"--dashboard-agent-listen-port={ports[1]}", f"--dashboard-agent-grpc-port={ports[2]}",
                f"--metrics-export-port={ports[3]}", f"--runtime-env-agent-port={ports[4]}",
                f"--node-manager-port={ports[5]}", f"--object-manager-port={ports[6]}",
                f"--ray-client-server-port={ports[7]}", *extra_args]
        dashboard_url = None
        if dashboard:
            args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={ports[8]}"]
            dashboard_url = f"http://127.0.0.1:{ports[8]}"
        else:
            args.append("--include-dashboard=false")
        head, error = _start_once(args, head_env, temp_dir, dashboard_url, start_timeout_s)
        if error is None:
            break
        errors.append(error)
        survivors = stop(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not survivors, f"processes of a failed test head still alive: {sorted(survivors)}"
    else:
        raise AssertionError(f"no Ray head after {attempts} attempts:\n" + "\n---\n".join(errors))
    try:
        yield Head(gcs_address=(Path(temp_dir) / "ray_current_cluster").read_text().strip(),
                   dashboard_url=dashboard_url, temp_dir=temp_dir, env=env)
    finally:
        survivors = stop(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not survivors, f"processes of the test cluster still alive: {sorted(survivors)}"


def sigkill_distill_after_checkpoint(config_file: Path, out: Path, log: Path, *, step: int = 2,
                                     wait_s: float = 400.0) -> subprocess.Popen:
    """Run `leaf-ray distill --config FILE` in its own session, SIGKILL it (and its group) once its step-`step`
    checkpoint is in `<out>/checkpoints` (renamed in whole), and return the reaped process. The kill must
    land before the run finished."""
    name = f"checkpoint-step{step:07d}"
    with open(log, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "leaf_ray.cli", "distill", "--config", str(config_file)],
                                env=dict(os.environ, RAY_AUTH_MODE="disabled"), stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + wait_s  # generous: a machine shared by several suites is slow to start
        while not (out / "checkpoints" / name).is_dir():
            assert proc.poll() is None, f"distill exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {name} within {wait_s:g} s"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists(), "the kill must land before the run finished"
    return proc


def kill_distill_then_rerun(cfg, tmp_path: Path, *, wait_s: float) -> Path:
    """`leaf-ray distill` of `cfg` (variant leaf_instr) SIGKILLed after its step-2 checkpoint, then the same
    command run again to completion in this process; returns the run's output directory."""
    from typer.testing import CliRunner

    from leaf_ray.cli import app

    out = cfg.run.dir / "distill" / "leaf_instr"
    config_file = cfg.run.dir / "config.yaml"
    config_file.write_text(cfg.to_yaml())
    sigkill_distill_after_checkpoint(config_file, out, tmp_path / "driver.log", wait_s=wait_s)
    again = CliRunner().invoke(app, ["distill", "--config", str(config_file)])  # the same command
    assert again.exit_code == 0, again.output
    return out
