"""A sandbox for short untrusted Python programs (the program-of-thought principal's programs).

:class:`Sandbox` runs one program per fresh process and returns a :class:`SandboxResult`
whose ``status`` is the verdict. A program that misbehaves is killed or denied and scored as a
failure; :meth:`Sandbox.run` never raises because of what the program does and never waits
longer than ``limits.wall_s`` (plus process start-up and clean-up).

    from align_jax.sandbox import Sandbox, SandboxLimits

    sandbox = Sandbox(SandboxLimits(wall_s=5, cpu_s=2, memory_mb=512))
    result = sandbox.run("def solution():\\n    return 3 * 4 - 2\\n")
    result.status, result.result        # ("ok", "10")
    sandbox.isolation                   # what the OS enforced on this machine

What is enforced, and by whom (``Sandbox.isolation`` says which ran on this machine):

* **OS (kernel), always:** a separate process (``python -I -S``: isolated mode, no user site,
  no ``site`` import, no ``PYTHON*`` variables) in a new session, killed with its whole process
  group (``killpg(SIGKILL)``) at the wall-time limit and after every run; resource limits set
  with ``setrlimit`` (soft = hard, so the program cannot raise them) before any untrusted byte
  is read: CPU time (``RLIMIT_CPU``: SIGXCPU, then SIGKILL a second later), address space
  (``RLIMIT_AS``), file size (``RLIMIT_FSIZE``), processes (``RLIMIT_NPROC``; the kernel
  ignores it for root, hence the next point), open files, no core dumps; an empty environment
  (the parent's variables are never passed); cwd a fresh temporary directory, removed after the
  run; stdout and stderr read by the parent up to ``output_bytes`` each (more: killed).
* **OS, where available:** new network and PID namespaces (``unshare -n -p -f``; as a non-root
  user with a user namespace, ``unshare -r -n -p -f``): no network interface but a down
  loopback, so no connection even to 127.0.0.1, and every process the program might start dies
  with it. When started as root the program runs as ``nobody`` (``setuid``), so
  ``RLIMIT_NPROC`` applies, files of other users cannot be written and ``/proc/<pid>/environ``
  of the parent cannot be read.
* **Interpreter (a ``sys.addaudithook`` hook, on by default):** process creation, signals,
  sockets, ``ctypes`` / ``cffi`` / ``subprocess`` / ``socket`` / ``multiprocessing`` imports,
  reads under ``/proc`` and ``/sys``, writes / creates / removes / renames / links / mode changes
  outside the temporary directory, more than ``max_files`` files opened for writing: denied
  with an exception, recorded in ``violations``, and the verdict is ``denied`` even if the
  program catches the exception. An audit hook is not a security boundary on its own (a
  memory-corruption bug in CPython would bypass it); the OS limits are the backstop. Without a
  network namespace the hook is the only network barrier (``isolation.network ==
  "interpreter"``), and writes to directories the running user may write (``/tmp``; the user's
  home when not root) are stopped by the hook alone.

Verdicts (:data:`STATUSES`): ``ok`` (a result), ``no_result``, ``syntax``, ``error`` (an
exception), ``denied``, ``timeout`` (wall time), ``cpu_limit``, ``memory``, ``recursion``,
``file_size``, ``output_limit``, ``crashed`` (a fatal signal such as SIGSEGV from a C stack
overflow), ``killed`` (another signal), ``sandbox_error`` (the sandbox itself failed).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

from align_jax.config import FieldError

__all__ = [
    "STATUSES",
    "SandboxLimits",
    "SandboxResult",
    "SandboxIsolation",
    "Sandbox",
    "probe_isolation",
    "run_program",
]

STATUSES = ("ok", "no_result", "syntax", "error", "denied", "timeout", "cpu_limit", "memory", "recursion",
            "file_size", "output_limit", "crashed", "killed", "sandbox_error")
"""Every verdict :meth:`Sandbox.run` can return; only ``ok`` carries a result."""

_CHILD = Path(__file__).with_name("_sandbox_child.py")
_MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Limits of one program run.

    Attributes:
      wall_s: wall-clock seconds before the process group is killed (> 0).
      cpu_s: CPU seconds (``RLIMIT_CPU``, rounded up to whole seconds; > 0).
      memory_mb: address space in MiB (``RLIMIT_AS``; >= 64, the interpreter needs ~30).
      file_size_mb: largest file the program may write, MiB (``RLIMIT_FSIZE``; >= 0).
      max_files: files the program may open for writing, inside its directory (>= 0).
      max_processes: processes / threads the program's user may add (``RLIMIT_NPROC``
        margin; >= 0; 0 forbids ``fork`` at the OS level too).
      max_open_files: ``RLIMIT_NOFILE`` (>= 16).
      output_bytes: bytes read from each of stdout and stderr; more kills the program (>= 1024).
      stdout_chars: characters of the program's own printing kept in the result (>= 0).
      result_chars: characters of the answer kept (>= 1).
      program_bytes: largest accepted program (a longer one is ``syntax`` without running; >= 1).

    Raises:
      FieldError: a limit out of range (the field is named).
    """

    wall_s: float = 5.0
    cpu_s: float = 2.0
    memory_mb: int = 512
    file_size_mb: float = 1.0
    max_files: int = 16
    max_processes: int = 0
    max_open_files: int = 64
    output_bytes: int = 65536
    stdout_chars: int = 4096
    result_chars: int = 200
    program_bytes: int = 65536

    def __post_init__(self):
        rules = {"wall_s": (0, False), "cpu_s": (0, False), "memory_mb": (64, True), "file_size_mb": (0, True),
                 "max_files": (0, True), "max_processes": (0, True), "max_open_files": (16, True),
                 "output_bytes": (1024, True), "stdout_chars": (0, True), "result_chars": (1, True),
                 "program_bytes": (1, True)}
        for name, (bound, inclusive) in rules.items():
            value = getattr(self, name)
            rule = f"{'>=' if inclusive else '>'} {bound}"
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise FieldError(name, f"must be a number {rule}, got {value!r}")
            if value < bound or (value == bound and not inclusive):
                raise FieldError(name, f"must be {rule}, got {value!r}")


class SandboxResult(NamedTuple):
    """The verdict on one program.

    Attributes:
      status: one of :data:`STATUSES`.
      result: the program's answer as text (``ok`` only, else None).
      error: why it failed (exception, signal, limit), '' when ``ok``.
      violations: what the interpreter guards denied, in order (at most 20).
      stdout: the start of what the program printed (``limits.stdout_chars``).
      returncode: the process's exit status (negative: killed by that signal).
      wall_s: seconds from start to verdict.
    """

    status: str
    result: Optional[str]
    error: str = ""
    violations: tuple = ()
    stdout: str = ""
    returncode: int = 0
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        """The program ran to the end and gave an answer."""
        return self.status == "ok"


class SandboxIsolation(NamedTuple):
    """What isolates the programs on this machine (:func:`probe_isolation`).

    Attributes:
      network: ``"namespace"`` (a new network namespace: OS level) or ``"interpreter"`` (the
        audit hook alone).
      pid_namespace: the program is PID 1 of a new PID namespace (its descendants die with it).
      user: ``"nobody"`` (started as root, privileges dropped), ``"same"`` (the running user) or
        ``"same (user namespace)"``.
      command: the launcher prefix (``unshare ...``), empty without namespaces.
      guards: the interpreter guards are installed.
    """

    network: str
    pid_namespace: bool
    user: str
    command: tuple
    guards: bool

    def describe(self) -> str:
        """One line for logs and reports."""
        return (f"network: {self.network}; pid namespace: {'yes' if self.pid_namespace else 'no'}; "
                f"user: {self.user}; interpreter guards: {'on' if self.guards else 'off'}")


def _try(command: list) -> bool:
    try:
        done = subprocess.run([*command, sys.executable, "-I", "-S", "-c", "pass"], env={}, timeout=20,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


@functools.lru_cache(maxsize=None)
def _probe(use_namespaces: bool) -> tuple:
    root = os.geteuid() == 0
    unshare = shutil.which("unshare") or ("/usr/bin/unshare" if os.path.exists("/usr/bin/unshare") else None)
    command: tuple = ()
    network, pid = "interpreter", False
    if use_namespaces and unshare and sys.platform.startswith("linux"):
        user_ns = [] if root else ["-r"]
        for flags, has_pid in ((["-n", "-p", "-f", "--kill-child"], True), (["-n"], False)):
            candidate = [unshare, *user_ns, *flags, "--"]
            if _try(candidate):
                command, network, pid = tuple(candidate), "namespace", has_pid
                break
    if root:
        try:
            import pwd

            entry = pwd.getpwnam("nobody")
            user = ("nobody", entry.pw_uid, entry.pw_gid)
        except (KeyError, ImportError):
            user = ("root", None, None)
    else:
        user = ("same (user namespace)" if command else "same", None, None)
    return command, network, pid, user


def probe_isolation(*, namespaces: bool = True, guards: bool = True) -> SandboxIsolation:
    """What this machine allows (cached per process): tries ``unshare`` with network and PID
    namespaces (then network only), and whether privileges can be dropped to ``nobody``."""
    command, network, pid, user = _probe(bool(namespaces))
    return SandboxIsolation(network if network == "namespace" else "interpreter", pid, user[0], command, guards)


def _task_count(uid: int) -> int:
    """Processes and threads of real user ``uid`` (what ``RLIMIT_NPROC`` counts)."""
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            count += len(os.listdir(f"/proc/{entry.name}/task"))
        except OSError:
            continue
    return count


class Sandbox:
    """Runs untrusted Python programs one process each (see the module docstring).

    Args:
      limits: :class:`SandboxLimits`.
      namespaces: use network / PID namespaces where the OS allows them (``unshare``).
      guards: install the interpreter guards (audit hook). Turn off only to test what the OS
        enforces alone.
      workers: programs run at once by :meth:`run_many` (>= 1).
    """

    def __init__(self, limits: SandboxLimits = SandboxLimits(), *, namespaces: bool = True, guards: bool = True,
                 workers: int = 2):
        if not isinstance(limits, SandboxLimits):
            raise TypeError(f"limits must be a SandboxLimits, got {type(limits).__name__}")
        if workers < 1:
            raise FieldError("workers", f"must be >= 1, got {workers}")
        self.limits = limits
        self.workers = int(workers)
        self.isolation = probe_isolation(namespaces=namespaces, guards=guards)
        self._user = _probe(bool(namespaces))[3]

    def _settings(self) -> dict:
        limits = self.limits
        _, uid, gid = self._user
        counted = uid if uid is not None else os.getuid()
        # RLIMIT_NPROC counts every task of the (real) user: allow what exists now plus the margin.
        nproc = _task_count(counted) + limits.max_processes + (self.workers if uid is not None else 0)
        return {"cpu_s": limits.cpu_s, "memory_mb": limits.memory_mb,
                "file_size_bytes": int(limits.file_size_mb * _MiB), "nproc": max(nproc, 1),
                "max_open_files": limits.max_open_files, "max_files": limits.max_files,
                "stdout_chars": limits.stdout_chars, "result_chars": limits.result_chars,
                "guards": self.isolation.guards, "uid": uid, "gid": gid}

    def run(self, program: str) -> SandboxResult:
        """Runs ``program`` (Python source) and returns its verdict; never raises for what the
        program does, and returns within about ``limits.wall_s`` seconds plus start-up.

        Raises:
          TypeError: ``program`` is not a str.
        """
        if not isinstance(program, str):
            raise TypeError(f"program must be a str, got {type(program).__name__}")
        start = time.perf_counter()
        if len(program.encode("utf-8", "replace")) > self.limits.program_bytes:
            return SandboxResult("syntax", None, f"program longer than {self.limits.program_bytes} bytes")
        directory = tempfile.mkdtemp(prefix="align_jax_sandbox_")
        try:
            return self._run_in(directory, program, start)
        except Exception as exc:  # noqa: BLE001 - the sandbox's own failure is a verdict, never a crash
            return SandboxResult("sandbox_error", None, f"{type(exc).__name__}: {exc}",
                                 wall_s=time.perf_counter() - start)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def _run_in(self, directory: str, program: str, start: float) -> SandboxResult:
        limits = self.limits
        settings = self._settings()
        path = Path(directory) / "program.py"
        path.write_text(program, encoding="utf-8", errors="replace")
        if settings["uid"] is not None:
            os.chown(directory, settings["uid"], settings["gid"])
            os.chmod(directory, 0o700)
            os.chmod(path, 0o644)
        command = [*self.isolation.command, sys.executable, "-I", "-S", str(_CHILD), json.dumps(settings)]
        process = subprocess.Popen(command, cwd=directory, env={}, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                   close_fds=True)
        out, err = bytearray(), bytearray()
        timed_out = overflow = False
        deadline = start + limits.wall_s
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ, out)
            selector.register(process.stderr, selectors.EVENT_READ, err)
            open_streams = 2
            while open_streams:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    timed_out = True
                    break
                for key, _ in selector.select(timeout=min(remaining, 0.5)):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        selector.unregister(key.fileobj)
                        open_streams -= 1
                        continue
                    key.data.extend(chunk)
                    if len(key.data) > limits.output_bytes:
                        overflow = True
                if overflow:
                    break
        _kill_group(process)
        returncode, cpu = _reap(process, max(1.0, deadline - time.perf_counter()))
        process.stdout.close()
        process.stderr.close()
        wall = time.perf_counter() - start
        if timed_out:
            return SandboxResult("timeout", None, f"killed after {limits.wall_s:g} s wall time", (), "",
                                 returncode, wall)
        if overflow:
            return SandboxResult("output_limit", None, f"more than {limits.output_bytes} bytes of output",
                                 (), "", returncode, wall)
        verdict = _last_json(out)
        if verdict is not None:
            status = verdict.get("status")
            if status not in STATUSES:
                status = "error"
            result = verdict.get("result") if status == "ok" else None
            return SandboxResult(status, result if isinstance(result, str) else None, str(verdict.get("error", "")),
                                 tuple(str(v) for v in verdict.get("violations") or ()),
                                 str(verdict.get("stdout", "")), returncode, wall)
        return SandboxResult(*_signal_verdict(returncode, err, cpu, limits.cpu_s), (), "", returncode, wall)

    def run_many(self, programs: Sequence[str]) -> list[SandboxResult]:
        """:meth:`run` of every program, ``workers`` at a time; results in input order."""
        programs = list(programs)
        if self.workers == 1 or len(programs) <= 1:
            return [self.run(p) for p in programs]
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(self.run, programs))


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(process: subprocess.Popen, timeout: float) -> tuple:
    """Waits for the (already killed) process: ``(returncode, CPU seconds of it and the children it
    reaped)``; the CPU time tells a CPU-limit kill from others behind ``unshare -f``, which
    turns its child's death by a signal into exit status 1."""
    deadline = time.perf_counter() + timeout
    while True:
        try:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        except ChildProcessError:
            return (process.returncode or 0), 0.0
        if pid:
            code = os.waitstatus_to_exitcode(status)
            process.returncode = code
            return code, usage.ru_utime + usage.ru_stime
        if time.perf_counter() > deadline:
            _kill_group(process)
            deadline = time.perf_counter() + 5.0
        time.sleep(0.002)


def _last_json(out: bytes) -> Optional[dict]:
    for line in reversed(bytes(out).decode("utf-8", "replace").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
    return None


def _signal_verdict(returncode: int, err: bytes, cpu: float, cpu_limit: float) -> tuple:
    """``(status, result, error)`` of a process that printed no verdict (``cpu``: its CPU seconds)."""
    text = bytes(err[-400:]).decode("utf-8", "replace").strip()
    if cpu >= 0.95 * max(1, -(-cpu_limit // 1)):
        return "cpu_limit", None, f"killed at the CPU time limit ({cpu:.2f} s CPU, exit status {returncode})"
    # ``unshare -f`` reports a child killed by signal s as exit status 128 + s
    number = -returncode if returncode < 0 else (returncode - 128 if returncode > 128 else None)
    if number == signal.SIGXCPU:
        return "cpu_limit", None, "killed by SIGXCPU (CPU time limit)"
    if number in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT):
        return "crashed", None, f"killed by {signal.Signals(number).name}"
    if number is not None and 0 < number < signal.NSIG:
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = str(number)
        return "killed", None, f"killed by {name}"
    if "MemoryError" in text:
        return "memory", None, text
    return "error", None, f"exit status {returncode} without a verdict: {text[-300:]}"


def run_program(program: str, limits: Optional[SandboxLimits] = None) -> SandboxResult:
    """Runs one program in a default :class:`Sandbox` (``limits`` default :class:`SandboxLimits`)."""
    return Sandbox(limits or SandboxLimits()).run(program)
