"""`leaf-ray bench distill`: this trainer's step vs a loop mirroring the reference release, side by side.

1. Throughput. On the same rows and models, in one process, after warm-up steps:
   - *this trainer*: :meth:`leaf_ray.distill.trainer.DistillRecipe.train_step` itself (a DeepSpeed engine, the grouping
     sampler, dynamic padding, the chunked hybrid KL);
   - *reference-style loop*: what the LeaF release's distillation does per step: every sequence padded to
     ``data.max_length``, teacher and student logits over the whole padded batch, the KL computed on the full
     ``[B, T, V]`` fp32 tensors at once (no chunking), masked afterwards; same optimizer and engine.
   - *on-policy step* (``distill.policy: on``, issue 28): the same ``train_step`` whose micro-batches are the
     student's own samples (``distill.sampling``: transformers ``generate``, then the teacher scores the sampled
     tokens and the hybrid loss trains on them); its tokens are the sampled ones, its time includes generation.
   Reported: steady-state target tokens/s of all three, the ratio this trainer / reference (target ≥ 3×),
   the on-policy / off-policy ratio and the share of the on-policy step spent generating.
2. Loss memory. H4's :mod:`leaf_ray.bench.distill_memory`: peak memory of the loss at vocab ≥ 32k and
   sequence ≥ 2k, chunked vs naive (target ratio ≤ 0.25).

Rows come from ``<run dir>/data/clean`` (+ counterfactuals) when they exist, else from the built-in demo corpus
with synthetic counterfactuals (:func:`leaf_ray.data.demo_corpus.write_synthetic_inputs`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from leaf_ray.config import LeafConfig

# --------------------------------------------------------------------------- inputs


def bench_rows(cfg: LeafConfig, tokenizer, scratch: Path, n: int = 64):
    """Tokenised training rows: the run's own data when present, else the demo corpus + synthetic
    counterfactuals written under ``scratch``."""
    from leaf_ray.data.demo_corpus import write_synthetic_inputs
    from leaf_ray.distill.data import TokenizedRows, load_rows, tokenize_rows

    run_dir = cfg.run.dir
    if not (run_dir / "data" / "clean").exists():
        run_dir = scratch
        write_synthetic_inputs(run_dir, n=n, validation=0, response_level=False)
    variant = "leaf_instr" if cfg.distill.use_counterfactuals else "kd"
    if variant == "leaf_instr" and not (run_dir / "detect" / "counterfactuals").exists():
        variant = "kd"
    rows, _ = load_rows(run_dir, variant)
    rows = rows.filter(pa.compute.equal(rows.column("split"), "train"))
    cols = tokenize_rows(rows.to_pydict(), tokenizer, cfg.data.max_length)
    return TokenizedRows.from_batches([cols]), str(run_dir), variant


# --------------------------------------------------------------------------- the reference-style loop


def reference_kl(student_logits, teacher_logits, target_mask, temperature: float):
    """The reference's cost profile: full ``[B, T, V]`` fp32 log-softmaxes of both models, a KL per position,
    masked afterwards (the mask here is the correct shifted one; the cost is the same)."""
    import torch

    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits[..., : s.shape[-1]].float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1) * temperature**2  # [B, T]
    mask = target_mask[:, 1:].float()
    return (kl[:, :-1] * mask).sum() / mask.sum().clamp_min(1)


def reference_step(engine, teacher_model, rows, order, step: int, micro: int, accum: int, max_length: int,
                   pad_id: int, temperature: float) -> tuple[int, int, float]:
    """One optimizer step of the reference-style loop: fixed order, every row padded to ``max_length``."""
    import torch

    t0 = time.perf_counter()
    targets = real = 0
    for a in range(accum):
        start = ((step * accum + a) * micro) % len(order)
        idx = [order[(start + j) % len(order)] for j in range(micro)]
        input_ids = torch.full((micro, max_length), pad_id, dtype=torch.long)
        attention = torch.zeros((micro, max_length), dtype=torch.long)
        target = torch.zeros((micro, max_length), dtype=torch.long)
        for b, i in enumerate(idx):
            n = len(rows.input_ids[i])
            input_ids[b, :n] = torch.from_numpy(rows.input_ids[i].astype("int64"))
            attention[b, :n] = 1
            target[b, :n] = torch.from_numpy(rows.target_mask[i].astype("int64"))
        target[:, 0] = 0
        with torch.no_grad():
            teacher_logits = teacher_model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
        student_logits = engine(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
        loss = reference_kl(student_logits, teacher_logits, target, temperature)
        engine.backward(loss)
        engine.step()
        targets += int(target.sum())
        real += int(attention.sum())
    return targets, real, time.perf_counter() - t0


# --------------------------------------------------------------------------- the bench


@dataclass
class LoopTiming:
    name: str
    target_tokens: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    real_tokens: int = 0
    padded_tokens: int = 0
    sample_seconds: float = 0.0

    def add(self, target_tokens: int, seconds: float, cpu_seconds: float, *, real: int, padded: int) -> None:
        self.target_tokens += target_tokens
        self.seconds += seconds
        self.cpu_seconds += cpu_seconds
        self.real_tokens += real
        self.padded_tokens += padded

    @property
    def tokens_per_s(self) -> float:
        return self.target_tokens / self.seconds

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.target_tokens / self.cpu_seconds


def time_loops(cfg: LeafConfig, rows, *, steps: int, warmup: int) -> tuple[LoopTiming, LoopTiming, LoopTiming]:
    """The three loops on the same rows and models, each from the same initial student weights.

    Their steps are interleaved (one of ours, one on-policy, one of the reference's, ...) so that a machine
    whose load changes during the bench slows all alike; wall-clock and process CPU seconds are recorded."""
    from leaf_ray.distill.data import plan_epoch
    from leaf_ray.distill.engines import build_student, build_teacher
    from leaf_ray.distill.inline import local_process_group
    from leaf_ray.distill.onpolicy import build_sampler
    from leaf_ray.distill.trainer import DistillRecipe, World, accumulation_steps
    from leaf_ray.models import load_tokenizer

    local_process_group()  # DeepSpeed needs torch.distributed: one local gloo rank
    dcfg = cfg.distill
    micro = dcfg.micro_batch_size
    accum = accumulation_steps(dcfg.global_batch_size, micro, 1)
    tokenizer = load_tokenizer(cfg.models.student)
    pad_id = tokenizer.pad_token_id
    total = warmup + steps
    teacher = build_teacher(cfg, 1, accum, "cpu")
    ours_engine = build_student(cfg, 1, accum, total)
    ref_engine = build_student(cfg, 1, accum, total, with_loss=False)
    world = World(rank=0, size=1, accum=accum)
    recipe = DistillRecipe(cfg, world, engine=ours_engine, teacher=teacher, train_rows=rows, pad_id=pad_id)
    on_cfg = cfg.model_copy(deep=True)
    on_cfg.distill.policy = "on"
    on_engine = build_student(on_cfg, 1, accum, total)
    on_recipe = DistillRecipe(on_cfg, world, engine=on_engine, teacher=teacher, train_rows=rows, pad_id=pad_id,
                              sampler=build_sampler(on_cfg, on_engine, tokenizer, 0, 1))

    plans: list = []
    while sum(len(p.steps) for p in plans) < total:
        plans.append(plan_epoch(rows.group, rows.lengths, seed=cfg.run.seed, epoch=len(plans),
                                micro_batch_size=micro, accum_steps=accum, bucket_steps=dcfg.bucket_steps))
    schedule = [(p, s) for p in plans for s in range(len(p.steps))][:total]
    order = list(range(len(rows)))
    ours, on, ref = LoopTiming("this trainer"), LoopTiming("on-policy step"), LoopTiming("reference-style")
    for k, (plan, s) in enumerate(schedule):
        cpu0 = time.process_time()
        m = recipe.train_step(plan, s)
        cpu1 = time.process_time()
        n, real, sec = reference_step(ref_engine, teacher.model, rows, order, k, micro, accum, cfg.data.max_length,
                                      pad_id, dcfg.temperature)
        cpu2 = time.process_time()
        m_on = on_recipe.train_step(plan, s)
        cpu3 = time.process_time()
        if k < warmup:
            continue
        on.add(int(m_on["target_tokens"]), m_on["step_seconds"], cpu3 - cpu2, real=int(m_on["target_tokens"]),
               padded=int(m_on["target_tokens"]))
        on.sample_seconds += m_on["sample_seconds"]
        batches = [mb for slot in plan.steps[s] for mb in slot if mb is not None]
        ours.add(int(m["target_tokens"]), m["step_seconds"], cpu1 - cpu0,
                 real=sum(len(rows.input_ids[i]) for mb in batches for i in mb),
                 padded=sum(max(len(rows.input_ids[i]) for i in mb) * len(mb) for mb in batches))
        ref.add(n, sec, cpu2 - cpu1, real=real, padded=micro * accum * cfg.data.max_length)
    return ours, on, ref


def run_distill_bench(cfg: LeafConfig, console, *, steps: int = 10, warmup: int = 2, memory: bool = True,
                      threads: int | None = 1) -> dict:
    """Print (and return) the throughput table and, with ``memory``, the loss peak-memory table."""
    import tempfile

    import torch

    if threads:
        torch.set_num_threads(threads)

    from rich.table import Table

    from leaf_ray.models import load_tokenizer
    from leaf_ray.raycluster import for_workers
    from leaf_ray.tiny_models import ensure_tiny_pair

    cfg = for_workers(cfg)
    ensure_tiny_pair(cfg)
    tokenizer = load_tokenizer(cfg.models.student)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="leaf-ray-bench-") as scratch:
        rows, source, variant = bench_rows(cfg, tokenizer, Path(scratch))
        lengths = rows.lengths
        console.print(f"rows: {len(rows)} ({variant}, from {source}); length mean {lengths.mean():.0f}, max "
                      f"{lengths.max()}; max_length {cfg.data.max_length}; micro {cfg.distill.micro_batch_size} × "
                      f"accumulation {cfg.distill.global_batch_size // cfg.distill.micro_batch_size}; "
                      f"{warmup} warm-up + {steps} timed steps per loop; {torch.get_num_threads()} torch thread(s)")
        ours, on, ref = time_loops(cfg, rows, steps=steps, warmup=warmup)
    table = Table(title="Stage 2 step throughput (target tokens/s, after warm-up)")
    for col in ("loop", "targets", "wall s", "tok/s", "CPU s", "tok/CPU s", "real/pad"):
        table.add_column(col, justify="left" if col == "loop" else "right")
    for t in (ours, on, ref):
        table.add_row(t.name, str(t.target_tokens), f"{t.seconds:.2f}", f"{t.tokens_per_s:.1f}",
                      f"{t.cpu_seconds:.2f}", f"{t.tokens_per_cpu_s:.1f}",
                      f"{t.real_tokens / max(t.padded_tokens, 1):.2f}" if t is not on else "")
    ratio = ours.tokens_per_s / ref.tokens_per_s
    cpu_ratio = ours.tokens_per_cpu_s / ref.tokens_per_cpu_s
    table.add_row("[bold]ratio[/bold]", "", "", f"[bold]{ratio:.2f}×[/bold]", "", f"{cpu_ratio:.2f}×", "")
    console.print(table)
    console.print("this trainer = train_step: grouping sampler, dynamic padding, chunked hybrid KL from the "
                  "hidden states; reference-style = every row padded to data.max_length, full-vocab fp32 KL on "
                  "[B, T, V], no chunking; same models, rows, optimizer and DeepSpeed engine; steps interleaved. "
                  "targets / tok = target (response) tokens; CPU s = process CPU time (less sensitive to a busy "
                  "machine); real/pad = real tokens / tokens after padding.")
    console.print(f"target ≥ 3×: {'[green]met[/green]' if ratio >= 3 else '[red]not met[/red]'}")
    on_ratio = on.tokens_per_s / ours.tokens_per_s
    sampling = cfg.distill.sampling
    console.print(f"on-policy step (distill.policy=on, divergence {cfg.distill.divergence}): the student samples "
                  f"≤ {sampling.max_new_tokens} tokens per prompt at temperature {sampling.temperature} "
                  f"(transformers generate), the teacher scores them, the loss trains on them; tokens = sampled "
                  f"tokens; {on.tokens_per_s:.1f} tok/s = {on_ratio:.2f}× the off-policy step; generation "
                  f"{on.sample_seconds / on.seconds:.0%} of its time.")
    results["throughput"] = {"ours_tokens_per_s": ours.tokens_per_s, "reference_tokens_per_s": ref.tokens_per_s,
                             "ratio": ratio, "cpu_ratio": cpu_ratio, "on_policy_tokens_per_s": on.tokens_per_s,
                             "on_policy_over_off_policy": on_ratio,
                             "on_policy_generation_share": on.sample_seconds / on.seconds}
    if memory:
        from leaf_ray.bench import distill_memory

        results["memory"] = distill_memory.run_memory_bench(console)
    return results
