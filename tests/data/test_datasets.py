"""Benchmark loading (align_jax.data.datasets)."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import types
from pathlib import Path

import pytest

from align_jax.data import datasets
from align_jax.data.answers import extract_answer, is_correct
from align_jax.data.datasets import (
    DATA_DIR_ENV,
    DatasetError,
    Problem,
    dataset_names,
    fewshot_exemplars,
    load_dataset,
    resolve_data_dir,
)

DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"benchmark data not found at {DATA_DIR}")

GSM8K_RECORD = {"question": "What is 2 + 2?", "answer": "2 + 2 = <<2+2=4>>4\n#### 1,004"}
GSM_HARD_RECORD = {"input": "What is 2 + 2?", "code": "def solution():\n    return 4.0", "target": 4.0}
MATH500_RECORD = {
    "problem": "Compute $1/2$.",
    "solution": "It is $\\boxed{\\frac12}$.",
    "answer": "\\frac12",
    "subject": "Algebra",
    "level": 1,
    "unique_id": "test/algebra/1.json",
}


def write_jsonl(root: Path, relative: str, lines: list[str]) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---- The real files ------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize(
    ("name", "split", "count"),
    [("gsm8k", "test", 1319), ("gsm8k", "train", 7473), ("gsm-hard", "test", 1319), ("math500", "test", 500)],
)
def test_real_datasets_load(name, split, count):
    problems = load_dataset(name, split=split, data_dir=DATA_DIR)
    assert len(problems) == count
    assert len({problem.id for problem in problems}) == count
    assert all(problem.dataset == name and problem.question.strip() and problem.gold for problem in problems)
    assert all(problem.meta["split"] == split for problem in problems)


@needs_data
def test_gsm8k_gold_is_the_number_after_hashes_without_commas():
    problems = load_dataset("gsm8k", data_dir=DATA_DIR)
    assert problems[0].id == "gsm8k/test/0" and problems[0].gold == "18"
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", problem.gold) for problem in problems)
    with_commas = [p for p in problems if "," in p.meta["solution"].split("####")[-1]]
    assert len(with_commas) == 14  # e.g. "#### 2,125" -> "2125"
    assert all(p.gold == extract_answer(p.meta["solution"]) for p in with_commas)


@needs_data
def test_gsm_hard_gold_is_canonical_and_keeps_the_value():
    problems = load_dataset("gsm-hard", data_dir=DATA_DIR)
    targets = [json.loads(line)["target"] for line in (DATA_DIR / "gsm-hard" / "gsmhardv2.jsonl").open()]
    assert problems[0].gold == "-9867630"  # float -9867630.0 written without ".0"
    assert problems[7].gold == "3244047.1"  # float noise 3244047.0999999996 dropped
    for problem, target in zip(problems, targets, strict=True):
        assert re.fullmatch(r"-?\d+(\.\d*[1-9])?", problem.gold), problem.gold  # no ".0", no exponent
        assert abs(float(problem.gold) - target) <= 1e-9 * max(1.0, abs(target))
        assert is_correct(repr(target), problem.gold)
    assert "def solution" in problems[0].meta["code"]


@needs_data
def test_math500_fields():
    first = load_dataset("math-500", data_dir=DATA_DIR, limit=1)[0]
    assert first.id == "math500/test/precalculus/807.json"
    assert first.gold == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert first.meta["subject"] == "Precalculus" and first.meta["level"] == 2
    assert "\\boxed" in first.meta["solution"]


@needs_data
def test_limit_offset_and_aliases():
    everything = load_dataset("gsm8k", data_dir=DATA_DIR)
    window = load_dataset("GSM-8K", data_dir=DATA_DIR, offset=10, limit=3)
    assert window == everything[10:13]
    assert [p.id for p in window] == ["gsm8k/test/10", "gsm8k/test/11", "gsm8k/test/12"]
    assert load_dataset("gsm8k", data_dir=DATA_DIR, offset=1319) == []
    assert load_dataset("gsm8k", data_dir=DATA_DIR, limit=0) == []
    assert load_dataset("gsmhard", data_dir=DATA_DIR, limit=2) == load_dataset("gsm-hard", data_dir=DATA_DIR, limit=2)


@needs_data
def test_fewshot_exemplars_come_from_train_deterministically():
    first = fewshot_exemplars(4, seed=7, data_dir=DATA_DIR)
    assert first == fewshot_exemplars(4, seed=7, data_dir=DATA_DIR)
    assert first != fewshot_exemplars(4, seed=8, data_dir=DATA_DIR)
    assert len({question for question, _ in first}) == 4
    train = {p.question: p for p in load_dataset("gsm8k", "train", data_dir=DATA_DIR)}
    test_questions = {p.question for p in load_dataset("gsm8k", "test", data_dir=DATA_DIR)}
    for question, solution in first:
        assert question in train and question not in test_questions
        assert "<<" not in solution and "####" in solution
        assert extract_answer(solution) == train[question].gold
    annotated = fewshot_exemplars(4, seed=7, data_dir=DATA_DIR, keep_calculator_annotations=True)
    assert [q for q, _ in annotated] == [q for q, _ in first]
    assert any("<<" in solution for _, solution in annotated)
    assert fewshot_exemplars(0, data_dir=DATA_DIR) == []
    with pytest.raises(DatasetError, match="exceeds the 7473"):
        fewshot_exemplars(7474, data_dir=DATA_DIR)
    with pytest.raises(DatasetError, match="non-negative int"):
        fewshot_exemplars(-1, data_dir=DATA_DIR)


# ---- Problem ---------------------------------------------------------------------------------


def test_problem_is_frozen_and_hashable():
    problem = Problem(id="a", question="q", gold="1", dataset="gsm8k", meta={"x": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        problem.gold = "2"  # type: ignore[misc]
    assert problem == Problem(id="a", question="q", gold="1", dataset="gsm8k", meta={"y": 2})
    assert len({problem, Problem(id="a", question="q", gold="1", dataset="gsm8k")}) == 1


# ---- Synthetic files: every record path and every error ---------------------------------------


def test_each_dataset_maps_its_record(tmp_path):
    write_jsonl(tmp_path, "gsm8k/test.jsonl", [json.dumps(GSM8K_RECORD)])
    write_jsonl(tmp_path, "gsm-hard/gsmhardv2.jsonl", [json.dumps({**GSM_HARD_RECORD, "target": -2.50})])
    write_jsonl(tmp_path, "math500/test.jsonl", [json.dumps(MATH500_RECORD)])
    (gsm,) = load_dataset("gsm8k", data_dir=tmp_path)
    assert (gsm.id, gsm.gold, gsm.meta["solution"]) == ("gsm8k/test/0", "1004", GSM8K_RECORD["answer"])
    (hard,) = load_dataset("gsm-hard", data_dir=tmp_path)
    assert (hard.id, hard.gold, hard.question) == ("gsm-hard/test/0", "-2.5", "What is 2 + 2?")
    (math,) = load_dataset("math500", data_dir=tmp_path)
    assert (math.id, math.gold, math.meta["level"]) == ("math500/test/algebra/1.json", "\\frac12", 1)


def test_blank_lines_are_skipped_and_line_numbers_stay_true(tmp_path):
    bad = {"question": "q", "answer": "no final answer"}
    path = write_jsonl(tmp_path, "gsm8k/test.jsonl", [json.dumps(GSM8K_RECORD), "", "   ", json.dumps(bad)])
    with pytest.raises(DatasetError, match=re.escape(f"{path}:4: field 'answer'")):
        load_dataset("gsm8k", data_dir=tmp_path)
    # The bad record is index 1: a window that stops before it loads fine.
    assert len(load_dataset("gsm8k", data_dir=tmp_path, limit=1)) == 1


@pytest.mark.parametrize(
    ("relative", "name", "line", "field", "message"),
    [
        ("gsm8k/test.jsonl", "gsm8k", '{"question": "q", "answer": "#### 3"', None, "invalid JSON"),
        ("gsm8k/test.jsonl", "gsm8k", '["not", "an", "object"]', None, "expected a JSON object"),
        ("gsm8k/test.jsonl", "gsm8k", '{"answer": "#### 3"}', "question", "missing field"),
        ("gsm8k/test.jsonl", "gsm8k", '{"question": 7, "answer": "#### 3"}', "question", "must be str"),
        ("gsm8k/test.jsonl", "gsm8k", '{"question": "  ", "answer": "#### 3"}', "question", "is empty"),
        ("gsm8k/test.jsonl", "gsm8k", '{"question": "q", "answer": "3"}', "answer", "no '#### <final answer>'"),
        ("gsm8k/test.jsonl", "gsm8k", '{"question": "q", "answer": "x ####  "}', "answer", "nothing after"),
        ("gsm-hard/gsmhardv2.jsonl", "gsm-hard", '{"input": "q", "target": "4"}', "target", "must be int or float"),
        ("gsm-hard/gsmhardv2.jsonl", "gsm-hard", '{"input": "q", "target": true}', "target", "must be int or float"),
        ("gsm-hard/gsmhardv2.jsonl", "gsm-hard", '{"input": "q", "target": NaN}', "target", "must be finite"),
        ("gsm-hard/gsmhardv2.jsonl", "gsm-hard", '{"input": "q", "target": 1, "code": 5}', "code", "must be str"),
        ("math500/test.jsonl", "math500", '{"problem": "p", "solution": "s", "unique_id": "u"}', "answer", "missing"),
        ("math500/test.jsonl", "math500", json.dumps({**MATH500_RECORD, "level": "1"}), "level", "must be int"),
    ],
)
def test_malformed_line_names_file_line_and_field(tmp_path, relative, name, line, field, message):
    good = {"gsm8k": GSM8K_RECORD, "gsm-hard": GSM_HARD_RECORD, "math500": MATH500_RECORD}[name]
    path = write_jsonl(tmp_path, relative, [json.dumps(good), json.dumps(good), line])
    with pytest.raises(DatasetError) as caught:
        load_dataset(name, data_dir=tmp_path)
    text = str(caught.value)
    assert text.startswith(f"{path}:3: "), text
    assert message in text
    if field is not None:
        assert f"field {field!r}" in text


def test_non_utf8_file(tmp_path):
    path = tmp_path / "gsm8k" / "test.jsonl"
    path.parent.mkdir()
    path.write_bytes(b'{"question": "\xff\xfe", "answer": "#### 1"}\n')
    with pytest.raises(DatasetError, match="not UTF-8"):
        load_dataset("gsm8k", data_dir=tmp_path)


def test_missing_file_names_the_expected_path(tmp_path):
    write_jsonl(tmp_path, "gsm8k/test.jsonl", [json.dumps(GSM8K_RECORD)])
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "gsm8k" / "train.jsonl"))):
        load_dataset("gsm8k", split="train", data_dir=tmp_path)
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "math500" / "test.jsonl"))):
        load_dataset("math500", data_dir=tmp_path)


def test_unknown_name_split_source_and_window(tmp_path):
    with pytest.raises(DatasetError) as caught:
        load_dataset("mmlu", data_dir=tmp_path)
    assert "unknown dataset 'mmlu'" in str(caught.value)
    for name in dataset_names():
        assert name in str(caught.value)
    assert dataset_names() == ("gsm8k", "gsm-hard", "math500")
    with pytest.raises(DatasetError, match="no split 'train'; available: test"):
        load_dataset("math500", split="train", data_dir=tmp_path)
    with pytest.raises(DatasetError, match="unknown source 'web'"):
        load_dataset("gsm8k", data_dir=tmp_path, source="web")
    with pytest.raises(DatasetError, match="offset must be"):
        load_dataset("gsm8k", data_dir=tmp_path, offset=-1)
    with pytest.raises(DatasetError, match="limit must be"):
        load_dataset("gsm8k", data_dir=tmp_path, limit=2.5)  # type: ignore[arg-type]


# ---- Data directory resolution ------------------------------------------------------------------


def test_data_dir_resolution_order(tmp_path, monkeypatch):
    explicit, from_env, default = tmp_path / "explicit", tmp_path / "env", tmp_path / "default"
    for folder in (explicit, from_env, default):
        folder.mkdir()
    monkeypatch.setattr(datasets, "_DEFAULT_DATA_DIR", default)
    monkeypatch.setenv(DATA_DIR_ENV, str(from_env))
    assert resolve_data_dir(explicit) == explicit
    assert resolve_data_dir() == from_env
    monkeypatch.delenv(DATA_DIR_ENV)
    assert resolve_data_dir() == default


def test_data_dir_errors_say_how_to_fix(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match="is not a directory"):
        resolve_data_dir(tmp_path / "nope")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(DatasetError, match=f"environment variable {DATA_DIR_ENV}="):
        resolve_data_dir()
    monkeypatch.delenv(DATA_DIR_ENV)
    monkeypatch.setattr(datasets, "_DEFAULT_DATA_DIR", tmp_path / "no-shared-data")
    with pytest.raises(DatasetError, match=f"pass data_dir=..., or set the environment variable {DATA_DIR_ENV}"):
        load_dataset("gsm8k")


# ---- Hub path (the `datasets` library is replaced by a fake: no hub here) ------------------------


def fake_hub(monkeypatch, rows_by_call):
    calls = []

    def hub_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return rows_by_call[path]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=hub_load_dataset))
    return calls


def test_hub_path_uses_the_shared_field_mapping(tmp_path, monkeypatch):
    write_jsonl(tmp_path, "gsm8k/test.jsonl", [json.dumps(GSM8K_RECORD)] * 3)
    write_jsonl(tmp_path, "gsm-hard/gsmhardv2.jsonl", [json.dumps(GSM_HARD_RECORD)] * 3)
    write_jsonl(tmp_path, "math500/test.jsonl", [json.dumps(MATH500_RECORD)] * 3)
    calls = fake_hub(
        monkeypatch,
        {
            "openai/gsm8k": [GSM8K_RECORD] * 3,
            "reasoning-machines/gsm-hard": [GSM_HARD_RECORD] * 3,
            "HuggingFaceH4/MATH-500": [MATH500_RECORD] * 3,
        },
    )
    for name in dataset_names():
        local = load_dataset(name, data_dir=tmp_path, offset=1)
        hub = load_dataset(name, source="hub", offset=1)
        assert hub == local and [p.meta for p in hub] == [p.meta for p in local]
    assert calls == [
        ("openai/gsm8k", "main", "test"),
        ("reasoning-machines/gsm-hard", None, "train"),
        ("HuggingFaceH4/MATH-500", None, "test"),
    ]


def test_hub_errors(monkeypatch):
    fake_hub(monkeypatch, {"openai/gsm8k": [GSM8K_RECORD, {"question": "q"}]})
    with pytest.raises(DatasetError, match=r"hub openai/gsm8k \(main\) split 'test' row 1: field 'answer'"):
        load_dataset("gsm8k", source="hub")
    with pytest.raises(DatasetError, match="could not load hub HuggingFaceH4/MATH-500"):
        load_dataset("math500", source="hub")  # the fake raises KeyError for it
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DatasetError, match="pip install datasets"):
        load_dataset("gsm8k", source="hub")
