"""``align-jax econ train|eval``: checkpoints, resume after a kill == uninterrupted, eval rows
and summary, and bad input (foreign or corrupt checkpoint directories, bad configs) refused
with the directory / file and field named and nothing overwritten.

The tiny run of conftest ``trained_tiny`` (compiled once) is the uninterrupted reference.
"""

import dataclasses
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.cli import main
from align_jax.methods.econ.checkpoint import CheckpointError
from align_jax.methods.econ.run import econ_run_dir, eval_run, train_run

from tests.methods.econ.conftest import known_best_config


def _assert_trees_equal(a, b, rtol=1e-6, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_resume_after_kill_equals_the_uninterrupted_run(trained_tiny, resumed):
    first, second = resumed["first"], resumed["second"]
    assert (first.finished, first.steps_run, first.resumed_from) == (False, 512, 0)
    assert (second.finished, second.steps_run, second.resumed_from) == (True, 512, 512)
    _assert_trees_equal(second.state, trained_tiny["final"])
    directory = econ_run_dir(resumed["config"])
    assert sorted(p.name for p in (directory / "checkpoints").iterdir()) == ["1024", "512", "settings.json"]
    assert (directory / "train_curve.csv").exists()
    # the compiled programs were shared with the uninterrupted run: nothing retraced
    assert resumed["segment_cache_size"] == 1


def test_eval_writes_rows_and_summary_once(trained_tiny, resumed):
    config = resumed["config"]
    summary = eval_run(config, progress=False, figures=False, trainer=trained_tiny["trainer"])
    directory = econ_run_dir(config)
    lines = (directory / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 4  # seeds x policies
    learned = trained_tiny["result"].learned.accuracy
    assert summary["policies"]["learned"]["accuracy"] == pytest.approx(float(np.mean(learned)), abs=1e-6)
    assert summary["policies"]["fixed"]["learned_minus"] > 0.1
    eval_run(config, progress=False, figures=False, trainer=trained_tiny["trainer"])  # rerun adds nothing
    assert (directory / "results.jsonl").read_text().splitlines() == lines
    assert "| learned |" in (directory / "summary.md").read_text()
    # the reward weights each seed ended with are recorded (fixed here: the configured ones)
    assert summary["reward_weights"] == pytest.approx([0.5, 0.3, 0.2], abs=1e-6)
    assert "Reward weights (ts, al, cc), fixed" in (directory / "summary.md").read_text()


def test_checkpoints_of_another_config_are_refused(trained_tiny, resumed):
    config = resumed["config"]
    directory = econ_run_dir(config)
    before = _snapshot(directory)
    other = dataclasses.replace(config, train=dataclasses.replace(config.train, learning_rate=5e-4))
    with pytest.raises(CheckpointError) as info:
        train_run(other, progress=False, figures=False, trainer=trained_tiny["trainer"])
    message = str(info.value)
    assert str(directory / "checkpoints") in message and "train.learning_rate: 0.001 -> 0.0005" in message
    assert _snapshot(directory) == before  # nothing overwritten, not even config.json


def test_a_corrupt_checkpoint_is_named_and_kept(trained_tiny, resumed, tmp_path):
    config = dataclasses.replace(resumed["config"], run=dataclasses.replace(resumed["config"].run,
                                                                           output_dir=str(tmp_path)))
    src, dst = econ_run_dir(resumed["config"]), econ_run_dir(config)
    shutil.copytree(src, dst)
    files = [p for p in (dst / "checkpoints" / "1024").rglob("*") if p.is_file() and p.stat().st_size > 64
             and "meta" not in p.parts]
    assert files
    for path in files:  # overwrite the middle of every data file
        data = bytearray(path.read_bytes())
        mid = len(data) // 2
        data[mid:mid + 32] = os.urandom(32)
        path.write_bytes(bytes(data))
    before = _snapshot(dst)
    with pytest.raises(CheckpointError, match=r"checkpoints/1024"):
        train_run(config, progress=False, figures=False, trainer=trained_tiny["trainer"])
    assert _snapshot(dst) == before


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "econ.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("text,expected", [
    ("reward_weights: {ts: 0.5, style: 0.5}\n", r"econ.yaml:1: reward_weights.style: unknown reward"),
    ("reward_weights:\n  ts: 0.5\n  al: -0.3\n", r"econ.yaml:3: reward_weights.al: must be >= 0"),
    ("sim:\n  num_executors: 0\n", r"econ.yaml:2: sim.num_executors: must be an integer >= 1"),
    ("env:\n  overrides: {bogus: 1.0}\n", r"econ.yaml:2: env.overrides.bogus: unknown simulator parameter"),
    ("run:\n  checkpoint_every: 3\n", r"econ.yaml:2: run.checkpoint_every: must be a multiple"),
])
def test_cli_reports_bad_configs_with_file_line_and_field(tmp_path, capsys, text, expected):
    path = _yaml(tmp_path, text)
    assert main(["econ", "train", str(path), "--output-dir", str(tmp_path / "out"), "--quiet"]) == 2
    assert expected.replace("\\", "") in capsys.readouterr().err.replace("\\", "")
    assert not (tmp_path / "out").exists()


def test_cli_eval_before_training_is_an_error(tmp_path, capsys):
    path = _yaml(tmp_path, "name: never_trained\n")
    assert main(["econ", "eval", str(path), "--output-dir", str(tmp_path / "out"), "--quiet"]) == 2
    assert "training is not finished" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_killed_mid_run_resumes_to_the_same_parameters(tmp_path):
    """A real kill: ``align-jax econ train`` in a subprocess, SIGKILLed after its first
    checkpoint, rerun to the end; equals one uninterrupted run in another directory."""
    import time

    from align_jax.methods.econ.checkpoint import Checkpointer  # noqa: F401
    from align_jax.methods.econ.run import load_econ_config

    yaml = _yaml(tmp_path, """\
        name: kill
        network: {belief_dim: 8, hidden_dim: 16, num_heads: 2, num_blocks: 1, mixer_embed_dim: 8}
        train: {num_steps: 4096, num_envs: 8, update_every: 2, batch_size: 16, buffer_size: 2048}
        run: {num_seeds: 2, checkpoint_every: 256}
        """)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[3]))
    command = [sys.executable, "-m", "align_jax.cli", "econ", "train", str(yaml), "--quiet", "--no-figures"]
    killed = subprocess.Popen(command + ["--output-dir", str(tmp_path / "a")], env=env)
    checkpoints = tmp_path / "a" / "kill" / "seed0" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not any(p.name.isdigit() for p in checkpoints.glob("*")):
        time.sleep(0.2)
    killed.kill()
    killed.wait()
    assert any(p.name.isdigit() for p in checkpoints.glob("*"))
    subprocess.run(command + ["--output-dir", str(tmp_path / "a")], env=env, check=True)
    subprocess.run(command + ["--output-dir", str(tmp_path / "b")], env=env, check=True)
    config = load_econ_config(yaml)
    from align_jax.methods.econ.run import _checkpointer, seed_keys, seed_programs
    from align_jax.methods.econ.train import make_trainer

    like = seed_programs(make_trainer(config))[0](seed_keys(config))
    states = []
    for out in ("a", "b"):
        c = dataclasses.replace(config, run=dataclasses.replace(config.run, output_dir=str(tmp_path / out)))
        states.append(_checkpointer(c, econ_run_dir(c)).restore(like))
    _assert_trees_equal(*states)


def _econ_yaml(config, path: Path) -> Path:
    import yaml

    from align_jax.config import config_to_dict

    path.write_text(yaml.safe_dump(config_to_dict(config)))
    return path


def test_econ_rows_in_a_reason_run_use_the_trained_networks(resumed, tiny_checkpoint, tiny_data_dir, tiny_pool,
                                                             tmp_path):
    """A reason config's ``econ:`` section runs ECON with the finished tiny run's belief networks
    (``econ/learned``) and its initial networks (``econ/initial``) next to ALIGN: rows, costs,
    the ``econ`` section and the summary; an unfinished run is refused before any model loads."""
    from align_jax.config import ConfigError
    from align_jax.methods import reason
    from align_jax.methods.candidates import ModelPool
    from align_jax.methods.econ.reason_method import EconSection

    from tests.methods.conftest import tiny_config as tiny_reason_config

    econ_yaml = _econ_yaml(resumed["config"], tmp_path / "econ.yaml")
    econ = dict(config=str(econ_yaml), strategy_tokens=6, executor_tokens=8, commit_tokens=6)
    config = tiny_reason_config(tiny_checkpoint, tiny_data_dir, tmp_path / "runs", limit=2, methods=["align", "econ"],
                                greedy=False, debate=dict(rounds=0), econ=econ)
    assert isinstance(config.econ, EconSection) and config.econ.policies == ["learned", "initial"]
    report = reason.run_reason(config, progress=False, figures=False, pool=tiny_pool)
    n, t = resumed["config"].sim.num_executors, resumed["config"].sim.max_rounds
    for row in report.rows:
        assert set(row["methods"]) == {"align", "econ/learned", "econ/initial"}
        for policy in ("learned", "initial"):
            record, cost = row["econ"][policy], row["methods"][f"econ/{policy}"]["cost"]
            assert 1 <= record["rounds"] <= t and len(record["commitments"]) == record["rounds"]
            assert np.asarray(record["temperatures"]).shape == (record["rounds"], n)
            assert cost["calls"] == 1 + record["rounds"] * (n + 1) and cost["gen_tokens"] > 0
        assert row["stage_wall_s"]["econ"] > 0
    assert {"econ/learned", "econ/initial"} <= set(report.summary["methods"])
    # the policies differ: the trained networks choose other temperatures than the initial ones on some round
    chosen = {p: [r["econ"][p]["temperatures"][0] for r in report.rows] for p in ("learned", "initial")}
    assert chosen["learned"] != chosen["initial"]
    # the method passes the shared conformance test on a window of this config
    from align_jax.methods.reason_methods import REASON_METHODS, method_api_test

    from tests.methods.test_reason import _window

    method_api_test(REASON_METHODS.get("econ"), _window(config, tiny_pool))

    # a run that is not trained yet: refused before any model is loaded
    unfinished = dataclasses.replace(resumed["config"], name="untrained")
    econ["config"] = str(_econ_yaml(unfinished, tmp_path / "untrained.yaml"))
    bad = tiny_reason_config(tiny_checkpoint, tiny_data_dir, tmp_path / "runs2", limit=2, methods=["econ"],
                             greedy=False, debate=dict(rounds=0), econ=econ)
    pool = ModelPool()
    with pytest.raises(ConfigError, match="training is not finished"):
        reason.run_reason(bad, progress=False, figures=False, pool=pool)
    assert not pool._loaded


@pytest.mark.parametrize("changes,pattern", [
    (dict(policies=["learned", "oracle"]), r"econ\.policies\.1: unknown policy 'oracle'"),
    (dict(policies=[]), r"econ\.policies: need at least one"),
    (dict(seed_index=5), r"econ\.seed_index: the run of .* has 2 seed"),
    (dict(executor_tokens=0), r"econ\.executor_tokens: must be >= 1"),
    (dict(config="missing.yaml"), r"econ\.config: ECON config file not found"),
])
def test_bad_econ_sections_name_the_field(resumed, tiny_checkpoint, tiny_data_dir, tmp_path, changes, pattern):
    from align_jax.config import ConfigError

    from tests.methods.conftest import tiny_config as tiny_reason_config

    econ = dict(config=str(_econ_yaml(resumed["config"], tmp_path / "econ.yaml")))
    econ.update(changes)
    with pytest.raises(ConfigError, match=pattern):
        tiny_reason_config(tiny_checkpoint, tiny_data_dir, tmp_path, econ=econ)
