"""The simulated ECON environment: shapes, the accuracy curve, the stop rule, rewards, the
hierarchical variant, vmapping over params, and the calibration hook."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.methods.econ.config import SimConfig
from align_jax.methods.econ.sim import (Action, answer_distribution, calibrated_params, coordinate,
                                        fit_accuracy_curve, make_env_params, make_sim_env, observation_dim)

SIM = SimConfig(num_executors=3, max_rounds=4, num_answers=5)


def _action(temperature, top_p, n=3):
    return Action(jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (n,)),
                  jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (n,)))


@pytest.fixture(scope="module")
def env():
    return make_sim_env(SIM)


@pytest.fixture(scope="module")
def rollout(env):
    """Q questions x T rounds with given (temperature [N], top_p [N]); returns the infos."""

    @jax.jit
    def run(key, params, temperature, top_p):
        def one(k):
            obs, state = env.reset(jax.random.fold_in(k, 99), params)

            def body(carry, kk):
                obs, state = carry
                out = env.step(kk, state, Action(temperature, top_p), params)
                return (out.obs, out.state), (obs, out)

            return jax.lax.scan(body, (obs, state), jax.random.split(k, SIM.max_rounds))[1]

        return jax.vmap(one)(jax.random.split(key, 2000))

    # strong float32 inputs: a weakly typed jnp.full(.., 0.9) would compile a second program
    return lambda key, params, t, p: run(key, params, jnp.asarray(t, jnp.float32), jnp.asarray(p, jnp.float32))


def test_shapes_and_masked_observations(env, rollout):
    params = make_env_params(SIM, num_active=2)
    obs, out = rollout(jax.random.key(0), params, jnp.array([0.3, 1.0, 0.7]), jnp.full((3,), 0.9))
    q, t = 2000, SIM.max_rounds
    assert obs.shape == (q, t, 3, observation_dim(SIM)) and observation_dim(SIM) == env.observation_dim
    np.testing.assert_array_equal(obs[:, :, 2], 0.0)  # the absent executor sees nothing, not even its flag
    np.testing.assert_array_equal(obs[:, :, :2, -1], 1.0)
    assert out.obs.shape == obs.shape and out.local_reward.shape == (q, t, 3) and out.team_reward.shape == (q, t)
    assert out.info.commit_features.shape == (q, t, env.commitment_dim)
    np.testing.assert_array_equal(out.local_reward[:, :, 2], 0.0)


def test_accuracy_peaks_at_each_executors_best_temperature(rollout):
    params = make_env_params(SIM, heterogeneity=0.5, best_temperature=0.7)
    temps = np.exp(np.linspace(math.log(0.1), math.log(2.0), 61))
    # the same compiled rollout for every temperature; p_correct of the first round of question 0
    p = np.stack([np.asarray(rollout(jax.random.key(0), params, jnp.full((3,), t), jnp.full((3,), 0.9))[1]
                             .info.p_correct[0, 0]) for t in temps])  # [61, N]
    best = temps[np.argmax(p, axis=0)]
    expected = 0.7 * np.exp(0.5 * np.linspace(-1, 1, 3))
    np.testing.assert_allclose(np.log(best), np.log(expected), atol=np.log(temps[1] / temps[0]) / 2 + 1e-6)
    assert p.max(0)[1] > p.max(0)[0]  # the central executor is the strongest


def test_answer_distribution_and_top_p_concentration():
    logits = jnp.array([2.0, 1.0, 0.0, -1.0])
    wide = answer_distribution(jnp.float32(0.3), logits, jnp.float32(1.0), jnp.float32(0.95))
    narrow = answer_distribution(jnp.float32(0.3), logits, jnp.float32(1.0), jnp.float32(0.1))
    np.testing.assert_allclose([wide.sum(), narrow.sum()], 1.0, rtol=1e-6)
    assert wide[0] == pytest.approx(0.3) and narrow[0] == pytest.approx(0.3)
    np.testing.assert_allclose(narrow[1:], [0.7, 0, 0, 0], atol=1e-6)  # all wrong mass on the top distractor
    assert np.count_nonzero(np.asarray(wide[1:])) == 3  # the 3% tail is outside the 0.95 nucleus
    cold = answer_distribution(jnp.float32(0.3), logits, jnp.float32(0.1), jnp.float32(0.95))
    assert cold[1] > wide[1]  # lower temperature concentrates the wrong answers


def test_coordinator_rule():
    u = jnp.full((5 + 2 + 3,), 0.5)
    answers = jnp.array([2, 2, 0], jnp.int32)
    on = jnp.ones(3)
    args = dict(capacity=jnp.float32(5.0), overload_rate=jnp.float32(0.0), num_answers=5)
    assert int(coordinate(u, answers, on, skill=jnp.float32(1.0), **args)) == 0  # recognises the gold answer
    assert int(coordinate(u, answers, on, skill=jnp.float32(0.0), **args)) == 2  # majority
    assert int(coordinate(u, answers, jnp.array([0.0, 0.0, 1.0]), skill=jnp.float32(0.0), **args)) == 0
    no_gold = jnp.array([3, 1, 1], jnp.int32)
    assert int(coordinate(u, no_gold, on, skill=jnp.float32(1.0), **args)) == 1


def test_stop_rule_and_paid_rewards(env, rollout):
    params = make_env_params(SIM)
    spread = jnp.array([0.2, 0.7, 1.8])  # parameter variance well above 0.01
    obs, out = rollout(jax.random.key(3), params, spread, jnp.full((3,), 0.9))
    info, done = out.info, np.asarray(out.done)
    rounds = np.asarray(info.rounds)
    commit = np.asarray(info.commitment)
    # done exactly when the commitment repeats or the last round is reached
    repeated = np.zeros_like(done)
    repeated[:, 1:] = (commit[:, 1:] == commit[:, :-1]) & (rounds[:, 1:] > 1)
    np.testing.assert_array_equal(done, repeated | (rounds == SIM.max_rounds))
    assert rounds.max() == SIM.max_rounds and (rounds == 1).any()
    # rewards are paid only when the question ends
    assert np.all(np.asarray(out.team_reward)[~done] == 0) and np.all(np.asarray(out.local_reward)[~done] == 0)
    w = np.array([0.5, 0.3, 0.2])
    comps = np.asarray(info.reward_components)
    np.testing.assert_allclose(np.asarray(out.local_reward)[done], (comps @ w)[done], rtol=1e-5)
    # the round index in the observation follows the rounds
    np.testing.assert_array_equal(np.argmax(np.asarray(obs)[:, :, 0, 8:8 + SIM.max_rounds], -1), rounds - 1)
    # equal parameters: variance 0 < 0.01 stops after the first round
    _, same = rollout(jax.random.key(4), params, jnp.full((3,), 0.7), jnp.full((3,), 0.9))
    assert np.all(np.asarray(same.done)) and np.all(np.asarray(same.info.rounds) == 1)


def test_params_are_a_vmap_axis_and_difficulty_lowers_accuracy(env, rollout):
    params = jax.vmap(lambda d: make_env_params(SIM, difficulty=d))(jnp.array([-1.0, 0.0, 2.0]))
    obs, _ = jax.jit(jax.vmap(env.reset, in_axes=(None, 0)))(jax.random.key(0), params)
    # same key, three parameter sets: the difficulty views move with the difficulty only
    np.testing.assert_allclose(obs[:, :, 0] - obs[0, :, 0], np.array([[0.0], [1.0], [3.0]]).repeat(3, 1), atol=1e-5)
    acc = []
    for d in (-1.0, 0.0, 2.0):  # the same compiled rollout for every params value
        _, out = rollout(jax.random.key(1), make_env_params(SIM, difficulty=d), jnp.full((3,), 0.7), jnp.full((3,), 0.9))
        acc.append(float(np.asarray(out.info.answer_correct)[:, 0].mean()))
    assert acc[0] > acc[1] + 0.1 > acc[2] + 0.2


def test_hierarchy_helps_an_overloaded_coordinator():
    """With the default overload model (capacity 3), 9 executors under one coordinator commit
    worse than 3 groups of 3 with a central combiner."""

    def accuracy(sim):
        env = make_sim_env(sim)
        params = make_env_params(sim)

        @jax.jit
        def run(key):
            def one(k):
                _, state = env.reset(k, params)
                return env.step(jax.random.fold_in(k, 1), state, _action(0.7, 0.9, 9), params).info.commit_correct
            return jax.vmap(one)(jax.random.split(key, 4000)).mean()

        return float(run(jax.random.key(0)))

    flat = accuracy(SimConfig(num_executors=9, num_groups=1))
    hierarchical = accuracy(SimConfig(num_executors=9, num_groups=3))
    assert hierarchical > flat + 0.05


def test_calibration_recovers_a_known_curve():
    rng = np.random.default_rng(0)
    temps = np.array([0.3, 0.5, 0.7, 1.0, 1.4])
    skill, best, curvature, spread = 0.4, 0.8, 1.5, 0.7
    alpha = skill + spread * rng.standard_normal(200)
    logits = alpha[:, None] - curvature * (np.log(temps) - np.log(best)) ** 2
    rates = 1 / (1 + np.exp(-logits))
    fit = fit_accuracy_curve(temps, rates, num_samples=10_000)
    assert fit.best_temperature == pytest.approx(best, rel=1e-3)
    assert fit.temperature_curvature == pytest.approx(curvature, rel=1e-3)
    assert fit.skill == pytest.approx(alpha.mean(), abs=1e-3)
    assert fit.difficulty_std == pytest.approx(alpha.std(), rel=1e-3)
    assert fit.rmse < 1e-3
    params = calibrated_params(SIM, fit)
    np.testing.assert_allclose(params.log_best_temperature, np.log(fit.best_temperature), rtol=1e-5)
    np.testing.assert_allclose(params.difficulty_std, fit.difficulty_std, rtol=1e-5)
    # sampled rates (10 samples each) at the two temperatures of the committed reason rows
    two = np.array([0.7, 1.0])
    sampled = rng.binomial(10, 1 / (1 + np.exp(-(alpha[:, None] - curvature * np.log(two / best) ** 2)))) / 10
    with pytest.raises(ValueError, match="3 temperatures"):
        fit_accuracy_curve(two, sampled)
    fit2 = fit_accuracy_curve(two, sampled, num_samples=10, temperature_curvature=curvature)
    assert 0.5 < fit2.best_temperature < 1.3
    with pytest.raises(ValueError):
        fit_accuracy_curve(temps, rates[:, :3])
