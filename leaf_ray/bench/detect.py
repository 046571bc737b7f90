"""`leaf-ray bench detect`: Stage 1 saliency, this pipeline vs a naive loop mirroring the reference release.

Same samples (instruction level, the demo corpus) and the same models for every method; two pairs: the tiny
pair, and a larger random pair (teacher 6 layers x 512 hidden, student 4 x 256) sharing the tiny tokenizer.

Methods, each in its own fresh subprocess (so its peak memory is its own and nothing is warm from another):

- ``batched``: the pipeline's own code without Ray: ``tokenise_units`` then the student's and the teacher's
  ``SaliencyScorer`` on padded batches (eval mode, frozen parameters, gradient w.r.t. the input embeddings
  only).
- ``grouped``: ``batched`` with the pipeline's default ``detection.max_padding``: each batch split into length
  groups (padded tokens ≤ (1 + max_padding) × real tokens), one pass each — what the actors do by default.
- ``naive``: :func:`naive_saliency`, the reference release's loop (``run_gradients_*_instruct_level.py``): one
  sample and one model at a time, ``model.train()``, every parameter requiring grad, ``loss.backward()`` (all
  parameter gradients computed, never used), the HF ``labels`` loss over all logits, the instruction found by
  decoding token by token. Its embedding gradient is kept with ``retain_grad()`` (the release reads ``.grad``
  of a non-leaf tensor, which is None: we keep its cost, not its bug).
- ``pipeline``: ``run_detection`` end to end on a fresh local Ray (read, tokenise, both actor pools, score,
  prune, commit Parquet). Its time includes the actors' start and model loading; Ray's own start is excluded.

samples/s = instructions scored by both models per second of wall time, models loaded before the clock
starts (``batched``, ``naive``). The machine is shared, so every method runs ``rounds`` times, rounds
interleaved (naive, batched, pipeline, naive, ...), each after one warm-up batch/sample, and the fastest is
kept. ``CPU s/sample`` is the process CPU time (all threads) per sample, also the fastest. With one torch
thread it hardly moves with other load on the machine (use ``--threads 1`` on a busy machine); with several,
threads spinning at barriers while descheduled inflate it, most for the naive loop's many small operations.

Machine peak and FLOPs: every method's subprocess also measures the fp32 matmul peak of this machine with the
same torch threads (:func:`leaf_ray.bench.flops.matmul_peak`, the fastest 1024×1024 product), and each
method's *required* FLOPs are counted from the model shapes and the tokenised samples
(:func:`leaf_ray.bench.flops.saliency_flops`: forward + input-only backward of every real token of both
models, the LM head only at the rows that predict a loss target). Both methods are charged the same FLOPs
(the naive loop's parameter gradients, full-vocabulary logits and the batched pass's padding are waste, not
work), so ``% of peak`` = required FLOP/s ÷ peak compares how much of the machine each method uses.

Memory: ``peak RSS`` is ``getrusage(RUSAGE_SELF).ru_maxrss`` of the method's subprocess at the end
(interpreter, torch, both models and the scoring peak); ``after load`` is its current RSS once the models are
loaded, before any scoring; their difference bounds the scoring working set from below (it is exact unless
loading itself peaked higher). For ``pipeline`` the work runs in Ray worker processes, so no single-process
peak is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

LARGER_TEACHER = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                      num_key_value_heads=4)
LARGER_STUDENT = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2)
TARGETS = {"tiny": 10.0, "larger": 3.0}  # issue 3: speed-up over the naive loop on 2 CPU cores


@dataclass
class Measurement:
    """The fastest of the rounds of one (pair, method)."""

    pair: str
    method: str
    samples: int
    wall_s: float
    cpu_s: float | None  # None for `pipeline`: its CPU time is spread over Ray worker processes
    peak_rss_mb: float | None
    loaded_rss_mb: float | None
    first_scores: dict | None = None
    steady_samples_per_s: float | None = None  # pipeline only: between its first and last committed part
    flops: float | None = None                # required FLOPs of scoring the samples (both models)
    peak_flops_per_s: float | None = None     # fp32 matmul peak measured in the method's process

    @property
    def flops_per_s(self) -> float | None:
        return self.flops / self.wall_s if self.flops and self.wall_s > 0 else None

    @property
    def peak_fraction(self) -> float | None:
        rate = self.flops_per_s
        return rate / self.peak_flops_per_s if rate and self.peak_flops_per_s else None

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.wall_s if self.wall_s > 0 else float("nan")

    def merge(self, other: "Measurement") -> "Measurement":
        """Keep the fastest wall and CPU time of two rounds (and the larger peak)."""
        self.wall_s = min(self.wall_s, other.wall_s)
        if other.cpu_s is not None:
            self.cpu_s = min(self.cpu_s, other.cpu_s) if self.cpu_s is not None else other.cpu_s
        if other.peak_rss_mb is not None:
            self.peak_rss_mb = max(self.peak_rss_mb or 0.0, other.peak_rss_mb)
        if other.steady_samples_per_s is not None:
            self.steady_samples_per_s = max(self.steady_samples_per_s or 0.0, other.steady_samples_per_s)
        if other.peak_flops_per_s is not None:
            self.peak_flops_per_s = max(self.peak_flops_per_s or 0.0, other.peak_flops_per_s)
        self.flops = self.flops or other.flops
        return self


# --------------------------------------------------------------------------- models and samples


def build_pairs(root: Path) -> dict[str, dict[str, str]]:
    """The tiny pair and the larger random pair (same tokenizer), saved once under `root` and reused."""
    from leaf_ray.tiny_models import make_tiny_model, make_tiny_pair, train_tiny_tokenizer

    pairs = {"tiny": {r: str(root / "tiny" / r) for r in ("teacher", "student")},
             "larger": {r: str(root / "larger" / r) for r in ("teacher", "student")}}
    if not all(Path(p).is_dir() for p in pairs["tiny"].values()):
        make_tiny_pair(root / "tiny")
    if not all(Path(p).is_dir() for p in pairs["larger"].values()):
        tok = train_tiny_tokenizer()
        for role, sizes, seed in (("teacher", LARGER_TEACHER, 0), ("student", LARGER_STUDENT, 1)):
            make_tiny_model(tok, seed=seed, **sizes).save_pretrained(pairs["larger"][role])
            tok.save_pretrained(pairs["larger"][role])
    return pairs


def write_samples(path: Path, n: int, seed: int) -> list[dict]:
    """`n` demo problems in the clean schema (what ingest writes), as JSON for the workers."""
    from leaf_ray.data.demo_corpus import generate_problems

    rows = [{"sample_id": p["id"], "instruction": p["instruction"], "output": p["output"],
             "answer": p["answer"], "split": "train", "source": "bench", "row": i}
            for i, p in enumerate(generate_problems(n, seed))]
    path.write_text(json.dumps(rows), encoding="utf-8")
    return rows


# --------------------------------------------------------------------------- the two saliency paths


def naive_saliency(model, tokenizer, instruction: str, output: str):
    """The reference release's per-sample step, one model: (scored-token norms, their token strings).

    As the release does: train mode, every parameter requiring grad and accumulating its gradient (never
    zeroed), the HF `labels` loss over the full logits, the span found by decoding token after token up to
    `<|im_end|>` after the role line, token strings decoded one by one. The one change: the
    embedding output keeps its gradient (`retain_grad`), which the release forgot.
    """
    import torch

    from leaf_ray.data.chat import render

    model.train()
    model.requires_grad_(True)
    rendered = render(tokenizer, instruction, output)
    ids = torch.tensor([rendered.input_ids])
    labels = torch.where(torch.tensor([rendered.target_mask]).bool(), ids, torch.full_like(ids, -100))
    opened = start = end = None
    for pos, token_id in enumerate(rendered.input_ids):
        piece = tokenizer.decode([token_id])
        if piece.strip() == "<|im_start|>" and opened is None:
            opened = pos
        elif opened is not None and start is None and "\n" in piece:
            start = pos + 1  # the instruction starts after the role line
        elif piece.strip() == "<|im_end|>" and start is not None:
            end = pos
            break
    embeds = model.get_input_embeddings()(ids)
    embeds.retain_grad()
    loss = model(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), labels=labels).loss
    loss.backward()  # HF shifts: logits at t-1 predict label t
    norms = embeds.grad[0, start:end].norm(dim=-1)
    tokens = [tokenizer.decode([t]).strip() for t in rendered.input_ids[start:end]]
    return norms, tokens


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def run_worker(method: str, pair: dict[str, str], samples: list[dict], batch_size: int, repeats: int,
               threads: int) -> dict:
    """One method, timed in this process (a fresh subprocess started by `run_bench`)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import torch

    from leaf_ray.bench.flops import matmul_peak
    from leaf_ray.config import DetectionConfig, ModelRef
    from leaf_ray.detect.stages import SaliencyScorer, tokenise_units
    from leaf_ray.models import load_model
    from leaf_ray.raycluster import cached_tokenizer

    torch.set_num_threads(threads)
    peak = matmul_peak("cpu", torch.float32, n=1024, iters=10)["flops_per_s"]  # same threads as the method
    refs = {role: ModelRef(path=pair[role]) for role in ("student", "teacher")}
    table = pa.Table.from_pylist(samples)
    response_off = {"enabled": False, "step_pattern": r"\n\s*\n", "num_segments": 3}
    flops = required_flops(pair, tokenise_units(table, student=refs["student"].model_dump(),
                                                instruction_level=True, response=response_off,
                                                done=frozenset()))

    if method in ("batched", "grouped"):
        max_padding = DetectionConfig().max_padding if method == "grouped" else None
        scorers = [SaliencyScorer(role, refs[role].model_dump(), dtype="float32",
                                  gradient_checkpointing=False, num_gpus=0, max_memory_per_gpu=None,
                                  own_tokenizer=False, max_padding=max_padding)
                   for role in ("student", "teacher")]
        loaded = _rss_mb()

        def run(rows: pa.Table) -> pa.Table:
            # As in the pipeline: one block tokenised (and length-sorted), then actor batches of `batch_size`.
            units = tokenise_units(rows, student=refs["student"].model_dump(), instruction_level=True,
                                   response=response_off, done=frozenset())
            outs = []
            for start in range(0, units.num_rows, batch_size):
                batch = units.slice(start, batch_size)
                for scorer in scorers:
                    batch = scorer(batch)
                outs.append(batch)
            return pa.concat_tables(outs)

        def first_scores(result: pa.Table) -> dict:
            row = result.filter(pc.equal(result["sample_id"], samples[0]["sample_id"])).to_pylist()[0]
            return {c: row[c] for c in ("student_grad_norm", "teacher_grad_norm")}

        run(table.slice(0, batch_size))  # warm-up
    elif method == "naive":
        models = {role: load_model(refs[role]) for role in ("student", "teacher")}
        tokenizer = cached_tokenizer(refs["student"].model_dump_json())
        loaded = _rss_mb()

        def run_one(row: dict) -> dict:
            return {f"{role}_grad_norm": naive_saliency(models[role], tokenizer, row["instruction"],
                                                        row["output"])[0].tolist()
                    for role in ("student", "teacher")}

        def run(rows: pa.Table) -> list[dict]:
            return [run_one(row) for row in rows.to_pylist()]

        def first_scores(result: list[dict]) -> dict:
            return result[0]

        run(table.slice(0, 1))  # warm-up
    else:
        raise ValueError(f"unknown method {method!r}")
    wall, cpu, result = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        result = run(table)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"wall_s": min(wall), "cpu_s": min(cpu), "peak_rss_mb": _peak_rss_mb(), "loaded_rss_mb": loaded,
            "first_scores": first_scores(result), "flops": flops, "peak_flops_per_s": peak}


def required_flops(pair: dict[str, str], units) -> float:
    """FLOPs both models need to score these tokenised units: forward + input-only backward of every real
    token, LM head at the target-predicting rows (:mod:`leaf_ray.bench.flops`; both share the tokenizer)."""
    from transformers import AutoConfig

    from leaf_ray.bench.flops import Shape, saliency_flops

    rows = [r for r in units.select(["input_ids", "target_mask"]).to_pylist() if r["input_ids"]]
    lengths = [len(r["input_ids"]) for r in rows]
    targets = sum(int(sum(r["target_mask"])) for r in rows)
    return sum(saliency_flops(Shape.from_config(AutoConfig.from_pretrained(pair[role], local_files_only=True)),
                              lengths, targets) for role in ("student", "teacher"))


def run_pipeline_worker(pair: dict[str, str], samples: list[dict], batch_size: int, workdir: Path) -> dict:
    """`run_detection` on a fresh local Ray; the clock starts after Ray is up."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from leaf_ray.config import config_from_dict
    from leaf_ray.detect.pipeline import run_detection
    from leaf_ray.raycluster import init_ray

    pool = {"batch_size": batch_size, "num_cpus": 0.5}  # 2 cores: 1 CPU left for read/tokenise/commit tasks
    cfg = config_from_dict({
        "run": {"name": "pipeline", "root_dir": str(workdir)}, "ray": {"num_cpus": os.cpu_count() or 2},
        "models": {"teacher": {"path": pair["teacher"]}, "student": {"path": pair["student"]},
                   "make_tiny_if_missing": False},
        # One batch per part: the teacher pool starts on a block while the student pool scores the next.
        "detection": {"student_pool": pool, "teacher_pool": pool, "units_per_part": batch_size}}, "bench")
    clean = cfg.run.dir / "data" / "clean"
    clean.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(samples), clean / "part-0.parquet")
    init_ray(cfg)
    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    t0 = time.perf_counter()
    report = run_detection(cfg)
    seconds = time.perf_counter() - t0
    ray.shutdown()
    if report.scores != len(samples):
        raise RuntimeError(f"pipeline scored {report.scores} of {len(samples)} samples")
    # Steady state: units committed after the first part over the time from the first to the last commit
    # (actor start and model loading excluded).
    parts = sorted((p.stat().st_mtime, pq.read_metadata(p).num_rows) for p in report.out_dir.glob("scores/*"))
    steady = (sum(n for _, n in parts[1:]) / (parts[-1][0] - parts[0][0])
              if len(parts) > 1 and parts[-1][0] > parts[0][0] else None)
    return {"wall_s": seconds, "cpu_s": None, "peak_rss_mb": None, "loaded_rss_mb": None,
            "first_scores": None, "steady_samples_per_s": steady}


# --------------------------------------------------------------------------- small jobs, whole processes


def naive_script(pair: dict[str, str], samples: list[dict], out: Path) -> None:
    """The reference release's way as one script: load both models, score every sample with
    :func:`naive_saliency`, write the norms to Parquet. Timed from outside, interpreter start included."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from leaf_ray.config import ModelRef
    from leaf_ray.models import load_model, load_tokenizer

    refs = {role: ModelRef(path=pair[role]) for role in ("student", "teacher")}
    models = {role: load_model(refs[role]) for role in refs}
    tokenizer = load_tokenizer(refs["student"])
    rows = [{"sample_id": s["sample_id"], **{f"{role}_grad_norm": naive_saliency(
        models[role], tokenizer, s["instruction"], s["output"])[0].tolist() for role in models}} for s in samples]
    pq.write_table(pa.Table.from_pylist(rows), out)


def time_small_job(pair: dict[str, str], samples: list[dict], workdir: Path, timeout_s: float) -> dict[str, float]:
    """Wall seconds of the whole job, from the command to the written Parquet: `leaf-ray ingest` then
    `leaf-ray detect` (a fresh local Ray each, as a user runs them) vs :func:`naive_script` in one process."""
    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    samples_file = workdir / "samples.json"
    samples_file.write_text(json.dumps(samples), encoding="utf-8")
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    _spawn(["worker", "--method", "naive-script", "--student", pair["student"], "--teacher", pair["teacher"],
            "--samples", str(samples_file), "--batch-size", "1", "--workdir", str(workdir)], timeout_s)
    naive = time.perf_counter() - t0
    jsonl = workdir / "input.jsonl"
    jsonl.write_text("".join(json.dumps({"id": s["sample_id"], "instruction": s["instruction"],
                                         "output": s["output"], "answer": s["answer"]}) + "\n" for s in samples))
    pool = {"batch_size": 8, "num_cpus": 0.5}
    config = workdir / "config.yaml"
    shutil.rmtree(workdir / "runs", ignore_errors=True)
    config.write_text(yaml.safe_dump({
        "run": {"name": "small-job", "root_dir": str(workdir / "runs")}, "ray": {"num_cpus": os.cpu_count() or 2},
        "models": {"teacher": {"path": pair["teacher"]}, "student": {"path": pair["student"]},
                   "make_tiny_if_missing": False},
        "data": {"paths": [str(jsonl)], "validation_fraction": 0.0},
        "tracking": {"enabled": False},
        "detection": {"student_pool": pool, "teacher_pool": pool}}))
    seconds = {"naive, whole process": naive}
    for verb in ("ingest", "detect"):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "leaf_ray.cli", verb, "--config", str(config)], env=env,
                              capture_output=True, text=True, timeout=timeout_s, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"leaf-ray {verb} failed ({proc.returncode}):\n{proc.stdout[-2000:]}"
                               f"{proc.stderr[-2000:]}")
        seconds[f"leaf-ray {verb}"] = time.perf_counter() - t0
    return seconds


# --------------------------------------------------------------------------- the driver


def _spawn(args: list[str], timeout_s: float) -> dict:
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"),
               RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false")
    env.pop("RAY_ADDRESS", None)  # the pipeline method starts its own local instance
    proc = subprocess.run([sys.executable, "-m", "leaf_ray.bench.detect", *args], env=env,
                          capture_output=True, text=True, timeout=timeout_s, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench worker {args[:4]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def run_bench(cfg, console, *, samples: int = 32, batch_size: int | None = None, rounds: int = 2,
              repeats: int = 1, threads: int | None = None, pairs: tuple[str, ...] = ("tiny", "larger"),
              pipeline: bool = True, small_job: bool = True, timeout_s: float = 3600) -> list[Measurement]:
    """Measure every (pair, method), print the table with ratios against the naive loop, return the rows."""
    root = cfg.run.dir / "bench-detect"
    root.mkdir(parents=True, exist_ok=True)
    batch_size = batch_size or cfg.detection.student_pool.batch_size
    threads = threads or os.cpu_count() or 1
    model_dirs = build_pairs(root / "models")
    samples_file = root / "samples.json"
    write_samples(samples_file, samples, cfg.run.seed)
    load = os.getloadavg()[0]
    console.print(f"bench detect: {samples} samples, batch {batch_size}, {threads} torch threads, {rounds} "
                  f"rounds x {repeats} repeats (fastest kept), {os.cpu_count()} CPUs, load average "
                  f"{load:.1f}")
    methods = ["naive", "batched", "grouped"] + (["pipeline"] if pipeline else [])
    best: dict[tuple[str, str], Measurement] = {}
    for round_index in range(rounds):
        for pair in pairs:
            for method in methods:
                with tempfile.TemporaryDirectory(dir=root) as work:
                    out = _spawn(["worker", "--method", method, "--student", model_dirs[pair]["student"],
                                  "--teacher", model_dirs[pair]["teacher"], "--samples", str(samples_file),
                                  "--batch-size", str(batch_size), "--repeats", str(repeats),
                                  "--threads", str(threads), "--workdir", work], timeout_s)
                m = Measurement(pair=pair, method=method, samples=samples, **out)
                cpu = f"  {m.cpu_s / samples:.3f} CPU s/sample" if m.cpu_s is not None else ""
                if m.steady_samples_per_s:
                    cpu = f"  ({m.steady_samples_per_s:.2f} samples/s between first and last commit)"
                console.print(f"  round {round_index + 1} {pair:6s} {method:8s} {m.samples_per_s:7.2f} "
                              f"samples/s{cpu}")
                best[(pair, method)] = best[(pair, method)].merge(m) if (pair, method) in best else m
    results = [best[(pair, method)] for pair in pairs for method in methods]
    for m in results:  # the pipeline scores the same units; its actors run with the same threads
        if m.flops is None and (m.pair, "batched") in best:
            m.flops = best[(m.pair, "batched")].flops
            m.peak_flops_per_s = best[(m.pair, "batched")].peak_flops_per_s
    for m in [r for r in results if r.steady_samples_per_s]:  # a row for the pipeline past its start-up
        results.insert(results.index(m) + 1, Measurement(
            pair=m.pair, method="pipeline, steady", samples=m.samples,
            wall_s=m.samples / m.steady_samples_per_s, cpu_s=None, peak_rss_mb=None, loaded_rss_mb=None,
            flops=m.flops, peak_flops_per_s=m.peak_flops_per_s))
    print_table(console, results)
    if small_job:
        print_small_job(console, {pair: min_each(time_small_job(model_dirs[pair], json.loads(
            samples_file.read_text()), root / "small-job" / pair, timeout_s) for _ in range(rounds))
            for pair in pairs}, samples)
    console.print(f"load average now {os.getloadavg()[0]:.1f} (other processes share these CPUs)")
    return results


def min_each(rounds) -> dict[str, float]:
    rounds = list(rounds)
    return {k: min(r[k] for r in rounds) for k in rounds[0]}


def print_small_job(console, seconds: dict[str, dict[str, float]], samples: int) -> None:
    from rich.table import Table

    table = Table(title=f"Small job: {samples} samples, whole job wall time (start-up and model loading included)")
    for col in ("pair", "naive, whole process (s)", "leaf-ray detect (s)", "× naive", "leaf-ray ingest (s)",
                "ingest + detect × naive"):
        table.add_column(col, justify="left" if col == "pair" else "right")
    for pair, row in seconds.items():
        naive, detect, ingest = row["naive, whole process"], row["leaf-ray detect"], row["leaf-ray ingest"]
        table.add_row(pair, f"{naive:.1f}", f"{detect:.1f}", f"{detect / naive:.2f}×", f"{ingest:.1f}",
                      f"{(ingest + detect) / naive:.2f}×")
    console.print(table)
    console.print("naive, whole process: one Python process loading both models and scoring every sample the "
                  "reference's way, to Parquet. leaf-ray detect: the command, from its start to the committed "
                  "Parquet (a job this small runs inline: detection.inline_max_samples). leaf-ray ingest: the "
                  "command before it, which validates the input the naive script takes on trust (inline too: "
                  "data.inline_max_bytes). Goal (issue 13): detect ≤ 1× naive.")


def print_table(console, results: list[Measurement]) -> None:
    import torch
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Stage 1 saliency: this pipeline vs the reference-style loop (teacher + student)")
    for col in ("pair", "method", "samples/s", "× naive", "CPU s/sample", "× naive (CPU)", "GFLOP/s",
                "% of peak", "peak RSS MB", "RSS loaded MB", "target (wall)"):
        table.add_column(col, justify="right" if col not in ("pair", "method") else "left")
    for m in results:
        naive = next(r for r in results if r.pair == m.pair and r.method == "naive")
        ratio = m.samples_per_s / naive.samples_per_s
        cpu_ratio = naive.cpu_s / m.cpu_s if m.cpu_s and naive.cpu_s else None
        target = ""
        if m.method != "naive" and m.pair in TARGETS:
            target = f"≥{TARGETS[m.pair]:g}× {'met' if ratio >= TARGETS[m.pair] else 'missed'}"
        table.add_row(m.pair, m.method, f"{m.samples_per_s:.2f}", f"{ratio:.1f}×",
                      f"{m.cpu_s / m.samples:.3f}" if m.cpu_s is not None else "n/a",
                      f"{cpu_ratio:.1f}×" if cpu_ratio else "n/a",
                      f"{m.flops_per_s / 1e9:.2f}" if m.flops_per_s else "n/a",
                      f"{m.peak_fraction:.1%}" if m.peak_fraction else "n/a",
                      f"{m.peak_rss_mb:.0f}" if m.peak_rss_mb else "n/a",
                      f"{m.loaded_rss_mb:.0f}" if m.loaded_rss_mb else "n/a", target)
    # Console.print(width=) cannot exceed the console's width: a wider console on the same file, so a narrow
    # terminal wraps lines instead of cutting numbers.
    Console(file=console.file, width=max(console.width, 144), no_color=console.no_color).print(table)
    peaks = [m.peak_flops_per_s for m in results if m.peak_flops_per_s]
    if peaks:
        console.print(f"peak: fp32 1024×1024 matmul with the same torch threads, {min(peaks) / 1e9:.1f}–"
                      f"{max(peaks) / 1e9:.1f} GFLOP/s over the methods' processes; GFLOP/s = required FLOPs "
                      "(forward + input-only backward, both models, from the shapes) per wall second; "
                      "% of peak against the peak measured in the same process. Goal (issue 13): ≥ 50% for "
                      "the larger pair.")
    console.print("pipeline: end to end after Ray is up (actor start and model loading included); "
                  "pipeline, steady: between its first and last committed part. n/a: that work runs in Ray "
                  "worker processes (no single-process CPU time or peak). target: samples/s ratio over the "
                  "naive loop (issue 3).")
    for pair in dict.fromkeys(m.pair for m in results):
        a = next(r for r in results if r.pair == pair and r.method == "batched").first_scores
        b = next(r for r in results if r.pair == pair and r.method == "naive").first_scores
        diff = max(float((torch.tensor(a[k]) - torch.tensor(b[k])).abs().max()) for k in a)
        console.print(f"{pair}: max |g_batched - g_naive| on the first sample = {diff:.2e} (same scores)")


def _worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="leaf_ray.bench.detect worker")
    parser.add_argument("--method", required=True, choices=["naive", "batched", "grouped", "pipeline",
                                                             "naive-script"])
    parser.add_argument("--student", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--samples", required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args(argv)
    samples = json.loads(Path(args.samples).read_text(encoding="utf-8"))
    pair = {"student": args.student, "teacher": args.teacher}
    if args.method == "naive-script":
        naive_script(pair, samples, Path(args.workdir) / "naive_scores.parquet")
        out = {}
    elif args.method == "pipeline":
        out = run_pipeline_worker(pair, samples, args.batch_size, Path(args.workdir))
    else:
        out = run_worker(args.method, pair, samples, args.batch_size, args.repeats, args.threads)
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        _worker_main(sys.argv[2:])
    else:
        raise SystemExit("usage: leaf-ray bench detect (this module's `worker` mode is internal)")
