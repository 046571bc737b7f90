"""Run untrusted Python (model-written code and its tests) in a sandboxed subprocess.

:func:`run_code` starts the base interpreter (never the project's venv) as
``python -I -X utf8 -c <launcher> <config>``: ``-I`` ignores every ``PYTHON*`` variable and the user site and
puts neither the script directory nor the cwd on ``sys.path``. The launcher (:func:`leaf_ray.evaluate.sandbox_launcher.sandbox_launcher`, sent as
source text) sets the sandbox up, then runs the program file with ``runpy``. stdin, stdout and stderr are
files the caller owns. Two isolation modes:

``namespaces`` — used when the caller is root and a trial run in namespaces works (:func:`sandbox_mode`; our
dev machines and CI containers). Enforced by the kernel:

- **identity**: the program runs as a fresh unprivileged uid/gid drawn per run (no supplementary groups,
  ``no_new_privs``): it can write nothing root owns and signal none of the caller's processes;
- **processes**: a new PID namespace whose init is the launcher's child; when the program ends, or the caller
  kills the run, the kernel kills every process left in it, so nothing survives (not even a child that called
  ``setsid``); ``RLIMIT_NPROC`` on the per-run uid caps processes + threads at ``max_processes``; a fresh
  ``/proc`` shows only the sandbox's own processes (no other command lines or environments);
- **network**: a new network namespace with only a down loopback: connecting anywhere, 127.0.0.1 included,
  fails with "Network is unreachable" (abstract unix sockets are per namespace too; unix sockets under
  ``/tmp`` are out of sight, see below);
- **filesystem**: a new mount namespace: ``/tmp`` is the run's fresh working directory (also cwd, ``HOME``
  and ``TMPDIR``; deleted after the run); ``/var/tmp`` and ``/dev/shm`` are small private tmpfs; the project
  directory and the caller's home are covered by empty read-only tmpfs (the interpreter's own prefix is
  bound back read-only when it lives there, e.g. pyenv under ``/root``); everywhere else ordinary
  permissions apply to the fresh uid: world-readable system files stay readable, nothing is writable;
- **resources**: ``RLIMIT_AS`` = ``memory_mb``, ``RLIMIT_CPU`` = ``cpu_time_s`` (SIGXCPU), ``RLIMIT_FSIZE`` =
  ``max_file_mb`` (stdout/stderr are files, so this caps output too), ``RLIMIT_CORE`` = 0; at the wall-clock
  ``timeout_s`` the caller SIGKILLs the process group (launcher + namespace init).

``hooks`` — the fallback where namespaces are unavailable (not root, or unshare/mount refused); it can also
be forced. Python-level only, and the program runs as the caller's user: the same resource limits
(``RLIMIT_NPROC`` = the user's current process count + ``max_processes``), a fresh working directory as cwd,
the audit hook below, and cleanup by the per-run marker every process of the run carries in its
environment. Code could get around an audit hook with ``ctypes`` or ``_posixsubprocess`` (which starts
processes without an audit event), so in this mode both are refused (and with the latter ``subprocess``).

Both modes install a ``sys.addaudithook`` hook before the program runs (a second layer in ``namespaces``
mode): it refuses sockets other than AF_UNIX and every connect/bind/send/name lookup, starting processes
(fork, exec, spawn, subprocess, os.system), signalling other processes, writing, creating, renaming or
deleting files outside the working directory, and reading or listing the project directory, the caller's
home (except the interpreter prefix) or another process's ``/proc`` entry. Refusals raise
``PermissionError("leaf-ray sandbox: ... is blocked")``.

Environment: only ``PATH``, ``LANG``, ``LC_ALL``, ``HOME``, ``TMPDIR`` and the run marker
``LEAF_SANDBOX_RUN`` reach the program; the caller's variables (tokens, keys) do not.

The result is an :class:`ExecResult`; :func:`classify` says how its ``status`` and ``reason`` are decided.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

Isolation = Literal["auto", "namespaces", "hooks"]
STATUSES = ("passed", "failed", "timeout", "memory", "blocked", "error")
BLOCKED_MARKER = "leaf-ray sandbox:"
SETUP_FAILED_EXIT = 121
_SANDBOX_VIEW = "/tmp"  # where the working directory appears inside the namespaces


@dataclass(frozen=True)
class ExecResult:
    """How one sandboxed run ended.

    status: ``passed`` (exit 0), ``failed`` (non-zero exit: a failed assert, an exception, a crash),
    ``timeout`` (wall-clock or CPU limit), ``memory`` (MemoryError under the memory cap, or killed by it),
    ``blocked`` (a sandbox rule stopped it: network, processes, files, output size), ``error`` (the sandbox
    itself could not run the program). reason: one line saying why, empty when passed.
    """

    passed: bool
    status: str
    reason: str
    stdout: str
    stderr: str
    duration_s: float
    isolation: str
    run_id: str = ""  # the LEAF_SANDBOX_RUN marker every process of the run carried


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
    hidden_paths: tuple[str, ...] = (),
    max_output_chars: int = 20_000,
) -> ExecResult:
    """Run `program` (Python source) in the sandbox described in the module docstring.

    cpu_time_s defaults to ``timeout_s`` rounded up + 1 (the wall clock is the tighter limit unless the
    program sleeps). `hidden_paths` are covered in addition to the project directory and the caller's home.
    """
    if timeout_s <= 0 or memory_mb < 32:
        raise ValueError(f"run_code: timeout_s must be > 0 and memory_mb >= 32 (got {timeout_s}, {memory_mb})")
    mode = sandbox_mode() if isolation == "auto" else isolation
    if mode == "namespaces" and sandbox_mode() != "namespaces":
        raise RuntimeError("run_code: isolation='namespaces' needs root and working unshare/mount (not here)")
    return _execute(program, mode, timeout_s=timeout_s, memory_mb=memory_mb, cpu_time_s=cpu_time_s, stdin=stdin,
                    max_processes=max_processes, max_file_mb=max_file_mb, hidden_paths=hidden_paths,
                    max_output_chars=max_output_chars)


def _execute(program: str, mode: str, *, timeout_s: float, memory_mb: int, cpu_time_s: float | None,
             stdin: str | None, max_processes: int, max_file_mb: int, hidden_paths: tuple[str, ...],
             max_output_chars: int) -> ExecResult:
    cpu_time_s = cpu_time_s if cpu_time_s is not None else int(timeout_s) + 1
    marker = secrets.token_hex(8)
    base = Path(tempfile.mkdtemp(prefix="leaf-sandbox-"))  # 0700, the caller's: holds outputs and work/
    work = base / "work"
    work.mkdir()
    (work / "main.py").write_text(program, encoding="utf-8")
    (base / "stdin").write_text(stdin or "", encoding="utf-8")
    uid = _pick_uid() if mode == "namespaces" else None
    if uid is not None:
        os.chown(work, uid, uid)
        os.chown(work / "main.py", uid, uid)
    os.chmod(work, 0o700)
    view = _SANDBOX_VIEW if mode == "namespaces" else str(work)
    hide = _hidden_paths(hidden_paths)
    config = {
        "mode": mode, "work": str(work), "view": view, "uid": uid,
        "memory_bytes": int(memory_mb) << 20, "cpu_s": max(1, int(cpu_time_s + 0.999)),
        "fsize_bytes": int(max_file_mb) << 20, "nproc": int(max_processes),
        "hide": hide, "expose": _exposed_paths(hide),
    }
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
           "HOME": view, "TMPDIR": view, "LEAF_SANDBOX_RUN": marker}
    command = [_interpreter(), "-I", "-X", "utf8", "-c", _launcher_source(), json.dumps(config)]
    started = time.monotonic()
    timed_out = False
    try:
        with open(base / "stdin", "rb") as f_in, open(base / "stdout", "wb") as f_out, \
                open(base / "stderr", "wb") as f_err:
            proc = subprocess.Popen(command, stdin=f_in, stdout=f_out, stderr=f_err, cwd=work, env=env,
                                    start_new_session=True, close_fds=True)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_run(proc, marker)
        duration = time.monotonic() - started
        stdout = _tail(base / "stdout", max_output_chars)
        stderr = _tail(base / "stderr", max_output_chars)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    status, reason = classify(proc.returncode, stderr, timed_out=timed_out, timeout_s=timeout_s,
                              cpu_time_s=cpu_time_s, memory_mb=memory_mb)
    return ExecResult(status == "passed", status, reason, stdout, stderr, round(duration, 3), mode, marker)


def classify(returncode: int, stderr: str, *, timed_out: bool, timeout_s: float, cpu_time_s: float,
             memory_mb: int) -> tuple[str, str]:
    """(status, reason) from how the process ended; rules in order:

    wall clock hit -> timeout; exit 0 -> passed; SIGXCPU (CPU limit) -> timeout; SIGXFSZ -> blocked
    (file/output size); other signals -> failed; launcher setup failure -> error; MemoryError -> memory; a
    sandbox refusal (``leaf-ray sandbox:``), PermissionError, a refused fork (BlockingIOError) or a kernel
    refusal (unreachable network, read-only or permission-denied path) -> blocked; else failed with the
    last line of the traceback.
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
    if "MemoryError" in last_line or last_line.endswith("MemoryError"):
        return "memory", f"memory limit of {memory_mb} MB exceeded ({last_line})"
    if BLOCKED_MARKER in last_line:
        return "blocked", last_line[last_line.index(BLOCKED_MARKER):]
    kernel_refusals = ("Network is unreachable", "Permission denied", "Read-only file system",
                       "Resource temporarily unavailable")
    if last_line.startswith(("PermissionError", "BlockingIOError")) or any(k in last_line for k in kernel_refusals):
        return "blocked", last_line
    return "failed", last_line or f"exit status {returncode}"


# --------------------------------------------------------------------------- HumanEval / LeetCode / LiveCodeBench


def check_program(solution_code: str, test_code: str, entry_point: str, *, timeout_s: float = 10.0,
                  memory_mb: int = 1024, **limits) -> ExecResult:
    """HumanEval-style check: ``solution_code + test_code + check(entry_point)`` must exit 0.

    `solution_code` is the complete solution (for HumanEval: prompt + completion, see
    :func:`humaneval_solution`); `test_code` defines ``check(candidate)``; `entry_point` is the expression
    passed to it (``"has_close_elements"``, or ``"Solution().twoSum"`` for LeetCode).
    """
    program = f"{solution_code}\n\n{test_code}\n\ncheck({entry_point})\n"
    return run_code(program, timeout_s=timeout_s, memory_mb=memory_mb, **limits)


def humaneval_solution(prompt: str, completion: str, entry_point: str) -> str:
    """The program text for a completion: a completion that (re)defines the entry point is used whole, after
    the prompt's import lines; otherwise it continues the prompt (the function body)."""
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", completion, re.MULTILINE):
        imports = "\n".join(ln for ln in prompt.splitlines() if ln.startswith(("import ", "from ")))
        return f"{imports}\n{completion}"
    return prompt + completion


def check_io_tests(solution_code: str, tests: list[dict], *, func_name: str | None = None,
                   timeout_s: float = 10.0, memory_mb: int = 1024, **limits) -> ExecResult:
    """LiveCodeBench-style tests: each ``{"input": str, "output": str, "testtype": "stdin"|"functional"}``.

    stdin tests run the program once per test with `input` on stdin and compare stdout with `output`
    (:func:`outputs_match`); the first failing test stops the check. functional tests call
    ``Solution().<func_name>(*args)`` (or a top-level ``func_name``) with `input` = one JSON value per line
    and compare with the JSON `output`, all in one run.
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
            result = ExecResult(False, "failed", f"stdin test {i}: wrong output (expected {expected!r}, got "
                                f"{result.stdout.strip()[:80]!r})", result.stdout, result.stderr,
                                result.duration_s, result.isolation, result.run_id)
        elif result.status != "passed":
            result = _with_reason(result, f"stdin test {i}: {result.reason}")
        if not result.passed:
            return result
        last = result
    if functional:
        if not func_name:
            raise ValueError("check_io_tests: functional tests need func_name (metadata.func_name)")
        program = solution_code + "\n\n" + _functional_harness(func_name, functional)
        last = run_code(program, timeout_s=timeout_s, memory_mb=memory_mb, **limits)
    return last


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


def _functional_harness(func_name: str, tests: list[dict]) -> str:
    cases = [{"input": t["input"], "output": t["output"]} for t in tests]
    return (
        "import json as _json\n"
        f"_cases = _json.loads({json.dumps(json.dumps(cases))})\n"
        f"_fn = getattr(Solution(), {func_name!r}) if 'Solution' in globals() else globals()[{func_name!r}]\n"
        "for _i, _case in enumerate(_cases):\n"
        "    _args = [_json.loads(_line) for _line in _case['input'].strip().splitlines() if _line.strip()]\n"
        "    _expected = _json.loads(_case['output'])\n"
        "    _got = _fn(*_args)\n"
        "    if isinstance(_got, tuple):\n"
        "        _got = list(_got)\n"
        "    assert _got == _expected, f'functional test {_i}: expected {_expected!r}, got {_got!r}'\n"
    )


def _with_reason(result: ExecResult, reason: str) -> ExecResult:
    return ExecResult(result.passed, result.status, reason, result.stdout, result.stderr, result.duration_s,
                      result.isolation, result.run_id)


# --------------------------------------------------------------------------- mode, uid, paths, cleanup


@lru_cache(maxsize=1)
def sandbox_mode() -> str:
    """``namespaces`` when this process is root and a trial program runs in namespaces mode, else ``hooks``
    (see the module docstring). Decided once per process."""
    if os.geteuid() != 0:
        return "hooks"
    try:
        trial = _execute("print('ok')", "namespaces", timeout_s=60, memory_mb=256, cpu_time_s=None, stdin=None,
                         max_processes=8, max_file_mb=1, hidden_paths=(), max_output_chars=1000)
    except OSError:
        return "hooks"
    return "namespaces" if trial.status == "passed" and trial.stdout.strip() == "ok" else "hooks"


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

    return inspect.getsource(sandbox_launcher) + "\nsandbox_launcher()\n"
