"""Evaluation runner end to end: tiny student, Ray Data generation, math + code scoring, Parquet predictions
and metrics/artifacts in a real sqlite MLflow store."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from leaf_ray.config import BenchmarkRef
from leaf_ray.evaluate.runner import EvaluationError, default_label, instruction_for, run_evaluation

pytestmark = pytest.mark.slow


def _local_gsm8k(path, records, backend, evaluation):
    """A GSM8K-format file whose references are what the model will answer for the even rows (the tiny
    random model solves nothing, so a known accuracy needs references built from its own outputs)."""
    from leaf_ray.evaluate.answers import extract_answer

    completions = backend.generate([instruction_for(r, evaluation) for r in records])
    rows, expected = [], []
    for i, (r, c) in enumerate(zip(records, completions)):
        predicted = extract_answer(c)
        match = predicted is not None and i % 2 == 0
        rows.append({"id": f"q{i}", "question": r["prompt"],
                     "answer": f"worked solution\n#### {predicted if match else '-987654321'}"})
        expected.append(match)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return expected


def test_run_evaluation_logs_metrics_and_predictions(ray_local, cfg_factory, tmp_path):
    from mlflow.tracking import MlflowClient

    from leaf_ray.evaluate.benchmarks import load_benchmark
    from leaf_ray.generate.backends import TransformersBackend
    from leaf_ray.tracking import tracking_uri

    cfg = cfg_factory(
        generation={"backend": "transformers", "max_new_tokens": 24, "pool": {"batch_size": 4, "num_cpus": 0.5}},
        evaluation={"benchmarks": [{"name": "gsm_symbolic", "format": "gsm_symbolic", "limit": 4},
                                   {"name": "gsm8k_local", "format": "gsm8k", "path": str(tmp_path / "g.jsonl")},
                                   {"name": "humaneval", "format": "humaneval", "limit": 2}],
                    "sandbox": {"timeout_s": 5, "workers": 2}},
        tracking={"experiment": "eval-test"},
    )
    symbolic = load_benchmark(cfg.evaluation.benchmarks[0])
    backend = TransformersBackend(cfg.models.student, cfg.generation, cfg.run.seed)
    expected_local = _local_gsm8k(tmp_path / "g.jsonl", symbolic, backend, cfg.evaluation)
    assert any(expected_local), "need at least one row the tiny model answers 'correctly'"

    result = run_evaluation(cfg, cfg.models.student, label="pre_kd")

    by_name = {b.name: b for b in result.benchmarks}
    assert [b.name for b in result.benchmarks] == ["gsm_symbolic", "gsm8k_local", "humaneval"]
    assert (by_name["gsm_symbolic"].n, by_name["gsm8k_local"].n, by_name["humaneval"].n) == (4, 4, 2)
    assert by_name["gsm8k_local"].accuracy == sum(expected_local) / 4
    # Predictions: one row per problem, the completion the model gives for the wrapped instruction.
    local = pq.read_table(cfg.run.dir / "eval" / "pre_kd" / "gsm8k_local.parquet").to_pylist()
    assert [r["correct"] for r in local] == expected_local
    assert [r["completion"] for r in local] == backend.generate([r["instruction"] for r in local])
    assert all(r["instruction"].endswith("within \\boxed{}.") for r in local)
    code = pq.read_table(cfg.run.dir / "eval" / "pre_kd" / "humaneval.parquet").to_pylist()
    assert [r["id"] for r in code] == ["HumanEval/0", "HumanEval/1"]
    assert all(not r["correct"] and r["status"] != "passed" and r["reason"] for r in code)
    assert [r["unisolated"] for r in code] == [False, False]  # judged in namespaces mode (root CI)

    client = MlflowClient(tracking_uri(cfg))
    run = client.get_run(result.run_id)
    assert run.data.tags["leaf_ray.variant"] == "pre_kd" and run.data.tags["leaf_ray.stage"] == "evaluate"
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert metrics["eval.gsm8k_local.accuracy"] == pytest.approx(sum(expected_local) / 4)
    assert metrics["eval.gsm_symbolic.accuracy"] == pytest.approx(by_name["gsm_symbolic"].accuracy)
    assert metrics["eval.gsm_symbolic.n"] == 4
    assert metrics["eval.humaneval.pass_at_1"] == metrics["eval.humaneval.accuracy"] == 0.0
    assert metrics["eval.humaneval.unisolated"] == 0.0
    assert json.loads(run.data.tags["leaf_ray.benchmarks"]) == [
        ["gsm_symbolic", "math"], ["gsm8k_local", "math"], ["humaneval", "code"]]
    artifacts = sorted(a.path for a in client.list_artifacts(result.run_id, "eval/pre_kd"))
    assert artifacts == ["eval/pre_kd/gsm8k_local.parquet", "eval/pre_kd/gsm_symbolic.parquet",
                         "eval/pre_kd/humaneval.parquet"]
    downloaded = client.download_artifacts(result.run_id, "eval/pre_kd/gsm8k_local.parquet", str(tmp_path))
    assert pq.read_table(downloaded).to_pylist() == local

    # On an existing run (e.g. the distillation run): metrics land there, its own variant tag is kept.
    exp = client.get_experiment_by_name("eval-test")
    distill_run = client.create_run(exp.experiment_id, tags={"leaf_ray.variant": "kd"}).info.run_id
    client.set_terminated(distill_run)
    cfg_one = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(
        update={"benchmarks": [BenchmarkRef(name="gsm8k_local", format="gsm8k", path=str(tmp_path / "g.jsonl"))]})})
    again = run_evaluation(cfg_one, cfg.models.student, label="kd", mlflow_run_id=distill_run)
    assert again.run_id == distill_run
    run = client.get_run(distill_run)
    assert run.data.tags["leaf_ray.variant"] == "kd"
    assert run.data.metrics["eval.gsm8k_local.accuracy"] == pytest.approx(sum(expected_local) / 4)
    assert [a.path for a in client.list_artifacts(distill_run, "eval/kd")] == ["eval/kd/gsm8k_local.parquet"]


def test_bad_benchmark_names_and_labels_are_refused_before_generation(cfg_factory):
    cfg = cfg_factory(evaluation={"benchmarks": [{"name": "HumanEval+", "format": "humaneval", "limit": 1}]})
    with pytest.raises(EvaluationError, match="HumanEval\\+"):
        run_evaluation(cfg, cfg.models.student, label="kd")
    cfg = cfg_factory(evaluation={"benchmarks": [{"name": "a", "limit": 1}, {"name": "a", "limit": 1}]})
    with pytest.raises(EvaluationError, match="duplicate"):
        run_evaluation(cfg, cfg.models.student, label="kd")


def test_default_label_names_teacher_and_student(cfg_factory):
    cfg = cfg_factory()
    assert default_label(cfg, cfg.models.teacher.path) == "teacher"
    assert default_label(cfg, cfg.models.student.path) == "pre_kd"
    assert default_label(cfg, "/some/where/ckpt-best") == "ckpt-best"
