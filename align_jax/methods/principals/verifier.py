"""``verifier``: an LLM judges each slot's representative solution.

The prompt is the model's chat template around ``"Question: <q>\\n\\nProposed
solution:\\n<text>\\n\\nIs this solution correct? Answer Yes or No."`` and the score is
``log p("Yes" | prompt) - log p("No" | prompt)``: one forward pass per slot when both
words are single tokens (read off the next-token distribution), else two scored
continuations.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from align_jax.methods.candidates import Cost, ModelPool, QuestionCandidates
from align_jax.methods.principals.base import (
    PRINCIPALS,
    LLMPrincipal,
    PrincipalScores,
    share_cost,
)

__all__ = ["VERIFIER_QUESTION", "VERIFIER_LABELS", "Verifier", "verifier_messages", "verifier_scores"]

VERIFIER_QUESTION = "Is this solution correct? Answer Yes or No."
VERIFIER_LABELS = ("Yes", "No")


def verifier_messages(question_text: str, solution: str) -> list[dict]:
    """The judging conversation for one solution."""
    return [{
        "role": "user",
        "content": f"Question: {question_text}\n\nProposed solution:\n{solution}\n\n{VERIFIER_QUESTION}",
    }]


def verifier_scores(pool: ModelPool, model: str, question_texts: Sequence[str],
                    questions: Sequence[QuestionCandidates], num_slots: int, *,
                    batch_size: int = 8) -> list[PrincipalScores]:
    """``log p("Yes") - log p("No")`` for every slot of every question of a window.

    All judging prompts of the window go through one :meth:`ModelPool.label_logprobs`
    call (one forward pass per slot when "Yes" and "No" are single tokens, as in the
    Qwen2 and SmolLM2 vocabularies). Each question's cost is its own prompts' share.
    """
    prompts, owners = [], []
    for q, (text, question) in enumerate(zip(question_texts, questions)):
        for i, agent in enumerate(question.agents):
            for s, slot in enumerate(agent.slots):
                solution = agent.texts[slot.representative]
                prompts.append(pool.render_chat(model, verifier_messages(text, solution)))
                owners.append((q, i, s))
    logprob, total = pool.label_logprobs(model, prompts, VERIFIER_LABELS, batch_size=batch_size)
    out = [np.zeros((question.num_agents, num_slots), np.float32) for question in questions]
    per_prompt = share_cost(total, len(prompts))
    costs = [Cost() for _ in questions]
    for j, (q, i, s) in enumerate(owners):
        out[q][i, s] = logprob[j, 0] - logprob[j, 1]
        costs[q] = costs[q] + per_prompt[j]
    return [PrincipalScores(score, cost) for score, cost in zip(out, costs)]


class Verifier(LLMPrincipal):
    """The LLM verifier (see the module docstring); fields ``pool``, ``model``, ``batch_size``
    (:class:`~align_jax.methods.principals.base.LLMPrincipal`)."""

    name = "verifier"
    answer_level = False
    score_window = staticmethod(verifier_scores)


PRINCIPALS.register("verifier", Verifier.from_section)
