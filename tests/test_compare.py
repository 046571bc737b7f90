"""`compare`: the paper-shaped table built from real MLflow runs (sqlite store), in rich, Markdown and CSV."""

from __future__ import annotations

import csv
import io
import json

import pytest
from typer.testing import CliRunner

from leaf_ray.evaluate.compare import CompareError, RunScores, build_table, compare_experiment

BENCHMARKS = [["gsm8k", "math"], ["math500", "math"], ["humaneval", "code"]]
# variant -> one (gsm8k, math500, humaneval) accuracy triple per run (seed)
RUNS = {
    "teacher": [(0.90, 0.70, 0.80)],
    "pre_kd": [(0.40, 0.20, 0.30)],
    "kd": [(0.50, 0.30, 0.40), (0.60, 0.30, 0.50)],
    "leaf_instr": [(0.60, 0.34, 0.50), (0.64, 0.30, 0.40)],
    "leaf_instr_resp": [(0.58, 0.40, 0.44)],
}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """A sqlite MLflow store holding the runs above plus runs compare must ignore (read-only in the tests)."""
    from mlflow.tracking import MlflowClient

    tmp_path = tmp_path_factory.mktemp("mlflow-compare")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("paper", artifact_location=(tmp_path / "art").as_uri())

    def add(variant, values, status="FINISHED", tags=None):
        run = client.create_run(exp_id, tags={"leaf_ray.variant": variant, **(tags or {})})
        for (name, _), value in zip(BENCHMARKS, values):
            client.log_metric(run.info.run_id, f"eval.{name}.accuracy", value)
        client.log_metric(run.info.run_id, "eval_avg.math.accuracy", 0.99)  # not a benchmark column
        client.set_terminated(run.info.run_id, status=status)

    for variant, runs in RUNS.items():
        for values in runs:
            add(variant, values, tags={"leaf_ray.benchmarks": json.dumps(BENCHMARKS)})
    add("kd", (0.99, 0.99, 0.99), status="FAILED")  # a crashed evaluation
    add("some_ablation", (0.99, 0.99, 0.99))  # not one of the paper's rows
    client.set_terminated(client.create_run(exp_id, tags={"leaf_ray.variant": "kd"}).info.run_id)  # no metrics
    return uri


def test_table_from_mlflow_runs(experiment):
    table = compare_experiment(experiment, "paper")
    assert [c.title for c in table.columns] == ["gsm8k", "math500", "Math Avg", "humaneval", "Code Avg"]
    assert [r.title for r in table.rows] == ["Teacher", "Pre-KD", "KD w/o mask", "LeaF (Instr)",
                                             "LeaF (Instr & Resp)"]
    rows = {r.variant: r for r in table.rows}
    assert [len(r.run_ids) for r in table.rows] == [1, 1, 2, 2, 1]  # FAILED / metric-less runs left out

    kd = rows["kd"].cells
    assert kd["gsm8k"].mean == pytest.approx(0.55) and kd["gsm8k"].std == pytest.approx(0.0707107, abs=1e-6)
    assert kd["math500"].mean == pytest.approx(0.30) and kd["math500"].std == pytest.approx(0.0)
    # Domain average per run, then mean ± std over runs: (0.5+0.3)/2 = 0.40 and (0.6+0.3)/2 = 0.45.
    assert kd["avg:math"].mean == pytest.approx(0.425) and kd["avg:math"].std == pytest.approx(0.0353553, abs=1e-6)
    assert rows["leaf_instr_resp"].cells["avg:math"].mean == pytest.approx(0.49)
    assert rows["leaf_instr_resp"].cells["avg:math"].std is None  # one run: no std
    assert rows["teacher"].cells["avg:code"].mean == pytest.approx(0.80)

    best = {c.key: sorted(r.variant for r in table.rows if r.cells[c.key].best) for c in table.columns}
    # The teacher (highest everywhere) is the reference, not a contender; ties are all marked.
    assert best == {"gsm8k": ["leaf_instr"], "math500": ["leaf_instr_resp"], "avg:math": ["leaf_instr_resp"],
                    "humaneval": ["kd", "leaf_instr"], "avg:code": ["kd", "leaf_instr"]}


def test_markdown_and_csv(experiment):
    table = compare_experiment(experiment, "paper")
    md = table.to_markdown().splitlines()
    assert md[0] == "| Method | gsm8k | math500 | Math Avg | humaneval | Code Avg |"
    assert md[2] == "| Teacher | 90.0 | 70.0 | 80.0 | 80.0 | 80.0 |"
    assert md[4] == "| KD w/o mask (n=2) | 55.0 ± 7.1 | 30.0 ± 0.0 | 42.5 ± 3.5 | **45.0 ± 7.1** | **45.0 ± 7.1** |"
    assert md[5] == ("| LeaF (Instr) (n=2) | **62.0 ± 2.8** | 32.0 ± 2.8 | 47.0 ± 0.0 | **45.0 ± 7.1** | "
                     "**45.0 ± 7.1** |")
    assert md[6] == "| LeaF (Instr & Resp) | 58.0 | **40.0** | **49.0** | 44.0 | 44.0 |"

    rows = list(csv.DictReader(io.StringIO(table.to_csv())))
    assert [r["variant"] for r in rows] == ["teacher", "pre_kd", "kd", "leaf_instr", "leaf_instr_resp"]
    kd = rows[2]
    assert (kd["method"], kd["runs"]) == ("KD w/o mask", "2")
    assert float(kd["gsm8k"]) == pytest.approx(55.0) and float(kd["gsm8k std"]) == pytest.approx(7.0711, abs=1e-3)
    assert kd["best"] == "humaneval;Code Avg"
    assert rows[4]["best"] == "math500;Math Avg" and rows[4]["math500 std"] == ""
    assert rows[0]["best"] == ""


def test_cli_compare_prints_and_writes(experiment, tmp_path, monkeypatch):
    from leaf_ray import cli
    from leaf_ray.cli import app

    # wide enough for every column whatever the worker's terminal (an xdist worker has none)
    monkeypatch.setattr(cli.console, "_width", 200)
    md, out_csv = tmp_path / "out" / "table.md", tmp_path / "out" / "table.csv"
    result = CliRunner().invoke(app, ["compare", "--experiment", "paper", "--set",
                                      f"tracking.tracking_uri={experiment}", "--markdown", str(md),
                                      "--csv", str(out_csv)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "LeaF (Instr & Resp)" in result.output and "62.0 ± 2.8*" in result.output
    table = compare_experiment(experiment, "paper")
    assert md.read_text() == table.to_markdown()
    assert out_csv.read_text() == table.to_csv()

    missing = CliRunner().invoke(app, ["compare", "--experiment", "nope", "--set",
                                       f"tracking.tracking_uri={experiment}"])
    assert missing.exit_code == 1 and "'nope' not found" in missing.output


def test_missing_benchmarks_and_unknown_domains():
    runs = [RunScores("a", "kd", {"gsm8k": 0.5, "math500": 0.3}, [("gsm8k", "math"), ("math500", "math")]),
            RunScores("b", "kd", {"gsm8k": 0.7}, []),
            RunScores("c", "leaf_instr", {"gsm8k": 0.6, "mystery": 0.1}, [])]
    table = build_table(runs, "x")
    assert [c.key for c in table.columns] == ["gsm8k", "math500", "avg:math", "mystery", "avg:other"]
    kd = table.rows[0].cells
    assert kd["gsm8k"].mean == pytest.approx(0.6) and kd["gsm8k"].n == 2
    assert kd["math500"].n == 1
    assert kd["avg:math"].n == 1 and kd["avg:math"].mean == pytest.approx(0.4)  # run b lacks math500
    assert table.rows[1].cells["avg:math"].mean is None  # leaf_instr has no math500 at all
    assert table.rows[1].cells["mystery"].best and not kd["mystery"].best
    with pytest.raises(CompareError, match="no runs"):
        build_table([RunScores("z", "other", {"gsm8k": 1.0}, [])], "x")
