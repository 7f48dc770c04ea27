"""GSM8K, GSM-Hard and MATH-500 as lists of :class:`Problem`.

Two sources share one field mapping (:data:`DATASETS`):

- ``source="local"`` (default): the JSONL files as published, in a data directory
  resolved by :func:`resolve_data_dir` (explicit argument, then the environment variable
  ``ALIGN_JAX_DATA_DIR``, then ``<repo root>/../shared/data``). Every line is validated;
  a bad line raises :class:`DatasetError` naming the file, the line number and the field.
- ``source="hub"``: the public Hugging Face hub copies through the ``datasets`` library
  (imported only then): ``openai/gsm8k`` (config ``main``), ``reasoning-machines/gsm-hard``
  and ``HuggingFaceH4/MATH-500``.

Gold answers are final-answer strings: GSM8K's text after ``#### `` with thousands
separators removed, GSM-Hard's float ``target`` written canonically (integers without
``.0``, float noise past 15 significant digits dropped: ``3244047.0999999996`` ->
``3244047.1``), MATH-500's ``answer`` verbatim.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import re
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Iterator, Mapping

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "DatasetError",
    "DatasetSpec",
    "Problem",
    "dataset_names",
    "fewshot_exemplars",
    "load_dataset",
    "resolve_data_dir",
]

DATA_DIR_ENV = "ALIGN_JAX_DATA_DIR"
"""Environment variable naming the data directory (used when no ``data_dir`` is given)."""

_REPO_ROOT = Path(__file__).resolve().parents[2]
_DEFAULT_DATA_DIR = _REPO_ROOT.parent / "shared" / "data"
_CALCULATOR_ANNOTATION_RE = re.compile(r"<<[^<>]*>>")


class DatasetError(ValueError):
    """A dataset could not be found or one of its records is malformed."""


@dataclasses.dataclass(frozen=True)
class Problem:
    """One benchmark question.

    Attributes:
      id: stable identifier, e.g. ``"gsm8k/test/17"`` (0-based record index) or
        ``"math500/test/precalculus/807.json"``.
      question: the problem statement shown to the model.
      gold: the final answer as a string (compare with ``answers.is_correct``).
      dataset: canonical dataset name (``"gsm8k"``, ``"gsm-hard"``, ``"math500"``).
      meta: extra fields: ``split`` and ``index`` always; ``solution`` (GSM8K, MATH-500),
        ``code`` (GSM-Hard), ``subject``, ``level`` and ``unique_id`` (MATH-500).
        Not part of equality or hashing.
    """

    id: str
    question: str
    gold: str
    dataset: str
    meta: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)


# --------------------------------------------------------------------------------------
# Field mapping, shared by the local and hub paths
# --------------------------------------------------------------------------------------


class _RecordError(Exception):
    """A record-level problem; the caller adds the location (file:line or hub row)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def _field(record: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in record:
        raise _RecordError(name, f"missing field {name!r}")
    value = record[name]
    # bool is an int subclass: a JSON true/false is never a valid number here.
    if not isinstance(value, kind) or isinstance(value, bool):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _RecordError(name, f"field {name!r} must be {expected}, got {type(value).__name__} {value!r:.60}")
    if isinstance(value, str) and not value.strip():
        raise _RecordError(name, f"field {name!r} is empty")
    return value


def _gsm8k_gold(solution: str) -> str:
    marker = solution.rfind("####")
    if marker < 0:
        raise _RecordError("answer", "field 'answer' has no '#### <final answer>' line")
    gold = solution[marker + 4 :].strip().replace(",", "")
    if not gold:
        raise _RecordError("answer", "field 'answer' has nothing after '####'")
    return gold


def _format_float(value: float) -> str:
    """Canonical decimal text of a float: ``42.0`` -> ``"42"``, noise past 15 digits dropped."""
    if not math.isfinite(value):
        raise _RecordError("target", f"field 'target' must be finite, got {value!r}")
    text = format(Decimal(f"{value:.15g}"), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _gsm8k_problem(record: Mapping[str, Any], split: str, index: int) -> Problem:
    question = _field(record, "question", str)
    solution = _field(record, "answer", str)
    return Problem(
        id=f"gsm8k/{split}/{index}",
        question=question,
        gold=_gsm8k_gold(solution),
        dataset="gsm8k",
        meta={"split": split, "index": index, "solution": solution},
    )


def _gsm_hard_problem(record: Mapping[str, Any], split: str, index: int) -> Problem:
    question = _field(record, "input", str)
    target = _field(record, "target", (int, float))
    code = record.get("code")
    if code is not None and not isinstance(code, str):
        raise _RecordError("code", f"field 'code' must be str, got {type(code).__name__}")
    return Problem(
        id=f"gsm-hard/{split}/{index}",
        question=question,
        gold=_format_float(float(target)),
        dataset="gsm-hard",
        meta={"split": split, "index": index, "code": code},
    )


def _math500_problem(record: Mapping[str, Any], split: str, index: int) -> Problem:
    question = _field(record, "problem", str)
    answer = _field(record, "answer", str)
    solution = _field(record, "solution", str)
    unique_id = _field(record, "unique_id", str)
    meta = {"split": split, "index": index, "solution": solution, "unique_id": unique_id}
    for name, kind in (("subject", str), ("level", int)):
        if name in record:
            meta[name] = _field(record, name, kind)
    return Problem(
        id=f"math500/{unique_id}",
        question=question,
        gold=answer.strip(),
        dataset="math500",
        meta=meta,
    )


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Where one dataset lives and how its records map to :class:`Problem`.

    Attributes:
      name: canonical name.
      aliases: other accepted names (matched case-insensitively).
      files: split -> file path relative to the data directory.
      hub_path: Hugging Face hub repository for ``source="hub"``.
      hub_config: hub configuration name, or None.
      hub_splits: our split -> the hub's split name.
      to_problem: ``(record, split, index) -> Problem``; raises on a malformed record.
    """

    name: str
    aliases: tuple[str, ...]
    files: Mapping[str, str]
    hub_path: str
    hub_config: str | None
    hub_splits: Mapping[str, str]
    to_problem: Callable[[Mapping[str, Any], str, int], Problem]


DATASETS: Mapping[str, DatasetSpec] = MappingProxyType(
    {
        "gsm8k": DatasetSpec(
            name="gsm8k",
            aliases=("gsm-8k", "gsm_8k", "openai/gsm8k"),
            files=MappingProxyType({"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}),
            hub_path="openai/gsm8k",
            hub_config="main",
            hub_splits=MappingProxyType({"train": "train", "test": "test"}),
            to_problem=_gsm8k_problem,
        ),
        "gsm-hard": DatasetSpec(
            name="gsm-hard",
            aliases=("gsmhard", "gsm_hard", "gsm-hard-v2", "gsmhardv2", "reasoning-machines/gsm-hard"),
            files=MappingProxyType({"test": "gsm-hard/gsmhardv2.jsonl"}),
            hub_path="reasoning-machines/gsm-hard",
            hub_config=None,
            hub_splits=MappingProxyType({"test": "train"}),  # the hub stores it as "train"
            to_problem=_gsm_hard_problem,
        ),
        "math500": DatasetSpec(
            name="math500",
            aliases=("math-500", "math_500", "huggingfaceh4/math-500"),
            files=MappingProxyType({"test": "math500/test.jsonl"}),
            hub_path="HuggingFaceH4/MATH-500",
            hub_config=None,
            hub_splits=MappingProxyType({"test": "test"}),
            to_problem=_math500_problem,
        ),
    }
)
"""Canonical dataset name -> :class:`DatasetSpec`."""

_ALIASES = {alias: spec.name for spec in DATASETS.values() for alias in (spec.name, *spec.aliases)}


def dataset_names() -> tuple[str, ...]:
    """The canonical dataset names accepted by :func:`load_dataset`."""
    return tuple(DATASETS)


def _spec(name: str) -> DatasetSpec:
    if not isinstance(name, str) or name.strip().lower() not in _ALIASES:
        known = ", ".join(f"{spec.name} (aliases: {', '.join(spec.aliases)})" for spec in DATASETS.values())
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {known}")
    return DATASETS[_ALIASES[name.strip().lower()]]


# --------------------------------------------------------------------------------------
# Data directory
# --------------------------------------------------------------------------------------


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory holding the benchmark JSONL files.

    Resolution order: the explicit ``data_dir``; the environment variable
    ``ALIGN_JAX_DATA_DIR``; ``<repo root>/../shared/data`` if it exists.

    Raises:
      DatasetError: if the chosen directory does not exist, or none is configured.
    """
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise DatasetError(f"data_dir {str(path)!r} is not a directory")
        return path
    from_env = os.environ.get(DATA_DIR_ENV)
    if from_env:
        path = Path(from_env).expanduser()
        if not path.is_dir():
            raise DatasetError(f"environment variable {DATA_DIR_ENV}={from_env!r} is not a directory")
        return path
    if _DEFAULT_DATA_DIR.is_dir():
        return _DEFAULT_DATA_DIR
    raise DatasetError(
        "no data directory found: pass data_dir=..., or set the environment variable "
        f"{DATA_DIR_ENV} to the folder holding gsm8k/, gsm-hard/ and math500/ "
        f"(the default {str(_DEFAULT_DATA_DIR)!r} does not exist)"
    )


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _check_window(limit: int | None, offset: int) -> None:
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise DatasetError(f"offset must be a non-negative int, got {offset!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise DatasetError(f"limit must be None or a non-negative int, got {limit!r}")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) for every non-blank line."""
    try:
        with path.open("r", encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if line.strip():
                    yield line_number, line
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path}: not UTF-8 text ({error})") from error


def _parse_line(spec: DatasetSpec, path: Path, line_number: int, line: str, split: str, index: int) -> Problem:
    where = f"{path}:{line_number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
    try:
        return spec.to_problem(record, split, index)
    except _RecordError as error:
        raise DatasetError(f"{where}: field {error.field!r}: {error.message}") from None


def _load_local(spec: DatasetSpec, split: str, data_dir: Path, limit: int | None, offset: int) -> list[Problem]:
    path = data_dir / spec.files[split]
    if not path.is_file():
        raise DatasetError(
            f"dataset {spec.name!r} split {split!r}: expected file {str(path)!r} is missing "
            f"(data directory {str(data_dir)!r}; set data_dir= or {DATA_DIR_ENV})"
        )
    problems = []
    for index, (line_number, line) in enumerate(_iter_jsonl(path)):
        if index < offset:
            continue
        if limit is not None and len(problems) >= limit:
            break
        problems.append(_parse_line(spec, path, line_number, line, split, index))
    return problems


def _load_hub(spec: DatasetSpec, split: str, limit: int | None, offset: int) -> list[Problem]:
    try:
        import datasets as hf_datasets  # lazy: only the hub path needs it
    except ImportError as error:
        raise DatasetError(
            f"source='hub' needs the `datasets` package (pip install datasets): {error}"
        ) from error
    hub_split = spec.hub_splits[split]
    where = f"hub {spec.hub_path}" + (f" ({spec.hub_config})" if spec.hub_config else "") + f" split {hub_split!r}"
    try:
        rows: Iterable[Mapping[str, Any]] = hf_datasets.load_dataset(spec.hub_path, spec.hub_config, split=hub_split)
    except Exception as error:  # noqa: BLE001 - network, auth or cache problems
        raise DatasetError(f"could not load {where}: {type(error).__name__}: {error}") from error
    problems = []
    for index, record in enumerate(rows):
        if index < offset:
            continue
        if limit is not None and len(problems) >= limit:
            break
        try:
            problems.append(spec.to_problem(record, split, index))
        except _RecordError as error:
            raise DatasetError(f"{where} row {index}: field {error.field!r}: {error.message}") from None
    return problems


def load_dataset(
    name: str,
    split: str = "test",
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    offset: int = 0,
    *,
    source: str = "local",
) -> list[Problem]:
    """Loads a benchmark as a list of :class:`Problem`.

    Args:
      name: ``"gsm8k"``, ``"gsm-hard"`` or ``"math500"`` (or an alias, see :data:`DATASETS`).
      split: ``"train"`` or ``"test"`` for GSM8K; ``"test"`` for the others.
      data_dir: data directory for ``source="local"`` (see :func:`resolve_data_dir`).
      limit: at most this many problems (None: all).
      offset: skip this many records first; ids keep their absolute record index.
      source: ``"local"`` (JSONL files) or ``"hub"`` (the ``datasets`` library).

    Returns:
      The problems, in file order.

    Raises:
      DatasetError: unknown name, split or source; missing directory or file; a malformed
        line (the message names ``file:line`` and the field).
    """
    spec = _spec(name)
    if split not in spec.files:
        raise DatasetError(f"dataset {spec.name!r} has no split {split!r}; available: {', '.join(spec.files)}")
    _check_window(limit, offset)
    if source == "local":
        return _load_local(spec, split, resolve_data_dir(data_dir), limit, offset)
    if source == "hub":
        return _load_hub(spec, split, limit, offset)
    raise DatasetError(f"unknown source {source!r}; expected 'local' or 'hub'")


@functools.lru_cache(maxsize=4)
def _gsm8k_train(path: Path, mtime_ns: int, size: int) -> tuple[Problem, ...]:
    del mtime_ns, size  # cache keys only: a changed file is read again
    return tuple(_load_local(DATASETS["gsm8k"], "train", path, None, 0))


def fewshot_exemplars(
    n: int,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    keep_calculator_annotations: bool = False,
) -> list[tuple[str, str]]:
    """Draws ``n`` distinct (question, full solution) pairs from GSM8K train for few-shot CoT.

    The draw is a deterministic function of ``(n, seed)`` and never touches the test set.
    Solutions keep their ``#### <answer>`` line (which :func:`answers.extract_answer`
    reads back); the ``<<48/2=24>>`` calculator annotations are removed unless asked for.

    Raises:
      DatasetError: if ``n`` is not in ``[0, len(train)]`` or the data cannot be loaded.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise DatasetError(f"n must be a non-negative int, got {n!r}")
    directory = resolve_data_dir(data_dir)
    path = directory / DATASETS["gsm8k"].files["train"]
    if not path.is_file():
        raise DatasetError(f"few-shot exemplars: expected file {str(path)!r} is missing (data directory {str(directory)!r})")
    stat = path.stat()
    train = _gsm8k_train(directory, stat.st_mtime_ns, stat.st_size)
    if n > len(train):
        raise DatasetError(f"n={n} exceeds the {len(train)} GSM8K train problems")
    chosen = random.Random(seed).sample(range(len(train)), n)
    exemplars = []
    for index in chosen:
        solution = train[index].meta["solution"]
        if not keep_calculator_annotations:
            solution = _CALCULATOR_ANNOTATION_RE.sub("", solution)
        exemplars.append((train[index].question, solution))
    return exemplars
