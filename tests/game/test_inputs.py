"""Bad input to the engine is rejected at the boundary, before compilation."""

import jax
import numpy as np
import pytest

from align_jax.game.delegation import _play_batch, play
from align_jax.game.types import GameConfig, GameInputError, GameParams, make_candidates


def good():
    rng = np.random.default_rng(0)
    return rng.random((2, 3, 4)), rng.normal(size=(2, 3, 4)), np.ones((2, 3, 4), bool)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda u, s, v: u.__setitem__((1, 2, 3), np.nan), r"agent_utility is not finite \(nan\) at question 1, agent 2, slot 3"),
        (lambda u, s, v: s.__setitem__((0, 1, 0), np.inf), r"principal_score is not finite \(inf\) at question 0, agent 1, slot 0"),
        (lambda u, s, v: u.__setitem__((0, 0, 1), -0.5), r"agent_utility must be >= 0"),
        (lambda u, s, v: v.__setitem__(1, False), r"question 1 has no valid candidate in any agent"),
    ],
)
def test_bad_candidates_fail_before_compiling(mutate, message):
    u, s, v = good()
    mutate(u, s, v)
    before = _play_batch._cache_size()
    with pytest.raises(GameInputError, match=message):
        play(GameConfig(num_rounds=3), make_candidates(u, s, valid=v), jax.random.key(0))
    assert _play_batch._cache_size() == before


def test_nan_on_padding_is_allowed():
    u, s, v = good()
    v[0, 0, 3] = False
    u[0, 0, 3] = np.nan
    result = play(GameConfig(num_rounds=3), make_candidates(u, s, valid=v), jax.random.key(0))
    assert np.all(np.isfinite(np.asarray(result.average_policy)))


@pytest.mark.parametrize("eta", [0.0, -0.1, float("nan")])
def test_bad_step_size(eta):
    with pytest.raises(GameInputError, match="step_size") as info:
        GameParams.create(eta)
    assert info.value.field == "step_size"
    u, s, v = good()
    with pytest.raises(GameInputError, match="step_size"):
        play(GameConfig(), make_candidates(u, s, valid=v), jax.random.key(0), GameParams(step_size=np.float32(eta)))


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(num_rounds=0), "num_rounds"),
        (dict(mode="greedy"), "mode"),
        (dict(schedule="cosine"), "schedule"),
        (dict(early_stop_tol=-1.0), "early_stop_tol"),
    ],
)
def test_bad_game_config(kwargs, field):
    with pytest.raises(GameInputError, match=field) as info:
        GameConfig(**kwargs)
    assert info.value.field == field


def test_shape_mismatch_and_empty_k():
    u, s, v = good()
    with pytest.raises(GameInputError, match="principal_score has shape"):
        make_candidates(u, s[:, :, :2])
    with pytest.raises(GameInputError, match=r"K .* must be >= 1"):
        play(GameConfig(), make_candidates(u[:, :, :0], s[:, :, :0]), jax.random.key(0))
