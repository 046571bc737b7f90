"""Stage 2, the driver: from the run directory's rows to one Ray Train run, and the exported student.

    rows (originals + counterfactuals, ``data.load_rows``) ─► Ray Data tokenise ─► MLflow run opened ─►
    TorchTrainer(``trainer.train_worker`` on every rank) ─► summary, MLflow run finished

A small run (``distill.inline_max_rows``) tokenises and trains the same recipe in this process instead
(``inline.py``), without Ray.

A rerun of the same command resumes the run in ``<run dir>/distill/<variant>/`` (or returns it when finished);
the store's spec guard refuses one with another spec. What every rank does is ``trainer.py``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from leaf_ray.config import LeafConfig
from leaf_ray.console import FileProgress
from leaf_ray.distill.data import VARIANT_SCOPES, DistillDataError, load_rows
from leaf_ray.distill.inline import runs_inline, train_inline
from leaf_ray.distill.trainer import accumulation_steps, train_worker
from leaf_ray.distributed import backend_for
from leaf_ray.store import RunDir, check_same_spec, digest, exclusive_lock, write_json_atomic
from leaf_ray.tracking import (
    check_tracking_server,
    end_stage_run,
    fail_fast,
    finish_stage_run,
    log_pending_metrics,
    pending_metrics_file,
    start_stage_run,
    tracking_uri,
)

log = logging.getLogger(__name__)

# Columns the workers need (the text columns stay behind in the driver).
WORKER_COLUMNS = ["row_key", "group", "is_counterfactual", "scope", "span_index", "input_ids", "target_mask"]


@dataclass
class DistillResult:
    export_dir: Path
    mlflow_run_id: str | None
    best_val_loss: float | None
    steps: int
    variant: str = "leaf_instr"
    best_step: int | None = None
    train_rows: int = 0
    counterfactual_rows: int = 0


def run_distillation(cfg: LeafConfig, *, variant: str | None = None, console=None,
                     parent_run_id: str | None = None) -> DistillResult:
    """Distil the student for one variant ("kd" = KD w/o mask, "leaf_instr", "leaf_instr_resp").

    Outputs under ``<run dir>/distill/<variant>/``: ``model/`` (the best student by validation loss, a
    ``save_pretrained`` directory with the tokenizer), ``ray/`` (Ray Train checkpoints), ``summary.json``.
    """
    from leaf_ray.raycluster import for_workers

    variant = variant or ("leaf_instr" if cfg.distill.use_counterfactuals else "kd")
    cfg = variant_config(for_workers(cfg), variant)
    out_dir = RunDir.of(cfg).distill(variant)
    say = console.print if console is not None else (lambda *a, **k: None)
    check_tracking_server(cfg)  # a configured server that does not answer: a clear error before any work
    # One writer per output directory: a second `leaf-ray distill` here is refused while this one runs.
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = out_dir / ".lock"
    with exclusive_lock(lock, lambda: DistillDataError(
            f"{out_dir}: another distillation run is writing here (it holds {lock}); wait for it to finish "
            "or stop it")):
        return _distill_locked(cfg, variant, out_dir, say, parent_run_id, console)


def _distill_locked(cfg: LeafConfig, variant: str, out_dir: Path, say, parent_run_id: str | None,
                    console=None) -> DistillResult:
    """`run_distillation` under the output directory's lock."""
    dcfg = cfg.distill

    # -- rows: originals (+ counterfactuals), split by the originals' split
    check_models(cfg)
    rows, counterfactuals = load_rows(cfg.run.dir, variant, dcfg.use_counterfactuals)
    splits = {s: rows.filter(_split_mask(rows, s)) for s in ("train", "validation")}
    if splits["train"].num_rows == 0:
        raise DistillDataError(f"no training rows in {cfg.run.dir / 'data' / 'clean'} (split == 'train')")
    n_cf = int(pc.sum(splits["train"].column("is_counterfactual")).as_py() or 0)

    def result(summary: dict) -> DistillResult:
        return DistillResult(export_dir=out_dir / "model", mlflow_run_id=summary.get("mlflow_run_id"),
                             best_val_loss=summary["best_val_loss"], steps=summary["steps"], variant=variant,
                             best_step=summary["best_step"], train_rows=splits["train"].num_rows,
                             counterfactual_rows=n_cf)

    # A rerun of the same command resumes (or, when finished, returns) the run in out_dir; never a different one.
    check_same_run(out_dir, cfg, rows)
    summary = json.loads((out_dir / "summary.json").read_text()) if (out_dir / "summary.json").exists() else {}
    if "mlflow_run_id" in summary:  # written last, once the export is logged
        say(f"distill [{variant}]: already complete in {out_dir}")
        return result(summary)

    def finish(tracking: dict[str, Any], summary: dict) -> DistillResult:
        """Finish the MLflow run (metrics kept while the server was down, final metrics, the export). A server
        that does not answer leaves it unfinished, with one warning: the next run of this command finishes it."""
        try:
            with fail_fast():
                log_pending_metrics(tracking, pending_metrics_file(out_dir))
                finish_stage_run(tracking, metrics={k: summary[k] for k in ("best_val_loss", "best_step", "steps")},
                                 artifacts={"model": out_dir / "model"},
                                 summary=summary | {"mlflow_run_id": tracking.get("run_id")})
        except Exception as e:  # noqa: BLE001 - the student is trained and exported; only its tracking waits
            warning = (f"distill [{variant}]: trained and exported to {out_dir / 'model'}, but the MLflow server "
                       f"{tracking['uri']} does not answer ({type(e).__name__}); its metrics are kept in {out_dir}: "
                       "run the same command again to log them and finish the MLflow run")
            log.warning(warning)
            say(f"[yellow]{warning}[/yellow]")
            return result(summary)
        summary = summary | {"mlflow_run_id": tracking.get("run_id")}
        write_json_atomic(out_dir / "summary.json", summary)
        say(f"distill [{variant}]: {summary['steps']} steps, best validation loss {summary['best_val_loss']} "
            f"(step {summary['best_step']}); model in {out_dir / 'model'}")
        return result(summary)

    run_file = out_dir / "mlflow_run_id"
    if summary and cfg.tracking.enabled and run_file.exists():  # trained; the server was down at its finish
        say(f"distill [{variant}]: already trained in {out_dir}; finishing its MLflow run")
        return finish({"uri": tracking_uri(cfg), "run_id": run_file.read_text().strip()}, summary)
    world = dcfg.resources.num_workers
    accum = accumulation_steps(dcfg.global_batch_size, dcfg.micro_batch_size, world)
    say(f"distill [{variant}]: {splits['train'].num_rows} train rows ({n_cf} counterfactual), "
        f"{splits['validation'].num_rows} validation rows; {world} worker(s) × micro {dcfg.micro_batch_size} "
        f"× accumulation {accum} = global batch {dcfg.global_batch_size}")

    # -- tokenise once (chat template, target masks): here for a small run, else with Ray Data, materialised
    # for every worker to read
    inline = runs_inline(cfg, rows.num_rows)
    if inline:
        tokenized_rows = tokenize_table(rows, cfg)
        stats = split_stats(tokenized_rows)
    else:
        from leaf_ray.distill.topk_cache import ensure_topk_cache
        from leaf_ray.raycluster import init_ray

        init_ray(cfg)
        tokenized = tokenized_dataset(rows, cfg)
        stats = dataset_stats(tokenized)
        datasets = {name: tokenized.filter(expr=f"split == '{name}'").select_columns(WORKER_COLUMNS).materialize()
                    for name, table in splits.items() if table.num_rows}
        if dcfg.teacher_mode == "topk_cache":
            ensure_topk_cache(cfg, rows, say)
    if stats.get("train.truncated"):
        say(f"[yellow]{stats['train.truncated']} training rows truncated to data.max_length="
            f"{cfg.data.max_length}[/yellow]")

    # -- MLflow: the run is opened here; rank 0 logs per-step metrics into it
    tracking = start_tracking(cfg, variant, out_dir, parent_run_id, stats, counterfactuals)

    try:
        with FileProgress(out_dir / "progress.json", f"distill [{variant}]", console):
            if inline:  # the same recipe on one rank in this process (``inline.py``)
                train_inline(cfg, variant, out_dir, tokenized_rows, tracking)
            else:
                torch_trainer(cfg, variant, out_dir, datasets, tracking).fit()
    except Exception:
        end_stage_run(tracking, status="FAILED")
        raise
    return finish(tracking, json.loads((out_dir / "summary.json").read_text()))


def torch_trainer(cfg: LeafConfig, variant: str, out_dir: Path, datasets: dict, tracking: dict[str, Any]):
    """Ray Train's ``TorchTrainer`` running :func:`train_worker` on ``distill.resources`` workers."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    dcfg = cfg.distill
    return TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg.dump(), "variant": variant, "out_dir": str(out_dir), "tracking": tracking},
        scaling_config=ScalingConfig(num_workers=dcfg.resources.num_workers, use_gpu=dcfg.resources.use_gpu,
                                     resources_per_worker=worker_resources(cfg)),
        # nccl on GPUs, gloo on CPUs; our own collectives follow leaf_ray.distributed's rule (tensor on the
        # group's device). A collective waiting past the timeout fails the attempt (retried from a checkpoint).
        torch_config=TorchConfig(backend=backend_for("cuda" if dcfg.resources.use_gpu else "cpu"),
                                 timeout_s=int(dcfg.resources.collective_timeout_s)),
        datasets=datasets,
        # Every worker reads the whole (small, tokenised) split and takes its share from the deterministic plan:
        # that keeps groups intact across ranks, gives every rank the same number of steps, and makes the
        # epoch order reproducible on resume (Ray Data's streaming split is neither).
        dataset_config=DataConfig(datasets_to_split=[]),
        run_config=RunConfig(name="ray", storage_path=str(out_dir),
                             failure_config=FailureConfig(max_failures=dcfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=dcfg.keep_checkpoints)),
    )


def variant_config(cfg: LeafConfig, variant: str) -> LeafConfig:
    """A copy of ``cfg`` for ``variant``: "kd" turns counterfactuals off (KD w/o mask)."""
    if variant not in VARIANT_SCOPES:
        raise DistillDataError(f"unknown variant {variant!r}; expected one of {sorted(VARIANT_SCOPES)}")
    cfg = cfg.model_copy(deep=True)
    if variant == "kd":
        cfg.distill.use_counterfactuals = False
    elif not cfg.distill.use_counterfactuals:
        raise DistillDataError(f"variant {variant!r} trains on counterfactuals but distill.use_counterfactuals is "
                               "false; use variant 'kd' for KD w/o mask")
    return cfg


def run_spec(cfg: LeafConfig, rows) -> dict:
    """What shapes training (not tracking, the crash hook or how many checkpoints are kept) and the rows, in
    their order: ``out_dir`` holds one run of one spec; resuming with another is refused, never mixed."""
    tree = cfg.dump()
    for key in ("tracking", "ray", "pipeline", "evaluation", "generation", "detection"):
        tree.pop(key, None)
    for key in ("fail_at_step", "max_failures", "keep_checkpoints"):
        tree["distill"].pop(key, None)
    tree["rows"] = {"count": rows.num_rows,
                    "row_keys_sha256": digest(rows.column("row_key").to_pylist(), ordered=True)}
    return tree


def check_same_run(out_dir: Path, cfg: LeafConfig, rows) -> None:
    check_same_spec(out_dir / "spec.json", run_spec(cfg, rows), lambda changed: DistillDataError(
        f"{out_dir} holds a distillation run with a different configuration or data ({changed}); resuming it "
        "would mix the two. Delete that directory or choose another run.name."))


def check_models(cfg: LeafConfig) -> None:
    """One tokenizer, both vocabularies covering it (clear error before any worker starts)."""
    from leaf_ray.models import check_pair

    check_pair(cfg.models)


def _split_mask(rows, split: str):
    return pc.equal(rows.column("split"), split)


def worker_resources(cfg: LeafConfig) -> dict[str, float]:
    res = cfg.distill.resources
    out = {"CPU": res.cpus_per_worker, **res.resources}
    if res.use_gpu:
        out["GPU"] = res.gpus_per_worker or 1.0
    return out


def tokenized_dataset(table, cfg: LeafConfig):
    """Ray Data: rows -> (chat template, tokens, target mask), materialised in the object store."""
    import ray

    from leaf_ray.distill.data import TokenizeBatch

    ds = ray.data.from_arrow(table).map_batches(
        TokenizeBatch, fn_constructor_kwargs={"tokenizer_ref": tokenizer_ref(cfg), "max_length": cfg.data.max_length},
        batch_format="pyarrow", batch_size=256, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1),
        num_cpus=0.5)
    return ds.select_columns(WORKER_COLUMNS + ["split", "length", "n_targets", "truncated"]).materialize()


def tokenizer_ref(cfg: LeafConfig) -> dict[str, str | None]:
    """The student's tokenizer as ``TokenizeBatch`` loads it."""
    ref = cfg.models.student
    return {"path": ref.path, "tokenizer_path": ref.tokenizer_path, "gguf_file": ref.gguf_file}


def tokenize_table(rows: pa.Table, cfg: LeafConfig) -> pa.Table:
    """:func:`tokenized_dataset`'s pass, done here on the whole table (a small run, ``inline.py``)."""
    from leaf_ray.distill.data import TokenizeBatch

    return TokenizeBatch(tokenizer_ref(cfg), cfg.data.max_length)(rows)


def dataset_stats(tokenized) -> dict[str, int]:
    """Row, token and truncation counts per split (logged to MLflow as ``data.*``)."""
    import ray

    return split_stats(pa.concat_tables(ray.get(tokenized.select_columns(STATS_COLUMNS).to_arrow_refs())))


STATS_COLUMNS = ["split", "is_counterfactual", "length", "n_targets", "truncated"]


def split_stats(t: pa.Table) -> dict[str, int]:
    """``dataset_stats`` of a tokenised table in memory."""
    out: dict[str, int] = {}
    for name in ("train", "validation"):
        part = t.filter(pc.equal(t.column("split"), name))
        out[f"{name}.rows"] = part.num_rows
        for col, key in (("is_counterfactual", "counterfactual_rows"), ("length", "tokens"),
                         ("n_targets", "target_tokens"), ("truncated", "truncated")):
            out[f"{name}.{key}"] = int(pc.sum(pc.cast(part.column(col), pa.int64())).as_py() or 0)
    return out


def start_tracking(cfg: LeafConfig, variant: str, out_dir: Path, parent_run_id: str | None,
                   stats: dict[str, int], counterfactuals) -> dict[str, Any]:
    """The variant's MLflow run (reopened when resuming an unfinished run of this directory): params, tags,
    the resolved config, the data counts and a sample of the counterfactuals it trains on."""
    tags = {"leaf_ray.variant": variant, "leaf_ray.stage": "distill", "leaf_ray.run": cfg.run.name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    tables = {}
    if counterfactuals is not None and counterfactuals.num_rows:
        used = [scope.split(":")[0] in VARIANT_SCOPES[variant]
                for scope in counterfactuals.column("scope").to_pylist()]
        sample = counterfactuals.filter(pa.array(used)).slice(0, 50)
        keep = [c for c in ("sample_id", "scope", "span_index", "char_start", "char_end", "removed_text",
                            "instruction", "response_prefix", "output") if c in sample.column_names]
        tables["counterfactuals_sample.json"] = sample.select(keep).to_pandas()
    return start_stage_run(cfg, run_name=f"{cfg.run.name}-{variant}", tags=tags,
                           run_file=out_dir / "mlflow_run_id", finished=out_dir / "summary.json",
                           params={"leaf_ray.variant": variant},
                           metrics={f"data.{k}": float(v) for k, v in stats.items()}, tables=tables)
