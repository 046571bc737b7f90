"""`leaf-ray bench gpu` (or ``python -m leaf_ray.bench.gpu``): the hot paths at real model shapes on one GPU.

Runs where only torch, transformers, pyarrow, rich and typer are installed (the GPU image has no Ray, DeepSpeed,
vLLM, MLflow or pydantic): this module imports nothing else at module level, and from leaf-ray only
:mod:`leaf_ray.bench.flops`, :mod:`leaf_ray.detect.saliency` and :mod:`leaf_ray.distill.loss` (whose import
chains are torch-only; ``tests/test_bench_gpu.py`` runs it with those packages hidden).

Models are random-initialised from configs of real shapes, built on the device in the compute dtype (no
weights are read): a Llama-3.2-1B-shaped student (hidden 2048, 16 layers, 32 heads / 8 KV heads, MLP 8192,
vocab 128256, tied embeddings) and a Llama-3.1-8B-shaped teacher (4096, 32 layers, 32 / 8 heads, 14336, vocab
128256), bf16, SDPA attention. Inputs are random token ids (speed does not depend on the values).

Sections
--------
- **saliency**: per model, the batched pass of :func:`leaf_ray.detect.saliency.token_saliency` (eval mode,
  frozen parameters, gradient w.r.t. the input embeddings only, LM head only from the first target row;
  samples sorted by length and packed into batches under a token budget, as the pipeline's length-sorted
  actor batches) vs a reference-style loop on the same samples (batch 1, ``model.train()``, every parameter
  requiring grad and accumulating it, HF ``labels`` loss over all logits, ``loss.backward()``, the embedding
  output's ``retain_grad``). samples/s, the ratio, MFU and peak memory; both give the same norms (checked).
- **kl**: one loss + backward of the hybrid KL at T positions × V vocabulary from student hidden states
  ``[1, T, H]``, an LM head ``[V, H]`` and teacher logits ``[1, T, V]`` (inputs, not counted in the memory):
  ``naive`` (logits = hidden·Wᵀ, fp32 log-softmax of both over the full vocabulary, KL, autograd),
  ``chunked`` (the same logits, then :func:`~leaf_ray.distill.loss.hybrid_kl_loss`) and ``chunked_lm_head``
  (:func:`~leaf_ray.distill.loss.hybrid_kl_from_hidden`: logits built per chunk of positions, never whole).
- **distill**: one training step as the trainer does it on one GPU without DeepSpeed: the frozen teacher's
  forward (LM head at the target rows only, packed), the student's forward to its final hidden states, the
  chunked hybrid KL from the hidden states and the LM head, backward, ``torch.optim.AdamW`` step (bf16
  parameters and states, fused on CUDA). Tokens/s and MFU.

FLOPs and MFU
-------------
FLOPs are counted from the shapes (:mod:`leaf_ray.bench.flops`: matmuls only, 2 per multiply-add, causal
attention, LM head only at the rows that predict a loss target, padding never counted): saliency = forward +
input-only backward (``2·lin + 3·attn + 2·head``); a training step = student forward + full backward
(``3·(lin + attn + head)``, i.e. 6·params·tokens + attention) + the teacher's forward (``lin + attn + head``).
The reference loop is charged the same required FLOPs as the batched pass (its parameter gradients and
full-vocabulary logits are waste, not work). The KL section reports time and memory only. MFU = required
FLOPs / seconds / peak, the peak being the fastest ``n×n @ n×n`` torch.matmul in the compute dtype measured at
the start of the same run (n = 8192 on GPU).

Timing and memory: every measurement runs once untimed (warm-up), then ``repeats`` times; the fastest is kept.
Peak memory is the allocator's peak above what was allocated before the measurement (``torch.cuda``
statistics); on CPU (``--smoke``) a dispatch mode adds up the bytes of the storages created and still alive,
in one extra untimed run. ``--smoke`` runs the same code on tiny shapes on CPU in fp32 in seconds (tests).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from leaf_ray.bench.flops import Shape, forward_flops, matmul_peak, saliency_flops, training_flops
from leaf_ray.bench.gpu_inputs import Sample, build_model, length_batches, pad_batch, reference_saliency
from leaf_ray.bench.measure import measure

LLAMA_1B = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
            "intermediate_size": 8192, "vocab_size": 128256, "tie_word_embeddings": True}
LLAMA_8B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False}
TINY_STUDENT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "intermediate_size": 128, "vocab_size": 1024, "tie_word_embeddings": True}
TINY_TEACHER = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "intermediate_size": 256, "vocab_size": 1024, "tie_word_embeddings": False}

# Goals of issue 13 on one H200.
GOALS = {"saliency_speedup": 10.0, "saliency_mfu": 0.40, "kl_memory_ratio": 0.2, "distill_mfu": 0.40}


@dataclass
class Settings:
    """Sizes of one run: the real shapes (GPU) or the smoke shapes (CPU)."""

    student: dict
    teacher: dict
    dtype: str
    peak_n: int
    saliency_samples: int
    prompt_len: tuple[int, int]
    response_len: tuple[int, int]
    token_budget: int        # padded tokens per batched saliency batch
    kl_positions: int
    kl_vocab: int
    kl_hidden: int
    kl_chunk: int
    distill_batch: int
    distill_seq: int
    repeats: int
    seed: int = 0
    sections: tuple[str, ...] = ("saliency", "kl", "distill")
    extra: dict = field(default_factory=dict)


def gpu_settings() -> Settings:
    return Settings(student=LLAMA_1B, teacher=LLAMA_8B, dtype="bfloat16", peak_n=8192, saliency_samples=64,
                    prompt_len=(64, 768), response_len=(64, 512), token_budget=8192, kl_positions=8192,
                    kl_vocab=128256, kl_hidden=LLAMA_1B["hidden_size"], kl_chunk=256, distill_batch=4,
                    distill_seq=2048, repeats=3)


def smoke_settings() -> Settings:
    return Settings(student=TINY_STUDENT, teacher=TINY_TEACHER, dtype="float32", peak_n=256,
                    saliency_samples=8, prompt_len=(8, 24), response_len=(4, 16), token_budget=96,
                    kl_positions=256, kl_vocab=1024, kl_hidden=TINY_STUDENT["hidden_size"], kl_chunk=64,
                    distill_batch=2, distill_seq=32, repeats=2)


# --------------------------------------------------------------------------- inputs


def make_samples(s: Settings, vocab: int, device: torch.device) -> list[Sample]:
    rng = random.Random(s.seed)
    gen = torch.Generator(device="cpu").manual_seed(s.seed)
    out = []
    for _ in range(s.saliency_samples):
        p, r = rng.randint(*s.prompt_len), rng.randint(*s.response_len)
        out.append(Sample(torch.randint(1, vocab, (p + r,), generator=gen).to(device), p))
    return out


# --------------------------------------------------------------------------- sections


def _rate(flops: float, seconds: float, peak: float) -> dict:
    return {"flops": flops, "flops_per_s": flops / seconds, "mfu": flops / seconds / peak}


def bench_saliency(models: dict, s: Settings, device: torch.device, peak: float) -> dict:
    from leaf_ray.detect.saliency import token_saliency

    vocab = models["student"].config.vocab_size
    samples = make_samples(s, vocab, device)
    batches = length_batches(samples, s.token_budget)
    padded = [pad_batch(b, device) for b in batches]
    real_tokens = sum(x.length for x in samples)
    padded_tokens = sum(int(ids.numel()) for ids, _, _ in padded)
    out = {"samples": len(samples), "tokens": real_tokens, "target_tokens": sum(x.targets for x in samples),
           "batches": len(batches), "token_budget": s.token_budget,
           "real_token_fraction": real_tokens / padded_tokens, "models": {}}
    lengths = [x.length for x in samples]
    for role in ("student", "teacher"):
        model = models[role]
        shape = Shape.from_config(model.config)
        # Required work: every real token forward and back, the LM head where a target is predicted.
        flops = saliency_flops(shape, lengths, head_rows=out["target_tokens"])

        def batched(model=model):
            return [token_saliency(model, ids, attn, target).grad_norm for ids, attn, target in padded]

        def reference(model=model):
            return [reference_saliency(model, x) for x in samples]

        def clear_grads(model=model):
            model.requires_grad_(True)
            model.zero_grad(set_to_none=True)

        ours = measure(batched, device, s.repeats)
        ref = measure(reference, device, s.repeats, setup=clear_grads)
        # Same norms: the first sample of the first (padded) batch, both ways.
        first = batches[0][0]
        g_ours = token_saliency(model, *padded[0]).grad_norm[0, :first.length]
        g_ref = reference_saliency(model, first)
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)
        model.eval()
        for rec in (ours, ref):
            rec.update(_rate(flops, rec["seconds"], peak), samples_per_s=len(samples) / rec["seconds"])
        out["models"][role] = {
            "shape": shape.as_dict(), "batched": ours, "reference": ref,
            "speedup": ref["seconds"] / ours["seconds"],
            "memory_ratio": ours["peak_mem_bytes"] / ref["peak_mem_bytes"] if ref["peak_mem_bytes"] else None,
            "max_rel_diff": float((g_ours - g_ref).abs().max() / g_ref.abs().max().clamp_min(1e-30))}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    both = {}
    for method in ("batched", "reference"):
        seconds = sum(out["models"][r][method]["seconds"] for r in ("student", "teacher"))
        flops = sum(out["models"][r][method]["flops"] for r in ("student", "teacher"))
        both[method] = {"seconds": seconds, "samples_per_s": len(samples) / seconds, **_rate(flops, seconds, peak),
                        "peak_mem_bytes": max(out["models"][r][method]["peak_mem_bytes"]
                                              for r in ("student", "teacher"))}
    both["speedup"] = both["reference"]["seconds"] / both["batched"]["seconds"]
    out["both"] = both
    return out


def naive_kl(hidden, weight, teacher_logits, target):
    """Full-vocabulary fp32 KL(p_T || p_S) at the positions predicting targets, mean, by autograd."""
    logits = hidden @ weight.T
    log_q = logits.float().log_softmax(-1)[:, :-1]
    log_p = teacher_logits.float().log_softmax(-1)[:, :-1]
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    mask = target[:, 1:].float()
    return (kl * mask).sum() / mask.sum()


def bench_kl(s: Settings, device: torch.device, dtype: torch.dtype) -> dict:
    from leaf_ray.distill.loss import hybrid_kl_from_hidden, hybrid_kl_loss

    gen = torch.Generator(device="cpu").manual_seed(s.seed + 1)
    T, V, H = s.kl_positions, s.kl_vocab, s.kl_hidden
    hidden = (torch.randn(1, T, H, generator=gen)).to(device=device, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(V, H, generator=gen) * H**-0.5).to(device=device, dtype=dtype).requires_grad_(True)
    teacher = (torch.randn(1, T, V, generator=gen) * 2.0).to(device=device, dtype=dtype)
    target = torch.ones(1, T, dtype=torch.bool, device=device)
    target[:, 0] = False
    is_cf = torch.zeros(1, dtype=torch.bool, device=device)
    losses = {}

    def clear():
        hidden.grad = None
        weight.grad = None

    def naive():
        loss = naive_kl(hidden, weight, teacher, target)
        loss.backward()
        losses["naive"] = float(loss.detach())

    def chunked():
        logits = hidden @ weight.T
        loss = hybrid_kl_loss(logits, teacher, target, is_cf, lambda_=1.0, chunk_size=s.kl_chunk).loss
        loss.backward()
        losses["chunked"] = float(loss.detach())

    def chunked_lm_head():
        loss = hybrid_kl_from_hidden(hidden, weight, teacher, target, is_cf, lambda_=1.0,
                                     chunk_size=s.kl_chunk).loss
        loss.backward()
        losses["chunked_lm_head"] = float(loss.detach())

    out = {"positions": T, "vocab": V, "hidden": H, "chunk_size": s.kl_chunk, "dtype": str(dtype).split(".")[-1],
           "methods": {}}
    for name, fn in (("naive", naive), ("chunked", chunked), ("chunked_lm_head", chunked_lm_head)):
        rec = measure(fn, device, s.repeats, setup=clear)
        rec["ms"] = rec["seconds"] * 1e3
        out["methods"][name] = rec
        if device.type == "cuda":
            torch.cuda.empty_cache()
    naive_rec = out["methods"]["naive"]
    for name in ("chunked", "chunked_lm_head"):
        rec = out["methods"][name]
        rec["time_ratio"] = rec["seconds"] / naive_rec["seconds"]
        rec["memory_ratio"] = rec["peak_mem_bytes"] / naive_rec["peak_mem_bytes"]
        rec["loss_rel_diff"] = abs(losses[name] - losses["naive"]) / max(abs(losses["naive"]), 1e-30)
    clear()
    return out


def bench_distill(models: dict, s: Settings, device: torch.device, peak: float) -> dict:
    from leaf_ray.distill.loss import hybrid_kl_from_hidden
    from leaf_ray.distill.teacher import TeacherLogits

    student, teacher = models["student"], models["teacher"]
    B, T = s.distill_batch, s.distill_seq
    gen = torch.Generator(device="cpu").manual_seed(s.seed + 2)
    ids = torch.randint(1, student.config.vocab_size, (B, T), generator=gen).to(device)
    target = torch.zeros(B, T, dtype=torch.bool, device=device)
    target[:, T // 2:] = True  # the response: the second half of every row
    is_cf = (torch.arange(B, device=device) % 2).bool()
    rows, positions = target[:, 1:].nonzero(as_tuple=True)  # position t − 1 of every target t
    student.train()
    student.requires_grad_(True)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, weight_decay=0.0,
                                  fused=device.type == "cuda")
    losses = []

    def step():
        with torch.no_grad():
            t_hidden = teacher.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
            t_logits = teacher.get_output_embeddings()(t_hidden[rows, positions])
            del t_hidden
        hidden = student.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        kl = hybrid_kl_from_hidden(hidden, student.get_output_embeddings().weight, TeacherLogits(t_logits),
                                   target, is_cf, lambda_=0.5, chunk_size=s.kl_chunk)
        kl.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(kl.loss.detach()))

    rec = measure(step, device, s.repeats)
    n_targets = int(rows.numel())
    lengths = [T] * B
    flops = (training_flops(Shape.from_config(student.config), lengths, head_rows=n_targets)
             + forward_flops(Shape.from_config(teacher.config), lengths, head_rows=n_targets))
    rec.update(_rate(flops, rec["seconds"], peak), tokens_per_s=B * T / rec["seconds"],
               target_tokens_per_s=n_targets / rec["seconds"])
    student.requires_grad_(False)
    student.eval()
    return {"batch": B, "seq": T, "tokens_per_step": B * T, "target_tokens_per_step": n_targets,
            "optimizer": "torch.optim.AdamW" + (" (fused)" if device.type == "cuda" else ""),
            "losses_finite": all(math.isfinite(x) for x in losses), "step": rec}


# --------------------------------------------------------------------------- driver


def goals(result: dict) -> list[dict]:
    rows = []
    if "saliency" in result:
        both = result["saliency"]["both"]
        rows.append({"goal": "saliency ≥ 10× the reference loop", "value": both["speedup"],
                     "met": both["speedup"] >= GOALS["saliency_speedup"]})
        rows.append({"goal": "saliency ≥ 40% MFU", "value": both["batched"]["mfu"],
                     "met": both["batched"]["mfu"] >= GOALS["saliency_mfu"]})
    if "kl" in result:
        m = result["kl"]["methods"]
        best = min(("chunked", "chunked_lm_head"), key=lambda k: m[k]["peak_mem_bytes"])
        rows.append({"goal": f"chunked KL ({best}) faster than naive", "value": m[best]["time_ratio"],
                     "met": m[best]["time_ratio"] < 1.0})
        rows.append({"goal": f"chunked KL ({best}) ≤ 1/5 of naive's memory", "value": m[best]["memory_ratio"],
                     "met": m[best]["memory_ratio"] <= GOALS["kl_memory_ratio"]})
    if "distill" in result:
        mfu = result["distill"]["step"]["mfu"]
        rows.append({"goal": "distillation step ≥ 40% MFU", "value": mfu, "met": mfu >= GOALS["distill_mfu"]})
    return rows


def run_gpu_bench(*, smoke: bool = False, out: str | None = None, device: str | None = None,
                  sections: tuple[str, ...] | None = None, threads: int | None = None, console=None) -> dict:
    """Run the sections, print the tables, write the JSON (``out``); returns the result dict.

    ``threads``: torch CPU threads (default: 1 with ``--smoke``, so a shared machine does not stall it at
    thread barriers; else torch's default)."""
    if threads or smoke:
        torch.set_num_threads(threads or 1)
    s = smoke_settings() if smoke else gpu_settings()
    if sections:
        unknown = set(sections) - set(s.sections)
        if unknown:
            raise ValueError(f"unknown sections {sorted(unknown)}; choose from {list(s.sections)}")
        s.sections = tuple(sections)
    dev = torch.device(device or ("cpu" if smoke else "cuda"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench gpu: no CUDA device here; `--smoke` runs the same code on tiny shapes on CPU")
    dtype = getattr(torch, s.dtype)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    log = console.print if console is not None else print
    t_start = time.perf_counter()
    result: dict = {"meta": {
        "mode": "smoke" if smoke else "gpu", "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "dtype": s.dtype, "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "repeats": s.repeats, "sections": list(s.sections)}}
    try:
        import transformers
        result["meta"]["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is required by build_model anyway
        pass
    peak = matmul_peak(dev, dtype, n=s.peak_n, iters=10, min_seconds=0.05 if dev.type == "cuda" else 0.0)
    result["peak"] = peak
    log(f"bench gpu ({result['meta']['mode']}): {dev} {result['meta']['device_name']}, {s.dtype}, "
        f"matmul peak {peak['flops_per_s'] / 1e12:.2f} TFLOP/s (n={peak['n']})")
    models = {}
    if {"saliency", "distill"} & set(s.sections):
        for role, sizes, seed in (("student", s.student, s.seed), ("teacher", s.teacher, s.seed + 1)):
            t0 = time.perf_counter()
            models[role] = build_model(sizes, dev, dtype, seed)
            n = sum(p.numel() for p in models[role].parameters())
            log(f"  {role}: {n / 1e9:.3f} B parameters, built in {time.perf_counter() - t0:.1f} s")
    if "saliency" in s.sections:
        t0 = time.perf_counter()
        result["saliency"] = bench_saliency(models, s, dev, peak["flops_per_s"])
        log(f"  saliency: {time.perf_counter() - t0:.1f} s")
    if "kl" in s.sections:
        t0 = time.perf_counter()
        result["kl"] = bench_kl(s, dev, dtype)
        log(f"  kl: {time.perf_counter() - t0:.1f} s")
    if "distill" in s.sections:
        t0 = time.perf_counter()
        result["distill"] = bench_distill(models, s, dev, peak["flops_per_s"])
        log(f"  distill: {time.perf_counter() - t0:.1f} s")
    result["goals"] = goals(result)
    result["meta"]["wall_s"] = time.perf_counter() - t_start
    print_tables(result, console)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2), encoding="utf-8")
        log(f"wrote {out}")
    return result


def _rate_str(flops_per_s: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if flops_per_s >= scale:
            return f"{flops_per_s / scale:.2f} {unit}"
    return f"{flops_per_s:.0f}"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**26 else f"{n / 2**20:.1f} MiB"


def print_tables(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    # Console.print(width=) cannot exceed the console's width: a wider console on the same file.
    console = Console(file=console.file, width=max(console.width, 132), no_color=console.no_color)
    smoke = result["meta"]["mode"] == "smoke"
    peak = result["peak"]["flops_per_s"]
    note = " [smoke: tiny shapes on CPU, not a GPU figure]" if smoke else ""
    if "saliency" in result:
        sal = result["saliency"]
        t = Table(title=f"saliency: batched frozen vs reference loop, {sal['samples']} samples, "
                        f"{sal['tokens']} tokens ({sal['real_token_fraction']:.0%} of batched tokens real){note}")
        for col in ("model", "method", "samples/s", "× reference", "FLOP/s", "MFU", "peak mem",
                    "max rel Δg"):
            t.add_column(col, justify="left" if col in ("model", "method") else "right")
        for role in ("student", "teacher", "both"):
            rec = sal["models"][role] if role != "both" else sal["both"]
            for method in ("reference", "batched"):
                m = rec[method]
                t.add_row(role, method, f"{m['samples_per_s']:.2f}",
                          f"{rec['speedup']:.2f}×" if method == "batched" else "",
                          _rate_str(m["flops_per_s"]), f"{m['mfu']:.1%}", _gib(m["peak_mem_bytes"]),
                          f"{rec['max_rel_diff']:.1e}" if method == "batched" and "max_rel_diff" in rec else "")
        console.print(t)
    if "kl" in result:
        kl = result["kl"]
        t = Table(title=f"hybrid KL + backward, T={kl['positions']}, V={kl['vocab']}, H={kl['hidden']}, "
                        f"{kl['dtype']}{note}")
        for col in ("method", "ms", "× naive time", "peak mem", "× naive memory", "loss rel Δ"):
            t.add_column(col, justify="left" if col == "method" else "right")
        for name, m in kl["methods"].items():
            t.add_row(name, f"{m['ms']:.1f}", f"{m['time_ratio']:.3f}" if "time_ratio" in m else "",
                      _gib(m["peak_mem_bytes"]), f"{m['memory_ratio']:.3f}" if "memory_ratio" in m else "",
                      f"{m['loss_rel_diff']:.1e}" if "loss_rel_diff" in m else "")
        console.print(t)
        console.print("anchor (Liger, H100, chunked distillation loss): 60.7 ms vs 213 ms naive, "
                      "11.1 GB vs 68.9 GB")
    if "distill" in result:
        d = result["distill"]
        m = d["step"]
        t = Table(title=f"distillation step: student + frozen teacher, batch {d['batch']} × {d['seq']}, "
                        f"{d['optimizer']}{note}")
        for col in ("step s", "tokens/s", "target tokens/s", "FLOP/s", "MFU", "peak mem"):
            t.add_column(col, justify="right")
        t.add_row(f"{m['seconds']:.3f}", f"{m['tokens_per_s']:.0f}", f"{m['target_tokens_per_s']:.0f}",
                  _rate_str(m["flops_per_s"]), f"{m['mfu']:.1%}", _gib(m["peak_mem_bytes"]))
        console.print(t)
    t = Table(title="goals (issue 13, one H200)" + (" — not applicable to --smoke" if smoke else ""))
    for col in ("goal", "value", "met"):
        t.add_column(col)
    for g in result["goals"]:
        value = g["value"]
        t.add_row(g["goal"], f"{value:.1%}" if "MFU" in g["goal"] else f"{value:.3f}",
                  "n/a" if smoke else ("yes" if g["met"] else "NO"))
    console.print(t)
    console.print(f"matmul peak {_rate_str(peak)}FLOP/s ({result['peak']['dtype']}, n={result['peak']['n']}); "
                  f"wall {result['meta']['wall_s']:.1f} s")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m leaf_ray.bench.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU in fp32 (checks the code runs)")
    parser.add_argument("--out", help="write the results as JSON to this path")
    parser.add_argument("--device", help="torch device (default: cuda; cpu with --smoke)")
    parser.add_argument("--sections", help="comma-separated subset of saliency,kl,distill")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default 1 with --smoke)")
    args = parser.parse_args(argv)
    sections = tuple(x.strip() for x in args.sections.split(",") if x.strip()) if args.sections else None
    return run_gpu_bench(smoke=args.smoke, out=args.out, device=args.device, sections=sections,
                         threads=args.threads)


if __name__ == "__main__":
    main(sys.argv[1:])
