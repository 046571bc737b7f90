"""scripts/gpu_check.sh cannot rot: its CPU dry run (CUDA hidden) must end with every gpu test skipped, the
bench skipped, a summary JSON and exit 0. (`make gpu-wheels` checks its own 60 MiB limit when it builds.)"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_device_script_dry_runs_with_every_gpu_test_skipped(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "GPU_WHEELS": str(tmp_path / "no-wheels")}
    env.pop("LEAF_RAY_GPU_TEST_DEVICE", None)
    done = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert summary["ok"] and summary["cuda"] is False and summary["device"] == "cpu (dry run)"
    outcomes = {name: t["outcome"] for name, t in summary["tests"].items()}
    assert len(outcomes) >= 10 and set(outcomes.values()) == {"skipped"}, outcomes
    assert all("no CUDA device" in t["message"] for t in summary["tests"].values())
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "bench gpu skipped (no CUDA device)" in log
