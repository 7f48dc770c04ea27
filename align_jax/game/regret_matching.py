"""Regret matching+ (RM+), a second game learner: parameter-free, scale-invariant.

For one agent with K slots, valid mask ``m`` and round rewards ``r_t``, RM+
(Tammelin 2014) keeps non-negative cumulative regrets

    g_t(k) = m(k) (r_t(k) - <pi_t, r_t>),     Q_t = [Q_{t-1} + g_t]^+,   Q_0 = 0,

and plays ``pi_{t+1}(k) = Q_t(k) / sum_l Q_t(l)`` over valid slots (uniform
when ``Q_t = 0``).  It has no step size: ``GameParams.step_size`` and the
schedule are ignored, and the policy does not change when all rewards are
scaled by a positive constant.

Regret bound.  ``sum_t g_t(k) <= Q_T(k)`` (the clipping only adds), and
``||Q_t||^2 <= ||Q_{t-1} + g_t||^2 = ||Q_{t-1}||^2 + ||g_t||^2`` because
``<Q_{t-1}, g_t> = ||Q_{t-1}||_1 (<pi_t, r_t> - <pi_t, r_t>) = 0``.  Hence for
every reward sequence

    R_T = max_k sum_t r_t(k) - sum_t <pi_t, r_t> <= ||Q_T||_2 <= sqrt(sum_t ||g_t||_2^2),

which is at most ``W sqrt(K T)`` for rewards of range ``W`` (e.g. Farina,
Kroer and Sandholm 2021, Prop. 1).  The state accumulates ``sum_t ||g_t||^2``
and :func:`regret_matching_plus` reports the square root as its bound.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from align_jax.game.learner import LEARNERS, Learner

__all__ = ["RegretMatchingState", "regret_matching_plus"]


class RegretMatchingState(NamedTuple):
    """State of an RM+ learner.

    Attributes:
      cum_regret: float32 ``[..., K]`` ``Q_t >= 0`` (zero on invalid slots).
      sum_sq_regret: float32 ``[...]`` ``sum_t ||g_t||_2^2`` (for the bound).
    """

    cum_regret: jax.Array
    sum_sq_regret: jax.Array


def _policy(cum_regret: jax.Array, valid: jax.Array) -> jax.Array:
    """``Q^+ / sum Q^+`` over valid slots, uniform when it is 0, zero on a row without valid slots."""
    positive = jnp.where(valid, jnp.maximum(cum_regret, 0.0), 0.0)
    top = jnp.max(positive, axis=-1, keepdims=True)
    # Scaled by the largest entry first, so that huge regrets cannot overflow the sum.
    scaled = positive / jnp.where(top > 0, top, 1.0)
    weights = jnp.where(top > 0, scaled, valid.astype(scaled.dtype))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    return weights / jnp.where(total > 0, total, 1.0)


@LEARNERS.register("regret_matching_plus")
def regret_matching_plus(step_size: jax.Array = 1.0, schedule: str = "constant") -> Learner:
    """Regret matching+ as a :class:`~align_jax.game.learner.Learner` (module docstring).

    Args:
      step_size: ignored (RM+ has none; accepted for the factory interface).
      schedule: ignored.
    """
    del step_size, schedule

    def init(valid: jax.Array) -> RegretMatchingState:
        return RegretMatchingState(jnp.zeros(valid.shape, jnp.float32), jnp.zeros(valid.shape[:-1], jnp.float32))

    def policy(state: RegretMatchingState, valid: jax.Array, t: jax.Array) -> jax.Array:
        return _policy(state.cum_regret, valid)

    def update(state: RegretMatchingState, reward: jax.Array, valid: jax.Array, t: jax.Array) -> RegretMatchingState:
        played = _policy(state.cum_regret, valid)
        reward = jnp.where(valid, reward, 0.0)
        instant = jnp.where(valid, reward - jnp.sum(played * reward, axis=-1, keepdims=True), 0.0)
        return RegretMatchingState(
            cum_regret=jnp.maximum(state.cum_regret + instant, 0.0),
            sum_sq_regret=state.sum_sq_regret + jnp.sum(instant**2, axis=-1),
        )

    def regret_bound(state: RegretMatchingState, valid: jax.Array, rounds: jax.Array) -> jax.Array:
        return jnp.where(jnp.sum(valid, axis=-1) > 1, jnp.sqrt(state.sum_sq_regret), 0.0)

    return Learner(init=init, policy=policy, update=update, regret_bound=regret_bound)
