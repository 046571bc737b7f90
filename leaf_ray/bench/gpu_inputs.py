"""Random-initialised models of real shapes and their inputs for ``leaf-ray bench gpu`` (no weights needed),
and the reference release's per-sample saliency step it is compared with."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def build_model(sizes: dict, device: torch.device, dtype: torch.dtype, seed: int):
    """A random-initialised LlamaForCausalLM of these sizes, created on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**sizes, max_position_embeddings=8192, rope_theta=500000.0, attention_dropout=0.0,
                         use_cache=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()  # parameters were created on the device in dtype (rotary inv_freq stays fp32)


@dataclass
class Sample:
    ids: torch.Tensor     # [T] int64 on the device
    prompt_len: int       # tokens before the response (the loss targets are the rest)

    @property
    def length(self) -> int:
        return int(self.ids.numel())

    @property
    def targets(self) -> int:
        return self.length - self.prompt_len


def length_batches(samples: list[Sample], token_budget: int) -> list[list[Sample]]:
    """Length-sorted batches whose padded size (count × longest) stays within the budget."""
    batches, current = [], []
    for sample in sorted(samples, key=lambda x: x.length):
        if current and (len(current) + 1) * sample.length > token_budget:
            batches.append(current)
            current = []
        current.append(sample)
    return batches + ([current] if current else [])


def pad_batch(batch: list[Sample], device: torch.device):
    """Right-padded ids, attention mask and target mask (targets = response tokens)."""
    length = max(x.length for x in batch)
    ids = torch.zeros(len(batch), length, dtype=torch.long, device=device)
    attn = torch.zeros_like(ids)
    target = torch.zeros_like(ids, dtype=torch.bool)
    for i, x in enumerate(batch):
        ids[i, :x.length] = x.ids
        attn[i, :x.length] = 1
        target[i, x.prompt_len:x.length] = True
    return ids, attn, target


def reference_saliency(model, sample: Sample) -> torch.Tensor:
    """The reference release's per-sample step: train mode, parameter gradients accumulated, HF labels loss
    over the full logits; the embedding output keeps its gradient (``retain_grad``). -> norms [T] fp32."""
    model.train()
    ids = sample.ids[None]
    labels = ids.clone()
    labels[:, :sample.prompt_len] = -100
    embeds = model.get_input_embeddings()(ids)
    embeds.retain_grad()
    loss = model(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), labels=labels, use_cache=False).loss
    loss.backward()
    return embeds.grad[0].float().norm(dim=-1)
