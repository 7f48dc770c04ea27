"""Benchmark: scaling of the sharded sweep over devices and over processes, same total work.

Runs one sweep (``--points`` grid points of N=3, K=16, T=20, ``--games`` games each)
with ``align-jax simulate`` in fresh processes:

* on 1, 2, 4, 8 host devices of one process (``XLA_FLAGS=--xla_force_host_platform_device_count=8``,
  ``--devices D``),
* on 1, 2, 4 local processes of one device each (``--coordinator``, JAX's gloo CPU
  collectives),

and reports, in one run, the play time (the rows' ``wall_s`` with the compile time
taken out), the compile time, games per second, speedup over one device and the
parallel efficiency (speedup / devices).  Every run must write the same rows (checked).
On a 2-core CPU the forced host devices and the processes share two cores, so the
ideal speedup is at most 2 whatever the count: the figures measure the sharding's
overhead, not a cluster.

Usage::

    python experiments/bench_sharding.py                  # 2 points x 2^16 games
    python experiments/bench_sharding.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CONFIG = """\
name: scaling
seed: 0
scenarios_per_point: {games}
chunk_size: {chunk}
game: {{num_rounds: 20, step_size: 0.1}}
scenario: {{num_agents: 3, num_candidates: 16, pool_size: 32, min_candidates: 4}}
sweep:
  rho: {rhos}
"""


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _read(directory: Path):
    rows = [json.loads(x) for x in (directory / "scaling" / "seed0" / "results.jsonl").read_text().splitlines()]
    play = sum(r["wall_s"] for r in rows) - sum(r["compile_s"] for r in rows[:1])  # one call: compile once
    compile_s = rows[0]["compile_s"]
    stats = [{k: v for k, v in r.items() if k not in ("wall_s", "compile_s", "devices")} for r in rows]
    return play, compile_s, stats


def run(config: Path, out: Path, devices: int, processes: int, force: int) -> tuple[float, float, list, float]:
    cli = [sys.executable, "-m", "align_jax.cli", "simulate", str(config), "--quiet", "--no-figures",
           "--output-dir", str(out)]
    start = time.perf_counter()
    if processes == 1:
        done = subprocess.run(cli + ["--devices", str(devices)], capture_output=True, text=True, env=_env(force))
        if done.returncode:
            raise RuntimeError(done.stderr[-2000:])
    else:
        port = _free_port()
        procs = [subprocess.Popen(cli + ["--coordinator", f"localhost:{port}", "--num-processes", str(processes),
                                         "--process-id", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=_env(1)) for i in range(processes)]
        for p in procs:
            _, err = p.communicate()
            if p.returncode:
                raise RuntimeError(err[-2000:])
    total = time.perf_counter() - start
    play, compile_s, stats = _read(out)
    return play, compile_s, stats, total


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--games", type=int, default=2**16, help="games per grid point")
    parser.add_argument("--points", type=int, default=2, help="grid points (rho values)")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--processes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="2^13 games, devices 1 and 8, 2 processes")
    args = parser.parse_args(argv)
    if args.quick:
        args.games, args.devices, args.processes = 2**13, [1, 8], [2]
    from rich.console import Console
    from rich.table import Table

    import jax

    console = Console(width=140)
    console.print(f"jax {jax.__version__} | CPUs {os.cpu_count()} | load avg {os.getloadavg()}")
    rhos = [round(-0.5 + i / max(args.points - 1, 1), 3) for i in range(args.points)]
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "scaling.yaml"
        config.write_text(CONFIG.format(games=args.games, chunk=args.games, rhos=rhos))
        settings = [(d, 1) for d in args.devices] + [(1, p) for p in args.processes]
        for devices, processes in settings:
            out = Path(tmp) / f"d{devices}p{processes}"
            play, compile_s, stats, total = run(config, out, devices, processes, max(args.devices))
            if reference is None:
                reference = stats
            same = stats == reference
            rows.append({"devices": devices * processes, "processes": processes, "play_s": play,
                         "compile_s": compile_s, "process_wall_s": total,
                         "games_per_s": args.games * args.points / play, "same_rows_as_first": same})
            console.print(f"{devices} device(s) x {processes} process(es): play {play:.2f} s, compile "
                          f"{compile_s:.2f} s, {'same rows' if same else 'ROWS DIFFER'}")
    base = rows[0]["play_s"]
    table = Table(title=f"sharded sweep, N=3 K=16 T=20, {args.points} points x {args.games} games (same work)")
    for col in ("devices", "processes", "play s", "compile s", "games/s", "speedup", "efficiency", "same rows"):
        table.add_column(col, justify="right")
    for r in rows:
        r["speedup"] = base / r["play_s"]
        r["efficiency"] = r["speedup"] / r["devices"]
        table.add_row(str(r["devices"]), str(r["processes"]), f"{r['play_s']:.2f}", f"{r['compile_s']:.2f}",
                      f"{r['games_per_s']:,.0f}", f"{r['speedup']:.2f}x", f"{100 * r['efficiency']:.0f}%",
                      "yes" if r["same_rows_as_first"] else "NO")
    console.print(table)
    result = {"rows": rows, "games": args.games, "points": args.points, "cpu_count": os.cpu_count()}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    if not all(r["same_rows_as_first"] for r in rows):
        raise SystemExit("a sharded run wrote different rows")
    return result


if __name__ == "__main__":
    main()
