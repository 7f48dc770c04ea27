"""The principal plug-in point: types, the ``principal:`` config section, the registry.

A principal fills the candidates' ``principal_score``: for a window of Q questions it
returns, per question, a float32 ``[N, K]`` array (N agents, K slots; entries beyond an
agent's slots are 0 and masked later) and the :class:`Cost` of computing it. Configs
select one by name (``principal: {type: arithmetic}``); :data:`PRINCIPALS` maps the
name to a factory ``factory(section, context) -> Principal``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, ClassVar, Mapping, NamedTuple, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from align_jax.config import ConfigError, FieldError
from align_jax.methods.candidates import Cost, ModelPool, QuestionCandidates
from align_jax.registry import Registry
from align_jax.sandbox import SandboxLimits

__all__ = [
    "PrincipalScores",
    "PrincipalBatch",
    "PrincipalContext",
    "Principal",
    "PrincipalFactory",
    "PRINCIPALS",
    "PrincipalSection",
    "PrincipalModelError",
    "make_principal",
    "model_free_principals",
    "model_field_error",
    "slot_scores",
    "share_cost",
    "LLMPrincipal",
    "ModelFreePrincipal",
]


class PrincipalScores(NamedTuple):
    """Scores of one question's slots.

    Attributes:
      score: float32 ``[N, K]`` (0 beyond each agent's slots).
      cost: :class:`Cost` of computing them (0 for principals without a model).
    """

    score: np.ndarray
    cost: Cost


class PrincipalBatch(NamedTuple):
    """A window of Q questions to score (sequences of length Q, one entry per question).

    Attributes:
      question_texts: the questions as shown to a model.
      question_ids: stable ids (``gsm8k/test/17``); seeded principals key their randomness on them.
      questions: each question's :class:`QuestionCandidates` (N agents, their slots).
      correct_by_id: per question, canonical answer id -> correctness (only oracles may read it).
      num_slots: K, the slot axis of every returned ``[N, K]`` array.
    """

    question_texts: Sequence[str]
    question_ids: Sequence[str]
    questions: Sequence[QuestionCandidates]
    correct_by_id: Sequence[Mapping[int, bool]]
    num_slots: int

    @property
    def size(self) -> int:
        """Q, the number of questions (``len`` of a NamedTuple counts its fields)."""
        return len(self.questions)

    def select(self, indices: Sequence[int]) -> "PrincipalBatch":
        """The sub-batch of the questions at ``indices`` (same K)."""
        return PrincipalBatch([self.question_texts[q] for q in indices], [self.question_ids[q] for q in indices],
                              [self.questions[q] for q in indices], [self.correct_by_id[q] for q in indices],
                              self.num_slots)


class PrincipalContext(NamedTuple):
    """What a factory gets besides the config section.

    Attributes:
      pool: the :class:`ModelPool` for principals that need a model (None: no model available).
      default_model: the model an LLM principal uses when the section names none (the first agent's).
      seed: the run's seed (seeded principals derive their randomness from it).
    """

    pool: Optional[ModelPool] = None
    default_model: Optional[str] = None
    seed: int = 0


@runtime_checkable
class Principal(Protocol):
    """Scores a window of questions' slots.

    Attributes:
      name: the registered type name (``verifier``, ``oracle``, ``arithmetic``, ...).
      needs_model: it calls an LLM through a :class:`ModelPool`.
      answer_level: its score of a slot is a function of the slot's answer alone, so
        slots carrying the same answer get the same score (ranker, oracle); the
        conformance test checks it.
      seeded: its scores depend on the context's seed (noisy oracle); replay averages
        such principals over several seeds.

    ``score(batch)`` returns one :class:`PrincipalScores` per question of ``batch``, in
    order. A question's scores must not depend on the other questions of the window
    (batch independence), and the same batch must give the same scores.
    """

    name: str
    needs_model: bool
    answer_level: bool
    seeded: bool

    def score(self, batch: PrincipalBatch) -> list[PrincipalScores]:
        ...


class PrincipalFactory(Protocol):
    """``factory(section, context) -> Principal``: what :data:`PRINCIPALS` holds."""

    def __call__(self, section: "PrincipalSection", context: PrincipalContext) -> Principal:
        ...


PRINCIPALS: Registry = Registry("principal")
"""Principal type name -> :class:`PrincipalFactory`. Register a new principal with
``PRINCIPALS.register("name", factory)`` (or ``@PRINCIPALS.register("name")`` on the
factory); the shared bases :class:`LLMPrincipal` and :class:`ModelFreePrincipal` give
the factory ``Class.from_section`` (see ``arithmetic.py``)."""


def model_field_error(field: str, name: object) -> Optional[FieldError]:
    """A :class:`FieldError` for ``field`` unless ``name`` is a registered model, a ``.gguf``
    file or a model / checkpoint directory; None when it is usable."""
    from align_jax.llm import registry

    if not isinstance(name, str) or not name.strip():
        return FieldError(field, "must be a model name or path")
    if registry.is_registered(name):
        return None
    path = Path(name).expanduser()
    if (path.is_file() and path.suffix == ".gguf") or path.is_dir():
        return None
    return FieldError(
        field,
        f"unknown model {name!r}: expected one of {', '.join(sorted(registry.MODELS))}, "
        "a .gguf file or a model / checkpoint directory",
    )


@dataclasses.dataclass(frozen=True)
class PotSettings:
    """Settings of the program-of-thought principal.

    Attributes:
      num_programs: P, programs sampled per question (>= 1).
      temperature: sampling temperature (>= 0; 0 = greedy, then P > 1 repeats one program).
      top_p: nucleus mass in ``(0, 1]``.
      max_new_tokens: token budget of one program (>= 16).
      limits: the sandbox's :class:`~align_jax.sandbox.SandboxLimits` per program.
      workers: programs run in the sandbox at once (>= 1).
      batched: write the programs of all the questions of a scoring call in one generation
        (B = questions, K = P; 3.1x faster per question on this CPU,
        ``experiments/bench_pot_principal.py``), each question still sampling with its own key.
        The random draws are those of one call per question, but the batch's shape changes the
        rounding of bfloat16 products, so with a bfloat16 model most questions get other programs
        than in ``batched: false`` (7 of 8 in the benchmark; a float32 model gives the same ones).
        False: one generation per question (B = 1), the mode of the GSM8K replay and the GSM-Hard
        study.

    Raises:
      FieldError: a setting out of range (the field is named).
    """

    num_programs: int = 4
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 256
    limits: SandboxLimits = dataclasses.field(default_factory=lambda: SandboxLimits(wall_s=5.0, cpu_s=2.0))
    workers: int = 2
    batched: bool = True

    def __post_init__(self):
        if not isinstance(self.batched, bool):
            raise FieldError("batched", f"must be true or false, got {self.batched!r}")
        if isinstance(self.num_programs, bool) or not isinstance(self.num_programs, int) or self.num_programs < 1:
            raise FieldError("num_programs", f"must be an integer >= 1 (P programs per question), got "
                                             f"{self.num_programs!r}")
        if not self.temperature >= 0:
            raise FieldError("temperature", f"must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise FieldError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        tokens = self.max_new_tokens
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 16:
            raise FieldError("max_new_tokens", f"must be an integer >= 16, got {self.max_new_tokens!r}")
        if not isinstance(self.limits, SandboxLimits):
            raise FieldError("limits", f"must be a SandboxLimits, got {type(self.limits).__name__}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise FieldError("workers", f"must be an integer >= 1, got {self.workers!r}")


@dataclasses.dataclass(frozen=True)
class PrincipalSection:
    """The ``principal:`` section of a reason config.

    Attributes:
      type: a registered principal (:data:`PRINCIPALS`): ``verifier``, ``ranker``,
        ``oracle``, ``noisy_oracle``, ``arithmetic``.
      model: the judging LLM of ``verifier`` / ``ranker`` (default: the first agent's model).
      flip_rate: flip probability of ``noisy_oracle``, in ``[0, 1]``.
      batch_size: prompts per scoring call of an LLM principal (>= 1).
      pot: settings of the ``pot`` (program-of-thought) principal: programs per question,
        sampling, and the sandbox's ``limits`` (:class:`PotSettings`); None = the defaults.
    """

    type: str = "verifier"
    model: Optional[str] = None
    flip_rate: float = 0.1
    batch_size: int = 8
    pot: Optional[PotSettings] = None

    def __post_init__(self):
        PRINCIPALS.get(self.type, field="type")
        if not 0.0 <= self.flip_rate <= 1.0:
            raise FieldError("flip_rate", f"must be in [0, 1], got {self.flip_rate}")
        if self.batch_size < 1:
            raise FieldError("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.model is not None:
            error = model_field_error("model", self.model)
            if error is not None:
                raise error


class PrincipalModelError(ConfigError):
    """A principal that needs an LLM was built without a model pool or a model name."""


def make_principal(section: PrincipalSection, *, pool: Optional[ModelPool] = None,
                   default_model: Optional[str] = None, seed: int = 0) -> Principal:
    """Builds the principal ``section.type`` through its registered factory.

    Raises:
      UnknownNameError: ``section.type`` is not registered (field ``type``).
      PrincipalModelError: the principal needs a model but ``pool`` is None (or no model
        is named by ``section.model`` or ``default_model``).
    """
    factory = PRINCIPALS.get(section.type, field="type")
    principal = factory(section, PrincipalContext(pool, default_model, seed))
    if principal.needs_model and (pool is None or (section.model or default_model) is None):
        missing = "a model pool" if pool is None else "a model (principal.model or an agent's model)"
        raise PrincipalModelError(f"principal {section.type!r} scores with an LLM and needs {missing}; "
                                  f"principals without a model: {', '.join(model_free_principals())}")
    return principal


def model_free_principals() -> list[str]:
    """The registered principals that need no model (they can score without a pool: replay)."""
    names = []
    for name in PRINCIPALS.names():
        try:
            needs = PRINCIPALS.get(name)(PrincipalSection(type=name), PrincipalContext()).needs_model
        except Exception:  # noqa: BLE001 - a factory that cannot even be built without a model needs one
            needs = True
        if not needs:
            names.append(name)
    return names


def slot_scores(question: QuestionCandidates, num_slots: int, value) -> np.ndarray:
    """float32 ``[N, K]`` with ``value(i, s, slot)`` at each agent's slots and 0 beyond them.

    Raises:
      ValueError: an agent has more slots than ``num_slots``.
    """
    score = np.zeros((question.num_agents, num_slots), np.float32)
    for i, agent in enumerate(question.agents):
        if len(agent.slots) > num_slots:
            raise ValueError(f"agent {i} has {len(agent.slots)} slots > K={num_slots}")
        for s, slot in enumerate(agent.slots):
            score[i, s] = value(i, s, slot)
    return score


def share_cost(total: Cost, count: int) -> list[Cost]:
    """Splits a cost over ``count`` equal items (integer parts, remainders to the first items)."""
    if count == 0:
        return []
    parts = []
    for field in total:
        base, extra = divmod(int(field), count)
        parts.append([base + (1 if j < extra else 0) for j in range(count)])
    return [Cost(*values) for values in zip(*parts)]


# ---------------------------------------------------------------------------
# Shared bases: an implementation keeps only what differs.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class LLMPrincipal:
    """Base of the principals that judge with an LLM served by a :class:`ModelPool`.

    A subclass sets ``name``, ``answer_level`` and ``score_window``, a function
    ``(pool, model, question_texts, questions, num_slots, *, batch_size) ->
    list[PrincipalScores]`` (as a ``staticmethod``), and registers
    :meth:`from_section` as its factory.

    Attributes:
      pool: serves the model.
      model: the judging model's name or path.
      batch_size: prompts per forward pass.
    """

    pool: ModelPool
    model: str
    batch_size: int = 8
    name: ClassVar[str]
    answer_level: ClassVar[bool]
    score_window: ClassVar[Callable[..., list]]
    needs_model: ClassVar[bool] = True
    seeded: ClassVar[bool] = False

    def score(self, batch: PrincipalBatch) -> list[PrincipalScores]:
        """``score_window`` on the batch's questions with this principal's model."""
        return self.score_window(self.pool, self.model, batch.question_texts, batch.questions, batch.num_slots,
                                 batch_size=self.batch_size)

    @classmethod
    def from_section(cls, section: PrincipalSection, context: PrincipalContext) -> "LLMPrincipal":
        """The factory: judges with ``section.model`` (default: the context's default model)."""
        return cls(context.pool, section.model or context.default_model, section.batch_size)


class ModelFreePrincipal:
    """Base of the principals without a model that score each question on its own.

    A subclass sets ``name`` (and ``answer_level`` / ``seeded`` when they hold),
    defines ``score_question(batch, q) -> PrincipalScores`` for question ``q`` of the
    batch (:meth:`score` maps it over the batch, so the scores are batch independent
    by construction) and registers :meth:`from_section` as its factory.
    """

    name: ClassVar[str]
    needs_model: ClassVar[bool] = False
    answer_level: ClassVar[bool] = False
    seeded: ClassVar[bool] = False

    @classmethod
    def from_section(cls, section: PrincipalSection, context: PrincipalContext) -> "ModelFreePrincipal":
        """The factory of a principal without settings (override it to read the section)."""
        return cls()

    def score_question(self, batch: PrincipalBatch, q: int) -> PrincipalScores:
        """The scores of question ``q`` of ``batch``."""
        raise NotImplementedError

    def score(self, batch: PrincipalBatch) -> list[PrincipalScores]:
        """:meth:`score_question` of every question of ``batch``, in order."""
        return [self.score_question(batch, q) for q in range(batch.size)]
