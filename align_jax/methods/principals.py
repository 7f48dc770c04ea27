"""Principals: how the candidates' ``principal_score`` is filled.

A principal scores every slot ``(i, k)`` of a question (``[N, K]``, entries beyond an
agent's slots are 0 and masked later). The game sees only these scores; what the
principal truly wants (``principal_value``) is correctness, used for evaluation only.

* ``verifier``: an LLM judges each slot's representative solution. The prompt is the
  model's chat template around ``"Question: <q>\\n\\nProposed solution:\\n<text>\\n\\n"
  "Is this solution correct? Answer Yes or No."`` and the score is
  ``log p("Yes" | prompt) - log p("No" | prompt)``: one forward pass per slot when both
  words are single tokens (read off the next-token distribution), else two scored
  continuations.
* ``ranker``: an LLM ranks the distinct submitted answers. The M distinct extracted
  answers of the question (canonical classes, in first-appearance order) are listed as
  ``(A) a_1 ... (M) a_M`` under the question with ``"Which answer is correct? Reply
  with the letter only."``; with ``l_j = log p(label_j | prompt)`` the ranker's
  preference for answer j is the log-softmax ``l_j - logsumexp_m l_m``. To cancel
  position bias this is averaged over the listing in forward and reversed order.
  A slot's score is the preference of its answer (slots with the same answer get the
  same score); a "no answer" slot is ranked below every listed answer
  (``min_j score_j - 1``; 0 when no answer exists at all). Cost: 2 forward passes per
  question (labels beyond ``Z`` are numbers and cost one scored sequence each).
* ``oracle``: ``1`` for a correct slot, ``0`` otherwise (upper-bound studies).
* ``noisy_oracle``: the oracle with each slot's judgement flipped independently with
  probability ``flip_rate``; the flips are a deterministic function of
  ``(seed, question id, agent, slot)``, so reruns and resumes agree.
"""

from __future__ import annotations

import hashlib
from typing import Mapping, NamedTuple, Optional, Sequence

import numpy as np

from align_jax.methods.candidates import Cost, ModelPool, QuestionCandidates

__all__ = [
    "PRINCIPAL_TYPES",
    "VERIFIER_QUESTION",
    "VERIFIER_LABELS",
    "RANKER_QUESTION",
    "PrincipalScores",
    "oracle_scores",
    "noisy_oracle_scores",
    "verifier_messages",
    "verifier_scores",
    "ranker_labels",
    "ranker_messages",
    "ranker_scores",
    "score_questions",
]

PRINCIPAL_TYPES = ("verifier", "ranker", "oracle", "noisy_oracle")
VERIFIER_QUESTION = "Is this solution correct? Answer Yes or No."
RANKER_QUESTION = "Which answer is correct? Reply with the letter only."
VERIFIER_LABELS = ("Yes", "No")


class PrincipalScores(NamedTuple):
    """Scores of one question's slots.

    Attributes:
      score: float32 ``[N, K]`` (0 beyond each agent's slots).
      cost: :class:`Cost` of computing them (0 for the oracles).
    """

    score: np.ndarray
    cost: Cost


def _slot_shape(question: QuestionCandidates, num_slots: int) -> tuple[int, int]:
    return question.num_agents, num_slots


def oracle_scores(question: QuestionCandidates, correct_by_id: Mapping[int, bool], num_slots: int) -> PrincipalScores:
    """``1.0`` for correct slots, ``0.0`` otherwise, ``[N, K]``."""
    score = np.zeros(_slot_shape(question, num_slots), np.float32)
    for i, agent in enumerate(question.agents):
        for s, slot in enumerate(agent.slots):
            score[i, s] = float(bool(correct_by_id.get(slot.answer_id, False)))
    return PrincipalScores(score, Cost())


def _flip_uniforms(seed: int, question_id: str, shape: tuple[int, int]) -> np.ndarray:
    digest = hashlib.sha256(f"{seed}/{question_id}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return rng.random(shape)


def noisy_oracle_scores(question: QuestionCandidates, correct_by_id: Mapping[int, bool], num_slots: int, *,
                        flip_rate: float, seed: int, question_id: str) -> PrincipalScores:
    """The oracle's 0/1 judgement of each slot, flipped with probability ``flip_rate``.

    The uniforms deciding the flips depend only on ``(seed, question_id)`` and the slot
    position, not on the batch a question was processed in.
    """
    if not 0.0 <= flip_rate <= 1.0:
        raise ValueError(f"flip_rate must be in [0, 1], got {flip_rate}")
    exact = oracle_scores(question, correct_by_id, num_slots).score
    flips = _flip_uniforms(seed, question_id, exact.shape) < flip_rate
    return PrincipalScores(np.where(flips, 1.0 - exact, exact).astype(np.float32), Cost())


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
    out = [np.zeros(_slot_shape(question, num_slots), np.float32) for question in questions]
    per_prompt = _share(total, len(prompts))
    costs = [Cost() for _ in questions]
    for j, (q, i, s) in enumerate(owners):
        out[q][i, s] = logprob[j, 0] - logprob[j, 1]
        costs[q] = costs[q] + per_prompt[j]
    return [PrincipalScores(score, cost) for score, cost in zip(out, costs)]


def _share(total: Cost, count: int) -> list[Cost]:
    """Splits a cost over ``count`` equal items (integer parts, remainders to the first items)."""
    if count == 0:
        return []
    parts = []
    for field in total:
        base, extra = divmod(int(field), count)
        parts.append([base + (1 if j < extra else 0) for j in range(count)])
    return [Cost(*values) for values in zip(*parts)]


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
    """The ranker's preference for each slot's answer (see module docstring)."""
    results = []
    for text, question in zip(question_texts, questions):
        score = np.zeros(_slot_shape(question, num_slots), np.float32)
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


def score_questions(principal_type: str, *, pool: Optional[ModelPool], model: Optional[str],
                    question_texts: Sequence[str], question_ids: Sequence[str],
                    questions: Sequence[QuestionCandidates], correct_by_id: Sequence[Mapping[int, bool]],
                    num_slots: int, flip_rate: float = 0.0, seed: int = 0,
                    batch_size: int = 8) -> list[PrincipalScores]:
    """Dispatches to the principal named ``principal_type`` for a window of questions."""
    if principal_type == "oracle":
        return [oracle_scores(q, c, num_slots) for q, c in zip(questions, correct_by_id)]
    if principal_type == "noisy_oracle":
        return [
            noisy_oracle_scores(q, c, num_slots, flip_rate=flip_rate, seed=seed, question_id=qid)
            for q, c, qid in zip(questions, correct_by_id, question_ids)
        ]
    if principal_type in ("verifier", "ranker"):
        if pool is None or model is None:
            raise ValueError(f"principal {principal_type!r} needs a model pool and a model name")
        scorer = verifier_scores if principal_type == "verifier" else ranker_scores
        return scorer(pool, model, question_texts, questions, num_slots, batch_size=batch_size)
    raise ValueError(f"unknown principal type {principal_type!r}; expected one of {PRINCIPAL_TYPES}")
