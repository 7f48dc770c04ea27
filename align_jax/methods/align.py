"""ALIGN end to end on real candidates: ``CandidateSet [Q, N, K]`` -> the delegation game.

:func:`play_window` runs the engine's :func:`align_jax.game.play_batch` once on a window of
Q questions (one jit-compiled program per ``(GameConfig, Q, N, K)``), pulls the result
to the host in one transfer, and returns per question the final answer and the game's
diagnostics:

* the principal's pick: chosen agent, its submitted slot, answer id and answer text,
  and whether it is correct (``align`` correctness from the engine);
* ``rounds_played``, per-agent external ``regret`` and its Hedge ``regret_bound``,
  the ``nash_gap`` (exploitability of the time-averaged profile), ``pareto_compliance``
  (share of final submissions Pareto-optimal in (agent utility, principal score))
  and ``pareto_mass``;
* the engine's reference rules on the same candidates (expected correctness):
  ``fair_single`` (one agent holding all N*K pooled samples, picking the pooled
  majority), ``random`` (uniform valid slot), ``uniform_principal`` (uniform
  submissions + the principal's pick) and ``oracle`` (the principal's true best).
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np

from align_jax.game.delegation import play_batch
from align_jax.game.types import CandidateSet, GameConfig, GameParams
from align_jax.methods.candidates import QuestionCandidates

__all__ = ["ENGINE_BASELINES", "play_window"]

ENGINE_BASELINES = ("fair_single", "random", "uniform_principal", "oracle")


def play_window(config: GameConfig, params: GameParams, candidates: CandidateSet,
                questions: Sequence[QuestionCandidates], key: jax.Array) -> list[dict]:
    """Plays the ALIGN game on every question of a window.

    Args:
      config: static :class:`GameConfig` (T rounds, mode, schedule).
      params: :class:`GameParams` (step size ``eta``).
      candidates: ``CandidateSet`` with leaves ``[Q, N, K]``.
      questions: the Q :class:`QuestionCandidates` the set was built from (for the
        answer text of the pick).
      key: PRNG key; question ``q`` plays with ``fold_in(key, q)`` (consumed only in
        ``mode="sampled"``).

    Raises:
      ValueError: ``candidates`` and ``questions`` disagree (a padded slot was chosen).

    Returns:
      One dict per question (JSON-serialisable) with keys ``chosen_agent``,
      ``chosen_slot``, ``answer_id``, ``answer``, ``correct``, ``rounds_played``,
      ``regret``, ``regret_bound``, ``nash_gap``, ``pareto_compliance``,
      ``pareto_mass``, ``submission``, ``average_policy`` and ``baselines``
      (``{name: expected correctness}`` for :data:`ENGINE_BASELINES`).
    """
    # question q's key is fold_in(key, q): it does not depend on how many questions the window holds
    keys = jax.vmap(lambda q: jax.random.fold_in(key, q))(np.arange(candidates.valid.shape[0]))
    result = jax.device_get(play_batch(config, candidates, keys, params))
    rows = []
    for q, question in enumerate(questions):
        agent = int(result.chosen_agent[q])
        slot = int(result.submission[q, agent])
        answer_id = int(result.chosen_answer[q])
        if agent < 0:
            raise ValueError(f"question {q}: no agent has a valid slot, so the game made no pick")
        slots = question.agents[agent].slots
        if not 0 <= slot < len(slots):
            raise ValueError(f"question {q}: the game chose agent {agent}'s slot {slot}, but that agent has only "
                             f"{len(slots)} slot(s) (a padded slot): the CandidateSet does not match the questions")
        answer: Optional[str] = slots[slot].answer
        baselines = result.baselines
        rows.append({
            "chosen_agent": agent,
            "chosen_slot": slot,
            "answer_id": answer_id,
            "answer": answer,
            "correct": float(result.align.correct[q]),
            "rounds_played": int(result.rounds_played[q]),
            "regret": [float(x) for x in result.regret[q]],
            "regret_bound": [float(x) for x in result.regret_bound[q]],
            "nash_gap": float(result.nash_gap[q]),
            "pareto_compliance": float(result.pareto_compliance[q]),
            "pareto_mass": float(result.pareto_mass[q]),
            "submission": [int(x) for x in result.submission[q]],
            "average_policy": np.round(np.asarray(result.average_policy[q], np.float64), 6).tolist(),
            "baselines": {
                "fair_single": float(baselines.fair_single.correct[q]),
                "random": float(baselines.random.correct[q]),
                "uniform_principal": float(baselines.uniform_principal.correct[q]),
                "oracle": float(baselines.oracle.correct[q]),
            },
        })
    return rows
