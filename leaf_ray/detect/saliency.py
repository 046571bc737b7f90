"""Per-token saliency: the L2 norm of the loss gradient w.r.t. each input embedding (docs/design.md §1.1).

For one sample with tokens ``x_0 .. x_{T-1}``, input embeddings ``e_t`` and loss targets ``S = {t : target_mask[t]=1}``::

    L = 1/|S| * sum_{t in S} CE(logits_{t-1}, x_t)        (logits at position t-1 predict token t)
    g_i = || dL / d e_i ||_2

A padded batch is scored in one forward/backward: the summed loss ``sum_b L_b`` gives every sample exactly its
own gradient, because sample b's loss depends on no other sample's embeddings. The model runs in eval mode
(no dropout) with every parameter frozen, so autograd allocates no parameter gradient: only the detached input
embeddings are leaves that require a gradient, and ``torch.autograd.grad`` returns theirs alone.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class SaliencyOutput:
    """Scores of one batch, on the model's embedding device.

    grad_norm: float32 [B, T], ``g_t`` (0 at padding). loss: float32 [B], each sample's mean target CE.
    num_targets: int64 [B], ``|S|`` per sample (a sample with none has loss 0 and gradient 0).
    """

    grad_norm: torch.Tensor
    loss: torch.Tensor
    num_targets: torch.Tensor


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded row sees the same positions as unpadded."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@contextlib.contextmanager
def frozen_eval(model: torch.nn.Module):
    """Eval mode and ``requires_grad=False`` on every parameter; both restored exactly on exit."""
    was_training = {m: m.training for m in model.modules()}
    needed_grad = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in needed_grad:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in needed_grad:
            p.requires_grad_(flag)
        for m, flag in was_training.items():
            m.training = flag


@contextlib.contextmanager
def checkpointed_layers(model: torch.nn.Module):
    """Activation checkpointing of every transformer block, in eval mode (dropout stays off).

    HF's ``gradient_checkpointing_enable`` only checkpoints when ``module.training`` is True (see
    ``transformers.modeling_layers.GradientCheckpointingLayer``), i.e. with dropout on. Instead we wrap each
    ``GradientCheckpointingLayer``'s forward ourselves with non-reentrant ``torch.utils.checkpoint`` (works with
    frozen parameters and keyword inputs), and restore the original forward on exit. An instance-level forward
    that is already there (accelerate's device-map hooks) is wrapped, not replaced.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no transformer blocks (GradientCheckpointingLayer) to "
                         "checkpoint; set detection.gradient_checkpointing=false for this model")
    saved = []
    for layer in layers:
        saved.append((layer, layer.__dict__.get("forward")))
        inner = layer.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
    try:
        yield model
    finally:
        for layer, previous in saved:
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous


def _check_inputs(input_ids, attention_mask, target_mask) -> None:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    for name, t in (("attention_mask", attention_mask), ("target_mask", target_mask)):
        if t.shape != input_ids.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != input_ids shape {tuple(input_ids.shape)}")
    if target_mask[:, 0].any():
        rows = target_mask[:, 0].nonzero().flatten().tolist()
        raise ValueError(f"target_mask[:, 0] is set in batch rows {rows}: token 0 has no preceding logits")
    if (target_mask.bool() & ~attention_mask.bool()).any():
        rows = (target_mask.bool() & ~attention_mask.bool()).any(-1).nonzero().flatten().tolist()
        raise ValueError(f"target_mask marks padding (attention_mask=0) as a loss target in batch rows {rows}")


def length_groups(lengths: list[int], max_padding: float) -> list[list[int]]:
    """Row indices grouped by length (ascending) so that each group's padded tokens, ``n · longest``, are at most
    ``(1 + max_padding)`` times its real tokens; every row is in exactly one group."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    real = 0
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[i] > (1 + max_padding) * (real + lengths[i]):
            groups.append([])
            real = 0
        if not groups:
            groups.append([])
        groups[-1].append(i)
        real += lengths[i]
    return groups


def target_loss(logits: torch.Tensor, input_ids: torch.Tensor, target: torch.Tensor,
                num_targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Each sample's mean CE over its targets, float32 [B], and the number of target rows.

    ``logits`` are the last ``keep`` positions; row j is position T-keep+j and predicts token T-keep+j+1.
    Only target rows are indexed: non-target rows (padding) never enter the loss or its backward.
    """
    batch, length = input_ids.shape
    keep = logits.shape[1]
    predicted = target[:, length - keep + 1:]
    rows, cols = predicted.nonzero(as_tuple=True)
    token_ce = F.cross_entropy(logits[rows, cols].float(), input_ids[:, length - keep + 1:][rows, cols],
                               reduction="none")
    loss_sum = torch.zeros(batch, dtype=torch.float32, device=logits.device).index_add(0, rows, token_ce)
    return loss_sum / num_targets.clamp(min=1).float(), int(rows.numel())


def token_saliency(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor, *,
                   gradient_checkpointing: bool = False, max_padding: float | None = None) -> SaliencyOutput:
    """``g_t = ||dL_b/de_t||_2`` for every token of a padded batch (left or right padding).

    ``target_mask[b, t] = 1`` marks token t as a loss target, predicted by the logits at t-1 (so column 0 is
    never a target). Position ids come from ``attention_mask`` so padding side does not change the result.
    Works in fp32/bf16/fp16 (model dtype); loss and norms are computed and returned in float32. Non-finite
    values (e.g. fp16 overflow) are returned as they are; the scorer rejects them.

    ``max_padding``: None scores the batch in one pass. A number splits it into length groups
    (:func:`length_groups`: padded tokens ≤ (1 + max_padding) × real tokens per group), each cut to its own
    columns and scored in its own pass: the same numbers (each sample's gradient is its own), less padding
    compute and memory for a batch of mixed lengths.
    """
    _check_inputs(input_ids, attention_mask, target_mask)
    if max_padding is not None and input_ids.shape[0] > 1:
        lengths = attention_mask.long().sum(-1).tolist()
        groups = length_groups(lengths, max_padding)
        if len(groups) > 1:
            return _grouped(model, input_ids, attention_mask, target_mask, groups, gradient_checkpointing)
    embedding = model.get_input_embeddings()
    device = embedding.weight.device
    # clone(): inputs made under torch.inference_mode (e.g. by a caller) cannot take part in autograd.
    input_ids = input_ids.to(device).clone()
    attention_mask = attention_mask.to(device).long().clone()
    target = target_mask.to(device).bool().clone()
    batch, length = input_ids.shape
    num_targets = target.sum(-1)
    if int(num_targets.sum()) == 0:  # nothing to differentiate: L = 0, g = 0 by definition
        zeros = torch.zeros(batch, length, dtype=torch.float32, device=device)
        return SaliencyOutput(zeros, torch.zeros(batch, dtype=torch.float32, device=device), num_targets)

    # Only positions first_target-1 .. T-1 need logits: skip the vocabulary projection of the rest.
    first_target = int(target.any(0).nonzero()[0])
    keep = length - first_target + 1
    kwargs = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = keep

    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(frozen_eval(model))
        if gradient_checkpointing:
            stack.enter_context(checkpointed_layers(model))
        with torch.no_grad():
            embeds = embedding(input_ids)
        embeds = embeds.detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, attention_mask=attention_mask,
                       position_ids=position_ids_from_mask(attention_mask), use_cache=False, **kwargs).logits
        logits = logits[:, -keep:]  # model without logits_to_keep: all T positions
        per_sample_loss, _ = target_loss(logits, input_ids, target, num_targets)
        (grad,) = torch.autograd.grad(per_sample_loss.sum(), embeds)
    grad_norm = grad.float().norm(dim=-1).masked_fill(attention_mask == 0, 0.0)
    return SaliencyOutput(grad_norm=grad_norm, loss=per_sample_loss.detach(), num_targets=num_targets)


def _grouped(model, input_ids, attention_mask, target_mask, groups, gradient_checkpointing) -> SaliencyOutput:
    """:func:`token_saliency` per length group, each cut to the columns its rows use, scattered back."""
    device = model.get_input_embeddings().weight.device
    batch, length = input_ids.shape
    grad_norm = torch.zeros(batch, length, dtype=torch.float32, device=device)
    loss = torch.zeros(batch, dtype=torch.float32, device=device)
    num_targets = torch.zeros(batch, dtype=torch.long, device=device)
    real = attention_mask.bool()
    for rows in groups:
        index = torch.tensor(rows, dtype=torch.long)
        cols = real[index].any(0).nonzero().flatten()
        # One column before the first real one (padding) keeps target_mask[:, 0] unset for any row.
        start, end = max(int(cols[0]) - 1, 0) if cols.numel() else 0, int(cols[-1]) + 1 if cols.numel() else 1
        part = token_saliency(model, input_ids[index, start:end], attention_mask[index, start:end],
                              target_mask[index, start:end], gradient_checkpointing=gradient_checkpointing)
        index = index.to(device)
        grad_norm[index, start:end] = part.grad_norm
        loss[index] = part.loss
        num_targets[index] = part.num_targets
    return SaliencyOutput(grad_norm=grad_norm, loss=loss, num_targets=num_targets)
