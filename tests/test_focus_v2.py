"""Focus benchmark v2 (issue 12): oracle / random-span counterfactuals, the paired bootstrap CI, FLOP accounting,
the variant plan, the quick config and the tables. Pure functions only: no training, no Ray."""

from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from leaf_ray.bench.flops import Shape, forward_flops, saliency_flops, training_flops
from leaf_ray.detect.schema import COUNTERFACTUALS_SCHEMA
from leaf_ray.experiments.focus.controls import (
    Variant,
    base_variants,
    best_variant,
    control_policy,
    detection_flops,
    distill_epoch_flops,
    epochs_for_steps,
    generation_flops,
    kd_control,
    kd_steps_for_flops,
    kd_steps_key,
    lambda_variants,
    oracle_counterfactuals,
    oracle_range,
    paired_bootstrap_ci,
    parse_kd_steps_key,
    pruned_tokens,
    random_span_counterfactuals,
    run_flops,
)
from leaf_ray.experiments.focus.task import make_problem


def _problems(n: int = 60, seed: int = 4) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        p = make_problem(rng, i, "t", num_distractors=i % 3, max_number=20).to_row()
        rows.append({"sample_id": p["id"], "instruction": p["instruction"], "output": p["output"],
                     "split": "train" if i % 5 else "validation", "distractor_spans": p["distractor_spans"],
                     "clean_instruction": p["clean_instruction"]})
    return rows


def _word_offsets(text: str) -> list[tuple[int, int]]:
    """Byte-level-BPE-like tokens: each word with its leading space."""
    offsets, start = [], 0
    for i in range(1, len(text) + 1):
        if i == len(text) or text[i] == " ":
            offsets.append((start, i))
            start = i
    return offsets


# --------------------------------------------------------------------------- oracle


def test_oracle_removes_each_distractor_sentence_with_one_space():
    rows = _problems()
    cfs = oracle_counterfactuals(rows)
    assert len(cfs) == sum(len(r["distractor_spans"]) for r in rows)
    by_id = {r["sample_id"]: r for r in rows}
    for cf in cfs:
        r = by_id[cf["sample_id"]]
        start, end = r["distractor_spans"][cf["span_index"]]
        sentence = r["instruction"][start:end]
        assert cf["removed_text"].strip() == sentence and len(cf["removed_text"]) == len(sentence) + 1
        assert cf["instruction"] == r["instruction"][:cf["char_start"]] + r["instruction"][cf["char_end"]:]
        assert "  " not in cf["instruction"] and not cf["instruction"].startswith(" ")
        assert cf["scope"] == "instruction" and cf["response_prefix"] == "" and cf["output"] == r["output"]
        assert cf["split"] == r["split"]
    # with one distractor, its oracle counterfactual is exactly the clean problem
    singles = [r for r in rows if len(r["distractor_spans"]) == 1]
    assert singles
    for r in singles:
        (cf,) = [c for c in cfs if c["sample_id"] == r["sample_id"]]
        assert cf["instruction"] == r["clean_instruction"]
    pa.Table.from_pylist(cfs, schema=COUNTERFACTUALS_SCHEMA)  # detection's file schema
    assert oracle_range("Bob is 9. Ann has 3.", [0, 9]) == (0, 10)  # opening sentence: the space after it
    with pytest.raises(ValueError, match="not inside"):
        oracle_range("short", [2, 99])


def test_control_counterfactuals_feed_the_unchanged_trainer_rows(tmp_path):
    from leaf_ray.distill.data import load_rows
    from leaf_ray.experiments.focus.run import write_counterfactuals

    rows = _problems(20)
    clean = tmp_path / "data" / "clean"
    clean.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("sample_id", "instruction", "output", "split")}
                                         for r in rows]), clean / "part-0.parquet")
    n = write_counterfactuals(tmp_path / "detect" / "counterfactuals", oracle_counterfactuals(rows))
    table, cfs = load_rows(tmp_path, "leaf_instr")
    assert cfs.num_rows == n and table.num_rows == len(rows) + n
    assert sum(table.column("is_counterfactual").to_pylist()) == n
    kd, _ = load_rows(tmp_path, "kd")
    assert kd.num_rows == len(rows)
    # rewritten in place (a rerun): the same rows, no leftovers
    assert write_counterfactuals(tmp_path / "detect" / "counterfactuals", oracle_counterfactuals(rows[:3])) < n
    assert len(list((tmp_path / "detect").iterdir())) == 1


# --------------------------------------------------------------------------- random spans


def _scores_rows(rows: list[dict], seed: int = 0) -> list[dict]:
    """Fake detect/scores rows: word tokens, 0-2 detected spans of 1-4 tokens per sample."""
    rng = random.Random(seed)
    out = []
    for r in rows:
        offsets = _word_offsets(r["instruction"])
        spans, at = [], 0
        for _ in range(rng.randint(0, 2)):
            length = rng.randint(1, 4)
            if at + length > len(offsets):
                break
            start = rng.randint(at, len(offsets) - length)
            spans.append([start, start + length])
            at = start + length + 1
        out.append({"sample_id": r["sample_id"], "scope": "instruction", "token_char_offsets": offsets,
                    "spans": spans})
        out.append({"sample_id": r["sample_id"], "scope": "response:1", "token_char_offsets": [(0, 1)],
                    "spans": [[0, 1]]})
    return out


def test_random_spans_prune_as_many_tokens_per_sample_as_detection():
    rows = _problems()
    originals = {r["sample_id"]: r for r in rows}
    scores = _scores_rows(rows)
    cfs = random_span_counterfactuals(scores, originals, seed=0)
    lengths = pruned_tokens(scores)
    assert len(cfs) == sum(len(v) for v in lengths.values()) > 0
    for cf in cfs:
        r = originals[cf["sample_id"]]
        offsets = _word_offsets(r["instruction"])
        want = lengths[cf["sample_id"]][cf["span_index"]]
        # the removed characters are exactly a window of `want` whole tokens
        starts = [a for a, _ in offsets]
        ends = [b for _, b in offsets]
        first, last = starts.index(cf["char_start"]), ends.index(cf["char_end"])
        assert last - first + 1 == want
        assert cf["instruction"] == r["instruction"][:cf["char_start"]] + r["instruction"][cf["char_end"]:]
        assert cf["scope"] == "instruction" and cf["split"] == r["split"]
    assert random_span_counterfactuals(scores, originals, seed=0) == cfs  # seeded: the same draw
    other = random_span_counterfactuals(scores, originals, seed=1)
    assert [c["char_start"] for c in other] != [c["char_start"] for c in cfs]
    pa.Table.from_pylist(cfs, schema=COUNTERFACTUALS_SCHEMA)


# --------------------------------------------------------------------------- paired bootstrap


def test_paired_bootstrap_ci():
    same = [[1, 0, 1, 1], [0, 0, 1, 0]]
    d = paired_bootstrap_ci(same, same, resamples=200)
    assert (d.mean, d.low, d.high, d.seeds, d.problems) == (0.0, 0.0, 0.0, 2, 4)
    d = paired_bootstrap_ci([[1] * 10] * 3, [[0] * 10] * 3, resamples=200)
    assert d.mean == d.low == d.high == 1.0
    rng = random.Random(0)
    ctrl = [[int(rng.random() < 0.4) for _ in range(300)] for _ in range(5)]
    var = [[max(c, int(rng.random() < 0.1)) for c in row] for row in ctrl]  # ~+6 pp, paired
    d = paired_bootstrap_ci(var, ctrl, resamples=1000, seed=3)
    assert d.low < d.mean < d.high and d.low > 0.0 and d.high < 0.15
    assert paired_bootstrap_ci(var, ctrl, resamples=1000, seed=3) == d  # seeded
    one = paired_bootstrap_ci(var[:1], ctrl[:1], resamples=500)  # one seed: problems resampled only
    assert one.seeds == 1 and one.low < one.mean < one.high
    # a paired CI is narrower than the spread of two independent accuracies would suggest
    wide = paired_bootstrap_ci([[int(rng.random() < 0.5) for _ in range(300)]], [[int(rng.random() < 0.5)
                                                                                  for _ in range(300)]])
    assert (one.high - one.low) < (wide.high - wide.low)
    with pytest.raises(ValueError, match="one shape"):
        paired_bootstrap_ci([[1, 0]], [[1, 0, 1]])


# --------------------------------------------------------------------------- FLOPs


def test_flop_accounting():
    s = Shape(hidden=64, layers=1, heads=1, kv_heads=1, intermediate=64, vocab=100)
    t = Shape(hidden=128, layers=2, heads=2, kv_heads=2, intermediate=256, vocab=100)
    lens, targets = [10, 20, 7], [3, 5, 2]
    epoch = distill_epoch_flops(lens, targets, s, t)
    assert epoch == training_flops(s, lens, 10) + forward_flops(t, lens, 10)
    # hand count of the student's linear part: 6 * params * tokens is inside its training FLOPs
    assert training_flops(s, lens, 0) >= 6 * s.block_params * sum(lens)
    assert detection_flops(lens, targets, s, t) == saliency_flops(s, lens, 10) + saliency_flops(t, lens, 10)
    # counterfactual rows cost their teacher forward too: more rows, more FLOPs
    assert distill_epoch_flops(lens + [8], targets + [3], s, t) - epoch == pytest.approx(
        training_flops(s, [8], 3) + forward_flops(t, [8], 3))
    assert run_flops(epoch, 5, 10) == pytest.approx(epoch / 2)
    with pytest.raises(ValueError):
        run_flops(epoch, 1, 0)
    assert kd_steps_for_flops(3.0 * epoch, epoch, 11) == 33
    assert kd_steps_for_flops(1.0, epoch, 11) == 1
    assert epochs_for_steps(123, 11) == 12 and epochs_for_steps(11, 11) == 1 and epochs_for_steps(1, 11) == 1


# --------------------------------------------------------------------------- plan, quick, tables


def test_variant_plan_sweeps_and_best():
    plan = base_variants(["kd", "leaf_instr", "leaf_full", "oracle", "random_span"], [0.05, 0.10, 0.15], 0.10)
    keys = [v.key for v in plan]
    assert keys == ["kd", "leaf_instr", "leaf_full", "oracle", "random_span", "leaf_instr_q0.05", "leaf_instr_q0.15"]
    by = {v.key: v for v in plan}
    assert by["kd"].source is None and by["oracle"].source == "oracle" and by["oracle"].control
    assert by["leaf_full"].trainer == "leaf_instr_resp" and by["leaf_full"].source == "detect-full"
    assert by["leaf_instr_q0.05"].source == "detect-q0.05" and by["leaf_instr_q0.05"].trainer == "leaf_instr"
    # the oracle's bigger gain does not make it "best": controls are bounds, not methods
    best = best_variant(plan, {"leaf_instr": 0.01, "leaf_full": 0.03, "oracle": 0.2, "leaf_instr_q0.05": -0.01})
    assert best.key == "leaf_full"
    assert best_variant(plan, {}) is None
    lams = lambda_variants(best, [0.3, 0.5, 0.7], 0.5)
    assert [(v.key, v.lambda_, v.source) for v in lams] == [("leaf_full_lam0.3", 0.3, "detect-full"),
                                                            ("leaf_full_lam0.7", 0.7, "detect-full")]
    assert kd_steps_key(123) == "kd_123steps"


def test_on_policy_variants_and_their_controls():
    """On-policy LeaF is matched against on-policy KD (does LeaF add anything on top?), on-policy KD against
    off-policy KD (does sampling transfer more?); control keys name their policy and sort after off-policy."""
    plan = base_variants(["kd", "kd_on", "leaf_instr_on", "kd_mixed", "leaf_instr_mixed"], [], 0.10)
    by = {v.key: v for v in plan}
    assert [(k, v.trainer, v.source, v.policy) for k, v in by.items()] == [
        ("kd", "kd", None, "off"), ("kd_on", "kd", None, "on"), ("leaf_instr_on", "leaf_instr", "detect", "on"),
        ("kd_mixed", "kd", None, "mixed"), ("leaf_instr_mixed", "leaf_instr", "detect", "mixed")]
    assert [control_policy(by[k]) for k in by] == ["off", "off", "on", "off", "mixed"]
    c = kd_control(126, "on")
    assert (c.key, c.title, c.trainer, c.steps, c.policy) == ("kd_on_126steps", "On-policy KD, 126 steps", "kd",
                                                               126, "on")
    assert kd_control(33).key == kd_steps_key(33) == "kd_33steps" and kd_control(33).policy == "off"
    assert [parse_kd_steps_key(k) for k in ("kd_33steps", "kd_on_126steps", "kd_mixed_7steps", "kd_on",
                                            "kd_onsteps", "leaf_instr_q0.05")] == [
        ("off", 33), ("on", 126), ("mixed", 7), None, None, None]
    # the λ sweep of an on-policy variant stays on-policy; "best" is a LeaF variant, never KD on-policy
    assert {v.policy for v in lambda_variants(by["leaf_instr_on"], [0.3, 0.5], 0.5)} == {"on"}
    assert best_variant(plan, {"kd_on": 0.5, "leaf_instr_on": 0.01, "leaf_instr_mixed": 0.02}).key == \
        "leaf_instr_mixed"

    from leaf_ray.experiments.focus.results import FocusBenchResult, ordered_keys

    keys = ["teacher", "kd", "kd_on", "leaf_instr_on", "kd_on_126steps", "kd_130steps", "kd_mixed_40steps",
            "kd_on_40steps"]
    result = FocusBenchResult([], {}, {}, {}, titles=dict.fromkeys(keys, ""))
    assert ordered_keys(result) == ["teacher", "kd", "kd_on", "leaf_instr_on", "kd_130steps", "kd_on_40steps",
                                    "kd_on_126steps", "kd_mixed_40steps"]


def test_on_policy_flops_add_the_students_sampling():
    s = Shape(hidden=64, layers=1, heads=1, kv_heads=1, intermediate=64, vocab=100)
    lens, targets = [10, 20, 7], [3, 5, 2]
    # a KV-cached generation runs each token's matmuls once: one forward over prompt + response
    assert generation_flops(lens, targets, s) == forward_flops(s, lens, 10)
    assert 0 < generation_flops(lens, targets, s) < training_flops(s, lens, 10) / 2


def test_quick_config_and_yaml(tmp_path):
    from leaf_ray.config import load_config
    from leaf_ray.experiments.focus.run import quick_config, settings_of

    cfg = load_config("configs/bench-focus.yaml")
    f = cfg.bench.focus
    assert f.seeds >= 5 and {"oracle", "random_span", "leaf_full"} <= set(f.variants) and f.steps_matched_kd
    assert f.tau_sweep == [0.05, 0.10, 0.15] and f.lambda_sweep == [0.3, 0.5, 0.7]
    q = quick_config(cfg)
    assert q.run.name == cfg.run.name + "-quick" and quick_config(q).run.name == q.run.name
    assert q.bench.focus.seeds == 1 and q.bench.focus.variants == f.quick_variants
    assert q.bench.focus.tau_sweep == [] and q.bench.focus.lambda_sweep == [] and q.bench.focus.quick
    assert q.bench.focus.compute_matched == [] and f.compute_matched == ["leaf_instr"]
    assert settings_of(q) != settings_of(cfg)
    assert cfg.bench.focus.variants == f.variants  # the original is not changed
    # the defaults (what `leaf-ray demo` runs) leave the v2 controls off
    from leaf_ray.config import FocusBenchConfig

    d = FocusBenchConfig()
    assert not d.steps_matched_kd and d.compute_matched == [] and d.tau_sweep == [] and d.lambda_sweep == []
    # the on-policy benchmark extends this one: the same task, models and schedule, its own variants and run dir
    on = load_config("configs/bench-focus-onpolicy.yaml")
    assert on.run.name != cfg.run.name and on.bench.focus.prepare == f.prepare and on.distill.epochs == \
        cfg.distill.epochs and on.data == cfg.data and on.bench.focus.seeds == f.seeds
    assert {"kd", "kd_on", "leaf_instr_on"} <= set(on.bench.focus.variants) and on.bench.focus.steps_matched_kd
    assert on.distill.policy == "off", "the policy is each variant's; KD w/o mask stays off-policy"


def test_runs_tables_and_compare_titles():
    from leaf_ray.config import FocusBenchConfig
    from leaf_ray.evaluate.compare import RunScores, build_table
    from leaf_ray.experiments.focus.results import TEST, TEST_CLEAN, VariantRuns, diff_rows, method_rows

    runs = VariantRuns(FocusBenchConfig(bootstrap_resamples=200), [])
    att = {"mass": 0.1, "uniform": 0.2}

    def info(correct: list[int], steps: int) -> dict:
        return {"accuracy": {TEST: sum(correct) / len(correct), TEST_CLEAN: 1.0}, "attention": att,
                "steps": steps, "correct": {TEST: correct, TEST_CLEAN: [1] * len(correct)}}

    leaf = Variant("leaf_instr", "LeaF (Instr)", "leaf_instr", "detect")
    control = Variant("kd_40steps", "KD w/o mask, 40 steps", "kd", steps=40)
    for k in range(2):
        runs.add(Variant("kd", "KD w/o mask", "kd"), info([0, 0, 1, 0], 10), k)
        runs.add(leaf, info([1, 0, 1, 1], 40), k)
        runs.match(leaf, "steps", runs.add(control, info([1, 0, 1, 0], 40), k))
        runs.add(control, info([1, 0, 1, 0], 40), k)  # the same control again (another variant): once per seed
    assert runs.steps["kd_40steps"] == [40, 40]
    result = runs.result([], {})
    d = result.diffs["leaf_instr"]["steps"]
    assert d.mean == pytest.approx(0.25) and (d.seeds, d.problems) == (2, 4)
    rows = method_rows(result)
    assert [r[0] for r in rows] == ["KD w/o mask", "LeaF (Instr)", "KD w/o mask, 40 steps"]
    assert rows[1][2] == "75.0 ± 0.0" and rows[2][6] == "40"
    (diff,) = diff_rows(result)
    assert diff[0] == "LeaF (Instr)" and "40 steps" in diff[1] and diff[5] == "+25.0"
    # compare: a titled variant outside the known five gets its own row; an untitled unknown one is left out
    table = build_table([RunScores("a", "kd", {TEST: 0.3}, []), RunScores("b", "oracle", {TEST: 0.5}, [], "Oracle"),
                         RunScores("c", "mystery", {TEST: 0.9}, [])], "x")
    assert [(r.variant, r.title) for r in table.rows] == [("kd", "KD w/o mask"), ("oracle", "Oracle")]
