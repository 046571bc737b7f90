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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


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


# --------------------------------------------------------------------------- models


class ModelRef(_Section):
    """A model on local disk (hub ids are refused: nothing is downloaded at run time)."""

    path: str = Field(..., description="Local directory written by `save_pretrained`, or a GGUF's directory.")
    gguf_file: str | None = Field(None, description="GGUF file name inside `path`, when loading GGUF.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tokenizer_path: str | None = Field(None, description="Tokenizer directory if not `path`.")


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
    def _min_le_max(self) -> "PoolConfig":
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) must be <= max_actors ({self.max_actors})")
        return self


class ThresholdConfig(_Section):
    """Which Δ counts as a confounder (DESIGN §1 Stage 1a)."""

    rule: Literal["quantile", "absolute"] = Field("quantile", description="Registry name of the rule.")
    quantile: float = Field(0.10, ge=0.0, le=1.0, description="q: 0.10 math, 0.05 code (reference).")
    cap: float = Field(0.5, ge=0.0, le=1.0, description="τ = min(quantile_q(Δ), cap).")
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
    selection: bool = Field(False, description="Keep only samples the teacher solves and the student does not.")
    verification: bool = Field(False, description="Keep counterfactuals after which the student is right.")
    student_pool: PoolConfig = Field(default_factory=PoolConfig)
    teacher_pool: PoolConfig = Field(default_factory=PoolConfig)


# --------------------------------------------------------------------------- distillation (Stage 2)


class DeepSpeedConfig(_Section):
    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"


class TrainResources(_Section):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0.0, description="Fractional so Ray Data keeps CPU to read.")
    gpus_per_worker: float = Field(0.0, ge=0.0)
    resources: dict[str, float] = Field(default_factory=dict)


class DistillConfig(_Section):
    lambda_: float = Field(0.5, ge=0.0, le=1.0, alias="lambda", description="λ of the hybrid KL.")
    weighting: Literal["lambda", "per_token"] = Field("lambda", description="Loss weighting rule.")
    temperature: float = Field(1.0, gt=0.0)
    use_counterfactuals: bool = Field(True, description="False = plain KD (\"KD w/o mask\").")
    teacher_mode: Literal["replicated", "zero3", "topk_cache"] = "replicated"
    topk: int = Field(64, ge=1, description="k of the offline teacher top-k cache.")
    chunk_size: int = Field(256, ge=1, description="Positions per chunk of the KL (memory bound).")
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
    max_failures: int = Field(1, ge=0)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    resources: TrainResources = Field(default_factory=TrainResources)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


# --------------------------------------------------------------------------- generation / evaluation


class GenerationConfig(_Section):
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy.")
    stop: list[str] = Field(default_factory=list)
    pool: PoolConfig = Field(default_factory=PoolConfig)


class BenchmarkRef(_Section):
    name: str
    kind: Literal["math", "code"] = "math"
    format: Literal["gsm8k", "math", "olympiadbench", "gsm_symbolic", "champ", "humaneval", "leetcode",
                    "livecodebench"] = "gsm_symbolic"
    path: str | None = Field(None, description="Local file; null for offline built-ins.")
    limit: int | None = Field(None, ge=1)
    fields: dict[str, str] = Field(default_factory=dict, description="Field mapping for local files.")


class EvaluationConfig(_Section):
    benchmarks: list[BenchmarkRef] = Field(
        default_factory=lambda: [BenchmarkRef(name="gsm_symbolic", format="gsm_symbolic", limit=32)]
    )
    code_timeout_s: float = Field(10.0, gt=0.0)
    code_memory_mb: int = Field(1024, ge=64)


class PipelineConfig(_Section):
    """Which stages `leaf-ray run` chains."""

    generate_teacher_responses: bool = False
    variants: list[Literal["kd", "leaf_instr", "leaf_instr_resp"]] = Field(
        default_factory=lambda: ["kd", "leaf_instr"]
    )
    evaluate: bool = True


# --------------------------------------------------------------------------- root


class LeafConfig(_Section):
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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> LeafConfig:
    """Load YAML `path` (None = all defaults), apply `--set` overrides, validate."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping, got {type(loaded).__name__}")
        tree = copy.deepcopy(loaded)
    if overrides:
        for text in overrides:
            key, value = parse_override(text)
            _set_dotted(tree, key, value, f"{source} --set {key}")
        source = f"{source} with --set {', '.join(overrides)}"
    return config_from_dict(tree, source)


def iter_fields(model: type[BaseModel] = LeafConfig, prefix: str = ""):
    """Yield (dotted key, type name, default, description) for the config reference in the README."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from iter_fields(ann, key + ".")
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = default.model_dump(mode="json")
        elif isinstance(default, list):
            default = [d.model_dump(mode="json") if isinstance(d, BaseModel) else d for d in default]
        type_name = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
        yield key, type_name, default, field.description or ""
