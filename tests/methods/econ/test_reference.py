"""The JAX loss and gradients agree with the hand-written NumPy reference; the NumPy
simulator and training loop (the benchmark's baseline) run and follow the same rules."""

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.methods.econ.config import EconConfig, SimConfig, TrainConfig
from align_jax.methods.econ.losses import Transition, econ_loss
from align_jax.methods.econ.networks import init_networks, network_graphdefs
from align_jax.methods.econ.reference import NumpyEnv, NumpyTrainer, loss_and_grads, params_to_numpy
from align_jax.methods.econ.sim import make_env_params, make_sim_env

from tests.methods.econ.conftest import tiny_network

F, C, N, B = 12, 3, 3, 6


def test_loss_and_gradients_match_the_numpy_reference():
    cfg = tiny_network(num_blocks=0, num_temperatures=3)
    nets = network_graphdefs(cfg, F, C)
    init = jax.jit(lambda k: init_networks(cfg, F, C, N, k)[1])
    params, target = init(jax.random.key(0)), init(jax.random.key(1))
    rng = np.random.default_rng(0)
    batch = Transition(
        obs=jnp.asarray(rng.normal(size=(B, N, F)), jnp.float32),
        action=jnp.asarray(rng.integers(0, cfg.num_actions, (B, N)), jnp.int32),
        local_reward=jnp.asarray(rng.random((B, N)), jnp.float32),
        team_reward=jnp.asarray(rng.random(B), jnp.float32),
        next_obs=jnp.asarray(rng.normal(size=(B, N, F)), jnp.float32),
        done=jnp.asarray([0, 1, 0, 0, 1, 0], jnp.float32),
        mask=jnp.asarray([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1], [1, 1, 0], [0, 1, 1]], jnp.float32),
        commit_features=jnp.asarray(rng.random((B, C)), jnp.float32))
    config = TrainConfig(bne_weight=0.7, consistency_weight=0.3)
    (loss, info), grads = jax.jit(jax.value_and_grad(lambda p: econ_loss(p, target, nets, batch, config),
                                                     has_aux=True))(params)
    ref_loss, ref_info, ref_grads = loss_and_grads(params_to_numpy(params), params_to_numpy(target),
                                                   {k: np.asarray(v, np.float64) for k, v in batch._asdict().items()},
                                                   config)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    for name in ("td", "mixer", "consistency", "bne"):
        np.testing.assert_allclose(float(getattr(info, name)), ref_info[name], rtol=1e-5, atol=1e-7)
    assert ref_info["bne"] > 0
    mine = params_to_numpy(grads)

    def compare(a, b, path=""):
        for key in a:
            if isinstance(a[key], dict):
                compare(a[key], b[key], f"{path}/{key}")
            else:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=f"{path}/{key}")

    compare(mine, ref_grads)


def test_numpy_simulator_follows_the_same_rules():
    sim = SimConfig(num_executors=3, max_rounds=4, num_answers=5)
    params = make_env_params(sim)
    env = NumpyEnv(params, sim.num_groups, sim.max_rounds, sim.num_answers, np.random.default_rng(0))
    assert env.observe().shape == (3, make_sim_env(sim).observation_dim)
    # equal parameters: stop after one round; rewards paid then
    _, local, team, done, cf, _ = env.step(np.full(3, 0.7), np.full(3, 0.9))
    assert done and cf.shape == (C,) and 0 <= team <= 1
    # spread parameters: questions last until the commitment repeats or 4 rounds
    lengths = []
    for _ in range(200):
        rounds = 1
        while not env.step(np.array([0.2, 0.7, 1.8]), np.full(3, 0.9))[3]:
            rounds += 1
        lengths.append(rounds)
    assert min(lengths) >= 2 and max(lengths) == 4


def test_numpy_trainer_runs():
    config = EconConfig(network=tiny_network(num_blocks=0), sim=SimConfig(num_executors=2, max_rounds=3),
                        train=TrainConfig(num_steps=16, num_envs=2, update_every=2, batch_size=4, buffer_size=64))
    params = params_to_numpy(jax.jit(lambda k: init_networks(config.network, 12, C, 2, k)[1])(jax.random.key(0)))
    trainer = NumpyTrainer(config, params, make_env_params(config.sim), network_graphdefs(config.network, 12, C).grid)
    before = params["mixer"]["hyper_w1"]["kernel"].copy()
    assert trainer.run(16) == 16
    assert len(trainer.losses) == 8 and np.all(np.isfinite(trainer.losses))
    assert not np.allclose(before, trainer.params["mixer"]["hyper_w1"]["kernel"])
