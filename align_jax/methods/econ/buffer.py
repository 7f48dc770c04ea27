"""ECON's replay buffer: a flashbax item buffer of :class:`~align_jax.methods.econ.losses.Transition`.

flashbax keeps its state in a pytree of preallocated arrays and its ``add`` / ``sample`` /
``can_sample`` are pure, so the buffer lives inside the jitted training loop and is
``vmap``-ed over seeds like every other part of the train state.

Shapes: E transitions added per call (one per parallel question), B = ``batch_size``
sampled per update, capacity ``buffer_size`` (a ring: the oldest items are overwritten).
Sampling is uniform over the items stored so far and consumes its key.
"""

from __future__ import annotations

import flashbax
import jax

from align_jax.methods.econ.config import TrainConfig
from align_jax.methods.econ.losses import Transition

__all__ = ["make_replay_buffer", "sample_batch"]


def make_replay_buffer(config: TrainConfig):
    """A flashbax item buffer for batches of transitions.

    ``buffer.init(example)`` takes one unbatched :class:`Transition`;
    ``buffer.add(state, transitions)`` takes a batch [E, ...];
    ``buffer.sample(state, key).experience`` is a batch [B, ...];
    ``buffer.can_sample(state)`` is true once ``batch_size`` items are stored.
    """
    return flashbax.make_item_buffer(
        max_length=config.buffer_size,
        min_length=config.batch_size,
        sample_batch_size=config.batch_size,
        add_sequences=False,
        add_batches=True,
    )


def sample_batch(buffer, buffer_state, key: jax.Array) -> Transition:
    """A uniformly sampled batch [B, ...] of stored transitions; consumes ``key``."""
    return buffer.sample(buffer_state, key).experience
