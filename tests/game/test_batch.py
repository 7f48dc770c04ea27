"""``play_batch``: the public batch entry point, validated and callable inside ``jit``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.game import (
    GameConfig,
    GameInputError,
    GameParams,
    ScenarioParams,
    ScenarioSpec,
    make_candidates,
    play,
    play_batch,
    sample,
)
from align_jax.game.delegation import _play_batch

Q, N, K = 8, 3, 4
CONFIG = GameConfig(num_rounds=5, mode="sampled")


def games(seed=0):
    rng = np.random.default_rng(seed)
    return make_candidates(rng.random((Q, N, K)), rng.normal(size=(Q, N, K)))


def keys(seed=0):
    return jax.random.split(jax.random.key(seed), Q)


def test_play_is_play_batch_on_split_keys():
    candidates, params = games(), GameParams.create(np.linspace(0.2, 1.0, Q).astype(np.float32))
    direct = play_batch(CONFIG, candidates, jax.random.split(jax.random.key(1), Q), params)
    via_play = play(CONFIG, candidates, jax.random.key(1), params)
    for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(via_play)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Raw uint32 keys [Q, 2] are accepted too; a scalar step size is broadcast.
    raw = play_batch(CONFIG, candidates, jax.random.split(jax.random.PRNGKey(1), Q), GameParams.create(0.5))
    assert raw.submission.shape == (Q, N)


def test_play_batch_inside_a_callers_jit_equals_outside():
    """The simulate pattern: sample the games and play them in one compiled function."""
    spec = ScenarioSpec(num_agents=N, num_candidates=K, pool_size=8)
    scenario = ScenarioParams.create()

    @jax.jit
    def sweep(key, step):
        k_games, k_play = jax.random.split(key)
        candidates = jax.vmap(sample, in_axes=(None, None, 0))(spec, scenario, jax.random.split(k_games, Q))
        result = play_batch(CONFIG, candidates, jax.random.split(k_play, Q), GameParams(jnp.broadcast_to(step, (Q,))))
        return candidates, result

    candidates, inside = sweep(jax.random.key(0), jnp.float32(0.4))
    _, k_play = jax.random.split(jax.random.key(0))
    outside = play_batch(CONFIG, candidates, jax.random.split(k_play, Q), GameParams.create(0.4))
    for a, b in zip(jax.tree.leaves(inside), jax.tree.leaves(outside)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "make_args,message",
    [
        (lambda c, k, p: (c, k[:3], p), r"keys must be 8 PRNG keys"),
        (lambda c, k, p: (jax.tree.map(lambda x: x[0], c), k, p), r"candidates must be \[Q, N, K\]"),
        (lambda c, k, p: (c._replace(valid=c.valid.astype(jnp.int32)), k, p), r"CandidateSet.valid must be a bool array"),
        (lambda c, k, p: (c._replace(agent_utility=c.agent_utility[..., :2]), k, p), r"agent_utility has shape"),
        (lambda c, k, p: (c, k, GameParams(jnp.ones((3,)))), r"step_size must be a scalar or \[Q=8\]"),
        (lambda c, k, p: (c, k, 0.5), r"params must be a GameParams"),
    ],
)
def test_shape_and_dtype_errors_are_raised_at_trace_time(make_args, message):
    candidates, key_array, params = games(), keys(), GameParams.create(0.5)

    def traced(candidates, key_array):
        return play_batch(CONFIG, *make_args(candidates, key_array, params)).nash_gap

    with pytest.raises(GameInputError, match=message):
        jax.jit(traced)(candidates, key_array)
    with pytest.raises(GameInputError, match=message):  # and on concrete inputs
        traced(candidates, key_array)


def test_value_checks_run_on_concrete_inputs_only():
    candidates = games()
    bad = candidates._replace(agent_utility=candidates.agent_utility.at[2, 1, 0].set(jnp.nan))
    with pytest.raises(GameInputError, match="agent_utility is not finite"):
        play_batch(CONFIG, bad, keys(), GameParams.create(0.5))
    with pytest.raises(GameInputError, match="step_size"):
        play_batch(CONFIG, candidates, keys(), GameParams(jnp.full((Q,), -1.0)))
    with pytest.raises(GameInputError, match="config must be a GameConfig"):
        play_batch({"num_rounds": 5}, candidates, keys(), GameParams.create(0.5))
    # validate=False skips the value checks (no host transfer), not the shape checks.
    play_batch(CONFIG, candidates, keys(), GameParams.create(0.5), validate=False)
    # Traced values cannot be checked: no error, no host sync.
    traced = jax.jit(lambda c: play_batch(CONFIG, c, keys(), GameParams(jnp.full((Q,), 0.5))).nash_gap)(bad)
    assert traced.shape == (Q,)


def test_play_batch_does_not_retrace_for_new_values():
    play_batch(CONFIG, games(0), keys(0), GameParams.create(0.5))
    size = _play_batch._cache_size()
    play_batch(CONFIG, games(1), keys(1), GameParams.create(np.full(Q, 0.9, np.float32)))
    play_batch(CONFIG, games(2), keys(2), GameParams.create(0.1))
    assert _play_batch._cache_size() == size
