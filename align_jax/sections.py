"""Config sections shared by several commands (``game:`` in ``simulate`` and ``reason``)."""

from __future__ import annotations

import dataclasses

from align_jax.game.types import GameConfig, GameParams
from align_jax.runner import ADDED_FIELD

__all__ = ["GameSection"]


@dataclasses.dataclass(frozen=True)
class GameSection:
    """The ``game:`` section: see :class:`align_jax.game.GameConfig` and ``GameParams``.

    ``learner`` names the agents' online learner (:data:`align_jax.game.learner.LEARNERS`:
    ``hedge``, ``regret_matching_plus``, ...).
    """

    num_rounds: int = 20
    mode: str = "expected"
    schedule: str = "constant"
    step_size: float = 0.1
    early_stop_tol: float = 0.0
    learner: str = dataclasses.field(default="hedge", metadata=ADDED_FIELD)

    def __post_init__(self):
        self.game_config(record_trajectory=False)
        GameParams.create(self.step_size)

    def game_config(self, record_trajectory: bool) -> GameConfig:
        return GameConfig(
            num_rounds=self.num_rounds,
            mode=self.mode,
            schedule=self.schedule,
            early_stop_tol=self.early_stop_tol,
            record_trajectory=record_trajectory,
            learner=self.learner,
        )
