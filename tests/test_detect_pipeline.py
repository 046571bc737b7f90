"""Stage 1 on Ray Data: schema, counts, character-exact counterfactuals, response level, the cross-tokenizer
path and kill-and-resume, on the tiny offline pair and a real local Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from ray_processes import kill_and_reap
from run_data import POOLS, read_dir, write_clean

from leaf_ray.config import ModelRef
from leaf_ray.data.chat import render
from leaf_ray.data.demo_corpus import generate_problems
from leaf_ray.detect.cross_tokenizer import project_scores
from leaf_ray.detect.pipeline import run_detection
from leaf_ray.detect.response import prefix_continuations, split_steps
from leaf_ray.detect.saliency import token_saliency
from leaf_ray.detect.schema import COUNTERFACTUALS_SCHEMA, QUARANTINE_SCHEMA, SCORES_SCHEMA, DetectionError
from leaf_ray.detect.stages import (
    check_local_resources,
    committed_units,
    recover_interrupted_commits,
    scored_char_offsets,
)
from leaf_ray.models import load_model, load_tokenizer
from leaf_ray.store import DetectPaths

NON_ASCII = "Zoë a 12 crêpes et mange 5 «petites» crêpes. 数学: combien en reste-t-il ? Réponds en ½ phrase."


def clean_rows(n: int, seed: int = 7) -> list[dict]:
    """`n` demo problems plus a non-ASCII one and a one-step response (no response-level pair)."""
    rows = [{"sample_id": p["id"], "instruction": p["instruction"], "output": p["output"],
             "answer": p["answer"]} for p in generate_problems(n, seed=seed)]
    rows.append({"sample_id": "non-ascii", "instruction": NON_ASCII,
                 "output": "Il reste 12 - 5 = 7 crêpes.\n\nLa réponse est \\boxed{7}.", "answer": "7"})
    rows.append({"sample_id": "one-step", "instruction": "What is 2 + 3?", "output": "\\boxed{5}",
                 "answer": "5"})
    for i, r in enumerate(rows):
        r.update(split="validation" if i % 5 == 4 else "train", source="test", row=i)
    return rows


def planned_units(rows: list[dict], pattern: str = r"\n\s*\n", num_segments: int = 3) -> dict:
    """(sample_id, scope) -> (scored_text, continuation) exactly as the method defines them."""
    units = {}
    for r in rows:
        units[(r["sample_id"], "instruction")] = (r["instruction"], r["output"])
        pairs = prefix_continuations(split_steps(r["output"], pattern, num_segments))
        for k, (prefix, rest) in enumerate(pairs, start=1):
            units[(r["sample_id"], f"response:{k}")] = (prefix, rest)
    return units


def direct_scores(model, tokenizer, instruction: str, scope: str, scored_text: str, continuation: str):
    """One unit scored alone, outside Ray: (scored-token raw grad norms, their offsets in the scored text)."""
    rendered = (render(tokenizer, instruction, continuation) if scope == "instruction" else
                render(tokenizer, instruction, continuation, scored="prefix", prefix=scored_text))
    ids = torch.tensor([rendered.input_ids])
    out = token_saliency(model, ids, torch.ones_like(ids), torch.tensor([rendered.target_mask]))
    return out.grad_norm[0, rendered.scored_token_idx], scored_char_offsets(rendered)


def runs_of(mask: list[bool]) -> list[list[int]]:
    spans, start = [], None
    for i, flag in enumerate(mask + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            spans.append([start, i])
            start = None
    return spans


# --------------------------------------------------------------------------- without Ray


def test_missing_clean_data_and_duplicate_ids_are_clear_errors(cfg_factory):
    cfg = cfg_factory()
    with pytest.raises(DetectionError, match="leaf-ray ingest"):
        run_detection(cfg)
    rows = clean_rows(2)
    write_clean(cfg, rows + [dict(rows[0], row=99)])
    with pytest.raises(DetectionError, match="sample_id is not unique"):
        run_detection(cfg)


def test_a_local_instance_too_small_for_both_pools_is_refused(cfg_factory):
    whole_cpus = {"student_pool": {"num_cpus": 1.0}, "teacher_pool": {"num_cpus": 1.0}}
    with pytest.raises(DetectionError, match=r"CPU: need 3, have 2"):
        check_local_resources(cfg_factory(detection=whole_cpus), {"CPU": 2.0})
    gpu = {"student_pool": {"num_cpus": 0.5, "num_gpus": 1}, "teacher_pool": {"num_cpus": 0.5}}
    with pytest.raises(DetectionError, match=r"GPU: need 1, have 0"):
        check_local_resources(cfg_factory(detection=gpu), {"CPU": 2.0})
    check_local_resources(cfg_factory(detection=POOLS), {"CPU": 2.0})


def test_recovery_drops_uncommitted_parts_and_reads_committed_units(tmp_path):
    paths = DetectPaths(tmp_path / "detect")
    for d in (paths.scores, paths.counterfactuals, paths.quarantine, paths.tmp / "part-x"):
        d.mkdir(parents=True)
    unit = {"sample_id": "a", "scope": "instruction"}
    pq.write_table(pa.Table.from_pylist([unit], schema=SCORES_SCHEMA), paths.scores / "part-1.parquet")
    pq.write_table(pa.Table.from_pylist([dict(unit, instruction="i")], schema=COUNTERFACTUALS_SCHEMA),
                   paths.counterfactuals / "part-1.parquet")
    # part-2 was killed between renaming its counterfactuals/quarantine and its scores (the commit point)
    pq.write_table(pa.Table.from_pylist([dict(unit, sample_id="b")], schema=COUNTERFACTUALS_SCHEMA),
                   paths.counterfactuals / "part-2.parquet")
    pq.write_table(pa.Table.from_pylist([{"sample_id": "b", "scope": "response", "stage": "tokenise",
                                          "reason": "r"}], schema=QUARANTINE_SCHEMA),
                   paths.quarantine / "part-2.parquet")
    assert recover_interrupted_commits(paths) == 2
    assert not paths.tmp.exists()
    assert sorted(p.name for p in paths.counterfactuals.iterdir()) == ["part-1.parquet"]
    assert committed_units(paths) == {("a", "instruction")}


# --------------------------------------------------------------------------- end to end on a local Ray


@pytest.mark.slow
def test_end_to_end_instruction_and_response_level(ray_local, cfg_factory, tiny_pair, tiny_tokenizer):
    cfg = cfg_factory(detection={**POOLS, "response": {"enabled": True}})
    rows = clean_rows(14)
    write_clean(cfg, rows)
    report = run_detection(cfg)
    out = DetectPaths.of(cfg)

    # Schema and counts: every planned unit is scored once; the one-step response is quarantined, not dropped.
    assert pq.read_table(out.scores).schema.remove_metadata() == SCORES_SCHEMA
    assert pq.read_table(out.counterfactuals).schema.remove_metadata() == COUNTERFACTUALS_SCHEMA
    planned = planned_units(rows)
    scores = read_dir(out.scores)
    assert Counter((s["sample_id"], s["scope"]) for s in scores) == Counter(list(planned))
    quarantined = read_dir(out.quarantine)
    assert [(q["sample_id"], q["scope"], q["stage"]) for q in quarantined] == [
        ("one-step", "response", "tokenise")]
    assert {s["sample_id"] for s in scores} == {r["sample_id"] for r in rows}
    assert sum(s["scope"].startswith("response:") for s in scores) >= 2 * 14  # 3 segments -> 2 prefixes each

    # Per row: aligned lists, token texts are the scored text's characters, spans are runs of the mask.
    by_id = {r["sample_id"]: r for r in rows}
    for s in scores:
        scored_text, _ = planned[(s["sample_id"], s["scope"])]
        n = len(s["token_texts"])
        assert n > 0 and all(len(s[k]) == n for k in ("token_char_offsets", "student_grad_norm",
                                                       "teacher_grad_norm", "delta", "confounder_mask"))
        assert s["token_texts"] == [scored_text[a:b] for a, b in s["token_char_offsets"]]
        if scored_text.isascii():  # byte-level BPE offsets tile the text (a split character repeats)
            assert "".join(s["token_texts"]) == scored_text
        assert min(s["delta"]) >= 0.0 and max(s["delta"]) <= 1.0
        assert 0.0 <= s["threshold"] <= cfg.detection.threshold.cap
        assert s["spans"] == runs_of(s["confounder_mask"])
        assert not any(m and not t.strip() for m, t in zip(s["confounder_mask"], s["token_texts"]))
        assert min(s["student_grad_norm"]) >= 0.0 and s["student_loss"] > 0 and s["teacher_loss"] > 0

    # Counterfactuals: the original minus exactly [char_start, char_end); one per span (per_span pruning).
    cfs = read_dir(out.counterfactuals)
    spans_of = {(s["sample_id"], s["scope"]): s for s in scores}
    assert Counter((c["sample_id"], c["scope"]) for c in cfs) == Counter(
        {k: len(s["spans"]) for k, s in spans_of.items() if s["spans"]})
    assert report.counterfactuals == len(cfs) > 0 and report.spans == len(cfs)
    for c in cfs:
        scored_text, continuation = planned[(c["sample_id"], c["scope"])]
        a, b = c["char_start"], c["char_end"]
        s = spans_of[(c["sample_id"], c["scope"])]
        first, last = s["spans"][c["span_index"]]
        assert (a, b) == (s["token_char_offsets"][first][0], s["token_char_offsets"][last - 1][1])
        assert c["removed_text"] == scored_text[a:b] != ""
        assert c["split"] == by_id[c["sample_id"]]["split"]
        if c["scope"] == "instruction":
            assert c["instruction"] == scored_text[:a] + scored_text[b:]
            assert c["response_prefix"] == "" and c["output"] == by_id[c["sample_id"]]["output"]
        else:
            assert c["instruction"] == by_id[c["sample_id"]]["instruction"]
            assert c["response_prefix"] == scored_text[:a] + scored_text[b:]
            assert c["output"] == continuation

    # The actors' batched, padded scores equal each unit scored alone (raw norms, before normalisation).
    student = load_model(ModelRef(path=tiny_pair["student"]))
    teacher = load_model(ModelRef(path=tiny_pair["teacher"]))
    for s in [spans_of[("non-ascii", "instruction")], spans_of[(rows[0]["sample_id"], "response:1")]]:
        key = (s["sample_id"], s["scope"])
        for model, column in ((student, "student_grad_norm"), (teacher, "teacher_grad_norm")):
            alone, offsets = direct_scores(model, tiny_tokenizer, by_id[key[0]]["instruction"], key[1],
                                           *planned[key])
            assert [list(o) for o in offsets] == s["token_char_offsets"]
            torch.testing.assert_close(torch.tensor(s[column]), alone, rtol=1e-4, atol=1e-6)

    manifest = json.loads(out.manifest.read_text())
    assert manifest["config"] == cfg.dump() and "torch" in manifest["packages"]
    assert manifest["counts"]["samples_in"] == len(rows) == report.samples_in
    assert manifest["counts"]["units"] == len(planned) + 1 and manifest["counts"]["quarantined"] == 1
    assert manifest["counts"]["counterfactuals"] == len(cfs) and manifest["same_tokenizer"] is True

    # A finished run is not redone; the same output with another threshold is refused, not mixed.
    again = run_detection(cfg)
    assert again.units_this_run == 0 and again.counterfactuals == report.counterfactuals
    other = cfg_factory(detection={**POOLS, "response": {"enabled": True}, "threshold": {"quantile": 0.2}})
    with pytest.raises(DetectionError, match="detection.threshold.quantile"):
        run_detection(other)

    # The CLI verb runs the same function (here: the finished run, so no Ray work) and prints the summary.
    from typer.testing import CliRunner

    from leaf_ray.cli import app

    config_file = cfg.run.dir / "config.yaml"
    config_file.write_text(cfg.to_yaml())
    result = CliRunner().invoke(app, ["detect", "--config", str(config_file)])
    assert result.exit_code == 0, result.output
    assert "counterfactuals" in result.output and str(len(cfs)) in result.output


@pytest.mark.slow
def test_teacher_with_another_tokenizer_is_projected_onto_student_tokens(ray_local, cfg_factory, tmp_path):
    from leaf_ray.tiny_models import TINY_TEACHER, make_tiny_model, train_tiny_tokenizer

    rows = clean_rows(4)
    # Another corpus and a smaller vocabulary: the teacher splits every instruction differently.
    corpus = [t for p in generate_problems(60, seed=99) for t in (p["instruction"], p["output"])]
    teacher_tok = train_tiny_tokenizer(vocab_size=700, seed_texts=corpus)
    teacher_dir = tmp_path / "teacher-other-tokenizer"
    make_tiny_model(teacher_tok, seed=5, **TINY_TEACHER).save_pretrained(teacher_dir)
    teacher_tok.save_pretrained(teacher_dir)
    cfg = cfg_factory(detection=POOLS, models={"teacher": {"path": str(teacher_dir)}})
    write_clean(cfg, rows)
    report = run_detection(cfg)
    out = DetectPaths.of(cfg)
    assert json.loads(out.manifest.read_text())["same_tokenizer"] is False
    assert report.scores == len(rows) and report.quarantined == 0

    teacher = load_model(ModelRef(path=str(teacher_dir)))
    teacher_tok = load_tokenizer(ModelRef(path=str(teacher_dir)))
    differing = 0
    for s in read_dir(out.scores):
        instruction = next(r["instruction"] for r in rows if r["sample_id"] == s["sample_id"])
        output = next(r["output"] for r in rows if r["sample_id"] == s["sample_id"])
        own_scores, own_offsets = direct_scores(teacher, teacher_tok, instruction, "instruction", instruction,
                                                output)
        differing += [list(o) for o in own_offsets] != s["token_char_offsets"]
        expected = project_scores(own_offsets, own_scores, s["token_char_offsets"])
        assert len(s["teacher_grad_norm"]) == len(s["token_texts"])
        torch.testing.assert_close(torch.tensor(s["teacher_grad_norm"]), expected, rtol=1e-4, atol=1e-6)
    assert differing == len(rows)  # the path under test really ran on differing tokenizations


@pytest.mark.slow
def test_killed_run_resumes_without_losing_or_duplicating_a_unit(ray_local, cfg_factory):
    # Parts of 2 units: 16 commits, so the kill lands after the first commit and before the last.
    cfg = cfg_factory(detection={"student_pool": {"num_cpus": 0.5, "batch_size": 2},
                                 "teacher_pool": {"num_cpus": 0.5, "batch_size": 2}, "units_per_part": 2})
    rows = clean_rows(30)
    write_clean(cfg, rows)
    config_file = cfg.run.dir / "config.yaml"
    config_file.write_text(cfg.to_yaml())
    out = DetectPaths.of(cfg)
    # Its own session and Ray temp dir: the CLI, its local Ray (gcs, raylet, agents) and the workers are all
    # found (process group, or the temp dir on their command line) and must be gone after the kill.
    temp_dir = tempfile.mkdtemp(prefix="lrdet-", dir="/tmp")  # short: AF_UNIX socket paths
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=temp_dir)
    env.pop("RAY_ADDRESS", None)
    log = cfg.run.dir / "killed-run.log"
    with open(log, "w") as log_file:
        command = [sys.executable, "-m", "leaf_ray.cli", "detect", "--config", str(config_file)]
        proc = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not (out.scores.is_dir() and any(out.scores.glob("*.parquet"))):
            assert proc.poll() is None, (f"detection exited with {proc.returncode} before committing a "
                                         f"part:\n{log.read_text()[-3000:]}")
            assert time.monotonic() < deadline, "no part committed within 600 s"
            time.sleep(0.02)
    finally:
        left = kill_and_reap(proc, temp_dir)
    assert not left, f"processes of the killed detection run survived: {sorted(left)}"

    committed_before = committed_units(out)
    assert 1 <= len(committed_before) < len(rows), "the kill must land between the first and the last commit"
    assert not out.manifest.exists()

    report = run_detection(cfg)  # the same config, now on this session's Ray
    assert report.units_resumed == len(committed_before)
    assert report.units_this_run == len(rows) - len(committed_before)
    scores = read_dir(out.scores)
    assert Counter(s["sample_id"] for s in scores) == Counter({r["sample_id"]: 1 for r in rows})
    cfs = read_dir(out.counterfactuals)
    keys = [(c["sample_id"], c["span_index"]) for c in cfs]
    assert len(keys) == len(set(keys))
    assert Counter(c["sample_id"] for c in cfs) == Counter(
        {s["sample_id"]: len(s["spans"]) for s in scores if s["spans"]})


@pytest.fixture
def stream_and_inline(ray_local, cfg_factory):
    """(stream config, inline config) over the same rows, the stream's detection already run on Ray Data."""
    rows = clean_rows(10)
    sections = {**POOLS, "response": {"enabled": True}, "units_per_part": 4}
    stream_cfg = cfg_factory(run={"name": "stream"}, detection=sections)
    inline_cfg = cfg_factory(run={"name": "inline"}, detection={**sections, "inline_max_samples": 64})
    for cfg in (stream_cfg, inline_cfg):
        write_clean(cfg, rows)
    run_detection(stream_cfg)
    return stream_cfg, inline_cfg


def test_a_small_job_runs_inline_and_writes_what_the_stream_writes(stream_and_inline, no_ray):
    """detection.inline_max_samples: the same units, scores, counterfactuals and quarantine as the Ray Data
    stream, committed as parts (resumable), without starting Ray or making a Ray Dataset (`no_ray`, set up
    after the stream ran); a bigger job takes the stream."""
    stream_cfg, inline_cfg = stream_and_inline
    report = run_detection(inline_cfg)
    assert report.units_this_run == report.scores + report.quarantined
    key = lambda r: (r["sample_id"], r["scope"], r.get("span_index", 0))  # noqa: E731
    for name in ("scores", "counterfactuals", "quarantine"):
        want = sorted(read_dir(getattr(DetectPaths.of(stream_cfg), name)), key=key)
        got = sorted(read_dir(getattr(DetectPaths.of(inline_cfg), name)), key=key)
        assert [key(r) for r in got] == [key(r) for r in want], name
        for a, b in zip(got, want):
            for col, value in b.items():
                if col in ("student_grad_norm", "teacher_grad_norm", "delta"):
                    assert a[col] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, col, key(b))
                elif col not in ("student_loss", "teacher_loss", "tau"):
                    assert a[col] == value, (name, col, key(b))
    parts = list(DetectPaths.of(inline_cfg).scores.glob("*.parquet"))
    assert len(parts) >= 2  # committed a part per units_per_part block, the resume granularity
    again = run_detection(inline_cfg)  # finished: nothing scored again
    assert again.units_this_run == 0
