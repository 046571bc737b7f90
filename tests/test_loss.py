"""The hybrid KL (docs/design.md §1.5) against a direct loop implementation of the formula."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from leaf_ray.distill.loss import hybrid_kl_from_hidden, hybrid_kl_loss
from leaf_ray.distill.teacher import TeacherLogits


def direct_hybrid_kl(student, teacher, target_mask, is_cf, *, lam, t, weighting="lambda"):
    """The formula written out position by position, in float64:
    KL at position i−1 for every target token i; KL = t² Σ_v p_T (log p_T − log p_S), p_T = 0 terms
    skipped."""
    vocab = student.shape[-1]
    per_kind = {False: [], True: []}
    for b in range(student.shape[0]):
        for i in range(1, student.shape[1]):
            if not target_mask[b, i]:
                continue
            log_q = torch.log_softmax(student[b, i - 1].double() / t, dim=-1)
            log_p = torch.log_softmax(teacher[b, i - 1, :vocab].double() / t, dim=-1)
            kl = 0.0
            for v in range(vocab):
                p = log_p[v].exp()
                if p > 0:
                    kl = kl + p * (log_p[v] - log_q[v])
            per_kind[bool(is_cf[b])].append(kl * t * t)
    orig, cf = per_kind[False], per_kind[True]
    if weighting == "per_token":
        everything = orig + cf
        return (sum(everything) / len(everything)) if everything else torch.zeros((), dtype=torch.float64)

    def mean(xs):
        return sum(xs) / len(xs) if xs else torch.zeros((), dtype=torch.float64)

    return lam * mean(orig) + (1 - lam) * mean(cf), mean(orig), mean(cf), len(orig), len(cf)


def random_batch(seed=0, batch=3, seq=9, vocab=13, teacher_vocab=None):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(batch, seq, vocab, generator=g) * 2).requires_grad_()
    teacher = torch.randn(batch, seq, teacher_vocab or vocab, generator=g) * 2
    target_mask = torch.zeros(batch, seq, dtype=torch.long)
    target_mask[0, 4:8] = 1          # last token is not a target: position 8's logits must be unused
    target_mask[1, 2:] = 1
    target_mask[1, 5] = 0            # a hole inside the response
    target_mask[2, 6:] = 1
    is_cf = torch.tensor([False, True, True])
    return student, teacher, target_mask, is_cf


@pytest.mark.parametrize("t", [1.0, 2.0])
@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_matches_direct_formula_values_and_gradients(t, lam):
    student, teacher, mask, is_cf = random_batch()
    out = hybrid_kl_loss(student, teacher, mask, is_cf, lambda_=lam, temperature=t, chunk_size=4)
    s64 = student.detach().double().requires_grad_()
    want, want_orig, want_cf, n_orig, n_cf = direct_hybrid_kl(s64, teacher, mask, is_cf, lam=lam, t=t)
    assert (out.n_original_tokens, out.n_counterfactual_tokens) == (n_orig, n_cf) == (4, 9)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    assert out.kl_original.item() == pytest.approx(want_orig.item(), rel=1e-5)
    assert out.kl_counterfactual.item() == pytest.approx(want_cf.item(), rel=1e-5)
    assert out.loss.dtype == torch.float32 and not out.kl_original.requires_grad
    (grad,) = torch.autograd.grad(out.loss, student)
    (want_grad,) = torch.autograd.grad(want, s64) if want.requires_grad else (torch.zeros_like(s64),)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-7)
    # Positions that predict no target get no gradient (incl. the last position and position i−1 of holes).
    assert grad[0, 8].abs().max() == 0 and grad[1, 4].abs().max() == 0 and grad[0, :3].abs().max() == 0


def test_alignment_uses_position_before_each_target():
    """Student == teacher exactly at positions t−1 of targets t: the KL is 0, whatever the other positions."""
    _, teacher, mask, is_cf = random_batch(seed=1)
    aligned = torch.randn_like(teacher)
    for b, i in mask.nonzero().tolist():
        aligned[b, i - 1] = teacher[b, i - 1]
    out = hybrid_kl_loss(aligned, teacher, mask, is_cf, lambda_=0.5)
    assert abs(out.loss.item()) < 1e-6
    # Comparing at the target positions t themselves (the reference's unshifted mask): clearly not 0.
    # (mask moved one token right, so that the loss visits the positions t.)
    at_targets = torch.zeros_like(mask)
    at_targets[:, 1:] = mask[:, :-1]
    assert hybrid_kl_loss(aligned, teacher, at_targets, is_cf, lambda_=0.5).loss.item() > 0.1


def test_target_at_token_zero_is_an_error():
    student, teacher, mask, is_cf = random_batch()
    mask[2, 0] = 1
    with pytest.raises(ValueError, match=r"rows \[2\].*token 0"):
        hybrid_kl_loss(student, teacher, mask, is_cf, lambda_=0.5)


def test_per_token_weighting_weighs_every_target_token_equally():
    student, teacher, mask, is_cf = random_batch(seed=2)
    out = hybrid_kl_loss(student, teacher, mask, is_cf, lambda_=0.3, weighting="per_token", chunk_size=5)
    want = direct_hybrid_kl(student.detach(), teacher, mask, is_cf, lam=0.3, t=1.0, weighting="per_token")
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    n_o, n_c = out.n_original_tokens, out.n_counterfactual_tokens
    mixed = (n_o * out.kl_original + n_c * out.kl_counterfactual) / (n_o + n_c)
    assert out.loss.item() == pytest.approx(mixed.item(), rel=1e-5)
    lam_half = hybrid_kl_loss(student, teacher, mask, is_cf, lambda_=0.5).loss.item()
    assert abs(out.loss.item() - lam_half) > 1e-3  # 4 vs 9 tokens: the two rules differ


@pytest.mark.parametrize("kind", ["original", "counterfactual", "none"])
@pytest.mark.parametrize("weighting", ["lambda", "per_token"])
def test_one_kind_batches_give_zero_term_not_nan(kind, weighting):
    student, teacher, mask, _ = random_batch(seed=3)
    is_cf = torch.full((3,), kind == "counterfactual")
    if kind == "none":
        mask.zero_()
    out = hybrid_kl_loss(student, teacher, mask, is_cf, lambda_=0.3, weighting=weighting, chunk_size=2)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(student.grad).all()
    assert not torch.isnan(out.kl_original) and not torch.isnan(out.kl_counterfactual)
    if kind == "original":
        assert out.kl_counterfactual.item() == 0 and out.n_counterfactual_tokens == 0
        factor = 0.3 if weighting == "lambda" else 1.0  # λ weighting: the present term keeps its weight
        assert out.loss.item() == pytest.approx(factor * out.kl_original.item(), rel=1e-6)
    elif kind == "counterfactual":
        assert out.kl_original.item() == 0 and out.n_original_tokens == 0
        factor = 0.7 if weighting == "lambda" else 1.0
        assert out.loss.item() == pytest.approx(factor * out.kl_counterfactual.item(), rel=1e-6)
    else:
        assert out.loss.item() == 0 and student.grad.abs().max() == 0


def test_teacher_vocab_larger_is_truncated_with_one_warning():
    student, teacher, mask, is_cf = random_batch(seed=4, vocab=13, teacher_vocab=19)
    with pytest.warns(UserWarning, match="teacher vocab size 19 > student vocab size 13"):
        out = hybrid_kl_loss(student, teacher, mask, is_cf, lambda_=0.3, temperature=2.0)
    want = direct_hybrid_kl(student.detach(), teacher, mask, is_cf, lam=0.3, t=2.0)[0]
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    truncated = hybrid_kl_loss(student, teacher[..., :13].contiguous(), mask, is_cf, lambda_=0.3,
                               temperature=2.0)
    assert out.loss.item() == pytest.approx(truncated.loss.item(), rel=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call with the same sizes stays silent
        hybrid_kl_loss(student, teacher, mask, is_cf, lambda_=0.3, temperature=2.0)


def test_teacher_vocab_smaller_is_an_error_naming_both_sizes():
    student, teacher, mask, is_cf = random_batch(seed=5, vocab=13, teacher_vocab=11)
    with pytest.raises(ValueError, match="teacher vocab size 11 is smaller than student vocab size 13"):
        hybrid_kl_loss(student, teacher, mask, is_cf, lambda_=0.3)


def test_underflowing_teacher_probability_contributes_zero_not_nan():
    student, teacher, mask, is_cf = random_batch(seed=6)
    teacher[..., 0] = float("-inf")   # p_T exactly 0 by masking
    teacher[..., 1] = -1e4            # p_T underflows to 0 in fp32
    out = hybrid_kl_loss(student, teacher, mask, is_cf, lambda_=0.3, temperature=2.0)
    out.loss.backward()
    assert torch.isfinite(out.kl_per_position).all() and torch.isfinite(student.grad).all()
    assert (out.kl_per_position > 0).all()  # no position zeroed (the reference's nan_to_num after the sum)
    want = direct_hybrid_kl(student.detach(), teacher, mask, is_cf, lam=0.3, t=2.0)[0]
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_equals_unchunked_values_and_gradients(dtype):
    g = torch.Generator().manual_seed(7)
    batch, seq, vocab = 2, 40, 50
    logits = torch.randn(batch, seq, vocab, generator=g).to(dtype)
    teacher = torch.randn(batch, seq, vocab, generator=g).to(torch.bfloat16)
    mask = (torch.rand(batch, seq, generator=g) > 0.3).long()
    mask[:, 0] = 0
    is_cf = torch.tensor([False, True])
    results = []
    for chunk_size in (1, 7, 64, 10_000):
        student = logits.clone().requires_grad_()
        out = hybrid_kl_loss(student, teacher, mask, is_cf, lambda_=0.3, temperature=2.0,
                             chunk_size=chunk_size)
        out.loss.backward()
        assert student.grad.dtype == dtype
        results.append((out.loss.detach(), out.kl_per_position, student.grad))
    for loss, per_position, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(per_position, results[0][1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad.float(), results[0][2].float(), rtol=1e-6, atol=1e-6)
    # ... and all equal plain autograd through the same formula on the whole tensor at once.
    student = logits.float().requires_grad_()
    want = direct_hybrid_kl(student, teacher.float(), mask, is_cf, lam=0.3, t=2.0)[0]
    want.backward()
    assert results[0][0].item() == pytest.approx(want.item(), rel=1e-5)
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(results[0][2].float(), student.grad, **tol)


def test_backward_scales_by_incoming_gradient_and_no_grad_path_matches():
    student, teacher, mask, is_cf = random_batch(seed=8)
    out = hybrid_kl_loss(student, teacher, mask, is_cf, lambda_=0.3, chunk_size=3)
    (grad,) = torch.autograd.grad(out.loss, student, retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        torch.autograd.grad(out.loss, student)
    again = hybrid_kl_loss(student, teacher, mask, is_cf, lambda_=0.3, chunk_size=3)
    (grad3,) = torch.autograd.grad(3.0 * again.loss, student)
    torch.testing.assert_close(grad3, 3.0 * grad)
    with torch.no_grad():
        frozen = hybrid_kl_loss(student, teacher, mask, is_cf, lambda_=0.3, chunk_size=3)
    assert frozen.loss.item() == pytest.approx(out.loss.item(), rel=1e-7) and not frozen.loss.requires_grad


def test_packed_teacher_logits_equal_dense():
    student, teacher, mask, is_cf = random_batch(seed=9)
    dense = hybrid_kl_loss(student, TeacherLogits(teacher), mask, is_cf, lambda_=0.3, chunk_size=4)
    rows = torch.stack([teacher[b, i - 1] for b, i in mask.nonzero().tolist()])  # row-major target order
    packed = hybrid_kl_loss(student, TeacherLogits(rows), mask, is_cf, lambda_=0.3, chunk_size=4)
    torch.testing.assert_close(packed.kl_per_position, dense.kl_per_position)
    with pytest.raises(ValueError, match="fits neither"):
        hybrid_kl_loss(student, rows[:-1], mask, is_cf, lambda_=0.3)


@pytest.mark.parametrize("with_bias", [False, True])
def test_from_hidden_equals_logits_path_values_and_gradients(with_bias):
    g = torch.Generator().manual_seed(10)
    batch, seq, hidden_size, vocab = 2, 12, 8, 30
    hidden = torch.randn(batch, seq, hidden_size, generator=g, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, generator=g, requires_grad=True)
    bias = torch.randn(vocab, generator=g, requires_grad=True) if with_bias else None
    teacher = torch.randn(batch, seq, vocab + 3, generator=g)
    mask = torch.zeros(batch, seq, dtype=torch.long)
    mask[0, 3:10] = 1
    mask[1, 5:] = 1
    is_cf = torch.tensor([True, False])
    params = [hidden, weight] + ([bias] if with_bias else [])
    logits = torch.nn.functional.linear(hidden, weight, bias)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vocab truncation warning, asserted elsewhere
        ref = hybrid_kl_loss(logits, teacher, mask, is_cf, lambda_=0.3, temperature=2.0, chunk_size=10_000)
        ref_grads = torch.autograd.grad(ref.loss, params)
        for chunk_size in (1, 4, 10_000):
            out = hybrid_kl_from_hidden(hidden, weight, teacher, mask, is_cf, lambda_=0.3, temperature=2.0,
                                        chunk_size=chunk_size, lm_head_bias=bias)
            assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)
            for got, want in zip(torch.autograd.grad(out.loss, params), ref_grads):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_from_hidden_with_frozen_head_only_grads_hidden():
    _, teacher, mask, is_cf = random_batch(seed=11)
    hidden = torch.randn(3, 9, 4, requires_grad=True)
    weight = torch.randn(13, 4)  # frozen LM head
    out = hybrid_kl_from_hidden(hidden, weight, teacher, mask, is_cf, lambda_=0.3, chunk_size=2)
    out.loss.backward()
    assert hidden.grad is not None and weight.grad is None
    assert math.isfinite(out.loss.item())


def test_from_hidden_in_bfloat16_is_close_to_the_fp32_truth():
    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(2, 16, 8, generator=g)
    weight = torch.randn(24, 8, generator=g) / 3
    teacher = torch.randn(2, 16, 24, generator=g)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[:, 0] = 0
    is_cf = torch.tensor([False, True])
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        h = hidden.detach().to(dtype).requires_grad_()
        w = weight.detach().to(dtype).requires_grad_()
        out = hybrid_kl_from_hidden(h, w, teacher.to(dtype), mask, is_cf, lambda_=0.3, chunk_size=5)
        out.loss.backward()
        assert h.grad.dtype == w.grad.dtype == dtype
        results[dtype] = (out.loss.item(), h.grad.float(), w.grad.float())
    assert results[torch.bfloat16][0] == pytest.approx(results[torch.float32][0], rel=3e-2)
    for got, want in zip(results[torch.bfloat16][1:], results[torch.float32][1:]):
        assert (got - want).abs().max() <= 3e-2 * want.abs().max()


def test_memory_bench_measures_both_variants_in_subprocesses():
    """The bench machinery on a tiny shape (the ratio itself is printed by `leaf-ray bench distill`)."""
    from leaf_ray.bench.distill_memory import bench_loss_memory

    res = bench_loss_memory(vocab=512, seq=64, chunk_size=16, include_hidden=False, timeout_s=600)
    assert res["naive"]["loss"] == pytest.approx(res["chunked"]["loss"], rel=1e-4)
    assert res["naive"]["grad_finite"] and res["chunked"]["grad_finite"]
    assert res["naive"]["peak_delta_mib"] > 0 and res["ratio"] > 0
    assert "MALLOC_MMAP_THRESHOLD_" in res["method"]


def autograd_divergence(student, teacher, target_mask, is_cf, *, lam, t, divergence, beta=0.5):
    """Reverse KL and GKD's generalised JSD written with torch ops in float64 (autograd gives the gradient):
    KL(q‖p) = Σ q (log q − log p);  JSD_β = β KL(p‖m) + (1 − β) KL(q‖m), m = β p + (1 − β) q; t²-scaled."""
    rows, pos = target_mask[:, 1:].nonzero(as_tuple=True)
    log_q = torch.log_softmax(student[rows, pos].double() / t, dim=-1)
    log_p = torch.log_softmax(teacher[rows, pos, :student.shape[-1]].double() / t, dim=-1)
    q, p = log_q.exp(), log_p.exp()
    if divergence == "reverse_kl":
        d = (q * (log_q - log_p)).sum(-1)
    else:
        log_m = torch.log(beta * p + (1 - beta) * q)
        d = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
    d = d * t * t
    cf = is_cf[rows]
    return lam * d[~cf].mean() + (1 - lam) * d[cf].mean()


@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9)])
@pytest.mark.parametrize("from_hidden", [False, True])
def test_reverse_kl_and_jsd_match_autograd_values_and_gradients(divergence, beta, from_hidden):
    student, teacher, mask, is_cf = random_batch(seed=4)
    want = autograd_divergence(student, teacher, mask, is_cf, lam=0.3, t=2.0, divergence=divergence, beta=beta)
    (want_grad,) = torch.autograd.grad(want, student)
    kwargs = {"lambda_": 0.3, "temperature": 2.0, "chunk_size": 4, "divergence": divergence, "jsd_beta": beta}
    if from_hidden:  # logits = hidden @ W.T with W = I: the same logits through the chunked head
        hidden = student.detach().clone().requires_grad_()
        out = hybrid_kl_from_hidden(hidden, torch.eye(student.shape[-1]), teacher, mask, is_cf, **kwargs)
        out.loss.backward()
        got_grad = hidden.grad
    else:
        out = hybrid_kl_loss(student, TeacherLogits(teacher), mask, is_cf, **kwargs)
        (got_grad,) = torch.autograd.grad(out.loss, student)
    assert float(out.loss) == pytest.approx(float(want), rel=1e-5)
    torch.testing.assert_close(got_grad.double(), want_grad.double(), rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # the no-grad path computes the same values
        again = hybrid_kl_loss(student, teacher, mask, is_cf, **kwargs)
    assert float(again.loss) == pytest.approx(float(want), rel=1e-5)


def test_divergences_agree_where_they_must_and_bad_choices_are_named():
    from leaf_ray.distill.teacher import TeacherTopK

    student, teacher, mask, is_cf = random_batch(seed=5)
    kw = {"lambda_": 0.5, "temperature": 1.0}
    # student == teacher: every divergence is 0
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        zero = hybrid_kl_loss(teacher.clone(), teacher, mask, is_cf, divergence=divergence, **kw)
        assert float(zero.loss) == pytest.approx(0.0, abs=1e-6)
    # JSD_½ per position lies in (0, log 2] for different distributions (t = 1)
    jsd = hybrid_kl_loss(student, teacher, mask, is_cf, divergence="jsd", jsd_beta=0.5, **kw)
    assert 0 < float(jsd.loss) < math.log(2)
    with pytest.raises(ValueError, match="divergence must be one of"):
        hybrid_kl_loss(student, teacher, mask, is_cf, divergence="tv", **kw)
    with pytest.raises(ValueError, match=r"jsd_beta must be in \(0, 1\)"):
        hybrid_kl_loss(student, teacher, mask, is_cf, divergence="jsd", jsd_beta=1.0, **kw)
    n = int(mask[:, 1:].sum())
    topk = TeacherTopK(indices=torch.zeros(n, 2, dtype=torch.long), logprobs=torch.full((n, 2), -1.0),
                       temperature=1.0, vocab_size=student.shape[-1])
    with pytest.raises(ValueError, match="full distribution"):
        hybrid_kl_loss(student, topk, mask, is_cf, divergence="reverse_kl", **kw)
