"""Stage 1 on Ray Data: gradient-based confounder detection and span-pruned counterfactuals (docs/design.md §1).

The recipe, top to bottom in `run_detection`; the stage components it chains are in ``stages.py``, the files
they write in ``schema.py``, where those files live and how they are committed in ``leaf_ray.store``::

    data/clean/ ─read─► plan + tokenise ─► student saliency ─► teacher saliency ─► score + prune ─► commit
                        (CPU tasks)        (actor pool)        (actor pool)         (CPU tasks)    (CPU tasks)
                                                                                   │
       detect/scores/  detect/counterfactuals/  detect/quarantine/  (Parquet)  ◄───┘   + detect/manifest.json

A row flowing through the pipeline is a *unit*: one (sample, scope) pair. Scope ``instruction`` scores the
instruction with the loss on the whole response; scope ``response:k`` scores the first k response segments
with the loss on the rest (response level). The method itself lives in the pure-torch modules next to this one
(``saliency``, ``confounders``, ``pruning``, ``response``, ``cross_tokenizer``); these files only move rows.

With ``detection.selection`` the stream reads only the samples the teacher answers correctly and the student
does not, judged before scoring; with ``detection.verification`` a post-pass after the last commit keeps the
counterfactuals the student answers correctly. Both run on the generation backend: ``selection.py``.

A small job (at most ``detection.inline_max_samples`` samples, no selection, verification or sharded teacher)
runs the same chain in the calling process (``stages.inline_commits``: the same functions, scorers, parts and
commits, no Ray): starting Ray and two actor processes would cost several times the work itself.

Resuming after a kill: every block reaching the last stage is committed as one *part*: its counterfactuals and
quarantine files are renamed into place first, its scores file last (the commit point; a part with no scores
row still gets an empty scores file). At start, leftovers of an interrupted commit (``_tmp/`` and parts
without a scores file) are deleted, and the units already in ``scores/`` or ``quarantine/`` are skipped. So a
rerun neither loses nor duplicates a unit. ``run.dir`` must be a filesystem every Ray node sees (local disk
for a single node, NFS/EFS-style mounts on a cluster), because rename is the commit.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq

from leaf_ray.config import LeafConfig
from leaf_ray.detect.schema import CLEAN_COLUMNS, QUARANTINE_SCHEMA, SCORES_SCHEMA, DetectionError
from leaf_ray.detect.selection import keep_rows, run_selection, run_verification
from leaf_ray.detect.sharded_teacher import (
    GangTeacherScorer,
    gang_kwargs,
    new_gang_tag,
    remove_gang_placement_groups,
)
from leaf_ray.detect.stages import (
    SaliencyScorer,
    check_local_resources,
    commit_part,
    committed_units,
    drain_with_progress,
    inline_commits,
    plan_units,
    ray_progress_bars_off,
    recover_interrupted_commits,
    score_and_prune,
    tokenise_units,
    tokenizers_match,
)
from leaf_ray.store import (
    DetectPaths,
    RunDir,
    digest,
    exclusive_lock,
    iter_rows,
    parquet_files,
    read_parquet_dir,
    write_json_atomic,
)
from leaf_ray.store import check_same_spec as guard_spec

if TYPE_CHECKING:
    from rich.console import Console


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

    def print(self, console: Console) -> None:
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


def run_detection(cfg: LeafConfig, *, console: Console | None = None) -> DetectReport:
    """Stage 1 end to end on Ray Data; resumes from whatever an interrupted run committed."""
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
    # A small job runs in this process (below): it neither imports Ray (~0.7 s) nor switches its progress bars.
    # Pools that ask for GPUs run here only where this process sees CUDA (else on the cluster's GPU actors).
    inline = (0 < len(sample_ids) <= det.inline_max_samples and not det.selection and not det.verification
              and det.teacher_pool.mode != "sharded" and (torch_cuda_available() or not any(
                  pool.num_gpus for pool in (det.student_pool, det.teacher_pool))))
    with exclusive_lock(paths.lock, lambda: DetectionError(f"{paths.root}: another detection run is writing "
                                                           "here")), \
            contextlib.nullcontext() if inline else ray_progress_bars_off(console):
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
        prune = {"threshold": det.threshold, "pruning": det.pruning}
        commit = {"root": str(paths.root), "counterfactuals_dir": stream_cf_dir.name}
        if inline and not paths.manifest.exists():  # a small job: the same stages in this process, no Ray
            samples = pq.read_table(clean_files, columns=CLEAN_COLUMNS)
            scorers = [SaliencyScorer(role, getattr(cfg.models, role).model_dump(), **scorer_kwargs(
                cfg, role, same_tokenizer)) for role in ("student", "teacher")]
            commits = inline_commits(
                samples, scorers=scorers, pool_batch_sizes=[det.student_pool.batch_size,
                                                            det.teacher_pool.batch_size],
                tokenise=tokenise_kwargs(cfg, done), units_per_part=det.units_per_part,
                prune=prune, commit=commit)
            scored_now = drain_with_progress(commits, estimate_units(cfg, len(target_ids), len(done)), console)
        elif not paths.manifest.exists() and not all_units_committed(cfg, clean_files, target_ids, done):
            import ray
            import ray.data

            init_ray(cfg)
            check_local_resources(cfg, ray.cluster_resources())
            samples = ray.data.read_parquet(clean_files, columns=CLEAN_COLUMNS)
            if det.selection:
                samples = samples.map_batches(keep_rows, batch_format="pyarrow",
                                              fn_kwargs={"sample_ids": target_ids})
            units = samples.map_batches(tokenise_units, batch_format="pyarrow", fn_kwargs=tokenise_kwargs(cfg, done))
            # Small blocks stream: the teacher starts while the student works, and each block is one part.
            units = units.repartition(target_num_rows_per_block=det.units_per_part)
            gang_tag = new_gang_tag()
            for role, pool in (("student", det.student_pool), ("teacher", det.teacher_pool)):
                if role == "teacher" and pool.mode == "sharded":  # a gang per actor: sharded_teacher.py
                    units = units.map_batches(GangTeacherScorer, batch_format="pyarrow",
                                              fn_constructor_kwargs=gang_kwargs(cfg, same_tokenizer, gang_tag),
                                              **pool.map_batches_kwargs())
                    continue
                units = units.map_batches(SaliencyScorer, batch_format="pyarrow", fn_constructor_kwargs={
                    "role": role, "model": getattr(cfg.models, role).model_dump(),
                    **scorer_kwargs(cfg, role, same_tokenizer)}, **pool.map_batches_kwargs())
            results = units.map_batches(score_and_prune, batch_format="pyarrow", fn_kwargs=prune)
            commits = results.map_batches(commit_part, batch_format="pyarrow", fn_kwargs=commit)
            estimated = estimate_units(cfg, len(target_ids), len(done))
            try:
                scored_now = drain_with_progress(commits, estimated, console,
                                                 stall_timeout_s=cfg.ray.stall_timeout_s)
            finally:
                remove_gang_placement_groups(gang_tag)
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


def tokenise_kwargs(cfg: LeafConfig, done: frozenset) -> dict[str, Any]:
    det = cfg.detection
    return {"student": cfg.models.student.model_dump(), "instruction_level": det.instruction_level,
            "response": det.response.model_dump(), "done": done}


def scorer_kwargs(cfg: LeafConfig, role: str, same_tokenizer: bool) -> dict[str, Any]:
    """`SaliencyScorer`'s settings for `role` (besides the role and its model), the same on both paths."""
    det = cfg.detection
    pool = getattr(det, f"{role}_pool")
    return {"dtype": det.dtype, "gradient_checkpointing": det.gradient_checkpointing, "num_gpus": pool.num_gpus,
            "max_memory_per_gpu": pool.max_memory_per_gpu, "own_tokenizer": role == "teacher" and not same_tokenizer,
            "max_padding": det.max_padding}


# --------------------------------------------------------------------------- before anything runs


def read_clean_index(cfg: LeafConfig) -> tuple[list[str], set[str]]:
    """The clean Parquet files and their sample ids, which must be unique (they key the resume)."""
    import pyarrow.compute as pc

    clean = RunDir.of(cfg).clean
    files = parquet_files(clean, recursive=True)
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
    ids_digest = digest(sample_ids)
    spec = {"detection": detection, "models": cfg.models.model_dump(mode="json"),
            "input": {"samples": len(sample_ids), "sample_ids_sha256": ids_digest}}
    if cfg.detection.selection or cfg.detection.verification:
        # The verdicts depend on how the models answer and how answers are judged (not on the pool size).
        spec["judging"] = {
            "generation": cfg.generation.model_dump(mode="json", exclude={"pool"}), "seed": cfg.run.seed,
            "code": cfg.evaluation.sandbox.model_dump(mode="json", exclude={"workers"})}
    return spec


def check_same_spec(paths: DetectPaths, spec: dict[str, Any]) -> None:
    """Record the spec of a new output directory; refuse to mix outputs of a different spec into it."""
    guard_spec(paths.spec, spec, lambda changed: DetectionError(
        f"{paths.root} holds detection output made with a different config or input ({changed}); use another "
        "run.name or delete that directory"))



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



# --------------------------------------------------------------------------- summary, manifest



def summarize(paths: DetectPaths, *, n_input: int, units_resumed: int, units_this_run: int,
              seconds: float) -> tuple[DetectReport, set[str]]:
    """Totals over all committed parts; a unit written twice is an error, never silently counted."""
    scores = read_parquet_dir(paths.scores, ["sample_id", "scope", "spans"], schema=SCORES_SCHEMA)
    quarantine = read_parquet_dir(paths.quarantine, ["sample_id", "scope", "reason"], schema=QUARANTINE_SCHEMA)
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
    write_json_atomic(paths.manifest, manifest)
    return manifest


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
