"""Config loading errors and the `align-jax simulate` sweep, end to end."""

import dataclasses
import json
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from align_jax import simulate
from align_jax.cli import main
from align_jax.config import ConfigError

REPO = Path(__file__).resolve().parents[1]

TINY = """\
name: tiny
seed: 1
scenarios_per_point: 300
chunk_size: 128
game:
  num_rounds: 4
  step_size: 0.5
scenario:
  num_agents: 2
  num_candidates: 3
  pool_size: 6
sweep:
  rho: [-0.5, 0.5]
  principal_noise: [0.0, 1.0]
"""


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


SIMULATE_CONFIGS = [p for p in sorted((REPO / "configs").glob("*.yaml")) if "sweep:" in p.read_text() and "scenario:" in p.read_text()]


def test_simulate_configs_found():
    assert len(SIMULATE_CONFIGS) >= 4


@pytest.mark.parametrize("path", SIMULATE_CONFIGS)
def test_shipped_configs_load(path):
    config = simulate.load_simulate_config(path)
    assert simulate.sweep_points(config)


@pytest.mark.parametrize(
    "text,pattern",
    [
        (TINY.replace("  step_size: 0.5", "  step_size: 0.5\n  stepsize: 1"), r"c\.yaml:8: game\.stepsize: unknown key"),
        (TINY.replace("step_size: 0.5", "step_size: 0"), r"c\.yaml:7: game\.step_size: .*> 0"),
        (TINY.replace("step_size: 0.5", "step_size: -1"), r"c\.yaml:7: game\.step_size"),
        (TINY.replace("rho: [-0.5, 0.5]", "rho: [-0.5, 1.5]"), r"c\.yaml:13: sweep\.rho\.1: .*rho must be in \[-1.0, 1.0\]"),
        (TINY.replace("num_candidates: 3", "num_candidates: 0"), r"c\.yaml:10: scenario\.num_candidates: .*>= 1"),
        (TINY.replace("num_rounds: 4", "num_rounds: four"), r"c\.yaml:6: game\.num_rounds: expected an integer"),
        (TINY.replace("sweep:", "sweep:\n  colour: [1]"), r"sweep\.colour: cannot be swept"),
        (TINY + "extra_top: 3\n", r"c\.yaml:15: extra_top: unknown key"),
        (TINY.replace("name: tiny\n", ""), r"missing required key\(s\): name"),
        ("name: [unclosed\n", r"c\.yaml:2: invalid YAML"),
    ],
)
def test_bad_configs_name_file_line_and_key(tmp_path, text, pattern):
    with pytest.raises(ConfigError, match=pattern):
        simulate.load_simulate_config(write(tmp_path, text))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        simulate.load_simulate_config(tmp_path / "nope.yaml")
    assert main(["simulate", str(tmp_path / "nope.yaml")]) == 2


def test_sweep_runs_writes_results_and_resumes(tmp_path):
    path = write(tmp_path, TINY + f"output_dir: {tmp_path / 'runs'}\n")
    config = simulate.load_simulate_config(path)
    out = simulate.run_dir(config)
    frame = simulate.run_simulation(config, progress=False)
    assert len(frame) == 4
    for name in ("results.jsonl", "results.csv", "summary.md", "config.json", "utility_vs_rho.png", "advantage_vs_rho.png"):
        assert (out / name).exists(), name
    csv = pd.read_csv(out / "results.csv")
    assert list(csv["rho"]) == [-0.5, -0.5, 0.5, 0.5]
    assert (csv["oracle_value"] >= csv["align_value"] - 1e-6).all()
    assert (csv["bound_violation"] == 0).all()
    assert (csv["n"] == 300).all()

    # Simulate a crash: drop the last two points and leave a half-written line.
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])
    resumed = simulate.run_simulation(config, progress=False, figures=False)
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines() if x.strip().startswith("{") and x.strip().endswith("}")]
    assert len({r["point_id"] for r in rows}) == 4 and len(rows) == 4, "a point was lost or repeated"
    cols = ["align_value", "fair_single_value", "nash_gap", "regret"]
    pd.testing.assert_frame_equal(resumed[cols], frame[cols])

    # A third run has nothing left to do and gives the same table.
    again = simulate.run_simulation(config, progress=False, figures=False)
    pd.testing.assert_frame_equal(again[cols], frame[cols])


def test_cli_simulate_with_trajectory(tmp_path, capsys):
    text = TINY.replace("sweep:\n  rho: [-0.5, 0.5]\n  principal_noise: [0.0, 1.0]\n", "sweep:\n  rho: [0.5]\n")
    text += "trajectory: true\n"
    path = write(tmp_path, text)
    code = main(["simulate", str(path), "--output-dir", str(tmp_path / "r"), "--quiet", "--scenarios", "64"])
    assert code == 0
    out = tmp_path / "r" / "tiny" / "seed1"
    row = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    traj = row["trajectory"]
    assert len(traj["regret"]) == 4 and len(traj["nash_gap"]) == 4
    assert all(r <= b + 1e-4 for r, b in zip(traj["regret"], traj["regret_bound"]))
    assert (out / "regret_and_nash_gap_vs_T.png").exists()
    assert "tiny" in capsys.readouterr().out


def test_a_sweep_over_registered_learners_plays_each_one(tmp_path):
    # The learner is a plug-in selected by name; a sweep runs every registered one on the same games.
    from align_jax.game.learner import LEARNERS

    text = TINY.replace("sweep:\n  rho: [-0.5, 0.5]\n  principal_noise: [0.0, 1.0]\n",
                        f"sweep:\n  learner: [{', '.join(LEARNERS.names())}]\n")
    config = simulate.load_simulate_config(write(tmp_path, text + f"output_dir: {tmp_path / 'runs'}\n"))
    frame = simulate.run_simulation(config, progress=False, figures=False)
    assert list(frame["learner"]) == list(LEARNERS.names())
    assert frame["nash_gap"].notna().all() and (frame["bound_violation"] == 0).all()
    assert frame["nash_gap"].nunique() == len(LEARNERS), "different learners gave identical games"
    assert (frame["oracle_value"] >= frame["align_value"] - 1e-6).all()
    # the default learner leaves the hash of existing runs alone; another one changes it
    from align_jax import runner

    base = simulate.load_simulate_config(write(tmp_path, TINY, "base.yaml"))
    rm = dataclasses.replace(base, game=dataclasses.replace(base.game, learner="regret_matching_plus"))
    assert "learner" not in runner.non_default_settings(base.game)
    assert runner.settings_hash(rm) != runner.settings_hash(base)
