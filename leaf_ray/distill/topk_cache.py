"""Offline teacher top-k cache: one Ray Data pass keeps the teacher's k likeliest tokens per target position.

With ``distill.teacher_mode: topk_cache`` the trainer needs no teacher at all: a Ray Data pass (an actor pool
holding the teacher) renders every training row (originals and counterfactuals) exactly as the trainer does
(:func:`leaf_ray.distill.data.tokenize_row`), runs the teacher once, and keeps, for every target token, the
teacher's top-k token ids and log-probs at temperature t. :class:`leaf_ray.distill.teacher.TopKCacheTeacher`
reads them back per batch.

Tail mass. The teacher distribution at a position is represented as the k kept tokens with their exact
probabilities p_T(v) = softmax(logits / t)_v, plus one *tail* bucket holding the rest of the mass,
p_tail = 1 − Σ_{top-k} p_T(v), stored as ``tail_logprob`` = logsumexp of the log-probs outside the top k
(exact even when the top-k mass is close to 1; −inf when k = V). The student keeps its full distribution; its
tail bucket is its own mass outside the same k tokens, log q_tail = logsumexp(student logits / t over the
complement) − logsumexp(all). The KL over these k + 1 buckets is

    KL_k = Σ_{v ∈ top-k} p_T(v) (log p_T(v) − log p_S(v)) + p_tail (log p_tail − log q_tail)   (× t²)

With k = V it is the full KL exactly; for k < V it is a lower bound of the full KL (log-sum inequality:
p_tail log(p_tail / q_tail) ≤ Σ_{v ∉ top-k} p_T(v) log(p_T(v) / p_S(v))), and the gap is the teacher's
within-tail structure the student no longer sees. The teacher's logits are truncated to the student's vocab
(``vocab_size``) *before* the softmax, as the online loss does.

Parquet schema (one row per training row; ``n`` = its number of target tokens)::

    row_key           string             training row key: sample_id (an original) or
                                         "sample_id#scope#span_index" (a counterfactual)
    sample_id         string             the original sample (the row's group)
    scope             string             "original", "instruction" or "response:k"
    span_index        int32              -1 for originals (and collective pruning)
    is_counterfactual bool
    target_positions  list<int32>  [n]   token index t of each target token (ascending); its KL uses the
                                         logits at position t − 1
    target_ids        list<int32>  [n]   input_ids[t] (checked against the trainer's batch on lookup)
    topk_ids          list<list<int32>>  [n][k] teacher's top-k token ids, most likely first
    topk_logprobs     list<list<float>>  [n][k] log p_T at temperature t of those ids
    tail_logprob      list<float>  [n]   log p_tail (−inf when k = vocab_size)
    k                 int32
    temperature       double
    vocab_size        int32              the (student) vocabulary the distribution is over
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from leaf_ray.distill.teacher import TopKCacheTeacher
from leaf_ray.store import RunDir, replace_parquet_dir, spec_changes, spec_path

if TYPE_CHECKING:
    import ray.data

    from leaf_ray.config import GenerationConfig, LeafConfig, ModelRef, PoolConfig

SCHEMA = pa.schema([
    ("row_key", pa.string()), ("sample_id", pa.string()), ("scope", pa.string()), ("span_index", pa.int32()),
    ("is_counterfactual", pa.bool_()), ("target_positions", pa.list_(pa.int32())),
    ("target_ids", pa.list_(pa.int32())), ("topk_ids", pa.list_(pa.list_(pa.int32()))),
    ("topk_logprobs", pa.list_(pa.list_(pa.float32()))), ("tail_logprob", pa.list_(pa.float32())),
    ("k", pa.int32()), ("temperature", pa.float64()), ("vocab_size", pa.int32()),
])
ROW_COLUMNS = ("row_key", "group", "scope", "span_index", "is_counterfactual", "instruction", "prefix",
               "response")


def topk_rows(teacher_logits: torch.Tensor, k: int, temperature: float, vocab_size: int):
    """Rows ``[n, V_teacher]`` -> (top-k ids [n, k], their log-probs [n, k], tail log-prob [n]) at
    temperature t, over the first ``vocab_size`` tokens."""
    logits = teacher_logits[:, :vocab_size].float()
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    top_logprobs, top_ids = log_p.topk(k, dim=-1, sorted=True)
    tail_logprob = torch.logsumexp(log_p.scatter(-1, top_ids, float("-inf")), dim=-1)  # −inf when k = V
    return top_ids, top_logprobs, tail_logprob


class TopKTeacherBatch:
    """Ray Data ``map_batches`` callable: loads the teacher and tokenizer once per actor; training rows in,
    cache rows (:data:`SCHEMA`) out."""

    def __init__(self, teacher_ref: dict, tokenizer_ref: dict, *, k: int, temperature: float, vocab_size: int,
                 max_length: int):
        from leaf_ray.config import ModelRef
        from leaf_ray.distributed import process_device
        from leaf_ray.models import load_model, load_tokenizer

        self.device = process_device()  # the actor's assigned GPU, else the CPU
        self.model = load_model(ModelRef(**teacher_ref), device=self.device.type).to(self.device).eval()
        self.tokenizer = load_tokenizer(ModelRef(**tokenizer_ref))
        teacher_vocab = int(self.model.config.vocab_size)
        if teacher_vocab < vocab_size:
            raise ValueError(f"teacher vocab size {teacher_vocab} is smaller than student vocab size "
                             f"{vocab_size}")
        if not 1 <= k <= vocab_size:
            raise ValueError(f"top-k cache: k={k} must be in [1, vocab_size={vocab_size}]")
        self.k, self.temperature, self.vocab_size, self.max_length = k, temperature, vocab_size, max_length

    def __call__(self, batch: pa.Table) -> pa.Table:
        from leaf_ray.distill.data import tokenize_row

        rows = batch.to_pylist()
        if not rows:
            return SCHEMA.empty_table()
        encoded = [tokenize_row(self.tokenizer, r["instruction"], r["prefix"] or "", r["response"],
                                self.max_length) for r in rows]
        width = max(len(ids) for ids, _, _ in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, (ids, _, _) in enumerate(encoded):  # right padding, as the trainer's collate
            input_ids[b, : len(ids)] = torch.tensor(ids)
            attention_mask[b, : len(ids)] = 1
        with torch.no_grad():
            logits = self.model(input_ids=input_ids.to(self.device),
                                attention_mask=attention_mask.to(self.device), use_cache=False).logits
        out = []
        for b, (row, (ids, mask, _)) in enumerate(zip(rows, encoded)):
            targets = [t for t in range(1, len(ids)) if mask[t]]  # token 0 has no predicting position
            if not targets:
                raise ValueError(f"top-k cache: training row {row['row_key']!r} has no target token within "
                                 f"max_length={self.max_length}")
            positions = torch.tensor(targets, device=logits.device) - 1
            top_ids, top_lp, tail = topk_rows(logits[b, positions], self.k, self.temperature, self.vocab_size)
            out.append(dict(
                row_key=row["row_key"], sample_id=row["group"], scope=row["scope"],
                span_index=row["span_index"], is_counterfactual=row["is_counterfactual"],
                target_positions=targets, target_ids=[ids[t] for t in targets],
                topk_ids=top_ids.cpu().tolist(), topk_logprobs=top_lp.cpu().tolist(),
                tail_logprob=tail.cpu().tolist(), k=self.k, temperature=self.temperature,
                vocab_size=self.vocab_size))
        return pa.Table.from_pylist(out, schema=SCHEMA)


def score_topk(rows: pa.Table | ray.data.Dataset, *, teacher: ModelRef, tokenizer: ModelRef, k: int,
               temperature: float, vocab_size: int, max_length: int, pool: PoolConfig,
               engine: str = "transformers", generation: GenerationConfig | None = None,
               seed: int = 0) -> ray.data.Dataset:
    """Training rows (:func:`leaf_ray.distill.data.build_rows` columns) -> cache rows (:data:`SCHEMA`),
    lazily: a transformers forward of the teacher in an actor pool, or (``engine="vllm"``) the teacher's vLLM
    prompt log-probs through a ``ray.data.llm`` processor (:mod:`leaf_ray.distill.topk_vllm`)."""
    import ray.data

    from leaf_ray.config import GenerationConfig

    ds = ray.data.from_arrow(rows) if isinstance(rows, pa.Table) else rows
    missing = [c for c in ROW_COLUMNS if c not in ds.schema().names]
    if missing:
        raise ValueError(f"top-k cache: training rows lack column(s) {missing}; has {ds.schema().names}")
    ds = ds.select_columns(list(ROW_COLUMNS))
    if engine == "vllm":
        from leaf_ray.distill.topk_vllm import score_rows

        scored = score_rows(ds, teacher=teacher, tokenizer=tokenizer, k=k, temperature=temperature,
                            vocab_size=vocab_size, max_length=max_length, pool=pool,
                            generation=generation or GenerationConfig(), seed=seed)
        return scored.map_batches(to_schema, batch_format="pyarrow")
    if engine != "transformers":
        raise ValueError(f"distill.topk_engine: unknown engine {engine!r} (transformers | vllm)")
    return ds.map_batches(
        TopKTeacherBatch, batch_format="pyarrow",
        fn_constructor_kwargs=dict(teacher_ref=teacher.model_dump(), tokenizer_ref=tokenizer.model_dump(),
                                   k=k, temperature=temperature, vocab_size=vocab_size,
                                   max_length=max_length),
        **pool.map_batches_kwargs(),
    )


def build_topk_cache(rows: pa.Table | ray.data.Dataset, out_dir: str | Path, *, teacher: ModelRef,
                     tokenizer: ModelRef, k: int, temperature: float, vocab_size: int, max_length: int,
                     pool: PoolConfig, engine: str = "transformers", generation: GenerationConfig | None = None,
                     seed: int = 0) -> Path:
    """Run the cache pass (:func:`score_topk`) over training rows into ``out_dir`` (rebuilt from scratch:
    written beside it, then swapped in, with its spec recorded inside, see :func:`topk_spec`). Ray must be
    initialised.

    ``tokenizer`` must be the one the trainer tokenises with (the student's); ``vocab_size`` the student's.
    """
    scored = score_topk(rows, teacher=teacher, tokenizer=tokenizer, k=k, temperature=temperature,
                        vocab_size=vocab_size, max_length=max_length, pool=pool, engine=engine,
                        generation=generation, seed=seed)
    spec = topk_spec(teacher=teacher, tokenizer=tokenizer, k=k, temperature=temperature, vocab_size=vocab_size,
                     max_length=max_length, engine=engine)
    return replace_parquet_dir(Path(out_dir), scored, spec=spec)


def topk_spec(*, teacher: ModelRef, tokenizer: ModelRef, k: int, temperature: float, vocab_size: int,
              max_length: int, engine: str = "transformers") -> dict[str, Any]:
    """What decides the cached numbers: a cache made with another spec is rebuilt, never reused (the engine
    is recorded when it is not transformers, so caches made before engines existed stay valid)."""
    spec = {"teacher": teacher.model_dump(mode="json"), "tokenizer": tokenizer.model_dump(mode="json"), "k": k,
            "temperature": temperature, "vocab_size": vocab_size, "max_length": max_length}
    return spec if engine == "transformers" else {**spec, "engine": engine}


def cache_dir_for(cfg: LeafConfig) -> Path:
    if cfg.distill.topk_cache_dir:
        return Path(cfg.distill.topk_cache_dir)
    return RunDir.of(cfg).topk_cache


def cache_settings_for(cfg: LeafConfig) -> dict[str, Any]:
    """:func:`build_topk_cache`'s settings taken from the config (the distribution is over the shared
    tokenizer's tokens: padded vocabulary rows are cut, as in the online loss)."""
    from leaf_ray.config import ModelRef
    from leaf_ray.models import check_pair

    student = cfg.models.student
    vocab_size = check_pair(cfg.models)
    tokenizer = ModelRef(path=student.tokenizer_path or student.path, gguf_file=student.gguf_file)
    return dict(teacher=cfg.models.teacher, tokenizer=tokenizer, k=cfg.distill.topk,
                temperature=cfg.distill.temperature, vocab_size=vocab_size, max_length=cfg.data.max_length,
                engine=cfg.distill.topk_engine)


def ensure_topk_cache(cfg: LeafConfig, rows: pa.Table, say) -> Path:
    """Reuse the cache of `cfg` when it was made with the same spec and covers every row; else (re)build it."""
    path, settings = cache_dir_for(cfg), cache_settings_for(cfg)
    changed = spec_changes(spec_path(path), topk_spec(**settings))
    if path.exists() and changed is None:
        say(f"top-k cache at {path} records no spec: rebuilding")
    elif path.exists() and changed:
        say(f"top-k cache at {path} was made with other settings ({', '.join(changed[:6])}): rebuilding")
    elif path.exists():
        missing = [k for k in rows.column("row_key").to_pylist() if k not in TopKCacheLookup(path)]
        if not missing:
            return path
        say(f"top-k cache at {path} lacks {len(missing)} rows (e.g. {missing[0]!r}): rebuilding")
    say(f"building the teacher top-k cache (k={cfg.distill.topk}) at {path}")
    return build_topk_cache(rows, path, pool=cfg.distill.topk_pool, generation=cfg.generation,
                            seed=cfg.run.seed, **settings)


class TopKCacheLookup(Mapping):
    """The cache Parquet dir as a read-only mapping ``row_key -> record`` (numpy arrays, built on access)."""

    def __init__(self, path: str | Path):
        import pyarrow.dataset as pads

        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"top-k cache not found at {self.path} (run the cache pass first)")
        self.table = pads.dataset(str(self.path), format="parquet").to_table()
        missing = [c for c in SCHEMA.names if c not in self.table.column_names]
        if missing:
            raise ValueError(f"top-k cache {self.path}: missing column(s) {missing}")
        keys = self.table.column("row_key").to_pylist()
        self.index = {}
        for i, key in enumerate(keys):
            if key in self.index:
                raise ValueError(f"top-k cache {self.path}: duplicate row_key {key!r}")
            self.index[key] = i
        #: {"k", "temperature", "vocab_size"} of the whole cache (None when it is empty): compare with the
        #: config before reusing a cache.
        self.settings: dict[str, Any] | None = None
        for name in ("k", "temperature", "vocab_size"):
            values = set(self.table.column(name).to_pylist())
            if len(values) > 1:
                raise ValueError(f"top-k cache {self.path}: rows mix {name} values {sorted(values)}")
            if values:
                self.settings = {**(self.settings or {}), name: values.pop()}

    def __getitem__(self, key: str) -> dict[str, Any]:
        try:
            i = self.index[key]
        except KeyError:
            raise KeyError(f"top-k cache {self.path} has no row for key {key!r}") from None
        col = lambda name: self.table.column(name)[i]
        k = col("k").as_py()
        n = len(col("target_ids"))
        nested = lambda name, dtype: np.asarray(col(name).values.flatten(), dtype=dtype).reshape(n, k)
        return dict(target_ids=np.asarray(col("target_ids").values, dtype=np.int64),
                    target_positions=np.asarray(col("target_positions").values, dtype=np.int64),
                    topk_ids=nested("topk_ids", np.int64), topk_logprobs=nested("topk_logprobs", np.float32),
                    tail_logprob=np.asarray(col("tail_logprob").values, dtype=np.float32), k=k,
                    temperature=col("temperature").as_py(), vocab_size=col("vocab_size").as_py())

    def __contains__(self, key) -> bool:
        return key in self.index

    def __iter__(self):
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


def load_topk_teacher(path: str | Path) -> TopKCacheTeacher:
    """The teacher signal for ``teacher_mode: topk_cache``, reading the cache at ``path``."""
    return TopKCacheTeacher(TopKCacheLookup(path))


def to_schema(batch: pa.Table) -> pa.Table:
    """A batch of cache rows in :data:`SCHEMA`'s columns and types (the vLLM path's rows carry more)."""
    return batch.select(SCHEMA.names).cast(SCHEMA)
