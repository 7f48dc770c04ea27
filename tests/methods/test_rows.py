"""The typed reason-row schema: old rows read and write back identically; bad rows are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align_jax.config import ConfigError
from align_jax.methods.rows import ReasonRow, read_rows, row_from_dict, row_to_dict
from align_jax.runio import CorruptResultsError

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "docs" / "results" / "reason_gsm8k_100" / "seed0" / "results.jsonl"


def _committed_rows():
    return [json.loads(line) for line in COMMITTED.read_text().splitlines()]


def test_every_committed_row_round_trips_through_the_schema():
    rows = _committed_rows()
    assert len(rows) == 100
    for row in rows:
        typed = row_from_dict(row)
        assert isinstance(typed, ReasonRow)
        assert json.dumps(row_to_dict(typed), sort_keys=True) == json.dumps(row, sort_keys=True)


def test_optional_fields_are_left_out_not_written_as_null():
    row = _committed_rows()[0]
    typed = row_from_dict(row)
    out = row_to_dict(typed)
    assert "agent" in out["methods"]["align"] and "agent" not in out["methods"]["sc_pooled"]
    typed.settings_hash = None
    assert "settings_hash" not in row_to_dict(typed)


@pytest.mark.parametrize("path,value,pattern", [
    (("agents", 0, "samples", 2, "tokens"), "many", r"agents\.0\.samples\.2\.tokens: expected an integer"),
    (("methods", "align", "correct"), "yes", r"methods\.align\.correct: expected a number"),
    (("game", "regret"), 3, r"game\.regret: expected a list"),
])
def test_a_malformed_row_names_file_line_and_field(tmp_path, path, value, pattern):
    rows = _committed_rows()[:3]
    target = rows[1]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=r"results\.jsonl:2: " + pattern):
        read_rows(results)


def test_a_missing_field_is_named(tmp_path):
    rows = _committed_rows()[:1]
    del rows[0]["agents"][0]["slots"][0]["utility"]
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(ConfigError, match=r"results\.jsonl:1: agents\.0\.slots\.0: missing required key\(s\): utility"):
        read_rows(results)


def test_read_rows_keeps_the_first_row_per_question_and_skips_a_crash_cut_tail(tmp_path):
    rows = _committed_rows()[:2]
    results = tmp_path / "results.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in rows) + json.dumps(rows[0])[:100]
    results.write_text(text)
    assert list(read_rows(results)) == [rows[0]["question_id"], rows[1]["question_id"]]
    results.write_text(json.dumps(rows[0])[:100] + "\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(CorruptResultsError, match=r"results\.jsonl:1"):
        read_rows(results)
