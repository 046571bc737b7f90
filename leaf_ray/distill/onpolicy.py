"""On-policy distillation (``distill.policy: on | mixed``): the student samples, the teacher scores the same tokens.

For an on-policy micro-batch the recipe (:meth:`leaf_ray.distill.trainer.DistillRecipe.train_step`) does:

1. :func:`prompts_of` — each row's prompt is its tokens before the first target: the rendered instruction for
   originals and instruction-level counterfactuals (the same instruction, pruned), instruction + pruned
   response prefix for response-level counterfactuals;
2. a :class:`ResponseSampler` samples one response per prompt with the student's current weights
   (``distill.sampling``: temperature, top-p, max new tokens), returning the tokens and the student's
   log-probability of each;
3. :func:`sampled_batch` makes them a training micro-batch (targets = the sampled tokens, EOS included), which
   the frozen teacher scores and the hybrid loss (:mod:`leaf_ray.distill.loss`, forward / reverse KL or JSD)
   trains on, as any other micro-batch.

Which micro-batches are on-policy: all (``on``), or a share ``on_policy_fraction`` (``mixed``, GKD's λ) drawn
by :func:`on_policy_slot` from (seed, step, slot) — the same decision on every rank (ZeRO-3 needs every rank
to generate together) and on a resumed run.

The seam. :class:`ResponseSampler` is what a sampling engine provides: ``sample(prompts)``,
``sync_weights()`` (called after every optimizer step) and its RNG state for checkpoints. Here
:class:`StudentGenerateSampler` is the student itself (transformers ``generate`` on the DeepSpeed engine's
module: its weights are the trained ones, so ``sync_weights`` has nothing to do). A vLLM / SGLang engine
would implement the same three methods, with ``sync_weights`` pushing the (gathered) student weights into the
engine — docs/on-policy.md says what that GPU half needs.

Exact resume. The sampler's RNG state is its own (generation runs inside ``torch.random.fork_rng`` from that
state, so dropout or anything else drawing from the global RNG never shifts it) and is saved per rank with
every checkpoint: a resumed run samples the same responses as the uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from leaf_ray.distill.data import TokenizedRows, collate


def on_policy_slot(policy: str, fraction: float, *, seed: int, step: int, slot: int) -> bool:
    """Whether accumulation slot ``slot`` of optimizer step ``step`` (0-based, global) samples on-policy."""
    if policy == "off":
        return False
    if policy == "on":
        return True
    return bool(np.random.default_rng([seed, step, slot, 28]).random() < fraction)


def prompts_of(batch: dict[str, Any]) -> list[np.ndarray]:
    """Each row's tokens before its first target (a row without targets — a padding batch — is all prompt)."""
    prompts = []
    for ids, attn, target in zip(batch["input_ids"], batch["attention_mask"], batch["target_mask"]):
        n = int(attn.sum())
        first = torch.nonzero(target[:n]).flatten()
        end = int(first[0]) if len(first) else n
        prompts.append(ids[:end].numpy().astype(np.int64))
    return prompts


@dataclass
class Samples:
    """One sampled response per prompt: ``tokens[i]`` (int64, cut after the first EOS, which is kept) and
    ``student_logprobs[i]`` (fp32, log p_S of each token at temperature 1 under the sampling weights)."""

    tokens: list[np.ndarray]
    student_logprobs: list[np.ndarray]


class ResponseSampler(Protocol):
    """What samples the student's responses. Called by every rank for every on-policy micro-batch (the same
    number of times on every rank, which ZeRO-3 generation needs)."""

    def sample(self, prompts: list[np.ndarray]) -> Samples: ...

    def sync_weights(self) -> None:
        """After every optimizer step: make the next ``sample`` use the updated student."""

    def state_dict(self) -> dict[str, Any]:
        """The sampling RNG state (saved per rank with every checkpoint)."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class StudentGenerateSampler:
    """The student's own ``generate`` (transformers) on the DeepSpeed engine's module, left-padded batches.

    ``synced``: ZeRO-3 with several ranks — every rank's forward gathers partitions collectively, so
    ``generate(synced_gpus=True)`` keeps a rank that has finished stepping until all have. Vocabulary rows past
    the tokenizer's length (padding) are never sampled.
    """

    def __init__(self, model, sampling, *, pad_id: int, eos_ids: list[int], n_tokens: int, seed: int, rank: int,
                 synced: bool):
        self.model, self.sampling = model, sampling
        self.pad_id, self.eos_ids, self.n_tokens, self.synced = pad_id, eos_ids, n_tokens, synced
        self.device = next(model.parameters()).device
        with torch.random.fork_rng(devices=self._devices()):
            torch.manual_seed(int(np.random.SeedSequence([seed, rank, 28]).generate_state(1)[0]))
            self.rng = self._get_rng()

    def _devices(self) -> list:
        return [self.device] if self.device.type == "cuda" else []

    def _get_rng(self) -> dict[str, torch.Tensor]:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def state_dict(self) -> dict[str, Any]:
        return {k: v.clone() for k, v in self.rng.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng = {k: v.clone() for k, v in state.items()}

    def sync_weights(self) -> None:
        """Nothing to do: this sampler is the trained module itself."""

    def sample(self, prompts: list[np.ndarray]) -> Samples:
        sampling = self.sampling
        from leaf_ray.generate.backends import left_padded

        input_ids, attention_mask = left_padded(prompts, self.pad_id)  # sampled tokens start at column `width`
        width = input_ids.shape[1]
        kwargs: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens, "pad_token_id": self.pad_id,
                                  "eos_token_id": self.eos_ids, "use_cache": True, "synced_gpus": self.synced,
                                  "return_dict_in_generate": True, "output_logits": True}
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=None)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        vocab = self.model.get_output_embeddings().weight.shape[0]
        if vocab > self.n_tokens:
            kwargs["suppress_tokens"] = list(range(self.n_tokens, vocab))
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=self._devices()), torch.no_grad():
                torch.set_rng_state(self.rng["cpu"])
                if "cuda" in self.rng:
                    torch.cuda.set_rng_state(self.rng["cuda"], self.device)
                out = self.model.generate(input_ids=input_ids.to(self.device),
                                          attention_mask=attention_mask.to(self.device), **kwargs)
                self.rng = self._get_rng()
        finally:
            self.model.train(was_training)
        new = out.sequences[:, width:].cpu()
        # log p_S(token) at temperature 1, from the raw logits of each generation step
        logprobs = torch.stack([torch.log_softmax(step[:, :self.n_tokens].float(), dim=-1)
                                .gather(1, new[:, j:j + 1].to(step.device).clamp_max(self.n_tokens - 1)).cpu()
                                .squeeze(1) for j, step in enumerate(out.logits)], dim=1)
        tokens, lps = [], []
        eos = torch.tensor(self.eos_ids)
        for row, lp in zip(new, logprobs):
            ends = torch.nonzero(torch.isin(row, eos)).flatten()
            n = int(ends[0]) + 1 if len(ends) else len(row)
            tokens.append(row[:n].numpy().astype(np.int64))
            lps.append(lp[:n].numpy().astype(np.float32))
        return Samples(tokens, lps)


def sampled_batch(batch: dict[str, Any], prompts: list[np.ndarray], samples: Samples,
                  pad_id: int) -> dict[str, Any]:
    """The training micro-batch of prompt + sampled response rows (targets = the sampled tokens), right-padded
    by :func:`leaf_ray.distill.data.collate`; keeps each row's key and original / counterfactual kind."""
    ids = [np.concatenate([p, t]).astype(np.int32) for p, t in zip(prompts, samples.tokens)]
    masks = [np.concatenate([np.zeros(len(p), np.int8), np.ones(len(t), np.int8)])
             for p, t in zip(prompts, samples.tokens)]
    rows = TokenizedRows(row_key=list(batch["row_keys"]), group=list(batch["row_keys"]),
                         is_counterfactual=batch["is_counterfactual"].numpy().astype(bool), input_ids=ids,
                         target_mask=masks)
    return collate(rows, list(range(len(rows))), pad_id)


def target_logprob_sum(teacher_batch, input_ids: torch.Tensor, target_mask: torch.Tensor,
                       chunk: int = 256) -> float:
    """Σ over target tokens of the teacher's log p_T(token) at temperature 1 (its whole vocabulary), from
    :class:`~leaf_ray.distill.teacher.TeacherLogits` (dense or packed), a chunk of positions at a time."""
    rows, positions = (target_mask[:, 1:] != 0).nonzero(as_tuple=True)
    tokens = input_ids[rows, positions + 1]
    logits = teacher_batch.logits
    total = 0.0
    for s in range(0, len(tokens), chunk):
        part = logits[s:s + chunk] if logits.dim() == 2 else logits[rows[s:s + chunk], positions[s:s + chunk]]
        part = part.float()
        total += float((part.gather(1, tokens[s:s + chunk, None].to(part.device)).squeeze(1)
                        - torch.logsumexp(part, dim=-1)).sum())
    return total


def build_sampler(cfg, engine, tokenizer, rank: int, world_size: int) -> ResponseSampler:
    """The configured sampler for this rank (``distill.sampling.sampler``)."""
    model = engine.module.model  # the LM inside StudentWithLoss
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    return StudentGenerateSampler(model, cfg.distill.sampling, pad_id=tokenizer.pad_token_id, eos_ids=eos_ids,
                                  n_tokens=len(tokenizer), seed=cfg.run.seed, rank=rank,
                                  synced=world_size > 1 and bool(engine.zero_optimization_partition_weights()))
