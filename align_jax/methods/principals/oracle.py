"""The oracle principals (no model; upper-bound and sensitivity studies).

* ``oracle``: ``1`` for a correct slot, ``0`` otherwise.
* ``noisy_oracle``: the oracle with each slot's judgement flipped independently with
  probability ``flip_rate``; the flips are a deterministic function of
  ``(seed, question id, agent, slot)``, so reruns, resumes and replays agree.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Mapping

import numpy as np

from align_jax.methods.candidates import Cost, QuestionCandidates
from align_jax.methods.principals.base import (
    PRINCIPALS,
    ModelFreePrincipal,
    PrincipalBatch,
    PrincipalContext,
    PrincipalScores,
    PrincipalSection,
    slot_scores,
)

__all__ = ["Oracle", "NoisyOracle", "oracle_scores", "noisy_oracle_scores"]


def oracle_scores(question: QuestionCandidates, correct_by_id: Mapping[int, bool], num_slots: int) -> PrincipalScores:
    """``1.0`` for correct slots, ``0.0`` otherwise, ``[N, K]``."""
    score = slot_scores(question, num_slots, lambda i, s, slot: float(bool(correct_by_id.get(slot.answer_id, False))))
    return PrincipalScores(score, Cost())


def _flip_uniforms(seed: int, question_id: str, shape: tuple[int, int]) -> np.ndarray:
    digest = hashlib.sha256(f"{seed}/{question_id}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return rng.random(shape)


def noisy_oracle_scores(question: QuestionCandidates, correct_by_id: Mapping[int, bool], num_slots: int, *,
                        flip_rate: float, seed: int, question_id: str) -> PrincipalScores:
    """The oracle's 0/1 judgement of each slot, flipped with probability ``flip_rate``.

    The uniforms deciding the flips (``[N, K]``, one per slot position) depend only on
    ``(seed, question_id)``, not on the batch a question was processed in. Entries
    beyond an agent's slots stay 0 (before the plug-in interface they were flipped
    too; the game never reads them, so runs and replays are unchanged).

    Raises:
      ValueError: ``flip_rate`` outside ``[0, 1]``.
    """
    if not 0.0 <= flip_rate <= 1.0:
        raise ValueError(f"flip_rate must be in [0, 1], got {flip_rate}")
    exact = oracle_scores(question, correct_by_id, num_slots).score
    valid = slot_scores(question, num_slots, lambda i, s, slot: 1.0) > 0
    flips = (_flip_uniforms(seed, question_id, exact.shape) < flip_rate) & valid  # padding stays 0
    return PrincipalScores(np.where(flips, 1.0 - exact, exact).astype(np.float32), Cost())


@dataclasses.dataclass(frozen=True)
class Oracle(ModelFreePrincipal):
    """Scores each slot by its correctness (reads ``batch.correct_by_id``)."""

    name = "oracle"
    answer_level = True

    def score_question(self, batch: PrincipalBatch, q: int) -> PrincipalScores:
        """:func:`oracle_scores` of question ``q``."""
        return oracle_scores(batch.questions[q], batch.correct_by_id[q], batch.num_slots)


@dataclasses.dataclass(frozen=True)
class NoisyOracle(ModelFreePrincipal):
    """The oracle with each slot's judgement flipped with probability ``flip_rate``.

    Attributes:
      flip_rate: in ``[0, 1]`` (0.5: no signal; 1: the inverted oracle).
      seed: with the question id, determines the flips.
    """

    flip_rate: float
    seed: int = 0
    name = "noisy_oracle"
    seeded = True

    def __post_init__(self):
        if not 0.0 <= self.flip_rate <= 1.0:
            raise ValueError(f"flip_rate must be in [0, 1], got {self.flip_rate}")

    @classmethod
    def from_section(cls, section: PrincipalSection, context: PrincipalContext) -> "NoisyOracle":
        """``type: noisy_oracle`` with ``flip_rate`` from the section and the run's seed."""
        return cls(section.flip_rate, context.seed)

    def score_question(self, batch: PrincipalBatch, q: int) -> PrincipalScores:
        """:func:`noisy_oracle_scores` of question ``q`` (flips keyed on its id)."""
        return noisy_oracle_scores(batch.questions[q], batch.correct_by_id[q], batch.num_slots,
                                   flip_rate=self.flip_rate, seed=self.seed, question_id=batch.question_ids[q])


PRINCIPALS.register("oracle", Oracle.from_section)
PRINCIPALS.register("noisy_oracle", NoisyOracle.from_section)
