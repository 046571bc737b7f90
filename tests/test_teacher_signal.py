"""Teacher signals: online teacher, top-k buckets with an explicit tail, the Ray Data top-k cache pass."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from leaf_ray.distill.loss import hybrid_kl_loss, kl_and_grad_rows_full, kl_and_grad_rows_topk
from leaf_ray.distill.teacher import OnlineTeacher, TeacherTopK, TopKCacheTeacher
from leaf_ray.distill.topk_cache import SCHEMA, topk_rows


def kl_rows_full(student_logits, teacher_logits, temperature):
    """KL_pos of rows ``[n, V]`` against full teacher logits -> fp32 [n]."""
    return kl_and_grad_rows_full(student_logits, teacher_logits, temperature)[0]


def kl_rows_topk(student_logits, topk_ids, topk_logprobs, tail_logprob, temperature):
    """Bucketed KL_pos against a top-k teacher -> fp32 [n]."""
    return kl_and_grad_rows_topk(student_logits, topk_ids, topk_logprobs, tail_logprob, temperature)[0]


def logits_pair(seed=0, rows=12, vocab=40):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 3, torch.randn(rows, vocab, generator=g) * 3


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_topk_with_k_equal_vocab_is_the_full_kl(t):
    student, teacher = logits_pair()
    ids, logprobs, tail = topk_rows(teacher, k=40, temperature=t, vocab_size=40)
    assert torch.isneginf(tail).all()  # nothing outside the top k
    full = kl_rows_full(student, teacher, t)
    bucketed = kl_rows_topk(student, ids, logprobs, tail, t)
    torch.testing.assert_close(bucketed, full, rtol=1e-5, atol=1e-6)


def test_topk_kl_is_a_lower_bound_growing_with_k():
    student, teacher = logits_pair(seed=1)
    t = 2.0
    full = kl_rows_full(student, teacher, t)
    previous = torch.zeros_like(full)
    for k in (1, 2, 5, 10, 20, 39, 40):
        ids, logprobs, tail = topk_rows(teacher, k=k, temperature=t, vocab_size=40)
        bucketed = kl_rows_topk(student, ids, logprobs, tail, t)
        # Log-sum inequality: merging the tail into one bucket can only lower the KL; a finer partition
        # (k + more tokens) is a refinement, so the bound tightens monotonically.
        assert (bucketed <= full + 1e-5).all()
        assert (bucketed >= previous - 1e-5).all()
        previous = bucketed
    assert (full - kl_rows_topk(student, *topk_rows(teacher, 5, t, 40), t) > 1e-3).any()  # a real gap at k=5


def test_tail_derived_from_topk_mass_when_not_stored():
    student, teacher = logits_pair(seed=2)
    ids, logprobs, tail = topk_rows(teacher, k=8, temperature=1.0, vocab_size=40)
    torch.testing.assert_close(tail, torch.log1p(-logprobs.exp().sum(-1)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kl_rows_topk(student, ids, logprobs, None, 1.0),
                               kl_rows_topk(student, ids, logprobs, tail, 1.0), rtol=1e-4, atol=1e-5)


def _batch(seed=3, batch=2, seq=10, vocab=40):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, seq, vocab, generator=g).requires_grad_()
    teacher = torch.randn(batch, seq, vocab, generator=g) * 2
    mask = torch.zeros(batch, seq, dtype=torch.long)
    mask[0, 3:] = 1
    mask[1, 6:9] = 1
    return student, teacher, mask, torch.tensor([False, True])


@pytest.mark.parametrize("layout", ["dense", "packed"])
def test_hybrid_loss_with_topk_teacher_k_equal_vocab_matches_full_logits(layout):
    student, teacher, mask, is_cf = _batch()
    full = hybrid_kl_loss(student, teacher, mask, is_cf, lambda_=0.3, temperature=2.0, chunk_size=3)
    (full_grad,) = torch.autograd.grad(full.loss, student)
    if layout == "dense":
        ids, lp, tail = topk_rows(teacher.reshape(-1, 40), 40, 2.0, 40)
        top = TeacherTopK(ids.reshape(2, 10, 40), lp.reshape(2, 10, 40), 2.0, tail.reshape(2, 10),
                          vocab_size=40)
    else:
        rows = torch.stack([teacher[b, i - 1] for b, i in mask.nonzero().tolist()])
        ids, lp, tail = topk_rows(rows, 40, 2.0, 40)
        top = TeacherTopK(ids, lp, 2.0, tail, vocab_size=40)
    out = hybrid_kl_loss(student, top, mask, is_cf, lambda_=0.3, temperature=2.0, chunk_size=3)
    (grad,) = torch.autograd.grad(out.loss, student)
    assert out.loss.item() == pytest.approx(full.loss.item(), rel=1e-5)
    torch.testing.assert_close(grad, full_grad, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(grad).all()


def direct_bucketed_kl(student_row, teacher_row, k, t):
    """The k + 1 bucket KL written out for one position (float64, differentiable in student_row)."""
    log_q = torch.log_softmax(student_row.double() / t, dim=-1)
    log_p = torch.log_softmax(teacher_row.double() / t, dim=-1)
    in_top = torch.zeros_like(log_p, dtype=torch.bool)
    in_top[log_p.topk(k).indices] = True
    kl = (log_p.exp()[in_top] * (log_p[in_top] - log_q[in_top])).sum()
    p_tail, q_tail = log_p[~in_top].exp().sum(), log_q[~in_top].exp().sum()
    if p_tail > 0:
        kl = kl + p_tail * (p_tail.log() - q_tail.log())
    return kl * t * t


@pytest.mark.parametrize("k", [1, 5, 39])
@pytest.mark.parametrize("stored_tail", [True, False])
def test_topk_loss_and_gradient_match_direct_bucket_formula(k, stored_tail):
    student, teacher, mask, is_cf = _batch(seed=4)
    rows = torch.stack([teacher[b, i - 1] for b, i in mask.nonzero().tolist()])
    ids, lp, tail = topk_rows(rows, k, 2.0, 40)
    top = TeacherTopK(ids, lp, 2.0, tail if stored_tail else None, vocab_size=40)
    out = hybrid_kl_loss(student, top, mask, is_cf, lambda_=0.3, temperature=2.0, chunk_size=4)
    (grad,) = torch.autograd.grad(out.loss, student)
    s64 = student.detach().double().requires_grad_()
    kinds = {False: [], True: []}
    for b, i in mask.nonzero().tolist():
        kinds[bool(is_cf[b])].append(direct_bucketed_kl(s64[b, i - 1], teacher[b, i - 1], k, 2.0))
    want = 0.3 * sum(kinds[False]) / len(kinds[False]) + 0.7 * sum(kinds[True]) / len(kinds[True])
    (want_grad,) = torch.autograd.grad(want, s64)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-4)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-3, atol=1e-6)


def test_topk_teacher_mismatches_are_clear_errors():
    student, teacher, mask, is_cf = _batch()
    ids, lp, tail = topk_rows(teacher.reshape(-1, 40), 8, 1.0, 40)
    dense = {"indices": ids.reshape(2, 10, 8), "logprobs": lp.reshape(2, 10, 8),
             "tail_logprob": tail.reshape(2, 10)}
    with pytest.raises(ValueError, match="temperature 1.0, the loss uses 2.0"):
        hybrid_kl_loss(student, TeacherTopK(**dense, temperature=1.0), mask, is_cf, lambda_=0.3,
                       temperature=2.0)
    with pytest.raises(ValueError, match="vocab size 48, student vocab size is 40"):
        hybrid_kl_loss(student, TeacherTopK(**dense, temperature=1.0, vocab_size=48), mask, is_cf,
                       lambda_=0.3)


def test_online_teacher_is_a_no_grad_forward(tiny_pair):
    from leaf_ray.config import ModelRef
    from leaf_ray.models import load_model

    model = load_model(ModelRef(path=tiny_pair["teacher"]))
    model.train()
    ids = torch.randint(0, 2000, (2, 7))
    mask = torch.ones_like(ids)
    batch = OnlineTeacher(model)(ids, mask, mask)
    assert not model.training and not batch.logits.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(batch.logits, model(input_ids=ids, attention_mask=mask).logits)


def test_cache_teacher_rejects_rows_that_do_not_match_the_batch():
    record = dict(target_ids=[5, 6], topk_ids=[[1, 2], [3, 4]], topk_logprobs=[[-1.0, -2.0], [-1.0, -2.0]],
                  tail_logprob=[-0.5, -0.5], temperature=1.0, vocab_size=10)
    signal = TopKCacheTeacher({"s1": record})
    ids = torch.tensor([[9, 5, 7]])
    target = torch.tensor([[0, 1, 1]])
    with pytest.raises(ValueError, match="top-k cache row 's1' does not match the batch"):
        signal(ids, torch.ones_like(ids), target, ["s1"])
    with pytest.raises(KeyError, match="no row for key 's2'"):
        signal(ids, torch.ones_like(ids), target, ["s2"])
    ok = signal(torch.tensor([[9, 5, 6]]), torch.ones_like(ids), target, ["s1"])
    assert ok.indices.tolist() == [[1, 2], [3, 4]] and ok.tail_logprob.shape == (2,)
    # A padding row without targets needs no lookup, even under a key the cache lacks.
    two = signal(torch.tensor([[9, 5, 6], [1, 2, 0]]), torch.ones(2, 3), torch.tensor([[0, 1, 1], [0, 0, 0]]),
                 ["s1", "missing"])
    assert two.indices.shape == (2, 2)
    empty = signal(torch.tensor([[1, 2]]), torch.ones(1, 2), torch.zeros(1, 2), ["missing"])
    student = torch.randn(1, 2, 10, requires_grad=True)
    out = hybrid_kl_loss(student, empty, torch.zeros(1, 2), torch.tensor([False]), lambda_=0.5)
    out.loss.backward()
    assert out.loss.item() == 0 and student.grad.abs().max() == 0


# --------------------------------------------------------------------------- the Ray Data pass


def _training_rows() -> pa.Table:
    """Rows as leaf_ray.distill.data.build_rows makes them: an original, an instruction-level and a
    response-level counterfactual of one sample, and a second original."""
    rows = [
        dict(row_key="p1", group="p1", scope="original", span_index=-1, is_counterfactual=False,
             instruction="Tom has 3 apples and buys 4 more. How many apples?", prefix="",
             response="He has 3 + 4 = 7 apples.\n\nThe answer is \\boxed{7}."),
        dict(row_key="p1#instruction#0", group="p1", scope="instruction", span_index=0,
             is_counterfactual=True, instruction="Tom has 3 apples and buys 4. How many apples?", prefix="",
             response="He has 3 + 4 = 7 apples.\n\nThe answer is \\boxed{7}."),
        dict(row_key="p1#response:1#0", group="p1", scope="response:1", span_index=0, is_counterfactual=True,
             instruction="Tom has 3 apples and buys 4 more. How many apples?", prefix="He has 7 apples.\n\n",
             response="The answer is \\boxed{7}."),
        dict(row_key="p2", group="p2", scope="original", span_index=-1, is_counterfactual=False,
             instruction="What is 12 divided by 3?", prefix="", response="12 / 3 = 4. \\boxed{4}"),
    ]
    return pa.Table.from_pylist(rows)


@pytest.mark.slow
def test_topk_cache_pass_round_trips_and_reproduces_online_kl(ray_local, tiny_pair, tmp_path):
    from leaf_ray.config import ModelRef, PoolConfig
    from leaf_ray.distill.data import tokenize_row
    from leaf_ray.distill.topk_cache import TopKCacheLookup, build_topk_cache, load_topk_teacher
    from leaf_ray.models import load_model, load_tokenizer

    teacher_ref, student_ref = ModelRef(path=tiny_pair["teacher"]), ModelRef(path=tiny_pair["student"])
    student_model = load_model(student_ref)
    vocab = int(student_model.config.vocab_size)
    rows = _training_rows()
    out = build_topk_cache(rows, tmp_path / "topk", teacher=teacher_ref, tokenizer=student_ref, k=vocab,
                           temperature=2.0, vocab_size=vocab, max_length=256,
                           pool=PoolConfig(batch_size=2, num_cpus=1, min_actors=1, max_actors=1))
    table = pq.read_table(out)
    assert table.schema.equals(SCHEMA, check_metadata=False)
    assert sorted(table.column("row_key").to_pylist()) == sorted(rows.column("row_key").to_pylist())
    assert set(table.column("k").to_pylist()) == {vocab}
    lookup = TopKCacheLookup(out)
    assert lookup.settings == {"k": vocab, "temperature": 2.0, "vocab_size": vocab}
    assert "p1#response:1#0" in lookup and "nope" not in lookup and len(lookup) == 4
    assert (lookup["p1"]["target_positions"] > 0).all()

    # The trainer's side: tokenise like the trainer, right-pad, student forward, both teacher signals.
    tok = load_tokenizer(student_ref)
    encoded = [tokenize_row(tok, r["instruction"], r["prefix"], r["response"], 256) for r in rows.to_pylist()]
    width = max(len(ids) for ids, _, _ in encoded)
    input_ids = torch.full((len(encoded), width), tok.pad_token_id)
    attention_mask = torch.zeros_like(input_ids)
    target_mask = torch.zeros_like(input_ids)
    for b, (ids, mask, _) in enumerate(encoded):
        input_ids[b, :len(ids)], attention_mask[b, :len(ids)] = torch.tensor(ids), 1
        target_mask[b, :len(ids)] = torch.tensor(mask)
    target_mask[:, 0] = 0
    is_cf = torch.tensor(rows.column("is_counterfactual").to_pylist())
    keys = rows.column("row_key").to_pylist()
    student_logits = student_model(input_ids=input_ids, attention_mask=attention_mask).logits

    online = OnlineTeacher(load_model(teacher_ref))(input_ids, attention_mask, target_mask, keys)
    cached = load_topk_teacher(out)(input_ids, attention_mask, target_mask, keys)
    assert cached.indices.shape == (int(target_mask.sum()), vocab)
    kwargs = dict(lambda_=0.3, temperature=2.0, chunk_size=16)
    want = hybrid_kl_loss(student_logits, online, target_mask, is_cf, **kwargs)
    got = hybrid_kl_loss(student_logits, cached, target_mask, is_cf, **kwargs)
    assert got.n_original_tokens == want.n_original_tokens and got.n_counterfactual_tokens > 0
    torch.testing.assert_close(got.kl_per_position, want.kl_per_position, rtol=1e-4, atol=1e-6)
    assert got.loss.item() == pytest.approx(want.loss.item(), rel=1e-4)
    (got_grad,) = torch.autograd.grad(got.loss, student_logits, retain_graph=True)
    (want_grad,) = torch.autograd.grad(want.loss, student_logits)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-3, atol=1e-6)
