"""Validated ingestion through a real local Ray Data pipeline: every bad-input kind is quarantined with its
reason (or rejected before any work, naming the path), good rows are kept, and the counts add up."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from leaf_ray.config import FieldMap, config_from_dict
from leaf_ray.data.ingest import run_ingest
from leaf_ray.data.records import IngestError, content_hash, split_of, validate_record

LONG_OUTPUT = " ".join(f"step {i}: add {i} and {i + 1}." for i in range(80))  # far over max_length 96


def _config(root: Path, tiny_pair: dict, **data) -> object:
    tree = {
        "run": {"name": "t", "root_dir": str(root / "runs")},
        "ray": {"num_cpus": 2},
        "models": {"teacher": {"path": tiny_pair["teacher"]}, "student": {"path": tiny_pair["student"]},
                   "make_tiny_if_missing": False},
        "data": {"max_length": 96, "inline_max_bytes": 0, **data},  # Ray Data (a small input runs inline)
    }
    return config_from_dict(tree, "test")


def _jsonl(path: Path, lines: list) -> None:
    """Write lines: dicts are JSON-encoded, bytes/str written as they are."""
    with path.open("wb") as f:
        for line in lines:
            if isinstance(line, (dict, list, int)):
                line = json.dumps(line, ensure_ascii=False)
            f.write(line if isinstance(line, bytes) else line.encode("utf-8"))
            f.write(b"\n")


def _build_corpus(d: Path) -> None:
    d.mkdir(parents=True)
    _jsonl(d / "a_good.jsonl", [
        {"id": "g1", "instruction": "What is 2 + 3?", "output": "2 + 3 = 5.", "answer": 5,
         "meta": {"level": 1}, "tag": "easy"},
        {"id": 7, "instruction": "Add the numbers.", "input": "4 and 9", "output": "4 + 9 = 13.", "answer": "13"},
        "",  # blank line: not a record
        {"instruction": "Name a prime.", "output": "7 is prime.", "tag": "no-id"},
        {"instruction": "Café math — 数学: what is 1 + 1?", "output": "1 + 1 = 2, naïvely.", "answer": 2},
    ])
    _jsonl(d / "b_bad.jsonl", [
        '{"id": "m1", "instruction": "broken", "output": ',                      # 1 malformed JSON
        {"id": "m2", "instruction": "no output here"},                           # 2 missing field
        {"id": "m3", "instruction": "Q", "output": ""},                          # 3 empty output
        {"id": "m4", "instruction": " \t\n ", "output": "A"},                     # 4 whitespace-only instruction
        {"id": "m5", "instruction": "Q", "output": ["not", "a", "string"]},      # 5 non-string output
        {"id": "m6", "instruction": 42, "output": "A"},                          # 6 non-string instruction
        b'{"id": "m7", "instruction": "caf\xe9 latin-1", "output": "A"}',        # 7 invalid UTF-8
        '{"id": "m8", "instruction": "lone \\ud800 surrogate", "output": "A"}',  # 8 escape of no character
        {"id": "g1", "instruction": "other text", "output": "same id as a_good line 1"},  # 9 duplicate id
        {"id": "m10", "instruction": "Explain slowly.", "output": LONG_OUTPUT},    # 10 too long
        [1, 2, 3],                                                               # 11 not an object
        {"id": "m12", "instruction": None, "output": "A"},                       # 12 null = missing
        {"id": "m13", "instruction": "Q13", "output": "A", "answer": {"x": 1}},  # 13 non-string answer
        {"instruction": "Name a prime.", "output": "7 is prime."},  # 14 same content as a_good line 4, no id
    ])
    (d / "c_empty.jsonl").write_bytes(b"")
    arr = (b'[{"id": "a0", "instruction": "Array Q0", "output": "Array A0"}, "just a string", '
           b'{"id": "a2", "instruction": "bad \xff\xfe bytes", "output": "A"}, '
           b'{"id": "a3", "instruction": "Array Q3", "output": "Array A3", "answer": 3}]')
    (d / "arr.json").write_bytes(arr)
    (d / "broken.json").write_text('[{"id": "b0", "instruction": "Q", "output": "A"}, {"id": ')
    table = pa.table({
        "instruction": ["Parquet Q0", "Parquet Q1", "   ", "Parquet Q3", "Parquet Q4"],
        "output": pa.array([b"Parquet A0", b"Parquet A1", b"Parquet A2", b"bad \xff", b"Parquet A4"],
                             pa.binary()),
        "id": ["p0", "p1", "p2", "p3", "p0"],  # p0 again at row 4: duplicate inside one file
        "score": [1.5, 2.0, None, 0.0, 1.0],
    })
    pq.write_table(table, d / "p.parquet", row_group_size=2)  # 3 row groups: rows must stay exact
    pq.write_table(table.schema.empty_table(), d / "zero.parquet")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus") / "in"
    _build_corpus(d)
    return d


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, tiny_pair, ray_local, corpus_dir):
    """One ingest over every format and every bad-input kind (JSONL glob, JSON arrays, Parquet by URI)."""
    root = tmp_path_factory.mktemp("ingest")
    cfg = _config(root, tiny_pair, paths=[
        str(corpus_dir / "*.jsonl"), str(corpus_dir / "arr.json"), str(corpus_dir / "broken.json"),
        "file://" + str(corpus_dir / "p.parquet"), str(corpus_dir / "zero.parquet"),
    ])
    report = run_ingest(cfg)
    clean = pq.read_table(report.clean_dir).to_pylist()
    quarantine = pq.read_table(report.quarantine_dir).to_pylist()
    return cfg, report, clean, quarantine


def _q(quarantine, file_name, row):
    hits = [q for q in quarantine if Path(q["source"]).name == file_name and q["row"] == row]
    assert len(hits) == 1, f"expected one quarantine record for {file_name} row {row}, got {hits}"
    return hits[0]


# --------------------------------------------------------------------------- bad input kinds


def test_malformed_json_line_is_quarantined(ingested):
    q = _q(ingested[3], "b_bad.jsonl", 1)
    assert q["reason"] == "malformed_json" and "line 1" in q["detail"]
    assert q["raw"].startswith('{"id": "m1"')


def test_missing_field_is_quarantined(ingested):
    q = _q(ingested[3], "b_bad.jsonl", 2)
    assert q["reason"] == "missing_field" and "`output`" in q["detail"]
    q = _q(ingested[3], "b_bad.jsonl", 12)
    assert q["reason"] == "missing_field" and "`instruction`" in q["detail"] and "null" in q["detail"]


def test_empty_and_whitespace_only_fields_are_quarantined(ingested):
    q = _q(ingested[3], "b_bad.jsonl", 3)
    assert q["reason"] == "empty_field" and "`output`" in q["detail"] and "empty" in q["detail"]
    q = _q(ingested[3], "b_bad.jsonl", 4)
    assert q["reason"] == "empty_field" and "`instruction`" in q["detail"] and "whitespace-only" in q["detail"]
    q = _q(ingested[3], "p.parquet", 2)  # Parquet row 2: instruction "   "
    assert q["reason"] == "empty_field" and "`instruction`" in q["detail"]


def test_non_string_types_are_quarantined(ingested):
    q = _q(ingested[3], "b_bad.jsonl", 5)
    assert q["reason"] == "wrong_type" and "`output`" in q["detail"] and "list" in q["detail"]
    q = _q(ingested[3], "b_bad.jsonl", 6)
    assert q["reason"] == "wrong_type" and "`instruction`" in q["detail"] and "int" in q["detail"]
    q = _q(ingested[3], "b_bad.jsonl", 13)
    assert q["reason"] == "wrong_type" and "`answer`" in q["detail"]


def test_record_that_is_not_an_object_is_quarantined(ingested):
    assert _q(ingested[3], "b_bad.jsonl", 11)["reason"] == "not_an_object"
    q = _q(ingested[3], "arr.json", 1)
    assert q["reason"] == "not_an_object" and q["raw"] == '"just a string"'


def test_invalid_utf8_is_quarantined_per_record(ingested):
    q = _q(ingested[3], "b_bad.jsonl", 7)
    assert q["reason"] == "invalid_utf8" and "line 7" in q["detail"]
    assert "\\xe9" in q["raw"]  # the offending byte is shown, the rest of the line kept
    assert _q(ingested[3], "b_bad.jsonl", 8)["reason"] == "invalid_utf8"  # "\ud800" escape
    q = _q(ingested[3], "arr.json", 2)  # bad bytes inside one element of a JSON array
    assert q["reason"] == "invalid_utf8" and "instruction" in q["detail"] and "\\xff" in q["raw"]
    q = _q(ingested[3], "p.parquet", 3)  # bad bytes in one Parquet value
    assert q["reason"] == "invalid_utf8" and "output" in q["detail"]


def test_duplicate_ids_keep_first_occurrence_across_files_and_blocks(ingested):
    _, _, clean, quarantine = ingested
    q = _q(quarantine, "b_bad.jsonl", 9)
    assert q["reason"] == "duplicate_id" and "'g1'" in q["detail"] and "a_good.jsonl row 1" in q["detail"]
    kept = [c for c in clean if c["sample_id"] == "g1"]
    assert len(kept) == 1 and Path(kept[0]["source"]).name == "a_good.jsonl" and kept[0]["row"] == 1
    q = _q(quarantine, "p.parquet", 4)  # same uid as row 0, in a later row group
    assert q["reason"] == "duplicate_id" and "p.parquet row 0" in q["detail"]
    # Identical content without ids hashes to one sample_id: the later copy is a duplicate too.
    q = _q(quarantine, "b_bad.jsonl", 14)
    assert q["reason"] == "duplicate_id" and "a_good.jsonl row 4" in q["detail"]
    assert len({c["sample_id"] for c in clean}) == len(clean)


def test_too_long_record_is_quarantined(ingested):
    q = _q(ingested[3], "b_bad.jsonl", 10)
    assert q["reason"] == "too_long" and "data.max_length 96" in q["detail"]
    assert LONG_OUTPUT in q["raw"]


def test_empty_file_is_quarantined_with_a_warning(ingested):
    _, report, _, quarantine = ingested
    for name in ("c_empty.jsonl", "zero.parquet"):
        q = _q(quarantine, name, -1)
        assert q["reason"] == "empty_file"
        assert any(name in w and "empty file" in w for w in report.warnings)


def test_json_file_that_is_not_json_is_one_quarantine_record(ingested):
    _, report, _, quarantine = ingested
    q = _q(quarantine, "broken.json", -1)
    assert q["reason"] == "invalid_json_file" and "not valid JSON" in q["detail"]
    assert any("broken.json" in w for w in report.warnings)


# --------------------------------------------------------------------------- good rows, counts, formats


def test_good_rows_are_kept_with_mapped_fields(ingested):
    _, _, clean, _ = ingested
    by_id = {c["sample_id"]: c for c in clean}
    assert by_id["g1"]["instruction"] == "What is 2 + 3?" and by_id["g1"]["answer"] == "5"
    assert by_id["g1"]["meta"] == '{"level": 1}' and by_id["g1"]["tag"] == "easy"  # extras kept as strings
    assert by_id["7"]["instruction"] == "Add the numbers.\n\n4 and 9"  # input appended, int id stringified
    hashed = content_hash("Name a prime.", "7 is prime.")
    assert by_id[hashed]["tag"] == "no-id" and by_id[hashed]["row"] == 4  # 1-based line, blank line counted
    unicode_id = content_hash("Café math — 数学: what is 1 + 1?", "1 + 1 = 2, naïvely.")
    assert by_id[unicode_id]["answer"] == "2"
    assert {"a0", "a3"} <= set(by_id) and by_id["a3"]["row"] == 3  # JSON array: 0-based element index
    assert [by_id[p]["row"] for p in ("p0", "p1")] == [0, 1]
    assert by_id["p1"]["instruction"] == "Parquet Q1" and by_id["p1"]["output"] == "Parquet A1"
    assert by_id["p0"]["score"] == "1.5"
    assert set(by_id) == {"g1", "7", hashed, unicode_id, "a0", "a3", "p0", "p1"}
    for c in clean:
        assert c["split"] == split_of(c["sample_id"], 0, 0.1) and c["truncated"] is False


def test_counts_add_up(ingested):
    _, report, clean, quarantine = ingested
    assert report.read == report.clean + report.quarantined_total
    assert report.clean == len(clean) == 8
    assert report.quarantined_total == len(quarantine)
    assert sum(report.splits.values()) == report.clean
    by_reason = {}
    for q in quarantine:
        by_reason[q["reason"]] = by_reason.get(q["reason"], 0) + 1
    assert by_reason == report.quarantined
    assert report.quarantined == {"duplicate_id": 3, "empty_field": 3, "empty_file": 2, "invalid_json_file": 1,
                                  "invalid_utf8": 4, "malformed_json": 1, "missing_field": 2,
                                  "not_an_object": 2, "too_long": 1, "wrong_type": 3}
    for src in report.sources:
        assert src["read"] == src["clean"] + src["quarantined"], src
    manifest = json.loads(report.manifest_path.read_text())
    assert manifest["counts"] == {"read": report.read, "clean": report.clean,
                                  "quarantined": report.quarantined_total}
    assert manifest["quarantined_by_reason"] == report.quarantined


def test_report_prints_counts_and_paths(ingested):
    from rich.console import Console

    _, report, _, _ = ingested
    console = Console(record=True, width=200)
    report.print(console)
    text = console.export_text()
    assert "read" in text and str(report.read) in text and "duplicate_id" in text
    assert str(report.clean_dir) in text and str(report.quarantine_dir) in text


def test_rerun_is_idempotent_with_stable_ids(ingested):
    cfg, report, clean, quarantine = ingested
    again = run_ingest(cfg)
    assert pq.read_table(again.clean_dir).to_pylist() == clean  # same rows, same order, same ids
    assert sorted(pq.read_table(again.quarantine_dir).to_pylist(), key=str) == sorted(quarantine, key=str)
    assert json.loads(again.manifest_path.read_text()) == json.loads(report.manifest_path.read_text())
    assert not report.clean_dir.with_name("clean.tmp").exists()


def test_truncate_mode_cuts_the_response_to_fit(tmp_path, tiny_pair, tiny_tokenizer, ray_local):
    from leaf_ray.data.chat import render

    d = tmp_path / "in"
    d.mkdir()
    long_instruction = "Read carefully. " * 60
    _jsonl(d / "x.jsonl", [  # custom column names, mapped by data.fields
        {"key": "long", "prompt": "Explain slowly.", "completion": LONG_OUTPUT},
        {"key": "short", "prompt": "Q?", "context": "Some context.", "completion": "A."},
        {"key": "huge-prompt", "prompt": long_instruction, "completion": "A."},
    ])
    fields = {"instruction": "prompt", "output": "completion", "input": "context", "id": "key"}
    common = {"paths": [str(d / "x.jsonl")], "max_length": 64, "fields": fields}
    truncated = run_ingest(_config(tmp_path / "t", tiny_pair, on_too_long="truncate", **common))
    rows = {r["sample_id"]: r for r in pq.read_table(truncated.clean_dir).to_pylist()}
    assert set(rows) == {"long", "short"} and truncated.truncated == 1
    cut = rows["long"]["output"]
    assert rows["long"]["truncated"] is True and rows["short"]["truncated"] is False
    assert rows["short"]["instruction"] == "Q?\n\nSome context." and rows["short"]["output"] == "A."
    assert LONG_OUTPUT.startswith(cut) and 0 < len(cut) < len(LONG_OUTPUT)
    n_tokens = len(render(tiny_tokenizer, "Explain slowly.", cut).input_ids)
    assert 60 <= n_tokens <= 64  # fills the budget, never exceeds it
    (q,) = pq.read_table(truncated.quarantine_dir).to_pylist()
    assert q["reason"] == "too_long" and q["row"] == 3 and "instruction alone" in q["detail"]

    quarantined = run_ingest(_config(tmp_path / "q", tiny_pair, on_too_long="quarantine", **common))
    assert quarantined.clean == 1 and quarantined.quarantined == {"too_long": 2}


def test_empty_paths_ingest_the_demo_corpus(tmp_path, tiny_pair, ray_local):
    cfg = _config(tmp_path, tiny_pair, paths=[], demo={"size": 6, "seed": 3}, max_length=1024,
                  validation_fraction=0.5)
    report = run_ingest(cfg)
    rows = pq.read_table(report.clean_dir).to_pylist()
    assert report.read == report.clean == 6 and report.quarantined == {}
    assert [r["sample_id"] for r in rows] == [f"gsm_symbolic-3-{i}" for i in range(6)]
    assert all("\\boxed{" in r["output"] and r["answer"] for r in rows)
    assert Path(rows[0]["source"]) == cfg.run.dir.resolve() / "data" / "demo.jsonl"
    assert pq.read_table(report.quarantine_dir).num_rows == 0  # an empty but readable dataset
    assert [r["split"] for r in rows] == [split_of(r["sample_id"], 0, 0.5) for r in rows]


# --------------------------------------------------------------------------- rejected before any work


@pytest.mark.parametrize("make_path, expected", [
    (lambda d: str(d / "nope.jsonl"), "path does not exist"),
    (lambda d: str(d / "*.parquet"), "glob matches no files"),
    (lambda d: str(d / "data.csv"), "unknown format"),
    (lambda d: str(d / "sub"), "directory holds no"),
    (lambda d: "file://" + str(d / "missing.jsonl"), "path does not exist"),
])
def test_bad_paths_are_rejected_before_any_work(tmp_path, tiny_pair, make_path, expected):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / "data.csv").write_text("instruction,output\nq,a\n")
    (d / "sub" / "notes.txt").write_text("not data")
    path = make_path(d)
    cfg = _config(tmp_path, tiny_pair, paths=[path])
    with pytest.raises(IngestError) as err:
        run_ingest(cfg)
    assert expected in str(err.value) and path in str(err.value)
    assert not (cfg.run.dir / "data").exists()  # nothing was written: no work started


def test_unknown_format_is_accepted_when_format_is_set(tmp_path, tiny_pair):
    from leaf_ray.data.sources import resolve_sources

    (tmp_path / "data.txt").write_text('{"instruction": "q", "output": "a"}\n')
    assert resolve_sources([str(tmp_path / "data.txt")], "jsonl") == [(str(tmp_path / "data.txt"), "jsonl")]


def test_missing_student_tokenizer_is_rejected_before_any_work(tmp_path, tiny_pair):
    (tmp_path / "x.jsonl").write_text('{"instruction": "q", "output": "a"}\n')
    cfg = _config(tmp_path, tiny_pair, paths=[str(tmp_path / "x.jsonl")])
    cfg.models.student.path = str(tmp_path / "no-model")
    with pytest.raises(IngestError, match="student tokenizer.*no-model"):
        run_ingest(cfg)


# --------------------------------------------------------------------------- pure helpers


def test_validate_record_field_mapping():
    fields = FieldMap(instruction="q", output="a", input=None, answer="gold", id=None)
    clean, reason, _ = validate_record({"q": "Q", "a": "A", "gold": 3.5, "id": 9, "input": "x"}, fields)
    assert reason is None and clean["instruction"] == "Q" and clean["answer"] == "3.5" and clean["id"] is None
    assert clean["extras"] == {"id": "9", "input": "x"}  # unmapped columns are extras
    assert validate_record({"q": "Q", "a": "A", "gold": True}, fields)[1] == "wrong_type"


def test_split_is_deterministic_and_respects_the_fraction():
    ids = [f"id-{i}" for i in range(4000)]
    splits = [split_of(i, 0, 0.2) for i in ids]
    assert splits == [split_of(i, 0, 0.2) for i in ids]
    assert 0.17 < splits.count("validation") / len(ids) < 0.23
    assert all(split_of(i, 0, 0.0) == "train" for i in ids[:100])
    assert splits != [split_of(i, 1, 0.2) for i in ids]  # run.seed reshuffles the split


def _read_in_process(source: str, fmt: str) -> list[dict]:
    """The Ray Data read UDF called directly (same code the tasks run)."""
    from leaf_ray.data.sources import read_files

    batch = pa.table({"file_index": [0], "source": [source], "format": [fmt]})
    return [row for table in read_files(batch, FieldMap(), 0, 0.1) for row in table.to_pylist()]


def test_uri_sources_are_listed_and_read_through_fsspec():
    """`memory://` (fsspec-only, like gcs/abfs/http) goes through the same resolve and read code as any
    URI; Ray workers are separate processes, so the in-memory filesystem is exercised in-process."""
    import fsspec

    from leaf_ray.data.sources import resolve_sources

    fs = fsspec.filesystem("memory")
    fs.pipe("/leafray-corpus/a.jsonl", b'{"id": "u1", "instruction": "Q", "output": "A"}\n{bad\n')
    fs.pipe("/leafray-corpus/sub/b.json", b'[{"id": "u2", "instruction": "Q2", "output": "A2"}]')
    fs.pipe("/leafray-corpus/notes.txt", b"ignored in a directory listing")
    assert resolve_sources(["memory://leafray-corpus"], "auto") == [
        ("memory://leafray-corpus/a.jsonl", "jsonl"), ("memory://leafray-corpus/sub/b.json", "json")]
    assert resolve_sources(["memory://leafray-corpus/*.jsonl"], "auto") == [
        ("memory://leafray-corpus/a.jsonl", "jsonl")]
    with pytest.raises(IngestError, match="glob matches no files"):
        resolve_sources(["memory://leafray-corpus/*.parquet"], "auto")
    with pytest.raises(IngestError, match="unknown format"):
        resolve_sources(["memory://leafray-corpus/notes.txt"], "auto")
    rows = _read_in_process("memory://leafray-corpus/a.jsonl", "jsonl")
    assert [(r["row"], r["sample_id"], r["reason"]) for r in rows] == [(1, "u1", None), (2, None, "malformed_json")]
    assert [r["sample_id"] for r in _read_in_process("memory://leafray-corpus/sub/b.json", "json")] == ["u2"]


def test_json_extension_holding_json_lines_is_read_line_by_line(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text('{"id": 1, "instruction": "Q", "output": "A"}\n\n{"id": 2, "instruction": "Q2"}\n')
    rows = _read_in_process(str(path), "json")
    assert [(r["row"], r["reason"]) for r in rows] == [(1, None), (3, "missing_field")]


def test_crlf_and_bom_are_tolerated(tmp_path):
    path = tmp_path / "win.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": "w1", "instruction": "Q", "output": "A"}\r\n'
                     b'{"id": "w2", "instruction": "Q2", "output": "A2"}\r\n')
    rows = _read_in_process(str(path), "jsonl")
    assert [(r["sample_id"], r["reason"]) for r in rows] == [("w1", None), ("w2", None)]


def test_file_that_is_not_parquet_is_one_quarantine_record(tmp_path):
    path = tmp_path / "fake.parquet"
    path.write_text("this is not parquet")
    (row,) = _read_in_process(str(path), "parquet")
    assert row["reason"] == "unreadable_file" and row["row"] == -1 and "Parquet" in row["detail"]


def test_jsonl_byte_ranges_read_the_same_rows_as_the_whole_file(tmp_path):
    """A big local JSONL file is read as line-aligned byte ranges by parallel tasks: the ranges tile the file,
    and together they give exactly the rows (line numbers, quarantine records, order keys) of one whole read,
    with a BOM, CRLF line ends, blank lines, bad lines and no newline at the end."""
    from leaf_ray.data.ingest import read_items
    from leaf_ray.data.sources import jsonl_ranges, read_files

    path = tmp_path / "big.jsonl"
    lines = [b'\xef\xbb\xbf{"id": "r0", "instruction": "Q0", "output": "A0"}\r']
    for i in range(1, 60):
        lines.append([json.dumps({"id": f"r{i}", "instruction": f"Caf\u00e9 Q{i}", "output": f"A{i}"}).encode(),
                      b"", b'{"id": "bad", "instruction": ', b'caf\xe9', b"[1, 2]", b"   "][i % 6])
    path.write_bytes(b"\n".join(lines))  # no newline after the last line
    size = path.stat().st_size

    def rows(items):
        batch = pa.Table.from_pylist(items)
        return [row for table in read_files(batch, FieldMap(), 0, 0.1) for row in table.to_pylist()]

    whole = rows([{"file_index": 3, "source": str(path), "format": "jsonl"}])
    assert [r["row"] for r in whole] == [i + 1 for i in range(60) if i % 6 not in (1, 5)]  # blank lines skipped
    assert whole[0]["sample_id"] == "r0" and {r["reason"] for r in whole} == {
        None, "malformed_json", "invalid_utf8", "not_an_object"}
    data = path.read_bytes()
    for range_bytes in (1, 37, 200, 700):
        ranges = jsonl_ranges(str(path), range_bytes)
        assert ranges[0][:1] == (0,) and ranges[-1][1] == size and len(ranges) > 1
        assert all(a[1] == b[0] and data[b[0] - 1:b[0]] == b"\n" for a, b in itertools.pairwise(ranges))
        assert all(data[:start].count(b"\n") + 1 == line for start, _, line in ranges)
        items = read_items([("x", "parquet")] * 3 + [(str(path), "jsonl")], range_bytes)[3:]
        assert len(items) == len(ranges) and {i["file_index"] for i in items} == {3}
        assert rows(items) == whole, range_bytes
    assert jsonl_ranges(str(path), size) == [] and jsonl_ranges(str(path), 0) == []
    assert jsonl_ranges("memory://bucket/big.jsonl", 1) == []  # a URI is read whole, once
    (tmp_path / "blank.jsonl").write_bytes(b"\n" * 100)
    assert jsonl_ranges(str(tmp_path / "blank.jsonl"), 10) == []  # read whole: quarantined as empty


def test_byte_range_reads_give_the_same_outputs(ingested, tmp_path):
    """The whole ingest with every JSONL file cut into 64-byte ranges: the same clean rows in the same order,
    the same quarantine records and counts as one task per file."""
    cfg, report, clean, quarantine = ingested
    tree = cfg.dump()
    tree["run"] = {**tree["run"], "root_dir": str(tmp_path / "runs")}
    tree["data"] = {**tree["data"], "jsonl_range_bytes": 64}
    ranged = run_ingest(config_from_dict(tree, "test"))
    assert pq.read_table(ranged.clean_dir).to_pylist() == clean
    assert sorted(pq.read_table(ranged.quarantine_dir).to_pylist(), key=str) == sorted(quarantine, key=str)
    manifest, ranged_manifest = (json.loads(r.manifest_path.read_text()) for r in (report, ranged))
    for key in ("counts", "quarantined_by_reason", "splits", "sources", "warnings"):
        assert ranged_manifest[key] == manifest[key], key


def test_small_input_is_ingested_in_process_with_the_same_outputs(ingested, tmp_path, no_ray):
    """An input under data.inline_max_bytes runs the same read, check, dedup and writes in this process, with
    no Ray at all: the same clean rows in order, quarantine records and counts as the Ray Data run."""
    cfg, report, clean, quarantine = ingested
    tree = cfg.dump()
    tree["run"] = {**tree["run"], "root_dir": str(tmp_path / "runs")}
    tree["data"] = {**tree["data"], "inline_max_bytes": 1 << 20}
    inline = run_ingest(config_from_dict(tree, "test"))
    assert pq.read_table(inline.clean_dir).to_pylist() == clean
    assert sorted(pq.read_table(inline.quarantine_dir).to_pylist(), key=str) == sorted(quarantine, key=str)
    manifest, inline_manifest = (json.loads(r.manifest_path.read_text()) for r in (report, inline))
    for key in ("counts", "quarantined_by_reason", "splits", "sources", "warnings", "extra_columns"):
        assert inline_manifest[key] == manifest[key], key
    assert (manifest["execution"]["mode"], inline_manifest["execution"]["mode"]) == ("ray_data", "inline")
    assert inline_manifest["execution"]["input_bytes"] == sum(
        (corpus / name).stat().st_size for corpus in [Path(report.sources[0]["source"]).parent]
        for name in ("a_good.jsonl", "b_bad.jsonl", "c_empty.jsonl", "arr.json", "broken.json", "p.parquet",
                     "zero.parquet"))


def test_bench_ingest_runs_and_the_stage_agrees_with_the_loop(tmp_path, tiny_pair, ray_local):
    """`leaf-ray bench ingest` on a small corpus cut into 64 KiB read tasks: it raises if run_ingest and the
    plain loop disagree on what is clean, and prints both rates."""
    import io

    from rich.console import Console

    from leaf_ray.bench.ingest import run_ingest_bench

    out = io.StringIO()
    result = run_ingest_bench(_config(tmp_path, tiny_pair, jsonl_range_bytes=64 << 10),
                              Console(file=out, width=160), records=3000)
    assert result["records"] == 3000 and result["loop_s"] > 0 and result["ingest_s"] > 0
    text = out.getvalue()
    assert "run_ingest" in text and "loop" in text and "quarantined 6" in text
