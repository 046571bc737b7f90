"""Stage 1 selection (teacher right, student wrong) and counterfactual verification (student right after
pruning) on the generation backend: verdict datasets, exactly the expected samples scored and counterfactuals
kept, reasons recorded, resume without regenerating.

The tiny random models solve nothing, so correctness is controlled through the data: the tests first ask a
model (greedy, in this process, one prompt at a time like the pool's batches of one) what it answers, then
choose each sample's reference `answer` so that the verdict they want holds."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from run_data import POOLS, read_dir, write_clean

from leaf_ray.data.demo_corpus import generate_problems
from leaf_ray.detect.pipeline import check_same_spec, run_detection, run_spec
from leaf_ray.detect.response import prefix_continuations, split_steps
from leaf_ray.detect.schema import COUNTERFACTUALS_SCHEMA, SCORES_SCHEMA, DetectionError
from leaf_ray.detect.selection import (
    REJECTED_SCHEMA,
    SELECTION_SCHEMA,
    STUDENT_RIGHT,
    STUDENT_WRONG_AFTER_PRUNING,
    TEACHER_WRONG,
    sample_reference,
)
from leaf_ray.detect.stages import recover_interrupted_commits
from leaf_ray.evaluate.answers import answers_match, extract_answer
from leaf_ray.evaluate.judge import NO_REFERENCE
from leaf_ray.store import DetectPaths

GENERATION = {"backend": "transformers", "max_new_tokens": 16, "pool": {"batch_size": 1, "num_cpus": 0.5}}
NEVER = "-987654321"  # a reference no tiny model's 16 tokens hit
PRINTS_OK = {"format": "livecodebench", "tests": [{"input": "", "output": "ok", "testtype": "stdin"}],
             "func_name": None}


def file_stamps(*dirs: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for d in dirs for p in sorted(d.glob("*.parquet"))}


_backends: dict = {}


def answer_alone(cfg, role: str, instructions: list[str], prefixes: list[str] | None = None) -> list[str]:
    """Greedy completions, one prompt at a time (what the pool's batches of one compute), in this process."""
    from leaf_ray.generate.backends import TransformersBackend

    ref = getattr(cfg.models, role)
    key = (ref.path, cfg.generation.max_new_tokens)
    if key not in _backends:
        _backends[key] = TransformersBackend(ref, cfg.generation, cfg.run.seed)
    prefixes = prefixes or [""] * len(instructions)
    return [_backends[key].generate([i], prefixes=[p])[0] for i, p in zip(instructions, prefixes)]


def cf_key(row: dict) -> tuple:
    return row["sample_id"], row["scope"], row["span_index"]


def expected_verdicts(cfg, cfs: list[dict], answer_of: dict[str, str | None]) -> dict[tuple, tuple]:
    """Counterfactual key -> (the student's final answer after pruning, whether it matches the sample's
    answer): prefix + the student's continuation, as verification judges it."""
    completions = answer_alone(cfg, "student", [c["instruction"] for c in cfs],
                               [c["response_prefix"] for c in cfs])
    out = {}
    for c, completion in zip(cfs, completions):
        predicted = extract_answer(c["response_prefix"] + completion)
        out[cf_key(c)] = (predicted, answers_match(predicted, answer_of[c["sample_id"]]))
    return out


# --------------------------------------------------------------------------- without Ray


def test_sample_reference_math_code_and_missing():
    assert sample_reference({"answer": " 12 ", "output": "so \\boxed{3}"}) == ("math", "12", None)
    assert sample_reference({"answer": None, "output": "so \\boxed{3}"}) == ("math", "3", None)
    kind, ref, why = sample_reference({"answer": None, "output": "no final answer given"})
    assert (kind, ref) == ("math", None) and "no `answer`" in why
    # Code: the tests as a dict or as JSON text (ingest keeps extra columns as strings), re-serialised.
    assert sample_reference({"kind": "code", "reference": PRINTS_OK})[1] == json.dumps(PRINTS_OK)
    assert sample_reference({"kind": "code", "reference": json.dumps(PRINTS_OK)})[1] == json.dumps(PRINTS_OK)
    assert "not JSON" in sample_reference({"kind": "code", "reference": "{oops"})[2]
    assert sample_reference({"kind": "code", "answer": "5"})[1] is None


def test_recovery_with_verification_drops_uncommitted_candidates_and_rejections(tmp_path):
    paths = DetectPaths(tmp_path / "detect")
    for d in (paths.scores, paths.candidates, paths.quarantine, paths.counterfactuals, paths.rejected):
        d.mkdir(parents=True)
    cf = pa.Table.from_pylist([{"sample_id": "a", "scope": "instruction", "span_index": 0}],
                              schema=COUNTERFACTUALS_SCHEMA)
    pq.write_table(pa.Table.from_pylist([{"sample_id": "a", "scope": "instruction"}], schema=SCORES_SCHEMA),
                   paths.scores / "part-1.parquet")
    pq.write_table(cf, paths.candidates / "part-1.parquet")
    pq.write_table(cf, paths.candidates / "part-2.parquet")  # its scores file (the commit) never came
    pq.write_table(cf, paths.counterfactuals / "part-v1.parquet")  # a verification part, committed
    rejected = pa.Table.from_pylist([], schema=REJECTED_SCHEMA)
    pq.write_table(rejected, paths.rejected / "part-v1.parquet")
    pq.write_table(rejected, paths.rejected / "part-v2.parquet")  # killed before its counterfactuals file
    assert recover_interrupted_commits(paths, verification=True) == 2
    assert sorted(p.name for p in paths.candidates.iterdir()) == ["part-1.parquet"]
    assert sorted(p.name for p in paths.rejected.iterdir()) == ["part-v1.parquet"]
    assert sorted(p.name for p in paths.counterfactuals.iterdir()) == ["part-v1.parquet"]


def test_run_spec_holds_the_judging_settings_only_when_generation_is_used(cfg_factory):
    ids = {"a", "b"}
    assert "judging" not in run_spec(cfg_factory(), ids)
    spec = run_spec(cfg_factory(detection={"verification": True}, generation={"max_new_tokens": 16}), ids)
    assert spec["detection"]["verification"] is True
    assert spec["judging"]["generation"]["max_new_tokens"] == 16
    assert "pool" not in spec["judging"]["generation"]
    paths = DetectPaths(cfg_factory().run.dir / "detect")
    paths.root.mkdir(parents=True)
    check_same_spec(paths, spec)
    # Another generation length changes the verdicts: refused. Another pool size does not: accepted.
    longer = cfg_factory(detection={"verification": True}, generation={"max_new_tokens": 32})
    with pytest.raises(DetectionError, match="judging.generation.max_new_tokens"):
        check_same_spec(paths, run_spec(longer, ids))
    wider = cfg_factory(detection={"verification": True},
                        generation={"max_new_tokens": 16, "pool": {"batch_size": 64}})
    check_same_spec(paths, run_spec(wider, ids))


def test_selection_with_nothing_to_judge_fails_clearly_and_keeps_the_verdicts(cfg_factory):
    """No sample has a reference: each is recorded as not selected with its reason (no generation at all),
    and detection stops with an error pointing at the verdicts; a rerun reads them back."""
    cfg = cfg_factory(detection={**POOLS, "selection": True}, generation=GENERATION)
    write_clean(cfg, [
        {"sample_id": "no-ref", "instruction": "What is two plus three?", "output": "no final answer given",
         "answer": None},
        {"sample_id": "code-no-tests", "instruction": "Print ok.", "output": "```python\nprint('ok')\n```",
         "answer": None, "kind": "code"},
    ])
    with pytest.raises(DetectionError, match=r"kept no sample.*no reference answer: 2.*detect/selection"):
        run_detection(cfg)
    out = DetectPaths.of(cfg)
    verdicts = {r["sample_id"]: r for r in read_dir(out.selection)}
    assert pq.read_table(out.selection).schema.remove_metadata() == SELECTION_SCHEMA
    assert {k: (v["selected"], v["reason"], v["teacher_correct"]) for k, v in verdicts.items()} == {
        "no-ref": (False, NO_REFERENCE, None), "code-no-tests": (False, NO_REFERENCE, None)}
    assert "no final answer" in verdicts["no-ref"]["detail"]
    assert "tests" in verdicts["code-no-tests"]["detail"]
    assert not any(out.selection_teacher.glob("*.parquet"))  # nobody was asked
    stamps = file_stamps(out.selection)
    with pytest.raises(DetectionError, match="kept no sample"):
        run_detection(cfg)
    assert file_stamps(out.selection) == stamps


# --------------------------------------------------------------------------- end to end on a local Ray


@pytest.mark.slow
def test_selection_scores_exactly_teacher_right_student_wrong_and_verification_partitions(ray_local,
                                                                                           cfg_factory):
    cfg = cfg_factory(detection={**POOLS, "response": {"enabled": True}, "selection": True,
                                 "verification": True}, generation=GENERATION)
    # Problems the tiny teacher puts a number on (it rarely does: found in one batch, then confirmed one at a
    # time as the pool will generate), and what the student says to them.
    from leaf_ray.generate.backends import TransformersBackend

    problems = generate_problems(40, seed=7)
    batched = TransformersBackend(cfg.models.teacher, cfg.generation).generate(
        [p["instruction"] for p in problems])
    numbered = [i for i, c in enumerate(batched) if extract_answer(c) is not None]
    teacher_says = [None] * len(problems)
    for i, c in zip(numbered, answer_alone(cfg, "teacher", [problems[i]["instruction"] for i in numbered])):
        teacher_says[i] = extract_answer(c)
    answered = [i for i, a in enumerate(teacher_says) if a is not None]
    student_says = dict(zip(answered, (extract_answer(c) for c in answer_alone(
        cfg, "student", [problems[i]["instruction"] for i in answered]))))
    solvable = [i for i in answered if not answers_match(student_says[i], teacher_says[i])]
    assert len(solvable) >= 3, f"need 3 problems the teacher answers and the student does not: {teacher_says}"
    unanswered = [i for i, a in enumerate(teacher_says) if a is None]

    def sample(sid, i, answer, **extra):
        return {"sample_id": sid, "instruction": problems[i]["instruction"], "output": problems[i]["output"],
                "answer": answer, **extra}

    rows = [
        sample("sel-a", solvable[0], teacher_says[solvable[0]]),  # teacher right, student wrong: selected
        sample("sel-b", solvable[1], teacher_says[solvable[1]]),
        sample("teacher-off", solvable[2], NEVER),  # the teacher answers, but not the reference
        sample("teacher-silent", unanswered[0], problems[unanswered[0]]["answer"]),
        {"sample_id": "no-ref", "instruction": problems[unanswered[1]]["instruction"],
         "output": "no final answer given", "answer": None},
        {"sample_id": "code", "instruction": "Print ok.", "output": "```python\nprint('ok')\n```",
         "answer": None, "kind": "code", "reference": json.dumps(PRINTS_OK)},
    ]
    write_clean(cfg, rows)
    report = run_detection(cfg)
    out = DetectPaths.of(cfg)

    # The verdicts: one row per sample, the models' answers, the reason of every sample not selected.
    verdicts = {r["sample_id"]: r for r in read_dir(out.selection)}
    assert pq.read_table(out.selection).schema.remove_metadata() == SELECTION_SCHEMA
    assert {k: (v["selected"], v["reason"]) for k, v in verdicts.items()} == {
        "sel-a": (True, None), "sel-b": (True, None), "teacher-off": (False, TEACHER_WRONG),
        "teacher-silent": (False, TEACHER_WRONG), "no-ref": (False, NO_REFERENCE),
        "code": (False, TEACHER_WRONG)}
    for sid, i in (("sel-a", solvable[0]), ("sel-b", solvable[1])):
        v = verdicts[sid]
        assert (v["teacher_correct"], v["student_correct"]) == (True, False)
        assert (v["teacher_answer"], v["student_answer"]) == (teacher_says[i], student_says[i])
        assert v["reference_answer"] == teacher_says[i] and v["kind"] == "math"
    off = verdicts["teacher-off"]
    assert (off["teacher_correct"], off["student_correct"], off["student_response"]) == (False, None, None)
    assert off["teacher_answer"] == teacher_says[solvable[2]] and off["detail"] == "answer mismatch"
    assert verdicts["teacher-silent"]["teacher_answer"] is None
    assert verdicts["code"]["kind"] == "code" and verdicts["code"]["detail"].startswith("tests failed")
    assert verdicts["no-ref"]["teacher_correct"] is None

    # Exactly the selected samples were scored, every planned unit of theirs once.
    by_id = {r["sample_id"]: r for r in rows}
    planned = {(sid, "instruction") for sid in ("sel-a", "sel-b")}
    for sid in ("sel-a", "sel-b"):
        pairs = prefix_continuations(split_steps(by_id[sid]["output"], r"\n\s*\n", 3))
        planned |= {(sid, f"response:{k}") for k in range(1, len(pairs) + 1)}
    scores = read_dir(out.scores)
    assert sorted((s["sample_id"], s["scope"]) for s in scores) == sorted(planned)
    assert not read_dir(out.quarantine)

    # Verification: every candidate lands once, in counterfactuals/ exactly when the student, given the pruned
    # instruction (and continuing after the pruned prefix), answers the sample's reference.
    candidates, kept, rejected = (read_dir(d) for d in (out.candidates, out.counterfactuals, out.rejected))
    assert candidates and sum(len(s["spans"]) for s in scores) == len(candidates)
    expected = expected_verdicts(cfg, candidates, {r["sample_id"]: r["answer"] for r in rows})
    assert {cf_key(c) for c in kept} == {k for k, (_, right) in expected.items() if right}
    assert {cf_key(c) for c in rejected} == {k for k, (_, right) in expected.items() if not right}
    assert pq.read_table(out.counterfactuals).schema.remove_metadata() == COUNTERFACTUALS_SCHEMA
    if rejected:
        assert pq.read_table(out.rejected).schema.remove_metadata() == REJECTED_SCHEMA
    cand_by_key = {cf_key(c): c for c in candidates}
    for r in rejected:
        assert r["reason"] == STUDENT_WRONG_AFTER_PRUNING and r["student_answer"] == expected[cf_key(r)][0]
        assert r["reference_answer"] == by_id[r["sample_id"]]["answer"]
        assert {k: r[k] for k in COUNTERFACTUALS_SCHEMA.names} == cand_by_key[cf_key(r)]

    # Counts in the report and the manifest.
    assert report.selection == {"samples": 6, "selected": 2, "teacher_generated_this_run": 5,
                                "student_generated_this_run": 2,
                                "not_selected": {TEACHER_WRONG: 3, NO_REFERENCE: 1}}
    assert report.verification["candidates"] == len(candidates)
    assert report.verification["verified"] == len(kept) == report.counterfactuals
    assert report.verification["student_generated_this_run"] == len(candidates)
    manifest = json.loads(out.manifest.read_text())
    assert manifest["counts"]["selection"]["selected"] == 2
    assert manifest["counts"]["verification"]["verified"] == len(kept)

    # A rerun after an interruption (no manifest yet) reuses every verdict: nothing is generated again.
    stamps = file_stamps(out.selection, out.selection_teacher, out.counterfactuals, out.rejected)
    out.manifest.unlink()
    again = run_detection(cfg)
    assert again.selection["teacher_generated_this_run"] == again.selection["student_generated_this_run"] == 0
    assert again.verification["student_generated_this_run"] == 0 and again.units_this_run == 0
    assert file_stamps(out.selection, out.selection_teacher, out.counterfactuals, out.rejected) == stamps

    # Killed inside the verification pass: its committed parts stay, only the rest is judged again.
    out.manifest.unlink()
    parts = sorted(out.counterfactuals.glob("*.parquet"))
    for p in parts[1:]:
        (out.rejected / p.name).unlink(missing_ok=True)
        p.unlink()
    left = len(pq.read_table(parts[0])) + (len(pq.read_table(out.rejected / parts[0].name))
                                           if (out.rejected / parts[0].name).exists() else 0)
    third = run_detection(cfg)
    assert third.verification["student_generated_this_run"] == len(candidates) - left
    assert sorted(map(cf_key, read_dir(out.counterfactuals))) == sorted(map(cf_key, kept))
    assert sorted(map(cf_key, read_dir(out.rejected))) == sorted(map(cf_key, rejected))

    # The CLI verb prints the selection and verification counts (here: the finished run, no Ray work).
    from typer.testing import CliRunner

    from leaf_ray.cli import app

    config_file = cfg.run.dir / "config.yaml"
    config_file.write_text(cfg.to_yaml())
    result = CliRunner().invoke(app, ["detect", "--config", str(config_file)])
    assert result.exit_code == 0, result.output
    assert "selection: 2 of 6 samples scored" in result.output
    assert f"not selected 3 × {TEACHER_WRONG}" in result.output
    assert f"verification: {len(kept)} of {len(candidates)} counterfactuals kept" in result.output


@pytest.mark.slow
def test_verification_keeps_exactly_the_counterfactuals_the_student_answers(ray_local, cfg_factory, tmp_path):
    """Selection off. First without any reference (every counterfactual rejected, nobody asked), then with
    references chosen from what the student says after pruning, so that some counterfactuals are right."""
    problems = generate_problems(3, seed=21)
    # Reasoning steps without numbers: the student's answer can only come from its own continuation.
    steps = "First, read the question.\n\nThen, work it out.\n\nFinally, state the result."
    rows = [{"sample_id": f"s{i}", "instruction": p["instruction"], "output": steps, "answer": None}
            for i, p in enumerate(problems)]
    sections = {"detection": {**POOLS, "response": {"enabled": True}, "verification": True},
                "generation": GENERATION}

    first = cfg_factory(run={"name": "no-references"}, **sections)
    write_clean(first, [dict(r) for r in rows])
    report = run_detection(first)
    out = DetectPaths.of(first)
    candidates = read_dir(out.candidates)
    assert candidates and not read_dir(out.counterfactuals) and report.counterfactuals == 0
    assert sorted(map(cf_key, read_dir(out.rejected))) == sorted(map(cf_key, candidates))
    assert {(r["reason"], r["student_response"]) for r in read_dir(out.rejected)} == {(NO_REFERENCE, None)}
    n = len(candidates)
    assert report.verification == {"candidates": n, "verified": 0, "student_generated_this_run": 0,
                                   "rejected": {NO_REFERENCE: n}}

    # References: s0 gets one no counterfactual hits; s1 and s2 the student's answer to one of theirs.
    said = expected_verdicts(first, candidates, {r["sample_id"]: NEVER for r in rows})
    answers = {"s0": NEVER}
    for sid in ("s1", "s2"):
        answers[sid] = next((a for k, (a, _) in sorted(said.items()) if k[0] == sid and a is not None), NEVER)
    assert answers["s1"] != NEVER or answers["s2"] != NEVER, f"the student answered nothing: {said}"
    second = cfg_factory(run={"name": "with-references"}, **sections)
    write_clean(second, [dict(r, answer=answers[r["sample_id"]]) for r in rows])
    report = run_detection(second)
    out = DetectPaths.of(second)
    candidates, kept, rejected = (read_dir(d) for d in (out.candidates, out.counterfactuals, out.rejected))
    expected = expected_verdicts(second, candidates, answers)
    assert {cf_key(c) for c in kept} == {k for k, (_, right) in expected.items() if right} != set()
    assert {cf_key(c) for c in rejected} == {k for k, (_, right) in expected.items() if not right} != set()
    assert {r["reason"] for r in rejected} == {STUDENT_WRONG_AFTER_PRUNING}
    assert report.counterfactuals == len(kept) and report.verification["verified"] == len(kept)
    assert report.verification["rejected"] == {STUDENT_WRONG_AFTER_PRUNING: len(rejected)}
    # Stage 2 reads counterfactuals/ as before: the verified rows, unchanged.
    cand_by_key = {cf_key(c): c for c in candidates}
    assert all(c == cand_by_key[cf_key(c)] for c in kept)
    assert any(c["scope"].startswith("response:") for c in candidates)


@pytest.mark.slow
def test_a_student_already_right_is_not_selected(ray_local, cfg_factory, tiny_pair):
    """Teacher = the student's own weights: whatever it answers right, the student does too."""
    cfg = cfg_factory(detection={**POOLS, "selection": True}, generation=GENERATION,
                      models={"teacher": {"path": tiny_pair["student"]}})
    problems = generate_problems(8, seed=7)
    says = [extract_answer(c) for c in answer_alone(cfg, "student", [p["instruction"] for p in problems])]
    answered = [i for i, a in enumerate(says) if a is not None][:2]
    assert len(answered) == 2, f"the tiny student answered fewer than 2 problems: {says}"
    rows = [{"sample_id": f"right-{i}", "instruction": problems[i]["instruction"],
             "output": problems[i]["output"], "answer": says[i]} for i in answered]
    rows.append({"sample_id": "wrong", "instruction": problems[answered[0]]["instruction"],
                 "output": problems[answered[0]]["output"], "answer": NEVER})
    write_clean(cfg, rows)
    with pytest.raises(DetectionError, match=rf"kept no sample.*{STUDENT_RIGHT}: 2.*{TEACHER_WRONG}: 1"):
        run_detection(cfg)
    verdicts = {r["sample_id"]: r for r in read_dir(DetectPaths.of(cfg).selection)}
    for i in answered:
        v = verdicts[f"right-{i}"]
        assert (v["selected"], v["reason"], v["teacher_correct"], v["student_correct"]) == (
            False, STUDENT_RIGHT, True, True)
        assert v["teacher_answer"] == v["student_answer"] == says[i]
    assert (verdicts["wrong"]["reason"], verdicts["wrong"]["student_correct"]) == (TEACHER_WRONG, None)
    assert not any(DetectPaths.of(cfg).scores.glob("*.parquet"))  # stopped before scoring
