"""`leaf-ray bench gpu --smoke`: the GPU benchmark's own code on tiny shapes on CPU, so it cannot rot.

The smoke run is a subprocess with the packages the GPU image lacks (ray, deepspeed, vllm, mlflow, pydantic)
hidden, so it also proves that `python -m leaf_ray.bench.gpu` imports none of them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from leaf_ray.bench.flops import Shape, forward_parts, saliency_flops, training_flops

HIDDEN = ("ray", "deepspeed", "vllm", "mlflow", "pydantic", "typer")
RUNNER = (
    "import sys\n"
    f"for name in {HIDDEN!r}:\n"
    "    sys.modules[name] = None  # `import name` now raises ImportError\n"
    "import runpy\n"
    "sys.argv = ['leaf_ray.bench.gpu', *sys.argv[1:]]\n"
    "runpy.run_module('leaf_ray.bench.gpu', run_name='__main__')\n"
    "leaked = sorted(m for m in sys.modules if m.split('.')[0] in {'leaf_ray'} and m.startswith(\n"
    "    ('leaf_ray.config', 'leaf_ray.detect.pipeline', 'leaf_ray.distill.trainer', 'leaf_ray.tracking')))\n"
    "assert not leaked, leaked\n"
)


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-gpu") / "result.json"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", RUNNER, "--smoke", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text(encoding="utf-8")), proc.stdout


def test_smoke_runs_without_ray_deepspeed_pydantic_and_prints_tables(smoke):
    result, stdout = smoke
    assert result["meta"]["mode"] == "smoke" and result["meta"]["device"] == "cpu"
    assert set(result) >= {"meta", "peak", "saliency", "kl", "distill", "goals"}
    for title in ("saliency: batched frozen vs reference loop", "hybrid KL + backward", "distillation step",
                  "goals"):
        assert title in stdout
    assert _positive(result["peak"]["flops_per_s"])


def test_saliency_section(smoke):
    result, _ = smoke
    sal = result["saliency"]
    peak = result["peak"]["flops_per_s"]
    assert sal["samples"] > 0 and 0 < sal["real_token_fraction"] <= 1
    for role in ("student", "teacher"):
        rec = sal["models"][role]
        for method in ("batched", "reference"):
            m = rec[method]
            for key in ("seconds", "samples_per_s", "flops", "flops_per_s", "mfu", "peak_mem_bytes"):
                assert _positive(m[key]), (role, method, key, m[key])
            assert m["samples_per_s"] == pytest.approx(sal["samples"] / m["seconds"])
            assert m["flops_per_s"] == pytest.approx(m["flops"] / m["seconds"])
            assert m["mfu"] == pytest.approx(m["flops"] / m["seconds"] / peak)
        # Both methods are charged the same required FLOPs, counted from the shapes.
        assert rec["batched"]["flops"] == rec["reference"]["flops"]
        assert rec["speedup"] == pytest.approx(rec["reference"]["seconds"] / rec["batched"]["seconds"])
        assert rec["max_rel_diff"] < 1e-4  # fp32: the batched pass scores what the reference loop scores
    both = sal["both"]
    assert both["speedup"] == pytest.approx(both["reference"]["seconds"] / both["batched"]["seconds"])
    assert _positive(both["batched"]["mfu"]) and _positive(both["reference"]["mfu"])


def test_kl_section(smoke):
    kl = smoke[0]["kl"]
    naive = kl["methods"]["naive"]
    assert _positive(naive["seconds"]) and _positive(naive["peak_mem_bytes"])
    for name in ("chunked", "chunked_lm_head"):
        m = kl["methods"][name]
        assert _positive(m["seconds"]) and _positive(m["peak_mem_bytes"]) and _positive(m["ms"])
        assert m["time_ratio"] == pytest.approx(m["seconds"] / naive["seconds"])
        assert m["memory_ratio"] == pytest.approx(m["peak_mem_bytes"] / naive["peak_mem_bytes"])
        assert m["loss_rel_diff"] < 1e-4  # the same loss
    # Memory is real even at smoke shapes: chunks never hold the whole fp32 [T, V].
    assert kl["methods"]["chunked_lm_head"]["memory_ratio"] < kl["methods"]["chunked"]["memory_ratio"] < 1


def test_distill_section_and_goals(smoke):
    result, _ = smoke
    d = result["distill"]
    step = d["step"]
    for key in ("seconds", "tokens_per_s", "target_tokens_per_s", "flops", "flops_per_s", "mfu",
                "peak_mem_bytes"):
        assert _positive(step[key]), key
    assert step["tokens_per_s"] == pytest.approx(d["tokens_per_step"] / step["seconds"])
    assert step["mfu"] == pytest.approx(step["flops"] / step["seconds"] / result["peak"]["flops_per_s"])
    assert d["losses_finite"]
    goals = {g["goal"]: g for g in result["goals"]}
    assert len(goals) == 5 and all(_positive(g["value"]) for g in goals.values())
    assert goals["saliency ≥ 10× the reference loop"]["value"] == result["saliency"]["both"]["speedup"]
    assert goals["distillation step ≥ 40% MFU"]["value"] == step["mfu"]


def test_flop_counts_from_shapes():
    llama_1b = Shape(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256)
    # 1.236B parameters = blocks + the (tied) embedding; blocks alone 0.973B (norms excluded)
    assert llama_1b.block_params == 16 * (2048 * (2048 + 2 * 512) + 2048 * 2048 + 3 * 2048 * 8192)
    assert abs(llama_1b.block_params + 128256 * 2048 - 1.2354e9) < 1e7
    parts = forward_parts(llama_1b, [100, 300], head_rows=50)
    assert parts.lin == 2 * llama_1b.block_params * 400
    assert parts.attn == 2 * 16 * 2048 * (100**2 + 300**2)
    assert parts.head == 2 * 128256 * 2048 * 50
    assert saliency_flops(llama_1b, [100, 300], 50) == 2 * parts.lin + 3 * parts.attn + 2 * parts.head
    assert training_flops(llama_1b, [100, 300], 50) == 3 * (parts.lin + parts.attn + parts.head)


def test_flop_count_matches_torch_flop_counter():
    """The linear and LM-head counts equal what torch's FlopCounterMode sees in a real forward + backward
    (attention excluded: torch counts SDPA as non-causal)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from leaf_ray.bench.gpu import TINY_TEACHER
    from leaf_ray.bench.gpu_inputs import build_model

    torch.set_num_threads(1)
    model = build_model(TINY_TEACHER, torch.device("cpu"), torch.float32, seed=0)
    shape = Shape.from_config(model.config)
    ids = torch.randint(0, shape.vocab, (2, 16))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, use_cache=False).logits.sum().backward()
    counts = counter.get_flop_counts()["Global"]
    matmul = sum(v for k, v in counts.items() if "attention" not in str(k))
    parts = forward_parts(shape, [16, 16], head_rows=32)
    assert matmul == 3 * (parts.lin + parts.head)  # forward + input and weight gradients
