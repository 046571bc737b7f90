"""Generation: the transformers backend on the tiny pair, the Ray Data actor pool, teacher-response filtering
and the correctness check used by Stage 1 selection/verification."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from leaf_ray.config import GenerationConfig, ModelRef
from leaf_ray.data.demo_corpus import generate_problems
from leaf_ray.generate.backends import (
    GenerationError,
    TransformersBackend,
    cut_at_stop,
    prompt_token_ids,
    resolve_backend,
    vllm_available,
)

PROMPTS = [p["instruction"] for p in generate_problems(3, seed=7)]


@pytest.fixture(scope="module")
def teacher_backend(tiny_pair):
    return TransformersBackend(ModelRef(path=tiny_pair["teacher"]), GenerationConfig(max_new_tokens=16))


def test_cut_at_stop_takes_the_earliest_stop():
    assert cut_at_stop("a STOP b END c", ["END", "STOP"]) == "a "
    assert cut_at_stop("nothing here", ["X"]) == "nothing here"
    assert cut_at_stop("abc", []) == "abc"


def test_greedy_is_deterministic_and_batch_equals_single(teacher_backend):
    batch = teacher_backend.generate(PROMPTS)
    assert len(batch) == len(PROMPTS) and all(isinstance(t, str) and t for t in batch)
    assert teacher_backend.generate(PROMPTS) == batch
    # Left padding must not change anything: each prompt alone gives the same text as in the batch.
    assert [teacher_backend.generate([p])[0] for p in PROMPTS] == batch
    # New tokens only: no prompt echo, no special tokens.
    assert not any("<|im_start|>" in t or "<|im_end|>" in t or PROMPTS[0] in t for t in batch)


def test_stop_string_cuts_output_before_it(teacher_backend):
    full = teacher_backend.generate(PROMPTS[:1], max_new_tokens=24)[0]
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip(), f"pick a visible stop string from {full!r}"
    expected = full[:full.find(stop)]
    assert teacher_backend.generate(PROMPTS[:1], max_new_tokens=24, stop=[stop]) == [expected]
    # From the config as well.
    backend = TransformersBackend(teacher_backend.model_ref, GenerationConfig(max_new_tokens=24, stop=[stop]))
    assert backend.generate(PROMPTS[:1]) == [expected]


def test_prompt_ids_use_the_chat_template_and_the_prefix(tiny_tokenizer):
    from leaf_ray.data.chat import render_prompt

    ids = prompt_token_ids(tiny_tokenizer, ["What is 2+2?"], ["Step 1: "])[0]
    expected = render_prompt(tiny_tokenizer, "What is 2+2?") + "Step 1: "
    assert tiny_tokenizer.decode(ids) == expected
    assert expected.startswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(GenerationError, match="prompt 0"):
        prompt_token_ids(tiny_tokenizer, [""], None)


def test_chat_template_from_config_overrides_the_tokenizer(tiny_pair):
    template = "{% for m in messages %}Q: {{ m['content'] }}\nA:{% endfor %}"
    backend = TransformersBackend(ModelRef(path=tiny_pair["student"]),
                                  GenerationConfig(max_new_tokens=4, chat_template=template))
    ids = prompt_token_ids(backend.tokenizer, ["hi there"], None)[0]
    assert backend.tokenizer.decode(ids) == "Q: hi there\nA:"


def test_backend_resolution():
    assert resolve_backend("transformers") == "transformers"
    assert resolve_backend("auto") in ("transformers", "vllm")
    if not vllm_available():
        assert resolve_backend("auto") == "transformers"
        with pytest.raises(GenerationError, match="generation.backend is 'vllm'"):
            resolve_backend("vllm")


@pytest.mark.slow
def test_generate_dataset_actor_pool_matches_backend(ray_local, cfg_factory, teacher_backend):
    import ray.data

    from leaf_ray.generate.pipeline import generate_dataset, generate_rows

    cfg = cfg_factory(generation={"backend": "transformers", "max_new_tokens": 16,
                                  "pool": {"batch_size": 2, "min_actors": 1, "max_actors": 2, "num_cpus": 0.5}})
    items = [{"k": i, "instruction": p, "keep": f"x{i}"} for i, p in enumerate(PROMPTS)]
    out = ray.data.from_items(items)
    out = generate_dataset(cfg, cfg.models.teacher, out, "instruction", "response").take_all()
    expected = dict(zip(PROMPTS, teacher_backend.generate(PROMPTS)))
    assert sorted(r["k"] for r in out) == [0, 1, 2]
    for r in out:
        assert r["response"] == expected[r["instruction"]]
        assert r["keep"] == f"x{r['k']}"
    # The list helper returns completions in input order.
    assert generate_rows(cfg, cfg.models.teacher, PROMPTS[::-1]) == [expected[p] for p in PROMPTS[::-1]]


def test_a_small_prompt_list_is_generated_in_process_with_the_pool_s_completions(cfg_factory, teacher_backend,
                                                                                 no_ray):
    """generation.inline_max_prompts: the same UDF batch by batch in this process (no Ray at all), the same
    completions in input order, prefixes included; one prompt over the limit goes to the pool."""
    from leaf_ray.generate.pipeline import generate_rows

    cfg = cfg_factory(generation={"backend": "transformers", "max_new_tokens": 16, "inline_max_prompts": 3,
                                  "pool": {"batch_size": 2}})
    prompts = PROMPTS[::-1]
    assert generate_rows(cfg, cfg.models.teacher, prompts) == teacher_backend.generate(prompts)
    prefixes = ["The answer", "", "Step 1:"]
    assert generate_rows(cfg, cfg.models.teacher, prompts, prefixes) == teacher_backend.generate(
        prompts, prefixes=prefixes)
    with pytest.raises(AssertionError, match="must not start or use Ray"):
        generate_rows(cfg, cfg.models.teacher, prompts + PROMPTS[:1])


def _clean_rows(problems, answers):
    return [{"sample_id": f"s{i}", "instruction": p["instruction"], "output": p["output"], "answer": a,
             "split": "train", "source": "corpus.jsonl", "row": i + 1, "topic": f"t{i}"}
            for i, (p, a) in enumerate(zip(problems, answers))]


def check_rows(cfg, model_ref, rows: list[dict]) -> list[tuple[str, object]]:
    """Generate for each row (`instruction`, optional `response_prefix`) and judge prefix + completion
    against the row's reference: math rows by final answer, rows with `kind: code` by running their tests
    (what selection and verification do, row by row). Returns (completion, verdict) per row, in order."""
    from leaf_ray.evaluate.judge import judge, judge_code, reference_answer
    from leaf_ray.generate.pipeline import generate_rows

    prefixes = [r.get("response_prefix") or "" for r in rows]
    completions = generate_rows(cfg, model_ref, [r["instruction"] for r in rows],
                                prefixes if any(prefixes) else None)
    # The final answer may sit in the continuation only; judge the whole response.
    return [(c, judge_code(r, p + c, cfg.evaluation) if r.get("kind") == "code"
             else judge(p + c, reference_answer(r))) for c, p, r in zip(completions, prefixes, rows)]


@pytest.mark.slow
def test_teacher_responses_keep_exactly_the_rows_whose_answer_matches(ray_local, cfg_factory, tiny_pair):
    from leaf_ray.evaluate.answers import extract_answer
    from leaf_ray.evaluate.judge import ANSWER_MISMATCH, NO_REFERENCE
    from leaf_ray.evaluate.teacher_responses import generate_teacher_responses

    cfg = cfg_factory(generation={"backend": "transformers", "max_new_tokens": 24,
                                  "pool": {"batch_size": 4, "num_cpus": 0.5}})
    problems = generate_problems(8, seed=11)
    backend = TransformersBackend(cfg.models.teacher, cfg.generation, cfg.run.seed)
    generated = backend.generate([p["instruction"] for p in problems])
    predicted = [extract_answer(g) for g in generated]
    # The tiny random teacher solves nothing; set references from what it will say so that some rows match.
    answers = []
    for i, pred in enumerate(predicted):
        answers.append(pred if (pred is not None and i % 2 == 0) else "-987654321")
    matching = {f"s{i}" for i, pred in enumerate(predicted) if pred is not None and i % 2 == 0}
    assert matching and len(matching) < len(problems), f"need a mix of matches, got predictions {predicted}"
    rows = _clean_rows(problems, answers)
    # One row with no answer and a reference output without any final answer: nothing to check against.
    rows.append({**rows[1], "sample_id": "s-noref", "answer": None, "output": "no final answer given", "row": 99})
    clean = cfg.run.dir / "data" / "clean"
    clean.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), clean / "part-0.parquet")

    report = generate_teacher_responses(cfg)
    kept = pq.read_table(cfg.run.dir / "generate" / "teacher_responses")
    assert kept.column_names == pa.Table.from_pylist(rows).column_names  # data/clean's schema
    by_id = {r["sample_id"]: r for r in kept.to_pylist()}
    assert set(by_id) == matching
    for i, g in enumerate(generated):
        if f"s{i}" in by_id:
            assert by_id[f"s{i}"]["output"] == g  # the teacher's response replaces the reference output
            assert by_id[f"s{i}"]["topic"] == f"t{i}"
    quarantine = pq.read_table(cfg.run.dir / "generate" / "quarantine").to_pylist()
    reasons = {json.loads(q["raw"])["sample_id"]: q["reason"] for q in quarantine}
    assert reasons == {**{f"s{i}": ANSWER_MISMATCH for i in range(len(problems)) if f"s{i}" not in matching},
                       "s-noref": NO_REFERENCE}
    assert {q["source"] for q in quarantine} == {"corpus.jsonl"}
    assert (report.total, report.kept) == (len(rows), len(matching))
    assert report.rejected == {ANSWER_MISMATCH: len(problems) - len(matching), NO_REFERENCE: 1}

    # The same verdicts from generating and judging the rows one by one.
    verdicts = [v.correct for _, v in check_rows(cfg, cfg.models.teacher, rows)]
    assert verdicts == [r["sample_id"] in matching for r in rows]


@pytest.mark.slow
def test_judging_with_response_prefix_and_code_rows(ray_local, cfg_factory):
    """Verification continues after a response prefix and judges prefix + continuation: a prefix that
    already holds the answer (or a passing program) makes the row correct whatever the tiny model adds."""
    cfg = cfg_factory(generation={"backend": "transformers", "max_new_tokens": 8, "pool": {"num_cpus": 0.5}},
                      evaluation={"sandbox": {"timeout_s": 10}})
    prints = {"format": "livecodebench", "tests": [{"input": "", "output": "ok", "testtype": "stdin"}],
              "func_name": None}
    rows = [
        {"sample_id": "m-right", "instruction": PROMPTS[0], "answer": "41",
         "response_prefix": "Adding up gives \\boxed{41}.\n\n"},
        {"sample_id": "m-wrong", "instruction": PROMPTS[0], "answer": "42",
         "response_prefix": "Adding up gives \\boxed{41}.\n\n"},
        {"sample_id": "c-pass", "instruction": "Print ok.", "kind": "code", "reference": prints,
         "response_prefix": "```python\nprint('ok')\n```\n"},
        {"sample_id": "c-fail", "instruction": "Print ok.", "kind": "code", "reference": prints,
         "response_prefix": "```python\nprint('no')\n```\n"},
        {"sample_id": "c-noref", "instruction": "Print ok.", "kind": "code",
         "response_prefix": "```python\nprint('ok')\n```\n"},
    ]
    verdicts = [v for _, v in check_rows(cfg, cfg.models.student, rows)]
    assert [v.correct for v in verdicts] == [True, False, True, False, False]
    assert verdicts[1].predicted == "41" and verdicts[1].reason == "answer mismatch"
    assert "wrong output" in verdicts[3].reason and verdicts[4].reason == "no reference answer"
