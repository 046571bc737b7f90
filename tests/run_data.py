"""A run directory's inputs written directly, and its Parquet outputs read back (the detection tests)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# Both saliency pools at half a CPU: they and Ray Data's tasks fit a 2-CPU local Ray (docs/environment.md §4).
POOLS = {"student_pool": {"num_cpus": 0.5, "batch_size": 4},
         "teacher_pool": {"num_cpus": 0.5, "batch_size": 4}, "units_per_part": 8}


def write_clean(cfg, rows: list[dict]) -> None:
    """`data/clean/` as ingest writes it (extra columns as strings, `source`, `row`, `split`), written directly
    (ingest is tested on its own)."""
    columns = {k for r in rows for k in r}
    for i, r in enumerate(rows):
        r.update({k: None for k in columns - r.keys()}, source="test", row=i)
        r["split"] = r.get("split") or "train"
    clean = cfg.run.dir / "data" / "clean"
    clean.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), clean / "part-0.parquet")


def read_dir(path: Path) -> list[dict]:
    files = sorted(path.glob("*.parquet"))
    return pq.read_table([str(f) for f in files]).to_pylist() if files else []
