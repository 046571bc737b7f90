"""Stage 2 of a small run in the calling process: the recipe of ``trainer.py`` on one rank, no Ray Train.

A run of at most ``distill.inline_max_rows`` rows on one CPU worker with an online teacher (see
:func:`runs_inline`) spends more time starting Ray Train's worker group (a process that imports torch,
DeepSpeed and transformers, a Ray Data tokenise pass; ~15 s) than training. ``leaf-ray bench focus`` trains
~17 such students per seed. Here the same :class:`~leaf_ray.distill.trainer.DistillRecipe` — the same DeepSpeed
engine, loss, epoch plan, validation, best-model export and MLflow logging — runs in this process on a gloo
group of one, and only two things change:

- **checkpoints** go to ``<out>/checkpoints/checkpoint-step<N>`` (written to a staging name, then renamed: a
  directory there is whole), the newest ``keep_checkpoints`` kept;
- **recovery**: a failed attempt is retried from the newest checkpoint up to ``max_failures`` times (what Ray
  Train's ``FailureConfig`` does with the worker group), and a rerun of the same command after the process
  was killed resumes from it, so within an epoch no sample is trained twice or skipped (the guarantee of
  ``trainer.py``).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from leaf_ray.config import LeafConfig

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"


def runs_inline(cfg: LeafConfig, n_rows: int) -> bool:
    """Small enough to train here: ``0 < rows <= distill.inline_max_rows``, one worker, a teacher that is a
    model (the top-k cache is built by a Ray Data pass). A run that asks for a GPU (``use_gpu``) trains here
    only where this process sees one; else Ray Train places it on a GPU worker."""
    import torch

    dcfg = cfg.distill
    return (0 < n_rows <= dcfg.inline_max_rows and dcfg.resources.num_workers == 1
            and (not dcfg.resources.use_gpu or torch.cuda.is_available()) and dcfg.teacher_mode != "topk_cache")


def whole_checkpoints(directory: Path) -> list[Path]:
    """The whole checkpoints, oldest first (staging directories start with a dot and are not matched)."""
    return sorted(p for p in directory.glob("checkpoint-step*") if p.is_dir())


def latest_checkpoint(directory: Path) -> Path | None:
    done = whole_checkpoints(directory)
    return done[-1] if done else None


class LocalCheckpoints:
    """``DistillRecipe.report`` for an inline run: keep the written checkpoint under ``directory``."""

    def __init__(self, directory: Path, keep: int):
        self.directory, self.keep = directory, keep

    def __call__(self, metrics: dict[str, float], written: Path, name: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        staging = self.directory / f".{name}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(written, staging)
        final = self.directory / name
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        for old in whole_checkpoints(self.directory)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def local_process_group(device=None):
    """A process group of one rank in this process on ``device`` (DeepSpeed needs one: gloo and DeepSpeed's
    CPU accelerator on the CPU, nccl and its CUDA accelerator on a GPU); kept for the next inline run on the
    same kind of device. Returns the device."""
    import torch
    import torch.distributed as dist

    from leaf_ray.distributed import backend_for, deepspeed_accelerator, init_group

    device = torch.device(device or "cpu")
    deepspeed_accelerator(device)
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("an inline distillation needs a process group of one rank; this process is in a "
                               f"group of {dist.get_world_size()}")
        if str(dist.get_backend()) == backend_for(device):
            return device
        dist.destroy_process_group()  # the last inline run was on the other kind of device
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)  # DeepSpeed reads these
    init_group(device, rank=0, world_size=1, store=dist.HashStore())
    return device


@contextlib.contextmanager
def torch_threads(n: int | None):
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_inline(cfg: LeafConfig, variant: str, out_dir: Path, tokenized: pa.Table,
                 tracking: dict[str, Any]) -> None:
    """Train and export the student of ``tokenized`` (the driver's tokenised rows, both splits) here; resume
    from ``<out>/checkpoints`` and retry a failed attempt from there (``distill.max_failures`` times)."""
    from leaf_ray.distill.data import TokenizedRows
    from leaf_ray.distill.trainer import DistillRecipe, World, accumulation_steps, no_rows
    from leaf_ray.distributed import inline_device

    dcfg = cfg.distill
    device = local_process_group(inline_device(dcfg.resources.use_gpu))
    world = World(0, 1, accumulation_steps(dcfg.global_batch_size, dcfg.micro_batch_size, 1), device=str(device))
    splits = {}
    for name in ("train", "validation"):
        part = tokenized.filter(pc.equal(tokenized.column("split"), name))
        splits[name] = TokenizedRows.from_batches([part]) if part.num_rows else no_rows()
    checkpoints = out_dir / CHECKPOINTS
    report = LocalCheckpoints(checkpoints, dcfg.keep_checkpoints)
    with torch_threads(dcfg.resources.torch_threads):
        for attempt in range(dcfg.max_failures + 1):
            recipe = None
            try:
                recipe = DistillRecipe.setup(cfg, world, splits["train"], splits["validation"], out_dir=out_dir,
                                             variant=variant, tracking=tracking,
                                             checkpoint_dir=latest_checkpoint(checkpoints), report=report)
                recipe.train()
                recipe.export()
                return
            except Exception as e:
                if attempt == dcfg.max_failures:
                    raise
                log.warning("distill [%s]: attempt %d failed (%s: %s); retrying from %s", variant, attempt + 1,
                            type(e).__name__, e, latest_checkpoint(checkpoints) or "the start")
            finally:
                del recipe
                gc.collect()  # the engine's buffers before the next attempt or run
