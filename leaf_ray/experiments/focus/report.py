"""`<run dir>/report.html`: one static page of a run, built from what the run directory holds.

Sections, each shown when its inputs exist:

- **comparison**: the focus benchmark's method table (from its stage markers `_stages/evaluate-*.json`,
  `_stages/seed-<k>-<variant>.json`, through `leaf_ray.experiments.focus.results.method_rows`), else `comparison.md` of a
  `leaf-ray run` chain;
- **detection quality** against the ground-truth distractors next to random (`_stages/detection-quality.json`);
- **sample heatmaps** (`detect/heatmaps/*.png`, written by `leaf_ray.analysis.heatmap`);
- **Δ distribution**: histogram of the instruction tokens' Δ (`detect/scores`), split into tokens inside and
  outside the ground-truth distractor spans when the task has them, with the per-sample threshold τ;
- **loss curves** per distilled variant: training `loss` and `val_loss` from the MLflow runs of the variants.

Figures are matplotlib PNGs embedded as base64, so the file stands alone (no network, no other files).
`leaf-ray report --run DIR` rebuilds it; `leaf-ray demo` writes it and logs it to MLflow (`log_report`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

from leaf_ray.store import RunDir, parquet_files

if TYPE_CHECKING:
    from leaf_ray.config import LeafConfig

MAX_HEATMAPS = 3


class ReportError(RuntimeError):
    pass


# --------------------------------------------------------------------------- reading the run directory


def _marker(root: Path, name: str) -> dict | None:
    path = root / "_stages" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def focus_result(root: Path):
    """The focus benchmark's result rebuilt from its stage markers (None when `root` is not such a run)."""
    from leaf_ray.experiments.focus.results import FocusBenchResult

    accuracy: dict[str, dict[str, list[float]]] = {}
    attention: dict[str, list[dict]] = {}
    steps: dict[str, list[int]] = {}
    run_ids: dict[str, list[str]] = {}

    def record(variant: str, info: dict) -> None:
        for bench, acc in (info.get("accuracy") or {}).items():
            accuracy.setdefault(variant, {}).setdefault(bench, []).append(acc)
        if info.get("attention"):
            attention.setdefault(variant, []).append(info["attention"])
        if info.get("steps") is not None:
            steps.setdefault(variant, []).append(info["steps"])
        if info.get("run_id"):
            run_ids.setdefault(variant, []).append(info["run_id"])

    for variant in ("teacher", "pre_kd"):
        if (info := _marker(root, f"evaluate-{variant}")) is not None and "accuracy" in info:
            record(variant, info)
    seeded = []
    for path in (root / "_stages").glob("seed-*-*.json"):
        m = re.fullmatch(r"seed-(\d+)-(.+)", path.stem)
        if m:
            seeded.append((int(m.group(1)), m.group(2), path))
    for _, variant, path in sorted(seeded):
        record(variant, json.loads(path.read_text()))
    quality = _marker(root, "detection-quality")
    if not accuracy and quality is None:
        return None, {}
    extra = json.loads((root / "results.json").read_text()) if (root / "results.json").is_file() else {}
    result = FocusBenchResult(detection=(quality or {}).get("rows", []), accuracy=accuracy, attention=attention,
                              steps=steps, titles={k: v for k, v in extra.get("titles", {}).items() if k in accuracy},
                              flops=extra.get("flops", {}))
    return result, run_ids


def chain_run_ids(root: Path) -> dict[str, list[str]]:
    """`leaf-ray run`: the MLflow run of each `distill-<variant>` stage."""
    out = {}
    for path in sorted((root / "_stages").glob("distill-*.json")):
        info = json.loads(path.read_text())
        if info.get("mlflow_run_id"):
            out[path.stem.removeprefix("distill-")] = [info["mlflow_run_id"]]
    return out


def truth_spans(root: Path) -> dict[str, list[list[int]]]:
    """Ground-truth distractor spans of the focus task's train split (empty for other runs)."""
    path = root / "task" / "train.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["id"]: r.get("distractor_spans") or [] for r in rows}


def delta_values(root: Path, truth: dict[str, list[list[int]]]) -> dict[str, list[float]] | None:
    """Instruction-level Δ of every scored token: {"distractor": [...], "other": [...]} (or {"all": [...]}),
    and the per-sample thresholds τ under "tau"."""
    import pyarrow.parquet as pq

    from leaf_ray.analysis.detection_quality import ground_truth_mask

    files = parquet_files(RunDir(root).detect.scores)
    if not files:
        return None
    names = pq.read_schema(files[0]).names
    columns = [c for c in ("sample_id", "scope", "delta", "token_char_offsets", "threshold") if c in names]
    if "delta" not in columns:
        return None
    out: dict[str, list[float]] = {"tau": []}
    for row in pq.read_table(files, columns=columns).to_pylist():
        if row.get("scope") != "instruction" or not row.get("delta"):
            continue
        if row.get("threshold") is not None:
            out["tau"].append(float(row["threshold"]))
        if truth and row.get("token_char_offsets") is not None:
            mask = ground_truth_mask(row["token_char_offsets"], truth.get(row["sample_id"], []))
            for d, is_distractor in zip(row["delta"], mask):
                out.setdefault("distractor" if is_distractor else "other", []).append(float(d))
        else:
            out.setdefault("all", []).extend(float(d) for d in row["delta"])
    return out


def loss_histories(tracking_uri: str, run_ids: dict[str, list[str]]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """variant -> {"loss": [(step, value)], "val_loss": [...]} of its first seed's MLflow run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    out = {}
    for variant, ids in run_ids.items():
        curves = {}
        for key in ("loss", "val_loss"):
            try:
                history = client.get_metric_history(ids[0], key)
            except Exception:  # noqa: BLE001 - the run is gone from this store: no curve, the rest of the report stands
                history = []
            if history:
                curves[key] = sorted((m.step, m.value) for m in history)
        if curves:
            out[variant] = curves
    return out


# --------------------------------------------------------------------------- figures


def _png_data_uri(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _file_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def delta_figure(values: dict[str, list[float]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    bins = [i / 40 for i in range(41)]
    styles = {"distractor": ("#d62728", "tokens inside a distractor sentence"),
              "other": ("#1f77b4", "other instruction tokens"), "all": ("#1f77b4", "instruction tokens")}
    for key, (color, label) in styles.items():
        if values.get(key):
            ax.hist(values[key], bins=bins, density=True, alpha=0.55, color=color,
                    label=f"{label} (n = {len(values[key])})")
    if values.get("tau"):
        taus = sorted(values["tau"])
        median = taus[len(taus) // 2]
        ax.axvline(median, color="black", linestyle="--", linewidth=1, label=f"median τ = {median:.3f}")
    ax.set_xlabel("Δ = ĝ_teacher − ĝ_student, min-max normalised (confounder when Δ ≤ τ)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return _png_data_uri(fig)


def loss_figure(histories: dict[str, dict[str, list[tuple[int, float]]]], titles: dict[str, str]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for variant, curves in histories.items():
        for ax, key in zip(axes, ("loss", "val_loss")):
            if curves.get(key):
                steps, values = zip(*curves[key])
                ax.plot(steps, values, marker="o" if len(steps) < 15 else None, markersize=3,
                        label=titles.get(variant, variant))
    for ax, title in zip(axes, ("training loss (hybrid KL)", "validation loss")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=8)
    return _png_data_uri(fig)


# --------------------------------------------------------------------------- the page


CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; } th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.meta { color: #666; font-size: 0.9em; } img { max-width: 100%; border: 1px solid #eee; }
.note { color: #444; font-size: 0.92em; }
"""


def _table(head: list[str], rows: list[list[str]]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        cells = [f"<td>{html.escape(str(row[0]))}</td>"] + [f'<td class="num">{html.escape(str(c))}</td>'
                                                            for c in row[1:]]
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out + ["</table>"])


def _markdown_table_html(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip().startswith("|")]
    if len(lines) < 2:
        return f"<pre>{html.escape(text)}</pre>"
    split = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    return _table(split[0], split[2:])


def build_report(root: Path, *, tracking_uri: str | None = None) -> str:
    """The report page of run directory `root`, as HTML text."""
    from leaf_ray.experiments.focus.results import (
        DETECTION_HEAD,
        METHOD_HEAD,
        VARIANT_TITLES,
        detection_cells,
        method_rows,
    )

    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise ReportError(f"no run directory at {root}")
    result, run_ids = focus_result(root)
    run_ids = run_ids or chain_run_ids(root)
    sections: list[str] = []

    # comparison
    if result is not None and result.accuracy:
        sections.append("<h2>Comparison</h2>" + _table(METHOD_HEAD, method_rows(result)) +
                        '<p class="note">Student accuracy (greedy, %) on the held-out test problems with their '
                        "distractors and on the same problems without them; attention = mean attention mass from "
                        "the response positions onto the distractor tokens; steps = optimizer steps (LeaF trains on "
                        "the originals plus their counterfactuals, so an epoch has more steps than KD's).</p>")
    elif (root / "comparison.md").is_file():
        sections.append("<h2>Comparison</h2>" + _markdown_table_html((root / "comparison.md").read_text()))

    # detection quality
    if result is not None and result.detection:
        sections.append("<h2>Detection quality</h2>" + _table(
            ["subset"] + DETECTION_HEAD, [[r["name"], *detection_cells(r)] for r in result.detection]) +
            '<p class="note">Instruction tokens flagged as confounders (Δ ≤ τ) against the ground-truth distractor '
            "sentences (P/R/F1 in %). Random = the expected scores of selecting tokens at the same rate: "
            "precision = the base rate, recall = the selection rate.</p>")

    # heatmaps
    heatmaps = sorted(RunDir(root).heatmaps.glob("*.instruction.png"))[:MAX_HEATMAPS]
    if heatmaps:
        imgs = "\n".join(f'<figure><img alt="{html.escape(p.stem)}" src="{_file_data_uri(p)}">'
                         f"<figcaption class=meta>{html.escape(p.stem)}</figcaption></figure>" for p in heatmaps)
        sections.append("<h2>Sample heatmaps</h2><p class=note>Tokens coloured by Δ (red = the student is far more "
                        "sensitive than the teacher); black boxes = detected confounder spans; green bars = the "
                        "ground-truth distractors; below, the counterfactuals (one per pruned span).</p>" + imgs)

    # Δ distribution
    values = delta_values(root, truth_spans(root))
    if values and any(values.get(k) for k in ("distractor", "other", "all")):
        sections.append("<h2>Δ distribution</h2>" + f'<img alt="delta histogram" src="{delta_figure(values)}">' +
                        "<p class=note>Instruction tokens of every scored sample. Detection flags the low end; "
                        "the more the red mass sits left of the blue, the better Δ separates distractors.</p>")

    # loss curves
    uri = tracking_uri or (f"sqlite:///{root / 'mlflow.db'}" if (root / "mlflow.db").is_file() else None)
    histories = loss_histories(uri, run_ids) if uri and run_ids else {}
    if histories:
        sections.append("<h2>Loss curves</h2>" + f'<img alt="loss curves" src="{loss_figure(histories, VARIANT_TITLES)}">'
                        + "<p class=note>Per distilled variant (first seed), from its MLflow run.</p>")

    if not sections:
        raise ReportError(f"{root} holds nothing to report yet (no stage markers, scores or comparison)")
    config = root / "config.yaml"
    meta = (f"Run directory <code>{html.escape(str(root))}</code>; written "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
            + (f"; MLflow store <code>{html.escape(uri)}</code>" if uri else "")
            + ("; config <code>config.yaml</code>" if config.is_file() else "") + ".")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>leaf-ray report: {html.escape(root.name)}"
            f"</title><style>{CSS}</style></head><body><h1>leaf-ray report: {html.escape(root.name)}</h1>"
            f"<p class=meta>{meta}</p>" + "\n".join(sections) + "</body></html>")


def write_run_report(root: Path, *, out: Path | None = None, tracking_uri: str | None = None) -> Path:
    root = Path(root).expanduser().resolve()
    out = Path(out) if out else root / "report.html"
    text = build_report(root, tracking_uri=tracking_uri)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out


def log_report(cfg: LeafConfig, root: Path, report: Path) -> None:
    """The report as an artifact of the run's MLflow parent run (the focus bench's `bench-focus` run)."""
    if not cfg.tracking.enabled:
        return
    parent = Path(root) / "_stages" / "mlflow_parent_run_id"
    if not parent.is_file():
        return
    from mlflow.tracking import MlflowClient

    uri = cfg.tracking.tracking_uri or f"sqlite:///{Path(root) / 'mlflow.db'}"
    MlflowClient(uri).log_artifact(parent.read_text().strip(), str(report))

