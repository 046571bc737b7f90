"""Generation on Ray Data: an actor pool holding one backend each, and the three uses built on it.

- `generate_dataset`: add a completion column to any Ray Dataset (`ActorPoolStrategy` from `generation.pool`).
- `generate_teacher_responses`: teacher responses for `data/clean`, keeping only those whose final answer
  matches the reference; the rest are quarantined with reason "answer mismatch".
- `generate_rows`: completions of a list of prompts (evaluation, cross-checks); a small list (`generation.inline_max_prompts`)
  goes through the same UDF in the calling process.
Judging an answer is `leaf_ray.evaluate.judge`'s.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from leaf_ray.config import GenerationConfig, LeafConfig, ModelRef
from leaf_ray.evaluate.judge import judge, reference_answer
from leaf_ray.store import RunDir, parquet_files, replace_parquet_dir

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

log = logging.getLogger(__name__)

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
    (continuing from `prefix_col`'s response prefix when given). Lazy, like any Ray Data transform.

    `generation.backend: vllm | sglang` run a `ray.data.llm` processor (leaf_ray/generate/ray_data_llm.py);
    `transformers` and `auto` an actor pool of :class:`GenerateUDF`."""
    from leaf_ray.generate import ray_data_llm

    if cfg.generation.backend in ray_data_llm.ENGINES:
        return ray_data_llm.generate_dataset(cfg, model_ref, ds, prompt_col, out_col, prefix_col=prefix_col)
    return ds.map_batches(
        GenerateUDF,
        fn_constructor_kwargs={"model_ref": model_ref.model_dump(), "gen": cfg.generation.model_dump(),
                               "seed": cfg.run.seed, "prompt_col": prompt_col, "out_col": out_col,
                               "prefix_col": prefix_col},
        batch_format="pyarrow", **cfg.generation.pool.map_batches_kwargs(),  # ActorPoolStrategy from the pool
    )


def generate_rows(cfg: LeafConfig, model_ref: ModelRef, prompts: list[str],
                  prefixes: list[str] | None = None, console=None, label: str = "generate") -> list[str]:
    """Completions for a Python list of instructions, in input order (through the actor pool); with a
    `console`, one progress line (rows/s, ETA) while they stream in."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if not prompts:
        return []
    items = [{"gen_index": i, "prompt": p, "prefix": prefixes[i] if prefixes else ""}
             for i, p in enumerate(prompts)]
    rows = []
    with Progress(TextColumn(label, markup=False), BarColumn(bar_width=24), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]} rows/s ETA"), TimeRemainingColumn(), console=console,
                  disable=console is None) as progress:
        task = progress.add_task(label, total=len(items), rate="0.00")
        for row in _completions(cfg, model_ref, items, bool(prefixes)):
            rows.append(row)
            elapsed = progress.tasks[0].elapsed or 0.0
            progress.update(task, advance=1, rate=f"{len(rows) / elapsed:.2f}" if elapsed else "0.00")
    rows.sort(key=lambda r: r["gen_index"])
    return [r["completion"] for r in rows]


def _completions(cfg: LeafConfig, model_ref: ModelRef, items: list[dict], with_prefixes: bool):
    """``{"gen_index", "completion"}`` per item as they are done: through the actor pool, or, for at most
    ``generation.inline_max_prompts`` items, the same UDF called here batch by batch (no actor to start;
    in-process backends only: a `ray.data.llm` engine always runs in its processor)."""
    import pyarrow as pa

    from leaf_ray.generate.ray_data_llm import ENGINES

    if len(items) <= cfg.generation.inline_max_prompts and cfg.generation.backend not in ENGINES:
        udf = GenerateUDF(model_ref.model_dump(), cfg.generation.model_dump(), cfg.run.seed, "prompt",
                          "completion", prefix_col="prefix" if with_prefixes else None)
        try:
            size = cfg.generation.pool.batch_size
            for start in range(0, len(items), size):
                yield from udf(pa.Table.from_pylist(items[start:start + size])).select(
                    ["gen_index", "completion"]).to_pylist()
        finally:
            udf.backend.close()
        return
    import ray.data

    from leaf_ray.raycluster import init_ray

    init_ray(cfg)
    ds = generate_dataset(cfg, model_ref, ray.data.from_items(items), "prompt", "completion",
                          prefix_col="prefix" if with_prefixes else None)
    from leaf_ray.raycluster import bounded_stream

    yield from bounded_stream(ds.select_columns(["gen_index", "completion"]).iter_rows(), cfg.ray.stall_timeout_s,
                              "generate (Ray Data stream)")


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
