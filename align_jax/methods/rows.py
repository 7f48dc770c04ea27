"""The typed schema of a ``reason`` results row, and its reader.

One row per question, one JSON line in ``results.jsonl`` (see
:mod:`align_jax.methods.reason`). The row is built from these dataclasses and
written with :func:`to_dict`; a reader goes through :func:`read_rows`, which
checks every line against the schema (types, required fields) and names the file,
line and field of a malformed row instead of failing later inside a summary.
``from_dict(row).to_dict() == row`` holds for every row written since the first
committed study (test), so old files keep reading and reprinting identically.

Shapes per row: N agents, ``K_i`` samples of agent i, ``S_i`` slots (distinct
answers) of agent i, R debate rounds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

from align_jax.config import ConfigError, config_from_dict
from align_jax.runio import read_jsonl

__all__ = [
    "CostRecord",
    "SampleRecord",
    "SlotRecord",
    "AgentRecord",
    "PrincipalRecord",
    "GameRecord",
    "MethodRecord",
    "GreedyRecord",
    "DebateEntry",
    "ReasonRow",
    "row_from_dict",
    "row_to_dict",
    "read_rows",
]

_OMIT_NONE = {"omit_none": True}


@dataclasses.dataclass
class CostRecord:
    """Model calls, generated tokens and prompt tokens."""

    calls: int = 0
    gen_tokens: int = 0
    prompt_tokens: int = 0


@dataclasses.dataclass
class SampleRecord:
    """One sampled solution of an agent: its text, extracted answer, canonical id, length."""

    text: str
    answer: Optional[str]
    answer_id: int
    tokens: int
    correct: bool


@dataclasses.dataclass
class SlotRecord:
    """One self-consistency slot (a distinct answer of an agent) with its utility and score."""

    answer_id: int
    answer: Optional[str]
    count: int
    utility: float
    representative: int
    principal_score: float
    correct: bool


@dataclasses.dataclass
class AgentRecord:
    """An agent's ``K_i`` samples, ``S_i`` slots and sampling cost."""

    name: str
    samples: list[SampleRecord]
    slots: list[SlotRecord]
    cost: CostRecord


@dataclasses.dataclass
class PrincipalRecord:
    """Which principal scored the slots and what it cost."""

    type: str
    cost: CostRecord


@dataclasses.dataclass
class GameRecord:
    """The ALIGN game's outcome and diagnostics (lists are ``[N]``, ``average_policy`` ``[N][K]``)."""

    chosen_agent: int
    chosen_slot: int
    answer_id: int
    rounds_played: int
    regret: list[float]
    regret_bound: list[float]
    nash_gap: float
    pareto_compliance: float
    pareto_mass: float
    submission: list[int]
    average_policy: list[list[float]]
    utility_correlation: float


@dataclasses.dataclass
class MethodRecord:
    """One method's pick (``answer`` is None for expectation-valued baselines), correctness
    (a probability for randomised baselines) and cost; ``agent`` names ALIGN's chosen agent."""

    answer: Optional[str]
    correct: float
    cost: CostRecord
    agent: Optional[str] = dataclasses.field(default=None, metadata=_OMIT_NONE)


@dataclasses.dataclass
class GreedyRecord:
    """An agent's greedy (temperature 0) chain of thought."""

    agent: str
    text: str
    answer: Optional[str]
    correct: bool
    tokens: int


@dataclasses.dataclass
class DebateEntry:
    """One agent's message in one debate round."""

    agent: str
    text: str
    answer: Optional[str]


@dataclasses.dataclass
class EconRecord:
    """One ECON policy's run on a question: rounds played, the coordinator's strategy, its
    commitment after each round, and the executors' chosen temperature / top-p per round."""

    rounds: int
    strategy: str
    commitments: list[Optional[str]]
    temperatures: list[list[float]]
    top_ps: list[list[float]]


@dataclasses.dataclass
class ReasonRow:
    """One question's results (see the module docstring).

    ``math_verify_failures``: how many of the candidates' correctness checks math-verify
    could not decide (an exception or a time-out; counted as wrong), left out when none.
    """

    question_id: str
    question: str
    gold: str
    agents: list[AgentRecord]
    principal: PrincipalRecord
    game: GameRecord
    greedy: Optional[list[GreedyRecord]]
    debate: Optional[list[list[DebateEntry]]]
    methods: dict[str, MethodRecord]
    wall_s: float
    window_wall_s: float
    stage_wall_s: dict[str, float]
    math_verify_failures: Optional[int] = dataclasses.field(default=None, metadata=_OMIT_NONE)
    settings_hash: Optional[str] = dataclasses.field(default=None, metadata=_OMIT_NONE)
    econ: Optional[dict[str, EconRecord]] = dataclasses.field(default=None, metadata=_OMIT_NONE)


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        out = {}
        for field in dataclasses.fields(value):
            item = getattr(value, field.name)
            if item is None and field.metadata.get("omit_none"):
                continue
            out[field.name] = _to_plain(item)
        return out
    if isinstance(value, list):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def row_to_dict(row: ReasonRow) -> dict:
    """The JSON-ready dict of a row (optional fields that are None are left out)."""
    return _to_plain(row)


def row_from_dict(data: dict, where: str = "<row>") -> ReasonRow:
    """Checks ``data`` against the schema and builds the typed row.

    Raises:
      ConfigError: a missing or wrongly typed field (``where: field.path: message``).
    """
    return config_from_dict(ReasonRow, data, source=where)


def read_rows(path: Path) -> dict[str, dict]:
    """Finished rows of a results file by question id, first row per question, in file order.

    Each line is checked against :class:`ReasonRow` (a crash-cut last line is skipped:
    its question is redone); the rows are returned as the dicts read.

    Raises:
      ConfigError: a malformed row (file, line and field named).
      CorruptResultsError: a line in the middle of the file is not JSON.
    """
    rows: dict[str, dict] = {}
    for line, row in read_jsonl(path):
        where = f"{path}:{line}"
        if not isinstance(row, dict) or "question_id" not in row:
            raise ConfigError(f"{where}: not a results row (no 'question_id')")
        row_from_dict(row, where)
        rows.setdefault(row["question_id"], row)
    return rows
