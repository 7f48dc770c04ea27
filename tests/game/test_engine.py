"""Invariants and known answers of the ALIGN delegation-game engine."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from align_jax.game import diagnostics, hedge
from align_jax.game.delegation import _play_batch, play, play_game
from align_jax.game.ranking import ranking_feedback
from align_jax.game.types import CandidateSet, GameConfig, GameParams, make_candidates


def random_game(seed, n=3, k=5, q=None, ties=False, pad=True):
    rng = np.random.default_rng(seed)
    shape = (n, k) if q is None else (q, n, k)
    u = rng.random(shape)
    s = rng.normal(size=shape)
    if ties:
        s = np.round(s)  # many exact ties
    valid = np.ones(shape, bool)
    if pad:
        count = rng.integers(1, k + 1, size=shape[:-1])
        valid = np.arange(k) < count[..., None]
    ids = rng.integers(0, 2 * k, size=shape)
    correct = ids == 0
    return make_candidates(u, s, valid=valid, answer_id=ids, correct=correct)


def assert_on_simplex(policy, valid, atol=1e-5):
    policy = np.asarray(policy)
    valid = np.broadcast_to(np.asarray(valid), policy.shape)
    assert np.all(policy >= -1e-7)
    assert np.all(policy[~valid] == 0.0), "mass on an invalid slot"
    np.testing.assert_allclose(policy.sum(-1), 1.0, atol=atol)


# ---------------------------------------------------------------- invariants


# Every (N, K, mode, schedule) compiles anew: no shrinking (it recompiles for minutes).
@settings(max_examples=12, deadline=None, phases=[Phase.explicit, Phase.generate])
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 4),
    k=st.integers(1, 6),
    mode=st.sampled_from(["expected", "sampled"]),
    schedule=st.sampled_from(["constant", "anytime"]),
    ties=st.booleans(),
)
def test_policies_on_simplex_and_regret_under_bound(seed, n, k, mode, schedule, ties):
    candidates = random_game(seed, n, k, q=4, ties=ties)
    config = GameConfig(num_rounds=12, mode=mode, schedule=schedule, record_trajectory=True)
    result = play(config, candidates, jax.random.key(seed), GameParams.create(0.7))
    valid = np.asarray(candidates.valid)
    assert_on_simplex(result.average_policy, valid)
    assert_on_simplex(result.final_policy, valid)
    assert_on_simplex(np.moveaxis(np.asarray(result.trajectory.policy), 1, 0), valid[None])
    regret, bound = np.asarray(result.regret), np.asarray(result.regret_bound)
    assert np.all(regret <= bound + 1e-4 * (1 + bound))
    traj_regret = np.asarray(result.trajectory.regret)
    traj_bound = np.asarray(result.trajectory.regret_bound)
    assert np.all(traj_regret <= traj_bound + 1e-4 * (1 + traj_bound))
    sub = np.asarray(result.submission)
    assert np.all(np.take_along_axis(valid, sub[..., None], -1)), "submitted an invalid slot"
    assert np.all(np.asarray(result.nash_gap) >= 0)
    for outcome in (result.align, *result.baselines):
        assert np.all(np.isfinite(np.asarray(outcome.principal_value)))
        assert np.all((np.asarray(outcome.correct) >= -1e-6) & (np.asarray(outcome.correct) <= 1 + 1e-6))


def test_jit_and_no_jit_agree():
    candidates = random_game(3, 3, 5, ties=True)
    key = jax.random.key(0)
    params = GameParams.create(0.5)
    for mode in ("expected", "sampled"):
        config = GameConfig(num_rounds=6, mode=mode, early_stop_tol=1e-3)
        jitted = jax.jit(play_game, static_argnums=0)(config, candidates, key, params)
        with jax.disable_jit():
            eager = play_game(config, candidates, key, params)
        chex.assert_trees_all_close(jitted, eager, atol=1e-5)


def test_expected_mode_is_deterministic():
    candidates = random_game(1, q=16)
    config = GameConfig(num_rounds=10, mode="expected")
    a = play(config, candidates, jax.random.key(0))
    b = play(config, candidates, jax.random.key(123))
    chex.assert_trees_all_equal(a, b)


def test_sampled_mode_reproducible_from_key():
    candidates = random_game(2, q=16, pad=False)
    config = GameConfig(num_rounds=10, mode="sampled")
    params = GameParams.create(2.0)
    a = play(config, candidates, jax.random.key(7), params)
    b = play(config, candidates, jax.random.key(7), params)
    c = play(config, candidates, jax.random.key(8), params)
    chex.assert_trees_all_equal(a, b)
    assert not np.allclose(np.asarray(a.average_policy), np.asarray(c.average_policy))


def test_no_retrace_on_second_call():
    config = GameConfig(num_rounds=5, mode="expected", schedule="anytime")
    play(config, random_game(5, q=8), jax.random.key(0), GameParams.create(0.3))
    size = _play_batch._cache_size()
    play(config, random_game(6, q=8), jax.random.key(1), GameParams.create(np.full(8, 0.9, np.float32)))
    assert _play_batch._cache_size() == size

    traced = chex.assert_max_traces(play_game, n=1)
    fn = jax.jit(traced, static_argnums=0)
    for seed in range(3):
        fn(config, random_game(seed), jax.random.key(seed), GameParams.create(0.1 + seed))


def test_memory_does_not_grow_with_rounds():
    candidates = random_game(0, q=64, pad=False)
    keys = jax.random.split(jax.random.key(0), 64)
    params = GameParams(step_size=jnp.full((64,), 0.1))

    def temp_bytes(rounds):
        lowered = _play_batch.lower(GameConfig(num_rounds=rounds), candidates, keys, params)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(400) <= temp_bytes(10) * 1.05 + 4096


# -------------------------------------------------------------- ranking


def test_feedback_top_bottom_and_ties():
    scores = jnp.array([[3.0], [2.0], [1.0]])
    profile = jnp.ones((3, 1))
    np.testing.assert_allclose(ranking_feedback(scores, profile)[:, 0], [1.0, 0.0, -1.0])
    tied = jnp.array([[1.0], [1.0], [0.0]])
    np.testing.assert_allclose(ranking_feedback(tied, profile)[:, 0], [0.5, 0.5, -1.0])
    alone = ranking_feedback(jnp.array([[5.0, -5.0]]), jnp.array([[0.5, 0.5]]))
    np.testing.assert_allclose(alone, 1.0)


def test_expected_feedback_matches_monte_carlo():
    rng = np.random.default_rng(0)
    n, k = 4, 5
    scores = np.round(rng.normal(size=(n, k)), 1)  # with ties
    logits = rng.normal(size=(n, k)) * 2
    valid = np.ones((n, k), bool)
    valid[1, 3:] = False
    policy = np.where(valid, np.exp(logits), 0.0)
    policy /= policy.sum(-1, keepdims=True)
    exact = np.asarray(ranking_feedback(jnp.asarray(scores, jnp.float32), jnp.asarray(policy, jnp.float32)))

    samples = 40_000
    keys = jax.random.split(jax.random.key(0), samples)
    log_p = jnp.log(jnp.maximum(jnp.asarray(policy, jnp.float32), 1e-30))

    def one(key):
        draws = jax.random.categorical(key, jnp.where(jnp.asarray(valid), log_p, -jnp.inf), axis=-1)
        return ranking_feedback(jnp.asarray(scores, jnp.float32), jax.nn.one_hot(draws, k))

    estimate = np.asarray(jnp.mean(jax.jit(jax.vmap(one))(keys), axis=0))
    # standard error <= 1/sqrt(samples) = 0.005: 5 sigma
    np.testing.assert_allclose(estimate, exact, atol=0.025)


# ---------------------------------------------------------------- Hedge


def _run_hedge(rewards, valid, schedule, base):
    """Regret and bound of Hedge on a given reward sequence [T, K]."""
    k_valid = np.sum(valid)
    cum = jnp.zeros(rewards.shape[1])
    played, sum_eta_w2 = 0.0, 0.0
    for t, reward in enumerate(rewards, start=1):
        eta = hedge.step_size(schedule, base, t, k_valid)
        policy = hedge.hedge_policy(cum, jnp.asarray(valid), eta)
        played += float(jnp.sum(policy * reward))
        width = reward[valid].max() - reward[valid].min()
        sum_eta_w2 += float(eta) * width**2
        cum = cum + jnp.where(valid, reward, 0.0)
    regret = float(np.max(np.asarray(cum)[valid])) - played
    bound = float(hedge.regret_bound(schedule, base, len(rewards), k_valid, sum_eta_w2))
    return regret, bound


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    k=st.integers(1, 5),
    schedule=st.sampled_from(["constant", "anytime"]),
    base=st.floats(0.05, 3.0),
)
def test_hedge_regret_under_bound_random_sequences(seed, k, schedule, base):
    rng = np.random.default_rng(seed)
    rewards = rng.uniform(-1, 1, size=(30, k)) * rng.uniform(0.1, 2.0)
    valid = np.ones(k, bool)
    regret, bound = _run_hedge(rewards, valid, schedule, base)
    assert regret <= bound + 1e-5


@pytest.mark.parametrize("schedule,base", [("constant", 0.1), ("constant", 1.0), ("anytime", 1.0)])
def test_hedge_regret_under_bound_adversarial(schedule, base):
    """The adversary rewards exactly the action Hedge currently likes least."""
    k, rounds = 4, 60
    valid = np.ones(k, bool)
    cum = jnp.zeros(k)
    rewards = []
    for t in range(1, rounds + 1):
        eta = hedge.step_size(schedule, base, t, k)
        policy = np.asarray(hedge.hedge_policy(cum, jnp.asarray(valid), eta))
        reward = np.zeros(k)
        reward[np.argmin(policy)] = 1.0
        rewards.append(reward)
        cum = cum + reward
    regret, bound = _run_hedge(np.array(rewards), valid, schedule, base)
    assert regret >= 0.0
    assert regret <= bound + 1e-5


def test_hedge_regret_is_sublinear_on_two_experts():
    """Regret / sqrt(T) stays bounded with the anytime schedule (O(sqrt T))."""
    ratios = []
    for rounds in (50, 200, 800):
        rng = np.random.default_rng(0)
        rewards = rng.uniform(-1, 1, size=(rounds, 2))
        rewards[:, 0] += 0.05
        regret, bound = _run_hedge(rewards, np.ones(2, bool), "anytime", 1.0)
        assert regret <= bound
        ratios.append(bound / np.sqrt(rounds))
    assert max(ratios) / min(ratios) < 1.5


def test_masked_policy_ignores_invalid_slots():
    valid = jnp.array([True, False, True])
    policy = hedge.hedge_policy(jnp.array([0.0, 1e6, 0.0]), valid, 1.0)
    np.testing.assert_allclose(policy, [0.5, 0.0, 0.5])
    extreme = hedge.hedge_policy(jnp.array([1e30, 0.0, -1e30]), jnp.ones(3, bool), 1e3)
    assert np.all(np.isfinite(np.asarray(extreme)))


# ------------------------------------------------------ known equilibria


def cyclic_two_by_two():
    """A 2x2 delegation game with a unique, fully mixed Nash equilibrium.

    Agent 0 slots: scores (1, 3), utilities (a, b); agent 1: scores (2, 4),
    utilities (c, d).  Indifference gives P0(slot 1) = (1 - d/c) / 2 and
    P1(slot 1) = (1 + a/b) / 2.
    """
    a, b, c, d = 0.2, 0.8, 0.7, 0.3
    candidates = make_candidates([[a, b], [c, d]], [[1.0, 3.0], [2.0, 4.0]])
    p = (1 - d / c) / 2
    q = (1 + a / b) / 2
    return candidates, np.array([[1 - p, p], [1 - q, q]])


def test_cyclic_game_equilibrium_is_the_closed_form():
    candidates, equilibrium = cyclic_two_by_two()
    gains = np.asarray(diagnostics.deviation_gain(candidates, jnp.asarray(equilibrium, jnp.float32)))
    np.testing.assert_allclose(gains, 0.0, atol=1e-6)
    off = equilibrium.copy()
    off[0] = [0.5, 0.5]
    assert float(diagnostics.nash_gap(candidates, jnp.asarray(off, jnp.float32))) > 0.05


def test_nash_gap_falls_like_inverse_sqrt_t_in_cyclic_game():
    candidates, equilibrium = cyclic_two_by_two()
    gaps, dists = [], []
    horizons = (100, 400, 1600)
    for rounds in horizons:
        result = play(GameConfig(num_rounds=rounds, schedule="anytime"), candidates, jax.random.key(0), GameParams.create(1.0))
        gaps.append(float(result.nash_gap))
        dists.append(float(np.abs(np.asarray(result.average_policy) - equilibrium).max()))
    # Each 4x more rounds should roughly halve the gap (1/sqrt T); demand at least 1.5x.
    assert gaps[1] < gaps[0] / 1.5 and gaps[2] < gaps[1] / 1.5, gaps
    assert gaps[-1] < 0.02 and dists[-1] < 0.05, (gaps, dists)


def test_dominance_solvable_game_converges_to_pure_equilibrium():
    # Agent 0's slot 1 and agent 1's slot 0 outrank everything of the other:
    # u * (+1) beats any slot that is ranked below, so they are strictly dominant.
    u = [[0.6, 0.5, 0.3], [0.4, 0.7, 0.5]]
    s = [[0.0, 5.0, -1.0], [4.0, -2.0, -3.0]]
    candidates = make_candidates(u, s)
    gaps = []
    for rounds in (50, 200, 800):
        result = play(GameConfig(num_rounds=rounds, schedule="anytime"), candidates, jax.random.key(0), GameParams.create(1.0))
        gaps.append(float(result.nash_gap))
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 0.05
    np.testing.assert_array_equal(np.asarray(result.submission), [1, 0])
    assert float(result.average_policy[0, 1]) > 0.85 and float(result.average_policy[1, 0]) > 0.85


# ------------------------------------------------------------ baselines


def test_baselines_on_a_hand_computed_game():
    # Agent 0: answers 7 (u .6, s 1), 8 (u .4, s 3); agent 1: answers 7 (u .5, s 2), 9 (u .5, s 0).
    candidates = make_candidates(
        [[0.6, 0.4], [0.5, 0.5]],
        [[1.0, 3.0], [2.0, 0.0]],
        answer_id=[[7, 8], [7, 9]],
        correct=[[False, True], [False, False]],
    )
    base = diagnostics.baselines(candidates)
    # Pooled utility: answer 7 = (.6 + .5)/2 = .55 (the max); its two slots score 1 and 2.
    np.testing.assert_allclose(base.fair_single.principal_value, 1.5)
    np.testing.assert_allclose(base.fair_single.correct, 0.0)
    np.testing.assert_allclose(base.oracle.principal_value, 3.0)
    np.testing.assert_allclose(base.oracle.correct, 1.0)
    np.testing.assert_allclose(base.random.principal_value, 1.5)
    # Uniform submissions: pairs (1,2)->2, (1,0)->1, (3,2)->3, (3,0)->3.
    np.testing.assert_allclose(base.uniform_principal.principal_value, (2 + 1 + 3 + 3) / 4)
    np.testing.assert_allclose(base.uniform_principal.correct, 0.5)


def test_uniform_principal_matches_enumeration_with_ties():
    rng = np.random.default_rng(4)
    for seed in range(5):
        c = random_game(seed, n=3, k=3, ties=True)
        valid = np.asarray(c.valid)
        s = np.asarray(c.principal_score)
        v = np.asarray(c.principal_value)
        total, count = 0.0, 0
        slots = [np.flatnonzero(valid[i]) for i in range(3)]
        for a in slots[0]:
            for b in slots[1]:
                for d in slots[2]:
                    sub = [a, b, d]
                    scores = [s[i, sub[i]] for i in range(3)]
                    win = int(np.argmax(scores))
                    total += v[win, sub[win]]
                    count += 1
        got = float(diagnostics.uniform_principal(c).principal_value)
        np.testing.assert_allclose(got, total / count, rtol=1e-5, atol=1e-5)
    del rng


def test_pareto_mask():
    c = make_candidates([[0.5, 0.4, 0.6, 0.5]], [[1.0, 0.5, 0.0, 1.0]], valid=[[True, True, True, True]])
    # slot 1 is dominated by slot 0; slots 0 and 3 tie (both kept); slot 2 has the best u.
    np.testing.assert_array_equal(np.asarray(diagnostics.pareto_mask(c)), [[True, False, True, True]])


def test_early_stop_freezes_rounds():
    candidates = random_game(9, q=8, pad=False)
    loose = play(GameConfig(num_rounds=50, early_stop_tol=5e-3), candidates, jax.random.key(0))
    full = play(GameConfig(num_rounds=50, record_trajectory=True), candidates, jax.random.key(0))
    stopped = np.asarray(loose.rounds_played)
    assert np.any(stopped < 50) and np.all(stopped >= 1)
    assert np.all(np.asarray(full.rounds_played) == 50)
    assert_on_simplex(loose.average_policy, candidates.valid)
    # Up to its stop, an early-stopped game plays exactly the full game's rounds.
    policies = np.asarray(full.trajectory.policy)  # [Q, T, N, K]
    for q, r in enumerate(stopped):
        np.testing.assert_allclose(loose.average_policy[q], policies[q, :r].mean(0), atol=1e-5)


def test_single_agent_game_picks_its_own_best():
    candidates = make_candidates([[0.1, 0.7, 0.2]], [[3.0, 1.0, 2.0]])
    result = play(GameConfig(num_rounds=20), candidates, jax.random.key(0), GameParams.create(1.0))
    assert int(result.submission[0]) == 1  # f = +1 alone: it maximizes its own utility
    assert int(result.chosen_agent) == 0 and int(result.chosen_answer) == 1
    assert float(result.regret[0]) <= float(result.regret_bound[0])


def test_submission_feedback_equals_one_hot_profile():
    from align_jax.game.ranking import submission_feedback

    rng = np.random.default_rng(1)
    for n in (1, 2, 4):
        scores = jnp.asarray(np.round(rng.normal(size=(n, 6)), 1), jnp.float32)
        draws = jnp.asarray(rng.integers(0, 6, size=n))
        np.testing.assert_allclose(
            submission_feedback(scores, draws), ranking_feedback(scores, jax.nn.one_hot(draws, 6)), atol=1e-6
        )


def test_identical_slots_tie_toward_lowest_index():
    # Slots come in identical pairs; each agent must submit the first copy of its best pair.
    # Agent 1's u=0.5 slots are outranked (negative rewards), so it prefers its u=0 pair.
    u = [[0.3, 0.3, 0.2, 0.2], [0.5, 0.5, 0.0, 0.0]]
    s = [[1.0, 1.0, 0.0, 0.0], [0.5, 0.5, 2.0, 2.0]]
    r = play(GameConfig(num_rounds=20), make_candidates(u, s), jax.random.key(0), GameParams.create(3.0))
    np.testing.assert_array_equal(np.asarray(r.submission), [0, 2])
    np.testing.assert_array_equal(r.average_policy[:, 0], r.average_policy[:, 1])
