"""Principal ranking feedback and its exact expectation under mixed strategies.

For agent ``i`` submitting slot ``k`` with principal score ``s = s_i(k)``
while the others submit ``a_{-i}``, the feedback is

    f(k; a_{-i}) = 1 - 2 (#{j != i: s_j(a_j) > s} + 0.5 #{j != i: s_j(a_j) = s}) / (N - 1),

so ``+1`` for the top submission, ``-1`` for the bottom, linear in between and
ties split.  With ``N = 1`` there is nobody to be ranked against and the lone
submission is the top: ``f = +1`` (the agent then simply maximizes its own
utility).

Because ``f`` is affine in the count of others ranked above, its expectation
over *independent* mixed strategies ``pi_{-i}`` is exact and cheap:

    E f(k) = 1 - 2 sum_{j != i} sum_l pi_j(l) c(s_j(l), s) / (N - 1),
    c(x, s) = 1[x > s] + 0.5 1[x = s].

A sampled profile is the special case ``pi_j = onehot(a_j)``, so one function
serves both game modes.

Abstaining agents.  An agent with no valid slot takes no part: it submits
nothing, ranks nobody, and the others are ranked among the ``M`` agents that
do take part (``N - 1`` becomes ``M - 1`` above; ``f = +1`` when ``M = 1``),
exactly as in the game without it.  Pass ``present`` (bool ``[N]``) for that;
its opponent-policy row must then be zero (the learners' policy is).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

__all__ = ["ranking_feedback", "outrank_weights", "submission_feedback"]


def outrank_weights(principal_score: jax.Array) -> jax.Array:
    """``C[i, k, j, l] = c(s_j(l), s_i(k))`` with ``C[i, :, i, :] = 0``.

    Args:
      principal_score: float ``[N, K]``.

    Returns:
      float32 ``[N, K, N, K]``.
    """
    n = principal_score.shape[0]
    query = principal_score[:, :, None, None]
    other = principal_score[None, None, :, :]
    weights = (other > query).astype(jnp.float32) + 0.5 * (other == query).astype(jnp.float32)
    not_self = 1.0 - jnp.eye(n, dtype=jnp.float32)
    return weights * not_self[:, None, :, None]


def _num_others(n: int, present: Optional[jax.Array]):
    """``N - 1``, or ``max(M - 1, 1)`` with ``M`` the agents taking part."""
    if present is None:
        return n - 1
    return jnp.maximum(jnp.sum(present, axis=-1).astype(jnp.float32) - 1.0, 1.0)


def ranking_feedback(
    principal_score: jax.Array, opponent_policy: jax.Array, present: Optional[jax.Array] = None
) -> jax.Array:
    """Expected feedback ``E f(k)`` of every slot of every agent.

    Args:
      principal_score: float ``[N, K]`` scores ``s_i(k)``.
      opponent_policy: float ``[N, K]`` each agent's mixed strategy (zero on
        invalid slots; an all-zero row for an abstaining agent), or one-hot
        rows for a sampled profile.
      present: optional bool ``[N]``, the agents taking part (those with a
        valid slot); default all.

    Returns:
      float32 ``[N, K]`` in ``[-1, 1]``; all ones when ``N = 1``.
    """
    n = principal_score.shape[0]
    if n == 1:
        return jnp.ones(principal_score.shape, jnp.float32)
    above = jnp.einsum("ikjl,jl->ik", outrank_weights(principal_score), opponent_policy)
    return 1.0 - 2.0 * above / _num_others(n, present)


def submission_feedback(
    principal_score: jax.Array, submission: jax.Array, present: Optional[jax.Array] = None
) -> jax.Array:
    """Feedback ``f(k; a_{-i})`` of every slot against pure submissions ``a``.

    Equals ``ranking_feedback(principal_score, one_hot(submission))`` in
    ``O(N^2 K)`` instead of ``O(N^2 K^2)`` work.

    Args:
      principal_score: float ``[N, K]``.
      submission: int ``[N]`` the slot each agent submitted (ignored for an
        agent not ``present``).
      present: optional bool ``[N]``, the agents taking part; default all.

    Returns:
      float32 ``[N, K]``; all ones when ``N = 1``.
    """
    n = principal_score.shape[0]
    if n == 1:
        return jnp.ones(principal_score.shape, jnp.float32)
    submitted = jnp.take_along_axis(principal_score, submission[:, None], axis=-1)[:, 0]  # [N]
    query = principal_score[:, :, None]
    other = submitted[None, None, :]
    weights = (other > query).astype(jnp.float32) + 0.5 * (other == query).astype(jnp.float32)
    not_self = 1.0 - jnp.eye(n, dtype=jnp.float32)
    if present is not None:
        not_self = jnp.where(present[None, :], not_self, 0.0)
    above = jnp.sum(weights * not_self[:, None, :], axis=-1)
    return 1.0 - 2.0 * above / _num_others(n, present)
