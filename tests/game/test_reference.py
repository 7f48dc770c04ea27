"""The jitted engine equals the slow references on random small games.

``play_python`` (a literal Python loop, float64) and ``play_numpy`` (vectorized
NumPy) share no game logic with the engine.  Games are drawn on coarse grids
so that ties are common and exact in every precision: principal-score ties
within and across agents, duplicate answer ids across agents, identical
(utility, score) slots, padding (with NaN in padded slots), N in 1..4, K in
1..6.  Sampled mode replays the engine's exact draws from the same key (see
``align_jax.game.reference``).  Each case is one engine compile, so the cases
are few and each covers several features at once.
"""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest

from align_jax.game.delegation import play
from align_jax.game.types import CandidateSet, GameConfig, GameInputError, GameParams, make_candidates
from tests.game import reference

ATOL = 1e-5
RTOL = 1e-5


def random_games(seed: int, q: int, n: int, k: int) -> CandidateSet:
    """Random games with ties, shared answers and NaN-filled padding ``[Q, N, K]``.

    Utilities are distinct multiples of 1/8 within an agent (exact in any
    precision); principal scores are multiples of 1/4 in [-1, 1], so score ties
    within and across agents are common.  About a fifth of the slots carry an
    answer of another agent (same answer id and principal score, the agent's
    own utility).  Padded slots hold NaN, which the game must never read.
    """
    rng = np.random.default_rng(seed)
    valid = np.zeros((q, n, k), bool)
    agent_utility = np.zeros((q, n, k))
    for game, agent in itertools.product(range(q), range(n)):
        valid[game, agent, rng.choice(k, rng.integers(1, k + 1), replace=False)] = True
        agent_utility[game, agent] = rng.choice(9, k, replace=False) / 8.0
    principal_score = rng.integers(-4, 5, (q, n, k)) / 4.0
    answer_id = rng.integers(0, 2 * k, (q, n, k))
    games = np.arange(q)[:, None, None]
    src_agent = (np.arange(n)[None, :, None] + rng.integers(1, max(n, 2), (q, n, k))) % n
    src_slot = rng.integers(0, k, (q, n, k))
    shared = (rng.random((q, n, k)) < 0.2) & valid[games, src_agent, src_slot]
    answer_id = np.where(shared, answer_id[games, src_agent, src_slot], answer_id)
    principal_score = np.where(shared, principal_score[games, src_agent, src_slot], principal_score)
    principal_value = principal_score + rng.normal(0, 0.3, (q, n, k))
    principal_value = np.where(shared, principal_value[games, src_agent, src_slot], principal_value)
    correct = rng.random((q, n, k)) < 0.3
    nan = np.float32(np.nan)
    return make_candidates(
        np.where(valid, agent_utility, nan),
        np.where(valid, principal_score, nan),
        valid=valid,
        answer_id=answer_id,
        principal_value=np.where(valid, principal_value, nan),
        correct=correct,
    )


def step_sizes(seed: int, q: int) -> GameParams:
    return GameParams.create(np.random.default_rng(seed).uniform(0.3, 2.5, q).astype(np.float32))


def assert_results_equal(engine, ref, *, games=slice(None), label=""):
    """Every leaf agrees: discrete fields exactly, floats to ATOL/RTOL."""
    engine_leaves = jax.tree_util.tree_leaves_with_path(engine)
    ref_leaves = jax.tree.leaves(ref)
    assert len(engine_leaves) == len(ref_leaves), label
    for (path, got), want in zip(engine_leaves, ref_leaves):
        name = f"{label}{jax.tree_util.keystr(path)}"
        got, want = np.asarray(got)[games], np.asarray(want)[games]
        assert got.shape == want.shape, name
        if got.dtype.kind in "biu":
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL, err_msg=name)


# (N, K, Q, config, seed): each case is one engine compile (2-5 s of CPU), so
# the cases are few and each mixes several features.  N = 1 and K = 1 are
# deterministic games, so they run in expected mode; the sampled case shares
# its shape with the NumPy sampled test so the noise function compiles once.
SAMPLED_SHAPE = dict(n=4, k=5, q=12)
CASES = [
    (3, 6, 24, GameConfig(num_rounds=30, mode="expected", schedule="anytime", early_stop_tol=0.003, record_trajectory=True), 0),
    (4, 5, 12, GameConfig(num_rounds=16, mode="sampled", schedule="constant", early_stop_tol=0.02, record_trajectory=True), 1),
    (1, 3, 4, GameConfig(num_rounds=6, mode="expected", schedule="anytime"), 3),
    (2, 1, 4, GameConfig(num_rounds=5, mode="expected", schedule="constant", early_stop_tol=0.01), 4),
]


@pytest.mark.parametrize("n, k, q, config, seed", CASES, ids=lambda v: getattr(v, "mode", None) or str(v))
def test_engine_equals_python_reference(n, k, q, config, seed):
    candidates = random_games(seed, q, n, k)
    params = step_sizes(seed, q)
    key = jax.random.PRNGKey(100 + seed)
    engine = play(config, candidates, key, params)
    python = reference.play_python(config, candidates, params, key=key)
    assert_results_equal(engine, python, label="python")
    # The random games exercise what they are meant to.
    if config.early_stop_tol > 0 and k > 1:
        rounds = np.asarray(engine.rounds_played)
        assert (rounds < config.num_rounds).any() and (rounds == config.num_rounds).any(), rounds


def test_numpy_reference_equals_engine_on_a_larger_batch():
    config = GameConfig(num_rounds=20, mode="expected", schedule="constant", early_stop_tol=0.005)
    q = 512
    candidates = random_games(7, q, 3, 6)
    params = step_sizes(7, q)
    engine = play(config, candidates, jax.random.PRNGKey(0), params)
    numpy_result = reference.play_numpy(config, candidates, params)
    assert_results_equal(engine, numpy_result, label="numpy")
    python = reference.play_python(config, jax.tree.map(lambda x: x[:24], candidates), jax.tree.map(lambda x: x[:24], params))
    assert_results_equal(numpy_result, python, games=slice(0, 24), label="numpy-vs-python")


def test_numpy_equals_python_in_sampled_mode_with_trajectory():
    """The references agree with each other on the engine's draws (no engine compile)."""
    config = GameConfig(num_rounds=16, mode="sampled", schedule="anytime", early_stop_tol=0.02, record_trajectory=True)
    candidates = random_games(11, SAMPLED_SHAPE["q"], SAMPLED_SHAPE["n"], SAMPLED_SHAPE["k"])
    params = step_sizes(11, SAMPLED_SHAPE["q"])
    key = jax.random.PRNGKey(5)
    numpy_result = reference.play_numpy(config, candidates, params, key=key)
    assert_results_equal(numpy_result, reference.play_python(config, candidates, params, key=key), label="sampled")
    # The same key gives the same game; another key gives other draws.
    again = reference.play_numpy(config, candidates, params, key=key)
    np.testing.assert_array_equal(again.trajectory.policy, numpy_result.trajectory.policy)
    other = reference.play_numpy(config, candidates, params, key=jax.random.PRNGKey(6))
    assert np.abs(other.trajectory.policy - numpy_result.trajectory.policy).max() > 1e-3


def test_explicit_draws_are_the_submissions_played():
    """With explicit draws, agents face exactly those submissions (hand-checked game)."""
    # 2 agents, 2 slots; agent 1 always submits slot 1 (score 0.5).
    candidates = make_candidates(
        agent_utility=[[1.0, 2.0], [1.0, 1.0]], principal_score=[[1.0, 0.0], [0.0, 0.5]]
    )
    draws = np.array([[0, 1], [1, 1], [0, 1]])  # [T, N]
    config = GameConfig(num_rounds=3, mode="sampled", record_trajectory=True)
    for play_ref in (reference.play_python, reference.play_numpy):
        result = play_ref(config, candidates, GameParams.create(0.5), draws)
        # Agent 0 against score 0.5: slot 0 (score 1) is above, f=+1, r=1; slot 1 (score 0) below, f=-1, r=-2.
        # Agent 1 against agent 0's submissions 0, 1, 0: slot 1 (0.5) gets -1, +1, -1; slot 0 (0.0) -1, 0, -1.
        pi = result.trajectory.policy
        np.testing.assert_allclose(pi[0], [[0.5, 0.5], [0.5, 0.5]])
        weights_0 = np.exp(0.5 * np.array([1.0, -2.0]))
        np.testing.assert_allclose(pi[1, 0], weights_0 / weights_0.sum())
        weights_1 = np.exp(0.5 * np.array([-1.0, -1.0 + 1.0]))
        np.testing.assert_allclose(pi[2, 1], weights_1 / weights_1.sum())
        np.testing.assert_allclose(result.regret_bound[0], np.log(2) / 0.5 + 0.5 * 3 * 9 / 8, rtol=1e-6)


def _brute_force_uniform_principal(candidates: CandidateSet, game: int) -> float:
    """Enumerates every profile of uniform submissions; the principal takes the top score."""
    valid = np.asarray(candidates.valid[game])
    score = np.asarray(candidates.principal_score[game], np.float64)
    value = np.asarray(candidates.principal_value[game], np.float64)
    n = valid.shape[0]
    total = 0.0
    for profile in itertools.product(*[np.flatnonzero(valid[i]) for i in range(n)]):
        prob = np.prod([1.0 / valid[i].sum() for i in range(n)])
        scores = [score[i, profile[i]] for i in range(n)]
        winner = scores.index(max(scores))  # lowest agent index on ties
        total += prob * value[winner, profile[winner]]
    return total


def _brute_force_fair_single(candidates: CandidateSet, game: int) -> float:
    """Pooled frequency over answers (dict of answer -> per-agent best utility)."""
    valid = np.asarray(candidates.valid[game])
    n = valid.shape[0]
    best = {}
    for i, k in zip(*np.nonzero(valid)):
        answer = int(candidates.answer_id[game, i, k])
        best.setdefault(answer, np.zeros(n))
        best[answer][i] = max(best[answer][i], float(candidates.agent_utility[game, i, k]))
    pooled = {a: b.mean() for a, b in best.items()}
    winners = [a for a, p in pooled.items() if p == max(pooled.values())]
    value = 0.0
    for a in winners:
        slots = [(i, k) for i, k in zip(*np.nonzero(valid)) if int(candidates.answer_id[game, i, k]) == a]
        value += np.mean([float(candidates.principal_value[game, i, k]) for i, k in slots]) / len(winners)
    return value


def test_baselines_match_brute_force_enumeration():
    candidates = random_games(21, 12, 3, 4)
    config = GameConfig(num_rounds=1)
    for play_ref in (reference.play_python, reference.play_numpy):
        result = play_ref(config, candidates)
        for game in range(12):
            np.testing.assert_allclose(
                result.baselines.uniform_principal.principal_value[game],
                _brute_force_uniform_principal(candidates, game),
                atol=1e-9,
            )
            np.testing.assert_allclose(
                result.baselines.fair_single.principal_value[game],
                _brute_force_fair_single(candidates, game),
                atol=1e-6,
            )


def test_reference_rejects_bad_draws_and_missing_randomness():
    candidates = random_games(3, 2, 2, 3)
    config = GameConfig(num_rounds=2, mode="sampled")
    with pytest.raises(GameInputError, match="needs `draws`"):
        reference.play_python(config, candidates)
    with pytest.raises(GameInputError, match=r"draws must be int \[Q=2, T=2, N=2\]"):
        reference.play_numpy(config, candidates, None, np.zeros((2, 3, 2), int))
    invalid_slot = np.argwhere(~np.asarray(candidates.valid))
    draws = np.tile(np.argmax(np.asarray(candidates.valid), -1)[:, None, :], (1, 2, 1))
    if len(invalid_slot):
        game, agent, slot = invalid_slot[0]
        draws[game, 1, agent] = slot
        with pytest.raises(GameInputError, match=rf"draws\[{game}, 1, {agent}\]"):
            reference.play_python(config, candidates, None, draws)
    draws[0, 0, 0] = 99
    with pytest.raises(GameInputError, match=r"draws\[0, 0, 0\] = 99"):
        reference.play_python(config, candidates, None, draws)
    with pytest.raises(GameInputError, match="step_size"):
        reference.play_numpy(GameConfig(num_rounds=2), candidates, GameParams(step_size=np.float32(-1.0)))


def test_engine_gives_identical_slots_identical_policies():
    """Slots with the same utility and score are the same strategy: equal policies, lowest index picked."""
    config = GameConfig(num_rounds=20, mode="expected", schedule="constant", early_stop_tol=0.005)
    base = random_games(7, 512, 3, 6)  # the shape and config of the larger-batch test: no new compile

    def fill_and_copy(x):
        x = np.nan_to_num(np.array(x), nan=0.5)
        x[:, :, 3] = x[:, :, 5] = x[:, :, 0]  # slots 3 and 5 copy slot 0 of every agent
        return x

    candidates = base._replace(
        valid=np.ones_like(base.valid),
        agent_utility=fill_and_copy(base.agent_utility),
        principal_score=fill_and_copy(base.principal_score),
        principal_value=np.nan_to_num(np.array(base.principal_value), nan=0.0),
    )
    params = step_sizes(7, 512)
    engine = play(config, candidates, jax.random.PRNGKey(0), params)
    average = np.asarray(engine.average_policy)
    # float32 batched reductions may put exact copies a few ulps apart ...
    np.testing.assert_allclose(average[..., 3], average[..., 0], atol=1e-6)
    np.testing.assert_allclose(average[..., 5], average[..., 0], atol=1e-6)
    # ... but the final argmax breaks the tie toward the lowest index, as specified.
    submission = np.asarray(engine.submission)
    assert not np.isin(submission, [3, 5]).any()
    python = reference.play_python(config, jax.tree.map(lambda x: x[:64], candidates), jax.tree.map(lambda x: x[:64], params))
    np.testing.assert_array_equal(np.asarray(engine.submission)[:64], python.submission)
