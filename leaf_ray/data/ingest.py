"""Validated ingestion: JSON array / JSONL / Parquet -> `data/clean/` + `data/quarantine/` Parquet (Ray Data).

Pipeline (one Ray Data dataset, streamed):

1. Driver, before any work: expand paths, directories and globs (local or any URI pyarrow/fsspec opens), pick
   each file's format, load the student tokenizer. A nonexistent path, a glob matching nothing or an unknown
   format raises :class:`IngestError` naming the path.
2. ``read_datasource(corpus_datasource(...))``: one read task per file streams it (JSONL line by line,
   Parquet row group by row group, a JSON array parsed whole; a local JSONL file over
   ``data.jsonl_range_bytes`` is cut at line ends into byte ranges, one task each, rows numbered as if read
   whole) and turns every record into one row of :data:`RECORD_SCHEMA`, either clean or carrying a
   quarantine ``reason``. A bad record never raises.
3. ``_check_length``, inside each read task: renders each clean record with the student's chat template and
   quarantines (or truncates the response of) records longer than ``data.max_length`` tokens.
   An input of at most ``data.inline_max_bytes`` runs steps 2-4 in the calling process instead (the same
   functions over a list of blocks; no Ray start), which is what a small job costs in a plain script.
4. Dedup by ``sample_id`` on the driver (see :func:`_duplicate_keys`), then ``write_parquet`` of the clean
   and the quarantined rows, plus ``ingest_manifest.json``.

Row numbers (``row``): the 1-based line number for JSONL (what an editor shows), the 0-based element index
for a JSON array, the 0-based row index for Parquet (exact: row groups are read in order within one task);
``-1`` for a record about a whole file (empty file, file that is not JSON/Parquet at all).

Extra input columns (not mapped to a field) are kept as **string** columns so every block has one schema
whatever the records hold: strings as they are, other values JSON-encoded (``3``, ``true``, ``[1, 2]``);
absent = null. An extra column whose name clashes with an output column is written as ``extra_<name>``.

Quarantine ``raw``: the source text (the JSONL line, the JSON element or Parquet row as JSON) for records
rejected while reading; for ``too_long`` and ``duplicate_id`` (decided after field mapping) the mapped record
as JSON (``sample_id``, ``instruction`` with ``input`` appended, ``output``, ``answer``, extras).

Where things are: resolving and reading the files is ``sources.py``, the per-record checks and the schemas
``records.py``, this file the recipe (length check, dedup, outputs, manifest).

Counting: ``read`` = records seen + one per file that yields no records (empty / unreadable file), so
``read == clean + quarantined`` always holds; blank lines of a JSONL file are not records and are skipped.
"""

from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from leaf_ray.data.records import (
    CLEAN_COLUMNS,
    DUPLICATE_ID,
    EMPTY_FILE,
    INVALID_JSON_FILE,
    QUARANTINE_SCHEMA,
    RECORD_SCHEMA,
    RENDER_FAILED,
    ROW_BITS,
    TOO_LONG,
    UNREADABLE_FILE,
    IngestError,
)
from leaf_ray.data.sources import corpus_datasource, jsonl_ranges, read_item, resolve_sources, total_bytes
from leaf_ray.store import RunDir, replace_parquet_dir, write_json_atomic

if TYPE_CHECKING:
    from rich.console import Console

    from leaf_ray.config import LeafConfig


# --------------------------------------------------------------------------- report


@dataclass
class IngestReport:
    read: int
    clean: int
    quarantined: dict[str, int]
    splits: dict[str, int]
    truncated: int
    sources: list[dict[str, Any]]
    warnings: list[str]
    clean_dir: Path
    quarantine_dir: Path
    manifest_path: Path

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())

    def print(self, console: Console) -> None:
        from rich.table import Table

        table = Table(title="ingest", show_header=True)
        table.add_column("records")
        table.add_column("count", justify="right")
        table.add_row("read", str(self.read))
        table.add_row("[green]clean[/green]", str(self.clean))
        for split in sorted(self.splits):
            table.add_row(f"  {split}", str(self.splits[split]))
        if self.truncated:
            table.add_row("  truncated response", str(self.truncated))
        table.add_row("[red]quarantined[/red]", str(self.quarantined_total))
        for reason in sorted(self.quarantined):
            table.add_row(f"  {reason}", str(self.quarantined[reason]))
        console.print(table)
        for line in self.warnings:
            console.print(f"[yellow]warning:[/yellow] {line}", highlight=False)
        console.print(f"clean:      {self.clean_dir}", highlight=False)
        console.print(f"quarantine: {self.quarantine_dir}", highlight=False)
        console.print(f"manifest:   {self.manifest_path}", highlight=False)


# --------------------------------------------------------------------------- length check (Ray Data task)

def fit_to_length(tokenizer, instruction: str, output: str, max_length: int) -> tuple[int, str | None]:
    """(tokens of the rendered record, the longest prefix of `output` whose rendering fits, or None).

    The cut is at a token's end character (offsets), so it never splits a character; BPE may merge
    differently after the cut, so the result is re-rendered and shortened until it fits.
    """
    from leaf_ray.data.chat import render

    rendered = render(tokenizer, instruction, output)
    n_tokens = len(rendered.input_ids)
    if n_tokens <= max_length:
        return n_tokens, output
    response_start = rendered.target_start
    # Tokens after the response (the end-of-turn token) must still fit.
    tail_tokens = sum(1 for a, _ in rendered.offsets if a >= response_start + len(output))
    keep = max_length - tail_tokens
    while keep > 0:
        cut = rendered.offsets[keep - 1][1] - response_start
        if cut <= 0:
            return n_tokens, None
        candidate = output[:cut]
        if not candidate.strip():
            return n_tokens, None
        if len(render(tokenizer, instruction, candidate).input_ids) <= max_length:
            return n_tokens, candidate
        keep -= 1
    return n_tokens, None


def _check_length(batch: pa.Table, model_ref_json: str, max_length: int, truncate: bool) -> pa.Table:
    """Ray Data UDF: quarantine (or truncate) clean records longer than `max_length` rendered tokens."""
    from leaf_ray.data.chat import TemplateError, rendered_lengths

    rows = batch.to_pylist()
    live = [row for row in rows if row["reason"] is None]
    if not live:
        return pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)
    from leaf_ray.raycluster import cached_tokenizer

    tokenizer = cached_tokenizer(model_ref_json)
    # Most records fit: their lengths in one batched pass; the others (and template errors) one by one.
    lengths = rendered_lengths(tokenizer, [(row["instruction"], row["output"]) for row in live])
    for row, n_tokens in zip(live, lengths):
        if n_tokens is not None and n_tokens <= max_length:
            continue
        try:
            n_tokens, fitted = fit_to_length(tokenizer, row["instruction"], row["output"], max_length)
        except TemplateError as e:
            row.update(reason=RENDER_FAILED, detail=str(e), raw=_clean_row_raw(row))
            continue
        if fitted == row["output"]:
            continue
        if truncate and fitted is not None:
            row.update(output=fitted, truncated=True)
            continue
        why = "" if not truncate else "; the instruction alone does not leave room for a response"
        row.update(reason=TOO_LONG, detail=f"rendered record has {n_tokens} tokens > data.max_length "
                                           f"{max_length}{why}", raw=_clean_row_raw(row))
    return pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)


def _clean_row_raw(row: dict[str, Any]) -> str:
    record = {"sample_id": row["sample_id"], "instruction": row["instruction"], "output": row["output"],
              "answer": row["answer"], **json.loads(row["extras_json"] or "{}")}
    return json.dumps(record, ensure_ascii=False)


# --------------------------------------------------------------------------- dedup, summary, outputs


def _duplicate_keys(ids: pa.Table) -> dict[int, int]:
    """{order_key of a later duplicate: order_key of the first occurrence} for rows sharing a sample_id.

    Runs on the driver over the (sample_id, order_key) columns of the clean rows only, in Arrow: memory is
    O(clean rows), roughly 60 bytes each (10 M records ~ 0.6 GB). Past that, replace it with a Ray Data
    `groupby("sample_id")` (a shuffle); the rest of the pipeline is unchanged.
    """
    import pyarrow.compute as pc

    if ids.num_rows == 0:
        return {}
    grouped = ids.group_by("sample_id").aggregate([("order_key", "min"), ("order_key", "count")])
    dup_ids = grouped.filter(pc.greater(grouped["order_key_count"], 1))
    if dup_ids.num_rows == 0:
        return {}
    first = dict(zip(dup_ids["sample_id"].to_pylist(), dup_ids["order_key_min"].to_pylist()))
    mask = pc.is_in(ids["sample_id"], value_set=dup_ids["sample_id"])
    rows = ids.filter(mask)
    return {key: first[sid] for sid, key in zip(rows["sample_id"].to_pylist(), rows["order_key"].to_pylist())
            if key != first[sid]}


def _mark_duplicates(batch: pa.Table, duplicates: dict[int, int], sources: list[str]) -> pa.Table:
    if not duplicates:
        return batch
    rows = batch.to_pylist()
    for row in rows:
        first = duplicates.get(row["order_key"]) if row["reason"] is None else None
        if first is None:
            continue
        first_source, first_row = sources[first >> ROW_BITS], first & ((1 << ROW_BITS) - 1)
        row.update(reason=DUPLICATE_ID, raw=_clean_row_raw(row),
                   detail=f"duplicate sample_id {row['sample_id']!r}; first occurrence kept: "
                          f"{first_source} row {first_row}")
    return pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)


ID_SCHEMA = pa.schema([("sample_id", pa.string()), ("order_key", pa.int64()), ("source", pa.string()),
                       ("split", pa.string()), ("truncated", pa.bool_())])
SUMMARY_SCHEMA = pa.schema([("source", pa.string()), ("reason", pa.string()), ("split", pa.string()),
                            ("truncated", pa.bool_()), ("count", pa.int64()), ("extra_keys", pa.string())])


def _clean_ids(batch: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.is_null(batch["reason"])).select(ID_SCHEMA.names)


def _per_block(records, fn, **kwargs):
    """`fn(block, **kwargs)` of every block of the checked records: a Ray Data map over the materialised dataset,
    or, for an input ingested in this process, a list of tables."""
    if isinstance(records, list):
        return [fn(table, **kwargs) for table in records]
    return records.map_batches(fn, batch_format="pyarrow", fn_kwargs=kwargs)


def _concat(ds, schema: pa.Schema) -> pa.Table:
    """Pull a (small) dataset, or a list of tables, to the driver as one Arrow table."""
    if isinstance(ds, list):
        tables = ds
    else:
        import ray

        tables = ray.get(ds.to_arrow_refs())
    tables = [t for t in tables if t.num_rows]
    return pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()


def _summarize(batch: pa.Table) -> pa.Table:
    """Per block: counts by (source, reason, split, truncated) and the extra column names seen."""
    keys = set()
    for extras in batch.column("extras_json").to_pylist():
        if extras:
            keys.update(json.loads(extras))
    counts = batch.group_by(["source", "reason", "split", "truncated"], use_threads=False).aggregate(
        [("row", "count")])
    return pa.table({
        "source": counts["source"], "reason": counts["reason"], "split": counts["split"],
        "truncated": counts["truncated"], "count": counts["row_count"],
        "extra_keys": pa.array([json.dumps(sorted(keys))] * counts.num_rows, pa.string()),
    }, schema=SUMMARY_SCHEMA)


def _extra_column_name(key: str) -> str:
    return f"extra_{key}" if key in CLEAN_COLUMNS or key.startswith("extra_") else key


def clean_schema(extra_keys: list[str]) -> pa.Schema:
    base = [pa.field(name, RECORD_SCHEMA.field(name).type) for name in CLEAN_COLUMNS]
    return pa.schema(base + [pa.field(_extra_column_name(k), pa.string()) for k in extra_keys])


def _to_clean(batch: pa.Table, duplicates: dict[int, int], sources: list[str], extra_keys: list[str]) -> pa.Table:
    import pyarrow.compute as pc

    batch = _mark_duplicates(batch, duplicates, sources)
    batch = batch.filter(pc.is_null(batch["reason"]))
    columns = {name: batch[name] for name in CLEAN_COLUMNS}
    extras = [json.loads(e or "{}") for e in batch["extras_json"].to_pylist()]
    for key in extra_keys:
        columns[_extra_column_name(key)] = pa.array([e.get(key) for e in extras], pa.string())
    return pa.table(columns, schema=clean_schema(extra_keys))


def _to_quarantine(batch: pa.Table, duplicates: dict[int, int], sources: list[str]) -> pa.Table:
    import pyarrow.compute as pc

    batch = _mark_duplicates(batch, duplicates, sources)
    batch = batch.filter(pc.is_valid(batch["reason"]))
    return batch.select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA)


def ingest_spec(cfg: LeafConfig) -> dict[str, Any]:
    """What decides the ingest output: the data section, the student tokenizer, the seed. A rerun replaces
    the output whole, so the spec is recorded in the manifest, not guarded."""
    return {"data": cfg.data.model_dump(mode="json"), "student": cfg.models.student.model_dump(mode="json"),
            "seed": cfg.run.seed}


# --------------------------------------------------------------------------- entry point


@contextlib.contextmanager
def _ray_data_in_order():
    """Ray Data keeps the input order while the ingest runs: clean/ rows come out in input order, so reruns are
    identical."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        yield
    finally:
        ctx.execution_options.preserve_order = saved


def read_items(files: list[tuple[str, str]], range_bytes: int) -> list[dict[str, Any]]:
    """One read task per file, or per line-aligned byte range of a big local JSONL file (`jsonl_ranges`), so
    one large file is read, checked and tokenised by all the CPUs at once."""
    items = []
    for i, (source, fmt) in enumerate(files):
        ranges = jsonl_ranges(source, range_bytes) if fmt == "jsonl" else []
        for start, end, first_line in ranges or [(-1, -1, 1)]:
            items.append({"file_index": i, "source": source, "format": fmt, "start": start, "end": end,
                          "first_line": first_line})
    return items


def run_ingest(cfg: LeafConfig) -> IngestReport:
    """Validate the corpus in `cfg.data` into `<run dir>/data/{clean,quarantine}/` and a manifest."""
    import pyarrow.compute as pc

    from leaf_ray.data.demo_corpus import write_demo_corpus
    from leaf_ray.models import ModelLoadError
    from leaf_ray.raycluster import cached_tokenizer, init_ray, local_model_ref

    run_dir = RunDir(Path(cfg.run.dir).expanduser().resolve())
    paths, fmt = cfg.data.paths, cfg.data.format
    if not paths:
        demo = write_demo_corpus(run_dir.demo_corpus, cfg.data.demo.size, cfg.data.demo.seed)
        paths, fmt = [str(demo)], "jsonl"
    files = resolve_sources(paths, fmt)
    student = local_model_ref(cfg.models.student)
    try:
        # Fail before any work if the max_length check cannot run; an inline check reuses this load.
        cached_tokenizer(student.model_dump_json())
    except (ModelLoadError, OSError, ValueError) as e:
        raise IngestError(f"models.student: the data.max_length check needs the student tokenizer: {e} (for "
                          "the tiny offline pair: `leaf-ray models make-tiny DIR`)") from None

    size = total_bytes(files)
    inline = size is not None and size <= cfg.data.inline_max_bytes
    if not inline:
        init_ray(cfg)
    sources = [f for f, _ in files]
    with contextlib.nullcontext() if inline else _ray_data_in_order():
        items = read_items(files, cfg.data.jsonl_range_bytes)
        # Each block of read_files (1024 records) is length-checked in its read task: one batched tokenizer
        # call per block, every file / byte range read, checked and tokenised by one task.
        check = functools.partial(_check_length, model_ref_json=student.model_dump_json(),
                                  max_length=cfg.data.max_length, truncate=cfg.data.on_too_long == "truncate")
        read_args = (cfg.data.fields, cfg.run.seed, cfg.data.validation_fraction)
        if inline:  # a small input: the same read tasks, run in this process (Ray's start would dominate)
            records = [table for item in items for table in read_item(item, *read_args, then=check)]
        else:
            import ray.data

            source = corpus_datasource(items, *read_args, then=check)
            records = ray.data.read_datasource(source, override_num_blocks=len(items)).materialize()
        id_table = _concat(_per_block(records, _clean_ids), ID_SCHEMA)
        duplicates = _duplicate_keys(id_table)
        duplicate_rows = id_table.filter(pc.is_in(id_table["order_key"], pa.array(list(duplicates), pa.int64())))
        del id_table
        summary = _concat(_per_block(records, _summarize), SUMMARY_SCHEMA)
        extra_keys = sorted({k for keys in summary["extra_keys"].to_pylist() for k in json.loads(keys)})
        counts = _count(summary.to_pylist(), duplicate_rows.to_pylist(), sources, files)

        clean_dir, quarantine_dir = run_dir.clean, run_dir.data_quarantine
        # An empty output is not run at all: its directory gets the empty table of its schema.
        clean = _per_block(records, _to_clean, duplicates=duplicates, sources=sources, extra_keys=extra_keys)
        replace_parquet_dir(clean_dir, clean if counts["clean"] else None, clean_schema(extra_keys))
        quarantine = _per_block(records, _to_quarantine, duplicates=duplicates, sources=sources)
        replace_parquet_dir(quarantine_dir, quarantine if sum(counts["quarantined"].values()) else None,
                            QUARANTINE_SCHEMA)

    manifest_path = run_dir.ingest_manifest
    manifest = {
        "counts": {"read": counts["read"], "clean": counts["clean"],
                   "quarantined": sum(counts["quarantined"].values())},
        "quarantined_by_reason": counts["quarantined"], "splits": counts["splits"],
        "truncated": counts["truncated"], "sources": counts["sources"], "warnings": counts["warnings"],
        "extra_columns": [_extra_column_name(k) for k in extra_keys],
        "spec": ingest_spec(cfg), "clean_dir": str(clean_dir), "quarantine_dir": str(quarantine_dir),
        "execution": {"mode": "inline" if inline else "ray_data", "read_tasks": len(items), "input_bytes": size},
    }
    write_json_atomic(manifest_path, manifest)
    return IngestReport(read=counts["read"], clean=counts["clean"], quarantined=counts["quarantined"],
                        splits=counts["splits"], truncated=counts["truncated"], sources=counts["sources"],
                        warnings=counts["warnings"], clean_dir=clean_dir, quarantine_dir=quarantine_dir,
                        manifest_path=manifest_path)


def _count(summary_rows: list[dict], duplicate_rows: list[dict], sources: list[str],
           files: list[tuple[str, str]]) -> dict[str, Any]:
    """Totals, per-reason, per-split and per-source counts; the duplicates (counted clean by the summary,
    which runs before dedup) are moved to quarantine."""
    per_source = {f: {"source": f, "format": ff, "read": 0, "clean": 0, "quarantined": 0} for f, ff in files}
    quarantined: dict[str, int] = {}
    splits: dict[str, int] = {}
    truncated = 0
    warnings: list[str] = []
    for row in summary_rows:
        n, src = row["count"], per_source[row["source"]]
        src["read"] += n
        if row["reason"] is None:
            src["clean"] += n
            splits[row["split"]] = splits.get(row["split"], 0) + n
            truncated += n if row["truncated"] else 0
        else:
            src["quarantined"] += n
            quarantined[row["reason"]] = quarantined.get(row["reason"], 0) + n
            if row["reason"] in (EMPTY_FILE, INVALID_JSON_FILE, UNREADABLE_FILE):
                warnings.append(f"{row['source']}: {row['reason'].replace('_', ' ')} (quarantined)")
    for row in duplicate_rows:
        src = per_source[row["source"]]
        src["clean"] -= 1
        src["quarantined"] += 1
        splits[row["split"]] -= 1
        truncated -= 1 if row["truncated"] else 0
        quarantined[DUPLICATE_ID] = quarantined.get(DUPLICATE_ID, 0) + 1
    read = sum(s["read"] for s in per_source.values())
    clean = sum(s["clean"] for s in per_source.values())
    return {"read": read, "clean": clean, "quarantined": dict(sorted(quarantined.items())),
            "splits": {k: v for k, v in sorted(splits.items()) if v}, "truncated": truncated,
            "sources": list(per_source.values()), "warnings": sorted(set(warnings))}
