"""Every config in configs/ loads and validates; the paper configs carry the paper's settings (docs/design.md §1).

How their Ray requests map onto the KubeRay worker groups is checked in test_kuberay.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from leaf_ray.config import ConfigError, LeafConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL = sorted(CONFIGS.glob("*.yaml"))
PAPER = sorted(CONFIGS.glob("paper-*.yaml"))

# config stem -> (student, teacher) directory names under /mnt/models, and the task kind.
PAPER_SETTINGS = {
    "paper-llama3.2-1b-math": ("Llama-3.2-1B-Instruct", "Llama-3.3-70B-Instruct", "math"),
    "paper-llama3.2-3b-math": ("Llama-3.2-3B-Instruct", "Llama-3.3-70B-Instruct", "math"),
    "paper-qwen2.5-math-1.5b": ("Qwen2.5-Math-1.5B", "Qwen2.5-72B-Instruct", "math"),
    "paper-llama3.2-1b-code": ("Llama-3.2-1B-Instruct", "Llama-3.3-70B-Instruct", "code"),
    "paper-llama3.2-3b-code": ("Llama-3.2-3B-Instruct", "Llama-3.3-70B-Instruct", "code"),
    "paper-qwen2.5-math-1.5b-code": ("Qwen2.5-Math-1.5B", "Qwen2.5-72B-Instruct", "code"),
}
# Reference threshold: tau = min(quantile_q(delta), cap), q = 0.10 math / 0.05 code, cap = 0.5.
QUANTILE = {"math": 0.10, "code": 0.05}


def test_configs_present():
    assert (CONFIGS / "demo.yaml") in ALL
    assert {p.stem for p in PAPER} == set(PAPER_SETTINGS), "a paper config is missing or unlisted here"


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_config_loads_and_round_trips(path):
    cfg = load_config(path)
    assert isinstance(cfg, LeafConfig)
    # The dump is itself a valid config that resolves to the same tree (what `config show` prints).
    from leaf_ray.config import config_from_dict

    assert config_from_dict(cfg.dump(), "round trip").dump() == cfg.dump()


def test_demo_is_the_focus_task_and_smoke_the_random_chain():
    """`make demo` shows the method (the focus task, one seed, KD w/o mask and LeaF); the small random-model
    chain the tests and `ray job submit` run is configs/smoke.yaml."""
    demo = load_config(CONFIGS / "demo.yaml")
    assert demo.bench.focus.seeds == 1 and {"kd", "leaf_instr"} <= set(demo.bench.focus.variants)
    assert demo.run.name != "demo", "the former random demo left runs/demo/: the focus demo has its own dir"
    smoke = load_config(CONFIGS / "smoke.yaml")
    assert smoke.run.name == "smoke" and smoke.models.teacher.path.endswith("tiny-models/teacher")
    assert smoke.ray.address is None and smoke.distill.resources.use_gpu is False


def test_demo_runs_on_a_local_ray_instance():
    cfg = load_config(CONFIGS / "demo.yaml")
    assert cfg.ray.address is None, "the demo must start a local Ray instance, not join a cluster"
    assert cfg.distill.resources.use_gpu is False
    for pool in (cfg.detection.student_pool, cfg.detection.teacher_pool, cfg.generation.pool):
        assert pool.num_gpus == 0


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_hyper_parameters(path):
    cfg = load_config(path)
    student, teacher, kind = PAPER_SETTINGS[path.stem]
    assert cfg.run.name == path.stem

    # Stage 2 reference hyper-parameters: AdamW (wd 0), lr 1e-5, cosine, 5 warm-up steps, global batch 32,
    # 3 epochs, max length 4096, bf16.
    d = cfg.distill
    assert (d.weight_decay, d.lr, d.scheduler, d.warmup_steps) == (0.0, 1e-5, "cosine", 5)
    assert (d.global_batch_size, d.epochs, d.temperature) == (32, 3, 1.0)
    assert cfg.data.max_length == 4096
    assert d.deepspeed.precision == "bf16" and d.deepspeed.zero_stage == 3
    assert cfg.models.student.dtype == cfg.models.teacher.dtype == "bfloat16"
    from leaf_ray.distill.trainer import accumulation_steps

    accumulation_steps(d.global_batch_size, d.micro_batch_size, d.resources.num_workers)  # raises if uneven

    # Stage 1 threshold.
    th = cfg.detection.threshold
    assert (th.rule, th.quantile, th.cap) == ("quantile", QUANTILE[kind], 0.5)
    assert cfg.detection.pruning == "per_span"

    # Models are local mount paths, never hub ids, and never replaced by the tiny demo pair.
    assert cfg.models.student.path == f"/mnt/models/{student}"
    assert cfg.models.teacher.path == f"/mnt/models/{teacher}"
    assert cfg.models.make_tiny_if_missing is False

    # A cluster job: joins the cluster it was submitted to and logs to the MLflow service.
    assert cfg.ray.address == "auto" and cfg.ray.num_cpus is None
    assert cfg.tracking.tracking_uri and cfg.tracking.tracking_uri.startswith("http://")
    assert Path(cfg.run.root_dir).is_absolute()

    # GPU pools: student saliency on 1 GPU, the teacher sharded over 8 with a per-GPU memory cap,
    # training workers on GPUs.
    assert cfg.detection.student_pool.num_gpus == 1
    assert cfg.detection.teacher_pool.num_gpus == 8 and cfg.detection.teacher_pool.max_memory_per_gpu
    assert d.resources.use_gpu and d.resources.gpus_per_worker >= 1

    # The paper's comparison: KD w/o mask vs LeaF (instruction, and instruction + response masks).
    assert cfg.pipeline.variants == ["kd", "leaf_instr", "leaf_instr_resp"]
    assert cfg.detection.response.enabled and cfg.detection.response.num_segments in (2, 3)
    assert {b.kind for b in cfg.evaluation.benchmarks} == {kind}


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_config_rejects_a_bad_override(path):
    with pytest.raises(ConfigError, match="distill.lr"):
        load_config(path, ["distill.lr=-1"])
