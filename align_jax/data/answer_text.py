"""Answer text: normalisation and extraction of final answers, and plain-number parsing.

:func:`extract_answer` finds the final answer of a model output (the last ``\\boxed{}``,
a GSM8K ``####`` line, the last "the answer is ..." phrase, else the last number) and
:func:`normalize_answer` writes an answer in a canonical surface form (no math
delimiters, currency, units or LaTeX spacing; numbers as ``"1000"``, ``"-3"``).
:func:`as_number` / :func:`numeric_key` read a normalised plain number as an exact
rational and round it as math-verify does; they are the numeric fast path of
:mod:`align_jax.data.answers`, which builds equivalence and canonical ids on top and
re-exports this module's public names.
"""

from __future__ import annotations

import functools
import re
from decimal import Decimal
from fractions import Fraction

__all__ = ["normalize_answer", "extract_answer", "as_number", "numeric_key", "CACHE_SIZE"]

CACHE_SIZE = 1 << 16
"""Entries kept by each of the answer caches (normalisation, parses, verdicts)."""

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


@functools.lru_cache(maxsize=CACHE_SIZE)
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
      (such an output is wrong, never right: see :func:`~align_jax.data.answers.is_correct`).

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
# Plain numbers
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=CACHE_SIZE)
def as_number(key: str) -> Fraction | None:
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


def numeric_key(value: Fraction) -> Fraction:
    """math-verify's numeric rule: numbers are compared after rounding to 6 decimals."""
    return round(value, 6)
