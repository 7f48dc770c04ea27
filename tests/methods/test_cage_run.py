"""``run_cage`` end to end on a tiny random model: files, resume by key, summary metrics, unconverged
solves reported, and the ``cage`` command with its deprecated ``align`` alias."""

from __future__ import annotations

import json
import re

import pytest

from align_jax.config import config_from_dict
from align_jax.methods import cage
from align_jax import runner


def _config(tmp_path, data_dir, checkpoint, **changes):
    base = dict(name="tiny", base_model=checkpoint, guide_model=checkpoint, data_dir=str(data_dir),
                num_questions=3, max_new_tokens=6, objectives=["brevity", "format"],
                weights=[[0.0, 0.0], [3.0, 0.0]], methods=["cage", "base", "best_of_n"], top_m=8,
                best_of_n=3, output_dir=str(tmp_path))
    base.update(changes)
    return config_from_dict(cage.CageConfig, base)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow  # ~30 s of compiles on 2 shared cores
def test_run_cage_writes_results_and_resumes(tmp_path, tiny_data_dir, tiny_checkpoint):
    config = _config(tmp_path, tiny_data_dir, tiny_checkpoint)
    summary = cage.run_cage(config, progress=False)
    out = cage.run_dir(config)
    rows = _rows(out / "results.jsonl")
    # base: 3 questions; best_of_n and cage: 2 weights x 3 questions
    assert len(rows) == 3 + 6 + 6 and len({r["key"] for r in rows}) == len(rows)
    settings = runner.settings_hash(config, exclude=cage.run.SETTINGS_EXCLUDE)
    assert {r["settings_hash"] for r in rows} == {settings}
    for r in rows:
        assert r["score_brevity"] == pytest.approx(-r["num_tokens"] / 6)
        assert r["score_format"] in (0.0, 1.0)
        assert ("unconverged_steps" in r) == (r["method"] == "cage")
    # best-of-N with weight on brevity picks the shortest of its samples: never longer than base
    base = {r["question_id"]: r for r in rows if r["method"] == "base"}
    bon = [r for r in rows if r["method"] == "best_of_n" and r["weight_index"] == 1]
    assert all(r["num_tokens"] <= base[r["question_id"]]["num_tokens"] for r in bon)
    assert (out / "results.csv").exists() and (out / "tradeoff.png").stat().st_size > 0
    assert "| cage |" in (out / "summary.md").read_text()
    assert set(summary["hypervolume"]) == {"cage", "base", "best_of_n"}
    assert all(0.0 <= hv <= 1.1 for hv in summary["hypervolume"].values())
    assert summary["unconverged_steps"]["cage"]["rows_counted"] == 6
    # resume: nothing is recomputed or duplicated
    cage.run_cage(config, progress=False, figures=False)
    assert (out / "results.jsonl").read_text().splitlines() == [json.dumps(r, sort_keys=True) for r in rows]
    # more questions: the finished rows are kept as they are, only the new question's rows are added
    cage.run_cage(_config(tmp_path, tiny_data_dir, tiny_checkpoint, num_questions=4), progress=False, figures=False)
    grown = _rows(out / "results.jsonl")
    assert grown[:len(rows)] == rows and len(grown) == 4 * 5 and len({r["key"] for r in grown}) == len(grown)
    # a different setting under the same name is refused, naming the file and line
    with pytest.raises(Exception, match=r"results.jsonl:1: .*different settings"):
        cage.run_cage(_config(tmp_path, tiny_data_dir, tiny_checkpoint, top_m=9), progress=False)


def test_cage_command_alias_and_unconverged_report(tmp_path, tiny_data_dir, tiny_checkpoint, capsys):
    """`align-jax align` says it is deprecated and runs `cage`; a solver cap too small to converge is
    counted per row and in the summary (old code dropped the solver's converged flag)."""
    from align_jax.cli import main

    path = tmp_path / "cage_tiny.yaml"
    path.write_text(f"name: tiny_cli\nbase_model: {tiny_checkpoint}\ndata_dir: {tiny_data_dir}\n"
                    "num_questions: 2\nmax_new_tokens: 4\nobjectives: [brevity, format]\n"
                    "weights: [[40.0, 60.0]]\nmethods: [cage]\ntop_m: 12\ntau: 0.05\nsolver_max_iters: 1\n"
                    f"output_dir: {tmp_path}\n")
    assert main(["align", str(path), "--quiet", "--no-figures"]) == 0
    err = capsys.readouterr().err
    assert "'align-jax align' is deprecated" in err and "align-jax cage" in err
    out_dir = tmp_path / "tiny_cli" / "seed0"
    rows = _rows(out_dir / "results.jsonl")
    assert len(rows) == 2 and all(r["method"] == "cage" for r in rows)
    assert all(0 <= r["unconverged_steps"] <= r["num_tokens"] for r in rows)
    assert sum(r["unconverged_steps"] for r in rows) > 0
    summary = json.loads((out_dir / "summary.json").read_text())
    counted = summary["unconverged_steps"]["cage"]
    assert counted["steps"] == sum(r["unconverged_steps"] for r in rows) and counted["rows_counted"] == 2
    assert "not converged within solver_max_iters=1" in (out_dir / "summary.md").read_text()
    # the new name: no deprecation notice, nothing recomputed, the unconverged solves are warned about
    assert main(["cage", str(path), "--quiet", "--no-figures"]) == 0
    captured = capsys.readouterr()
    assert "deprecated" not in captured.err and "did not converge within solver_max_iters=1" in captured.err
    assert _rows(out_dir / "results.jsonl") == rows
    # another vector at a weight index that has rows is refused (weights are not in the settings hash)
    path.write_text(path.read_text().replace("[[40.0, 60.0]]", "[[40.0, 61.0]]"))
    capsys.readouterr()
    assert main(["cage", str(path), "--quiet"]) == 2
    assert re.search(r"cage_tiny.yaml:7: weights.0: .*results.jsonl: row 'cage\|0\|.*' was computed with weights "
                     r"\[40.0, 60.0\], not \[40.0, 61.0\]", capsys.readouterr().err)
    # bad input through the command: one line naming file, line and field, exit 2
    path.write_text(path.read_text().replace("top_m: 12", "top_m: 500"))
    capsys.readouterr()
    assert main(["cage", str(path), "--quiet"]) == 2
    assert "cage_tiny.yaml:9: top_m: 500 candidate tokens is larger" in capsys.readouterr().err
