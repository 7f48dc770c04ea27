"""The `reason` pipeline end to end on a tiny random model; resume; bad input; the CLI hook."""

from __future__ import annotations

import argparse
import dataclasses
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from align_jax.config import ConfigError, config_from_dict
from align_jax.data.answers import extract_answer, is_correct
from align_jax.methods import reason
from tests.methods.conftest import QUESTIONS

REPO = Path(__file__).resolve().parents[2]
LIMIT = 4


def tiny_config(checkpoint, data_dir, output_dir, **changes):
    data = dict(
        name="tiny",
        data_dir=str(data_dir),
        limit=LIMIT,
        batch_questions=2,
        seed=3,
        output_dir=str(output_dir),
        agents=[
            dict(model=checkpoint, name="zs", temperature=1.0, top_p=0.9, num_samples=4, max_new_tokens=8),
            dict(model=checkpoint, name="fs", prompt_style="few_shot_cot", num_fewshot=1, temperature=0.8,
                 top_p=0.9, num_samples=3, max_new_tokens=8),
        ],
        principal=dict(type="oracle"),
        game=dict(num_rounds=5),
        debate=dict(rounds=1, max_chars=40),
        bootstrap_samples=200,
    )
    data.update(changes)
    return config_from_dict(reason.ReasonConfig, data)


@pytest.fixture(scope="module")
def full_run(tiny_checkpoint, tiny_data_dir, tiny_pool, tmp_path_factory):
    config = tiny_config(tiny_checkpoint, tiny_data_dir, tmp_path_factory.mktemp("full"))
    return config, reason.run_reason(config, progress=False, pool=tiny_pool)


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _strip_wall(row):
    return {k: v for k, v in row.items() if k not in ("wall_s", "window_wall_s", "stage_wall_s")}


def test_pipeline_end_to_end(full_run):
    config, report = full_run
    rows = _lines(report.directory / "results.jsonl")
    assert [r["question_id"] for r in rows] == [f"gsm8k/test/{i}" for i in range(LIMIT)]
    assert [r["gold"] for r in rows] == [a.split("#### ")[1] for _, a in QUESTIONS[:LIMIT]]
    for name in ("summary.md", "summary.json", "accuracy.png", "config.json"):
        assert (report.directory / name).is_file(), name
    any_correct = 0
    for row in rows:
        agents = row["agents"]
        assert [len(a["samples"]) for a in agents] == [4, 3]
        ids_by_answer = {}
        for a in agents:
            k = len(a["samples"])
            assert sum(s["utility"] for s in a["slots"]) <= 1.0 + 1e-9
            assert 1 <= len(a["slots"]) <= k
            for sample in a["samples"]:
                # the stored answer is what the extractor reads from the stored text
                assert sample["answer"] == extract_answer(sample["text"])
                assert sample["correct"] == is_correct(sample["answer"], row["gold"])
                any_correct += sample["correct"]
                if sample["answer"] is not None:
                    ids_by_answer.setdefault(sample["answer"], set()).add(sample["answer_id"])
            for slot in a["slots"]:
                if slot["answer"] is None:
                    assert slot["utility"] == 0 and slot["answer_id"] <= -2 and not slot["correct"]
                    continue
                count = sum(s["answer_id"] == slot["answer_id"] for s in a["samples"])
                assert slot["count"] == count and slot["utility"] == pytest.approx(count / k)
                # oracle principal: the score is the correctness
                assert slot["principal_score"] == float(slot["correct"])
        # one id per answer string, across agents
        assert all(len(ids) == 1 for ids in ids_by_answer.values())
        methods = row["methods"]
        assert sorted(methods) == sorted(reason.method_names(config))
        for name, m in methods.items():
            assert 0.0 <= m["correct"] <= 1.0, name
        # selections from the candidates never beat the ceiling; the oracle's best-of-N reaches it
        for name in ("align", "best_of_n", "uniform_principal", "fair_single", "sc_pooled", "sc/zs", "sc/fs", "random"):
            assert methods[name]["correct"] <= methods["pass@k"]["correct"] + 1e-6, name
        assert methods["best_of_n"]["correct"] == methods["pass@k"]["correct"]
        # costs: K calls per agent, one per greedy call, N per debate round (round 0 = first samples)
        assert methods["sc/zs"]["cost"]["calls"] == 4 and methods["sc/fs"]["cost"]["calls"] == 3
        assert methods["align"]["cost"]["calls"] == 7 and methods["greedy/fs"]["cost"]["calls"] == 1
        assert methods["debate"]["cost"]["calls"] == 2 * (1 + 1)
        gen = sum(s["tokens"] for a in agents for s in a["samples"])
        assert methods["sc_pooled"]["cost"]["gen_tokens"] == gen and 0 < gen <= 7 * 8
        assert len(row["debate"]) == 2 and len(row["debate"][1]) == 2
        game = row["game"]
        assert game["rounds_played"] == 5 and len(game["regret"]) == 2
        assert all(r <= b + 1e-4 for r, b in zip(game["regret"], game["regret_bound"]))
        assert game["nash_gap"] >= 0 and 0 <= game["pareto_compliance"] <= 1
        chosen = agents[game["chosen_agent"]]["slots"][game["chosen_slot"]]
        assert methods["align"]["answer"] == chosen["answer"]
        assert methods["align"]["correct"] == float(chosen["correct"])
    assert any_correct > 0, "the tiny model never hit a single-digit gold: correctness plumbing untested"
    summary = report.summary
    assert summary["questions"] == LIMIT
    for name, s in summary["methods"].items():
        acc = np.mean([r["methods"][name]["correct"] for r in rows])
        assert s["accuracy"] == pytest.approx(acc)
        assert s["ci_low"] <= s["accuracy"] + 1e-12 and s["accuracy"] <= s["ci_high"] + 1e-12
    assert summary["methods"]["sc/zs"]["calls_per_question"] == 4
    assert "| align |" in (report.directory / "summary.md").read_text()


def test_interrupted_run_resumes_to_the_same_file(full_run, tiny_checkpoint, tiny_data_dir, tiny_pool, tmp_path):
    _, full = full_run
    expected = [_strip_wall(r) for r in _lines(full.directory / "results.jsonl")]
    config = tiny_config(tiny_checkpoint, tiny_data_dir, tmp_path / "crash")

    class Crash(RuntimeError):
        pass

    written = []

    def crash_after_three(row):
        written.append(row["question_id"])
        if len(written) == 3:  # mid-window: question 3 of window 1 is still missing
            raise Crash

    with pytest.raises(Crash):
        reason.run_reason(config, progress=False, pool=tiny_pool, on_question=crash_after_three)
    assert len(_lines(reason.run_dir(config) / "results.jsonl")) == 3
    resumed = reason.run_reason(config, progress=False, pool=tiny_pool,
                                 on_question=lambda row: written.append(row["question_id"]))
    assert written[3:] == [f"gsm8k/test/{LIMIT - 1}"]  # only the missing question was written
    got = [_strip_wall(r) for r in _lines(resumed.directory / "results.jsonl")]
    assert got == expected

    # resuming through a larger limit (a window boundary) also reproduces the full run
    limited = dataclasses.replace(config, output_dir=str(tmp_path / "limit"), limit=2)
    reason.run_reason(limited, progress=False, pool=tiny_pool, figures=False)
    reason.run_reason(dataclasses.replace(limited, limit=LIMIT), progress=False, pool=tiny_pool, figures=False)
    got = [_strip_wall(r) for r in _lines(reason.run_dir(limited) / "results.jsonl")]
    assert got == expected

    # a rerun with different settings under the same name is refused
    changed = dataclasses.replace(config, game=dataclasses.replace(config.game, num_rounds=7))
    with pytest.raises(ConfigError, match="different settings"):
        reason.run_reason(changed, progress=False, pool=tiny_pool)


def _write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


GOOD = """\
name: bad-input
dataset: gsm8k
data_dir: {data}
limit: 2
agents:
  - model: {model}
    num_samples: 2
principal:
  type: oracle
"""


@pytest.mark.parametrize(
    "old,new,pattern",
    [
        ("dataset: gsm8k", "dataset: gsm9k", r"r\.yaml:\d+: dataset: unknown dataset 'gsm9k'"),
        ("  - model: {model}", "  - model: llama-99b", r"r\.yaml:6: agents\.0\.model: unknown model 'llama-99b'"),
        ("data_dir: {data}", "data_dir: {empty}", r"r\.yaml:\d+: data_dir: .*has no gsm8k/test\.jsonl"),
        ("data_dir: {data}", "data_dir: {empty}/nope", r"r\.yaml:\d+: data_dir: .*is not a directory"),
        ("agents:\n  - model: {model}\n    num_samples: 2\n", "agents: []\n",
         r"r\.yaml:5: agents: the agents list is empty"),
        ("type: oracle", "type: dictator", r"r\.yaml:9: principal\.type: unknown principal type 'dictator'"),
        ("num_samples: 2", "num_samples: 0", r"r\.yaml:7: agents\.0\.num_samples: K must be >= 1"),
        ("num_samples: 2", "num_samples: 2\n    prompt_style: tot", r"r\.yaml:8: agents\.0\.prompt_style"),
        ("limit: 2", "limit: 2\nbatch_size: 3", r"r\.yaml:5: batch_size: unknown key"),
    ],
)
def test_bad_input_is_reported_with_file_line_and_field(tmp_path, tiny_checkpoint, tiny_data_dir, old, new, pattern):
    empty = tmp_path / "empty"
    empty.mkdir()
    fill = dict(data=tiny_data_dir, model=tiny_checkpoint, empty=empty)
    text = GOOD.replace(old, new).format(**fill)
    with pytest.raises(ConfigError, match=pattern):
        reason.load_reason_config(_write(tmp_path, text))
    # the same file through the CLI: exit status 2, nothing loaded
    parser = argparse.ArgumentParser(prog="align-jax")
    reason.add_reason_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["reason", str(tmp_path / "r.yaml"), "--quiet"])
    assert args.func(args) == 2


def test_few_shot_needs_train_file(tmp_path, tiny_checkpoint):
    data = tmp_path / "data"
    (data / "gsm8k").mkdir(parents=True)
    (data / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    text = GOOD.format(data=data, model=tiny_checkpoint).replace(
        "num_samples: 2", "num_samples: 2\n    prompt_style: few_shot_cot")
    with pytest.raises(ConfigError, match=r"r\.yaml:8: agents\.0\.prompt_style: .*GSM8K train"):
        reason.load_reason_config(_write(tmp_path, text))


def test_cli_subcommand_prints_the_table_of_a_finished_run(full_run, capsys):
    config, report = full_run
    path = report.directory / "cli.yaml"
    import yaml

    path.write_text(yaml.safe_dump(dataclasses.asdict(config)))
    parser = argparse.ArgumentParser(prog="align-jax")
    reason.add_reason_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["reason", str(path), "--quiet", "--no-figures"])
    assert args.func(args) == 0  # every question is done: no model is loaded
    out = capsys.readouterr().out
    assert "align" in out and "pass@k" in out and str(report.directory) in out


@pytest.mark.parametrize("name", ["reason_small.yaml", "reason_gsm8k_100.yaml"])
def test_shipped_configs_load(name, tiny_data_dir, monkeypatch):
    # the configs name no data_dir: they validate against $ALIGN_JAX_DATA_DIR (here a tiny copy)
    monkeypatch.setenv("ALIGN_JAX_DATA_DIR", str(tiny_data_dir))
    config = reason.load_reason_config(REPO / "configs" / name)
    assert config.agents and config.principal.type in ("verifier", "ranker", "oracle", "noisy_oracle")


# --------------------------------------------------------------------------------------
# Principal replay (align_jax.methods.replay): same candidates, another principal
# --------------------------------------------------------------------------------------

COMMITTED = REPO / "docs" / "results" / "reason_gsm8k_100" / "seed0" / "results.jsonl"


def _committed_config(tiny_data_dir):
    import yaml

    from align_jax.methods.reason import ReasonConfig

    data = yaml.safe_load((REPO / "configs" / "reason_gsm8k_100.yaml").read_text())
    data.update(data_dir=str(tiny_data_dir), output_dir=str(REPO / "docs" / "results"))
    return config_from_dict(ReasonConfig, data)


@pytest.mark.skipif(not COMMITTED.is_file(), reason="the committed GSM8K study is not in this checkout")
def test_replaying_the_committed_verifier_scores_reproduces_every_recorded_pick(tiny_data_dir):
    """The real Qwen study's rows hold everything the game needs: replaying them gives the same picks."""
    from align_jax.methods import replay

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


def test_replay_principals_on_a_finished_run(full_run, tmp_path):
    from align_jax.methods import replay

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
    # the inverted oracle's best-of-N is wrong whenever a question has a wrong slot
    has_wrong = np.array([any(not s["correct"] for a in r["agents"] for s in a["slots"]) for r in rows])
    assert np.all(inverted["best_of_n"][has_wrong] == 0.0)

    out = replay.replay_run(config, replay.default_principals((0.0, 0.5)), noise_seeds=2, bootstrap_samples=100)
    assert set(out["principals"]) == {"stored", "oracle", "noisy_oracle@0", "noisy_oracle@0.5"}
    assert out["principals"]["stored"]["reproduces_run"] is True
    by_agent = out["principals"]["stored"]["by_agent"]
    assert [a["agent"] for a in by_agent] == ["zs", "fs"]
    slots = [s for r in rows for s in r["agents"][1]["slots"]]
    assert by_agent[1]["slots"] == len(slots)
    assert by_agent[1]["slot_accuracy"] == pytest.approx(np.mean([s["correct"] for s in slots]))
    assert out["reference"]["pass@k"]["mean"] == pytest.approx(pass_k.mean())
    for name in ("replay.json", "replay.md", "replay.png"):
        assert (report.directory / name).is_file(), name
    assert "| oracle |" in (report.directory / "replay.md").read_text()


def test_replay_reproduces_a_sampled_mode_noisy_oracle_run(tiny_checkpoint, tiny_data_dir, tiny_pool, tmp_path):
    """Window keys and noise seeds match the run's: stored scores and the same noisy oracle replay exactly."""
    from align_jax.methods import replay

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


def test_replay_bad_input(full_run, tmp_path, capsys):
    from align_jax.methods import replay

    config, report = full_run
    with pytest.raises(ConfigError, match=r"no results file"):
        replay.replay_run(dataclasses.replace(config, output_dir=str(tmp_path)))
    broken = tmp_path / config.name / f"seed{config.seed}"
    broken.mkdir(parents=True)
    row = json.loads((report.directory / "results.jsonl").read_text().splitlines()[0])
    del row["agents"][0]["slots"][0]["utility"]
    (broken / "results.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ConfigError, match=r"results\.jsonl: question 'gsm8k/test/0': not a complete results row"):
        replay.replay_run(dataclasses.replace(config, output_dir=str(tmp_path)), write=False)
    with pytest.raises(ValueError, match="flip_rate"):
        replay.ReplayPrincipal("noisy_oracle", 1.5)
    import yaml

    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(dataclasses.asdict(config)))
    from align_jax.cli import main

    assert main(["replay", str(path), "--flip-rates", "0.2", "2"]) == 2
    assert "--flip-rates: each rate must be in [0, 1]" in capsys.readouterr().err
    assert main(["replay", str(path), "--flip-rates", "0.2", "--no-figures"]) == 0
    assert "noisy_oracle@0.2" in capsys.readouterr().out
