"""A sweep as one compiled program, sharded over devices and processes: same rows everywhere."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from align_jax import distributed, simulate
from align_jax.config import ConfigError

REPO = Path(__file__).resolve().parents[1]

# Two static shapes (num_agents 2 and 3), three swept numbers each; trajectories and
# a chunk that does not divide the games (so padding and the last partial chunk count).
SWEEP = """\
name: shard
seed: 3
scenarios_per_point: 150
chunk_size: 64
trajectory: true
game:
  num_rounds: 3
  step_size: 0.5
scenario:
  num_agents: 2
  num_candidates: 3
  pool_size: 6
sweep:
  num_agents: [2, 3]
  rho: [-0.5, 0.0, 0.5]
"""

# One static shape for the runs in subprocesses (each compiles the program afresh).
SMALL = SWEEP.replace("  num_agents: [2, 3]\n", "")

TIMING = ("wall_s", "compile_s", "devices", "settings_hash")


def _rows(directory: Path) -> dict:
    rows = [json.loads(line) for line in (directory / "results.jsonl").read_text().splitlines()]
    return {r["point_id"]: {k: v for k, v in r.items() if k not in TIMING} for r in rows}


def _env(**extra) -> dict:
    env = dict(os.environ)
    kept = [flag for flag in env.pop("XLA_FLAGS", "").split() if "device_count" not in flag]
    flags = " ".join(kept + [extra.pop("XLA_FLAGS", "")]).strip()
    if flags:
        env["XLA_FLAGS"] = flags
    env.update(extra)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


_IN_PROCESS = textwrap.dedent("""
    import dataclasses, json, sys
    from pathlib import Path
    from align_jax import simulate
    tmp = Path(sys.argv[1])
    traces = []
    original = simulate._local_sums

    def counting(program, *args):
        traces.append(program.spec.num_agents)
        return original(program, *args)

    simulate._local_sums = counting
    sweep = simulate.load_simulate_config(tmp / "sweep.yaml")
    frame = simulate.run_simulation(sweep, progress=False, figures=False)
    simulate._local_sums = original
    whole = simulate.load_simulate_config(tmp / "small.yaml")
    simulate.run_simulation(whole, progress=False, figures=False)
    split = dataclasses.replace(whole, output_dir=str(tmp / "b"), points_per_call=2)
    simulate.run_simulation(split, progress=False, figures=False)
    print(json.dumps({"traces": sorted(traces), "points": len(frame), "distinct": int(frame["align_value"].nunique()),
                      "n": sorted(set(frame["n"].tolist())), "whole": str(simulate.run_dir(whole)),
                      "split": str(simulate.run_dir(split))}))
""")


def test_one_trace_per_static_shape_and_split_calls_give_the_same_rows(tmp_path):
    """A 6-point sweep over 2 static shapes traces the program twice (once per shape), the swept
    numbers reach it as data, and splitting points into calls of 2 gives the same rows.
    Runs in a fresh process (like the multi-device tests below)."""
    (tmp_path / "sweep.yaml").write_text(SWEEP + f"output_dir: {tmp_path / 'runs'}\n")
    (tmp_path / "small.yaml").write_text(SMALL + f"output_dir: {tmp_path / 'a'}\n")
    done = subprocess.run([sys.executable, "-c", _IN_PROCESS, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["traces"] == [2, 3], f"one trace per static shape, got {out['traces']}"
    assert out["points"] == 6 and out["distinct"] == 6 and out["n"] == [150]
    assert _rows(Path(out["whole"])) == _rows(Path(out["split"]))


def test_padding_keeps_every_game_and_block():
    for chunk in (1, 7, 64, 100, 25000):
        block = simulate.reduce_block(chunk)
        assert block & (block - 1) == 0 and 8 <= block <= 256
        for devices in (1, 3, 8):
            padded = simulate.padded_chunk(chunk, devices)
            assert padded >= chunk and padded % (devices * block) == 0
            assert padded - chunk < devices * block


_SHARDED = textwrap.dedent("""
    import json, sys
    import jax
    from align_jax import distributed, simulate
    assert jax.device_count() == 8, jax.devices()
    config = simulate.load_simulate_config(sys.argv[1])
    out = {}
    for devices in (1, 3, 8):
        mesh = distributed.game_mesh(devices)
        rows = simulate.run_points(config, simulate.sweep_points(config), mesh)
        out[devices] = [{k: v for k, v in r.items() if k not in ("wall_s", "compile_s", "devices")} for r in rows]
    print(json.dumps(out))
""")


def test_sharded_over_8_host_devices_gives_the_same_rows_as_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(SMALL + f"output_dir: {tmp_path / 'runs'}\n")
    done = subprocess.run([sys.executable, "-c", _SHARDED, str(path)], capture_output=True, text=True, timeout=300,
                          env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(out["1"]) == 3
    assert out["3"] == out["1"], "3 devices differ from 1"
    assert out["8"] == out["1"], "8 devices differ from 1"
    # ... and the same as this process's own single-device run.
    config = simulate.load_simulate_config(path)
    local = simulate.run_simulation(config, progress=False, figures=False)
    assert list(local["align_value"]) == [r["align_value"] for r in out["1"]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("processes", [2])
def test_multi_process_run_gives_the_same_rows_as_one_process(tmp_path, processes):
    path = tmp_path / "c.yaml"
    path.write_text(SMALL)
    single = tmp_path / "single"
    multi = tmp_path / "multi"
    cli = [sys.executable, "-m", "align_jax.cli", "simulate", str(path), "--quiet", "--no-figures"]
    port = _free_port()
    procs = [
        subprocess.Popen(cli + ["--output-dir", str(multi), "--coordinator", f"localhost:{port}",
                                "--num-processes", str(processes), "--process-id", str(i)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        for i in range(processes)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "results:" in outputs[0][0] and "results:" not in outputs[1][0], "only process 0 reports and writes"
    rows_multi = _rows(multi / "shard" / "seed3")
    config = simulate.load_simulate_config(path)
    import dataclasses

    simulate.run_simulation(dataclasses.replace(config, output_dir=str(single)), progress=False, figures=False)
    assert rows_multi == _rows(single / "shard" / "seed3")
    devices = {json.loads(line)["devices"] for line in (multi / "shard" / "seed3" / "results.jsonl").open()}
    assert devices == {processes}, "each process contributed its device to the mesh"


def test_bad_device_and_process_settings_are_named(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="devices: 99 requested"):
        distributed.game_mesh(99)
    with pytest.raises(ConfigError, match="devices"):
        distributed.game_mesh(0)
    with pytest.raises(ConfigError, match="--num-processes, --process-id"):
        distributed.initialize("localhost:1234")
    with pytest.raises(ConfigError, match="--process-id: must be in"):
        distributed.initialize("localhost:1234", 2, 5)
    monkeypatch.setenv("ALIGN_JAX_NUM_PROCESSES", "two")
    with pytest.raises(ConfigError, match="ALIGN_JAX_NUM_PROCESSES"):
        distributed.initialize()
    monkeypatch.delenv("ALIGN_JAX_NUM_PROCESSES")
    assert distributed.initialize() is False  # no coordinator anywhere: a single-process run
    path = tmp_path / "c.yaml"
    path.write_text(SWEEP + "devices: 0\n")
    with pytest.raises(Exception, match="devices"):
        simulate.load_simulate_config(path)
