"""The sorted expected-feedback engine equals the dense one and the Python reference.

``GameConfig.feedback`` selects how the expected ranking feedback (and the
Nash gap's deviation gains) are computed: ``"dense"`` contracts the
``[N, K, N, K]`` comparison, ``"sorted"`` ranks each game's scores once and
uses prefix sums per round.  Both must give the reference's results on games
with score ties within and across agents, NaN padding, shared answers,
abstaining agents, N = 1, both modes, both schedules and early stop.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.game import diagnostics, ranking
from align_jax.game.delegation import _play_batch, play
from align_jax.game.types import CandidateSet, GameConfig, GameInputError, GameParams
from tests.game import reference
from tests.game.test_reference import CASES, assert_results_equal, random_games, step_sizes

FEEDBACKS = ("dense", "sorted")


def random_profile(rng, valid):
    p = rng.random(valid.shape) * valid
    return p / np.maximum(p.sum(-1, keepdims=True), 1e-30)


@pytest.mark.parametrize("count_max_slots", [64, 0], ids=["counting", "sort"])
def test_sorted_feedback_equals_dense_on_tied_padded_games(count_max_slots, monkeypatch):
    """Both ranking paths (comparison counting for small N*K, a sort above) equal the dense form.

    Each random ``[n, k]`` game is padded to ``[5, 6]`` (``[1, 6]`` when ``n = 1``) with invalid
    slots, i.e. extra abstaining agents, so two compiled programs serve all 60 games.
    """
    monkeypatch.setattr(ranking, "COUNT_MAX_SLOTS", count_max_slots)
    dense_fn = jax.jit(lambda s, p, m: ranking.ranking_feedback(s, p, m, method="dense"))
    fast_fn = jax.jit(lambda s, p, m: ranking.sorted_ranking_feedback(ranking.score_order(s), p, m))
    rng = np.random.default_rng(0)
    for trial in range(60):
        n, k = int(rng.integers(1, 6)), int(rng.integers(1, 7))
        valid = rng.random((n, k)) < 0.7
        if trial % 3 == 0:
            valid[rng.integers(n)] = False  # an abstaining agent
        score = np.where(valid, rng.integers(-3, 4, (n, k)) / 2.0, np.nan).astype(np.float32)
        if n > 1 and trial % 2 == 0:  # a slot shared with another agent (same score)
            score[1, 0], valid[1, 0] = score[0, 0], valid[0, 0]
        profile = random_profile(rng, valid)
        rows = 1 if n == 1 else 5
        pad = ((0, rows - n), (0, 6 - k))
        p_valid = np.pad(valid, pad)
        p_score = np.pad(score, pad, constant_values=np.nan)
        p_profile = np.pad(profile, pad)
        present = p_valid.any(-1)
        dense = np.asarray(dense_fn(p_score, p_profile, present))[:n, :k]
        fast = np.asarray(fast_fn(p_score, p_profile, present))[:n, :k]
        np.testing.assert_allclose(np.where(valid, fast, 0), np.where(valid, dense, 0), atol=1e-6, err_msg=str(trial))
        # Slots of one tie group get bitwise-identical feedback.
        flat_s, flat_f = score[valid], fast[valid]
        for value in np.unique(flat_s):
            for agent in range(n):
                own = flat_f[(flat_s == value) & (np.repeat(np.arange(n), k).reshape(n, k)[valid] == agent)]
                assert len(set(own.tolist())) <= 1


def test_sorted_feedback_on_a_large_game_uses_the_sort_and_matches_dense():
    rng = np.random.default_rng(1)
    n, k = 6, 40  # N*K = 240 > COUNT_MAX_SLOTS: the sort path
    valid = rng.random((n, k)) < 0.8
    score = np.where(valid, rng.integers(0, 30, (n, k)) / 8.0, np.nan).astype(np.float32)
    profile = random_profile(rng, valid)
    dense = ranking.ranking_feedback(score, profile, method="dense")
    fast = ranking.ranking_feedback(score, profile, method="sorted")
    np.testing.assert_allclose(np.where(valid, fast, 0), np.where(valid, dense, 0), atol=2e-6)
    candidates_gain = [
        diagnostics.deviation_gain(_one_game(score, valid), jnp.asarray(profile), feedback=fb) for fb in FEEDBACKS
    ]
    np.testing.assert_allclose(candidates_gain[1], candidates_gain[0], atol=2e-6)


def _one_game(score, valid) -> CandidateSet:
    u = np.where(valid, np.linspace(0.1, 1.0, valid.size).reshape(valid.shape), np.nan).astype(np.float32)
    return CandidateSet(
        answer_id=jnp.zeros(valid.shape, jnp.int32),
        valid=jnp.asarray(valid),
        agent_utility=jnp.asarray(u),
        principal_score=jnp.asarray(score),
        principal_value=jnp.asarray(score),
        correct=jnp.zeros(valid.shape, bool),
    )


def test_auto_selects_by_shape_and_config_validates():
    assert ranking.resolve_feedback("auto", 1, 4096) == "dense"
    assert ranking.resolve_feedback("auto", 3, 4) == "dense"
    assert ranking.resolve_feedback("auto", 32, 64) == "sorted"
    assert ranking.resolve_feedback("dense", 32, 64) == "dense"
    assert GameConfig().feedback == "auto"
    with pytest.raises(GameInputError, match="feedback"):
        GameConfig(feedback="fast")


@pytest.mark.parametrize("feedback", FEEDBACKS)
@pytest.mark.parametrize("n, k, q, config, seed", CASES, ids=lambda v: getattr(v, "mode", None) or str(v))
def test_engine_equals_python_reference_for_each_feedback(n, k, q, config, seed, feedback):
    config = dataclasses.replace(config, feedback=feedback)
    candidates = random_games(seed, q, n, k)
    params = step_sizes(seed, q)
    key = jax.random.PRNGKey(100 + seed)
    engine = play(config, candidates, key, params)
    assert_results_equal(engine, reference.play_python(config, candidates, params, key=key), label=feedback)


def test_abstaining_agents_sorted_equals_dense_and_reference():
    """Agent 1 has no valid slot in every game: both forms equal each other (all leaves)
    and the reference on the game without that agent (expected mode, anytime, early stop)."""
    q, n, k = 8, 4, 5
    base = random_games(21, q, n, k)
    valid = np.asarray(base.valid).copy()
    valid[:, 1] = False
    nan = np.float32(np.nan)
    candidates = base._replace(
        valid=jnp.asarray(valid),
        agent_utility=jnp.where(valid, base.agent_utility, nan),
        principal_score=jnp.where(valid, base.principal_score, nan),
        principal_value=jnp.where(valid, base.principal_value, nan),
    )
    params = step_sizes(21, q)
    results = {}
    for feedback in FEEDBACKS:
        config = GameConfig(num_rounds=12, mode="expected", schedule="anytime", early_stop_tol=0.003,
                            record_trajectory=True, feedback=feedback)
        results[feedback] = play(config, candidates, jax.random.PRNGKey(3), params)
    assert_results_equal(results["sorted"], results["dense"], label="sorted-vs-dense")
    keep = [0, 2, 3]
    reduced = CandidateSet(*(jnp.asarray(np.asarray(x)[:, keep]) for x in candidates))
    ref = reference.play_python(config, reduced, params)
    got = results["sorted"]
    for name in ("nash_gap", "rounds_played", "pareto_compliance", "pareto_mass", "chosen_answer"):
        np.testing.assert_allclose(np.asarray(getattr(got, name)), np.asarray(getattr(ref, name)), atol=1e-5, err_msg=name)
    for name in ("deviation_gain", "regret", "submission", "average_policy"):
        np.testing.assert_allclose(np.asarray(getattr(got, name))[:, keep], np.asarray(getattr(ref, name)), atol=1e-5, err_msg=name)
    np.testing.assert_allclose(got.align.principal_value, ref.align.principal_value, atol=1e-5)
    np.testing.assert_allclose(got.trajectory.nash_gap, ref.trajectory.nash_gap, atol=1e-5)


def test_sorted_engine_does_not_retrace_and_memory_is_independent_of_t():
    config = GameConfig(num_rounds=8, feedback="sorted")
    candidates = random_games(5, 4, 3, 6)
    params = GameParams.create(0.5)
    play(config, candidates, jax.random.PRNGKey(0), params)
    size = _play_batch._cache_size()
    play(config, random_games(6, 4, 3, 6), jax.random.PRNGKey(1), GameParams.create(0.7))
    assert _play_batch._cache_size() == size

    def temp_bytes(rounds):
        cfg = dataclasses.replace(config, num_rounds=rounds)
        keys = jax.random.split(jax.random.PRNGKey(0), 4)
        step = GameParams(step_size=jnp.full((4,), 0.5, jnp.float32))
        lowered = _play_batch.lower(cfg, jax.tree.map(jnp.asarray, candidates), keys, step)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(8) == temp_bytes(200)


@pytest.mark.parametrize("seed, n, k", [(0, 3, 6), (1, 9, 9), (2, 1, 5)])
def test_sorted_baselines_equal_dense(seed, n, k):
    """The fair single agent (answers sorted) and the uniform principal (prefix counts) equal the dense forms."""
    candidates = random_games(seed, 6, n, k)
    valid = np.asarray(candidates.valid).copy()
    if n > 1:
        valid[0, 1] = False  # an abstaining agent
        nan = np.float32(np.nan)
        candidates = candidates._replace(valid=jnp.asarray(valid), principal_score=jnp.where(valid, candidates.principal_score, nan))
    dense = jax.vmap(lambda c: diagnostics.baselines(c, "dense"))(candidates)
    fast = jax.vmap(lambda c: diagnostics.baselines(c, "sorted"))(candidates)
    for got, want in zip(jax.tree.leaves(fast), jax.tree.leaves(dense)):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_linear_memory_baselines_equal_dense_on_tied_padded_games():
    """The O(N K) uniform principal (log-space running sums) and the Pareto mask equal the
    dense forms on games with score ties within and across agents, NaN and finite padding,
    an abstaining agent, a single agent; K = 20 > ROW_COUNT_MAX_SLOTS takes the row sorts."""
    assert ranking.ROW_COUNT_MAX_SLOTS < 20
    rng = np.random.default_rng(7)

    @jax.jit
    @jax.vmap
    def both(game):
        order = ranking.score_order(game.principal_score)
        return (diagnostics.uniform_principal(game), diagnostics.uniform_principal(game, order),
                diagnostics.pareto_mask(game))

    for n, k in [(1, 5), (3, 20), (12, 6)]:
        q = 6
        valid = rng.random((q, n, k)) < 0.75
        valid[..., 0] = True
        if n > 2:
            valid[:, 1] = False  # abstains
        score = (rng.integers(-4, 5, (q, n, k)) / 2.0).astype(np.float32)  # many ties
        pad = np.where(np.arange(q) % 2, np.float32(np.nan), np.float32(0.5))[:, None, None]  # finite padding ties
        utility = (rng.integers(0, 5, (q, n, k)) / 4.0).astype(np.float32)
        games = CandidateSet(
            answer_id=jnp.asarray(rng.integers(0, 4, (q, n, k)), jnp.int32),
            valid=jnp.asarray(valid),
            agent_utility=jnp.asarray(np.where(valid, utility, pad)),
            principal_score=jnp.asarray(np.where(valid, score, pad)),
            principal_value=jnp.asarray(rng.normal(size=(q, n, k)).astype(np.float32)),
            correct=jnp.asarray(rng.random((q, n, k)) < 0.3),
        )
        dense, fast, mask = both(games)
        for got, want in zip(fast, dense):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6, err_msg=f"N={n} K={k}")
        u, s = utility[..., :, None, :], score[..., :, None, :]  # [Q, N, self, other]
        u_self, s_self = utility[..., :, :, None], score[..., :, :, None]
        dominated = (valid[..., :, None, :] & (u >= u_self) & (s >= s_self) & ((u > u_self) | (s > s_self))).any(-1)
        np.testing.assert_array_equal(mask, valid & ~dominated, err_msg=f"N={n} K={k}")


def test_sorted_engine_memory_is_linear_in_slots():
    """Compiled temp memory of the sorted engine depends on N*K, not on N and K apart (no N^2 K or N K^2 term)."""
    def temp_bytes(n, k, q=8):
        shape = lambda dtype: jax.ShapeDtypeStruct((q, n, k), dtype)  # noqa: E731
        games = CandidateSet(shape(jnp.int32), shape(bool), shape(jnp.float32), shape(jnp.float32),
                             shape(jnp.float32), shape(bool))
        keys = jax.random.split(jax.random.PRNGKey(0), q)
        step = GameParams(step_size=jax.ShapeDtypeStruct((q,), jnp.float32))
        config = GameConfig(num_rounds=2, feedback="sorted")
        return _play_batch.lower(config, games, keys, step).compile().memory_analysis().temp_size_in_bytes

    wide, tall, big = temp_bytes(2, 64), temp_bytes(16, 8), temp_bytes(8, 32)  # N*K = 128, 128, 256
    assert max(wide, tall) / min(wide, tall) < 1.5
    assert 1.5 < big / ((wide + tall) / 2) < 2.7
