"""The learner plug-in point: every registered learner passes the shipped conformance
test, the engine plays whichever ``GameConfig.learner`` names, and the conformance
test catches broken learners."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.game import LEARNERS, GameConfig, GameInputError, GameParams, Learner, hedge, make_candidates, play
from align_jax.game.conformance import learner_api_test
from align_jax.game.regret_matching import regret_matching_plus
from align_jax.registry import UnknownNameError


@pytest.mark.parametrize("schedule,step", [("constant", 0.5), ("anytime", 1.0)])
@pytest.mark.parametrize("name", LEARNERS.names())
def test_every_registered_learner_passes_the_conformance_test(name, schedule, step):
    learner_api_test(LEARNERS.get(name)(jnp.float32(step), schedule))


def test_registry_holds_hedge_and_a_second_learner():
    assert {"hedge", "regret_matching_plus"} <= set(LEARNERS.names())
    assert LEARNERS.get("hedge") is hedge.hedge_learner


def test_unknown_learner_is_a_clear_config_error():
    with pytest.raises(GameInputError, match=r"GameConfig.learner: unknown learner 'adam'; known: hedge, ") as info:
        GameConfig(learner="adam")
    assert info.value.field == "learner"
    with pytest.raises(UnknownNameError):
        LEARNERS.get("adam", field="learner")


def _old_hedge_policy(cum_reward, valid, eta):
    """The engine's Hedge policy before abstention: 0/0 on a row without valid slots."""
    logits = jnp.where(valid, eta[..., None] * cum_reward, -1e30)
    weights = jnp.where(valid, jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)), 0.0)
    return weights / jnp.sum(weights, axis=-1, keepdims=True)


def _variant(**overrides) -> Learner:
    return hedge.hedge_learner(jnp.float32(0.5))._replace(**overrides)


@pytest.mark.parametrize(
    "broken,message",
    [
        (  # NaN for an agent whose slots are all invalid
            lambda: _variant(
                policy=lambda s, v, t: _old_hedge_policy(s.cum_reward, v, jnp.full(v.shape[:-1], 0.5, jnp.float32))
            ),
            "simplex",
        ),
        (  # mass on padding
            lambda: _variant(policy=lambda s, v, t: jnp.full(v.shape, 1.0 / v.shape[-1], jnp.float32)),
            "simplex",
        ),
        (  # a bound that is not one
            lambda: _variant(regret_bound=lambda s, v, r: jnp.zeros(v.shape[:-1], jnp.float32)),
            "regret",
        ),
        (  # a state that changes dtype (not a scan carry)
            lambda: _variant(update=lambda s, r, v, t: s._replace(round=s.round + 1.0)),
            "state",
        ),
    ],
)
def test_conformance_test_catches_broken_learners(broken, message):
    with pytest.raises(AssertionError, match=message):
        learner_api_test(broken())


def test_conformance_test_catches_a_retrace():
    """A weakly typed initial state makes a jitted update retrace on the second round."""
    good = hedge.hedge_learner(jnp.float32(0.5))

    def weak_init(valid):
        state = good.init(valid)
        return state._replace(cum_reward=jnp.broadcast_to(jnp.asarray(0.0), valid.shape))  # weak float32

    assert jnp.broadcast_to(jnp.asarray(0.0), (2,)).weak_type
    with pytest.raises(AssertionError, match="compilation: retraced"):
        learner_api_test(good._replace(init=weak_init))
    learner_api_test(good)  # the same learner with a strongly typed state passes


def test_regret_matching_plus_is_scale_free_and_has_no_step_size():
    learner = regret_matching_plus(123.0, "anytime")
    valid = jnp.array([[True, True, False, True]])
    rewards = jnp.asarray(np.random.default_rng(0).normal(size=(6, 1, 4)), jnp.float32)
    state, scaled = learner.init(valid), learner.init(valid)
    for t, reward in enumerate(rewards, start=1):
        np.testing.assert_allclose(learner.policy(state, valid, t), learner.policy(scaled, valid, t), rtol=1e-5)
        state = learner.update(state, reward, valid, t)
        scaled = learner.update(scaled, 1000.0 * reward, valid, t)
    # Known first step: uniform, then proportional to the positive regrets.
    first = learner.policy(learner.init(valid), valid, 1.0)
    np.testing.assert_allclose(first, [[1 / 3, 1 / 3, 0.0, 1 / 3]])
    after = learner.update(learner.init(valid), jnp.array([[3.0, 0.0, 9.0, 0.0]]), valid, 1.0)
    np.testing.assert_allclose(after.cum_regret, [[2.0, 0.0, 0.0, 0.0]])  # r - <pi, r> = r - 1, clipped
    np.testing.assert_allclose(learner.policy(after, valid, 2.0), [[1.0, 0.0, 0.0, 0.0]])


def test_engine_plays_regret_matching_plus_through_the_config():
    """One registration, no engine change: the engine runs RM+ by name."""
    rng = np.random.default_rng(0)
    valid = rng.random((8, 3, 5)) < 0.7
    valid[..., 0] = True
    candidates = make_candidates(rng.random((8, 3, 5)), rng.normal(size=(8, 3, 5)), valid=valid)
    config = GameConfig(num_rounds=30, learner="regret_matching_plus", record_trajectory=True)
    rm = play(config, candidates, jax.random.key(0), GameParams.create(0.5))
    hedge_result = play(GameConfig(num_rounds=30), candidates, jax.random.key(0), GameParams.create(0.5))
    average = np.asarray(rm.average_policy)
    assert np.all(average[~valid] == 0) and np.allclose(average.sum(-1), 1.0, atol=1e-5)
    regret, bound = np.asarray(rm.regret), np.asarray(rm.regret_bound)
    assert np.all(regret <= bound + 1e-4 * (1 + bound))
    assert np.all(np.isfinite(bound)) and np.any(bound > 0)
    # A different learner: a different trajectory (the engine did not fall back to Hedge).
    assert np.abs(average - np.asarray(hedge_result.average_policy)).max() > 1e-2
    # The step size does not matter to RM+.
    again = play(config, candidates, jax.random.key(0), GameParams.create(2.0))
    np.testing.assert_array_equal(np.asarray(again.average_policy), average)


def test_regret_matching_plus_solves_a_dominance_solvable_game():
    u = [[0.6, 0.5, 0.3], [0.4, 0.7, 0.5]]
    s = [[0.0, 5.0, -1.0], [4.0, -2.0, -3.0]]
    result = play(GameConfig(num_rounds=200, learner="regret_matching_plus"), make_candidates(u, s), jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(result.submission), [1, 0])
    assert float(result.nash_gap) < 0.02


def test_a_learner_without_a_bound_reports_inf():
    def no_bound(step_size, schedule="constant"):
        return hedge.hedge_learner(step_size, schedule)._replace(regret_bound=None)

    learner_api_test(no_bound(jnp.float32(0.5)))  # the regret check is skipped, everything else applies
    rng = np.random.default_rng(1)
    candidates = make_candidates(rng.random((2, 3)), rng.random((2, 3)))
    config = GameConfig(num_rounds=4)
    LEARNERS.register("hedge_without_bound", no_bound)
    try:
        result = play(dataclasses.replace(config, learner="hedge_without_bound"), candidates, jax.random.key(0))
    finally:
        del LEARNERS._entries["hedge_without_bound"]  # keep the registry as the package made it
    assert np.all(np.isinf(np.asarray(result.regret_bound)))
    with_bound = play(config, candidates, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(result.average_policy), np.asarray(with_bound.average_policy))
