"""Answer extraction from model output, answer equivalence and canonical answer ids.

This is the bridge between free-form LLM text and the game engine's integer
``answer_id`` field: every candidate's text goes through :func:`extract_answer`,
the K extracted answers of one question go through :func:`canonicalize`, and the
resulting ids are what the game sees (same id = same answer across agents).

Equivalence is decided in three tiers, cheapest first:

1. identical normalised strings;
2. a pure-Python fast path for plain numbers (integers, decimals, ``a/b`` and
   ``\\frac{a}{b}``), which mirrors math-verify's numeric rule: two numbers are
   equal when they agree after rounding to 6 decimal places (exact rationals,
   so ``1,000 == 1000.00`` and ``1/3 == 0.333333`` but ``1000000 != 1000001``);
   short words (``Evelyn``, ``east``) compare case-insensitively;
3. ``math_verify.parse`` / ``math_verify.verify`` (symbolic: ``\\sqrt{4} == 2``,
   ``x=5 == 5``, sets, tuples, intervals, matrices), with parses and verdicts cached.
   math-verify spends ~0.1 s in ``sympy.simplify`` on a pair that is *not* equal, so
   before calling ``verify`` both parsed expressions are evaluated at two fixed
   pseudo-random points (free symbols substituted; a randomised identity test): values
   that differ prove inequality. Only equal-looking pairs reach ``verify``.

The text side (normalisation, extraction, plain numbers) is
:mod:`align_jax.data.answer_text`; the math-verify calls (bounded run time, failures,
the probe-point filter) are :mod:`align_jax.data.math_verify_bridge`. This module
decides equivalence and re-exports the public names of both.

math-verify failures are visible, not silent. math-verify is called with
``raise_on_error=True`` (its default swallows its own exceptions and timeouts into
"no parse" / "not equal"), one ``(gold, answer)`` parse pair at a time as its
``verify`` does. An exception or a timeout never makes two answers equal, but the
verdict it leaves is *undecided* rather than "wrong", and it is reported as a
:class:`MathVerifyFailure` naming the stage (``parse`` / ``verify``), the kind
(``error`` / ``timeout``), the gold and the answer:

* :func:`check_answer` returns a :class:`Verdict` carrying the failure;
* :func:`is_correct` (and :func:`answers_equal`, :func:`canonicalize`) keep returning a
  plain verdict so that one pathological answer does not stop a run (an undecided
  answer counts as wrong / unequal), but every such verdict is counted
  (:func:`math_verify_failure_count`), handed to every active
  :func:`collect_math_verify_failures` block (a run records them per question), and
  logged as a warning once per distinct failure; ``is_correct(..., on_failure="raise")``
  raises :class:`MathVerifyError` instead.

Verdicts are cached with their failure, so a repeated comparison reports its failure
again (counts are per verdict, not per math-verify call) without re-running it.

An answer that cannot be extracted is ``None``: it gets id ``-1`` in
:func:`canonicalize`, is never equal to anything (not even another ``None``), and
:func:`is_correct` scores it wrong.
"""

from __future__ import annotations

import functools
import re
from fractions import Fraction
from typing import NamedTuple, Optional, Sequence

import numpy as np

from align_jax.data import math_verify_bridge as _bridge
from align_jax.data.answer_text import CACHE_SIZE, as_number, extract_answer, normalize_answer, numeric_key
from align_jax.data.math_verify_bridge import (
    MATH_VERIFY_TIMEOUT_S,
    Comparison,
    MathVerifyError,
    MathVerifyFailure,
    collect_math_verify_failures,
    math_verify_failure_count,
    report_failure,
)

__all__ = [
    "MATH_VERIFY_TIMEOUT_S",
    "MathVerifyFailure",
    "MathVerifyError",
    "Verdict",
    "answers_equal",
    "canonicalize",
    "check_answer",
    "collect_math_verify_failures",
    "extract_answer",
    "is_correct",
    "math_verify_failure_count",
    "normalize_answer",
]

# Short word answers ("Evelyn", "east"), compared case-insensitively.
_WORDS_RE = re.compile(r"[A-Za-z][A-Za-z '-]*")


class Verdict(NamedTuple):
    """The judgement of one answer against a gold answer.

    Attributes:
      correct: the answer is equal to the gold answer.
      failure: why math-verify could not decide, when it could not (then ``correct`` is False).
    """

    correct: bool
    failure: Optional[MathVerifyFailure] = None

    @property
    def undecided(self) -> bool:
        """math-verify failed and nothing else proved the answer right."""
        return self.failure is not None and not self.correct



@functools.lru_cache(maxsize=CACHE_SIZE)
def _compare(gold_key: str, pred_key: str, symmetric: bool) -> Comparison:
    if not gold_key or not pred_key:
        return Comparison(False)
    if gold_key == pred_key:
        return Comparison(True)
    gold_number, pred_number = as_number(gold_key), as_number(pred_key)
    if gold_number is not None and pred_number is not None:
        return Comparison(numeric_key(gold_number) == numeric_key(pred_number))
    if _WORDS_RE.fullmatch(gold_key) and _WORDS_RE.fullmatch(pred_key):
        if len(gold_key) > 1 or len(pred_key) > 1:
            return Comparison(gold_key.strip().lower() == pred_key.strip().lower())
    # math-verify spends ~0.1 s in sympy.simplify on an unequal pair: rule those out first.
    if _bridge.fingerprints_differ(gold_key, pred_key):
        return Comparison(False)
    forward = _bridge.math_verify_compare(gold_key, pred_key)
    if forward.equal or not symmetric:
        return forward
    backward = _bridge.math_verify_compare(pred_key, gold_key)
    if backward.equal:
        return backward
    return Comparison(False, forward.failure or (backward.failure and backward.failure._replace(
        gold=gold_key, answer=pred_key)))


def _keys_equal(gold_key: str, pred_key: str, symmetric: bool) -> bool:
    """Whether two normalised answers are equal; an undecided comparison is reported and False."""
    outcome = _compare(gold_key, pred_key, symmetric)
    if outcome.failure is not None and not outcome.equal:
        report_failure(outcome.failure)
    return outcome.equal


def _check_answer(value: object, name: str) -> None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a str or None, got {type(value).__name__}")


def answers_equal(a: str | None, b: str | None) -> bool:
    """Whether two answers are the same mathematical answer.

    Symmetric: ``answers_equal(a, b) == answers_equal(b, a)``. ``None`` (no extractable
    answer) is equal to nothing, itself included. Both strings are normalised with
    :func:`normalize_answer` first, so raw gold strings (``"1,000"``, ``"\\$18.00"``)
    can be passed directly.

    Examples: ``\\frac{1}{2} == 0.5``, ``1,000 == 1000``, ``$18.00 == 18``,
    ``\u22123 == -3``, ``\\sqrt{4} == 2``, ``x=5 == 5``, ``\\text{(C)} == C``.
    """
    _check_answer(a, "a")
    _check_answer(b, "b")
    if a is None or b is None:
        return False
    return _keys_equal(normalize_answer(a), normalize_answer(b), True)


def check_answer(pred: str | None, gold: str) -> Verdict:
    """The :class:`Verdict` on a predicted (extracted) answer against the gold answer.

    Like :func:`is_correct`, but a math-verify failure is returned in the verdict
    (``verdict.undecided``) instead of being reported; nothing is counted or logged.

    Raises:
      TypeError: if ``gold`` is not a string.
      ValueError: if ``gold`` is empty after normalisation (a gold answer must exist).
    """
    _check_answer(pred, "pred")
    if not isinstance(gold, str):
        raise TypeError(f"gold must be a str, got {type(gold).__name__}")
    gold_key = normalize_answer(gold)
    if not gold_key:
        raise ValueError(f"gold answer {gold!r} is empty after normalisation")
    if pred is None:
        return Verdict(False)
    outcome = _compare(gold_key, normalize_answer(pred), False)
    return Verdict(outcome.equal, outcome.failure)


def is_correct(pred: str | None, gold: str, *, on_failure: str = "wrong") -> bool:
    """Whether a predicted (extracted) answer matches the gold answer.

    ``pred=None`` (nothing extractable) is wrong, never right. The comparison is
    math-verify's directional ``verify(gold, pred)`` behind the same fast paths as
    :func:`answers_equal`.

    Args:
      pred: the extracted answer, or None.
      gold: the gold answer.
      on_failure: what an undecided verdict (math-verify raised or timed out) does:
        ``"wrong"`` (default) counts it as wrong and reports it (counted, collected by
        :func:`collect_math_verify_failures`, logged); ``"raise"`` raises
        :class:`MathVerifyError` naming the answer and the gold.

    Raises:
      TypeError: if ``gold`` is not a string.
      ValueError: if ``gold`` is empty after normalisation, or ``on_failure`` is unknown.
      MathVerifyError: an undecided verdict with ``on_failure="raise"``.
    """
    if on_failure not in ("wrong", "raise"):
        raise ValueError(f"on_failure must be 'wrong' or 'raise', got {on_failure!r}")
    verdict = check_answer(pred, gold)
    if verdict.undecided:
        if on_failure == "raise":
            raise MathVerifyError(verdict.failure)
        report_failure(verdict.failure)
    return verdict.correct


def canonicalize(answers: Sequence[str | None]) -> np.ndarray:
    """Assigns one canonical id per equivalence class of answers.

    Ids are ``0, 1, 2, ...`` in order of first appearance; equivalent answers (per
    :func:`answers_equal`) share an id, so identical answers from different agents
    coincide. ``None`` and answers that normalise to nothing get ``-1``, which is never
    equal to anything. Call once per question: ids are local to the call.

    Each distinct answer is compared with one representative per existing class
    (numbers by a dictionary lookup on their rounded value, the rest through
    math-verify with cached parses), so the cost is O(distinct answers x classes)
    cached comparisons.

    Args:
      answers: K extracted answers (e.g. all candidates of all agents of one question,
        flattened).

    Returns:
      int32 array [K] of canonical ids, ``-1`` for missing answers.
    """
    if isinstance(answers, str):
        raise TypeError("canonicalize expects a sequence of answers, got a single str")
    ids = np.full(len(answers), -1, dtype=np.int32)
    representatives: list[str] = []  # one normalised answer per class, by class id
    numeric_classes: dict[Fraction, int] = {}
    non_numeric_classes: list[int] = []
    class_of_key: dict[str, int] = {}
    for index, answer in enumerate(answers):
        _check_answer(answer, f"answers[{index}]")
        if answer is None:
            continue
        key = normalize_answer(answer)
        if not key:
            continue
        if key in class_of_key:
            ids[index] = class_of_key[key]
            continue
        number = as_number(key)
        found = -1
        if number is not None:
            found = numeric_classes.get(numeric_key(number), -1)
            candidates = non_numeric_classes
        else:
            candidates = range(len(representatives))
        if found < 0:
            for class_id in candidates:
                if _keys_equal(representatives[class_id], key, True):
                    found = class_id
                    break
        if found < 0:
            found = len(representatives)
            representatives.append(key)
            if number is not None:
                numeric_classes[numeric_key(number)] = found
            else:
                non_numeric_classes.append(found)
        class_of_key[key] = found
        ids[index] = found
    return ids
