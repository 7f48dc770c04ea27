"""``ranker``: an LLM ranks the distinct submitted answers.

The M distinct extracted answers of the question (canonical classes, in
first-appearance order) are listed as ``(A) a_1 ... (M) a_M`` under the question with
``"Which answer is correct? Reply with the letter only."``; with
``l_j = log p(label_j | prompt)`` the ranker's preference for answer j is the
log-softmax ``l_j - logsumexp_m l_m``. To cancel position bias this is averaged over
the listing in forward and reversed order. A slot's score is the preference of its
answer (slots with the same answer get the same score); a "no answer" slot is ranked
below every listed answer (``min_j score_j - 1``; 0 when no answer exists at all).
Cost: 2 forward passes per question (labels beyond ``Z`` are numbers and cost one
scored sequence each).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from align_jax.methods.candidates import Cost, ModelPool, QuestionCandidates
from align_jax.methods.principals.base import (
    PRINCIPALS,
    LLMPrincipal,
    PrincipalScores,
)

__all__ = ["RANKER_QUESTION", "Ranker", "ranker_labels", "ranker_messages", "ranker_scores"]

RANKER_QUESTION = "Which answer is correct? Reply with the letter only."


def ranker_labels(count: int) -> list[str]:
    """Option labels: ``A..Z`` for up to 26 answers, else ``1..M``."""
    if count <= 26:
        return [chr(ord("A") + j) for j in range(count)]
    return [str(j + 1) for j in range(count)]


def ranker_messages(question_text: str, answers: Sequence[str]) -> list[dict]:
    """The ranking conversation listing ``answers`` as ``(A) ... (M)`` (see :func:`ranker_labels`)."""
    labels = ranker_labels(len(answers))
    listing = "\n".join(f"({label}) {answer}" for label, answer in zip(labels, answers))
    return [{
        "role": "user",
        "content": f"Question: {question_text}\n\nCandidate answers:\n{listing}\n\n{RANKER_QUESTION}",
    }]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = np.max(x)
    return x - (m + np.log(np.sum(np.exp(x - m))))


def ranker_scores(pool: ModelPool, model: str, question_texts: Sequence[str],
                  questions: Sequence[QuestionCandidates], num_slots: int, *,
                  batch_size: int = 8) -> list[PrincipalScores]:
    """The ranker's preference for each slot's answer (see the module docstring)."""
    results = []
    for text, question in zip(question_texts, questions):
        score = np.zeros((question.num_agents, num_slots), np.float32)
        ids = list(question.answers_by_id)
        preference: dict[int, float] = {}
        cost = Cost()
        if ids:
            labels = ranker_labels(len(ids))
            orders = (ids, ids[::-1])
            prompts = [pool.render_chat(model, ranker_messages(text, [question.answers_by_id[a] for a in order]))
                       for order in orders]
            logprob, cost = pool.label_logprobs(model, prompts, labels, batch_size=batch_size)
            forward = _log_softmax(logprob[0])
            backward = _log_softmax(logprob[1])[::-1]
            for a, value in zip(ids, 0.5 * (forward + backward)):
                preference[a] = float(value)
        floor = (min(preference.values()) - 1.0) if preference else 0.0
        for i, agent in enumerate(question.agents):
            for s, slot in enumerate(agent.slots):
                score[i, s] = preference.get(slot.answer_id, floor)
        results.append(PrincipalScores(score, cost))
    return results


class Ranker(LLMPrincipal):
    """The LLM ranker of distinct answers (see the module docstring); fields ``pool``,
    ``model``, ``batch_size`` (:class:`~align_jax.methods.principals.base.LLMPrincipal`)."""

    name = "ranker"
    answer_level = True
    score_window = staticmethod(ranker_scores)


PRINCIPALS.register("ranker", Ranker.from_section)
