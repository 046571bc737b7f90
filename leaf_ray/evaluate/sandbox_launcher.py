"""The sandbox's launcher: the one function :mod:`leaf_ray.evaluate.sandbox` sends to the child interpreter as
source text (``python -I -c``). It must stay self-contained: no module-level names, every import inside."""

from __future__ import annotations


def sandbox_launcher() -> None:  # one self-contained function: it is sent as source text
    """Runs as ``python -I -c``; sys.argv[1] is the JSON config built by :func:`run_code`."""
    import ctypes
    import json
    import os
    import resource
    import runpy
    import sys

    cfg = json.loads(sys.argv[1])
    work, view = cfg["work"], cfg["view"]
    namespaces = cfg["mode"] == "namespaces"

    def fail(message):
        sys.stderr.write(f"leaf-ray sandbox setup failed: {message}\n")
        sys.stderr.flush()
        os._exit(121)

    libc = ctypes.CDLL(None, use_errno=True)

    def sys_ok(rc, what):
        if rc != 0:
            fail(f"{what}: {os.strerror(ctypes.get_errno())}")

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if namespaces:
        ms_rdonly, ms_nosuid, ms_nodev, ms_noexec, ms_remount, ms_bind, ms_rec, ms_private = (
            1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
        sys_ok(libc.unshare(0x00020000 | 0x40000000 | 0x20000000), "unshare(mount, net, pid)")
        sys_ok(libc.mount(b"none", b"/", None, ms_rec | ms_private, None), "make / private")
        sys_ok(libc.mount(work.encode(), view.encode(), None, ms_bind, None), f"bind {view}")
        # the interpreter prefix may sit under a path we cover: park it in the view, cover, bind it back
        staged = []
        for i, path in enumerate(cfg["expose"]):
            stage = os.path.join(view, f".leaf-stage-{i}")
            os.mkdir(stage)
            sys_ok(libc.mount(path.encode(), stage.encode(), None, ms_bind | ms_rec, None), f"stage {path}")
            staged.append((path, stage))
        hidden = [p for p in cfg["hide"] if os.path.isdir(p)]  # a path under /tmp is gone already
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
        # the next child is init of the new PID namespace: when it exits, the kernel kills the rest
        status_read, status_write = os.pipe()
        init_pid = os.fork()
        if init_pid:
            os.close(status_write)
            os.waitpid(init_pid, 0)
            raw = os.read(status_read, 64).decode() or "-9"
            code = int(raw)
            if code < 0:  # re-raise the program's signal so the caller sees how it died
                import signal
                signal.signal(-code, signal.SIG_DFL)
                os.kill(os.getpid(), -code)
            os._exit(code)
        os.close(status_read)
        libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG = SIGKILL: the launcher dies -> the namespace dies
        sys_ok(libc.mount(b"proc", b"/proc", b"proc", ms_nosuid | ms_nodev | ms_noexec, None), "mount /proc")
        program_pid = os.fork()
        if program_pid:
            while True:  # init: reap everything, report the program's own end
                pid, wait_status = os.wait()
                if pid == program_pid:
                    code = -os.WTERMSIG(wait_status) if os.WIFSIGNALED(wait_status) else os.WEXITSTATUS(wait_status)
                    os.write(status_write, str(code).encode())
                    os._exit(0)
        os.close(status_write)
    os.chdir(view)

    limits = {resource.RLIMIT_CPU: cfg["cpu_s"], resource.RLIMIT_FSIZE: cfg["fsize_bytes"]}
    if namespaces:
        limits[resource.RLIMIT_NPROC] = cfg["nproc"]
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
    sys.addaudithook(audit)
    resource.setrlimit(resource.RLIMIT_AS, (cfg["memory_bytes"], cfg["memory_bytes"]))
    del cfg, libc
    runpy.run_path(program, run_name="__main__")

