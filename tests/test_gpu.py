"""The `gpu` tier: each stage's in-process path on one CUDA device, compared with the CPU float32 result of the
same run (docs/cuda-audit.md says what each test covers; scripts/gpu_check.sh runs this file on a lent GPU).

Skipped, with the reason, where CUDA is absent. ``LEAF_RAY_GPU_TEST_DEVICE=cpu`` runs the same tests with the
"device" run on the CPU (a dry run of the tier's own code; tolerances still hold, trivially tighter).

The CPU references run where no GPU can leak into them: detection in this process with CPU pools (a CPU actor
computes on the CPU, leaf_ray.distributed), distillation and evaluation in a subprocess with
``CUDA_VISIBLE_DEVICES=""`` (DeepSpeed fixes one accelerator per process).

Tolerances, and why:
- **float32 on the GPU vs float32 on the CPU** (TF32 off): the same arithmetic in another order; saliency norms
  agree to 1e-4 relative, a few distillation steps to 1e-3 (AdamW's first steps divide by √v̂ + ε, which
  amplifies reordering noise of tiny gradients), greedy completions token for token on ≥ 90% of prompts (a
  small model has near-ties that a 1e-6 difference flips).
- **bfloat16 on the GPU vs float32 on the CPU**: bf16 keeps 8 significant bits (unit round-off 2⁻⁸ ≈ 0.4%);
  through two layers, attention softmax and the backward pass the errors add up to a few per cent per norm.
  We require per-token saliency norms within 5% (median relative error) and a Pearson correlation ≥ 0.98 over
  all scored tokens, Δ scores correlated ≥ 0.95 after the two min-max normalisations, and a bf16 distillation's
  final validation loss within 3% of fp32's: looser than that would hide a wrong upcast or a lost mask, tighter
  would fail on rounding alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DEVICE = os.environ.get("LEAF_RAY_GPU_TEST_DEVICE", "cuda")
ON_CUDA = DEVICE == "cuda"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(900),  # a CPU reference runs inside some tests (a subprocess, fp32)
    pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(),
                       reason="no CUDA device here (the gpu tier runs on a lent GPU: scripts/gpu_check.sh)"),
]


@pytest.fixture(autouse=True)
def _fp32_is_fp32():
    """TF32 matmuls would make 'float32 on the GPU' a 10-bit-mantissa computation."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture(scope="module")
def pair() -> dict[str, str]:
    """The shipped focus-demo teacher and student (Qwen2, 0.93M / 0.46M, one tokenizer, trained on the task):
    real weights, and no tokenizer training here (the tiny pair's corpus comes from reasoning-gym, which the
    device image cannot install)."""
    from leaf_ray.experiments.focus.prepare import SHIPPED_DIR

    assert (SHIPPED_DIR / "teacher" / "config.json").exists(), f"the shipped demo models are missing: {SHIPPED_DIR}"
    return {"teacher": str(SHIPPED_DIR / "teacher"), "student": str(SHIPPED_DIR / "student")}


@pytest.fixture(scope="module")
def tokenizer(pair):
    from leaf_ray.config import ModelRef
    from leaf_ray.models import load_tokenizer

    return load_tokenizer(ModelRef(path=pair["student"]))


def config(tmp_path: Path, pair, name: str, **sections):
    """A config rooted in ``tmp_path`` on the shipped pair, tracking off (the device image has no MLflow)."""
    from leaf_ray.config import config_from_dict

    tree = {"run": {"name": name, "root_dir": str(tmp_path / "runs"), "seed": 3},
            "models": {"teacher": {"path": pair["teacher"]}, "student": {"path": pair["student"]},
                       "make_tiny_if_missing": False},
            "ray": {"num_cpus": 2}, "tracking": {"enabled": False}}
    for key, value in sections.items():
        tree.setdefault(key, {}).update(value)
    return config_from_dict(tree, "gpu-tier")


def word_problems(n: int, seed: int) -> list[dict]:
    """Records like the demo corpus's (id, instruction, output, answer) with a distractor sentence, made here:
    the device image lacks reasoning-gym's compiled dependencies (pycosat) for Python 3.12."""
    import random

    rng, names, items = random.Random(seed), ["Leo", "Mia", "Ann", "Raj", "Zoë"], ["apples", "pens", "cards"]
    out = []
    for i in range(n):
        who, what, other = rng.choice(names), rng.choice(items), rng.choice(items)
        a, b, c = rng.randint(5, 40), rng.randint(1, 4), rng.randint(2, 9)
        out.append({"id": f"gpu-tier-{seed}-{i}", "answer": str(a - b),
                    "instruction": f"{who} has {a} {what}. There are {c} {other} on the table. {who} gives away "
                                   f"{b} {what}. How many {what} does {who} have now?",
                    "output": f"{who} starts with {a} {what}.\n\n{a} - {b} = {a - b}.\n\n"
                              f"The answer is \\boxed{{{a - b}}}."})
    return out


def cpu_subprocess(code: str, cwd: Path) -> None:
    """Run ``code`` in a fresh Python with CUDA hidden (DS_ACCELERATOR=cpu): the CPU float32 reference."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu", "LEAF_RAY_GPU_TEST_DEVICE": "cpu"}
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


# --------------------------------------------------------------------------- saliency (detection's core)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_saliency_on_the_device_matches_cpu_fp32(pair, tokenizer, padding_side):
    """‖∂L/∂e_i‖₂ of a padded batch through SDPA on the device: fp32 to 1e-4, bf16 within the bf16 tolerance,
    with left and right padding (no NaN from fully masked rows reaches a real token's gradient)."""
    from leaf_ray.config import ModelRef
    from leaf_ray.data.chat import render
    from leaf_ray.detect.saliency import token_saliency
    from leaf_ray.models import load_model

    texts = [("Leo has 10 apples. There are 7 pens. He eats 3. How many apples?", "Leo has 10 - 3 = 7."),
             ("What is 2 + 3?", "\\boxed{5}"),
             ("Mia reads 4 pages a day for 6 days. How many pages?", "4 * 6 = 24 pages, \\boxed{24}.")]
    rendered = [render(tokenizer, q, a) for q, a in texts]
    length = max(len(r.input_ids) for r in rendered)
    ids = torch.zeros(len(rendered), length, dtype=torch.long)
    mask, target = torch.zeros_like(ids), torch.zeros_like(ids)
    for b, r in enumerate(rendered):
        n = len(r.input_ids)
        cols = slice(0, n) if padding_side == "right" else slice(length - n, length)
        ids[b, cols], mask[b, cols], target[b, cols] = (torch.tensor(r.input_ids), 1, torch.tensor(r.target_mask))
    reference = token_saliency(load_model(ModelRef(path=pair["teacher"]), dtype="float32", device="cpu"),
                               ids, mask, target)
    real = mask.bool()
    for dtype in ("float32", "bfloat16"):
        model = load_model(ModelRef(path=pair["teacher"], force_dtype=True), dtype=dtype,
                           device=torch.device(DEVICE).type).to(DEVICE)
        got = token_saliency(model, ids, mask, target)
        assert got.grad_norm.device.type == torch.device(DEVICE).type
        assert got.grad_norm.dtype == torch.float32 and got.loss.dtype == torch.float32  # norms and loss in fp32
        norms, want = got.grad_norm.cpu()[real], reference.grad_norm[real]
        assert torch.isfinite(norms).all()
        if dtype == "float32":
            torch.testing.assert_close(norms, want, rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(got.loss.cpu(), reference.loss, rtol=1e-4, atol=1e-6)
        else:
            relative = ((norms - want).abs() / want.abs().clamp(min=1e-12)).median()
            assert relative < 0.05 and pearson(norms, want) > 0.98, (float(relative), pearson(norms, want))
            torch.testing.assert_close(got.loss.cpu(), reference.loss, rtol=3e-2, atol=1e-3)


# --------------------------------------------------------------------------- ingest -> detection


def test_ingest_and_detection_on_the_device_match_cpu_fp32(pair, tmp_path):
    """The inline chain (ingest, both saliency scorers on the GPU in bf16, score + prune) against the same chain
    on CPU pools in float32: every unit scored on both, Δ in agreement within the bf16 tolerance."""
    import pyarrow.parquet as pq

    from leaf_ray.data.ingest import run_ingest
    from leaf_ray.detect.pipeline import run_detection
    from leaf_ray.store import DetectPaths

    source = tmp_path / "train.jsonl"
    source.write_text("".join(json.dumps({"id": p["id"], "instruction": p["instruction"], "output": p["output"]})
                              + "\n" for p in word_problems(12, seed=5)))
    on_device = 1.0 if ON_CUDA else 0.0
    runs = {}
    for name, gpus, dtype in (("cpu-fp32", 0.0, "float32"), ("device-bf16", on_device, "bfloat16")):
        pools = {"num_gpus": gpus, "num_cpus": 0.5, "batch_size": 4}
        cfg = config(tmp_path, pair, name, data={"paths": [str(source)]},
                     detection={"inline_max_samples": 64, "dtype": dtype, "student_pool": pools,
                                "teacher_pool": pools})
        run_ingest(cfg)
        run_detection(cfg)
        scores = pq.read_table(sorted(str(p) for p in DetectPaths.of(cfg).scores.glob("*.parquet"))).to_pylist()
        runs[name] = {(r["sample_id"], r["scope"]): r for r in scores}
    assert runs["device-bf16"].keys() == runs["cpu-fp32"].keys() and runs["cpu-fp32"]
    for column, floor in (("student_grad_norm", 0.98), ("teacher_grad_norm", 0.98), ("delta", 0.95)):
        got = torch.tensor([v for k in sorted(runs["cpu-fp32"]) for v in runs["device-bf16"][k][column]])
        want = torch.tensor([v for k in sorted(runs["cpu-fp32"]) for v in runs["cpu-fp32"][k][column]])
        assert got.shape == want.shape and torch.isfinite(got).all()
        assert pearson(got, want) >= floor, (column, pearson(got, want))


# --------------------------------------------------------------------------- distillation


def distill_config(root: Path, pair, name: str, **distill):
    from leaf_ray.config import config_from_dict
    from leaf_ray.data.demo_corpus import write_synthetic_inputs

    tree = {"run": {"name": name, "root_dir": str(root), "seed": 3},
            "models": {"teacher": {"path": pair["teacher"]}, "student": {"path": pair["student"]},
                       "make_tiny_if_missing": False},
            "data": {"max_length": 192},
            "tracking": {"enabled": False},  # the device image has no MLflow; summary + weights are compared
            "distill": {"epochs": 1, "max_steps": 4, "global_batch_size": 4, "micro_batch_size": 2, "lr": 2e-3,
                        "warmup_steps": 1, "checkpoint_every_steps": 2, "eval_every_steps": 2, "chunk_size": 64,
                        "inline_max_rows": 64,
                        "resources": {"num_workers": 1, "cpus_per_worker": 0.5, "use_gpu": ON_CUDA,
                                      "gpus_per_worker": 1.0 if ON_CUDA else 0.0}, **distill}}
    cfg = config_from_dict(tree, "gpu-tier")
    write_synthetic_inputs(cfg.run.dir, n=10, validation=2, response_level=False, problems=word_problems(10, 3))
    (root / f"{name}.yaml").write_text(cfg.to_yaml())
    return cfg


def exported(out_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return (json.loads((out_dir / "summary.json").read_text()), load_file(str(out_dir / "model" /
                                                                                "model.safetensors")))


@pytest.fixture(scope="module")
def cpu_distillation(pair, tmp_path_factory):
    """The ZeRO-0, replicated-teacher, chunked-head run on the CPU in float32, in its own process."""
    root = tmp_path_factory.mktemp("gpu-tier-cpu")
    cfg = distill_config(root, pair, "cpu-reference")
    cfg.distill.resources.use_gpu, cfg.distill.resources.gpus_per_worker = False, 0.0
    (root / "cpu-reference.yaml").write_text(cfg.to_yaml())
    cpu_subprocess("from leaf_ray.config import load_config\nfrom leaf_ray.distill.driver import run_distillation\n"
                   f"run_distillation(load_config({str(root / 'cpu-reference.yaml')!r}), variant='leaf_instr')\n",
                   root)
    from leaf_ray.store import RunDir

    return exported(RunDir.of(cfg).distill("leaf_instr"))


# The exact curve does not depend on these choices (tests/test_trainer.py shows it on CPU), so every one of
# them must reproduce the CPU run on the device.
DISTILL_CASES = {
    "zero0-replicated-chunked": {},
    "zero0-replicated-full-logits": {"chunked_lm_head": False},
    "zero3-student": {"deepspeed": {"zero_stage": 3}},
    "zero0-teacher-zero3": {"teacher_mode": "zero3"},
}


@pytest.mark.parametrize("case", sorted(DISTILL_CASES))
def test_distillation_on_the_device_matches_cpu_fp32(cpu_distillation, pair, tmp_path, case):
    """The DeepSpeed engine on an nccl group of one (the inline path with use_gpu), fp32: the CPU run's
    validation losses and student."""
    from leaf_ray.distill.driver import run_distillation

    cfg = distill_config(tmp_path, pair, case, **DISTILL_CASES[case])
    result = run_distillation(cfg, variant="leaf_instr")
    summary, weights = exported(result.export_dir.parent)
    want_summary, want_weights = cpu_distillation
    assert summary["steps"] == want_summary["steps"] == 4
    assert summary["best_val_loss"] == pytest.approx(want_summary["best_val_loss"], rel=1e-3)
    assert weights.keys() == want_weights.keys()
    for name, want in want_weights.items():
        torch.testing.assert_close(weights[name].float(), want.float(), rtol=1e-3, atol=1e-4, msg=name)


def test_bf16_distillation_on_the_device_stays_within_the_bf16_tolerance(cpu_distillation, pair, tmp_path):
    """DeepSpeed bf16 (fp32 master weights in the optimizer, the KL in fp32): finite, and its validation loss
    within 3% of the fp32 CPU run's."""
    from leaf_ray.distill.driver import run_distillation

    if not ON_CUDA:
        pytest.skip("bf16 DeepSpeed is the GPU's (a CPU without native bf16 computes in fp32: leaf_ray/models.py)")
    cfg = distill_config(tmp_path, pair, "bf16", deepspeed={"zero_stage": 1, "precision": "bf16"})
    result = run_distillation(cfg, variant="leaf_instr")
    summary, weights = exported(result.export_dir.parent)
    assert all(torch.isfinite(w.float()).all() for w in weights.values())
    assert summary["best_val_loss"] == pytest.approx(cpu_distillation[0]["best_val_loss"], rel=3e-2)


# --------------------------------------------------------------------------- the sharded teacher gang


def test_sharded_gang_at_world_size_one_matches_the_unsharded_teacher(pair, tokenizer):
    """FSDP2 sharding of the frozen teacher on an nccl (gloo in the dry run) group of one, with the gang's
    saliency: the unsharded model's norms to 1e-4."""
    import torch.distributed as dist

    from leaf_ray.config import ModelRef
    from leaf_ray.data.chat import render
    from leaf_ray.detect.saliency import token_saliency
    from leaf_ray.detect.sharded_teacher import gang_token_saliency, shard_frozen_teacher
    from leaf_ray.distill.inline import local_process_group
    from leaf_ray.models import load_model

    device = local_process_group(DEVICE)
    assert str(dist.get_backend()) == ("nccl" if ON_CUDA else "gloo")
    r = render(tokenizer, "Ann has 5 pens. The sky is blue. She buys 2. How many pens?", "5 + 2 = 7.")
    ids, target = torch.tensor([r.input_ids]), torch.tensor([r.target_mask])
    ref = ModelRef(path=pair["teacher"])
    want = token_saliency(load_model(ref, dtype="float32", device=device.type).to(device), ids,
                          torch.ones_like(ids), target)
    from torch.distributed.device_mesh import init_device_mesh

    sharded = shard_frozen_teacher(load_model(ref, dtype="float32", device=device.type),
                                   init_device_mesh(device.type, (1,)))
    got = gang_token_saliency(sharded, ids, torch.ones_like(ids), target)
    torch.testing.assert_close(got.grad_norm.cpu(), want.grad_norm.cpu(), rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------- generation and evaluation


def test_generation_and_evaluation_on_the_device_match_cpu(pair, tmp_path):
    """Greedy generation through the transformers backend (the GPU when visible) and evaluation: the CPU's
    completions on >= 90% of prompts, and the same accuracy within one problem."""
    import pyarrow.parquet as pq

    from leaf_ray.config import ModelRef
    from leaf_ray.evaluate.runner import run_evaluation
    from leaf_ray.store import RunDir

    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} + {i + 1}?",
                                         "answer": f"{i} + {i + 1} = {2 * i + 1}\n#### {2 * i + 1}"}) + "\n"
                             for i in range(8)))
    sections = {"evaluation": {"benchmarks": [{"name": "sums", "format": "gsm8k", "path": str(bench)}]},
                "generation": {"backend": "transformers", "max_new_tokens": 16, "inline_max_prompts": 64},
                "tracking": {"enabled": False}}
    device_cfg = config(tmp_path, pair, "gen-device", **sections)
    cpu_cfg = config(tmp_path, pair, "gen-cpu", **sections)
    (tmp_path / "gen-cpu.yaml").write_text(cpu_cfg.to_yaml())
    got = run_evaluation(device_cfg, ModelRef(path=pair["student"]), label="student")
    cpu_subprocess("from leaf_ray.config import load_config, ModelRef\n"
                   "from leaf_ray.evaluate.runner import run_evaluation\n"
                   f"run_evaluation(load_config({str(tmp_path / 'gen-cpu.yaml')!r}), "
                   f"ModelRef(path={pair['student']!r}), label='student')\n", tmp_path)
    read = lambda cfg: pq.read_table(str(RunDir.of(cfg).eval("student") / "sums.parquet")).to_pylist()  # noqa: E731
    device_rows, cpu_rows = read(device_cfg), read(cpu_cfg)
    completion = next(k for k in device_rows[0] if "completion" in k or "response" in k)
    same = sum(a[completion] == b[completion] for a, b in zip(device_rows, cpu_rows))
    assert same >= 0.9 * len(cpu_rows), (same, len(cpu_rows))
    assert abs(got.benchmarks[0].correct - sum(bool(r.get("correct")) for r in cpu_rows)) <= 1


@pytest.mark.skipif(not ON_CUDA, reason="vLLM runs on the GPU here (the CPU build is tests/test_vllm.py's)")
def test_vllm_on_the_device_generates_what_transformers_does(pair):
    """Where vLLM is importable: greedy fp32 completions equal to the transformers backend's."""
    pytest.importorskip("vllm", reason="vLLM is not installed on this device image")
    from leaf_ray.config import GenerationConfig, ModelRef
    from leaf_ray.generate.backends import make_backend

    prompts = [f"What is {i} + 2?" for i in range(4)]
    outs = {}
    for backend in ("transformers", "vllm"):
        gen = GenerationConfig(backend=backend, max_new_tokens=12,
                               vllm_engine_kwargs={"dtype": "float32", "enforce_eager": True,
                                                   "gpu_memory_utilization": 0.3})
        engine = make_backend(ModelRef(path=pair["student"]), gen)
        try:
            outs[backend] = engine.generate(prompts)
        finally:
            engine.close()
    assert outs["vllm"] == outs["transformers"]
