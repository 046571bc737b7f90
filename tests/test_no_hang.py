"""The suite cannot hang: a test blocked where no Python signal handler can run (as in Ray's C++ `get`) is
stopped by its timeout with every stack printed, and the suite goes on with the next test (pyproject's
timeout_method = thread, `make test`'s one xdist worker, replaced after a crash)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

HUNG = textwrap.dedent('''
    import signal, time

    def test_blocked_where_signals_cannot_reach():
        # SIGALRM blocked: pytest-timeout's signal method could never fire here, like a wait inside C code
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(600)

    def test_after_it():
        assert True
''')


def test_a_hung_test_is_stopped_with_its_stack_and_the_suite_goes_on(tmp_path):
    (tmp_path / "test_hung.py").write_text(HUNG)
    (tmp_path / "conftest.py").write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                                          "from hang_guard import *  # noqa\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\ntimeout = 5\ntimeout_method = thread\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "1", "--max-worker-restart", "2",
                           "-p", "no:cacheprovider", "test_hung.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=240)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-3000:]
    assert "Timeout: test_hung.py::test_blocked_where_signals_cannot_reach ran past 5 s" in out, out[-3000:]
    assert "in test_blocked_where_signals_cannot_reach" in out and "time.sleep(600)" in out  # its stack
    assert "1 failed, 1 passed" in out, out[-3000:]  # stopped, reported, and the next test ran
