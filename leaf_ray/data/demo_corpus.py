"""The built-in offline corpus: GSM8K-style word problems with step-by-step solutions (reasoning-gym).

Each worked solution's lines become blank-line separated steps (the response-level default splitting), and
the final answer is stated as ``\\boxed{N}`` so the math scorer and the reference format agree.
"""

from __future__ import annotations

import json
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
