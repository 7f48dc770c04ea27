"""Pure-JAX game engine: the ALIGN delegation game, its diagnostics, synthetic scenarios.

Entry points (shapes: Q games, N agents, K slots):

* :func:`play` ``(config, candidates [Q, N, K] | [N, K], key, params) -> GameResult``;
* :func:`play_batch` ``(config, candidates [Q, N, K], keys [Q], params) -> GameResult``,
  validated and callable inside ``jit``;
* :func:`play_game`, one unbatched game (pure, no checks).

Learners (the agents' online learning rule) plug in through
:class:`Learner` and the :data:`LEARNERS` registry (``GameConfig.learner``):
``"hedge"`` (:func:`hedge_learner`) and ``"regret_matching_plus"``
(:func:`regret_matching_plus`); each passes
:func:`conformance.learner_api_test`.
"""

from align_jax.game import common_agency, conformance
from align_jax.game.common_agency import (
    EquilibriumResult,
    SolverConfig,
    check_top_m,
    linear_mixing_logits,
    reward_guided_choice,
    reward_guided_logits,
    solve_equilibria,
    solve_equilibrium,
    solve_limited_liability,
    welfare,
    welfare_maximizer,
)
from align_jax.game.delegation import play, play_batch, play_game, round_rewards, tolerant_argmax
from align_jax.game.diagnostics import (
    baselines,
    deviation_gain,
    fair_single_agent,
    nash_gap,
    oracle,
    pareto_mask,
    pooled_utility,
    principal_pick,
    random_candidate,
    slot_payoff,
    uniform_principal,
)
from align_jax.game.hedge import (
    HedgeState,
    hedge_init,
    hedge_learner,
    hedge_policy,
    hedge_update,
    masked_log_softmax,
    regret_bound,
    step_size,
)
from align_jax.game.learner import LEARNERS, Learner, LearnerFactory, make_learner
from align_jax.game.regret_matching import RegretMatchingState, regret_matching_plus
from align_jax.game.ranking import outrank_weights, ranking_feedback, submission_feedback
from align_jax.game.scenarios import ScenarioParams, ScenarioSpec, sample, sample_batch, utility_correlation
from align_jax.game.types import (
    Baselines,
    CandidateSet,
    GameConfig,
    GameInputError,
    GameParams,
    GameResult,
    Outcome,
    Trajectory,
    make_candidates,
    validate_candidates,
)

__all__ = [
    "common_agency",
    "conformance",
    "EquilibriumResult",
    "SolverConfig",
    "check_top_m",
    "linear_mixing_logits",
    "reward_guided_choice",
    "reward_guided_logits",
    "solve_equilibria",
    "solve_equilibrium",
    "solve_limited_liability",
    "welfare",
    "welfare_maximizer",
    "tolerant_argmax",
    "submission_feedback",
    "play",
    "play_batch",
    "play_game",
    "round_rewards",
    "baselines",
    "deviation_gain",
    "fair_single_agent",
    "nash_gap",
    "oracle",
    "pareto_mask",
    "pooled_utility",
    "principal_pick",
    "random_candidate",
    "slot_payoff",
    "uniform_principal",
    "HedgeState",
    "hedge_init",
    "hedge_learner",
    "hedge_policy",
    "hedge_update",
    "masked_log_softmax",
    "regret_bound",
    "step_size",
    "LEARNERS",
    "Learner",
    "LearnerFactory",
    "make_learner",
    "RegretMatchingState",
    "regret_matching_plus",
    "outrank_weights",
    "ranking_feedback",
    "ScenarioParams",
    "ScenarioSpec",
    "sample",
    "sample_batch",
    "utility_correlation",
    "Baselines",
    "CandidateSet",
    "GameConfig",
    "GameInputError",
    "GameParams",
    "GameResult",
    "Outcome",
    "Trajectory",
    "make_candidates",
    "validate_candidates",
]
