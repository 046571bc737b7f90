"""The stage components of detection, in the order a unit meets them (the recipe is ``pipeline.py``)::

    tokenise (CPU tasks) ─► score: saliency actor pools ─► prune (CPU tasks) ─► commit (CPU tasks)

Each is a function (or actor class) over one Arrow block, so Ray Data can run it anywhere; the method itself is
in the pure-torch modules beside this one (``saliency``, ``confounders``, ``pruning``, ``response``,
``cross_tokenizer``). Below them: the resume bookkeeping of the committed parts, and the two helpers every
detection pass (the stream, selection, verification) runs with: the local-resources check and the progress
drain.
"""

from __future__ import annotations

import os
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from leaf_ray.config import LeafConfig, ModelRef
from leaf_ray.detect.schema import (
    COUNTERFACTUALS_SCHEMA,
    QUARANTINE_SCHEMA,
    RESULTS_SCHEMA,
    SCORES_SCHEMA,
    UNITS_SCHEMA,
    DetectionError,
)
from leaf_ray.raycluster import cached_tokenizer
from leaf_ray.store import DetectPaths, commit_parts, drop_uncommitted_parts, read_parquet_dir

if TYPE_CHECKING:
    from rich.console import Console


# --------------------------------------------------------------------------- tokenise (CPU tasks)


def plan_units(instruction: str, output: str, *, instruction_level: bool,
               response: dict) -> list[tuple[str, str, str]]:
    """The (scope, scored_text, continuation) units of one sample.

    A response with fewer than two segments has no (prefix, continuation) pair: it yields a `response` unit
    that is quarantined with that reason, so it is reported (and counted as done on resume), not dropped.
    """
    from leaf_ray.detect.response import prefix_continuations, split_steps

    units = [("instruction", instruction, output)] if instruction_level else []
    if response["enabled"]:
        pairs = prefix_continuations(split_steps(output, response["step_pattern"], response["num_segments"]))
        if not pairs:
            units.append(("response", "", output))
        units += [(f"response:{k}", prefix, rest) for k, (prefix, rest) in enumerate(pairs, start=1)]
    return units


def render_unit(tokenizer, instruction: str, scope: str, scored_text: str, continuation: str):
    """Render one unit with `tokenizer`'s chat template (`leaf_ray.data.chat.render`)."""
    from leaf_ray.data.chat import render

    if scope == "instruction":
        return render(tokenizer, instruction, continuation)
    return render(tokenizer, instruction, continuation, scored="prefix", prefix=scored_text)


def scored_char_offsets(rendered) -> list[tuple[int, int]]:
    """Character offsets of the scored tokens relative to the scored text (instruction or response prefix), as
    the caller wrote it: a template that trims whitespace does not shift them (`RenderedSample.scored_offsets`)."""
    return rendered.scored_offsets()


def tokenise_units(batch: pa.Table, *, student: dict, instruction_level: bool, response: dict,
                   done: frozenset) -> pa.Table:
    """Samples -> units not yet committed, tokenised with the student's tokenizer and chat template, sorted by
    length within the block."""
    from leaf_ray.data.chat import TemplateError

    tokenizer = cached_tokenizer(ModelRef(**student).model_dump_json())
    rows = []
    for sample in batch.to_pylist():
        instruction, output = sample["instruction"] or "", sample["output"] or ""
        for scope, scored_text, continuation in plan_units(instruction, output, response=response,
                                                           instruction_level=instruction_level):
            if (sample["sample_id"], scope) in done:
                continue
            row = {"sample_id": sample["sample_id"], "scope": scope, "split": sample["split"],
                   "instruction": instruction, "output": output, "scored_text": scored_text,
                   "continuation": continuation, "input_ids": [], "target_mask": [], "scored_token_idx": [],
                   "token_char_offsets": [], "quarantine_stage": None, "quarantine_reason": None}
            reason = None
            if scope == "response":
                reason = (f"response has fewer than 2 segments under detection.response.step_pattern "
                          f"{response['step_pattern']!r}; the response level needs at least 2")
            elif not instruction.strip():
                reason = "instruction is empty"
            elif not continuation:
                reason = "response is empty: no loss target"
            else:
                try:
                    rendered = render_unit(tokenizer, instruction, scope, scored_text, continuation)
                except (TemplateError, ValueError) as e:
                    reason = f"cannot render: {e}"
                else:
                    if not rendered.scored_token_idx:
                        reason = f"no token covers the scored text of scope {scope}"
                    elif not any(rendered.target_mask):
                        reason = "no loss-target token after rendering"
                    else:
                        row.update(input_ids=rendered.input_ids, target_mask=rendered.target_mask,
                                   scored_token_idx=rendered.scored_token_idx,
                                   token_char_offsets=scored_char_offsets(rendered))
            if reason:
                row.update(quarantine_stage="tokenise", quarantine_reason=reason)
            rows.append(row)
    rows.sort(key=lambda r: len(r["input_ids"]))  # neighbours become one actor batch: little padding
    return pa.Table.from_pylist(rows, schema=UNITS_SCHEMA)


def tokenizers_match(student: ModelRef, teacher: ModelRef) -> bool:
    """Same tokenizer = same serialised tokenizer (vocabulary, merges, normaliser) and same chat template."""
    s, t = cached_tokenizer(student.model_dump_json()), cached_tokenizer(teacher.model_dump_json())
    return s.backend_tokenizer.to_str() == t.backend_tokenizer.to_str() and s.chat_template == t.chat_template


# --------------------------------------------------------------------------- saliency (actor pools)


def gpu_max_memory(max_memory_per_gpu: str | None) -> dict:
    """``device_map="auto"``'s budget: every visible GPU (capped at ``max_memory_per_gpu`` when set) and no CPU
    memory, so a teacher that does not fit fails to load instead of being offloaded to the CPU, where its
    layers would run each pass at CPU speed."""
    import torch

    budget: dict = {i: max_memory_per_gpu or torch.cuda.mem_get_info(i)[1] for i in range(torch.cuda.device_count())}
    budget["cpu"] = 0
    return budget


def check_on_gpus(model, role: str) -> None:
    """A ``device_map`` model must be entirely on GPUs: name the modules placed elsewhere."""
    elsewhere = {name: where for name, where in (getattr(model, "hf_device_map", None) or {}).items()
                 if isinstance(where, str) and where in ("cpu", "disk", "meta")}
    if elsewhere:
        raise ValueError(f"the {role} does not fit its GPUs: {sorted(elsewhere)[:5]} placed on "
                         f"{sorted(set(elsewhere.values()))}; raise detection.{role}_pool.num_gpus or "
                         f"max_memory_per_gpu, or use detection.teacher_pool.mode=sharded")


class SaliencyScorer:
    """A Ray Data actor holding one model; adds `<role>_grad_norm` (raw norms of the student's scored tokens)
    and `<role>_loss` to each batch of units.

    Placement: no GPU -> the whole model on CPU; up to one GPU -> on that GPU; several GPUs -> sharded
    over them with `device_map="auto"`, each capped at `max_memory_per_gpu`. Batches are padded to their own
    longest unit only, and with `max_padding` split into length groups scored one pass each. With `own_tokenizer` (a teacher whose tokenizer differs from the student's) each unit
    is rendered again with this model's tokenizer and the scores are projected onto the student's tokens by
    character overlap within the scored text (`cross_tokenizer.project_scores`).
    """

    def __init__(self, role: str, model: dict, *, dtype: str, gradient_checkpointing: bool, num_gpus: float,
                 max_memory_per_gpu: str | None, own_tokenizer: bool, max_padding: float | None = None):
        import torch

        from leaf_ray.distributed import ray_actor_device
        from leaf_ray.models import load_model

        ref = ModelRef(**model)
        self.role, self.gradient_checkpointing, self.max_padding = role, gradient_checkpointing, max_padding
        if num_gpus > 1 and torch.cuda.is_available():
            self.model = load_model(ref, device_map="auto", max_memory=gpu_max_memory(max_memory_per_gpu),
                                    dtype=dtype)
            check_on_gpus(self.model, role)
        else:
            device = ray_actor_device(num_gpus)  # a CPU actor computes on the CPU even on a GPU node
            self.model = load_model(ref, dtype=dtype, device=device.type).to(device)
        self.model.eval().requires_grad_(False)
        self.tokenizer = cached_tokenizer(ref.model_dump_json()) if own_tokenizer else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        norms: list[list[float]] = [[] for _ in rows]
        losses: list[float | None] = [None] * len(rows)
        live = []  # (row index, input_ids, target_mask, scored_token_idx, own offsets or None)
        for i, row in enumerate(rows):
            if row["quarantine_reason"] is not None:
                continue
            if self.tokenizer is None:
                live.append((i, row["input_ids"], row["target_mask"], row["scored_token_idx"], None))
                continue
            try:
                own = render_unit(self.tokenizer, row["instruction"], row["scope"], row["scored_text"],
                                  row["continuation"])
            except ValueError as e:
                self._quarantine(row, f"cannot render with the {self.role} tokenizer: {e}")
                continue
            if not own.scored_token_idx or not any(own.target_mask):
                self._quarantine(row, f"{self.role} tokenizer: no scored or no target token")
                continue
            live.append((i, own.input_ids, own.target_mask, own.scored_token_idx, scored_char_offsets(own)))
        if live:
            self._score(rows, live, norms, losses)
        for name in ("quarantine_stage", "quarantine_reason"):  # the actor may have quarantined some rows
            batch = batch.set_column(batch.schema.get_field_index(name), name,
                                     pa.array([r[name] for r in rows], pa.string()))
        batch = batch.append_column(f"{self.role}_grad_norm", pa.array(norms, pa.list_(pa.float32())))
        return batch.append_column(f"{self.role}_loss", pa.array(losses, pa.float64()))

    def _score(self, rows, live, norms, losses) -> None:
        import torch

        from leaf_ray.detect.cross_tokenizer import project_scores

        length = max(len(ids) for _, ids, *_ in live)
        input_ids = torch.zeros(len(live), length, dtype=torch.long)  # pad id is irrelevant: masked out
        attention_mask = torch.zeros(len(live), length, dtype=torch.long)
        target_mask = torch.zeros(len(live), length, dtype=torch.long)
        for b, (_, ids, target, _, _) in enumerate(live):
            input_ids[b, :len(ids)] = torch.tensor(ids)
            attention_mask[b, :len(ids)] = 1
            target_mask[b, :len(ids)] = torch.tensor(target)
        out = self._saliency(input_ids, attention_mask, target_mask)
        grad_norm, loss = out.grad_norm.float().cpu(), out.loss.float().cpu()
        for b, (i, _, _, scored_idx, own_offsets) in enumerate(live):
            scores = grad_norm[b, scored_idx]
            if own_offsets is not None:
                scores = torch.as_tensor(project_scores(own_offsets, scores, rows[i]["token_char_offsets"]),
                                         dtype=torch.float32)
            if not (torch.isfinite(scores).all() and torch.isfinite(loss[b])):
                self._quarantine(rows[i], f"non-finite {self.role} loss or gradient (dtype overflow?)")
                continue
            norms[i], losses[i] = scores.tolist(), float(loss[b])

    def _saliency(self, input_ids, attention_mask, target_mask):
        """One padded batch through the model (the sharded gang's rank overrides this)."""
        from leaf_ray.detect.saliency import token_saliency

        return token_saliency(self.model, input_ids, attention_mask, target_mask,
                              gradient_checkpointing=self.gradient_checkpointing, max_padding=self.max_padding)

    def _quarantine(self, row: dict, reason: str) -> None:
        row.update(quarantine_stage=self.role, quarantine_reason=reason)


# --------------------------------------------------------------------------- score + prune (CPU tasks)


def score_and_prune(batch: pa.Table, *, threshold, pruning: str) -> pa.Table:
    """Δ, τ, confounder spans (`confounders.score_span`) and one counterfactual per span
    (`pruning.make_counterfactuals`) for every unit that reached this stage unquarantined."""
    from leaf_ray.detect.confounders import score_span
    from leaf_ray.detect.pruning import make_counterfactuals

    results = []
    for row in batch.to_pylist():
        result = {name: None for name in RESULTS_SCHEMA.names}
        result.update(sample_id=row["sample_id"], scope=row["scope"], split=row["split"], counterfactuals=[],
                      quarantine_stage=row["quarantine_stage"], quarantine_reason=row["quarantine_reason"])
        if row["quarantine_reason"] is None:
            text, offsets = row["scored_text"], row["token_char_offsets"]
            token_texts = [text[a:b] for a, b in offsets]
            try:
                scored = score_span(row["student_grad_norm"], row["teacher_grad_norm"], token_texts,
                                    threshold)
                pruned = make_counterfactuals(text, offsets, scored.spans, mode=pruning)
            except ValueError as e:
                result.update(quarantine_stage="score", quarantine_reason=str(e))
            else:
                instruction_level = row["scope"] == "instruction"
                result.update(
                    token_texts=token_texts, token_char_offsets=offsets,
                    student_grad_norm=row["student_grad_norm"], teacher_grad_norm=row["teacher_grad_norm"],
                    delta=scored.delta.tolist(), threshold=float(scored.threshold),
                    confounder_mask=scored.confounder_mask.tolist(), spans=[list(s) for s in scored.spans],
                    student_loss=row["student_loss"], teacher_loss=row["teacher_loss"],
                    counterfactuals=[dict(
                        sample_id=row["sample_id"], scope=row["scope"], span_index=cf.span_index,
                        char_start=cf.char_start, char_end=cf.char_end, removed_text=cf.removed_text,
                        instruction=cf.text if instruction_level else row["instruction"],
                        response_prefix="" if instruction_level else cf.text,
                        output=row["continuation"], split=row["split"]) for cf in pruned])
        results.append(result)
    return pa.Table.from_pylist(results, schema=RESULTS_SCHEMA)


# --------------------------------------------------------------------------- commit (CPU tasks)


def commit_part(batch: pa.Table, *, root: str, counterfactuals_dir: str = "counterfactuals") -> pa.Table:
    """Write one block as part `<uuid>` of scores/, counterfactuals/ (or `counterfactuals_dir`: the candidates
    when verification follows), quarantine/; scores last = committed. Returns one summary row for the
    progress display."""
    paths = DetectPaths(Path(root))
    rows = batch.to_pylist()
    if not rows:  # every unit of this block was committed by an earlier run
        return pa.table({k: pa.array([0], pa.int64()) for k in
                         ("units", "scores", "counterfactuals", "quarantined", "spans")})
    kept = [r for r in rows if r["quarantine_reason"] is None]
    tables = {
        "counterfactuals": pa.Table.from_pylist([cf for r in kept for cf in r["counterfactuals"]],
                                                schema=COUNTERFACTUALS_SCHEMA),
        "quarantine": pa.Table.from_pylist(
            [dict(sample_id=r["sample_id"], scope=r["scope"], stage=r["quarantine_stage"],
                  reason=r["quarantine_reason"]) for r in rows if r["quarantine_reason"] is not None],
            schema=QUARANTINE_SCHEMA),
        "scores": pa.Table.from_pylist(kept, schema=SCORES_SCHEMA),
    }
    commit_parts(paths.tmp, [(paths.root / counterfactuals_dir, tables["counterfactuals"]),
                             (paths.quarantine, tables["quarantine"]),
                             (paths.scores, tables["scores"])],  # scores last: the commit point
                 skip_empty_but_last=True)
    summary = {"units": len(rows), "scores": len(kept), "counterfactuals": tables["counterfactuals"].num_rows,
               "quarantined": tables["quarantine"].num_rows, "spans": sum(len(r["spans"]) for r in kept)}
    return pa.table({k: pa.array([v], pa.int64()) for k, v in summary.items()})


def inline_commits(samples: pa.Table, *, scorers: list, pool_batch_sizes: list[int], tokenise: dict,
                   units_per_part: int, prune: dict, commit: dict):
    """The stream of the Ray path, in this process: tokenise, then per block of `units_per_part` units each
    scorer in batches of its pool's size, `score_and_prune`, `commit_part`; yields each commit's summary row."""
    units = tokenise_units(samples, **tokenise)
    for start in range(0, units.num_rows, units_per_part):
        block = units.slice(start, units_per_part)
        for scorer, batch_size in zip(scorers, pool_batch_sizes):
            block = pa.concat_tables([scorer(block.slice(i, batch_size))
                                      for i in range(0, block.num_rows, batch_size)])
        yield commit_part(score_and_prune(block, **prune), **commit).to_pylist()[0]


# --------------------------------------------------------------------------- resume bookkeeping


def recover_interrupted_commits(paths: DetectPaths, *, verification: bool = False) -> int:
    """Delete what a killed run left half-written: `_tmp/` and parts without a scores file (the commit);
    with verification, the stream's counterfactuals are the candidates, and a rejected-counterfactuals file
    without its counterfactuals file (the verification commit) goes too."""
    pairs = [((paths.candidates if verification else paths.counterfactuals, paths.quarantine), paths.scores)]
    if verification:
        pairs.append(((paths.rejected,), paths.counterfactuals))
    return drop_uncommitted_parts(paths.tmp, pairs)


def committed_units(paths: DetectPaths) -> frozenset[tuple[str, str]]:
    """(sample_id, scope) of every unit already scored or quarantined."""
    done: set[tuple[str, str]] = set()
    for d, schema in ((paths.scores, SCORES_SCHEMA), (paths.quarantine, QUARANTINE_SCHEMA)):
        t = read_parquet_dir(d, ["sample_id", "scope"], schema=schema)
        done.update(zip(t["sample_id"].to_pylist(), t["scope"].to_pylist()))
    return frozenset(done)


# --------------------------------------------------------------------------- running a pass


def check_local_resources(cfg: LeafConfig, cluster: dict[str, float], pools: dict | None = None) -> None:
    """On a local instance (no autoscaler), the pools' minimum actors plus one CPU for the read, tokenise,
    score and commit tasks must fit, else Ray Data waits forever (docs/environment.md §4). `pools`:
    config key -> PoolConfig of the pools alive together (default: both saliency pools)."""
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return  # a cluster may autoscale to fit
    if pools is None:
        pools = {"detection.student_pool": cfg.detection.student_pool,
                 "detection.teacher_pool": cfg.detection.teacher_pool}
    need: Counter = Counter({"CPU": 1.0})
    for pool in pools.values():
        for name, amount in pool.ray_resources().items():
            need[name] += amount * pool.min_actors
    short = {k: (v, cluster.get(k, 0.0)) for k, v in need.items() if v > cluster.get(k, 0.0) + 1e-9}
    if short:
        what = ", ".join(f"{k}: need {v:g}, have {h:g}" for k, (v, h) in short.items())
        raise DetectionError(
            f"the local Ray instance cannot hold {' + '.join(pools)} plus 1 CPU for data tasks ({what}); "
            "lower their num_cpus, num_gpus or min_actors, or raise ray.num_cpus")


def drain_with_progress(commits, estimated_units: int, console: Console | None, *,
                        label: str = "detect", info=None, stall_timeout_s: float | None = None) -> int:
    """Run the pipeline (a Ray dataset of `commit_part` rows, or any iterable of them) to the end, showing
    committed units per second and the ETA; returns the units. `info(totals)` is the text after the bar
    (default: counterfactuals and quarantined so far). A Ray dataset that yields nothing for `stall_timeout_s`
    fails naming the stage (`raycluster.bounded_stream`)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.completed / task.elapsed if task.elapsed else 0.0:.2f} rows/s")

    def detect_info(totals: Counter) -> str:
        return f"cf {totals['counterfactuals']} q {totals['quarantined']}"

    info = info or detect_info
    totals: Counter = Counter()
    with Progress(TextColumn(label), BarColumn(bar_width=24), MofNCompleteColumn(), RateColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                  console=console, disable=console is None) as progress:
        task = progress.add_task(label, total=estimated_units, info="")
        if hasattr(commits, "iter_rows"):
            from leaf_ray.raycluster import bounded_stream

            parts = bounded_stream(commits.iter_rows(), stall_timeout_s, f"{label} (Ray Data stream)")
        else:
            parts = commits
        for part in parts:
            totals.update(part)
            progress.update(task, advance=part["units"], total=max(estimated_units, totals["units"]),
                            info=info(totals))
        progress.update(task, total=totals["units"])
    return totals["units"]


@contextmanager
def ray_progress_bars_off(console: Console | None):
    """Ray Data's own progress bars off while ours (a console) show; restored afterwards."""
    import ray.data

    data_context = ray.data.DataContext.get_current()
    ray_progress_bars = data_context.enable_progress_bars
    data_context.enable_progress_bars = ray_progress_bars and console is None
    try:
        yield
    finally:
        data_context.enable_progress_bars = ray_progress_bars

