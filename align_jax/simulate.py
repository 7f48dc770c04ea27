"""Synthetic sweeps of the ALIGN delegation game: ``align-jax simulate config.yaml``.

A sweep is the cartesian product of the values listed under ``sweep:``.  Each
grid point plays ``scenarios_per_point`` synthetic games in chunks of
``chunk_size`` (one jit-compiled function per static configuration serves all
the points that share it: rho, noise, eta, ... are array arguments), reduces
them on the device to means and standard errors, and appends one JSON line to
``<output_dir>/<name>/seed<seed>/results.jsonl``.  Points already in that file
are skipped on a rerun (the shared runner, :mod:`align_jax.runner`), so a
crashed sweep resumes without losing or repeating work; a rerun with other
settings under the same name is refused.  At the end the run directory gets ``results.csv``,
``summary.md`` and the figures.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from align_jax import runner
from align_jax.config import ConfigError, FieldError, load_config
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

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise FieldError("name", f"must be a non-empty name without '/', got {self.name!r}")
        if self.scenarios_per_point < 1:
            raise FieldError("scenarios_per_point", f"must be >= 1, got {self.scenarios_per_point}")
        if self.chunk_size < 1:
            raise FieldError("chunk_size", f"must be >= 1, got {self.chunk_size}")
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
        regret=jnp.mean(result.regret, axis=-1),
        regret_bound=jnp.mean(bound, axis=-1),
        regret_over_bound=jnp.max(ratio, axis=-1),
        bound_violation=jnp.any(result.regret > bound + 1e-4 * (1 + bound), axis=-1).astype(jnp.float32),
        pareto_compliance=result.pareto_compliance,
        pareto_mass=result.pareto_mass,
        rounds_played=result.rounds_played.astype(jnp.float32),
        realized_rho=corr,
    )
    return stats


def _chunk_impl(spec, game_config, chunk, scenario_params, game_params, key, count):
    """Plays ``chunk`` games, reduces to sums over the first ``count`` of them."""
    k_scen, k_game = jax.random.split(key)
    scen_keys = jax.random.split(k_scen, chunk)
    candidates = jax.vmap(sample, in_axes=(None, None, 0))(spec, scenario_params, scen_keys)
    corr = jax.vmap(utility_correlation)(candidates)
    game_keys = jax.random.split(k_game, chunk)
    params = GameParams(step_size=jnp.broadcast_to(game_params.step_size, (chunk,)))
    result = play_batch(game_config, candidates, game_keys, params)
    mask = (jnp.arange(chunk) < count).astype(jnp.float32)
    stats = _per_game_stats(result, corr)
    sums = {k: jnp.sum(mask * v) for k, v in stats.items()}
    squares = {k: jnp.sum(mask * v**2) for k, v in stats.items()}
    traj = None
    if result.trajectory is not None:
        t = result.trajectory
        traj = {
            "regret": jnp.einsum("q,qtn->t", mask, t.regret) / spec.num_agents,
            "regret_max": jnp.einsum("q,qt->t", mask, jnp.max(t.regret, axis=-1)),
            "regret_bound": jnp.einsum("q,qtn->t", mask, t.regret_bound) / spec.num_agents,
            "nash_gap": jnp.einsum("q,qt->t", mask, t.nash_gap),
        }
    return sums, squares, traj


_chunk = jax.jit(_chunk_impl, static_argnums=(0, 1, 2))


def run_point(config: SimulateConfig, point: dict) -> dict:
    """Plays all the games of one grid point; returns its result row."""
    game, scenario = _sections(config, point)
    spec = scenario.spec()
    scen_params = scenario.params()
    game_config = game.game_config(config.trajectory)
    game_params = GameParams.create(game.step_size)
    chunk = min(config.chunk_size, config.scenarios_per_point)
    point_id = _point_id(config, point)
    base_key = jax.random.fold_in(jax.random.key(config.seed), int(point_id[:7], 16))
    total = config.scenarios_per_point
    sums: dict[str, float] = {k: 0.0 for k in _STAT_NAMES}
    squares: dict[str, float] = {k: 0.0 for k in _STAT_NAMES}
    traj_sum: Optional[dict[str, np.ndarray]] = None
    compile_s = 0.0
    start = time.perf_counter()
    for index in range(math.ceil(total / chunk)):
        count = min(chunk, total - index * chunk)
        t0 = time.perf_counter()
        s, q, traj = _chunk(spec, game_config, chunk, scen_params, game_params, jax.random.fold_in(base_key, index), count)
        s, q, traj = jax.device_get((s, q, traj))
        if index == 0:
            compile_s = time.perf_counter() - t0
        for k in _STAT_NAMES:
            sums[k] += float(s[k])
            squares[k] += float(q[k])
        if traj is not None:
            traj = {k: np.asarray(v, np.float64) for k, v in traj.items()}
            traj_sum = traj if traj_sum is None else {k: traj_sum[k] + traj[k] for k in traj}
    row: dict[str, Any] = {"point_id": point_id, "n": total, **point}
    for k in _STAT_NAMES:
        mean = sums[k] / total
        var = max(squares[k] / total - mean**2, 0.0)
        row[k] = mean
        row[f"{k}_se"] = math.sqrt(var / max(total - 1, 1))
    if traj_sum is not None:
        row["trajectory"] = {k: (v / total).tolist() for k, v in traj_sum.items()}
    row["wall_s"] = time.perf_counter() - start
    row["first_chunk_s"] = compile_s
    row["rho_requested"] = scenario.rho
    return row


def run_dir(config: SimulateConfig) -> Path:
    """``output_dir/name/seed<seed>``."""
    return runner.run_dir(config.output_dir, config.name, config.seed)


SETTINGS_EXCLUDE = ("name", "output_dir", "sweep", "x_axis")
"""Settings that do not change a grid point's row (the sweep only selects which points run)."""


def run_simulation(config: SimulateConfig, *, progress: bool = True, figures: bool = True):
    """Runs (or resumes) a sweep on the shared runner; returns the results as a pandas DataFrame."""
    import pandas as pd

    files = runner.RunFiles(run_dir(config), key_field="point_id",
                            settings=runner.settings_hash(config, exclude=SETTINGS_EXCLUDE), config=config)
    points = sweep_points(config)
    ids = [_point_id(config, p) for p in points]
    units = [runner.Unit((i,), _label(p), p) for p, i in zip(points, ids)]
    runner.run_units(files, units, lambda unit: [run_point(config, unit.payload)],
                     description=f"{config.name}: grid points", progress=progress)
    rows = files.rows(ids)
    flat = [{k: v for k, v in r.items() if k not in ("trajectory", runner.HASH_FIELD)} for r in rows]
    runner.write_csv(files.path("results.csv"), flat)
    frame = pd.DataFrame(flat)
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


__all__ += ["run_dir", "run_point", "summary_markdown", "print_summary", "ConfigError"]
