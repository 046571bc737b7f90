"""The run directory: where every stage keeps its outputs, and the few ways they are written and read.

    <run.dir>/
      config.yaml  _stages/<stage>.json          `leaf-ray run`: one marker per finished stage
      data/        clean/ quarantine/ ingest_manifest.json
      generate/    teacher_responses/ quarantine/
      detect/      scores/ counterfactuals/ quarantine/ [selection/ ...] spec.json manifest.json .lock _tmp/
      distill/     <variant>/ (spec.json, checkpoints, best/, export)  topk_cache/ (+ _spec.json)
      eval/<label>/  mlflow.db  mlartifacts/

Four ways of writing, each written once here:
- a *spec guard* (`check_same_spec`): what decides a stage's output is recorded as JSON beside it; a later run
  into the same directory with another spec is refused (or, for a cache, rebuilt), never silently mixed in;
- a *replaced Parquet directory* (`replace_parquet_dir`): written beside its place and renamed in, so a reader
  sees the old output or the new one, never half of either; an empty output is still a readable empty table;
- *committed parts* (`commit_parts`, `drop_uncommitted_parts`): a resumable stage appends one part per block,
  renamed into place in order, the last rename being the commit point;
- *markers* (`write_json_atomic`): a manifest or success marker is written last and atomically: without it
  the stage is unfinished.
A rename is the commit, so `run.dir` must be one filesystem every Ray node sees.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from collections.abc import Iterator

    import ray.data

    from leaf_ray.config import LeafConfig


# --------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class DetectPaths:
    """`<run dir>/detect/`: committed parts of the stream (scores, counterfactuals, quarantine) and of the
    generation passes around it (selection, verification)."""

    root: Path

    @classmethod
    def of(cls, cfg: LeafConfig) -> DetectPaths:
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


@dataclass(frozen=True)
class RunDir:
    """Every path under one run directory (the layout in the module docstring)."""

    root: Path

    @classmethod
    def of(cls, cfg: LeafConfig) -> RunDir:
        return cls(cfg.run.dir)

    clean = property(lambda self: self.root / "data" / "clean")
    data_quarantine = property(lambda self: self.root / "data" / "quarantine")
    ingest_manifest = property(lambda self: self.root / "data" / "ingest_manifest.json")
    demo_corpus = property(lambda self: self.root / "data" / "demo.jsonl")
    teacher_responses = property(lambda self: self.root / "generate" / "teacher_responses")
    generate_quarantine = property(lambda self: self.root / "generate" / "quarantine")
    detect = property(lambda self: DetectPaths(self.root / "detect"))
    topk_cache = property(lambda self: self.root / "distill" / "topk_cache")
    heatmaps = property(lambda self: self.root / "detect" / "heatmaps")

    def distill(self, variant: str) -> Path:
        return self.root / "distill" / variant

    def eval(self, label: str) -> Path:
        return self.root / "eval" / label

    def stage_marker(self, stage: str) -> Path:
        return self.root / "_stages" / f"{stage}.json"


# --------------------------------------------------------------------------- the spec guard


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: one key per leaf (MLflow params, spec differences)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def digest(values, *, ordered: bool = False) -> str:
    """sha256 of strings (sorted unless their order matters): how a spec names a large input (sample ids,
    row keys) in one line."""
    return hashlib.sha256("\n".join(values if ordered else sorted(values)).encode()).hexdigest()


def spec_changes(spec_file: Path, spec: dict[str, Any]) -> list[str] | None:
    """The dotted keys whose values differ from the recorded spec; None when nothing is recorded yet."""
    if not spec_file.exists():
        return None
    before = flatten(json.loads(spec_file.read_text(encoding="utf-8")))
    now = flatten(json.loads(json.dumps(spec, default=str)))
    return sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))


def write_spec(spec_file: Path, spec: dict[str, Any]) -> None:
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(spec_file, spec, sort_keys=True)


def check_same_spec(spec_file: Path, spec: dict[str, Any], refuse) -> None:
    """Record `spec` for a new output directory; for one made with another spec, raise `refuse(changed)`
    (the changed keys, shortened for a message): mixing two specs' outputs is never right."""
    changed = spec_changes(spec_file, spec)
    if changed is None:
        write_spec(spec_file, spec)
    elif changed:
        raise refuse(", ".join(changed[:6]) + (" ..." if len(changed) > 6 else ""))


# --------------------------------------------------------------------------- Parquet directories


def parquet_files(directory: Path, *, recursive: bool = False) -> list[str]:
    """The Parquet files of a directory in a stable order ([] when it does not exist)."""
    if not directory.is_dir():
        settle_replaced(directory)  # a writer killed mid-swap left the old output aside: it is the output
    if not directory.is_dir():
        return []
    return sorted(str(p) for p in (directory.rglob if recursive else directory.glob)("*.parquet"))


def read_parquet_dir(directory: Path, columns: list[str] | None = None, *,
                     schema: pa.Schema | None = None) -> pa.Table:
    """All parts of a directory as one table; with no part, `schema`'s empty table (same columns)."""
    files = parquet_files(directory)
    if files:
        return pq.read_table(files, columns=columns)
    if schema is None:
        raise FileNotFoundError(f"{directory}: no Parquet files")
    empty = schema.empty_table()
    return empty.select(columns) if columns else empty


def iter_rows(files: list[str], columns: list[str]) -> Iterator[dict]:
    """Rows of Parquet files, a batch at a time (the driver never holds a whole corpus)."""
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(columns=columns, batch_size=4096):
            yield from batch.to_pylist()


def replace_parquet_dir(directory: Path, ds: ray.data.Dataset | list[pa.Table] | None,
                        schema: pa.Schema | None = None, *,
                        spec: dict[str, Any] | None = None) -> Path:
    """Write `ds` as the whole of `directory`: into a staging directory beside it, then swapped in, so a
    rerun replaces the previous output and a reader never sees a half-written one. `ds=None` (nothing to
    write) or a dataset that wrote no file leaves one empty file of `schema`, so readers still see the
    columns. `spec` is recorded inside as `_spec.json` (Parquet readers skip `_` files)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    settle_replaced(directory)
    for leftover in directory.parent.glob(f".{directory.name}.*.tmp"):  # of a killed writer
        shutil.rmtree(leftover, ignore_errors=True)
    staging = directory.with_name(f".{directory.name}.{uuid.uuid4().hex[:8]}.tmp")
    staging.mkdir()
    if isinstance(ds, list):  # tables made in this process
        tables = [t for t in ds if t.num_rows]
        if tables:
            pq.write_table(pa.concat_tables(tables), staging / "part-00000.parquet")
    elif ds is not None:
        ds.write_parquet(str(staging))
    if schema is not None and not any(staging.glob("*.parquet")):
        pq.write_table(schema.empty_table(), staging / "empty.parquet")
    if spec is not None:
        write_spec(spec_path(staging), spec)
    # The swap: old aside, new in, old deleted. A kill at any point leaves the old output (under its place or
    # its aside name, which `settle_replaced` puts back) or the new one; the next write or read settles it.
    aside = aside_path(directory)
    if directory.exists():
        directory.rename(aside)
    staging.rename(directory)
    shutil.rmtree(aside, ignore_errors=True)
    return directory


def aside_path(directory: Path) -> Path:
    return directory.with_name(f".{directory.name}.old")


def settle_replaced(directory: Path) -> None:
    """Finish or undo a swap of ``replace_parquet_dir`` that a killed writer left: the old output set aside and
    no new one in its place is put back; one set aside beside a new one is deleted."""
    aside = aside_path(directory)
    if not aside.exists():
        return
    if directory.exists():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        try:
            aside.rename(directory)
        except OSError:  # a live writer has just put the new one in: that is the output
            pass


def spec_path(parquet_dir: Path) -> Path:
    """The spec recorded inside a replaced Parquet directory."""
    return parquet_dir / "_spec.json"


# --------------------------------------------------------------------------- committed parts


def commit_parts(tmp: Path, tables: list[tuple[Path, pa.Table]], *,
                 skip_empty_but_last: bool = False) -> None:
    """Write each table as part `<uuid>` of its directory: under `tmp` first, then renamed into place in
    order. The last rename is the commit point; `drop_uncommitted_parts` undoes a partial commit."""
    stem = f"part-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True, exist_ok=True)
    for i, (directory, table) in enumerate(tables):
        if skip_empty_but_last and not table.num_rows and i < len(tables) - 1:
            continue
        staging = tmp / f"{stem}.{directory.name}.parquet"
        try:
            pq.write_table(table, staging)
            os.replace(staging, directory / f"{stem}.parquet")
        except OSError as e:  # a full or read-only disk: the part stays uncommitted (a rerun deletes it)
            raise OSError(e.errno, f"cannot commit a part of {directory} (writing {staging}): {e}") from e


def drop_uncommitted_parts(tmp: Path, pairs: list[tuple[tuple[Path, ...], Path]]) -> int:
    """Delete what a killed run left half-written: `tmp` and every part of a dependent directory whose
    commit directory has no part of that name. `pairs`: (dependent directories, commit directory)."""
    shutil.rmtree(tmp, ignore_errors=True)
    removed = 0
    for dependents, commit_dir in pairs:
        committed = {p.stem for p in commit_dir.glob("*.parquet")}
        for d in dependents:
            for p in d.glob("*.parquet"):
                if p.stem not in committed:
                    p.unlink()
                    removed += 1
    return removed


class LockNotShared(RuntimeError):
    """The run directory's filesystem would keep an flock to this node: two nodes could both write."""


def local_only_locks(path: Path, mountinfo: str | None = None) -> str | None:
    """Why an ``flock`` under ``path`` would not hold across nodes, or None. Local filesystems and NFS (v3 with
    lockd, v4: Linux maps flock to byte-range locks the server arbitrates) hold; an NFS mount with ``nolock``
    or ``local_lock=flock|all`` keeps flocks on the client, where another node never sees them."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    target, best = str(path.resolve()), None
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 6:
            continue
        mount_point = fields[4]
        fstype, *rest = line.split(" - ", 1)[1].split()
        options = set(fields[5].split(",")) | set((rest[1] if len(rest) > 1 else "").split(","))
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and (best is None or len(mount_point) > len(best[0])):
            best = (mount_point, fstype, options)
    if best is None or not best[1].startswith("nfs"):
        return None
    mount_point, fstype, options = best
    local = sorted(o for o in options if o in ("nolock", "local_lock=flock", "local_lock=all"))
    if local:
        return (f"{mount_point} is {fstype} mounted with {','.join(local)}: locks stay on this node, so two nodes "
                "could write one run directory at once. Remount without it, or give each node its own run.name")
    return None


@contextmanager
def exclusive_lock(lock: Path, refuse):
    """One writer per directory; the OS drops the lock when the process dies (even SIGKILL). Another holder
    raises `refuse()`. A filesystem where the lock would not be seen by other nodes is refused first."""
    reason = local_only_locks(lock.parent)
    if reason:
        raise LockNotShared(f"cannot lock {lock}: {reason}")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise refuse() from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


# --------------------------------------------------------------------------- markers


def write_json_atomic(path: Path, obj: Any, *, sort_keys: bool = False, default=None) -> None:
    """A manifest or marker, renamed into place: a killed writer never leaves one that looks complete."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=sort_keys, default=default),
                   encoding="utf-8")
    os.replace(tmp, path)
