"""``align-jax launch`` on a local Ray cluster of 2 workers: the tiny reason run's 2 shards run as two
Ray tasks in two worker processes and merge to the unsharded run.

Marked ``slow``: run it with ``python -m pytest -m slow tests/test_ray_cluster.py`` (needs
``pip install 'align_jax[cluster]'``; skipped without Ray). 28-41 s on 2 shared cores: Ray start-up,
one compile of the tiny model in each worker and the unsharded reference run in this process."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

pytest.importorskip("ray")

# 28-41 s on 2 shared cores (Ray start-up and a compile in each worker): python -m pytest -m slow tests/test_ray_cluster.py
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:os.fork")]

from align_jax.cluster import launch  # noqa: E402
from tests.methods.conftest import tiny_checkpoint, tiny_data_dir, tiny_pool  # noqa: E402,F401
from tests.test_shards import LIMIT, _light_config, _strip_wall, unsharded  # noqa: E402,F401


def test_launch_two_shards_on_a_local_ray_cluster_of_two_workers(unsharded, tiny_checkpoint,  # noqa: F811
                                                                 tiny_data_dir, tmp_path, capsys):
    from align_jax.methods import reason

    config = _light_config(tiny_checkpoint, tiny_data_dir, tmp_path)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(dataclasses.asdict(config)))
    lines = []
    report = launch(["reason", str(path)], shards=2, workers=2, log=lines.append)
    assert [s["shard"] for s in report.shards] == ["1/2", "2/2"]
    assert [s["rows"] for s in report.shards] == [4, 2]
    assert any("shard 1/2 done" in line for line in lines) and any("shard 2/2 done" in line for line in lines)
    pids = {line.rsplit("pid ", 1)[1].rstrip(")") for line in lines if " done: " in line}
    assert len(pids) == 2, lines  # two Ray worker processes, one shard each
    assert report.run_directory == reason.run_dir(config)
    merged = (report.run_directory / "results.jsonl").read_text().splitlines()
    expected = (unsharded.directory / "results.jsonl").read_text().splitlines()
    assert len(merged) == LIMIT
    assert [_strip_wall(line) for line in merged] == [_strip_wall(line) for line in expected]
    assert "| align |" in (report.run_directory / "summary.md").read_text()
    assert "align" in capsys.readouterr().out  # the merge printed the run's table
