"""``arithmetic``: re-computes every arithmetic step of a solution with exact arithmetic.

A slot's score is the share of correct steps in its representative solution (the
text a verifier would judge); no model is involved. A *step* is an equation between
two adjacent sides of an ``e_1 = e_2 = ... = e_m`` chain whose left side computes
something (holds an operator): ``3 * 4 = 12``, ``a + b + c = d``,
``(5 - 2) * 4 = 12``, ``3 * 60 = 180`` in ``3 hours = 3 * 60 minutes = 180 minutes``
(``3 hours = 3 * 60`` restates a given and is not a step). Each side is evaluated
exactly with :class:`fractions.Fraction`; operators are ``+ - * / ^`` (``^`` with an
integer exponent), ``x`` / ``×`` / ``·`` / ``\\times`` / ``\\cdot`` / ``times`` for
multiplication, ``÷`` / ``\\div`` / ``divided by`` for division, ``plus``, ``minus``,
``\\frac{a}{b}`` (nested) and implicit multiplication ``2(3 + 4)``; ``≈`` /
``\\approx`` / ``equals`` count as ``=``.

What the reader understands:

* numbers with thousands separators (``1,000``), decimals, a leading ``$``, a
  trailing ``%``; irregular digit groups (``10,00000``, ``1,2``) are not read as
  numbers; ``<<3*4=12>>`` calculator annotations of GSM8K solutions are removed
  (the step appears in the text itself);
* unit words after a number (``60 meters/sprint * 3 sprints = 180 meters``,
  ``\\text{ meters}``): up to three words of two or more letters between a number and
  an operator are skipped (a single letter is a variable, as in ``8/11 x = 162``);
  any other word ends an equation, so prose is never read as arithmetic;
* ``p% of b`` is ``p% * b``; a ``%`` sign is read both ways (as ``/100`` and as a
  plain number, consistently on both sides) and the step counts as correct if
  either reading holds (``50% * 40 = 20`` and ``100% - 20% = 80%`` are both right);
* running-total chains ``60 * 3 = 180 + 60 = 240`` (false as written) are read as
  ``60 * 3 = 180`` and ``180 + 60 = 240``: a step also counts as correct when its
  left side equals the first number of a right side that continues with an operator;
* an equation cut by a word at its left end (``x + 5 = 10``, markdown bullets) loses
  its incomplete first side; a side that does not parse is skipped, not counted.

Rounding tolerance: when the right side is a single number written with ``d``
decimals and the left side's exact value needs more than ``d`` decimals, the step is
correct if the number is that value rounded to nearest or truncated toward zero at
``d`` decimals (``10 / 3 = 3.33``, ``2 / 3 = 0.67``, ``2 / 3 = 0.66``,
``100 / 3 = 33``, ``7 / 2 = 4``; not ``10 / 3 = 4``); a value that fits in ``d``
decimals must match exactly (``5 * 3 = 16`` and ``7 / 2 = 3.4`` are wrong). Division
by zero makes a step wrong.

Score of a slot: ``correct steps / steps`` in ``[0, 1]``. A solution without any
checkable step scores :data:`NO_STEP_SCORE` ``= 0.5``: it is neither supported nor
refuted by arithmetic, so it ranks below a solution whose every step checks out and
above one whose every step is wrong, level with one that has as many right steps as
wrong ones (the mean of a uniform prior on its share of correct steps). Scores are a
function of the slot's own text alone (batch independent, deterministic).
"""

from __future__ import annotations

import dataclasses
import re
from fractions import Fraction
from typing import NamedTuple, Optional, Sequence

from align_jax.methods.candidates import Cost
from align_jax.methods.principals.base import (
    PRINCIPALS,
    ModelFreePrincipal,
    PrincipalBatch,
    PrincipalScores,
    slot_scores,
)

__all__ = ["NO_STEP_SCORE", "ArithmeticStep", "ArithmeticPrincipal", "arithmetic_steps", "arithmetic_score"]

NO_STEP_SCORE = 0.5
"""Score of a solution with no checkable arithmetic step (see the module docstring)."""

_MAX_EXPONENT = 64
_MAX_UNIT_WORDS = 3
_UNIT_RE = re.compile(r"[A-Za-z]{2,}(?:'s)?")  # not "x" (a variable), not "james_age", not "P2"

# ---- preprocessing --------------------------------------------------------------------------

_UNICODE = str.maketrans({
    "\u00d7": "*", "\u00b7": "*", "\u2217": "*", "\u22c5": "*", "\u00f7": "/", "\u2212": "-", "\u2248": "=",
    "\u00a0": " ", "\u202f": " ", "\u2009": " ",
})
_ANNOTATION_RE = re.compile(r"<<[^<>\n]*>>")
_TEXT_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*")
_LATEX_OPS = [
    (re.compile(r"\\(?:times|cdot|ast)(?![A-Za-z])"), " * "),
    (re.compile(r"\\div(?![A-Za-z])"), " / "),
    (re.compile(r"\\(?:approx|simeq)(?![A-Za-z])"), " = "),
    (re.compile(r"\\(?:left|right)(?![A-Za-z])"), " "),
    (re.compile(r"(?<=\d)\\[,!](?=\d{3})"), ""),  # 10\,000
    (re.compile(r"\{,\}"), ","),  # 10{,}000
    (re.compile(r"\\[,;:! ]|\\q?quad(?![A-Za-z])|~"), " "),
    (re.compile(r"\\%"), "%"),
    (re.compile(r"\\\$|\$"), " "),
    (re.compile(r"\\[\[\]()]"), " \n "),  # display / inline math delimiters end an equation
]
_BOLD_RE = re.compile(r"\*\*|__")
_BULLET_RE = re.compile(r"(?m)^[ \t]*[-*+\u2022][ \t]+")
_TIMES_WORD_RE = re.compile(r"(?<=[\w)])[ \t]+[xX][ \t]+(?=[\d(.])|(?<=[\d)])[xX](?=[\d(])")
_PERCENT_OF_RE = re.compile(r"(?<=%)[ \t]+of[ \t]+(?=[\d(.])")
_WORD_OPS = [  # only between a number (or ")") and a number (or "(")
    (re.compile(rf"(?<=[\d)])[ \t]+{words}[ \t]+(?=[\d(])", re.IGNORECASE), op)
    for words, op in ((r"(?:times|multiplied[ \t]+by)", " * "), (r"divided[ \t]+by", " / "),
                      (r"plus", " + "), (r"minus", " - "), (r"equals", " = "))
]


def _replace_fracs(text: str) -> str:
    """``\\frac{a}{b}`` -> ``((a)/(b))`` (nested; ``\\frac12`` too); unmatched braces stay."""
    out, pos = [], 0
    while True:
        match = _FRAC_RE.search(text, pos)
        if match is None:
            out.append(text[pos:])
            return "".join(out)
        out.append(text[pos:match.start()])
        args, cursor = [], match.end()
        for _ in range(2):
            while cursor < len(text) and text[cursor] == " ":
                cursor += 1
            if cursor < len(text) and text[cursor] == "{":
                end = _matching(text, cursor)
                if end is None:
                    break
                args.append(_replace_fracs(text[cursor + 1:end]))
                cursor = end + 1
            elif cursor < len(text) and text[cursor].isdigit():
                args.append(text[cursor])
                cursor += 1
            else:
                break
        if len(args) == 2:
            out.append(f" (({args[0]})/({args[1]})) ")
        else:
            out.append(" \n ")  # a malformed fraction ends the equation
        pos = cursor if len(args) == 2 else match.end()


def _matching(text: str, start: int) -> Optional[int]:
    depth = 0
    for index in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return index
    return None


def _normalise(text: str) -> str:
    text = _ANNOTATION_RE.sub(" ", text.translate(_UNICODE))
    previous = None
    while previous != text:  # nested \text{\textbf{...}}
        previous, text = text, _TEXT_RE.sub(r" \1 ", text)
    text = _replace_fracs(text)
    for pattern, replacement in _LATEX_OPS:
        text = pattern.sub(replacement, text)
    text = text.replace("{", "(").replace("}", ")")
    text = _BOLD_RE.sub("", text)
    text = _BULLET_RE.sub("", text)
    text = _TIMES_WORD_RE.sub(" * ", text)
    for pattern, replacement in _WORD_OPS:
        text = pattern.sub(replacement, text)
    return _PERCENT_OF_RE.sub(" * ", text)


# ---- tokens ---------------------------------------------------------------------------------


class _Token(NamedTuple):
    kind: str  # NUM, OP, EQ, LP, RP, WORD, BREAK
    text: str
    value: Optional[Fraction] = None  # NUM: the written number (a % sign not applied)
    decimals: int = 0  # NUM: digits after the decimal point
    percent: bool = False  # NUM: followed by %


_TOKEN_RE = re.compile(
    r"(?P<NUM>(?<![\w.])(?<!\d,)(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?![.,]?\w))(?P<PCT>[ \t]*%)?"
    r"|(?P<WORD>[A-Za-z][A-Za-z0-9_']*|\\[A-Za-z]+)"
    r"|(?P<OP>[-+*/^])|(?P<EQ>=)|(?P<LP>\()|(?P<RP>\))"
    r"|(?P<SPACE>[ \t]+)"
    r"|(?P<BREAK>.|\n)",
    re.DOTALL,
)


def _tokens(text: str) -> list[_Token]:
    out = []
    for match in _TOKEN_RE.finditer(text):
        kind = match.lastgroup if match.lastgroup != "PCT" else "NUM"
        if kind == "SPACE":
            continue
        if kind == "NUM":
            number = match.group("NUM").replace(",", "")
            decimals = len(number.split(".")[1]) if "." in number else 0
            percent = match.group("PCT") is not None
            out.append(_Token("NUM", match.group(0).strip(), Fraction(number), decimals, percent))
        elif kind == "WORD" and match.group(0).startswith("\\"):
            out.append(_Token("BREAK", match.group(0)))  # any other LaTeX command ends an equation
        else:
            out.append(_Token(kind, match.group(0)))
    return _drop_units(out)


def _drop_units(tokens: list[_Token]) -> list[_Token]:
    """Removes unit words between a number (or ``)``) and an operator / ``=`` / ``)``;
    every other word becomes a break."""
    out: list[_Token] = []
    j = 0
    while j < len(tokens):
        token = tokens[j]
        if token.kind == "WORD" and out and out[-1].kind in ("NUM", "RP"):
            end, words = j, 0
            while end < len(tokens) and words < _MAX_UNIT_WORDS:
                if tokens[end].kind == "WORD" and _UNIT_RE.fullmatch(tokens[end].text):
                    words += 1
                    end += 1
                elif (tokens[end].kind == "OP" and tokens[end].text == "/" and end + 1 < len(tokens)
                      and tokens[end + 1].kind == "WORD" and end > j):
                    end += 1  # "meters/sprint"
                else:
                    break
            if end < len(tokens) and tokens[end].kind in ("OP", "EQ", "RP") and tokens[end - 1].kind == "WORD":
                j = end
                continue
        out.append(token if token.kind != "WORD" else _Token("BREAK", token.text))
        j += 1
    return out


# ---- expressions ----------------------------------------------------------------------------


class _ZeroDivision(Exception):
    pass


class _Parser:
    """Recursive descent over one side's tokens; ``percent`` applies ``%`` as ``/100``.

    ``expr := term (('+'|'-') term)*``, ``term := unary (('*'|'/') unary | implicit)*``,
    ``unary := ('+'|'-') unary | power``, ``power := atom ('^' unary)?``,
    ``atom := NUM | '(' expr ')'``.
    """

    def __init__(self, tokens: Sequence[_Token], percent: bool):
        self.tokens, self.percent, self.pos = tokens, percent, 0

    def peek(self) -> Optional[_Token]:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def parse(self) -> Optional[Fraction]:
        """The value, or None when the tokens are not one complete expression."""
        try:
            value = self.expr()
        except (IndexError, ValueError, OverflowError, RecursionError):
            return None
        return value if self.pos == len(self.tokens) else None

    def expr(self) -> Fraction:
        value = self.term()
        while (token := self.peek()) is not None and token.kind == "OP" and token.text in "+-":
            self.pos += 1
            value = value + self.term() if token.text == "+" else value - self.term()
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while (token := self.peek()) is not None:
            if token.kind == "OP" and token.text in "*/":
                self.pos += 1
                right = self.unary()
                if token.text == "*":
                    value = value * right
                elif right == 0:
                    raise _ZeroDivision
                else:
                    value = value / right
            elif token.kind in ("LP", "NUM") and self.tokens[self.pos - 1].kind == "RP" or token.kind == "LP":
                value = value * self.power()  # 2(3 + 4), (3)(4), (3)4
            else:
                break
        return value

    def unary(self) -> Fraction:
        token = self.peek()
        if token is not None and token.kind == "OP" and token.text in "+-":
            self.pos += 1
            return self.unary() if token.text == "+" else -self.unary()
        return self.power()

    def power(self) -> Fraction:
        base = self.atom()
        token = self.peek()
        if token is not None and token.kind == "OP" and token.text == "^":
            self.pos += 1
            exponent = self.unary()
            if exponent.denominator != 1 or abs(exponent) > _MAX_EXPONENT or (base == 0 and exponent < 0):
                raise ValueError("exponent out of range")
            return base ** int(exponent)
        return base

    def atom(self) -> Fraction:
        token = self.tokens[self.pos]
        self.pos += 1
        if token.kind == "NUM":
            return token.value / 100 if (self.percent and token.percent) else token.value
        if token.kind == "LP":
            value = self.expr()
            if self.peek() is None or self.peek().kind != "RP":
                raise ValueError("unclosed parenthesis")
            self.pos += 1
            return value
        raise ValueError(f"unexpected {token.text!r}")


class _Side(NamedTuple):
    tokens: tuple
    has_op: bool  # a binary operator or implicit product: the side computes something
    number: Optional[_Token]  # the side is one number (possibly signed): the claimed value


def _side(tokens: Sequence[_Token]) -> _Side:
    kinds = [t.kind for t in tokens]
    unary = [t.kind == "OP" and t.text in "+-" and (k == 0 or kinds[k - 1] in ("OP", "LP"))
             for k, t in enumerate(tokens)]
    ops = [t for t, is_unary in zip(tokens, unary) if t.kind == "OP" and not is_unary]
    implicit = any(kinds[k] in ("LP", "NUM") and kinds[k - 1] == "RP" or kinds[k] == "LP" and kinds[k - 1] == "NUM"
                   for k in range(1, len(kinds)))
    numbers = [t for t in tokens if t.kind == "NUM"]
    single = numbers[0] if len(numbers) == 1 and not ops and not implicit else None
    return _Side(tuple(tokens), bool(ops) or implicit, single)


def _value(side: _Side, percent: bool):
    """The side's exact value, None (does not parse) or :class:`_ZeroDivision` (divides by zero)."""
    try:
        return _Parser(side.tokens, percent).parse()
    except _ZeroDivision:
        return _ZeroDivision


# ---- steps ----------------------------------------------------------------------------------


class ArithmeticStep(NamedTuple):
    """One checked equation between two adjacent sides of a chain.

    Attributes:
      text: the step as read (tokens joined by spaces, units dropped).
      computed: exact value of the computing side (None: it divides by zero).
      claimed: the value the solution states for it.
      correct: whether the claim holds (see the module docstring for tolerance and ``%``).
    """

    text: str
    computed: Optional[Fraction]
    claimed: Optional[Fraction]
    correct: bool


def _close(computed: Fraction, claimed: Fraction, number: Optional[_Token], percent: bool) -> bool:
    """``computed == claimed``, or within the rounding tolerance of the number written for ``claimed``."""
    if computed == claimed:
        return True
    if number is None:
        return False
    unit = Fraction(1, 10 ** number.decimals) * (Fraction(1, 100) if percent and number.percent else 1)
    if (computed / unit).denominator == 1:  # the exact value is writable with the shown decimals
        return False
    error = abs(computed - claimed)
    nearest = 2 * error <= unit
    truncated = error < unit and abs(claimed) <= abs(computed) and (claimed >= 0) == (computed >= 0)
    return nearest or truncated


def _check(left: _Side, right: _Side) -> Optional[ArithmeticStep]:
    """The step ``left = right``, or None when it is not a checkable step."""
    if not left.has_op:  # "3 hours = 3 * 60 minutes = 180 minutes": a restatement, not a computation
        return None
    text = " ".join(t.text for t in left.tokens) + " = " + " ".join(t.text for t in right.tokens)
    modes = (False, True) if any(t.percent for t in left.tokens + right.tokens) else (False,)
    first: Optional[ArithmeticStep] = None
    for percent in modes:
        computed, claimed = _value(left, percent), _value(right, percent)
        if computed is None or claimed is None:
            continue
        if computed is _ZeroDivision:
            step = ArithmeticStep(text, None, None if claimed is _ZeroDivision else claimed, False)
        elif claimed is _ZeroDivision:
            step = ArithmeticStep(text, computed, None, False)
        else:
            correct = _close(computed, claimed, right.number, percent)
            if not correct and right.has_op and len(right.tokens) >= 2 and right.tokens[0].kind == "NUM" \
                    and right.tokens[1].kind == "OP":
                # running total: "60 * 3 = 180 + 60 = 240" claims 60 * 3 = 180
                lead = _side(right.tokens[:1])
                correct = _close(computed, _value(lead, percent), lead.number, percent)
            step = ArithmeticStep(text, computed, claimed, correct)
        if step.correct:
            return step
        first = first or step
    return first


def _strip_parens(tokens: list[_Token], leading: bool) -> list[_Token]:
    """Drops unmatched ``(`` at the start (``leading``) or ``)`` at the end of a side."""
    tokens = list(tokens)
    while tokens:
        balance = sum(t.kind == "LP" for t in tokens) - sum(t.kind == "RP" for t in tokens)
        if leading and balance > 0 and tokens[0].kind == "LP":
            tokens.pop(0)
        elif not leading and balance < 0 and tokens[-1].kind == "RP":
            tokens.pop()
        else:
            break
    return tokens


def _chains(tokens: Sequence[_Token]):
    """Runs of tokens between breaks that hold at least one ``=``, split into sides."""
    run: list[_Token] = []
    for token in list(tokens) + [_Token("BREAK", "")]:
        if token.kind != "BREAK":
            run.append(token)
            continue
        if any(t.kind == "EQ" for t in run):
            sides, current = [], []
            for t in run:
                if t.kind == "EQ":
                    sides.append(current)
                    current = []
                else:
                    current.append(t)
            sides.append(current)
            yield sides
        run = []


def arithmetic_steps(text: str) -> list[ArithmeticStep]:
    """Every checkable arithmetic step of ``text``, in order (see the module docstring)."""
    steps = []
    for sides in _chains(_tokens(_normalise(text))):
        if sides[0] and sides[0][0].kind == "OP":
            sides[0] = []  # "x + 5 = 10", "- 3 * 4 = 12": the left end was cut off
        if sides[-1] and sides[-1][-1].kind == "OP":
            sides[-1] = []  # "= 7 + x": cut off at the right
        sides[0] = _strip_parens(sides[0], leading=True)
        sides[-1] = _strip_parens(sides[-1], leading=False)
        parsed = [_side(s) if s else None for s in sides]
        for left, right in zip(parsed, parsed[1:]):
            if left is None or right is None:
                continue
            step = _check(left, right)
            if step is not None:
                steps.append(step)
    return steps


def arithmetic_score(text: str) -> float:
    """Share of correct steps of ``text`` in ``[0, 1]``; :data:`NO_STEP_SCORE` without steps."""
    steps = arithmetic_steps(text)
    if not steps:
        return NO_STEP_SCORE
    return sum(step.correct for step in steps) / len(steps)


@dataclasses.dataclass(frozen=True)
class ArithmeticPrincipal(ModelFreePrincipal):
    """Scores each slot by :func:`arithmetic_score` of its representative solution."""

    name = "arithmetic"

    def score_question(self, batch: PrincipalBatch, q: int) -> PrincipalScores:
        """:func:`arithmetic_score` of each slot's representative text, at no cost."""
        question = batch.questions[q]
        score = slot_scores(question, batch.num_slots,
                            lambda i, s, slot: arithmetic_score(question.agents[i].texts[slot.representative]))
        return PrincipalScores(score, Cost())


PRINCIPALS.register("arithmetic", ArithmeticPrincipal.from_section)
