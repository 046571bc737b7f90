"""Stage 2 training data: originals + counterfactuals -> tokenised rows -> grouped, length-bucketed batches.

Three steps, each a plain function:

1. :func:`build_rows` joins ``data/clean`` (the originals) with ``detect/counterfactuals`` into one table of
   training rows. Every row has ``is_counterfactual`` and a ``group`` (its ``sample_id``): an original and
   all of its counterfactuals share one group.
2. :func:`tokenize_rows` renders each row with the chat template (:func:`leaf_ray.data.chat.render`) and keeps
   ``input_ids`` and ``target_mask`` (1 = a distillation-target token, predicted by the logits one position
   earlier). Originals and instruction-level counterfactuals: context = instruction, target = the response.
   Response-level counterfactuals: context = instruction + pruned response prefix, target = the continuation
   only (``render(..., scored="prefix", prefix=pruned_prefix)``).
3. :func:`plan_epoch` orders one epoch (the sampler) and :func:`collate` pads one micro-batch.

The sampler (deterministic in ``(seed, epoch)``, which is what makes resume exact):

- groups are shuffled with ``numpy.random.default_rng([seed, epoch])``; rows of a group stay consecutive, so an
  original trains in the same (or the adjacent) micro-batch as its counterfactuals;
- length grouping: the shuffled groups are cut into windows of about ``bucket_steps`` optimizer steps' worth of
  rows, and inside a window the groups are sorted by length (longest first), so a micro-batch holds similar
  lengths and the ranks of one accumulation slot get similar work;
- the row stream is cut into micro-batches of ``micro_batch_size``; micro-batch ``j`` of the epoch goes to
  optimizer step ``j // (W*A)``, accumulation slot ``(j % (W*A)) // W`` and rank ``j % W`` (W = world size,
  A = accumulation steps). The last step of an epoch may have fewer than W*A micro-batches; its empty slots
  are filled with zero-weight padding micro-batches (every rank must run the same number of forward/backward
  passes for DeepSpeed's collectives) and the real ones are re-weighted so the step is a mean over real
  micro-batches (see :func:`leaf_ray.distill.trainer.micro_batch_weight`).

Dynamic padding: :func:`collate` pads to the longest row of the micro-batch, never to ``data.max_length``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from leaf_ray.store import RunDir

# Which counterfactual scopes each variant trains on ("kd" = KD w/o mask: originals only).
VARIANT_SCOPES: dict[str, tuple[str, ...]] = {
    "kd": (),
    "leaf_instr": ("instruction",),
    "leaf_instr_resp": ("instruction", "response"),
}

CLEAN_COLUMNS = ("sample_id", "instruction", "output", "split")
COUNTERFACTUAL_COLUMNS = ("sample_id", "scope", "span_index", "instruction", "response_prefix", "output")
ROW_COLUMNS = ("row_key", "group", "split", "is_counterfactual", "scope", "span_index", "instruction",
               "prefix", "response")


class DistillDataError(ValueError):
    """Bad Stage 2 input: names the dataset, the row and what is wrong."""


# --------------------------------------------------------------------------- 1. rows


def read_stage_output(path: Path, what: str) -> pa.Table:
    """A Parquet directory another stage wrote (all its parts); a clear error naming `what` when absent."""
    import pyarrow.dataset as pads

    if not path.exists():
        raise DistillDataError(f"{what} not found at {path}")
    return pads.dataset(str(path), format="parquet").to_table()


def _require(table: pa.Table, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DistillDataError(f"{what}: missing column(s) {missing}; has {table.column_names}")


def counterfactual_row_key(sample_id: str, scope: str, span_index: int) -> str:
    return f"{sample_id}#{scope}#{span_index}"


def build_rows(clean: pa.Table, counterfactuals: pa.Table | None, scopes: Sequence[str]) -> pa.Table:
    """Originals (all of ``clean``) + the counterfactuals whose scope is in ``scopes`` ("instruction" or
    "response", which matches every "response:k").

    A counterfactual's split is its original's split (so a validation sample never leaks into training);
    a counterfactual whose ``sample_id`` is not in ``clean`` or whose own ``split`` disagrees is an error.
    Rows are ordered by (group, original first, scope, span_index): a stable order independent of how the
    Parquet files were written.
    """
    _require(clean, CLEAN_COLUMNS, "data/clean")
    originals = clean.select(list(CLEAN_COLUMNS)).to_pylist()
    split_of: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    for i, r in enumerate(originals):
        sid = r["sample_id"]
        if sid in split_of:
            raise DistillDataError(f"data/clean row {i}: duplicate sample_id {sid!r}")
        if not r["instruction"] or r["output"] is None:
            raise DistillDataError(f"data/clean row {i} (sample_id {sid!r}): empty instruction or output")
        if r["split"] not in ("train", "validation"):
            raise DistillDataError(f"data/clean row {i} (sample_id {sid!r}): split {r['split']!r} is not "
                                   "'train' or 'validation'")
        split_of[sid] = r["split"]
        rows.append(dict(row_key=sid, group=sid, split=r["split"], is_counterfactual=False, scope="original",
                         span_index=-1, instruction=r["instruction"], prefix="", response=r["output"]))
    if scopes and counterfactuals is not None and counterfactuals.num_rows:
        _require(counterfactuals, COUNTERFACTUAL_COLUMNS, "detect/counterfactuals")
        has_split = "split" in counterfactuals.column_names
        for i, r in enumerate(counterfactuals.to_pylist()):
            sid, scope = r["sample_id"], r["scope"]
            kind = scope.split(":", 1)[0]
            if kind not in ("instruction", "response"):
                raise DistillDataError(f"detect/counterfactuals row {i} (sample_id {sid!r}): unknown scope "
                                       f"{scope!r} (expected 'instruction' or 'response:k')")
            if kind not in scopes:
                continue
            if sid not in split_of:
                raise DistillDataError(f"detect/counterfactuals row {i}: sample_id {sid!r} is not in data/clean")
            if has_split and r["split"] is not None and r["split"] != split_of[sid]:
                raise DistillDataError(f"detect/counterfactuals row {i} (sample_id {sid!r}): split "
                                       f"{r['split']!r} but its original is in {split_of[sid]!r}")
            prefix = r["response_prefix"] or ""
            if kind == "response" and not prefix:
                raise DistillDataError(f"detect/counterfactuals row {i} (sample_id {sid!r}, scope {scope}): "
                                       "response-level counterfactual with an empty response_prefix")
            if not r["instruction"] or not r["output"]:
                raise DistillDataError(f"detect/counterfactuals row {i} (sample_id {sid!r}): empty "
                                       "instruction or output")
            rows.append(dict(row_key=counterfactual_row_key(sid, scope, int(r["span_index"])), group=sid,
                             split=split_of[sid], is_counterfactual=True, scope=scope,
                             span_index=int(r["span_index"]), instruction=r["instruction"], prefix=prefix,
                             response=r["output"]))
    keys = [r["row_key"] for r in rows]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise DistillDataError(f"detect/counterfactuals: duplicate (sample_id, scope, span_index) {dup!r}")
    rows.sort(key=lambda r: (r["group"], r["is_counterfactual"], r["scope"], r["span_index"]))
    schema = pa.schema([("row_key", pa.string()), ("group", pa.string()), ("split", pa.string()),
                        ("is_counterfactual", pa.bool_()), ("scope", pa.string()), ("span_index", pa.int32()),
                        ("instruction", pa.string()), ("prefix", pa.string()), ("response", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


def load_rows(run_dir: str | Path, variant: str,
              use_counterfactuals: bool = True) -> tuple[pa.Table, pa.Table | None]:
    """Read ``<run dir>/data/clean`` (+ ``detect/counterfactuals`` for LeaF variants).

    -> (training rows of :func:`build_rows`, the counterfactuals table as read, or None for KD)."""
    if variant not in VARIANT_SCOPES:
        raise DistillDataError(f"unknown variant {variant!r}; expected one of {sorted(VARIANT_SCOPES)}")
    run = RunDir(Path(run_dir))
    clean = read_stage_output(run.clean, "data/clean (run `leaf-ray ingest` first)")
    scopes = VARIANT_SCOPES[variant] if use_counterfactuals else ()
    cfs = None
    if scopes:
        cfs = read_stage_output(run.detect.counterfactuals,
                                f"detect/counterfactuals (variant {variant} needs them: run `leaf-ray detect`)")
    return build_rows(clean, cfs, scopes), cfs


# --------------------------------------------------------------------------- 2. tokenisation


def tokenize_row(tokenizer, instruction: str, prefix: str, response: str, max_length: int):
    """-> (input_ids, target_mask, truncated). Context = instruction (+ prefix); targets = the response."""
    from leaf_ray.data.chat import render

    if prefix:
        rendered = render(tokenizer, instruction, response, scored="prefix", prefix=prefix)
    else:
        rendered = render(tokenizer, instruction, response)
    ids, mask = rendered.input_ids, rendered.target_mask
    truncated = len(ids) > max_length
    return ids[:max_length], mask[:max_length], truncated


def tokenize_rows(batch: dict[str, Sequence], tokenizer, max_length: int) -> dict[str, list]:
    """Add ``input_ids`` (int32), ``target_mask`` (int8), ``length``, ``n_targets`` and ``truncated`` to a
    column batch of :func:`build_rows` rows. A row left with no target token is an error naming it."""
    out = {k: list(v) for k, v in batch.items()}
    ids_col, mask_col, lengths, n_targets, truncated = [], [], [], [], []
    for key, instr, prefix, resp in zip(batch["row_key"], batch["instruction"], batch["prefix"],
                                        batch["response"]):
        ids, mask, cut = tokenize_row(tokenizer, instr, prefix, resp, max_length)
        if sum(mask[1:]) == 0:  # token 0 has no predecessor: it can never be a target
            raise DistillDataError(f"training row {key!r}: no response token within data.max_length="
                                   f"{max_length} (rendered length > max_length?)")
        ids_col.append(np.asarray(ids, dtype=np.int32))
        mask_col.append(np.asarray(mask, dtype=np.int8))
        lengths.append(len(ids))
        n_targets.append(int(sum(mask[1:])))
        truncated.append(cut)
    out.update(input_ids=ids_col, target_mask=mask_col, length=lengths, n_targets=n_targets,
               truncated=truncated)
    return out


class TokenizeBatch:
    """Ray Data ``map_batches`` callable: loads the tokenizer once per actor."""

    def __init__(self, tokenizer_ref: dict, max_length: int):
        from leaf_ray.config import ModelRef
        from leaf_ray.models import load_tokenizer

        self.tokenizer = load_tokenizer(ModelRef(**tokenizer_ref))
        self.max_length = max_length

    def __call__(self, batch: pa.Table) -> pa.Table:
        cols = tokenize_rows(batch.to_pydict(), self.tokenizer, self.max_length)
        cols["input_ids"] = pa.array([a.tolist() for a in cols["input_ids"]], type=pa.list_(pa.int32()))
        cols["target_mask"] = pa.array([a.tolist() for a in cols["target_mask"]], type=pa.list_(pa.int8()))
        return pa.table(cols)


# --------------------------------------------------------------------------- 3. sampler and collation


@dataclass
class TokenizedRows:
    """One split's rows in memory, in the stable row_key order (independent of Ray Data's block order)."""

    row_key: list[str]
    group: list[str]
    is_counterfactual: np.ndarray  # bool [N]
    input_ids: list[np.ndarray]  # int32 per row
    target_mask: list[np.ndarray]  # int8 per row

    def __len__(self) -> int:
        return len(self.row_key)

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray([len(a) for a in self.input_ids], dtype=np.int64)

    @classmethod
    def from_batches(cls, batches) -> TokenizedRows:
        """Collect pyarrow/numpy/dict column batches (e.g. a Ray Data iterator) and sort by (group, row_key
        order of :func:`build_rows`)."""
        cols: dict[str, list] = {"row_key": [], "group": [], "is_counterfactual": [], "input_ids": [],
                                 "target_mask": [], "scope": [], "span_index": []}
        for b in batches:
            d = b.to_pydict() if isinstance(b, pa.Table) else b
            for k in cols:
                cols[k].extend(list(d[k]))
        order = sorted(range(len(cols["row_key"])), key=lambda i: (
            cols["group"][i], bool(cols["is_counterfactual"][i]), cols["scope"][i], int(cols["span_index"][i])))
        return cls(row_key=[cols["row_key"][i] for i in order], group=[cols["group"][i] for i in order],
                   is_counterfactual=np.asarray([bool(cols["is_counterfactual"][i]) for i in order], dtype=bool),
                   input_ids=[np.asarray(cols["input_ids"][i], dtype=np.int32) for i in order],
                   target_mask=[np.asarray(cols["target_mask"][i], dtype=np.int8) for i in order])


@dataclass
class EpochPlan:
    """``steps[s][a][r]`` = row indices of the micro-batch rank r runs in accumulation slot a of optimizer
    step s, or None for a zero-weight padding micro-batch."""

    steps: list[list[list[list[int] | None]]]

    def real_micro_batches(self, step: int) -> int:
        return sum(mb is not None for slot in self.steps[step] for mb in slot)

    def rows_of(self, rank: int) -> list[int]:
        return [i for step in self.steps for slot in step for i in (slot[rank] or [])]


def steps_per_epoch(num_rows: int, micro_batch_size: int, world_size: int, accum_steps: int) -> int:
    return math.ceil(math.ceil(num_rows / micro_batch_size) / (world_size * accum_steps))


def plan_epoch(groups: Sequence[str], lengths: Sequence[int], *, seed: int, epoch: int, micro_batch_size: int,
               world_size: int = 1, accum_steps: int = 1, bucket_steps: int = 8,
               shuffle: bool = True) -> EpochPlan:
    """The sampler: a deterministic function of (rows, seed, epoch). See the module docstring.

    ``groups[i]``/``lengths[i]`` describe row i; rows of one group must be consecutive (as
    :class:`TokenizedRows` keeps them).
    """
    lengths = np.asarray(lengths)
    group_rows: list[list[int]] = []
    for i, g in enumerate(groups):
        if i and g == groups[i - 1]:
            group_rows[-1].append(i)
        else:
            group_rows.append([i])
    order = np.arange(len(group_rows))
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(len(group_rows))
    rows_per_step = micro_batch_size * world_size * accum_steps
    window_rows = max(1, bucket_steps) * rows_per_step
    stream: list[int] = []
    window: list[list[int]] = []

    def flush():
        # Longest group first; ties keep the shuffled order (sorted() is stable).
        for rows in sorted(window, key=lambda rs: -int(lengths[rs].max())):
            stream.extend(rows)
        window.clear()

    n_window = 0
    for g in order:
        window.append(group_rows[g])
        n_window += len(group_rows[g])
        if n_window >= window_rows:
            flush()
            n_window = 0
    flush()
    micro = [stream[i:i + micro_batch_size] for i in range(0, len(stream), micro_batch_size)]
    per_step = world_size * accum_steps
    steps = []
    for s in range(math.ceil(len(micro) / per_step)):
        chunk = micro[s * per_step:(s + 1) * per_step]
        chunk += [None] * (per_step - len(chunk))
        steps.append([[chunk[a * world_size + r] for r in range(world_size)] for a in range(accum_steps)])
    return EpochPlan(steps=steps)


def collate(rows: TokenizedRows, indices: Sequence[int], pad_token_id: int) -> dict[str, Any]:
    """Right-pad one micro-batch to its longest row (dynamic padding).

    -> ``input_ids`` long [B,T], ``attention_mask`` long [B,T], ``target_mask`` long [B,T] (0 on padding),
    ``is_counterfactual`` bool [B], ``row_keys`` list[str], ``n_tokens`` (real tokens).
    """
    import torch

    width = max(len(rows.input_ids[i]) for i in indices)
    input_ids = torch.full((len(indices), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
    target_mask = torch.zeros((len(indices), width), dtype=torch.long)
    for b, i in enumerate(indices):
        n = len(rows.input_ids[i])
        input_ids[b, :n] = torch.from_numpy(rows.input_ids[i].astype(np.int64))
        attention_mask[b, :n] = 1
        target_mask[b, :n] = torch.from_numpy(rows.target_mask[i].astype(np.int64))
    target_mask[:, 0] = 0  # the first token has no predecessor to predict it
    return dict(input_ids=input_ids, attention_mask=attention_mask, target_mask=target_mask,
                is_counterfactual=torch.as_tensor(rows.is_counterfactual[list(indices)], dtype=torch.bool),
                row_keys=[rows.row_key[i] for i in indices], n_tokens=int(attention_mask.sum()))


def padding_micro_batch(rows: TokenizedRows, pad_token_id: int) -> dict[str, Any]:
    """A 1-row, 2-token micro-batch with no targets: keeps ranks in step, contributes weight 0."""
    batch = collate(rows, [0], pad_token_id)
    for k in ("input_ids", "attention_mask", "target_mask"):
        batch[k] = batch[k][:, :2].clone()
    batch["target_mask"].zero_()
    batch["n_tokens"] = 0
    return batch
