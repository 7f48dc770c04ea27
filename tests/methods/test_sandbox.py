"""The sandbox against hostile programs: each is contained (killed or denied), the verdict is
recorded, and the next program runs normally (issue 18, must-show 2)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from align_jax.config import FieldError
from align_jax.sandbox import STATUSES, Sandbox, SandboxLimits, SandboxResult, probe_isolation, run_program

LIMITS = SandboxLimits(wall_s=2.0, cpu_s=1.0, memory_mb=256, file_size_mb=1.0)
SECRET = "ALIGN_JAX_SANDBOX_TEST_SECRET"


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(LIMITS)


def _assert_contained(result: SandboxResult, statuses, started: float):
    assert result.status in statuses, result
    assert result.status in STATUSES and not result.ok and result.result is None
    assert result.error  # the verdict says why
    assert time.perf_counter() - started < LIMITS.wall_s + 5  # never hangs the run


HOSTILE = {
    "infinite loop": ("while True:\n    pass\n", {"cpu_limit", "timeout"}),
    "loop ignoring SIGXCPU": ("import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass\n",
                              {"cpu_limit", "timeout"}),
    "sleep": ("import time\ntime.sleep(60)\n", {"timeout"}),
    "fork bomb": ("import os\nwhile True:\n    os.fork()\n", {"denied"}),
    "subprocess": ("import subprocess\nsubprocess.run(['sh', '-c', 'echo hi'])\n", {"denied"}),
    "os.system": ("import os\nos.system('echo hi')\n", {"denied"}),
    "memory bomb": ("x = bytearray(4 * 1024 ** 3)\n", {"memory"}),
    "memory bomb, growing": ("x = []\nwhile True:\n    x.append(' ' * 10 ** 7)\n", {"memory"}),
    "1 GB write": ("with open('big.bin', 'wb') as f:\n    for _ in range(1024):\n        f.write(b'0' * 2 ** 20)\n",
                   {"file_size"}),
    "many files": ("for i in range(1000):\n    open(f'f{i}', 'w').write('x')\n", {"denied"}),
    "socket to 127.0.0.1": ("import socket\ns = socket.create_connection(('127.0.0.1', 22), timeout=1)\n", {"denied"}),
    "raw _socket": ("import _socket\ns = _socket.socket()\n", {"denied"}),
    "parent's environment, os.environ": (f"import os\nanswer = os.environ['{SECRET}']\n", {"error"}),
    "parent's environment, /proc": ("import os\nanswer = open(f'/proc/{os.getppid()}/environ').read()\n",
                                    {"denied"}),
    "ctypes into libc": ("import ctypes\nctypes.CDLL(None).system(b'echo hi')\n", {"denied"}),
    "deep recursion": ("def f(n):\n    return f(n + 1)\nf(0)\n", {"recursion"}),
    "deep recursion, limit raised": ("import sys\nsys.setrecursionlimit(10 ** 8)\n"
                                     "def f(n):\n    return f(n + 1)\nf(0)\n",
                                     {"recursion", "crashed", "error", "memory", "cpu_limit", "timeout"}),
    "output flood": ("import os\nwhile True:\n    os.write(1, b'x' * 65536)\n", {"output_limit"}),
    "print flood": ("while True:\n    print('x' * 10000)\n", {"cpu_limit", "timeout"}),
    "syntax error": ("def solution(:\n", {"syntax"}),
    "exception": ("def solution():\n    return 1 / 0\n", {"error"}),
    "kill the parent": ("import os\nos.kill(os.getppid(), 9)\n", {"denied"}),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program_is_contained_and_the_run_continues(sandbox, name):
    program, statuses = HOSTILE[name]
    os.environ[SECRET] = "hunter2"
    try:
        started = time.perf_counter()
        result = sandbox.run(program)
    finally:
        del os.environ[SECRET]
    _assert_contained(result, statuses, started)
    assert "hunter2" not in result.error + result.stdout
    after = sandbox.run("def solution():\n    return 6 * 7\n")
    assert after.status == "ok" and after.result == "42", after


def test_writing_or_removing_outside_the_temporary_directory_is_denied(sandbox):
    # a world-writable directory the OS would let even `nobody` write to: the guard must stop it
    tmp_path = Path(tempfile.mkdtemp())
    os.chmod(tmp_path, 0o777)
    target, victim = tmp_path / "escape.txt", tmp_path / "victim.txt"
    victim.write_text("keep")
    for program in (f"open({str(target)!r}, 'w').write('x')\n",
                    f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\n",
                    f"import os\nos.remove({str(victim)!r})\n",
                    f"import os\nos.symlink({str(victim)!r}, 'link')\nopen('link', 'w').write('x')\n",
                    f"import os\nos.chdir({str(tmp_path)!r})\nopen('escape.txt', 'w').write('x')\n"):
        started = time.perf_counter()
        result = sandbox.run(program)
        _assert_contained(result, {"denied"}, started)
        assert result.violations, result
    assert not target.exists() and victim.read_text() == "keep"
    shutil.rmtree(tmp_path)


def test_writing_inside_the_temporary_directory_is_allowed_and_removed(sandbox):
    result = sandbox.run("import os\nopen('notes.txt', 'w').write('12')\nanswer = open('notes.txt').read()\n"
                         "import sys\n")
    assert result.status == "ok" and result.result == "12", result


def test_answers_are_read_and_normalised(sandbox):
    cases = {"def solution():\n    return 3 * 4 - 2\n": "10",
             "answer = 7 / 2\n": "3.5",
             "result = 18.0\n": "18",
             "from fractions import Fraction\nanswer = Fraction(6, 3)\n": "2",
             "import math\nprint(math.gcd(12, 18))\n": "6",
             "x = 1\n": None}
    results = sandbox.run_many(list(cases))
    for (program, expected), result in zip(cases.items(), results):
        assert result.result == expected, (program, result)
        assert result.status == ("ok" if expected is not None else "no_result")


def test_os_level_containment_without_the_interpreter_guards():
    """With the audit hook off, what the OS enforces alone: process limits and the network namespace."""
    isolation = probe_isolation()
    bare = Sandbox(LIMITS, guards=False)
    if isolation.user == "root":
        pytest.skip("running as root without a `nobody` user: RLIMIT_NPROC is not enforced by the kernel")
    result = bare.run("import os\nwhile True:\n    os.fork()\n")
    assert result.status in {"error", "cpu_limit", "timeout", "killed"} and not result.ok, result
    assert "Resource temporarily unavailable" in result.error or result.status != "error", result
    if isolation.network != "namespace":
        pytest.skip("no network namespace on this machine: the interpreter guard is the network barrier")
    interfaces = bare.run("answer = ' '.join(line.split(':')[0].strip() for line in "
                          "open('/proc/self/net/dev').read().splitlines()[2:])\n")
    assert interfaces.status == "ok" and interfaces.result == "lo", interfaces


def test_isolation_is_reported():
    isolation = probe_isolation()
    assert isolation.network in ("namespace", "interpreter")
    assert isolation.user in ("nobody", "root", "same", "same (user namespace)")
    assert "network:" in isolation.describe()


@pytest.mark.parametrize(("field", "value"), [("wall_s", 0), ("cpu_s", -1.0), ("memory_mb", 8), ("file_size_mb", -1),
                                              ("max_files", -2), ("max_processes", -1), ("output_bytes", 10),
                                              ("result_chars", 0), ("wall_s", float("nan")), ("cpu_s", "2")])
def test_bad_limits_name_the_field(field, value):
    with pytest.raises(FieldError, match=f"must be") as raised:
        SandboxLimits(**{field: value})
    assert raised.value.field == field


def test_bad_arguments():
    with pytest.raises(TypeError):
        Sandbox("tight")
    with pytest.raises(FieldError):
        Sandbox(LIMITS, workers=0)
    with pytest.raises(TypeError):
        Sandbox(LIMITS).run(b"print(1)")
    long = Sandbox(SandboxLimits(program_bytes=10)).run("x = 1  # a long program\n")
    assert long.status == "syntax" and not long.ok


def test_run_program_convenience():
    assert run_program("answer = 2 ** 10\n").result == "1024"
