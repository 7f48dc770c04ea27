"""Synthetic sweeps of the ALIGN delegation game: ``align-jax simulate config.yaml``.

A sweep is the cartesian product of the values listed under ``sweep:``.  Each
grid point plays ``scenarios_per_point`` synthetic games in chunks of
``chunk_size``.  Points that share a static shape (N, K, T, mode, schedule,
learner, ...) are played by one compiled program: their swept numbers (rho,
noises, dominance, step size) and keys are array leaves ``[P]``, ``lax.map``-ed
over points and chunks inside one ``jit`` (one compile per static shape, none
per point).  Each chunk's games are sharded over the devices of a one-axis mesh
(``devices:``; all local devices by default, every process's in a multi-process
run, see :mod:`align_jax.distributed`), reduced on the devices to per-block sums
of a fixed number of games, and summed exactly (``math.fsum``) on the host, so a
row is the same on any number of devices or processes.

Each point appends one JSON line to ``<output_dir>/<name>/seed<seed>/results.jsonl``.
Points already in that file are skipped on a rerun (the shared runner,
:mod:`align_jax.runner`), so a crashed sweep resumes without losing or
repeating work; a rerun with other settings under the same name is refused.
At the end the run directory gets ``results.csv``, ``summary.md`` and the figures.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from align_jax import runner
from align_jax.config import ConfigError, FieldError, load_config
from align_jax.distributed import GAMES_AXIS, game_mesh, is_writer, sync
from align_jax.game.delegation import play_batch
from align_jax.game.scenarios import ScenarioParams, ScenarioSpec, sample, utility_correlation
from align_jax.game.types import GameInputError, GameParams
from align_jax.sections import GameSection

__all__ = [
    "GameSection",
    "ScenarioSection",
    "SimulateConfig",
    "load_simulate_config",
    "sweep_points",
    "run_simulation",
    "METHODS",
]

METHODS = ("align", "fair_single", "uniform_principal", "oracle", "random")
_GAME_STATIC = ("num_rounds", "mode", "schedule", "early_stop_tol", "learner")
_SCENARIO_STATIC = ("num_agents", "num_candidates", "pool_size", "min_candidates", "has_correct")
_SCENARIO_ARRAYS = ScenarioParams._fields
SWEEPABLE = _GAME_STATIC + ("step_size",) + _SCENARIO_STATIC + _SCENARIO_ARRAYS


@dataclasses.dataclass(frozen=True)
class ScenarioSection:
    """The ``scenario:`` section: see :mod:`align_jax.game.scenarios`."""

    num_agents: int = 3
    num_candidates: int = 16
    pool_size: int = 32
    min_candidates: int = 1
    has_correct: bool = True
    rho: float = 0.5
    principal_noise: float = 0.0
    agent_noise: float = 0.0
    overlap: float = 1.0
    dominance: float = 0.0
    sharpness: float = 2.0
    correct_advantage: float = 1.0

    def __post_init__(self):
        self.spec()
        self.params()

    def spec(self) -> ScenarioSpec:
        return ScenarioSpec(**{k: getattr(self, k) for k in _SCENARIO_STATIC})

    def params(self) -> ScenarioParams:
        return ScenarioParams.create(**{k: getattr(self, k) for k in _SCENARIO_ARRAYS})


@dataclasses.dataclass(frozen=True)
class SimulateConfig:
    """A synthetic sweep (one YAML file in ``configs/``).

    Attributes:
      name: run name (the run directory is ``output_dir/name/seed<seed>``).
      seed: base PRNG seed.
      scenarios_per_point: games played at every grid point.
      chunk_size: games per jit call (bounds memory).
      game: :class:`GameSection`.
      scenario: :class:`ScenarioSection`.
      sweep: ``{key: [values]}``; keys from the game and scenario sections.
      trajectory: record per-round regret, bound and Nash gap (for the
        regret-vs-T and Nash-gap-vs-T figures).
      output_dir: where run directories go.
      x_axis: the sweep key on the x axis of the utility figure.
      devices: how many devices shard each chunk's games (``null``: all of
        them, every process's in a multi-process run); results do not depend
        on it.
      points_per_call: grid points of one static shape played by one call of
        the compiled sweep program (a crash loses at most one call's points).
    """

    name: str
    seed: int = 0
    scenarios_per_point: int = 10000
    chunk_size: int = 16384
    game: GameSection = dataclasses.field(default_factory=GameSection)
    scenario: ScenarioSection = dataclasses.field(default_factory=ScenarioSection)
    sweep: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
    trajectory: bool = False
    output_dir: str = "runs"
    x_axis: str = "rho"
    devices: Optional[int] = None
    points_per_call: int = 16

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise FieldError("name", f"must be a non-empty name without '/', got {self.name!r}")
        if self.scenarios_per_point < 1:
            raise FieldError("scenarios_per_point", f"must be >= 1, got {self.scenarios_per_point}")
        if self.chunk_size < 1:
            raise FieldError("chunk_size", f"must be >= 1, got {self.chunk_size}")
        if self.points_per_call < 1:
            raise FieldError("points_per_call", f"must be >= 1, got {self.points_per_call}")
        if self.devices is not None and (isinstance(self.devices, bool) or not isinstance(self.devices, int)
                                         or self.devices < 1):
            raise FieldError("devices", f"must be a positive integer or null (all devices), got {self.devices!r}")
        for key, values in self.sweep.items():
            if key not in SWEEPABLE:
                raise FieldError(f"sweep.{key}", f"cannot be swept (sweepable: {', '.join(SWEEPABLE)})")
            if not isinstance(values, list) or not values:
                raise FieldError(f"sweep.{key}", "must be a non-empty list of values")
            for i, value in enumerate(values):
                try:
                    _sections(self, {key: value})
                except (GameInputError, FieldError, ValueError, TypeError) as exc:
                    raise FieldError(f"sweep.{key}.{i}", str(exc)) from None
        if self.x_axis not in SWEEPABLE:
            raise FieldError("x_axis", f"must be a sweepable key, got {self.x_axis!r}")


def load_simulate_config(path) -> SimulateConfig:
    """Loads and validates a sweep config (errors name file, line and key)."""
    return load_config(path, SimulateConfig)


def _sections(config: SimulateConfig, point: dict) -> tuple[GameSection, ScenarioSection]:
    game_kw = {k: v for k, v in point.items() if k in GameSection.__dataclass_fields__}
    scen_kw = {k: v for k, v in point.items() if k in ScenarioSection.__dataclass_fields__}
    for key in ("num_rounds", "num_agents", "num_candidates", "pool_size", "min_candidates"):
        for kw in (game_kw, scen_kw):
            if key in kw and isinstance(kw[key], float) and float(kw[key]).is_integer():
                kw[key] = int(kw[key])
    return (
        dataclasses.replace(config.game, **game_kw),
        dataclasses.replace(config.scenario, **scen_kw),
    )


def sweep_points(config: SimulateConfig) -> list[dict]:
    """The grid: one dict of swept values per point (cartesian product, in order)."""
    keys = list(config.sweep)
    return [dict(zip(keys, values)) for values in itertools.product(*(config.sweep[k] for k in keys))]


def _point_id(config: SimulateConfig, point: dict) -> str:
    """The grid point's id; it also seeds the point's games (``fold_in(key(seed), id)``), so it
    must not move when a section gains a field: fields marked :data:`runner.ADDED_FIELD` are left
    out at their default."""
    game, scenario = _sections(config, point)
    blob = json.dumps(
        {
            "game": runner.stable_asdict(game),
            "scenario": runner.stable_asdict(scenario),
            "n": config.scenarios_per_point,
            "seed": config.seed,
            "trajectory": config.trajectory,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_STAT_NAMES = (
    *(f"{m}_value" for m in METHODS),
    *(f"{m}_correct" for m in METHODS),
    "adv_fair",
    "adv_uniform",
    "gap_oracle",
    "win_fair",
    "loss_fair",
    "nash_gap",
    "regret",
    "regret_bound",
    "regret_over_bound",
    "bound_violation",
    "pareto_compliance",
    "pareto_mass",
    "rounds_played",
    "realized_rho",
)


def _agent_mean(x: jax.Array) -> jax.Array:
    """Mean over the last (agent) axis as a fixed chain of adds: XLA may vectorize a
    ``jnp.mean`` differently for different batch sizes, and a row must not depend on
    how many games one device holds."""
    return functools.reduce(jnp.add, [x[..., i] for i in range(x.shape[-1])]) / x.shape[-1]


def _per_game_stats(result, corr) -> dict:
    outcomes = {
        "align": result.align,
        "fair_single": result.baselines.fair_single,
        "uniform_principal": result.baselines.uniform_principal,
        "oracle": result.baselines.oracle,
        "random": result.baselines.random,
    }
    stats = {}
    for name, outcome in outcomes.items():
        stats[f"{name}_value"] = outcome.principal_value
        stats[f"{name}_correct"] = outcome.correct
    align, fair = result.align.principal_value, result.baselines.fair_single.principal_value
    bound = result.regret_bound
    ratio = jnp.where(bound > 0, result.regret / jnp.where(bound > 0, bound, 1.0), 0.0)
    stats.update(
        adv_fair=align - fair,
        adv_uniform=align - result.baselines.uniform_principal.principal_value,
        gap_oracle=result.baselines.oracle.principal_value - align,
        win_fair=(align > fair + 1e-6).astype(jnp.float32),
        loss_fair=(align < fair - 1e-6).astype(jnp.float32),
        nash_gap=result.nash_gap,
        regret=_agent_mean(result.regret),
        regret_bound=_agent_mean(bound),
        regret_over_bound=jnp.max(ratio, axis=-1),
        bound_violation=jnp.any(result.regret > bound + 1e-4 * (1 + bound), axis=-1).astype(jnp.float32),
        pareto_compliance=result.pareto_compliance,
        pareto_mass=result.pareto_mass,
        rounds_played=result.rounds_played.astype(jnp.float32),
        realized_rho=corr,
    )
    return stats


# Games per partial sum of a chunk's statistics: set by the chunk size alone, never
# by the device count, so every block sums the same games on any mesh.
REDUCE_BLOCK_MAX = 256


def reduce_block(chunk: int) -> int:
    """Games per partial sum: a power of two in ``[8, 256]``, about ``chunk / 64``."""
    target = max(1, -(-chunk // 64))
    return int(min(REDUCE_BLOCK_MAX, max(8, 1 << (target - 1).bit_length())))


def padded_chunk(chunk: int, devices: int) -> int:
    """The chunk rounded up to whole blocks on every device (the extra games are masked out).

    Game ``g`` of a chunk has key ``split(k, padded)[g] == split(k, chunk)[g]`` (the
    default partitionable threefry), so padding does not move any game.
    """
    unit = devices * reduce_block(chunk)
    return -(-chunk // unit) * unit


class _Program(NamedTuple):
    """The static structure of one compiled sweep program (hashable: a ``jit`` static argument)."""

    spec: ScenarioSpec
    game_config: Any
    chunk: int  # games per chunk with their own keys (config.chunk_size, capped at n)
    padded: int  # chunk rounded up to whole blocks on every device
    block: int  # games per partial sum
    num_chunks: int
    mesh: Mesh


def _local_sums(program: _Program, scen_keys, game_keys, mask, scen_params, step):
    """One device's games ``[L]`` -> masked per-block sums and sums of squares ``[L / G, S]``
    (and per-round trajectory sums ``[L / G, T]``), gathered over the mesh."""
    local = mask.shape[0]
    candidates = jax.vmap(sample, in_axes=(None, None, 0))(program.spec, scen_params, scen_keys)
    corr = jax.vmap(utility_correlation)(candidates)
    params = GameParams(step_size=jnp.broadcast_to(step, (local,)))
    result = play_batch(program.game_config, candidates, game_keys, params)
    stats = _per_game_stats(result, corr)
    values = jnp.stack([stats[k].astype(jnp.float32) for k in _STAT_NAMES], axis=-1)  # [L, S]
    blocks = local // program.block
    weight = mask.reshape(blocks, program.block, 1)
    values = values.reshape(blocks, program.block, -1)
    out = {"sums": jnp.sum(weight * values, axis=1), "squares": jnp.sum(weight * values**2, axis=1)}
    if result.trajectory is not None:
        t = result.trajectory
        per_round = {
            "regret": _agent_mean(t.regret),
            "regret_max": jnp.max(t.regret, axis=-1),
            "regret_bound": _agent_mean(t.regret_bound),
            "nash_gap": t.nash_gap,
        }
        for name, value in per_round.items():  # [L, T]
            out[f"traj_{name}"] = jnp.sum(weight * value.reshape(blocks, program.block, -1), axis=1)
    return jax.tree.map(lambda x: jax.lax.all_gather(x, GAMES_AXIS, tiled=True), out)


def _program_impl(program: _Program, scen_params, steps, point_keys, counts):
    """Every chunk of every grid point of a group, in one compiled program.

    Args:
      scen_params: :class:`ScenarioParams` with leaves ``[P]`` (the points' swept numbers).
      steps: float32 ``[P]`` the points' step sizes.
      point_keys: uint32 ``[P, 2]`` the points' base keys (raw threefry data).
      counts: int32 ``[C]`` real games in each chunk.

    Returns:
      ``{"sums", "squares": [P, C, B, S], "traj_*": [P, C, B, T]}`` with B = blocks per chunk.
    """
    spec = P(GAMES_AXIS)
    sharded = jax.shard_map(functools.partial(_local_sums, program), mesh=program.mesh,
                            in_specs=(spec, spec, spec, P(), P()), out_specs=P(), check_vma=False)

    def one_point(args):
        scen, step, raw_key = args
        base_key = jax.random.wrap_key_data(raw_key)

        def one_chunk(index):
            k_scen, k_game = jax.random.split(jax.random.fold_in(base_key, index))
            scen_keys = jax.random.split(k_scen, program.padded)
            game_keys = jax.random.split(k_game, program.padded)
            mask = (jnp.arange(program.padded) < counts[index]).astype(jnp.float32)
            return sharded(scen_keys, game_keys, mask, scen, step)

        return jax.lax.map(one_chunk, jnp.arange(program.num_chunks))

    return jax.lax.map(one_point, (scen_params, steps, point_keys))


_program = jax.jit(_program_impl, static_argnums=0)
_compiled: dict = {}


def _fsum(values: np.ndarray, axes) -> np.ndarray:
    """Exactly rounded sums over ``axes`` (independent of order and of zero padding)."""
    moved = np.moveaxis(np.asarray(values, np.float64), axes, range(-len(axes), 0))
    flat = moved.reshape(moved.shape[: moved.ndim - len(axes)] + (-1,))
    return np.apply_along_axis(math.fsum, -1, flat)


def run_points(config: SimulateConfig, points: list[dict], mesh: Optional[Mesh] = None) -> list[dict]:
    """Plays all the games of grid points that share one static shape, as one compiled program.

    The points' swept numbers (``rho``, noises, ``step_size``, ...) and keys are
    array leaves ``[P]`` of one ``jit`` (``lax.map`` over points and chunks), so a
    sweep compiles once per static shape, not per point.  The games of each chunk
    are sharded over ``mesh`` (default: :func:`align_jax.distributed.game_mesh`
    of ``config.devices``).  Returns one result row per point, in order.
    """
    mesh = mesh if mesh is not None else game_mesh(config.devices)
    sections = [_sections(config, p) for p in points]
    game, scenario = sections[0]
    spec, game_config = scenario.spec(), game.game_config(config.trajectory)
    for g, s in sections[1:]:
        if s.spec() != spec or g.game_config(config.trajectory) != game_config:
            raise ValueError("run_points needs points that share their static shape")
    total = config.scenarios_per_point
    chunk = min(config.chunk_size, total)
    devices = mesh.devices.size
    program = _Program(spec, game_config, chunk, padded_chunk(chunk, devices), reduce_block(chunk),
                       math.ceil(total / chunk), mesh)
    ids = [_point_id(config, p) for p in points]
    replicated = NamedSharding(mesh, P())
    args = jax.device_put((
        jax.tree.map(lambda *x: np.stack(x), *[s.params() for _, s in sections]),
        np.asarray([GameParams.create(g.step_size).step_size for g, _ in sections], np.float32),
        np.stack([np.asarray(jax.random.key_data(_base_key(config, i))) for i in ids]),
        np.asarray([min(chunk, total - c * chunk) for c in range(program.num_chunks)], np.int32),
    ), replicated)
    start = time.perf_counter()
    signature = (program, jax.tree.map(lambda x: (x.shape, x.dtype), args))
    compile_s = 0.0
    if signature not in _compiled:
        _compiled[signature] = _program.lower(program, *args).compile()
        compile_s = time.perf_counter() - start
    out = _compiled[signature](*args)
    out = {k: np.asarray(v.addressable_shards[0].data) for k, v in out.items()}  # replicated
    wall = time.perf_counter() - start
    needed = -(-chunk // program.block)  # blocks holding real games; the rest are padding
    out = {k: v[:, :, :needed] for k, v in out.items()}
    sums, squares = _fsum(out["sums"], (1, 2)), _fsum(out["squares"], (1, 2))  # [P, S]
    rows = []
    for p, (point, point_id) in enumerate(zip(points, ids)):
        row: dict[str, Any] = {"point_id": point_id, "n": total, **point}
        for s, k in enumerate(_STAT_NAMES):
            mean = sums[p, s] / total
            var = max(squares[p, s] / total - mean**2, 0.0)
            row[k] = float(mean)
            row[f"{k}_se"] = math.sqrt(var / max(total - 1, 1))
        if config.trajectory:
            row["trajectory"] = {
                name: (_fsum(out[f"traj_{name}"][p], (0, 1)) / total).tolist()
                for name in ("regret", "regret_max", "regret_bound", "nash_gap")
            }
        row["wall_s"] = wall / len(points)
        row["compile_s"] = compile_s
        row["devices"] = devices
        row["rho_requested"] = sections[p][1].rho
        rows.append(row)
    return rows


def run_point(config: SimulateConfig, point: dict) -> dict:
    """Plays all the games of one grid point; returns its result row (:func:`run_points`)."""
    return run_points(config, [point])[0]


def _base_key(config: SimulateConfig, point_id: str) -> jax.Array:
    """The point's key: ``fold_in(key(seed), id)``; chunk ``c`` plays with ``fold_in(base, c)``."""
    return jax.random.fold_in(jax.random.key(config.seed), int(point_id[:7], 16))


def _static_signature(config: SimulateConfig, point: dict):
    game, scenario = _sections(config, point)
    return scenario.spec(), game.game_config(config.trajectory)


def run_dir(config: SimulateConfig) -> Path:
    """``output_dir/name/seed<seed>``."""
    return runner.run_dir(config.output_dir, config.name, config.seed)


SETTINGS_EXCLUDE = ("name", "output_dir", "sweep", "x_axis", "devices", "points_per_call")
"""Settings that do not change a grid point's row (the sweep only selects which points run; the
devices and the grouping of points into programs change only how fast)."""


def run_simulation(config: SimulateConfig, *, progress: bool = True, figures: bool = True):
    """Runs (or resumes) a sweep on the shared runner; returns the results as a pandas DataFrame.

    The missing grid points are grouped by static shape (N, K, T, mode, ...) into
    units of at most ``points_per_call`` points, each played by one compiled
    program sharded over the mesh.  In a multi-process run (see
    :mod:`align_jax.distributed`) every process plays its share of every unit and
    process 0 alone writes the run directory.
    """
    import pandas as pd

    writer = is_writer()
    files = runner.RunFiles(run_dir(config), key_field="point_id",
                            settings=runner.settings_hash(config, exclude=SETTINGS_EXCLUDE),
                            config=config if writer else None, writer=writer)
    sync("align_jax.simulate: results read")
    mesh = game_mesh(config.devices)
    points = sweep_points(config)
    ids = [_point_id(config, p) for p in points]
    groups: dict = {}
    for point, point_id in zip(points, ids):
        if files.missing([point_id]):
            groups.setdefault(_static_signature(config, point), []).append((point, point_id))
    units = []
    for members in groups.values():
        for i in range(0, len(members), config.points_per_call):
            part = members[i:i + config.points_per_call]
            label = _label(part[0][0]) + (f" (+{len(part) - 1} points)" if len(part) > 1 else "")
            units.append(runner.Unit(tuple(pid for _, pid in part), label, [p for p, _ in part]))
    runner.run_units(files, units, lambda unit: run_points(config, unit.payload, mesh),
                     description=f"{config.name}: grid points", progress=progress and writer)
    rows = files.rows(ids)
    flat = [{k: v for k, v in r.items() if k not in ("trajectory", runner.HASH_FIELD)} for r in rows]
    frame = pd.DataFrame(flat)
    if writer:
        runner.write_csv(files.path("results.csv"), flat)
        files.write_text("summary.md", summary_markdown(config, frame))
        if figures:
            from align_jax import plots

            plots.simulation_figures(config, rows, files.directory)
    return frame


def _label(point: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items()) or "default"


def summary_markdown(config: SimulateConfig, frame) -> str:
    """A markdown table of the headline numbers of every grid point."""
    keys = list(config.sweep)
    cols = [
        ("ALIGN", "align_value"),
        ("fair single", "fair_single_value"),
        ("uniform+principal", "uniform_principal_value"),
        ("oracle", "oracle_value"),
        ("ALIGN-fair", "adv_fair"),
        ("ALIGN-uniform", "adv_uniform"),
        ("acc ALIGN", "align_correct"),
        ("acc fair", "fair_single_correct"),
        ("Nash gap", "nash_gap"),
        ("regret/bound", "regret_over_bound"),
        ("realized rho", "realized_rho"),
    ]
    head = keys + [c for c, _ in cols]
    lines = [
        f"# {config.name} (seed {config.seed}, {config.scenarios_per_point} games per point)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for _, row in frame.iterrows():
        cells = [str(row[k]) for k in keys]
        for _, col in cols:
            se = row.get(f"{col}_se")
            if col.startswith(("adv", "gap")) and se is not None:
                cells.append(f"{row[col]:+.4f} ± {1.96 * se:.4f}")
            else:
                cells.append(f"{row[col]:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Values are means of the principal's true utility (± 95% normal interval for differences).")
    return "\n".join(lines) + "\n"


def print_summary(config: SimulateConfig, frame) -> None:
    """Prints the headline table with rich."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{config.name}: {config.scenarios_per_point} games per point")
    keys = list(config.sweep)
    for key in keys:
        table.add_column(key)
    for col in ("ALIGN", "fair single", "unif+princ", "oracle", "ALIGN-fair (95%)", "Nash gap", "regret/bound"):
        table.add_column(col, justify="right")
    for _, row in frame.iterrows():
        table.add_row(
            *[str(row[k]) for k in keys],
            f"{row['align_value']:.3f}",
            f"{row['fair_single_value']:.3f}",
            f"{row['uniform_principal_value']:.3f}",
            f"{row['oracle_value']:.3f}",
            f"{row['adv_fair']:+.3f} ± {1.96 * row['adv_fair_se']:.3f}",
            f"{row['nash_gap']:.4f}",
            f"{row['regret_over_bound']:.3f}",
        )
    Console().print(table)


__all__ += ["run_dir", "run_point", "run_points", "reduce_block", "padded_chunk", "summary_markdown", "print_summary", "ConfigError"]
