"""The flashbax replay buffer inside jit and vmap over seeds."""

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.methods.econ.buffer import make_replay_buffer, sample_batch
from align_jax.methods.econ.config import TrainConfig
from align_jax.methods.econ.losses import Transition

N, F, C, E = 2, 4, 3, 4


def _items(start, e=E):
    ids = start + jnp.arange(e, dtype=jnp.float32)
    return Transition(obs=jnp.broadcast_to(ids[:, None, None], (e, N, F)), action=jnp.zeros((e, N), jnp.int32),
                      local_reward=jnp.zeros((e, N)), team_reward=ids, next_obs=jnp.zeros((e, N, F)),
                      done=jnp.zeros((e,)), mask=jnp.ones((e, N)), commit_features=jnp.zeros((e, C)))


def test_buffer_is_a_ring_and_vmaps_over_seeds():
    config = TrainConfig(batch_size=8, buffer_size=12, num_steps=8, update_every=8)
    buffer = make_replay_buffer(config)
    example = jax.tree.map(lambda x: x[0], _items(0))

    @jax.jit
    @jax.vmap
    def run(key, offset):
        state = buffer.init(example)
        ready = [buffer.can_sample(state)]
        for step in range(5):  # 20 items into a ring of 12: items 8..19 remain
            state = buffer.add(state, _items(offset + step * E))
            ready.append(buffer.can_sample(state))
        batch = sample_batch(buffer, state, key)
        return jnp.stack(ready), batch.team_reward, batch.obs

    keys = jax.random.split(jax.random.key(0), 3)
    ready, rewards, obs = run(keys, jnp.array([0.0, 100.0, 200.0]))
    np.testing.assert_array_equal(ready[0], [False, False, True, True, True, True])  # a batch of 8 after 2 adds
    assert rewards.shape == (3, 8) and obs.shape == (3, 8, N, F)
    for seed, offset in enumerate([0, 100, 200]):
        assert set(np.asarray(rewards[seed]).tolist()) <= set(range(offset + 8, offset + 20))
        np.testing.assert_array_equal(obs[seed, :, 0, 0], rewards[seed])  # fields stay aligned
    assert not np.array_equal(rewards[0] - 0, rewards[1] - 100)  # each seed samples with its own key
