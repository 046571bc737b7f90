"""The teacher-response pass: the teacher's completions of `<run dir>/data/clean`, kept only where the judge
finds the final answer right; the rest are quarantined with reason "answer mismatch".

It lives in `evaluate` because it judges: generation (`leaf_ray.generate`) only completes prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from leaf_ray.config import LeafConfig
from leaf_ray.evaluate.judge import judge, reference_answer
from leaf_ray.generate.pipeline import generate_dataset
from leaf_ray.store import RunDir, parquet_files, replace_parquet_dir

if TYPE_CHECKING:
    import pyarrow as pa


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


def generate_teacher_responses(cfg: LeafConfig) -> TeacherResponsesReport:
    """Teacher responses for `<run dir>/data/clean`, kept only where the final answer checks out.

    Writes `<run dir>/generate/teacher_responses/` (data/clean's schema, `output` = the teacher's response)
    and `<run dir>/generate/quarantine/` (source, row, reason, raw) for the rejected rows.
    """
    import pyarrow as pa
    import ray.data

    from leaf_ray.raycluster import init_ray

    run_dir = RunDir.of(cfg)
    clean = run_dir.clean
    if not parquet_files(clean):
        raise FileNotFoundError(f"no cleaned corpus at {clean}: run `leaf-ray ingest` first")
    init_ray(cfg)
    source = ray.data.read_parquet(str(clean))
    columns = list(source.schema().names)
    gen_col = "_generated"
    judged = generate_dataset(cfg, cfg.models.teacher, source, "instruction", gen_col)
    judged = judged.map_batches(_judge_batch, fn_kwargs={"gen_col": gen_col}, batch_format="pyarrow")
    judged = judged.materialize()  # generate once, write twice

    out_dir, quarantine_dir = run_dir.teacher_responses, run_dir.generate_quarantine
    kept = judged.map_batches(_kept_batch, fn_kwargs={"columns": columns, "gen_col": gen_col},
                              batch_format="pyarrow")
    replace_parquet_dir(out_dir, kept, source.schema().base_schema)  # a rerun replaces, never appends
    quarantined = judged.map_batches(_quarantine_batch, fn_kwargs={"gen_col": gen_col}, batch_format="pyarrow")
    replace_parquet_dir(quarantine_dir, quarantined, pa.schema([("source", pa.string()), ("row", pa.int64()),
                                                   ("reason", pa.string()), ("raw", pa.string())]))

    reasons: dict[str, Any] = {}
    for r in judged.select_columns(["reject_reason"]).take_all():
        if r["reject_reason"] is not None:
            reasons[r["reject_reason"]] = reasons.get(r["reject_reason"], 0) + 1
    total = judged.count()
    return TeacherResponsesReport(total=total, kept=total - sum(reasons.values()), rejected=reasons,
                                  out_dir=str(out_dir), quarantine_dir=str(quarantine_dir))
