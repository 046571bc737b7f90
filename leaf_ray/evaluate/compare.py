"""The paper-shaped comparison table, read from MLflow runs.

Rows are variants (run tag `leaf_ray.variant`): Teacher, Pre-KD, KD w/o mask, LeaF (Instr),
LeaF (Instr & Resp), then other variants whose runs carry a title tag (`leaf_ray.variant_title`, e.g. the
controls of `leaf-ray bench focus`). Columns are the benchmarks (run metrics `eval.<benchmark>.accuracy`, in [0, 1]) grouped
by domain, each domain followed by its average: per run, avg = mean of that domain's benchmark accuracies
(a run missing one of them has no average). Several runs of one variant (seeds) give mean ± sample std.
The best mean of each column among the student rows is marked (the teacher is the reference, not a
contender). Numbers are shown as percentages.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

VARIANT_TAG = "leaf_ray.variant"
TITLE_TAG = "leaf_ray.variant_title"  # the row title of a variant outside VARIANTS
BENCHMARKS_TAG = "leaf_ray.benchmarks"  # JSON [[name, kind], ...] in config order, set by the runner
VARIANTS = {
    "teacher": "Teacher",
    "pre_kd": "Pre-KD",
    "kd": "KD w/o mask",
    "leaf_instr": "LeaF (Instr)",
    "leaf_instr_resp": "LeaF (Instr & Resp)",
}
DOMAINS = {"math": "Math Avg", "code": "Code Avg"}
METRIC_RE = re.compile(r"^eval\.(?P<bench>.+)\.accuracy$")


class CompareError(RuntimeError):
    pass


@dataclass
class Column:
    key: str  # benchmark name, or "avg:<domain>"
    title: str
    domain: str
    is_average: bool = False


@dataclass
class Cell:
    mean: float | None  # fraction in [0, 1]
    std: float | None  # sample std over runs (None with fewer than 2 runs)
    n: int
    best: bool = False

    def text(self, digits: int = 1) -> str:
        if self.mean is None:
            return "—"
        s = f"{100 * self.mean:.{digits}f}"
        return s if self.std is None else f"{s} ± {100 * self.std:.{digits}f}"


@dataclass
class Row:
    variant: str
    title: str
    run_ids: list[str]
    cells: dict[str, Cell] = field(default_factory=dict)


@dataclass
class RunScores:
    """What the table needs from one MLflow run."""

    run_id: str
    variant: str
    accuracy: dict[str, float]  # benchmark -> accuracy
    kinds: list[tuple[str, str]]  # (benchmark, kind) in the run's config order
    title: str | None = None  # tag `leaf_ray.variant_title`: a variant outside VARIANTS, shown under this title


@dataclass
class CompareTable:
    experiment: str
    columns: list[Column]
    rows: list[Row]

    def to_markdown(self) -> str:
        head = ["Method"] + [c.title for c in self.columns]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + [":---:"] * len(self.columns)) + "|"]
        for row in self.rows:
            cells = [f"**{row.cells[c.key].text()}**" if row.cells[c.key].best else row.cells[c.key].text()
                     for c in self.columns]
            lines.append("| " + " | ".join([_runs_title(row)] + cells) + " |")
        lines.append("")
        lines.append("Accuracy / pass@1 (%), mean ± std over runs; **bold** = best per column among the "
                     "students (the teacher is the reference).")
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        header = ["method", "variant", "runs"]
        for c in self.columns:
            header += [c.title, f"{c.title} std"]
        writer.writerow(header + ["best"])
        for row in self.rows:
            values = [row.title, row.variant, len(row.run_ids)]
            for c in self.columns:
                cell = row.cells[c.key]
                values += [_pct(cell.mean), _pct(cell.std)]
            best = [c.title for c in self.columns if row.cells[c.key].best]
            writer.writerow(values + [";".join(best)])
        return buf.getvalue()

    def to_rich(self):
        from rich.table import Table

        table = Table(title=f"LeaF comparison — experiment {self.experiment!r}",
                      caption="accuracy / pass@1 (%), mean ± std over runs; * best per column among students")
        # In a narrow terminal the method names wrap (never mid-word); numbers are never split.
        table.add_column("Method", style="bold",
                         min_width=max(len(word) for row in self.rows for word in _runs_title(row).split()))
        for c in self.columns:
            # A number must never be split over two lines; the method names may wrap instead.
            widest = max([len(c.title)] + [len(row.cells[c.key].text()) + row.cells[c.key].best
                                            for row in self.rows])
            table.add_column(c.title, justify="right", style="cyan" if c.is_average else None, no_wrap=True,
                             min_width=widest)
        for row in self.rows:
            cells = []
            for c in self.columns:
                cell = row.cells[c.key]
                cells.append(f"[bold green]{cell.text()}*[/bold green]" if cell.best else cell.text())
            table.add_row(_runs_title(row), *cells, end_section=row.variant == "teacher")
        return table


def _runs_title(row: Row) -> str:
    return row.title if len(row.run_ids) == 1 else f"{row.title} (n={len(row.run_ids)})"


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.4f}"


def _mean_std(values: list[float]) -> Cell:
    if not values:
        return Cell(None, None, 0)
    std = statistics.stdev(values) if len(values) >= 2 else None
    return Cell(statistics.fmean(values), std, len(values))


def _columns(runs: list[RunScores]) -> list[Column]:
    """Benchmarks grouped by domain (math, code, then others), in the order runs list them."""
    order: dict[str, str] = {}
    for run in runs:
        for name, kind in run.kinds:
            order.setdefault(name, kind)
    for run in runs:
        for name in sorted(run.accuracy):
            order.setdefault(name, "other")
    domains = list(DOMAINS) + sorted({k for k in order.values() if k not in DOMAINS})
    columns = []
    for domain in domains:
        names = [n for n, k in order.items() if k == domain]
        if not names:
            continue
        columns += [Column(n, n, domain) for n in names]
        title = DOMAINS.get(domain, f"{domain.capitalize()} Avg")
        columns.append(Column(f"avg:{domain}", title, domain, is_average=True))
    return columns


def build_table(runs: list[RunScores], experiment: str) -> CompareTable:
    """Pure function: runs -> table (mean ± std per variant, domain averages, best per column)."""
    runs = [r for r in runs if (r.variant in VARIANTS or (r.variant and r.title)) and r.accuracy]
    if not runs:
        raise CompareError(f"experiment {experiment!r}: no runs with tag {VARIANT_TAG} in "
                           f"{sorted(VARIANTS)} and eval.<benchmark>.accuracy metrics")
    columns = _columns(runs)
    rows = []
    # Then variants titled by their run's tag `leaf_ray.variant_title` (e.g. `leaf-ray bench focus` controls)
    titles = {**VARIANTS, **{r.variant: r.title for r in runs if r.variant not in VARIANTS}}
    for variant, title in titles.items():
        mine = [r for r in runs if r.variant == variant]
        if not mine:
            continue
        row = Row(variant, title, [r.run_id for r in mine])
        for c in columns:
            if c.is_average:
                names = [b.key for b in columns if b.domain == c.domain and not b.is_average]
                per_run = [statistics.fmean(r.accuracy[n] for n in names) for r in mine
                           if all(n in r.accuracy for n in names)]
                row.cells[c.key] = _mean_std(per_run)
            else:
                row.cells[c.key] = _mean_std([r.accuracy[c.key] for r in mine if c.key in r.accuracy])
        rows.append(row)
    for c in columns:
        contenders = [row.cells[c.key] for row in rows if row.variant != "teacher"]
        means = [cell.mean for cell in contenders if cell.mean is not None]
        if means:
            top = max(means)
            for cell in contenders:
                cell.best = cell.mean is not None and math.isclose(cell.mean, top, rel_tol=0, abs_tol=1e-12)
    return CompareTable(experiment, columns, rows)


def run_scores(run) -> RunScores:
    """RunScores from an `mlflow.entities.Run`."""
    accuracy = {m.group("bench"): float(v) for k, v in run.data.metrics.items() if (m := METRIC_RE.match(k))}
    kinds: list[tuple[str, str]] = []
    raw = run.data.tags.get(BENCHMARKS_TAG)
    if raw:
        try:
            kinds = [(str(n), str(k)) for n, k in json.loads(raw)]
        except (ValueError, TypeError):
            raise CompareError(f"run {run.info.run_id}: tag {BENCHMARKS_TAG} is not a JSON list of "
                               f"[name, kind] pairs: {raw[:200]!r}") from None
    return RunScores(run.info.run_id, run.data.tags.get(VARIANT_TAG, ""), accuracy, kinds,
                     run.data.tags.get(TITLE_TAG))


def compare_experiment(tracking_uri: str, experiment: str) -> CompareTable:
    """Read every live, non-failed run of `experiment` and build the table."""
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        if not db.is_file():  # opening it would create an empty store
            raise CompareError(f"no MLflow store at {db} (tracking URI {tracking_uri})")
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise CompareError(f"MLflow experiment {experiment!r} not found at {tracking_uri}")
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        runs += [run_scores(r) for r in page if r.info.status not in ("FAILED", "KILLED")]
        token = page.token
        if not token:
            break
    return build_table(runs, experiment)
