"""ECON losses: TD targets and every loss term on a hand-computed example; BNE gains >= 0."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.methods.econ.config import TrainConfig
from align_jax.methods.econ.losses import (Transition, combine_rewards, econ_loss, reward_weight_loss, td_target,
                                         update_reward_weights)
from align_jax.methods.econ.networks import init_networks, network_graphdefs

from tests.methods.econ.conftest import tiny_network

F, C = 6, 3


def test_td_target_by_hand():
    y = td_target(jnp.array([1.0, 0.5]), jnp.array([0.0, 1.0]), jnp.array([2.0, 3.0]), 0.9)
    np.testing.assert_allclose(y, [1.0 + 0.9 * 2.0, 0.5], rtol=1e-6)


def test_combine_rewards_default_weights():
    r = combine_rewards(jnp.array([[1.0, 1.0, 0.5], [0.0, 0.0, 1.0]]), jnp.array([0.5, 0.3, 0.2]))
    np.testing.assert_allclose(r, [0.5 + 0.3 + 0.1, 0.2], rtol=1e-6)


def _constant_params(params, q_bias, commit_bias):
    """Belief networks whose Q ignores the observation (Q_i(., a) = q_bias[i, a]); a mixer
    with Q_tot = elu(sum_i m_i q_i) + 0.5 (E = 1, W1 = 1, b1 = 0, w2 = 1, b2 = 0.5)."""
    belief = params.belief.to_pure_dict()
    belief["q_out"]["kernel"] = jnp.zeros_like(belief["q_out"]["kernel"])
    belief["q_out"]["bias"] = jnp.asarray(q_bias, jnp.float32)
    mixer = jax.tree.map(jnp.zeros_like, params.mixer.to_pure_dict())
    mixer["hyper_w1"]["bias"] = jnp.ones((1,))
    mixer["hyper_w2"]["bias"] = jnp.ones((1,))
    mixer["hyper_b2_out"]["bias"] = jnp.full((1,), 0.5)
    encoder = params.encoder.to_pure_dict()
    encoder["commitment_head"]["kernel"] = jnp.zeros_like(encoder["commitment_head"]["kernel"])
    encoder["commitment_head"]["bias"] = jnp.asarray(commit_bias, jnp.float32)
    out = jax.tree.map(lambda x: x, params)
    for state, pure in ((out.belief, belief), (out.mixer, mixer), (out.encoder, encoder)):
        state.replace_by_pure_dict(pure)
    return out


@pytest.fixture(scope="module")
def hand_example():
    cfg = tiny_network(num_temperatures=3, num_top_ps=1, mixer_embed_dim=1)
    nets = network_graphdefs(cfg, F, C)
    params = jax.jit(lambda k: init_networks(cfg, F, C, 2, k)[1])(jax.random.key(0))
    online = _constant_params(params, [[0.2, 0.7, -0.1], [0.4, 0.1, 0.3]], [0.5, 0.0, 0.0])
    target = _constant_params(params, [[1.0, 0.5, 0.0], [0.0, 2.0, 1.0]], [0.5, 0.0, 0.0])
    batch = Transition(
        obs=jax.random.normal(jax.random.key(1), (2, 2, F)),
        action=jnp.array([[1, 2], [0, 0]], jnp.int32),
        local_reward=jnp.array([[1.0, 0.0], [0.5, 0.5]]),
        team_reward=jnp.array([0.5, 1.0]),
        next_obs=jax.random.normal(jax.random.key(2), (2, 2, F)),
        done=jnp.array([0.0, 1.0]),
        mask=jnp.ones((2, 2)),
        commit_features=jnp.array([[0.5, 0.0, 0.0], [1.0, 1.0, 1.0]]),
    )
    config = TrainConfig(gamma=0.9, td_weight=1.0, mixer_weight=1.0, consistency_weight=0.1, bne_weight=0.1)
    return nets, online, target, batch, config


def test_every_loss_term_equals_the_hand_computation(hand_example):
    nets, online, target, batch, config = hand_example
    total, info = jax.jit(lambda o, t, b: econ_loss(o, t, nets, b, config))(online, target, batch)
    # local targets: y = r + 0.9 (1 - d) max_a Qbar:  [[1 + 0.9*1.0, 0 + 0.9*2.0], [0.5, 0.5]]
    # chosen Qs: [[0.7, 0.3], [0.2, 0.4]]
    td = ((0.7 - 1.9) ** 2 + (0.3 - 1.8) ** 2 + (0.2 - 0.5) ** 2 + (0.4 - 0.5) ** 2) / 4
    # Q_tot = (q_0 + q_1) + 0.5: online [1.5, 1.1]; target on the next maxima: 1.0 + 2.0 + 0.5 = 3.5
    # y_tot = [0.5 + 0.9 * 3.5, 1.0]
    mixer = ((1.5 - 3.65) ** 2 + (1.1 - 1.0) ** 2) / 2
    # commitment head predicts [0.5, 0, 0]: error 0 on sample 0, (0.25 + 1 + 1) / 3 per agent on sample 1
    consistency = (0.75 + 0.75) / 4
    # BNE gains: sample 0 agent 1 could go 0.3 -> 0.4 (+0.1); sample 1 agent 0 0.2 -> 0.7 (+0.5)
    bne = (0.1 + 0.5) / 4
    np.testing.assert_allclose([info.td, info.mixer, info.consistency, info.bne],
                               [td, mixer, consistency, bne], rtol=1e-5)
    np.testing.assert_allclose(total, td + mixer + 0.1 * consistency + 0.1 * bne, rtol=1e-5)


def test_absent_executors_drop_out_of_the_losses(hand_example):
    nets, online, target, batch, config = hand_example
    masked = batch._replace(mask=jnp.array([[1.0, 0.0], [1.0, 0.0]]))
    _, info = jax.jit(lambda o, t, b: econ_loss(o, t, nets, b, config))(online, target, masked)
    np.testing.assert_allclose(info.td, ((0.7 - 1.9) ** 2 + (0.2 - 0.5) ** 2) / 2, rtol=1e-5)
    # Q_tot now mixes agent 0 alone: online [1.2, 0.7], target 0.5 + 0.9 * (1.0 + 0.5), 1.0
    np.testing.assert_allclose(info.mixer, ((1.2 - 1.85) ** 2 + (0.7 - 1.0) ** 2) / 2, rtol=1e-5)
    np.testing.assert_allclose(info.bne, (0.0 + 0.5) / 2, rtol=1e-5)


def test_learned_reward_weights_converge_to_the_simplex_projection_of_the_mean_reward():
    # L_dr = ||rbar - alpha||^2 on the simplex: the minimiser is the Euclidean projection of rbar.
    # rbar = (0.5, 0.6, 0.4) sums to 1.5, so the projection subtracts 1/6 from each component.
    alpha = jnp.array([0.5, 0.3, 0.2])
    rbar = jnp.array([0.5, 0.6, 0.4])
    losses = []
    for _ in range(2000):
        losses.append(float(reward_weight_loss(alpha, rbar)))
        alpha = update_reward_weights(alpha, rbar, 0.5)
    np.testing.assert_allclose(alpha, [1 / 3, 0.6 - 1 / 6, 0.4 - 1 / 6], atol=1e-4)
    assert np.all(np.diff(losses) <= 1e-7) and losses[-1] < losses[0]
    # projection on an edge: (0.2, 0.9, 0.6) -> (0, 0.65, 0.35); softmax approaches the edge
    alpha = jnp.array([0.5, 0.3, 0.2])
    for _ in range(2000):
        alpha = update_reward_weights(alpha, jnp.array([0.2, 0.9, 0.6]), 0.5)
    np.testing.assert_allclose(alpha, [0.0, 0.65, 0.35], atol=0.01)


def test_a_zero_reward_weight_stays_zero_and_nothing_moves_without_paid_rewards():
    alpha = update_reward_weights(jnp.array([0.5, 0.5, 0.0]), jnp.array([0.2, 0.9, 0.6]), 0.5)
    assert float(alpha[2]) == 0.0 and np.all(np.isfinite(np.asarray(alpha)))
    np.testing.assert_allclose(alpha.sum(), 1.0, rtol=1e-6)
    assert float(alpha[1]) > 0.5  # towards the larger mean component
    start = jnp.array([0.5, 0.3, 0.2])
    same = update_reward_weights(start, jnp.array([1.0, 0.0, 0.0]), 0.5, ready=jnp.asarray(False))
    np.testing.assert_array_equal(same, start)
