"""Teacher saliency on a sharded gang (`leaf_ray/detect/sharded_teacher.py`), on CPU with gloo: 2 ranks give
the unsharded teacher's per-token norms (fp32, 1e-5), each rank holds about half the parameters, the frozen
blocks are gathered again before their backward, uneven batch counts line up with dummy batches; and in
`leaf-ray detect`, a killed rank is replaced without losing or duplicating a unit."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
import torch.multiprocessing as mp

from leaf_ray.config import ModelRef
from leaf_ray.data.chat import render
from leaf_ray.detect.saliency import token_saliency
from leaf_ray.models import load_model

INSTRUCTIONS = ["What is 2 + 3?", "Tom has 7 apples and eats 2. How many are left?",
                "A train travels 60 km in 1.5 hours. What is its speed?", "Compute 12 * 11.",
                "Name a prime number larger than 10.", "If x + 4 = 9, what is x?"]
RESPONSES = ["2 + 3 = 5.\n\nThe answer is \\boxed{5}.", "7 - 2 = 5 apples.\n\n\\boxed{5}",
             "60 / 1.5 = 40 km/h.\n\n\\boxed{40}", "12 * 11 = 132.\n\n\\boxed{132}", "11 is prime.\n\n\\boxed{11}",
             "x = 9 - 4 = 5.\n\n\\boxed{5}"]


def padded(tokenizer, pairs, side="right"):
    rendered = [render(tokenizer, i, o) for i, o in pairs]
    length = max(len(r.input_ids) for r in rendered)
    ids, att, tgt = (torch.zeros(len(rendered), length, dtype=torch.long) for _ in range(3))
    for b, r in enumerate(rendered):
        n = len(r.input_ids)
        cols = slice(0, n) if side == "right" else slice(length - n, length)
        ids[b, cols], att[b, cols], tgt[b, cols] = torch.tensor(r.input_ids), 1, torch.tensor(r.target_mask)
    return ids, att, tgt


def rank_batches(tokenizer) -> list[list[tuple]]:
    """Rank 0 scores two batches (one left-padded), rank 1 one: its second call is a dummy batch."""
    pairs = list(zip(INSTRUCTIONS, RESPONSES))
    return [[padded(tokenizer, pairs[0:2]), padded(tokenizer, pairs[2:4], side="left")],
            [padded(tokenizer, pairs[4:6])]]


def _rank(rank: int, world: int, init_file: str, teacher: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    from leaf_ray.detect.sharded_teacher import (
        dummy_batch,
        gang_token_saliency,
        load_sharded_teacher,
        local_parameter_numel,
        transformer_blocks,
    )
    from leaf_ray.models import load_tokenizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ref = ModelRef(path=teacher)
        # each rank reads only its own shards (leaf_ray/partitioned_load.py)
        model, _ = load_sharded_teacher(ref, "float32", init_device_mesh("cpu", (world,)))
        local, full = local_parameter_numel(model)
        gathers = []  # one entry per FSDP unit gathered before its backward
        original = _fsdp_param_group.FSDPParamGroup.pre_backward

        def counting(self, *args, **kwargs):
            gathers.append(1)
            return original(self, *args, **kwargs)

        _fsdp_param_group.FSDPParamGroup.pre_backward = counting
        batches = rank_batches(load_tokenizer(ref))
        calls = max(len(b) for b in batches)  # every rank calls the same number of times
        results = []
        for i in range(calls):
            mine = batches[rank][i] if i < len(batches[rank]) else dummy_batch()
            gathers.clear()
            # the second call checkpoints every block (recomputed inside its FSDP unit): same numbers
            out = gang_token_saliency(model, *mine, gradient_checkpointing=i == 1)
            results.append({"grad_norm": out.grad_norm, "loss": out.loss, "dummy": i >= len(batches[rank]),
                            "backward_gathers": len(gathers)})
        torch.save({"local": local, "full": full, "blocks": len(transformer_blocks(model)), "results": results,
                    "requires_grad": any(p.requires_grad for p in model.parameters())},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_the_unsharded_teacher_and_hold_half_the_parameters(tiny_pair, tiny_tokenizer, tmp_path):
    world = 2
    mp.start_processes(_rank, args=(world, str(tmp_path / "init"), tiny_pair["teacher"], str(tmp_path)),
                       nprocs=world, start_method="spawn", join=True)
    teacher = load_model(ModelRef(path=tiny_pair["teacher"])).eval()
    batches = rank_batches(tiny_tokenizer)
    total = sum(p.numel() for p in teacher.parameters())
    locals_ = []
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["full"] == total and not got["requires_grad"]
        locals_.append(got["local"])
        assert got["local"] <= total / world * 1.01, got  # about half: FSDP2 pads dim 0 to a multiple of 2
        assert len(got["results"]) == 2 and [r["dummy"] for r in got["results"]] == [False, rank == 1]
        for r in got["results"]:
            # every block (and the root) gathered again before its backward, with every parameter frozen
            assert r["backward_gathers"] >= got["blocks"], r["backward_gathers"]
        for batch, r in zip(batches[rank], got["results"]):
            want = token_saliency(teacher, *batch)
            assert want.grad_norm.abs().max() > 0
            torch.testing.assert_close(r["grad_norm"], want.grad_norm, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(r["loss"], want.loss, rtol=1e-5, atol=1e-5)
    assert sum(locals_) >= total  # together the ranks hold the whole model (plus padding)


def test_unsharded_model_gives_the_same_numbers(tiny_pair, tiny_tokenizer):
    """The embeddings-inside-the-forward path equals token_saliency's on a plain model too."""
    from leaf_ray.detect.sharded_teacher import gang_token_saliency

    teacher = load_model(ModelRef(path=tiny_pair["teacher"])).eval()
    for batch in rank_batches(tiny_tokenizer)[0]:
        got, want = gang_token_saliency(teacher, *batch), token_saliency(teacher, *batch)
        torch.testing.assert_close(got.grad_norm, want.grad_norm, rtol=1e-6, atol=1e-6)
    assert all(p.grad is None for p in teacher.parameters())


# --------------------------------------------------------------------------- in `leaf-ray detect`, on Ray


def _check_complete_and_equal(cfg, rows, tiny_pair, tiny_tokenizer):
    """Every unit exactly once, teacher norms equal to the unsharded teacher's on that unit alone."""
    from test_detect_pipeline import direct_scores, read_dir

    from leaf_ray.store import DetectPaths

    out = DetectPaths.of(cfg)
    scores = read_dir(out.scores) + [dict(r, quarantined=True) for r in read_dir(out.quarantine)]
    assert Counter((s["sample_id"], s["scope"]) for s in scores) == Counter(
        {(r["sample_id"], "instruction"): 1 for r in rows})
    teacher = load_model(ModelRef(path=tiny_pair["teacher"])).eval()
    by_id = {r["sample_id"]: r for r in rows}
    for s in scores:
        assert "quarantined" not in s, s
        r = by_id[s["sample_id"]]
        want, offsets = direct_scores(teacher, tiny_tokenizer, r["instruction"], "instruction", r["instruction"],
                                      r["output"])
        assert [tuple(o) for o in s["token_char_offsets"]] == [tuple(o) for o in offsets]
        torch.testing.assert_close(torch.tensor(s["teacher_grad_norm"]), want.float(), rtol=1e-5, atol=1e-6)


def test_detect_with_a_sharded_gang_replaces_a_killed_rank_and_resumes(ray_local, cfg_factory, tiny_pair,
                                                                      tiny_tokenizer):
    """Rank 1 dies at its 2nd batch: the gang is rebuilt and the batch scored again (nothing of it was
    committed). Every unit exactly once, with the unsharded teacher's norms. (A gang with no restart left
    fails the stream with a plain error; the rerun resumes from the committed parts like any stream.)"""
    from test_detect_pipeline import clean_rows, write_clean

    from leaf_ray.detect.pipeline import run_detection

    rows = clean_rows(6)
    gang = {"mode": "sharded", "world_size": 2, "num_cpus": 0.5, "batch_size": 1, "fail_rank_at_batch": 2}
    base = {"student_pool": {"num_cpus": 0.5, "batch_size": 2}, "units_per_part": 2}

    cfg = cfg_factory(detection={**base, "teacher_pool": {**gang, "max_gang_restarts": 1}})
    write_clean(cfg, rows)
    report = run_detection(cfg)
    assert report.units_this_run == len(rows) and report.units_resumed == 0
    _check_complete_and_equal(cfg, rows, tiny_pair, tiny_tokenizer)
