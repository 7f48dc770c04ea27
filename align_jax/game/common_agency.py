r"""CAGE: the common-agency game over candidate tokens and its EPEC solver.

One decoding position is a game between one agent (the LLM) and ``J``
principals (alignment objectives) over ``M`` candidate tokens (the base
model's top-M).  Shapes: ``J`` principals, ``M`` candidate tokens, ``P``
positions in a batch.

This module is the public entry point; the implementation is split by
concern, and each part's docstring carries the equations it implements:

* :mod:`align_jax.game.agency_game`: the game ``G_ref`` (incentives
  normalised by ``<pi0, Y_k> = 0``), the agent's response, the principals'
  payoffs and gradients, the derivation of the welfare
  ``W(pi) = <pi, Q^T w> - tau KL(pi || pi0) - J tau KL(pi0 || pi)`` whose
  maximiser is the equilibrium policy, its closed form via Wright's omega
  (:func:`welfare_maximizer`, :func:`equilibrium_incentives`), and the
  static :class:`SolverConfig` / :class:`EquilibriumResult` types.
* :mod:`align_jax.game.agency_solver`: the EPEC solver (Newton on the stacked
  first-order conditions with a per-token trust region,
  :func:`solve_equilibrium`, batched and validated as
  :func:`solve_equilibria`) and the limited-liability variant ``Y_k >= 0``
  (:func:`solve_limited_liability`, :func:`limited_liability_welfare`).
* :mod:`align_jax.game.agency_baselines`: the decoding baselines on the same
  inputs (:func:`linear_mixing_logits`, :func:`reward_guided_logits`,
  :func:`reward_guided_choice`) and the host-side boundary checks
  (:func:`check_game_inputs`, :func:`check_top_m`).
"""

from __future__ import annotations

from align_jax.game.agency_baselines import (
    check_game_inputs,
    check_top_m,
    linear_mixing_logits,
    reward_guided_choice,
    reward_guided_logits,
)
from align_jax.game.agency_game import (
    EquilibriumResult,
    SolverConfig,
    _exp_cap,  # noqa: F401  (used by experiments/bench_cage.py)
    agent_response,
    equilibrium_incentives,
    principal_gradients,
    principal_utilities,
    welfare,
    welfare_maximizer,
    wright_omega_log,
)
from align_jax.game.agency_solver import (
    _solve_batch,  # noqa: F401  (used by experiments/bench_cage.py)
    limited_liability_welfare,
    solve_equilibria,
    solve_equilibrium,
    solve_limited_liability,
)

__all__ = [
    "SolverConfig",
    "EquilibriumResult",
    "agent_response",
    "principal_utilities",
    "principal_gradients",
    "equilibrium_incentives",
    "welfare",
    "welfare_maximizer",
    "wright_omega_log",
    "solve_equilibrium",
    "solve_equilibria",
    "solve_limited_liability",
    "limited_liability_welfare",
    "linear_mixing_logits",
    "reward_guided_logits",
    "reward_guided_choice",
    "check_game_inputs",
    "check_top_m",
]
