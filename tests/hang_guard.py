"""A per-test timeout that fires while the main thread is blocked in C code, prints every thread's stack, and
lets the suite go on (imported by conftest.py; pyproject sets timeout_method = "thread", `make test` runs one
xdist worker).

pytest-timeout's own thread method prints to the worker's terminal, which an xdist worker does not have, so
here (through pytest-timeout's hooks) the timer writes the stacks to a file the controller reads back into the
crashed test's report (`pytest_handlecrashitem`), then ends the worker; xdist starts a new one for the rest.
A C-level faulthandler timer 60 s later is the backstop for code that holds the GIL.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import pytest

_timers: dict[str, tuple[threading.Timer, object]] = {}


def _hang_dir() -> Path:
    # Set by the controller before its workers start; they inherit it.
    return Path(os.environ.setdefault("LEAF_RAY_HANG_DIR", tempfile.mkdtemp(prefix="leaf-ray-hangs-")))


def pytest_configure(config):
    _hang_dir()


def _report_file() -> Path:
    return _hang_dir() / f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.txt"


def _dump_and_exit(nodeid: str, timeout: float) -> None:
    frames = sys._current_frames()
    lines = [f"Timeout: {nodeid} ran past {timeout:g} s; every thread's stack ({len(frames)}):"]
    for thread in threading.enumerate():
        frame = frames.get(thread.ident)
        if frame is not None and thread is not threading.current_thread():
            lines.append(f"--- thread {thread.name} ---")
            lines += [ln.rstrip() for ln in traceback.format_stack(frame)]
    text = "\n".join(lines) + "\n"
    _report_file().write_text(text)
    try:
        os.write(2, text.encode())
    finally:
        os._exit(1)


@pytest.hookimpl(optionalhook=True)  # pytest-timeout's hooks
def pytest_timeout_set_timer(item, settings):
    if settings.method != "thread" or not settings.timeout:
        return None
    timer = threading.Timer(settings.timeout, _dump_and_exit, args=(item.nodeid, settings.timeout))
    timer.daemon = True
    timer.start()
    backstop = open(_hang_dir() / f"{os.getpid()}.faulthandler.txt", "w")  # noqa: SIM115 (held until cancel)
    faulthandler.dump_traceback_later(settings.timeout + 60, exit=True, file=backstop)
    _timers[item.nodeid] = (timer, backstop)
    return True


@pytest.hookimpl(optionalhook=True)
def pytest_timeout_cancel_timer(item):
    entry = _timers.pop(item.nodeid, None)
    if entry is None:
        return None
    timer, backstop = entry
    timer.cancel()
    faulthandler.cancel_dump_traceback_later()
    backstop.close()
    return True


@pytest.hookimpl(optionalhook=True)  # an xdist hook: plain pytest (no xdist) has no such hook
def pytest_handlecrashitem(crashitem, report, sched):
    """xdist, in the controller: a worker died on `crashitem`; attach the stacks it wrote to its report."""
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        for path in _hang_dir().glob("gw*.txt"):
            text = path.read_text()
            if crashitem in text.splitlines()[0]:
                report.longrepr = f"{report.longrepr}\n{text}"
                path.unlink()
                return
        time.sleep(0.1)
