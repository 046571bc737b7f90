"""FLOPs of a decoder-only transformer, counted from its shapes, and the machine's matmul peak (for MFU).

Used by ``leaf-ray bench gpu`` and ``leaf-ray bench detect``; imports only torch (lazily), so it runs where
nothing but torch is installed.

Counting (one multiply-add = 2 FLOPs; only the matrix multiplies count: norms, activations, softmax and the
embedding lookup are left out, as in the usual MFU convention):

- linear layers, per token per layer: ``2 · P_layer``, the layer's matmul parameters
  ``P_layer = H·(n_heads·d) + 2·H·(n_kv·d) + (n_heads·d)·H`` (q, k, v, o) ``+ 3·H·I`` (gated MLP);
- attention, per sequence of length T per layer, **causal** (only the lower triangle is useful work):
  ``QKᵀ`` and ``P·V`` are ``T²·n_heads·d`` FLOPs each, so ``2·T²·n_heads·d`` forward;
- the LM head: ``2·V·H`` per row where logits are needed (the rows that predict a loss target; the vocabulary
  projection at other rows is waste, not counted).

Passes, as multiples of those forward FLOPs (``lin`` = linear layers, ``attn`` = attention, ``head`` = LM head):

- forward: ``lin + attn + head``;
- input-only backward (saliency: gradients w.r.t. activations and the input embeddings, none w.r.t. the
  parameters): ``lin + 2·attn + head`` (a linear layer's input gradient is one matmul the size of its forward;
  attention's backward is four matmuls — dQ, dK, dV, dP — against two forward);
- full backward (training): ``2·lin + 2·attn + 2·head`` (input and weight gradients).

So saliency = forward + input-only backward = ``2·lin + 3·attn + 2·head``, a training step =
``3·lin + 3·attn + 3·head`` (the familiar ``6·N·tokens`` plus attention), a frozen teacher's forward =
``lin + attn + head``. Recomputation (activation checkpointing, flash attention's backward) and padding are
not counted: they are overhead, and MFU measures how much of the machine the *required* work uses.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Shape:
    """The sizes of a Llama/Qwen-style decoder that matter for FLOPs."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int | None = None  # None: hidden // heads

    @classmethod
    def from_config(cls, config) -> Shape:
        """From a transformers config (LlamaConfig, Qwen2Config, ...)."""
        return cls(hidden=config.hidden_size, layers=config.num_hidden_layers, heads=config.num_attention_heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                   intermediate=config.intermediate_size, vocab=config.vocab_size,
                   head_dim=getattr(config, "head_dim", None))

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        """Matmul parameters of one block: q, k, v, o projections and the gated MLP (gate, up, down)."""
        q = self.heads * self.dim
        kv = self.kv_heads * self.dim
        return self.hidden * (q + 2 * kv) + q * self.hidden + 3 * self.hidden * self.intermediate

    @property
    def block_params(self) -> int:
        return self.layers * self.layer_params

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Flops:
    """Forward FLOPs of one pass split into its parts (see the module docstring)."""

    lin: float
    attn: float
    head: float

    def forward(self) -> float:
        return self.lin + self.attn + self.head

    def input_backward(self) -> float:
        return self.lin + 2 * self.attn + self.head

    def full_backward(self) -> float:
        return 2 * (self.lin + self.attn + self.head)

    def saliency(self) -> float:
        """Forward + input-only backward."""
        return self.forward() + self.input_backward()

    def training(self) -> float:
        """Forward + full backward."""
        return self.forward() + self.full_backward()


def forward_parts(shape: Shape, seq_lens: Iterable[int], head_rows: int) -> Flops:
    """Forward FLOPs of sequences of the given (real, unpadded) lengths with ``head_rows`` LM-head rows."""
    lens = [int(t) for t in seq_lens]
    tokens = sum(lens)
    attn_width = shape.heads * shape.dim
    return Flops(lin=2.0 * shape.block_params * tokens,
                 attn=2.0 * shape.layers * attn_width * sum(t * t for t in lens),
                 head=2.0 * shape.vocab * shape.hidden * int(head_rows))


def saliency_flops(shape: Shape, seq_lens: Iterable[int], head_rows: int) -> float:
    """Required FLOPs of a saliency pass (forward + input-only backward) over these samples."""
    return forward_parts(shape, seq_lens, head_rows).saliency()


def training_flops(shape: Shape, seq_lens: Iterable[int], head_rows: int) -> float:
    """Required FLOPs of a forward + full backward (parameter gradients) over these samples."""
    return forward_parts(shape, seq_lens, head_rows).training()


def forward_flops(shape: Shape, seq_lens: Iterable[int], head_rows: int) -> float:
    return forward_parts(shape, seq_lens, head_rows).forward()


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device="cpu", dtype=None, n: int = 1024, iters: int = 10, warmup: int = 2,
                min_seconds: float = 0.0) -> dict:
    """The machine's dense matmul rate: the fastest of ``iters`` timed ``[n, n] @ [n, n]`` products.

    Random data, the same torch threads as the caller (CPU) or the same device (GPU); each timed call does
    enough back-to-back products to last ``min_seconds`` (so one GPU call is not launch-bound). Returns
    ``{"n", "dtype", "flops_per_s", "seconds"}`` (seconds = the fastest single product).
    """
    import torch

    dtype = dtype or torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(warmup):
        torch.matmul(a, b, out=out)
    _sync(device)
    t0 = time.perf_counter()
    torch.matmul(a, b, out=out)
    _sync(device)
    per_call = max(time.perf_counter() - t0, 1e-9)
    repeat = max(1, int(min_seconds / per_call))
    best = float("inf")
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(repeat):
            torch.matmul(a, b, out=out)
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / repeat)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "flops_per_s": 2.0 * n**3 / best,
            "seconds": best}
