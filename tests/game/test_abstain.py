"""An agent with no valid slot abstains: the game is the game without it, and nothing is NaN.

Before, such an agent made its Hedge policy 0/0 = NaN, which the ranking feedback
spread to every agent of the game; the batch path inside ``jit`` (what
``align-jax simulate`` uses) cannot reject it, so the engine now defines it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.game import GameConfig, GameInputError, GameParams, make_candidates, play, play_batch

N, K, Q = 3, 5, 6
ABSENT = {0: 1, 1: 1, 2: 0, 3: 2, 4: 2, 5: 0}  # game -> the agent without valid slots


def games_with_abstaining_agents():
    rng = np.random.default_rng(0)
    valid = rng.random((Q, N, K)) < 0.7
    valid[..., 0] = True
    for game, agent in ABSENT.items():
        valid[game, agent] = False
    nan = np.float32(np.nan)
    u = np.where(valid, rng.random((Q, N, K)), nan)
    s = np.where(valid, np.round(rng.normal(size=(Q, N, K)), 1), nan)  # score ties across agents
    ids = rng.integers(0, 2 * K, (Q, N, K))
    return make_candidates(
        u, s, valid=valid, answer_id=ids, principal_value=np.where(valid, s + 0.1, nan), correct=ids == 0
    )


def leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("mode", ["expected", "sampled"])
def test_abstaining_agent_gives_finite_results(mode):
    """Fails on the old engine: NaN policies, regrets and outcomes for the whole game."""
    candidates = games_with_abstaining_agents()
    config = GameConfig(num_rounds=8, mode=mode, schedule="anytime", record_trajectory=True)
    result = play(config, candidates, jax.random.key(0), GameParams.create(0.7), validate=False)
    for name, value in leaves(result).items():
        if value.dtype.kind == "f":
            assert np.all(np.isfinite(value)), f"{name} is not finite"
    for game, agent in ABSENT.items():
        assert result.submission[game, agent] == -1
        assert result.chosen_agent[game] != agent
        assert np.all(np.asarray(result.average_policy[game, agent]) == 0)
        assert result.regret[game, agent] == 0 and result.regret_bound[game, agent] == 0
    # Everyone else still plays a distribution and submits a valid slot.
    present = np.asarray(candidates.valid).any(-1)
    np.testing.assert_allclose(np.asarray(result.average_policy).sum(-1)[present], 1.0, atol=1e-5)
    submitted = np.take_along_axis(np.asarray(candidates.valid), np.maximum(np.asarray(result.submission), 0)[..., None], -1)[..., 0]
    assert np.all(submitted[present])


def test_abstaining_agent_is_the_game_without_it():
    """Expected mode: every number equals the (N-1)-agent game's, agent indices mapped."""
    candidates = games_with_abstaining_agents()
    config = GameConfig(num_rounds=12, mode="expected", schedule="constant", early_stop_tol=1e-3)
    params = GameParams.create(np.linspace(0.3, 1.5, Q).astype(np.float32))
    full = play(config, candidates, jax.random.key(0), params)  # validation accepts abstaining agents
    for game, agent in ABSENT.items():
        others = [i for i in range(N) if i != agent]
        reduced_candidates = jax.tree.map(lambda x: x[game][jnp.asarray(others)], candidates)
        reduced = play(config, reduced_candidates, jax.random.key(0), GameParams.create(params.step_size[game]))
        pick = lambda r, g=game: jax.tree.map(lambda x: x[g], r)  # noqa: E731
        got = pick(full)
        for field in ("average_policy", "final_policy", "regret", "regret_bound", "deviation_gain"):
            np.testing.assert_allclose(
                np.asarray(getattr(got, field))[others], np.asarray(getattr(reduced, field)), atol=1e-5, err_msg=field
            )
        np.testing.assert_array_equal(np.asarray(got.submission)[others], np.asarray(reduced.submission))
        assert int(got.chosen_agent) == others[int(reduced.chosen_agent)]
        assert int(got.chosen_answer) == int(reduced.chosen_answer)
        assert int(got.rounds_played) == int(reduced.rounds_played)
        for name in ("nash_gap", "pareto_compliance", "pareto_mass"):
            np.testing.assert_allclose(getattr(got, name), getattr(reduced, name), atol=1e-5, err_msg=name)
        np.testing.assert_allclose(
            jax.tree.leaves((got.align, got.baselines)), jax.tree.leaves((reduced.align, reduced.baselines)), atol=1e-5
        )


def test_abstaining_agent_through_the_jitted_batch_path():
    """The simulate path: play_batch inside the caller's jit, no host validation possible."""
    candidates = games_with_abstaining_agents()
    config = GameConfig(num_rounds=6, mode="sampled")

    @jax.jit
    def mean_value(candidates, key):
        keys = jax.random.split(key, Q)
        result = play_batch(config, candidates, keys, GameParams(step_size=jnp.full((Q,), 0.5)))
        return jnp.mean(result.align.principal_value), jnp.mean(result.nash_gap)

    value, gap = mean_value(candidates, jax.random.key(3))
    assert np.isfinite(value) and np.isfinite(gap)


def test_a_game_without_any_valid_slot():
    candidates = games_with_abstaining_agents()
    valid = np.array(candidates.valid)
    valid[2] = False
    candidates = candidates._replace(valid=jnp.asarray(valid))
    with pytest.raises(GameInputError, match="question 2 has no valid candidate in any agent"):
        play(GameConfig(num_rounds=3), candidates, jax.random.key(0))
    # Inside jit it cannot be rejected: no pick, zero outcomes, nothing NaN.
    keys = jax.random.split(jax.random.key(0), Q)
    result = jax.jit(lambda c: play_batch(GameConfig(num_rounds=3), c, keys, GameParams(jnp.full((Q,), 0.5))))(candidates)
    assert int(result.chosen_agent[2]) == -1 and int(result.chosen_answer[2]) == -1
    np.testing.assert_array_equal(np.asarray(result.submission[2]), -1)
    for outcome in (result.align, *result.baselines):
        assert float(outcome.principal_value[2]) == 0.0 and float(outcome.correct[2]) == 0.0
    for name, value in leaves(result).items():
        if value.dtype.kind == "f":
            assert np.all(np.isfinite(value)), f"{name} is not finite"
