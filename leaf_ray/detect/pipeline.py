"""Stage 1 on Ray Data: gradient-based confounder detection and span-pruned counterfactuals (DESIGN §1).

The whole stage, top to bottom in this file::

    data/clean/ ─read─► plan + tokenise ─► student saliency ─► teacher saliency ─► score + prune ─► commit
                        (CPU tasks)        (actor pool)        (actor pool)         (CPU tasks)    (CPU tasks)
                                                                                   │
       detect/scores/  detect/counterfactuals/  detect/quarantine/  (Parquet)  ◄───┘   + detect/manifest.json

A row flowing through the pipeline is a *unit*: one (sample, scope) pair. Scope ``instruction`` scores the
instruction with the loss on the whole response; scope ``response:k`` scores the first k response segments
with the loss on the rest (response level). The method itself lives in the pure-torch modules next to this one
(``saliency``, ``confounders``, ``pruning``, ``response``, ``cross_tokenizer``); this file only moves rows.

With ``detection.selection`` the stream reads only the samples the teacher answers correctly and the student
does not, judged before scoring; with ``detection.verification`` a post-pass after the last commit keeps the
counterfactuals the student answers correctly. Both run on the generation backend: ``selection.py``.

Resuming after a kill: every block reaching the last stage is committed as one *part*: its counterfactuals and
quarantine files are renamed into place first, its scores file last (the commit point; a part with no scores
row still gets an empty scores file). At start, leftovers of an interrupted commit (``_tmp/`` and parts
without a scores file) are deleted, and the units already in ``scores/`` or ``quarantine/`` are skipped. So a
rerun neither loses nor duplicates a unit. ``run.dir`` must be a filesystem every Ray node sees (local disk
for a single node, NFS/EFS-style mounts on a cluster), because rename is the commit.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from leaf_ray.config import LeafConfig, ModelRef

if TYPE_CHECKING:
    from collections.abc import Iterator

    import ray.data
    from rich.console import Console


class DetectionError(RuntimeError):
    """A detection run cannot start or finish (missing input, bad config for this cluster, broken output)."""


# --------------------------------------------------------------------------- schemas (the files on disk)

SCORES_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("scope", pa.string()),
    ("token_texts", pa.list_(pa.string())),
    ("token_char_offsets", pa.list_(pa.list_(pa.int32()))),  # relative to the scored text
    ("student_grad_norm", pa.list_(pa.float32())),  # raw ||dL/de_i||, before normalisation
    ("teacher_grad_norm", pa.list_(pa.float32())),  # raw; projected onto student tokens if tokenizers differ
    ("delta", pa.list_(pa.float32())),
    ("threshold", pa.float64()),
    ("confounder_mask", pa.list_(pa.bool_())),
    ("spans", pa.list_(pa.list_(pa.int32()))),  # [first_token, last_token_exclusive]
    ("student_loss", pa.float64()),
    ("teacher_loss", pa.float64()),
])

COUNTERFACTUALS_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("scope", pa.string()),
    ("span_index", pa.int32()),  # -1 = collective pruning
    ("char_start", pa.int32()),  # in the instruction (instruction scope) or the response prefix
    ("char_end", pa.int32()),
    ("removed_text", pa.string()),
    ("instruction", pa.string()),
    ("response_prefix", pa.string()),  # "" at instruction level
    ("output", pa.string()),  # the loss target: the response, or the continuation after the prefix
    ("split", pa.string()),
])

QUARANTINE_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("scope", pa.string()),
    ("stage", pa.string()),  # tokenise | student | teacher | score
    ("reason", pa.string()),
])

# What flows between stages: one unit per row. The actors add `<role>_grad_norm` and `<role>_loss`.
UNITS_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("scope", pa.string()),
    ("split", pa.string()),
    ("instruction", pa.string()),
    ("output", pa.string()),
    ("scored_text", pa.string()),  # the instruction, or the response prefix
    ("continuation", pa.string()),  # the loss target text
    ("input_ids", pa.list_(pa.int32())),  # the student's tokens of the rendered unit
    ("target_mask", pa.list_(pa.int8())),
    ("scored_token_idx", pa.list_(pa.int32())),
    ("token_char_offsets", pa.list_(pa.list_(pa.int32()))),
    ("quarantine_stage", pa.string()),
    ("quarantine_reason", pa.string()),
])

RESULTS_SCHEMA = pa.schema(
    list(SCORES_SCHEMA) + [("split", pa.string()), ("quarantine_stage", pa.string()),
                           ("quarantine_reason", pa.string()),
                           ("counterfactuals", pa.list_(pa.struct(list(COUNTERFACTUALS_SCHEMA))))]
)

CLEAN_COLUMNS = ["sample_id", "instruction", "output", "split"]


@dataclass
class DetectPaths:
    root: Path

    @classmethod
    def of(cls, cfg: LeafConfig) -> "DetectPaths":
        return cls(cfg.run.dir / "detect")

    scores = property(lambda self: self.root / "scores")
    counterfactuals = property(lambda self: self.root / "counterfactuals")
    candidates = property(lambda self: self.root / "candidate_counterfactuals")  # before verification
    rejected = property(lambda self: self.root / "rejected_counterfactuals")
    selection = property(lambda self: self.root / "selection")
    selection_teacher = property(lambda self: self.root / "selection_teacher")
    quarantine = property(lambda self: self.root / "quarantine")
    tmp = property(lambda self: self.root / "_tmp")
    manifest = property(lambda self: self.root / "manifest.json")
    spec = property(lambda self: self.root / "spec.json")
    lock = property(lambda self: self.root / ".lock")


@dataclass
class DetectReport:
    """Totals over everything committed in `out_dir` (this run plus any earlier interrupted one)."""

    out_dir: Path
    samples_in: int
    samples_out: int
    units: int
    units_this_run: int
    units_resumed: int
    scores: int
    spans: int
    counterfactuals: int
    quarantined: int
    seconds: float
    by_scope: dict[str, int] = field(default_factory=dict)
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    selection: dict[str, Any] | None = None  # `SelectionSummary.as_dict()` when detection.selection
    verification: dict[str, Any] | None = None  # `VerificationSummary.as_dict()` when detection.verification

    def print(self, console: "Console") -> None:
        from rich.table import Table

        table = Table(title=f"detection → {self.out_dir}")
        for col in ("samples", "scopes", "spans", "counterfactuals", "quarantined", "seconds"):
            table.add_column(col, justify="right")
        table.add_row(f"{self.samples_out}/{self.samples_in}", str(self.scores), str(self.spans),
                      str(self.counterfactuals), str(self.quarantined), f"{self.seconds:.1f}")
        console.print(table)
        if self.by_scope:
            console.print("scopes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.by_scope.items())))
        if self.units_resumed:
            console.print(f"resumed: {self.units_resumed} units were already committed, "
                          f"{self.units_this_run} scored now")
        for reason, n in sorted(self.quarantine_reasons.items(), key=lambda kv: -kv[1])[:5]:
            console.print(f"[yellow]quarantined[/yellow] {n} × {reason}")
        if self.selection:
            s = self.selection
            console.print(f"selection: {s['selected']} of {s['samples']} samples scored (teacher right, "
                          f"student wrong); generated now: teacher {s['teacher_generated_this_run']}, "
                          f"student {s['student_generated_this_run']}")
            for reason, n in sorted(s["not_selected"].items(), key=lambda kv: -kv[1]):
                console.print(f"  not selected {n} × {reason}")
        if self.verification:
            v = self.verification
            console.print(f"verification: {v['verified']} of {v['candidates']} counterfactuals kept (student "
                          f"right after pruning); generated now: {v['student_generated_this_run']}")
            for reason, n in sorted(v["rejected"].items(), key=lambda kv: -kv[1]):
                console.print(f"  rejected {n} × {reason}")


# --------------------------------------------------------------------------- the recipe


def run_detection(cfg: LeafConfig, *, console: "Console | None" = None) -> DetectReport:
    """Stage 1 end to end on Ray Data; resumes from whatever an interrupted run committed."""
    import ray
    import ray.data

    from leaf_ray.detect.selection import keep_rows, run_selection, run_verification
    from leaf_ray.raycluster import init_ray

    started = time.monotonic()
    det = cfg.detection
    if not det.instruction_level and not det.response.enabled:
        raise DetectionError("nothing to score: detection.instruction_level and detection.response.enabled "
                             "are both false")
    clean_files, sample_ids = read_clean_index(cfg)
    same_tokenizer = tokenizers_match(cfg.models.student, cfg.models.teacher)
    paths = DetectPaths.of(cfg)
    stream_cf_dir = paths.candidates if det.verification else paths.counterfactuals
    for d in (paths.scores, stream_cf_dir, paths.quarantine):
        d.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(paths), ray_progress_bars_off(console):
        check_same_spec(paths, run_spec(cfg, sample_ids))
        recover_interrupted_commits(paths, verification=det.verification)
        done = committed_units(paths)
        scored_now, selection, verification = 0, None, None
        target_ids = sample_ids
        if det.selection:  # verdicts already committed are reused; only the rest is generated
            selection = run_selection(cfg, paths, clean_files, sample_ids, console=console)
            target_ids = selection.selected_ids
            if not target_ids:
                reasons = ", ".join(f"{r}: {n}" for r, n in sorted(selection.not_selected.items()))
                raise DetectionError(
                    f"detection.selection kept no sample: none of the {len(sample_ids)} samples is answered "
                    f"correctly by the teacher and wrongly by the student ({reasons}); the verdicts are in "
                    f"{paths.selection}")
        # The manifest is written last: without it the run is unfinished. A run killed after the last unit
        # (e.g. during verification) starts no saliency pool again.
        if not paths.manifest.exists() and not all_units_committed(cfg, clean_files, target_ids, done):
            init_ray(cfg)
            check_local_resources(cfg, ray.cluster_resources())
            samples = ray.data.read_parquet(clean_files, columns=CLEAN_COLUMNS)
            if det.selection:
                samples = samples.map_batches(keep_rows, batch_format="pyarrow",
                                              fn_kwargs={"sample_ids": target_ids})
            units = samples.map_batches(tokenise_units, batch_format="pyarrow", fn_kwargs={
                "student": cfg.models.student.model_dump(), "instruction_level": det.instruction_level,
                "response": det.response.model_dump(), "done": done})
            # Small blocks stream: the teacher starts while the student works, and each block is one part.
            units = units.repartition(target_num_rows_per_block=det.units_per_part)
            for role, pool in (("student", det.student_pool), ("teacher", det.teacher_pool)):
                units = units.map_batches(SaliencyScorer, batch_format="pyarrow", fn_constructor_kwargs={
                    "role": role, "model": getattr(cfg.models, role).model_dump(), "dtype": det.dtype,
                    "gradient_checkpointing": det.gradient_checkpointing, "num_gpus": pool.num_gpus,
                    "max_memory_per_gpu": pool.max_memory_per_gpu,
                    "own_tokenizer": role == "teacher" and not same_tokenizer},
                    **pool.map_batches_kwargs())
            results = units.map_batches(score_and_prune, batch_format="pyarrow",
                                        fn_kwargs={"threshold": det.threshold, "pruning": det.pruning})
            commits = results.map_batches(commit_part, batch_format="pyarrow", fn_kwargs={
                "root": str(paths.root), "counterfactuals_dir": stream_cf_dir.name})
            estimated = estimate_units(cfg, len(target_ids), len(done))
            scored_now = drain_with_progress(commits, estimated, console)
        if det.verification:  # a post-pass over the committed candidates (module docstring of selection.py)
            verification = run_verification(cfg, paths, clean_files, console=console)

        report, committed_ids = summarize(paths, n_input=len(sample_ids), units_resumed=len(done),
                                          units_this_run=scored_now, seconds=time.monotonic() - started)
        report.selection = selection.as_dict() if selection else None
        report.verification = verification.as_dict() if verification else None
        missing = target_ids - committed_ids
        if missing:
            raise DetectionError(f"{paths.root}: {len(missing)} input samples have no committed unit, e.g. "
                                 f"{sorted(missing)[:5]}")
        write_manifest(cfg, paths, report, clean_files, same_tokenizer)
    return report


@contextmanager
def ray_progress_bars_off(console: "Console | None"):
    """Ray Data's own progress bars off while ours (a console) show; restored afterwards."""
    import ray.data

    data_context = ray.data.DataContext.get_current()
    ray_progress_bars = data_context.enable_progress_bars
    data_context.enable_progress_bars = ray_progress_bars and console is None
    try:
        yield
    finally:
        data_context.enable_progress_bars = ray_progress_bars


# --------------------------------------------------------------------------- before anything runs


def read_clean_index(cfg: LeafConfig) -> tuple[list[str], set[str]]:
    """The clean Parquet files and their sample ids, which must be unique (they key the resume)."""
    import pyarrow.compute as pc

    clean = cfg.run.dir / "data" / "clean"
    files = sorted(str(p) for p in clean.rglob("*.parquet")) if clean.is_dir() else []
    if not files:
        raise DetectionError(f"no clean data at {clean}: run `leaf-ray ingest` with the same config first")
    schema = pq.read_schema(files[0])
    missing = [c for c in CLEAN_COLUMNS if c not in schema.names]
    if missing:
        raise DetectionError(f"{files[0]}: clean data lacks column(s) {missing} (has {schema.names})")
    ids = pq.read_table(files, columns=["sample_id"])["sample_id"]
    if ids.null_count:
        raise DetectionError(f"{clean}: {ids.null_count} rows have a null sample_id")
    distinct = pc.count_distinct(ids).as_py()
    if distinct != len(ids):
        counts = pc.value_counts(ids)
        dupes = [v["values"].as_py() for v in counts if v["counts"].as_py() > 1][:5]
        raise DetectionError(f"{clean}: sample_id is not unique ({len(ids) - distinct} duplicates, "
                             f"e.g. {dupes})")
    return files, set(ids.to_pylist())


def run_spec(cfg: LeafConfig, sample_ids: set[str]) -> dict[str, Any]:
    """What determines the output: resuming is only allowed with the same spec. Pools, part size and
    gradient checkpointing change how fast, not what, so a resume may change them. The input is identified
    by its sample ids (re-ingesting the same corpus writes new file names, not new samples)."""
    speed_only = {"student_pool", "teacher_pool", "units_per_part", "gradient_checkpointing"}
    detection = cfg.detection.model_dump(mode="json", exclude=speed_only)
    ids_digest = hashlib.sha256("\n".join(sorted(sample_ids)).encode()).hexdigest()
    spec = {"detection": detection, "models": cfg.models.model_dump(mode="json"),
            "input": {"samples": len(sample_ids), "sample_ids_sha256": ids_digest}}
    if cfg.detection.selection or cfg.detection.verification:
        # The verdicts depend on how the models answer and how answers are judged (not on the pool size).
        spec["judging"] = {
            "generation": cfg.generation.model_dump(mode="json", exclude={"pool"}), "seed": cfg.run.seed,
            "code": cfg.evaluation.model_dump(mode="json", include={"code_timeout_s", "code_memory_mb",
                                                                    "code_max_processes", "code_isolation"})}
    return spec


def check_same_spec(paths: DetectPaths, spec: dict[str, Any]) -> None:
    """Record the spec of a new output directory; refuse to mix outputs of a different spec into it."""
    from leaf_ray.tracking import flatten

    if not paths.spec.exists():
        paths.spec.write_text(json.dumps(spec, indent=2, sort_keys=True), encoding="utf-8")
        return
    before, now = flatten(json.loads(paths.spec.read_text(encoding="utf-8"))), flatten(spec)
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        raise DetectionError(
            f"{paths.root} holds detection output made with a different config or input "
            f"({', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}); use another run.name or delete "
            "that directory")


def tokenizers_match(student: ModelRef, teacher: ModelRef) -> bool:
    """Same tokenizer = same serialised tokenizer (vocabulary, merges, normaliser) and same chat template."""
    s, t = cached_tokenizer(student.model_dump_json()), cached_tokenizer(teacher.model_dump_json())
    return s.backend_tokenizer.to_str() == t.backend_tokenizer.to_str() and s.chat_template == t.chat_template


@lru_cache(maxsize=4)
def cached_tokenizer(ref_json: str):
    """One tokenizer per Ray worker process (tasks reuse workers), keyed by the model reference."""
    from leaf_ray.models import load_tokenizer

    return load_tokenizer(ModelRef.model_validate_json(ref_json))


def check_local_resources(cfg: LeafConfig, cluster: dict[str, float], pools: dict | None = None) -> None:
    """On a local instance (no autoscaler), the pools' minimum actors plus one CPU for the read, tokenise,
    score and commit tasks must fit, else Ray Data waits forever (ENVIRONMENT.md, deadlock trap). `pools`:
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


# --------------------------------------------------------------------------- resume bookkeeping


@contextmanager
def exclusive_lock(paths: DetectPaths):
    """One detection run per output directory; the OS drops the lock when the process dies (even SIGKILL)."""
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DetectionError(f"{paths.root}: another detection run is writing here") from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def recover_interrupted_commits(paths: DetectPaths, *, verification: bool = False) -> int:
    """Delete what a killed run left half-written: `_tmp/` and parts without a scores file (the commit);
    with verification, the stream's counterfactuals are the candidates, and a rejected-counterfactuals file
    without its counterfactuals file (the verification commit) goes too."""
    shutil.rmtree(paths.tmp, ignore_errors=True)
    removed = 0
    pairs = [((paths.candidates if verification else paths.counterfactuals, paths.quarantine), paths.scores)]
    if verification:
        pairs.append(((paths.rejected,), paths.counterfactuals))
    for dependents, commit_dir in pairs:
        committed = {p.stem for p in commit_dir.glob("*.parquet")}
        for d in dependents:
            for p in d.glob("*.parquet"):
                if p.stem not in committed:
                    p.unlink()
                    removed += 1
    return removed


def committed_units(paths: DetectPaths) -> frozenset[tuple[str, str]]:
    """(sample_id, scope) of every unit already scored or quarantined."""
    done: set[tuple[str, str]] = set()
    for d in (paths.scores, paths.quarantine):
        for p in sorted(d.glob("*.parquet")):
            t = pq.read_table(p, columns=["sample_id", "scope"])
            done.update(zip(t["sample_id"].to_pylist(), t["scope"].to_pylist()))
    return frozenset(done)


# --------------------------------------------------------------------------- plan + tokenise (CPU tasks)


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


def all_units_committed(cfg: LeafConfig, clean_files: list[str], sample_ids: set[str],
                        done: frozenset) -> bool:
    """Whether every unit `plan_units` makes of `sample_ids` is already in `done` (read on the driver, a
    batch at a time; only on a resume, when `done` is not empty)."""
    if not done:
        return False
    response = cfg.detection.response.model_dump()
    for row in iter_rows(clean_files, ["sample_id", "instruction", "output"]):
        if row["sample_id"] not in sample_ids:
            continue
        units = plan_units(row["instruction"] or "", row["output"] or "",
                           instruction_level=cfg.detection.instruction_level, response=response)
        if any((row["sample_id"], scope) not in done for scope, _, _ in units):
            return False
    return True


def estimate_units(cfg: LeafConfig, n_samples: int, n_done: int) -> int:
    """Units still to score, for the progress bar: exact unless a response has fewer segments than
    `num_segments` (then it has fewer response units)."""
    response = cfg.detection.response
    per_sample = int(cfg.detection.instruction_level) + (response.num_segments - 1 if response.enabled else 0)
    return max(n_samples * per_sample - n_done, 0)


def render_unit(tokenizer, instruction: str, scope: str, scored_text: str, continuation: str):
    """Render one unit with `tokenizer`'s chat template (`leaf_ray.data.chat.render`)."""
    from leaf_ray.data.chat import render

    if scope == "instruction":
        return render(tokenizer, instruction, continuation)
    return render(tokenizer, instruction, continuation, scored="prefix", prefix=scored_text)


def scored_char_offsets(rendered) -> list[tuple[int, int]]:
    """Character offsets of the scored tokens relative to the scored text (instruction or response prefix)."""
    from leaf_ray.detect.pruning import offsets_within

    start, end = rendered.scored_span
    return offsets_within([rendered.offsets[i] for i in rendered.scored_token_idx], start, end)


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


# --------------------------------------------------------------------------- saliency (actor pools)


class SaliencyScorer:
    """A Ray Data actor holding one model; adds `<role>_grad_norm` (raw norms of the student's scored tokens)
    and `<role>_loss` to each batch of units.

    Placement: no GPU -> the whole model on CPU; up to one GPU -> on that GPU; several GPUs -> sharded
    over them with `device_map="auto"`, each capped at `max_memory_per_gpu`. Batches are padded to their own
    longest unit only. With `own_tokenizer` (a teacher whose tokenizer differs from the student's) each unit
    is rendered again with this model's tokenizer and the scores are projected onto the student's tokens by
    character overlap within the scored text (`cross_tokenizer.project_scores`).
    """

    def __init__(self, role: str, model: dict, *, dtype: str, gradient_checkpointing: bool, num_gpus: float,
                 max_memory_per_gpu: str | None, own_tokenizer: bool):
        import torch

        from leaf_ray.models import load_model

        ref = ModelRef(**model)
        self.role, self.gradient_checkpointing = role, gradient_checkpointing
        if num_gpus > 1 and torch.cuda.is_available():
            max_memory = ({i: max_memory_per_gpu for i in range(torch.cuda.device_count())}
                          if max_memory_per_gpu else None)
            self.model = load_model(ref, device_map="auto", max_memory=max_memory, dtype=dtype)
        else:
            self.model = load_model(ref, dtype=dtype)
            self.model.to("cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu")
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
        from leaf_ray.detect.saliency import token_saliency

        length = max(len(ids) for _, ids, *_ in live)
        input_ids = torch.zeros(len(live), length, dtype=torch.long)  # pad id is irrelevant: masked out
        attention_mask = torch.zeros(len(live), length, dtype=torch.long)
        target_mask = torch.zeros(len(live), length, dtype=torch.long)
        for b, (_, ids, target, _, _) in enumerate(live):
            input_ids[b, :len(ids)] = torch.tensor(ids)
            attention_mask[b, :len(ids)] = 1
            target_mask[b, :len(ids)] = torch.tensor(target)
        out = token_saliency(self.model, input_ids, attention_mask, target_mask,
                             gradient_checkpointing=self.gradient_checkpointing)
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
    commit_tables(paths, [(paths.root / counterfactuals_dir, tables["counterfactuals"]),
                          (paths.quarantine, tables["quarantine"]),
                          (paths.scores, tables["scores"])],  # scores last: the commit point
                  skip_empty_but_last=True)
    summary = {"units": len(rows), "scores": len(kept), "counterfactuals": tables["counterfactuals"].num_rows,
               "quarantined": tables["quarantine"].num_rows, "spans": sum(len(r["spans"]) for r in kept)}
    return pa.table({k: pa.array([v], pa.int64()) for k, v in summary.items()})


def commit_tables(paths: DetectPaths, tables: list[tuple[Path, pa.Table]], *,
                  skip_empty_but_last: bool = False) -> None:
    """Write each table as part `<uuid>` of its directory: under `_tmp/` first, then renamed into place in
    order (the last rename is the commit point; `recover_interrupted_commits` undoes a partial one)."""
    stem = f"part-{uuid.uuid4().hex}"
    paths.tmp.mkdir(parents=True, exist_ok=True)
    for i, (directory, table) in enumerate(tables):
        if skip_empty_but_last and not table.num_rows and i < len(tables) - 1:
            continue
        staging = paths.tmp / f"{stem}.{directory.name}.parquet"
        pq.write_table(table, staging)
        os.replace(staging, directory / f"{stem}.parquet")


def iter_rows(files: list[str], columns: list[str]) -> Iterator[dict]:
    """Rows of Parquet files, a batch at a time (the driver never holds a whole corpus)."""
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(columns=columns, batch_size=4096):
            yield from batch.to_pylist()


# --------------------------------------------------------------------------- progress, summary, manifest


def drain_with_progress(commits: "ray.data.Dataset", estimated_units: int, console: "Console | None", *,
                        label: str = "detect", info=None) -> int:
    """Run the pipeline to the end, showing committed units per second and the ETA; returns the units.
    `info(totals)` is the text after the bar (default: counterfactuals and quarantined so far)."""
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
        for part in commits.iter_rows():
            totals.update(part)
            progress.update(task, advance=part["units"], total=max(estimated_units, totals["units"]),
                            info=info(totals))
        progress.update(task, total=totals["units"])
    return totals["units"]


def summarize(paths: DetectPaths, *, n_input: int, units_resumed: int, units_this_run: int,
              seconds: float) -> tuple[DetectReport, set[str]]:
    """Totals over all committed parts; a unit written twice is an error, never silently counted."""
    def read(d: Path, columns: list[str], schema: pa.Schema) -> pa.Table:
        files = sorted(str(p) for p in d.glob("*.parquet"))
        return pq.read_table(files, columns=columns) if files else schema.empty_table().select(columns)

    scores = read(paths.scores, ["sample_id", "scope", "spans"], SCORES_SCHEMA)
    quarantine = read(paths.quarantine, ["sample_id", "scope", "reason"], QUARANTINE_SCHEMA)
    cf_rows = sum(pq.read_metadata(p).num_rows for p in paths.counterfactuals.glob("*.parquet"))
    keys = list(zip(scores["sample_id"].to_pylist(), scores["scope"].to_pylist()))
    keys += zip(quarantine["sample_id"].to_pylist(), quarantine["scope"].to_pylist())
    if len(set(keys)) != len(keys):
        dupes = [k for k, n in Counter(keys).items() if n > 1][:5]
        raise DetectionError(f"{paths.root}: {len(keys) - len(set(keys))} units committed twice, "
                             f"e.g. {dupes}")
    committed_ids = set(scores["sample_id"].to_pylist()) | set(quarantine["sample_id"].to_pylist())
    by_scope = Counter("response:k" if s.startswith("response:") else s for s in scores["scope"].to_pylist())
    report = DetectReport(
        out_dir=paths.root, samples_in=n_input, samples_out=len(set(scores["sample_id"].to_pylist())),
        units=len(keys), units_this_run=units_this_run, units_resumed=units_resumed, scores=scores.num_rows,
        spans=sum(len(s) for s in scores["spans"].to_pylist()), counterfactuals=cf_rows,
        quarantined=quarantine.num_rows, seconds=seconds, by_scope=dict(by_scope),
        quarantine_reasons=dict(Counter(quarantine["reason"].to_pylist())))
    return report, committed_ids


def write_manifest(cfg: LeafConfig, paths: DetectPaths, report: DetectReport, clean_files: list[str],
                   same_tokenizer: bool) -> dict[str, Any]:
    from leaf_ray.tracking import git_commit, package_versions

    manifest = {
        "stage": "detect",
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.dump(),
        "packages": package_versions(),
        "git_commit": git_commit(),
        "inputs": {"clean_files": clean_files, "samples": report.samples_in},
        "outputs": {k: str(getattr(paths, k)) for k in ("scores", "counterfactuals", "quarantine")
                    + (("selection",) if report.selection else ())
                    + (("candidates", "rejected") if report.verification else ())},
        "same_tokenizer": same_tokenizer,
        "counts": {
            "samples_in": report.samples_in, "samples_out": report.samples_out, "units": report.units,
            "scores": report.scores, "by_scope": report.by_scope, "spans": report.spans,
            "counterfactuals": report.counterfactuals, "quarantined": report.quarantined,
            "quarantine_reasons": report.quarantine_reasons,
            "selection": report.selection, "verification": report.verification,
        },
        "last_run": {"units_scored": report.units_this_run, "units_resumed": report.units_resumed,
                     "seconds": round(report.seconds, 3)},
    }
    tmp = paths.manifest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, paths.manifest)
    return manifest
