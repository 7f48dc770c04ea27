"""Belief networks, encoder and mixer: the grid, monotonicity, shapes and masking for any N."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from align_jax.methods.econ.networks import (action_grid, agent_forward, encode, init_networks, mix,
                                             network_graphdefs)

from tests.methods.econ.conftest import tiny_network

F, C, N_MAX = 12, 3, 5


@pytest.fixture(scope="module")
def nets_params():
    nets = network_graphdefs(tiny_network(), F, C)
    params = jax.jit(lambda k: init_networks(tiny_network(), F, C, N_MAX, k)[1])(jax.random.key(0))
    return nets, params


def forward(nets, params, obs, mask):
    """beliefs, q, encoded, group, commitment prediction, Q_tot(greedy) for obs [N, F]."""
    beliefs, q = agent_forward(nets, params, obs)
    encoded, group, commit = encode(nets, params, beliefs, mask)
    return beliefs, q, encoded, group, commit, mix(nets, params, q.max(-1), encoded, group, mask)


def test_action_grid_covers_the_ranges():
    grid = np.array(action_grid(tiny_network(num_temperatures=4, num_top_ps=3)))
    assert grid.shape == (12, 2)
    temps, tops = np.unique(grid[:, 0]), np.unique(grid[:, 1])
    assert np.isclose(temps.min(), 0.1) and np.isclose(temps.max(), 2.0)
    assert np.isclose(tops.min(), 0.1) and np.isclose(tops.max(), 0.95)
    assert np.allclose(np.diff(np.log(temps)), math.log(20) / 3)  # geometric in temperature


def test_mixer_is_monotone_in_every_local_q(nets_params):
    """dQ_tot/dQ_i >= 0 for random Qs, beliefs, masks and mixer parameters."""
    nets, base = nets_params
    d = tiny_network().belief_dim

    def grads(key):
        k_p, k_q, k_e, k_m = jax.random.split(key, 4)
        flat, unravel = ravel_pytree(base.mixer)
        params = base._replace(mixer=unravel(flat + 2.0 * jax.random.normal(k_p, flat.shape)))
        q = 5.0 * jax.random.normal(k_q, (N_MAX,))
        encoded = jax.random.normal(k_e, (N_MAX, d))
        mask = (jax.random.uniform(k_m, (N_MAX,)) < 0.7).astype(jnp.float32).at[0].set(1.0)
        g = jax.grad(lambda q: mix(nets, params, q, encoded, encoded.mean(0), mask))(q)
        return g, mask

    g, mask = jax.jit(jax.vmap(grads))(jax.random.split(jax.random.key(1), 256))
    assert np.all(np.asarray(g) >= 0.0)
    assert np.all(np.asarray(g)[np.asarray(mask) == 0] == 0.0)  # absent executors do not count
    assert np.mean(np.asarray(g)[np.asarray(mask) == 1] > 0) > 0.5  # and present ones do (elu saturates for some)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_shapes_for_any_n(nets_params, n):
    nets, params = nets_params
    cfg = tiny_network()
    params = params._replace(belief=jax.tree.map(lambda x: x[:n], params.belief))
    obs = jax.random.normal(jax.random.key(n), (n, F))
    beliefs, q, encoded, group, commit, q_tot = jax.jit(lambda p, o: forward(nets, p, o, jnp.ones((n,))))(params, obs)
    assert beliefs.shape == (n, cfg.belief_dim) and q.shape == (n, cfg.num_actions)
    assert encoded.shape == (n, cfg.belief_dim) and group.shape == (cfg.belief_dim,) and commit.shape == (n, C)
    assert q_tot.shape == () and np.isfinite(float(q_tot))
    assert np.all(np.abs(np.asarray(beliefs)) <= 1.0)


@pytest.mark.parametrize("n_present", [1, 2])
def test_padding_with_absent_executors_changes_nothing(nets_params, n_present):
    """N=5 slots with 5-n absent give the same group, encodings and Q_tot as n slots, whatever
    the absent slots hold."""
    nets, params = nets_params
    obs = jax.random.normal(jax.random.key(7), (N_MAX, F))
    mask = (jnp.arange(N_MAX) < n_present).astype(jnp.float32)

    @jax.jit
    def run(params, obs, mask, q_noise):
        beliefs, q = agent_forward(nets, params, obs)
        encoded, group, _ = encode(nets, params, beliefs, mask)
        q_local = q.max(-1) + q_noise
        return encoded[:n_present], group, mix(nets, params, q_local, encoded, group, mask)

    garbage = obs.at[n_present:].set(100.0)
    noise = jnp.zeros((N_MAX,)).at[n_present:].set(-50.0)
    padded = run(params, obs, mask, jnp.zeros((N_MAX,)))
    padded_garbage = run(params, garbage, mask, noise)
    small = params._replace(belief=jax.tree.map(lambda x: x[:n_present], params.belief))
    unpadded = run(small, obs[:n_present], jnp.ones((n_present,)), jnp.zeros((n_present,)))
    for a, b, c in zip(padded, padded_garbage, unpadded):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)


def test_executors_have_their_own_networks(nets_params):
    nets, params = nets_params
    obs = jnp.broadcast_to(jax.random.normal(jax.random.key(3), (F,)), (N_MAX, F))
    _, q = agent_forward(nets, params, obs)
    assert not np.allclose(q[0], q[1])  # same observation, different networks


def test_same_numbers_with_and_without_jit(nets_params):
    nets, params = nets_params
    obs = jax.random.normal(jax.random.key(11), (N_MAX, F))
    mask = jnp.array([1.0, 1.0, 0.0, 1.0, 0.0])
    jitted = jax.jit(lambda p, o, m: forward(nets, p, o, m))(params, obs, mask)
    with jax.disable_jit():
        eager = forward(nets, params, obs, mask)
    for a, b in zip(eager, jitted):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
