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

math-verify bounds its own run time with ``signal.alarm``, which only works in the
main thread. Off the main thread we pass its timeout arguments as ``None`` and bound
the time ourselves by running the call in a daemon thread joined with a deadline;
a call that overruns counts as "no parse" / "not equal" (never as equal).

An answer that cannot be extracted is ``None``: it gets id ``-1`` in
:func:`canonicalize`, is never equal to anything (not even another ``None``), and
:func:`is_correct` scores it wrong.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import zlib
from decimal import Decimal
from fractions import Fraction
from typing import Any, Callable, Sequence

import numpy as np

__all__ = [
    "MATH_VERIFY_TIMEOUT_S",
    "answers_equal",
    "canonicalize",
    "extract_answer",
    "is_correct",
    "normalize_answer",
]

logger = logging.getLogger(__name__)

MATH_VERIFY_TIMEOUT_S: int = 5
"""Upper bound, in whole seconds, on one math-verify parse or comparison."""

_CACHE_SIZE = 1 << 16

# --------------------------------------------------------------------------------------
# Regular expressions
# --------------------------------------------------------------------------------------

# A plain number: optional sign, digits with optional thousands separators, optional
# decimals; also a bare leading-dot decimal (".5").
_NUM = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
_PLAIN_NUMBER_RE = re.compile(rf"[-+]?(?:{_NUM})(?:[eE][-+]?\d{{1,3}})?")  # also "2.0107e-06"
_NUMBER_WITH_UNIT_RE = re.compile(rf"([-+]?(?:{_NUM}))\s*([A-Za-z][A-Za-z\s./'-]*)")
_SLASH_FRACTION_RE = re.compile(r"([-+]?)(\d+)\s*/\s*(\d+)")
_LATEX_FRACTION_RE = re.compile(r"([-+]?)\\frac\s*(?:\{\s*(\d+)\s*\}|(\d))\s*(?:\{\s*(\d+)\s*\}|(\d))")
_CHOICE_RE = re.compile(r"\(?\s*([A-E])\s*\)?")
_WORDS_RE = re.compile(r"[A-Za-z][A-Za-z '-]*")
# Numbers as they appear in running text, for the last-number fallback. A leading minus
# counts only when it is not a binary minus ("5-3" ends in 3, not -3).
_TEXT_NUMBER_RE = re.compile(
    r"(?:(?<![\w)\]}])-)?(?<![\w.])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:[eE][-+]?\d{1,3}(?!\w|\.\d))?"
    r"(?:\s*/\s*\d+(?![\d.]))?"
)
_TEXT_LATEX_FRACTION_RE = re.compile(r"-?\s*\\[dt]?frac\s*\{\s*-?\d+\s*\}\s*\{\s*\d+\s*\}")
_ANSWER_IS_RE = re.compile(
    r"\b(?:final\s+answer|the\s+answer|answer)\s*(?:is\b\s*:?|:|=)\s*", re.IGNORECASE
)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\b")
_TEXT_COMMAND_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_SPACING_RE = re.compile(r"\\[!,;:> ]|\\q?quad\b|~")
_DEGREE_RE = re.compile(r"\^\s*(?:\{\s*\\circ\s*\}|\\circ)|°|\\degree\b")
_PROSE_WORD_RE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")
_SENTENCE_END_RE = re.compile(r"\.(?=\s|$)|\n")

# Unicode characters that models emit in place of ASCII ones.
_UNICODE_MAP = str.maketrans(
    {
        "\u2212": "-",  # minus sign
        "\ufe63": "-",  # small hyphen-minus
        "\uff0d": "-",  # fullwidth hyphen-minus
        "\u00a0": " ",  # no-break space
        "\u202f": " ",  # narrow no-break space
        "\u2009": " ",  # thin space
        "\u00d7": "*",  # multiplication sign
    }
)


# --------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------


def _canonical_number(text: str) -> str:
    """``"-1,000.50"`` -> ``"-1000.5"``; ``"18.00"`` -> ``"18"``; ``"2e-06"`` -> ``"0.000002"``."""
    value = Decimal(text.replace(",", ""))
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _strip_math_delimiters(text: str) -> str:
    text = text.strip()
    for left, right in (("\\(", "\\)"), ("\\[", "\\]"), ("$$", "$$")):
        if text.startswith(left) and text.endswith(right) and len(text) >= len(left) + len(right):
            text = text[len(left) : len(text) - len(right)].strip()
    # A "$...$" segment is math; a lone "$" before a digit is currency.
    if text.count("$") >= 2:
        first = text.index("$")
        second = text.index("$", first + 1)
        inner = text[first + 1 : second].strip()
        # "$18 and $20" are two amounts of money, not a math segment.
        if inner and not re.fullmatch(r"[\d.,]+\s+\w.*", inner):
            return inner
    return text.replace("$", "")


@functools.lru_cache(maxsize=_CACHE_SIZE)
def normalize_answer(answer: str) -> str:
    """Normalise one extracted or gold answer string to a canonical surface form.

    Idempotent. Removes math delimiters, currency signs, ``%``, degree marks, LaTeX
    spacing and ``\\text{...}`` wrappers, trailing punctuation and trailing unit words
    after a number; writes numbers canonically (``"1,000.00"`` -> ``"1000"``,
    ``"\u22123"`` -> ``"-3"``); maps a multiple-choice ``"(C)"`` to ``"C"``.

    Args:
      answer: the raw answer text (e.g. the contents of a ``\\boxed{}``).

    Returns:
      The normalised answer; the empty string when nothing is left.
    """
    text = answer.translate(_UNICODE_MAP).strip()
    text = text.replace("**", "").replace("\\$", "$")
    text = _strip_math_delimiters(text)
    text = text.rstrip(".,;:!? ")
    boxed = _BOXED_RE.match(text)
    if boxed:  # a whole-string \boxed{...}: its contents
        open_brace = boxed.end() + len(text[boxed.end() :]) - len(text[boxed.end() :].lstrip(" "))
        if _matching_brace(text, open_brace) == len(text) - 1:
            return normalize_answer(text[open_brace + 1 : -1])
    text = re.sub(r"\\[dt]frac\b", r"\\frac", text)
    text = _SPACING_RE.sub("", text) if "\\" in text or "~" in text else text
    text = _DEGREE_RE.sub("", text)
    text = text.replace("\\%", "").replace("%", "")
    previous = None
    while previous != text:  # unwrap nested \text{...} from the inside out
        previous = text
        text = _TEXT_COMMAND_RE.sub(r"\1", text)
    text = text.strip().rstrip(".,;:!?").strip()
    if text.startswith("{") and text.endswith("}") and _balanced(text[1:-1]):
        text = text[1:-1].strip()
    if _PLAIN_NUMBER_RE.fullmatch(text):
        return _canonical_number(text)
    with_unit = _NUMBER_WITH_UNIT_RE.fullmatch(text)
    if with_unit:
        return _canonical_number(with_unit.group(1))
    choice = _CHOICE_RE.fullmatch(text)
    if choice and (text.startswith("(") == text.endswith(")")):
        return choice.group(1)
    return text


def _balanced(text: str) -> bool:
    depth = 0
    for char in text:
        depth += char == "{"
        depth -= char == "}"
        if depth < 0:
            return False
    return depth == 0


# --------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------


def _matching_brace(text: str, start: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``text[start]``, or None."""
    if start >= len(text) or text[start] != "{":
        return None
    depth = 0
    for index in range(start, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return index
    return None


def _last_boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces allowed)."""
    matches = list(_BOXED_RE.finditer(text))
    for match in reversed(matches):
        start = match.end()
        while start < len(text) and text[start] == " ":
            start += 1
        if start < len(text) and text[start] == "{":
            end = _matching_brace(text, start)
            if end is None:
                continue  # unclosed brace: try an earlier box
            return text[start + 1 : end]
        # "\boxed 5" (no braces): the next token.
        token = re.match(r"[^\s$.,;]+", text[start:])
        if token:
            return token.group(0)
    return None


def _answer_phrase(text: str) -> str | None:
    """The answer stated after the last "the answer is" / "answer:" phrase."""
    matches = list(_ANSWER_IS_RE.finditer(text))
    for match in reversed(matches):
        rest = text[match.end() :]
        end = _SENTENCE_END_RE.search(rest)
        span = (rest[: end.start()] if end else rest).strip()
        if not span:
            continue
        if span.count("$") >= 2 or "\\(" in span:
            return span
        cleaned = normalize_answer(span)
        if _PLAIN_NUMBER_RE.fullmatch(cleaned):
            return cleaned
        if _PROSE_WORD_RE.search(cleaned):
            # Prose ("that she makes 18 dollars a day"): its first number if it has one.
            number = _TEXT_NUMBER_RE.search(span)
            if number:
                return number.group(0)
            if len(cleaned.split()) <= 3:  # a short word answer ("Evelyn", "east")
                return cleaned
            continue
        return span
    return None


def _last_number(text: str) -> str | None:
    """The last number in the text: plain, thousands-separated, decimal, a/b or \\frac."""
    best: tuple[int, str] | None = None
    for pattern in (_TEXT_NUMBER_RE, _TEXT_LATEX_FRACTION_RE):
        for match in pattern.finditer(text):
            if best is None or match.end() > best[0]:
                best = (match.end(), match.group(0))
    return None if best is None else best[1]


def extract_answer(text: str) -> str | None:
    """Extracts the final answer from one model output (or one reference solution).

    Rules, first that applies wins:

    1. the last ``\\boxed{...}`` or ``\\fbox{...}`` (nested braces allowed);
    2. the first GSM8K ``#### <answer>`` line (text after the first ``####`` is the
       model running on into a new exemplar, so it is ignored);
    3. the last "the answer is ..." / "final answer: ..." phrase, up to the end of its
       sentence (a number, a ``$...$`` expression, or a short word answer);
    4. the last number in the text (thousands separators, signs, decimals, ``a/b``,
       ``\\frac{a}{b}``).

    The result goes through :func:`normalize_answer`: ``"$1,000.00"`` -> ``"1000"``,
    ``"\u22123"`` -> ``"-3"``, ``"18 dollars"`` -> ``"18"``, ``"\\text{(C)}"`` -> ``"C"``.

    Args:
      text: the model output.

    Returns:
      The normalised answer string, or ``None`` when the text holds no answer
      (such an output is wrong, never right: see :func:`is_correct`).

    Raises:
      TypeError: if ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_answer expects a str, got {type(text).__name__}")
    text = text.translate(_UNICODE_MAP)
    candidate = _last_boxed(text)
    if candidate is None:
        hashes = re.search(r"####\s*([^\n]*)", text)
        if hashes and hashes.group(1).strip():
            candidate = hashes.group(1)
    if candidate is None:
        candidate = _answer_phrase(text)
    if candidate is None:
        candidate = _last_number(text)
    if candidate is None:
        return None
    answer = normalize_answer(candidate)
    return answer or None


# --------------------------------------------------------------------------------------
# Equivalence
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _as_number(key: str) -> Fraction | None:
    """A normalised answer as an exact rational, or None if it is not a plain number."""
    if _PLAIN_NUMBER_RE.fullmatch(key):
        return Fraction(Decimal(key.replace(",", "")))
    slash = _SLASH_FRACTION_RE.fullmatch(key)
    if slash:
        sign, numerator, denominator = slash.groups()
        if int(denominator) == 0:
            return None
        return Fraction(int(numerator), int(denominator)) * (-1 if sign == "-" else 1)
    latex = _LATEX_FRACTION_RE.fullmatch(key)
    if latex:
        sign, num_braced, num_digit, den_braced, den_digit = latex.groups()
        denominator = int(den_braced or den_digit)
        if denominator == 0:
            return None
        return Fraction(int(num_braced or num_digit), denominator) * (-1 if sign == "-" else 1)
    return None


def _numeric_key(value: Fraction) -> Fraction:
    """math-verify's numeric rule: numbers are compared after rounding to 6 decimals."""
    return round(value, 6)


def _bounded_call(function: Callable[..., Any], timeout_kwarg: str, default: Any, *args: Any) -> Any:
    """Calls a math-verify function with its run time bounded, in any thread."""
    if threading.current_thread() is threading.main_thread():
        try:
            return function(*args, **{timeout_kwarg: MATH_VERIFY_TIMEOUT_S})
        except Exception:  # noqa: BLE001 - math-verify failures mean "no parse"/"unequal"
            logger.debug("math-verify %s failed", function.__name__, exc_info=True)
            return default
    # signal.alarm is unavailable here: disable math-verify's timeout and bound it ourselves.
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(function(*args, **{timeout_kwarg: None}))
        except Exception:  # noqa: BLE001
            logger.debug("math-verify %s failed", function.__name__, exc_info=True)

    worker = threading.Thread(target=target, name="math-verify", daemon=True)
    worker.start()
    worker.join(MATH_VERIFY_TIMEOUT_S)
    if worker.is_alive():
        logger.warning("math-verify %s timed out after %ss", function.__name__, MATH_VERIFY_TIMEOUT_S)
        return default
    return outcome[0] if outcome else default


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _math_verify_parse(key: str) -> tuple[Any, ...]:
    import math_verify

    parsed = _bounded_call(math_verify.parse, "parsing_timeout", [], f"${key}$")
    return tuple(parsed)


def _math_verify_equal(gold_key: str, pred_key: str) -> bool:
    import math_verify

    gold, pred = _math_verify_parse(gold_key), _math_verify_parse(pred_key)
    if not gold or not pred:
        return False
    return bool(_bounded_call(math_verify.verify, "timeout_seconds", False, list(gold), list(pred)))


_Fingerprint = tuple  # ("scalar", (v1, v2)) or ("tuple", ((v1, v2), ...))


def _probe_value(name: str, probe: int) -> float:
    """A deterministic pseudo-random value in [0.3, 2.3) for symbol ``name`` at probe ``probe``."""
    return 0.3 + 2.0 * (zlib.crc32(f"{name}/{probe}".encode()) / 2**32)


def _scalar_values(expression: Any) -> tuple[complex, complex] | None:
    """A sympy expression's values at two probe points (its free symbols substituted)."""
    import sympy

    if not isinstance(expression, sympy.Expr) or isinstance(expression, sympy.Tuple):
        return None
    symbols = sorted(expression.free_symbols, key=str)
    values = []
    for probe in (0, 1):
        substitution = {symbol: _probe_value(str(symbol), probe) for symbol in symbols}
        value = complex(expression.evalf(20, subs=substitution))
        if not (value.real == value.real and value.imag == value.imag) or abs(value) == float("inf"):
            return None
        values.append(value)
    return values[0], values[1]


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _numeric_fingerprint(key: str) -> _Fingerprint | None:
    """Values of a normalised answer at two probe points, for ruling out unequal pairs.

    Two expressions that math-verify calls equal take (nearly) the same values wherever
    they are both evaluated, so values that differ prove inequality without
    ``sympy.simplify`` (the classic randomised identity test). None: no fingerprint
    (relations, sets, intervals, matrices, text, anything that fails to evaluate).
    """
    number = _as_number(key)
    if number is not None:
        value = complex(float(number))
        return ("scalar", (value, value))
    parsed = _math_verify_parse(key)
    if not parsed:
        return None
    try:
        import sympy

        expression = parsed[0]
        if isinstance(expression, sympy.Tuple):
            items = tuple(_scalar_values(item) for item in expression)
            return ("tuple", items) if items and all(item is not None for item in items) else None
        values = _scalar_values(expression)
        return None if values is None else ("scalar", values)
    except Exception:  # noqa: BLE001 - an exotic expression simply has no fingerprint
        return None


def _surely_different(values_a: tuple[complex, ...], values_b: tuple[complex, ...]) -> bool:
    """Some probe values differ by far more than math-verify's tolerance (6 decimals)."""
    for value_a, value_b in zip(values_a, values_b):
        if abs(value_a - value_b) > 1e-5 * max(1.0, abs(value_a), abs(value_b)):
            return True
    return False


def _fingerprints_differ(gold_key: str, pred_key: str) -> bool:
    gold, pred = _numeric_fingerprint(gold_key), _numeric_fingerprint(pred_key)
    if gold is None or pred is None:
        return False
    (gold_kind, gold_values), (pred_kind, pred_values) = gold, pred
    if gold_kind != pred_kind:  # a scalar never equals a tuple of two or more numbers
        return len(gold_values if gold_kind == "tuple" else pred_values) >= 2
    if gold_kind == "tuple":
        return len(gold_values) != len(pred_values) or any(map(_surely_different, gold_values, pred_values))
    return _surely_different(gold_values, pred_values)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _keys_equal(gold_key: str, pred_key: str, symmetric: bool) -> bool:
    if not gold_key or not pred_key:
        return False
    if gold_key == pred_key:
        return True
    gold_number, pred_number = _as_number(gold_key), _as_number(pred_key)
    if gold_number is not None and pred_number is not None:
        return _numeric_key(gold_number) == _numeric_key(pred_number)
    if _WORDS_RE.fullmatch(gold_key) and _WORDS_RE.fullmatch(pred_key):
        if len(gold_key) > 1 or len(pred_key) > 1:
            return gold_key.strip().lower() == pred_key.strip().lower()
    # math-verify spends ~0.1 s in sympy.simplify on an unequal pair: rule those out first.
    if _fingerprints_differ(gold_key, pred_key):
        return False
    if _math_verify_equal(gold_key, pred_key):
        return True
    return symmetric and _math_verify_equal(pred_key, gold_key)


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


def is_correct(pred: str | None, gold: str) -> bool:
    """Whether a predicted (extracted) answer matches the gold answer.

    ``pred=None`` (nothing extractable) is wrong, never right. The comparison is
    math-verify's directional ``verify(gold, pred)`` behind the same fast paths as
    :func:`answers_equal`.

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
        return False
    return _keys_equal(gold_key, normalize_answer(pred), False)


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
        number = _as_number(key)
        found = -1
        if number is not None:
            found = numeric_classes.get(_numeric_key(number), -1)
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
                numeric_classes[_numeric_key(number)] = found
            else:
                non_numeric_classes.append(found)
        class_of_key[key] = found
        ids[index] = found
    return ids
