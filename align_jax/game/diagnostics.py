"""Theory diagnostics and reference selection rules for one delegation game.

All functions take one game (``[N, K]`` arrays) and are ``vmap``-ed by the
engine.  Notation: ``u_i(k)`` agent utility, ``s_i(k)`` principal score,
``v_i(k)`` principal value (evaluation only), ``pi`` a profile ``[N, K]``.

* Payoff of slot ``k`` against a profile: ``U_i(k; pi_{-i}) = u_i(k) E f(k; pi_{-i})``
  (exact, see :mod:`align_jax.game.ranking`).
* Deviation gain (exploitability) of agent ``i`` at profile ``pi``:
  ``g_i = max_k U_i(k) - sum_k pi_i(k) U_i(k)``; the Nash gap is ``max_i g_i``
  (``0`` iff ``pi`` is a Nash equilibrium of the one-shot submission game).
* Pareto set of agent ``i``: its valid slots not dominated in
  ``(u_i(k), s_i(k))`` by another of its own valid slots.

An agent with no valid slot abstains (see :mod:`align_jax.game.ranking`): it
ranks nobody, its deviation gain is 0, it submits ``-1`` and the principal
never picks it.  A game where no agent has a valid slot has no pick
(``chosen_agent = -1``) and zero outcomes; ``validate_candidates`` rejects it
on the host.
"""

from __future__ import annotations

from typing import Callable, Union

import jax
import jax.numpy as jnp

from align_jax.game.ranking import (
    ROW_COUNT_MAX_SLOTS,
    ScoreOrder,
    _descending_groups,
    exclusive_prefix_sum,
    expected_feedback_fn,
    resolve_feedback,
    score_order,
)
from align_jax.game.types import Baselines, CandidateSet, Outcome

__all__ = [
    "slot_payoff",
    "deviation_gain",
    "nash_gap",
    "pareto_mask",
    "principal_pick",
    "fair_single_agent",
    "oracle",
    "random_candidate",
    "uniform_principal",
    "baselines",
]


Feedback = Union[str, Callable[[jax.Array], jax.Array]]


def _feedback_fn(candidates: CandidateSet, feedback: Feedback):
    if callable(feedback):
        return feedback
    present = jnp.any(candidates.valid, axis=-1)
    return expected_feedback_fn(candidates.principal_score, present, feedback)


def slot_payoff(candidates: CandidateSet, profile: jax.Array, feedback: Feedback = "auto") -> jax.Array:
    """``U_i(k; pi_{-i}) = u_i(k) E f(k; pi_{-i})`` ``[N, K]`` (zero off valid slots).

    Args:
      feedback: the expected-feedback implementation, ``"dense"``,
        ``"sorted"`` or ``"auto"`` (see :mod:`align_jax.game.ranking`), or a
        prepared ``policy -> E f`` function
        (:func:`align_jax.game.ranking.expected_feedback_fn`, which sorts the
        scores once for many profiles).
    """
    fb = _feedback_fn(candidates, feedback)(profile)
    return jnp.where(candidates.valid, candidates.agent_utility * fb, 0.0)


def deviation_gain(candidates: CandidateSet, profile: jax.Array, feedback: Feedback = "auto") -> jax.Array:
    """Each agent's best unilateral gain ``g_i >= 0`` at ``profile`` ``[N]`` (``feedback`` as in :func:`slot_payoff`)."""
    payoff = slot_payoff(candidates, profile, feedback)
    best = jnp.max(jnp.where(candidates.valid, payoff, -jnp.inf), axis=-1)
    current = jnp.sum(profile * payoff, axis=-1)
    return jnp.maximum(best - current, 0.0)


def nash_gap(candidates: CandidateSet, profile: jax.Array, feedback: Feedback = "auto") -> jax.Array:
    """``max_i g_i`` at ``profile`` (a scalar; ``feedback`` as in :func:`slot_payoff`)."""
    return jnp.max(deviation_gain(candidates, profile, feedback))


def pareto_mask(candidates: CandidateSet) -> jax.Array:
    """bool ``[N, K]``: valid and not dominated among the agent's own valid slots.

    Slot ``k`` is dominated when another valid slot ``l`` of the same agent has
    ``u_l >= u_k``, ``s_l >= s_k`` and one of them strictly.  Up to
    ``K =`` :data:`~align_jax.game.ranking.ROW_COUNT_MAX_SLOTS` by pairwise
    comparison (``[N, K, K]``); above, in ``O(N K log K)`` time and ``O(N K)``
    memory: each agent's slots sorted by utility, then a running maximum of
    the scores (``k`` is dominated iff the best score among strictly higher
    utilities is ``>= s_k``, or among utilities ``>= u_k`` is ``> s_k``).
    """
    u, s, valid = candidates.agent_utility, candidates.principal_score, candidates.valid
    k = valid.shape[-1]
    if k <= ROW_COUNT_MAX_SLOTS:
        u_other, s_other = u[:, None, :], s[:, None, :]
        u_self, s_self = u[:, :, None], s[:, :, None]
        dominates = (
            valid[:, None, :]
            & (u_other >= u_self)
            & (s_other >= s_self)
            & ((u_other > u_self) | (s_other > s_self))
        )
        return valid & ~jnp.any(dominates, axis=-1)
    u = jnp.where(valid, u, -jnp.inf)
    s = jnp.where(valid, s, -jnp.inf)

    def row(u_row, s_row):
        order, _, lo, hi = _descending_groups(u_row, ROW_COUNT_MAX_SLOTS)
        best = jax.lax.associative_scan(jnp.maximum, s_row[order])
        best = jnp.concatenate([jnp.full((1,), -jnp.inf, best.dtype), best])  # best[r]: max over the r first
        return (best[lo] >= s_row) | (best[hi] > s_row)

    return valid & ~jax.vmap(row)(u, s)


def principal_pick(candidates: CandidateSet, submission: jax.Array) -> tuple[jax.Array, Outcome]:
    """The principal takes the submission with the highest score (lowest agent index on ties).

    Args:
      submission: int32 ``[N]`` slot submitted by each agent (ignored for an
        agent with no valid slot, which abstains).

    Returns:
      ``(chosen_agent, Outcome)``; ``chosen_agent = -1`` and a zero outcome
      when no agent has a valid slot.
    """
    n = submission.shape[0]
    agents = jnp.arange(n)
    present = jnp.any(candidates.valid, axis=-1)
    scores = jnp.where(present, candidates.principal_score[agents, submission], -jnp.inf)
    chosen = jnp.argmax(scores)
    slot = submission[chosen]
    any_present = jnp.any(present)
    outcome = Outcome(
        principal_value=jnp.where(any_present, candidates.principal_value[chosen, slot], 0.0),
        correct=jnp.where(any_present, candidates.correct[chosen, slot], False).astype(jnp.float32),
    )
    return jnp.where(any_present, chosen, -1).astype(jnp.int32), outcome


def _expected_outcome(candidates: CandidateSet, weight: jax.Array) -> Outcome:
    total = jnp.sum(weight)
    weight = weight / jnp.where(total > 0, total, 1.0)  # zero outcome for a game without valid slots
    return Outcome(
        principal_value=jnp.sum(weight * jnp.where(candidates.valid, candidates.principal_value, 0.0)),
        correct=jnp.sum(weight * candidates.correct.astype(jnp.float32)),
    )


def pooled_utility(candidates: CandidateSet) -> jax.Array:
    """``bar u(id_i(k)) = (1/N) sum_j max_{l: id_j(l) = id_i(k)} u_j(l)`` ``[N, K]``.

    With self-consistency frequencies as utilities (one slot per distinct
    answer, frequency over each agent's K samples) this is the frequency of
    the answer among all N*K pooled samples.
    """
    return _pooled_utility(candidates, _same_answer(candidates.answer_id))


def _same_answer(ids: jax.Array) -> jax.Array:
    """bool ``[N, K, N, K]``: slots ``(i, k)`` and ``(j, l)`` carry the same answer."""
    return ids[:, :, None, None] == ids[None, None, :, :]


def _pooled_utility(candidates: CandidateSet, same: jax.Array) -> jax.Array:
    held = same & candidates.valid[None, None, :, :]
    best = jnp.max(jnp.where(held, candidates.agent_utility[None, None, :, :], 0.0), axis=-1)
    return jnp.mean(best, axis=-1)


def _pooled_utility_sorted(candidates: CandidateSet):
    """:func:`pooled_utility` in ``O(N K log(N K))`` by sorting the answer ids.

    Returns ``(pooled [N, K], count_tied)`` with ``count_tied(mask)`` the number
    of ``mask`` slots carrying each slot's answer ``[N, K]``.
    """
    n, k = candidates.valid.shape
    m = n * k
    ids = candidates.answer_id.reshape(m)
    order = jnp.argsort(ids, stable=True)  # by (answer, agent): the flat index is agent-major
    rank = jnp.zeros((m,), jnp.int32).at[order].set(jnp.arange(m, dtype=jnp.int32))
    sorted_ids, agent = ids[order], (order // k).astype(jnp.int32)
    utility = jnp.where(candidates.valid.reshape(m), candidates.agent_utility.reshape(m), 0.0)[order]
    first = jnp.ones((1,), bool)
    new_answer = jnp.concatenate([first, sorted_ids[1:] != sorted_ids[:-1]])
    new_pair = new_answer | jnp.concatenate([first, agent[1:] != agent[:-1]])
    answer_seg = jnp.cumsum(new_answer.astype(jnp.int32)) - 1
    pair_seg = jnp.cumsum(new_pair.astype(jnp.int32)) - 1
    pair_best = jax.ops.segment_max(utility, pair_seg, num_segments=m)  # best slot per (answer, agent)
    pair_answer = jnp.full((m,), m, jnp.int32).at[pair_seg].set(answer_seg)  # unused pairs -> dropped
    total = jax.ops.segment_sum(jnp.maximum(pair_best, 0.0), pair_answer, num_segments=m)
    pooled = (total[answer_seg] / n)[rank].reshape(n, k)

    def count_tied(mask):
        per_answer = jax.ops.segment_sum(mask.reshape(m)[order].astype(jnp.int32), answer_seg, num_segments=m)
        return per_answer[answer_seg][rank].reshape(n, k)

    return pooled, count_tied


def fair_single_agent(candidates: CandidateSet, sorted_by_answer: bool = False) -> Outcome:
    """One agent with all pooled candidates picks the answer of highest pooled utility.

    Ties between answers are broken uniformly, and the submitted slot is
    uniform among the slots carrying the chosen answer; the result is the
    exact expectation.  ``sorted_by_answer`` computes it by sorting the answer
    ids (``O(N K log(N K))``) instead of the ``[N, K, N, K]`` comparison.
    """
    if sorted_by_answer:
        pooled, count_tied = _pooled_utility_sorted(candidates)
    else:
        same = _same_answer(candidates.answer_id)
        pooled = _pooled_utility(candidates, same)
        count_tied = lambda tied: jnp.sum(same & tied[None, None, :, :], axis=(-2, -1))  # noqa: E731
    pooled = jnp.where(candidates.valid, pooled, -jnp.inf)
    tied = candidates.valid & (pooled == jnp.max(pooled))
    slots_of_answer = jnp.where(tied, count_tied(tied), 1)
    num_answers = jnp.sum(jnp.where(tied, 1.0 / slots_of_answer, 0.0))
    weight = jnp.where(tied, 1.0 / (slots_of_answer * num_answers), 0.0)
    return _expected_outcome(candidates, weight)


def oracle(candidates: CandidateSet) -> Outcome:
    """The best valid candidate by true principal value (uniform over ties)."""
    value = jnp.where(candidates.valid, candidates.principal_value, -jnp.inf)
    weight = (candidates.valid & (value == jnp.max(value))).astype(jnp.float32)
    return _expected_outcome(candidates, weight)


def random_candidate(candidates: CandidateSet) -> Outcome:
    """A uniformly random valid candidate (expectation)."""
    return _expected_outcome(candidates, candidates.valid.astype(jnp.float32))


def uniform_principal(candidates: CandidateSet, order: ScoreOrder | None = None) -> Outcome:
    """Uniform random submissions, the principal picks the top score (expectation).

    Slot ``(i, k)`` is picked with probability
    ``(1/K_i) prod_{j<i} P(s_j < s_i(k)) prod_{j>i} P(s_j <= s_i(k))``
    (the principal breaks ties toward the lower agent index; the product runs
    over the agents with a valid slot).

    With ``order`` (:func:`align_jax.game.ranking.score_order` of the scores)
    the product comes from running sums in score order, ``O(N K)`` instead
    of ``O(N^2 K^2)`` (see :func:`_uniform_principal_sorted`).
    """
    s, valid = candidates.principal_score, candidates.valid
    n, k = s.shape
    num_valid = jnp.sum(valid, axis=-1, keepdims=True)
    uniform = valid / jnp.maximum(num_valid, 1)
    if order is not None:
        return _uniform_principal_sorted(candidates, order, uniform, num_valid[:, 0])
    query = s[:, :, None, None]
    other = s[None, None, :, :]
    p_less = jnp.einsum("ikjl,jl->ikj", (other < query).astype(jnp.float32), uniform)
    p_leq = jnp.einsum("ikjl,jl->ikj", (other <= query).astype(jnp.float32), uniform)
    agent = jnp.arange(n)
    lower = agent[None, :] < agent[:, None]  # [i, j]: j < i
    higher = agent[None, :] > agent[:, None]
    factor = jnp.where(lower[:, None, :], p_less, jnp.where(higher[:, None, :], p_leq, 1.0))
    factor = jnp.where((num_valid[:, 0] > 0)[None, None, :], factor, 1.0)  # abstaining agents
    weight = uniform * jnp.prod(factor, axis=-1)
    return Outcome(
        principal_value=jnp.sum(weight * jnp.where(valid, candidates.principal_value, 0.0)),
        correct=jnp.sum(weight * candidates.correct.astype(jnp.float32)),
    )


def _uniform_principal_sorted(candidates: CandidateSet, order: ScoreOrder, uniform, num_valid) -> Outcome:
    """:func:`uniform_principal` in ``O(N K)`` from the game's :class:`ScoreOrder`.

    Walk all slots by ascending score, ties by descending agent.  Let
    ``c_j(p)`` count agent ``j``'s valid slots among the first ``p``.  Slot
    ``(i, k)``'s factor ``prod_{j != i} P_j`` is ``prod_{j != i} c_j(p) / K_j``
    at ``p`` = the slots scored below ``s_i(k)`` plus its tie group's slots of
    agents ``> i`` (strict for lower agents, non-strict for higher ones, as
    the principal breaks ties toward the lower index).  ``sum_j log(c_j / K_j)``
    over the agents with ``c_j > 0`` and the number of agents with ``c_j = 0``
    are running sums along that walk (each slot moves its agent's count by
    one), read at ``p``; agent ``i``'s own term is taken out.
    """
    s, valid = candidates.principal_score, candidates.valid
    n, k = s.shape
    m = n * k
    position = jnp.arange(m, dtype=jnp.int32)
    agent = position // k
    descending = order.gather[:m]  # descending position -> flat slot
    rank = jnp.zeros((m,), jnp.int32).at[descending].set(position)
    own_rank = jnp.zeros((m,), jnp.int32).at[order.gather[m:]].set(position % k)
    own_hi = (order.bounds[3] - order.block[:, None]).reshape(m)
    flat_valid = valid.reshape(m)
    total = num_valid.astype(jnp.float32)  # K_j
    # valid_above[f]: agent's valid slots ranked above slot f in its own descending order.
    own_valid = exclusive_prefix_sum(flat_valid[order.gather[m:]].astype(jnp.int32))  # [M + 1]
    block_base = own_valid[k * agent]
    valid_above = own_valid[k * agent + own_rank] - block_base
    below = total[agent] - 1.0 - valid_above.astype(jnp.float32)  # c_j before this slot, walking up
    log_total = jnp.log(jnp.maximum(total, 1.0))[agent]
    step = jnp.where(below > 0, jnp.log1p(1.0 / jnp.maximum(below, 1.0)), -log_total)
    step = jnp.where(flat_valid, step, 0.0)
    first = (flat_valid & (below == 0)).astype(jnp.int32)
    # Ascending walk = descending order reversed: running sums from the end.
    log_sum = exclusive_prefix_sum(step[descending][::-1])  # [M + 1]: over the p lowest
    started = exclusive_prefix_sum(first[descending][::-1])
    walked = m - (rank + own_hi - own_rank)  # p per slot
    own_below = total[agent] - (own_valid[k * agent + own_hi] - block_base).astype(jnp.float32)
    present = jnp.sum(num_valid > 0)
    zeros = present - started[walked] - (own_below == 0).astype(jnp.int32)
    log_others = log_sum[walked] - jnp.where(own_below > 0, jnp.log(jnp.maximum(own_below, 1.0)) - log_total, 0.0)
    # A product of probabilities: <= 1 (clamped against rounding; padding slots get 0).
    factor = jnp.where(flat_valid & (zeros == 0), jnp.exp(jnp.minimum(log_others, 0.0)), 0.0).reshape(n, k)
    weight = uniform * factor
    return Outcome(
        principal_value=jnp.sum(weight * jnp.where(valid, candidates.principal_value, 0.0)),
        correct=jnp.sum(weight * candidates.correct.astype(jnp.float32)),
    )


def baselines(candidates: CandidateSet, feedback: Union[str, ScoreOrder] = "auto") -> Baselines:
    """All reference rules of :class:`align_jax.game.types.Baselines` for one game.

    Args:
      feedback: ``"dense"`` (``[N, K, N, K]`` comparisons), ``"sorted"``
        (sorts: ``O(N^2 K + N K log(N K))``), ``"auto"`` (by shape, as the
        ranking feedback), or the game's precomputed
        :class:`~align_jax.game.ranking.ScoreOrder` (sorted, reusing it).
    """
    n, k = candidates.valid.shape
    order = feedback if isinstance(feedback, ScoreOrder) else None
    if order is None and resolve_feedback(feedback, n, k) == "sorted":
        order = score_order(candidates.principal_score)
    return Baselines(
        fair_single=fair_single_agent(candidates, sorted_by_answer=order is not None),
        oracle=oracle(candidates),
        random=random_candidate(candidates),
        uniform_principal=uniform_principal(candidates, order),
    )
