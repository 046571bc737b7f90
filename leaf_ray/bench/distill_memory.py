"""Peak memory of the Stage 2 loss (forward + backward): chunked hybrid KL vs a full-vocab fp32 KL.

Method (CPU, honest by construction):

- each variant runs in its **own fresh subprocess** (``python -m leaf_ray.bench.distill_memory --variant V``),
  so allocator caches and earlier peaks of one variant cannot leak into the other's figure;
- inside it: a small warm-up call of the same variant (thread pools, autograd engine, lazy inits), then
  the inputs are built (student logits with ``requires_grad``, teacher logits, masks) and the baseline
  resident set size (``VmRSS``) is read; the kernel's peak counter is reset (writing 5 to
  ``/proc/self/clear_refs`` resets ``VmHWM``); the loss is computed and ``backward()`` run; the figure is
  ``VmHWM − baseline``: the most memory the process held at any instant during loss + backward, beyond its
  inputs. It includes the gradient of the input (same size as the input, in both variants) and every
  temporary, as the OS saw them (no allocator bookkeeping is trusted).
- glibc's malloc keeps freed blocks resident (its heaps, per-thread arenas and a dynamic mmap threshold), so
  plain RSS would count allocator caching, not memory the loss needs. Children therefore start with
  ``MALLOC_MMAP_THRESHOLD_=65536``: every block of 64 KiB or more is its own mapping, unmapped when freed, so
  RSS follows live memory (the analogue of ``torch.cuda.max_memory_allocated`` on a GPU). Same setting for
  both variants; ``release_freed=False`` measures with glibc's defaults instead (the naive figure barely
  moves — its blocks exceed glibc's 32 MiB maximum threshold and are always mapped — while the chunked one
  then also counts blocks glibc keeps for reuse).
- ``naive``: what the reference release does — the whole ``[B, T, V]`` student and teacher logits upcast to
  fp32, divided by t, full log-softmaxes, ``p·(log p − log q)`` over the full tensor, masked afterwards, and
  plain autograd (which keeps the fp32 intermediates for backward). The mask here is the correct shifted one
  and there is no ``nan_to_num``: values equal the chunked loss, the memory profile is the reference's.
- ``chunked``: :func:`leaf_ray.distill.loss.hybrid_kl_loss` with ``chunk_size`` positions per chunk.
- ``naive_hidden`` / ``chunked_hidden`` (optional): the same from the final hidden states and the LM
  head, i.e. the student logits themselves are made inside the measured region (``hidden @ W.T`` then
  the naive loss, vs :func:`leaf_ray.distill.loss.hybrid_kl_from_hidden`).

Inputs default to bf16 logits (what a bf16 student and teacher produce) and every position after the first
being a target (the most positions the chunked loss can visit; fewer targets only favour it further).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path

TARGET_RATIO = 0.25
VARIANTS = ("naive", "chunked", "naive_hidden", "chunked_hidden")


def naive_full_vocab_kl(student_logits, teacher_logits, target_mask, is_counterfactual, *, lambda_: float,
                        temperature: float):
    """The reference's memory profile: L = λ·KL_orig + (1−λ)·KL_cf on whole fp32 [B, T, V] tensors at once."""
    import torch

    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits[..., : log_q.shape[-1]].float() / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1) * temperature**2       # [B, T]
    mask = target_mask[:, 1:].float()                                   # logits at t−1 predict token t
    kl = kl[:, :-1] * mask
    is_cf = is_counterfactual.float()[:, None]
    kl_cf = (kl * is_cf).sum() / (mask * is_cf).sum().clamp_min(1)
    kl_orig = (kl * (1 - is_cf)).sum() / (mask * (1 - is_cf)).sum().clamp_min(1)
    return lambda_ * kl_orig + (1 - lambda_) * kl_cf


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def _inputs(variant: str, *, vocab: int, seq: int, batch: int, hidden: int, dtype, target_fraction: float,
            seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(batch, seq, vocab, generator=g, dtype=dtype)
    target_mask = torch.zeros(batch, seq, dtype=torch.long)
    target_mask[:, max(1, int(round(seq * (1 - target_fraction)))):] = 1  # prompt first, response after
    is_cf = torch.arange(batch) % 2 == 1
    if variant.endswith("_hidden"):
        student = (torch.randn(batch, seq, hidden, generator=g, dtype=dtype),
                   (torch.randn(vocab, hidden, generator=g, dtype=dtype) / hidden**0.5))
    else:
        student = (torch.randn(batch, seq, vocab, generator=g, dtype=dtype),)
    return tuple(x.requires_grad_() for x in student), teacher, target_mask, is_cf


def _loss(variant: str, student, teacher, target_mask, is_cf, *, chunk_size: int, temperature: float,
          lambda_: float):
    from leaf_ray.distill.loss import hybrid_kl_from_hidden, hybrid_kl_loss

    kw = dict(lambda_=lambda_, temperature=temperature)
    if variant == "naive":
        return naive_full_vocab_kl(student[0], teacher, target_mask, is_cf, **kw)
    if variant == "chunked":
        return hybrid_kl_loss(student[0], teacher, target_mask, is_cf, chunk_size=chunk_size, **kw).loss
    if variant == "naive_hidden":
        return naive_full_vocab_kl(student[0] @ student[1].T, teacher, target_mask, is_cf, **kw)
    if variant == "chunked_hidden":
        return hybrid_kl_from_hidden(student[0], student[1], teacher, target_mask, is_cf,
                                     chunk_size=chunk_size, **kw).loss
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


def measure_variant(variant: str, *, vocab: int, seq: int, batch: int, chunk_size: int, hidden: int = 1024,
                    dtype: str = "bfloat16", target_fraction: float = 1.0, temperature: float = 2.0,
                    lambda_: float = 0.5, seed: int = 0) -> dict:
    """Run in a fresh process (see module docstring): peak RSS above the inputs during loss + backward."""
    import torch

    torch_dtype = getattr(torch, dtype)
    shapes = dict(hidden=hidden, dtype=torch_dtype, target_fraction=target_fraction, seed=seed)
    loss_kw = dict(chunk_size=chunk_size, temperature=temperature, lambda_=lambda_)
    warm = _inputs(variant, vocab=64, seq=16, batch=batch, **shapes)
    _loss(variant, *warm, **loss_kw).backward()
    del warm
    student, teacher, target_mask, is_cf = _inputs(variant, vocab=vocab, seq=seq, batch=batch, **shapes)
    gc.collect()
    baseline_kib = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (the peak RSS) to the current RSS
    loss = _loss(variant, student, teacher, target_mask, is_cf, **loss_kw)
    loss.backward()
    peak_kib = _status_kib("VmHWM")
    input_bytes = sum(x.numel() * x.element_size() for x in (*student, teacher))
    return dict(variant=variant, peak_delta_mib=(peak_kib - baseline_kib) / 1024,
                baseline_mib=baseline_kib / 1024, input_mib=input_bytes / 2**20, loss=float(loss.detach()),
                grad_finite=all(bool(torch.isfinite(x.grad).all()) for x in student))


def _run_child(variant: str, timeout_s: float, release_freed: bool, **params) -> dict:
    cmd = [sys.executable, "-m", "leaf_ray.bench.distill_memory", "--variant", variant,
           "--params", json.dumps(params)]
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if release_freed:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory bench variant {variant!r} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_loss_memory(vocab: int = 32768, seq: int = 2048, batch: int = 1, chunk_size: int = 256, *,
                      hidden: int = 1024, dtype: str = "bfloat16", target_fraction: float = 1.0,
                      temperature: float = 2.0, include_hidden: bool = True, release_freed: bool = True,
                      timeout_s: float = 1800) -> dict:
    """Peak memory of loss + backward, chunked vs naive, each in its own subprocess.

    -> ``{"params", "naive", "chunked", "ratio", "target_ratio", "met"}`` (+ ``"naive_hidden"``,
    ``"chunked_hidden"``, ``"ratio_hidden"`` when ``include_hidden``). Figures are MiB of peak RSS above the
    inputs; ``ratio`` = chunked / naive (target ≤ 0.25). The two losses are also returned (they must agree).
    """
    params = dict(vocab=vocab, seq=seq, batch=batch, chunk_size=chunk_size, hidden=hidden, dtype=dtype,
                  target_fraction=target_fraction, temperature=temperature)
    allocator = "MALLOC_MMAP_THRESHOLD_=65536 (freed blocks unmapped)" if release_freed else "glibc defaults"
    out: dict = {"params": params, "target_ratio": TARGET_RATIO,
                 "method": f"peak RSS (VmHWM after a clear_refs reset) minus RSS with the inputs built, "
                           f"one fresh process per variant, {allocator}"}
    for variant in VARIANTS if include_hidden else VARIANTS[:2]:
        out[variant] = _run_child(variant, timeout_s, release_freed, **params)
    out["ratio"] = out["chunked"]["peak_delta_mib"] / out["naive"]["peak_delta_mib"]
    out["met"] = out["ratio"] <= TARGET_RATIO
    if include_hidden:
        out["ratio_hidden"] = out["chunked_hidden"]["peak_delta_mib"] / out["naive_hidden"]["peak_delta_mib"]
    return out


def run_memory_bench(console, **kwargs) -> dict:
    """:func:`bench_loss_memory` printed as a rich table (for ``leaf-ray bench distill``)."""
    from rich.table import Table

    res = bench_loss_memory(**kwargs)
    p = res["params"]
    table = Table(title=f"Loss + backward peak memory (vocab {p['vocab']}, seq {p['seq']}, batch "
                        f"{p['batch']}, {p['dtype']} logits, chunk {p['chunk_size']})")
    for col in ("variant", "inputs MiB", "peak above inputs MiB", "loss"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for v in VARIANTS:
        if v in res:
            r = res[v]
            table.add_row(v, f"{r['input_mib']:.0f}", f"{r['peak_delta_mib']:.0f}", f"{r['loss']:.6f}")
    table.add_row("[bold]ratio chunked / naive[/bold]", "", f"[bold]{res['ratio']:.3f}[/bold]", "")
    if "ratio_hidden" in res:
        table.add_row("[bold]ratio chunked_hidden / naive_hidden[/bold]", "",
                      f"[bold]{res['ratio_hidden']:.3f}[/bold]", "")
    console.print(table)
    console.print(f"method: {res['method']}")
    console.print(f"target ≤ {TARGET_RATIO}: {'[green]met[/green]' if res['met'] else '[red]not met[/red]'}")
    return res


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, help="measure one variant (child process mode)")
    parser.add_argument("--params", default="{}", help="JSON keyword arguments")
    args = parser.parse_args(argv)
    params = json.loads(args.params)
    if args.variant:
        print(json.dumps(measure_variant(args.variant, **params)))
    else:
        print(json.dumps(bench_loss_memory(**params), indent=2))


if __name__ == "__main__":
    main()
