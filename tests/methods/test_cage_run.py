"""``run_align`` end to end on a tiny random model: files, resume by key, summary metrics."""

from __future__ import annotations

import json

import pytest

from align_jax.config import config_from_dict
from align_jax.methods import cage


def _config(tmp_path, data_dir, checkpoint, **changes):
    base = dict(name="tiny", base_model=checkpoint, guide_model=checkpoint, data_dir=str(data_dir),
                num_questions=3, max_new_tokens=6, objectives=["brevity", "format"],
                weights=[[0.0, 0.0], [3.0, 0.0]], methods=["cage", "base", "best_of_n"], top_m=8,
                best_of_n=3, output_dir=str(tmp_path))
    base.update(changes)
    return config_from_dict(cage.AlignConfig, base)


@pytest.mark.slow  # ~30 s of compiles on 2 shared cores
def test_run_align_writes_results_and_resumes(tmp_path, tiny_data_dir, tiny_checkpoint):
    config = _config(tmp_path, tiny_data_dir, tiny_checkpoint)
    summary = cage.run_align(config, progress=False)
    out = cage.run_dir(config)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    # base: 3 questions; best_of_n and cage: 2 weights x 3 questions
    assert len(rows) == 3 + 6 + 6 and len({r["key"] for r in rows}) == len(rows)
    for r in rows:
        assert r["score_brevity"] == pytest.approx(-r["num_tokens"] / 6)
        assert r["score_format"] in (0.0, 1.0)
    # best-of-N with weight on brevity picks the shortest of its samples: never longer than base
    base = {r["question_id"]: r for r in rows if r["method"] == "base"}
    bon = [r for r in rows if r["method"] == "best_of_n" and r["weight_index"] == 1]
    assert all(r["num_tokens"] <= base[r["question_id"]]["num_tokens"] for r in bon)
    assert (out / "results.csv").exists() and (out / "tradeoff.png").stat().st_size > 0
    assert "| cage |" in (out / "summary.md").read_text()
    assert set(summary["hypervolume"]) == {"cage", "base", "best_of_n"}
    assert all(0.0 <= hv <= 1.1 for hv in summary["hypervolume"].values())
    # resume: nothing is recomputed or duplicated
    cage.run_align(config, progress=False, figures=False)
    again = (out / "results.jsonl").read_text().splitlines()
    assert len(again) == len(rows)
    # more questions: the finished rows are kept as they are, only the new question's rows are added
    cage.run_align(_config(tmp_path, tiny_data_dir, tiny_checkpoint, num_questions=4), progress=False, figures=False)
    grown = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert grown[:len(rows)] == rows and len(grown) == 4 * 5 and len({r["key"] for r in grown}) == len(grown)
    # a different setting under the same name is refused
    with pytest.raises(Exception, match="different settings"):
        cage.run_align(_config(tmp_path, tiny_data_dir, tiny_checkpoint, top_m=9), progress=False)
