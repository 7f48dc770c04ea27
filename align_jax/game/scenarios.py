"""Synthetic correlated-utility scenarios that produce :class:`CandidateSet` s.

One scenario is one delegation game drawn as follows (all with explicit keys;
``P`` answers in a shared pool, ``N`` agents, ``K`` slots per agent):

1. Every pool answer ``a`` has a latent pair ``(x_a, y_a)``: ``x_a`` is how
   good the answer looks to the agents, ``y_a`` how good it is to the
   principal, with ``x_a ~ N(0, 1)`` and ``y_a = rho x_a + sqrt(1 - rho^2) z_a``
   (``z_a ~ N(0, 1)``), so ``corr(x, y) = rho`` exactly in the population;
   ``rho`` may be negative.
2. Answer popularity is shared across agents: ``logit_a = overlap * g_a`` with
   ``g_a ~ N(0, 1)``.  ``overlap = 0`` makes every answer equally likely (few
   coincidences when ``P >> K``); a larger value concentrates all agents on
   the same popular answers, so their candidates coincide (same answer id).
3. Agent ``i`` draws ``K`` distinct answers without replacement (Gumbel top-K)
   from ``logit_a + dominance * 1[i = 0] * y_a``: with ``dominance > 0`` agent
   0 is asymmetric, holding answers the principal prefers.  Each agent keeps
   a uniformly random number ``K_i`` in ``[min_candidates, K]`` of them (the
   rest are padding).
4. Agent utility (self-consistency-like, sums to 1 over the agent's slots):
   ``u_i(k) = softmax_k(sharpness * (x_a + agent_noise * e_ik))``.
5. Principal: value ``v = y_a`` (its true utility) and score
   ``s_i(k) = y_a + principal_noise * e'_ik`` (what its ranking sees; the same
   answer may be scored differently in two agents' submissions, as an LLM
   judge would).
6. With ``ScenarioSpec.has_correct`` answer 0 of the pool is the correct one
   and gets a quality advantage: ``x_0 += correct_advantage``,
   ``y_0 += correct_advantage`` and its popularity logit too.

The requested ``rho`` is on the latents; the realized correlation between the
agent utilities and the principal scores of the drawn candidates is measured
by :func:`utility_correlation` and returned by :func:`sample_batch`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.game.types import CandidateSet, GameInputError

__all__ = [
    "ScenarioSpec",
    "ScenarioParams",
    "sample",
    "sample_batch",
    "utility_correlation",
]


@dataclasses.dataclass(frozen=True)
class ScenarioSpec:
    """Static shape of the synthetic games (a ``jit`` static argument).

    Attributes:
      num_agents: N >= 1.
      num_candidates: K >= 1 slots per agent.
      pool_size: P >= K answers in the shared pool.
      min_candidates: each agent has between this and K valid slots.
      has_correct: answer 0 of the pool is the correct answer.
    """

    num_agents: int = 3
    num_candidates: int = 16
    pool_size: int = 32
    min_candidates: int = 1
    has_correct: bool = True

    def __post_init__(self):
        def need(ok, field, value, what):
            if not ok:
                raise GameInputError(f"ScenarioSpec.{field} must be {what}, got {value!r}", field)

        for field in ("num_agents", "num_candidates", "pool_size", "min_candidates"):
            value = getattr(self, field)
            need(isinstance(value, (int, np.integer)) and not isinstance(value, bool), field, value, "an integer")
        need(self.num_agents >= 1, "num_agents", self.num_agents, ">= 1")
        need(self.num_candidates >= 1, "num_candidates", self.num_candidates, ">= 1 (K)")
        need(
            self.pool_size >= self.num_candidates,
            "pool_size",
            self.pool_size,
            f">= num_candidates={self.num_candidates}",
        )
        need(
            1 <= self.min_candidates <= self.num_candidates,
            "min_candidates",
            self.min_candidates,
            f"in [1, num_candidates={self.num_candidates}]",
        )


_RANGES = {
    "rho": (-1.0, 1.0),
    "principal_noise": (0.0, np.inf),
    "agent_noise": (0.0, np.inf),
    "overlap": (0.0, np.inf),
    "dominance": (0.0, np.inf),
    "sharpness": (0.0, np.inf),
    "correct_advantage": (0.0, np.inf),
}


class ScenarioParams(NamedTuple):
    """Per-scenario numbers (array leaves: scalars, or ``[Q]`` for a sweep).

    Attributes:
      rho: latent agent/principal correlation in ``[-1, 1]``.
      principal_noise: std of the principal's scoring noise, ``>= 0``.
      agent_noise: std of each agent's private perception noise, ``>= 0``.
      overlap: popularity concentration of the shared pool, ``>= 0``.
      dominance: agent 0's tilt toward principal-preferred answers, ``>= 0``.
      sharpness: inverse temperature of the agent utilities, ``>= 0``.
      correct_advantage: quality advantage of the correct answer, ``>= 0``.
    """

    rho: jax.Array
    principal_noise: jax.Array
    agent_noise: jax.Array
    overlap: jax.Array
    dominance: jax.Array
    sharpness: jax.Array
    correct_advantage: jax.Array

    @staticmethod
    def create(
        rho=0.5,
        principal_noise=0.0,
        agent_noise=0.0,
        overlap=1.0,
        dominance=0.0,
        sharpness=2.0,
        correct_advantage=1.0,
    ) -> "ScenarioParams":
        """Validated constructor; raises :class:`GameInputError` naming the field."""
        values = dict(
            rho=rho,
            principal_noise=principal_noise,
            agent_noise=agent_noise,
            overlap=overlap,
            dominance=dominance,
            sharpness=sharpness,
            correct_advantage=correct_advantage,
        )
        leaves = {}
        for name, value in values.items():
            try:
                array = np.asarray(value, np.float64)
            except (TypeError, ValueError):
                raise GameInputError(f"ScenarioParams.{name} must be a number, got {value!r}", name) from None
            low, high = _RANGES[name]
            if not np.all(np.isfinite(array)):
                raise GameInputError(f"ScenarioParams.{name} must be finite, got {value!r}", name)
            if np.any(array < low) or np.any(array > high):
                raise GameInputError(
                    f"ScenarioParams.{name} must be in [{low}, {high}], got {value!r}", name
                )
            leaves[name] = jnp.asarray(array, jnp.float32)
        return ScenarioParams(**leaves)


def utility_correlation(candidates: CandidateSet) -> jax.Array:
    """Pearson correlation of ``agent_utility`` and ``principal_score`` over valid slots.

    Args:
      candidates: one game, ``[N, K]`` leaves.

    Returns:
      float32 ``[]`` in ``[-1, 1]`` (0 when either side is constant).
    """
    w = candidates.valid.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(w), 1.0)
    u = candidates.agent_utility
    s = candidates.principal_score
    u_c = (u - jnp.sum(w * u) / count) * w
    s_c = (s - jnp.sum(w * s) / count) * w
    denom = jnp.sqrt(jnp.sum(u_c**2) * jnp.sum(s_c**2))
    return jnp.where(denom > 0, jnp.sum(u_c * s_c) / jnp.where(denom > 0, denom, 1.0), 0.0)


def sample(spec: ScenarioSpec, params: ScenarioParams, key: jax.Array) -> CandidateSet:
    """Draws one game (``[N, K]`` leaves).  Pure; consumes ``key``."""
    n, k, p = spec.num_agents, spec.num_candidates, spec.pool_size
    k_x, k_z, k_pop, k_pick, k_count, k_agent, k_principal = jax.random.split(key, 7)
    x = jax.random.normal(k_x, (p,))
    z = jax.random.normal(k_z, (p,))
    rho = jnp.clip(params.rho, -1.0, 1.0)
    y = rho * x + jnp.sqrt(jnp.maximum(1.0 - rho**2, 0.0)) * z
    popularity = params.overlap * jax.random.normal(k_pop, (p,))
    if spec.has_correct:
        bonus = jnp.zeros((p,)).at[0].set(params.correct_advantage)
        x, y, popularity = x + bonus, y + bonus, popularity + bonus
    tilt = jnp.zeros((n, 1)).at[0, 0].set(1.0) * params.dominance * y[None, :]
    gumbel = jax.random.gumbel(k_pick, (n, p))
    _, answer_id = jax.lax.top_k(popularity[None, :] + tilt + gumbel, k)  # [N, K] distinct
    count = jax.random.randint(k_count, (n, 1), spec.min_candidates, k + 1)
    valid = jnp.arange(k)[None, :] < count
    perceived = x[answer_id] + params.agent_noise * jax.random.normal(k_agent, (n, k))
    logits = jnp.where(valid, params.sharpness * perceived, -jnp.inf)
    agent_utility = jnp.where(valid, jax.nn.softmax(logits, axis=-1), 0.0)
    value = y[answer_id]
    score = value + params.principal_noise * jax.random.normal(k_principal, (n, k))
    correct = (answer_id == 0) & valid if spec.has_correct else jnp.zeros((n, k), bool)
    return CandidateSet(
        answer_id=answer_id.astype(jnp.int32),
        valid=valid,
        agent_utility=agent_utility.astype(jnp.float32),
        principal_score=jnp.where(valid, score, 0.0).astype(jnp.float32),
        principal_value=jnp.where(valid, value, 0.0).astype(jnp.float32),
        correct=correct,
    )


def sample_batch(
    spec: ScenarioSpec, params: ScenarioParams, key: jax.Array, num_games: int
) -> tuple[CandidateSet, jax.Array]:
    """Draws ``num_games`` games.

    Args:
      spec: static shape.
      params: scalars (shared) or ``[num_games]`` leaves (one per game).
      key: PRNG key, split into one key per game.
      num_games: Q.

    Returns:
      ``(CandidateSet with [Q, N, K] leaves, realized correlation [Q])``.
    """
    return _sample_batch(spec, num_games, params, key)


def _sample_batch_impl(spec, num_games, params, key):
    params = jax.tree.map(lambda v: jnp.broadcast_to(jnp.asarray(v, jnp.float32), (num_games,)), params)
    keys = jax.random.split(key, num_games)
    candidates = jax.vmap(sample, in_axes=(None, 0, 0))(spec, params, keys)
    return candidates, jax.vmap(utility_correlation)(candidates)


_sample_batch = jax.jit(_sample_batch_impl, static_argnums=(0, 1))
