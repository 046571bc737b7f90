"""Host memory and checkpoint reads of loading a model on N ranks (``leaf-ray bench load``): today's way
(every rank ``from_pretrained``, then shard) beside the partitioned one (:mod:`leaf_ray.partitioned_load`).

Method (CPU, gloo; memory is measured, not time: the machine may be shared):

- a random Llama-shaped model is written once as fp32 safetensors (:func:`write_random_model`);
- each rank is its own fresh process (``python -m leaf_ray.bench.load --worker ...``) started with
  ``MALLOC_MMAP_THRESHOLD_=65536``, so that freed blocks are unmapped and resident memory follows live memory
  (as in :mod:`leaf_ray.bench.distill_memory`);
- inside, after the imports and the process group, a thread samples ``/proc/self/smaps_rollup`` every few
  milliseconds (``Pss``: this process's share of every page it maps, so a checkpoint page mapped by N ranks
  counts 1/N to each; ``Anonymous``: its private heap); the figures are the peaks minus the values just
  before the load;
- modes: ``gang`` (the sharded teacher of detection: load, then FSDP2 ``fully_shard``), ``zero3-teacher``
  (load, then ``deepspeed.initialize`` without optimizer), ``zero3-student`` (load, a client AdamW,
  ``deepspeed.initialize``). For the student, the peak of the load itself (model ready for DeepSpeed) is
  reported beside the peak through ``initialize``, whose ZeRO-3 optimizer adds its own fp32 partitions;
- bytes read: the partitioned way counts the bytes it ``pread``s; today's way reads every tensor of the
  checkpoint on every rank (``from_pretrained`` materialises the whole state dict), i.e. the file size.

Goals (issue 29): sum over ranks of peak PSS growth ≤ 1.5 × model, each rank's peak anonymous growth
≤ model/N + 30 %, each rank reading ≈ model/N.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MODES = ("gang", "zero3-teacher", "zero3-student")
WAYS = ("today", "partitioned")
# 121 M parameters, 484 MB in fp32. Its largest tensor (the 6.1 M-row-element embedding) is 5 % of the model,
# as in real checkpoints (Llama-3.3-70B: 1.5 %): ZeRO-3's zero.Init allocates each module's parameters whole
# for a moment before partitioning them, so a rank's peak is its share plus the largest module's parameters.
BENCH_SHAPE = {"hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 8, "num_attention_heads": 16,
               "num_key_value_heads": 4, "vocab_size": 6000}
SUM_PSS_GOAL, PER_RANK_SLACK = 1.5, 0.30


def write_random_model(out: str | Path, *, tie_word_embeddings: bool = False, dtype: str = "float32",
                       seed: int = 0, max_shard_size: str | None = None, **shape) -> Path:
    """A random Llama-architecture checkpoint (safetensors, `dtype`) at `out`; `shape` overrides
    :data:`BENCH_SHAPE`. Returns `out`."""
    import torch
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = {**BENCH_SHAPE, **shape}
    config = LlamaConfig(**sizes, head_dim=sizes["hidden_size"] // sizes["num_attention_heads"],
                         max_position_embeddings=4096, tie_word_embeddings=tie_word_embeddings, bos_token_id=None,
                         eos_token_id=1, pad_token_id=0, dtype=dtype)
    # Built on meta and filled with N(0, 0.02) (norms 1): transformers' own init is minutes on a busy CPU.
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(seed)
    model.to_empty(device="cpu")
    model.tie_weights()  # init_empty_weights and to_empty both untie them
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones(p.shape) if name.endswith("norm.weight") else torch.randn(p.shape, generator=g) * 0.02)
    model.model.rotary_emb.__init__(config)  # buffers (inv_freq) were on meta too
    model.to(getattr(torch, dtype)).save_pretrained(out, **({"max_shard_size": max_shard_size}
                                                           if max_shard_size else {}))
    return Path(out)


def _rollup_kib() -> tuple[int, int]:
    text = Path("/proc/self/smaps_rollup").read_text()
    pss = int(re.search(r"^Pss:\s+(\d+) kB", text, re.MULTILINE).group(1))
    anon = int(re.search(r"^Anonymous:\s+(\d+) kB", text, re.MULTILINE).group(1))
    return pss, anon


class MemorySampler:
    """Peak PSS and anonymous memory of this process, sampled by a thread, relative to `start()`."""

    def __init__(self, interval_s: float = 0.003):
        self.interval_s, self.peak, self.base = interval_s, (0, 0), (0, 0)
        self._stop = threading.Event()

    def sample(self) -> None:
        pss, anon = _rollup_kib()
        self.peak = (max(self.peak[0], pss), max(self.peak[1], anon))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval_s)

    def start(self) -> MemorySampler:
        self.base = self.peak = _rollup_kib()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def growth_bytes(self) -> dict:
        self.sample()
        return {"pss": (self.peak[0] - self.base[0]) * 1024, "anon": (self.peak[1] - self.base[1]) * 1024}

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return self.growth_bytes()


def _ds_config(world: int, trains: bool) -> dict:
    conf = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world,
            "zero_optimization": {"stage": 3}, "steps_per_print": 10**9}
    if trains:
        conf.update({"zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False})
    return conf


def _worker(args) -> None:
    import torch
    import torch.distributed as dist
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported before the baseline)

    from leaf_ray.config import ModelRef
    from leaf_ray.distributed import barrier, init_group

    torch.set_num_threads(1)
    os.environ.update(RANK=str(args.rank), WORLD_SIZE=str(args.world), LOCAL_RANK=str(args.rank))
    init_group(torch.device("cpu"), rank=args.rank, world_size=args.world, init_method=f"file://{args.init}")
    ref = ModelRef(path=args.model, dtype="float32")
    zero3 = args.mode.startswith("zero3")
    if zero3:
        import deepspeed
    if args.mode == "gang":
        from torch.distributed.device_mesh import init_device_mesh

        from leaf_ray.detect.sharded_teacher import load_sharded_teacher, shard_frozen_teacher
        from leaf_ray.models import load_model
        mesh = init_device_mesh("cpu", (args.world,))
    barrier()
    sampler = MemorySampler().start()
    loaded: dict = {}
    if args.mode == "gang":
        if args.way == "today":
            model, nbytes = shard_frozen_teacher(load_model(ref, dtype="float32"), mesh), None
        else:
            model, nbytes = load_sharded_teacher(ref, "float32", mesh)
    else:
        import deepspeed

        from leaf_ray.models import load_model
        from leaf_ray.partitioned_load import load_zero3_partitioned

        trains = args.mode == "zero3-student"
        conf = _ds_config(args.world, trains)
        if args.way == "today":
            model, nbytes = load_model(ref, dtype="float32"), None
        else:
            model, nbytes = load_zero3_partitioned(ref, "float32", conf)
        loaded = sampler.growth_bytes()  # the model ready for DeepSpeed
        if trains:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
            model, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=conf)
        else:
            model.requires_grad_(False)
            model, *_ = deepspeed.initialize(model=model, config=conf)
    barrier()
    peak = sampler.stop()
    out = {"rank": args.rank, "peak_pss": peak["pss"], "peak_anon": peak["anon"], "bytes_read": nbytes,
           "load_peak_pss": loaded.get("pss"), "load_peak_anon": loaded.get("anon")}
    if args.logits:  # the loaded model's logits on fixed ids, to compare with the unsharded model's
        ids = torch.arange(2, 34).view(2, 16)
        with torch.no_grad():
            out["logits_file"] = str(Path(args.out).with_suffix(".logits.pt"))
            torch.save(model(input_ids=ids).logits, out["logits_file"])
    Path(args.out).write_text(json.dumps(out))
    barrier()
    dist.destroy_process_group()


def run_ranks(model: str | Path, mode: str, way: str, world: int, *, timeout_s: float = 900,
              logits: bool = False) -> list[dict]:
    """Load `model` on `world` fresh rank processes in `mode` and `way`; each rank's figures (bytes)."""
    if mode not in MODES or way not in WAYS:
        raise ValueError(f"mode must be one of {MODES} and way one of {WAYS}, got {mode!r} / {way!r}")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                          os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory(prefix="leaf-ray-bench-load-") as tmp:
        procs = [subprocess.Popen(
            [sys.executable, "-m", "leaf_ray.bench.load", "--worker", "--rank", str(r), "--world", str(world),
             "--mode", mode, "--way", way, "--model", str(model), "--init", f"{tmp}/init",
             "--out", f"{tmp}/rank{r}.json"] + (["--logits"] if logits else []),
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
        deadline, logs = time.monotonic() + timeout_s, []
        for p in procs:
            try:
                logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise RuntimeError(f"bench load {mode}/{way} on {world} ranks timed out after {timeout_s} s")
        failed = [(r, p.returncode, logs[r]) for r, p in enumerate(procs) if p.returncode]
        if failed:
            r, rc, log = failed[0]
            raise RuntimeError(f"bench load {mode}/{way}: rank {r} exited {rc}:\n{log[-3000:]}")
        results = [json.loads(Path(f"{tmp}/rank{r}.json").read_text()) for r in range(world)]
        if logits:
            import torch

            for res in results:
                res["logits"] = torch.load(res.pop("logits_file"))
        return results


def summarise(results: list[dict], model_bytes: int, checkpoint_bytes: int, mode: str) -> dict:
    """The issue's three figures and whether they meet the goals. For the student the per-rank figures are
    those of the load (model ready for DeepSpeed), beside the peak through `initialize`."""
    world = len(results)
    student = mode == "zero3-student"
    pss = [r["load_peak_pss"] if student else r["peak_pss"] for r in results]
    anon = [r["load_peak_anon"] if student else r["peak_anon"] for r in results]
    read = [r["bytes_read"] if r["bytes_read"] is not None else checkpoint_bytes for r in results]
    sum_pss = sum(pss) / model_bytes
    max_anon = max(anon) / (model_bytes / world)
    max_read = max(read) / (checkpoint_bytes / world)
    return {"ranks": world, "mode": mode, "sum_pss_x_model": sum_pss, "max_anon_x_share": max_anon,
            "max_read_x_share": max_read, "init_sum_pss_x_model": sum(r["peak_pss"] for r in results) / model_bytes,
            "meets": sum_pss <= SUM_PSS_GOAL and max_anon <= 1 + PER_RANK_SLACK and max_read <= 1 + PER_RANK_SLACK}


def run_load_bench(console, *, ranks: list[int], modes: list[str], out_dir: str | None = None,
                   shape: dict | None = None) -> list[dict]:
    """Write the random model (once), load it every way on every rank count, print the table."""
    from rich.table import Table

    out = Path(out_dir or tempfile.mkdtemp(prefix="leaf-ray-bench-load-model-"))
    model_dir = out / "model"
    if not (model_dir / "model.safetensors").is_file():
        console.print(f"writing a random Llama-shaped fp32 model to {model_dir} ...")
        write_random_model(model_dir, **(shape or {}))
    checkpoint_bytes = (model_dir / "model.safetensors").stat().st_size
    from leaf_ray.partitioned_load import SafetensorsCheckpoint

    with SafetensorsCheckpoint(model_dir) as ckpt:
        model_bytes = ckpt.total_bytes()
    console.print(f"model: {model_bytes / 2**20:.0f} MiB of fp32 tensors ({checkpoint_bytes / 2**20:.0f} MiB "
                  f"file); goals: sum PSS <= {SUM_PSS_GOAL} x model, per-rank anon <= (1+{PER_RANK_SLACK}) x "
                  "model/N, per-rank read ~ model/N")
    table = Table(title="leaf-ray bench load (CPU, gloo; peaks sampled from /proc/<pid>/smaps_rollup)")
    for col in ("ranks", "mode", "way", "sum peak PSS / model", "max rank anon / (model/N)",
                "max rank read / (model/N)", "student: sum PSS thru initialize", "goals"):
        table.add_column(col)
    rows = []
    for world in ranks:
        for mode in modes:
            for way in WAYS:
                res = summarise(run_ranks(model_dir, mode, way, world), model_bytes, checkpoint_bytes, mode)
                res["way"] = way
                rows.append(res)
                table.add_row(str(world), mode, way, f"{res['sum_pss_x_model']:.2f}",
                              f"{res['max_anon_x_share']:.2f}", f"{res['max_read_x_share']:.2f}",
                              f"{res['init_sum_pss_x_model']:.2f}" if mode == "zero3-student" else "",
                              "met" if res["meets"] else "NOT met")
                console.print(f"  {world} ranks {mode} {way}: sum PSS {res['sum_pss_x_model']:.2f} x model, "
                              f"max anon {res['max_anon_x_share']:.2f} x share, read {res['max_read_x_share']:.2f}"
                              f" x share")
    console.print(table)
    (out / "bench-load.json").write_text(json.dumps(rows, indent=1))
    console.print(f"results: {out / 'bench-load.json'}")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true")
    p.add_argument("--rank", type=int)
    p.add_argument("--world", type=int)
    p.add_argument("--mode", choices=MODES)
    p.add_argument("--way", choices=WAYS)
    p.add_argument("--model")
    p.add_argument("--init")
    p.add_argument("--out")
    p.add_argument("--logits", action="store_true")
    args = p.parse_args(argv)
    if not args.worker:
        p.error("run the bench with `leaf-ray bench load`")
    _worker(args)


if __name__ == "__main__":
    main()
