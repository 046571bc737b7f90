"""One input record -> one row of :data:`RECORD_SCHEMA`, clean or carrying its quarantine reason (pure).

The schemas every ingest stage shares, the quarantine reasons, and the per-record checks: field mapping, types,
UTF-8, the deterministic split and the content hash. Nothing here reads a file or needs Ray.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import pyarrow as pa

if TYPE_CHECKING:
    from leaf_ray.config import FieldMap


class IngestError(ValueError):
    """Input that cannot be ingested at all (raised before any work starts)."""


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


def raw_text(value: Any) -> str:
    """A printable, UTF-8-safe rendering for the quarantine `raw` column: text (a JSONL line) as it is,
    bytes with undecodable bytes escaped, anything else (a parsed JSON element, a Parquet row) as JSON."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="backslashreplace")
    if isinstance(value, str):
        return _safe_str(value)
    return json_raw(value)


def json_raw(value: Any) -> str:
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
