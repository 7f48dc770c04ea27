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

Two implementations of the expectation, equal up to float32 rounding:

* ``"dense"`` contracts the ``[N, K, N, K]`` comparison tensor with the
  profile: ``O(N^2 K^2)`` work and memory per call, fastest for small ``N K``.
* ``"sorted"`` sorts the game's ``N K`` scores once (:func:`score_order`,
  ``O(N K log(N K))``); each call is then ``O(N K)``: the profile's mass in
  descending score order, its prefix sums ``P``, and for a slot whose tie group
  occupies sorted positions ``[lo, hi)`` the mass of all slots ranked above it
  is ``P[lo] + 0.5 (P[hi] - P[lo])``; the agent's own share is the same
  quantity over its own ``K`` slots (ranked once per agent) and is subtracted.
  Invalid slots carry zero mass, so their scores (even NaN, ranked last) are
  never read into anybody's feedback.

``"auto"`` picks one by shape (:func:`resolve_feedback`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

__all__ = [
    "FEEDBACK_METHODS",
    "SORTED_MIN_SLOTS",
    "ScoreOrder",
    "exclusive_prefix_sum",
    "expected_feedback_fn",
    "outrank_weights",
    "ranking_feedback",
    "resolve_feedback",
    "score_order",
    "sorted_ranking_feedback",
    "submission_feedback",
]

FEEDBACK_METHODS = ("auto", "dense", "sorted")

# ``"auto"`` uses the sorted form from this many slots ``N K`` on (the dense form
# below).  Measured on the 2-core CPU with ``experiments/bench_game.py
# --scaling`` (full game, expected mode, T=20): sorted/dense throughput
# 0.38-0.75x at N K <= 48, 0.79-1.42x at N K = 128, 3.7-11x at 512, 24-41x at 2048.
SORTED_MIN_SLOTS = 128


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


def resolve_feedback(method: str, num_agents: int, num_candidates: int) -> str:
    """``"dense"`` or ``"sorted"``: ``method`` itself, or by shape for ``"auto"``.

    ``"auto"`` takes the sorted form when ``N K >= SORTED_MIN_SLOTS`` and
    ``N > 1`` (with one agent the feedback is constant and neither form runs).
    """
    if method not in FEEDBACK_METHODS:
        raise ValueError(f"feedback must be one of {FEEDBACK_METHODS}, got {method!r}")
    if method != "auto":
        return method
    return "sorted" if num_agents > 1 and num_agents * num_candidates >= SORTED_MIN_SLOTS else "dense"


class ScoreOrder(NamedTuple):
    """One game's scores ranked once, for :func:`sorted_ranking_feedback`.

    With ``M = N K``, the per-round work reads the profile's mass in a
    ``[2M]`` order (all slots by descending score, then each agent's own slots
    by descending score, agent after agent), takes one prefix sum ``C``
    (``C[0] = 0``, length ``2M + 1``) and reads ``C`` at each slot's tie-group
    bounds.

    Attributes:
      gather: int32 ``[2M]`` flat slot index at each position of that order.
      bounds: int32 ``[4, N, K]`` indices into ``C`` of each slot's tie group
        ``[lo, hi)``: among all slots (rows 0, 1), among its agent's own slots
        (rows 2, 3, offset to the agent's block).
      block: int32 ``[N]`` index into ``C`` of the start of each agent's own block.
    """

    gather: jax.Array
    bounds: jax.Array
    block: jax.Array


# Up to this many scores a game's ranking is computed by counting comparisons
# (O(M^2) once per game, vectorized); above it by a sort (XLA's CPU sort costs
# 100-150 ns per element, far more than a vectorized comparison at small M).
COUNT_MAX_SLOTS = 64
# Prefix sums of at least this length use an associative scan instead of cumsum.
SCAN_MIN_LENGTH = 256


def exclusive_prefix_sum(x: jax.Array) -> jax.Array:
    """``[0, x0, x0 + x1, ...]`` along axis 0 (length ``L + 1``).

    XLA:CPU lowers ``cumsum`` to a window reduction, fastest for short arrays;
    long ones use a log-depth associative scan.
    """
    if x.shape[0] < SCAN_MIN_LENGTH:
        running = jnp.cumsum(x, axis=0)
    else:
        running = jax.lax.associative_scan(jnp.add, x, axis=0)
    return jnp.concatenate([jnp.zeros((1,) + x.shape[1:], x.dtype), running], axis=0)


def _descending_groups(score: jax.Array, count_max: Optional[int] = None):
    """Rank ``[M]`` scores in descending order (stable); each one's tie group ``[lo, hi)``.

    Returns ``(order, rank, lo, hi)``: ``order[r]`` the index at descending
    position ``r``, ``rank`` its inverse; ``lo``, ``hi`` in input order.
    Scores must not be NaN.  Up to ``count_max`` scores (default
    :data:`COUNT_MAX_SLOTS`) by ``O(M^2)`` comparison counting, else one sort.
    """
    m = score.shape[0]
    index = jnp.arange(m, dtype=jnp.int32)
    if m <= (COUNT_MAX_SLOTS if count_max is None else count_max):
        query, other = score[:, None], score[None, :]
        lo = jnp.sum(other > query, axis=-1, dtype=jnp.int32)
        hi = jnp.sum(other >= query, axis=-1, dtype=jnp.int32)
        earlier_tie = (other == query) & (index[None, :] < index[:, None])
        rank = lo + jnp.sum(earlier_tie, axis=-1, dtype=jnp.int32)
        order = jnp.sum(jnp.where(rank[None, :] == index[:, None], index[None, :], 0), axis=-1, dtype=jnp.int32)
        return order, rank, lo, hi
    order = jnp.argsort(-score, stable=True).astype(jnp.int32)
    ranked = score[order]
    first, last = jnp.ones((1,), bool), jnp.ones((1,), bool)
    new_group = jnp.concatenate([first, ranked[1:] != ranked[:-1]])
    ends_group = jnp.concatenate([ranked[:-1] != ranked[1:], last])
    # Running max / reverse min as associative scans (XLA:CPU lowers cummax to an O(M^2) window).
    lo = jax.lax.associative_scan(jnp.maximum, jnp.where(new_group, index, 0))
    hi = jax.lax.associative_scan(jnp.minimum, jnp.where(ends_group, index + 1, m), reverse=True)
    rank = jnp.zeros((m,), jnp.int32).at[order].set(index)  # inverse permutation
    return order, rank, lo[rank], hi[rank]


def score_order(principal_score: jax.Array) -> ScoreOrder:
    """Ranks one game's scores ``[N, K]`` once.

    One sort of the ``N K`` scores (comparison counting for small ``N K``)
    and one per agent of its ``K`` scores (counting for ``K <=``
    :data:`ROW_COUNT_MAX_SLOTS`): ``O(N K log(N K))`` time, ``O(N K)``
    memory.  NaN scores (padding) are ranked as ``-inf``: they carry zero
    mass and the valid scores are finite, so they change nobody's feedback.
    """
    n, k = principal_score.shape
    m = n * k
    score = jnp.where(jnp.isnan(principal_score), -jnp.inf, principal_score)
    order, _, lo, hi = _descending_groups(score.reshape(m))
    own_order, own_rank, own_lo, own_hi = _agent_groups(score)  # [N, K] each
    offset = (m + k * jnp.arange(n, dtype=jnp.int32))[:, None]
    own_gather = (own_order + k * jnp.arange(n, dtype=jnp.int32)[:, None]).reshape(m)
    return ScoreOrder(
        gather=jnp.concatenate([order, own_gather]),
        bounds=jnp.stack([lo.reshape(n, k), hi.reshape(n, k), own_lo + offset, own_hi + offset]),
        block=offset[:, 0],
    )


# Each agent's own K scores are ranked by comparison counting up to this K.
ROW_COUNT_MAX_SLOTS = 16


def _agent_groups(score: jax.Array):
    """:func:`_descending_groups` of each agent's row of ``[N, K]`` scores (``[N, K]`` outputs)."""
    return jax.vmap(lambda row: _descending_groups(row, ROW_COUNT_MAX_SLOTS))(score)


def sorted_ranking_feedback(
    order: ScoreOrder, opponent_policy: jax.Array, present: Optional[jax.Array] = None
) -> jax.Array:
    """:func:`ranking_feedback` from pre-ranked scores in ``O(N K)``.

    The mass ranked above slot ``(i, k)`` by everyone is ``C[lo] + (C[hi] - C[lo]) / 2``
    over its tie group ``[lo, hi)`` in descending order; agent ``i``'s own
    share is the same over its own slots and is subtracted.

    Args:
      order: :func:`score_order` of the game's principal scores.
      opponent_policy: float ``[N, K]`` (see :func:`ranking_feedback`).
      present: optional bool ``[N]``.

    Returns:
      float32 ``[N, K]``; all ones when ``N = 1``.
    """
    n, k = opponent_policy.shape
    if n == 1:
        return jnp.ones((n, k), jnp.float32)
    mass = opponent_policy.astype(jnp.float32).reshape(n * k)[order.gather]
    prefix = exclusive_prefix_sum(mass)
    at = prefix[order.bounds]  # [4, N, K]
    base = prefix[order.block][:, None]
    above = 0.5 * (at[0] + at[1]) - (0.5 * (at[2] + at[3]) - base)
    return 1.0 - 2.0 * above / _num_others(n, present)


def expected_feedback_fn(
    principal_score: jax.Array, present: Optional[jax.Array] = None, method: str = "auto"
) -> Callable[[jax.Array], jax.Array]:
    """``policy -> E f`` for one game, with the per-game work done once.

    For a round loop: the sorted form sorts the scores here, outside the loop;
    each call of the returned function is then ``O(N K)``.

    Args:
      principal_score: float ``[N, K]``.
      present: optional bool ``[N]``.
      method: ``"dense"``, ``"sorted"`` or ``"auto"`` (:func:`resolve_feedback`).
    """
    n, k = principal_score.shape
    if resolve_feedback(method, n, k) == "sorted":
        order = score_order(principal_score)
        return lambda policy: sorted_ranking_feedback(order, policy, present)
    return lambda policy: ranking_feedback(principal_score, policy, present)


def ranking_feedback(
    principal_score: jax.Array,
    opponent_policy: jax.Array,
    present: Optional[jax.Array] = None,
    *,
    method: str = "dense",
) -> jax.Array:
    """Expected feedback ``E f(k)`` of every slot of every agent.

    Args:
      principal_score: float ``[N, K]`` scores ``s_i(k)``.
      opponent_policy: float ``[N, K]`` each agent's mixed strategy (zero on
        invalid slots; an all-zero row for an abstaining agent), or one-hot
        rows for a sampled profile.
      present: optional bool ``[N]``, the agents taking part (those with a
        valid slot); default all.
      method: ``"dense"`` (the ``[N, K, N, K]`` contraction), ``"sorted"``
        (sorts here, then ``O(N K)``) or ``"auto"``; to reuse one sort across
        calls see :func:`expected_feedback_fn`.

    Returns:
      float32 ``[N, K]`` in ``[-1, 1]``; all ones when ``N = 1``.
    """
    n = principal_score.shape[0]
    if resolve_feedback(method, n, principal_score.shape[1]) == "sorted":
        return sorted_ranking_feedback(score_order(principal_score), opponent_policy, present)
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
