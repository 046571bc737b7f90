"""Run untrusted Python (model-written code) in a sandboxed subprocess, and judge it from the parent.

**Verdicts come from the parent, never from the exit status.** :func:`check_program` (HumanEval, LeetCode)
and the functional tests of :func:`check_io_tests` (LiveCodeBench) send the sandbox the candidate's program
only. The sandbox runs it; once its top level has returned, a harness bound before the program ran serves
*calls*: the parent runs the benchmark's own ``check(candidate)`` (or the expected-value comparison) in
its own process against a proxy, and each ``candidate(*args)`` sends the arguments over a pipe, the sandbox
calls the entry point and sends the result back as plain data (:func:`sandbox_codec`: exact builtin types
and the benchmark's helper classes, nothing else). The parent re-builds plain values, so the check's ``==``
and asserts run no code of the candidate. Tests and expected values never enter the sandbox: not in its
file, not on its filesystem, not in its memory. Exiting early (``sys.exit``, ``os._exit``, a thread, a
signal handler, ``atexit``), printing a success line or patching anything in the sandbox can only end the
run without the calls answered, which is a failure; a program that answers every call correctly has
solved the tests. stdin tests compare stdout with the expected output in the parent. See docs/sandbox.md.

:func:`run_code` starts the base interpreter (never the project's venv) as
``python -I -X utf8 -c <launcher> <config>``: ``-I`` ignores every ``PYTHON*`` variable and the user site and
puts neither the script directory nor the cwd on ``sys.path``. The launcher
(:func:`leaf_ray.evaluate.sandbox_launcher.sandbox_launcher`, sent as source text) sets the sandbox up, then
runs the program. stdin, stdout and stderr are files the caller owns. Two isolation modes:

``namespaces`` — used when the caller is root and a trial run in namespaces works (:func:`sandbox_mode`; our
dev machines and CI containers). Enforced by the kernel:

- **identity**: the program runs as a fresh unprivileged uid/gid drawn per run (no supplementary groups,
  ``no_new_privs``): it can signal none of the caller's processes;
- **processes**: a new PID namespace whose init is the launcher's child; when the program ends, or the caller
  kills the run, the kernel kills every process left in it, so nothing survives (not even a child that called
  ``setsid``); ``RLIMIT_NPROC`` on the per-run uid caps processes + threads of the whole run at
  ``max_processes``; a fresh ``/proc`` shows only the sandbox's own processes;
- **memory of the whole run**: the namespace's init sums the proportional set size of every process in it
  every 20 ms and kills them all past ``memory_mb`` (cgroup v2 memory/pids controllers are not delegated on
  our machines: cgroup v1 hybrid); each process also has ``RLIMIT_AS`` = ``memory_mb`` (a MemoryError);
- **no nested sandboxes**: a seccomp filter refuses unshare, setns, clone with namespace flags, mount and the
  new mount API, keyrings, bpf and perf_event_open (clone3 answers ENOSYS, libc falls back to clone);
- **network**: a new network namespace with only a down loopback (IPC and UTS namespaces are new too);
- **filesystem**: a new mount namespace in which *every* host mount is re-mounted read-only (``/run/lock``,
  ``/var/tmp`` and any other world-writable host path included); ``/tmp`` is a fresh tmpfs of
  ``max_file_mb`` in all (also cwd, ``HOME`` and ``TMPDIR``; gone with the namespace), ``/var/tmp`` and
  ``/dev/shm`` are 1 MB private tmpfs; ``/run``, the project directory and the caller's home are covered by
  empty read-only tmpfs (the interpreter's own prefix is bound back read-only when it lives there);
- **time and output**: ``RLIMIT_CPU`` = ``cpu_time_s`` (SIGXCPU), ``RLIMIT_FSIZE`` = ``max_file_mb`` (stdout
  and stderr are files, so this caps output too), ``RLIMIT_CORE`` = 0; at the wall-clock ``timeout_s`` the
  caller SIGKILLs the process group (launcher + namespace init).

``hooks`` — Python-level only (audit hooks, rlimits, the caller's user): a program can remove an audit hook
from pure Python, so this mode is **refused** unless the caller passes ``allow_unisolated=True``
(``evaluation.sandbox.allow_unisolated``); :class:`SandboxUnavailable` says why namespaces are unavailable.
Results of this mode carry ``isolation="hooks"`` and are marked unisolated downstream.

Both modes install a ``sys.addaudithook`` hook before the program runs (a second layer in ``namespaces``
mode): it refuses sockets other than AF_UNIX and every connect/bind/send/name lookup, starting processes,
signalling other processes, writing outside the working directory, and reading the project directory, the
caller's home or another process's ``/proc`` entry. Refusals raise ``PermissionError("leaf-ray sandbox: ...
is blocked")``. In hooks mode ctypes and ``_posixsubprocess`` are refused too.

Environment: only ``PATH``, ``LANG``, ``LC_ALL``, ``HOME``, ``TMPDIR`` and the run marker
``LEAF_SANDBOX_RUN`` reach the program; the caller's variables (tokens, keys) do not.
"""

from __future__ import annotations

import builtins
import inspect
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from leaf_ray.evaluate.sandbox_launcher import sandbox_codec

Isolation = Literal["auto", "namespaces", "hooks"]
STATUSES = ("passed", "failed", "timeout", "memory", "blocked", "error")
BLOCKED_MARKER = "leaf-ray sandbox:"
SETUP_FAILED_EXIT = 121
RUN_MEMORY_EXIT = 122  # the namespace's init killed the run: all its processes together were over memory_mb
MAX_REPORT_BYTES = 16 << 20  # one reply of the sandbox; larger is a malformed report
_SANDBOX_VIEW = "/tmp"  # where the writable directory appears inside the namespaces
_REFERENCE_MODULE = "leaf_ray_reference"  # __name__ of the namespace the parent runs the tests in
_OWN_FILES = {__file__, sandbox_codec.__code__.co_filename}


class SandboxUnavailable(RuntimeError):
    """The requested isolation cannot be had here (and falling back to a weaker one was not allowed)."""


@dataclass(frozen=True)
class ExecResult:
    """How one sandboxed run ended.

    status: ``passed``, ``failed`` (a failed test, an exception, a crash, a missing or malformed report),
    ``timeout`` (wall-clock or CPU limit), ``memory`` (MemoryError, or the run over its memory limit),
    ``blocked`` (a sandbox rule stopped it: network, processes, files, output size), ``error`` (the sandbox
    itself could not run the program). For :func:`check_program`/:func:`check_io_tests` ``passed`` is the
    parent's verdict; for a bare :func:`run_code` it only means the program exited 0. reason: one line
    saying why, empty when passed. isolation: ``namespaces`` or ``hooks`` (unisolated).
    """

    passed: bool
    status: str
    reason: str
    stdout: str
    stderr: str
    duration_s: float
    isolation: str
    run_id: str = ""  # the LEAF_SANDBOX_RUN marker every process of the run carried

    @property
    def isolated(self) -> bool:
        return self.isolation == "namespaces"


def run_code(
    program: str,
    *,
    timeout_s: float,
    memory_mb: int,
    cpu_time_s: float | None = None,
    stdin: str | None = None,
    max_processes: int = 32,
    max_file_mb: int = 16,
    isolation: Isolation = "auto",
    allow_unisolated: bool = False,
    hidden_paths: tuple[str, ...] = (),
    max_output_chars: int = 20_000,
) -> ExecResult:
    """Run `program` (Python source) in the sandbox described in the module docstring; ``passed`` = exit 0.

    cpu_time_s defaults to ``timeout_s`` rounded up + 1 (the wall clock is the tighter limit unless the
    program sleeps). `hidden_paths` are covered in addition to the project directory and the caller's home.
    """
    run = _Run(program, _mode(isolation, allow_unisolated), None, timeout_s=timeout_s, memory_mb=memory_mb,
               cpu_time_s=cpu_time_s, stdin=stdin, max_processes=max_processes, max_file_mb=max_file_mb,
               hidden_paths=hidden_paths, max_output_chars=max_output_chars)
    return run.wait_and_finish()


# --------------------------------------------------------------------------- one run


# Not Exceptions: a test's own `except Exception` around a call must not swallow a broken channel (and
# judge_calls also remembers the first one, so even a swallowed one fails the verdict).
class _ChannelClosed(BaseException):
    """The sandbox ended (or closed its side) before answering."""


class _Deadline(BaseException):  # not an Exception: the tests' own `except Exception` must not swallow it
    """The run's wall-clock limit passed (waiting for the sandbox, or in the tests themselves)."""


class _Malformed(BaseException):
    """The sandbox sent something that is not a well-formed report."""


class _Run:
    """One sandboxed process; with `entry_point`, a channel over which :meth:`call` asks it to call
    the program's entry point."""

    def __init__(self, program: str, mode: str, entry_point: str | None, *, timeout_s: float, memory_mb: int,
                 cpu_time_s: float | None, stdin: str | None, max_processes: int, max_file_mb: int,
                 hidden_paths: tuple[str, ...], max_output_chars: int,
                 find_class: Callable[[str], type | None] = lambda name: None):
        if timeout_s <= 0 or memory_mb < 32:
            raise ValueError(f"sandbox: timeout_s must be > 0 and memory_mb >= 32 (got {timeout_s}, {memory_mb})")
        self.mode, self.timeout_s, self.memory_mb = mode, timeout_s, memory_mb
        self.cpu_time_s = cpu_time_s if cpu_time_s is not None else int(timeout_s) + 1
        self.max_output_chars = max_output_chars
        self.encode, self.decode = sandbox_codec(find_class)
        self.marker = secrets.token_hex(8)
        self.base = Path(tempfile.mkdtemp(prefix="leaf-sandbox-"))  # 0700, the caller's: outputs and work/
        work = self.base / "work"
        work.mkdir()
        (work / "main.py").write_text(program, encoding="utf-8")
        (self.base / "stdin").write_text(stdin or "", encoding="utf-8")
        uid = _pick_uid() if mode == "namespaces" else None
        view = _SANDBOX_VIEW if mode == "namespaces" else str(work)
        hide = _hidden_paths(hidden_paths)
        config: dict[str, Any] = {
            "mode": mode, "work": str(work), "view": view, "uid": uid,
            "memory_bytes": int(memory_mb) << 20, "cpu_s": max(1, int(self.cpu_time_s + 0.999)),
            "fsize_bytes": int(max_file_mb) << 20, "disk_bytes": int(max_file_mb) << 20, "nproc": int(max_processes),
            "hide": hide, "expose": _exposed_paths(hide), "harness": None,
        }
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "HOME": view, "TMPDIR": view, "LEAF_SANDBOX_RUN": self.marker}
        pass_fds: tuple[int, ...] = ()
        self.request_fd = self.reply_fd = -1
        if entry_point is not None:
            request_read, self.request_fd = os.pipe()
            self.reply_fd, reply_write = os.pipe()
            os.set_blocking(self.request_fd, False)
            pass_fds = (request_read, reply_write)
            config["harness"] = {"entry_point": entry_point, "fds": list(pass_fds)}
        command = [_interpreter(), "-I", "-X", "utf8", "-c", _launcher_source(), json.dumps(config)]
        self.started = time.monotonic()
        self.deadline = self.started + timeout_s
        self.timed_out = False
        try:
            with open(self.base / "stdin", "rb") as f_in, open(self.base / "stdout", "wb") as f_out, \
                    open(self.base / "stderr", "wb") as f_err:
                self.proc = subprocess.Popen(command, stdin=f_in, stdout=f_out, stderr=f_err, cwd=work, env=env,
                                             start_new_session=True, close_fds=True, pass_fds=pass_fds)
        except BaseException:
            self._close_channel()
            shutil.rmtree(self.base, ignore_errors=True)
            raise
        finally:
            for fd in pass_fds:
                os.close(fd)

    # -- the channel (parent side)
    def call(self, args: tuple, kwargs: dict) -> tuple:
        """Send one call, return the sandbox's reply: ("ok", value) | ("raised", type, message) |
        ("unsendable", why). Each call carries a fresh nonce the reply must echo: replies written before
        the call (say, forged onto the channel by the program's top level) are malformed."""
        nonce = secrets.token_hex(16)
        self._send(self.encode((nonce, tuple(args), dict(kwargs))))
        reply = self.receive()
        if reply[0] == "ready" or reply[1] != nonce:
            raise _Malformed("a reply that does not answer this call")
        return (reply[0], *reply[2:])

    def receive(self) -> tuple:
        header = self._read_exactly(4)
        size = int.from_bytes(header, "big")
        if size > MAX_REPORT_BYTES:
            raise _Malformed(f"a report of {size} bytes (limit {MAX_REPORT_BYTES})")
        payload = self._read_exactly(size)
        try:
            reply = self.decode(payload)
        except (ValueError, TypeError, RecursionError, UnicodeDecodeError, OverflowError, MemoryError) as e:
            raise _Malformed(f"{type(e).__name__}: {str(e)[:200]}") from None
        shapes = {"ok": 3, "raised": 4, "unsendable": 3, "ready": 1}  # kind, nonce, ...
        if type(reply) is not tuple or not reply or reply[0] not in shapes or len(reply) != shapes[reply[0]] \
                or not all(type(x) is str for x in (reply[1:2] if reply[0] == "ok" else reply[1:])):
            raise _Malformed("not a reply")
        return reply

    def _remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            self.timed_out = True
            raise _Deadline()
        return left

    def _send(self, data: bytes) -> None:
        data = len(data).to_bytes(4, "big") + data
        while data:
            _, writable, _ = select.select([], [self.request_fd], [], self._remaining())
            if writable:
                try:
                    data = data[os.write(self.request_fd, data):]
                except BrokenPipeError:
                    raise _ChannelClosed() from None

    def _read_exactly(self, n: int) -> bytes:
        chunks, got = [], 0
        while got < n:
            readable, _, _ = select.select([self.reply_fd], [], [], self._remaining())
            if readable:
                chunk = os.read(self.reply_fd, min(n - got, 1 << 20))
                if not chunk:
                    raise _ChannelClosed()
                chunks.append(chunk)
                got += len(chunk)
        return b"".join(chunks)

    def _close_channel(self) -> None:
        for fd in (self.request_fd, self.reply_fd):
            if fd >= 0:
                os.close(fd)
        self.request_fd = self.reply_fd = -1

    # -- the end
    def wait_and_finish(self) -> ExecResult:
        """Wait for the program to end by itself (up to the deadline), then clean up: how it ended."""
        try:
            self.proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.timed_out = True
        return self.finish()

    def finish(self, verdict: tuple[str, str] | None = None) -> ExecResult:
        """Kill whatever is left of the run, remove its files; the result with `verdict` (the parent's
        (status, reason)) or, without one, the status of how the process ended."""
        self._close_channel()
        try:
            _kill_run(self.proc, self.marker)
            duration = time.monotonic() - self.started
            stdout = _tail(self.base / "stdout", self.max_output_chars)
            stderr = _tail(self.base / "stderr", self.max_output_chars)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
        if verdict is None:
            verdict = classify(self.proc.returncode, stderr, timed_out=self.timed_out, timeout_s=self.timeout_s,
                               cpu_time_s=self.cpu_time_s, memory_mb=self.memory_mb)
        status, reason = verdict
        return ExecResult(status == "passed", status, reason, stdout, stderr, round(duration, 3), self.mode,
                          self.marker)

    def ended_early(self, why: str) -> ExecResult:
        """The program ended (or broke the channel) before the tests were done: never a pass. The status
        says how it ended (a timeout, the memory limit, a blocked action, ...) when that is known."""
        try:
            self.proc.wait(timeout=max(0.0, min(2.0, self.deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            pass
        if self.proc.poll() is None:
            return self.finish(("timeout", f"wall-clock limit of {self.timeout_s:g} s exceeded")
                               if self.timed_out else ("failed", why))
        result = self.finish()
        if result.status == "passed":  # exit status 0 says nothing: the tests did not finish
            return replace(result, passed=False, status="failed", reason=f"{why} (exit status 0)")
        return result


def classify(returncode: int, stderr: str, *, timed_out: bool, timeout_s: float, cpu_time_s: float,
             memory_mb: int) -> tuple[str, str]:
    """(status, reason) from how the process ended; rules in order:

    wall clock hit -> timeout; exit 0 -> passed; SIGXCPU (CPU limit) -> timeout; SIGXFSZ -> blocked
    (file/output size); other signals -> failed; launcher setup failure -> error; the run over its memory
    limit or a MemoryError -> memory; a sandbox refusal (``leaf-ray sandbox:``), PermissionError, a refused
    fork (BlockingIOError) or a kernel refusal (unreachable network, read-only or permission-denied path) ->
    blocked; else failed with the last line of the traceback.
    """
    last_line = _last_error_line(stderr)
    if timed_out:
        return "timeout", f"wall-clock limit of {timeout_s:g} s exceeded"
    if returncode == 0:
        return "passed", ""
    if returncode < 0:
        sig = -returncode
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
        if sig == signal.SIGXCPU:
            return "timeout", f"CPU time limit of {cpu_time_s:g} s exceeded"
        if sig == signal.SIGXFSZ:
            return "blocked", "file size limit exceeded (output or a written file too large)"
        return "failed", f"killed by {name}"
    if "File too large" in last_line:  # Python ignores SIGXFSZ: the write fails with EFBIG instead
        return "blocked", f"file size limit exceeded (output or a written file too large): {last_line}"
    if returncode == SETUP_FAILED_EXIT and "leaf-ray sandbox setup failed" in stderr:
        return "error", last_line
    if returncode == RUN_MEMORY_EXIT and "over the run's memory limit" in last_line:
        return "memory", last_line[last_line.index(BLOCKED_MARKER) + len(BLOCKED_MARKER):].strip()
    if "MemoryError" in last_line or last_line.endswith("MemoryError"):
        return "memory", f"memory limit of {memory_mb} MB exceeded ({last_line})"
    if "No space left on device" in last_line:
        return "blocked", f"the writable directory is full: {last_line}"
    if BLOCKED_MARKER in last_line:
        return "blocked", last_line[last_line.index(BLOCKED_MARKER):]
    kernel_refusals = ("Network is unreachable", "Permission denied", "Read-only file system",
                       "Resource temporarily unavailable", "Operation not permitted")
    if last_line.startswith(("PermissionError", "BlockingIOError")) or any(k in last_line for k in kernel_refusals):
        return "blocked", last_line
    return "failed", last_line or f"exit status {returncode}"


# --------------------------------------------------------------------------- judging in the parent


class CandidateError(Exception):
    """The candidate raised an exception that is not a builtin one (or SystemExit & co.) during a call."""


def judge_calls(program: str, entry_point: str, tests: Callable[[Callable], Any], *,
                timeout_s: float = 10.0, memory_mb: int = 1024, isolation: Isolation = "auto",
                allow_unisolated: bool = False, find_class: Callable[[str], type | None] = lambda name: None,
                test_source: str = "", **limits: Any) -> ExecResult:
    """Run `program` in the sandbox, then ``tests(candidate)`` **in this process**, where ``candidate(*a,
    **kw)`` calls ``eval(entry_point)`` in the sandbox and returns its result re-built as plain values.

    Passed only when `tests` returns normally after at least one call; a failed assert, an exception the
    candidate raised, an unsendable result, the program ending or going silent, or a malformed report is a
    failure. `find_class` names the benchmark's helper classes that may cross (e.g. LeetCode's ``ListNode``);
    `test_source` is the tests' text, for the line of a failed assert in the reason.
    """
    run = _Run(program, _mode(isolation, allow_unisolated), entry_point, timeout_s=timeout_s, memory_mb=memory_mb,
               cpu_time_s=limits.pop("cpu_time_s", None), stdin=None, find_class=find_class,
               max_processes=limits.pop("max_processes", 32), max_file_mb=limits.pop("max_file_mb", 16),
               hidden_paths=limits.pop("hidden_paths", ()), max_output_chars=limits.pop("max_output_chars", 20_000))
    if limits:
        raise TypeError(f"judge_calls: unknown limit(s) {sorted(limits)}")
    calls = 0
    broken: list[BaseException] = []  # the first channel failure, even if the tests caught it

    def candidate(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if broken:
            raise broken[0]
        try:
            reply = run.call(args, kwargs)
            if reply[0] == "unsendable":
                raise _Malformed(f"call {calls} returned no plain value ({reply[1]})")
        except (_ChannelClosed, _Malformed, _Deadline) as e:
            broken.append(e)
            raise
        if reply[0] == "ok":
            return reply[1]
        name, message = reply[1], reply[2]
        builtin = getattr(builtins, name, None)
        if isinstance(builtin, type) and issubclass(builtin, Exception) and builtin.__module__ == "builtins":
            raise builtin(f"the candidate raised {name}: {message}")
        raise CandidateError(f"the candidate raised {name}: {message}")

    try:
        if run.receive() != ("ready",):
            raise _Malformed("no ready report")
        _before_deadline(run.deadline, tests, candidate)
        if broken:
            raise broken[0]
        if time.monotonic() > run.deadline:
            raise _Deadline()
        if calls == 0:
            return run.finish(("failed", "the tests never called the candidate"))
        return run.finish(("passed", ""))
    except _Deadline:
        return run.finish(("timeout", f"wall-clock limit of {timeout_s:g} s exceeded"))
    except _ChannelClosed:
        return run.ended_early("the program ended before its tests were done" if calls or run.proc.poll() else
                               "the program ended before its top level returned")
    except _Malformed as e:
        return run.finish(("failed", f"malformed report from the sandbox: {e}"))
    except AssertionError as e:
        return run.finish(("failed", _assert_reason(e, test_source)))
    except Exception as e:  # noqa: BLE001 - anything the tests raised (the candidate's exception included)
        return run.finish(("failed", f"{type(e).__name__}: {str(e)[:300]}"))
    finally:
        if run.request_fd >= 0:  # only when the tests raised BaseException: the run must not survive it
            run.finish(("failed", "aborted"))


def _before_deadline(deadline: float, tests: Callable, candidate: Callable) -> None:
    """``tests(candidate)`` in this thread, stopped at `deadline`: the tests walk values the candidate built
    (say, a linked list with a cycle), so they too must not run forever."""
    def tracer(frame, event, arg):
        if time.monotonic() > deadline:
            raise _Deadline()
        # the channel and the codec (this package) wait with their own deadline: no line events there
        return None if frame.f_code.co_filename in _OWN_FILES else tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        tests(candidate)
    finally:
        sys.settrace(previous)


def _assert_reason(error: AssertionError, test_source: str) -> str:
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == "<reference tests>"]
    where = ""
    if frames and test_source:
        lines = test_source.splitlines()
        lineno = frames[-1].lineno or 0
        if 0 < lineno <= len(lines):
            where = f" at test line {lineno}: {lines[lineno - 1].strip()[:160]}"
    message = f": {str(error)[:200]}" if str(error) else ""
    return f"AssertionError{where}{message}"


def reference_namespace(reference_code: str, test_code: str) -> tuple[dict, str]:
    """The namespace the benchmark's tests run in (in the parent): its trusted `reference_code` (HumanEval:
    the prompt, whose helpers such as ``poly`` the tests use; LeetCode: the preamble with ``ListNode``
    & co.) and `test_code`; with the source text, for reasons."""
    source = f"{reference_code}\n\n{test_code}\n"
    namespace: dict[str, Any] = {"__name__": _REFERENCE_MODULE}
    exec(compile(source, "<reference tests>", "exec"), namespace)  # noqa: S102 - the benchmark's own code
    return namespace, source


def reference_classes(namespace: dict) -> Callable[[str], type | None]:
    """Classes the reference code defined itself: the only non-builtin types that may cross the channel."""
    def find_class(name: str) -> type | None:
        cls = namespace.get(name)
        return cls if isinstance(cls, type) and cls.__module__ == _REFERENCE_MODULE else None

    return find_class


# --------------------------------------------------------------------------- HumanEval / LeetCode / LiveCodeBench


def check_program(solution_code: str, test_code: str, entry_point: str, *, reference_code: str = "",
                  timeout_s: float = 10.0, memory_mb: int = 1024, **limits: Any) -> ExecResult:
    """HumanEval-style check: the sandbox runs `solution_code` only; the parent runs `test_code`'s
    ``check(candidate)`` against a proxy of ``eval(entry_point)`` (:func:`judge_calls`).

    `solution_code` is the complete solution (for HumanEval: prompt + completion, see
    :func:`humaneval_solution`); `test_code` defines ``check(candidate)``; `reference_code` is trusted code
    the tests need in their namespace (the HumanEval prompt, the LeetCode preamble); `entry_point` is the
    expression called (``"has_close_elements"``, or ``"Solution().twoSum"`` for LeetCode).
    """
    try:
        namespace, source = reference_namespace(reference_code, test_code)
    except Exception as e:  # a broken benchmark record, not the candidate's fault
        raise ValueError(f"check_program: the reference tests do not run: {type(e).__name__}: {e}") from e
    check = namespace.get("check")
    if not callable(check):
        raise TypeError("check_program: test_code defines no check(candidate) function")

    def tests(candidate: Callable) -> None:
        if entry_point.isidentifier():  # some tests call the function by its name (HumanEval/33): the candidate
            namespace[entry_point] = candidate
        check(candidate)

    return judge_calls(solution_code, entry_point, tests, timeout_s=timeout_s, memory_mb=memory_mb,
                       find_class=reference_classes(namespace), test_source=source, **limits)


def humaneval_solution(prompt: str, completion: str, entry_point: str) -> str:
    """The program text for a completion: a completion that (re)defines the entry point is used whole, after
    the prompt's import lines; otherwise it continues the prompt (the function body)."""
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", completion, re.MULTILINE):
        imports = "\n".join(ln for ln in prompt.splitlines() if ln.startswith(("import ", "from ")))
        return f"{imports}\n{completion}"
    return prompt + completion


def humaneval_reference(prompt: str) -> str:
    """The prompt as reference code for the tests' namespace (its imports and helpers, e.g. ``poly``): as is
    when it compiles (HumanEval's do: the stub's docstring is its body), else with a ``pass`` body, else
    only its import lines."""
    imports = "\n".join(ln for ln in prompt.splitlines() if ln.startswith(("import ", "from ")))
    for candidate in (prompt, prompt.rstrip() + "\n    pass\n"):
        try:
            compile(candidate, "<prompt>", "exec")
            return candidate
        except SyntaxError:
            continue
    return imports


def check_io_tests(solution_code: str, tests: list[dict], *, func_name: str | None = None,
                   timeout_s: float = 10.0, memory_mb: int = 1024, **limits) -> ExecResult:
    """LiveCodeBench-style tests: each ``{"input": str, "output": str, "testtype": "stdin"|"functional"}``.

    stdin tests run the program once per test with `input` on stdin; the parent compares stdout with
    `output` (:func:`outputs_match`); the first failing test stops the check. functional tests call
    ``Solution().<func_name>(*args)`` (or a top-level ``func_name``) with `input` = one JSON value per line,
    all in one run through :func:`judge_calls`; the parent compares each result with the JSON `output`
    by type and value (:func:`same_value`; tuples read as lists).
    """
    if not tests:
        raise ValueError("check_io_tests: no test cases")
    stdin_tests = [t for t in tests if t.get("testtype", "stdin") == "stdin"]
    functional = [t for t in tests if t.get("testtype") == "functional"]
    last = None
    for i, test in enumerate(stdin_tests):
        result = run_code(solution_code, stdin=test["input"], timeout_s=timeout_s, memory_mb=memory_mb, **limits)
        if result.status == "passed" and not outputs_match(result.stdout, test["output"]):
            expected = test["output"].strip()[:80]
            result = replace(result, passed=False, status="failed", reason=f"stdin test {i}: wrong output "
                             f"(expected {expected!r}, got {result.stdout.strip()[:80]!r})")
        elif result.status != "passed":
            result = replace(result, reason=f"stdin test {i}: {result.reason}")
        if not result.passed:
            return result
        last = result
    if functional:
        if not func_name or not func_name.isidentifier():
            raise ValueError(f"check_io_tests: functional tests need func_name (metadata.func_name), got {func_name!r}")
        cases = [([json.loads(line) for line in t["input"].strip().splitlines() if line.strip()],
                  json.loads(t["output"])) for t in functional]

        def run_cases(candidate: Callable) -> None:
            for i, (args, expected) in enumerate(cases):
                got = candidate(*args)
                if not same_value(got, expected):
                    raise AssertionError(f"functional test {i}: expected {_short(expected)}, got {_short(got)}")

        entry = f"(Solution().{func_name} if 'Solution' in globals() else {func_name})"
        last = judge_calls(solution_code, entry, run_cases, timeout_s=timeout_s, memory_mb=memory_mb, **limits)
    return last


def same_value(got: Any, expected: Any) -> bool:
    """`got` equals `expected` by type and value: exact builtin types (bool is not a number); int and float
    compare as numbers; NaN equals nothing; tuples in `got` read as lists (JSON has no tuples)."""
    if type(got) is tuple:
        got = list(got)
    if type(got) is bool or type(expected) is bool:
        return type(got) is type(expected) and got == expected
    if type(got) in (int, float) and type(expected) in (int, float):
        return got == expected
    if type(got) is not type(expected):
        return False
    if type(got) is list:
        return len(got) == len(expected) and all(same_value(a, b) for a, b in zip(got, expected))
    if type(got) is dict:
        return got.keys() == expected.keys() and all(same_value(got[k], expected[k]) for k in expected)
    return type(got) in (str, type(None)) and got == expected


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def outputs_match(actual: str, expected: str) -> bool:
    """stdout equality up to trailing whitespace per line and trailing blank lines; tokens that are both
    numbers may differ by 1e-6 (relative or absolute)."""
    got = [ln.rstrip() for ln in actual.strip().splitlines()]
    want = [ln.rstrip() for ln in expected.strip().splitlines()]
    if got == want:
        return True
    got_tokens, want_tokens = " ".join(got).split(), " ".join(want).split()
    if len(got_tokens) != len(want_tokens):
        return False
    for a, b in zip(got_tokens, want_tokens):
        if a == b:
            continue
        try:
            x, y = float(a), float(b)
        except ValueError:
            return False
        if abs(x - y) > 1e-6 * max(1.0, abs(y)):
            return False
    return True



# --------------------------------------------------------------------------- mode, uid, paths, cleanup


def sandbox_mode() -> str:
    """``namespaces`` when this process is root and a trial program runs in namespaces mode, else ``hooks``
    (see the module docstring). Decided once per process."""
    return "namespaces" if _namespaces_probe() is None else "hooks"


def namespaces_unavailable_reason() -> str | None:
    """Why namespaces mode cannot run here (None when it can)."""
    return _namespaces_probe()


def _mode(isolation: str, allow_unisolated: bool) -> str:
    """The mode a run uses: namespaces where possible; hooks only when asked for or allowed."""
    if isolation not in ("auto", "namespaces", "hooks"):
        raise ValueError(f"sandbox isolation must be auto|namespaces|hooks, got {isolation!r}")
    why = _namespaces_probe() if isolation != "hooks" else None
    if isolation == "namespaces" and why:
        raise SandboxUnavailable(f"sandbox isolation 'namespaces' is unavailable here: {why}")
    if isolation == "hooks" or why:
        if not allow_unisolated:
            cause = f"namespaces are unavailable here ({why})" if why else "isolation 'hooks' was asked for"
            raise SandboxUnavailable(
                f"code sandbox refused: {cause}; hooks mode is Python-level only (a program can remove its audit "
                "hook and then act as this user), so it runs only with evaluation.sandbox.allow_unisolated: "
                "true, and every verdict is then marked unisolated")
        return "hooks"
    return "namespaces"


@lru_cache(maxsize=1)
def _namespaces_probe() -> str | None:
    if os.geteuid() != 0:
        return f"not root (euid {os.geteuid()}): namespaces mode needs root for unshare, mount and a per-run uid"
    try:
        trial = _Run("print('ok')", "namespaces", None, timeout_s=60, memory_mb=256, cpu_time_s=None, stdin=None,
                     max_processes=8, max_file_mb=1, hidden_paths=(), max_output_chars=1000).wait_and_finish()
    except OSError as e:
        return f"the trial run could not start ({e})"
    if trial.status == "passed" and trial.stdout.strip() == "ok":
        return None
    return f"the trial run failed ({trial.status}: {trial.reason or trial.stderr.strip()[-200:]})"


def _interpreter() -> str:
    """The base interpreter: the sandbox must not see the project's venv (editable install included)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def _pick_uid() -> int:
    """A uid no account uses, random per run (so RLIMIT_NPROC counts this run's processes only), taken
    from the uid range mapped into this user namespace."""
    ranges = []
    for line in Path("/proc/self/uid_map").read_text().splitlines():
        inside, _outside, count = (int(x) for x in line.split())
        ranges.append((inside, inside + count))
    low, high = max(ranges, key=lambda r: r[1] - r[0])
    low = max(low, 100_000) if high - low > 200_000 else low + (high - low) // 2
    high = min(high - 2, 2**31 - 1)  # 65534/4294967294 are "nobody"/invalid
    used = {int(line.split(":")[2]) for line in Path("/etc/passwd").read_text().splitlines() if line.count(":") >= 3}
    while True:
        uid = low + secrets.randbelow(high - low)
        if uid not in used and uid != 65534:
            return uid


def _project_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _hidden_paths(extra: tuple[str, ...]) -> list[str]:
    candidates = {str(_project_root()), str(Path.home().resolve()), *(str(Path(p).resolve()) for p in extra)}
    system = {"/", "/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc", "/proc", "/dev", "/tmp", "/sys"}
    paths = sorted(p for p in candidates if p not in system and os.path.isdir(p))
    # drop paths inside another hidden path: covering the outer one hides them already
    return [p for p in paths if not any(p != q and p.startswith(q + "/") for q in paths)]


def _exposed_paths(hidden: list[str]) -> list[str]:
    prefix = str(Path(sys.base_prefix).resolve())
    return [prefix] if any(prefix == h or prefix.startswith(h + "/") for h in hidden) else []


def _kill_run(proc: subprocess.Popen, marker: str) -> None:
    """SIGKILL the run's process group (in namespaces mode this kills the PID namespace's init, and the
    kernel then kills everything in it), then any process carrying the run's marker (hooks mode), and
    reap the launcher."""
    for _ in range(50):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        leftovers = _marked_processes(marker)
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if not leftovers:
            break
        time.sleep(0.02)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _marked_processes(marker: str) -> list[int]:
    """Live (non-zombie) processes whose environment holds this run's marker."""
    needle = f"LEAF_SANDBOX_RUN={marker}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
        except OSError:
            continue
        found.append(int(entry.name))
    return found


def _tail(path: Path, max_chars: int) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 4 * max_chars))
        return f.read().decode("utf-8", errors="replace")[-max_chars:]


def _last_error_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    return lines[-1][:500] if lines else ""


@lru_cache(maxsize=1)
def _launcher_source() -> str:
    from leaf_ray.evaluate.sandbox_launcher import sandbox_launcher

    return f"{inspect.getsource(sandbox_codec)}\n{inspect.getsource(sandbox_launcher)}\nsandbox_launcher()\n"
