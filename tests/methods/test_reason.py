"""The `reason` pipeline end to end on a tiny random model; resume; bad input; the CLI hook."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from align_jax.config import ConfigError
from align_jax.data.answers import extract_answer, is_correct
from align_jax.methods import reason
from tests.methods.conftest import LIMIT, QUESTIONS, tiny_config

REPO = Path(__file__).resolve().parents[2]


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
    # a window's rows go out in one append; a kill during that write leaves whole rows and a cut one
    results = reason.run_dir(config) / "results.jsonl"
    lines = results.read_text().splitlines(keepends=True)
    assert len(lines) == 4
    results.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
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
        ("type: oracle", "type: dictator", r"r\.yaml:9: principal\.type: unknown principal 'dictator'"),
        ("limit: 2", "limit: 2\nmethods: [align, vibes]", r"r\.yaml:5: methods\.1: unknown method 'vibes'"),
        ("limit: 2", "limit: 2\ncandidates:\n  type: tea_leaves", r"r\.yaml:6: candidates\.type: unknown candidate generator"),
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
    from align_jax.cli import main

    assert main(["reason", str(tmp_path / "r.yaml"), "--quiet"]) == 2


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
# Plug-in points of the reason pipeline, and the risks fixed with them
# --------------------------------------------------------------------------------------


def _window(config, pool, start=0, count=2, key=None):
    from align_jax.data import datasets as datasets_lib
    from align_jax.methods.generators import make_generator
    from align_jax.methods.principals import make_principal

    problems = datasets_lib.load_dataset(config.dataset, config.split, config.data_dir, limit=start + count)[start:]
    key = key if key is not None else jax.random.key(5)
    principal = make_principal(config.principal, pool=pool, default_model=config.principal_model(), seed=config.seed)
    return reason.build_window(config, reason.agent_specs(config), pool, problems, key,
                               generator=make_generator(config.candidates), principal=principal)[0]


def test_every_registered_method_passes_the_conformance_test(tiny_checkpoint, tiny_data_dir, tiny_pool, tmp_path):
    from align_jax.methods.reason_methods import REASON_METHODS, method_api_test

    config = tiny_config(tiny_checkpoint, tiny_data_dir, tmp_path)
    window = _window(config, tiny_pool)
    assert set(REASON_METHODS.names()) >= {"align", "best_of_n", "self_consistency", "greedy", "debate", "pass@k"}
    for name in REASON_METHODS.names():
        if name == "econ":  # needs a trained ECON run: its conformance test is in tests/methods/econ/test_run.py
            continue
        method_api_test(REASON_METHODS.get(name), window)


def test_the_sampled_generator_passes_the_conformance_test(tiny_checkpoint, tiny_data_dir, tiny_pool, tmp_path):
    from align_jax.methods.generators import CANDIDATE_GENERATORS, CandidateSection, generator_api_test, make_generator

    config = tiny_config(tiny_checkpoint, tiny_data_dir, tmp_path)
    agents = reason.agent_specs(config)
    for name in CANDIDATE_GENERATORS.names():
        generator_api_test(make_generator(CandidateSection(type=name)), tiny_pool, agents,
                           [q for q, _ in QUESTIONS[:3]], jax.random.key(2))


def test_a_method_list_selects_and_orders_the_table(tiny_checkpoint, tiny_data_dir, tiny_pool, tmp_path):
    config = tiny_config(tiny_checkpoint, tiny_data_dir, tmp_path, limit=2, greedy=False,
                         methods=["sc_pooled", "align", "debate", "self_consistency"])
    report = reason.run_reason(config, progress=False, pool=tiny_pool, figures=False)
    assert reason.method_names(config) == ["sc_pooled", "align", "debate", "sc/zs", "sc/fs"]
    assert list(report.summary["methods"]) == reason.method_names(config)
    assert all(sorted(r["methods"]) == sorted(reason.method_names(config)) for r in report.rows)
    assert all(r["greedy"] is None and r["debate"] is not None for r in report.rows)


def test_a_row_does_not_depend_on_how_many_questions_share_its_window(tiny_checkpoint, tiny_data_dir, tiny_pool,
                                                                        tmp_path):
    # limit 3 leaves question 2 alone in window 1; limit 4 gives it a neighbour. Its sampling keys
    # and (sampled-mode) game keys must not change: limit is not part of the settings hash.
    # Two agents that share a sampler call (same model, K, budget and prompt style).
    agents = [dict(model=tiny_checkpoint, name=f"zs{i}", temperature=0.7 + 0.3 * i, num_samples=3, max_new_tokens=6)
              for i in range(2)]
    rows = {}
    for limit in (3, 4):
        config = tiny_config(tiny_checkpoint, tiny_data_dir, tmp_path / f"limit{limit}", limit=limit, greedy=False,
                             debate=dict(rounds=0), game=dict(num_rounds=5, mode="sampled"), agents=agents)
        rows[limit] = reason.run_reason(config, progress=False, pool=tiny_pool, figures=False).rows
    assert _strip_wall(rows[3][2]) == _strip_wall(rows[4][2])


def test_a_padded_slot_chosen_by_the_game_is_an_error_not_a_missing_answer():
    from align_jax.game.types import GameConfig, GameParams
    from align_jax.methods.align import play_window
    from align_jax.methods.candidates import build_question_candidates, stack_candidate_sets

    question = build_question_candidates([["x = 3", "x = 3"], ["x = 4"]])
    candidates = stack_candidate_sets([question], [np.zeros((2, 2), np.float32)], [{}], num_slots=2)
    # candidates that do not match the questions: agent 1's padded slot 1 made valid and best
    bad = candidates._replace(valid=candidates.valid.at[0, 1, 1].set(True),
                              agent_utility=candidates.agent_utility.at[0, 1, 1].set(1.0),
                              principal_score=candidates.principal_score.at[0, 1, 1].set(5.0))
    with pytest.raises(ValueError, match="padded slot"):
        play_window(GameConfig(num_rounds=3), GameParams.create(0.1), bad, [question], jax.random.key(0))


COMMITTED_DIR = REPO / "docs" / "results" / "reason_gsm8k_100" / "seed0"


@pytest.mark.skipif(not (COMMITTED_DIR / "results.jsonl").is_file(), reason="no committed study in this checkout")
def test_the_committed_study_resumes_and_reprints_without_recomputing(tmp_path):
    """`align-jax reason configs/reason_gsm8k_100.yaml` on the committed rows loads no model, writes no
    row and reprints the committed summary byte for byte."""
    import shutil

    from align_jax.data.datasets import DatasetError, resolve_data_dir

    try:
        resolve_data_dir(None)
    except DatasetError:
        pytest.skip("needs the GSM8K data directory ($ALIGN_JAX_DATA_DIR)")
    config = dataclasses.replace(reason.load_reason_config(REPO / "configs" / "reason_gsm8k_100.yaml"),
                                 output_dir=str(tmp_path))
    target = reason.run_dir(config)
    target.mkdir(parents=True)
    shutil.copy(COMMITTED_DIR / "results.jsonl", target / "results.jsonl")

    class NoModels:
        def __getattr__(self, name):
            raise AssertionError(f"a finished run used the model pool ({name})")

    report = reason.run_reason(config, progress=False, figures=False, pool=NoModels())
    assert len(report.rows) == 100
    assert (target / "results.jsonl").read_bytes() == (COMMITTED_DIR / "results.jsonl").read_bytes()
    assert (target / "summary.md").read_text() == (COMMITTED_DIR / "summary.md").read_text()
    committed = json.loads((COMMITTED_DIR / "summary.json").read_text())
    fresh = json.loads((target / "summary.json").read_text())
    for summary in (committed, fresh):
        summary.pop("run_wall_s")
    assert fresh == committed


def test_undecided_math_verify_checks_are_counted_in_rows_and_summary(tiny_checkpoint, tiny_data_dir, tiny_pool,
                                                                      tmp_path, monkeypatch):
    import math_verify

    from align_jax.data import answers

    def broken(*args, raise_on_error=False, **kwargs):
        raise RuntimeError("math-verify broke")

    monkeypatch.setattr(math_verify, "parse", broken)
    real = reason.slot_correctness

    def with_a_symbolic_check(question, gold):  # one check per question that only math-verify can decide
        answers.is_correct("x^2 + 1", "y + 1")
        return real(question, gold)

    monkeypatch.setattr(reason, "slot_correctness", with_a_symbolic_check)
    config = tiny_config(tiny_checkpoint, tiny_data_dir, tmp_path, limit=2, greedy=False, debate=dict(rounds=0))
    report = reason.run_reason(config, progress=False, pool=tiny_pool, figures=False)
    assert [row["math_verify_failures"] for row in report.rows] == [1, 1]
    assert report.summary["math_verify_failures"] == 2
    assert "math-verify could not decide 2 correctness checks" in (report.directory / "summary.md").read_text()


@pytest.mark.parametrize("name,dataset", [("reason_gsmhard_50.yaml", "gsm-hard"), ("reason_math500_50.yaml", "math500")])
def test_the_dataset_study_configs_load_with_the_pot_principal(name, dataset):
    from align_jax.data.datasets import DatasetError, resolve_data_dir

    try:
        resolve_data_dir(None)
    except DatasetError:
        pytest.skip("needs the data directory ($ALIGN_JAX_DATA_DIR)")
    config = reason.load_reason_config(REPO / "configs" / name)
    assert config.dataset == dataset and config.limit == 50 and config.principal.type == "pot"
    assert len(config.agents) == 3 and config.output_dir == "docs/results"


def test_the_econ_study_configs_load_with_the_econ_method_only():
    from align_jax.data.datasets import DatasetError, resolve_data_dir
    from align_jax.methods.reason_config import enabled_methods

    try:
        resolve_data_dir(None)
    except DatasetError:
        pytest.skip("needs the data directory ($ALIGN_JAX_DATA_DIR)")
    for name, limit, policies in (("reason_econ_gsm8k_50.yaml", 50, ["real", "initial", "fixed"]),
                                  ("reason_econ_small.yaml", 20, ["real", "initial"])):
        config = reason.load_reason_config(REPO / "configs" / name)
        assert config.dataset == "gsm8k" and config.limit == limit and config.econ.policies == policies
        assert "econ" in [m.name for m in enabled_methods(config)]


def _summary(methods, differences=None, questions=10):
    return {"questions": questions, "wall_s_per_question": 12.5,
            "methods": {m: {"accuracy": a, "ci_low": a - 0.1, "ci_high": a + 0.1, "gen_tokens_per_question": 100.0,
                            "calls_per_question": 1.0, "total_tokens_per_question": 200.0}
                        for m, a in methods.items()},
            "differences": differences or {}}


def test_comparison_markdown_puts_runs_side_by_side_and_marks_missing_methods():
    from align_jax.methods.reason_report import comparison_markdown

    config = {"principal": {"type": "pot"}, "agents": [{"num_samples": 8}, {"num_samples": 4}]}
    a = _summary({"align": 0.5, "sc_pooled": 0.25},
                 {"align - sc_pooled": {"mean": 0.25, "ci_low": 0.05, "ci_high": 0.45}})
    b = _summary({"align": 0.125, "econ/learned": 0.375}, questions=7)
    text = comparison_markdown([("A", a, config), ("B", b, config)])
    lines = text.splitlines()
    assert lines[0] == "| | A | B |"
    assert "| align | 0.500 [0.400, 0.600] | 0.125 [0.025, 0.225] |" in lines
    assert "| sc_pooled | 0.250 [0.150, 0.350] | - |" in lines        # B does not report it
    assert "| econ/learned | - | 0.375 [0.275, 0.475] |" in lines
    assert "| align - sc_pooled | +0.250 [+0.050, +0.450] | - |" in lines
    assert "| *questions* | 10 | 7 |" in lines and "| *K per agent* | 8/4 | 8/4 |" in lines
    assert [line.split(" | ")[0] for line in lines[2:5]] == ["| align", "| sc_pooled", "| econ/learned"]
    with pytest.raises(ValueError, match="'B' has no summarized questions"):
        comparison_markdown([("A", a, config), ("B", {"questions": 0, "methods": {}}, config)])


@pytest.mark.skipif(not (COMMITTED_DIR / "summary.json").is_file(), reason="no committed study in this checkout")
def test_the_dataset_table_script_reads_the_committed_studies(tmp_path):
    script = _script("reason_datasets")
    out = tmp_path / "table.md"
    assert script.main(["--out", str(out)]) == 0
    text = out.read_text()
    committed = json.loads((COMMITTED_DIR / "summary.json").read_text())
    align = committed["methods"]["align"]
    assert f"| align | {align['accuracy']:.3f} [{align['ci_low']:.3f}, {align['ci_high']:.3f}]" in text
    if (REPO / "docs" / "results" / "pot_principal" / "summary.json").is_file():
        assert "GSM8K, pot (replay)" in text and "| *principal pairwise accuracy* | 0.489 | 0.716" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| align |") and rows[2].startswith("| best_of_n |")


def _script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cost_accounting_counts_each_stage_once_by_hand():
    """The accounting's FLOPs for a two-agent row equal a hand count: shared prompts prefilled once per
    agent, agents sharing a greedy prompt decoded once, debate round 0 not recounted."""
    acc = _script("reason_cost_accounting")
    m = {"layers": 2, "heads": 2, "head_dim": 4, "hidden": 8, "vocab": 10, "body": 1000, "head": 80}
    attn = 4 * 2 * 2 * 4  # 4 L H hd per context position
    config = {"agents": [{"model": "x", "prompt_style": "zero_shot_cot"}, {"model": "x", "prompt_style": "zero_shot_cot"}]}
    row = {
        "agents": [{"name": "a", "cost": {"prompt_tokens": 10}, "samples": [{"tokens": 4}, {"tokens": 6}]},
                   {"name": "b", "cost": {"prompt_tokens": 10}, "samples": [{"tokens": 2}]}],
        "principal": {"cost": {"calls": 2, "prompt_tokens": 40, "gen_tokens": 0}},
        "methods": {"greedy/a": {"cost": {"prompt_tokens": 10, "gen_tokens": 3}},
                    "greedy/b": {"cost": {"prompt_tokens": 10, "gen_tokens": 3}},
                    "debate": {"cost": {"calls": 4, "prompt_tokens": 20 + 60, "gen_tokens": 4 + 2 + 8}}},
    }
    work = acc.stage_work(row, config, m)
    prefill = lambda n, length: n * (2 * 1000 + attn * length / 2)  # noqa: E731
    decode = lambda n, ctx: n * (2 * 1080 + attn * ctx)  # noqa: E731
    assert work["sampling"][:2] == (20, 12)
    assert work["sampling"][2] == pytest.approx(2 * prefill(10, 10) + decode(4, 12) + decode(6, 13) + decode(2, 11))
    assert work["principal"][2] == pytest.approx(prefill(40, 20) + 2 * 2 * 80)
    assert work["greedy"] == pytest.approx((10, 3, prefill(10, 10) + decode(3, 11.5)))  # one decode for both
    assert work["debate"] == pytest.approx((60, 8, prefill(60, 30) + decode(8, 32)))  # 2 turns after round 0


def test_cost_accounting_bound_uses_the_measured_rates_by_hand():
    """The bound prices every prefill token at the measured rate of its prompt length and every generated
    token at the rate of its context (linear between measured points, flat outside), nothing else."""
    acc = _script("reason_cost_accounting")
    config = {"agents": [{"model": "x", "prompt_style": "zero_shot_cot"}]}
    row = {"agents": [{"name": "a", "cost": {"prompt_tokens": 100}, "samples": [{"tokens": 40}, {"tokens": 200}]}],
           "principal": {"cost": {"calls": 1, "prompt_tokens": 300, "gen_tokens": 0}}, "methods": {}}
    rates = {"prefill": {100: 1e-3, 300: 2e-3}, "decode": {100: 4e-3, 300: 8e-3}}
    items = acc.stage_items(row, config)
    # sampling: 100 prompt tokens at length 100; 40 tokens at context 120, 200 at context 200
    assert acc.bound_seconds(items["sampling"], rates) == pytest.approx(100 * 1e-3 + 40 * 4.4e-3 + 200 * 6e-3)
    # principal: 300 prompt tokens of length 300, its LM-head row is not priced
    assert acc.bound_seconds(items["principal"], rates) == pytest.approx(300 * 2e-3)
    assert acc.bound_seconds([("decode", 10, 1000)], rates) == pytest.approx(10 * 8e-3)  # beyond the last point


def test_window_times_and_accuracy_table_pair_runs_by_question(tmp_path):
    """Windows are found from their shared window_wall_s; the accuracy table pairs questions across runs."""
    tool = _script("reason_window_times")

    def write(name, walls, correct):
        run = tmp_path / name
        run.mkdir()
        rows = [{"question_id": f"q{i}", "window_wall_s": walls[i // 2],
                 "methods": {"align": {"correct": float(c)}}} for i, c in enumerate(correct)]
        (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return run

    a = write("a", [40.0, 20.0], [1, 0, 1, 1])
    b = write("b", [10.0], [1, 1])  # one window: the first two questions
    assert tool.windows(a) == {("q0", "q1"): 20.0, ("q2", "q3"): 10.0}
    text = tool.table([a, b])
    assert "| q0 | 2 | 20.0 | 5.0 | 4.00x |" in text and "q2" not in text
    acc = tool.accuracy_table([a, b])
    assert "on the 2 questions" in acc and "| align | 0.500 | 1.000 | +0.500 [" in acc

    # 40 questions, 4 methods: each family-wise interval (at 1 - 0.05/4) strictly contains the 95% one
    rng = np.random.default_rng(1)
    names = ["m0", "m1", "m2", "m3"]
    runs = []
    for r in range(2):
        run = tmp_path / f"f{r}"
        run.mkdir()
        rows = [{"question_id": f"q{i}", "window_wall_s": 1.0,
                 "methods": {m: {"correct": float(rng.random() < 0.5)} for m in names}} for i in range(40)]
        (run / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        runs.append(run)
    lines = [x for x in tool.accuracy_table(runs).splitlines() if re.match(r"\| m\d \|", x)]
    assert len(lines) == 4
    for line in lines:
        (lo, hi), (flo, fhi) = [(float(x), float(y)) for x, y in re.findall(r"\[([-+.\d]+), ([-+.\d]+)\]", line)]
        assert flo < lo <= hi < fhi, line
