"""Stage 1 selection and counterfactual verification, by generation (docs/design.md §1.2, `detection.selection` /
`detection.verification`).

- **Selection** (the paper's Stage 1): score only the samples the teacher answers correctly and the student
  does not. It runs before scoring, over `data/clean`, in two passes so that only one generation pool
  (`generation.pool`) is alive at a time: the teacher answers every sample that has a reference, then the
  student answers the samples the teacher got right (a sample the teacher gets wrong is out whatever the
  student says, so the student is not asked). Every sample gets one verdict row; the ones not selected keep
  their reason (`no reference answer`, `instruction is empty`, `teacher wrong`, `student already right`).
- **Verification** (the paper; the reference release skips it): keep a counterfactual only if the student,
  given the pruned instruction (and, at response level, continuing after the pruned response prefix), answers
  correctly. Its reference is the sample's, not the counterfactual's `output` (a continuation at response
  level). The rest are written, with their reason, to `rejected_counterfactuals/`.

**Where verification runs.** As a post-pass after every detection unit is committed, not inside the streaming
units: the streaming commit then stays one rename per part, the saliency pools are gone before the generation
pool starts (one pool holding a large model at a time), and the pass resumes on its own. With verification on,
the stream writes its counterfactuals to `candidate_counterfactuals/`; the pass moves each through the student
and commits it to `counterfactuals/` (what Stage 2 reads, schema unchanged) or `rejected_counterfactuals/`.

**Judging** is `leaf_ray.evaluate.judge`'s (`judge`, `judge_code`) of a greedy
generation from `generation` (temperature 0 by default); a math row is right when the final answer extracted
from the response matches the reference (`answer`, else the final answer of the reference `output`); a row
with `kind: "code"` and `reference` tests (a dict, or JSON text as ingest keeps extra columns) is right when
its program passes them in the sandbox (`evaluation.code_*` limits).

Files under `<run dir>/detect/`, each a directory of Parquet parts:

    selection/                  one row per input sample: SELECTION_SCHEMA (`selected`, `reason`, `detail`)
    selection_teacher/          the teacher pass (what a resumed selection starts from)
    candidate_counterfactuals/  (verification on) every counterfactual detection made
    counterfactuals/            (verification on) the verified ones
    rejected_counterfactuals/   REJECTED_SCHEMA: the others, with the student's answer and the reason

**Resume.** Every part is written under `_tmp/` and renamed into place (the commit). A verification part
renames its rejected file first and its counterfactuals file last (the commit point, written even when
empty); at start `recover_interrupted_commits` deletes a rejected file without its counterfactuals file. A
rerun reads what is committed and generates only for the rows nothing covers: no verdict is generated twice.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from leaf_ray.config import EvaluationConfig, LeafConfig
from leaf_ray.detect.schema import COUNTERFACTUALS_SCHEMA, DetectionError
from leaf_ray.detect.stages import check_local_resources, drain_with_progress
from leaf_ray.evaluate.judge import NO_REFERENCE, Verdict, judge, judge_code, reference_answer
from leaf_ray.store import DetectPaths, commit_parts, iter_rows, parquet_files, read_parquet_dir

if TYPE_CHECKING:
    from rich.console import Console

TEACHER_WRONG = "teacher wrong"
STUDENT_RIGHT = "student already right"
EMPTY_INSTRUCTION = "instruction is empty"
STUDENT_WRONG_AFTER_PRUNING = "student wrong after pruning"

# A sample as the generation passes see it: `reference` is what the judge compares with (the answer of a math
# row, the tests of a code row as JSON); `reference_answer` is the math answer shown in the verdicts.
PLANNED_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("instruction", pa.string()),
    ("kind", pa.string()),  # math | code
    ("reference", pa.string()),
    ("reference_answer", pa.string()),
])

TEACHER_PASS_SCHEMA = pa.schema(list(PLANNED_SCHEMA) + [
    ("teacher_response", pa.string()),
    ("teacher_answer", pa.string()),
    ("teacher_correct", pa.bool_()),
    ("teacher_detail", pa.string()),  # the judge's reason when wrong
])

SELECTION_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("kind", pa.string()),
    ("reference_answer", pa.string()),  # null for code rows (their tests stay in data/clean)
    ("teacher_correct", pa.bool_()),  # null: not asked (no reference)
    ("student_correct", pa.bool_()),  # null: not asked (no reference, or the teacher was wrong)
    ("teacher_answer", pa.string()),  # extracted final answer (code: the program run)
    ("student_answer", pa.string()),
    ("teacher_response", pa.string()),
    ("student_response", pa.string()),
    ("selected", pa.bool_()),
    ("reason", pa.string()),  # null when selected
    ("detail", pa.string()),  # why: the judge's reason ("answer mismatch", "tests failed: ...") or the input
])

REJECTED_SCHEMA = pa.schema(list(COUNTERFACTUALS_SCHEMA) + [
    ("reference_answer", pa.string()),
    ("student_response", pa.string()),  # the completion after the instruction (+ response prefix)
    ("student_answer", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
])

CF_KEY = ("sample_id", "scope", "span_index")


# --------------------------------------------------------------------------- summaries


@dataclass
class SelectionSummary:
    samples: int
    selected_ids: set[str]
    not_selected: dict[str, int] = field(default_factory=dict)
    teacher_generated: int = 0  # this run
    student_generated: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "selected": len(self.selected_ids),
                "not_selected": self.not_selected, "teacher_generated_this_run": self.teacher_generated,
                "student_generated_this_run": self.student_generated}


@dataclass
class VerificationSummary:
    candidates: int
    verified: int
    rejected: dict[str, int] = field(default_factory=dict)
    generated: int = 0  # this run

    def as_dict(self) -> dict[str, Any]:
        return {"candidates": self.candidates, "verified": self.verified, "rejected": self.rejected,
                "student_generated_this_run": self.generated}


# --------------------------------------------------------------------------- references and judging


def sample_reference(row: dict) -> tuple[str, str | None, str | None]:
    """(kind, reference, why-none) of one clean sample. Math: its `answer`, else the final answer of its
    reference `output`. Code (`kind == "code"`): its `reference` tests, a dict with a `format` (or that dict
    as JSON text, as ingest keeps extra columns), re-serialised as JSON."""
    if row.get("kind") == "code":
        tests = row.get("reference")
        if isinstance(tests, str):
            try:
                tests = json.loads(tests)
            except json.JSONDecodeError as e:
                return "code", None, f"`reference` is not JSON: {e}"
        if not isinstance(tests, dict) or "format" not in tests:
            return "code", None, "code sample without `reference` tests (a dict with a `format`)"
        return "code", json.dumps(tests, ensure_ascii=False), None
    answer = reference_answer(row)
    if answer is None:
        return "math", None, "no `answer` and no final answer in `output`"
    return "math", answer, None


def judge_planned(row: dict, response: str, evaluation: EvaluationConfig) -> Verdict:
    """`evaluate.judge.judge` (math) or `judge_code` (code) of one response to a planned row."""
    if row["kind"] == "code":
        code_row = {"sample_id": row["sample_id"], "instruction": row["instruction"],
                    "reference": json.loads(row["reference"])}
        return judge_code(code_row, response, evaluation)
    return judge(response, row["reference"])


# --------------------------------------------------------------------------- selection


def run_selection(cfg: LeafConfig, paths: DetectPaths, clean_files: list[str], sample_ids: set[str], *,
                  console: Console | None = None) -> SelectionSummary:
    """Verdicts for every sample not yet in `selection/` (teacher pass, then student pass); returns the totals
    over everything committed."""
    for d in (paths.selection, paths.selection_teacher):
        d.mkdir(parents=True, exist_ok=True)
    final = ids_in(paths.selection)
    teacher_done = ids_in(paths.selection_teacher)
    unjudgeable, teacher_todo = [], set()
    for row in iter_rows(clean_files, selection_columns(clean_files)):
        if row["sample_id"] in final:
            continue
        kind, reference, why = sample_reference(row)
        reason = NO_REFERENCE
        if not (row["instruction"] or "").strip():  # nothing to answer (ingest never writes one)
            reference, reason, why = None, EMPTY_INSTRUCTION, None
        if reference is None:
            unjudgeable.append(verdict_row(row["sample_id"], kind, None, reason=reason, detail=why))
        elif row["sample_id"] not in teacher_done:
            teacher_todo.add(row["sample_id"])
    if unjudgeable:
        table = pa.Table.from_pylist(unjudgeable, schema=SELECTION_SCHEMA)
        commit_parts(paths.tmp, [(paths.selection, table)])

    teacher_generated = student_generated = 0
    if teacher_todo:
        ds = start_pass(cfg).data.read_parquet(clean_files, columns=selection_columns(clean_files))
        ds = ds.map_batches(plan_samples, batch_format="pyarrow", fn_kwargs={"todo": teacher_todo})
        teacher_generated = generate_and_commit(
            cfg, ds, cfg.models.teacher, "teacher_response", judge_teacher_part, len(teacher_todo), console,
            label="select: teacher", prefix_col=None, root=paths.root)

    # Student pass: only the samples the teacher answered right; the others are final as they are.
    final = ids_in(paths.selection)
    teacher_files = parquet_files(paths.selection_teacher)
    teacher_wrong, student_todo = [], set()
    for row in iter_rows(teacher_files, TEACHER_PASS_SCHEMA.names):
        if row["sample_id"] in final or row["sample_id"] in student_todo:
            continue  # (a block retried by Ray Data may have been committed twice: one verdict each)
        if row["teacher_correct"]:
            student_todo.add(row["sample_id"])
        else:
            final.add(row["sample_id"])
            teacher_wrong.append(verdict_row(row["sample_id"], row["kind"], row["reference_answer"],
                                             teacher=row, reason=TEACHER_WRONG, detail=row["teacher_detail"]))
    if teacher_wrong:
        table = pa.Table.from_pylist(teacher_wrong, schema=SELECTION_SCHEMA)
        commit_parts(paths.tmp, [(paths.selection, table)])
    if student_todo:
        ds = start_pass(cfg).data.read_parquet(teacher_files)
        ds = ds.map_batches(keep_rows, batch_format="pyarrow", fn_kwargs={"sample_ids": student_todo})
        student_generated = generate_and_commit(
            cfg, ds, cfg.models.student, "student_response", judge_student_part, len(student_todo), console,
            label="select: student", prefix_col=None, root=paths.root)

    summary = summarize_selection(paths, sample_ids)
    summary.teacher_generated, summary.student_generated = teacher_generated, student_generated
    if console is not None:
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(summary.not_selected.items()))
        console.print(f"selection: {len(summary.selected_ids)} of {summary.samples} samples selected"
                      + (f"; not selected: {reasons}" if reasons else "") + f" → {paths.selection}")
    return summary


def summarize_selection(paths: DetectPaths, sample_ids: set[str]) -> SelectionSummary:
    """Totals of `selection/`, which must hold exactly one verdict per input sample."""
    table = read_parquet_dir(paths.selection, ["sample_id", "selected", "reason"], schema=SELECTION_SCHEMA)
    ids = table["sample_id"].to_pylist()
    dupes = [k for k, n in Counter(ids).items() if n > 1]
    if dupes:
        raise DetectionError(f"{paths.selection}: {len(dupes)} samples have more than one verdict, e.g. "
                             f"{sorted(dupes)[:5]}")
    if set(ids) != sample_ids:
        missing, extra = sample_ids - set(ids), set(ids) - sample_ids
        raise DetectionError(f"{paths.selection}: verdicts do not cover the input ({len(missing)} samples "
                             f"without one, e.g. {sorted(missing)[:5]}; {len(extra)} unknown, e.g. "
                             f"{sorted(extra)[:5]})")
    selected = {i for i, s in zip(ids, table["selected"].to_pylist()) if s}
    reasons = Counter(r for r, s in zip(table["reason"].to_pylist(), table["selected"].to_pylist()) if not s)
    return SelectionSummary(samples=len(ids), selected_ids=selected, not_selected=dict(reasons))


def verdict_row(sample_id: str, kind: str, reference_answer: str | None, *, teacher: dict | None = None,
                student: dict | None = None, reason: str | None, detail: str | None) -> dict:
    """One SELECTION_SCHEMA row; `teacher` / `student` carry `<role>_response/_answer/_correct` when asked."""
    row = {name: None for name in SELECTION_SCHEMA.names}
    row.update(sample_id=sample_id, kind=kind, reference_answer=reference_answer, selected=reason is None,
               reason=reason, detail=detail)
    for role, judged in (("teacher", teacher), ("student", student)):
        if judged is not None:
            for k in ("response", "answer", "correct"):
                row[f"{role}_{k}"] = judged[f"{role}_{k}"]
    return row


def plan_samples(batch: pa.Table, *, todo: set[str]) -> pa.Table:
    """Clean rows in `todo` -> PLANNED_SCHEMA rows (reference resolved; every row in `todo` has one)."""
    rows = []
    for row in batch.to_pylist():
        if row["sample_id"] in todo:
            kind, reference, _ = sample_reference(row)
            rows.append({"sample_id": row["sample_id"], "instruction": row["instruction"], "kind": kind,
                         "reference": reference, "reference_answer": reference if kind == "math" else None})
    return pa.Table.from_pylist(rows, schema=PLANNED_SCHEMA)


def judge_teacher_part(batch: pa.Table, *, root: str, evaluation: dict) -> pa.Table:
    """Judge the teacher's responses of one block; commit them as one `selection_teacher/` part."""
    ev, rows = EvaluationConfig(**evaluation), []
    for row in batch.to_pylist():
        verdict = judge_planned(row, row["teacher_response"] or "", ev)
        rows.append({**{k: row[k] for k in PLANNED_SCHEMA.names}, "teacher_response": row["teacher_response"],
                     "teacher_answer": verdict.predicted, "teacher_correct": verdict.correct,
                     "teacher_detail": verdict.reason})
    paths = DetectPaths(Path(root))
    if rows:
        table = pa.Table.from_pylist(rows, schema=TEACHER_PASS_SCHEMA)
        commit_parts(paths.tmp, [(paths.selection_teacher, table)])
    return part_summary(units=len(rows), correct=sum(r["teacher_correct"] for r in rows))


def judge_student_part(batch: pa.Table, *, root: str, evaluation: dict) -> pa.Table:
    """Judge the student on samples the teacher got right; commit their final verdicts as one part."""
    ev, rows = EvaluationConfig(**evaluation), []
    for row in batch.to_pylist():
        verdict = judge_planned(row, row["student_response"] or "", ev)
        student = {"student_response": row["student_response"], "student_answer": verdict.predicted,
                   "student_correct": verdict.correct}
        rows.append(verdict_row(row["sample_id"], row["kind"], row["reference_answer"], teacher=row,
                                student=student, reason=STUDENT_RIGHT if verdict.correct else None,
                                detail=None))
    paths = DetectPaths(Path(root))
    if rows:
        commit_parts(paths.tmp, [(paths.selection, pa.Table.from_pylist(rows, schema=SELECTION_SCHEMA))])
    return part_summary(units=len(rows), correct=sum(r["student_correct"] for r in rows))


# --------------------------------------------------------------------------- verification


def run_verification(cfg: LeafConfig, paths: DetectPaths, clean_files: list[str], *,
                     console: Console | None = None) -> VerificationSummary:
    """Judge every committed candidate counterfactual not yet in `counterfactuals/` or
    `rejected_counterfactuals/`; returns the totals over everything committed."""
    for d in (paths.candidates, paths.counterfactuals, paths.rejected):
        d.mkdir(parents=True, exist_ok=True)
    candidate_files = parquet_files(paths.candidates)
    done = cf_keys(paths.counterfactuals) | cf_keys(paths.rejected)
    todo = cf_keys(paths.candidates) - done
    todo_ids = {key[0] for key in todo}
    references: dict[str, tuple[str, str, str | None]] = {}
    unjudgeable: dict[str, str] = {}
    if todo_ids:
        for row in iter_rows(clean_files, selection_columns(clean_files)):
            if row["sample_id"] in todo_ids:
                kind, reference, why = sample_reference(row)
                if reference is None:
                    unjudgeable[row["sample_id"]] = why
                else:
                    references[row["sample_id"]] = (kind, reference, reference if kind == "math" else None)
    if unjudgeable:  # rejected without asking the student: nothing to judge against
        rejected = [dict(cf, reference_answer=None, student_response=None, student_answer=None,
                         reason=NO_REFERENCE, detail=unjudgeable[cf["sample_id"]])
                    for cf in iter_rows(candidate_files, COUNTERFACTUALS_SCHEMA.names)
                    if cf["sample_id"] in unjudgeable and cf_key(cf) not in done]
        if rejected:
            commit_verification_part(paths, rejected, [])

    generated = 0
    n_todo = sum(1 for k in todo if k[0] in references)
    if n_todo:
        ds = start_pass(cfg).data.read_parquet(candidate_files)
        ds = ds.map_batches(attach_references, batch_format="pyarrow",
                            fn_kwargs={"references": references, "done": frozenset(done)})
        generated = generate_and_commit(
            cfg, ds, cfg.models.student, "student_response", judge_verification_part, n_todo, console,
            label="verify", prefix_col="response_prefix", root=paths.root)

    summary = summarize_verification(paths)
    summary.generated = generated
    if console is not None:
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(summary.rejected.items()))
        console.print(f"verification: {summary.verified} of {summary.candidates} counterfactuals verified"
                      + (f"; rejected: {reasons} → {paths.rejected}" if reasons else ""))
    return summary


def summarize_verification(paths: DetectPaths) -> VerificationSummary:
    """Totals; verified and rejected must partition the candidates exactly (each once)."""
    verified, rejected = read_keys(paths.counterfactuals), read_keys(paths.rejected, extra=["reason"])
    candidates = read_keys(paths.candidates)
    keys = [cf_key(r) for r in verified] + [cf_key(r) for r in rejected]
    dupes = [k for k, n in Counter(keys).items() if n > 1]
    if dupes:
        raise DetectionError(f"{paths.root}: {len(dupes)} counterfactuals were verified more than once, e.g. "
                             f"{sorted(dupes)[:3]}")
    unjudged = {cf_key(r) for r in candidates} - set(keys)
    if unjudged or len(keys) != len(candidates):
        raise DetectionError(f"{paths.root}: {len(unjudged)} candidate counterfactuals have no verification "
                             f"verdict, e.g. {sorted(unjudged)[:3]}")
    return VerificationSummary(candidates=len(candidates), verified=len(verified),
                               rejected=dict(Counter(r["reason"] for r in rejected)))


def attach_references(batch: pa.Table, *, references: dict, done: frozenset) -> pa.Table:
    """Candidate rows not yet judged whose sample has a reference, plus `kind`, `reference`,
    `reference_answer` (the sample's, not the counterfactual's)."""
    rows = [r for r in batch.to_pylist() if r["sample_id"] in references and cf_key(r) not in done]
    for r in rows:
        r["kind"], r["reference"], r["reference_answer"] = references[r["sample_id"]]
    schema = pa.schema(list(COUNTERFACTUALS_SCHEMA) + [("kind", pa.string()), ("reference", pa.string()),
                                                       ("reference_answer", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


def judge_verification_part(batch: pa.Table, *, root: str, evaluation: dict) -> pa.Table:
    """Judge prefix + the student's continuation of each counterfactual; commit one verification part."""
    ev, verified, rejected = EvaluationConfig(**evaluation), [], []
    for row in batch.to_pylist():
        verdict = judge_planned(row, (row["response_prefix"] or "") + (row["student_response"] or ""), ev)
        cf = {k: row[k] for k in COUNTERFACTUALS_SCHEMA.names}
        if verdict.correct:
            verified.append(cf)
        else:
            rejected.append(dict(cf, reference_answer=row["reference_answer"],
                                 student_response=row["student_response"], student_answer=verdict.predicted,
                                 reason=STUDENT_WRONG_AFTER_PRUNING, detail=verdict.reason))
    if verified or rejected:
        commit_verification_part(DetectPaths(Path(root)), rejected, verified)
    return part_summary(units=len(verified) + len(rejected), correct=len(verified))


def commit_verification_part(paths: DetectPaths, rejected: list[dict], verified: list[dict]) -> None:
    """Rejected file first, counterfactuals file last (the commit point, written even when empty)."""
    tables = [(paths.rejected, pa.Table.from_pylist(rejected, schema=REJECTED_SCHEMA)),
              (paths.counterfactuals, pa.Table.from_pylist(verified, schema=COUNTERFACTUALS_SCHEMA))]
    commit_parts(paths.tmp, tables, skip_empty_but_last=True)


# --------------------------------------------------------------------------- shared plumbing


def start_pass(cfg: LeafConfig):
    """Ray, connected, with room for one generation pool (local instances do not autoscale)."""
    import ray
    import ray.data  # callers use ray.data

    from leaf_ray.raycluster import init_ray

    init_ray(cfg)
    check_local_resources(cfg, ray.cluster_resources(), {"generation.pool": cfg.generation.pool})
    return ray


def generate_and_commit(cfg: LeafConfig, ds, model_ref, out_col: str, judge_fn, estimated: int,
                        console: Console | None, *, label: str, prefix_col: str | None, root: Path) -> int:
    """Blocks of `units_per_part` rows -> the model's completion (`generation.pool`) -> `judge_fn` commits
    each block as a part. Returns the rows generated."""
    from leaf_ray.generate.pipeline import generate_dataset

    ds = ds.repartition(target_num_rows_per_block=cfg.detection.units_per_part)
    ds = generate_dataset(cfg, model_ref, ds, "instruction", out_col, prefix_col=prefix_col)
    commits = ds.map_batches(judge_fn, batch_format="pyarrow",
                             fn_kwargs={"root": str(root), "evaluation": cfg.evaluation.model_dump()})
    return drain_with_progress(commits, estimated, console, label=label, stall_timeout_s=cfg.ray.stall_timeout_s,
                               info=lambda totals: f"right {totals['correct']}")


def part_summary(**counts: int) -> pa.Table:
    return pa.table({k: pa.array([v], pa.int64()) for k, v in counts.items()})


def selection_columns(clean_files: list[str]) -> list[str]:
    """What judging a clean sample needs: its text and whichever reference columns the corpus has."""
    names = pq.read_schema(clean_files[0]).names
    return ["sample_id", "instruction", "output"] + [c for c in ("answer", "kind", "reference") if c in names]


def keep_rows(batch: pa.Table, *, sample_ids: set[str]) -> pa.Table:
    return batch.filter(pc.is_in(batch["sample_id"], value_set=pa.array(sorted(sample_ids), pa.string())))


def ids_in(directory: Path) -> set[str]:
    return set(read_parquet_dir(directory, ["sample_id"], schema=SELECTION_SCHEMA)["sample_id"].to_pylist())


def cf_key(row: dict) -> tuple:
    return tuple(row[k] for k in CF_KEY)


def read_keys(directory: Path, extra: list[str] | None = None) -> list[dict]:
    return read_parquet_dir(directory, list(CF_KEY) + (extra or []), schema=REJECTED_SCHEMA).to_pylist()


def cf_keys(directory: Path) -> set[tuple]:
    return {cf_key(r) for r in read_keys(directory)}
