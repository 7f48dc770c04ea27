"""align_jax: a JAX framework for game-theoretic multi-agent LLM reasoning.

The public API is re-exported here (as optax and mctx do):

* the ALIGN delegation game: :func:`play`, :class:`CandidateSet`,
  :class:`GameConfig`, :class:`GameParams`, :class:`GameResult`;
* synthetic scenarios: :class:`ScenarioSpec`, :class:`ScenarioParams`,
  :func:`sample`, :func:`sample_batch`;
* diagnostics: :func:`nash_gap`, :func:`deviation_gain`, :func:`pareto_mask`,
  :func:`baselines`, :func:`regret_bound`;
* sweeps: :func:`run_simulation` (``align-jax simulate``);
* plug-in points: :class:`Learner` / :data:`LEARNERS` (the agents' online learner),
  :class:`Registry`, and the shared runner module :mod:`align_jax.runner`
  (principals, candidate generators, reason methods and CAGE objectives have their
  registries in :mod:`align_jax.methods`).
"""

from align_jax.game import (
    Baselines,
    CandidateSet,
    GameConfig,
    GameInputError,
    GameParams,
    GameResult,
    LEARNERS,
    Learner,
    Outcome,
    ScenarioParams,
    ScenarioSpec,
    Trajectory,
    baselines,
    deviation_gain,
    hedge_policy,
    make_candidates,
    nash_gap,
    pareto_mask,
    play,
    play_batch,
    play_game,
    ranking_feedback,
    regret_bound,
    sample,
    sample_batch,
    utility_correlation,
    validate_candidates,
)
from align_jax.config import ConfigError, load_config
from align_jax.registry import Registry
from align_jax.simulate import SimulateConfig, load_simulate_config, run_simulation

__version__ = "0.1.0"

__all__ = [
    "Baselines",
    "CandidateSet",
    "GameConfig",
    "GameInputError",
    "GameParams",
    "GameResult",
    "LEARNERS",
    "Learner",
    "Outcome",
    "ScenarioParams",
    "ScenarioSpec",
    "Trajectory",
    "baselines",
    "deviation_gain",
    "hedge_policy",
    "make_candidates",
    "nash_gap",
    "pareto_mask",
    "play",
    "play_batch",
    "play_game",
    "ranking_feedback",
    "regret_bound",
    "sample",
    "sample_batch",
    "utility_correlation",
    "validate_candidates",
    "ConfigError",
    "load_config",
    "Registry",
    "SimulateConfig",
    "load_simulate_config",
    "run_simulation",
]
