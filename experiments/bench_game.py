"""Benchmark: the jitted ALIGN game engine vs vectorized NumPy vs a plain Python loop.

On the same synthetic inputs, in one run, measures game-rounds per second
(games x T / seconds) of

* ``align_jax.game.delegation.play`` (jit, vmap over games, ``lax.scan`` over rounds),
* ``tests.game.reference.play_numpy`` (the test oracle; float32, broadcasting over
  ``[Q, N, K, N, K]``, a Python loop over rounds only) on up to
  ``--numpy-max-log2`` games,
* ``tests.game.reference.play_python`` (plain Python loops) on
  ``--python-games`` games, scaled per game-round,

for batches ``2^--log2-min .. 2^--log2-max``.  All three play the complete
``play`` (rounds, final pick, regret and bound, Nash gap of the average
profile, Pareto compliance, the four baselines); none validates inputs on the
host while timed (``validate=False``).  Every figure is the best of
``--repeats`` timed calls after a warm-up; the engine's compile time (first
call minus a steady call) is reported separately; results are fetched with
``block_until_ready``.  The three implementations are checked against each
other on the games they share (max |diff| of average policies and of ALIGN's
principal value, and the number of differing submissions).

Batches larger than ``2^--chunk-log2`` games are played chunk by chunk with
one compiled function, replaying the same chunk of games (the engine's cost
does not depend on the data: static shapes, masks instead of branches), so
memory stays bounded; peak RSS is reported.  Memory against T is measured
with XLA's compiled memory analysis at T=20 and T=200, with and without
per-round trajectories.

The CPU may be shared with other processes: the load average is printed,
and each figure is given in wall time and in process CPU time.

Usage::

    python experiments/bench_game.py                      # N=3, K=16, T=20, 2^10..2^20
    python experiments/bench_game.py --quick              # a short smoke run
    python experiments/bench_game.py --mode sampled --out bench.json
    python experiments/bench_game.py --feedback sorted     # the engine with the sorted feedback
    python experiments/bench_game.py --compare-feedback    # dense vs sorted: N=3,K=16 and an N x K grid

``--feedback`` selects ``GameConfig.feedback`` for the engine (``dense``: the
``[N, K, N, K]`` comparison, today's engine before the sorted form;
``sorted``: scores ranked once per game, ``O(N K)`` per round; ``auto``: by
shape).  ``--compare-feedback`` instead times the engine alone with both
implementations on N=3, K=16 and on the grid ``--grid-agents`` x
``--grid-candidates`` (T=``--rounds``), reporting game-rounds/s, compile time
(first call minus a steady call), XLA's compiled temp memory per chunk, the
process's peak RSS, and the fitted growth exponent ``b`` of the cost per
game-round ``~ (N K)^b`` of each implementation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.game import delegation
from align_jax.game.types import CandidateSet, GameConfig, GameParams, make_candidates

# The slow references are the tests' oracle and live under tests/, not in the package.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
from tests.game import reference  # noqa: E402


def synthetic_games(num_games: int, num_agents: int, num_candidates: int, seed: int) -> CandidateSet:
    """Random games shaped like real ones ``[Q, N, K]``.

    Agent utilities are self-consistency frequencies over the agent's valid
    slots; principal scores correlate (rho ~ 0.5) with them; about 10% of the
    slots are padding; answers come from a shared skewed pool (so agents'
    candidates coincide); answer 0 is the correct one.
    """
    rng = np.random.default_rng(seed)
    shape = (num_games, num_agents, num_candidates)
    valid = rng.random(shape) > 0.1
    valid[..., 0] = True
    counts = rng.gamma(0.7, size=shape) * valid
    agent_utility = counts / counts.sum(-1, keepdims=True)
    z = (agent_utility - agent_utility.mean()) / agent_utility.std()
    principal_score = 0.5 * z + np.sqrt(0.75) * rng.normal(size=shape)
    pool = 2 * num_candidates
    popularity = 1.0 / np.arange(1, pool + 1)
    answer_id = rng.choice(pool, size=shape, p=popularity / popularity.sum())
    return make_candidates(
        agent_utility.astype(np.float32),
        principal_score.astype(np.float32),
        valid=valid,
        answer_id=answer_id.astype(np.int32),
        principal_value=(principal_score + 0.3 * rng.normal(size=shape)).astype(np.float32),
        correct=answer_id == 0,
    )


def slice_games(candidates: CandidateSet, count: int) -> CandidateSet:
    return CandidateSet(*(np.asarray(x)[:count] for x in candidates))


def timed(fn, repeats: int):
    """Best (wall, cpu) seconds of ``repeats`` calls of ``fn`` (results blocked on) and the last result."""
    best_wall = best_cpu = float("inf")
    result = None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = jax.block_until_ready(fn())
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu, result


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def engine_memory_analysis(config: GameConfig, chunk: CandidateSet, key) -> dict:
    """Compiled temp/output bytes of the engine for this config on ``chunk``."""
    q = chunk.valid.shape[0]
    keys = jax.random.split(key, q)
    params = GameParams(step_size=jnp.full((q,), 0.5, jnp.float32))
    compiled = delegation._play_batch.lower(config, jax.tree.map(jnp.asarray, chunk), keys, params).compile()
    analysis = compiled.memory_analysis()
    return {
        "temp_bytes": int(analysis.temp_size_in_bytes),
        "output_bytes": int(analysis.output_size_in_bytes),
        "argument_bytes": int(analysis.argument_size_in_bytes),
    }


def agreement(engine, other, count: int) -> dict:
    engine_avg = np.asarray(engine.average_policy)[:count]
    return {
        "games": int(count),
        "max_abs_diff_average_policy": float(np.max(np.abs(engine_avg - np.asarray(other.average_policy)[:count]))),
        "max_abs_diff_align_value": float(
            np.max(np.abs(np.asarray(engine.align.principal_value)[:count] - np.asarray(other.align.principal_value)[:count]))
        ),
        "differing_submissions": int(np.sum(np.asarray(engine.submission)[:count] != np.asarray(other.submission)[:count])),
    }


def _grid_games(n: int, k: int, budget: int) -> int:
    """Games per grid point: bounded so the dense engine (~(N K)^2 a round) stays a few seconds."""
    return int(np.clip(budget // (n * k) ** 2, 64, 4096))


def _time_reference(play, config, games, params, key, budget_s):
    """Wall seconds per game-round of a reference on ``games`` (one call), or None past ``budget_s``."""
    wall, cpu, result = timed(lambda: play(config, games, params, key=key, validate=False), 1)
    q, t = games.valid.shape[0], config.num_rounds
    return {"game_rounds_per_s": q * t / wall, "us_per_game_round": wall / (q * t) * 1e6, "games": q,
            "wall_s": wall, "cpu_s": cpu}, result


def scaling(args, console) -> dict:
    """Every implementation on N=3, K=16 and on the N x K grid: game-rounds/s, compile s, memory, exponents.

    Implementations: the engine with the dense ``[N, K, N, K]`` feedback (today's
    engine before the sorted form; skipped above ``--dense-max-slots`` slots,
    where its memory explodes), the engine with the sorted ``O(N K)`` feedback,
    the vectorized NumPy reference (float32; games capped by ``--numpy-mib``)
    and the plain Python loop (a few games, while ``--python-budget-s`` allows).
    Memory: XLA's compiled temp bytes of each engine on one chunk of
    ``2^--memory-log2`` games (lowered and compiled only, not run).
    """
    from rich.table import Table

    key = jax.random.PRNGKey(args.seed)
    t = args.rounds
    points = [(3, 16, 2**args.chunk_log2)]
    points += [(n, k, None) for n in args.grid_agents for k in args.grid_candidates if (n, k) != (3, 16)]
    rows = []
    python_over = numpy_over = False
    for n, k, q in points:
        m = n * k
        q = q or _grid_games(n, k, args.grid_budget)
        base = synthetic_games(q, n, k, args.seed)
        games = jax.tree.map(jnp.asarray, base)
        keys = jax.random.split(key, q)
        params = GameParams(step_size=jnp.full((q,), args.step_size, jnp.float32))
        row = {"N": n, "K": k, "NK": m, "T": t, "games": q}
        results = {}
        for feedback in ("dense", "sorted"):
            if feedback == "dense" and m > args.dense_max_slots:
                continue
            config = GameConfig(num_rounds=t, mode=args.mode, schedule=args.schedule, feedback=feedback)
            run = lambda: delegation._play_batch(config, games, keys, params)  # noqa: E731
            start = time.perf_counter()
            jax.block_until_ready(run())
            first = time.perf_counter() - start
            size = delegation._play_batch._cache_size()
            wall, cpu, results[feedback] = timed(run, args.repeats)
            assert delegation._play_batch._cache_size() == size, "retraced on a second call"
            memory_games = 2**args.memory_log2
            shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct((memory_games,) + x.shape[1:], x.dtype), games)
            step = jax.ShapeDtypeStruct((memory_games,), jnp.float32)
            lowered = delegation._play_batch.lower(config, shapes, jax.random.split(key, memory_games),
                                                   GameParams(step_size=step))
            temp = lowered.compile().memory_analysis().temp_size_in_bytes / 2**20
            row[feedback] = {
                "game_rounds_per_s": q * t / wall,
                "wall_s": wall,
                "cpu_s": cpu,
                "us_per_game_round": wall / (q * t) * 1e6,
                "compile_s": max(first - wall, 0.0),
                "temp_mib": temp,
                "peak_rss_mib": peak_rss_mib(),
            }
        config = GameConfig(num_rounds=t, mode=args.mode, schedule=args.schedule)
        if m <= args.numpy_max_slots and not numpy_over:
            fit = max(1, int(args.numpy_mib * 2**20 // (6 * 4 * m * m)))
            sub = slice_games(base, min(q, fit))
            row["numpy"], numpy_result = _time_reference(
                lambda *a, **kw: reference.play_numpy(*a, dtype=np.float32, **kw), config, sub,
                GameParams.create(args.step_size), key, args.numpy_budget_s)
            numpy_over = row["numpy"]["wall_s"] > args.numpy_budget_s
            del numpy_result
        if m <= args.python_max_slots and not python_over:
            sub = slice_games(base, max(1, min(args.python_games, q, int(4096 // m))))
            row["python"], _ = _time_reference(reference.play_python, config, sub,
                                                GameParams.create(args.step_size), key, args.python_budget_s)
            python_over = row["python"]["wall_s"] > args.python_budget_s
        best = row.get("sorted", row.get("dense"))
        for name in ("dense", "numpy", "python"):
            if name in row:
                row[f"sorted_vs_{name}"] = row["sorted"]["game_rounds_per_s"] / row[name]["game_rounds_per_s"]
        if "dense" in results:
            row["max_abs_diff_average_policy"] = float(np.max(np.abs(
                np.asarray(results["dense"].average_policy) - np.asarray(results["sorted"].average_policy))))
        rows.append(row)
        parts = [f"{name} {row[name]['game_rounds_per_s']:,.0f}/s" for name in ("dense", "sorted", "numpy", "python")
                 if name in row]
        console.print(f"N={n} K={k} ({q} games): " + ", ".join(parts) + f", RSS {peak_rss_mib():.0f} MiB")
        del results, best

    def exponent(name, min_slots=1, field="us_per_game_round"):
        pts = [(r["NK"], r[name][field]) for r in rows if name in r and r["NK"] >= min_slots]
        x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
        return float(np.polyfit(x, y, 1)[0]) if len(pts) >= 2 else None

    fits = {f"{name}{'' if lo == 1 else f'_NK>={lo}'}": exponent(name, lo)
            for name in ("dense", "sorted", "numpy", "python") for lo in (1, 64)}
    memory_fits = {f"{name}_NK>=64": exponent(name, 64, "temp_mib") for name in ("dense", "sorted")}
    table = Table(title=f"ALIGN game engines, T={t}, {args.mode}: game-rounds/s (wall), one run")
    for col in ("N", "K", "NK", "games", "dense /s", "sorted /s", "numpy /s", "python /s", "sorted/dense",
                "sorted/numpy", "compile s d/s", f"temp MiB @2^{args.memory_log2} d/s"):
        table.add_column(col, justify="right")

    def cell(r, name, fmt="{:,.0f}", field="game_rounds_per_s"):
        return fmt.format(r[name][field]) if name in r else "-"

    for r in rows:
        table.add_row(
            str(r["N"]), str(r["K"]), str(r["NK"]), str(r["games"]),
            cell(r, "dense"), cell(r, "sorted"), cell(r, "numpy"), cell(r, "python"),
            f"{r['sorted_vs_dense']:.2f}x" if "sorted_vs_dense" in r else "-",
            f"{r['sorted_vs_numpy']:.1f}x" if "sorted_vs_numpy" in r else "-",
            f"{cell(r, 'dense', '{:.1f}', 'compile_s')}/{cell(r, 'sorted', '{:.1f}', 'compile_s')}",
            f"{cell(r, 'dense', '{:.0f}', 'temp_mib')}/{cell(r, 'sorted', '{:.0f}', 'temp_mib')}",
        )
    console.print(table)
    console.print(
        "fitted exponent b of cost per game-round ~ (N K)^b: "
        + ", ".join(f"{name} {b:.2f}" for name, b in fits.items() if b is not None)
    )
    console.print(
        f"fitted exponent of compiled temp memory (2^{args.memory_log2} games) ~ (N K)^b: "
        + ", ".join(f"{name} {b:.2f}" for name, b in memory_fits.items() if b is not None)
    )
    console.print(f"peak RSS of this process: {peak_rss_mib():.0f} MiB")
    return {"rows": rows, "exponents": fits, "memory_exponents": memory_fits, "peak_rss_mib": peak_rss_mib()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=3, help="N")
    parser.add_argument("--candidates", type=int, default=16, help="K")
    parser.add_argument("--rounds", type=int, default=20, help="T")
    parser.add_argument("--mode", choices=("expected", "sampled"), default="expected")
    parser.add_argument("--schedule", choices=("constant", "anytime"), default="constant")
    parser.add_argument("--step-size", type=float, default=0.5)
    parser.add_argument("--log2-min", type=int, default=10)
    parser.add_argument("--log2-max", type=int, default=20)
    parser.add_argument("--chunk-log2", type=int, default=14, help="engine chunk size (games per compiled call)")
    parser.add_argument("--numpy-max-log2", type=int, default=15)
    parser.add_argument("--numpy-budget-s", type=float, default=60.0, help="skip larger NumPy batches after a run this long")
    parser.add_argument("--python-games", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-games", type=int, default=1024, help="batch for the memory-vs-T analysis")
    parser.add_argument("--out", type=str, default=None, help="write the results as JSON here")
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="device memory bandwidth (GB/s): print the memory-traffic bound of each batch")
    parser.add_argument("--quick", action="store_true", help="2^8..2^10, 16 Python games, 1 repeat")
    parser.add_argument("--feedback", choices=("auto", "dense", "sorted"), default="auto",
                        help="GameConfig.feedback of the engine (dense = the [N,K,N,K] engine)")
    parser.add_argument("--scaling", "--compare-feedback", dest="scaling", action="store_true",
                        help="all implementations on N=3,K=16 and on the N x K grid, with growth exponents")
    parser.add_argument("--grid-agents", type=int, nargs="+", default=[2, 3, 8, 32, 128])
    parser.add_argument("--grid-candidates", type=int, nargs="+", default=[4, 16, 64, 256])
    parser.add_argument("--grid-budget", type=int, default=2**28, help="games per grid point ~ budget / (N K)^2")
    parser.add_argument("--dense-max-slots", type=int, default=2048, help="skip the dense engine above this N*K")
    parser.add_argument("--numpy-max-slots", type=int, default=2048, help="skip NumPy above this N*K")
    parser.add_argument("--numpy-mib", type=float, default=1024, help="NumPy games capped to about this memory")
    parser.add_argument("--python-max-slots", type=int, default=256, help="skip the Python loop above this N*K")
    parser.add_argument("--python-budget-s", type=float, default=60.0, help="stop the Python loop after a run this long")
    parser.add_argument("--memory-log2", type=int, default=12, help="games of the compiled-memory column (2^x)")
    args = parser.parse_args(argv)
    if args.quick:
        args.log2_min, args.log2_max, args.numpy_max_log2 = 8, 10, 10
        args.python_games, args.repeats, args.chunk_log2, args.memory_games = 16, 1, 10, 256
    if not (1 <= args.log2_min <= args.log2_max) or args.chunk_log2 < 1:
        parser.error("need 1 <= --log2-min <= --log2-max and --chunk-log2 >= 1")

    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    if args.scaling:
        console.print(f"jax {jax.__version__} | device {jax.devices()[0]} | load avg {os.getloadavg()}")
        result = {"scaling": scaling(args, console), "argv": sys.argv[1:] if argv is None else list(argv)}
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
        return result
    config = GameConfig(num_rounds=args.rounds, mode=args.mode, schedule=args.schedule, feedback=args.feedback)
    n, k, t = args.agents, args.candidates, args.rounds
    device = jax.devices()[0]
    env = {
        "jax": jax.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "device": f"{device.platform}:{device.device_kind}",
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_at_start": os.getloadavg(),
        "processor": platform.processor() or platform.machine(),
    }
    console.print(
        f"jax {env['jax']} | device {env['device']} | CPUs {env['cpu_count']} (affinity {env['cpu_affinity']}) | "
        f"load avg {tuple(round(x, 2) for x in env['load_average_at_start'])} | numpy {env['numpy']}"
    )
    console.print(
        f"game: N={n} K={k} T={t} mode={args.mode} schedule={args.schedule} eta={args.step_size} feedback={args.feedback}"
    )

    chunk_size = 2**args.chunk_log2
    largest_input = min(2**args.log2_max, chunk_size)
    base_games = synthetic_games(max(largest_input, 2**min(args.numpy_max_log2, args.log2_max), args.python_games), n, k, args.seed)
    key = jax.random.PRNGKey(args.seed)
    params = GameParams.create(args.step_size)

    # Plain Python loop, once, on its own few games.
    python_games = slice_games(base_games, args.python_games)
    if args.mode == "sampled":
        reference.engine_gumbel_noise(key, args.python_games, t, n, k)  # compile the draw noise outside the timing
    py_wall, py_cpu, py_result = timed(
        lambda: reference.play_python(config, python_games, params, key=key, validate=False), 1
    )
    py_rate = args.python_games * t / py_wall
    console.print(f"python loop: {args.python_games} games in {py_wall:.2f} s -> {py_rate:,.0f} game-rounds/s")

    rows = []
    numpy_skip = False
    compiled_chunks = set()
    for log2 in range(args.log2_min, args.log2_max + 1):
        batch = 2**log2
        q = min(batch, chunk_size)
        calls = batch // q
        games = jax.tree.map(jnp.asarray, slice_games(base_games, q))

        def run_engine():
            out = None
            for _ in range(calls):
                out = delegation.play(config, games, key, params, validate=False)
            return out

        first = time.perf_counter()
        jax.block_until_ready(delegation.play(config, games, key, params, validate=False))
        first = time.perf_counter() - first
        compiled_now = q not in compiled_chunks  # larger batches reuse the chunk's compiled function
        compiled_chunks.add(q)
        repeats = args.repeats if batch <= 2**16 else 1
        eng_wall, eng_cpu, eng_result = timed(run_engine, repeats)
        row = {
            "log2_games": log2,
            "games": batch,
            "engine_chunk": q,
            "engine_calls": calls,
            "engine_compile_s": max(first - eng_wall / calls, 0.0) if compiled_now else None,
            "engine_wall_s": eng_wall,
            "engine_cpu_s": eng_cpu,
            "engine_game_rounds_per_s": batch * t / eng_wall,
            "peak_rss_mib_after_engine": peak_rss_mib(),
        }
        # The memory-traffic bound: reading each game's inputs and writing its result once
        # (the round loop's carry is O(N K) per game and could stay on chip).
        io_bytes = (sum(np.asarray(x).nbytes for x in games) + sum(np.asarray(x).nbytes
                    for x in jax.tree.leaves(eng_result))) / q
        row["io_bytes_per_game"] = io_bytes
        if args.peak_gbps:
            bound = args.peak_gbps * 1e9 / io_bytes * t
            row["traffic_bound_game_rounds_per_s"] = bound
            row["share_of_traffic_bound"] = row["engine_game_rounds_per_s"] / bound
        if log2 <= args.numpy_max_log2 and not numpy_skip:
            numpy_games = slice_games(base_games, batch)
            if args.mode == "sampled":
                reference.engine_gumbel_noise(key, batch, t, n, k)
            np_wall, np_cpu, np_result = timed(
                lambda: reference.play_numpy(config, numpy_games, params, key=key, validate=False, dtype=np.float32),
                args.repeats if batch <= 2**12 else 1,
            )
            numpy_skip = np_wall > args.numpy_budget_s
            row.update(
                numpy_wall_s=np_wall,
                numpy_cpu_s=np_cpu,
                numpy_game_rounds_per_s=batch * t / np_wall,
                speedup_vs_numpy=np_wall / eng_wall,
                speedup_vs_numpy_cpu=np_cpu / eng_cpu,
                agreement_numpy=agreement(eng_result, np_result, batch) if calls == 1 else None,
                peak_rss_mib_after_numpy=peak_rss_mib(),
            )
            del np_result
        row["speedup_vs_python"] = row["engine_game_rounds_per_s"] / py_rate
        row["agreement_python"] = agreement(eng_result, py_result, min(q, args.python_games))
        rows.append(row)
        console.print(
            f"2^{log2}: engine {row['engine_game_rounds_per_s']:,.0f}/s"
            + (f", numpy {row['numpy_game_rounds_per_s']:,.0f}/s, x{row['speedup_vs_numpy']:.1f}" if "numpy_wall_s" in row else "")
            + f", x{row['speedup_vs_python']:.0f} vs python, peak RSS {row['peak_rss_mib_after_engine']:.0f} MiB"
            + (f", {row['io_bytes_per_game']:.0f} B/game in+out: bound {row['traffic_bound_game_rounds_per_s']:,.0f}/s "
               f"at {args.peak_gbps:g} GB/s ({100 * row['share_of_traffic_bound']:.2f}%)" if args.peak_gbps else "")
        )
        del eng_result

    # Memory against T (compiled temp bytes): constant without trajectories.
    mem_games = slice_games(base_games, min(args.memory_games, base_games.valid.shape[0]))
    memory = {}
    for rounds in (20, 200):
        for record in (False, True):
            cfg = dataclasses.replace(config, num_rounds=rounds, record_trajectory=record)
            memory[f"T={rounds},trajectory={record}"] = engine_memory_analysis(cfg, mem_games, key)

    table = Table(title=f"ALIGN game, N={n} K={k} T={t} {args.mode}: game-rounds per second (wall)")
    for col in ("games", "engine /s", "compile s", "numpy f32 /s", "x numpy", "x python", "x numpy (cpu time)", "peak RSS MiB"):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(
            f"2^{row['log2_games']}",
            f"{row['engine_game_rounds_per_s']:,.0f}",
            f"{row['engine_compile_s']:.2f}" if row["engine_compile_s"] is not None else "(cached)",
            f"{row['numpy_game_rounds_per_s']:,.0f}" if "numpy_wall_s" in row else "-",
            f"{row['speedup_vs_numpy']:.1f}x" if "numpy_wall_s" in row else "-",
            f"{row['speedup_vs_python']:,.0f}x",
            f"{row['speedup_vs_numpy_cpu']:.1f}x" if "numpy_wall_s" in row else "-",
            f"{row['peak_rss_mib_after_engine']:.0f}",
        )
    console.print(table)
    console.print(f"python loop ({args.python_games} games): {py_rate:,.0f} game-rounds/s")

    worst = {
        "numpy_average_policy": max((r["agreement_numpy"]["max_abs_diff_average_policy"] for r in rows if r.get("agreement_numpy")), default=None),
        "numpy_align_value": max((r["agreement_numpy"]["max_abs_diff_align_value"] for r in rows if r.get("agreement_numpy")), default=None),
        "numpy_differing_submissions": sum(r["agreement_numpy"]["differing_submissions"] for r in rows if r.get("agreement_numpy")),
        "python_average_policy": max(r["agreement_python"]["max_abs_diff_average_policy"] for r in rows),
        "python_align_value": max(r["agreement_python"]["max_abs_diff_align_value"] for r in rows),
        "python_differing_submissions": sum(r["agreement_python"]["differing_submissions"] for r in rows),
    }
    console.print(f"agreement (max |engine - reference| over shared games): {worst}")
    mem_table = Table(title=f"engine compiled memory, {mem_games.valid.shape[0]} games")
    for col in ("T", "trajectory", "temp MiB", "output MiB"):
        mem_table.add_column(col, justify="right")
    for name, m in memory.items():
        rounds, record = name.split(",")
        mem_table.add_row(rounds[2:], record.split("=")[1], f"{m['temp_bytes'] / 2**20:.2f}", f"{m['output_bytes'] / 2**20:.2f}")
    console.print(mem_table)
    console.print(f"peak RSS of this process: {peak_rss_mib():.0f} MiB")

    result = {
        "environment": env,
        "game": {"N": n, "K": k, "T": t, "mode": args.mode, "schedule": args.schedule, "step_size": args.step_size,
                 "feedback": args.feedback},
        "python": {"games": args.python_games, "wall_s": py_wall, "cpu_s": py_cpu, "game_rounds_per_s": py_rate},
        "rows": rows,
        "agreement": worst,
        "memory_vs_T": memory,
        "peak_rss_mib": peak_rss_mib(),
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        console.print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
