"""What the distillation recipe writes beside DeepSpeed's own checkpoint: RNG states per rank, the consolidated
student weights of the best step, and the exported model (``<out>/model`` with tokenizer and provenance)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_states() -> dict[str, Any]:

    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # dropout and sampling on the GPU draw from its own generators
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])



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


def prune_best_models(out_dir: Path, keep: int | None) -> None:
    """Keep only the best model the restored/latest state points to (a crashed attempt may leave newer ones)."""
    best = out_dir / "best"
    if not best.exists():
        return
    for d in best.iterdir():
        if keep is None or d.name != f"step-{keep:07d}":
            shutil.rmtree(d, ignore_errors=True)


def export_best_model(out_dir: Path, tokenizer, variant: str, *, best_step: int, best_val_loss: float | None,
                      steps: int) -> Path:
    """Move the best model to ``<out>/model`` with the tokenizer and a provenance file."""
    export = out_dir / "model"
    src = out_dir / "best" / f"step-{best_step:07d}"
    info_file = export / "leaf_ray_export.json"
    if not src.exists():
        if info_file.exists() and json.loads(info_file.read_text()).get("step") == best_step:
            return export  # a rerun of a finished run: already exported
        raise RuntimeError(f"best model for step {best_step} missing at {src}")
    shutil.rmtree(export, ignore_errors=True)
    src.rename(export)
    tokenizer.save_pretrained(export)
    info_file.write_text(json.dumps({"variant": variant, "step": best_step,
                                     "val_loss": best_val_loss, "steps": steps}, indent=2))
    return export
