"""Token heatmaps (HTML, PNG), `leaf-ray inspect`, and MLflow artifact logging, on hand-written Parquet."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from leaf_ray.analysis.heatmap import heatmap_html, heatmap_png, log_heatmaps, read_sample, token_cells

INSTRUCTION = "Ann has 3 pens. Bob is 9 years old. How many pens does Ann have?"
TOKENS = ["Ann", " has", " 3", " pens", ".", " Bob", " is", " 9", " years", " old", ".", " How", " many", " pens",
          " does", " Ann", " have", "?"]
DISTRACTOR = [INSTRUCTION.index("Bob"), INSTRUCTION.index("old.") + 4]


def offsets_of(tokens):
    out, at = [], 0
    for t in tokens:
        out.append([at, at + len(t)])
        at += len(t)
    assert "".join(tokens) == INSTRUCTION
    return out


def scores_row(sample_id="s1"):
    offsets = offsets_of(TOKENS)
    delta = [0.9] * len(TOKENS)
    for i in (5, 7, 8):  # " Bob", " 9", " years"
        delta[i] = 0.05
    mask = [d <= 0.1 for d in delta]
    return {"sample_id": sample_id, "scope": "instruction", "token_texts": TOKENS, "token_char_offsets": offsets,
            "student_grad_norm": [1.0] * len(TOKENS), "teacher_grad_norm": [1.0] * len(TOKENS), "delta": delta,
            "threshold": 0.1, "confounder_mask": mask, "spans": [[5, 6], [7, 9]], "student_loss": 1.0,
            "teacher_loss": 0.5}


def counterfactuals(sample_id="s1"):
    row = scores_row(sample_id)
    out = []
    for k, (first, last) in enumerate(row["spans"]):
        a, b = row["token_char_offsets"][first][0], row["token_char_offsets"][last - 1][1]
        out.append({"sample_id": sample_id, "scope": "instruction", "span_index": k, "char_start": a, "char_end": b,
                    "removed_text": INSTRUCTION[a:b], "instruction": INSTRUCTION[:a] + INSTRUCTION[b:],
                    "response_prefix": "", "output": "3\n\nThe answer is \\boxed{3}.", "split": "train"})
    return out


@pytest.fixture
def run_dir(tmp_path):
    from leaf_ray.detect.schema import COUNTERFACTUALS_SCHEMA, SCORES_SCHEMA

    root = tmp_path / "run"
    (root / "detect" / "scores").mkdir(parents=True)
    (root / "detect" / "counterfactuals").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([scores_row("s1"), scores_row("s2")], schema=SCORES_SCHEMA),
                   root / "detect" / "scores" / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(counterfactuals("s1") + counterfactuals("s2"), schema=COUNTERFACTUALS_SCHEMA),
                   root / "detect" / "counterfactuals" / "part-0.parquet")
    return root


def test_cells_mark_spans_and_truth():
    cells = token_cells(scores_row(), [DISTRACTOR])
    assert [c.span for c in cells][4:10] == [None, 0, None, 1, 1, None]
    assert [c.index for c in cells if c.truth] == [5, 6, 7, 8, 9, 10]
    with pytest.raises(ValueError, match="differ in length"):
        token_cells({**scores_row(), "delta": [0.5]})


def test_html_has_tokens_outlines_and_counterfactuals():
    page = heatmap_html(scores_row(), counterfactuals(), [DISTRACTOR])
    for token in ("Ann", " has", " pens", " years"):
        assert f">{token}</span>" in page
    assert page.count('class="confounder-span"') == 2
    assert page.count("outline:2px solid") == 2
    # span 1 wraps exactly " 9" and " years"
    span1 = page.split('data-span="1"')[1].split("</span></span>")[0]
    assert ">9<" not in span1 and "> 9</span>" in span1 and "> years" in span1
    assert page.count('class="tok confounder') == 3
    assert page.count(" truth\"") == 6  # ground truth underlined
    assert "removed &#x27; Bob&#x27;" in page and "Ann has 3 pens. is 9 years old." in page
    assert "removed &#x27; 9 years&#x27;" in page


def test_png_is_written(tmp_path):
    path = heatmap_png(scores_row(), counterfactuals(), tmp_path / "h.png", [DISTRACTOR])
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_inspect_prints_the_sample(run_dir):
    from typer.testing import CliRunner

    from leaf_ray.cli import app

    result = CliRunner().invoke(app, ["inspect", "--run", str(run_dir), "s1"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert "s1 · instruction · τ = 0.100 · 2 span(s)" in result.output
    assert "⟦ Bob⟧" in result.output and "⟦ 9 years⟧" in result.output
    assert "removed ' Bob'" in result.output and "Ann has 3 pens. is 9 years old." in result.output
    missing = CliRunner().invoke(app, ["inspect", "--run", str(run_dir), "nope"])
    assert missing.exit_code == 1
    assert "'nope' has no scores row" in missing.output and "s1" in missing.output
    empty = CliRunner().invoke(app, ["inspect", "--run", str(run_dir / "elsewhere"), "s1"])
    assert empty.exit_code == 1 and "no detection scores" in empty.output


def test_read_sample_and_log_heatmaps_to_mlflow(run_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    from leaf_ray.config import config_from_dict
    from leaf_ray.tracking import tracking_uri

    rows, cfs = read_sample(run_dir, "s2")
    assert len(rows) == 1 and [c["span_index"] for c in cfs] == [0, 1]
    cfg = config_from_dict({"run": {"name": run_dir.name, "root_dir": str(run_dir.parent)},
                            "tracking": {"experiment": "heatmaps-test"}})
    files = log_heatmaps(cfg, 1)
    names = sorted(Path(f).name for f in files)
    assert names == ["index.html", "s1.instruction.html", "s1.instruction.png"]
    client = MlflowClient(tracking_uri(cfg))
    exp = client.get_experiment_by_name("heatmaps-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.tags["leaf_ray.stage"] == "detect-heatmaps"
    logged = sorted(a.path for a in client.list_artifacts(run.info.run_id, "heatmaps"))
    assert logged == ["heatmaps/index.html", "heatmaps/s1.instruction.html", "heatmaps/s1.instruction.png"]
