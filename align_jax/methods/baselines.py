"""Baselines on the same questions (and the same candidates where they apply).

Every rule returns a :class:`Pick`: the answer it selects and its *expected*
correctness in ``[0, 1]``. Rules that tie break at random are reported as the exact
expectation under a uniform tie break (no sampling noise in the comparison); the
``answer`` shown is the first tied answer in order of appearance.

* :func:`majority_vote`: self-consistency (Wang et al. 2023) over a list of sampled
  answers; unextractable samples do not vote. Used per agent (``sc/<agent>``), pooled
  over all N*K samples (``sc_pooled``) and for the debate's final vote.
* :func:`best_of_n`: the principal's top-scored slot over all agents' slots.
* :func:`pass_at_k`: 1 if any sample of any agent is correct (the ceiling).
* :func:`debate`: multi-agent debate (Du et al. 2023): round 0 is each agent's first
  candidate sample; in each of R rounds every agent sees the question (zero-shot form),
  its own previous answer and the other agents' latest solutions (tails of at most
  ``max_chars`` characters)
  and writes an updated solution (one sample at its own temperature); the final answer
  is the majority vote over the agents' last answers. Every round's generation is
  counted in its cost.

Greedy CoT per agent and the engine's fair single agent, random candidate and
uniform+principal rules are computed by :mod:`align_jax.methods.reason` and
:mod:`align_jax.game.diagnostics`.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple, Optional, Sequence

import numpy as np

from align_jax.data.answers import canonicalize, extract_answer
from align_jax.methods.candidates import AgentSpec, Cost, ModelPool, agent_conversation, sample_agents

__all__ = [
    "DEBATE_INSTRUCTION",
    "Pick",
    "majority_vote",
    "best_of_n",
    "pass_at_k",
    "debate_messages",
    "DebateResult",
    "debate",
]

DEBATE_INSTRUCTION = (
    "Using the reasoning from the other agents as additional advice, can you give an updated answer? "
    "Examine your solution and that of the other agents step by step. "
    "Put your final answer within \\boxed{}."
)


class Pick(NamedTuple):
    """A selection rule's outcome on one question.

    Attributes:
      answer: the selected extracted answer (None: the rule had nothing to select).
      answer_id: its canonical id (negative: none).
      correct: expected correctness in ``[0, 1]`` (uniform tie break).
    """

    answer: Optional[str]
    answer_id: int
    correct: float


def majority_vote(answer_ids: Sequence[int], answers: Sequence[Optional[str]],
                  correct_by_id: Mapping[int, bool]) -> Pick:
    """The most frequent answer among samples with an answer (id >= 0).

    Ties: expected correctness over a uniform choice among the tied answers.
    No sample with an answer: ``Pick(None, -1, 0.0)``.
    """
    counts: dict[int, int] = {}
    first: dict[int, int] = {}
    for index, answer_id in enumerate(answer_ids):
        if answer_id < 0:
            continue
        counts[answer_id] = counts.get(answer_id, 0) + 1
        first.setdefault(answer_id, index)
    if not counts:
        return Pick(None, -1, 0.0)
    top = max(counts.values())
    tied = [a for a, c in counts.items() if c == top]
    expected = float(np.mean([bool(correct_by_id.get(a, False)) for a in tied]))
    return Pick(answers[first[tied[0]]], int(tied[0]), expected)


def best_of_n(score: np.ndarray, valid: np.ndarray, answer_id: np.ndarray, correct: np.ndarray,
              answers_by_id: Mapping[int, str]) -> Pick:
    """The principal's top-scored valid slot over all agents (uniform over tied slots).

    Args:
      score, valid, answer_id, correct: one question's ``[N, K]`` arrays.
    """
    masked = np.where(valid, score, -np.inf)
    tied = valid & (masked == masked.max())
    expected = float(np.mean(correct[tied]))
    first = tuple(np.argwhere(tied)[0])
    chosen = int(answer_id[first])
    return Pick(answers_by_id.get(chosen), chosen, expected)


def pass_at_k(sample_ids: Sequence[Sequence[int]], correct_by_id: Mapping[int, bool]) -> float:
    """1.0 if any sample of any agent has a correct answer, else 0.0."""
    return float(any(bool(correct_by_id.get(a, False)) for ids in sample_ids for a in ids if a >= 0))


def _tail(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else "..." + text[-max_chars:]


def debate_messages(question: str, agent: AgentSpec, own_previous: str, others: Sequence[str],
                    max_chars: int) -> list[dict]:
    """One debate turn: the zero-shot question, the agent's previous answer, the others' answers.

    Few-shot exemplars are left out of debate turns (the turn has its own instruction;
    the exemplars would multiply the prompt length by the number of rounds).
    """
    listing = "\n\n".join(f"One agent solution: ```{_tail(text, max_chars)}```" for text in others)
    return [
        *agent_conversation(question, dataclasses.replace(agent, prompt_style="zero_shot_cot", exemplars=())),
        {"role": "assistant", "content": own_previous},
        {"role": "user", "content": f"These are the solutions to the problem from other agents:\n\n{listing}\n\n"
                                    f"{DEBATE_INSTRUCTION}"},
    ]


class DebateResult(NamedTuple):
    """One question's debate.

    Attributes:
      rounds: ``rounds[r][i]`` = (text, extracted answer) of agent i after round r
        (round 0 = the agent's first candidate sample).
      pick: the final majority vote.
      cost: generation cost of rounds 1..R (round 0 is counted from the candidates).
    """

    rounds: list
    pick: Pick
    cost: Cost


def debate(pool: ModelPool, agents: Sequence[AgentSpec], question_texts: Sequence[str],
           initial: Sequence[Sequence[str]], key, *, num_rounds: int, max_chars: int,
           golds: Sequence[str], correct_fn=None) -> list[DebateResult]:
    """Runs R debate rounds for a window of Q questions (batched per model group).

    Args:
      initial: ``initial[q][i]`` agent i's round-0 solution text.
      key: PRNG key; round r uses ``fold_in(key, r)``.
      golds: gold answers (for the final vote's correctness).
      correct_fn: ``(answer, gold) -> bool``; default ``answers.is_correct``.

    Returns:
      One :class:`DebateResult` per question.
    """
    import jax

    from align_jax.data.answers import is_correct

    correct_fn = correct_fn or is_correct
    n = len(agents)
    latest = [list(texts) for texts in initial]
    history = [[[(text, extract_answer(text)) for text in texts]] for texts in initial]
    costs = [Cost() for _ in question_texts]
    for r in range(1, num_rounds + 1):
        conversations = [
            [debate_messages(question_texts[q], agents[i], latest[q][i],
                             [latest[q][j] for j in range(n) if j != i], max_chars) for i in range(n)]
            for q in range(len(question_texts))
        ]
        texts, _, round_costs = sample_agents(pool, agents, question_texts, jax.random.fold_in(key, r),
                                              num_samples=1, conversations=conversations)
        for q in range(len(question_texts)):
            latest[q] = [texts[q][i][0] for i in range(n)]
            history[q].append([(text, extract_answer(text)) for text in latest[q]])
            costs[q] = sum(round_costs[q], costs[q])
    results = []
    for q, gold in enumerate(golds):
        final = [answer for _, answer in history[q][-1]]
        ids = [int(x) for x in canonicalize(final)]
        correct_by_id = {a: correct_fn(final[ids.index(a)], gold) for a in set(ids) if a >= 0}
        results.append(DebateResult(history[q], majority_vote(ids, final, correct_by_id), costs[q]))
    return results
