"""The quiet console (`leaf_ray.console`): Ray's, Ray Data's, Ray Train's and other libraries' own output goes to
`<run dir>/logs/ray.log`, not the terminal; `--verbose` leaves it on the terminal; errors stay visible."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from leaf_ray import console as quiet

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def quiet_on(tmp_path):
    quiet.enable()
    yield tmp_path
    quiet.disable()


def test_library_logging_and_warnings_go_to_the_run_log(quiet_on, capsys):
    tmp_path = quiet_on
    logging.getLogger("ray.train").warning("PlacementGroupCleaner: early message, before the file is known")
    path = quiet.attach(tmp_path / "run")
    assert path == tmp_path / "run" / "logs" / "ray.log"
    logging.getLogger("ray.data").info("Starting execution of Dataset")
    warnings.warn("a library's UserWarning", UserWarning, stacklevel=1)
    # a library imported later adds its own terminal handler (deepspeed's logger does): routed too
    late = logging.getLogger("DeepSpeed")
    late.addHandler(logging.StreamHandler(sys.stdout))
    late.warning("Setting accelerator to CPU")
    logging.getLogger("leaf_ray.something").warning("not a routed logger")  # ours: left alone
    out = capsys.readouterr()
    log = path.read_text()
    for line in ("PlacementGroupCleaner: early message", "Starting execution of Dataset", "a library's UserWarning",
                 "Setting accelerator to CPU"):
        assert line in log, line
        assert line not in out.out + out.err, line
    assert "not a routed logger" not in log


def test_disable_restores_the_terminal(tmp_path, capsys):
    quiet.enable()
    quiet.disable()
    logger = logging.getLogger("DeepSpeed")
    handler = logging.StreamHandler(sys.stderr)
    logger.addHandler(handler)
    try:
        assert handler in logger.handlers and not quiet.enabled()
    finally:
        logger.removeHandler(handler)


def test_failure_prints_the_error_and_the_log_path(quiet_on):
    path = quiet.attach(quiet_on / "run")
    console = Console(record=True, width=200)
    try:
        raise RuntimeError("the detect stage broke")
    except RuntimeError as e:
        quiet.print_failure(console, e, "the demo")
    text = console.export_text()
    assert "RuntimeError: the detect stage broke" in text and str(path) in text
    assert "Traceback" in path.read_text()


def test_cli_is_quiet_by_default_and_verbose_on_request():
    from leaf_ray.cli import app

    try:
        assert CliRunner().invoke(app, ["config", "show"]).exit_code == 0
        assert quiet.enabled()
    finally:
        quiet.disable()
    assert CliRunner().invoke(app, ["--verbose", "config", "show"]).exit_code == 0
    assert not quiet.enabled()


SCRIPT = """
import logging, sys
from leaf_ray import console as quiet
from leaf_ray.config import config_from_dict
from leaf_ray.raycluster import init_ray

if sys.argv[2] == "quiet":
    quiet.enable()
cfg = config_from_dict({"run": {"name": "r", "root_dir": sys.argv[1]}, "ray": {"num_cpus": 1}}, "test")
ray = init_ray(cfg)

@ray.remote
def work():
    print("WORKER-PRINT hello from a Ray worker")
    logging.getLogger("ray.train").warning("WORKER-WARNING PlacementGroupCleaner: placement group gone")
    return 1

assert ray.get(work.remote()) == 1
import ray.data
assert ray.data.range(8).map(lambda r: r).count() == 8
logging.getLogger("ray").warning("DRIVER-WARNING from the ray logger")
print("OUR-OUTPUT done")
ray.shutdown()
"""


@pytest.mark.timeout(240)
def test_ray_output_goes_to_the_run_log_not_the_terminal(tmp_path):
    """A real local Ray instance: a worker's print and warning, Ray Data's execution output and the driver's
    Ray logger all land in `<run dir>/logs/ray.log`; the terminal shows only our own line."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "runs"), "quiet"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=220, check=False)
    terminal = done.stdout + done.stderr
    assert done.returncode == 0, terminal[-4000:]
    assert "OUR-OUTPUT done" in done.stdout
    log = (tmp_path / "runs" / "r" / "logs" / "ray.log").read_text()
    for marker in ("WORKER-PRINT", "WORKER-WARNING", "DRIVER-WARNING"):
        assert marker not in terminal, (marker, terminal[-3000:])
        assert marker in log, (marker, log[-3000:])
    assert "Running Dataset" not in terminal and "Starting execution" not in terminal, terminal[-3000:]


def test_file_progress_follows_the_json_file_another_process_rewrites(tmp_path):
    """The distillation driver's progress line: rank 0 rewrites progress.json; the line shows its last state."""
    import io
    import json
    import time

    from leaf_ray.store import write_json_atomic

    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=False)
    path = tmp_path / "progress.json"
    with quiet.FileProgress(path, "distill [kd]", console, interval_s=0.05):
        for step in range(1, 5):
            write_json_atomic(path, {"step": step, "total_steps": 4, "loss": 1.0 / step, "val_loss": None})
            time.sleep(0.15)
        write_json_atomic(path, {"step": 4, "total_steps": 4, "loss": 0.25, "val_loss": 0.5})
        time.sleep(0.15)
    text = out.getvalue()
    assert "distill [kd]" in text and "4/4" in text and "loss 0.2500" in text and "best val 0.5000" in text
    assert json.loads(path.read_text())["step"] == 4
    with quiet.FileProgress(tmp_path / "never-written.json", "distill [x]", None):
        pass  # no console: no thread, no line


def test_file_progress_without_a_file_prints_no_bar(tmp_path):
    import io

    out = io.StringIO()
    with quiet.FileProgress(tmp_path / "missing.json", "distill [kd]", Console(file=out, width=100), interval_s=0.02):
        pass
    assert "steps" not in out.getvalue()
