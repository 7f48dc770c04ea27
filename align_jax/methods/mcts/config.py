"""The ``mcts:`` config section (search parameters of the rStar-style candidate search)."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from align_jax.config import FieldError
from align_jax.methods.mcts.tree import ACTION_NAMES, TreeSpec, make_tree_spec

__all__ = ["MCTSSection", "UTILITIES"]

#: How an agent's candidate utility is computed from its tree (see :class:`MCTSSection`).
UTILITIES = ("visits", "reward")


@dataclasses.dataclass(frozen=True)
class MCTSSection:
    """Search parameters, validated on construction (errors name the field).

    Attributes:
      rollouts: R root-to-terminal rollouts per tree (>= 1).  Unset (None): R = the agents'
        largest ``num_samples`` (an agent's candidates are its R terminal visits, so
        ``num_samples: 16`` gives the paper's 16 rollouts); R may not exceed it.
      max_depth: D, maximum depth of a reasoning path (>= 1); nodes at D are terminal.
      exploration: UCT constant c (>= 0, finite).
      children_per_expansion: children generated per allowed action kind when a node is
        expanded (>= 1); a node has ``A = len(actions) * children_per_expansion`` slots.
      actions: allowed rStar actions, a subset of ``A1`` .. ``A5`` including A1, A2 or A3.
      utility: a candidate answer's utility: ``visits`` = its share of terminal visits,
        ``reward`` = its share of backed-up reward mass.
      reward: terminal reward: ``confidence`` (rStar: share of the tree's terminal answers
        agreeing with it) or ``given`` (supplied by the caller, e.g. a verifier).
      max_nodes: M node slots per tree (None: the bound that cannot overflow,
        :func:`~align_jax.methods.mcts.tree.node_capacity`).
      step_tokens: generation budget of a one-step child (A1, A3, A4, A5): its text is
        cut at the first blank line and at ``min(step_tokens, answer budget)`` tokens (>= 1).
      answer_tokens: generation budget of a child that runs to the answer (A2, and every
        child at ``max_depth``) (>= 1); unset (None): the agent's ``max_new_tokens``, the
        budget of one sampled chain of thought.  One sampler call per wave and model
        decodes the largest budget among its rows; each child is cut to its own.
      discriminator: optional model (registered name, ``.gguf`` file or checkpoint
        directory) for rStar's mutual-consistency check (the ``rstar_discriminator``
        method); validated when the config is loaded, before any model is.
      mask_fraction: the discriminator sees the question and the first
        ``ceil((1 - mask_fraction) * steps)`` steps of a trajectory and completes the rest,
        in ``(0, 1)``.
    """

    rollouts: Optional[int] = None
    max_depth: int = 5
    exploration: float = 2.0
    children_per_expansion: int = 2
    actions: tuple[str, ...] = ACTION_NAMES
    utility: str = "visits"
    reward: str = "confidence"
    max_nodes: Optional[int] = None
    step_tokens: int = 96
    answer_tokens: Optional[int] = None
    discriminator: Optional[str] = None
    mask_fraction: float = 0.5

    def __post_init__(self):
        if not isinstance(self.actions, tuple) and isinstance(self.actions, list):
            object.__setattr__(self, "actions", tuple(self.actions))
        self.tree_spec()
        if (isinstance(self.exploration, bool) or not isinstance(self.exploration, (int, float))
                or not math.isfinite(self.exploration) or self.exploration < 0):
            raise FieldError("exploration", f"exploration must be a finite number >= 0, got {self.exploration!r}")
        if self.utility not in UTILITIES:
            raise FieldError("utility", f"utility must be one of {', '.join(UTILITIES)}, got {self.utility!r}")
        for name in ("step_tokens", "answer_tokens"):
            value = getattr(self, name)
            if value is None and name == "answer_tokens":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FieldError(name, f"{name} must be an integer >= 1, got {value!r}")
        if (isinstance(self.mask_fraction, bool) or not isinstance(self.mask_fraction, (int, float))
                or not 0 < self.mask_fraction < 1):
            raise FieldError("mask_fraction", f"mask_fraction must be in (0, 1), got {self.mask_fraction!r}")
        if self.discriminator is not None:
            from align_jax.methods.principals.base import model_field_error

            error = model_field_error("discriminator", self.discriminator)
            if error is not None:
                raise error

    def tree_spec(self, default_rollouts: int = 16) -> TreeSpec:
        """The static tree layout (raises :class:`~align_jax.config.FieldError` when invalid).

        Args:
          default_rollouts: R when ``rollouts`` is unset.
        """
        rollouts = self.rollouts if self.rollouts is not None else default_rollouts
        return make_tree_spec(rollouts=rollouts, max_depth=self.max_depth, actions=self.actions,
                              children_per_expansion=self.children_per_expansion, max_nodes=self.max_nodes,
                              reward=self.reward)

    def answer_budget(self, agent_max_new_tokens: int) -> int:
        """Tokens of a full completion for an agent whose ``max_new_tokens`` is given."""
        return int(self.answer_tokens if self.answer_tokens is not None else agent_max_new_tokens)

    def step_budget(self, agent_max_new_tokens: int) -> int:
        """Tokens of a one-step child for an agent whose ``max_new_tokens`` is given."""
        return min(int(self.step_tokens), self.answer_budget(agent_max_new_tokens))
