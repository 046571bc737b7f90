#!/usr/bin/env bash
# One device run on a lent GPU (one H100/H200, no network): the `gpu` pytest tier (tests/test_gpu.py, each
# stage's in-process path on CUDA against the CPU fp32 result) and `leaf-ray bench gpu`, in at most 8 minutes.
#
#   make gpu-wheels                      # here: the packages the device image lacks, into .gpu-wheels/ (<= 60 MiB)
#   bash scripts/gpu_check.sh [OUT_DIR]  # there: default OUT_DIR is $OUT (the device tool's) or runs/gpu-check
#
# Writes OUT_DIR/gpu_check.json (one summary: device, versions, tier counts, bench figures, exit codes) and
# OUT_DIR/gpu_check.log. Exit 0 when the tier has no failure and the bench ran (or was skipped: no CUDA).
# Without CUDA (CUDA_VISIBLE_DEVICES="") it is a dry run: every gpu test is skipped, the bench is skipped,
# exit 0 — tests/test_gpu_check.py runs it that way in `make test`, so it cannot rot.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-runs/gpu-check}}
WHEELS=${GPU_WHEELS:-.gpu-wheels}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && [ ! -d "$WHEELS" ] && PY=.venv/bin/python
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
started=$(date +%s)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 \
       RAY_USAGE_STATS_ENABLED=0 DS_BUILD_OPS=0

if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  # The image's torch/transformers stay; only what it lacks is added, ahead of it on the path.
  site=${GPU_SITE:-/tmp/leaf-ray-site}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$WHEELS"/*.whl || { echo "gpu_check: installing $WHEELS failed"; exit 2; }
  export PYTHONPATH="$site:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
echo "gpu_check: python $("$PY" -V 2>&1), CUDA available: $cuda"
[ "$cuda" = 1 ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

# 1. the gpu tier (its own process: DeepSpeed fixes one accelerator per process)
timeout -k 10 ${GPU_TIER_TIMEOUT_S:-390} "$PY" -m pytest -m gpu tests/test_gpu.py -q -rs -p no:cacheprovider \
  --junitxml "$OUT_DIR/gpu-tier.xml" -o junit_family=xunit2
tier_rc=$?

# 2. the bench (its GPU figures: saliency, KL, a distillation step)
bench_rc=0
if [ "$cuda" = 1 ]; then
  timeout -k 10 ${GPU_BENCH_TIMEOUT_S:-150} "$PY" -m leaf_ray.bench.gpu --out "$OUT_DIR/bench-gpu.json"
  bench_rc=$?
else
  echo "gpu_check: bench gpu skipped (no CUDA device)"
fi

"$PY" - "$OUT_DIR" "$tier_rc" "$bench_rc" "$cuda" "$started" <<'PY'
import json, platform, sys, time, xml.etree.ElementTree as ET
from pathlib import Path

out, tier_rc, bench_rc, cuda, started = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5])
summary = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": platform.python_version(), "cuda": cuda,
           "tier_exit": tier_rc, "bench_exit": bench_rc, "tests": {}, "counts": {}}
try:
    import torch, transformers
    summary.update(torch=torch.__version__, transformers=transformers.__version__,
                   device=torch.cuda.get_device_name(0) if cuda else "cpu (dry run)")
except Exception as e:  # the summary is written whatever failed
    summary["versions_error"] = repr(e)
junit = out / "gpu-tier.xml"
if junit.exists():
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                summary["tests"][case.get("name")] = {"outcome": outcome, "seconds": float(case.get("time", 0)),
                                                       "message": (node.get("message") or "")[:300]}
                break
        else:
            summary["tests"][case.get("name")] = {"outcome": outcome, "seconds": float(case.get("time", 0))}
        summary["counts"][outcome] = summary["counts"].get(outcome, 0) + 1
bench = out / "bench-gpu.json"
if bench.exists():
    summary["bench_gpu"] = json.loads(bench.read_text())
summary["wall_s"] = round(time.time() - started, 1)
ok = tier_rc in (0, 5) and bench_rc == 0 and not summary["counts"].get("failed") and not summary["counts"].get("error")
summary["ok"] = ok
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str))
print(json.dumps({k: summary[k] for k in ("device", "counts", "tier_exit", "bench_exit", "wall_s", "ok")
                  if k in summary}))
sys.exit(0 if ok else 1)
PY
