"""Benchmark loaders (local files in each format, offline built-ins) and scoring a response per record."""

from __future__ import annotations

import base64
import json
import pickle
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from leaf_ray.config import BenchmarkRef
from leaf_ray.data.demo_corpus import format_solution, generate_problems
from leaf_ray.evaluate.benchmarks import BenchmarkError, extract_code, load_benchmark, score_response

SANDBOX = {"timeout_s": 10.0, "memory_mb": 512}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _ref(**kw) -> BenchmarkRef:
    return BenchmarkRef(**{"name": "bench", **kw})


# --------------------------------------------------------------------------- math formats


def test_gsm8k_jsonl_and_scoring(tmp_path):
    path = _jsonl(tmp_path / "gsm8k.jsonl", [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=7\n#### 7"},
        {"question": "A bill of $1,000 is split in 4.", "answer": "1000/4=250\n#### 250"},
        {"question": "Big.", "answer": "#### 1,250"},
    ])
    records = load_benchmark(_ref(format="gsm8k", path=path))
    assert [r["reference"] for r in records] == ["7", "250", "1,250"]
    assert [r["id"] for r in records] == ["bench-0", "bench-1", "bench-2"]
    assert records[0]["kind"] == "math" and records[0]["extra"]["format"] == "gsm8k"
    assert records[0]["prompt"].startswith("Tom has 3 apples")
    assert score_response(records[0], "3 + 4 = 7, so \\boxed{7}").correct
    assert not score_response(records[0], "The answer is 8.").correct
    assert score_response(records[2], "#### 1250").correct
    missing = score_response(records[1], "I don't know")
    assert (missing.correct, missing.predicted, missing.reason) == (False, None, "no final answer found in the response")
    assert len(load_benchmark(_ref(format="gsm8k", path=path, limit=2))) == 2


def test_gsm8k_field_mapping_and_clear_errors(tmp_path):
    path = _jsonl(tmp_path / "mapped.jsonl", [{"uid": "a", "q": "1+1?", "sol": "#### 2"}])
    records = load_benchmark(_ref(format="gsm8k", path=path, fields={"id": "uid", "question": "q", "answer": "sol"}))
    assert (records[0]["id"], records[0]["prompt"], records[0]["reference"]) == ("a", "1+1?", "2")

    bad = _jsonl(tmp_path / "bad.jsonl", [{"question": "ok", "answer": "#### 1"}, {"answer": "#### 2"}])
    with pytest.raises(BenchmarkError, match=r"bad\.jsonl: record 1 \(gsm8k format\): missing field 'question'"):
        load_benchmark(_ref(format="gsm8k", path=bad))
    no_hash = _jsonl(tmp_path / "nohash.jsonl", [{"question": "q", "answer": "just 5"}])
    with pytest.raises(BenchmarkError, match=r"nohash\.jsonl: record 0 .*no '#### N'"):
        load_benchmark(_ref(format="gsm8k", path=no_hash))
    with pytest.raises(BenchmarkError, match=r"no field\(s\) \['questoin'\]"):
        load_benchmark(_ref(format="gsm8k", path=path, fields={"questoin": "q"}))
    with pytest.raises(BenchmarkError, match="not found"):
        load_benchmark(_ref(format="gsm8k", path=str(tmp_path / "absent.jsonl")))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "q", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(BenchmarkError, match=r"broken\.jsonl: line 2 is not valid JSON"):
        load_benchmark(_ref(format="gsm8k", path=str(broken)))
    dup = _jsonl(tmp_path / "dup.jsonl", [{"id": 1, "question": "q", "answer": "#### 1"}] * 2)
    with pytest.raises(BenchmarkError, match="duplicate record id '1'"):
        load_benchmark(_ref(format="gsm8k", path=dup))


def test_math_json_answer_or_boxed_solution(tmp_path):
    path = tmp_path / "math500.json"
    path.write_text(json.dumps([
        {"problem": "Half of one?", "answer": "\\frac{1}{2}", "solution": "...", "unique_id": "test/a.json",
         "level": 2, "subject": "Algebra"},
        {"problem": "Nested?", "solution": "So it is $\\boxed{\\frac{\\sqrt{3}}{2}}$."},
        {"problem": "Nothing?", "solution": "no box here"},
    ]))
    with pytest.raises(BenchmarkError, match=r"math500\.json: record 2 \(math format\): needs 'answer' or a "
                                             r"'solution' with \\boxed"):
        load_benchmark(_ref(format="math", path=str(path)))
    records = load_benchmark(_ref(format="math", path=str(path), limit=2))
    assert [r["reference"] for r in records] == ["\\frac{1}{2}", "\\frac{\\sqrt{3}}{2}"]
    assert records[0]["id"] == "test/a.json" and records[0]["extra"]["subject"] == "Algebra"
    assert score_response(records[0], "It is \\boxed{0.5}").correct
    assert score_response(records[1], "\\boxed{\\dfrac{\\sqrt3}{2}}").correct
    assert not score_response(records[1], "\\boxed{\\frac{\\sqrt2}{2}}").correct


def test_olympiadbench_parquet(tmp_path):
    path = tmp_path / "olympiad.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"id": 7, "question": "Find x.", "final_answer": ["$\\frac{5}{2}$"], "unit": None, "answer_type": "Numerical"},
        {"id": 8, "question": "Find the pair.", "final_answer": ["$3$", "$4$"], "unit": None, "answer_type": "Tuple"},
    ]), path)
    records = load_benchmark(_ref(format="olympiadbench", path=str(path)))
    assert [(r["id"], r["reference"]) for r in records] == [("7", "\\frac{5}{2}"), ("8", "3, 4")]
    assert records[0]["extra"]["answer_type"] == "Numerical"
    assert score_response(records[0], "x = 2.5, hence \\boxed{2.5}").correct


def test_gsm_symbolic_builtin_is_seeded_and_disjoint_from_the_demo_corpus():
    first = load_benchmark(_ref(format="gsm_symbolic", limit=24))
    again = load_benchmark(_ref(format="gsm_symbolic", limit=24))
    other_seed = load_benchmark(_ref(format="gsm_symbolic", limit=24, seed=1))
    assert first == again and len(first) == 24
    assert {r["prompt"] for r in first}.isdisjoint({r["prompt"] for r in other_seed})
    demo_questions = {p["instruction"] for p in generate_problems(64, seed=0)}
    assert {r["prompt"] for r in first}.isdisjoint(demo_questions)
    # a teacher answering in the demo corpus' own format scores correct on every record
    for record in first:
        worked = format_solution(record["extra"]["solution"], record["reference"])
        assert score_response(record, worked).correct, record["id"]


def test_champ_builtin():
    records = load_benchmark(_ref(format="champ"))
    assert len(records) == 270 and len({r["id"] for r in records}) == 270
    first = records[0]
    assert first["id"] == "P_Combinatorics_1" and first["reference"] == "239" and first["kind"] == "math"
    assert score_response(first, "In total \\boxed{239} strings.").correct
    assert len(load_benchmark(_ref(format="champ", limit=5))) == 5


def test_builtin_formats_without_a_path_are_refused():
    with pytest.raises(BenchmarkError, match="needs a local file"):
        load_benchmark(_ref(format="gsm8k"))


# --------------------------------------------------------------------------- code formats


def test_humaneval_from_the_package_and_canonical_solutions_pass():
    records = load_benchmark(_ref(format="humaneval"))
    assert len(records) == 164 and records[0]["id"] == "HumanEval/0"
    assert records[0]["kind"] == "code" and records[0]["reference"]["entry_point"] == "has_close_elements"
    for record in (records[0], records[53], records[163]):
        body = record["extra"]["canonical_solution"]
        score = score_response(record, f"Here you go:\n```python\n{body}```\n", **SANDBOX)
        assert score.correct and score.status == "passed", (record["id"], score)
    # a full function in a chat answer works too; a wrong one fails with the assertion as the reason
    full = records[53]["prompt"] + records[53]["extra"]["canonical_solution"]
    assert score_response(records[53], f"```python\n{full}\n```", **SANDBOX).correct
    wrong = score_response(records[0], "    return True\n", **SANDBOX)
    assert (wrong.correct, wrong.status) == (False, "failed")
    assert load_benchmark(_ref(format="humaneval", limit=3))[-1]["id"] == "HumanEval/2"


def test_humaneval_local_file(tmp_path):
    path = _jsonl(tmp_path / "he.jsonl", [{
        "task_id": "Local/0", "prompt": "def inc(x):\n", "entry_point": "inc", "canonical_solution": "    return x + 1\n",
        "test": "def check(candidate):\n    assert candidate(1) == 2\n"}])
    (record,) = load_benchmark(_ref(format="humaneval", path=path))
    assert score_response(record, "    return x + 1\n", **SANDBOX).correct
    assert score_response(record, "    while True:\n        pass\n", timeout_s=1.5, memory_mb=256).status == "timeout"


def test_leetcode_local_file(tmp_path):
    path = _jsonl(tmp_path / "leetcode.jsonl", [{
        "task_id": "two-sum", "problem_description": "Return indices of two numbers adding to target.",
        "starter_code": "class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n",
        "prompt": "from typing import List\n", "entry_point": "Solution().twoSum", "difficulty": "Easy",
        "test": "def check(candidate):\n    assert candidate(nums=[2, 7, 11, 15], target=9) == [0, 1]\n"
                "    assert candidate(nums=[3, 2, 4], target=6) == [1, 2]\n"}])
    (record,) = load_benchmark(_ref(format="leetcode", path=path))
    assert record["prompt"].startswith("Return indices") and "class Solution" in record["prompt"]
    solution = ("class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
                "        seen = {}\n        for i, x in enumerate(nums):\n"
                "            if target - x in seen:\n                return [seen[target - x], i]\n"
                "            seen[x] = i\n")
    assert score_response(record, f"```python\n{solution}```", **SANDBOX).correct
    assert not score_response(record, solution.replace("return [seen[target - x], i]", "return [i, i]"),
                              **SANDBOX).correct


def _lcb_compress(cases: list[dict]) -> str:
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()


def test_livecodebench_local_file_stdin_functional_and_compressed(tmp_path):
    stdin_public = [{"input": "3\n1 2 3\n", "output": "6\n", "testtype": "stdin"}]
    stdin_private = [{"input": "2\n-5 5\n", "output": "0\n", "testtype": "stdin"}]
    functional = [{"input": "[1, 2, 3]", "output": "6", "testtype": "functional"}]
    path = _jsonl(tmp_path / "lcb.jsonl", [
        {"question_id": "abc001", "question_content": "Sum the numbers.", "starter_code": "",
         "public_test_cases": json.dumps(stdin_public), "private_test_cases": _lcb_compress(stdin_private),
         "metadata": "{}", "platform": "atcoder"},
        {"question_id": "lc002", "question_content": "Sum a list.",
         "starter_code": "class Solution:\n    def total(self, nums):\n",
         "public_test_cases": json.dumps(functional), "private_test_cases": "[]",
         "metadata": json.dumps({"func_name": "total"})},
    ])
    stdin_record, functional_record = load_benchmark(_ref(format="livecodebench", path=path))
    assert [t["output"] for t in stdin_record["reference"]["tests"]] == ["6\n", "0\n"]
    assert functional_record["reference"]["func_name"] == "total"

    program = "input()\nprint(sum(map(int, input().split())))\n"
    assert score_response(stdin_record, f"```python\n{program}```", **SANDBOX).correct
    wrong = score_response(stdin_record, "input()\nprint(6)\n", **SANDBOX)
    assert not wrong.correct and wrong.reason.startswith("stdin test 1: wrong output"), wrong
    solution = "class Solution:\n    def total(self, nums):\n        return sum(nums)\n"
    assert score_response(functional_record, solution, **SANDBOX).correct
    assert not score_response(functional_record, solution.replace("sum(nums)", "max(nums)"), **SANDBOX).correct


def test_livecodebench_refuses_pickled_code_and_bad_cases(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = base64.b64encode(zlib.compress(pickle.dumps(Evil()))).decode()
    base = {"question_id": "x", "question_content": "q",
            "public_test_cases": json.dumps([{"input": "1", "output": "1", "testtype": "stdin"}])}
    path = _jsonl(tmp_path / "evil.jsonl", [{**base, "private_test_cases": evil}])
    with pytest.raises(BenchmarkError, match=r"evil\.jsonl: record 0 .*'private_test_cases'.*refused global"):
        load_benchmark(_ref(format="livecodebench", path=path))
    path = _jsonl(tmp_path / "nofunc.jsonl", [{**base, "public_test_cases": json.dumps(
        [{"input": "1", "output": "1", "testtype": "functional"}])}])
    with pytest.raises(BenchmarkError, match="functional test cases need metadata.func_name"):
        load_benchmark(_ref(format="livecodebench", path=path))
    path = _jsonl(tmp_path / "badcase.jsonl", [{**base, "public_test_cases": json.dumps([{"input": "1"}])}])
    with pytest.raises(BenchmarkError, match=r"public_test_cases\[0\] needs 'input' and 'output'"):
        load_benchmark(_ref(format="livecodebench", path=path))


def test_code_kind_follows_format():
    assert _ref(format="livecodebench", path="x.jsonl").kind == "code"
    with pytest.raises(ValueError, match="does not fit format"):
        _ref(format="humaneval", kind="math")


def test_extract_code():
    assert extract_code("```python\na = 1\n```\ntext\n```python\nb = 2\n```") == "b = 2\n"  # last python block
    assert extract_code("```\nplain = 1\n```") == "plain = 1\n"
    assert extract_code("```bash\nls\n```\n```py\nx = 3\n```\n```\nnotes\n```") == "x = 3\n"
    assert extract_code("```python\ntruncated = True\n") == "truncated = True\n"  # unclosed fence
    assert extract_code("    return x\n") == "    return x\n"  # raw completion


@pytest.mark.slow
def test_scoring_inside_ray_actors(ray_local):
    """Evaluation runs scoring in Ray actors: a plain actor (tasks on the main thread) and a threaded one
    (math-verify's signal timeouts must be off there); code runs in the sandbox from the worker."""
    ray = ray_local

    @ray.remote(num_cpus=0)
    class Scorer:
        def score(self, record, response):
            import threading

            from leaf_ray.evaluate.benchmarks import score_response

            return threading.current_thread() is threading.main_thread(), score_response(record, response, **SANDBOX)

    math_record = {"id": "m", "prompt": "?", "reference": "0.75", "kind": "math", "extra": {}}
    code_record = load_benchmark(_ref(format="humaneval", limit=1))[0]
    code_response = code_record["extra"]["canonical_solution"]
    plain, threaded = Scorer.remote(), Scorer.options(max_concurrency=3).remote()
    on_main, score = ray.get(plain.score.remote(math_record, r"\boxed{\dfrac{3}{4}}"))
    assert on_main and score.correct
    results = ray.get([threaded.score.remote(math_record, r"\boxed{\tfrac{3}{4}}") for _ in range(3)]
                      + [threaded.score.remote(code_record, code_response)])
    assert not any(main for main, _ in results)
    assert all(score.correct for _, score in results), results
