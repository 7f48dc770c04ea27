"""The ``mcts`` candidate generator with an LLM (tiny random model): conformance, tree invariants,
costs and prefix-reuse accounting, the rStar rows, resume of a reason run, bad input before any
model loads; and one real-model search (slow)."""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from align_jax.config import ConfigError, FieldError
from align_jax.methods import reason
from align_jax.methods.candidates import AgentSpec
from align_jax.methods.generators import CANDIDATE_GENERATORS, CandidateSection, generator_api_test, make_generator
from align_jax.methods.mcts import (
    A1,
    A3,
    A4,
    NO_ANSWER,
    MCTSGenerator,
    MCTSSection,
    first_paragraph,
    has_final_answer,
    masked_prefix,
    split_steps,
)
from align_jax.methods.mcts.generator import _Node
from tests.methods.conftest import LIMIT, QUESTIONS, tiny_config
from tests.methods.test_mcts_tree import check_invariants

# One search setting for every tiny-model test, so the compiled programs are shared.
SEARCH = dict(max_depth=3, children_per_expansion=2, step_tokens=4)


def _agents(checkpoint):
    return [AgentSpec("zs", checkpoint, temperature=1.0, top_p=0.9, num_samples=4, max_new_tokens=8),
            AgentSpec("fs", checkpoint, prompt_style="few_shot_cot", temperature=0.8, top_p=0.9, num_samples=3,
                      max_new_tokens=8, exemplars=(("What is 1 + 1?", "1 + 1 = 2\n#### 2"),))]


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _strip_wall(row):
    return {k: v for k, v in row.items() if k not in ("wall_s", "window_wall_s", "stage_wall_s")}


# --------------------------------------------------------------------------- text helpers (no model)


def test_step_and_answer_helpers():
    assert has_final_answer("so the total is \\boxed{18}") and has_final_answer("#### 18")
    assert has_final_answer("The answer is 7.") and has_final_answer("Final answer: 3")
    assert not has_final_answer("First, 3 + 4 = 7.") and not has_final_answer("We need the answer to part 1")
    assert first_paragraph("\n\nStep one.\nmore\n\nStep two.") == "Step one.\nmore"
    assert first_paragraph("only one") == "only one"
    assert split_steps("a\n\n b \n \nc\n\n") == ["a", "b", "c"]
    assert masked_prefix("a\n\nb\n\nc\n\nd", 0.5) == "a\n\nb\n\n"
    assert masked_prefix("a\n\nb", 0.1) == "a\n\n"  # at least one step is left to complete
    assert masked_prefix("a", 0.5) == ""


def test_trajectory_a4_replaces_the_sub_answer_and_a3_numbers_sub_questions():
    nodes = {1: _Node(0, A1, "Step one.", 3), 2: _Node(1, A3, "Sub-question 1: what?\nAnswer 1: 5", 4),
             3: _Node(2, A4, "Sub-question 1: what?\nLet's answer again: 6", 4), 4: _Node(3, A1, "so 6.", 2)}
    gen = MCTSGenerator(MCTSSection(**SEARCH))
    assert gen._trajectory(nodes, 4) == ["Step one.", "Sub-question 1: what?\nLet's answer again: 6", "so 6."]
    assert gen._subquestion_number(nodes, 4) == 2


# --------------------------------------------------------------------------- bad input


BAD_YAML = """\
name: mcts-bad
data_dir: {data}
limit: 2
agents:
  - model: {model}
    num_samples: 4
principal:
  type: oracle
candidates:
  type: mcts
  mcts:
    {field}
"""


@pytest.mark.parametrize("field,pattern", [
    ("rollouts: 0", r"r\.yaml:12: candidates\.mcts\.rollouts: rollouts must be an integer >= 1"),
    ("max_depth: 0", r"r\.yaml:12: candidates\.mcts\.max_depth: max_depth must be an integer >= 1"),
    ("actions: [A1, A9]", r"r\.yaml:12: candidates\.mcts\.actions: .*A9"),
    ("discriminator: no-such-model", r"r\.yaml:12: candidates\.mcts\.discriminator: unknown model 'no-such-model'"),
    ("step_tokens: 0", r"r\.yaml:12: candidates\.mcts\.step_tokens"),
    ("utility: votes", r"r\.yaml:12: candidates\.mcts\.utility"),
])
def test_bad_search_settings_are_reported_at_config_load(tmp_path, tiny_checkpoint, tiny_data_dir, field, pattern):
    path = tmp_path / "r.yaml"
    path.write_text(BAD_YAML.format(data=tiny_data_dir, model=tiny_checkpoint, field=field))
    with pytest.raises(ConfigError, match=pattern):
        reason.load_reason_config(path)
    from align_jax.cli import main

    assert main(["reason", str(path), "--quiet"]) == 2  # nothing loaded, exit status 2


class _UntouchablePool:
    def __getattr__(self, name):
        raise AssertionError(f"the model pool was used ({name}) before the input was checked")


def test_too_many_rollouts_fail_before_any_model_is_used(tiny_checkpoint):
    with pytest.raises(FieldError, match="rollouts"):
        MCTSSection(rollouts=0)
    generator = MCTSGenerator(MCTSSection(rollouts=5, **SEARCH))
    with pytest.raises(ValueError, match=r"candidates\.mcts\.rollouts: .*R = 5.*K = 4"):
        generator.generate(_UntouchablePool(), _agents(tiny_checkpoint), ["q"], jax.random.key(0))


# --------------------------------------------------------------------------- with the tiny model


def test_generator_conformance_invariants_and_costs(tiny_pool, tiny_checkpoint):
    assert "mcts" in CANDIDATE_GENERATORS
    section = MCTSSection(**SEARCH)
    generator = make_generator(CandidateSection(type="mcts", mcts=section))
    agents = _agents(tiny_checkpoint)
    questions = [q for q, _ in QUESTIONS[:3]]
    out = generator_api_test(generator, tiny_pool, agents, questions, jax.random.key(2))
    # generator_api_test ran the window-of-one last: search the whole window again
    out = generator.generate(tiny_pool, agents, questions, jax.random.key(2))
    rollouts = 4  # the agents' largest K
    spec = section.tree_spec(rollouts)
    tree, stats = generator.last_tree, generator.last_stats
    assert tree.num_nodes.shape == (len(questions) * len(agents),)
    check_invariants(spec, tree)  # visits = children + terminal visits, values in [0, 1], depth <= D, ...
    totals = stats.totals()
    for q, (question, costs) in enumerate(zip(out.questions, out.costs)):
        for i, (agent, cost) in enumerate(zip(question.agents, costs)):
            b = q * len(agents) + i
            # the R samples are the terminal visits; a slot's utility is its answer's share of them
            assert agent.num_samples == rollouts == int(tree.terminal_visits[b].sum())
            answered_visits = sum(int(tree.terminal_visits[b, node]) for node in np.flatnonzero(tree.terminal_visits[b])
                                  if tree.answer_id[b, node] != NO_ANSWER)
            assert answered_visits == sum(a is not None for a in agent.answers)
            for slot in agent.slots:
                if slot.answer is not None:
                    assert slot.count == agent.answer_ids.count(slot.answer_id)
                    assert slot.utility == pytest.approx(slot.count / rollouts)
            # one model call per generated child; every generated child became a node
            assert cost.calls == int(tree.num_nodes[b]) - 1
            assert cost.gen_tokens >= 0 and cost.prompt_tokens > 0
            assert all(t >= 0 for t in agent.tokens)
    assert totals["children"] == sum(c.calls for costs in out.costs for c in costs)
    assert totals["gen_tokens"] == sum(c.gen_tokens for costs in out.costs for c in costs)
    assert totals["prefill_tokens"] == sum(c.prompt_tokens for costs in out.costs for c in costs)
    # prefix reuse: two children per prompt row share its prefill; a node's prompts share their prefix
    assert totals["prefill_tokens_no_reuse"] == 2 * totals["prefill_tokens"]
    assert totals["prefill_tokens_node_shared"] < totals["prefill_tokens"]
    assert all(0 < w.batch_fill <= 1 and w.calls == 1 for w in stats.waves)  # one sampler call per wave
    assert totals["num_waves"] <= rollouts * spec.max_depth
    assert totals["llm_s"] + totals["tree_s"] + totals["host_s"] <= stats.wall_s + 1e-6
    # the prefill share of the LLM time is measured (what a node-level prefix cache could save)
    assert all(0 < w.prefill_s <= w.llm_s for w in stats.waves)


def test_reward_utility_is_the_share_of_backed_up_reward(tiny_pool, tiny_checkpoint):
    generator = MCTSGenerator(MCTSSection(utility="reward", **SEARCH))
    out = generator.generate(tiny_pool, _agents(tiny_checkpoint), [QUESTIONS[0][0]], jax.random.key(5))
    tree = generator.last_tree
    for i, agent in enumerate(out.questions[0].agents):
        mass = {}
        for node in np.flatnonzero(tree.terminal_visits[i]):
            if tree.answer_id[i, node] != NO_ANSWER:
                mass[int(tree.answer_id[i, node])] = mass.get(int(tree.answer_id[i, node]), 0.0) + float(
                    tree.node_value_sum[i, node])
        total = sum(mass.values())
        utilities = sorted(s.utility for s in agent.slots if s.answer is not None)
        expected = sorted(m / total for m in mass.values()) if total > 0 else [0.0] * len(mass)
        assert utilities == pytest.approx(expected, abs=1e-6)
        assert sum(utilities) <= 1 + 1e-6


def _mcts_config(checkpoint, data_dir, output_dir, **changes):
    return tiny_config(checkpoint, data_dir, output_dir, greedy=False, debate=dict(rounds=0),
                       candidates=dict(type="mcts", mcts=dict(discriminator=checkpoint, **SEARCH)), **changes)


def test_reason_run_with_mcts_candidates_resumes_without_losing_or_repeating(tiny_checkpoint, tiny_data_dir,
                                                                               tiny_pool, tmp_path):
    config = _mcts_config(tiny_checkpoint, tiny_data_dir, tmp_path / "full")
    full = reason.run_reason(config, progress=False, pool=tiny_pool, figures=False)
    expected = [_strip_wall(r) for r in _lines(full.directory / "results.jsonl")]
    assert [r["question_id"] for r in expected] == [f"gsm8k/test/{i}" for i in range(LIMIT)]
    names = reason.method_names(config)
    assert "rstar/zs" in names and "rstar_disc/fs" in names and "greedy/zs" not in names
    for row in expected:
        assert [len(a["samples"]) for a in row["agents"]] == [4, 4]  # R = 4 terminal visits per agent
        methods = row["methods"]
        assert sorted(methods) == sorted(names)
        for agent in ("zs", "fs"):
            # rStar without discriminator = majority over the rollouts = self-consistency over MCTS samples
            assert methods[f"rstar/{agent}"] == methods[f"sc/{agent}"]
            assert methods[f"rstar_disc/{agent}"]["cost"]["calls"] >= methods[f"rstar/{agent}"]["cost"]["calls"]
        for name in ("align", "sc_pooled", "rstar/zs", "rstar_disc/fs"):
            assert methods[name]["correct"] <= methods["pass@k"]["correct"] + 1e-6

    crashed = _mcts_config(tiny_checkpoint, tiny_data_dir, tmp_path / "crash")
    written = []

    class Crash(RuntimeError):
        pass

    def crash_after_three(row):
        written.append(row["question_id"])
        if len(written) == 3:
            raise Crash

    with pytest.raises(Crash):
        reason.run_reason(crashed, progress=False, pool=tiny_pool, figures=False, on_question=crash_after_three)
    results = reason.run_dir(crashed) / "results.jsonl"
    lines = results.read_text().splitlines(keepends=True)
    results.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])  # a cut last line
    reason.run_reason(crashed, progress=False, pool=tiny_pool, figures=False,
                      on_question=lambda row: written.append(row["question_id"]))
    assert written[3:] == [f"gsm8k/test/{LIMIT - 1}"]  # nothing lost, nothing repeated
    assert [_strip_wall(r) for r in _lines(results)] == expected
    # the sampled-candidate settings hash differs: the same name with other candidates is refused
    with pytest.raises(ConfigError, match="different settings"):
        reason.run_reason(dataclasses.replace(crashed, candidates=CandidateSection()), progress=False,
                          pool=tiny_pool, figures=False)


# --------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_real_model_search_finds_answers():
    from align_jax.methods.candidates import ModelPool

    pool = ModelPool(param_dtype="bfloat16", quantized=True)
    agents = [AgentSpec("zs", "qwen2.5-coder-0.5b", temperature=0.7, num_samples=2, max_new_tokens=160)]
    question = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                "How many clips did Natalia sell altogether in April and May?")
    generator = MCTSGenerator(MCTSSection(max_depth=2, children_per_expansion=1, actions=("A1", "A2"),
                                          step_tokens=48))
    out = generator.generate(pool, agents, [question], jax.random.key(0))
    agent = out.questions[0].agents[0]
    assert agent.num_samples == 2
    assert any(a is not None for a in agent.answers)
    check_invariants(MCTSSection(max_depth=2, children_per_expansion=1, actions=("A1", "A2")).tree_spec(2),
                     generator.last_tree)
