"""The sandbox's launcher and value codec: :mod:`leaf_ray.evaluate.sandbox` sends both functions to the child
interpreter as source text (``python -I -c``). They must stay self-contained: no module-level names, every
import inside. The parent uses the same :func:`sandbox_codec` to read what the sandbox reports."""

from __future__ import annotations


def sandbox_codec(find_class):  # self-contained: sent as source text, and used by the parent
    """``(encode, decode)`` of plain values as JSON bytes: None, bool, int, float (NaN/inf too), str, bytes,
    complex, list, tuple, dict, set, frozenset, and instances of classes that ``find_class(name)`` returns
    (the benchmark's own helper classes, e.g. LeetCode's ``ListNode``), by their attributes.

    Only those exact types are written (a subclass of int with its own ``__eq__`` is refused), and decoding
    builds only those exact types, so whatever a sandboxed program sends, the reader gets plain values whose
    comparison runs no code of the program. Objects are numbered and sent flat (long linked lists and cycles
    need no recursion).
    """
    import json

    def encode(value):
        objects, numbers, queue = [], {}, []

        def enc(x, depth):
            t = type(x)
            if x is None or t is bool or t is str or t is int or t is float:
                return x
            if depth > 200:
                raise ValueError("value nested more than 200 levels deep")
            if t is list:
                return [enc(v, depth + 1) for v in x]
            if t is tuple or t is set or t is frozenset:
                return {"$": t.__name__, "v": [enc(v, depth + 1) for v in x]}
            if t is dict:
                return {"$": "dict", "v": [[enc(k, depth + 1), enc(v, depth + 1)] for k, v in x.items()]}
            if t is bytes:
                return {"$": "bytes", "v": x.hex()}
            if t is complex:
                return {"$": "complex", "v": [x.real, x.imag]}
            if find_class(t.__name__) is t:
                if id(x) not in numbers:
                    numbers[id(x)] = len(queue)
                    queue.append(x)  # keeps x alive, so its id stays unique
                return {"$": "obj", "v": numbers[id(x)]}
            raise TypeError(f"a {t.__module__}.{t.__qualname__} is not a plain value")

        top = enc(value, 0)
        while len(objects) < len(queue):
            obj = queue[len(objects)]
            attrs = vars(obj)
            objects.append([type(obj).__name__, {k: enc(v, 0) for k, v in attrs.items() if type(k) is str}])
        return json.dumps({"v": top, "o": objects}, separators=(",", ":")).encode()

    def decode(data):
        doc = json.loads(data)
        if type(doc) is not dict or set(doc) != {"v", "o"} or type(doc["o"]) is not list:
            raise ValueError("malformed message")
        instances = []
        for entry in doc["o"]:
            if type(entry) is not list or len(entry) != 2 or type(entry[0]) is not str or type(entry[1]) is not dict:
                raise ValueError("malformed object entry")
            cls = find_class(entry[0])
            if cls is None:
                raise ValueError(f"unknown class {entry[0][:60]!r}")
            instances.append(cls.__new__(cls))

        def dec(x):
            t = type(x)
            if x is None or t is bool or t is str or t is int or t is float:
                return x
            if t is list:
                return [dec(v) for v in x]
            if t is dict and set(x) == {"$", "v"}:
                tag, v = x["$"], x["v"]
                if tag in ("tuple", "set", "frozenset") and type(v) is list:
                    return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](dec(i) for i in v)
                if tag == "dict" and type(v) is list and all(type(p) is list and len(p) == 2 for p in v):
                    return {dec(k): dec(val) for k, val in v}
                if tag == "bytes" and type(v) is str:
                    return bytes.fromhex(v)
                if tag == "complex" and type(v) is list and len(v) == 2 and all(type(p) in (int, float) for p in v):
                    return complex(v[0], v[1])
                if tag == "obj" and type(v) is int and 0 <= v < len(instances):
                    return instances[v]
            raise ValueError("malformed value")

        for instance, (_name, attrs) in zip(instances, doc["o"]):
            for key, value in attrs.items():
                instance.__dict__[key] = dec(value)
        return dec(doc["v"])

    return encode, decode


def sandbox_launcher() -> None:  # one self-contained function: it is sent as source text
    """Runs as ``python -I -c``; sys.argv[1] is the JSON config built by :func:`run_code`."""
    import builtins
    import ctypes
    import json
    import os
    import resource
    import signal
    import sys

    cfg = json.loads(sys.argv[1])
    work, view = cfg["work"], cfg["view"]
    namespaces = cfg["mode"] == "namespaces"
    harness = cfg["harness"]  # None: run the program; else serve calls of its entry point over the channel
    channel = harness["fds"] if harness else []

    def fail(message):
        sys.stderr.write(f"leaf-ray sandbox setup failed: {message}\n")
        sys.stderr.flush()
        os._exit(121)

    libc = ctypes.CDLL(None, use_errno=True)

    def sys_ok(rc, what):
        if rc != 0:
            fail(f"{what}: {os.strerror(ctypes.get_errno())}")

    with open(os.path.join(work, "main.py"), "rb") as f:
        source = f.read()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if namespaces:
        ms_rdonly, ms_nosuid, ms_nodev, ms_noexec, ms_remount, ms_bind, ms_rec, ms_private = (
            1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
        kept_flags = {"nosuid": ms_nosuid, "nodev": ms_nodev, "noexec": ms_noexec, "noatime": 1024,
                      "nodiratime": 2048, "relatime": 1 << 21}
        # mount, net, pid, ipc, uts namespaces
        sys_ok(libc.unshare(0x00020000 | 0x40000000 | 0x20000000 | 0x08000000 | 0x04000000), "unshare")
        sys_ok(libc.mount(b"none", b"/", None, ms_rec | ms_private, None), "make / private")
        # every host mount read-only in this namespace: /run/lock, /var/tmp and any other world-writable
        # host path included (device nodes such as /dev/null stay writable on a read-only mount)
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
        for fields in mounts:
            point = fields[4].encode().decode("unicode_escape")  # \040 and friends
            options = fields[5].split(",")
            if point == "/proc" or point.startswith("/proc/") or "ro" in options:
                continue
            flags = ms_remount | ms_bind | ms_rdonly
            for option in options:
                flags |= kept_flags.get(option, 0)
            sys_ok(libc.mount(None, point.encode(), None, flags, None), f"read-only {point}")
        # the only writable directory: a size-capped tmpfs, the program's /tmp, cwd and HOME
        sys_ok(libc.mount(b"tmpfs", view.encode(), b"tmpfs", ms_nosuid | ms_nodev,
                          f"size={cfg['disk_bytes']},mode=700".encode()), f"tmpfs {view}")
        # the interpreter prefix may sit under a path we cover: park it in the view, cover, bind it back
        staged = []
        for i, path in enumerate(cfg["expose"]):
            stage = os.path.join(view, f".leaf-stage-{i}")
            os.mkdir(stage)
            sys_ok(libc.mount(path.encode(), stage.encode(), None, ms_bind | ms_rec, None), f"stage {path}")
            staged.append((path, stage))
        hidden = [p for p in cfg["hide"] + ["/run"] if os.path.isdir(p)]  # a path under /tmp is gone already
        for path in hidden:
            sys_ok(libc.mount(b"tmpfs", path.encode(), b"tmpfs", ms_nosuid | ms_nodev, b"size=64k,mode=755"),
                   f"cover {path}")
        for path, stage in staged:
            os.makedirs(path, exist_ok=True)
            sys_ok(libc.mount(stage.encode(), path.encode(), None, ms_bind | ms_rec, None), f"bind {path}")
            sys_ok(libc.mount(None, path.encode(), None, ms_remount | ms_bind | ms_rdonly | ms_nosuid, None),
                   f"read-only {path}")
            sys_ok(libc.umount2(stage.encode(), 2), f"unstage {path}")  # MNT_DETACH
            os.rmdir(stage)
        for path in hidden:
            sys_ok(libc.mount(None, path.encode(), None, ms_remount | ms_rdonly | ms_nosuid | ms_nodev, None),
                   f"read-only {path}")
        for path in ("/var/tmp", "/dev/shm"):
            if os.path.isdir(path):
                sys_ok(libc.mount(b"tmpfs", path.encode(), b"tmpfs", ms_nosuid | ms_nodev,
                                  b"size=1m,mode=1777"), f"private {path}")
        with open(os.path.join(view, "main.py"), "wb") as f:
            f.write(source)
        os.chown(view, cfg["uid"], cfg["uid"])
        os.chown(os.path.join(view, "main.py"), cfg["uid"], cfg["uid"])
        # the next child is init of the new PID namespace: when it exits, the kernel kills the rest
        status_read, status_write = os.pipe()
        init_pid = os.fork()
        if init_pid:
            for fd in channel + [status_write]:
                os.close(fd)  # only the program may hold the channel: its end is seen as the channel's end
            os.waitpid(init_pid, 0)
            raw = os.read(status_read, 64).decode() or "exit -9"
            kind, value = raw.split()
            if kind == "memory":
                sys.stderr.write(f"\nleaf-ray sandbox: the run's processes together used {int(value) >> 20} MB, "
                                 f"over the run's memory limit of {cfg['memory_bytes'] >> 20} MB\n")
                sys.stderr.flush()
                os._exit(122)
            code = int(value)
            if code < 0:  # re-raise the program's signal so the caller sees how it died
                signal.signal(-code, signal.SIG_DFL)
                os.kill(os.getpid(), -code)
            os._exit(code)
        os.close(status_read)
        libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG = SIGKILL: the launcher dies -> the namespace dies
        sys_ok(libc.mount(b"proc", b"/proc", b"proc", ms_nosuid | ms_nodev | ms_noexec, None), "mount /proc")
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        program_pid = os.fork()
        if program_pid:
            # init: reap everything, report the program's own end, and hold the whole run (every process
            # in the namespace) to the memory limit: their proportional set sizes, summed every 20 ms
            for fd in channel:
                os.close(fd)
            limit = cfg["memory_bytes"]
            while True:
                signal.sigtimedwait([signal.SIGCHLD], 0.02)
                while True:
                    try:
                        pid, wait_status = os.waitpid(-1, os.WNOHANG)
                    except ChildProcessError:
                        pid = 0
                    if pid == 0:
                        break
                    if pid == program_pid:
                        code = -os.WTERMSIG(wait_status) if os.WIFSIGNALED(wait_status) else os.WEXITSTATUS(wait_status)
                        os.write(status_write, f"exit {code}".encode())
                        os._exit(0)
                total = 0
                for name in os.listdir("/proc"):
                    if name.isdigit() and name != "1":
                        try:
                            with open(f"/proc/{name}/smaps_rollup", "rb") as f:
                                for line in f:
                                    if line.startswith(b"Pss:"):
                                        total += int(line.split()[1]) << 10
                                        break
                        except (OSError, ValueError):
                            pass
                if total > limit:
                    os.kill(-1, signal.SIGKILL)
                    os.write(status_write, f"memory {total}".encode())
                    os._exit(0)
        os.close(status_write)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    os.chdir(view)

    limits = {resource.RLIMIT_CPU: cfg["cpu_s"], resource.RLIMIT_FSIZE: cfg["fsize_bytes"]}
    if namespaces:
        limits[resource.RLIMIT_NPROC] = cfg["nproc"]  # the uid is the run's own: this counts the whole run
    else:  # RLIMIT_NPROC counts every process of this user: allow the current ones plus the budget
        mine = 0
        for entry in os.scandir("/proc"):
            try:
                mine += entry.name.isdigit() and entry.stat().st_uid == os.getuid()
            except OSError:
                pass
        limits[resource.RLIMIT_NPROC] = mine + cfg["nproc"]
    for kind, value in limits.items():
        # CPU: soft < hard so the kernel sends SIGXCPU (reported as a CPU timeout) before SIGKILL
        resource.setrlimit(kind, (value, value + 1 if kind == resource.RLIMIT_CPU else value))
    if namespaces:
        uid = cfg["uid"]
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        sys_ok(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")  # PR_SET_NO_NEW_PRIVS
        # seccomp: no new namespaces (unshare, setns, clone with namespace flags), no mounts, no kernel
        # keyring/bpf/perf; clone3 answers ENOSYS (its flags sit in memory a filter cannot read, and libc
        # then falls back to clone)
        arch = {"x86_64": (0xC000003E, 56, 435, (272, 308, 165, 166, 155, 161, 250, 248, 249, 321, 298, 323)),
                "aarch64": (0xC00000B7, 220, 435, (97, 268, 40, 39, 41, 51, 219, 217, 218, 280, 241, 282))}
        if os.uname().machine not in arch:
            fail(f"no seccomp filter for {os.uname().machine}")
        audit_arch, nr_clone, nr_clone3, denied = arch[os.uname().machine]
        denied = denied + (428, 429, 430, 431, 432, 433, 442)  # the new mount API
        ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
        allow, eperm, enosys, kill = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38, 0x80000000
        namespace_flags = 0x00020000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x02000000
        # layout: [arch check][x32 check][denied...][clone3][clone] ... rets at the end
        prog = [(ld, 0, 0, 4), (jeq, 1, 0, audit_arch), (ret, 0, 0, kill), (ld, 0, 0, 0)]
        body = [(jge, "eperm", 0, 0x40000000)] + [(jeq, "eperm", 0, nr) for nr in denied]
        body += [(jeq, "enosys", 0, nr_clone3), (jeq, 0, "allow", nr_clone), (ld, 0, 0, 16),
                 (jset, "eperm", "allow", namespace_flags)]
        tail = {"allow": allow, "eperm": eperm, "enosys": enosys}
        base = len(prog)
        ends = {name: base + len(body) + i for i, name in enumerate(tail)}
        for i, (code, jt, jf, k) in enumerate(body):
            at = base + i
            prog.append((code, ends[jt] - at - 1 if isinstance(jt, str) else jt,
                         ends[jf] - at - 1 if isinstance(jf, str) else jf, k))
        prog += [(ret, 0, 0, value) for value in tail.values()]

        class SockFilter(ctypes.Structure):
            _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                        ("k", ctypes.c_uint32)]

        class SockFprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

        filters = (SockFilter * len(prog))(*[SockFilter(*ins) for ins in prog])
        fprog = SockFprog(len(prog), filters)
        sys_ok(libc.prctl(22, 2, ctypes.byref(fprog), 0, 0), "seccomp")  # PR_SET_SECCOMP, MODE_FILTER

    deny_read = [p for p in cfg["hide"]]
    allow_read = list(cfg["expose"])
    write_root = os.path.realpath(view)
    own_pid = os.getpid()
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    process_events = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                      "subprocess.Popen", "pty.spawn", "os.killpg"}
    network_events = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
                      "socket.gethostbyname", "socket.gethostbyaddr", "socket.gethostbyname_ex"}
    path_events = {"os.mkdir": (0,), "os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1),
                   "os.truncate": (0,), "os.chmod": (0,), "os.chown": (0,), "os.symlink": (1,),
                   "os.link": (0, 1), "os.utime": (0,), "shutil.rmtree": (0,)}
    ctypes_events = {"ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle"} if not namespaces else set()
    # C entry points that start processes without an audit event of their own (subprocess audits in Python
    # code, which a program can patch): refused in hooks mode, where no kernel layer backs the hook
    unaudited_modules = {"_posixsubprocess", "_xxsubinterpreters"} if not namespaces else set()

    def under(path, roots):
        return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)

    def resolve(path):
        if isinstance(path, int) or path is None:
            return None
        return os.path.realpath(os.fsdecode(path))

    def refuse(what):
        raise PermissionError(f"leaf-ray sandbox: {what} is blocked")

    def audit(event, args):
        if event == "open":
            path = resolve(args[0])
            if path is None:
                return
            writing = (isinstance(args[1], str) and any(c in args[1] for c in "wax+")) or bool(args[2] & write_flags)
            if writing and not under(path, [write_root, "/dev/null"]):
                refuse(f"writing {path} (outside the working directory)")
            if under(path, deny_read) and not under(path, allow_read):
                refuse(f"reading {path}")
            if path.startswith("/proc/") and path.split("/")[2].isdigit() and int(path.split("/")[2]) != os.getpid():
                refuse(f"reading {path}")
        elif event in path_events:
            for i in path_events[event]:
                path = resolve(args[i]) if i < len(args) else None
                if path is not None and not under(path, [write_root]):
                    refuse(f"{event} on {path} (outside the working directory)")
        elif event in ("os.listdir", "os.scandir"):
            path = resolve(args[0]) if args and args[0] is not None else None
            if path is not None and under(path, deny_read) and not under(path, allow_read):
                refuse(f"listing {path}")
        elif event == "socket.__new__":
            if args[1] != 1:  # AF_UNIX only
                refuse("network access (socket creation)")
        elif event in network_events:
            refuse(f"network access ({event})")
        elif event in process_events:
            refuse(f"starting or signalling processes ({event})")
        elif event == "os.kill" and args[0] not in (own_pid, 0):
            refuse("signalling other processes (os.kill)")
        elif event in ctypes_events:
            refuse("ctypes (it could bypass the sandbox hooks)")
        elif event == "import" and args[0] in unaudited_modules:
            refuse(f"importing {args[0]} (it starts processes unaudited)")

    sys.dont_write_bytecode = True
    program = os.path.join(view, "main.py")
    sys.argv = [program]
    program_globals = {"__name__": "__main__", "__file__": program, "__builtins__": builtins}
    if harness:
        # Everything the harness needs is bound here, before the program runs: patching modules, builtins or
        # sys.modules later changes nothing below. Whatever the program does, it can only change the values
        # sent back; the tests and expected values never enter this process (the parent judges).
        request_fd, reply_fd = channel
        from_bytes, to_bytes, read, write, exc_name = int.from_bytes, int.to_bytes, os.read, os.write, type

        def find_class(name):
            cls = program_globals.get(name)
            return cls if isinstance(cls, type) and cls.__module__ == "__main__" else None

        encode, decode = sandbox_codec(find_class)  # sent along with this function

        def send(payload):
            data = to_bytes(len(payload), 4, "big") + payload
            while data:
                data = data[write(reply_fd, data):]

        def receive():
            data = b""
            while len(data) < 4 or len(data) < 4 + from_bytes(data[:4], "big"):
                chunk = read(request_fd, 1 << 20)
                if not chunk:
                    return None
                data += chunk
            return data[4:]

    compiled = compile(source, program, "exec")
    sys.addaudithook(audit)
    resource.setrlimit(resource.RLIMIT_AS, (cfg["memory_bytes"], cfg["memory_bytes"]))
    entry_point = harness["entry_point"] if harness else None
    del cfg, libc, source
    exec(compiled, program_globals)  # noqa: S102 - running the program is the point
    if not harness:
        return
    candidate = eval(entry_point, program_globals)
    send(encode(("ready",)))
    while True:
        request = receive()
        if request is None:
            return
        nonce, args, kwargs = decode(request)  # the nonce ties the reply to this call
        try:
            reply = ("ok", nonce, candidate(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - SystemExit too: the parent sees a raised exception
            reply = ("raised", nonce, exc_name(e).__name__, str(e)[:300])
        try:
            payload = encode(reply)
        except Exception as e:  # noqa: BLE001 - the result is not a plain value
            payload = encode(("unsendable", nonce, f"{exc_name(e).__name__}: {e}"[:300]))
        send(payload)
