"""Real fine-tuning of ECON's belief networks (align_jax.methods.econ.real_train) on the tiny
random model: transitions from real episodes, TD updates, resume after a kill equal to the
uninterrupted run, the fine-tuned policy in a reason run's econ section, bad input.

The fine-tuning runs (about 50 s on 2 cores) are marked slow: ``python -m pytest -m slow
tests/methods/econ/test_real_train.py`` (tiny model, no model package needed)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from align_jax.config import ConfigError
from align_jax.methods.econ.config import RealTrainSettings
from align_jax.methods.econ.real_train import (CURVE_FIELDS, episode_transitions, finetune_dir, finetune_run,
                                               finetuned_params)
from align_jax.methods.econ.run import econ_run_dir, trained_policies


def _tree_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)


def test_episode_transitions_pay_at_the_end_and_chain_observations():
    n, f = 2, 3
    obs = [[[1.0] * f] * n, [[2.0] * f] * n]
    row = dict(observations=obs, correct=1.0, commit_features=[[0.5, 0.0, 0.0], [1.0, 1.0, 1.0]],
               reward_components=[[[0, 1, 0.5], [1, 0, 0.5]], [[1, 1, 1.0], [0, 0, 0.5]]])
    single = dict(observations=[[[5.0] * f] * n], correct=0.0, commit_features=[[1.0, 0.0, 1.0]],
                  reward_components=[[[0, 1, 0.5], [0, 1, 0.5]]])
    indices = [np.array([[3, 4], [7, 8]]), np.array([[5, 6], [0, 0]])]
    w = (0.5, 0.3, 0.2)
    tr = episode_transitions([row, single], indices, w)
    assert tr.obs.shape == (3, n, f) and tr.action.tolist() == [[3, 4], [5, 6], [7, 8]]
    assert tr.done.tolist() == [0.0, 1.0, 1.0]
    np.testing.assert_array_equal(tr.next_obs[0], np.asarray(obs[1]))  # o_{t+1}
    assert not tr.next_obs[1].any() and not tr.next_obs[2].any()
    # nothing paid before the end; at the end local_i = w . R_i and team = w_TS [commit correct] + mean(w_AL AL + w_CC CC)
    assert tr.local_reward[0].tolist() == [0.0, 0.0] and tr.team_reward[0] == 0.0
    np.testing.assert_allclose(tr.local_reward[1], [0.5 + 0.3 + 0.2, 0.1])
    np.testing.assert_allclose(tr.team_reward[1], 0.5 * 1.0 + np.mean([0.3 + 0.2, 0.1]))
    np.testing.assert_allclose(tr.team_reward[2], 0.0 + np.mean([0.3 + 0.1, 0.3 + 0.1]))
    np.testing.assert_array_equal(tr.commit_features[1], [1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def real_config(resumed, tiny_checkpoint, tiny_data_dir, tmp_path_factory):
    """The finished tiny simulated run (copied) with a real section: 2 GSM8K-train questions, 1 per batch."""
    out = tmp_path_factory.mktemp("econ_real")
    base = resumed["config"]
    config = dataclasses.replace(
        base, run=dataclasses.replace(base.run, output_dir=str(out)),
        real=RealTrainSettings(model=tiny_checkpoint, limit=2, batch_questions=1, updates_per_batch=4, epsilon=0.5,
                               strategy_tokens=6, executor_tokens=8, commit_tokens=6, param_dtype="float32",
                               data_dir=str(tiny_data_dir)))
    shutil.copytree(econ_run_dir(base), econ_run_dir(config))
    return config


@pytest.fixture(scope="module")
def finetuned(real_config, tiny_pool):
    """Killed after its first batch and rerun, then the same from scratch uninterrupted."""
    first = finetune_run(real_config, pool=tiny_pool, progress=False, figures=False, stop_after=1)
    rows_after_kill = (finetune_dir(real_config) / "results.jsonl").read_text().splitlines()
    resumed_state = finetune_run(real_config, pool=tiny_pool, progress=False, figures=False)
    rows = (finetune_dir(real_config) / "results.jsonl").read_text().splitlines()
    shutil.rmtree(finetune_dir(real_config))
    fresh = finetune_run(real_config, pool=tiny_pool, progress=False, figures=False)
    return dict(first=first, resumed=resumed_state, fresh=fresh, rows_after_kill=rows_after_kill, rows=rows)


@pytest.mark.slow
def test_fine_tuning_collects_real_transitions_and_updates(real_config, finetuned):
    state = finetuned["fresh"]
    assert int(state.batches) == 2
    rows = [json.loads(line) for line in finetuned["rows"]]
    assert [r["batch"] for r in rows] == [0, 1]
    assert int(state.count) == sum(r["rounds"] for r in rows)  # one transition per round played
    count = int(state.count)
    assert np.asarray(state.data.done)[:count].sum() == 2  # one end per question
    assert not np.asarray(state.data.obs)[count:].any()
    # the updates moved the parameters away from the simulated run's
    _, learned, _ = trained_policies(real_config, 0)
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(learned))]
    assert max(moved) > 0
    curve = np.asarray(state.curve)
    assert curve.shape == (2, len(CURVE_FIELDS)) and (curve[:, CURVE_FIELDS.index("questions")] == 1).all()
    assert np.isfinite(curve).all() and (curve[:, CURVE_FIELDS.index("loss_total")] > 0).all()
    assert (finetune_dir(real_config) / "curve.csv").exists()


@pytest.mark.slow
def test_resume_after_kill_equals_the_uninterrupted_fine_tuning(finetuned):
    assert int(finetuned["first"].batches) == 1 and len(finetuned["rows_after_kill"]) == 1
    _tree_equal(finetuned["resumed"], finetuned["fresh"])
    assert len(finetuned["rows"]) == 2  # nothing lost or written twice


@pytest.mark.slow
def test_finetuned_params_restore_and_refuse_unfinished(real_config, finetuned, tmp_path):
    _, params = finetuned_params(real_config)
    _tree_equal(params, finetuned["fresh"].params)
    more = dataclasses.replace(real_config, real=dataclasses.replace(real_config.real, epsilon=0.1))
    with pytest.raises(ConfigError, match="checkpoints of a different config"):
        finetuned_params(more)
    other = dataclasses.replace(real_config, run=dataclasses.replace(real_config.run, output_dir=str(tmp_path)))
    shutil.copytree(econ_run_dir(real_config), econ_run_dir(other))
    shutil.rmtree(finetune_dir(other))
    with pytest.raises(ConfigError, match="real fine-tuning is not finished"):
        finetuned_params(other)


@pytest.mark.slow
def test_real_policy_in_a_reason_econ_section(real_config, finetuned, tiny_checkpoint, tiny_data_dir, tiny_pool,
                                              tmp_path):
    import yaml

    from align_jax.config import config_to_dict
    from align_jax.methods import reason

    from tests.methods.conftest import tiny_config as tiny_reason_config

    econ_yaml = tmp_path / "econ.yaml"
    econ_yaml.write_text(yaml.safe_dump(config_to_dict(real_config)))
    econ = dict(config=str(econ_yaml), policies=["real", "fixed"], strategy_tokens=6, executor_tokens=8,
                commit_tokens=6)
    config = tiny_reason_config(tiny_checkpoint, tiny_data_dir, tmp_path / "runs", limit=1, methods=["econ"],
                                greedy=False, debate=dict(rounds=0), econ=econ)
    report = reason.run_reason(config, progress=False, figures=False, pool=tiny_pool)
    assert set(report.rows[0]["methods"]) == {"econ/real", "econ/fixed"}
    assert 1 <= report.rows[0]["econ"]["real"]["rounds"] <= real_config.sim.max_rounds
    # the summary pairs the fine-tuned policy with the baselines (paired bootstrap over questions)
    diff = report.summary["differences"]["econ/real - econ/fixed"]
    real, fixed = (report.rows[0]["methods"][m]["correct"] for m in ("econ/real", "econ/fixed"))
    assert diff["mean"] == pytest.approx(real - fixed)


@pytest.mark.parametrize("changes,pattern", [
    (dict(limit=0), r"real\.limit: must be an integer >= 1"),
    (dict(epsilon=1.5), r"real\.epsilon: must be <= 1"),
    (dict(dataset="mmlu"), r"real\.dataset: unknown dataset 'mmlu'"),
    (dict(param_dtype="int8"), r"real\.param_dtype: must be float32 or bfloat16"),
    (dict(epsilonn=0.1), r"real\.epsilonn: unknown key"),
])
def test_bad_real_sections_name_the_field(changes, pattern):
    from align_jax.config import config_from_dict
    from align_jax.methods.econ.config import EconConfig

    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(EconConfig, {"real": changes})
