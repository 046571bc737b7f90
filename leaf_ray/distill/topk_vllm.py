"""The teacher top-k cache from vLLM prompt log-probs (`distill.topk_engine: vllm`), through Ray Data LLM.

Each training row is rendered and tokenised exactly as the trainer does (:func:`leaf_ray.distill.data.tokenize_row`)
and sent to the teacher's vLLM engine as a token prompt with `max_tokens=1, prompt_logprobs=n`: for every
prompt position t the engine returns the n likeliest tokens of p(x_t | x_<t) (with their ranks) plus x_t itself.
That is the distribution the cache keeps for target token t (the transformers pass reads logits[t - 1]).

What the engine must (not) do, set by :func:`logprob_engine_kwargs` (docs/generation.md):

- `logprobs_mode="raw_logprobs"`: log-softmax of the raw logits (no temperature, penalties or top-p/k applied);
  hence `distill.temperature` must be 1 (a top-k of raw log-probs cannot be re-tempered: the normaliser
  needs the whole vocabulary).
- `enable_prefix_caching=False`: positions served from the prefix cache are not recomputed, and have no prompt
  log-probs to return.
- `max_logprobs` raised to n (vLLM's default is 20).
- Chunked prefill is left as vLLM has it: the V1 engine gathers prompt log-probs chunk by chunk (the crosscheck
  splits its rows into 16-token chunks and compares every position against transformers).

Vocabulary: log-probs are over the teacher's whole (possibly padded) vocabulary. Ids >= the student's
`vocab_size` are dropped and the rest renormalised by the mass of the dropped ids the engine returned (n is
k plus up to 16 such ids); mass of dropped ids ranked below n is not known and stays in the tail bucket
(zero for a shared vocabulary; padded embedding rows of real checkpoints carry ~0 mass).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import ray.data

    from leaf_ray.config import GenerationConfig, ModelRef, PoolConfig

MAX_K = 64
CARRY_COLUMNS = ("row_key", "group", "scope", "span_index", "is_counterfactual")


class VLLMTopKError(ValueError):
    pass


def logprob_count(k: int, teacher_vocab: int, vocab_size: int) -> int:
    """n of `prompt_logprobs=n`: k, plus room for ids the student vocabulary does not have."""
    return k + min(max(teacher_vocab - vocab_size, 0), 16)


def logprob_engine_kwargs(n: int) -> dict[str, Any]:
    return {"max_logprobs": n, "logprobs_mode": "raw_logprobs", "enable_prefix_caching": False}


def check_settings(k: int, temperature: float) -> None:
    if not 1 <= k <= MAX_K:
        raise VLLMTopKError(f"distill.topk={k}: the vLLM top-k cache supports k in [1, {MAX_K}]")
    if temperature != 1.0:
        raise VLLMTopKError(f"distill.temperature={temperature}: the vLLM top-k cache needs temperature 1 (vLLM "
                            "returns raw log-probs; re-tempering a top-k needs the whole vocabulary); use "
                            "distill.topk_engine=transformers")


def topk_from_prompt_logprobs(prompt_logprobs: list, targets: list[int], k: int, n: int, vocab_size: int,
                              row_key: str = "?") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Engine prompt log-probs (one `{token_id: {"logprob", "rank", ...}}` or None per prompt position) ->
    (top-k ids [len(targets), k], their log-probs, tail log-prob) at the target positions, over ids <
    `vocab_size` (see the module docstring)."""
    top_ids = np.zeros((len(targets), k), dtype=np.int64)
    top_lp = np.zeros((len(targets), k), dtype=np.float64)
    tail = np.zeros(len(targets), dtype=np.float64)
    for i, t in enumerate(targets):
        entry = prompt_logprobs[t] if t < len(prompt_logprobs) else None
        if not entry:
            raise VLLMTopKError(f"top-k cache (vllm): training row {row_key!r}: no prompt log-probs at position {t}")
        # the engine adds the prompt token itself when it ranks below n: keep the true top n only
        ranked = sorted((e for e in (_entry(tok, info) for tok, info in entry.items() if info is not None)
                         if e[0] <= n), key=lambda e: e[0])
        dropped = [lp for _, tok, lp in ranked if tok >= vocab_size]
        kept = [(tok, lp) for _, tok, lp in ranked if tok < vocab_size][:k]
        if len(kept) < k:
            raise VLLMTopKError(f"top-k cache (vllm): training row {row_key!r}, position {t}: {len(kept)} of the "
                                f"engine's top {n} ids are inside vocab_size={vocab_size}, need k={k}")
        log_norm = math.log1p(-min(sum(math.exp(lp) for lp in dropped), 1.0 - 1e-12)) if dropped else 0.0
        top_ids[i] = [tok for tok, _ in kept]
        top_lp[i] = [lp - log_norm for _, lp in kept]
        mass = float(np.exp(top_lp[i]).sum())
        tail[i] = -math.inf if k == vocab_size or mass >= 1.0 else math.log1p(-mass)
    return top_ids, top_lp, tail


def _entry(token, info) -> tuple[int, int, float]:
    """(rank, token id, log-prob) of a vLLM `Logprob` or of its dict form (what the Ray Data stage returns)."""
    if isinstance(info, dict):
        return int(info["rank"]), int(token), float(info["logprob"])
    return int(info.rank), int(token), float(info.logprob)


def _inputs_batch(batch, *, tokenizer_json: str, max_length: int):
    """Ray Data task: the trainer's token ids and target positions of each training row."""
    import pyarrow as pa

    from leaf_ray.distill.data import tokenize_row
    from leaf_ray.generate.ray_data_llm import CARRY

    tok = _tokenizer(tokenizer_json)
    ids_col, targets_col = [], []
    for r in batch.to_pylist():
        ids, mask, _ = tokenize_row(tok, r["instruction"], r["prefix"] or "", r["response"], max_length)
        targets = [t for t in range(1, len(ids)) if mask[t]]  # token 0 has no predicting position
        if not targets:
            raise VLLMTopKError(f"top-k cache: training row {r['row_key']!r} has no target token within "
                                f"max_length={max_length}")
        ids_col.append(ids)
        targets_col.append(targets)
    out = batch.select(list(CARRY_COLUMNS))
    out = out.rename_columns([CARRY + c for c in out.column_names])
    return out.append_column("__leaf_ids", pa.array(ids_col, pa.list_(pa.int32()))).append_column(
        "__leaf_targets", pa.array(targets_col, pa.list_(pa.int32())))


@functools.lru_cache(maxsize=2)
def _tokenizer(tokenizer_json: str):
    from leaf_ray.config import ModelRef
    from leaf_ray.models import load_tokenizer

    return load_tokenizer(ModelRef.model_validate_json(tokenizer_json))


def _request(row: dict, *, n: int) -> dict:
    row["tokenized_prompt"] = list(row.pop("__leaf_ids"))
    # one generated token (vLLM needs max_tokens >= 1); the prompt log-probs are the point
    row["sampling_params"] = {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": n, "detokenize": False}
    return row


def _cache_row(row: dict, *, k: int, n: int, temperature: float, vocab_size: int) -> dict:
    from leaf_ray.generate.ray_data_llm import CARRY

    error = row.get("__inference_error__") or ""
    carried = {c: row[CARRY + c] for c in CARRY_COLUMNS}
    if error:
        raise VLLMTopKError(f"top-k cache (vllm): training row {carried['row_key']!r}: engine error {error}")
    ids, targets = list(row["prompt_token_ids"]), [int(t) for t in row["__leaf_targets"]]
    top_ids, top_lp, tail = topk_from_prompt_logprobs(row["prompt_logprobs"], targets, k, n, vocab_size,
                                                      carried["row_key"])
    return {"row_key": carried["row_key"], "sample_id": carried["group"], "scope": carried["scope"],
                "span_index": carried["span_index"], "is_counterfactual": carried["is_counterfactual"],
                "target_positions": targets, "target_ids": [int(ids[t]) for t in targets],
                "topk_ids": top_ids.tolist(), "topk_logprobs": top_lp.tolist(), "tail_logprob": tail.tolist(), "k": k,
                "temperature": temperature, "vocab_size": vocab_size}


def score_rows(ds: ray.data.Dataset, *, teacher: ModelRef, tokenizer: ModelRef, k: int, temperature: float,
               vocab_size: int, max_length: int, pool: PoolConfig, generation: GenerationConfig,
               seed: int = 0) -> ray.data.Dataset:
    """Training rows (:data:`leaf_ray.distill.topk_cache.ROW_COLUMNS`) -> cache rows (its SCHEMA), lazily,
    through a vLLM `ray.data.llm` processor on the teacher. Ray must be initialised."""
    from ray.data.llm import build_processor

    from leaf_ray.generate.ray_data_llm import cluster_has_gpus, processor_config
    from leaf_ray.models import model_config, vocab_size_of

    check_settings(k, temperature)
    teacher_vocab = vocab_size_of(model_config(teacher))
    if teacher_vocab < vocab_size:
        raise VLLMTopKError(f"teacher vocab size {teacher_vocab} is smaller than student vocab size {vocab_size}")
    n = logprob_count(k, teacher_vocab, vocab_size)
    config = processor_config(teacher, generation, "vllm", pool=pool, on_gpu=cluster_has_gpus(), seed=seed,
                              engine_overrides=logprob_engine_kwargs(n))
    inputs = ds.map_batches(_inputs_batch, batch_format="pyarrow", batch_size=pool.batch_size, fn_kwargs={
        "tokenizer_json": tokenizer.model_dump_json(), "max_length": max_length})
    processor = build_processor(
        config, preprocess=functools.partial(_request, n=n),
        postprocess=functools.partial(_cache_row, k=k, n=n, temperature=temperature, vocab_size=vocab_size))
    return processor(inputs)  # the caller (topk_cache.py) casts to its SCHEMA: no import back up
