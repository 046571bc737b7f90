"""Judging one response: is its final answer (math) right, or does its program pass the tests (code)?

Used wherever a model's answer decides something: teacher responses kept by answer (`generate.pipeline`),
Stage 1 selection and verification (`detect.selection`). A row without a reference is never judged right.
"""

from __future__ import annotations

from dataclasses import dataclass

from leaf_ray.evaluate.answers import answers_match, extract_answer
from leaf_ray.evaluate.benchmarks import score_response

ANSWER_MISMATCH = "answer mismatch"
NO_REFERENCE = "no reference answer"


@dataclass
class Verdict:
    correct: bool
    predicted: str | None
    reference: str | None
    reason: str | None  # None when correct


def reference_answer(row: dict) -> str | None:
    """The row's `answer`, else the final answer extracted from its reference `output`."""
    answer = row.get("answer")
    if answer is not None and str(answer).strip():
        return str(answer).strip()
    output = row.get("output")
    return extract_answer(output) if output else None


def judge(completion: str, reference: str | None) -> Verdict:
    """Math check of one completion: extract its final answer, compare with `answers_match`."""
    predicted = extract_answer(completion)
    if reference is None:
        return Verdict(False, predicted, None, NO_REFERENCE)
    ok = predicted is not None and answers_match(predicted, reference)
    return Verdict(ok, predicted, reference, None if ok else ANSWER_MISMATCH)


def judge_code(row: dict, response: str, evaluation) -> Verdict:
    """Code check of one response: its program must pass the row's tests in the sandbox. `reference` is a
    code reference as `load_benchmark` builds it (humaneval / leetcode / livecodebench tests). `evaluation`:
    the sandbox limits (`EvaluationConfig`)."""
    reference = row.get("reference")
    if not isinstance(reference, dict) or "format" not in reference:
        return Verdict(False, None, None, NO_REFERENCE)
    score = score_response({"id": row.get("sample_id"), "kind": "code", "prompt": row["instruction"],
                            "reference": reference}, response, **evaluation.sandbox.limits())
    return Verdict(score.correct, score.predicted, None, None if score.correct else f"tests failed: {score.reason}")
