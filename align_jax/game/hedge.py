"""Hedge: exponential weights / entropic mirror descent (FTRL form).

For one agent with K slots, valid mask ``m`` and cumulative round rewards
``S_t(k) = sum_{s<=t} r_s(k)``, the policy for round ``t+1`` is

    pi_{t+1}(k) = m(k) exp(eta_{t+1} S_t(k)) / sum_l m(l) exp(eta_{t+1} S_t(l)),

computed with a masked log-sum-exp.  This is follow-the-regularized-leader
with the negative-entropy regularizer ``psi_t(x) = (log K + sum x log x) / eta_t``,
which equals online mirror descent with entropy for a constant step size.

Step sizes (``K`` here is the agent's number of valid slots ``K_i``):

* constant: ``eta_t = eta``;
* anytime:  ``eta_t = c sqrt(log K / t)`` (non-increasing, needs no horizon).

Regret bound.  With rewards of range ``W_t = max_k r_t(k) - min_k r_t(k)``
(valid slots), FTRL with a non-increasing ``eta_t`` and the 1-strongly convex
(in L1) entropy satisfies, for every reward sequence (adversarial included),

    R_T = max_k sum_t r_t(k) - sum_t <pi_t, r_t>
        <= log K / eta_{T+1} + sum_{t=1}^T eta_t W_t^2 / 8,

(Orabona, *A Modern Introduction to Online Learning*, Cor. 7.9, with the
rewards shifted by ``(max + min)/2`` each round, which changes neither the
iterates nor the regret, so ``||r_t - c||_inf = W_t / 2``).  For a constant
step it is the classical ``log K / eta + eta sum_t W_t^2 / 8``; with
``W_t <= W`` and ``eta = sqrt(8 log K / (T W^2))`` it is ``W sqrt(T log K / 2)``,
i.e. ``O(sqrt T)``.  ``K = 1`` has zero regret and a zero bound.

The functions are pure and shape-polymorphic over leading axes, in the
``(init, update)`` spirit of optax; :func:`hedge_learner` packs them into the engine's
:class:`~align_jax.game.learner.Learner` interface (registered as ``"hedge"``).
A row with no valid slot (an abstaining agent) gets the all-zero policy.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from align_jax.game.learner import LEARNERS, Learner

__all__ = [
    "HedgeState",
    "hedge_learner",
    "hedge_init",
    "hedge_policy",
    "hedge_update",
    "step_size",
    "regret_bound",
    "masked_log_softmax",
]

_NEG = -1e30


def masked_log_softmax(logits: jax.Array, valid: jax.Array) -> jax.Array:
    """``log softmax`` over the last axis restricted to ``valid`` slots.

    Args:
      logits: float ``[..., K]``.
      valid: bool ``[..., K]`` with at least one True per row.

    Returns:
      float ``[..., K]``; ``-inf`` on invalid slots.
    """
    masked = jnp.where(valid, logits, _NEG)
    top = jnp.max(masked, axis=-1, keepdims=True)
    shifted = masked - jax.lax.stop_gradient(top)
    log_z = jnp.log(jnp.sum(jnp.where(valid, jnp.exp(shifted), 0.0), axis=-1, keepdims=True))
    return jnp.where(valid, shifted - log_z, -jnp.inf)


def hedge_policy(cum_reward: jax.Array, valid: jax.Array, eta: jax.Array) -> jax.Array:
    """``pi(k) ∝ exp(eta * S(k))`` over valid slots.

    Args:
      cum_reward: float ``[..., K]`` cumulative rewards ``S``.
      valid: bool ``[..., K]``.
      eta: float broadcastable to ``[...]`` (one step size per row).

    Returns:
      float ``[..., K]`` on the simplex, zero on invalid slots; all zero on a
      row with no valid slot.
    """
    eta = jnp.asarray(eta, cum_reward.dtype)[..., None]
    logits = jnp.where(valid, eta * cum_reward, _NEG)
    weights = jnp.where(valid, jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)), 0.0)
    total = jnp.sum(weights, axis=-1, keepdims=True)  # >= 1 (the top slot) on a row with a valid slot
    return weights / jnp.where(total > 0, total, 1.0)


def step_size(schedule: str, base: jax.Array, t: jax.Array, num_valid: jax.Array) -> jax.Array:
    """``eta_t`` of a schedule.

    Args:
      schedule: ``"constant"`` or ``"anytime"`` (static).
      base: ``eta`` (constant) or ``c`` (anytime); float, broadcastable.
      t: the round, 1-based (float or int array).
      num_valid: ``K_i``, the number of valid slots, ``[...]``.

    Returns:
      float ``eta_t`` broadcast to ``num_valid``'s shape.
    """
    num_valid = jnp.asarray(num_valid, jnp.float32)
    if schedule == "constant":
        return jnp.broadcast_to(jnp.asarray(base, jnp.float32), num_valid.shape)
    if schedule == "anytime":
        log_k = jnp.log(jnp.maximum(num_valid, 1.0))
        return jnp.asarray(base, jnp.float32) * jnp.sqrt(log_k / jnp.asarray(t, jnp.float32))
    raise ValueError(f"unknown step-size schedule {schedule!r}")


def regret_bound(
    schedule: str, base: jax.Array, rounds: jax.Array, num_valid: jax.Array, sum_eta_w2: jax.Array
) -> jax.Array:
    """``log K / eta_{T+1} + sum_t eta_t W_t^2 / 8`` (see module docstring).

    Args:
      schedule: static schedule name.
      base: ``eta`` or ``c``.
      rounds: ``T``, the rounds played so far.
      num_valid: ``K_i`` ``[...]``.
      sum_eta_w2: ``sum_t eta_t W_t^2`` accumulated over the played rounds ``[...]``.

    Returns:
      float ``[...]``; zero where ``K_i <= 1``.
    """
    num_valid = jnp.asarray(num_valid, jnp.float32)
    log_k = jnp.log(jnp.maximum(num_valid, 1.0))
    eta_next = step_size(schedule, base, jnp.asarray(rounds, jnp.float32) + 1.0, num_valid)
    safe_eta = jnp.where(num_valid > 1, eta_next, 1.0)
    bound = log_k / safe_eta + sum_eta_w2 / 8.0
    return jnp.where(num_valid > 1, bound, 0.0)


_eta = step_size  # the schedule, under a name the factory's argument does not shadow


class HedgeState(NamedTuple):
    """State of a Hedge learner.

    Attributes:
      cum_reward: float32 ``[..., K]`` ``S_t`` (zero on invalid slots).
      round: int32 ``[]`` rounds absorbed so far.
      sum_eta_w2: float32 ``[...]`` ``sum_t eta_t W_t^2`` over the absorbed
        rounds (``W_t`` the round's reward range over valid slots), the data
        term of :func:`regret_bound`.
    """

    cum_reward: jax.Array
    round: jax.Array
    sum_eta_w2: jax.Array


def hedge_init(valid: jax.Array) -> HedgeState:
    """A fresh learner (uniform policy over ``valid [..., K]``)."""
    return HedgeState(
        jnp.zeros(valid.shape, jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros(valid.shape[:-1], jnp.float32)
    )


def hedge_update(state: HedgeState, reward: jax.Array, valid: jax.Array, eta: jax.Array) -> HedgeState:
    """Absorbs one round's full-information reward vector ``r_t`` ``[..., K]``.

    Args:
      state: :class:`HedgeState`.
      reward: float ``[..., K]`` ``r_t`` (ignored on invalid slots).
      valid: bool ``[..., K]``.
      eta: ``eta_t`` ``[...]``, the step size the round's policy was played with
        (enters the bound's ``sum_t eta_t W_t^2``).
    """
    r_max = jnp.max(jnp.where(valid, reward, -jnp.inf), axis=-1)
    r_min = jnp.min(jnp.where(valid, reward, jnp.inf), axis=-1)
    width = jnp.where(jnp.any(valid, axis=-1), r_max - r_min, 0.0)
    return HedgeState(
        cum_reward=state.cum_reward + jnp.where(valid, reward, 0.0),
        round=state.round + 1,
        sum_eta_w2=state.sum_eta_w2 + eta * width**2,
    )


@LEARNERS.register("hedge")
def hedge_learner(step_size: jax.Array, schedule: str = "constant") -> Learner:
    """Hedge (exponential weights) as a :class:`~align_jax.game.learner.Learner`.

    ``pi_t(k) ∝ exp(eta_t S_{t-1}(k))`` over valid slots, ``eta_t`` from
    :func:`step_size` with ``K_i`` the row's number of valid slots; the regret
    bound is :func:`regret_bound` (module docstring).

    Args:
      step_size: ``eta`` (constant schedule) or ``c`` (anytime); float
        ``[]`` or broadcastable to ``[...]``.
      schedule: ``"constant"`` or ``"anytime"`` (static).
    """
    if schedule not in ("constant", "anytime"):
        raise ValueError(f"unknown step-size schedule {schedule!r}")
    base = step_size

    def num_valid(valid):
        return jnp.sum(valid, axis=-1).astype(jnp.float32)

    def policy(state: HedgeState, valid: jax.Array, t: jax.Array) -> jax.Array:
        return hedge_policy(state.cum_reward, valid, _eta(schedule, base, t, num_valid(valid)))

    def update(state: HedgeState, reward: jax.Array, valid: jax.Array, t: jax.Array) -> HedgeState:
        return hedge_update(state, reward, valid, _eta(schedule, base, t, num_valid(valid)))

    def bound(state: HedgeState, valid: jax.Array, rounds: jax.Array) -> jax.Array:
        return regret_bound(schedule, base, rounds, num_valid(valid), state.sum_eta_w2)

    return Learner(init=hedge_init, policy=policy, update=update, regret_bound=bound)
