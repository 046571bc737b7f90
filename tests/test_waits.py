"""Every wait is bounded (docs/waits.md): each bound a test can reach, reached here with real components."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from leaf_ray.raycluster import StreamStalled, bounded_stream


def test_a_stream_that_stops_yielding_fails_naming_the_stage():
    never = threading.Event()

    def stalls():
        yield {"units": 1}
        never.wait()  # like a Ray Data iterator whose actors never get their resources

    got, t0 = [], time.monotonic()
    with pytest.raises(StreamStalled, match=r"detect \(Ray Data stream\): nothing arrived for 1 s"):
        got.extend(bounded_stream(stalls(), 1.0, "detect (Ray Data stream)"))  # keeps what came before the stall
    assert got == [{"units": 1}] and time.monotonic() - t0 < 30
    assert list(bounded_stream(iter(range(3)), 1.0, "x")) == [0, 1, 2]  # a stream that ends is read whole

    def fails():
        yield 1
        raise ValueError("the actor's error")

    with pytest.raises(ValueError, match="the actor's error"):
        list(bounded_stream(fails(), 5.0, "x"))


def test_a_collective_whose_peer_never_comes_fails_at_the_group_timeout(tmp_path):
    """Two gloo ranks with a 3 s timeout; rank 1 never joins the all-reduce: rank 0 raises instead of waiting."""
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent("""
        import sys, time, torch
        from leaf_ray.distributed import all_reduce_sum, init_group
        rank, init = int(sys.argv[1]), sys.argv[2]
        init_group(torch.device("cpu"), rank=rank, world_size=2, init_method=init, timeout_s=3)
        if rank == 1:
            time.sleep(90)  # a hung rank
            sys.exit(0)
        t0 = time.monotonic()
        try:
            all_reduce_sum({"loss": 1.0})
        except Exception as e:
            print("raised after", round(time.monotonic() - t0), type(e).__name__, flush=True)
            sys.exit(0)
        sys.exit("the all-reduce returned without its peer")
    """))
    init = f"file://{tmp_path / 'rendezvous'}"
    ranks = [subprocess.Popen([sys.executable, str(script), str(r), init], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=os.environ.copy()) for r in range(2)]
    t0 = time.monotonic()
    try:
        out, err = ranks[0].communicate(timeout=120)
        waited = time.monotonic() - t0
    finally:
        ranks[1].kill()
        ranks[1].wait()
    # Bounded by the group's timeout (3 s + start-up), not by the peer (asleep for 90 s): gloo either raises in
    # Python or, when its timeout fires in a background thread, aborts the process (SIGABRT); both end the wait.
    assert waited < 60, (waited, out, err[-2000:])
    if ranks[0].returncode == -6:
        assert "terminate called" in err, err[-2000:]
    else:
        assert ranks[0].returncode == 0 and out.startswith("raised after"), (out, err[-2000:])
        assert int(out.split()[2]) < 35, out
