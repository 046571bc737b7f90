"""`leaf_ray.experiments.focus.report`: report.html from a small fake focus run directory (stage markers, scores,
heatmap, MLflow loss history), its sections and numbers; `leaf-ray report --run DIR`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from leaf_ray.analysis.detection_quality import detection_quality
from leaf_ray.detect.schema import SCORES_SCHEMA
from leaf_ray.experiments.focus.report import (
    ReportError,
    build_report,
    delta_values,
    truth_spans,
    write_run_report,
)


def _scores_rows() -> tuple[list[dict], dict[str, list[list[int]]]]:
    """Two instruction rows: tokens 'Tom has 3. ' 'Sky is 7. ' 'Add 2.' — the middle one a distractor."""
    truth = {"s1": [[7, 14]], "s2": []}
    rows = []
    for sid, delta, mask in (("s1", [0.9, 0.0, 1.0], [False, True, False]), ("s2", [0.5, 0.8, 0.0], [False, False, True])):
        rows.append({"sample_id": sid, "scope": "instruction", "token_texts": ["Tom 3. ", "Sky 7. ", "Add 2."],
                     "token_char_offsets": [[0, 7], [7, 14], [14, 20]], "student_grad_norm": [1.0, 2.0, 3.0],
                     "teacher_grad_norm": [1.0, 1.0, 1.0], "delta": delta, "threshold": 0.1,
                     "confounder_mask": mask, "spans": [[mask.index(True), mask.index(True) + 1]],
                     "student_loss": 1.0, "teacher_loss": 0.5})
    return rows, truth


def _fake_run(root: Path, *, with_mlflow: bool = True) -> Path:
    stages = root / "_stages"
    stages.mkdir(parents=True)
    rows, truth = _scores_rows()
    (root / "detect" / "scores").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCORES_SCHEMA), root / "detect" / "scores" / "part-0.parquet")
    (root / "task").mkdir()
    (root / "task" / "train.jsonl").write_text(
        "\n".join(json.dumps({"id": sid, "distractor_spans": spans}) for sid, spans in truth.items()) + "\n")
    quality = [detection_quality(rows, truth, "all samples").to_dict()]
    (stages / "detection-quality.json").write_text(json.dumps({"rows": quality, "seconds": 1.0}))
    att = {"mass": 0.1, "uniform": 0.2}
    (stages / "evaluate-teacher.json").write_text(json.dumps(
        {"accuracy": {"focus_test": 0.773, "focus_test_clean": 0.997}, "attention": {**att, "mass": 0.089}}))
    (stages / "evaluate-pre_kd.json").write_text(json.dumps(
        {"accuracy": {"focus_test": 0.323, "focus_test_clean": 1.0}, "attention": att}))
    run_ids = {}
    if with_mlflow:
        import mlflow
        from mlflow.tracking import MlflowClient

        uri = f"sqlite:///{root / 'mlflow.db'}"
        client = MlflowClient(uri)
        exp = client.create_experiment("report-test", artifact_location=(root / "mlartifacts").as_uri())
        for variant in ("kd", "leaf_instr"):
            run_id = client.create_run(exp).info.run_id
            for step in range(1, 5):
                client.log_metric(run_id, "loss", 2.0 / step, step=step)
            client.log_metric(run_id, "val_loss", 1.5, step=4)
            client.set_terminated(run_id)
            run_ids[variant] = run_id
        del mlflow
    for variant, acc, steps in (("kd", 0.299, 33), ("leaf_instr", 0.39, 123)):
        (stages / f"seed-0-{variant}.json").write_text(json.dumps(
            {"accuracy": {"focus_test": acc, "focus_test_clean": 0.95}, "attention": att, "steps": steps,
             "run_id": run_ids.get(variant)}))
    heatmaps = root / "detect" / "heatmaps"
    heatmaps.mkdir(parents=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1))
    fig.savefig(heatmaps / "s1.instruction.png")
    plt.close(fig)
    return root


def test_report_from_a_focus_run_directory(tmp_path):
    root = _fake_run(tmp_path / "focus-demo")
    text = build_report(root)
    # comparison: every variant's row with its numbers, through the focus bench's own table
    for needle in ("Comparison", "Teacher", "Pre-KD", "KD w/o mask", "LeaF (Instr)", "77.3", "32.3", "29.9",
                   "39.0", "123"):
        assert needle in text, needle
    # detection quality against the ground truth, next to random (1 of 2 flagged tokens is a distractor)
    assert "Detection quality" in text and "random P" in text and "50.0" in text
    assert "1/1" in text  # distractors hit
    # heatmap, Δ histogram and loss curves are embedded images: the page stands alone
    assert "Sample heatmaps" in text and "s1.instruction" in text
    assert "Δ distribution" in text and "Loss curves" in text
    values = delta_values(root, truth_spans(root))  # the histogram's data: Δ split by the ground truth, τ
    assert values["distractor"] == [0.0] and sorted(values["other"]) == pytest.approx([0.0, 0.5, 0.8, 0.9, 1.0])
    assert values["tau"] == pytest.approx([0.1, 0.1])
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == 3, len(images)
    assert 'src="http' not in text and "<script" not in text


def test_report_sections_follow_what_the_run_holds(tmp_path):
    root = _fake_run(tmp_path / "run", with_mlflow=False)
    text = build_report(root)
    assert "Comparison" in text and "Loss curves" not in text  # no MLflow store: no curves, the rest stands
    with pytest.raises(ReportError, match="nothing to report"):
        (tmp_path / "empty").mkdir()
        build_report(tmp_path / "empty")
    with pytest.raises(ReportError, match="no run directory"):
        build_report(tmp_path / "missing")


def test_report_of_a_chain_run_uses_its_comparison_table(tmp_path):
    root = tmp_path / "smoke"
    (root / "_stages").mkdir(parents=True)
    (root / "comparison.md").write_text("| Method | gsm_symbolic |\n|---|---:|\n| Pre-KD | 0.0 |\n")
    text = build_report(root)
    assert "<td>Pre-KD</td>" in text and "gsm_symbolic" in text


def test_report_cli_writes_the_file(tmp_path):
    from leaf_ray.cli import app

    root = _fake_run(tmp_path / "focus-demo", with_mlflow=False)
    result = CliRunner().invoke(app, ["--verbose", "report", "--run", str(root)])
    assert result.exit_code == 0, result.output
    assert (root / "report.html").is_file() and "report.html" in result.output
    assert write_run_report(root, out=tmp_path / "other.html") == tmp_path / "other.html"
    missing = CliRunner().invoke(app, ["--verbose", "report", "--run", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "no run directory" in missing.output
