"""Principals: how the candidates' ``principal_score`` is filled.

A principal scores every slot ``(i, k)`` of a question (``[N, K]``, entries beyond an
agent's slots are 0 and masked later). The game sees only these scores; what the
principal truly wants (``principal_value``) is correctness, used for evaluation only.

The plug-in point (:mod:`.base`): a :class:`Principal` has ``name``, ``needs_model``,
``answer_level``, ``seeded`` and ``score(batch: PrincipalBatch) -> list[PrincipalScores]``;
:data:`PRINCIPALS` maps a config's ``principal: {type: ...}`` to a factory
``factory(section: PrincipalSection, context: PrincipalContext) -> Principal`` and
:func:`make_principal` builds one. Every registered principal passes
:func:`~align_jax.methods.principals.conformance.principal_api_test`.

Registered (one module each; a new principal is one new module whose factory carries
``@PRINCIPALS.register("name")``, plus its import line below):

* ``verifier`` (:mod:`.verifier`): an LLM's ``log p(Yes) - log p(No)`` for each slot's solution;
* ``ranker`` (:mod:`.ranker`): an LLM's position-debiased preference among the distinct answers;
* ``oracle`` / ``noisy_oracle`` (:mod:`.oracle`): correctness, optionally flipped at ``flip_rate``;
* ``arithmetic`` (:mod:`.arithmetic`): the share of a solution's arithmetic steps that
  re-compute exactly (no model).
"""

from __future__ import annotations

from align_jax.methods.principals.base import (
    PRINCIPALS,
    Principal,
    PrincipalBatch,
    PrincipalContext,
    PrincipalFactory,
    PrincipalModelError,
    PrincipalScores,
    PrincipalSection,
    make_principal,
    model_field_error,
    model_free_principals,
)

# Registration: importing a principal's module registers it (order = the order of `names()`).
from align_jax.methods.principals.verifier import VERIFIER_LABELS, VERIFIER_QUESTION, verifier_messages, verifier_scores
from align_jax.methods.principals.ranker import RANKER_QUESTION, ranker_labels, ranker_messages, ranker_scores
from align_jax.methods.principals.oracle import noisy_oracle_scores, oracle_scores
from align_jax.methods.principals.arithmetic import arithmetic_score, arithmetic_steps
from align_jax.methods.principals.pot import ProgramOfThought, PotSettings, make_pot_principal  # noqa: F401

__all__ = [
    "PRINCIPALS",
    "Principal",
    "PrincipalBatch",
    "PrincipalContext",
    "PrincipalFactory",
    "PrincipalModelError",
    "PrincipalScores",
    "PrincipalSection",
    "make_principal",
    "model_field_error",
    "model_free_principals",
    "VERIFIER_QUESTION",
    "VERIFIER_LABELS",
    "RANKER_QUESTION",
    "oracle_scores",
    "noisy_oracle_scores",
    "verifier_messages",
    "verifier_scores",
    "ranker_labels",
    "ranker_messages",
    "ranker_scores",
    "arithmetic_score",
    "arithmetic_steps",
]
