"""The program-of-thought principal: scores, settings, the conformance test, and end-to-end runs
on the tiny random model (issue 18)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from align_jax.config import ConfigError, FieldError, config_from_dict
from align_jax.methods.candidates import Generation, build_question_candidates, slot_correctness
from align_jax.methods.principals import PRINCIPALS, PrincipalBatch, PrincipalSection, make_principal
from align_jax.methods.principals.base import PrincipalModelError
from align_jax.methods.principals.conformance import example_batch, principal_api_test
from align_jax.methods.principals.pot import (
    PotSettings,
    ProgramOfThought,
    extract_program,
    make_pot_principal,
    program_scores,
)
from align_jax.sandbox import SandboxLimits, SandboxResult

FAST = PotSettings(num_programs=3, max_new_tokens=16, limits=SandboxLimits(wall_s=3.0, cpu_s=1.0))


def _ok(value):
    return SandboxResult("ok", value)


def test_pot_is_registered_and_needs_a_model():
    assert "pot" in PRINCIPALS.names()
    with pytest.raises(PrincipalModelError, match="'pot' scores with an LLM"):
        make_principal(PrincipalSection(type="pot"))


def test_scores_are_the_share_of_successful_programs_agreeing_with_each_answer():
    question = build_question_candidates([["so \\boxed{3.50}", "\\boxed{4}", "no answer here"],
                                          ["#### 7/2", "#### 1,000"]])
    results = [_ok("3.5"), _ok("3.5"), _ok("1000"), SandboxResult("timeout", None, "killed"),
               SandboxResult("denied", None, "sandbox: os.fork denied"), _ok("12")]
    score = program_scores(question, results, 4)
    assert score.dtype == np.float32 and score.shape == (2, 4)
    # slots: agent 0 -> 3.5, 4; agent 1 -> 7/2 (the same answer as 3.50), 1000
    assert [[slot.answer for slot in agent.slots] for agent in question.agents] == [["3.5", "4"], ["7/2", "1000"]]
    expected = np.array([[2 / 4, 0, 0, 0], [2 / 4, 1 / 4, 0, 0]], np.float32)  # shares of the 4 successful programs
    np.testing.assert_allclose(score, expected)
    failed = program_scores(question, [SandboxResult("syntax", None, "bad")] * 3, 4)
    assert not failed.any()


@pytest.mark.parametrize(("text", "program"), [
    ("Here:\n```python\ndef solution():\n    return 2\n```\nDone.", "def solution():\n    return 2\n"),
    ("```\nanswer = 3\n```", "answer = 3\n"),
    ("```python\ndef solution():\n    return 4", "def solution():\n    return 4\n"),  # cut off
    ("answer = 5", "answer = 5\n"),
])
def test_extract_program(text, program):
    assert extract_program(text) == program


@pytest.mark.parametrize(("changes", "field"), [
    (dict(num_programs=0), "num_programs"), (dict(num_programs=2.5), "num_programs"),
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(max_new_tokens=4), "max_new_tokens"),
    (dict(workers=0), "workers"), (dict(limits="tight"), "limits"),
])
def test_bad_settings_name_the_field(changes, field):
    with pytest.raises(FieldError, match="must") as raised:
        PotSettings(**changes)
    assert raised.value.field == field


def test_settings_from_a_config_dict_name_the_nested_field():
    settings = config_from_dict(PotSettings, {"num_programs": 2, "limits": {"wall_s": 1.5}})
    assert settings.num_programs == 2 and settings.limits.wall_s == 1.5
    with pytest.raises(ConfigError, match="num_programs: must be an integer >= 1"):
        config_from_dict(PotSettings, {"num_programs": 0})
    with pytest.raises(ConfigError, match="limits.wall_s: must be > 0"):
        config_from_dict(PotSettings, {"limits": {"wall_s": 0}})
    with pytest.raises(ConfigError, match="limits.memory_mb: must be >= 64"):
        config_from_dict(PotSettings, {"limits": {"memory_mb": 1}})


class _ScriptedPool:
    """A model pool whose 'model' writes the given programs (the sandbox and scoring are real)."""

    def __init__(self, texts):
        self.texts = list(texts)
        self.calls = 0

    def generate_chat(self, name, conversations, *, key, num_samples, max_new_tokens, temperature, top_p, stop=()):
        self.calls += 1
        texts = [(self.texts * num_samples)[:num_samples] for _ in conversations]
        return Generation(texts, np.full((len(conversations), num_samples), 7), np.full(len(conversations), 11))


def test_end_to_end_with_scripted_programs_hostile_ones_included():
    texts = ["```python\ndef solution():\n    return 3 * 4 - 2\n```",
             "```python\nimport os\nwhile True:\n    os.fork()\n```",
             "```python\nwhile True:\n    pass\n```",
             "```python\nanswer = 9\n```"]
    pool = _ScriptedPool(texts)
    settings = PotSettings(num_programs=4, limits=SandboxLimits(wall_s=3, cpu_s=1))
    principal = make_pot_principal(pool, "scripted", settings)
    batch = example_batch().select([0])  # gold 10; slots 10, 9, 5, 12 and an agent without answers
    [scores] = principal.score(batch)
    statuses = [r.status for r in principal.last_programs[batch.question_ids[0]].results]
    assert statuses[0] == "ok" and statuses[1] == "denied" and statuses[2] in ("cpu_limit", "timeout")
    assert statuses[3] == "ok"
    question = batch.questions[0]
    for i, agent in enumerate(question.agents):
        for s, slot in enumerate(agent.slots):
            expected = {"10": 0.5, "9": 0.5}.get(slot.answer, 0.0)
            assert scores.score[i, s] == pytest.approx(expected), (slot.answer, scores.score)
    assert scores.cost.calls == 4 and scores.cost.gen_tokens == 28 and scores.cost.prompt_tokens == 11


def test_conformance_on_the_tiny_model(tiny_pool, tiny_checkpoint):
    principal = make_pot_principal(tiny_pool, tiny_checkpoint, FAST, seed=1)
    out = principal_api_test(principal)
    assert all(s.cost.calls == FAST.num_programs for s in out)
    programs = principal.last_programs
    assert {r.status for p in programs.values() for r in p.results} <= {
        "ok", "no_result", "syntax", "error", "denied", "timeout", "cpu_limit", "memory", "recursion", "file_size",
        "output_limit", "crashed", "killed"}


class _CountingPool:
    def __init__(self, pool):
        self.pool, self.calls = pool, 0

    def generate_chat(self, *args, **kwargs):
        self.calls += 1
        return self.pool.generate_chat(*args, **kwargs)


def test_batched_programs_equal_one_generation_per_question(tiny_pool, tiny_checkpoint):
    """settings.batched writes every question's programs in one call, each question with its own key:
    with a float32 model, the same programs as one call per question (a bfloat16 model rounds
    differently in another batch shape; see PotSettings.batched)."""
    import dataclasses

    batch = example_batch()
    assert len(batch.question_ids) > 1
    together, alone = _CountingPool(tiny_pool), _CountingPool(tiny_pool)
    a = make_pot_principal(together, tiny_checkpoint, FAST, seed=3)
    b = make_pot_principal(alone, tiny_checkpoint, dataclasses.replace(FAST, batched=False), seed=3)
    scores_a, scores_b = a.score(batch), b.score(batch)
    assert together.calls == 1 and alone.calls == len(batch.question_ids)
    for qid, sa, sb in zip(batch.question_ids, scores_a, scores_b):
        assert a.last_programs[qid].texts == b.last_programs[qid].texts
        assert [r.status for r in a.last_programs[qid].results] == [r.status for r in b.last_programs[qid].results]
        np.testing.assert_array_equal(sa.score, sb.score)
        assert sa.cost == sb.cost
    with pytest.raises(FieldError, match="true or false"):
        PotSettings(batched="yes")


def test_registered_factory_builds_the_default_principal(tiny_pool, tiny_checkpoint):
    principal = make_principal(PrincipalSection(type="pot"), pool=tiny_pool, default_model=tiny_checkpoint, seed=2)
    assert isinstance(principal, ProgramOfThought) and principal.model == tiny_checkpoint
    assert principal.settings == PotSettings() and principal.seed == 2 and principal.answer_level


def test_a_reason_config_sets_p_and_the_sandbox_limits(tiny_pool, tiny_checkpoint, tmp_path):
    """``principal.pot`` in a reason YAML reaches the principal; a bad limit names file, line and field."""
    from align_jax.methods.reason_config import load_reason_config

    text = f"""name: pot
agents:
  - model: {tiny_checkpoint}
principal:
  type: pot
  pot:
    num_programs: 6
    temperature: 0.5
    limits:
      wall_s: 3.0
      memory_mb: 256
"""
    path = tmp_path / "pot.yaml"
    path.write_text(text)
    config = load_reason_config(path)
    principal = make_principal(config.principal, pool=tiny_pool, default_model=tiny_checkpoint)
    assert principal.settings.num_programs == 6 and principal.settings.temperature == 0.5
    assert principal.settings.limits.wall_s == 3.0 and principal.settings.limits.memory_mb == 256
    assert principal.sandbox.limits == principal.settings.limits
    path.write_text(text.replace("memory_mb: 256", "memory_mb: 8"))
    with pytest.raises(ConfigError, match=r"pot\.yaml:11: principal\.pot\.limits\.memory_mb: must be >= 64"):
        load_reason_config(path)


@pytest.mark.slow  # about 25 s, nearly all of it compiling the tiny agents' sampler and the debate
def test_reason_run_with_the_pot_principal(tiny_checkpoint, tiny_data_dir, tiny_pool, tmp_path, monkeypatch):
    """A whole `align-jax reason` run on the tiny model with `principal: {type: pot}`."""
    from align_jax.methods import reason
    from align_jax.methods.principals import pot

    from tests.methods.conftest import tiny_config

    monkeypatch.setattr(pot, "PotSettings", lambda: FAST)  # the registry's defaults, made small for the test
    config = tiny_config(tiny_checkpoint, tiny_data_dir, tmp_path, principal=dict(type="pot"), limit=2, greedy=False)
    reason.run_reason(config, progress=False, pool=tiny_pool)
    directory = tmp_path / config.name / f"seed{config.seed}"
    assert (directory / "summary.json").is_file()
    rows = [json.loads(line) for line in (directory / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        for agent in row["agents"]:
            for slot in agent["slots"]:
                assert 0.0 <= slot["principal_score"] <= 1.0
