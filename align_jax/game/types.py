"""Pytrees of the delegation game: candidate sets, static configuration, results.

Shapes use fixed letters: Q questions (games), N agents, K candidate slots per
agent, T rounds.  Every array type here is a plain ``NamedTuple`` of arrays, so
it is a pytree that ``jit``, ``vmap`` and ``lax.scan`` accept as is.  Static
structure (N, K, T, the mode, the step-size schedule) lives in the frozen,
hashable :class:`GameConfig`; the numbers one sweeps (the step size) live in
:class:`GameParams` as array leaves, so one compiled function serves a sweep.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.game.learner import LEARNERS
from align_jax.game.ranking import FEEDBACK_METHODS
from align_jax.registry import UnknownNameError

__all__ = [
    "CandidateSet",
    "GameConfig",
    "GameParams",
    "Outcome",
    "Baselines",
    "Trajectory",
    "GameResult",
    "GameInputError",
    "make_candidates",
    "validate_candidates",
]

MODES = ("expected", "sampled")
SCHEDULES = ("constant", "anytime")
FEEDBACKS = FEEDBACK_METHODS


class GameInputError(ValueError):
    """Bad input for the game engine (raised before any compilation).

    Attributes:
      field: name of the offending field when there is one (config loaders use
        it to point at the file and line).
    """

    def __init__(self, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.field = field


class CandidateSet(NamedTuple):
    """The candidates of one or many games.

    Leading batch axes are free (``[N, K]`` for one game, ``[Q, N, K]`` for a
    batch).  Both the synthetic generator and the real LLM pipeline produce it.

    Attributes:
      answer_id: int32 ``[..., N, K]`` canonical answer of each slot (equal ids
        mean equal answers, across agents too).
      valid: bool ``[..., N, K]`` padding mask.  An agent with no valid slot
        abstains (it never submits and the game is played among the others);
        every game needs at least one valid slot.
      agent_utility: float32 ``[..., N, K]`` the agent's internal utility
        ``u_i(k) >= 0`` (e.g. self-consistency frequency).
      principal_score: float32 ``[..., N, K]`` the score ``s_i(k)`` the
        principal's ranking is based on (what the game sees).
      principal_value: float32 ``[..., N, K]`` the principal's true utility of
        the slot, for evaluation only (equals ``principal_score`` when the
        principal is noiseless; never seen by the game).
      correct: bool ``[..., N, K]`` ground truth when known (evaluation only).
    """

    answer_id: jax.Array
    valid: jax.Array
    agent_utility: jax.Array
    principal_score: jax.Array
    principal_value: jax.Array
    correct: jax.Array

    @property
    def num_agents(self) -> int:
        return self.valid.shape[-2]

    @property
    def num_candidates(self) -> int:
        return self.valid.shape[-1]


def make_candidates(
    agent_utility,
    principal_score,
    *,
    valid=None,
    answer_id=None,
    principal_value=None,
    correct=None,
) -> CandidateSet:
    """Builds a :class:`CandidateSet`, filling the optional fields.

    Args:
      agent_utility: ``[..., N, K]`` internal utilities.
      principal_score: ``[..., N, K]`` principal scores.
      valid: ``[..., N, K]`` mask, default all valid.
      answer_id: ``[..., N, K]`` answer ids, default every slot its own answer.
      principal_value: default ``principal_score``.
      correct: default all ``False``.
    """
    agent_utility = jnp.asarray(agent_utility, jnp.float32)
    principal_score = jnp.asarray(principal_score, jnp.float32)
    shape = agent_utility.shape
    if principal_score.shape != shape:
        raise GameInputError(
            f"principal_score has shape {principal_score.shape}, agent_utility {shape}"
        )
    if valid is None:
        valid = jnp.ones(shape, bool)
    if answer_id is None:
        n, k = shape[-2], shape[-1]
        answer_id = jnp.broadcast_to(jnp.arange(n * k, dtype=jnp.int32).reshape(n, k), shape)
    if principal_value is None:
        principal_value = principal_score
    if correct is None:
        correct = jnp.zeros(shape, bool)
    return CandidateSet(
        answer_id=jnp.asarray(answer_id, jnp.int32),
        valid=jnp.asarray(valid, bool),
        agent_utility=agent_utility,
        principal_score=principal_score,
        principal_value=jnp.asarray(principal_value, jnp.float32),
        correct=jnp.asarray(correct, bool),
    )


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


_DTYPES = {
    "answer_id": (jnp.integer, "an integer"),
    "valid": (jnp.bool_, "a bool"),
    "agent_utility": (jnp.floating, "a float"),
    "principal_score": (jnp.floating, "a float"),
    "principal_value": (jnp.floating, "a float"),
    "correct": (jnp.bool_, "a bool"),
}


def validate_candidates(candidates: CandidateSet, *, values: bool = True) -> None:
    """Checks a candidate set; raises :class:`GameInputError`.

    Checks the leaves' shapes agree and their dtypes (``valid`` and
    ``correct`` bool, ``answer_id`` integer, the utilities and scores float)
    -- these checks also run on traced inputs (inside ``jit``, at trace time).
    With ``values`` and concrete inputs it also checks, on the host, that
    utilities and scores are finite where valid, agent utilities are
    non-negative, and every question has at least one valid slot (an agent
    without one abstains, which is allowed).  The error names the field and
    the first offending question / agent / slot.
    """
    if not isinstance(candidates, CandidateSet):
        raise GameInputError(f"expected a CandidateSet, got {type(candidates).__name__}")
    shape = np.shape(candidates.valid)
    if len(shape) < 2:
        raise GameInputError(f"CandidateSet.valid must be [..., N, K], got shape {shape}")
    for name, value in candidates._asdict().items():
        if tuple(np.shape(value)) != tuple(shape):
            raise GameInputError(
                f"CandidateSet.{name} has shape {tuple(np.shape(value))}, expected {tuple(shape)}"
            )
        kind, what = _DTYPES[name]
        dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
        if not jnp.issubdtype(dtype, kind):
            raise GameInputError(f"CandidateSet.{name} must be {what} array, got dtype {dtype}", name)
    if shape[-1] < 1:
        raise GameInputError(f"K (CandidateSet.valid.shape[-1]) must be >= 1, got {shape[-1]}")
    if shape[-2] < 1:
        raise GameInputError(f"N (CandidateSet.valid.shape[-2]) must be >= 1, got {shape[-2]}")
    if not values or not all(_is_concrete(v) for v in candidates):
        return
    valid = np.asarray(candidates.valid)

    def where(mask) -> str:
        idx = tuple(int(i) for i in np.argwhere(mask)[0])
        labels = ["question"] * (len(idx) - 2) + ["agent", "slot"]
        return ", ".join(f"{lab} {i}" for lab, i in zip(labels, idx))

    for name in ("agent_utility", "principal_score", "principal_value"):
        value = np.asarray(getattr(candidates, name))
        bad = valid & ~np.isfinite(value)
        if bad.any():
            raise GameInputError(
                f"CandidateSet.{name} is not finite ({value[bad][0]}) at {where(bad)}"
            )
    negative = valid & (np.asarray(candidates.agent_utility) < 0)
    if negative.any():
        raise GameInputError(
            f"CandidateSet.agent_utility must be >= 0, got "
            f"{np.asarray(candidates.agent_utility)[negative][0]} at {where(negative)}"
        )
    empty = ~valid.any(axis=(-2, -1))
    if empty.any():
        idx = tuple(int(i) for i in np.argwhere(empty)[0]) if empty.ndim else ()
        loc = ", ".join(f"question {i}" for i in idx) or "the game"
        raise GameInputError(
            f"CandidateSet.valid: {loc} has no valid candidate in any agent (nothing to delegate)"
        )


@dataclasses.dataclass(frozen=True)
class GameConfig:
    """Static structure of the delegation game (a ``jit`` static argument).

    Attributes:
      num_rounds: T, the number of submission/ranking/update rounds.
      mode: ``"expected"``: each agent's feedback is the exact expectation over
        the others' mixed strategies (deterministic); ``"sampled"``: each round
        every agent draws a submission from its policy (uses the key).
      schedule: ``"constant"``: ``eta_t = eta``; ``"anytime"``:
        ``eta_t = c * sqrt(log K_i / t)`` with ``c = GameParams.step_size`` and
        ``K_i`` the agent's number of valid slots.
      early_stop_tol: if > 0, an agent-profile whose policies moved less than
        this in max-abs over a round stops updating (a mask: shapes stay
        static and the remaining rounds are no-ops).  0 disables.
      record_trajectory: also return per-round regret, bound, Nash gap of the
        running average and policies (memory grows with T only then).
      learner: the agents' online learner, a name registered in
        :data:`align_jax.game.learner.LEARNERS` (``"hedge"``,
        ``"regret_matching_plus"``, ...).
      feedback: implementation of the expected ranking feedback (expected
        mode's rounds and every mode's Nash gap): ``"dense"`` (the
        ``[N, K, N, K]`` comparison, ``O(N^2 K^2)`` a round), ``"sorted"``
        (scores sorted once per game, ``O(N K)`` a round) or ``"auto"`` (by
        shape, :func:`align_jax.game.ranking.resolve_feedback`).  Equal
        results up to float32 rounding.
    """

    num_rounds: int = 20
    mode: str = "expected"
    schedule: str = "constant"
    early_stop_tol: float = 0.0
    record_trajectory: bool = False
    learner: str = "hedge"
    feedback: str = "auto"

    def __post_init__(self):
        if not isinstance(self.num_rounds, (int, np.integer)) or self.num_rounds < 1:
            raise GameInputError(
                f"GameConfig.num_rounds must be an integer >= 1, got {self.num_rounds!r}", "num_rounds"
            )
        if self.mode not in MODES:
            raise GameInputError(f"GameConfig.mode must be one of {MODES}, got {self.mode!r}", "mode")
        if self.schedule not in SCHEDULES:
            raise GameInputError(
                f"GameConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}", "schedule"
            )
        try:
            tol = float(self.early_stop_tol)
        except (TypeError, ValueError):
            tol = float("nan")
        if not np.isfinite(tol) or tol < 0:
            raise GameInputError(
                f"GameConfig.early_stop_tol must be >= 0, got {self.early_stop_tol!r}", "early_stop_tol"
            )
        if self.feedback not in FEEDBACKS:
            raise GameInputError(
                f"GameConfig.feedback must be one of {FEEDBACKS}, got {self.feedback!r}", "feedback"
            )
        try:
            LEARNERS.get(self.learner, field="learner")
        except UnknownNameError as exc:
            raise GameInputError(f"GameConfig.learner: {exc}", "learner") from None


class GameParams(NamedTuple):
    """Numbers swept over without recompiling (array leaves, batchable).

    Attributes:
      step_size: float32 ``[]`` (or ``[Q]`` when vmapped): ``eta`` for the
        constant schedule, ``c`` for the anytime schedule.  Must be > 0.
    """

    step_size: jax.Array

    @staticmethod
    def create(step_size=0.1) -> "GameParams":
        value = np.asarray(step_size, np.float32) if _is_concrete(step_size) else step_size
        if _is_concrete(step_size):
            if not np.all(np.isfinite(value)) or np.any(value <= 0):
                raise GameInputError(
                    f"GameParams.step_size (eta) must be finite and > 0, got {step_size!r}", "step_size"
                )
        return GameParams(step_size=jnp.asarray(value, jnp.float32))


class Outcome(NamedTuple):
    """What a selection rule delivers to the principal (per game).

    Attributes:
      principal_value: float32 ``[]`` expected true principal utility of the
        pick (an expectation where the rule randomizes or breaks ties).
      correct: float32 ``[]`` probability that the pick is correct.
    """

    principal_value: jax.Array
    correct: jax.Array


class Baselines(NamedTuple):
    """Reference selection rules on the same candidates (per game).

    Attributes:
      fair_single: one agent with all N*K pooled candidates that picks by its
        pooled utility ``bar u(a) = (1/N) sum_i max_{k: id_i(k)=a} u_i(k)``
        (ties between answers broken uniformly; among slots of the picked
        answer uniformly).
      oracle: the principal's best valid candidate (by ``principal_value``).
      random: a uniformly random valid candidate.
      uniform_principal: every agent submits a uniformly random valid slot and
        the principal picks the submission with the highest score (ALIGN with
        no learning).
    """

    fair_single: Outcome
    oracle: Outcome
    random: Outcome
    uniform_principal: Outcome


class Trajectory(NamedTuple):
    """Per-round records (only with ``GameConfig.record_trajectory``).

    Attributes:
      regret: float32 ``[T, N]`` external regret after each round.
      regret_bound: float32 ``[T, N]`` the learner's regret bound after each
        round (``+inf`` for a learner without one).
      nash_gap: float32 ``[T]`` Nash gap of the running time-averaged profile.
      policy: float32 ``[T, N, K]`` the policy played in each round.
      active: bool ``[T]`` whether the round updated (early stopping).
    """

    regret: jax.Array
    regret_bound: jax.Array
    nash_gap: jax.Array
    policy: jax.Array
    active: jax.Array


class GameResult(NamedTuple):
    """Everything :func:`align_jax.game.play` returns for one game.

    With a batch, every leaf gains the leading batch axes.

    Attributes:
      average_policy: float32 ``[N, K]`` time-averaged policy over played rounds.
      final_policy: float32 ``[N, K]`` the policy after the last update.
      submission: int32 ``[N]`` each agent's final submission
        (argmax of its average policy); ``-1`` for an agent with no valid
        slot (it abstains; its policies are all zero).
      chosen_agent: int32 ``[]`` whose submission the principal picked
        (``-1`` if no agent has a valid slot: a game ``validate_candidates``
        rejects, then with zero outcome).
      chosen_answer: int32 ``[]`` the answer id of the final answer (``-1``
        with no pick).
      align: :class:`Outcome` of ALIGN's final answer.
      baselines: :class:`Baselines`.
      rounds_played: int32 ``[]`` rounds that updated (``T`` without early stop).
      regret: float32 ``[N]`` external regret ``max_k sum_t r_t(k) - sum_t <pi_t, r_t>``
        (measured by the engine, whatever the learner; 0 for an abstaining agent).
      regret_bound: float32 ``[N]`` the learner's bound for that regret (for
        Hedge, the schedule's bound; ``+inf`` for a learner without one).
      deviation_gain: float32 ``[N]`` each agent's best unilateral gain
        against the average profile.
      nash_gap: float32 ``[]`` ``max_i deviation_gain_i`` (exploitability).
      pareto_compliance: float32 ``[]`` share of final submissions that are
        Pareto-optimal in (agent utility, principal score) among the agent's
        own slots (over the agents that have a valid slot).
      pareto_mass: float32 ``[]`` mean policy mass on Pareto-optimal slots
        over the played rounds (the expected share of per-round submissions;
        over the agents that have a valid slot).
      trajectory: :class:`Trajectory` or ``None``.
    """

    average_policy: jax.Array
    final_policy: jax.Array
    submission: jax.Array
    chosen_agent: jax.Array
    chosen_answer: jax.Array
    align: Outcome
    baselines: Baselines
    rounds_played: jax.Array
    regret: jax.Array
    regret_bound: jax.Array
    deviation_gain: jax.Array
    nash_gap: jax.Array
    pareto_compliance: jax.Array
    pareto_mass: jax.Array
    trajectory: Optional[Trajectory]
