"""The trusted stub that runs one untrusted program inside the sandbox (see :mod:`align_jax.sandbox`).

Started as ``python -I -S _sandbox_child.py '<settings json>'`` with an empty environment,
cwd the run's fresh temporary directory, in a new session (and, where the OS allows, in new
network and PID namespaces). Standard library only; it must not import ``align_jax``.

Order of events (nothing untrusted is read before step 4):

1. resource limits, soft = hard (the program cannot raise them): ``RLIMIT_CPU`` (SIGXCPU at
   the soft limit, SIGKILL one second later), ``RLIMIT_AS``, ``RLIMIT_FSIZE``, ``RLIMIT_NPROC``,
   ``RLIMIT_NOFILE``, ``RLIMIT_CORE = 0``;
2. privileges dropped to ``nobody`` when started as root (the parent says so);
3. the interpreter guards (a ``sys.addaudithook`` hook, which cannot be removed from Python):
   deny process creation, signals to other processes, sockets, ``ctypes`` / ``cffi`` /
   ``subprocess`` / ``socket`` imports, reads under ``/proc`` and ``/sys``, and any
   write, create, remove, rename, link or mode change outside the temporary directory, and
   at most ``max_files`` files opened for writing;
4. the program (``program.py`` in the cwd) is compiled and executed with ``sys.stdout``
   replaced by a capped buffer; its answer is ``solution()`` when it defines one, else a
   variable ``answer`` / ``result``, else the last printed line;
5. one JSON line on the real stdout: ``status``, ``result``, ``error``, ``violations``, ``stdout``.
"""

import builtins
import io
import json
import os
import resource
import signal
import sys

SETTINGS = json.loads(sys.argv[1])
REAL_STDOUT = sys.stdout
MiB = 1 << 20


def _limit(which, value):
    value = int(value)
    resource.setrlimit(which, (value, value))


def set_limits():
    cpu = max(1, int(-(-SETTINGS["cpu_s"] // 1)))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    _limit(resource.RLIMIT_AS, SETTINGS["memory_mb"] * MiB)
    _limit(resource.RLIMIT_FSIZE, SETTINGS["file_size_bytes"])
    _limit(resource.RLIMIT_NPROC, SETTINGS["nproc"])
    _limit(resource.RLIMIT_NOFILE, SETTINGS["max_open_files"])
    _limit(resource.RLIMIT_CORE, 0)


PRELOADED = ("math", "cmath", "fractions", "decimal", "statistics", "itertools", "functools", "collections",
             "datetime", "re", "random", "heapq", "bisect", "operator", "string", "numbers", "typing")
"""Imported before privileges are dropped: when started as root the program runs as ``nobody``,
which may not be able to read the interpreter's standard library (e.g. under ``/root``), so these
are the modules it can count on."""


def preload():
    for name in PRELOADED:
        try:
            __import__(name)
        except ImportError:
            pass


def drop_privileges():
    uid, gid = SETTINGS.get("uid"), SETTINGS.get("gid")
    if uid is None:
        return
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise SystemExit("could not drop privileges")


class CpuLimit(BaseException):
    """Raised into the program at the soft CPU-time limit (SIGXCPU); SIGKILL follows a second later."""


def _on_xcpu(signum, frame):
    raise CpuLimit("CPU time limit")


class SandboxViolation(PermissionError):
    """Raised into the program when it tries something the sandbox forbids."""


VIOLATIONS = []
TMP = os.path.realpath(os.getcwd())
BLOCKED_EVENTS = {
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
    "os.kill", "os.killpg", "pty.spawn", "socket.__new__", "socket.connect", "socket.bind",
    "socket.getaddrinfo", "socket.sendto", "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function",
    "ctypes.cdata", "os.setxattr", "os.removexattr", "os.chflags", "os.lchflags", "os.startfile",
    "webbrowser.open",
}
BLOCKED_MODULES = {
    "ctypes", "_ctypes", "cffi", "_cffi_backend", "socket", "_socket", "ssl", "_ssl", "subprocess",
    "_posixsubprocess", "multiprocessing", "_multiprocessing", "pty", "select", "selectors", "mmap",
    "resource", "fcntl", "termios", "_xxsubinterpreters", "urllib.request", "http.client", "ftplib",
    "smtplib", "telnetlib", "asyncio",
}
PATH_EVENTS = {  # event -> indices of the path arguments that must stay inside the temporary directory
    "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.chmod": (0,),
    "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,), "os.link": (0, 1), "os.symlink": (0, 1),
    "shutil.rmtree": (0,), "shutil.copyfile": (1,), "shutil.copytree": (1,), "shutil.move": (0, 1),
    "os.mkfifo": (0,), "os.mknod": (0,),
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_state = {"busy": False, "writes": 0}


def _inside(path) -> bool:
    if isinstance(path, int):
        return True  # an already open descriptor: it was checked when it was opened
    try:
        path = os.fsdecode(os.fspath(path))
    except TypeError:
        return False
    real = os.path.realpath(path)
    return real == TMP or real.startswith(TMP + os.sep)


def _deny(what):
    VIOLATIONS.append(what[:200])
    raise SandboxViolation(f"sandbox: {what[:200]}")


def _is_write(mode, flags) -> bool:
    if isinstance(mode, str) and any(c in mode for c in "wax+"):
        return True
    return isinstance(flags, int) and bool(flags & WRITE_FLAGS)


def audit(event, args):
    if _state["busy"]:
        return
    _state["busy"] = True
    try:
        if event in BLOCKED_EVENTS:
            _deny(f"{event} denied")
        elif event == "import":
            name = str(args[0])
            if name in BLOCKED_MODULES or name.split(".")[0] in BLOCKED_MODULES:
                _deny(f"import {name} denied")
        elif event == "open":
            path, mode, flags = (list(args) + [None, None, None])[:3]
            if isinstance(path, (str, bytes)):
                real = os.path.realpath(os.fsdecode(path))
                if real.startswith(("/proc", "/sys")) and not real.startswith("/proc/self/fd"):
                    _deny(f"open {real} denied")
            if _is_write(mode, flags):
                if not _inside(path):
                    _deny(f"write to {path!r} outside the temporary directory denied")
                _state["writes"] += 1
                if _state["writes"] > SETTINGS["max_files"]:
                    _deny(f"more than {SETTINGS['max_files']} files opened for writing")
        elif event in PATH_EVENTS:
            for index in PATH_EVENTS[event]:
                if index < len(args) and args[index] is not None and not _inside(args[index]):
                    _deny(f"{event} on {args[index]!r} outside the temporary directory denied")
    finally:
        _state["busy"] = False


class CappedText(io.TextIOBase):
    """A text sink that keeps the first ``cap`` characters."""

    def __init__(self, cap):
        self.cap, self.parts, self.size, self.truncated = cap, [], 0, False

    def writable(self):
        return True

    def write(self, text):
        text = str(text)
        room = self.cap - self.size
        if room > 0:
            self.parts.append(text[:room])
            self.size += min(room, len(text))
        if len(text) > max(room, 0):
            self.truncated = True
        return len(text)

    def getvalue(self):
        return "".join(self.parts)


def as_text(value):
    """The program's answer as text: integral floats as integers, other floats to 6 decimals."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return None
        if value.is_integer():
            return str(int(value))
        return repr(round(value, 6))
    if hasattr(value, "numerator") and hasattr(value, "denominator") and not isinstance(value, int):
        if value.denominator == 1:
            return str(value.numerator)
        return repr(round(value.numerator / value.denominator, 6))
    text = str(value).strip()
    return text[:SETTINGS["result_chars"]] or None


def emit(status, result=None, error="", stdout=""):
    line = json.dumps({"status": status, "result": result, "error": error[:500],
                       "violations": VIOLATIONS[:20], "stdout": stdout[:SETTINGS["stdout_chars"]]})
    REAL_STDOUT.write(line + "\n")
    REAL_STDOUT.flush()


def main():
    set_limits()
    preload()
    drop_privileges()
    os.environ.clear()
    sys.dont_write_bytecode = True  # an import must not try to write a .pyc outside the directory
    with open("program.py", encoding="utf-8") as handle:
        source = handle.read()
    capture = CappedText(SETTINGS["stdout_chars"])
    signal.signal(signal.SIGXCPU, _on_xcpu)
    if SETTINGS["guards"]:
        sys.addaudithook(audit)
    sys.stdout = capture
    sys.stdin = io.StringIO("")
    status, result, error = "ok", None, ""
    try:
        code = compile(source, "<program>", "exec")
    except (SyntaxError, ValueError) as exc:
        sys.stdout = REAL_STDOUT
        emit("syntax", error=f"{type(exc).__name__}: {exc}")
        return
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(code, namespace)
        if callable(namespace.get("solution")):
            value = namespace["solution"]()
        elif "answer" in namespace:
            value = namespace["answer"]
        elif "result" in namespace:
            value = namespace["result"]
        else:
            lines = [line for line in capture.getvalue().splitlines() if line.strip()]
            value = lines[-1] if lines else None
        result = as_text(value)
        if result is None:
            status = "no_result"
    except SandboxViolation as exc:
        status, error = "denied", str(exc)
    except CpuLimit:
        status, error = "cpu_limit", "SIGXCPU at the CPU time limit"
    except MemoryError:
        status, error = "memory", "MemoryError"
    except RecursionError as exc:
        status, error = "recursion", f"RecursionError: {exc}"
    except OSError as exc:
        status = "file_size" if exc.errno == 27 else "error"  # EFBIG: RLIMIT_FSIZE
        error = f"{type(exc).__name__}: {exc}"
    except BaseException as exc:  # noqa: BLE001 - every failure of the program is a verdict
        status, error = "error", f"{type(exc).__name__}: {exc}"
    sys.stdout = REAL_STDOUT
    if VIOLATIONS and status != "denied":
        status, error = "denied", f"sandbox: {VIOLATIONS[0]}" + (f" (then {error})" if error else "")
    if status != "ok":
        result = None
    emit(status, result, error, capture.getvalue())


if __name__ == "__main__":
    main()
