"""Stage 2 of LeaF: hybrid-KL causal attention distillation on Ray Train + DeepSpeed (docs/design.md §1.5).

The driver (:func:`leaf_ray.distill.driver.run_distillation`: the variant's rows, Ray Data tokenising, the MLflow
run, the ``TorchTrainer``) starts :func:`train_worker` on every rank. Read this file top to bottom:

1. :func:`train_worker` and :class:`DistillRecipe`, in the torchtune manner: ``setup`` (a DeepSpeed student, a
   frozen teacher, the rows, the world, resumed from the last checkpoint), ``train`` (the epoch loop of
   ``train_step``), ``validate``, ``save_checkpoint`` / ``save_best``, ``export``.
2. The helpers of one optimizer step. The engines are built in :mod:`leaf_ray.distill.engines`, RNG states,
   best-model weights and the export in :mod:`leaf_ray.distill.checkpoints`.

The loss is :mod:`leaf_ray.distill.loss` (``L = λ·KL_orig + (1−λ)·KL_cf``), computed inside the module DeepSpeed
wraps (:class:`leaf_ray.distill.engines.StudentWithLoss`; by default the student's logits are built per chunk of target positions, never
as a whole ``[B, T, V]`` tensor). The teacher (:mod:`leaf_ray.distill.teacher`) is frozen and replicated on
every rank, partitioned across ranks with ZeRO-3, or replaced by the offline top-k cache. The batch order is
:func:`leaf_ray.distill.data.plan_epoch`.

Optimisation (reference defaults, all in ``distill.*``): a client ``torch.optim.AdamW`` (weight decay 0) under
DeepSpeed ZeRO 0–3 (optionally offloaded), cosine schedule with warm-up, gradient clipping, gradient
accumulation with ``global_batch = micro_batch × accumulation × world_size``. One optimizer step is the mean of
the hybrid loss over its real micro-batches (:func:`micro_batch_weight`).

MLflow (rank 0 logs per-step metrics into the run the driver opened): params (flattened config, package
versions, git commit), ``loss``, ``kl_original``, ``kl_counterfactual``, ``lr``, ``grad_norm``, ``tokens_per_s``
(target tokens), ``kl_per_token``, ``val_loss``, the resolved config, a sample of the counterfactuals, the
exported model; on-policy steps add ``sampled_length``, ``teacher_logprob``, ``student_logprob``,
``on_policy_share`` and ``sample_seconds``.

On-policy (``distill.policy: on | mixed``, :mod:`leaf_ray.distill.onpolicy`): in an on-policy accumulation slot
every rank's micro-batch is replaced by the student's own samples for its prompts (the sampler's RNG state is
saved with each checkpoint); the teacher scores them and the same loss trains on them. Validation always
scores the dataset's responses.

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

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leaf_ray.config import LeafConfig, config_from_dict
from leaf_ray.distill.checkpoints import (
    consolidated_state_dict,
    export_best_model,
    prune_best_models,
    rng_states,
    set_rng_states,
)
from leaf_ray.distill.data import (
    DistillDataError,
    TokenizedRows,
    collate,
    padding_micro_batch,
    plan_epoch,
    steps_per_epoch,
)
from leaf_ray.distill.engines import build_student, build_teacher
from leaf_ray.distill.onpolicy import build_sampler, on_policy_slot, prompts_of, sampled_batch
from leaf_ray.distributed import barrier, deepspeed_accelerator, ray_train_device


def accumulation_steps(global_batch: int, micro_batch: int, world: int) -> int:
    """global_batch = micro_batch × accumulation × world, exactly."""
    if global_batch % (micro_batch * world):
        raise DistillDataError(
            f"distill.global_batch_size={global_batch} is not a multiple of micro_batch_size × num_workers = "
            f"{micro_batch} × {world}")
    return global_batch // (micro_batch * world)



# =========================================================================== 1. every rank: the recipe


@dataclass
class TrainState:
    """What a checkpoint restores besides DeepSpeed's own state (the data position is epoch + step_in_epoch)."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None


@dataclass(frozen=True)
class World:
    """This rank, the number of ranks, and the micro-batches each rank accumulates per optimizer step."""

    rank: int
    size: int
    accum: int
    device: str = "cpu"  # where this rank computes (leaf_ray.distributed): the engines are built there


def train_worker(config: dict) -> None:
    """Ray Train's loop on every rank: the recipe set up (and resumed from the latest checkpoint), trained, and
    its best student exported."""
    import ray.train

    cfg = config_from_dict(config["cfg"], "train_loop_config")
    dcfg = cfg.distill
    if dcfg.resources.torch_threads:
        torch.set_num_threads(dcfg.resources.torch_threads)
    # The GPU Ray Train assigned to this worker, made current, and DeepSpeed's accelerator to match it.
    device = ray_train_device(dcfg.resources.use_gpu)
    deepspeed_accelerator(device)
    ctx = ray.train.get_context()
    size = ctx.get_world_size()
    world = World(ctx.get_world_rank(), size, accumulation_steps(dcfg.global_batch_size, dcfg.micro_batch_size,
                                                                 size), device=str(device))
    # Every rank holds the whole tokenised split, in a stable order; the epoch plan picks its share.
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as ckpt_dir:
        recipe = DistillRecipe.setup(cfg, world, read_rows("train"), read_rows("validation"),
                                     out_dir=Path(config["out_dir"]), variant=config["variant"],
                                     tracking=config["tracking"], checkpoint_dir=ckpt_dir and Path(ckpt_dir),
                                     report=ray_train_report)
    recipe.train()
    recipe.export()


def ray_train_report(metrics: dict[str, float], checkpoint_dir: Path, name: str) -> None:
    """Hand a written checkpoint to Ray Train (it merges the ranks' files into the run's storage)."""
    import ray.train
    from ray.train import Checkpoint

    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(checkpoint_dir)), checkpoint_dir_name=name)


def read_rows(split: str) -> TokenizedRows:
    import ray.train

    try:
        shard = ray.train.get_dataset_shard(split)
    except KeyError:  # an empty split is not passed to the trainer
        shard = None
    if shard is None:
        return no_rows()
    return TokenizedRows.from_batches(shard.iter_batches(batch_size=1024, batch_format="pyarrow"))


def no_rows() -> TokenizedRows:
    return TokenizedRows([], [], np.zeros(0, dtype=bool), [], [])


def step_counts(dcfg, n_train: int, world: World) -> tuple[int, int]:
    """(optimizer steps per epoch, steps of the whole run: `max_steps` if sooner than the last epoch's end)."""
    per_epoch = steps_per_epoch(n_train, dcfg.micro_batch_size, world.size, world.accum)
    return per_epoch, min(dcfg.max_steps or per_epoch * dcfg.epochs, per_epoch * dcfg.epochs)


class DistillRecipe:
    """One rank's distillation, in the torchtune manner: :meth:`setup` builds what the recipe holds (the
    DeepSpeed student engine, the frozen teacher signal, the tokenised rows, the world, the train state),
    :meth:`train` runs the epoch loop (:meth:`train_step`, :meth:`validate`, :meth:`save_checkpoint`,
    :meth:`save_best`), :meth:`export` writes the best student. Built directly from an engine and a teacher
    (benchmarks), it runs steps only."""

    def __init__(self, cfg: LeafConfig, world: World, *, engine, teacher, train_rows: TokenizedRows,
                 pad_id: int, val_rows: TokenizedRows | None = None, tokenizer=None, out_dir: Path | None = None,
                 variant: str | None = None, logger=None,
                 report: Callable[[dict[str, float], Path, str], None] | None = None, sampler=None):
        self.cfg, self.dcfg, self.world = cfg, cfg.distill, world
        self.report = report or ray_train_report  # where a written checkpoint goes (Ray Train, or a local dir)
        self.engine, self.teacher, self.pad_id, self.tokenizer = engine, teacher, pad_id, tokenizer
        self.train_rows, self.val_rows = train_rows, val_rows if val_rows is not None else no_rows()
        self.out_dir, self.variant, self.logger = out_dir, variant, logger
        self.per_epoch, self.total_steps = step_counts(self.dcfg, len(train_rows), world)
        self.state = TrainState()
        self.inject_crash = False
        # distill.policy on / mixed: who samples the student's responses (leaf_ray/distill/onpolicy.py)
        self.sampler = sampler

    # ---- setup

    @classmethod
    def setup(cls, cfg: LeafConfig, world: World, train_rows: TokenizedRows, val_rows: TokenizedRows, *,
              out_dir: Path, variant: str, tracking: dict[str, Any], checkpoint_dir: Path | None = None,
              report: Callable[[dict[str, float], Path, str], None] | None = None) -> DistillRecipe:
        from leaf_ray.models import load_tokenizer
        from leaf_ray.tracking import MetricLogger, pending_metrics_file

        t_start = time.perf_counter()
        dcfg = cfg.distill
        # The crash-injection marker is read by every rank before any rank can write it (barrier below).
        inject_crash = dcfg.fail_at_step is not None and not (out_dir / "crash_injected").exists()
        # -- models: DeepSpeed student (client AdamW + schedule), frozen teacher signal
        tokenizer = load_tokenizer(cfg.models.student)
        engine = build_student(cfg, world.size, world.accum, step_counts(dcfg, len(train_rows), world)[1],
                               device=world.device)
        teacher = build_teacher(cfg, world.size, world.accum, engine.device)
        sampler = build_sampler(cfg, engine, tokenizer, world.rank, world.size) if dcfg.policy != "off" else None
        recipe = cls(cfg, world, engine=engine, teacher=teacher, train_rows=train_rows, val_rows=val_rows,
                     pad_id=tokenizer.pad_token_id, tokenizer=tokenizer, out_dir=out_dir, variant=variant,
                     logger=MetricLogger(tracking, pending_metrics_file(out_dir)) if world.rank == 0 else None,
                     report=report, sampler=sampler)
        recipe.inject_crash = inject_crash
        # -- resume
        if checkpoint_dir is not None:
            recipe.restore_checkpoint(checkpoint_dir)
        if world.rank == 0:
            prune_best_models(out_dir, keep=recipe.state.best_step)
        barrier()
        if world.rank == 0:
            state = recipe.state
            print(f"[leaf-ray distill] rank 0 ready in {time.perf_counter() - t_start:.1f}s: {len(train_rows)} "
                  f"train / {len(val_rows)} validation rows, {recipe.total_steps} steps ({recipe.per_epoch} per "
                  f"epoch), {torch.get_num_threads()} torch thread(s)"
                  + (f"; resumed at step {state.step} (epoch {state.epoch}, {state.step_in_epoch} steps into it)"
                     if checkpoint_dir is not None else ""), flush=True)
        return recipe

    # ---- train

    def plan(self, epoch: int):
        rows, dcfg = self.train_rows, self.dcfg
        return plan_epoch(rows.group, rows.lengths, seed=self.cfg.run.seed, epoch=epoch,
                          micro_batch_size=dcfg.micro_batch_size, world_size=self.world.size,
                          accum_steps=self.world.accum, bucket_steps=dcfg.bucket_steps)

    def train(self) -> None:
        """From the restored position to `total_steps`: validation, checkpoints and the best model on their
        schedule, the crash hook (`distill.fail_at_step`) once."""
        state, dcfg = self.state, self.dcfg
        while state.step < self.total_steps:
            plan = self.plan(state.epoch)
            for s in range(state.step_in_epoch, len(plan.steps)):
                metrics = self.train_step(plan, s)
                state.step += 1
                state.step_in_epoch = s + 1
                metrics["epoch"] = state.epoch + state.step_in_epoch / len(plan.steps)
                last = state.step >= self.total_steps
                end_of_epoch = state.step_in_epoch == len(plan.steps)
                validate_now = (dcfg.eval_every_steps and state.step % dcfg.eval_every_steps == 0) or (
                    not dcfg.eval_every_steps and end_of_epoch) or last
                if validate_now and len(self.val_rows):
                    metrics.update(self.validate())
                    if state.best_val_loss is None or metrics["val_loss"] < state.best_val_loss:
                        state.best_val_loss, state.best_step = metrics["val_loss"], state.step
                        self.save_best()
                if end_of_epoch:
                    state.epoch += 1
                    state.step_in_epoch = 0
                if self.logger:
                    self.logger.log(metrics, state.step)
                    self.write_progress(metrics)
                if state.step % dcfg.checkpoint_every_steps == 0 or validate_now or last:
                    self.save_checkpoint(metrics)
                    if self.world.rank == 0:
                        prune_best_models(self.out_dir, keep=state.best_step)
                if self.inject_crash and state.step == dcfg.fail_at_step:
                    barrier()
                    if self.world.rank == 0:
                        (self.out_dir / "crash_injected").write_text(f"crashed after step {state.step}\n")
                    raise RuntimeError(f"distill.fail_at_step={dcfg.fail_at_step}: injected crash (first attempt)")
                if last:
                    break

    def write_progress(self, metrics: dict[str, float]) -> None:
        """Rank 0's position for the driver's progress line (`<out>/progress.json`, replaced atomically)."""
        from leaf_ray.store import write_json_atomic

        write_json_atomic(self.out_dir / "progress.json", {
            "step": self.state.step, "total_steps": self.total_steps, "loss": metrics.get("loss"),
            "val_loss": self.state.best_val_loss, "tokens_per_s": metrics.get("tokens_per_s")})

    def micro_batch(self, rows: TokenizedRows, indices):
        """The collated rows of one slot of the plan; a zero-weight padding batch where this rank has none."""
        if indices is None:
            return padding_micro_batch(rows, self.pad_id)
        return collate(rows, indices, self.pad_id)

    def train_step(self, plan, step_index: int) -> dict[str, float]:
        """Run this rank's ``accum`` micro-batches of optimizer step ``step_index``; return the step's metrics
        aggregated over all ranks."""
        engine, world = self.engine, self.world
        t0 = time.perf_counter()
        lr = float(engine.get_lr()[0])  # the rate this step's update uses (the scheduler advances in step())
        weight = micro_batch_weight(plan.real_micro_batches(step_index), world.size, world.accum)
        sums = StepSums()
        grad_norm = None
        for a, slot in enumerate(plan.steps[step_index]):
            indices = slot[world.rank]
            batch = self.micro_batch(self.train_rows, indices)
            samples = None
            if self.sampler is not None and on_policy_slot(self.dcfg.policy, self.dcfg.on_policy_fraction,
                                                           seed=self.cfg.run.seed, step=self.state.step, slot=a):
                # every rank samples in this slot, a padding micro-batch too (ZeRO-3 generates in lockstep)
                t_sample = time.perf_counter()
                batch, samples = self.on_policy_batch(batch, real=indices is not None)
                sums.values["sample_seconds"] += time.perf_counter() - t_sample
            kl, teacher_batch = batch_loss_and_teacher(engine, self.teacher, batch)
            if samples is not None and indices is not None:
                sums.add_samples(samples, teacher_batch, batch)
            # A padding micro-batch has no targets: its loss is a graph-connected 0 (all ranks must run backward).
            engine.backward(kl.loss * (weight if indices is not None else 0.0))
            if engine.is_gradient_accumulation_boundary() and self.dcfg.deepspeed.zero_stage == 0:
                grad_norm = plain_grad_norm(engine)  # ZeRO-0 fp32 does not record it; grads are all-reduced here
            engine.step()
            if indices is not None:
                sums.add(kl, batch)
        if self.sampler is not None:
            self.sampler.sync_weights()  # the next samples come from the updated student
        grad_norm = engine.get_global_grad_norm() if engine.get_global_grad_norm() is not None else grad_norm
        totals = sums.all_reduce()
        seconds = time.perf_counter() - t0
        target_tokens = totals["n_original"] + totals["n_counterfactual"]
        return on_policy_metrics(totals, world) | {
            "loss": totals["loss"] / max(totals["micro_batches"], 1),
            "kl_original": totals["kl_original"] / max(totals["n_original"], 1),
            "kl_counterfactual": totals["kl_counterfactual"] / max(totals["n_counterfactual"], 1),
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_s": target_tokens / seconds,
            "target_tokens": target_tokens,
            "padding_fraction": 1.0 - totals["tokens"] / max(totals["padded_tokens"], 1),
            "step_seconds": seconds,
            "kl_per_token": (totals["kl_original"] + totals["kl_counterfactual"]) / max(target_tokens, 1),
        }

    def on_policy_batch(self, batch, *, real: bool):
        """The micro-batch of the student's sampled responses to ``batch``'s prompts (a padding batch samples
        too, to keep ranks in step, and stays the zero-weight padding batch) -> (batch, samples)."""
        prompts = prompts_of(batch)
        samples = self.sampler.sample(prompts)
        if not real:
            return batch, samples
        return sampled_batch(batch, prompts, samples, self.pad_id), samples

    # ---- validate

    def validate(self) -> dict[str, float]:
        """Validation loss over the whole validation split, independent of batching and world size:

        ``val_loss = λ · mean_{orig tokens} KL + (1−λ) · mean_{cf tokens} KL`` (weighting "lambda"; a kind
        absent from the split gives 0), or ``Σ KL / N`` over all target tokens (weighting "per_token").
        """
        rows, dcfg, world = self.val_rows, self.dcfg, self.world
        plan = plan_epoch(rows.group, rows.lengths, seed=0, epoch=0, micro_batch_size=dcfg.micro_batch_size,
                          world_size=world.size, accum_steps=world.accum, bucket_steps=dcfg.bucket_steps,
                          shuffle=False)
        sums = StepSums()
        self.engine.eval()
        with torch.no_grad():
            for step in plan.steps:
                for slot in step:
                    indices = slot[world.rank]
                    batch = self.micro_batch(rows, indices)
                    kl = batch_loss(self.engine, self.teacher, batch)
                    if indices is not None:
                        sums.add(kl, batch)
        self.engine.train()
        t = sums.all_reduce()
        kl_o = t["kl_original"] / max(t["n_original"], 1)
        kl_c = t["kl_counterfactual"] / max(t["n_counterfactual"], 1)
        if dcfg.weighting == "lambda":
            val_loss = dcfg.lambda_ * kl_o + (1 - dcfg.lambda_) * kl_c
        else:
            val_loss = ((t["kl_original"] + t["kl_counterfactual"])
                        / max(t["n_original"] + t["n_counterfactual"], 1))
        return {"val_loss": val_loss, "val_kl_original": kl_o, "val_kl_counterfactual": kl_c,
                "val_target_tokens": t["n_original"] + t["n_counterfactual"]}

    # ---- checkpoint

    def save_checkpoint(self, metrics: dict[str, float]) -> None:
        """Every rank writes its DeepSpeed shard (+ RNG states) and reports it (`self.report`: Ray Train merges
        the ranks' files; an inline run keeps it in ``<out>/checkpoints``)."""
        step = self.state.step
        with tempfile.TemporaryDirectory(prefix="leaf-ray-ckpt-") as tmp:
            self.engine.save_checkpoint(tmp, tag=f"step{step:07d}", client_state={"leaf_ray": asdict(self.state)})
            torch.save(rng_states(), Path(tmp) / f"rng_rank{self.world.rank}.pt")
            if self.sampler is not None:  # a resumed run samples the same responses
                torch.save(self.sampler.state_dict(), Path(tmp) / f"sampler_rank{self.world.rank}.pt")
            report = {k: v for k, v in metrics.items() if isinstance(v, (int, float))} | {"step": step}
            self.report(report, Path(tmp), f"checkpoint-step{step:07d}")

    def restore_checkpoint(self, ckpt_dir: Path) -> None:
        """DeepSpeed weights, optimizer and LR scheduler; step and data position; this rank's RNG states."""
        load_path, client_state = self.engine.load_checkpoint(str(ckpt_dir), load_optimizer_states=True,
                                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"no DeepSpeed checkpoint found in {ckpt_dir}")
        rng_file = ckpt_dir / f"rng_rank{self.world.rank}.pt"
        if rng_file.exists():
            set_rng_states(torch.load(rng_file, weights_only=False))
        sampler_file = ckpt_dir / f"sampler_rank{self.world.rank}.pt"
        if self.sampler is not None:
            if not sampler_file.exists():
                raise RuntimeError(f"{ckpt_dir} has no sampling RNG state {sampler_file.name} for this on-policy "
                                   "run (written by an off-policy run?)")
            self.sampler.load_state_dict(torch.load(sampler_file, weights_only=False))
        self.state = TrainState(**client_state["leaf_ray"])

    def save_best(self) -> None:
        """``<out>/best/step-N`` for the current step (atomic rename); every rank joins the consolidation."""
        state_dict = consolidated_state_dict(self.engine)
        if self.world.rank != 0:
            return
        step = self.state.step
        final = self.out_dir / "best" / f"step-{step:07d}"
        tmp = self.out_dir / "best" / f".tmp-step-{step:07d}"
        shutil.rmtree(tmp, ignore_errors=True)
        self.engine.module.model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)

    def export(self) -> None:
        """The best student by validation loss (the final one when there is no validation split) to
        ``<out>/model``, and ``summary.json``."""
        state = self.state
        if not len(self.val_rows):
            state.best_step = state.step
            self.save_best()
        barrier()
        if self.world.rank == 0:
            export_best_model(self.out_dir, self.tokenizer, self.variant, best_step=state.best_step,
                              best_val_loss=state.best_val_loss, steps=state.step)
            summary = {"steps": state.step, "best_val_loss": state.best_val_loss, "best_step": state.best_step,
                       "steps_per_epoch": self.per_epoch, "world_size": self.world.size,
                       "accumulation_steps": self.world.accum}
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        barrier()


# =========================================================================== 2. helpers, in call order

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
    return batch_loss_and_teacher(engine, teacher, batch)[0]


def batch_loss_and_teacher(engine, teacher, batch):
    """(KLOutput, the teacher's batch signal) of one micro-batch."""
    from leaf_ray.distill.loss import KLOutput

    batch = {k: v.to(engine.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    teacher_batch = teacher(batch["input_ids"], batch["attention_mask"], batch["target_mask"], batch["row_keys"])
    out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 target_mask=batch["target_mask"], is_counterfactual=batch["is_counterfactual"],
                 teacher=teacher_batch)
    return KLOutput(**out), teacher_batch


def on_policy_metrics(totals: dict[str, float], world: World) -> dict[str, float]:
    """Step metrics of the sampled responses (only in steps that sampled): mean sampled length (tokens, EOS
    included), mean teacher and student log-prob per sampled token (temperature 1), the share of
    micro-batches sampled and the generation seconds per rank."""
    if not totals["sampled_rows"]:
        return {}
    n = max(totals["sampled_tokens"], 1)
    return {"sampled_length": totals["sampled_tokens"] / totals["sampled_rows"],
            "teacher_logprob": totals["teacher_logprob"] / n, "student_logprob": totals["student_logprob"] / n,
            "on_policy_share": totals["on_policy_micro_batches"] / max(totals["micro_batches"], 1),
            "sample_seconds": totals["sample_seconds"] / world.size}


@dataclass
class StepSums:
    """Per-rank sums, all-reduced into step metrics (token-weighted KL means, micro-batch-mean loss)."""

    values: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ["loss", "micro_batches", "kl_original", "n_original", "kl_counterfactual", "n_counterfactual", "tokens",
         "padded_tokens", "sampled_rows", "sampled_tokens", "teacher_logprob", "student_logprob",
         "on_policy_micro_batches", "sample_seconds"], 0.0))

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

    def add_samples(self, samples, teacher_batch, batch) -> None:
        """An on-policy micro-batch: its sampled lengths and both models' log-probs of the sampled tokens."""
        from leaf_ray.distill.onpolicy import target_logprob_sum

        v = self.values
        v["sampled_rows"] += len(samples.tokens)
        v["sampled_tokens"] += sum(len(t) for t in samples.tokens)
        v["student_logprob"] += float(sum(lp.sum() for lp in samples.student_logprobs))
        v["teacher_logprob"] += target_logprob_sum(teacher_batch, batch["input_ids"].to(teacher_batch.logits.device),
                                                   batch["target_mask"].to(teacher_batch.logits.device))
        v["on_policy_micro_batches"] += 1

    def all_reduce(self) -> dict[str, float]:
        from leaf_ray.distributed import all_reduce_sum

        return all_reduce_sum(self.values)  # on the group's device: NCCL has no CPU tensors


def plain_grad_norm(engine) -> float:

    norms = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
