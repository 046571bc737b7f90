"""Stage 2 data: rows from originals + counterfactuals, target masks, the grouping sampler, dynamic padding."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from leaf_ray.distill.data import (
    DistillDataError,
    TokenizedRows,
    build_rows,
    collate,
    load_rows,
    padding_micro_batch,
    plan_epoch,
    steps_per_epoch,
    tokenize_rows,
)


def clean_table(n=6, validation=(5,)):
    return pa.table({
        "sample_id": [f"s{i}" for i in range(n)],
        "instruction": [f"Tom has {i + 2} apples and buys {i} more. How many apples?" for i in range(n)],
        "output": [f"He has {i + 2} + {i} apples.\n\nSo \\boxed{{{2 * i + 2}}}" for i in range(n)],
        "answer": [str(2 * i + 2) for i in range(n)],
        "split": ["validation" if i in validation else "train" for i in range(n)],
        "source": ["t"] * n, "row": list(range(n)),
    })


def cf_table(rows):
    cols = ["sample_id", "scope", "span_index", "char_start", "char_end", "removed_text", "instruction",
            "response_prefix", "output", "split"]
    return pa.table({c: [r.get(c) for r in rows] for c in cols})


def cf(sid, scope, span, instruction, output, prefix="", split="train"):
    return dict(sample_id=sid, scope=scope, span_index=span, char_start=0, char_end=1, removed_text="x",
                instruction=instruction, response_prefix=prefix, output=output, split=split)


CFS = [
    cf("s0", "instruction", 0, "Tom has 2 apples. How many apples?", "He has 2 + 0 apples.\n\nSo \\boxed{2}"),
    cf("s0", "instruction", 1, "Tom has 2 apples and buys 0 more.", "He has 2 + 0 apples.\n\nSo \\boxed{2}"),
    cf("s2", "response:1", 0, "Tom has 4 apples and buys 2 more. How many apples?", "So \\boxed{6}",
       prefix="He has 4 apples.\n\n"),
    cf("s5", "instruction", 0, "Tom has 7 apples. How many?", "He has 7 + 5 apples.\n\nSo \\boxed{12}",
       split="validation"),
]


def test_rows_group_originals_with_counterfactuals_and_filter_scopes():
    rows = build_rows(clean_table(), cf_table(CFS), scopes=("instruction",)).to_pylist()
    assert [r["row_key"] for r in rows] == ["s0", "s0#instruction#0", "s0#instruction#1", "s1", "s2", "s3", "s4",
                                           "s5", "s5#instruction#0"]
    assert [r["is_counterfactual"] for r in rows].count(True) == 3
    assert all(r["group"] == r["row_key"].split("#")[0] for r in rows)
    assert {r["row_key"]: r["split"] for r in rows}["s5#instruction#0"] == "validation"

    with_resp = build_rows(clean_table(), cf_table(CFS), scopes=("instruction", "response")).to_pylist()
    resp = [r for r in with_resp if r["scope"].startswith("response")]
    assert len(resp) == 1 and resp[0]["prefix"] == "He has 4 apples.\n\n" and resp[0]["response"] == "So \\boxed{6}"

    kd = build_rows(clean_table(), cf_table(CFS), scopes=()).to_pylist()
    assert not any(r["is_counterfactual"] for r in kd) and len(kd) == 6


@pytest.mark.parametrize("bad, message", [
    (cf("nope", "instruction", 0, "x", "y"), "sample_id 'nope' is not in data/clean"),
    (cf("s5", "instruction", 3, "x", "y", split="train"), "its original is in 'validation'"),
    (cf("s1", "response:1", 0, "x", "y", prefix=""), "empty response_prefix"),
    (cf("s1", "banana", 0, "x", "y"), "unknown scope 'banana'"),
])
def test_bad_counterfactuals_are_named(bad, message):
    with pytest.raises(DistillDataError, match=message):
        build_rows(clean_table(), cf_table(CFS + [bad]), scopes=("instruction", "response"))


def test_missing_column_and_duplicate_are_errors():
    with pytest.raises(DistillDataError, match="missing column"):
        build_rows(clean_table().drop(["split"]), None, ())
    dup = pa.concat_tables([clean_table(2), clean_table(2)])
    with pytest.raises(DistillDataError, match="duplicate sample_id 's0'"):
        build_rows(dup, None, ())


def test_load_rows_reads_run_dir(tmp_path):
    import pyarrow.parquet as pq

    (tmp_path / "data" / "clean").mkdir(parents=True)
    pq.write_table(clean_table(), tmp_path / "data" / "clean" / "part-0.parquet")
    rows, cfs = load_rows(tmp_path, "kd")
    assert rows.num_rows == 6 and cfs is None
    with pytest.raises(DistillDataError, match="run `leaf-ray detect`"):
        load_rows(tmp_path, "leaf_instr")
    (tmp_path / "detect" / "counterfactuals").mkdir(parents=True)
    pq.write_table(cf_table(CFS), tmp_path / "detect" / "counterfactuals" / "part-0.parquet")
    rows, cfs = load_rows(tmp_path, "leaf_instr_resp")
    assert rows.num_rows == 10 and cfs.num_rows == 4
    rows, _ = load_rows(tmp_path, "leaf_instr", use_counterfactuals=False)
    assert rows.num_rows == 6


def _targets_text(tok, cols, i):
    ids = np.asarray(cols["input_ids"][i])
    return tok.decode(ids[np.asarray(cols["target_mask"][i]) == 1].tolist())


def test_target_masks_cover_response_or_continuation_only(tiny_tokenizer):
    table = build_rows(clean_table(), cf_table(CFS), scopes=("instruction", "response"))
    cols = tokenize_rows(table.to_pydict(), tiny_tokenizer, max_length=512)
    keys = cols["row_key"]
    eos = tiny_tokenizer.eos_token
    # original and instruction-level counterfactual: the whole response is the target
    assert _targets_text(tiny_tokenizer, cols, keys.index("s0")) == table.to_pydict()["response"][0] + eos
    i = keys.index("s0#instruction#1")
    assert _targets_text(tiny_tokenizer, cols, i) == "He has 2 + 0 apples.\n\nSo \\boxed{2}" + eos
    # response level: context = instruction + pruned prefix, target = the continuation only
    i = keys.index("s2#response:1#0")
    assert _targets_text(tiny_tokenizer, cols, i) == "So \\boxed{6}" + eos
    assert "He has 4 apples." in tiny_tokenizer.decode(np.asarray(cols["input_ids"][i]).tolist())
    assert cols["n_targets"][i] == int(np.asarray(cols["target_mask"][i]).sum())
    assert not any(cols["truncated"])


def test_truncation_flags_and_rows_without_targets_fail(tiny_tokenizer):
    table = build_rows(clean_table(1, validation=()), None, ())
    full = tokenize_rows(table.to_pydict(), tiny_tokenizer, max_length=512)["length"][0]
    cut = tokenize_rows(table.to_pydict(), tiny_tokenizer, max_length=full - 2)
    assert cut["truncated"] == [True] and cut["length"] == [full - 2]
    with pytest.raises(DistillDataError, match="training row 's0': no response token"):
        tokenize_rows(table.to_pydict(), tiny_tokenizer, max_length=5)


def synthetic_rows(group_sizes, seed=0):
    rng = np.random.default_rng(seed)
    keys, groups, is_cf, ids, masks = [], [], [], [], []
    for g, size in enumerate(group_sizes):
        for j in range(size):
            n = int(rng.integers(8, 64))
            keys.append(f"g{g:03d}" + ("" if j == 0 else f"#instruction#{j}"))
            groups.append(f"g{g:03d}")
            is_cf.append(j > 0)
            ids.append(np.arange(n, dtype=np.int32) + 5)
            masks.append(np.r_[np.zeros(n // 2, np.int8), np.ones(n - n // 2, np.int8)])
    return TokenizedRows(keys, groups, np.asarray(is_cf), ids, masks)


GROUPS = [1, 3, 2, 1, 4, 2, 1, 1, 3, 2, 2, 1, 5, 1, 2, 3, 1, 1, 2, 2, 1, 3, 2, 1]


@pytest.mark.parametrize("world, accum", [(1, 1), (2, 2), (3, 1)])
def test_sampler_covers_every_row_once_and_keeps_groups_together(world, accum):
    rows = synthetic_rows(GROUPS)
    micro = 3
    plan = plan_epoch(rows.group, rows.lengths, seed=7, epoch=1, micro_batch_size=micro, world_size=world,
                      accum_steps=accum, bucket_steps=2)
    assert len(plan.steps) == steps_per_epoch(len(rows), micro, world, accum)
    # stream order = step, slot, rank (how micro-batch j of the epoch is placed)
    stream = [mb for step in plan.steps for slot in step for mb in slot if mb is not None]
    flat = [i for mb in stream for i in mb]
    assert sorted(flat) == list(range(len(rows)))  # every row exactly once
    assert all(len(mb) == micro for mb in stream[:-1])
    # each group's rows are consecutive in the stream, so they share a micro-batch or sit in adjacent ones
    position = {row: p for p, row in enumerate(flat)}
    for g in set(rows.group):
        members = sorted(position[i] for i, gg in enumerate(rows.group) if gg == g)
        assert members == list(range(members[0], members[0] + len(members))), g
    # every rank runs the same number of micro-batches per step (padding slots are None)
    for step in plan.steps:
        assert len(step) == accum and all(len(slot) == world for slot in step)
    assert all(mb is not None for step in plan.steps[:-1] for slot in step for mb in slot)
    # per-rank shares are disjoint
    shares = [set(plan.rows_of(r)) for r in range(world)]
    assert sum(len(s) for s in shares) == len(rows)


def test_sampler_is_a_function_of_seed_and_epoch():
    rows = synthetic_rows(GROUPS)
    kw = dict(micro_batch_size=4, world_size=2, accum_steps=1, bucket_steps=2)
    a = plan_epoch(rows.group, rows.lengths, seed=3, epoch=0, **kw).steps
    assert a == plan_epoch(rows.group, rows.lengths, seed=3, epoch=0, **kw).steps
    assert a != plan_epoch(rows.group, rows.lengths, seed=3, epoch=1, **kw).steps
    assert a != plan_epoch(rows.group, rows.lengths, seed=4, epoch=0, **kw).steps
    fixed = plan_epoch(rows.group, rows.lengths, seed=3, epoch=0, shuffle=False, **kw).steps
    assert fixed == plan_epoch(rows.group, rows.lengths, seed=9, epoch=5, shuffle=False, **kw).steps


def test_length_grouping_reduces_padding():
    rows = synthetic_rows([1] * 96, seed=1)
    lengths = rows.lengths

    def padded(plan):
        return sum(len(mb) * max(lengths[i] for i in mb)
                   for step in plan.steps for slot in step for mb in slot if mb is not None)

    kw = dict(seed=0, epoch=0, micro_batch_size=4, world_size=1, accum_steps=1)
    grouped = padded(plan_epoch(rows.group, lengths, bucket_steps=8, **kw))
    # bucket_steps so small that a window holds one micro-batch: no sorting across batches
    ungrouped = padded(plan_epoch(rows.group, lengths, bucket_steps=1, **kw))
    assert grouped < 0.85 * ungrouped
    assert grouped >= lengths.sum()


def test_collate_pads_to_batch_max_only():
    rows = synthetic_rows(GROUPS)
    idx = [0, 1, 2, 5]
    batch = collate(rows, idx, pad_token_id=0)
    longest = max(len(rows.input_ids[i]) for i in idx)
    assert batch["input_ids"].shape == (4, longest)  # never padded to max_length
    for b, i in enumerate(idx):
        n = len(rows.input_ids[i])
        assert batch["attention_mask"][b].sum() == n
        assert batch["input_ids"][b, :n].tolist() == rows.input_ids[i].tolist()
        assert batch["target_mask"][b, n:].sum() == 0 and batch["input_ids"][b, n:].eq(0).all()
        assert batch["target_mask"][b, :n].tolist() == rows.target_mask[i].tolist()
    assert batch["is_counterfactual"].tolist() == [bool(rows.is_counterfactual[i]) for i in idx]
    assert batch["row_keys"] == [rows.row_key[i] for i in idx]
    assert batch["n_tokens"] == sum(len(rows.input_ids[i]) for i in idx)
    pad = padding_micro_batch(rows, pad_token_id=0)
    assert pad["input_ids"].shape == (1, 2) and pad["target_mask"].sum() == 0 and pad["n_tokens"] == 0


def test_rows_from_unordered_batches_are_sorted_stably():
    t = pa.table({"row_key": ["b#instruction#0", "a", "b", "a#instruction#1"], "group": ["b", "a", "b", "a"],
                  "is_counterfactual": [True, False, False, True],
                  "scope": ["instruction", "original", "original", "instruction"], "span_index": [0, -1, -1, 1],
                  "input_ids": [[1, 2], [3, 4, 5], [6, 7], [8, 9]], "target_mask": [[0, 1]] * 2 + [[0, 1]] * 2})
    rows = TokenizedRows.from_batches([t.slice(2), t.slice(0, 2)])
    assert rows.row_key == ["a", "a#instruction#1", "b", "b#instruction#0"]
    assert rows.input_ids[0].tolist() == [3, 4, 5]
    assert Counter(rows.group) == {"a": 2, "b": 2}


def test_micro_batch_weight_makes_the_last_step_a_mean_over_real_micro_batches():
    from leaf_ray.distill.trainer import micro_batch_weight

    world, accum, n_real = 2, 3, 4
    losses = [0.5, 1.5, 2.0, 4.0]
    # DeepSpeed: Σ over world·accum micro-batches of (loss / accum), averaged over world ranks
    effective = sum(loss * micro_batch_weight(n_real, world, accum) / accum for loss in losses) / world
    assert effective == pytest.approx(np.mean(losses))
