"""Stage 2 trainer: real Ray Train workers (2, gloo, CPU) running DeepSpeed on the tiny pair.

One uninterrupted ZeRO-0 run is the baseline; ZeRO-2, ZeRO-3, a ZeRO-3-partitioned teacher, the top-k cache
teacher with k = vocab (on one worker with 2 accumulation steps), and a run crashed at step 3 (first attempt
only) and resumed from its step-2 checkpoint must reproduce its curve. Steps are few and sequences short so
the file stays within a few minutes on 2 cores.
"""

from __future__ import annotations

import json

import pytest

from leaf_ray.config import config_from_dict
from leaf_ray.distill.data import DistillDataError

STEPS = 4
TRAIN = dict(epochs=1, max_steps=STEPS, global_batch_size=4, micro_batch_size=2, lr=2e-3, warmup_steps=1,
             checkpoint_every_steps=2, eval_every_steps=2, chunk_size=64,
             resources={"num_workers": 2, "cpus_per_worker": 0.5})


def make_cfg(root, tiny_pair, name, **distill):
    from leaf_ray.data.demo_corpus import write_synthetic_inputs

    tree = {
        "run": {"name": name, "root_dir": str(root), "seed": 3},
        "models": {"teacher": {"path": tiny_pair["teacher"]}, "student": {"path": tiny_pair["student"]},
                   "make_tiny_if_missing": False},
        "ray": {"num_cpus": 2},
        "data": {"max_length": 192},
        "tracking": {"experiment": "trainer-tests"},
        "distill": {**TRAIN, **distill},
    }
    cfg = config_from_dict(tree, "test")
    write_synthetic_inputs(cfg.run.dir, n=10, validation=2, max_chars=450, response_level=False)
    return cfg


def history(cfg, result, key):
    """{step: value} from MLflow; a step logged twice (rerun after a crash) keeps its last value."""
    from mlflow import MlflowClient

    from leaf_ray.tracking import tracking_uri

    points = MlflowClient(tracking_uri(cfg)).get_metric_history(result.mlflow_run_id, key)
    out = {}
    for m in sorted(points, key=lambda m: m.timestamp):
        out[m.step] = m.value
    return out


def distill(cfg, variant="leaf_instr"):
    from leaf_ray.distill.driver import run_distillation

    return run_distillation(cfg, variant=variant)


def assert_curves_match(cfg, result, base_cfg, base, rel=2e-3):
    for key in ("loss", "kl_original", "kl_counterfactual"):
        got, want = history(cfg, result, key), history(base_cfg, base, key)
        assert sorted(got) == list(range(1, STEPS + 1)), key
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=rel), (key, step)
    got, want = history(cfg, result, "val_loss"), history(base_cfg, base, "val_loss")
    assert sorted(got) == [2, 4]
    assert [got[s] for s in (2, 4)] == pytest.approx([want[s] for s in (2, 4)], rel=rel)


def exported_weights(result):
    from safetensors.torch import load_file

    return load_file(str(result.export_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def baseline(ray_local, tiny_pair, tmp_path_factory):
    cfg = make_cfg(tmp_path_factory.mktemp("distill-runs"), tiny_pair, "zero0")
    return cfg, distill(cfg)


@pytest.mark.slow
def test_baseline_trains_validates_and_exports_the_best_student(baseline):
    from leaf_ray.config import ModelRef
    from leaf_ray.models import load_model, load_tokenizer

    cfg, result = baseline
    assert result.steps == STEPS
    assert sorted(history(cfg, result, "loss")) == [1, 2, 3, 4]
    lr = history(cfg, result, "lr")
    assert lr[1] == 0.0 and lr[2] == pytest.approx(2e-3) and lr[4] < lr[3] < lr[2]  # warm-up, cosine decay
    assert all(v > 0 for v in history(cfg, result, "grad_norm").values())
    assert all(v > 0 for v in history(cfg, result, "tokens_per_s").values())
    val = history(cfg, result, "val_loss")
    assert val[4] < val[2]  # it learns
    best_step = min(val, key=val.get)
    assert result.best_step == best_step and result.best_val_loss == pytest.approx(val[best_step])
    info = json.loads((result.export_dir / "leaf_ray_export.json").read_text())
    assert info["step"] == best_step and info["variant"] == "leaf_instr"
    model = load_model(ModelRef(path=str(result.export_dir)))
    assert load_tokenizer(ModelRef(path=str(result.export_dir))).pad_token is not None
    assert model.config.num_hidden_layers == 2
    # Ray Train kept the newest checkpoints (keep_checkpoints=2), each a merged DeepSpeed directory.
    ckpts = sorted(p.name for p in (result.export_dir.parent / "ray").glob("checkpoint-step*"))
    assert ckpts == ["checkpoint-step0000002", "checkpoint-step0000004"]
    assert (result.export_dir.parent / "ray" / "checkpoint-step0000004" / "latest").read_text() == "step0000004"


@pytest.mark.slow
def test_rerun_returns_the_finished_run_and_refuses_a_different_config(baseline):
    cfg, result = baseline
    again = distill(cfg)  # no training: the run in this directory is complete
    assert (again.export_dir, again.steps, again.best_step, again.mlflow_run_id) == (
        result.export_dir, result.steps, result.best_step, result.mlflow_run_id)
    changed = cfg.model_copy(deep=True)
    changed.distill.lr = 1e-4
    with pytest.raises(DistillDataError, match="different configuration or data"):
        distill(changed)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stages_give_the_stage0_curve(baseline, tiny_pair, tmp_path, stage):
    base_cfg, base = baseline
    cfg = make_cfg(tmp_path, tiny_pair, f"zero{stage}", deepspeed={"zero_stage": stage})
    result = distill(cfg)
    assert_curves_match(cfg, result, base_cfg, base)
    # the exported (ZeRO-3: consolidated from partitions) student equals the stage-0 one
    got, want = exported_weights(result), exported_weights(base)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert (got[name] - want[name]).abs().max() < 1e-4, name


@pytest.mark.slow
def test_teacher_partitioned_with_zero3_gives_the_replicated_loss(baseline, tiny_pair, tmp_path):
    base_cfg, base = baseline
    cfg = make_cfg(tmp_path, tiny_pair, "teacher-zero3", teacher_mode="zero3")
    assert_curves_match(cfg, distill(cfg), base_cfg, base, rel=1e-4)


@pytest.mark.slow
def test_topk_cache_with_k_equal_vocab_on_one_worker_gives_the_online_curve(baseline, tiny_pair, tmp_path):
    """k = V: the cached teacher is the full distribution; 1 worker × 2 accumulation steps runs the same
    micro-batches per optimizer step as 2 workers × 1, so the curve is the baseline's."""
    base_cfg, base = baseline
    cfg = make_cfg(tmp_path, tiny_pair, "topk", teacher_mode="topk_cache", topk=2048,
                   topk_pool={"num_cpus": 0.5, "batch_size": 8},
                   resources={"num_workers": 1, "cpus_per_worker": 0.5})
    result = distill(cfg)
    assert (cfg.run.dir / "distill" / "topk_cache").is_dir()
    assert_curves_match(cfg, result, base_cfg, base)


@pytest.mark.slow
def test_crash_and_resume_continues_from_the_checkpoint(baseline, tiny_pair, tmp_path):
    base_cfg, base = baseline
    cfg = make_cfg(tmp_path, tiny_pair, "crash", fail_at_step=3)
    result = distill(cfg)
    out = result.export_dir.parent
    assert (out / "crash_injected").read_text().startswith("crashed after step 3")
    assert result.steps == STEPS
    # step 3 ran twice (the crashed attempt, then again from the step-2 checkpoint), every step is present
    from mlflow import MlflowClient

    from leaf_ray.tracking import tracking_uri

    raw = MlflowClient(tracking_uri(cfg)).get_metric_history(result.mlflow_run_id, "loss")
    assert sorted(m.step for m in raw) == [1, 2, 3, 3, 4]
    reruns = [m.value for m in raw if m.step == 3]
    assert reruns[0] == pytest.approx(reruns[1], rel=1e-5)  # the resumed step 3 saw the same state and batch
    assert_curves_match(cfg, result, base_cfg, base, rel=1e-4)


def test_deepspeed_config_follows_the_config_tree(cfg_factory):
    from leaf_ray.distill.engines import deepspeed_config
    from leaf_ray.distill.trainer import accumulation_steps

    cfg = cfg_factory(distill={"global_batch_size": 16, "micro_batch_size": 2, "max_grad_norm": 0.5,
                               "deepspeed": {"zero_stage": 3, "offload_optimizer": True, "offload_param": True,
                                             "precision": "bf16"}})
    conf = deepspeed_config(cfg, world=2, accum=accumulation_steps(16, 2, 2), zero_stage=3, precision="bf16")
    assert conf["train_batch_size"] == 16 and conf["gradient_accumulation_steps"] == 4
    assert conf["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                         "offload_param": {"device": "cpu"}}
    assert conf["bf16"] == {"enabled": True} and conf["gradient_clipping"] == 0.5
    assert conf["zero_allow_untested_optimizer"] is True
    teacher = deepspeed_config(cfg, world=2, accum=4, zero_stage=3, precision="fp32", trains=False)
    assert "gradient_clipping" not in teacher and "offload_optimizer" not in teacher["zero_optimization"]
    with pytest.raises(DistillDataError, match="not a multiple of micro_batch_size × num_workers = 4 × 3"):
        accumulation_steps(32, 4, 3)


def test_variants(cfg_factory):
    from leaf_ray.distill.driver import variant_config

    cfg = cfg_factory()
    assert variant_config(cfg, "kd").distill.use_counterfactuals is False
    assert variant_config(cfg, "leaf_instr").distill.use_counterfactuals is True
    with pytest.raises(DistillDataError, match="use variant 'kd'"):
        variant_config(cfg_factory(distill={"use_counterfactuals": False}), "leaf_instr")
    with pytest.raises(DistillDataError, match="unknown variant 'leaf'"):
        variant_config(cfg, "leaf")


def test_reference_style_bench_loss_is_the_per_token_hybrid_kl():
    """The bench's reference loop computes the same quantity as the trainer's loss (per-token weighting);
    only its cost profile (full fp32 [B, T, V], no chunking) differs."""
    import torch

    from leaf_ray.bench.distill import reference_kl
    from leaf_ray.distill.loss import hybrid_kl_loss

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 9, 17, generator=g), torch.randn(3, 9, 19, generator=g)
    mask = torch.zeros(3, 9, dtype=torch.long)
    mask[0, 4:] = mask[1, 2:7] = mask[2, 8:] = 1
    is_cf = torch.tensor([False, True, True])
    want = hybrid_kl_loss(student, teacher, mask, is_cf, lambda_=0.3, temperature=2.0, weighting="per_token",
                          chunk_size=4).loss
    assert float(reference_kl(student, teacher, mask, 2.0)) == pytest.approx(float(want), rel=1e-5)


def test_cli_distill_names_missing_inputs(cfg_factory, tmp_path):
    from typer.testing import CliRunner

    from leaf_ray.cli import app

    cfg = cfg_factory()
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    result = CliRunner().invoke(app, ["distill", "--config", str(path), "--variant", "kd"])
    assert result.exit_code == 1
    assert "data/clean" in result.output and "leaf-ray ingest" in result.output


def test_target_position_teacher_gives_the_full_teacher_loss(tiny_pair):
    """The replicated teacher computes logits only at the positions the loss reads; same loss and gradient."""
    import torch

    from leaf_ray.config import ModelRef
    from leaf_ray.distill.loss import hybrid_kl_loss
    from leaf_ray.distill.teacher import OnlineTeacher, TargetLogitsTeacher
    from leaf_ray.models import load_model

    teacher = load_model(ModelRef(path=tiny_pair["teacher"]))
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, 2000, (3, 12), generator=g)
    attention = torch.ones(3, 12, dtype=torch.long)
    attention[1, 9:] = 0  # right padding
    target = torch.zeros(3, 12, dtype=torch.long)
    target[0, 5:] = target[1, 3:9] = target[2, 10:] = 1
    is_cf = torch.tensor([False, True, False])
    student = torch.randn(3, 12, 2048, generator=g, requires_grad=True)
    losses = []
    for signal in (OnlineTeacher(teacher), TargetLogitsTeacher(teacher)):
        kl = hybrid_kl_loss(student, signal(input_ids, attention, target), target, is_cf, lambda_=0.3,
                            temperature=1.5, chunk_size=5)
        (grad,) = torch.autograd.grad(kl.loss, student)
        losses.append((float(kl.loss.detach()), grad))
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-5)
    assert torch.allclose(losses[0][1], losses[1][1], atol=1e-6)


# ---- a small run in the calling process (distill.inline_max_rows, leaf_ray/distill/inline.py)

INLINE = {"resources": {"num_workers": 1, "cpus_per_worker": 0.5}, "inline_max_rows": 64}


def assert_same_weights(result, base):
    got, want = exported_weights(result), exported_weights(base)
    assert got.keys() == want.keys()
    for name in want:
        assert (got[name] - want[name]).abs().max() < 1e-4, name


@pytest.mark.slow
def test_a_small_run_trains_in_process_with_the_ray_train_curve_and_student(baseline, tiny_pair, tmp_path, no_ray):
    """The same recipe on one rank here, no Ray: 1 worker × 2 accumulation steps runs the baseline's
    micro-batches per optimizer step, so its curve and exported student are the baseline's; checkpoints are
    kept in <out>/checkpoints (the newest keep_checkpoints); a rerun returns the finished run."""
    base_cfg, base = baseline
    cfg = make_cfg(tmp_path, tiny_pair, "inline", **INLINE)
    result = distill(cfg)
    assert result.steps == STEPS and result.best_step == base.best_step
    assert_curves_match(cfg, result, base_cfg, base, rel=1e-4)
    assert_same_weights(result, base)
    out = result.export_dir.parent
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-step0000002",
                                                                     "checkpoint-step0000004"]
    assert (out / "checkpoints" / "checkpoint-step0000004" / "latest").read_text() == "step0000004"
    assert not (out / "ray").exists()
    assert distill(cfg).mlflow_run_id == result.mlflow_run_id  # complete: returned without training
    # over the limit, the same config goes to Ray Train (which the fixture refuses here)
    bigger = make_cfg(tmp_path, tiny_pair, "not-inline", **{**INLINE, "inline_max_rows": 5})
    with pytest.raises(AssertionError, match="must not start or use Ray"):
        distill(bigger)


@pytest.mark.slow
def test_a_failed_in_process_attempt_is_retried_from_its_checkpoint(baseline, tiny_pair, tmp_path, no_ray):
    """distill.max_failures in-process: the attempt that crashed after step 3 is retried from the step-2
    checkpoint; step 3 is logged twice with the same loss, and the run ends as the uninterrupted one."""
    base_cfg, base = baseline
    cfg = make_cfg(tmp_path, tiny_pair, "inline-crash", fail_at_step=3, **INLINE)
    result = distill(cfg)
    from mlflow import MlflowClient

    from leaf_ray.tracking import tracking_uri

    raw = MlflowClient(tracking_uri(cfg)).get_metric_history(result.mlflow_run_id, "loss")
    assert sorted(m.step for m in raw) == [1, 2, 3, 3, 4]
    reruns = [m.value for m in raw if m.step == 3]
    assert reruns[0] == pytest.approx(reruns[1], rel=1e-5)
    assert_curves_match(cfg, result, base_cfg, base, rel=1e-4)
    assert_same_weights(result, base)
    no_retry = make_cfg(tmp_path, tiny_pair, "inline-no-retry", fail_at_step=3, max_failures=0, **INLINE)
    with pytest.raises(RuntimeError, match="injected crash"):
        distill(no_retry)
