"""The game engine's plug-in point for online learners, and their registry.

A :class:`Learner` is what every agent of the delegation game runs over its K
slots: a NamedTuple of pure functions in the style of optax's
``GradientTransformation`` (``init`` / ``update``), plus the ``policy`` it
plays and, optionally, a bound on its external regret.  Its state is any
pytree of arrays (a NamedTuple) whose shapes and dtypes do not change from
round to round (it is the carry of ``lax.scan``).  Every function is
shape-polymorphic over leading axes ``[...]`` (one game ``[N, K]``, a batch
``[Q, N, K]``) and masked by ``valid [..., K]``:

* ``init(valid) -> state``;
* ``policy(state, valid, t) -> pi [..., K]``: the mixed strategy for round
  ``t`` (float32 ``[]``, 1-based); on the simplex over valid slots, zero on
  invalid ones, and **all zero on a row with no valid slot** (an agent with
  no candidate abstains; never NaN);
* ``update(state, reward, valid, t) -> state``: absorbs round ``t``'s
  full-information reward vector ``r_t [..., K]`` (zero on invalid slots);
* ``regret_bound(state, valid, rounds) -> [...]`` or ``None``: an upper bound
  on the external regret ``max_k sum_t r_t(k) - sum_t <pi_t, r_t>`` after the
  ``rounds`` (int32 ``[]``) rounds absorbed by ``state``; zero on rows with at
  most one valid slot.

Diagnostics.  The engine measures regret itself (from its own cumulative
rewards, whatever the learner); only the bound comes from the learner.  A
learner without one (``regret_bound=None``) reports ``regret_bound = +inf``
(no finite guarantee: ``regret <= bound`` holds trivially, and
``regret / bound`` is 0).

The engine chooses a learner by name through ``GameConfig.learner`` (static);
:data:`LEARNERS` maps names to *factories* ``make(step_size, schedule) ->
Learner``, called inside the compiled game with the game's (traced) step size
``GameParams.step_size`` and the static ``GameConfig.schedule``.  A learner
that has no step size ignores them.  Adding one is one function plus one
registration line::

    @LEARNERS.register("my_learner")
    def my_learner(step_size, schedule="constant") -> Learner: ...

and it must pass :func:`align_jax.game.conformance.learner_api_test`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Protocol

import jax

from align_jax.registry import Registry

__all__ = ["Learner", "LearnerFactory", "LEARNERS", "make_learner"]

LearnerState = Any  # a pytree of arrays with round-invariant shapes


class Learner(NamedTuple):
    """An online learner over each agent's slots (see the module docstring).

    Attributes:
      init: ``(valid bool [..., K]) -> state``.
      policy: ``(state, valid [..., K], t float32 []) -> float32 [..., K]`` the
        policy of round ``t`` (1-based); zero on invalid slots, all zero on a
        row with no valid slot.
      update: ``(state, reward float32 [..., K], valid, t) -> state`` absorbs
        round ``t``'s rewards.
      regret_bound: ``(state, valid, rounds int32 []) -> float32 [...]`` an
        upper bound on the external regret so far, or ``None`` (the engine
        then reports ``+inf``).
    """

    init: Callable[[jax.Array], LearnerState]
    policy: Callable[[LearnerState, jax.Array, jax.Array], jax.Array]
    update: Callable[[LearnerState, jax.Array, jax.Array, jax.Array], LearnerState]
    regret_bound: Optional[Callable[[LearnerState, jax.Array, jax.Array], jax.Array]] = None


class LearnerFactory(Protocol):
    """What :data:`LEARNERS` holds: builds a :class:`Learner` from the game's step size.

    Args:
      step_size: float32 ``[]`` (traced inside the engine; one per game):
        ``GameParams.step_size``.
      schedule: static ``GameConfig.schedule`` (``"constant"`` or ``"anytime"``).
    """

    def __call__(self, step_size: jax.Array, schedule: str = "constant") -> Learner: ...


LEARNERS: Registry[LearnerFactory] = Registry("learner")
"""Learner factories by name; ``GameConfig.learner`` selects one."""


def make_learner(name: str, step_size: jax.Array, schedule: str = "constant") -> Learner:
    """The :class:`Learner` registered as ``name``, built with ``step_size`` and ``schedule``.

    Raises:
      UnknownNameError: no learner of that name (field ``learner``).
    """
    return LEARNERS.get(name, field="learner")(step_size, schedule)
