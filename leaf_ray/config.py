"""The one config tree: every default of leaf-ray lives here.

YAML files in ``configs/`` are validated against :class:`LeafConfig`; the CLI, ``jobs/`` and tests all call
:func:`load_config`. Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming the
file and the dotted key.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from leaf_ray.registry import (
    BENCHMARK_FORMATS,
    GENERATION_BACKENDS,
    TEACHER_SIGNALS,
    THRESHOLD_RULES,
    import_plugins,
)


class _Section(BaseModel):
    # extra="forbid": a typo in a YAML key is an error, never a silently ignored setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# --------------------------------------------------------------------------- run / ray / tracking


class RunConfig(_Section):
    """Where outputs land and how the run is named."""

    name: str = Field("demo", description="Run name; outputs land in `<root_dir>/<name>/`.")
    root_dir: str = Field("runs", description="Directory holding one sub-directory per run.")
    seed: int = Field(0, ge=0, description="Seed for data splits, sampling and training.")

    @property
    def dir(self) -> Path:
        return Path(self.root_dir) / self.name


class RayConfig(_Section):
    """How to reach Ray. `address: null` starts (or joins) a local instance."""

    address: str | None = Field(None, description="Ray address (`auto`, `ray://host:10001`); null = local.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray instance (null = all).")
    namespace: str = Field("leaf-ray", description="Ray namespace for the job.")
    stall_timeout_s: float = Field(
        1800.0, gt=0.0, description="A Ray Data stream (detection, generation) that yields nothing for this long "
                                    "fails with an error naming the stage (an actor pool that never gets its "
                                    "resources, a wedged actor); what it committed stays, a rerun resumes.")


class TrackingConfig(_Section):
    """MLflow tracking."""

    tracking_uri: str | None = Field(
        None, description="MLflow URI; null = sqlite store `<run dir>/mlflow.db` with artifacts beside it."
    )
    experiment: str = Field("leaf-ray", description="MLflow experiment name.")
    enabled: bool = Field(True, description="Log to MLflow at all.")


# --------------------------------------------------------------------------- data


class FieldMap(_Section):
    """Which input column holds which field (extra columns are kept)."""

    instruction: str = "instruction"
    output: str = "output"
    input: str | None = Field("input", description="Optional context appended to the instruction.")
    answer: str | None = Field("answer", description="Optional reference final answer.")
    id: str | None = Field("id", description="Optional record id; else a content hash is used.")


class DemoCorpusConfig(_Section):
    """The built-in offline corpus of math word problems (reasoning-gym gsm_symbolic)."""

    size: int = Field(64, ge=1, le=100_000, description="Number of problems to generate.")
    seed: int = Field(0, ge=0)


class DataConfig(_Section):
    """Input corpus and validation."""

    paths: list[str] = Field(
        default_factory=list,
        description="Local paths, globs or URIs Ray Data reads. Empty = the built-in demo corpus.",
    )
    format: Literal["auto", "json", "jsonl", "parquet"] = Field(
        "auto", description="`auto` picks by extension (.json, .jsonl/.ndjson, .parquet)."
    )
    fields: FieldMap = Field(default_factory=FieldMap)
    demo: DemoCorpusConfig = Field(default_factory=DemoCorpusConfig)
    max_length: int = Field(2048, ge=16, description="Max tokens of a rendered (prompt + response) record.")
    on_too_long: Literal["quarantine", "truncate"] = Field(
        "quarantine", description="A too-long record is quarantined, or its response is truncated."
    )
    validation_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Held-out share for validation loss.")
    jsonl_range_bytes: int = Field(
        4 << 20, ge=0, description="A local JSONL file larger than this is read by parallel tasks, one per "
        "line-aligned byte range of about this size (0 = one task per file).")
    inline_max_bytes: int = Field(
        4 << 20, ge=0, description="Input files totalling at most this many bytes (a size one read task would "
        "take) are ingested in the calling process with the same functions, no Ray start; 0 = always Ray Data.")


# --------------------------------------------------------------------------- models


class ModelRef(_Section):
    """A model on local disk (hub ids are refused: nothing is downloaded at run time)."""

    path: str = Field(..., description="Local directory written by `save_pretrained`, or a GGUF's directory.")
    gguf_file: str | None = Field(None, description="GGUF file name inside `path`, when loading GGUF.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tokenizer_path: str | None = Field(None, description="Tokenizer directory if not `path`.")
    force_dtype: bool = Field(
        False, description="Keep bfloat16/float16 on a CPU without native support for it (default: compute "
        "in float32 there, ~25x faster, with one log line).")


class ModelsConfig(_Section):
    teacher: ModelRef = Field(default_factory=lambda: ModelRef(path="runs/tiny-models/teacher"))
    student: ModelRef = Field(default_factory=lambda: ModelRef(path="runs/tiny-models/student"))
    make_tiny_if_missing: bool = Field(
        True, description="Build the tiny offline pair when the default paths are missing (demo only)."
    )


# --------------------------------------------------------------------------- detection (Stage 1)


class PoolConfig(_Section):
    """One Ray Data actor pool (autoscales between min and max actors)."""

    batch_size: int = Field(8, ge=1)
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per actor (a sharded teacher may hold several).")
    num_cpus: float = Field(1.0, gt=0.0)
    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(1, ge=1)
    max_memory_per_gpu: str | None = Field(None, description="e.g. `70GiB`: per-GPU cap for device_map.")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per actor.")

    @model_validator(mode="after")
    def _min_le_max(self) -> PoolConfig:
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) must be <= max_actors ({self.max_actors})")
        return self

    def ray_resources(self) -> dict[str, float]:
        """The Ray resources one actor of this pool asks for (what the autoscaler must find a node for)."""
        return {"CPU": self.num_cpus, **({"GPU": self.num_gpus} if self.num_gpus else {}), **self.resources}

    def map_batches_kwargs(self) -> dict[str, Any]:
        """`Dataset.map_batches(Fn, **pool.map_batches_kwargs())`: one place turning a pool into Ray Data
        arguments, so every actor pool (and the autoscaling test) requests exactly what the config says."""
        from ray.data import ActorPoolStrategy

        kwargs: dict[str, Any] = {
            "compute": ActorPoolStrategy(min_size=self.min_actors, max_size=self.max_actors),
            "batch_size": self.batch_size, "num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
        }
        if self.resources:
            kwargs["resources"] = dict(self.resources)
        return kwargs


class TeacherPoolConfig(PoolConfig):
    """The teacher-saliency pool. `device_map`: each actor holds the whole teacher, split over its `num_gpus`
    GPUs by `device_map="auto"` (one GPU computes at a time). `sharded`: each actor is a gang of `world_size`
    ranks in one placement group (STRICT_PACK: one node), the teacher's parameters sharded across them with
    FSDP2, every rank scoring its own `batch_size` units at once (`leaf_ray/detect/sharded_teacher.py`).
    In both modes `num_gpus`, `num_cpus` and `resources` are what one teacher (actor or gang) holds; a gang
    rank gets 1/`world_size` of each."""

    mode: Literal["device_map", "sharded"] = Field(
        "device_map", description="`device_map` (one process, layers over its GPUs) or `sharded` (a gang of "
        "`world_size` processes, FSDP2-sharded, all computing at once). docs/large-teachers.md.")
    world_size: int = Field(2, ge=1, description="Ranks of a `sharded` gang (one per GPU when num_gpus > 0).")
    max_gang_restarts: int = Field(
        1, ge=0, description="`sharded`: a gang that loses a rank is rebuilt and its batch scored again, at "
        "most this many times per actor (then the run fails; a rerun resumes from the committed parts).")
    gang_timeout_s: float = Field(1800.0, gt=0.0, description="`sharded`: collective timeout of the gang.")
    fail_rank_at_batch: int | None = Field(
        None, ge=1, description="TESTING ONLY: the last rank of the first gang exits at this batch.")

    @model_validator(mode="after")
    def _gang_fits(self) -> TeacherPoolConfig:
        if self.mode == "sharded" and self.num_gpus and self.num_gpus != self.world_size:
            raise ValueError(f"mode sharded runs one rank per GPU: num_gpus ({self.num_gpus:g}) must be 0 or "
                             f"world_size ({self.world_size})")
        return self

    def rank_resources(self) -> dict[str, float]:
        """What one rank of a `sharded` gang asks for (one placement-group bundle)."""
        return {k: v / self.world_size for k, v in self.ray_resources().items()}

    def map_batches_kwargs(self) -> dict[str, Any]:
        if self.mode != "sharded":
            return super().map_batches_kwargs()
        from ray.data import ActorPoolStrategy

        # The Ray Data actor only hands slices to its gang (which holds the resources): it asks for none.
        return {"compute": ActorPoolStrategy(min_size=self.min_actors, max_size=self.max_actors),
                "batch_size": self.batch_size * self.world_size, "num_cpus": 0, "num_gpus": 0}


class ThresholdConfig(_Section):
    """Which Δ counts as a confounder (docs/design.md §1.1)."""

    rule: THRESHOLD_RULES.name() = Field(
        "quantile", description="A registered threshold rule (leaf_ray/detect/confounders.py; docs/extending.md).")
    quantile: float = Field(0.10, ge=0.0, le=1.0, description="q: 0.10 math, 0.05 code (reference).")
    cap: float = Field(0.5, ge=0.0, le=1.0, description="τ = min(quantile_q(Δ), cap).")
    interpolation: Literal["order_statistic", "linear"] = Field(
        "order_statistic", description="quantile_q(Δ): `order_statistic` = sorted(Δ)[⌊n·q⌋] (the reference "
        "release); `linear` = numpy's interpolated quantile.")
    tau: float = Field(0.10, ge=0.0, le=1.0, description="Absolute τ for rule `absolute`.")


class ResponseLevelConfig(_Section):
    """Response-level detection ("Instr & Resp Mask")."""

    enabled: bool = False
    step_pattern: str = Field(r"\n\s*\n", description="Regex separating reasoning steps.")
    num_segments: int = Field(3, ge=2, le=8, description="Steps are grouped into this many segments.")


class DetectionConfig(_Section):
    threshold: ThresholdConfig = Field(default_factory=ThresholdConfig)
    pruning: Literal["per_span", "collective"] = Field(
        "per_span", description="One counterfactual per span, or all spans removed at once (ablation)."
    )
    response: ResponseLevelConfig = Field(default_factory=ResponseLevelConfig)
    instruction_level: bool = True
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False
    max_padding: float | None = Field(
        0.25, ge=0.0, description="A saliency actor splits each batch into length groups whose padded tokens are "
        "at most (1 + max_padding) × their real tokens, one pass each (same scores, less padding work); null = "
        "one pass per batch. The sharded teacher gang always scores its batch in one pass.")
    selection: bool = Field(
        False, description="Stage 1 selection: score only samples the teacher answers correctly and the "
        "student does not (greedy generation from `generation`; verdicts and reasons in detect/selection/).")
    verification: bool = Field(
        False, description="Keep a counterfactual only if the student answers it correctly after pruning; "
        "the others go to detect/rejected_counterfactuals/ with their reason.")
    student_pool: PoolConfig = Field(default_factory=PoolConfig)
    teacher_pool: TeacherPoolConfig = Field(default_factory=TeacherPoolConfig)
    units_per_part: int = Field(
        64, ge=1, description="Units (sample x scope) per streamed block and committed Parquet part: the resume "
        "granularity (a killed run redoes only the parts in flight).")
    inline_max_samples: int = Field(
        64, ge=0, description="A job of at most this many samples (without selection, verification or a "
        "sharded teacher) runs in the calling process with the same stage functions and commits, no Ray: a "
        "small job then costs what a plain script does. 0 = always the Ray Data stream.")


# --------------------------------------------------------------------------- distillation (Stage 2)


class DeepSpeedConfig(_Section):
    """The student's DeepSpeed engine (the optimizer is a client `torch.optim.AdamW`: nothing is compiled)."""

    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="ZeRO stage of the student (0 = plain DDP).")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload: optimizer state in CPU memory (stage>=1).")
    offload_param: bool = Field(False, description="Parameters in CPU memory (ZeRO-3 only).")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Student compute precision.")


class TrainResources(_Section):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0.0, description="Fractional so Ray Data keeps CPU to read.")
    gpus_per_worker: float = Field(0.0, ge=0.0)
    resources: dict[str, float] = Field(default_factory=dict)
    torch_threads: int | None = Field(None, ge=1, description="torch threads per worker (null = Ray's default).")
    collective_timeout_s: float = Field(
        1800.0, gt=0.0, description="Timeout of the workers' process group (Ray Train's TorchConfig.timeout_s): a "
                                    "collective that waits longer (a hung or dead rank) fails the attempt, which is "
                                    "retried from the last checkpoint (`distill.max_failures`).")


class OnPolicySamplingConfig(_Section):
    """How the student samples its own responses for on-policy distillation (``distill.policy`` on / mixed)."""

    sampler: Literal["transformers"] = Field(
        "transformers", description="`transformers` = the student's own `generate` (the vLLM/SGLang seam: "
        "docs/on-policy.md).")
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling (only when temperature > 0).")
    max_new_tokens: int = Field(64, ge=1, description="Longest sampled response (tokens, EOS included).")


class DistillConfig(_Section):
    lambda_: float = Field(0.5, ge=0.0, le=1.0, alias="lambda", description="λ of the hybrid KL.")
    weighting: Literal["lambda", "per_token"] = Field("lambda", description="Loss weighting rule.")
    temperature: float = Field(1.0, gt=0.0)
    use_counterfactuals: bool = Field(True, description="False = plain KD (\"KD w/o mask\").")
    policy: Literal["off", "on", "mixed"] = Field(
        "off", description="`off` = the dataset's responses; `on` = the student's own samples, scored by the "
        "teacher; `mixed` = on-policy for a share `on_policy_fraction` of micro-batches (docs/on-policy.md).")
    on_policy_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="`mixed`: share of accumulation slots sampled on-policy (GKD's λ).")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="Per-token divergence: KL(teacher‖student), KL(student‖teacher) or the "
        "generalised JSD with `jsd_beta`.")
    jsd_beta: float = Field(0.5, gt=0.0, lt=1.0, description="β of the generalised JSD.")
    sampling: OnPolicySamplingConfig = Field(default_factory=OnPolicySamplingConfig)
    teacher_mode: TEACHER_SIGNALS.name() = Field(
        "replicated", description="A registered teacher signal (leaf_ray/distill/engines.py).")
    topk: int = Field(64, ge=1, description="k of the offline teacher top-k cache.")
    topk_cache_dir: str | None = Field(
        None, description="Parquet dir of the teacher top-k cache; null = `<run dir>/distill/topk_cache`."
    )
    topk_pool: PoolConfig = Field(
        default_factory=PoolConfig, description="Ray Data actor pool holding the teacher for the top-k cache pass "
        "(with `topk_engine: vllm`: batch_size and min/max_actors = engine replicas)."
    )
    topk_engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="Who scores the top-k cache: a transformers forward of the teacher, or the "
        "vLLM engine's prompt log-probs through a `ray.data.llm` processor (engine settings from "
        "`generation.vllm_engine_kwargs`; needs `distill.temperature` 1 and k <= 64, docs/generation.md)."
    )
    chunk_size: int = Field(256, ge=1, description="Positions per chunk of the KL (memory bound).")
    chunked_lm_head: bool = Field(
        True, description="Build the student's logits per chunk of target positions from its final hidden states "
                          "(no [batch, seq, vocab] tensor). ZeRO-3 (partitioned head) and soft-capped heads use the "
                          "model's full logits."
    )
    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    lr: float = Field(1e-5, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(5, ge=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    global_batch_size: int = Field(32, ge=1)
    micro_batch_size: int = Field(4, ge=1)
    max_grad_norm: float = Field(1.0, ge=0.0)
    eval_every_steps: int | None = Field(None, ge=1, description="null = validate once per epoch.")
    checkpoint_every_steps: int = Field(50, ge=1)
    max_failures: int = Field(1, ge=0, description="Worker-group restarts (from the last checkpoint) allowed.")
    keep_checkpoints: int = Field(2, ge=1, description="Ray Train checkpoints kept (the latest always).")
    bucket_steps: int = Field(
        8, ge=1, description="Length grouping: groups are sorted by length within windows of this many steps."
    )
    fail_at_step: int | None = Field(
        None, ge=1, description="TESTING ONLY: crash once after this optimizer step, on the first attempt."
    )
    inline_max_rows: int = Field(
        0, ge=0, description="A run of at most this many rows (train + validation) on one CPU worker, with an "
        "online teacher, trains in the calling process: the same recipe, DeepSpeed engine, checkpoints (in "
        "`<out>/checkpoints`, resumed by a rerun) and `max_failures` retries, no Ray Train worker group (whose "
        "start costs ~15 s a run). 0 = always Ray Train.")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    resources: TrainResources = Field(default_factory=TrainResources)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @model_validator(mode="after")
    def _live_teacher_for_sampled_or_non_forward(self) -> DistillConfig:
        # The offline cache holds the teacher on the dataset's responses only, as a top-k (forward KL only).
        if self.teacher_mode == "topk_cache" and self.policy != "off":
            raise ValueError(f"distill.policy={self.policy!r} needs a live teacher to score the sampled "
                             "responses; distill.teacher_mode='topk_cache' only covers the dataset's responses "
                             "(use 'replicated' or 'zero3')")
        if self.teacher_mode == "topk_cache" and self.divergence != "forward_kl":
            raise ValueError(f"distill.divergence={self.divergence!r} needs the teacher's full distribution; "
                             "distill.teacher_mode='topk_cache' supports 'forward_kl' only")
        return self


# --------------------------------------------------------------------------- generation / evaluation


class GenerationConfig(_Section):
    """Text generation (teacher responses, Stage 1 selection/verification, evaluation)."""

    # `sglang` is a `ray.data.llm` engine only (leaf_ray/generate/ray_data_llm.py), not an in-process backend.
    backend: GENERATION_BACKENDS.name(also=("auto", "sglang")) = Field(
        "auto", description="`vllm` / `sglang`: a `ray.data.llm` processor (engine replicas, tensor/pipeline "
        "parallelism, docs/generation.md); `transformers`: `model.generate` in an actor pool (the CPU backend); "
        "`auto` = vllm (engine in the actor) if importable and a GPU is visible to the actor, else transformers. "
        "In-process backends are registered (leaf_ray/generate/backends.py, docs/extending.md)."
    )
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling (only when temperature > 0).")
    stop: list[str] = Field(default_factory=list, description="Stop strings; the output is cut before them.")
    chat_template: str | None = Field(
        None, description="Jinja chat template overriding the tokenizer's (null = the tokenizer's own)."
    )
    vllm_engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="vLLM engine arguments, e.g. tensor_parallel_size, pipeline_parallel_size, "
                    "gpu_memory_utilization, max_model_len.",
    )
    sglang_engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="SGLang engine arguments (`backend: sglang`), e.g. tp_size, dp_size, "
        "mem_fraction_static. Untested here (no SGLang build for CPU).")
    engine_bundle: dict[str, float] | None = Field(
        None, description="`vllm`/`sglang`: Ray resources of one engine worker (one per tensor x pipeline "
        "rank) in the replica's placement group; null = {GPU: 1, CPU: 1} on a cluster with GPUs, {CPU: 1} "
        "without. `pool.resources` go on the replica's first bundle.")

    @model_validator(mode="after")
    def _engine_kwargs_fit_their_engine(self) -> GenerationConfig:
        # The two engines name parallelism differently; a key of the other engine would be silently ignored.
        for section, kwargs, foreign in (
                ("vllm_engine_kwargs", self.vllm_engine_kwargs, {"tp_size": "tensor_parallel_size",
                                                                 "pp_size": "pipeline_parallel_size",
                                                                 "dp_size": "data_parallel_size"}),
                ("sglang_engine_kwargs", self.sglang_engine_kwargs, {"tensor_parallel_size": "tp_size",
                                                                     "pipeline_parallel_size": "pp_size",
                                                                     "data_parallel_size": "dp_size"})):
            for key, value in kwargs.items():
                if key in foreign:
                    raise ValueError(f"generation.{section}.{key}: not an argument of this engine "
                                     f"(did you mean {foreign[key]}?)")
                if key in ("model", "model_path", "task_type"):
                    raise ValueError(f"generation.{section}.{key}: set by leaf-ray from models.*; remove it")
                if key in ("tensor_parallel_size", "pipeline_parallel_size", "tp_size", "pp_size", "dp_size") \
                        and (not isinstance(value, int) or value < 1):
                    raise ValueError(f"generation.{section}.{key}: expected an integer >= 1, got {value!r}")
        return self
    pool: PoolConfig = Field(default_factory=PoolConfig)
    inline_max_prompts: int = Field(
        0, ge=0, description="A generation of at most this many prompts (an evaluation, say) runs in the calling "
        "process, `pool.batch_size` prompts a batch, through the same backend: no actor to start. 0 = always "
        "the actor pool.")


class BenchmarkRef(_Section):
    """One benchmark: a local file in a known format, or an offline built-in (leaf_ray/evaluate/benchmarks.py)."""

    name: str
    kind: Literal["math", "code"] = Field(
        "math", description="Scoring kind; when omitted it follows `format` (the format's registered kind).")
    format: BENCHMARK_FORMATS.name() = Field(
        "gsm_symbolic", description="A registered benchmark format (leaf_ray/evaluate/benchmarks.py).")
    path: str | None = Field(None, description="Local JSON/JSONL/Parquet file; null for offline built-ins.")
    limit: int | None = Field(None, ge=1, description="First N records (built-ins: N generated; null = default).")
    fields: dict[str, str] = Field(
        default_factory=dict, description="Field mapping for local files: canonical field -> column in the file."
    )
    seed: int = Field(
        0, ge=0, description="Seed of the generated built-in gsm_symbolic (offset so it never overlaps the demo corpus)."
    )

    @model_validator(mode="before")
    @classmethod
    def _kind_from_format(cls, data: Any) -> Any:
        if isinstance(data, dict) and "kind" not in data and data.get("format") in BENCHMARK_FORMATS.names():
            data = {**data, "kind": BENCHMARK_FORMATS.get(data["format"]).kind}
        return data

    @model_validator(mode="after")
    def _kind_matches_format(self) -> BenchmarkRef:
        if BENCHMARK_FORMATS.get(self.format).kind != self.kind:
            raise ValueError(f"benchmark {self.name!r}: kind {self.kind!r} does not fit format {self.format!r}")
        return self


class SandboxConfig(_Section):
    """The code sandbox (leaf_ray/evaluate/sandbox.py, docs/sandbox.md): limits of one run and its isolation."""

    timeout_s: float = Field(10.0, gt=0.0, description="Wall-clock limit of one sandboxed run (program + tests).")
    memory_mb: int = Field(1024, ge=64, description="Memory of one run: all its processes together (namespaces "
                           "mode), and RLIMIT_AS of each.")
    max_processes: int = Field(32, ge=4, le=4096, description="Processes + threads of one run (RLIMIT_NPROC of "
                               "its own uid).")
    max_file_mb: int = Field(16, ge=1, le=4096, description="Size of the run's writable directory in all, and "
                             "of any one file it writes (stdout/stderr included).")
    isolation: Literal["auto", "namespaces", "hooks"] = Field(
        "auto",
        description="namespaces (root + unshare: uid, pid/net/mount/ipc namespaces, seccomp), hooks (Python "
        "audit hooks only: unisolated) or auto (namespaces). hooks is refused unless allow_unisolated.",
    )
    allow_unisolated: bool = Field(
        False, description="Allow hooks mode (where namespaces are unavailable, or asked for); every verdict is "
        "then marked unisolated in the predictions and in MLflow.")
    workers: int = Field(4, ge=1, le=256, description="Sandboxed code checks run at once.")

    def limits(self) -> dict:
        """Keyword arguments of the sandbox's check functions."""
        return self.model_dump(exclude={"workers"})


class EvaluationConfig(_Section):
    benchmarks: list[BenchmarkRef] = Field(
        default_factory=lambda: [BenchmarkRef(name="gsm_symbolic", format="gsm_symbolic", limit=32)]
    )
    sandbox: SandboxConfig = Field(default_factory=lambda: SandboxConfig())
    math_instruction: str = Field(
        "{prompt}\nPlease reason step by step, and put your final answer within \\boxed{}.",
        description="Instruction sent for a math problem; `{prompt}` is replaced by the problem text.",
    )
    code_instruction: str = Field(
        "Solve the following problem in Python. Give the complete solution in one ```python code block."
        "\n\n{prompt}",
        description="Instruction sent for a code problem; `{prompt}` is replaced by the problem/signature.",
    )

    @model_validator(mode="after")
    def _instructions_have_prompt(self) -> EvaluationConfig:
        for key in ("math_instruction", "code_instruction"):
            if "{prompt}" not in getattr(self, key):
                raise ValueError(f"{key} must contain the placeholder {{prompt}}")
        return self


class PipelineConfig(_Section):
    """Which stages `leaf-ray run` chains."""

    generate_teacher_responses: bool = False
    variants: list[Literal["kd", "leaf_instr", "leaf_instr_resp"]] = Field(
        default_factory=lambda: ["kd", "leaf_instr"]
    )
    evaluate: bool = True


# --------------------------------------------------------------------------- root


# --------------------------------------------------------------------------- bench (the focus experiment)
# `bench.*` is read by `leaf-ray bench ...` and `leaf-ray demo` only (leaf_ray/experiments/focus/), no stage of the method.


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
    """The from-scratch training recipe of the focus benchmark's teacher and student (leaf_ray/experiments/focus/prepare.py)."""

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
    """Problems per split of the focus task (leaf_ray/experiments/focus/task.py)."""

    prepare: int = Field(8000, ge=1, description="From-scratch training set of teacher and student.")
    train: int = Field(384, ge=2, description="Corpus ingested, scored by detection and distilled on.")
    validation: int = Field(200, ge=1)
    test: int = Field(300, ge=1, description="Held-out problems with 1-2 distractors each.")


FocusVariant = Literal["kd", "leaf_instr", "leaf_instr_resp", "leaf_full", "oracle", "random_span", "kd_on",
                       "leaf_instr_on", "kd_mixed", "leaf_instr_mixed"]


class FocusBenchConfig(_Section):
    """`leaf-ray bench focus`: the controlled confounder benchmark (leaf_ray/experiments/focus/run.py)."""

    task_seed: int = Field(0, ge=0, description="Seed of the generated task splits.")
    max_number: int = Field(20, ge=2, le=1000, description="Largest number in a problem or distractor.")
    sizes: FocusSizes = Field(default_factory=FocusSizes)
    prepare: FocusPrepareConfig = Field(default_factory=FocusPrepareConfig)
    seeds: int = Field(3, ge=1, le=20, description="Distillation seeds per variant (run.seed + 0, 1, ...).")
    variants: list[FocusVariant] = Field(
        default_factory=lambda: ["kd", "leaf_instr", "leaf_instr_resp"],
        description="kd = KD w/o mask at distill.epochs; leaf_full = Instr & Resp with detection.selection and "
        "detection.verification; oracle = counterfactuals removing the ground-truth distractor spans; "
        "random_span = as many tokens per sample as detection pruned, at random spans; kd_on / leaf_instr_on / "
        "kd_mixed / leaf_instr_mixed = the same with distill.policy on / mixed (the student's own samples).")
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


class LeafConfig(_Section):
    plugins: list[str] = Field(
        default_factory=list, description="Modules imported before the rest of the config is validated and in "
        "every local Ray worker: where your own registered threshold rules, teacher signals, generation backends "
        "or benchmark formats live (docs/extending.md).")
    run: RunConfig = Field(default_factory=RunConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    detection: DetectionConfig = Field(default_factory=DetectionConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)

    @field_validator("plugins")
    @classmethod
    def _import_plugins(cls, names: list[str]) -> list[str]:
        # `plugins` is the first field, so it is imported before a registered name in this config is checked.
        for name in names:
            try:
                import_plugins([name])
            except ImportError as e:
                raise ValueError(f"cannot import {name!r} ({type(e).__name__}: {e})") from None
        return names

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.dump(), sort_keys=False)


class ConfigError(ValueError):
    """A config problem, naming the source and the dotted key."""


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: `{'.'.join(keys[:i + 1])}` is not a section, cannot set `{dotted}`")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b.c=value` -> ("a.b.c", yaml-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    return key, yaml.safe_load(raw) if raw.strip() else ""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        kind = e["type"]
        if kind == "extra_forbidden":
            msg = "unknown key"
        elif kind == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"]
            if "input" in e and not isinstance(e["input"], dict):
                msg += f" (got {e['input']!r})"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def config_from_dict(tree: dict[str, Any], source: str = "<dict>") -> LeafConfig:
    try:
        return LeafConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: mappings merge key by key, anything else (lists included) replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_tree(p: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The YAML mapping of `p`; a top-level `extends: other.yaml` (relative to `p`) is read first and `p`'s keys
    are merged on top of it, so a variant config states only what differs."""
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}" + (f" (extended by {chain[-1]})" if chain else ""))
    if p.resolve() in chain:
        raise ConfigError(f"{p}: `extends` cycle: " + " -> ".join(str(c) for c in (*chain, p.resolve())))
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(loaded).__name__}")
    parent = loaded.pop("extends", None)
    if parent is None:
        return loaded
    if not isinstance(parent, str):
        raise ConfigError(f"{p}: `extends` must be the path of another config file, got {parent!r}")
    return _merged(_read_tree(p.parent / parent, (*chain, p.resolve())), loaded)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> LeafConfig:
    """Load YAML `path` (None = all defaults; `extends:` another file first), apply `--set` overrides, validate."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        tree = _read_tree(p)
    if overrides:
        for text in overrides:
            key, value = parse_override(text)
            _set_dotted(tree, key, value, f"{source} --set {key}")
        source = f"{source} with --set {', '.join(overrides)}"
    return config_from_dict(tree, source)
