"""Per-sample token heatmaps of a detection run: HTML, PNG (matplotlib), and a rich terminal view.

One view of one ``detect/scores`` row (a sample and scope) and its ``detect/counterfactuals`` rows:

- every scored token coloured by Δ (teacher minus student normalised saliency, in [0, 1]; red = low Δ, the
  student is sensitive where the teacher is not, i.e. confounder-like; blue = high Δ), its raw Δ in a tooltip
  (HTML) or by colour (PNG, with a colour bar);
- each detected confounder span (a run of tokens with Δ ≤ τ) outlined with a black box;
- optionally the ground-truth confounder spans (the focus benchmark's distractor sentences) underlined in green;
- below, every counterfactual: the span index, the removed characters and the pruned text.

:func:`log_heatmaps` writes both files for a sample of a run's scores rows to ``<run dir>/detect/heatmaps/`` and
logs them as MLflow artifacts; :func:`rich_view` is what ``leaf-ray inspect`` prints.
"""

from __future__ import annotations

import html
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leaf_ray.store import RunDir, parquet_files

if TYPE_CHECKING:
    from rich.console import RenderableType

    from leaf_ray.config import LeafConfig

COLORMAP = "RdYlBu"  # Δ = 0 red (confounder-like), 0.5 yellow, 1 blue
OUTLINE = "#111111"
TRUTH = "#1a9850"


# --------------------------------------------------------------------------- the shared model of one view


@dataclass
class TokenCell:
    index: int
    text: str
    delta: float
    confounder: bool
    span: int | None  # index of the detected span holding this token
    truth: bool  # overlaps a ground-truth confounder span


def token_cells(scores_row: dict, truth_spans: Sequence[Sequence[int]] = ()) -> list[TokenCell]:
    """The row's tokens with Δ, confounder flag, detected-span index and ground-truth flag."""
    from leaf_ray.analysis.detection_quality import ground_truth_mask

    texts, deltas = scores_row["token_texts"], scores_row["delta"]
    mask = scores_row["confounder_mask"]
    if not (len(texts) == len(deltas) == len(mask)):
        raise ValueError(f"scores row {scores_row.get('sample_id')!r}: token_texts ({len(texts)}), delta "
                         f"({len(deltas)}) and confounder_mask ({len(mask)}) differ in length")
    span_of: dict[int, int] = {}
    for k, (first, last) in enumerate(scores_row.get("spans") or []):
        for i in range(first, last):
            span_of[i] = k
    truth = ground_truth_mask(scores_row["token_char_offsets"], truth_spans) if truth_spans else [False] * len(texts)
    return [TokenCell(i, t, float(d), bool(m), span_of.get(i), truth[i])
            for i, (t, d, m) in enumerate(zip(texts, deltas, mask))]


def delta_color(delta: float) -> tuple[str, str]:
    """(background hex, readable text hex) for a Δ in [0, 1]."""
    import matplotlib
    from matplotlib.colors import to_hex

    r, g, b, _ = matplotlib.colormaps[COLORMAP](min(max(delta, 0.0), 1.0))
    luminance = 0.299 * r + 0.587 * g + 0.114 * b
    return to_hex((r, g, b)), "#000000" if luminance > 0.5 else "#ffffff"


def _title(scores_row: dict) -> str:
    return (f"{scores_row['sample_id']} · {scores_row['scope']} · τ = {float(scores_row['threshold']):.3f} · "
            f"{len(scores_row.get('spans') or [])} span(s)")


def _visible(text: str) -> str:
    return text.replace("\n", "↵")


def counterfactual_lines(counterfactuals: Sequence[dict]) -> list[tuple[str, str]]:
    """(header, pruned text) per counterfactual, in span order."""
    out = []
    for cf in sorted(counterfactuals, key=lambda c: c["span_index"]):
        pruned = cf["response_prefix"] if cf.get("response_prefix") else cf["instruction"]
        label = "all spans" if cf["span_index"] == -1 else f"span {cf['span_index']}"
        out.append((f"counterfactual ({label}): removed {cf['removed_text']!r} [chars {cf['char_start']}–"
                    f"{cf['char_end']})", pruned))
    return out


# --------------------------------------------------------------------------- HTML


def heatmap_html(scores_row: dict, counterfactuals: Sequence[dict] = (), truth_spans: Sequence[Sequence[int]] = ()
                 ) -> str:
    """A self-contained HTML fragment (inline styles) for one scores row and its counterfactuals."""
    cells = token_cells(scores_row, truth_spans)
    parts: list[str] = []
    open_span: int | None = None
    for cell in cells:
        if cell.span != open_span:
            if open_span is not None:
                parts.append("</span>")
            if cell.span is not None:
                parts.append(f'<span class="confounder-span" data-span="{cell.span}" style="outline:2px solid '
                             f'{OUTLINE};outline-offset:1px;border-radius:2px">')
            open_span = cell.span
        bg, fg = delta_color(cell.delta)
        underline = f";text-decoration:underline 3px {TRUTH}" if cell.truth else ""
        klass = "tok" + (" confounder" if cell.confounder else "") + (" truth" if cell.truth else "")
        parts.append(f'<span class="{klass}" title="Δ={cell.delta:.3f}" style="background:{bg};color:{fg}'
                     f'{underline}">{html.escape(_visible(cell.text))}</span>')
    if open_span is not None:
        parts.append("</span>")
    cf_items = "".join(f"<li><div>{html.escape(head)}</div><div style=\"font-family:monospace;white-space:"
                       f"pre-wrap\">{html.escape(text)}</div></li>" for head, text in counterfactual_lines(counterfactuals))
    legend = ("colour = Δ (red 0: student-sensitive, teacher-insensitive → confounder-like; blue 1); "
              "black outline = detected confounder span (Δ ≤ τ)")
    if truth_spans:
        legend += f"; <span style=\"text-decoration:underline 3px {TRUTH}\">green underline</span> = ground truth"
    return (f'<div class="leaf-ray-heatmap" style="font-family:sans-serif;margin:1em 0">'
            f"<h3>{html.escape(_title(scores_row))}</h3>"
            f'<div style="font-family:monospace;white-space:pre-wrap;line-height:2">{"".join(parts)}</div>'
            f'<p style="font-size:small">{legend}</p>'
            f"<ol>{cf_items or '<li>no counterfactual (no span)</li>'}</ol></div>")


def html_page(fragments: Sequence[str], title: str = "leaf-ray heatmaps") -> str:
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title></head>"
            f"<body>{''.join(fragments)}</body></html>")


# --------------------------------------------------------------------------- PNG


def _layout(cells: Sequence[TokenCell], max_cols: int) -> list[tuple[TokenCell, int, int]]:
    """(cell, row, column) on a grid of character cells; a token never splits across rows."""
    placed, row, col = [], 0, 0
    for cell in cells:
        width = max(1, len(_visible(cell.text)))
        if col and col + width > max_cols:
            row, col = row + 1, 0
        placed.append((cell, row, col))
        col += width
    return placed


def heatmap_png(scores_row: dict, counterfactuals: Sequence[dict], path: str | Path,
                truth_spans: Sequence[Sequence[int]] = (), *, max_cols: int = 72, font_size: float = 12.0,
                dpi: int = 130) -> Path:
    """Draw the token grid (coloured by Δ, spans outlined, ground truth underlined), a colour bar and the
    counterfactuals below; save to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    cells = token_cells(scores_row, truth_spans)
    placed = _layout(cells, max_cols)
    token_rows = (placed[-1][1] + 1) if placed else 1
    cf_lines: list[tuple[str, str]] = []  # (text, style)
    for head, text in counterfactual_lines(counterfactuals) or [("no counterfactual (no span)", "")]:
        cf_lines.append((head, "head"))
        cf_lines += [(line, "body") for line in textwrap.wrap(text, max_cols)] if text else []
    char_w = 0.61 * font_size / 72  # inches per monospace character
    row_h = 2.1 * font_size / 72
    header_rows, gap_rows = 3.0, 1.4
    total_rows = header_rows + token_rows + gap_rows + len(cf_lines) * 0.8 + 0.6
    fig = plt.figure(figsize=(max_cols * char_w + 0.6, total_rows * row_h + 0.2), dpi=dpi)
    ax = fig.add_axes((0.3 / (max_cols * char_w + 0.6), 0, max_cols * char_w / (max_cols * char_w + 0.6), 1))
    ax.set_xlim(0, max_cols)
    ax.set_ylim(total_rows, 0)
    ax.axis("off")
    ax.text(0, 0.9, _title(scores_row), fontsize=font_size, fontweight="bold", va="center")
    legend = "black box: detected confounder span (Δ ≤ τ)" + ("   green bar: ground truth" if truth_spans else "")
    ax.text(0, 2.1, legend, fontsize=font_size * 0.7, va="center", color="#333333")
    top = header_rows
    for cell, row, col in placed:
        width = max(1, len(_visible(cell.text)))
        bg, fg = delta_color(cell.delta)
        ax.add_patch(Rectangle((col, top + row + 0.1), width, 0.8, facecolor=bg, edgecolor="white", linewidth=0.6))
        ax.text(col, top + row + 0.5, _visible(cell.text), family="monospace", fontsize=font_size, color=fg,
                va="center", ha="left")
        if cell.truth:
            ax.add_patch(Rectangle((col, top + row + 0.92), width, 0.08, facecolor=TRUTH, edgecolor="none"))
    # One outline per detected span and grid row it covers.
    segments: dict[tuple[int, int], list[float]] = {}
    for cell, row, col in placed:
        if cell.span is not None:
            seg = segments.setdefault((cell.span, row), [col, col])
            seg[1] = col + max(1, len(_visible(cell.text)))
    for (_, row), (x0, x1) in segments.items():
        ax.add_patch(Rectangle((x0 - 0.1, top + row + 0.03), x1 - x0 + 0.2, 0.94, facecolor="none",
                               edgecolor=OUTLINE, linewidth=2.0))
    y = top + token_rows + gap_rows
    for text, style in cf_lines:
        ax.text(0, y, text, family="monospace" if style == "body" else "sans-serif",
                fontsize=font_size * (0.9 if style == "body" else 0.85), va="center",
                fontweight="bold" if style == "head" else "normal")
        y += 0.8
    # Colour bar in the header's right half: its title above (row ~1.1), the bar at rows 1.5-1.9, ticks below.
    fig_h = fig.get_figheight()
    bar = fig.add_axes((0.6, 1 - 1.9 * row_h / fig_h, 0.36, 0.4 * row_h / fig_h))
    colorbar = fig.colorbar(ScalarMappable(norm=Normalize(0, 1), cmap=COLORMAP), cax=bar, orientation="horizontal")
    colorbar.ax.tick_params(labelsize=font_size * 0.6, pad=1)
    bar.set_title("Δ = ĝ_teacher − ĝ_student  (red: confounder-like)", fontsize=font_size * 0.62, pad=2)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------- terminal (leaf-ray inspect)


def rich_view(scores_row: dict, counterfactuals: Sequence[dict] = (),
              truth_spans: Sequence[Sequence[int]] = ()) -> "RenderableType":
    """The same view for a terminal: tokens on their Δ colour, detected spans in bold underlined brackets."""
    from rich.console import Group
    from rich.text import Text

    cells = token_cells(scores_row, truth_spans)
    body = Text()
    for i, cell in enumerate(cells):
        starts = cell.span is not None and (i == 0 or cells[i - 1].span != cell.span)
        ends = cell.span is not None and (i == len(cells) - 1 or cells[i + 1].span != cell.span)
        if starts:
            body.append("⟦", style="bold")
        bg, fg = delta_color(cell.delta)
        style = f"{fg} on {bg}" + (" bold underline" if cell.confounder else "") + (" italic" if cell.truth else "")
        body.append(_visible(cell.text), style=style)
        if ends:
            body.append("⟧", style="bold")
    legend = Text("Δ colour: ", style="dim")
    for d in (0.0, 0.25, 0.5, 0.75, 1.0):
        bg, fg = delta_color(d)
        legend.append(f" {d:.2f} ", style=f"{fg} on {bg}")
    legend.append("   ⟦bold underline⟧ = detected confounder span (Δ ≤ τ)", style="dim")
    parts: list[Any] = [Text(_title(scores_row), style="bold"), body, legend]
    text = "".join(c.text for c in cells)
    for start, end in truth_spans:
        parts.append(Text(f"ground truth confounder (italic): {text[start:end]!r} [chars {start}–{end})",
                          style="green"))
    cfs = counterfactual_lines(counterfactuals)
    for head, text in cfs:
        parts += [Text(head, style="bold cyan"), Text("  " + text)]
    if not cfs:
        parts.append(Text("no counterfactual (no span)", style="dim"))
    return Group(*parts)


# --------------------------------------------------------------------------- reading a run, logging


def read_sample(run_dir: str | Path, sample_id: str) -> tuple[list[dict], list[dict]]:
    """(scores rows, counterfactual rows) of `sample_id` under `run_dir/detect/`; KeyError naming the run
    and a few ids if the sample has no scores row."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    root = Path(run_dir) / "detect"
    scores_files = parquet_files(root / "scores")
    if not scores_files:
        raise FileNotFoundError(f"{root / 'scores'}: no detection scores (run `leaf-ray detect` first)")
    scores = pq.read_table(scores_files)
    rows = scores.filter(pc.equal(scores["sample_id"], sample_id)).to_pylist()
    if not rows:
        ids = sorted(set(scores["sample_id"].to_pylist()))
        raise KeyError(f"sample {sample_id!r} has no scores row in {root / 'scores'} ({len(ids)} samples, "
                       f"e.g. {ids[:5]})")
    cf_files = parquet_files(root / "counterfactuals")
    cfs = []
    if cf_files:
        table = pq.read_table(cf_files)
        cfs = table.filter(pc.equal(table["sample_id"], sample_id)).to_pylist()
    rows.sort(key=lambda r: (r["scope"] != "instruction", r["scope"]))
    return rows, cfs


def truth_spans_of(run_dir: str | Path, sample_id: str) -> list[list[int]]:
    """Ground-truth confounder spans of `sample_id` when the ingested corpus carries them: a
    `distractor_spans` column in `data/clean` (JSON `[[start, end), ...]` relative to the instruction, as the
    focus benchmark's task writes it). [] when there is no such column or row."""
    import json

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = parquet_files(RunDir(Path(run_dir)).clean, recursive=True)
    if not files or "distractor_spans" not in pq.read_schema(files[0]).names:
        return []
    table = pq.read_table(files, columns=["sample_id", "distractor_spans"])
    rows = table.filter(pc.equal(table["sample_id"], sample_id)).to_pylist()
    if not rows or rows[0]["distractor_spans"] in (None, ""):
        return []
    value = rows[0]["distractor_spans"]
    return [list(s) for s in (json.loads(value) if isinstance(value, str) else value)]


def write_heatmaps(run_dir: str | Path, sample_ids: Sequence[str], out_dir: str | Path,
                   truth: dict[str, list[list[int]]] | None = None) -> list[Path]:
    """HTML + PNG per (sample, scope) of `sample_ids`, plus one `index.html` with all of them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files, fragments = [], []
    for sid in sample_ids:
        rows, cfs = read_sample(run_dir, sid)
        for row in rows:
            mine = [c for c in cfs if c["scope"] == row["scope"]]
            spans = (truth or {}).get(sid, []) if row["scope"] == "instruction" else []
            stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{sid}.{row['scope']}")
            fragment = heatmap_html(row, mine, spans)
            fragments.append(fragment)
            (out / f"{stem}.html").write_text(html_page([fragment], stem), encoding="utf-8")
            files += [out / f"{stem}.html", heatmap_png(row, mine, out / f"{stem}.png", spans)]
    (out / "index.html").write_text(html_page(fragments), encoding="utf-8")
    return files + [out / "index.html"]


def pick_samples(run_dir: str | Path, n: int) -> list[str]:
    """`n` sample ids, deterministically: those with the most instruction-level spans first, then by id."""
    import pyarrow.parquet as pq

    files = parquet_files(RunDir(Path(run_dir)).detect.scores)
    if not files or n <= 0:
        return []
    table = pq.read_table(files, columns=["sample_id", "scope", "spans"]).to_pylist()
    ranked = sorted(((-len(r["spans"]), r["sample_id"]) for r in table if r["scope"] == "instruction"))
    return [sid for _, sid in ranked[:n]]


def log_heatmaps(cfg: "LeafConfig", n: int = 4, *, run_id: str | None = None,
                 truth: dict[str, list[list[int]]] | None = None) -> list[Path]:
    """Heatmaps of `n` samples of the detection run under `cfg.run.dir`, written to `detect/heatmaps/` and
    logged as MLflow artifacts (`heatmaps/`) of: the active MLflow run, else run `run_id`, else a new run
    tagged ``leaf_ray.stage=detect-heatmaps`` in `cfg.tracking.experiment` (skipped when tracking is off)."""
    files = write_heatmaps(cfg.run.dir, pick_samples(cfg.run.dir, n), RunDir.of(cfg).heatmaps, truth)
    if not files or not cfg.tracking.enabled:
        return files
    from leaf_ray.tracking import setup_mlflow

    mlflow = setup_mlflow(cfg)
    active = mlflow.active_run()
    if active is not None and run_id in (None, active.info.run_id):
        for f in files:
            mlflow.log_artifact(str(f), artifact_path="heatmaps")
        return files
    context = (mlflow.start_run(run_id=run_id) if run_id else
               mlflow.start_run(run_name=f"{cfg.run.name}-heatmaps",
                                tags={"leaf_ray.stage": "detect-heatmaps", "leaf_ray.run": cfg.run.name}))
    with context:
        for f in files:
            mlflow.log_artifact(str(f), artifact_path="heatmaps")
    return files
