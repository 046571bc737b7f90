"""On-policy distillation (issue 28) on the tiny pair: the sampler's RNG state makes sampling reproducible, the
mixed policy's draws, and an on-policy in-process run SIGKILLed after its step-2 checkpoint that resumes with
the same samples and ends with the uninterrupted student.

"Same samples" is checked through what the run logs per step: the teacher's and the student's log-probability
of the sampled tokens (functions of the sampled token ids and the weights) must equal the uninterrupted run's.
"""

from __future__ import annotations

import numpy as np
import pytest
from ray_processes import kill_distill_then_rerun
from test_faults import loss_steps
from test_trainer import INLINE, STEPS, assert_curves_match, assert_same_weights, distill, history, make_cfg

ON_POLICY = dict(policy="on", divergence="reverse_kl", sampling={"max_new_tokens": 8, "temperature": 1.0},
                 **INLINE)


def test_mixed_policy_draws_are_a_pure_function_of_seed_step_and_slot():
    from leaf_ray.distill.onpolicy import on_policy_slot

    draws = [on_policy_slot("mixed", 0.3, seed=3, step=s, slot=a) for s in range(400) for a in range(2)]
    assert draws == [on_policy_slot("mixed", 0.3, seed=3, step=s, slot=a) for s in range(400) for a in range(2)]
    assert 0.25 < np.mean(draws) < 0.35
    assert all(on_policy_slot("on", 0.0, seed=0, step=s, slot=0) for s in range(5))
    assert not any(on_policy_slot("off", 1.0, seed=0, step=s, slot=0) for s in range(5))


def test_sampled_responses_and_non_forward_divergences_need_a_live_teacher(cfg_factory):
    from leaf_ray.config import ConfigError

    with pytest.raises(ConfigError, match="distill.policy='mixed' needs a live teacher"):
        cfg_factory(distill={"policy": "mixed", "teacher_mode": "topk_cache"})
    with pytest.raises(ConfigError, match="distill.divergence='jsd' needs the teacher's full distribution"):
        cfg_factory(distill={"divergence": "jsd", "teacher_mode": "topk_cache"})
    with pytest.raises(ConfigError, match="jsd_beta"):
        cfg_factory(distill={"divergence": "jsd", "jsd_beta": 1.0})
    assert cfg_factory(distill={"policy": "on", "teacher_mode": "zero3"}).distill.sampling.max_new_tokens == 64


def test_sampler_state_restores_the_same_samples_and_the_batch_scores_them(tiny_pair, tiny_tokenizer):
    import torch

    from leaf_ray.config import DistillConfig, ModelRef
    from leaf_ray.distill.onpolicy import StudentGenerateSampler, sampled_batch
    from leaf_ray.models import load_model

    model = load_model(ModelRef(path=tiny_pair["student"]), dtype="float32")
    sampling = DistillConfig(sampling={"max_new_tokens": 6}).sampling
    eos = tiny_tokenizer.eos_token_id

    def sampler(seed=3, rank=0):
        return StudentGenerateSampler(model, sampling, pad_id=tiny_tokenizer.pad_token_id, eos_ids=[eos],
                                      n_tokens=len(tiny_tokenizer), seed=seed, rank=rank, synced=False)

    prompts = [np.array(tiny_tokenizer("What is 2+2?")["input_ids"]), np.array(tiny_tokenizer("Hi")["input_ids"])]
    first = sampler()
    saved = first.state_dict()
    torch.manual_seed(123)  # the global RNG is not the sampler's
    a = first.sample(prompts)
    b = first.sample(prompts)
    assert any(not np.array_equal(x, y) for x, y in zip(a.tokens, b.tokens))  # the stream moves on
    resumed = sampler(seed=99)
    resumed.load_state_dict(saved)
    again = resumed.sample(prompts)
    for x, y, lx, ly in zip(a.tokens, again.tokens, a.student_logprobs, again.student_logprobs):
        assert np.array_equal(x, y) and np.allclose(lx, ly, atol=1e-6)
    other_rank = sampler(rank=1).sample(prompts)
    assert any(not np.array_equal(x, y) for x, y in zip(a.tokens, other_rank.tokens))
    for t, lp in zip(a.tokens, a.student_logprobs):  # EOS ends a response (kept); log-probs are log p ≤ 0
        assert 1 <= len(t) <= 6 and len(lp) == len(t) and (lp <= 0).all()
        assert eos not in t[:-1]
    # the student's log-prob of its own samples equals its forward pass on prompt + sample
    batch = {"row_keys": ["r0", "r1"], "is_counterfactual": torch.tensor([False, True])}
    mb = sampled_batch(batch, prompts, a, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
    rows, pos = mb["target_mask"][:, 1:].nonzero(as_tuple=True)
    lp = torch.log_softmax(logits[rows, pos, :len(tiny_tokenizer)], -1).gather(
        1, mb["input_ids"][rows, pos + 1, None]).squeeze(1)
    assert lp.numpy() == pytest.approx(np.concatenate(a.student_logprobs), abs=1e-4)
    assert mb["is_counterfactual"].tolist() == [False, True] and mb["row_keys"] == ["r0", "r1"]


@pytest.fixture(scope="module")
def on_policy_baseline(tiny_pair, tmp_path_factory):
    cfg = make_cfg(tmp_path_factory.mktemp("onpolicy-baseline"), tiny_pair, "onpolicy", **ON_POLICY)
    return cfg, distill(cfg)


@pytest.mark.slow
def test_an_on_policy_run_logs_its_samples(on_policy_baseline):
    cfg, result = on_policy_baseline
    assert result.steps == STEPS
    for key in ("sampled_length", "teacher_logprob", "student_logprob", "kl_per_token"):
        assert sorted(history(cfg, result, key)) == list(range(1, STEPS + 1)), key
    assert all(1 <= v <= 8 for v in history(cfg, result, "sampled_length").values())
    assert all(v < 0 for v in history(cfg, result, "teacher_logprob").values())
    assert set(history(cfg, result, "on_policy_share").values()) == {1.0}
    ckpt = result.export_dir.parent / "checkpoints" / "checkpoint-step0000004"
    assert (ckpt / "sampler_rank0.pt").is_file()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_of_an_on_policy_run_resumes_with_the_same_samples_and_student(on_policy_baseline, tiny_pair,
                                                                                tmp_path):
    base_cfg, base = on_policy_baseline
    cfg = make_cfg(tmp_path, tiny_pair, "onpolicy-kill", **ON_POLICY)
    out = kill_distill_then_rerun(cfg, tmp_path, wait_s=400)
    assert (out / "checkpoints" / "checkpoint-step0000002" / "sampler_rank0.pt").is_file()
    result = distill(cfg)
    assert result.steps == STEPS
    steps = loss_steps(cfg, result.mlflow_run_id)
    assert set(steps) == set(range(1, STEPS + 1)) and steps.count(1) == 1 and steps.count(2) == 1
    # the same samples: both models' log-probs of the sampled tokens, step by step
    for key in ("teacher_logprob", "student_logprob", "sampled_length"):
        got, want = history(cfg, result, key), history(base_cfg, base, key)
        assert sorted(got) == list(range(1, STEPS + 1)), key
        assert [got[s] for s in sorted(want)] == pytest.approx([want[s] for s in sorted(want)], rel=1e-5), key
    assert_curves_match(cfg, result, base_cfg, base, rel=1e-4)
    assert_same_weights(result, base)
