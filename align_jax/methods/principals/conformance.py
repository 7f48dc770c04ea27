"""The conformance test every principal must pass (in the spirit of pgx's ``api_test(env)``).

    from align_jax.methods.principals import make_principal, PrincipalSection
    from align_jax.methods.principals.conformance import principal_api_test

    principal_api_test(make_principal(PrincipalSection(type="arithmetic")))

:func:`principal_api_test` scores a batch (by default :func:`example_batch`: three
agents with different numbers of samples, answers shared across agents, an agent
without any answer, right and wrong arithmetic) and checks the contract of
:class:`~align_jax.methods.principals.Principal`; a violation raises
:class:`PrincipalContractError` naming the question, agent and slot.
"""

from __future__ import annotations

import copy
from typing import Optional

import numpy as np

from align_jax.methods.candidates import Cost, build_question_candidates, slot_correctness
from align_jax.methods.principals.base import Principal, PrincipalBatch, PrincipalScores

__all__ = ["PrincipalContractError", "example_batch", "principal_api_test"]


class PrincipalContractError(AssertionError):
    """A principal broke its contract (the message says which rule, where)."""


_EXAMPLE = [
    ("Tom has 3 boxes of 4 apples and eats 2. How many apples are left?", "10", [
        ["3 * 4 = 12 apples. 12 - 2 = 10. The answer is \\boxed{10}.",
         "3 * 4 = 12, then 12 - 2 = 9. \\boxed{9}",
         "He has 3 + 4 = 7 apples, 7 - 2 = 5. \\boxed{5}",
         "3 * 4 = 12 and 12 - 2 = 10, so \\boxed{10}"],
        ["Boxes: 3 x 4 = 12; eaten 2; left 12 - 2 = 10.\n#### 10",
         "I think it is 12.\n#### 12"],
        ["no idea", "still thinking", "hmm"],
    ]),
    ("A shirt costs $20 and is 25% off. What is the price?", "15", [
        ["25% of 20 = 5, so 20 - 5 = 15. \\boxed{15}",
         "\\[ 20 \\times 0.25 = 4 \\] so the price is \\( 20 - 4 = 16 \\). \\boxed{16}",
         "The price is 15."],
        ["20 - 25 = -5, so \\boxed{-5}", "\\frac{3}{4} \\times 20 = 15. \\boxed{15}"],
        ["20 * 0.75 = 15\n#### 15", "20 * 3 / 4 = 15\n#### 15", "$20 - $5 = $15\n#### 15"],
    ]),
    ("What is 7 + 8?", "15", [
        ["7 + 8 = 15. \\boxed{15}"],
        ["7 + 8 = 16. \\boxed{16}", "7 + 8 = 15. \\boxed{15}"],
        ["\\boxed{15}"],
    ]),
]


def example_batch() -> PrincipalBatch:
    """Three questions, N = 3 agents (1 to 4 samples each), K = 4 slots."""
    texts, ids, questions, correct = [], [], [], []
    for q, (text, gold, agents) in enumerate(_EXAMPLE):
        question = build_question_candidates(agents)
        texts.append(text)
        ids.append(f"example/{q}")
        questions.append(question)
        correct.append(slot_correctness(question, gold))
    return PrincipalBatch(texts, ids, questions, correct, 4)


def _fail(message: str):
    raise PrincipalContractError(message)


def _check_scores(principal: Principal, batch: PrincipalBatch, out, what: str) -> list[np.ndarray]:
    if not isinstance(out, list) or len(out) != batch.size:
        _fail(f"{principal.name}: score({what}) must return a list of {batch.size} PrincipalScores, got {out!r:.80}")
    arrays = []
    for q, (scores, question) in enumerate(zip(out, batch.questions)):
        where = f"{principal.name}: question {q} ({batch.question_ids[q]})"
        if not isinstance(scores, PrincipalScores):
            _fail(f"{where}: expected PrincipalScores, got {type(scores).__name__}")
        score = scores.score
        if not isinstance(score, np.ndarray) or score.dtype != np.float32:
            _fail(f"{where}: score must be a float32 numpy array, got {type(score).__name__} "
                  f"{getattr(score, 'dtype', '')}")
        if score.shape != (question.num_agents, batch.num_slots):
            _fail(f"{where}: score has shape {score.shape}, expected [N, K] = "
                  f"{(question.num_agents, batch.num_slots)}")
        if not np.all(np.isfinite(score)):
            i, s = np.argwhere(~np.isfinite(score))[0]
            _fail(f"{where}: agent {i} slot {s}: non-finite score {score[i, s]}")
        for i, agent in enumerate(question.agents):
            beyond = score[i, len(agent.slots):]
            if np.any(beyond != 0):
                _fail(f"{where}: agent {i}: scores beyond its {len(agent.slots)} slots must be 0, got {beyond}")
        if getattr(principal, "answer_level", False):
            by_answer: dict[int, tuple[int, int, float]] = {}
            for i, agent in enumerate(question.agents):
                for s, slot in enumerate(agent.slots):
                    if slot.answer_id < 0:
                        continue
                    first = by_answer.setdefault(slot.answer_id, (i, s, float(score[i, s])))
                    if float(score[i, s]) != first[2]:
                        _fail(f"{where}: answer-level principal gives answer {slot.answer!r} {first[2]} at agent "
                              f"{first[0]} slot {first[1]} but {float(score[i, s])} at agent {i} slot {s}")
        cost = scores.cost
        if not isinstance(cost, Cost):
            _fail(f"{where}: cost must be a Cost, got {type(cost).__name__}")
        for field, value in zip(Cost._fields, cost):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                _fail(f"{where}: cost.{field} must be a non-negative integer, got {value!r}")
        if not principal.needs_model and any(cost):
            _fail(f"{where}: a principal without a model must report zero cost, got {cost}")
        arrays.append(score)
    return arrays


def _same(a: np.ndarray, b: np.ndarray, atol: float) -> bool:
    return bool(np.array_equal(a, b) if atol == 0 else np.allclose(a, b, rtol=0, atol=atol))


def principal_api_test(principal: Principal, batch: Optional[PrincipalBatch] = None, *,
                       atol: float = 0.0) -> list[PrincipalScores]:
    """Checks that ``principal`` keeps the :class:`~align_jax.methods.principals.Principal` contract.

    Checks: the attributes (``name`` a non-empty str, ``needs_model`` / ``answer_level`` /
    ``seeded`` bools); one :class:`PrincipalScores` per question; each score a float32
    ``[N, K]`` array, finite, 0 beyond each agent's slots; equal scores for slots with
    the same answer when ``answer_level``; costs non-negative integers (all zero without
    a model); determinism (the same batch twice gives the same scores); batch
    independence (each question scored alone gives its scores within the window, in
    any window order); the batch is not modified.

    Args:
      principal: the principal under test.
      batch: what to score (default :func:`example_batch`).
      atol: tolerance of the determinism and batch-independence comparisons (0: exact;
        LLM principals batch prompts of different lengths, which moves float32 logits
        by rounding).

    Returns:
      The scores of ``batch``.

    Raises:
      PrincipalContractError: the first broken rule, with question, agent and slot.
    """
    if not isinstance(getattr(principal, "name", None), str) or not principal.name:
        _fail(f"{principal!r:.60}: name must be a non-empty str")
    for flag in ("needs_model", "answer_level", "seeded"):
        if not isinstance(getattr(principal, flag, None), bool):
            _fail(f"{principal.name}: {flag} must be a bool, got {getattr(principal, flag, None)!r}")
    batch = batch if batch is not None else example_batch()
    before = copy.deepcopy(batch)
    first = principal.score(batch)
    scores = _check_scores(principal, batch, first, "batch")
    if batch != before:
        _fail(f"{principal.name}: score(batch) modified the batch")
    again = _check_scores(principal, batch, principal.score(batch), "batch, second call")
    for q, (a, b) in enumerate(zip(scores, again)):
        if not _same(a, b, atol):
            _fail(f"{principal.name}: question {q}: scoring the same batch twice gave different scores\n{a}\n{b}")
    for q in range(batch.size):
        alone = _check_scores(principal, batch.select([q]), principal.score(batch.select([q])), f"question {q} alone")
        if not _same(alone[0], scores[q], atol):
            _fail(f"{principal.name}: question {q}: scored alone {alone[0]} but {scores[q]} inside the window "
                  "(scores must not depend on the other questions)")
    reverse = list(range(batch.size))[::-1]
    reversed_scores = _check_scores(principal, batch.select(reverse), principal.score(batch.select(reverse)),
                                    "reversed batch")
    for position, q in enumerate(reverse):
        if not _same(reversed_scores[position], scores[q], atol):
            _fail(f"{principal.name}: question {q}: its scores change when the window is reordered")
    return first
