"""The code sandbox: hostile programs are contained and reported, nothing survives, the evaluator goes on.

Every hostile case runs in every isolation mode this machine offers (``namespaces`` needs root + unshare;
``hooks`` always works). After each case a normal program must still pass and no process of the run may be
left. Cases tagged ``kernel`` get around the Python audit hooks with ctypes, so only the kernel layers of
``namespaces`` mode can stop them (``hooks`` mode refuses ctypes itself).
"""

from __future__ import annotations

import secrets
import socket
import tempfile
from pathlib import Path

import psutil
import pytest

from leaf_ray.evaluate.sandbox import (
    ExecResult,
    check_io_tests,
    check_program,
    outputs_match,
    run_code,
    sandbox_mode,
)

PROJECT = Path(__file__).resolve().parents[1]
SECRET = "leaf-secret-" + secrets.token_hex(6)
MODES = ["hooks"] + (["namespaces"] if sandbox_mode() == "namespaces" else [])
LIMITS = {"timeout_s": 4.0, "memory_mb": 128, "max_processes": 16, "max_file_mb": 2}


@pytest.fixture(autouse=True)
def _secret_env_and_private_tmp(monkeypatch, tmp_path):
    """A secret in the caller's environment, and sandbox work dirs under tmp_path so we can see them go."""
    monkeypatch.setenv("LEAF_SECRET_TOKEN", SECRET)
    sandbox_tmp = tmp_path / "sandboxes"
    sandbox_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(sandbox_tmp))
    yield sandbox_tmp


@pytest.fixture()
def tcp_server():
    """A real listening socket on 127.0.0.1: a sandboxed connect must never reach it."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


_CHILDREN_BEFORE_TEST: set[int] = set()


@pytest.fixture(autouse=True)
def _children_before_test():
    _CHILDREN_BEFORE_TEST.clear()
    _CHILDREN_BEFORE_TEST.update(p.pid for p in psutil.Process().children())
    yield


def _live_processes_of(result: ExecResult) -> list[int]:
    needle = f"LEAF_SANDBOX_RUN={result.run_id}".encode()
    alive = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and needle in Path(f"/proc/{proc.pid}/environ").read_bytes():
                alive.append(proc.pid)
        except (OSError, psutil.Error):
            continue
    return alive


def _assert_clean_and_still_working(result: ExecResult, mode: str, sandbox_tmp: Path) -> None:
    assert result.run_id and not _live_processes_of(result), f"processes of run {result.run_id} survived"
    # Direct children only, against the set from before the test: a session-wide Ray instance (ray_local, started
    # by other test files) also lives under this process; deeper sandbox processes are found by environ above.
    new_children = {p.pid for p in psutil.Process().children()} - _CHILDREN_BEFORE_TEST
    assert not new_children, f"a sandbox process is still our child: {new_children}"
    assert list(sandbox_tmp.iterdir()) == [], "the run's temporary directory was not removed"
    assert SECRET not in result.stdout + result.stderr
    normal = run_code("import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))", stdin="1 2 3",
                      isolation=mode, **LIMITS)
    assert (normal.status, normal.stdout.strip()) == ("passed", "6"), normal


def _connect_program(port: int) -> str:
    return f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('ESCAPED')\n"


def _ctypes_connect_program(port: int) -> str:
    return (
        "import ctypes, os, struct\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "fd = libc.socket(2, 1, 0)\n"
        f"addr = struct.pack('=H', 2) + struct.pack('!H', {port}) + bytes([127, 0, 0, 1]) + bytes(8)\n"
        "if libc.connect(fd, addr, 16) == 0:\n"
        "    print('ESCAPED')\n"
        "raise SystemExit('connect failed: ' + os.strerror(ctypes.get_errno()))\n"
    )


SHORT = {"timeout_s": 1.5}  # cases that must end by the wall clock need not wait long for it

# name, program (str, or callable(port) -> str), {mode: allowed statuses}, reason substring per mode[, limits]
HOSTILE = [
    ("infinite loop", "while True:\n    pass\n", {"*": {"timeout"}}, {"*": "limit"}, SHORT),
    ("sleep past the wall clock", "import time\ntime.sleep(60)\n", {"*": {"timeout"}}, {"*": "wall-clock"}, SHORT),
    ("fork bomb", "import os\nwhile True:\n    os.fork()\n", {"*": {"blocked"}}, {"*": "os.fork"}),
    ("subprocess", "import subprocess\nsubprocess.run(['sh', '-c', 'echo ESCAPED'])\n", {"*": {"blocked"}},
     {"namespaces": "subprocess.Popen", "hooks": "importing _posixsubprocess"}),
    ("huge allocation", "blob = bytearray(8 * 2**30)\nprint('ESCAPED')\n", {"*": {"memory"}}, {"*": "memory limit"}),
    ("growing allocation", "chunks = []\nwhile True:\n    chunks.append(bytearray(2**24))\n", {"*": {"memory"}},
     {"*": "MemoryError"}),
    ("write into the project", f"open({str(PROJECT / 'PWNED')!r}, 'w').write('x')\nprint('ESCAPED')\n",
     {"*": {"blocked"}}, {"*": "PWNED"}),
    ("write into the home dir", f"open({str(Path.home() / 'PWNED')!r}, 'w').write('x')\nprint('ESCAPED')\n",
     {"*": {"blocked"}}, {"*": "PWNED"}),
    ("write into /etc", "open('/etc/leaf-pwned', 'w').write('x')\nprint('ESCAPED')\n", {"*": {"blocked"}},
     {"*": "/etc/leaf-pwned"}),
    ("read the project", f"print(open({str(PROJECT / 'pyproject.toml')!r}).read())\nprint('ESCAPED')\n",
     {"*": {"blocked"}}, {"*": "pyproject.toml"}),
    ("read a secret env var", "import os\nprint(os.environ['LEAF_SECRET_TOKEN'])\nprint('ESCAPED')\n",
     {"*": {"failed"}}, {"*": "KeyError"}),
    ("read the parent's environ", "import os\nprint(open(f'/proc/{os.getppid()}/environ').read())\n",
     {"*": {"blocked"}}, {"*": "environ"}),
    ("signal the parent", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", {"*": {"blocked"}},
     {"*": "os.kill"}),
    ("open a socket", _connect_program, {"*": {"blocked"}}, {"*": "network access"}),
    ("flood stdout", "while True:\n    print('x' * 65536)\n", {"*": {"blocked"}}, {"*": "file size limit"}),
    # kernel layer: ctypes goes around the audit hook
    ("kernel: ctypes socket", _ctypes_connect_program, {"namespaces": {"blocked"}, "hooks": {"blocked"}},
     {"namespaces": "Network is unreachable", "hooks": "ctypes"}),
    ("kernel: ctypes write into the project",
     ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
      f"if libc.open({str(PROJECT / 'PWNED').encode()!r}, os.O_WRONLY | os.O_CREAT, 0o644) >= 0:\n"
      "    print('ESCAPED')\nraise SystemExit('open failed: ' + os.strerror(ctypes.get_errno()))\n"),
     # A project under /tmp is not even visible inside the sandbox (its /tmp is private): ENOENT, not EROFS.
     {"namespaces": {"blocked", "failed"}, "hooks": {"blocked"}},
     {"namespaces": ("Read-only file system", "No such file or directory"), "hooks": "ctypes"}),
    ("kernel: subprocess with its audit call patched out",
     ("import sys, types\nimport subprocess\n"
      "subprocess.sys = types.SimpleNamespace(**{**vars(sys), 'audit': lambda *args: None})\n"
      f"subprocess.run(['/bin/sh', '-c', 'echo x > {PROJECT / 'PWNED'}'], check=True)\nprint('ESCAPED')\n"),
     {"namespaces": {"failed"}, "hooks": {"blocked"}},
     {"namespaces": "returned non-zero exit status", "hooks": "importing _posixsubprocess"}),
    ("kernel: ctypes fork bomb",
     "import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()\n",
     {"namespaces": {"timeout"}, "hooks": {"blocked"}}, {"namespaces": "wall-clock", "hooks": "ctypes"}, SHORT),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", HOSTILE, ids=[case[0] for case in HOSTILE])
def test_hostile_program_is_contained(mode, case, tcp_server, _secret_env_and_private_tmp):
    _name, program, statuses, reasons, *overrides = case
    port = tcp_server.getsockname()[1]
    source = program(port) if callable(program) else program
    result = run_code(source, isolation=mode, **{**LIMITS, **(overrides[0] if overrides else {})})

    assert not result.passed
    assert result.status in statuses.get(mode, statuses.get("*")), result
    expected = reasons.get(mode, reasons.get("*", ""))
    assert result.reason and any(e in result.reason for e in (expected if isinstance(expected, tuple) else
                                                             (expected,))), result
    assert "ESCAPED" not in result.stdout
    assert result.isolation == mode
    assert not (PROJECT / "PWNED").exists() and not (Path.home() / "PWNED").exists()
    assert not Path("/etc/leaf-pwned").exists()
    with pytest.raises(BlockingIOError):
        tcp_server.accept()  # nothing connected
    _assert_clean_and_still_working(result, mode, _secret_env_and_private_tmp)


@pytest.mark.parametrize("mode", MODES)
def test_environment_is_scrubbed_and_workdir_is_fresh(mode, _secret_env_and_private_tmp):
    program = ("import os, sys\n"
               "print(sorted(os.environ))\n"
               "print(os.getcwd() == os.environ['HOME'] == os.environ['TMPDIR'])\n"
               "print(sorted(os.listdir('.')))\n"
               "open('scratch.txt', 'w').write('ok')\n"
               "print(open('scratch.txt').read())\n"
               "print(any('site-packages' in p and '.venv' in p for p in sys.path))\n")
    result = run_code(program, isolation=mode, **LIMITS)
    assert result.status == "passed", result
    names, same_dirs, listing, scratch, venv_on_path = result.stdout.strip().splitlines()
    assert names == str(["HOME", "LANG", "LC_ALL", "LEAF_SANDBOX_RUN", "PATH", "TMPDIR"])
    assert (same_dirs, listing, scratch, venv_on_path) == ("True", "['main.py']", "ok", "False")
    _assert_clean_and_still_working(result, mode, _secret_env_and_private_tmp)


def test_tmp_writes_stay_inside_the_sandbox(_secret_env_and_private_tmp):
    """Writing to /tmp lands in the run's own directory (namespaces) or is refused (hooks), never in the
    caller's /tmp."""
    target = Path("/tmp") / f"leaf-escape-{secrets.token_hex(4)}"
    for mode in MODES:
        result = run_code(f"open({str(target)!r}, 'w').write('x')\n", isolation=mode, **LIMITS)
        assert result.status == ("passed" if mode == "namespaces" else "blocked"), result
        assert not target.exists()
        _assert_clean_and_still_working(result, mode, _secret_env_and_private_tmp)


@pytest.mark.skipif("namespaces" not in MODES, reason="needs root and unshare(2) (namespaces mode)")
def test_namespaces_leave_no_escaped_daemon(_secret_env_and_private_tmp):
    """A child that calls setsid() leaves the process group; the PID namespace still takes it down."""
    program = ("import ctypes, time\nlibc = ctypes.CDLL(None)\n"
               "if libc.fork() == 0:\n    libc.setsid()\n    while True:\n        time.sleep(1)\n"
               "time.sleep(0.3)\nprint('parent done')\n")
    result = run_code(program, isolation="namespaces", **LIMITS)
    assert result.status == "passed" and "parent done" in result.stdout, result
    _assert_clean_and_still_working(result, "namespaces", _secret_env_and_private_tmp)


@pytest.mark.skipif("namespaces" not in MODES, reason="needs root and unshare(2) (namespaces mode)")
def test_namespaces_hide_other_processes_and_run_unprivileged():
    program = ("import os\nprint(os.getuid() != 0, os.getgid() != 0, os.getgroups())\n"
               "print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n")
    result = run_code(program, isolation="namespaces", hidden_paths=(), **LIMITS)
    assert result.status == "passed", result
    ids, pids = result.stdout.strip().splitlines()
    assert ids == "True True []"
    assert pids == "[1, 2]"  # the namespace's init and the program itself


@pytest.mark.parametrize("mode", MODES)
def test_cpu_time_limit(mode):
    result = run_code("while True:\n    pass\n", timeout_s=20, cpu_time_s=1, memory_mb=256, isolation=mode)
    assert (result.status, result.reason) == ("timeout", "CPU time limit of 1 s exceeded"), result
    assert result.duration_s < 15


def test_check_program_humaneval_and_leetcode_style():
    solution = "def add(a, b):\n    return a + b\n"
    test = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
    assert check_program(solution, test, "add", timeout_s=5, memory_mb=256).passed
    wrong = check_program("def add(a, b):\n    return a - b\n", test, "add", timeout_s=5, memory_mb=256)
    assert (wrong.passed, wrong.status, wrong.reason) == (False, "failed", "AssertionError")

    leetcode_solution = ("class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
                         "        seen = {}\n        for i, x in enumerate(nums):\n"
                         "            if target - x in seen:\n                return [seen[target - x], i]\n"
                         "            seen[x] = i\n")
    leetcode_test = "def check(candidate):\n    assert candidate(nums=[2, 7, 11], target=9) == [0, 1]\n"
    missing_preamble = check_program(leetcode_solution, leetcode_test, "Solution().twoSum", timeout_s=5,
                                     memory_mb=256)
    assert missing_preamble.status == "failed" and "NameError" in missing_preamble.reason, missing_preamble
    with_preamble = check_program("from typing import List\n" + leetcode_solution, leetcode_test,
                                  "Solution().twoSum", timeout_s=5, memory_mb=256)
    assert with_preamble.passed, with_preamble


def test_check_io_tests_stdin_and_functional():
    stdin_program = "a, b = map(int, input().split())\nprint(a + b)\n"
    tests = [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"},
             {"input": "10 -4\n", "output": "6", "testtype": "stdin"}]
    assert check_io_tests(stdin_program, tests, timeout_s=5, memory_mb=256).passed
    wrong = check_io_tests(stdin_program, tests + [{"input": "1 1", "output": "3", "testtype": "stdin"}],
                           timeout_s=5, memory_mb=256)
    assert wrong.status == "failed" and wrong.reason.startswith("stdin test 2: wrong output"), wrong

    functional_program = "class Solution:\n    def maxOf(self, nums, k):\n        return sorted(nums)[-k:]\n"
    functional = [{"input": "[3, 1, 2]\n2", "output": "[2, 3]", "testtype": "functional"}]
    assert check_io_tests(functional_program, functional, func_name="maxOf", timeout_s=5, memory_mb=256).passed
    bad = [{"input": "[3, 1, 2]\n1", "output": "[2]", "testtype": "functional"}]
    failed = check_io_tests(functional_program, bad, func_name="maxOf", timeout_s=5, memory_mb=256)
    assert failed.status == "failed" and "functional test 0" in failed.reason, failed


def test_outputs_match_rules():
    assert outputs_match("1 2\n3  \n\n", "1 2\n3")
    assert outputs_match("0.3333333", "0.33333333")
    assert not outputs_match("0.33", "0.3333333")
    assert not outputs_match("1 2", "1 2 3")
    assert not outputs_match("yes", "no")
