"""Conformance and behaviour of the synthetic scenario generator."""

import jax
import numpy as np
import pytest

from align_jax.game import GameConfig, GameInputError, play
from align_jax.game.scenarios import ScenarioParams, ScenarioSpec, sample_batch
from align_jax.game.types import validate_candidates


def check_candidate_set(candidates, spec: ScenarioSpec):
    """The conformance test every scenario generator must pass."""
    validate_candidates(candidates)
    q = candidates.valid.shape[0]
    assert candidates.valid.shape == (q, spec.num_agents, spec.num_candidates)
    valid = np.asarray(candidates.valid)
    counts = valid.sum(-1)
    assert counts.min() >= spec.min_candidates and counts.max() <= spec.num_candidates
    # padding is a suffix
    assert np.all(np.diff(valid.astype(int), axis=-1) <= 0)
    u = np.asarray(candidates.agent_utility)
    np.testing.assert_allclose(u.sum(-1), 1.0, atol=1e-5)
    assert np.all(u[~valid] == 0)
    ids = np.asarray(candidates.answer_id)
    for row_ids, row_valid in zip(ids.reshape(-1, spec.num_candidates), valid.reshape(-1, spec.num_candidates)):
        kept = row_ids[row_valid]
        assert len(set(kept.tolist())) == len(kept), "an agent holds the same answer twice"
    assert ids.min() >= 0 and ids.max() < spec.pool_size
    correct = np.asarray(candidates.correct)
    if spec.has_correct:
        np.testing.assert_array_equal(correct, (ids == 0) & valid)
    else:
        assert not correct.any()
    # the same answer has the same true value for the principal, whoever holds it
    value = np.asarray(candidates.principal_value)
    for g in range(min(q, 20)):
        seen = {}
        for i, k in zip(*np.nonzero(valid[g])):
            a = ids[g, i, k]
            if a in seen:
                np.testing.assert_allclose(value[g, i, k], seen[a], rtol=1e-6)
            seen[a] = value[g, i, k]


@pytest.mark.parametrize(
    "spec",
    [ScenarioSpec(), ScenarioSpec(num_agents=1, num_candidates=1, pool_size=1), ScenarioSpec(5, 4, 40, 2, False)],
)
def test_generator_conformance(spec):
    candidates, corr = sample_batch(spec, ScenarioParams.create(rho=0.3, principal_noise=0.5), jax.random.key(0), 64)
    check_candidate_set(candidates, spec)
    assert corr.shape == (64,)


def test_reproducible_from_key():
    spec, params = ScenarioSpec(), ScenarioParams.create()
    a, _ = sample_batch(spec, params, jax.random.key(3), 16)
    b, _ = sample_batch(spec, params, jax.random.key(3), 16)
    c, _ = sample_batch(spec, params, jax.random.key(4), 16)
    np.testing.assert_array_equal(np.asarray(a.principal_score), np.asarray(b.principal_score))
    assert not np.array_equal(np.asarray(a.principal_score), np.asarray(c.principal_score))


def test_realized_correlation_follows_requested_rho():
    spec = ScenarioSpec(has_correct=False, min_candidates=8)
    means = []
    for rho in (-0.9, -0.3, 0.0, 0.3, 0.9):
        _, corr = sample_batch(spec, ScenarioParams.create(rho=rho), jax.random.key(0), 2048)
        means.append(float(np.mean(corr)))
    assert np.all(np.diff(means) > 0.05), means
    assert means[0] < -0.3 and means[-1] > 0.3 and abs(means[2]) < 0.05, means


def test_overlap_makes_agents_share_answers():
    spec = ScenarioSpec(num_candidates=8, pool_size=64, min_candidates=8)

    def shared_fraction(overlap):
        c, _ = sample_batch(spec, ScenarioParams.create(overlap=overlap), jax.random.key(1), 256)
        ids = np.asarray(c.answer_id)
        return np.mean([len(set(ids[g, 0]) & set(ids[g, 1])) / 8 for g in range(256)])

    assert shared_fraction(4.0) > shared_fraction(0.0) + 0.2


def test_dominant_agent_holds_better_answers():
    spec = ScenarioSpec(has_correct=False)
    c, _ = sample_batch(spec, ScenarioParams.create(dominance=3.0), jax.random.key(2), 512)
    value = np.where(np.asarray(c.valid), np.asarray(c.principal_value), np.nan)
    per_agent = np.nanmean(value, axis=(0, 2))
    assert per_agent[0] > per_agent[1] + 0.5 and per_agent[0] > per_agent[2] + 0.5


def test_align_beats_fair_single_agent_for_positive_rho():
    """Theorem 1 on a small sample (the full 1e5-per-rho study is configs/theorem1_sweep.yaml)."""
    spec = ScenarioSpec(min_candidates=4)
    c, _ = sample_batch(spec, ScenarioParams.create(rho=0.5), jax.random.key(5), 4096)
    r = play(GameConfig(num_rounds=20), c, jax.random.key(0))
    adv = np.asarray(r.align.principal_value) - np.asarray(r.baselines.fair_single.principal_value)
    assert adv.mean() > 4 * adv.std() / np.sqrt(adv.size)


@pytest.mark.parametrize(
    "field,kwargs",
    [
        ("rho", dict(rho=1.5)),
        ("rho", dict(rho=-1.01)),
        ("principal_noise", dict(principal_noise=-0.1)),
        ("dominance", dict(dominance=float("nan"))),
        ("overlap", dict(overlap=float("inf"))),
    ],
)
def test_bad_scenario_params(field, kwargs):
    with pytest.raises(GameInputError, match=field) as info:
        ScenarioParams.create(**kwargs)
    assert info.value.field == field


@pytest.mark.parametrize(
    "field,kwargs",
    [
        ("num_candidates", dict(num_candidates=0)),
        ("num_agents", dict(num_agents=0)),
        ("pool_size", dict(num_candidates=8, pool_size=4)),
        ("min_candidates", dict(min_candidates=20)),
    ],
)
def test_bad_scenario_spec(field, kwargs):
    with pytest.raises(GameInputError, match=field) as info:
        ScenarioSpec(**kwargs)
    assert info.value.field == field
