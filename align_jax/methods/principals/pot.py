"""``pot``: a program-of-thought principal (the principal model writes programs; a sandbox runs them).

For each question the principal model samples P short Python programs that compute the
answer (prompt :data:`POT_INSTRUCTION`: define ``solution()`` returning the number); each
program runs in an :class:`~align_jax.sandbox.Sandbox` (separate process, CPU / wall / memory
/ file-size / process limits, no network, no writes outside a fresh temporary directory,
empty environment). A slot's score is the share of the *successful* programs whose result is
the slot's answer::

    score(i, s) = #{p : status_p = ok and result_p == answer(i, s)} / max(1, #{p : status_p = ok})

with ``==`` the data layer's canonical equivalence (:func:`~align_jax.data.answers_equal`:
``3.50 == 7/2``, ``1,000 == 1000``). Slots without an answer, and every slot of a question
whose programs all failed, score 0. The score depends on the slot's answer only
(``answer_level``).

Randomness: question ``q``'s programs are sampled with the key ``fold_in(key(seed),
crc32(question_id))`` (passed as that prompt's own key), so reruns agree and its random draws do
not depend on the window it is scored in. With ``PotSettings.batched`` (the default) all the
window's questions share one generation (B = questions, K = P): the same draws, but a bfloat16
model rounds differently in a batch of another shape, so the programs are those of one call per
question only for float32 models (see :class:`PotSettings`).

Settings: :class:`PotSettings` (P, sampling, sandbox limits, workers). The registry's factory
(``principal: {type: pot, model: ...}``) uses the defaults with the section's model;
:func:`make_pot_principal` takes any :class:`PotSettings`.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from typing import NamedTuple, Optional, Sequence

import numpy as np

from align_jax.config import FieldError
from align_jax.data import answers_equal
from align_jax.methods.candidates import Cost, ModelPool, QuestionCandidates
from align_jax.methods.principals.base import (
    PRINCIPALS,
    PotSettings,
    PrincipalBatch,
    PrincipalContext,
    PrincipalScores,
    PrincipalSection,
)
from align_jax.sandbox import Sandbox, SandboxResult

__all__ = [
    "POT_INSTRUCTION",
    "PotSettings",
    "PotPrograms",
    "ProgramOfThought",
    "pot_messages",
    "extract_program",
    "program_scores",
    "make_pot_principal",
]

POT_INSTRUCTION = ("Write a short Python program that solves the problem below. Define a function "
                   "`solution()` that computes and returns the final answer as a number. Use only the "
                   "standard library. Reply with the code only, in one ```python block.")


class PotPrograms(NamedTuple):
    """One question's programs and their verdicts (what :meth:`ProgramOfThought.run_programs` returns).

    Attributes:
      texts: the P generations.
      programs: the P extracted programs.
      results: the P :class:`~align_jax.sandbox.SandboxResult`.
      cost: the generation's :class:`Cost`.
    """

    texts: tuple
    programs: tuple
    results: tuple
    cost: Cost


def pot_messages(question_text: str) -> list[dict]:
    """The conversation asking the principal model for one program."""
    return [{"role": "user", "content": f"{POT_INSTRUCTION}\n\nProblem: {question_text}"}]


_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_program(text: str) -> str:
    """The program in a generation: the first fenced code block (an unclosed one runs to the end
    of the text), else the whole text."""
    match = _FENCE.search(text)
    return (match.group(1) if match else text).strip() + "\n"


def program_scores(question: QuestionCandidates, results: Sequence[SandboxResult], num_slots: int) -> np.ndarray:
    """float32 ``[N, K]``: per slot, the share of successful programs whose result equals its answer
    (0 beyond each agent's slots, for slots without an answer, and when no program succeeded)."""
    answers = [r.result for r in results if r.ok and r.result is not None]
    score = np.zeros((question.num_agents, num_slots), np.float32)
    if not answers:
        return score
    by_id: dict[int, float] = {}
    for i, agent in enumerate(question.agents):
        if len(agent.slots) > num_slots:
            raise ValueError(f"agent {i} has {len(agent.slots)} slots > K={num_slots}")
        for s, slot in enumerate(agent.slots):
            if slot.answer_id < 0:
                continue
            if slot.answer_id not in by_id:
                representative = question.answers_by_id.get(slot.answer_id, slot.answer)
                hits = sum(answers_equal(result, representative) for result in answers)
                by_id[slot.answer_id] = hits / len(answers)
            score[i, s] = by_id[slot.answer_id]
    return score


@dataclasses.dataclass(eq=False)
class ProgramOfThought:
    """The program-of-thought principal (see the module docstring).

    Attributes:
      pool: serves the program-writing model.
      model: its name or path.
      settings: :class:`PotSettings`.
      seed: the run's seed (the programs' sampling keys derive from it and the question id).
      last_programs: the :class:`PotPrograms` of the last :meth:`score` call, by question id
        (for reports: statuses, programs, cost).
    """

    pool: ModelPool
    model: str
    settings: PotSettings = dataclasses.field(default_factory=PotSettings)
    seed: int = 0
    name = "pot"
    needs_model = True
    answer_level = True
    seeded = False

    def __post_init__(self):
        self._sandbox: Optional[Sandbox] = None
        self.last_programs: dict[str, PotPrograms] = {}

    @property
    def sandbox(self) -> Sandbox:
        """The :class:`~align_jax.sandbox.Sandbox` running the programs (built on first use)."""
        if self._sandbox is None:
            self._sandbox = Sandbox(self.settings.limits, workers=self.settings.workers)
        return self._sandbox

    @classmethod
    def from_section(cls, section: PrincipalSection, context: PrincipalContext) -> "ProgramOfThought":
        """The factory: writes programs with ``section.model`` (default: the context's default model) and
        the config's ``principal.pot`` settings (P, sampling, sandbox limits; default :class:`PotSettings`)."""
        return cls(context.pool, section.model or context.default_model, section.pot or PotSettings(), context.seed)

    def question_key(self, question_id: str):
        """The sampling key of one question: ``fold_in(key(seed), crc32(question_id))``."""
        import jax

        return jax.random.fold_in(jax.random.key(self.seed), zlib.crc32(question_id.encode()) & 0x7FFFFFFF)

    def run_programs(self, question_text: str, question_id: str) -> PotPrograms:
        """Samples the P programs of one question and runs each in the sandbox."""
        return self.run_programs_many([question_text], [question_id])[0]

    def run_programs_many(self, question_texts: Sequence[str], question_ids: Sequence[str]) -> list[PotPrograms]:
        """The P programs of each of Q questions, written in one generation call (B = Q prompts,
        each with its own :meth:`question_key`), then run in the sandbox ``workers`` at a time."""
        import jax
        import jax.numpy as jnp

        settings = self.settings
        # prompt b samples with keys[b]; fold_in(., 0) is what a one-prompt call with the question's
        # key gives its prompt 0, so batched and one-at-a-time calls draw the same random numbers
        keys = jnp.stack([jax.random.fold_in(self.question_key(qid), 0) for qid in question_ids])
        out = self.pool.generate_chat(self.model, [pot_messages(text) for text in question_texts], key=keys,
                                      num_samples=settings.num_programs, max_new_tokens=settings.max_new_tokens,
                                      temperature=settings.temperature, top_p=settings.top_p)
        texts = [tuple(out.texts[q]) for q in range(len(question_ids))]
        programs = [tuple(extract_program(text) for text in group) for group in texts]
        flat = list(self.sandbox.run_many([program for group in programs for program in group]))
        p = settings.num_programs
        return [PotPrograms(texts[q], programs[q], tuple(flat[q * p:(q + 1) * p]),
                            Cost(calls=p, gen_tokens=int(np.sum(out.tokens[q])), prompt_tokens=int(out.prompt_tokens[q])))
                for q in range(len(question_ids))]

    def score(self, batch: PrincipalBatch) -> list[PrincipalScores]:
        """Each question's slots scored by its programs' results: one generation call for the whole
        batch (``settings.batched``) or one per question."""
        texts, ids = list(batch.question_texts), list(batch.question_ids)
        if self.settings.batched:
            written = self.run_programs_many(texts, ids)
        else:
            written = [self.run_programs(text, question_id) for text, question_id in zip(texts, ids)]
        scores = []
        for question_id, question, programs in zip(ids, batch.questions, written):
            self.last_programs[question_id] = programs
            scores.append(PrincipalScores(program_scores(question, programs.results, batch.num_slots), programs.cost))
        return scores


def make_pot_principal(pool: ModelPool, model: str, settings: Optional[PotSettings] = None, *,
                       seed: int = 0) -> ProgramOfThought:
    """A :class:`ProgramOfThought` with explicit settings (the registry's factory uses the defaults).

    Raises:
      TypeError: ``settings`` is not a :class:`PotSettings`.
      ValueError: no model is named.
    """
    settings = settings if settings is not None else PotSettings()
    if not isinstance(settings, PotSettings):
        raise TypeError(f"settings must be a PotSettings, got {type(settings).__name__}")
    if not model:
        raise ValueError("the pot principal needs a model to write its programs")
    return ProgramOfThought(pool, model, settings, seed)


PRINCIPALS.register("pot", ProgramOfThought.from_section)
