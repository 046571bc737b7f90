"""Where the corpus comes from: paths, directories and globs (local or any URI) resolved on the driver, and
each file (or line-aligned byte range of a big local JSONL file) streamed into
:data:`~leaf_ray.data.records.RECORD_SCHEMA` rows by one Ray Data read task."""

from __future__ import annotations

import fnmatch
import glob
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from leaf_ray.data.records import (
    EMPTY_FILE,
    FILE_RECORD_ROW,
    INVALID_JSON_FILE,
    INVALID_UTF8,
    MALFORMED_JSON,
    NOT_AN_OBJECT,
    RAW_FILE_LIMIT,
    RECORD_SCHEMA,
    ROW_BITS,
    UNREADABLE_FILE,
    IngestError,
    content_hash,
    json_raw,
    raw_text,
    split_of,
    validate_record,
)

FORMAT_BY_EXTENSION = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


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


def jsonl_ranges(source: str, range_bytes: int, chunk_bytes: int = 8 << 20) -> list[tuple[int, int, int]]:
    """[(start byte, end byte, first line number)] cutting a **local** JSONL file, at line ends, into pieces of
    about `range_bytes`, so several tasks read one big file. `[]` = read it whole (one task): a URI (counting its
    lines here would read it twice over the network), a file of at most `range_bytes`, one with no content
    (so the whole-file reader quarantines it as empty), or `range_bytes` 0.

    One pass over the bytes on the driver (``bytes.find`` / ``count``, ~1 GB/s): each range starts right after
    a newline, and its first line number (1-based, what an editor shows) is the newlines before it + 1, so
    every record keeps the `row` and `order_key` it has when the file is read whole."""
    if range_bytes <= 0 or _is_uri(source):
        return []
    path = source.removeprefix("file://")
    try:
        size = os.path.getsize(path)
    except OSError:
        return []  # the reader task reports it, with the file's name
    if size <= range_bytes:
        return []
    starts: list[tuple[int, int]] = [(0, 1)]  # (byte, line number)
    target, offset, newlines, content = range_bytes, 0, 0, False
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            content = content or bool(chunk.strip())
            while target < offset + len(chunk):
                cut = chunk.find(b"\n", max(0, target - offset))
                if cut < 0:
                    break
                boundary = offset + cut + 1
                if boundary < size:
                    starts.append((boundary, newlines + chunk.count(b"\n", 0, cut + 1) + 1))
                target = boundary + range_bytes
            newlines += chunk.count(b"\n")
            offset += len(chunk)
    if not content or len(starts) == 1:
        return []
    ends = [start for start, _ in starts[1:]] + [size]
    return [(start, end, line) for (start, line), end in zip(starts, ends)]


def total_bytes(files: list[tuple[str, str]]) -> int | None:
    """The input's size in bytes, or None where a file's size is unknown."""
    total = 0
    for source, _ in files:
        try:
            fs, path = filesystem_for(source)
            size = fs.get_file_info(path).size
        except (OSError, pa.ArrowException, IngestError):
            return None
        if size is None:
            return None
        total += size
    return total


# --------------------------------------------------------------------------- reading (Ray Data tasks)


class _ByteRange:
    """The bytes [start, end) of a seekable pyarrow file as a stream (`read(n)` stops at `end`)."""

    def __init__(self, file, start: int, end: int):
        self.file, self.remaining = file, end - start
        file.seek(start)

    def read(self, n: int) -> bytes:
        data = self.file.read(min(n, self.remaining)) if self.remaining > 0 else b""
        self.remaining -= len(data)
        return data


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
            self.quarantine(row, reason, detail, raw_text(raw) if raw is not None else json_raw(record))
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


def _read_jsonl(stream, out: _RowBuilder, chunk_bytes: int = 1 << 20, *, first_line: int = 1,
                whole_file: bool = True) -> Iterator[pa.Table]:
    """Line by line; each line decoded and parsed on its own, so a bad line costs only itself. A byte range of
    a file (:func:`jsonl_ranges`) starts at line `first_line`; only a whole file can be found empty."""
    line_no, pending, saw_content = first_line - 1, b"", False
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
                               raw_text(line))
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
    if not saw_content and whole_file:
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
        out.quarantine(FILE_RECORD_ROW, INVALID_JSON_FILE, f"file is not valid JSON: {why}", raw_text(raw))
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


def corpus_datasource(items: list[dict[str, Any]], fields, seed: int, validation_fraction: float,
                      then: Callable[[pa.Table], pa.Table] | None = None):
    """A Ray Data source with **one read task per item** (a file, or a byte range of one: `read_items`), each
    block passed through `then` inside the read task (the length check: read, check, tokenise in one task).
    (`from_items(...).map_batches(read_files)` let Ray Data bundle the tiny item blocks into a single task,
    so one process read the whole corpus.)"""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class CorpusDatasource(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context=None) -> list[ReadTask]:
            def reader(item: dict[str, Any]):
                return lambda: read_item(item, fields, seed, validation_fraction, then)

            return [ReadTask(reader(item), BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None,
                                                         input_files=(item["source"],)), schema=RECORD_SCHEMA)
                    for item in items]

    return CorpusDatasource()


def read_item(item: dict[str, Any], fields, seed: int, validation_fraction: float,
              then: Callable[[pa.Table], pa.Table] | None = None) -> Iterator[pa.Table]:
    """The blocks of one read task (a file or a byte range of one), each passed through `then`: what a Ray Data
    read task yields, and what an input ingested in the calling process is made of."""
    for table in read_files(pa.Table.from_pylist([item]), fields, seed, validation_fraction):
        yield then(table) if then is not None else table


def read_files(batch: pa.Table, fields, seed: int, validation_fraction: float) -> Iterator[pa.Table]:
    """Ray Data UDF: read each file of the batch (rows: file_index, source, format; optional start, end,
    first_line: one JSONL byte range of :func:`jsonl_ranges`, start -1 or absent = the whole file)."""
    columns = [batch.column(c).to_pylist() for c in ("file_index", "source", "format")]
    columns += [batch.column(c).to_pylist() if c in batch.column_names else [default] * batch.num_rows
                for c, default in (("start", -1), ("end", -1), ("first_line", 1))]
    for file_index, source, fmt, start, end, first_line in zip(*columns):
        out = _RowBuilder(file_index, source, fields, seed, validation_fraction)
        try:
            fs, path = filesystem_for(source)
            if start >= 0:
                with fs.open_input_file(path) as file:
                    yield from _read_jsonl(_ByteRange(file, start, end), out, first_line=first_line,
                                           whole_file=False)
                continue
            if fmt == "parquet":
                yield from _read_parquet(fs, path, out)
                continue
            with fs.open_input_stream(path) as stream:
                yield from (_read_jsonl(stream, out) if fmt == "jsonl" else _read_json(stream, out))
        except (OSError, pa.ArrowException) as e:  # rows read before the failure are kept
            out.quarantine(FILE_RECORD_ROW, UNREADABLE_FILE, f"cannot read file: {e}", "")
            yield out.flush()
