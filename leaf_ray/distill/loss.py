"""The hybrid KL of LeaF Stage 2 (docs/design.md §1.5), memory-bounded.

    L = λ · KL(p_T(y|X) || p_S(y|X)) + (1 − λ) · KL(p_T(y|X\\A) || p_S(y|X\\A))

Alignment of positions
----------------------
``target_mask[b, t] = 1`` means token ``t`` of row ``b`` is a distillation target (a response token). A causal
LM predicts token ``t`` with the logits at position ``t − 1``, so the KL for target ``t`` is taken between
teacher and student distributions **at position t − 1**: the visited positions are
``{(b, t − 1) : target_mask[b, t] = 1}``, in row-major order. Hence ``target_mask[:, 0]`` must be 0 (token 0
has no predicting position: error), and the last position's logits (predicting past the sequence) are never
used. (The reference release masks with the unshifted labels: it drops the position predicting the first
response token and includes the one after the last.)

Per-position divergence (t = temperature, p = p_T, q = p_S, each softmax(logits / t))
-----------------------------------------------------------------------------------
``divergence`` selects D, always scaled by t²:

- ``forward_kl`` (the default, LeaF's): KL(p‖q) = Σ_v p(v) (log p(v) − log q(v))   (mode covering)
- ``reverse_kl``: KL(q‖p) = Σ_v q(v) (log q(v) − log p(v))   (mode seeking; on-policy distillation's usual
  choice, e.g. Qwen3 / Thinking Machines)
- ``jsd`` (GKD's generalised Jensen–Shannon, Agarwal et al. 2024): with m = β p + (1 − β) q,
  JSD_β = β KL(p‖m) + (1 − β) KL(q‖m),  0 < β < 1 (``jsd_beta``; β → 0 and β → 1 both vanish, use the KLs)

Gradients w.r.t. the student's scaled logits s (closed forms, no autograd graph): forward KL
q_v Σ_u p_u − p_v; reverse KL q_v (f_v − Σ_u q_u f_u) with f = log q − log p; JSD_β
(1 − β) q_v (f_v − Σ_u q_u f_u) with f = log q − log m (the β KL(p‖m) term and the constant of the second one
cancel against the softmax's Jacobian). The gradient w.r.t. the raw logits is t times that (t² · 1/t).
Reverse KL and JSD need the teacher's full distribution (a live teacher); the top-k cache supports forward
KL only.

The forward KL in detail: KL_pos = t² · Σ_v p_T(v) · (log p_T(v) − log p_S(v))

A vocabulary entry with p_T(v) = 0 (underflow, or a −inf teacher logit) contributes exactly 0, decided per
entry *before* the sum (the reference's ``nan_to_num`` after the sum zeroed a whole position). For a top-k
teacher the sum runs over the k tokens plus one tail bucket (see ``topk_cache``).

Batch loss
----------
- ``weighting="lambda"``:  L = λ · mean_{original positions} KL_pos
  + (1 − λ) · mean_{counterfactual positions} KL_pos. A batch with no positions of one kind: that mean is 0
  (never NaN) and the other term keeps its own weight — a batch of originals only gives L = λ · KL_orig, so
  over many batches each kind keeps the weight λ : 1 − λ.
- ``weighting="per_token"``: L = Σ_all KL_pos / N — every target token of the batch weighs the same whatever
  its kind (the reference's one mixed file). N = 0 gives L = 0. ``lambda_`` is then unused.

Memory
------
Target positions are listed first (indices only); then each chunk of ``chunk_size`` positions gathers its
``[n, V]`` rows, upcasts them to fp32 and computes the per-position KL **and its gradient at once** (the
closed form t·(q·Σp − p), no autograd graph), written into one gradient buffer shaped like the input (its
dtype). No fp32 ``[B, T, V]`` tensor and no graph spanning the positions ever exists: the peak is that buffer
plus about three fp32 ``[chunk_size, V]`` temporaries. The loss is a custom ``autograd.Function`` whose
backward only scales the stored gradient by the incoming one (so the forward does the gradient work; under
``torch.no_grad`` or with inputs that need no gradient, only the KL is computed). Backward hands the buffer
over to autograd, so it runs once per loss: a second backward (``retain_graph``) is a clear error.
Log-probabilities are clamped at the most negative finite float, so a −inf *student* logit under a positive
teacher probability gives a huge finite KL instead of inf, and never NaN.
:func:`hybrid_kl_from_hidden` also builds the student logits per chunk from the final hidden states and the
LM head, so even the ``[B, T, V]`` student logits are never whole.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from leaf_ray.distill.teacher import TeacherBatch, TeacherLogits, TeacherTopK

Weighting = Literal["lambda", "per_token"]
Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@dataclass
class KLOutput:
    """``loss``: differentiable fp32 scalar. ``kl_original`` / ``kl_counterfactual``: detached fp32 means over
    each kind's target positions (0 when the kind is absent). ``kl_per_position``: detached fp32 ``[N]`` in
    the visiting order (row-major over ``target_mask``)."""

    loss: torch.Tensor
    kl_original: torch.Tensor
    kl_counterfactual: torch.Tensor
    n_original_tokens: int
    n_counterfactual_tokens: int
    kl_per_position: torch.Tensor | None = None


def _scaled_fp32(rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """A fresh fp32 copy of ``rows / t`` (fresh: the in-place steps below never touch the caller's tensor)."""
    x = rows.to(torch.float32, copy=True)
    return x.div_(temperature) if temperature != 1.0 else x


def _logsumexp_rows(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim, a few rows at a time: torch's logsumexp makes an input-sized temporary,
    this keeps it at about 8 MiB."""
    block = max(1, (1 << 21) // max(x.shape[-1], 1))
    if x.shape[0] <= block:
        return torch.logsumexp(x, dim=-1)
    return torch.cat([torch.logsumexp(x[i:i + block], dim=-1) for i in range(0, x.shape[0], block)])


def _log_softmax_(x: torch.Tensor) -> torch.Tensor:
    """In-place log-softmax; −inf (p = 0) becomes the most negative finite float: p·log p = 0·finite = 0."""
    return x.sub_(_logsumexp_rows(x)[:, None]).clamp_(min=torch.finfo(x.dtype).min)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a[i, v]·b[i, v] per row without an [n, V] product temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def kl_and_grad_rows_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                          weights: torch.Tensor | None = None, divergence: Divergence = "forward_kl",
                          jsd_beta: float = 0.5):
    """Rows ``[n, V]`` (teacher cut to V) -> (D_pos [n] fp32, d(Σ_i w_i D_i)/d student rows or None).

    Forward KL: D_pos = t² Σ_v p_T (log p_T − log p_S), p = softmax(logits / t); a p_T = 0 entry contributes
    exactly 0. Gradient: ∂D_pos/∂s_v = t (q_v Σ_u p_u − p_v) with q = p_S (closed form: no autograd graph is
    kept). ``reverse_kl`` and ``jsd`` (with ``jsd_beta``): the formulas of the module docstring.
    """
    return _kl_and_grad_full(_scaled_fp32(student_logits, temperature), lambda: teacher_logits, temperature,
                             weights, divergence, jsd_beta)


def _kl_and_grad_full(student_scaled: torch.Tensor, teacher_rows, temperature: float,
                      weights: torch.Tensor | None, divergence: Divergence = "forward_kl",
                      jsd_beta: float = 0.5):
    """As :func:`kl_and_grad_rows_full`, taking ownership of ``student_scaled`` = fp32 student logits / t;
    ``teacher_rows()`` gives the teacher's rows (cut to V) only when needed, so a gathered copy dies at once.
    At most three fp32 [n, V] buffers are alive at once (four for the JSD)."""
    log_q = _log_softmax_(student_scaled)
    log_p = _log_softmax_(_scaled_fp32(teacher_rows(), temperature))
    if divergence == "reverse_kl":
        return _reverse_kl_and_grad(log_q, log_p, temperature, weights)
    if divergence == "jsd":
        return _jsd_and_grad(log_q, log_p, jsd_beta, temperature, weights)
    p = log_p.exp()
    kl = _row_dot(p, log_p.sub_(log_q)) * temperature**2
    del log_p
    if weights is None:
        return kl, None
    grad = log_q.exp_().mul_(p.sum(dim=-1, keepdim=True)).sub_(p)
    return kl, grad.mul_(temperature * weights[:, None])


def _softmax_projected_(f: torch.Tensor, q: torch.Tensor, mean_f: torch.Tensor) -> torch.Tensor:
    """q ⊙ (f − Σ_u q_u f_u), in place in ``f``: the gradient w.r.t. the logits of Σ_v q_v f_v when
    ∂f/∂q contributes nothing after the projection (the reverse KL and the JSD's student term)."""
    return f.sub_(mean_f[:, None]).mul_(q)


def _reverse_kl_and_grad(log_q: torch.Tensor, log_p: torch.Tensor, temperature: float,
                         weights: torch.Tensor | None):
    """KL(q‖p) = Σ q (log q − log p), t²-scaled; gradient t · q ⊙ (f − KL), f = log q − log p.
    A p = 0 entry under q > 0 gives a huge finite value (log p is clamped), never inf or NaN."""
    q = log_q.exp()
    f = log_q.sub_(log_p)
    del log_p
    kl = _row_dot(q, f)
    if weights is None:
        return kl * temperature**2, None
    grad = _softmax_projected_(f, q, kl)
    return kl * temperature**2, grad.mul_(temperature * weights[:, None])


def _jsd_and_grad(log_q: torch.Tensor, log_p: torch.Tensor, beta: float, temperature: float,
                  weights: torch.Tensor | None):
    """JSD_β = β KL(p‖m) + (1 − β) KL(q‖m), m = β p + (1 − β) q, t²-scaled; gradient
    t (1 − β) q ⊙ (f − Σ q f), f = log q − log m. Four fp32 [n, V] buffers at the peak."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd_beta must be in (0, 1), got {beta}")
    p = log_p.exp()
    log_m = log_q.exp().mul_(1.0 - beta).add_(p, alpha=beta).log_().clamp_(min=torch.finfo(p.dtype).min)
    kl_teacher = _row_dot(p, log_p.sub_(log_m))
    del p, log_p
    q = log_q.exp()
    f = log_q.sub_(log_m)
    del log_m
    kl_student = _row_dot(q, f)
    jsd = (beta * kl_teacher + (1.0 - beta) * kl_student) * temperature**2
    if weights is None:
        return jsd, None
    grad = _softmax_projected_(f, q, kl_student)
    return jsd, grad.mul_(temperature * (1.0 - beta) * weights[:, None])


def kl_and_grad_rows_topk(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                          tail_logprob: torch.Tensor | None, temperature: float,
                          weights: torch.Tensor | None = None):
    """Bucketed KL of rows ``[n, V]`` against a top-k teacher -> (KL_pos [n] fp32, gradient or None).

    KL_pos = t² [Σ_{v ∈ K} p_T(v)(log p_T(v) − log p_S(v)) + p_tail (log p_tail − log q_tail)]; K = the k
    teacher tokens, p_tail = teacher mass outside K, q_tail = the student's own mass outside K
    (log q_tail = logsumexp over the complement − logsumexp over all). With k = V the tail is empty and
    this is the full KL; for k < V it is a lower bound of it (log-sum inequality on the tail bucket).
    Gradient (P = Σ_K p_T + p_tail): t (q_v P − p_T(v)) for v ∈ K; t (q_v P − p_tail q_v / q_tail) outside K.
    """
    return _kl_and_grad_topk(_scaled_fp32(student_logits, temperature), topk_ids, topk_logprobs, tail_logprob,
                             temperature, weights)


def _kl_and_grad_topk(x: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                      tail_logprob: torch.Tensor | None, temperature: float, weights: torch.Tensor | None):
    """As :func:`kl_and_grad_rows_topk`, taking ownership of ``x`` = fp32 student logits / t."""
    log_z = _logsumexp_rows(x)
    x_topk = x.gather(-1, topk_ids)
    log_z_tail = _logsumexp_rows(x.scatter_(-1, topk_ids, float("-inf")))  # −inf: empty complement
    x.scatter_(-1, topk_ids, x_topk)                                          # restore the top-k entries
    log_q_topk = x_topk - log_z[:, None]
    log_q_tail = log_z_tail - log_z
    log_p = topk_logprobs.float()
    p = log_p.exp()
    log_p_tail = (tail_logprob.float() if tail_logprob is not None
                  else torch.log((1.0 - p.sum(dim=-1)).clamp_min(0.0)))
    p_tail = log_p_tail.exp()
    kl_topk = torch.where(p > 0, p * (log_p - log_q_topk), 0.0).sum(dim=-1)
    kl_tail = torch.where(p_tail > 0, p_tail * (log_p_tail - log_q_tail), 0.0)
    kl = (kl_topk + kl_tail) * temperature**2
    if weights is None:
        return kl, None
    mass = p.sum(dim=-1) + p_tail
    has_tail = p_tail > 0
    tail_part = None
    if bool(has_tail.any()):
        # p_tail · q_v / q_tail = p_tail · exp(s_v/t − logsumexp_tail): bounded, no 0·inf (rows without a
        # tail use log_z instead of −inf and weigh 0).
        tail_shift = torch.where(has_tail, log_z_tail, log_z)
        tail_part = (x - tail_shift[:, None]).exp_().mul_(torch.where(has_tail, p_tail, 0.0)[:, None])
    grad = x.sub_(log_z[:, None]).exp_().mul_(mass[:, None])     # q_v · P
    if tail_part is not None:
        grad.sub_(tail_part)
        del tail_part
    grad.scatter_(-1, topk_ids, log_q_topk.exp() * mass[:, None] - p)
    return kl, grad.mul_(temperature * weights[:, None])


# --------------------------------------------------------------------------- bookkeeping


_warned_vocab_truncation: set[tuple[int, int]] = set()


def _check_vocab(teacher_vocab: int, student_vocab: int) -> None:
    if teacher_vocab < student_vocab:
        raise ValueError(f"teacher vocab size {teacher_vocab} is smaller than student vocab size "
                         f"{student_vocab}; the teacher must cover every student token")
    if teacher_vocab > student_vocab and (teacher_vocab, student_vocab) not in _warned_vocab_truncation:
        _warned_vocab_truncation.add((teacher_vocab, student_vocab))
        warnings.warn(f"teacher vocab size {teacher_vocab} > student vocab size {student_vocab}: teacher "
                      "logits are truncated to the student's vocabulary (warned once per size pair)",
                      stacklevel=5)


@dataclass
class _Plan:
    """Everything the chunk loop needs besides the differentiable inputs."""

    batch_index: torch.Tensor      # [N] row b of each visited position
    position_index: torch.Tensor   # [N] position t − 1 of each visited position
    cf_position: torch.Tensor      # [N] bool: the position belongs to a counterfactual row
    weights: torch.Tensor          # [N] fp32 weight of each position's KL in the loss
    teacher: TeacherBatch
    student_vocab: int
    temperature: float
    chunk_size: int
    divergence: Divergence = "forward_kl"
    jsd_beta: float = 0.5

    def teacher_kl_and_grad(self, student_scaled: torch.Tensor, start: int, end: int,
                            weights: torch.Tensor | None):
        """KL of visited positions ``start:end`` (and its weighted gradient w.r.t. the student logit rows);
        ``student_scaled`` = their fp32 student logits / t, consumed."""
        b, p = self.batch_index[start:end], self.position_index[start:end]
        t = self.teacher
        if isinstance(t, TeacherLogits):
            vocab = self.student_vocab

            def rows():
                return (t.logits[start:end] if t.logits.dim() == 2 else t.logits[b, p])[:, :vocab]

            return _kl_and_grad_full(student_scaled, rows, self.temperature, weights, self.divergence,
                                     self.jsd_beta)
        if t.indices.dim() == 2:
            ids, lps = t.indices[start:end], t.logprobs[start:end]
            tail = None if t.tail_logprob is None else t.tail_logprob[start:end]
        else:
            ids, lps = t.indices[b, p], t.logprobs[b, p]
            tail = None if t.tail_logprob is None else t.tail_logprob[b, p]
        return _kl_and_grad_topk(student_scaled, ids.long(), lps, tail, self.temperature, weights)


def _validate_teacher(teacher, batch: int, seq: int, n_positions: int, student_vocab: int,
                      temperature: float, divergence: Divergence = "forward_kl") -> TeacherBatch:
    if isinstance(teacher, torch.Tensor):
        teacher = TeacherLogits(teacher)
    if isinstance(teacher, TeacherLogits):
        shape = tuple(teacher.logits.shape)
        if not (shape[:-1] == (batch, seq) or shape[:-1] == (n_positions,)) or len(shape) not in (2, 3):
            raise ValueError(f"teacher logits shape {shape} fits neither dense [{batch}, {seq}, V] nor "
                             f"packed [{n_positions}, V] (N = number of target tokens)")
        _check_vocab(shape[-1], student_vocab)
        return teacher
    if isinstance(teacher, TeacherTopK):
        if divergence != "forward_kl":
            raise ValueError(f"divergence {divergence!r} needs the teacher's full distribution; a top-k teacher "
                             "(the offline cache) supports 'forward_kl' only")
        shape = tuple(teacher.indices.shape)
        if tuple(teacher.logprobs.shape) != shape or not (
                shape[:-1] == (batch, seq) or shape[:-1] == (n_positions,)) or len(shape) not in (2, 3):
            raise ValueError(f"top-k teacher indices {shape} / log-probs {tuple(teacher.logprobs.shape)} fit "
                             f"neither dense [{batch}, {seq}, k] nor packed [{n_positions}, k]")
        tail = teacher.tail_logprob
        if tail is not None and tuple(tail.shape) != shape[:-1]:
            raise ValueError(f"top-k teacher tail_logprob shape {tuple(tail.shape)} != {shape[:-1]}")
        if teacher.temperature is None:
            if n_positions:
                raise ValueError("top-k teacher without a temperature (allowed only without targets)")
        elif abs(teacher.temperature - temperature) > 1e-9:
            raise ValueError(f"top-k teacher log-probs were computed at temperature {teacher.temperature}, "
                             f"the loss uses {temperature}; rebuild the cache at the loss temperature")
        if teacher.vocab_size is not None and teacher.vocab_size != student_vocab:
            raise ValueError(f"top-k teacher distribution is over vocab size {teacher.vocab_size}, student "
                             f"vocab size is {student_vocab}; rebuild the cache with "
                             f"vocab_size={student_vocab}")
        if shape[-1] > student_vocab:
            raise ValueError(f"top-k teacher keeps k={shape[-1]} tokens, more than the student vocab "
                             f"{student_vocab}")
        if teacher.indices.numel() and int(teacher.indices.max()) >= student_vocab:
            raise ValueError(f"top-k teacher token id {int(teacher.indices.max())} is outside the student "
                             f"vocab size {student_vocab}")
        return teacher
    raise TypeError("teacher must be TeacherLogits, TeacherTopK or a logits tensor, got "
                    f"{type(teacher).__name__}")


def _plan(target_mask, is_counterfactual, teacher, student_vocab, *, batch, seq, device, lambda_, temperature,
          weighting, chunk_size, divergence="forward_kl", jsd_beta=0.5) -> tuple[_Plan, int, int]:
    if weighting not in ("lambda", "per_token"):
        raise ValueError(f"weighting must be 'lambda' or 'per_token', got {weighting!r}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if divergence == "jsd" and not 0.0 < jsd_beta < 1.0:
        raise ValueError(f"jsd_beta must be in (0, 1), got {jsd_beta}")
    if not 0.0 <= lambda_ <= 1.0:
        raise ValueError(f"lambda_ must be in [0, 1], got {lambda_}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    target_mask = torch.as_tensor(target_mask, device=device)
    if tuple(target_mask.shape) != (batch, seq):
        raise ValueError(f"target_mask shape {tuple(target_mask.shape)} != student [batch, seq] "
                         f"{(batch, seq)}")
    is_cf = torch.as_tensor(is_counterfactual, device=device).bool().reshape(-1)
    if is_cf.numel() != batch:
        raise ValueError(f"is_counterfactual has {is_cf.numel()} entries for {batch} batch rows")
    targets = target_mask != 0
    if targets[:, 0].any():
        rows = targets[:, 0].nonzero().flatten().tolist()
        raise ValueError(f"target_mask[b, 0] = 1 for batch rows {rows}: token 0 has no predicting position")
    # Target t is predicted at position t − 1: visit (b, t − 1), row-major.
    batch_index, position_index = targets[:, 1:].nonzero(as_tuple=True)
    cf_position = is_cf[batch_index]
    n_positions = int(batch_index.numel())
    n_cf = int(cf_position.sum())
    n_orig = n_positions - n_cf
    if weighting == "lambda":
        weights = torch.where(cf_position, (1.0 - lambda_) / max(n_cf, 1), lambda_ / max(n_orig, 1))
    else:
        weights = torch.full((n_positions,), 1.0 / max(n_positions, 1), device=device)
    teacher = _validate_teacher(teacher, batch, seq, n_positions, student_vocab, temperature, divergence)
    plan = _Plan(batch_index, position_index, cf_position, weights.float(), teacher, student_vocab,
                 temperature, chunk_size, divergence, jsd_beta)
    return plan, n_orig, n_cf


# --------------------------------------------------------------------------- chunk loop


def _run_chunks(plan: _Plan, inputs: tuple[torch.Tensor, ...], needs_grad: tuple[bool, ...]):
    """Per-position KL [N] (fp32) and, for each input in ``needs_grad``, d(Σ_i w_i KL_i)/d input.

    ``inputs`` = ``(logits,)``, or ``(hidden, weight[, bias])`` where the chunk's logits are
    ``hidden[b, p] @ weight.T + bias``. ``inputs[0]`` is gathered per chunk at the visited positions; its
    gradient goes to one buffer of its shape and dtype, row by row. The head's gradients sum over chunks in
    fp32 and are cast to the parameter dtype at the end.
    """
    from_hidden = len(inputs) > 1
    want_grad = any(needs_grad)
    grads = [None if not g else torch.zeros_like(x) if i == 0 else torch.zeros_like(x, dtype=torch.float32)
             for i, (x, g) in enumerate(zip(inputs, needs_grad))]
    kl_parts = []
    for start in range(0, plan.batch_index.numel(), plan.chunk_size):
        end = min(start + plan.chunk_size, plan.batch_index.numel())
        b, p = plan.batch_index[start:end], plan.position_index[start:end]
        if from_hidden:
            gathered = inputs[0][b, p]
            student_scaled = _scaled_fp32(torch.nn.functional.linear(gathered, *inputs[1:]), plan.temperature)
        else:  # the gathered [n, V] copy is freed as soon as it is upcast
            student_scaled = _scaled_fp32(inputs[0][b, p], plan.temperature)
        weights = plan.weights[start:end] if want_grad else None
        kl, grad_rows = plan.teacher_kl_and_grad(student_scaled, start, end, weights)
        del student_scaled
        kl_parts.append(kl)
        if not want_grad:
            continue
        if not from_hidden:
            grads[0][b, p] = grad_rows.to(grads[0].dtype)  # every position is visited once: no accumulation
            continue
        weight = inputs[1]
        if needs_grad[0]:
            grads[0][b, p] = (grad_rows.to(weight.dtype) @ weight).to(grads[0].dtype)
        if needs_grad[1]:  # fp32 operands straight into the fp32 sum: no [V, H] temporary per chunk
            grads[1].addmm_(grad_rows.T, gathered.float())
        if len(inputs) > 2 and needs_grad[2]:
            grads[2].add_(grad_rows.sum(dim=0))
    kl_per_position = torch.cat(kl_parts) if kl_parts else plan.weights.new_zeros(0)
    grads = [g if g is None or i == 0 else g.to(inputs[i].dtype) for i, g in enumerate(grads)]
    return kl_per_position, grads


class _ChunkedKL(torch.autograd.Function):
    """loss = Σ_i w_i KL_i. Gradients are computed (analytically) chunk by chunk during forward; backward only
    scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, plan, *inputs):
        kl_per_position, grads = _run_chunks(plan, inputs, tuple(ctx.needs_input_grad[1:]))
        ctx.input_grads = grads
        ctx.mark_non_differentiable(kl_per_position)
        return (kl_per_position * plan.weights).sum(), kl_per_position

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl_per_position):
        grads, ctx.input_grads = ctx.input_grads, None  # hand the buffers over: the engine may then reuse
        if grads is None:                               # them as .grad instead of copying, and they are
            raise RuntimeError(                         # freed as soon as the model's backward consumed them
                "hybrid KL: backward ran twice through one loss (retain_graph); compute the loss again")
        if bool(grad_loss == 1):  # the common case: no extra [B, T, V] multiply
            return (None, *grads)
        return (None, *[g if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads])


def _kl_output(plan: _Plan, inputs: tuple[torch.Tensor, ...], n_orig: int, n_cf: int) -> KLOutput:
    if torch.is_grad_enabled() and any(x.requires_grad for x in inputs):
        loss, kl_per_position = _ChunkedKL.apply(plan, *inputs)
    else:
        with torch.no_grad():
            kl_per_position, _ = _run_chunks(plan, inputs, (False,) * len(inputs))
        loss = (kl_per_position * plan.weights).sum()
    zero = kl_per_position.new_zeros(())
    kl_cf = kl_per_position[plan.cf_position].sum() / n_cf if n_cf else zero
    kl_orig = kl_per_position[~plan.cf_position].sum() / n_orig if n_orig else zero
    return KLOutput(loss=loss, kl_original=kl_orig, kl_counterfactual=kl_cf, n_original_tokens=n_orig,
                    n_counterfactual_tokens=n_cf, kl_per_position=kl_per_position)


# --------------------------------------------------------------------------- public API


def hybrid_kl_loss(student_logits: torch.Tensor, teacher: TeacherBatch | torch.Tensor,
                   target_mask: torch.Tensor, is_counterfactual: torch.Tensor, *, lambda_: float,
                   temperature: float = 1.0, weighting: Weighting = "lambda",
                   chunk_size: int = 256, divergence: Divergence = "forward_kl",
                   jsd_beta: float = 0.5) -> KLOutput:
    """L = λ·KL_orig + (1−λ)·KL_cf (or the per-token mean), KL_pos = t² Σ_v p_T (log p_T − log p_S).

    student_logits [B, T, V] (any float dtype; upcast per chunk); teacher: :class:`TeacherLogits` /
    :class:`TeacherTopK` (dense or packed) or a raw logits tensor; target_mask [B, T]: 1 = token t is a
    target, its KL is taken at position t − 1; is_counterfactual [B] bool. Teacher vocab > V is truncated to
    V (one warning per size pair); < V is an error. ``divergence`` (forward / reverse KL, generalised JSD with
    ``jsd_beta``) replaces KL_pos by that divergence; the module docstring details the formulas, alignment,
    weighting and memory.
    """
    if student_logits.dim() != 3:
        raise ValueError("student_logits must be [batch, seq, vocab], got shape "
                         f"{tuple(student_logits.shape)}")
    batch, seq, vocab = student_logits.shape
    plan, n_orig, n_cf = _plan(target_mask, is_counterfactual, teacher, vocab, batch=batch, seq=seq,
                               device=student_logits.device, lambda_=lambda_, temperature=temperature,
                               weighting=weighting, chunk_size=chunk_size, divergence=divergence,
                               jsd_beta=jsd_beta)
    return _kl_output(plan, (student_logits,), n_orig, n_cf)


def hybrid_kl_from_hidden(student_hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                          teacher: TeacherBatch | torch.Tensor, target_mask: torch.Tensor,
                          is_counterfactual: torch.Tensor, *, lambda_: float, temperature: float = 1.0,
                          weighting: Weighting = "lambda", chunk_size: int = 256,
                          lm_head_bias: torch.Tensor | None = None, divergence: Divergence = "forward_kl",
                          jsd_beta: float = 0.5) -> KLOutput:
    """:func:`hybrid_kl_loss` with student logits = hidden @ W.T (+ b) built per chunk of target positions.

    student_hidden [B, T, H] (the final hidden states, after the last norm); lm_head_weight [V, H] (whole,
    i.e. gathered under ZeRO-3). Only for plain linear heads (no logit soft-capping or scaling). Gradients
    flow to the hidden states, the weight and the bias (summed over chunks in fp32); each chunk's
    temporaries are freed before the next chunk.
    """
    if (student_hidden.dim() != 3 or lm_head_weight.dim() != 2
            or student_hidden.shape[-1] != lm_head_weight.shape[1]):
        raise ValueError(f"student_hidden {tuple(student_hidden.shape)} must be [B, T, H] and lm_head_weight "
                         f"{tuple(lm_head_weight.shape)} [V, H] with the same H")
    batch, seq, _ = student_hidden.shape
    vocab = lm_head_weight.shape[0]
    plan, n_orig, n_cf = _plan(target_mask, is_counterfactual, teacher, vocab, batch=batch, seq=seq,
                               device=student_hidden.device, lambda_=lambda_, temperature=temperature,
                               weighting=weighting, chunk_size=chunk_size, divergence=divergence,
                               jsd_beta=jsd_beta)
    inputs = (student_hidden, lm_head_weight) + ((lm_head_bias,) if lm_head_bias is not None else ())
    return _kl_output(plan, inputs, n_orig, n_cf)
