"""`leaf-ray plan` (leaf_ray/plan.py): every paper config fits the KubeRay worker groups (read from
kuberay/raycluster.yaml, not hard-coded); `--strict` refuses one that does not and names the key to change;
and on CPU the planned peak of a saliency batch and of a distillation step is within 25 % of the measured one
(weights + every storage created during the pass, leaf_ray.bench.measure.CpuPeak) for the tiny pair."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from leaf_ray.config import load_config
from leaf_ray.plan import GIB, cluster_from_manifest, model_shape, plan, saliency_peak, training_peak

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted((ROOT / "configs").glob("paper-*.yaml"))


@pytest.fixture(scope="module")
def cluster():
    return cluster_from_manifest(ROOT / "kuberay" / "raycluster.yaml")


def test_the_cluster_comes_from_the_manifest(cluster):
    gpu_groups = {n: g for n, g in cluster.groups.items() if g["gpus"]}
    assert gpu_groups and all(g["host_bytes"] > 0 for g in gpu_groups.values())
    assert max(g["gpus"] for g in gpu_groups.values()) == 8


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_every_paper_config_fits_its_worker_groups(path, cluster):
    cfg = load_config(str(path))
    plans = plan(cfg, cluster, samples=10_000)
    assert {p.stage for p in plans} >= {"detect", "distill"}
    for p in plans:
        assert p.group in cluster.groups, p
        assert p.fits, (p.stage, p.rank, {k: round(v / GIB, 1) for k, v in p.parts.items()}, p.gpu_budget / GIB)
        assert p.seconds is None or p.seconds > 0 and p.throughput > 0
    gang = next(p for p in plans if p.rank.startswith("teacher gang rank"))
    tp = cfg.detection.teacher_pool
    teacher, tied = model_shape(cfg.models.teacher, "teacher")
    # batch_size is per gang rank (the gang's Ray Data batch is batch_size × world_size)
    assert gang.parts == saliency_peak(teacher, tied, batch=tp.batch_size, length=cfg.data.max_length, b=2,
                                       checkpointing=cfg.detection.gradient_checkpointing, shards=tp.world_size)


def test_strict_refuses_a_config_that_does_not_fit_and_names_the_key():
    from typer.testing import CliRunner

    from leaf_ray.cli import app

    args = ["plan", "--config", str(PAPER[0]), "--strict"]
    ok = CliRunner().invoke(app, args + ["--samples", "12000", "--markdown"])
    assert ok.exit_code == 0, ok.output
    assert "| distill | training worker (1 of 8, ZeRO-3, teacher zero3) | train |" in ok.output
    assert "units/s |" in ok.output and "rows/s |" in ok.output
    bad = CliRunner().invoke(app, args + ["--set", "detection.student_pool.batch_size=64"])
    assert bad.exit_code == 1
    assert "detection.student_pool.batch_size" in bad.output


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_planned_saliency_peak_is_within_25_percent_of_the_measured(tiny_pair, role):
    from leaf_ray.bench.measure import CpuPeak
    from leaf_ray.config import ModelRef
    from leaf_ray.detect.saliency import token_saliency
    from leaf_ray.models import load_model

    torch.manual_seed(0)
    ref = ModelRef(path=tiny_pair[role])
    model = load_model(ref).eval()
    batch, length = 4, 256
    ids = torch.randint(5, 1000, (batch, length))
    target = torch.zeros_like(ids)
    target[:, 16:] = 1
    with CpuPeak() as peak:
        token_saliency(model, ids, torch.ones_like(ids), target)
    measured = sum(p.numel() * 4 for p in model.parameters()) + peak.peak
    shape, tied = model_shape(ref, role)
    planned = sum(saliency_peak(shape, tied, batch=batch, length=length, b=4, checkpointing=False).values())
    assert abs(planned / measured - 1) <= 0.25, (planned / 2**20, measured / 2**20)


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked-head", "model-logits"])
def test_planned_distillation_step_peak_is_within_25_percent_of_the_measured(cfg_factory, chunked):
    """One steady-state step of the trainer's pieces (StudentWithLoss, the replicated teacher's signal, AdamW;
    ZeRO-0 is plain torch): the second step, so the AdamW state exists, as in every step after the first."""
    from leaf_ray.bench.measure import CpuPeak
    from leaf_ray.distill.engines import StudentWithLoss, replicated_teacher
    from leaf_ray.models import load_model

    torch.manual_seed(0)
    cfg = cfg_factory(distill={"micro_batch_size": 4, "chunked_lm_head": chunked})
    teacher = replicated_teacher(cfg, 1, 1, "cpu")
    student = load_model(cfg.models.student, dtype="float32")
    model = StudentWithLoss(student, cfg.distill, chunked_head=chunked, n_tokens=student.config.vocab_size).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch, length = 4, 256
    ids = torch.randint(5, 1000, (batch, length))
    mask, target, cf = torch.ones_like(ids), torch.zeros_like(ids), torch.tensor([0, 1, 0, 1])
    target[:, 16:] = 1

    def step():
        out = model(ids, mask, target, cf, teacher(ids, mask, target))
        out["loss"].backward()
        del out
        optimizer.step()
        optimizer.zero_grad()

    step()
    with CpuPeak() as peak:
        step()
    held = [p for m in (student, teacher.model) for p in m.parameters()] + [
        t for state in optimizer.state.values() for t in state.values() if t.dim()]
    measured = sum(t.numel() * t.element_size() for t in held) + peak.peak
    (s_shape, s_tied), (t_shape, t_tied) = model_shape(cfg.models.student, "student"), \
        model_shape(cfg.models.teacher, "teacher")
    parts = training_peak(s_shape, s_tied, t_shape, t_tied, batch=batch, length=length, b=4, teacher_b=4,
                          zero_stage=0, world=1, teacher_mode="replicated", offload_optimizer=False,
                          chunked_head=chunked, chunk_size=cfg.distill.chunk_size)
    planned = sum(parts.values())
    assert abs(planned / measured - 1) <= 0.25, (planned / 2**20, measured / 2**20, parts)
