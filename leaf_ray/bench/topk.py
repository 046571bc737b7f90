"""`leaf-ray bench topk`: teacher target tokens/s building the top-k cache, transformers vs vLLM, same rows.

Both sides score the same ``rows`` training rows (word problems with worked answers, rendered and tokenised
like the trainer, :func:`leaf_ray.distill.data.tokenize_row`) with the config's teacher, k and vocabulary,
in this one process, one after the other:

- ``transformers``: :class:`leaf_ray.distill.topk_cache.TopKTeacherBatch` (the actor of the transformers pass)
  called on batches of ``batch_size`` rows: forward, log-softmax, top-k, tail.
- ``vllm``: a ``vllm.LLM`` engine with the settings of the vLLM pass
  (:func:`leaf_ray.distill.topk_vllm.logprob_engine_kwargs`) given all rows as token prompts with
  ``max_tokens=1, prompt_logprobs=n``, then :func:`leaf_ray.distill.topk_vllm.topk_from_prompt_logprobs`.

Model load / engine start are timed apart from scoring; tokens/s counts target tokens (cache positions) per
second of scoring. The Ray Data plumbing around either is not in the clock (the same for both). vLLM must be
importable: from an environment without it the bench re-runs itself with ``$LEAF_RAY_VLLM_PYTHON`` or
``.venv-vllm/bin/python`` (`make vllm-venv`). The two cache results are compared (max |Δ log-prob|).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def bench_rows(n: int, seed: int = 0):
    import pyarrow as pa

    rng = random.Random(seed)
    names = ["Ava", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana"]
    rows = []
    for i in range(n):
        a, b, c = rng.randint(2, 90), rng.randint(2, 90), rng.randint(2, 9)
        name = rng.choice(names)
        rows.append({"row_key": f"b{i}", "group": f"b{i}", "scope": "original", "span_index": -1,
                     "is_counterfactual": False, "prefix": "",
                     "instruction": f"{name} has {a} marbles, finds {b} more and then gives away {c}. "
                                    f"How many marbles does {name} have now?",
                     "response": f"{name} starts with {a} marbles. After finding {b} more, {name} has "
                                 f"{a} + {b} = {a + b}. Giving away {c} leaves {a + b} - {c} = {a + b - c}. "
                                 f"The answer is {a + b - c}."})
    return pa.Table.from_pylist(rows)


def measure(cfg, *, rows: int, batch_size: int) -> dict:
    import torch

    from leaf_ray.config import GenerationConfig
    from leaf_ray.distill.data import tokenize_row
    from leaf_ray.distill.topk_cache import TopKTeacherBatch, cache_settings_for
    from leaf_ray.distill.topk_vllm import (
        check_settings,
        logprob_count,
        logprob_engine_kwargs,
        topk_from_prompt_logprobs,
    )
    from leaf_ray.generate.backends import gpu_available
    from leaf_ray.generate.ray_data_llm import engine_settings
    from leaf_ray.models import model_config, vocab_size_of

    settings = cache_settings_for(cfg)
    settings.pop("engine")
    k, vocab_size, max_length = settings["k"], settings["vocab_size"], settings["max_length"]
    check_settings(k, settings["temperature"])
    table = bench_rows(rows)
    result = {"rows": rows, "k": k, "device": "cuda" if gpu_available() else "cpu",
              "torch_threads": torch.get_num_threads()}

    # transformers: the cache pass's own actor class, called in this process
    started = time.perf_counter()
    hf = TopKTeacherBatch(teacher_ref=settings["teacher"].model_dump(),
                          tokenizer_ref=settings["tokenizer"].model_dump(), k=k, temperature=1.0,
                          vocab_size=vocab_size, max_length=max_length)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    hf_rows = []
    for start in range(0, rows, batch_size):
        hf_rows += hf(table.slice(start, batch_size)).to_pylist()
    hf_s = time.perf_counter() - started
    tokens = sum(len(r["target_positions"]) for r in hf_rows)
    result["transformers"] = {"load_s": load_s, "score_s": hf_s, "tokens_per_s": tokens / hf_s}
    result["target_tokens"] = tokens
    del hf

    # vLLM: the engine settings of the vLLM pass, all rows at once (the engine batches them itself)
    from vllm import LLM, SamplingParams

    from leaf_ray.models import load_tokenizer

    hf_tok = load_tokenizer(settings["tokenizer"])
    encoded = [tokenize_row(hf_tok, r["instruction"], r["prefix"], r["response"], max_length)
               for r in table.to_pylist()]
    n = logprob_count(k, vocab_size_of(model_config(settings["teacher"])), vocab_size)
    source, kwargs, env = engine_settings(settings["teacher"], GenerationConfig(**cfg.generation.model_dump()),
                                          "vllm", on_gpu=gpu_available(), seed=cfg.run.seed)
    os.environ.update({key: os.environ.get(key, value) for key, value in env.items()})
    started = time.perf_counter()
    llm = LLM(model=source, **{**kwargs, **logprob_engine_kwargs(n)})
    start_s = time.perf_counter() - started
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=n, detokenize=False)
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": ids} for ids, _, _ in encoded], params, use_tqdm=False)
    max_diff = 0.0
    for out, (ids, mask, _), want in zip(outputs, encoded, hf_rows):
        targets = [t for t in range(1, len(ids)) if mask[t]]
        _, lp, _ = topk_from_prompt_logprobs(out.prompt_logprobs, targets, k, n, vocab_size)
        max_diff = max(max_diff, float(np.abs(lp - np.asarray(want["topk_logprobs"])).max()))
    vllm_s = time.perf_counter() - started
    result["vllm"] = {"load_s": start_s, "score_s": vllm_s, "tokens_per_s": tokens / vllm_s}
    result["max_abs_logprob_diff"] = max_diff
    result["ratio"] = result["vllm"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    _shutdown(llm)
    return result


def _shutdown(llm) -> None:
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if engine_core is not None:
        engine_core.shutdown()


def vllm_python() -> Path | None:
    """The interpreter to re-run the bench with when vLLM is not importable here."""
    env = os.environ.get("LEAF_RAY_VLLM_PYTHON")
    if env:
        return Path(env)
    candidate = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
    return candidate if candidate.exists() else None


def run_topk_bench(cfg, console, *, rows: int, batch_size: int, config_args: list[str]) -> dict:
    import importlib.util

    from leaf_ray.tiny_models import ensure_tiny_pair

    ensure_tiny_pair(cfg)  # here: the vLLM venv lacks what building the tiny pair needs
    if importlib.util.find_spec("vllm") is not None:
        result = measure(cfg, rows=rows, batch_size=batch_size)
    else:
        python = vllm_python()
        if python is None or not python.exists():
            raise RuntimeError("bench topk needs vLLM: not importable here, and no $LEAF_RAY_VLLM_PYTHON or "
                               ".venv-vllm (`make vllm-venv`) to run it with")
        console.print(f"vLLM is not importable here: running the bench with {python}")
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        proc = subprocess.run([str(python), "-m", "leaf_ray.bench.topk", "--rows", str(rows), "--batch-size",
                               str(batch_size), *config_args], env=env, capture_output=True, text=True,
                              check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"bench topk under {python} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        result = json.loads(lines[-1])
    print_result(result, console)
    return result


def print_result(r: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"teacher top-k cache (k={r['k']}): {r['rows']} rows, {r['target_tokens']} target "
                        f"tokens, {r['device']}, {r['torch_threads']} torch threads")
    for col in ("engine", "load / start s", "scoring s", "target tokens/s"):
        table.add_column(col, justify="right" if col != "engine" else "left")
    for name in ("transformers", "vllm"):
        e = r[name]
        table.add_row(name, f"{e['load_s']:.1f}", f"{e['score_s']:.2f}", f"{e['tokens_per_s']:,.0f}")
    console.print(table)
    console.print(f"vllm / transformers target tokens/s: [bold]{r['ratio']:.2f}x[/bold]; "
                  f"max |Δ log-prob| between the two caches {r['max_abs_logprob_diff']:.2e}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    from leaf_ray.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--config")
    ap.add_argument("--set", dest="set_", action="append", default=[])
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set_)
    print(json.dumps(measure(cfg, rows=args.rows, batch_size=args.batch_size)))
    return 0


if __name__ == "__main__":  # vLLM starts its engine with spawn: the guard is required
    sys.exit(main())
