"""Generation on Ray Data: an actor pool holding one backend each, and the three uses built on it.

- `generate_dataset`: add a completion column to any Ray Dataset (`ActorPoolStrategy` from `generation.pool`).
- `generate_teacher_responses`: teacher responses for `data/clean`, keeping only those whose final answer
  matches the reference; the rest are quarantined with reason "answer mismatch".
- `correctness` / `check_rows`: does a model answer each row correctly? (Stage 1 selection: teacher right and
  student wrong; verification: student right after pruning.)
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leaf_ray.config import GenerationConfig, LeafConfig, ModelRef

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

log = logging.getLogger(__name__)

ANSWER_MISMATCH = "answer mismatch"
NO_REFERENCE = "no reference answer"


class GenerateUDF:
    """Ray Data actor: loads the model once, then completes `prompt_col` of each batch into `out_col`."""

    def __init__(self, model_ref: dict, gen: dict, seed: int, prompt_col: str, out_col: str,
                 prefix_col: str | None = None):
        from leaf_ray.generate.backends import make_backend

        self.backend = make_backend(ModelRef(**model_ref), GenerationConfig(**gen), seed)
        self.prompt_col, self.out_col, self.prefix_col = prompt_col, out_col, prefix_col
        log.info("generation actor ready: backend=%s model=%s", self.backend.name, model_ref["path"])

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        prompts = batch.column(self.prompt_col).to_pylist()
        prefixes = None
        if self.prefix_col:
            prefixes = [p or "" for p in batch.column(self.prefix_col).to_pylist()]
        completions = pa.array(self.backend.generate(prompts, prefixes=prefixes), pa.string())
        if self.out_col in batch.column_names:
            return batch.set_column(batch.column_names.index(self.out_col), self.out_col, completions)
        return batch.append_column(self.out_col, completions)


def generate_dataset(cfg: LeafConfig, model_ref: ModelRef, ds: ray.data.Dataset, prompt_col: str,
                     out_col: str, *, prefix_col: str | None = None) -> ray.data.Dataset:
    """`ds` plus a column `out_col` holding the model's completion of each row's `prompt_col` instruction
    (continuing from `prefix_col`'s response prefix when given). Lazy, like any Ray Data transform."""
    return ds.map_batches(
        GenerateUDF,
        fn_constructor_kwargs={"model_ref": model_ref.model_dump(), "gen": cfg.generation.model_dump(),
                               "seed": cfg.run.seed, "prompt_col": prompt_col, "out_col": out_col,
                               "prefix_col": prefix_col},
        batch_format="pyarrow", **cfg.generation.pool.map_batches_kwargs(),  # ActorPoolStrategy from the pool
    )


def generate_rows(cfg: LeafConfig, model_ref: ModelRef, prompts: list[str],
                  prefixes: list[str] | None = None) -> list[str]:
    """Completions for a Python list of instructions, in input order (through the actor pool)."""
    import ray.data

    from leaf_ray.raycluster import init_ray

    if not prompts:
        return []
    init_ray(cfg)
    items = [{"gen_index": i, "prompt": p, "prefix": prefixes[i] if prefixes else ""}
             for i, p in enumerate(prompts)]
    ds = generate_dataset(cfg, model_ref, ray.data.from_items(items), "prompt", "completion",
                          prefix_col="prefix" if prefixes else None)
    rows = sorted(ds.select_columns(["gen_index", "completion"]).take_all(), key=lambda r: r["gen_index"])
    return [r["completion"] for r in rows]


# --------------------------------------------------------------------------- answer checking


@dataclass
class Verdict:
    correct: bool
    predicted: str | None
    reference: str | None
    reason: str | None  # None when correct


def reference_answer(row: dict) -> str | None:
    """The row's `answer`, else the final answer extracted from its reference `output`."""
    from leaf_ray.evaluate.answers import extract_answer

    answer = row.get("answer")
    if answer is not None and str(answer).strip():
        return str(answer).strip()
    output = row.get("output")
    return extract_answer(output) if output else None


def judge(completion: str, reference: str | None) -> Verdict:
    """Math check of one completion: extract its final answer, compare with `answers_match`."""
    from leaf_ray.evaluate.answers import answers_match, extract_answer

    predicted = extract_answer(completion)
    if reference is None:
        return Verdict(False, predicted, None, NO_REFERENCE)
    ok = predicted is not None and answers_match(predicted, reference)
    return Verdict(ok, predicted, reference, None if ok else ANSWER_MISMATCH)


def judge_code(row: dict, response: str, evaluation) -> Verdict:
    """Code check of one response: its program must pass the row's tests in the sandbox. `reference` is a
    code reference as `load_benchmark` builds it (humaneval / leetcode / livecodebench tests)."""
    from leaf_ray.evaluate.benchmarks import score_response

    reference = row.get("reference")
    if not isinstance(reference, dict) or "format" not in reference:
        return Verdict(False, None, None, NO_REFERENCE)
    score = score_response({"id": row.get("sample_id"), "kind": "code", "prompt": row["instruction"],
                            "reference": reference}, response, timeout_s=evaluation.code_timeout_s,
                           memory_mb=evaluation.code_memory_mb, max_processes=evaluation.code_max_processes,
                           isolation=evaluation.code_isolation)
    return Verdict(score.correct, score.predicted, None, None if score.correct else f"tests failed: {score.reason}")


def check_rows(cfg: LeafConfig, model_ref: ModelRef, rows: list[dict]) -> list[tuple[str, Verdict]]:
    """Generate for each row (`instruction`, optional `response_prefix`) and judge prefix + completion
    against the row's reference: math rows by final answer, rows with `kind: code` by running their tests.
    Returns (completion, verdict) per row, in order."""
    for i, r in enumerate(rows):
        if not r.get("instruction"):
            raise ValueError(f"row {i} (sample_id={r.get('sample_id')!r}): missing `instruction`")
    prefixes = [r.get("response_prefix") or "" for r in rows]
    completions = generate_rows(cfg, model_ref, [r["instruction"] for r in rows],
                                prefixes if any(prefixes) else None)
    verdicts = []
    for c, p, r in zip(completions, prefixes, rows):
        # The final answer may sit in the continuation only; judge the whole response.
        if r.get("kind") == "code":
            verdicts.append((c, judge_code(r, p + c, cfg.evaluation)))
        else:
            verdicts.append((c, judge(p + c, reference_answer(r))))
    return verdicts


def correctness(cfg: LeafConfig, model_ref: ModelRef, rows: list[dict]) -> list[bool]:
    """Is `model_ref`'s greedy answer to each row right?

    Rows: `instruction`; math rows carry `answer` (or a reference `output` ending in a final answer); code
    rows carry `kind: "code"` and `reference` (tests, as `load_benchmark` builds them); optional
    `response_prefix` (the model continues after it; response-level verification). Stage 1 selection keeps
    rows where `correctness(teacher)` is True and `correctness(student)` is False; verification keeps
    counterfactual rows (pruned instruction, original reference) where `correctness(student)` is True.
    A row without any reference counts as not correct.
    """
    return [v.correct for _, v in check_rows(cfg, model_ref, rows)]


# --------------------------------------------------------------------------- teacher responses


@dataclass
class TeacherResponsesReport:
    total: int
    kept: int
    rejected: dict[str, int] = field(default_factory=dict)
    out_dir: str = ""
    quarantine_dir: str = ""

    def print(self, console) -> None:
        console.print(f"teacher responses: kept [green]{self.kept}[/green] of {self.total} -> {self.out_dir}")
        for reason, n in sorted(self.rejected.items()):
            console.print(f"  quarantined [yellow]{n}[/yellow]: {reason}")
        if self.rejected:
            console.print(f"  quarantine: {self.quarantine_dir}")


def _judge_batch(batch: pa.Table, *, gen_col: str) -> pa.Table:
    import pyarrow as pa

    rows = batch.to_pylist()
    verdicts = [judge(r[gen_col] or "", reference_answer(r)) for r in rows]
    for name, values in (("predicted_answer", [v.predicted for v in verdicts]),
                         ("reference_answer", [v.reference for v in verdicts]),
                         ("reject_reason", [v.reason for v in verdicts])):
        batch = batch.append_column(name, pa.array(values, pa.string()))
    return batch


def _kept_batch(batch: pa.Table, *, columns: list[str], gen_col: str) -> pa.Table:
    import pyarrow.compute as pc

    kept = batch.filter(pc.is_null(batch["reject_reason"]))
    # Same schema as data/clean: the generated response takes the place of `output`.
    return kept.set_column(kept.column_names.index("output"), "output", kept[gen_col]).select(columns)


def _quarantine_batch(batch: pa.Table, *, gen_col: str) -> pa.Table:
    import pyarrow as pa
    import pyarrow.compute as pc

    rejected = batch.filter(pc.is_valid(batch["reject_reason"])).to_pylist()
    out = {"source": [], "row": [], "reason": [], "raw": []}
    for r in rejected:
        out["source"].append(r.get("source"))
        out["row"].append(r.get("row"))
        out["reason"].append(r["reject_reason"])
        raw = {k: r.get(k) for k in ("sample_id", "instruction", "answer", "reference_answer",
                                     "predicted_answer")}
        raw["generated"] = r[gen_col]
        out["raw"].append(json.dumps(raw, ensure_ascii=False, default=str))
    return pa.table({"source": pa.array(out["source"], pa.string()), "row": pa.array(out["row"], pa.int64()),
                     "reason": pa.array(out["reason"], pa.string()), "raw": pa.array(out["raw"], pa.string())})


def _write(ds: ray.data.Dataset, out_dir: Path, schema: pa.Schema) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.rmtree(out_dir, ignore_errors=True)  # a rerun replaces, never appends duplicates
    ds.write_parquet(str(out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    if not any(out_dir.glob("*.parquet")):  # nothing to write: keep a readable empty table
        pq.write_table(pa.Table.from_pylist([], schema=schema), out_dir / "empty.parquet")


def generate_teacher_responses(cfg: LeafConfig) -> TeacherResponsesReport:
    """Teacher responses for `<run dir>/data/clean`, kept only where the final answer checks out.

    Writes `<run dir>/generate/teacher_responses/` (data/clean's schema, `output` = the teacher's response)
    and `<run dir>/generate/quarantine/` (source, row, reason, raw) for the rejected rows.
    """
    import pyarrow as pa
    import ray.data

    from leaf_ray.raycluster import init_ray

    clean = cfg.run.dir / "data" / "clean"
    if not clean.is_dir() or not any(clean.glob("*.parquet")):
        raise FileNotFoundError(f"no cleaned corpus at {clean}: run `leaf-ray ingest` first")
    init_ray(cfg)
    source = ray.data.read_parquet(str(clean))
    columns = list(source.schema().names)
    gen_col = "_generated"
    judged = generate_dataset(cfg, cfg.models.teacher, source, "instruction", gen_col)
    judged = judged.map_batches(_judge_batch, fn_kwargs={"gen_col": gen_col}, batch_format="pyarrow")
    judged = judged.materialize()  # generate once, write twice

    out_dir = cfg.run.dir / "generate" / "teacher_responses"
    quarantine_dir = cfg.run.dir / "generate" / "quarantine"
    kept = judged.map_batches(_kept_batch, fn_kwargs={"columns": columns, "gen_col": gen_col},
                              batch_format="pyarrow")
    _write(kept, out_dir, source.schema().base_schema)
    quarantined = judged.map_batches(_quarantine_batch, fn_kwargs={"gen_col": gen_col}, batch_format="pyarrow")
    _write(quarantined, quarantine_dir, pa.schema([("source", pa.string()), ("row", pa.int64()),
                                                   ("reason", pa.string()), ("raw", pa.string())]))

    reasons: dict[str, Any] = {}
    for r in judged.select_columns(["reject_reason"]).take_all():
        if r["reject_reason"] is not None:
            reasons[r["reject_reason"]] = reasons.get(r["reject_reason"], 0) + 1
    total = judged.count()
    return TeacherResponsesReport(total=total, kept=total - sum(reasons.values()), rejected=reasons,
                                  out_dir=str(out_dir), quarantine_dir=str(quarantine_dir))
