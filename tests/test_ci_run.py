"""`.ci/run` bounds the whole suite: past its limit it prints the stacks of the suite's live Python processes
and stops them (exercised on a stand-in `make test` that hangs, via a fake `make` first on PATH)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_run_stops_a_hung_suite_with_every_stack_printed(tmp_path):
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy2(ROOT / ".ci" / "run", repo / ".ci" / "run")
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "py-spy").symlink_to(ROOT / ".venv" / "bin" / "py-spy")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    # `make test` stand-in: a Python child stuck in a function we can recognise in the dump
    (fake_bin / "make").write_text(f"#!/bin/sh\nexec {ROOT / '.venv/bin/python'} -c "
                                   "'import time\ndef stuck_in_the_suite():\n    time.sleep(600)\nstuck_in_the_suite()'\n")
    (fake_bin / "make").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "CI_TEST_LIMIT_S": "5"}
    done = subprocess.run(["bash", ".ci/run"], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "the suite ran past 5 s" in out, out
    assert "stuck_in_the_suite" in out, out  # py-spy's dump of the live process
