"""Question shards (``--shard I/N``, ``--merge``): the runner's split and merge on toy units, then the
``reason`` pipeline on the tiny random model (merged shards == the unsharded run; an interrupted
shard resumes; merges that cannot be made are refused by name, before any model loads)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from align_jax import runner
from align_jax.shards import Shard, ShardError

# The tiny model and data of the methods tests (imported, not copied: pytest finds fixtures by name).
from tests.methods.conftest import tiny_checkpoint, tiny_config, tiny_data_dir, tiny_pool  # noqa: F401


def _lines(path):
    return Path(path).read_text().splitlines()


WALL = ("wall_s", "window_wall_s", "stage_wall_s")


def _strip_wall(line):
    return {k: v for k, v in json.loads(line).items() if k not in WALL}


# --------------------------------------------------------------------------------------
# shard specs
# --------------------------------------------------------------------------------------


def test_shard_specs_are_one_based():
    assert Shard.parse("2/4") == Shard(2, 4) and str(Shard(2, 4)) == "2/4"
    assert Shard.parse(" 1 / 1 ") == Shard(1, 1) and Shard(4, 4).dirname == "4-of-4"
    units = list(range(10))
    parts = [Shard(i, 3).select(units) for i in (1, 2, 3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert Shard(5, 12).select(units) == [4] and Shard(11, 12).select(units) == []


@pytest.mark.parametrize("spec,pattern", [
    ("5/4", r"index 5 is out of range; shards are numbered 1\.\.4"),
    ("0/4", r"index 0 is out of range.*1-based"),
    ("-1/4", r"index -1 is out of range"),
    ("a/b", r"expected I/N with integers"),
    ("2", r"expected I/N"),
    ("1/0", r"number of shards N must be >= 1, got 0"),
])
def test_bad_shard_specs_fail_before_anything_loads(spec, pattern, capsys, monkeypatch):
    with pytest.raises(ShardError, match=pattern):
        Shard.parse(spec)
    from align_jax.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("align_jax.llm.weights.load_pretrained", no_model)
    # the config does not even exist: the spec is rejected while the arguments are parsed
    for command in ("reason", "cage"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "no/such/config.yaml", f"--shard={spec}"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "argument --shard" in err and f"shard {spec!r}" in err


def test_shard_and_merge_exclude_each_other(capsys):
    from align_jax.cli import main

    with pytest.raises(SystemExit):
        main(["reason", "x.yaml", "--shard", "1/2", "--merge"])
    assert "not allowed with argument" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# the runner on toy units: split, resume, merge, refusals
# --------------------------------------------------------------------------------------


def _toy_units(count=7, per_unit=2):
    return [runner.Unit(tuple(f"q{u * per_unit + j}" for j in range(per_unit)), f"unit {u}", u) for u in range(count)]


def _toy_compute(unit):
    return [{"key": key, "value": unit.payload * 10 + j, "text": f"rï {key}", "score": 0.1 * (j + 1) / 3}
            for j, key in enumerate(unit.keys)]


def _toy_run(directory, units, settings="s1", **files_options):
    files = runner.RunFiles(directory, key_field="key", settings=settings, **files_options)
    return files, runner.run_units(files, units, _toy_compute, description="toy", progress=False)


def test_toy_shards_merge_to_the_unsharded_file_byte_for_byte(tmp_path):
    units = _toy_units()
    _toy_run(tmp_path / "plain", units)
    expected = (tmp_path / "plain" / "results.jsonl").read_bytes()
    written = []
    for i in (3, 1, 2):  # any order
        _, rows = _toy_run(tmp_path / "run", units, shard=Shard(i, 3))
        written += [r["key"] for r in rows]
        manifest = json.loads((tmp_path / "run" / "shards" / f"{i}-of-3" / "shard.json").read_text())
        assert manifest["shard"] == f"{i}/3" and manifest["plan_rows"] == 14
    assert sorted(written) == sorted(k for u in units for k in u.keys)  # no key lost or repeated
    files, rows = _toy_run(tmp_path / "run", units, merge=True)
    assert rows == []  # nothing computed by the merge
    assert (tmp_path / "run" / "results.jsonl").read_bytes() == expected
    # merging again is idempotent
    _toy_run(tmp_path / "run", units, merge=True)
    assert (tmp_path / "run" / "results.jsonl").read_bytes() == expected


def test_toy_merge_refusals_name_the_shard(tmp_path):
    units = _toy_units(5)
    run = tmp_path / "run"
    with pytest.raises(ShardError, match=r"no shards to merge"):
        _toy_run(run, units, merge=True)
    _toy_run(run, units, shard=Shard(1, 3))
    _toy_run(run, units, shard=Shard(3, 3))
    with pytest.raises(ShardError, match=r"shard 2/3 of 3 missing .*--shard 2/3"):
        _toy_run(run, units, merge=True)
    assert not (run / "results.jsonl").exists()

    # a shard made with other settings (another config under the same name and seed)
    _toy_run(run, units, settings="s2", shard=Shard(2, 3))
    with pytest.raises(ShardError, match=r"shards made from different configs .*shard 2/3: s2"):
        _toy_run(run, units, merge=True)
    (run / "shards" / "2-of-3" / "results.jsonl").unlink()
    _toy_run(run, units, shard=Shard(2, 3))

    # shards planned for other work (a limit is not in the settings hash, the plan catches it)
    with pytest.raises(ShardError, match=r"shard 1/3 was made for other work \(10 rows in its plan, 8"):
        _toy_run(run, units[:4], merge=True)

    # an incomplete shard (killed after its first unit)
    results = run / "shards" / "3-of-3" / "results.jsonl"
    full = results.read_text()
    results.write_text(full.splitlines(keepends=True)[0])
    with pytest.raises(ShardError, match=r"shard 3/3 is incomplete \(1 of 2 rows.*--shard 3/3 to resume"):
        _toy_run(run, units, merge=True)
    _, rows = _toy_run(run, units, shard=Shard(3, 3))
    assert [r["key"] for r in rows] == ["q5"] and results.read_text() == full

    # shards of two splits side by side
    _toy_run(run, units, shard=Shard(1, 2))
    with pytest.raises(ShardError, match=r"2 different splits \(N=2, N=3\)"):
        _toy_run(run, units, merge=True)


# --------------------------------------------------------------------------------------
# reason on the tiny model
# --------------------------------------------------------------------------------------

LIMIT = 6  # 3 windows of 2: shard 1/2 gets windows 0 and 2, shard 2/2 window 1


def _light_config(checkpoint, data_dir, output_dir):
    """The tiny reason config with one agent and no greedy / debate (fewer programs to compile)."""
    agents = [dict(model=checkpoint, name="zs", temperature=1.0, top_p=0.9, num_samples=3, max_new_tokens=6)]
    return tiny_config(checkpoint, data_dir, output_dir, limit=LIMIT, agents=agents, greedy=False,
                       debate=dict(rounds=0))


@pytest.fixture(scope="module")
def unsharded(tiny_checkpoint, tiny_data_dir, tiny_pool, tmp_path_factory):  # noqa: F811
    from align_jax.methods import reason

    config = _light_config(tiny_checkpoint, tiny_data_dir, tmp_path_factory.mktemp("unsharded"))
    return reason.run_reason(config, progress=False, figures=False, pool=tiny_pool)


def test_reason_shards_resume_and_merge_to_the_unsharded_run(unsharded, tiny_checkpoint, tiny_data_dir,  # noqa: F811
                                                             tiny_pool, tmp_path, capsys, monkeypatch):
    from align_jax.cli import main
    from align_jax.methods import reason

    config = _light_config(tiny_checkpoint, tiny_data_dir, tmp_path)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(dataclasses.asdict(config)))
    expected = _lines(unsharded.directory / "results.jsonl")
    ids = [f"gsm8k/test/{i}" for i in range(LIMIT)]
    assert [json.loads(line)["question_id"] for line in expected] == ids

    # shard 1/2 is killed while window 2's rows are written (one append: a whole row and a cut one)
    class Kill(RuntimeError):
        pass

    written = []

    def kill_in_window_2(row):
        written.append(row["question_id"])
        if len(written) == 3:
            raise Kill

    with pytest.raises(Kill):
        reason.run_reason(config, progress=False, figures=False, pool=tiny_pool, shard=Shard(1, 2),
                          on_question=kill_in_window_2)
    results = reason.run_dir(config) / "shards" / "1-of-2" / "results.jsonl"
    lines = results.read_text().splitlines(keepends=True)
    assert len(lines) == 4
    results.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])

    # merging now names the incomplete shard and loads no model
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    with monkeypatch.context() as patch:
        patch.setattr("align_jax.llm.weights.load_pretrained", no_model)
        assert main(["reason", str(path), "--merge", "--quiet", "--no-figures"]) == 2
        err = capsys.readouterr().err
        assert "shard 2/2 of 2 missing" in err and "--shard 2/2" in err

    # rerunning shard 1/2 resumes: only the cut question is computed again
    report = reason.run_reason(config, progress=False, figures=False, pool=tiny_pool, shard=Shard(1, 2),
                               on_question=lambda row: written.append(row["question_id"]))
    assert written[3:] == ["gsm8k/test/5"]
    assert [r["question_id"] for r in report.rows] == [ids[i] for i in (0, 1, 4, 5)]
    assert report.directory == reason.run_dir(config) / "shards" / "1-of-2"
    report = reason.run_reason(config, progress=False, figures=False, pool=tiny_pool, shard=Shard(2, 2))
    assert [r["question_id"] for r in report.rows] == ids[2:4]

    # the merge through the CLI: no model, the unsharded file line for line (wall times aside)
    with monkeypatch.context() as patch:
        patch.setattr("align_jax.llm.weights.load_pretrained", no_model)
        assert main(["reason", str(path), "--merge", "--quiet", "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert "align" in out and str(reason.run_dir(config)) in out
    merged = _lines(reason.run_dir(config) / "results.jsonl")
    assert [_strip_wall(line) for line in merged] == [_strip_wall(line) for line in expected]
    # every line is the runner's serialisation of its row, as the unsharded run appends it
    assert all(line == json.dumps(json.loads(line), sort_keys=True) for line in merged)
    summary = json.loads((reason.run_dir(config) / "summary.json").read_text())
    assert summary["questions"] == LIMIT
    assert {m: s["accuracy"] for m, s in summary["methods"].items()} == \
        {m: s["accuracy"] for m, s in unsharded.summary["methods"].items()}


def test_reason_merge_refuses_shards_of_another_config(unsharded, tiny_checkpoint, tiny_data_dir,  # noqa: F811
                                                       tiny_pool, tmp_path):
    from align_jax.methods import reason

    config = _light_config(tiny_checkpoint, tiny_data_dir, tmp_path)
    reason.run_reason(config, progress=False, figures=False, pool=tiny_pool, shard=Shard(1, 2))
    other = dataclasses.replace(config, game=dataclasses.replace(config.game, num_rounds=7))
    reason.run_reason(other, progress=False, figures=False, pool=tiny_pool, shard=Shard(2, 2))
    with pytest.raises(ShardError, match=r"shards made from different configs"):
        reason.run_reason(config, progress=False, figures=False, pool=tiny_pool, merge=True)
    # another limit has the same settings hash (limit is left out of it) but another plan
    fewer = dataclasses.replace(config, output_dir=str(tmp_path / "limit"))
    reason.run_reason(fewer, progress=False, figures=False, pool=tiny_pool, shard=Shard(1, 2))
    reason.run_reason(dataclasses.replace(fewer, limit=4), progress=False, figures=False, pool=tiny_pool,
                      shard=Shard(2, 2))
    with pytest.raises(ShardError, match=r"shard 2/2 was made for other work \(4 rows in its plan, 6"):
        reason.run_reason(fewer, progress=False, figures=False, pool=tiny_pool, merge=True)


def test_cage_shards_merge_to_the_unsharded_run(tiny_checkpoint, tiny_data_dir, tmp_path):  # noqa: F811
    from align_jax.config import config_from_dict
    from align_jax.methods import cage

    def config(output):
        return config_from_dict(cage.CageConfig, dict(
            name="tiny", base_model=tiny_checkpoint, data_dir=str(tiny_data_dir), num_questions=3, batch_questions=1,
            max_new_tokens=4, objectives=["brevity", "format"], weights=[[0.0, 0.0], [3.0, 0.0]],
            methods=["base", "best_of_n"], best_of_n=2, output_dir=str(output)))

    plain, sharded = config(tmp_path / "plain"), config(tmp_path / "sharded")
    cage.run_cage(plain, progress=False, figures=False)
    with pytest.raises(ShardError, match=r"no shards to merge"):  # before the (missing) model loads
        cage.run_cage(dataclasses.replace(sharded, base_model="no-such-model"), progress=False, merge=True)
    for i in (1, 2):
        cage.run_cage(sharded, progress=False, figures=False, shard=Shard(i, 2))
    summary = cage.run_cage(sharded, progress=False, figures=False, merge=True)
    expected = _lines(cage.run_dir(plain) / "results.jsonl")
    merged = _lines(cage.run_dir(sharded) / "results.jsonl")
    assert len(merged) == 3 * (1 + 2)
    assert [_strip_wall(line) for line in merged] == [_strip_wall(line) for line in expected]
    assert "| base |" in (cage.run_dir(sharded) / "summary.md").read_text() and summary["hypervolume"]


# --------------------------------------------------------------------------------------
# align-jax launch: bad input fails fast, before Ray starts or a model loads (no Ray needed)
# --------------------------------------------------------------------------------------


@pytest.fixture
def tiny_yaml(tiny_checkpoint, tiny_data_dir, tmp_path, monkeypatch):  # noqa: F811
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("align_jax.llm.weights.load_pretrained", no_model)
    path = tmp_path / "tiny.yaml"
    config = _light_config(tiny_checkpoint, tiny_data_dir, tmp_path)
    path.write_text(yaml.safe_dump(dataclasses.asdict(config)))
    return str(path)


@pytest.mark.parametrize("address,timeout,reason", [
    ("127.0.0.1:1", 5.0, r"no connection to 127\.0\.0\.1:1 within 5 s"),  # refused at once
    ("ray://127.0.0.1:1", 5.0, r"no connection to 127\.0\.0\.1:1"),
    # TEST-NET-2 (RFC 5737): no Ray there; this sandbox's proxy accepts any TCP connection, so the
    # child-process probe's timeout is what ends the wait
    pytest.param("198.51.100.1:6379", 2.0, r"(no connection to|no Ray cluster replied within 2 s)",
                 marks=pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                          reason="the Ray-level probe needs Ray (the `cluster` extra)")),
])
def test_launch_fails_fast_on_a_ray_address_that_does_not_answer(tiny_yaml, address, timeout, reason, capsys):
    import time

    from align_jax.cli import main
    from align_jax.cluster import LaunchError, launch

    start = time.perf_counter()
    with pytest.raises(LaunchError, match=rf"Ray address '{address}' does not answer: {reason}"):
        launch(["reason", tiny_yaml], shards=2, address=address, connect_timeout=timeout)
    assert main(["launch", "--shards", "2", "--ray-address", address, "--connect-timeout", str(timeout),
                 "reason", tiny_yaml, "--quiet"]) == 2
    assert f"Ray address '{address}' does not answer" in capsys.readouterr().err
    assert time.perf_counter() - start < 2 * timeout + 5  # no hang


@pytest.mark.parametrize("argv,pattern", [
    (["--shards", "0", "reason", "{yaml}"], r"--shards must be >= 1, got 0"),
    (["reason", "{yaml}", "--shards", "3", "--shard", "1/3"], r"leave --shard / --merge out"),
    (["--shards", "2", "simulate", "{yaml}"], r"`simulate` does not run in shards"),
    (["--shards", "2", "reason", "{yaml}", "--limit", "x"], r"bad command .*invalid int value: 'x'"),
    (["--shards", "2", "--ray-address", "nowhere", "reason", "{yaml}"], r"expected HOST:PORT"),
    (["--shards", "2"], r"name the command to shard"),
])
def test_launch_bad_input(tiny_yaml, argv, pattern, capsys):
    import re

    from align_jax.cli import main

    assert main(["launch", *[a.format(yaml=tiny_yaml) for a in argv]]) == 2
    assert re.search(pattern, capsys.readouterr().err)


def test_launch_bad_config_is_reported_before_ray(tmp_path, capsys):
    from align_jax.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nagents: []\n")
    assert main(["launch", "--shards", "2", "--ray-address", "127.0.0.1:1", "reason", str(path)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml:2: agents: the agents list is empty" in err and "Ray address" not in err


def test_launch_without_ray_installed_says_so(tiny_yaml, monkeypatch):
    """A port that accepts connections but a machine without Ray: the error names the missing extra."""
    import socket

    from align_jax.cluster import LaunchError, launch

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real_find_spec(name, *a))
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        with pytest.raises(LaunchError, match=rf"Ray address '{address}': cannot talk to it, Ray is not installed"):
            launch(["reason", tiny_yaml], shards=2, address=address, connect_timeout=5.0)
