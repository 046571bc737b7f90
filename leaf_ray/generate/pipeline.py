"""Generation on Ray Data: an actor pool holding one backend each, and the two uses built on it.

- `generate_dataset`: add a completion column to any Ray Dataset (`ActorPoolStrategy` from `generation.pool`).
- `generate_rows`: completions of a list of prompts (evaluation, cross-checks); a small list (`generation.inline_max_prompts`)
  goes through the same UDF in the calling process.
What uses a completion (the teacher-response pass, evaluation, Stage 1 selection) judges it above this package
(`leaf_ray.evaluate`), so generation never imports the judge.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from leaf_ray.config import GenerationConfig, LeafConfig, ModelRef

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

log = logging.getLogger(__name__)


class GenerateUDF:
    """Ray Data actor: loads the model once, then completes `prompt_col` of each batch into `out_col`."""

    def __init__(self, model_ref: dict, gen: dict, seed: int, prompt_col: str, out_col: str,
                 prefix_col: str | None = None):
        from leaf_ray.generate.backends import make_backend

        self.backend = make_backend(ModelRef(**model_ref), GenerationConfig(**gen), seed)
        self.prompt_col, self.out_col, self.prefix_col = prompt_col, out_col, prefix_col
        log.info("generation actor ready: backend=%s model=%s", self.backend.name, model_ref["path"])

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        prompts = batch.column(self.prompt_col).to_pylist()
        prefixes = None
        if self.prefix_col:
            prefixes = [p or "" for p in batch.column(self.prefix_col).to_pylist()]
        completions = pa.array(self.backend.generate(prompts, prefixes=prefixes), pa.string())
        if self.out_col in batch.column_names:
            return batch.set_column(batch.column_names.index(self.out_col), self.out_col, completions)
        return batch.append_column(self.out_col, completions)


def generate_dataset(cfg: LeafConfig, model_ref: ModelRef, ds: ray.data.Dataset, prompt_col: str,
                     out_col: str, *, prefix_col: str | None = None) -> ray.data.Dataset:
    """`ds` plus a column `out_col` holding the model's completion of each row's `prompt_col` instruction
    (continuing from `prefix_col`'s response prefix when given). Lazy, like any Ray Data transform.

    `generation.backend: vllm | sglang` run a `ray.data.llm` processor (leaf_ray/generate/ray_data_llm.py);
    `transformers` and `auto` an actor pool of :class:`GenerateUDF`."""
    from leaf_ray.generate import ray_data_llm

    if cfg.generation.backend in ray_data_llm.ENGINES:
        return ray_data_llm.generate_dataset(cfg, model_ref, ds, prompt_col, out_col, prefix_col=prefix_col)
    return ds.map_batches(
        GenerateUDF,
        fn_constructor_kwargs={"model_ref": model_ref.model_dump(), "gen": cfg.generation.model_dump(),
                               "seed": cfg.run.seed, "prompt_col": prompt_col, "out_col": out_col,
                               "prefix_col": prefix_col},
        batch_format="pyarrow", **cfg.generation.pool.map_batches_kwargs(),  # ActorPoolStrategy from the pool
    )


def generate_rows(cfg: LeafConfig, model_ref: ModelRef, prompts: list[str],
                  prefixes: list[str] | None = None, console=None, label: str = "generate") -> list[str]:
    """Completions for a Python list of instructions, in input order (through the actor pool); with a
    `console`, one progress line (rows/s, ETA) while they stream in."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if not prompts:
        return []
    items = [{"gen_index": i, "prompt": p, "prefix": prefixes[i] if prefixes else ""}
             for i, p in enumerate(prompts)]
    rows = []
    with Progress(TextColumn(label, markup=False), BarColumn(bar_width=24), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]} rows/s ETA"), TimeRemainingColumn(), console=console,
                  disable=console is None) as progress:
        task = progress.add_task(label, total=len(items), rate="0.00")
        for row in _completions(cfg, model_ref, items, bool(prefixes)):
            rows.append(row)
            elapsed = progress.tasks[0].elapsed or 0.0
            progress.update(task, advance=1, rate=f"{len(rows) / elapsed:.2f}" if elapsed else "0.00")
    rows.sort(key=lambda r: r["gen_index"])
    return [r["completion"] for r in rows]


def _completions(cfg: LeafConfig, model_ref: ModelRef, items: list[dict], with_prefixes: bool):
    """``{"gen_index", "completion"}`` per item as they are done: through the actor pool, or, for at most
    ``generation.inline_max_prompts`` items, the same UDF called here batch by batch (no actor to start;
    in-process backends only: a `ray.data.llm` engine always runs in its processor)."""
    import pyarrow as pa

    from leaf_ray.generate.ray_data_llm import ENGINES

    if len(items) <= cfg.generation.inline_max_prompts and cfg.generation.backend not in ENGINES:
        udf = GenerateUDF(model_ref.model_dump(), cfg.generation.model_dump(), cfg.run.seed, "prompt",
                          "completion", prefix_col="prefix" if with_prefixes else None)
        try:
            size = cfg.generation.pool.batch_size
            for start in range(0, len(items), size):
                yield from udf(pa.Table.from_pylist(items[start:start + size])).select(
                    ["gen_index", "completion"]).to_pylist()
        finally:
            udf.backend.close()
        return
    import ray.data

    from leaf_ray.raycluster import init_ray

    init_ray(cfg)
    ds = generate_dataset(cfg, model_ref, ray.data.from_items(items), "prompt", "completion",
                          prefix_col="prefix" if with_prefixes else None)
    from leaf_ray.raycluster import bounded_stream

    yield from bounded_stream(ds.select_columns(["gen_index", "completion"]).iter_rows(), cfg.ray.stall_timeout_s,
                              "generate (Ray Data stream)")
