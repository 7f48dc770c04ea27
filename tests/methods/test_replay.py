"""Principal replay (align_jax.methods.replay): same candidates, another principal, no model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from align_jax.config import ConfigError, config_from_dict
from align_jax.methods import reason, replay
from tests.methods.conftest import tiny_config

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "docs" / "results" / "reason_gsm8k_100" / "seed0" / "results.jsonl"


def _committed_config(tiny_data_dir):
    import yaml

    data = yaml.safe_load((REPO / "configs" / "reason_gsm8k_100.yaml").read_text())
    data.update(data_dir=str(tiny_data_dir), output_dir=str(REPO / "docs" / "results"))
    return config_from_dict(reason.ReasonConfig, data)


@pytest.mark.skipif(not COMMITTED.is_file(), reason="the committed GSM8K study is not in this checkout")
def test_replaying_the_committed_verifier_scores_reproduces_every_recorded_pick(tiny_data_dir):
    """The real Qwen study's rows hold everything the game needs: replaying them gives the same picks."""
    config = _committed_config(tiny_data_dir)
    rows = [json.loads(line) for line in COMMITTED.read_text().splitlines()]
    result = replay.replay_principal(config, rows, replay.ReplayPrincipal("stored"))
    for name in ("align", "best_of_n", "uniform_principal"):
        recorded = np.array([row["methods"][name]["correct"] for row in rows])
        np.testing.assert_allclose(result[name], recorded, atol=1e-6, err_msg=name)
    recorded_corr = np.array([row["game"]["utility_correlation"] for row in rows])
    np.testing.assert_allclose(result["utility_correlation"], recorded_corr, atol=1e-5)
    # the oracle principal on the same real candidates: best-of-N reaches pass@k exactly
    oracle = replay.replay_principal(config, rows, replay.ReplayPrincipal("oracle"))
    np.testing.assert_array_equal(oracle["best_of_n"], [row["methods"]["pass@k"]["correct"] for row in rows])
    # the arithmetic checker ranks correct slots above wrong ones far more often than the verifier
    arithmetic = replay.replay_principal(config, rows, replay.ReplayPrincipal("arithmetic"))
    assert np.nanmean(arithmetic["pairwise"]) > 0.6 > 0.5 > np.nanmean(result["pairwise"])


def test_replay_principals_on_a_finished_run(full_run):
    config, report = full_run
    rows = report.rows
    pass_k = np.array([r["methods"]["pass@k"]["correct"] for r in rows])
    oracle = replay.replay_principal(config, rows, replay.ReplayPrincipal("oracle"))
    # the run's own principal is the oracle: the stored scores and the oracle give the same games
    stored = replay.replay_principal(config, rows, replay.ReplayPrincipal("stored"))
    for name in ("align", "best_of_n", "uniform_principal"):
        np.testing.assert_allclose(stored[name], oracle[name], err_msg=name)
        np.testing.assert_allclose(stored[name], [r["methods"][name]["correct"] for r in rows], err_msg=name)
    np.testing.assert_array_equal(oracle["best_of_n"], pass_k)
    # with the oracle, the principal's score of a pick is its correctness
    np.testing.assert_allclose(oracle["align_score"], oracle["align"])
    np.testing.assert_allclose(oracle["sc_pooled_score"], [r["methods"]["sc_pooled"]["correct"] for r in rows])
    exact = replay.replay_principal(config, rows, replay.ReplayPrincipal("noisy_oracle", 0.0), noise_seeds=3)
    inverted = replay.replay_principal(config, rows, replay.ReplayPrincipal("noisy_oracle", 1.0), noise_seeds=2)
    for name in ("align", "best_of_n", "uniform_principal", "pairwise"):
        np.testing.assert_allclose(exact[name], oracle[name], err_msg=name)
    defined = np.isfinite(oracle["pairwise"])
    assert np.all(oracle["pairwise"][defined] == 1.0) and np.all(inverted["pairwise"][defined] == 0.0)
    assert np.all(oracle["ties"][defined] == 0.0)
    # the inverted oracle's best-of-N is wrong whenever a question has a wrong slot
    has_wrong = np.array([any(not s["correct"] for a in r["agents"] for s in a["slots"]) for r in rows])
    assert np.all(inverted["best_of_n"][has_wrong] == 0.0)

    principals = replay.replay_principals(["stored", "oracle", "arithmetic", "noisy_oracle"], (0.0, 0.5))
    out = replay.replay_run(config, principals, noise_seeds=2, bootstrap_samples=100)
    assert list(out["principals"]) == ["stored", "oracle", "arithmetic", "noisy_oracle@0", "noisy_oracle@0.5"]
    assert out["principals"]["stored"]["reproduces_run"] is True
    assert out["principals"]["arithmetic"]["flip_rate"] is None
    by_agent = out["principals"]["stored"]["by_agent"]
    assert [a["agent"] for a in by_agent] == ["zs", "fs"]
    slots = [s for r in rows for s in r["agents"][1]["slots"]]
    assert by_agent[1]["slots"] == len(slots)
    assert by_agent[1]["slot_accuracy"] == pytest.approx(np.mean([s["correct"] for s in slots]))
    assert out["reference"]["pass@k"]["mean"] == pytest.approx(pass_k.mean())
    for name in ("replay.json", "replay.md", "replay.png"):
        assert (report.directory / name).is_file(), name
    markdown = (report.directory / "replay.md").read_text()
    assert "| oracle |" in markdown and "| arithmetic |" in markdown and "reproduces every recorded" in markdown
    assert json.loads((report.directory / "replay.json").read_text()) == json.loads(json.dumps(out))


def test_arithmetic_replay_scores_are_the_principals_scores(full_run):
    """Replay feeds the registered principal the rows' texts: its scores are what the game sees."""
    from align_jax.methods.principals.arithmetic import arithmetic_score

    config, report = full_run
    rows = report.rows
    result = replay.replay_principal(config, rows, replay.ReplayPrincipal("arithmetic"))
    for q, row in enumerate(rows):
        score = [arithmetic_score(a["samples"][s["representative"]]["text"]) for a in row["agents"] for s in a["slots"]]
        correct = [s["correct"] for a in row["agents"] for s in a["slots"]]
        good = [x for x, c in zip(score, correct) if c]
        bad = [x for x, c in zip(score, correct) if not c]
        if good and bad:
            expected = np.mean([(g > b) + 0.5 * (g == b) for g in good for b in bad])
            assert result["pairwise"][q] == pytest.approx(expected)
        else:
            assert np.isnan(result["pairwise"][q])


def test_replay_reproduces_a_sampled_mode_noisy_oracle_run(tiny_checkpoint, tiny_data_dir, tiny_pool, tmp_path):
    """Window keys and noise seeds match the run's: stored scores and the same noisy oracle replay exactly."""
    # three agents with several distinct answers each, so the sampled submissions matter
    agents = [dict(model=tiny_checkpoint, name=f"a{i}", temperature=1.5, top_p=1.0, num_samples=4, max_new_tokens=24)
              for i in range(3)]
    config = tiny_config(tiny_checkpoint, tiny_data_dir, tmp_path, greedy=False, debate=dict(rounds=0), agents=agents,
                         limit=6, game=dict(num_rounds=5, mode="sampled"),
                         principal=dict(type="noisy_oracle", flip_rate=0.4))
    rows = reason.run_reason(config, progress=False, figures=False, pool=tiny_pool).rows
    recorded = np.array([r["methods"]["align"]["correct"] for r in rows])
    for principal in (replay.ReplayPrincipal("stored"), replay.ReplayPrincipal("noisy_oracle", 0.4)):
        result = replay.replay_principal(config, rows, principal, noise_seeds=1)
        np.testing.assert_array_equal(result["align"], recorded, err_msg=principal.label)
        # the Nash gap depends on every sampled submission of every round
        np.testing.assert_allclose(result["nash_gap"], [r["game"]["nash_gap"] for r in rows], rtol=1e-6,
                                   err_msg=principal.label)
        np.testing.assert_array_equal(result["best_of_n"], [r["methods"]["best_of_n"]["correct"] for r in rows])


def test_replay_principal_names():
    labels = [p.label for p in replay.default_principals((0.0, 0.25))]
    assert labels == ["stored", "oracle", "arithmetic", "noisy_oracle@0", "noisy_oracle@0.25"]
    assert [p.label for p in replay.replay_principals(["noisy_oracle@0.3", "arithmetic"])] == \
        ["noisy_oracle@0.3", "arithmetic"]
    for spec, pattern in [
        ("verifier", "'verifier' scores with an LLM, and replay loads no model; replay 'stored'"),
        ("judge", "unknown replay principal 'judge'; known: stored, oracle, noisy_oracle, arithmetic"),
        ("noisy_oracle@1.5", r"flip_rate must be in \[0, 1\]"),
        ("noisy_oracle@x", "'x' is not a flip rate"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            replay.replay_principals([spec])
    with pytest.raises(ConfigError, match="named twice: oracle"):
        replay.replay_principals(["oracle", "oracle"])


def test_replay_bad_input(full_run, tmp_path, capsys):
    config, report = full_run
    elsewhere = dataclasses.replace(config, output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"no results file"):
        replay.replay_run(elsewhere)
    broken = tmp_path / config.name / f"seed{config.seed}"
    broken.mkdir(parents=True)
    lines = (report.directory / "results.jsonl").read_text().splitlines()
    row = json.loads(lines[1])
    del row["agents"][0]["slots"][0]["utility"]
    (broken / "results.jsonl").write_text(lines[0] + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ConfigError, match=r"results\.jsonl:2: agents\.0\.slots\.0.*utility"):
        replay.replay_run(elsewhere, write=False)
    # rows of other settings than the config's are refused, with file and line
    (broken / "results.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"results\.jsonl:1: .*different settings"):
        replay.replay_run(dataclasses.replace(elsewhere, game=dataclasses.replace(config.game, num_rounds=7)),
                          write=False)

    import yaml

    from align_jax.cli import main

    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(dataclasses.asdict(config)))
    assert main(["replay", str(path), "--flip-rates", "0.2", "2"]) == 2
    assert "--flip-rates: each rate must be in [0, 1]" in capsys.readouterr().err
    assert main(["replay", str(path), "--principals", "stored", "verifier"]) == 2
    assert "--principals: principal 'verifier' scores with an LLM" in capsys.readouterr().err
    assert main(["replay", str(path), "--principals", "arithmetic", "noisy_oracle", "--flip-rates", "0.2",
                 "--no-figures", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "| arithmetic |" in out and "noisy_oracle@0.2" in out and "on 2 gsm8k questions" in out
