"""The built-in offline corpus: GSM8K-style word problems with step-by-step solutions (reasoning-gym).

Each worked solution's lines become blank-line separated steps (the response-level default splitting), and
the final answer is stated as ``\\boxed{N}`` so the math scorer and the reference format agree.

`write_synthetic_inputs` makes a run directory of it without detection (tests and the distill bench): its
`data/clean` and `detect/counterfactuals` with counterfactuals cut by rule, not by saliency.
"""

from __future__ import annotations

import json
import re
from pathlib import Path


def format_solution(answer_cot: str, answer: str) -> str:
    steps = [ln.strip() for ln in answer_cot.splitlines() if ln.strip() and not ln.startswith("####")]
    return "\n\n".join(steps + [f"The answer is \\boxed{{{answer}}}."])


def generate_problems(size: int, seed: int = 0) -> list[dict]:
    """`size` problems as records: id, instruction, output (worked solution), answer."""
    import reasoning_gym

    ds = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)
    rows = []
    for i, item in enumerate(ds):
        meta = item["metadata"]
        rows.append({
            "id": f"gsm_symbolic-{seed}-{i}",
            "instruction": item["question"],
            "output": format_solution(meta["answer_cot"], str(item["answer"])),
            "answer": str(item["answer"]),
        })
    return rows


def write_demo_corpus(path: str | Path, size: int, seed: int = 0) -> Path:
    """Write the corpus as JSONL (what a user's own data would look like)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for row in generate_problems(size, seed):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return p


def synthetic_counterfactuals(instruction: str, output: str, sample_id: str, split: str,
                              max_per_sample: int = 2, response_level: bool = True) -> list[dict]:
    """Counterfactual rows in the Stage 1 schema made without detection (for tests and benches only):
    instruction level = one sentence (not the last, the question) removed per counterfactual; response level
    = the first reasoning step's first clause removed, the rest of the response as the continuation."""
    rows = []
    sentences = [m.span() for m in re.finditer(r"[^.!?]+[.!?]\s*", instruction)]
    for k, (a, b) in enumerate(sentences[:-1][:max_per_sample]):
        rows.append(dict(sample_id=sample_id, scope="instruction", span_index=k, char_start=a, char_end=b,
                         removed_text=instruction[a:b], instruction=instruction[:a] + instruction[b:],
                         response_prefix="", output=output, split=split))
    steps = output.split("\n\n")
    if response_level and len(steps) >= 2:
        prefix, continuation = steps[0] + "\n\n", "\n\n".join(steps[1:])
        cut = prefix.find(" ", len(prefix) // 3)
        if cut > 0:
            rows.append(dict(sample_id=sample_id, scope="response:1", span_index=0, char_start=0, char_end=cut,
                             removed_text=prefix[:cut], instruction=instruction, response_prefix=prefix[cut:],
                             output=continuation, split=split))
    return rows


def write_synthetic_inputs(run_dir: str | Path, n: int = 24, seed: int = 0, validation: int = 4,
                           max_chars: int | None = None, response_level: bool = True,
                           problems: list[dict] | None = None) -> dict[str, int]:
    """Write ``data/clean`` and ``detect/counterfactuals`` Parquet under ``run_dir`` from the demo corpus (or
    from ``problems``, records as :func:`generate_problems` makes them).

    The last ``validation`` samples are the validation split. ``max_chars`` drops problems longer than that
    (keeps tests' sequences short)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from leaf_ray.store import RunDir

    problems = [p for p in (problems if problems is not None else generate_problems(4 * n, seed))
                if max_chars is None or len(p["instruction"]) + len(p["output"]) <= max_chars][:n]
    if len(problems) < n:
        raise ValueError(f"only {len(problems)} demo problems fit max_chars={max_chars}")
    clean, cfs = [], []
    for i, p in enumerate(problems):
        split = "validation" if i >= n - validation else "train"
        clean.append(dict(sample_id=p["id"], instruction=p["instruction"], output=p["output"], answer=p["answer"],
                          split=split, source="demo", row=i))
        cfs += synthetic_counterfactuals(p["instruction"], p["output"], p["id"], split,
                                         response_level=response_level)
    run = RunDir(Path(run_dir))
    for directory, rows in ((run.clean, clean), (run.detect.counterfactuals, cfs)):
        directory.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), directory / "part-0.parquet")
    return {"clean": len(clean), "counterfactuals": len(cfs)}
