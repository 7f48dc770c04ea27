"""ECON training in simulation: it learns a known best temperature and beats the baselines;
segments compose exactly; no retrace; the same numbers with and without jit (slow marker).

One tiny configuration is trained once (two seeds, vmapped; conftest ``trained_tiny``) and
shared by every test here and in test_run.py.  The task is a one-round question (variance
threshold 100 stops every question after its first round) whose accuracy peaks sharply at
a temperature on the action grid.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.methods.econ.run import seed_keys

STEPS = 1024


@pytest.fixture(scope="module")
def run(trained_tiny):
    assert trained_tiny["config"].train.num_steps == STEPS
    return trained_tiny


def test_learns_the_best_temperature_and_beats_the_baselines(run):
    r, best = run["result"], run["best"]
    learned = np.asarray(r.learned.accuracy)
    for baseline in (r.random, r.initial, r.fixed):
        assert np.all(learned > np.asarray(baseline.accuracy) + 0.1), (learned, baseline.accuracy)
    grid_step = math.log(2.0 / 0.1) / 4
    np.testing.assert_array_less(np.abs(np.log(np.asarray(r.greedy_temperature) / best)), grid_step / 2)
    np.testing.assert_array_less(np.abs(np.log(np.asarray(r.learned.temperature) / best)), grid_step / 2)
    np.testing.assert_allclose(r.fixed.temperature, run["config"].train.baseline_temperature, rtol=1e-5)
    np.testing.assert_allclose(r.learned.rounds, 1.0)  # the one-round task
    log = run["final"].log
    assert np.all(np.asarray(log.updated)[:, -1])
    first = np.asarray(log.correct[:, :64]).sum(1) / np.asarray(log.episodes[:, :64]).sum(1)
    last = np.asarray(log.correct[:, -64:]).sum(1) / np.asarray(log.episodes[:, -64:]).sum(1)
    assert np.all(last > first + 0.15), (first, last)
    assert np.all(np.isfinite(np.asarray(log.loss.total)))


def test_two_segments_equal_one_run_and_nothing_retraces(run):
    segment = run["segment"]
    halves = segment(segment(run["init"], STEPS // 2), STEPS // 2)
    _assert_trees_close(halves, run["final"], rtol=1e-6, atol=1e-6)
    assert int(halves.step[0]) == STEPS and int(halves.num_updates[0]) == STEPS // run["config"].train.update_every
    # every segment length shares one program, and evaluate compiled once too
    run["evaluate"](halves, jax.random.split(jax.random.key(2), 2))
    assert segment._cache_size() == 1
    assert run["evaluate"]._cache_size() == 1
    with pytest.raises(ValueError, match="multiple of update_every"):
        run["trainer"].train_segment(jax.tree.map(lambda x: x[0], run["init"]), 3)


def _assert_trees_close(a, b, rtol=1e-4, atol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.slow
def test_same_numbers_with_and_without_jit(run):
    """One period (2 steps of 8 questions, then an update on a batch of 16), run eagerly under
    disable_jit without vmap, equals the jitted and vmapped program's first seed.  Slow
    (about a minute on CPU: every primitive is compiled on its own when eager); the default
    run checks the networks eagerly (tests/methods/econ/test_networks.py)."""
    trainer, update_every = run["trainer"], run["config"].train.update_every
    jitted = jax.tree.map(lambda x: x[0], run["segment"](run["init"], update_every))
    with jax.disable_jit():
        eager = trainer.init_state(seed_keys(run["config"])[0])
        eager = trainer.train_segment(eager, update_every)
    assert bool(eager.log.updated[0]) and bool(jitted.log.updated[0])
    _assert_trees_close(eager, jitted)
    assert not np.allclose(jax.tree.leaves(eager.params)[0], jax.tree.leaves(eager.initial_params)[0])


def test_fixed_reward_weights_stay_as_configured(run):
    np.testing.assert_allclose(run["final"].env_params.reward_weights, [[0.5, 0.3, 0.2]] * 2, rtol=1e-6)


def test_learned_reward_weights_move_on_the_simplex_and_resume_exactly():
    import dataclasses

    from tests.methods.econ.conftest import known_best_config
    from align_jax.methods.econ.train import make_trainer

    config = known_best_config()
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, num_steps=256,
                                                                   reward_weight_lr=0.2))
    trainer = make_trainer(config)
    init = trainer.init_state(jax.random.key(0))
    np.testing.assert_allclose(init.env_params.reward_weights, [0.5, 0.3, 0.2], rtol=1e-6)
    final = trainer.train_segment(init, 256)
    halves = trainer.train_segment(trainer.train_segment(init, 128), 128)
    _assert_trees_close(halves, final, rtol=1e-6, atol=1e-6)
    alpha = np.asarray(final.env_params.reward_weights)
    np.testing.assert_allclose(alpha.sum(), 1.0, rtol=1e-5)
    # on this one-round task executors agree with the commitment far more often than they are
    # right, so L_dr moves weight from R_TS to R_AL (the configured 0.5 / 0.3 reverses)
    assert alpha[1] > alpha[0] and alpha[0] < 0.4, alpha
