"""Sandbox throughput: programs per second (issue 18, must-show 2).

    nice python experiments/bench_sandbox.py [--programs 40] [--workers 1 2]

Times :meth:`align_jax.sandbox.Sandbox.run_many` on a typical program-of-thought program, on a
mix with hostile programs (syntax error, denied fork, memory bomb, 1 GB write), and, as the
reference, a bare ``python -I -S -c pass`` process per program (what any process-per-program
design pays). One warm-up run first (it probes the namespaces). Prints the isolation in force.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

from align_jax.sandbox import Sandbox, SandboxLimits

TYPICAL = ("def solution():\n    eggs = 16 - 3 - 4\n    return eggs * 2\n")
MIX = [TYPICAL, "def solution(:\n", "import os\nos.fork()\n", "x = bytearray(4 * 1024 ** 3)\n",
       "with open('big', 'wb') as f:\n    for _ in range(1024):\n        f.write(b'0' * 2 ** 20)\n",
       "from fractions import Fraction\nanswer = Fraction(7, 2) * 4\n"]


def _bare(count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], env={}, check=True)
    return count / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=40)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    limits = SandboxLimits(wall_s=5.0, cpu_s=2.0, memory_mb=512)
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.platform()}")
    warm = Sandbox(limits)
    warm.run(TYPICAL)
    print(f"isolation: {warm.isolation.describe()}")
    bare = _bare(args.programs)
    print(f"reference: bare `python -I -S -c pass` per program: {bare:.1f} programs/s")
    for workers in args.workers:
        sandbox = Sandbox(limits, workers=workers)
        for name, programs in (("typical PoT program", [TYPICAL] * args.programs),
                               ("mix incl. hostile", (MIX * args.programs)[:args.programs])):
            start = time.perf_counter()
            results = sandbox.run_many(programs)
            rate = len(programs) / (time.perf_counter() - start)
            statuses = sorted({r.status for r in results})
            print(f"workers={workers} {name:20s}: {rate:6.1f} programs/s ({rate / bare:.2f}x bare spawn); "
                  f"verdicts {statuses}")
    plain = Sandbox(limits, namespaces=False)
    start = time.perf_counter()
    plain.run_many([TYPICAL] * args.programs)
    rate = args.programs / (time.perf_counter() - start)
    print(f"workers=1 typical, no namespaces ({plain.isolation.describe()}): {rate:.1f} programs/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
