"""`leaf-ray bench ingest`: records/s of `run_ingest` on a large JSONL corpus, next to a plain Python loop.

Both read the same file (``records`` word problems, unique ids, a few of them bad so quarantine is exercised)
and check every record the same way: JSON parse, required fields, render with the student's chat template and
count its tokens against ``data.max_length`` (:func:`leaf_ray.data.ingest.fit_to_length`).

- ``loop``: one process, line by line, the clean rows written to one Parquet file at the end.
- ``run_ingest``: the stage itself on the local Ray instance this command starts (Ray's start is outside the
  clock; the Ray Data plan, the tasks, dedup, the Parquet writes and the manifest are inside).

Goal (issue 13): ≥ 5,000 records/s on 100k records on 2 cores.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

GOAL_RECORDS_PER_S = 5000.0


def write_corpus(path: Path, records: int, seed: int = 0) -> int:
    """`records` JSONL lines: word problems with worked solutions; every 1000th line is broken JSON and every
    1000th (offset 500) lacks its output, so both quarantine paths run. Returns the number of bad lines."""
    rng = random.Random(seed)
    names = ["Ava", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana"]
    bad = 0
    with open(path, "w", encoding="utf-8") as f:
        for i in range(records):
            if i % 1000 == 999:
                f.write('{"id": "broken-%d", "instruction": \n' % i)
                bad += 1
                continue
            a, b = rng.randint(2, 90), rng.randint(2, 90)
            name = rng.choice(names)
            record = {"id": f"p{i}", "instruction": f"{name} has {a} marbles and finds {b} more. How many "
                                                     f"marbles does {name} have now?",
                      "output": f"{name} has {a} + {b} = {a + b} marbles.\n\nThe answer is \\boxed{{{a + b}}}.",
                      "answer": str(a + b)}
            if i % 1000 == 500:
                del record["output"]
                bad += 1
            f.write(json.dumps(record) + "\n")
    return bad


def plain_loop(path: Path, tokenizer, max_length: int, out: Path) -> dict:
    """The straightforward script: parse, check, render and count, write the clean rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from leaf_ray.data.ingest import fit_to_length

    clean, quarantined = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                quarantined += 1
                continue
            if not record.get("instruction") or not record.get("output"):
                quarantined += 1
                continue
            n_tokens, fitted = fit_to_length(tokenizer, record["instruction"], record["output"], max_length)
            if fitted != record["output"]:
                quarantined += 1
                continue
            clean.append(record)
    pq.write_table(pa.Table.from_pylist(clean), out)
    return {"clean": len(clean), "quarantined": quarantined}


def run_ingest_bench(cfg, console, *, records: int = 100_000) -> dict:
    from rich.table import Table

    from leaf_ray.config import config_from_dict
    from leaf_ray.data.ingest import run_ingest
    from leaf_ray.models import load_tokenizer
    from leaf_ray.raycluster import init_ray, local_model_ref
    from leaf_ray.tiny_models import ensure_tiny_pair

    root = (cfg.run.dir / "bench-ingest").expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    ensure_tiny_pair(cfg)  # the default config points at the tiny pair, made once
    corpus = root / f"corpus-{records}.jsonl"
    bad = write_corpus(corpus, records) if not corpus.exists() else records // 1000 * 2
    console.print(f"bench ingest: {records:,} records ({bad} bad), {os.cpu_count()} CPUs, load average "
                  f"{os.getloadavg()[0]:.1f}", highlight=False)

    tokenizer = load_tokenizer(local_model_ref(cfg.models.student))
    t0 = time.perf_counter()
    loop = plain_loop(corpus, tokenizer, cfg.data.max_length, root / "loop.parquet")
    loop_s = time.perf_counter() - t0

    tree = cfg.dump()
    tree["run"] = {**tree["run"], "root_dir": str(root / "runs"), "name": "ingest"}
    tree["data"] = {**tree["data"], "paths": [str(corpus)], "format": "jsonl"}
    tree["tracking"] = {**tree["tracking"], "enabled": False}
    icfg = config_from_dict(tree, "bench ingest")
    init_ray(icfg)
    t0 = time.perf_counter()
    report = run_ingest(icfg)
    ingest_s = time.perf_counter() - t0
    if report.read != records or report.clean != loop["clean"]:
        raise RuntimeError(f"run_ingest read {report.read} / clean {report.clean}, the loop clean {loop['clean']} "
                           f"of {records}: the two disagree")

    table = Table(title=f"Ingest: {records:,} JSONL records (parse, validate, render + count tokens, write Parquet)")
    for col in ("method", "seconds", "records/s", "× loop", f"goal ≥ {GOAL_RECORDS_PER_S:,.0f}/s"):
        table.add_column(col, justify="left" if col == "method" else "right")
    rows = {"loop": loop_s, "run_ingest": ingest_s}
    for name, seconds in rows.items():
        rate = records / seconds
        table.add_row(name, f"{seconds:.1f}", f"{rate:,.0f}", f"{loop_s / seconds:.2f}×",
                      "met" if rate >= GOAL_RECORDS_PER_S else "missed")
    console.print(table)
    console.print(f"clean {report.clean:,}, quarantined {sum(report.quarantined.values()):,} "
                  f"({', '.join(f'{k} {v}' for k, v in report.quarantined.items())}); Ray's start excluded. "
                  f"load average now {os.getloadavg()[0]:.1f}", highlight=False)
    return {"records": records, "loop_s": loop_s, "ingest_s": ingest_s}
