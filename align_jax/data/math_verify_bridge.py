"""Calls into math-verify with bounded run time and visible failures, and a cheap inequality test.

The symbolic tier of :mod:`align_jax.data.answers`. math-verify bounds its own run time
with ``signal.alarm``, which only works in the main thread. Off the main thread we pass
its timeout arguments as ``None`` and bound the time ourselves by running the call in a
daemon thread joined with a deadline.

math-verify is called with ``raise_on_error=True`` (its default swallows its own
exceptions and timeouts into "no parse" / "not equal"), one ``(gold, answer)`` parse
pair at a time as its ``verify`` does. An exception or a timeout never makes two answers
equal; :func:`math_verify_compare` returns it as a :class:`MathVerifyFailure` naming the
stage (``parse`` / ``verify``), the kind (``error`` / ``timeout``), the gold and the
answer, and :func:`report_failure` counts it (:func:`math_verify_failure_count`), hands
it to every active :func:`collect_math_verify_failures` block and logs it once per
distinct failure (logger ``align_jax.data.answers``).

math-verify spends ~0.1 s in ``sympy.simplify`` on a pair that is *not* equal, so
:func:`fingerprints_differ` first evaluates both parsed expressions at two fixed
pseudo-random points (free symbols substituted; a randomised identity test): values
that differ prove inequality, and only equal-looking pairs reach ``verify``. Parses
and fingerprints are cached.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import zlib
from typing import Any, Callable, Iterator, NamedTuple, Optional

from align_jax.data.answer_text import CACHE_SIZE, as_number

__all__ = [
    "MATH_VERIFY_TIMEOUT_S",
    "MathVerifyFailure",
    "MathVerifyError",
    "Comparison",
    "math_verify_compare",
    "fingerprints_differ",
    "report_failure",
    "math_verify_failure_count",
    "collect_math_verify_failures",
]

# The failures are logged under the name of the public module that judges answers.
logger = logging.getLogger("align_jax.data.answers")

MATH_VERIFY_TIMEOUT_S: int = 5
"""Upper bound, in whole seconds, on one math-verify parse or comparison."""


class MathVerifyFailure(NamedTuple):
    """math-verify raised or ran out of time while judging one answer.

    Attributes:
      stage: ``"parse"`` (turning a string into an expression) or ``"verify"`` (comparing two).
      kind: ``"error"`` (an exception) or ``"timeout"`` (over :data:`MATH_VERIFY_TIMEOUT_S`).
      gold: the normalised gold answer (for :func:`~align_jax.data.answers.answers_equal`: its first argument).
      answer: the normalised answer judged against it.
      detail: what failed (the exception type and message, or the string being parsed).
    """

    stage: str
    kind: str
    gold: str
    answer: str
    detail: str

    def __str__(self) -> str:
        return (f"math-verify {self.stage} {self.kind} judging answer {self.answer!r} against gold {self.gold!r}: "
                f"{self.detail}")


class MathVerifyError(RuntimeError):
    """Raised by ``is_correct(..., on_failure="raise")`` for an undecided verdict; ``failure`` says why."""

    def __init__(self, failure: MathVerifyFailure):
        super().__init__(str(failure))
        self.failure = failure



class _CallFailed(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


_failure_lock = threading.Lock()
_failure_count = 0
_collectors: list[list[MathVerifyFailure]] = []
_logged: set[MathVerifyFailure] = set()


def report_failure(failure: MathVerifyFailure) -> None:
    """Counts ``failure``, hands it to every active :func:`collect_math_verify_failures` block and
    logs it as a warning the first time it is seen."""
    global _failure_count
    with _failure_lock:
        _failure_count += 1
        for collector in _collectors:
            collector.append(failure)
        first = failure not in _logged
        _logged.add(failure)
    if first:
        logger.warning("%s (counted as wrong / unequal)", failure)


def math_verify_failure_count() -> int:
    """Verdicts left undecided by a math-verify failure since the process started."""
    return _failure_count


@contextlib.contextmanager
def collect_math_verify_failures() -> Iterator[list[MathVerifyFailure]]:
    """Collects the failures behind every undecided verdict reached inside the block.

    Yields a list that fills with one :class:`MathVerifyFailure` per undecided verdict
    (from any thread), in order::

        with collect_math_verify_failures() as failures:
            correct = slot_correctness(question, gold)
        row["math_verify_failures"] = [f._asdict() for f in failures]
    """
    collected: list[MathVerifyFailure] = []
    with _failure_lock:
        _collectors.append(collected)
    try:
        yield collected
    finally:
        with _failure_lock:
            _collectors.remove(collected)


def _timeout_exception() -> type:
    try:
        from math_verify.errors import TimeoutException
    except ImportError:  # pragma: no cover - older math-verify
        return TimeoutError
    return TimeoutException


def _bounded_call(function: Callable[..., Any], timeout_kwarg: str, *args: Any) -> Any:
    """Calls a math-verify function with ``raise_on_error=True`` and its run time bounded, in any thread.

    Raises:
      _CallFailed: the call raised (kind ``error``) or overran :data:`MATH_VERIFY_TIMEOUT_S` (``timeout``).
    """
    timeout_error = _timeout_exception()

    def failed(exc: BaseException) -> _CallFailed:
        if isinstance(exc, (timeout_error, TimeoutError)):
            return _CallFailed("timeout", f"over {MATH_VERIFY_TIMEOUT_S} s")
        return _CallFailed("error", f"{type(exc).__name__}: {exc}")

    if threading.current_thread() is threading.main_thread():
        try:
            return function(*args, **{timeout_kwarg: MATH_VERIFY_TIMEOUT_S, "raise_on_error": True})
        except (Exception, timeout_error) as exc:  # math-verify's TimeoutException is a BaseException
            logger.debug("math-verify %s failed", getattr(function, "__name__", function), exc_info=True)
            raise failed(exc) from None
    # signal.alarm is unavailable here: disable math-verify's timeout and bound it ourselves.
    outcome: list[Any] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            outcome.append(function(*args, **{timeout_kwarg: None, "raise_on_error": True}))
        except (Exception, timeout_error) as exc:
            errors.append(exc)

    worker = threading.Thread(target=target, name="math-verify", daemon=True)
    worker.start()
    worker.join(MATH_VERIFY_TIMEOUT_S)
    if worker.is_alive():
        raise _CallFailed("timeout", f"over {MATH_VERIFY_TIMEOUT_S} s")
    if errors:
        raise failed(errors[0])
    return outcome[0]


class _Parsed(NamedTuple):
    values: tuple  # math-verify's extractions (empty: no parse)
    failure: Optional[tuple[str, str]] = None  # (kind, detail) when math-verify failed


@functools.lru_cache(maxsize=CACHE_SIZE)
def _math_verify_parse(key: str) -> _Parsed:
    import math_verify

    try:
        return _Parsed(tuple(_bounded_call(math_verify.parse, "parsing_timeout", f"${key}$")))
    except _CallFailed as exc:
        return _Parsed((), (exc.kind, f"parsing {key!r}: {exc.detail}"))


class Comparison(NamedTuple):
    """The result of one comparison: ``equal``, and the failure that left it undecided, if any."""

    equal: bool
    failure: Optional[MathVerifyFailure] = None


def math_verify_compare(gold_key: str, pred_key: str) -> Comparison:
    """math-verify's directional ``verify(gold, pred)``, one extraction pair at a time (as
    ``verify`` does internally), with any failure named."""
    import math_verify

    gold, pred = _math_verify_parse(gold_key), _math_verify_parse(pred_key)
    for parsed in (gold, pred):
        if parsed.failure is not None:
            return Comparison(False, MathVerifyFailure("parse", parsed.failure[0], gold_key, pred_key, parsed.failure[1]))
    failure = None
    for g in gold.values:
        for p in pred.values:
            try:
                if _bounded_call(math_verify.verify, "timeout_seconds", g, p):
                    return Comparison(True)
            except _CallFailed as exc:
                failure = failure or MathVerifyFailure("verify", exc.kind, gold_key, pred_key, exc.detail)
    return Comparison(False, failure)


def _math_verify_equal(gold_key: str, pred_key: str) -> bool:
    """``math_verify_compare(...).equal`` (an undecided comparison is False)."""
    return math_verify_compare(gold_key, pred_key).equal


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


@functools.lru_cache(maxsize=CACHE_SIZE)
def _numeric_fingerprint(key: str) -> _Fingerprint | None:
    """Values of a normalised answer at two probe points, for ruling out unequal pairs.

    Two expressions that math-verify calls equal take (nearly) the same values wherever
    they are both evaluated, so values that differ prove inequality without
    ``sympy.simplify`` (the classic randomised identity test). None: no fingerprint
    (relations, sets, intervals, matrices, text, anything that fails to evaluate).
    """
    number = as_number(key)
    if number is not None:
        value = complex(float(number))
        return ("scalar", (value, value))
    parsed = _math_verify_parse(key).values
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


def fingerprints_differ(gold_key: str, pred_key: str) -> bool:
    """Whether the probe values of two normalised answers prove them unequal (False: no proof)."""
    gold, pred = _numeric_fingerprint(gold_key), _numeric_fingerprint(pred_key)
    if gold is None or pred is None:
        return False
    (gold_kind, gold_values), (pred_kind, pred_values) = gold, pred
    if gold_kind != pred_kind:  # a scalar never equals a tuple of two or more numbers
        return len(gold_values if gold_kind == "tuple" else pred_values) >= 2
    if gold_kind == "tuple":
        return len(gold_values) != len(pred_values) or any(map(_surely_different, gold_values, pred_values))
    return _surely_different(gold_values, pred_values)
