"""Generation and teacher prompt log-probs through Ray Data LLM (`ray.data.llm`, Ray 2.60).

`generation.backend: vllm | sglang` runs a `ray.data.llm` processor: Ray Data places one engine replica per
actor of an autoscaling pool (`generation.pool.min_actors..max_actors`), each in its own placement group of
tensor x pipeline parallel workers (`generation.engine_bundle` each), and feeds it `generation.pool.batch_size`
rows a batch with continuous batching inside the engine. The processor's own chat-template and tokenize
stages are off: every row carries the prompt token ids leaf-ray renders itself
(:func:`leaf_ray.generate.backends.prompt_token_ids`: chat template, user content never parsed as control
tokens), so both engines and the transformers backend see identical ids. The completion is the engine's text
(special tokens skipped), cut before the first stop string, in the column the caller names; every input
column comes out unchanged (carried under a private prefix so the engine's own output keys, e.g. `prompt`,
never overwrite them).

The same processor, with `max_tokens=1` and `prompt_logprobs=k`, scores the teacher top-k cache
(:mod:`leaf_ray.distill.topk_cache`, `distill.topk_engine: vllm`). Settings it forces, and why, are in
:func:`logprob_engine_kwargs` and docs/generation.md.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

from leaf_ray.config import GenerationConfig, ModelRef, PoolConfig

if TYPE_CHECKING:
    import ray.data

ENGINES = ("vllm", "sglang")
#: input columns travel through the processor under this prefix (the engine stage writes `prompt`,
#: `prompt_token_ids`, `generated_text`, `metrics`, ... into the same row)
CARRY = "__leaf_in__"
#: vLLM-on-CPU settings that must be in the engine's environment before it starts (docs/environment.md §7)
VLLM_CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


class EngineConfigError(ValueError):
    pass


def cluster_has_gpus() -> bool:
    """Whether the Ray cluster this process is connected to has any GPU (Ray must be initialised)."""
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def parallel_size(engine: str, engine_kwargs: dict[str, Any]) -> int:
    """Workers of one engine replica (= bundles of its placement group)."""
    if engine == "vllm":
        return int(engine_kwargs.get("tensor_parallel_size", 1)) * int(engine_kwargs.get("pipeline_parallel_size", 1))
    return int(engine_kwargs.get("tp_size", 1)) * int(engine_kwargs.get("dp_size", 1))


def placement_bundles(gen: GenerationConfig, pool: PoolConfig, workers: int, on_gpu: bool) -> list[dict]:
    """One bundle per engine worker; the pool's custom resources (e.g. a node-slot resource the autoscaler
    scales pods by) on the first bundle only, so a replica takes one slot whatever its parallelism."""
    bundle = dict(gen.engine_bundle) if gen.engine_bundle else ({"GPU": 1.0, "CPU": 1.0} if on_gpu else {"CPU": 1.0})
    bundles = [dict(bundle) for _ in range(workers)]
    bundles[0].update(pool.resources)
    return bundles


def engine_settings(model_ref: ModelRef, gen: GenerationConfig, engine: str, *,
                    on_gpu: bool, seed: int = 0) -> tuple[str, dict[str, Any], dict[str, str]]:
    """-> (model source directory, engine kwargs, engine env vars) for `engine` on `model_ref`."""
    from leaf_ray.models import compute_dtype, converted_gguf_dir, resolve_local_path

    if engine not in ENGINES:
        raise EngineConfigError(f"generation.backend: {engine!r} is not a ray.data.llm engine ({' | '.join(ENGINES)})")
    # GGUF: the converted directory (model + tokenizer) the transformers side loads: one tokenizer, one set of
    # weights for every engine
    path = converted_gguf_dir(model_ref) if model_ref.gguf_file else resolve_local_path(model_ref.path, "model")
    tokenizer = resolve_local_path(model_ref.tokenizer_path, "tokenizer") if model_ref.tokenizer_path else path
    dtype = compute_dtype(model_ref.dtype, on_cpu=not on_gpu, force=model_ref.force_dtype,
                          what=f"{engine} {model_ref.path}")
    env: dict[str, str] = {}
    if engine == "vllm":
        kwargs = {"tokenizer": str(tokenizer), "dtype": dtype, "seed": seed, **gen.vllm_engine_kwargs}
        if not on_gpu:  # vllm-cpu: no CUDA graphs; KV cache size and thread binding come from the environment
            kwargs.setdefault("enforce_eager", True)
            env = {k: os.environ.get(k, v) for k, v in VLLM_CPU_ENV.items()}
    else:
        # token ids in, token ids out: SGLang only takes `input_ids` with its tokenizer switched off
        kwargs = {"tokenizer_path": str(tokenizer), "dtype": dtype, "random_seed": seed,
                  **gen.sglang_engine_kwargs, "skip_tokenizer_init": True}
    return str(path), kwargs, env


def processor_config(model_ref: ModelRef, gen: GenerationConfig, engine: str, *, pool: PoolConfig,
                     on_gpu: bool, seed: int = 0, engine_overrides: dict[str, Any] | None = None,
                     detokenize: bool = False):
    """The `ray.data.llm` processor config of `engine` (validated by Ray's own pydantic model: a bad engine
    setting fails here, before any actor starts)."""
    from ray.data.llm import SGLangEngineProcessorConfig, vLLMEngineProcessorConfig

    source, kwargs, env = engine_settings(model_ref, gen, engine, on_gpu=on_gpu, seed=seed)
    kwargs.update(engine_overrides or {})
    common = {
        "model_source": source, "engine_kwargs": kwargs, "batch_size": pool.batch_size,
        "concurrency": (pool.min_actors, pool.max_actors),
        "runtime_env": {"env_vars": env} if env else None,
        # leaf-ray renders and tokenises prompts itself (chat template, control-token guarantee)
        "chat_template_stage": False, "tokenize_stage": False, "detokenize_stage": detokenize,
    }
    try:
        if engine == "vllm":
            bundles = placement_bundles(gen, pool, parallel_size(engine, kwargs), on_gpu)
            return vLLMEngineProcessorConfig(
                **common, placement_group_config={"bundles": bundles, "strategy": "PACK"},
                # the Prometheus stat logger needs Ray's metrics agent; off, it fails the engine actor on
                # clusters started without one (docs/environment.md §7)
                log_engine_metrics=False)
        # SGLang's stage asks for tp_size x dp_size GPUs itself (no placement-group setting)
        return SGLangEngineProcessorConfig(**common)
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        raise EngineConfigError(f"generation ({engine}): invalid ray.data.llm processor settings: {e}") from None


# --------------------------------------------------------------------------- generation


@functools.lru_cache(maxsize=4)
def _tokenizer(model_ref_json: str, chat_template: str | None):
    from leaf_ray.models import load_tokenizer

    tok = load_tokenizer(ModelRef.model_validate_json(model_ref_json))
    if chat_template:
        tok.chat_template = chat_template
    return tok


def _prompt_ids_batch(batch, *, model_ref_json: str, chat_template: str | None, prompt_col: str,
                      prefix_col: str | None, ids_col: str):
    """Ray Data task: the prompt token ids every backend is fed (tokenizer loaded once per worker)."""
    import pyarrow as pa

    from leaf_ray.generate.backends import prompt_token_ids

    prefixes = [p or "" for p in batch.column(prefix_col).to_pylist()] if prefix_col else None
    ids = prompt_token_ids(_tokenizer(model_ref_json, chat_template), batch.column(prompt_col).to_pylist(),
                           prefixes)
    renamed = batch.rename_columns([CARRY + c for c in batch.column_names])
    return renamed.append_column(ids_col, pa.array(ids, pa.list_(pa.int32())))


def generation_sampling_params(gen: GenerationConfig, engine: str, seed: int) -> dict[str, Any]:
    """The per-row sampling parameters (greedy when `temperature == 0`), in the engine's own names."""
    greedy = gen.temperature == 0
    if engine == "vllm":
        return {"max_tokens": gen.max_new_tokens, "temperature": gen.temperature,
                "top_p": 1.0 if greedy else gen.top_p, "stop": list(gen.stop) or None,
                "seed": None if greedy else seed, "skip_special_tokens": True}
    # SGLang without its tokenizer (token ids in) cannot match stop strings: the text is cut afterwards
    return {"max_new_tokens": gen.max_new_tokens, "temperature": gen.temperature,
            "top_p": 1.0 if greedy else gen.top_p}


def _request(row: dict, *, ids_col: str, sampling_params: dict, engine: str) -> dict:
    row["tokenized_prompt"] = list(row.pop(ids_col))
    row["sampling_params"] = dict(sampling_params)
    if engine == "sglang":
        row["prompt"] = None  # its stage pops `prompt` unconditionally; the ids are the prompt
    return row


def _completion(row: dict, *, out_col: str, stop: list[str]) -> dict:
    from leaf_ray.generate.backends import GenerationError, cut_at_stop

    error = row.get("__inference_error__") or ""
    if error:
        raise GenerationError(f"generation engine failed on a row: {error}")
    out = {k[len(CARRY):]: v for k, v in row.items() if k.startswith(CARRY)}
    out[out_col] = cut_at_stop(row.get("generated_text") or "", stop)
    return out


def generate_dataset(cfg, model_ref: ModelRef, ds: ray.data.Dataset, prompt_col: str, out_col: str, *,
                     prefix_col: str | None = None) -> ray.data.Dataset:
    """`ds` plus `out_col` (string): the completion of each row's `prompt_col` instruction (after its
    `prefix_col` response prefix) by the `generation.backend` engine through a `ray.data.llm` processor.
    Lazy; Ray must be initialised."""
    from ray.data.llm import build_processor

    gen, engine = cfg.generation, cfg.generation.backend
    schema = ds.schema(fetch_if_missing=False)  # known for read/from_* datasets; never runs the plan for it
    names = list(schema.names) if schema is not None else None
    if names is not None and (prompt_col not in names or (prefix_col and prefix_col not in names)):
        raise EngineConfigError(f"generation: dataset lacks column {prompt_col!r}"
                                f"{f' or {prefix_col!r}' if prefix_col else ''}; has {names}")
    config = processor_config(model_ref, gen, engine, pool=gen.pool, on_gpu=cluster_has_gpus(),
                              seed=cfg.run.seed, detokenize=engine == "sglang")
    ids_col = "__leaf_prompt_ids"
    # one tokenising task per engine batch (each task is a worker importing transformers)
    with_ids = ds.map_batches(_prompt_ids_batch, batch_format="pyarrow", batch_size=gen.pool.batch_size, fn_kwargs={
        "model_ref_json": model_ref.model_dump_json(), "chat_template": gen.chat_template, "prompt_col": prompt_col,
        "prefix_col": prefix_col, "ids_col": ids_col})
    processor = build_processor(
        config,
        preprocess=functools.partial(_request, ids_col=ids_col, engine=engine,
                                     sampling_params=generation_sampling_params(gen, engine, cfg.run.seed)),
        postprocess=functools.partial(_completion, out_col=out_col, stop=list(gen.stop)))
    target = _with_column(schema, out_col)
    # rows -> Arrow again: back to the input's exact types (e.g. int32 stays int32) where they are known
    generated = processor(with_ids)
    return generated if target is None else generated.map_batches(_cast, batch_format="pyarrow",
                                                                   fn_kwargs={"schema": target})


def _with_column(schema, name: str):
    import pyarrow as pa

    base = getattr(schema, "base_schema", None)
    if not isinstance(base, pa.Schema):
        return None
    if name in base.names:
        return base.set(base.get_field_index(name), pa.field(name, pa.string()))
    return base.append(pa.field(name, pa.string()))


def _cast(batch, *, schema):
    return batch.select(schema.names).cast(schema)
