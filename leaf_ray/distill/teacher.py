"""The teacher side of the hybrid KL, behind one interface (docs/design.md §1.5).

A :class:`TeacherSignal` is called once per training batch and returns a *teacher batch* that
:func:`leaf_ray.distill.loss.hybrid_kl_loss` consumes:

- :class:`OnlineTeacher` runs the frozen teacher on the same input ids as the student (under ``no_grad``) and
  returns :class:`TeacherLogits` (full teacher logits); :class:`TargetLogitsTeacher` does the same but runs
  the LM head on the target positions only (packed logits).
- :class:`TopKCacheTeacher` looks the batch's rows up in the offline top-k cache written by
  :mod:`leaf_ray.distill.topk_cache` and returns :class:`TeacherTopK` (k token ids + log-probs + tail mass).

Layouts. Both batch types accept two layouts, told apart by the number of dimensions:

- *dense*: aligned with the student's positions, ``[B, T, ...]``; the entry at position ``p`` is the teacher's
  distribution over token ``p + 1`` (the logits convention). Only positions ``t - 1`` for target tokens ``t``
  are read.
- *packed*: one row per target token, ``[N, ...]``, in row-major order of ``target_mask`` (batch row
  ascending, then token index ascending) — exactly the order :func:`hybrid_kl_loss` visits target
  positions in. The top-k cache produces this layout, so no ``[B, T, k]`` padding is ever built.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, Union

import numpy as np
import torch


@dataclass
class TeacherLogits:
    """Full teacher logits, dense ``[B, T, V_teacher]`` or packed ``[N, V_teacher]`` (before temperature)."""

    logits: torch.Tensor


@dataclass
class TeacherTopK:
    """A teacher distribution as its k most likely tokens plus one tail bucket (see ``topk_cache``).

    ``indices`` (long) and ``logprobs`` (log p_T at ``temperature``, i.e. ``log_softmax(logits / t)``) are
    dense ``[B, T, k]`` or packed ``[N, k]``. ``tail_logprob`` (``[B, T]`` / ``[N]``) is log of the mass
    outside the k tokens (``-inf`` when nothing is outside); ``None`` = derive it as ``log(1 - Σ_k p)``,
    which loses precision when the top-k mass is close to 1 (the cache stores it computed exactly).
    ``vocab_size``: the vocabulary the distribution is over (must equal the student's).
    """

    indices: torch.Tensor
    logprobs: torch.Tensor
    temperature: float | None  # None only for an empty signal (a batch without targets)
    tail_logprob: torch.Tensor | None = None
    vocab_size: int | None = None


TeacherBatch = Union[TeacherLogits, TeacherTopK]


class TeacherSignal(Protocol):
    """``signal(input_ids, attention_mask, target_mask, keys) -> TeacherBatch`` for one training batch.

    ``keys``: one row key per batch row (``topk_cache.row_key``); only the cache needs them.
    """

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor,
                 keys: Sequence[str] | None = None) -> TeacherBatch: ...


class OnlineTeacher:
    """The frozen teacher run forward on the student's input ids (same original / counterfactual input).

    ``model``: a causal LM (or a DeepSpeed inference engine wrapping one) returning ``.logits``. It is put in
    eval mode; the forward runs under ``torch.no_grad`` so no graph is kept.
    """

    def __init__(self, model):
        self.model = model
        self.model.eval()

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 target_mask: torch.Tensor | None = None, keys: Sequence[str] | None = None) -> TeacherLogits:
        with torch.no_grad():
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return TeacherLogits(logits=out.logits)


class TargetLogitsTeacher:
    """The replicated online teacher, returning its logits only where the loss reads them.

    The loss visits position ``t − 1`` of every target token ``t`` (row-major, see :mod:`leaf_ray.distill.loss`);
    the teacher's LM head runs on those hidden states only and the result is packed ``[N, V]``
    (:class:`TeacherLogits`, packed layout). Prompt and padding positions never get teacher logits, and no
    ``[B, T, V]`` teacher tensor exists. Values equal the full forward's.
    """

    def __init__(self, model):
        self.model = model.eval()

    def __call__(self, input_ids, attention_mask, target_mask, keys=None):
        with torch.no_grad():
            hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                              use_cache=False).last_hidden_state
            rows, positions = (target_mask[:, 1:] != 0).nonzero(as_tuple=True)  # position t − 1 of target t
            return TeacherLogits(self.model.get_output_embeddings()(hidden[rows, positions]))


TopKLookup = Union[Mapping[str, Mapping], Callable[[str], Mapping]]


class TopKCacheTeacher:
    """Teacher signal read from the offline top-k cache (``leaf_ray.distill.topk_cache``).

    ``lookup`` maps a row key to a cache record with ``target_ids [n]``, ``topk_ids [n, k]``,
    ``topk_logprobs [n, k]``, ``tail_logprob [n]``, ``temperature``, ``vocab_size`` (a mapping, e.g.
    :class:`leaf_ray.distill.topk_cache.TopKCacheLookup`, or a callable). Each record's target token ids must
    equal the batch row's target tokens (``input_ids`` where ``target_mask`` is 1) — a different tokenisation,
    truncation or padding side between the cache pass and the trainer is an error naming the key, never a
    silently shifted distribution. Padding side does not matter: records are matched by target order.
    """

    def __init__(self, lookup: TopKLookup):
        self.lookup = lookup

    def _record(self, key: str) -> Mapping:
        try:
            return self.lookup(key) if callable(self.lookup) else self.lookup[key]
        except KeyError:
            raise KeyError(f"top-k cache has no row for key {key!r}") from None

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor,
                 keys: Sequence[str] | None = None) -> TeacherTopK:
        if keys is None or len(keys) != input_ids.shape[0]:
            raise ValueError(f"TopKCacheTeacher needs one row key per batch row ({input_ids.shape[0]}), "
                             f"got {None if keys is None else len(keys)}")
        # A row without targets (e.g. a zero-weight padding micro-batch) needs no teacher signal: no lookup.
        has_targets = (target_mask != 0).any(dim=1).tolist()
        records = [self._record(k) if has else None for k, has in zip(keys, has_targets, strict=True)]
        return topk_batch_from_records(records, input_ids, target_mask, keys)


def topk_batch_from_records(records: Sequence[Mapping | None], input_ids: torch.Tensor,
                            target_mask: torch.Tensor, keys: Sequence[str]) -> TeacherTopK:
    """Pack cache records (one per batch row, in batch order; None for a row without targets) into a packed
    :class:`TeacherTopK`. Use it directly when the cache columns were joined into the training rows.
    """
    ids_rows, lp_rows, tail_rows = [], [], []
    temperatures, vocab_sizes, ks = set(), set(), set()
    for b, (rec, key) in enumerate(zip(records, keys, strict=True)):
        want = input_ids[b][target_mask[b] != 0].tolist()
        if rec is None:
            if want:
                raise ValueError(f"top-k cache: no record given for batch row {b} ({key!r}) with targets")
            continue
        have = np.asarray(rec["target_ids"]).tolist()
        if want != have:
            raise ValueError(
                f"top-k cache row {key!r} does not match the batch: cache has {len(have)} target tokens "
                f"{have[:8]}..., batch row {b} has {len(want)} target tokens {want[:8]}... (tokenisation, "
                "truncation or max_length differ between the cache pass and the trainer)")
        topk_ids = np.array(rec["topk_ids"], dtype=np.int64).reshape(len(have), -1)
        ids_rows.append(torch.from_numpy(topk_ids))
        logprobs = np.array(rec["topk_logprobs"], dtype=np.float32).reshape(topk_ids.shape)
        lp_rows.append(torch.from_numpy(logprobs))
        tail_rows.append(torch.from_numpy(np.array(rec["tail_logprob"], dtype=np.float32).reshape(len(have))))
        temperatures.add(float(rec["temperature"]))
        vocab_sizes.add(int(rec["vocab_size"]))
        ks.add(topk_ids.shape[1] if len(have) else None)
    ks.discard(None)
    for name, values in (("temperature", temperatures), ("vocab_size", vocab_sizes), ("k", ks)):
        if len(values) > 1:
            raise ValueError(f"top-k cache rows {list(keys)} mix {name} values {sorted(values)}")
    device = input_ids.device
    if not ids_rows:  # no target in the batch: an empty signal (the loss is then 0)
        return TeacherTopK(indices=torch.zeros(0, 1, dtype=torch.long, device=device),
                           logprobs=torch.zeros(0, 1, device=device),
                           tail_logprob=torch.zeros(0, device=device),
                           temperature=None, vocab_size=None)
    k = ks.pop() if ks else 1
    return TeacherTopK(indices=torch.cat([r.reshape(-1, k) for r in ids_rows]).to(device),
                       logprobs=torch.cat([r.reshape(-1, k) for r in lp_rows]).to(device),
                       tail_logprob=torch.cat(tail_rows).to(device),
                       temperature=temperatures.pop(), vocab_size=vocab_sizes.pop())
