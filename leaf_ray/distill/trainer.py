"""Stage 2 of LeaF: hybrid-KL causal attention distillation on Ray Train + DeepSpeed (DESIGN §1 Stage 2).

Read this file top to bottom:

1. :func:`run_distillation` (the driver): picks the variant's rows (originals, + counterfactuals for LeaF),
   tokenises them with Ray Data, opens the MLflow run, runs a Ray Train ``TorchTrainer`` and returns where the
   exported student is.
2. :func:`train_worker` (every rank): a DeepSpeed student and a frozen teacher, resume from the last
   checkpoint, the epoch loop (:func:`train_step`), validation, checkpoints, the best-model export.
3. The helpers it calls, in that order.

The loss is :mod:`leaf_ray.distill.loss` (``L = λ·KL_orig + (1−λ)·KL_cf``), computed inside the module DeepSpeed
wraps (:class:`StudentWithLoss`; by default the student's logits are built per chunk of target positions, never
as a whole ``[B, T, V]`` tensor). The teacher (:mod:`leaf_ray.distill.teacher`) is frozen and replicated on
every rank, partitioned across ranks with ZeRO-3, or replaced by the offline top-k cache. The batch order is
:func:`leaf_ray.distill.data.plan_epoch`.

Optimisation (reference defaults, all in ``distill.*``): a client ``torch.optim.AdamW`` (weight decay 0) under
DeepSpeed ZeRO 0–3 (optionally offloaded), cosine schedule with warm-up, gradient clipping, gradient
accumulation with ``global_batch = micro_batch × accumulation × world_size``. One optimizer step is the mean of
the hybrid loss over its real micro-batches (:func:`micro_batch_weight`).

MLflow (rank 0 logs per-step metrics into the run the driver opened): params (flattened config, package
versions, git commit), ``loss``, ``kl_original``, ``kl_counterfactual``, ``lr``, ``grad_norm``, ``tokens_per_s``
(target tokens), ``val_loss``, the resolved config, a sample of the counterfactuals, the exported model.

Fault tolerance and its guarantee
---------------------------------
Every ``checkpoint_every_steps`` steps (and after every validation and at the end) each rank writes its
DeepSpeed state (``engine.save_checkpoint``: weights, optimizer, LR scheduler; ``client_state`` = step, epoch,
steps done in the epoch, best validation loss; plus its own RNG states) and reports it with
``ray.train.report``. After a worker failure Ray Train restarts the worker group (``FailureConfig``) and every
rank restores the latest checkpoint. Because an epoch's batch order is a pure function of ``(seed, epoch)``
and checkpoints are taken only at optimizer-step boundaries, the resumed run replans the epoch and skips the
steps already done: **within an epoch no sample is trained twice or skipped** (steps done after the last
checkpoint are lost with the crashed workers and redone from the checkpointed weights, so they count once).
Rerunning the same command after the driver itself was killed resumes the same way (same run directory); a
finished run is returned as it is. On a multi-node cluster the run directory (Ray Train's ``storage_path``, the
best-model export) must be shared storage, as Ray Train requires.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from leaf_ray.config import LeafConfig, config_from_dict
from leaf_ray.distill.data import (
    VARIANT_SCOPES,
    DistillDataError,
    TokenizedRows,
    collate,
    load_rows,
    padding_micro_batch,
    plan_epoch,
    steps_per_epoch,
)

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


# =========================================================================== 1. the driver


def run_distillation(cfg: LeafConfig, *, variant: str | None = None, console=None,
                     parent_run_id: str | None = None) -> DistillResult:
    """Distil the student for one variant ("kd" = KD w/o mask, "leaf_instr", "leaf_instr_resp").

    Outputs under ``<run dir>/distill/<variant>/``: ``model/`` (the best student by validation loss, a
    ``save_pretrained`` directory with the tokenizer), ``ray/`` (Ray Train checkpoints), ``summary.json``.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from leaf_ray.raycluster import init_ray

    variant = variant or ("leaf_instr" if cfg.distill.use_counterfactuals else "kd")
    cfg = variant_config(absolute_paths(cfg), variant)
    dcfg = cfg.distill
    out_dir = cfg.run.dir / "distill" / variant
    say = console.print if console is not None else (lambda *a, **k: None)

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
    world = dcfg.resources.num_workers
    accum = accumulation_steps(dcfg.global_batch_size, dcfg.micro_batch_size, world)
    say(f"distill [{variant}]: {splits['train'].num_rows} train rows ({n_cf} counterfactual), "
        f"{splits['validation'].num_rows} validation rows; {world} worker(s) × micro {dcfg.micro_batch_size} "
        f"× accumulation {accum} = global batch {dcfg.global_batch_size}")

    # -- Ray Data: tokenise once (chat template, target masks), materialised for every worker to read
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

    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg.dump(), "variant": variant, "out_dir": str(out_dir), "tracking": tracking},
        scaling_config=ScalingConfig(num_workers=world, use_gpu=dcfg.resources.use_gpu,
                                     resources_per_worker=worker_resources(cfg)),
        torch_config=TorchConfig(backend="nccl" if dcfg.resources.use_gpu else "gloo"),
        datasets=datasets,
        # Every worker reads the whole (small, tokenised) split and takes its share from the deterministic plan:
        # that keeps groups intact across ranks, gives every rank the same number of steps, and makes the
        # epoch order reproducible on resume (Ray Data's streaming split is neither).
        dataset_config=DataConfig(datasets_to_split=[]),
        run_config=RunConfig(name="ray", storage_path=str(out_dir),
                             failure_config=FailureConfig(max_failures=dcfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=dcfg.keep_checkpoints)),
    )
    try:
        trainer.fit()
    except Exception:
        end_tracking(tracking, status="FAILED")
        raise
    summary = json.loads((out_dir / "summary.json").read_text()) | {"mlflow_run_id": tracking.get("run_id")}
    finish_tracking(tracking, out_dir / "model", summary)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    say(f"distill [{variant}]: {summary['steps']} steps, best validation loss {summary['best_val_loss']} "
        f"(step {summary['best_step']}); model in {out_dir / 'model'}")
    return result(summary)


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


def check_same_run(out_dir: Path, cfg: LeafConfig, rows) -> None:
    """``out_dir`` holds at most one run: its config (what shapes training, not tracking or the crash hook) and
    row keys are fingerprinted; resuming with a different one is an error, never a silent mix."""
    import hashlib

    tree = cfg.dump()
    for key in ("tracking", "ray", "pipeline", "evaluation", "generation", "detection"):
        tree.pop(key, None)
    for key in ("fail_at_step", "max_failures", "keep_checkpoints"):
        tree["distill"].pop(key, None)
    tree["row_keys"] = rows.column("row_key").to_pylist()
    fingerprint = hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()
    out_dir.mkdir(parents=True, exist_ok=True)
    f = out_dir / "fingerprint"
    if f.exists() and f.read_text().strip() != fingerprint:
        raise DistillDataError(
            f"{out_dir} holds a distillation run with a different configuration or data; resuming it would mix "
            "the two. Delete that directory or choose another run.name.")
    f.write_text(fingerprint)


def absolute_paths(cfg: LeafConfig) -> LeafConfig:
    """Ray workers do not share the driver's working directory: make every path absolute."""
    cfg = cfg.model_copy(deep=True)
    cfg.run.root_dir = str(Path(cfg.run.root_dir).resolve())
    for ref in (cfg.models.teacher, cfg.models.student):
        ref.path = str(Path(ref.path).expanduser().resolve())
        if ref.tokenizer_path:
            ref.tokenizer_path = str(Path(ref.tokenizer_path).expanduser().resolve())
    if cfg.distill.topk_cache_dir:
        cfg.distill.topk_cache_dir = str(Path(cfg.distill.topk_cache_dir).expanduser().resolve())
    return cfg


def check_models(cfg: LeafConfig) -> None:
    """One tokenizer and a teacher vocabulary covering the student's (clear error before any worker starts)."""
    from transformers import AutoConfig

    from leaf_ray.models import check_distill_compatible, load_tokenizer

    t_cfg = AutoConfig.from_pretrained(cfg.models.teacher.path, local_files_only=True)
    s_cfg = AutoConfig.from_pretrained(cfg.models.student.path, local_files_only=True)
    check_distill_compatible(load_tokenizer(cfg.models.teacher), load_tokenizer(cfg.models.student),
                             t_cfg.vocab_size, s_cfg.vocab_size)


def _split_mask(rows, split: str):
    return pc.equal(rows.column("split"), split)


def accumulation_steps(global_batch: int, micro_batch: int, world: int) -> int:
    """global_batch = micro_batch × accumulation × world, exactly."""
    if global_batch % (micro_batch * world):
        raise DistillDataError(
            f"distill.global_batch_size={global_batch} is not a multiple of micro_batch_size × num_workers = "
            f"{micro_batch} × {world}")
    return global_batch // (micro_batch * world)


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

    ref = cfg.models.student
    tok_ref = {"path": ref.path, "tokenizer_path": ref.tokenizer_path, "gguf_file": ref.gguf_file}
    ds = ray.data.from_arrow(table).map_batches(
        TokenizeBatch, fn_constructor_kwargs={"tokenizer_ref": tok_ref, "max_length": cfg.data.max_length},
        batch_format="pyarrow", batch_size=256, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1),
        num_cpus=0.5)
    return ds.select_columns(WORKER_COLUMNS + ["split", "length", "n_targets", "truncated"]).materialize()


def ensure_topk_cache(cfg: LeafConfig, rows, say) -> None:
    """teacher_mode "topk_cache": (re)build the offline cache unless it already covers every row."""
    from leaf_ray.distill.topk_cache import TopKCacheLookup, build_topk_cache_for_config, cache_dir_for

    path = cache_dir_for(cfg)
    if path.exists():
        cached = TopKCacheLookup(path)
        missing = [k for k in rows.column("row_key").to_pylist() if k not in cached]
        if not missing:
            return
        say(f"top-k cache at {path} lacks {len(missing)} rows (e.g. {missing[0]!r}): rebuilding")
    say(f"building the teacher top-k cache (k={cfg.distill.topk}) at {path}")
    build_topk_cache_for_config(cfg, rows)


def dataset_stats(tokenized) -> dict[str, int]:
    """Row, token and truncation counts per split (logged to MLflow as ``data.*``)."""
    import ray

    cols = ["split", "is_counterfactual", "length", "n_targets", "truncated"]
    t = pa.concat_tables(ray.get(tokenized.select_columns(cols).to_arrow_refs()))
    out: dict[str, int] = {}
    for name in ("train", "validation"):
        part = t.filter(pc.equal(t.column("split"), name))
        out[f"{name}.rows"] = part.num_rows
        for col, key in (("is_counterfactual", "counterfactual_rows"), ("length", "tokens"),
                         ("n_targets", "target_tokens"), ("truncated", "truncated")):
            out[f"{name}.{key}"] = int(pc.sum(pc.cast(part.column(col), pa.int64())).as_py() or 0)
    return out


# =========================================================================== 2. every rank


@dataclass
class TrainState:
    """What a checkpoint restores besides DeepSpeed's own state (the data position is epoch + step_in_epoch)."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None


def train_worker(config: dict) -> None:
    import ray.train
    import torch.distributed as dist

    cfg = config_from_dict(config["cfg"], "train_loop_config")
    dcfg, variant, out_dir = cfg.distill, config["variant"], Path(config["out_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if dcfg.resources.torch_threads:
        torch.set_num_threads(dcfg.resources.torch_threads)
    if not dcfg.resources.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    t_start = time.perf_counter()
    # The crash-injection marker is read by every rank before any rank can write it (barrier below).
    inject_crash = dcfg.fail_at_step is not None and not (out_dir / "crash_injected").exists()

    # -- data: every rank holds the whole tokenised split, in a stable order; the plan picks its share
    train_rows = read_rows("train")
    val_rows = read_rows("validation")
    accum = accumulation_steps(dcfg.global_batch_size, dcfg.micro_batch_size, world)
    per_epoch = steps_per_epoch(len(train_rows), dcfg.micro_batch_size, world, accum)
    total_steps = min(dcfg.max_steps or per_epoch * dcfg.epochs, per_epoch * dcfg.epochs)

    # -- models: DeepSpeed student (client AdamW + schedule), frozen teacher signal
    from leaf_ray.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.models.student)
    engine = build_student(cfg, world, accum, total_steps)
    teacher = build_teacher(cfg, world, accum, engine.device)
    pad_id = tokenizer.pad_token_id

    # -- resume
    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = restore_checkpoint(engine, Path(ckpt_dir), rank)
    if rank == 0:
        prune_best_models(out_dir, keep=state.best_step)
    dist.barrier()
    logger = MetricLogger(config["tracking"]) if rank == 0 else None
    if rank == 0:
        print(f"[leaf-ray distill] rank 0 ready in {time.perf_counter() - t_start:.1f}s: {len(train_rows)} train / "
              f"{len(val_rows)} validation rows, {total_steps} steps ({per_epoch} per epoch), "
              f"{torch.get_num_threads()} torch thread(s)"
              + (f"; resumed at step {state.step} (epoch {state.epoch}, {state.step_in_epoch} steps into it)"
                 if checkpoint is not None else ""), flush=True)

    # -- the loop
    while state.step < total_steps:
        plan = plan_epoch(train_rows.group, train_rows.lengths, seed=cfg.run.seed, epoch=state.epoch,
                          micro_batch_size=dcfg.micro_batch_size, world_size=world, accum_steps=accum,
                          bucket_steps=dcfg.bucket_steps)
        for s in range(state.step_in_epoch, len(plan.steps)):
            metrics = train_step(engine, teacher, train_rows, plan, s, rank, world, accum, pad_id, dcfg)
            state.step += 1
            state.step_in_epoch = s + 1
            metrics["epoch"] = state.epoch + state.step_in_epoch / len(plan.steps)
            last = state.step >= total_steps
            end_of_epoch = state.step_in_epoch == len(plan.steps)
            validate_now = (dcfg.eval_every_steps and state.step % dcfg.eval_every_steps == 0) or (
                not dcfg.eval_every_steps and end_of_epoch) or last
            if validate_now and len(val_rows):
                metrics.update(validate(engine, teacher, val_rows, rank, world, accum, pad_id, dcfg))
                if state.best_val_loss is None or metrics["val_loss"] < state.best_val_loss:
                    state.best_val_loss, state.best_step = metrics["val_loss"], state.step
                    save_best_model(engine, out_dir, state.step, rank)
            if end_of_epoch:
                state.epoch += 1
                state.step_in_epoch = 0
            if logger:
                logger.log(metrics, state.step)
            if state.step % dcfg.checkpoint_every_steps == 0 or validate_now or last:
                save_checkpoint(engine, state, rank, metrics)
                if rank == 0:
                    prune_best_models(out_dir, keep=state.best_step)
            if inject_crash and state.step == dcfg.fail_at_step:
                dist.barrier()
                if rank == 0:
                    (out_dir / "crash_injected").write_text(f"crashed after step {state.step}\n")
                raise RuntimeError(f"distill.fail_at_step={dcfg.fail_at_step}: injected crash (first attempt)")
            if last:
                break

    # -- export: the best student by validation loss (the final one when there is no validation split)
    if not len(val_rows):
        state.best_step = state.step
        save_best_model(engine, out_dir, state.step, rank)
    dist.barrier()
    if rank == 0:
        export_best_model(out_dir, state, tokenizer, variant)
        summary = {"steps": state.step, "best_val_loss": state.best_val_loss, "best_step": state.best_step,
                   "steps_per_epoch": per_epoch, "world_size": world, "accumulation_steps": accum}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    dist.barrier()


def read_rows(split: str) -> TokenizedRows:
    import ray.train

    try:
        shard = ray.train.get_dataset_shard(split)
    except KeyError:  # an empty split is not passed to the trainer
        shard = None
    if shard is None:
        return TokenizedRows([], [], np.zeros(0, dtype=bool), [], [])
    return TokenizedRows.from_batches(shard.iter_batches(batch_size=1024, batch_format="pyarrow"))


# =========================================================================== 3. helpers, in call order

# ---- models


def deepspeed_config(cfg: LeafConfig, world: int, accum: int, *, zero_stage: int, precision: str,
                     trains: bool = True) -> dict[str, Any]:
    dcfg, ds = cfg.distill, cfg.distill.deepspeed
    zero: dict[str, Any] = {"stage": zero_stage}
    if trains and ds.offload_optimizer and zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_param and zero_stage == 3:
        zero["offload_param"] = {"device": "cpu"}
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": dcfg.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": dcfg.micro_batch_size * accum * world,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if trains:
        conf.update({"gradient_clipping": dcfg.max_grad_norm,
                     # a client torch AdamW: nothing is JIT-compiled (DeepSpeed's own CPU Adam would be)
                     "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False})
    if precision == "bf16":
        conf["bf16"] = {"enabled": True}
    elif precision == "fp16":
        conf["fp16"] = {"enabled": True}
    return conf


class StudentWithLoss(torch.nn.Module):
    """The student LM and the hybrid KL as one module: DeepSpeed's engine wraps the whole loss computation
    (its backward hooks then sit on the loss itself).

    ``chunked_head``: the student's logits are built per chunk of target positions from the final hidden states
    and the LM head (:func:`hybrid_kl_from_hidden`), so no ``[B, T, V]`` logits tensor exists. Otherwise (ZeRO-3,
    whose LM head is partitioned; heads with soft-capping or scaling) the model's own logits are used.
    """

    def __init__(self, model, dcfg, chunked_head: bool):
        super().__init__()
        self.model = model
        self.chunked_head = chunked_head
        self.loss_kwargs = dict(lambda_=dcfg.lambda_, temperature=dcfg.temperature, weighting=dcfg.weighting,
                                chunk_size=dcfg.chunk_size)

    def forward(self, input_ids, attention_mask, target_mask, is_counterfactual, teacher) -> dict:
        from leaf_ray.distill.loss import hybrid_kl_from_hidden, hybrid_kl_loss

        if self.chunked_head:
            hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                              use_cache=False).last_hidden_state
            head = self.model.get_output_embeddings()
            kl = hybrid_kl_from_hidden(hidden, head.weight, teacher, target_mask, is_counterfactual,
                                       lm_head_bias=head.bias, **self.loss_kwargs)
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            kl = hybrid_kl_loss(logits, teacher, target_mask, is_counterfactual, **self.loss_kwargs)
        return dict(vars(kl))  # a dict: DeepSpeed hooks the tensors of dicts/tuples, not of dataclasses


def can_chunk_head(model, zero_stage: int) -> bool:
    """Plain linear LM heads whose weight is whole on every rank (not ZeRO-3)."""
    cfg = model.config
    capped = getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1.0)
    return zero_stage < 3 and not capped and isinstance(model.get_output_embeddings(), torch.nn.Linear)


def build_student(cfg: LeafConfig, world: int, accum: int, total_steps: int, *, with_loss: bool = True):
    """The student as a DeepSpeed engine with a client AdamW and a warm-up + decay LR schedule.

    ``with_loss``: the engine wraps :class:`StudentWithLoss` (the trainer); else the bare LM (benchmarks)."""
    from leaf_ray.distill.ds_ops import import_deepspeed

    deepspeed = import_deepspeed()
    from transformers import get_scheduler

    from leaf_ray.models import load_model

    dcfg = cfg.distill
    model = load_model(cfg.models.student, dtype="float32")
    model.config.use_cache = False
    if with_loss:
        chunked = dcfg.chunked_lm_head and can_chunk_head(model, dcfg.deepspeed.zero_stage)
        model = StudentWithLoss(model, dcfg, chunked_head=chunked)
    optimizer = torch.optim.AdamW(model.parameters(), lr=dcfg.lr, weight_decay=dcfg.weight_decay)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[dcfg.scheduler]
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=dcfg.warmup_steps, num_training_steps=total_steps)
    conf = deepspeed_config(cfg, world, accum, zero_stage=dcfg.deepspeed.zero_stage,
                            precision=dcfg.deepspeed.precision)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=conf)
    engine.train()
    return engine


def build_teacher(cfg: LeafConfig, world: int, accum: int, device):
    """The frozen teacher signal: replicated module, ZeRO-3 partitioned module, or the offline top-k cache."""
    from leaf_ray.distill.ds_ops import import_deepspeed
    from leaf_ray.distill.teacher import OnlineTeacher
    from leaf_ray.models import load_model

    mode = cfg.distill.teacher_mode
    if mode == "topk_cache":
        from leaf_ray.distill.topk_cache import cache_dir_for, load_topk_teacher

        return load_topk_teacher(cache_dir_for(cfg))
    model = load_model(cfg.models.teacher)
    model.requires_grad_(False)
    model.eval()
    if mode == "replicated":
        model.to(device)
        if can_chunk_head(model, zero_stage=0):
            return TargetLogitsTeacher(model)
    else:
        precision = {"bfloat16": "bf16", "float16": "fp16"}.get(cfg.models.teacher.dtype, "fp32")
        conf = deepspeed_config(cfg, world, accum, zero_stage=3, precision=precision, trains=False)
        model, _, _, _ = import_deepspeed().initialize(model=model, config=conf)
        model.eval()
    return OnlineTeacher(model)


class TargetLogitsTeacher:
    """The replicated online teacher, returning its logits only where the loss reads them.

    The loss visits position ``t − 1`` of every target token ``t`` (row-major, see :mod:`leaf_ray.distill.loss`);
    the teacher's LM head runs on those hidden states only and the result is packed ``[N, V]``
    (:class:`~leaf_ray.distill.teacher.TeacherLogits`, packed layout). Prompt and padding positions never get
    teacher logits, and no ``[B, T, V]`` teacher tensor exists. Values equal the full forward's.
    """

    def __init__(self, model):
        self.model = model.eval()

    def __call__(self, input_ids, attention_mask, target_mask, keys=None):
        from leaf_ray.distill.teacher import TeacherLogits

        with torch.no_grad():
            hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                              use_cache=False).last_hidden_state
            rows, positions = (target_mask[:, 1:] != 0).nonzero(as_tuple=True)  # position t − 1 of target t
            return TeacherLogits(self.model.get_output_embeddings()(hidden[rows, positions]))


# ---- one optimizer step


def micro_batch_weight(n_real: int, world: int, accum: int) -> float:
    """Loss multiplier of a real micro-batch so that the step's gradient is the mean over its real ones.

    DeepSpeed divides every micro-batch loss by ``accum`` and averages gradients over ``world`` ranks, i.e.
    it averages over ``world·accum`` micro-batches. When only ``n_real`` of them are real (the last step of an
    epoch; the rest are zero-weight padding) scaling by ``world·accum / n_real`` gives Σ_real grad / n_real.
    """
    return world * accum / n_real


def batch_loss(engine, teacher, batch):
    """The KLOutput of one micro-batch: student and teacher see the same input ids."""
    from leaf_ray.distill.loss import KLOutput

    batch = {k: v.to(engine.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    teacher_batch = teacher(batch["input_ids"], batch["attention_mask"], batch["target_mask"], batch["row_keys"])
    out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 target_mask=batch["target_mask"], is_counterfactual=batch["is_counterfactual"],
                 teacher=teacher_batch)
    return KLOutput(**out)


def train_step(engine, teacher, rows: TokenizedRows, plan, step_index: int, rank: int, world: int, accum: int,
               pad_id: int, dcfg) -> dict[str, float]:
    """Run this rank's ``accum`` micro-batches of optimizer step ``step_index``; return the step's metrics
    aggregated over all ranks."""

    t0 = time.perf_counter()
    lr = float(engine.get_lr()[0])  # the rate this step's update uses (the scheduler advances in step())
    n_real = plan.real_micro_batches(step_index)
    weight = micro_batch_weight(n_real, world, accum)
    sums = StepSums()
    grad_norm = None
    for slot in plan.steps[step_index]:
        indices = slot[rank]
        batch = collate(rows, indices, pad_id) if indices is not None else padding_micro_batch(rows, pad_id)
        kl = batch_loss(engine, teacher, batch)
        # A padding micro-batch has no targets: its loss is a graph-connected 0 (all ranks must run backward).
        engine.backward(kl.loss * (weight if indices is not None else 0.0))
        if engine.is_gradient_accumulation_boundary() and dcfg.deepspeed.zero_stage == 0:
            grad_norm = plain_grad_norm(engine)  # ZeRO-0 fp32 does not record it; grads are all-reduced here
        engine.step()
        if indices is not None:
            sums.add(kl, batch)
    grad_norm = engine.get_global_grad_norm() if engine.get_global_grad_norm() is not None else grad_norm
    totals = sums.all_reduce()
    seconds = time.perf_counter() - t0
    target_tokens = totals["n_original"] + totals["n_counterfactual"]
    return {
        "loss": totals["loss"] / max(totals["micro_batches"], 1),
        "kl_original": totals["kl_original"] / max(totals["n_original"], 1),
        "kl_counterfactual": totals["kl_counterfactual"] / max(totals["n_counterfactual"], 1),
        "lr": lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "tokens_per_s": target_tokens / seconds,
        "target_tokens": target_tokens,
        "padding_fraction": 1.0 - totals["tokens"] / max(totals["padded_tokens"], 1),
        "step_seconds": seconds,
    }


@dataclass
class StepSums:
    """Per-rank sums, all-reduced into step metrics (token-weighted KL means, micro-batch-mean loss)."""

    values: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ["loss", "micro_batches", "kl_original", "n_original", "kl_counterfactual", "n_counterfactual", "tokens",
         "padded_tokens"], 0.0))

    def add(self, kl, batch) -> None:
        v = self.values
        v["loss"] += float(kl.loss.detach())
        v["micro_batches"] += 1
        v["kl_original"] += float(kl.kl_original) * kl.n_original_tokens
        v["n_original"] += kl.n_original_tokens
        v["kl_counterfactual"] += float(kl.kl_counterfactual) * kl.n_counterfactual_tokens
        v["n_counterfactual"] += kl.n_counterfactual_tokens
        v["tokens"] += batch["n_tokens"]
        v["padded_tokens"] += batch["input_ids"].numel()

    def all_reduce(self) -> dict[str, float]:
        import torch.distributed as dist

        keys = list(self.values)
        t = torch.tensor([self.values[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return dict(zip(keys, t.tolist()))


def plain_grad_norm(engine) -> float:

    norms = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


# ---- validation


def validate(engine, teacher, rows: TokenizedRows, rank: int, world: int, accum: int, pad_id: int,
             dcfg) -> dict[str, float]:
    """Validation loss over the whole validation split, independent of batching and world size:

    ``val_loss = λ · mean_{orig tokens} KL + (1−λ) · mean_{cf tokens} KL`` (weighting "lambda"; a kind absent
    from the split gives 0), or ``Σ KL / N`` over all target tokens (weighting "per_token").
    """

    plan = plan_epoch(rows.group, rows.lengths, seed=0, epoch=0, micro_batch_size=dcfg.micro_batch_size,
                      world_size=world, accum_steps=accum, bucket_steps=dcfg.bucket_steps, shuffle=False)
    sums = StepSums()
    engine.eval()
    with torch.no_grad():
        for step in plan.steps:
            for slot in step:
                indices = slot[rank]
                batch = collate(rows, indices, pad_id) if indices is not None else padding_micro_batch(rows, pad_id)
                kl = batch_loss(engine, teacher, batch)
                if indices is not None:
                    sums.add(kl, batch)
    engine.train()
    t = sums.all_reduce()
    kl_o = t["kl_original"] / max(t["n_original"], 1)
    kl_c = t["kl_counterfactual"] / max(t["n_counterfactual"], 1)
    if dcfg.weighting == "lambda":
        val_loss = dcfg.lambda_ * kl_o + (1 - dcfg.lambda_) * kl_c
    else:
        val_loss = (t["kl_original"] + t["kl_counterfactual"]) / max(t["n_original"] + t["n_counterfactual"], 1)
    return {"val_loss": val_loss, "val_kl_original": kl_o, "val_kl_counterfactual": kl_c,
            "val_target_tokens": t["n_original"] + t["n_counterfactual"]}


# ---- checkpoints


def save_checkpoint(engine, state: TrainState, rank: int, metrics: dict[str, float]) -> None:
    """Every rank writes its DeepSpeed shard (+ RNG states) and reports it; Ray merges the ranks' files."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory(prefix="leaf-ray-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=f"step{state.step:07d}", client_state={"leaf_ray": asdict(state)})
        torch.save(rng_states(), Path(tmp) / f"rng_rank{rank}.pt")
        report = {k: v for k, v in metrics.items() if isinstance(v, (int, float))} | {"step": state.step}
        ray.train.report(report, checkpoint=Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint-step{state.step:07d}")


def restore_checkpoint(engine, ckpt_dir: Path, rank: int) -> TrainState:
    """DeepSpeed weights, optimizer and LR scheduler; step and data position; this rank's RNG states."""

    load_path, client_state = engine.load_checkpoint(str(ckpt_dir), load_optimizer_states=True,
                                                     load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"no DeepSpeed checkpoint found in {ckpt_dir}")
    rng_file = ckpt_dir / f"rng_rank{rank}.pt"
    if rng_file.exists():
        set_rng_states(torch.load(rng_file, weights_only=False))
    return TrainState(**client_state["leaf_ray"])


def rng_states() -> dict[str, Any]:

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_states(states: dict[str, Any]) -> None:

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


# ---- best model and export


def consolidated_state_dict(engine) -> dict | None:
    """The full student LM weights on rank 0 (gathered from the ZeRO-3 partitions; a collective call)."""
    import torch.distributed as dist

    if engine.zero_optimization_partition_weights():
        full = engine._zero3_consolidated_16bit_state_dict()
    else:
        full = engine.module.state_dict() if dist.get_rank() == 0 else None
    if full is None:
        return None
    # The engine wraps StudentWithLoss: its LM is the `model.` sub-module.
    return {k.removeprefix("model."): v for k, v in full.items()}


def save_best_model(engine, out_dir: Path, step: int, rank: int) -> None:
    """``<out>/best/step-N`` (atomic rename); every rank joins the consolidation."""
    state_dict = consolidated_state_dict(engine)
    if rank != 0:
        return
    final = out_dir / "best" / f"step-{step:07d}"
    tmp = out_dir / "best" / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    engine.module.model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def prune_best_models(out_dir: Path, keep: int | None) -> None:
    """Keep only the best model the restored/latest state points to (a crashed attempt may leave newer ones)."""
    best = out_dir / "best"
    if not best.exists():
        return
    for d in best.iterdir():
        if keep is None or d.name != f"step-{keep:07d}":
            shutil.rmtree(d, ignore_errors=True)


def export_best_model(out_dir: Path, state: TrainState, tokenizer, variant: str) -> Path:
    """Move the best model to ``<out>/model`` with the tokenizer and a provenance file."""
    export = out_dir / "model"
    src = out_dir / "best" / f"step-{state.best_step:07d}"
    info_file = export / "leaf_ray_export.json"
    if not src.exists():
        if info_file.exists() and json.loads(info_file.read_text()).get("step") == state.best_step:
            return export  # a rerun of a finished run: already exported
        raise RuntimeError(f"best model for step {state.best_step} missing at {src}")
    shutil.rmtree(export, ignore_errors=True)
    src.rename(export)
    tokenizer.save_pretrained(export)
    info_file.write_text(json.dumps({"variant": variant, "step": state.best_step,
                                     "val_loss": state.best_val_loss, "steps": state.step}, indent=2))
    return export


# ---- MLflow


def start_tracking(cfg: LeafConfig, variant: str, out_dir: Path, parent_run_id: str | None,
                   stats: dict[str, int], counterfactuals) -> dict[str, Any]:
    """Open (or, when resuming an unfinished run of this directory, reopen) the MLflow run; log params,
    tags, the resolved config and a sample of the counterfactuals. -> {"uri", "run_id"} for the workers."""
    if not cfg.tracking.enabled:
        return {}
    from leaf_ray.tracking import log_config, setup_mlflow

    mlflow = setup_mlflow(cfg)
    client = mlflow.MlflowClient()
    run_file = out_dir / "mlflow_run_id"
    if run_file.exists() and not (out_dir / "summary.json").exists():
        run_id = run_file.read_text().strip()
        client.update_run(run_id, status="RUNNING")
        return {"uri": mlflow.get_tracking_uri(), "run_id": run_id}
    (out_dir / "summary.json").unlink(missing_ok=True)
    tags = {"leaf_ray.variant": variant, "leaf_ray.stage": "distill", "leaf_ray.run": cfg.run.name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    run = client.create_run(experiment.experiment_id, run_name=f"{cfg.run.name}-{variant}", tags=tags)
    run_id = run.info.run_id
    run_file.write_text(run_id)
    with mlflow.start_run(run_id=run_id):
        log_config(cfg)
        mlflow.log_params({"leaf_ray.variant": variant})
        mlflow.log_metrics({f"data.{k}": float(v) for k, v in stats.items()})
        if counterfactuals is not None and counterfactuals.num_rows:
            used = [scope.split(":")[0] in VARIANT_SCOPES[variant]
                    for scope in counterfactuals.column("scope").to_pylist()]
            sample = counterfactuals.filter(pa.array(used)).slice(0, 50)
            keep = [c for c in ("sample_id", "scope", "span_index", "char_start", "char_end", "removed_text",
                                "instruction", "response_prefix", "output") if c in sample.column_names]
            mlflow.log_table(sample.select(keep).to_pandas(), "counterfactuals_sample.json")
    return {"uri": mlflow.get_tracking_uri(), "run_id": run_id}


class MetricLogger:
    """Rank 0's per-step metrics into the driver's MLflow run."""

    def __init__(self, tracking: dict[str, Any]):
        self.run_id = tracking.get("run_id")
        self.client = None
        if self.run_id:
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking["uri"])

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))]
        self.client.log_batch(self.run_id, metrics=batch)


def finish_tracking(tracking: dict[str, Any], export_dir: Path, summary: dict[str, Any]) -> None:
    if not tracking:
        return
    import mlflow

    mlflow.set_tracking_uri(tracking["uri"])
    with mlflow.start_run(run_id=tracking["run_id"]):
        if summary.get("best_val_loss") is not None:
            mlflow.log_metric("best_val_loss", summary["best_val_loss"])
        mlflow.log_metric("best_step", summary["best_step"])
        mlflow.log_metric("steps", summary["steps"])
        mlflow.log_artifacts(str(export_dir), artifact_path="model")
        mlflow.log_dict(summary, "summary.json")
    end_tracking(tracking, status="FINISHED")


def end_tracking(tracking: dict[str, Any], status: str) -> None:
    if not tracking:
        return
    from mlflow import MlflowClient

    MlflowClient(tracking["uri"]).set_terminated(tracking["run_id"], status=status)
