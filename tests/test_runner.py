"""The shared runner, the crash-safe JSONL files and the plug-in registries."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import textwrap
from typing import Optional

import pytest

from align_jax import runner
from align_jax.config import ConfigError, FieldError, load_config
from align_jax.registry import Registry, UnknownNameError
from align_jax.runio import CorruptResultsError, append_jsonl, read_jsonl


# --------------------------------------------------------------------------------------
# settings hash
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Section:
    width: int = 3


@dataclasses.dataclass(frozen=True)
class ConfigV1:
    name: str
    rate: float = 0.1
    section: Section = dataclasses.field(default_factory=Section)
    items: list[Section] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class SectionV2:
    width: int = 3
    depth: int = 5  # a field added later, with a default


@dataclasses.dataclass(frozen=True)
class ConfigV2:
    name: str
    rate: float = 0.1
    section: SectionV2 = dataclasses.field(default_factory=SectionV2)
    items: list[SectionV2] = dataclasses.field(default_factory=list)
    new_switch: bool = False  # a field added later, with a default
    new_list: list[str] = dataclasses.field(default_factory=lambda: ["a", "b"])


def test_settings_hash_is_stable_when_a_config_gains_defaulted_fields():
    old = ConfigV1("run", rate=0.2, section=Section(4), items=[Section(1), Section()])
    new = ConfigV2("run", rate=0.2, section=SectionV2(4), items=[SectionV2(1), SectionV2()])
    assert runner.settings_hash(old) == runner.settings_hash(new)
    assert runner.settings_hash(old, exclude=("name",)) == runner.settings_hash(ConfigV1("other", 0.2, Section(4),
                                                                                         [Section(1), Section()]),
                                                                                exclude=("name",))


@pytest.mark.parametrize("change", [dict(rate=0.3), dict(new_switch=True), dict(new_list=["a"]),
                                    dict(section=SectionV2(depth=6)), dict(items=[SectionV2(1)])])
def test_settings_hash_changes_with_any_setting(change):
    base = ConfigV2("run", rate=0.2, items=[SectionV2(1), SectionV2()])
    assert runner.settings_hash(dataclasses.replace(base, **change)) != runner.settings_hash(base)


# --------------------------------------------------------------------------------------
# JSONL
# --------------------------------------------------------------------------------------


def test_read_jsonl_skips_only_a_crash_cut_last_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b": [1, 2')
    assert [row for _, row in read_jsonl(path)] == [{"a": 1}, {"a": 2}]


def test_read_jsonl_raises_on_a_corrupt_line_in_the_middle(tmp_path):
    # the old reader dropped the line silently: a finished unit was lost and redone
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n{"a": 2, oops\n{"a": 3}\n')
    with pytest.raises(CorruptResultsError, match=r"r\.jsonl:2: corrupt results line"):
        read_jsonl(path)


def test_read_jsonl_raises_on_a_corrupt_last_line_that_was_completed(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\nnot json\n')
    with pytest.raises(CorruptResultsError, match=r":2:"):
        read_jsonl(path)


def test_append_after_a_crash_cuts_the_partial_line_and_keeps_the_file_clean(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n{"a": 2, "b": [1')  # the process died mid-write
    append_jsonl(path, [{"a": 2, "b": [1, 2]}, {"a": 3}])
    assert path.read_text() == '{"a": 1}\n{"a": 2, "b": [1, 2]}\n{"a": 3}\n'
    assert [row["a"] for _, row in read_jsonl(path)] == [1, 2, 3]


def test_append_reads_only_the_tail_of_the_file(tmp_path, monkeypatch):
    path = tmp_path / "r.jsonl"
    append_jsonl(path, [{"a": i} for i in range(1000)])

    def forbidden(*args, **kwargs):
        raise AssertionError("append_jsonl read the whole file")

    monkeypatch.setattr(pathlib.Path, "read_bytes", forbidden)
    monkeypatch.setattr(pathlib.Path, "read_text", forbidden)
    append_jsonl(path, [{"a": 1000}])
    monkeypatch.undo()
    assert len(read_jsonl(path)) == 1001


# --------------------------------------------------------------------------------------
# RunFiles / run_units
# --------------------------------------------------------------------------------------


def _units(n):
    return [runner.Unit((f"k{2 * i}", f"k{2 * i + 1}"), f"unit {i}", i) for i in range(n)]


def _compute(calls, crash_at: Optional[int] = None):
    def compute(unit):
        if unit.payload == crash_at:
            raise KeyboardInterrupt("killed")
        calls.append(unit.payload)
        return [{"key": k, "value": unit.payload * 10 + j} for j, k in enumerate(unit.keys)]

    return compute


def test_run_units_resumes_after_a_crash_without_losing_or_repeating_work(tmp_path):
    calls = []
    files = runner.RunFiles(tmp_path / "run", key_field="key", settings="s1")
    with pytest.raises(KeyboardInterrupt):
        runner.run_units(files, _units(4), _compute(calls, crash_at=2), description="t", progress=False)
    assert calls == [0, 1]
    # a fresh process: re-read the directory
    files = runner.RunFiles(tmp_path / "run", key_field="key", settings="s1")
    written = runner.run_units(files, _units(4), _compute(calls), description="t", progress=False)
    assert calls == [0, 1, 2, 3]  # units 0 and 1 were not recomputed
    assert [r["key"] for r in written] == ["k4", "k5", "k6", "k7"]
    lines = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [r["key"] for r in lines] == [f"k{i}" for i in range(8)]  # each row exactly once
    assert all(r["settings_hash"] == "s1" for r in lines)
    uninterrupted = runner.RunFiles(tmp_path / "other", key_field="key", settings="s1")
    runner.run_units(uninterrupted, _units(4), _compute([]), description="t", progress=False)
    assert (tmp_path / "other" / "results.jsonl").read_text() == (tmp_path / "run" / "results.jsonl").read_text()


def test_run_units_writes_only_missing_rows_of_a_partly_done_unit(tmp_path):
    files = runner.RunFiles(tmp_path, key_field="key", settings="s")
    files.record([{"key": "k1", "value": -1}])
    runner.run_units(files, _units(1), _compute([]), description="t", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["key"], r["value"]) for r in rows] == [("k1", -1), ("k0", 0)]


def test_rows_of_other_settings_are_refused_with_file_and_line(tmp_path):
    files = runner.RunFiles(tmp_path, key_field="key", settings="s1")
    files.record([{"key": "a"}, {"key": "b"}])
    with pytest.raises(ConfigError, match=r"results\.jsonl:1: key 'a' was computed with different settings"):
        runner.RunFiles(tmp_path, key_field="key", settings="s2")


def test_a_row_without_its_key_is_refused(tmp_path):
    (tmp_path / "results.jsonl").write_text('{"settings_hash": "s"}\n')
    with pytest.raises(ConfigError, match=r"results\.jsonl:1: not a results row \(no 'key'\)"):
        runner.RunFiles(tmp_path, key_field="key", settings="s")


def test_a_unit_returning_the_wrong_rows_is_a_bug_not_silent(tmp_path):
    files = runner.RunFiles(tmp_path, key_field="key", settings="s")
    with pytest.raises(RuntimeError, match="expected"):
        runner.run_units(files, _units(1), lambda unit: [{"key": "k0"}], description="t", progress=False)


# --------------------------------------------------------------------------------------
# registries
# --------------------------------------------------------------------------------------


def test_registry_lookup_register_and_errors():
    registry = Registry("widget")
    registry.register("a", 1)

    @registry.register("b")
    def b():
        """A widget."""

    assert registry.names() == ("a", "b") and registry.get("b") is b and "a" in registry
    with pytest.raises(UnknownNameError, match=r"unknown widget 'c'; known: a, b") as info:
        registry.get("c", field="widgets.2")
    assert isinstance(info.value, FieldError) and info.value.field == "widgets.2"
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("a", 2)


_REGISTRY = Registry("gadget")
_REGISTRY.register("known", object())


@dataclasses.dataclass(frozen=True)
class GadgetSection:
    type: str = "known"

    def __post_init__(self):
        _REGISTRY.get(self.type, "type")


@dataclasses.dataclass(frozen=True)
class GadgetConfig:
    name: str
    gadget: GadgetSection = dataclasses.field(default_factory=GadgetSection)


def test_an_unknown_plugin_name_in_a_config_names_file_line_and_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent("""\
        name: x
        gadget:
          type: unknown
    """))
    with pytest.raises(ConfigError, match=r"c\.yaml:3: gadget\.type: unknown gadget 'unknown'; known: known"):
        load_config(path, GadgetConfig)
