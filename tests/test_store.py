"""replace_parquet_dir under SIGKILL: a writer killed at any step leaves the old output or the new one, and
the next read or write settles what it left (leaf_ray/store.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest

from leaf_ray.store import parquet_files, read_parquet_dir, replace_parquet_dir

# A writer that SIGKILLs itself at its STEP-th filesystem step of the swap: 1 = after the staging directory
# is written (before any rename), 2 = after the old output is set aside, 3 = after the new one is renamed in,
# 4 = in the middle of deleting the old one.
WRITER = textwrap.dedent("""
    import os, shutil, signal, sys
    from pathlib import Path
    import pyarrow as pa
    from leaf_ray import store
    directory, step = Path(sys.argv[1]), int(sys.argv[2])
    calls = {"n": 0}
    def tick():
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGKILL)
    real_rename, real_rmtree = Path.rename, shutil.rmtree
    def rename(self, target):
        if self == directory:
            tick()  # 1: staging written, the old output not yet set aside
        elif self.name.endswith(".tmp"):
            tick()  # 2: the old output aside, the new one not yet in
        out = real_rename(self, target)
        if self.name.endswith(".tmp"):
            tick()  # 3: the new one in, the old one not yet deleted
        return out
    def rmtree(path, *a, **k):
        if Path(path).name == f".{directory.name}.old":
            victim = next(Path(path).glob("*.parquet"))
            victim.unlink()  # half deleted
            tick()
        return real_rmtree(path, *a, **k)
    Path.rename, store.shutil.rmtree = rename, rmtree
    store.replace_parquet_dir(directory, [pa.table({"v": [10, 20, 30]})])
""")


def write(directory, values):
    replace_parquet_dir(directory, [pa.table({"v": values})])


def values(directory):
    return sorted(read_parquet_dir(directory, schema=pa.schema([("v", pa.int64())]))["v"].to_pylist())


@pytest.mark.parametrize("step", [1, 2, 3, 4])
def test_a_writer_killed_at_any_step_leaves_the_old_or_the_new_output(tmp_path, step):
    directory = tmp_path / "clean"
    replace_parquet_dir(directory, [pa.table({"v": [1]}), pa.table({"v": [2]})])  # the old output: 2 rows
    done = subprocess.run([sys.executable, "-c", WRITER, str(directory), str(step)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == -9, done.stderr[-2000:]  # it really died at that step
    assert values(directory) in ([1, 2], [10, 20, 30]), step  # old or new, never neither nor a mix
    if step <= 2:
        assert values(directory) == [1, 2]
    else:
        assert values(directory) == [10, 20, 30]
    write(directory, [7])  # a rerun replaces it and leaves nothing of the killed writer behind
    assert values(directory) == [7]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean"]
    assert len(parquet_files(directory)) == 1


MOUNTINFO = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 22 0:45 / /shared rw,relatime shared:20 - nfs4 fs:/export rw,vers=4.1,local_lock=none,addr=10.0.0.2
41 22 0:46 / /scratch rw,relatime shared:21 - nfs fs:/scratch rw,vers=3,nolock,addr=10.0.0.2
42 41 0:47 / /scratch/deep rw,relatime shared:22 - ext4 /dev/vdb rw
"""


def test_a_run_directory_whose_locks_stay_on_the_node_is_refused(tmp_path):
    from pathlib import Path

    from leaf_ray.store import LockNotShared, exclusive_lock, local_only_locks

    assert local_only_locks(Path("/work/runs"), MOUNTINFO) is None  # a local disk
    assert local_only_locks(Path("/shared/runs/a"), MOUNTINFO) is None  # NFSv4: the server arbitrates flocks
    reason = local_only_locks(Path("/scratch/runs/a"), MOUNTINFO)
    assert "/scratch is nfs mounted with nolock" in reason and "two nodes" in reason
    assert local_only_locks(Path("/scratch/deep/x"), MOUNTINFO) is None  # the innermost mount decides
    with exclusive_lock(tmp_path / ".lock", lambda: RuntimeError("held")):  # this machine's disk holds
        pass
    assert issubclass(LockNotShared, RuntimeError)
