"""Validated ingestion: JSON array / JSONL / Parquet -> `data/clean/` + `data/quarantine/` Parquet (Ray Data).

Pipeline (one Ray Data dataset, streamed):

1. Driver, before any work: expand paths, directories and globs (local or any URI pyarrow/fsspec opens), pick
   each file's format, load the student tokenizer. A nonexistent path, a glob matching nothing or an unknown
   format raises :class:`IngestError` naming the path.
2. ``from_items(files)`` -> ``map_batches(_read_file)``: one task per file streams it (JSONL line by line,
   Parquet row group by row group, a JSON array parsed whole) and turns every record into one row of
   :data:`RECORD_SCHEMA`, either clean or carrying a quarantine ``reason``. A bad record never raises.
3. ``map_batches(_check_length)``: renders each clean record with the student's chat template and quarantines
   (or truncates the response of) records longer than ``data.max_length`` tokens.
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

Counting: ``read`` = records seen + one per file that yields no records (empty / unreadable file), so
``read == clean + quarantined`` always holds; blank lines of a JSONL file are not records and are skipped.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from leaf_ray.store import RunDir, replace_parquet_dir, write_json_atomic

if TYPE_CHECKING:
    from rich.console import Console

    from leaf_ray.config import FieldMap, LeafConfig


class IngestError(ValueError):
    """Input that cannot be ingested at all (raised before any work starts)."""


FORMAT_BY_EXTENSION = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}

# Every row between the pipeline stages has exactly this schema (reason null = clean).
RECORD_SCHEMA = pa.schema([
    ("order_key", pa.int64()),      # file_index << ROW_BITS | row: "first occurrence" order for dedup
    ("source", pa.string()),
    ("row", pa.int64()),
    ("sample_id", pa.string()),
    ("instruction", pa.string()),
    ("output", pa.string()),
    ("answer", pa.string()),
    ("split", pa.string()),
    ("truncated", pa.bool_()),
    ("extras_json", pa.string()),   # JSON object of the kept extra columns (values already strings)
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("raw", pa.string()),
])
QUARANTINE_SCHEMA = pa.schema([("source", pa.string()), ("row", pa.int64()), ("reason", pa.string()),
                               ("detail", pa.string()), ("raw", pa.string())])
CLEAN_COLUMNS = ["sample_id", "instruction", "output", "answer", "split", "source", "row", "truncated"]
ROW_BITS = 40  # rows per file < 2**40, files < 2**23
FILE_RECORD_ROW = -1
RAW_FILE_LIMIT = 64 * 1024  # a whole-file quarantine record keeps at most this many characters of the file

# Quarantine reasons (the `reason` column); `detail` says which field / what exactly.
MALFORMED_JSON = "malformed_json"
INVALID_JSON_FILE = "invalid_json_file"
UNREADABLE_FILE = "unreadable_file"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
EMPTY_FIELD = "empty_field"
WRONG_TYPE = "wrong_type"
INVALID_UTF8 = "invalid_utf8"
DUPLICATE_ID = "duplicate_id"
TOO_LONG = "too_long"
RENDER_FAILED = "render_failed"
EMPTY_FILE = "empty_file"


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


# --------------------------------------------------------------------------- resolving inputs (driver)


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def filesystem_for(uri: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI; fsspec for schemes pyarrow lacks
    (the same fallback Ray Data uses)."""
    import pyarrow.fs as pafs

    if not _is_uri(uri):
        local = uri.removeprefix("file://")
        return pafs.LocalFileSystem(), str(Path(local).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        try:
            import fsspec
        except ImportError:  # pragma: no cover - fsspec ships with ray[data]
            raise IngestError(f"data.paths: no filesystem can open {uri!r}") from None
        try:
            fs, path = fsspec.core.url_to_fs(uri)
        except (ImportError, ValueError) as e:
            raise IngestError(f"data.paths: no filesystem can open {uri!r}: {e}") from None
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _list_uri(pattern: str) -> list[str]:
    """Files under a URI (a file, a directory, or a glob in the part after the bucket)."""
    import pyarrow.fs as pafs

    glob_at = min((pattern.index(c) for c in "*?[" if c in pattern), default=len(pattern))
    base = pattern[:glob_at].rsplit("/", 1)[0] if glob_at < len(pattern) else pattern
    try:
        fs, base_path = filesystem_for(base)
        info = fs.get_file_info(base_path)
    except (OSError, pa.ArrowException) as e:
        raise IngestError(f"data.paths: cannot access {pattern!r}: {e}") from None
    if info.type == pafs.FileType.File and glob_at == len(pattern):
        return [pattern]
    if info.type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(base_path, recursive=True))
    # Rebuild full URIs from the listing relative to the base directory.
    uris = [base.rstrip("/") + "/" + i.path[len(base_path.rstrip("/")) + 1:] for i in infos
            if i.type == pafs.FileType.File]
    if glob_at < len(pattern):
        uris = [u for u in uris if fnmatch.fnmatchcase(u, pattern)]
    else:
        uris = [u for u in uris if Path(u).suffix.lower() in FORMAT_BY_EXTENSION]
    return sorted(uris)


def _expand(path: str) -> list[str]:
    if _is_uri(path):
        return _list_uri(path)
    local = path.removeprefix("file://")
    local = os.path.expanduser(local)
    if _has_glob(local):
        matches = sorted(glob.glob(local, recursive=True))
        files = []
        for m in matches:
            files += _expand(m) if os.path.isdir(m) else [m]
        return [str(Path(f).resolve()) for f in files]
    p = Path(local)
    if p.is_dir():
        return sorted(str(f.resolve()) for f in p.rglob("*")
                      if f.is_file() and f.suffix.lower() in FORMAT_BY_EXTENSION)
    if p.is_file():
        return [str(p.resolve())]
    return []


def resolve_sources(paths: list[str], fmt: str) -> list[tuple[str, str]]:
    """[(file, format)] for `data.paths`; IngestError (naming the path) for anything unreadable."""
    files: list[tuple[str, str]] = []
    seen: set[str] = set()
    for path in paths:
        expanded = _expand(path)
        if not expanded:
            what = "glob matches no files" if _has_glob(path) else "path does not exist"
            if not _has_glob(path) and not _is_uri(path) and Path(os.path.expanduser(path)).is_dir():
                what = "directory holds no .json/.jsonl/.ndjson/.parquet files"
            raise IngestError(f"data.paths: {path!r}: {what}")
        for f in expanded:
            if f in seen:
                continue
            seen.add(f)
            if fmt != "auto":
                files.append((f, fmt))
                continue
            suffix = Path(f.split("?", 1)[0]).suffix.lower()
            if suffix not in FORMAT_BY_EXTENSION:
                raise IngestError(
                    f"data.paths: {f!r}: unknown format (extension {suffix or '<none>'!r}); expected one of "
                    f"{', '.join(FORMAT_BY_EXTENSION)} or set data.format to json, jsonl or parquet"
                )
            files.append((f, FORMAT_BY_EXTENSION[suffix]))
    return files


# --------------------------------------------------------------------------- per-record validation (pure)


def content_hash(instruction: str, output: str) -> str:
    return hashlib.sha256((instruction + "\x00" + output).encode("utf-8")).hexdigest()[:16]


def split_of(sample_id: str, seed: int, validation_fraction: float) -> str:
    """Deterministic split: the first 8 bytes of sha256(f"{seed}:{sample_id}") as a fraction in [0, 1)."""
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    return "validation" if fraction < validation_fraction else "train"


def _utf8_ok(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:  # lone surrogate: undecodable bytes or a bad \ud800 escape
        return False


def _bad_utf8_path(value: Any, path: str = "") -> str | None:
    """Dotted path of the first string that is not valid UTF-8 (bytes values are decoded strictly)."""
    if isinstance(value, str):
        return None if _utf8_ok(value) else (path or "<record>")
    if isinstance(value, (bytes, bytearray)):
        try:
            bytes(value).decode("utf-8")
            return None
        except UnicodeDecodeError:
            return path or "<record>"
    if isinstance(value, dict):
        for k, v in value.items():
            bad = _bad_utf8_path(k, path) if isinstance(k, str) else None
            bad = bad or _bad_utf8_path(v, f"{path}.{k}" if path else str(k))
            if bad:
                return bad
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            bad = _bad_utf8_path(v, f"{path}[{i}]")
            if bad:
                return bad
    return None


def _as_text(value: Any) -> Any:
    """bytes (Parquet binary / string columns are read as bytes) -> str; anything else unchanged."""
    return bytes(value).decode("utf-8") if isinstance(value, (bytes, bytearray)) else value


def _extra_to_string(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _safe_str(s: str) -> str:
    """`s` with undecodable bytes shown as \\xNN and other lone surrogates as \\udNNN (writable to Arrow)."""
    if _utf8_ok(s):
        return s
    try:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _raw_text(value: Any) -> str:
    """A printable, UTF-8-safe rendering for the quarantine `raw` column: text (a JSONL line) as it is,
    bytes with undecodable bytes escaped, anything else (a parsed JSON element, a Parquet row) as JSON."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="backslashreplace")
    if isinstance(value, str):
        return _safe_str(value)
    return _json_raw(value)


def _json_raw(value: Any) -> str:
    try:
        return _safe_str(json.dumps(value, ensure_ascii=False, default=_json_default))
    except (TypeError, ValueError):
        return _safe_str(repr(value))


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="backslashreplace")
    return str(value)


def validate_record(record: Any, fields: FieldMap) -> tuple[dict[str, Any] | None, str | None, str | None]:
    """(clean fields, None, None) or (None, reason, detail) for one parsed record.

    Clean fields: instruction (with `input` appended after a blank line), output, answer, id (given id as a
    string, or None), extras (name -> string).
    """
    if not isinstance(record, dict):
        return None, NOT_AN_OBJECT, f"record is a JSON {type(record).__name__}, expected an object"
    bad = _bad_utf8_path(record)
    if bad:
        return None, INVALID_UTF8, f"field `{bad}` is not valid UTF-8"
    record = {k: _as_text(v) for k, v in record.items()}
    values: dict[str, str] = {}
    for name in ("instruction", "output"):
        column = getattr(fields, name)
        value = record.get(column)
        if value is None:
            state = "is null" if column in record else "is missing"
            return None, MISSING_FIELD, f"required field `{column}` ({name}) {state}"
        if not isinstance(value, str):
            return None, WRONG_TYPE, f"field `{column}` ({name}) must be a string, got {type(value).__name__}"
        if not value.strip():
            kind = "empty" if not value else "whitespace-only"
            return None, EMPTY_FIELD, f"field `{column}` ({name}) is {kind}"
        values[name] = value
    instruction, output = values["instruction"], values["output"]
    if fields.input and record.get(fields.input) is not None:
        extra_input = record[fields.input]
        if not isinstance(extra_input, str):
            return None, WRONG_TYPE, (f"field `{fields.input}` (input) must be a string, got "
                                      f"{type(extra_input).__name__}")
        if extra_input.strip():
            instruction = instruction + "\n\n" + extra_input
    answer = None
    if fields.answer and record.get(fields.answer) is not None:
        answer = record[fields.answer]
        # Numeric reference answers (GSM-style `72`) are common; anything else structured is an error.
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            return None, WRONG_TYPE, (f"field `{fields.answer}` (answer) must be a string or number, got "
                                      f"{type(answer).__name__}")
        answer = str(answer)
    given_id = None
    if fields.id and record.get(fields.id) is not None:
        given_id = record[fields.id]
        if isinstance(given_id, bool) or not isinstance(given_id, (str, int)):
            return None, WRONG_TYPE, (f"field `{fields.id}` (id) must be a string or integer, got "
                                      f"{type(given_id).__name__}")
        given_id = str(given_id)
        if not given_id.strip():
            return None, EMPTY_FIELD, f"field `{fields.id}` (id) is empty"
    mapped = {c for c in (fields.instruction, fields.output, fields.input, fields.answer, fields.id) if c}
    extras = {k: _extra_to_string(v) for k, v in record.items() if k not in mapped}
    return {"instruction": instruction, "output": output, "answer": answer, "id": given_id,
            "extras": extras}, None, None


# --------------------------------------------------------------------------- reading (Ray Data tasks)


class _RowBuilder:
    """Accumulates RECORD_SCHEMA rows for one file and emits them as Arrow tables."""

    def __init__(self, file_index: int, source: str, fields, seed: int, validation_fraction: float):
        self.file_index, self.source, self.fields = file_index, source, fields
        self.seed, self.validation_fraction = seed, validation_fraction
        self.rows: list[dict[str, Any]] = []

    def _base(self, row: int) -> dict[str, Any]:
        key = (self.file_index << ROW_BITS) | (max(row, 0))
        return {"order_key": key, "source": self.source, "row": row}

    def quarantine(self, row: int, reason: str, detail: str, raw: str) -> None:
        self.rows.append({**self._base(row), "reason": reason, "detail": detail, "raw": raw})

    def record(self, row: int, record: Any, raw: str | None = None) -> None:
        """Validate one parsed record; `raw` = its source text (JSONL line), None = JSON of the record."""
        try:
            clean, reason, detail = validate_record(record, self.fields)
        except Exception as e:  # noqa: BLE001 - a record we did not foresee is quarantined, never fatal
            clean, reason, detail = None, NOT_AN_OBJECT, f"could not validate record: {type(e).__name__}: {e}"
        if clean is None:
            self.quarantine(row, reason, detail, _raw_text(raw) if raw is not None else _json_raw(record))
            return
        sample_id = clean["id"] or content_hash(clean["instruction"], clean["output"])
        self.rows.append({
            **self._base(row), "sample_id": sample_id, "instruction": clean["instruction"],
            "output": clean["output"], "answer": clean["answer"],
            "split": split_of(sample_id, self.seed, self.validation_fraction), "truncated": False,
            "extras_json": json.dumps(clean["extras"], ensure_ascii=False, sort_keys=True),
        })

    def flush(self) -> pa.Table:
        table = pa.Table.from_pylist(self.rows, schema=RECORD_SCHEMA)
        self.rows = []
        return table


def _read_jsonl(stream, out: _RowBuilder, chunk_bytes: int = 1 << 20) -> Iterator[pa.Table]:
    """Line by line; each line decoded and parsed on its own, so a bad line costs only itself."""
    line_no, pending, saw_content = 0, b"", False
    while True:
        chunk = stream.read(chunk_bytes)
        if chunk:
            *lines, pending = (pending + chunk).split(b"\n")
        else:
            lines, pending = ([pending] if pending else []), b""
        for line in lines:
            line_no += 1
            if line_no == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            line = line.rstrip(b"\r")
            if not line.strip():
                continue  # blank lines are not records
            saw_content = True
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                out.quarantine(line_no, INVALID_UTF8, f"line {line_no}: invalid UTF-8 at byte {e.start}",
                               _raw_text(line))
                continue
            try:
                record = json.loads(text)
            except (ValueError, RecursionError) as e:
                why = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
                out.quarantine(line_no, MALFORMED_JSON, f"line {line_no}: {why}", text)
                continue
            out.record(line_no, record, text)
            if len(out.rows) >= 1024:
                yield out.flush()
        if not chunk:
            break
    if not saw_content:
        out.quarantine(FILE_RECORD_ROW, EMPTY_FILE, "file holds no records", "")
    yield out.flush()


def _read_json(stream, out: _RowBuilder) -> Iterator[pa.Table]:
    """A JSON array (one record per element). A `.json` file whose first character is not `[` is read as
    JSON Lines, which many `.json` corpora actually are."""
    data = stream.read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if not data.strip():
        out.quarantine(FILE_RECORD_ROW, EMPTY_FILE, "file holds no records", "")
        yield out.flush()
        return
    if not data.lstrip().startswith(b"["):
        yield from _read_jsonl(pa.BufferReader(data), out)
        return
    # surrogateescape keeps undecodable bytes as lone surrogates: the array still parses and the
    # element holding them is quarantined as invalid UTF-8 by validate_record.
    text = data.decode("utf-8", errors="surrogateescape")
    try:
        records = json.loads(text)
    except (ValueError, RecursionError) as e:
        raw = text if len(text) <= RAW_FILE_LIMIT else \
            text[:RAW_FILE_LIMIT] + f"...[{len(text)} characters in total]"
        why = f"{e.msg} at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
        out.quarantine(FILE_RECORD_ROW, INVALID_JSON_FILE, f"file is not valid JSON: {why}", _raw_text(raw))
        yield out.flush()
        return
    if not records:
        out.quarantine(FILE_RECORD_ROW, EMPTY_FILE, "JSON array is empty", "[]")
    for index, record in enumerate(records):
        out.record(index, record)
        if len(out.rows) >= 1024:
            yield out.flush()
    yield out.flush()


def _read_parquet(fs, path: str, out: _RowBuilder) -> Iterator[pa.Table]:
    """Row group by row group, in order, so `row` is the exact row index within the file."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(fs.open_input_file(path))
    except (OSError, pa.ArrowException) as e:
        out.quarantine(FILE_RECORD_ROW, UNREADABLE_FILE, f"not a readable Parquet file: {e}", "")
        yield out.flush()
        return
    if parquet.metadata.num_rows == 0:
        out.quarantine(FILE_RECORD_ROW, EMPTY_FILE, "Parquet file has no rows", "")
        yield out.flush()
        return
    first_row = 0
    for group in range(parquet.num_row_groups):
        n_rows = parquet.metadata.row_group(group).num_rows
        try:
            table = parquet.read_row_group(group)
            # Text read as bytes so one invalid UTF-8 value quarantines its row, not the row group.
            table = table.cast(pa.schema([
                pa.field(f.name, pa.binary() if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
                         else f.type) for f in table.schema]))
            records = table.to_pylist()
        except (OSError, pa.ArrowException) as e:
            out.quarantine(first_row, UNREADABLE_FILE,
                           f"row group {group} (rows {first_row}..{first_row + n_rows - 1}) unreadable: {e}", "")
            first_row += n_rows
            continue
        for i, record in enumerate(records):
            out.record(first_row + i, record)
        first_row += n_rows
        yield out.flush()


def _read_files(batch: pa.Table, fields, seed: int, validation_fraction: float) -> Iterator[pa.Table]:
    """Ray Data UDF: read each file of the batch (rows: file_index, source, format)."""
    for file_index, source, fmt in zip(*(batch.column(c).to_pylist() for c in ("file_index", "source", "format"))):
        out = _RowBuilder(file_index, source, fields, seed, validation_fraction)
        try:
            fs, path = filesystem_for(source)
            if fmt == "parquet":
                yield from _read_parquet(fs, path, out)
                continue
            with fs.open_input_stream(path) as stream:
                yield from (_read_jsonl(stream, out) if fmt == "jsonl" else _read_json(stream, out))
        except (OSError, pa.ArrowException) as e:  # rows read before the failure are kept
            out.quarantine(FILE_RECORD_ROW, UNREADABLE_FILE, f"cannot read file: {e}", "")
            yield out.flush()


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
    from leaf_ray.data.chat import TemplateError

    rows = batch.to_pylist()
    tokenizer = None
    for row in rows:
        if row["reason"] is not None:
            continue
        if tokenizer is None:
            from leaf_ray.raycluster import cached_tokenizer

            tokenizer = cached_tokenizer(model_ref_json)
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


def _concat(ds, schema: pa.Schema) -> pa.Table:
    """Pull a (small) dataset to the driver as one Arrow table."""
    import ray

    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
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


def run_ingest(cfg: LeafConfig) -> IngestReport:
    """Validate the corpus in `cfg.data` into `<run dir>/data/{clean,quarantine}/` and a manifest."""
    import pyarrow.compute as pc
    import ray.data

    from leaf_ray.data.demo_corpus import write_demo_corpus
    from leaf_ray.models import ModelLoadError, load_tokenizer
    from leaf_ray.raycluster import init_ray, local_model_ref

    run_dir = RunDir(Path(cfg.run.dir).expanduser().resolve())
    paths, fmt = cfg.data.paths, cfg.data.format
    if not paths:
        demo = write_demo_corpus(run_dir.demo_corpus, cfg.data.demo.size, cfg.data.demo.seed)
        paths, fmt = [str(demo)], "jsonl"
    files = resolve_sources(paths, fmt)
    student = local_model_ref(cfg.models.student)
    try:
        load_tokenizer(student)  # fail before any work if the max_length check cannot run
    except (ModelLoadError, OSError, ValueError) as e:
        raise IngestError(f"models.student: the data.max_length check needs the student tokenizer: {e} (for "
                          "the tiny offline pair: `leaf-ray models make-tiny DIR`)") from None

    init_ray(cfg)
    sources = [f for f, _ in files]
    ctx = ray.data.DataContext.get_current()
    saved_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # clean/ rows come out in input order: reruns are identical
    try:
        items = [{"file_index": i, "source": f, "format": ff} for i, (f, ff) in enumerate(files)]
        records = (
            ray.data.from_items(items, override_num_blocks=len(items))
            .map_batches(_read_files, batch_size=1, batch_format="pyarrow",
                         fn_kwargs={"fields": cfg.data.fields, "seed": cfg.run.seed,
                                    "validation_fraction": cfg.data.validation_fraction})
            .map_batches(_check_length, batch_size=64, batch_format="pyarrow",
                         fn_kwargs={"model_ref_json": student.model_dump_json(), "max_length": cfg.data.max_length,
                                    "truncate": cfg.data.on_too_long == "truncate"})
            .materialize()
        )
        id_table = _concat(records.map_batches(_clean_ids, batch_format="pyarrow"), ID_SCHEMA)
        duplicates = _duplicate_keys(id_table)
        duplicate_rows = id_table.filter(pc.is_in(id_table["order_key"], pa.array(list(duplicates), pa.int64())))
        del id_table
        summary = _concat(records.map_batches(_summarize, batch_format="pyarrow"), SUMMARY_SCHEMA)
        extra_keys = sorted({k for keys in summary["extra_keys"].to_pylist() for k in json.loads(keys)})
        counts = _count(summary.to_pylist(), duplicate_rows.to_pylist(), sources, files)

        clean_dir, quarantine_dir = run_dir.clean, run_dir.data_quarantine
        # An empty output is not run at all: its directory gets the empty table of its schema.
        clean = records.map_batches(_to_clean, batch_format="pyarrow", fn_kwargs={
            "duplicates": duplicates, "sources": sources, "extra_keys": extra_keys})
        replace_parquet_dir(clean_dir, clean if counts["clean"] else None, clean_schema(extra_keys))
        quarantine = records.map_batches(_to_quarantine, batch_format="pyarrow",
                                         fn_kwargs={"duplicates": duplicates, "sources": sources})
        replace_parquet_dir(quarantine_dir, quarantine if sum(counts["quarantined"].values()) else None,
                            QUARANTINE_SCHEMA)
    finally:
        ctx.execution_options.preserve_order = saved_order

    manifest_path = run_dir.ingest_manifest
    manifest = {
        "counts": {"read": counts["read"], "clean": counts["clean"],
                   "quarantined": sum(counts["quarantined"].values())},
        "quarantined_by_reason": counts["quarantined"], "splits": counts["splits"],
        "truncated": counts["truncated"], "sources": counts["sources"], "warnings": counts["warnings"],
        "extra_columns": [_extra_column_name(k) for k in extra_keys],
        "spec": ingest_spec(cfg), "clean_dir": str(clean_dir), "quarantine_dir": str(quarantine_dir),
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
