"""The benchmark section of the config tree (`bench.*`): what `leaf-ray bench ...` reads, and nothing else does.

It hangs under `LeafConfig.bench`, so `bench.focus.*` keys come from the same YAML files and `--set` overrides
as every other key; it lives here, beside the benchmarks, because no stage of the method reads it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    # As leaf_ray.config's sections: a typo in a YAML key is an error, never a silently ignored setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class FocusStudentSizes(_Section):
    """Student architecture of `leaf-ray bench focus --prepare` (Qwen2-style; hidden/heads must be 64)."""

    hidden_size: int = Field(128, ge=64)
    intermediate_size: int = Field(256, ge=64)
    num_hidden_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(2, ge=1)
    num_key_value_heads: int = Field(2, ge=1)


class FocusTeacherSizes(FocusStudentSizes):
    """Teacher architecture of `leaf-ray bench focus --prepare` (wider than the student)."""

    hidden_size: int = Field(192, ge=64)
    intermediate_size: int = Field(384, ge=64)
    num_attention_heads: int = Field(3, ge=1)
    num_key_value_heads: int = Field(3, ge=1)


class FocusPrepareConfig(_Section):
    """The from-scratch training recipe of the focus benchmark's teacher and student (leaf_ray/bench/focus_prepare.py)."""

    vocab_size: int = Field(512, ge=300, description="Shared byte-level BPE vocabulary size.")
    teacher: FocusTeacherSizes = Field(default_factory=FocusTeacherSizes,
                                       description="Teacher architecture (trained on problems with distractors).")
    student: FocusStudentSizes = Field(default_factory=FocusStudentSizes,
                                       description="Student architecture (trained on clean problems only).")
    steps: int = Field(1500, ge=1, description="Optimizer steps per model.")
    teacher_steps: int | None = Field(None, ge=1, description="The teacher's optimizer steps, if not `steps`.")
    teacher_clean_steps: int = Field(
        500, ge=0, description="Curriculum: the teacher's first steps (of `steps`) on the clean view of its problems.")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0.0, description="One-cycle max learning rate (AdamW).")
    seed: int = Field(0, ge=0, description="Init/shuffle seed (the student uses seed + 1).")
    torch_threads: int = Field(2, ge=1, description="torch threads while training (part of the cache key: it changes float sums).")
    check_size: int = Field(200, ge=1, description="Validation problems for the prepared models' accuracy check.")


class FocusSizes(_Section):
    """Problems per split of the focus task (leaf_ray/bench/focus_task.py)."""

    prepare: int = Field(8000, ge=1, description="From-scratch training set of teacher and student.")
    train: int = Field(384, ge=2, description="Corpus ingested, scored by detection and distilled on.")
    validation: int = Field(200, ge=1)
    test: int = Field(300, ge=1, description="Held-out problems with 1-2 distractors each.")


FocusVariant = Literal["kd", "leaf_instr", "leaf_instr_resp", "leaf_full", "oracle", "random_span"]


class FocusBenchConfig(_Section):
    """`leaf-ray bench focus`: the controlled confounder benchmark (leaf_ray/bench/focus.py)."""

    task_seed: int = Field(0, ge=0, description="Seed of the generated task splits.")
    max_number: int = Field(20, ge=2, le=1000, description="Largest number in a problem or distractor.")
    sizes: FocusSizes = Field(default_factory=FocusSizes)
    prepare: FocusPrepareConfig = Field(default_factory=FocusPrepareConfig)
    seeds: int = Field(3, ge=1, le=20, description="Distillation seeds per variant (run.seed + 0, 1, ...).")
    variants: list[FocusVariant] = Field(
        default_factory=lambda: ["kd", "leaf_instr", "leaf_instr_resp"],
        description="kd = KD w/o mask at distill.epochs; leaf_full = Instr & Resp with detection.selection and "
        "detection.verification; oracle = counterfactuals removing the ground-truth distractor spans; "
        "random_span = as many tokens per sample as detection pruned, at random spans.")
    # The v2 controls (issue 12) are off by default (what `leaf-ray demo` runs); configs/bench-focus.yaml turns them on.
    steps_matched_kd: bool = Field(False, description="KD with the optimizer steps of each LeaF variant.")
    compute_matched: list[FocusVariant] = Field(
        default_factory=list,
        description="LeaF variants that also get a KD control with the same FLOPs (student training + the "
        "teacher's forward on every row, counterfactuals included, + Stage 1 saliency if count_detection_flops).")
    count_detection_flops: bool = Field(True, description="Compute-matched KD also pays for Stage 1 saliency.")
    tau_sweep: list[float] = Field(default_factory=list,
                                   description="Quantiles q of the τ rule for extra LeaF (Instr) variants.")
    lambda_sweep: list[float] = Field(default_factory=list,
                                      description="λ values for the best non-control LeaF variant.")
    random_seed: int = Field(0, ge=0, description="Seed of the random-span control's spans.")
    bootstrap_resamples: int = Field(2000, ge=100, description="Replicates of the paired bootstrap CI.")
    quick: bool = Field(False, description="`--quick`: 1 seed, quick_variants, steps-matched KD only, no sweeps, run dir <name>-quick.")
    quick_variants: list[FocusVariant] = Field(default_factory=lambda: ["kd", "leaf_instr", "oracle", "random_span"])
    attention_samples: int = Field(200, ge=1, description="Test problems for the attention measurement.")
    heatmaps: int = Field(4, ge=0, description="Detection heatmaps logged to MLflow.")
    models_cache: str | None = Field(
        None, description="Prepared models by recipe key (`<dir>/<key>/`), shared by the run directories of "
        "this machine: `--prepare` copies them from there instead of training, and puts what it trains there. "
        "null = the run directory only (and the shipped demo models).")


class BenchConfig(_Section):
    focus: FocusBenchConfig = Field(default_factory=FocusBenchConfig)
