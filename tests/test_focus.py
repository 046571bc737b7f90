"""The focus benchmark's parts: task generator, detection P/R/F1 + random baseline, task files, prepare smoke."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from leaf_ray.analysis.detection_quality import (
    PRF,
    confusion,
    detection_quality,
    ground_truth_mask,
    random_baseline,
)
from leaf_ray.experiments.focus.task import (
    DISTRACTOR_TEMPLATES,
    clean_view,
    make_problem,
    make_split,
    make_task,
    write_gsm8k_jsonl,
)

REPO = Path(__file__).resolve().parents[1]
DISTRACTOR_RES = [re.compile("^" + re.escape(t).replace(r"\{other\}", "[A-Z][a-z]+").replace(r"\{n\}", r"\d+")
                             .replace(r"\{obj2\}", "[a-z]+") + "$") for t in DISTRACTOR_TEMPLATES]


# --------------------------------------------------------------------------- task


def test_distractor_spans_are_exact():
    rng = random.Random(3)
    for i in range(300):
        p = make_problem(rng, i, "t", num_distractors=i % 3, max_number=20)
        assert len(p.distractor_spans) == i % 3
        text = p.instruction
        pieces = []
        for start, end in p.distractor_spans:
            sentence = text[start:end]
            assert any(r.match(sentence) for r in DISTRACTOR_RES), sentence
            assert start == 0 or text[start - 1] == " "
            assert end == len(text) or text[end] == " "
            pieces.append((start, end))
        # removing each span and its following space gives the clean problem back
        kept, cursor = [], 0
        for start, end in pieces:
            kept.append(text[cursor:start])
            cursor = end + 1
        kept.append(text[cursor:])
        assert "".join(kept) == p.clean_instruction
        assert p.clean_instruction.endswith("have now?") and p.instruction.endswith("have now?")
        a, op, b, _, ans = p.output.split("\n\n")[0].split()
        assert int(ans) == (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(p.answer)
        assert p.output.endswith(f"\\boxed{{{p.answer}}}.")


def test_splits_seeded_disjoint_and_test_has_distractors():
    sizes = {"prepare": 300, "train": 60, "validation": 30, "test": 80}
    task = make_task(sizes, seed=5, max_number=10)
    assert {k: len(v) for k, v in task.items()} == sizes
    assert task == make_task(sizes, seed=5, max_number=10)
    assert task["test"] != make_task(sizes, seed=6, max_number=10)["test"]
    clean = {split: {r["clean_instruction"] for r in rows} for split, rows in task.items()}
    splits = list(clean)
    for i, a in enumerate(splits):
        for b in splits[i + 1:]:
            assert not clean[a] & clean[b], (a, b)
    assert {len(r["distractor_spans"]) for r in task["test"]} == {1, 2}
    assert {len(r["distractor_spans"]) for r in task["validation"]} == {1, 2}
    assert {len(r["distractor_spans"]) for r in task["train"]} == {0, 1, 2}
    numbers = [int(n) for r in task["test"] for n in re.findall(r"\d+", r["instruction"])]
    assert max(numbers) <= 10
    with pytest.raises(ValueError, match="unknown split"):
        make_task({"dev": 3})


def test_clean_view_and_gsm8k_layout_load_as_a_benchmark(tmp_path):
    from leaf_ray.config import BenchmarkRef
    from leaf_ray.evaluate.benchmarks import load_benchmark

    rows = make_split(12, seed=1, prefix="x", distractor_counts=(1, 2))
    clean = clean_view(rows)
    assert all(c["instruction"] == r["clean_instruction"] and c["distractor_spans"] == [] for c, r in zip(clean, rows))
    path = write_gsm8k_jsonl(rows, tmp_path / "t.jsonl")
    records = load_benchmark(BenchmarkRef(name="focus_test", kind="math", format="gsm8k", path=str(path)))
    assert [r["prompt"] for r in records] == [r["instruction"] for r in rows]
    assert [r["reference"] for r in records] == [r["answer"] for r in rows]


# --------------------------------------------------------------------------- detection quality


def test_ground_truth_mask_by_character_overlap():
    text = "Ann has 3 pens. Bob is 9. How many?"
    tokens = ["Ann", " has", " 3", " pens", ".", " Bob", " is", " 9", ".", " How", " many", "?"]
    offsets, at = [], 0
    for t in tokens:
        offsets.append((at, at + len(t)))
        at += len(t)
    span = [text.index("Bob"), text.index("9.") + 2]
    assert text[span[0]:span[1]] == "Bob is 9."
    mask = ground_truth_mask(offsets, [span])
    assert [t for t, m in zip(tokens, mask) if m] == [" Bob", " is", " 9", "."]
    assert ground_truth_mask([(3, 3)], [[0, 10]]) == [False]  # an empty token overlaps nothing


def test_precision_recall_f1_on_hand_made_masks():
    predicted = [True, True, False, False, True, False]
    truth = [True, False, True, False, True, False]
    c = confusion(predicted, truth)
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 1, 1, 2)
    assert c.precision == pytest.approx(2 / 3) and c.recall == pytest.approx(2 / 3) and c.f1 == pytest.approx(2 / 3)
    assert c.base_rate == pytest.approx(0.5) and c.selection_rate == pytest.approx(0.5)
    none = confusion([False] * 3, [True, False, False])
    assert none.precision is None and none.recall == 0.0 and none.f1 is None
    with pytest.raises(ValueError, match="2 tokens, ground truth 3"):
        confusion([True] * 2, [True] * 3)


def test_random_baseline_formula_and_simulation():
    base_rate, selection_rate = 0.2, 0.1
    expected = random_baseline(base_rate, selection_rate)
    assert expected.precision == pytest.approx(0.2) and expected.recall == pytest.approx(0.1)
    assert expected.f1 == pytest.approx(2 * 0.2 * 0.1 / 0.3)
    # Monte Carlo: pick each token with probability s, ignoring content.
    rng = random.Random(0)
    n = 200_000
    truth = [rng.random() < base_rate for _ in range(n)]
    picked = [rng.random() < selection_rate for _ in range(n)]
    sim = confusion(picked, truth)
    assert sim.precision == pytest.approx(base_rate, abs=0.01)
    assert sim.recall == pytest.approx(selection_rate, abs=0.01)
    assert sim.f1 == pytest.approx(expected.f1, abs=0.01)
    assert random_baseline(None, 0.1).precision is None


def test_detection_quality_over_scores_rows():
    rows = [
        {"sample_id": "a", "scope": "instruction", "token_char_offsets": [(0, 3), (3, 7), (7, 10)],
         "confounder_mask": [False, True, False]},
        {"sample_id": "b", "scope": "instruction", "token_char_offsets": [(0, 2), (2, 4)],
         "confounder_mask": [True, False]},
        {"sample_id": "a", "scope": "response:1", "token_char_offsets": [(0, 1)], "confounder_mask": [True]},
    ]
    truth = {"a": [[3, 10]], "b": []}
    q = detection_quality(rows, truth)
    assert q.samples == 2
    assert (q.counts.tp, q.counts.fp, q.counts.fn, q.counts.tn) == (1, 1, 1, 2)
    assert (q.distractors, q.distractors_hit) == (1, 1)
    assert q.random.precision == pytest.approx(2 / 5) and q.random.recall == pytest.approx(2 / 5)
    assert q.to_dict()["f1"] == pytest.approx(0.5)
    with pytest.raises(KeyError, match="'b'"):
        detection_quality(rows, {"a": []})
    assert PRF(0, 0, 0, 0).base_rate is None


# --------------------------------------------------------------------------- prepare (tiny smoke) and bench wiring


def test_prepare_smoke_models_load_back_and_generate(tmp_path):
    from leaf_ray.config import ModelRef, config_from_dict
    from leaf_ray.experiments.focus.prepare import greedy_answers, prepare_models
    from leaf_ray.models import load_model, load_tokenizer

    tiny = {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 1,
            "num_key_value_heads": 1}
    cfg = config_from_dict({"bench": {"focus": {
        "sizes": {"prepare": 64, "train": 8, "validation": 8, "test": 8},
        "prepare": {"steps": 3, "batch_size": 8, "teacher": {**tiny, "hidden_size": 128, "num_attention_heads": 2},
                    "student": tiny, "check_size": 4, "torch_threads": 1}}}}, "test")
    prepared = prepare_models(cfg.bench.focus, tmp_path / "models")
    assert not prepared.cached
    info = prepared.info
    assert info["teacher"]["parameters"] > info["student"]["parameters"]
    assert len(info["teacher"]["sizes"]) == 5 and info["vocab"] <= 512
    for role in ("teacher", "student"):
        assert 0.0 <= info[role]["accuracy_distractors"] <= 1.0 and info[role]["validation_rows"] == 4
    ref_t, ref_s = ModelRef(path=str(prepared.teacher)), ModelRef(path=str(prepared.student))
    assert load_tokenizer(ref_t).get_vocab() == load_tokenizer(ref_s).get_vocab()
    assert load_model(ref_t).config.num_hidden_layers == 1 and load_model(ref_s).config.hidden_size == 64
    out = greedy_answers(prepared.student, ["Ann has 3 pens. How many pens does Ann have now?"], max_new_tokens=4)
    assert len(out) == 1 and isinstance(out[0], str)
    again = prepare_models(cfg.bench.focus, tmp_path / "models")
    assert again.cached and again.info == info


def test_prepared_models_are_cached_for_the_machine_and_reused_by_another_run_directory(tmp_path, monkeypatch):
    """bench.focus.models_cache: what one run directory trained is put there whole under its key; another run
    directory with the same recipe copies it instead of training; another recipe trains (and is cached)."""
    from leaf_ray.config import config_from_dict
    from leaf_ray.experiments.focus import prepare as focus_prepare

    tiny = {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 1,
            "num_key_value_heads": 1}
    focus = config_from_dict({"bench": {"focus": {
        "models_cache": str(tmp_path / "cache"), "sizes": {"prepare": 32, "train": 8, "validation": 4, "test": 4},
        "prepare": {"steps": 2, "batch_size": 8, "teacher": tiny, "student": tiny, "check_size": 2,
                    "torch_threads": 1}}}}, "test").bench.focus
    first = focus_prepare.prepare_models(focus, tmp_path / "run-a" / "models")
    key = focus_prepare.prepare_key(focus)
    assert not first.cached and sorted(p.name for p in (tmp_path / "cache").iterdir()) == [key]
    assert json.loads((tmp_path / "cache" / key / "prepare.json").read_text()) == first.info

    def no_training(*args, **kwargs):
        raise AssertionError("the cached models must be copied, not trained again")

    monkeypatch.setattr(focus_prepare, "train_response_lm", no_training)
    second = focus_prepare.prepare_models(focus, tmp_path / "run-b" / "models")
    assert second.cached and second.info == first.info
    for role in ("teacher", "student"):
        a = (tmp_path / "run-a" / "models" / role / "model.safetensors").read_bytes()
        assert (tmp_path / "run-b" / "models" / role / "model.safetensors").read_bytes() == a
    other = focus.model_copy(deep=True)
    other.prepare.seed = 5
    with pytest.raises(AssertionError, match="copied, not trained again"):
        focus_prepare.prepare_models(other, tmp_path / "run-c" / "models")


def test_the_shipped_demo_models_are_the_demo_recipe_and_are_taken_whole(tmp_path):
    """`make demo` starts from the shipped prepared models: they must be the ones configs/demo.yaml asks for
    (else the demo would silently train others), and they are copied whole into the run directory."""
    from leaf_ray.config import ModelRef, load_config
    from leaf_ray.experiments.focus.prepare import SHIPPED_DIR, prepare_key, prepare_models
    from leaf_ray.models import load_model

    focus = load_config(REPO / "configs" / "demo.yaml").bench.focus
    info = json.loads((SHIPPED_DIR / "prepare.json").read_text())
    assert info["key"] == prepare_key(focus)
    assert info["teacher"]["accuracy_distractors"] > info["student"]["accuracy_distractors"]
    prepared = prepare_models(focus, tmp_path / "models")  # would train for minutes if it did not copy
    assert prepared.cached and prepared.info == info
    assert not (tmp_path / "models.tmp").exists()
    model = load_model(ModelRef(path=str(prepared.teacher)))
    assert sum(p.numel() for p in model.parameters()) == info["teacher"]["parameters"]


def test_bench_config_points_the_stages_at_the_task(tmp_path):
    from leaf_ray.config import config_from_dict
    from leaf_ray.experiments.focus.run import TEST, TEST_CLEAN, bench_config, seed_config, write_task

    cfg = config_from_dict({"run": {"name": "bf", "root_dir": str(tmp_path)}, "bench": {"focus": {
        "sizes": {"prepare": 10, "train": 6, "validation": 4, "test": 5}}}}, "test")
    root = cfg.run.dir.resolve()
    files = write_task(cfg, root / "task")
    assert sorted(files) == sorted(["prepare", "train", "validation", "test", TEST, TEST_CLEAN])
    base = bench_config(cfg, root, files)
    assert base.data.paths == [str(files["train"])]
    assert [b.name for b in base.evaluation.benchmarks] == [TEST, TEST_CLEAN]
    assert base.tracking.tracking_uri == f"sqlite:///{root / 'mlflow.db'}"
    assert base.models.student.path == str(root / "models" / "student")
    seed = seed_config(base, root, 2)
    assert seed.run.dir == root / "seed-2" and seed.run.seed == 2
    assert (root / "seed-2" / "data").is_symlink() and (root / "seed-2" / "data").resolve() == root / "data"
