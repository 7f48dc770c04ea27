"""Candidate generators: questions + agents -> each question's :class:`QuestionCandidates`.

A generator is the first stage of a ``reason`` window (see
:mod:`align_jax.methods.reason`): for Q questions and N agents it returns, per
question, every agent's samples with their self-consistency slots, and the cost of
producing them. Configs select one by name (``candidates: {type: sampled}``); the
MCTS search plugs in here with one new module and one registration line.

Interface (:class:`CandidateGenerator`)::

    generate(pool, agents, question_texts, key) -> GeneratedCandidates
        questions: Q QuestionCandidates (N agents each, K_i samples of agent i)
        costs:     [Q][N] Cost of agent i's samples of question q

The key is consumed; the result for question q must depend only on the key, q's
position in the window and the question itself (not on how many questions share the
window), so that a run cut at a different ``limit`` computes the same rows.

:func:`generator_api_test` is the conformance test every registered generator must
pass.

Shipped: ``sampled`` -- chain-of-thought sampling (:func:`candidates.sample_agents`,
one prefill per prompt shared by its K samples) and self-consistency slots
(:func:`candidates.build_question_candidates`); ``mcts`` -- rStar-style tree search,
one tree per (question, agent), whose candidates are the terminal answers with
utility = share of terminal visits (:mod:`align_jax.methods.mcts.generator`; parameters
in ``candidates: {type: mcts, mcts: {...}}``).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Protocol, Sequence

from align_jax.methods.candidates import AgentSpec, Cost, ModelPool, QuestionCandidates
from align_jax.methods.mcts.config import MCTSSection
from align_jax.registry import Registry

__all__ = [
    "CandidateSection",
    "GeneratedCandidates",
    "CandidateGenerator",
    "CANDIDATE_GENERATORS",
    "SampledCoT",
    "make_generator",
    "generator_api_test",
]


class GeneratedCandidates(NamedTuple):
    """A window's candidates.

    Attributes:
      questions: Q :class:`QuestionCandidates`.
      costs: ``costs[q][i]`` the :class:`Cost` of agent i's samples of question q.
    """

    questions: list[QuestionCandidates]
    costs: list[list[Cost]]


class CandidateGenerator(Protocol):
    """Makes a window's candidates (see the module docstring)."""

    name: str

    def generate(self, pool: ModelPool, agents: Sequence[AgentSpec], question_texts: Sequence[str],
                 key) -> GeneratedCandidates:
        ...


@dataclasses.dataclass(frozen=True)
class CandidateSection:
    """The ``candidates:`` section of a reason config.

    Attributes:
      type: a registered generator name (``sampled``, ``mcts``).
      mcts: the search parameters of ``type: mcts``
        (:class:`~align_jax.methods.mcts.config.MCTSSection`; ignored otherwise).
    """

    type: str = "sampled"
    mcts: MCTSSection = dataclasses.field(default_factory=MCTSSection)

    def __post_init__(self):
        CANDIDATE_GENERATORS.get(self.type, "type")


CANDIDATE_GENERATORS: Registry = Registry("candidate generator")
"""``name -> factory(section: CandidateSection) -> CandidateGenerator``."""


@dataclasses.dataclass(frozen=True)
class SampledCoT:
    """Chain-of-thought sampling: each agent's ``num_samples`` completions at its temperature / top-p."""

    name: str = "sampled"

    def generate(self, pool: ModelPool, agents: Sequence[AgentSpec], question_texts: Sequence[str],
                 key) -> GeneratedCandidates:
        from align_jax.methods.candidates import build_question_candidates, sample_agents

        texts, tokens, costs = sample_agents(pool, agents, question_texts, key)
        questions = [build_question_candidates(texts[q], tokens[q]) for q in range(len(question_texts))]
        return GeneratedCandidates(questions, costs)


CANDIDATE_GENERATORS.register("sampled", lambda section: SampledCoT())


def _make_mcts(section: CandidateSection) -> CandidateGenerator:
    from align_jax.methods.mcts.generator import MCTSGenerator

    return MCTSGenerator(section.mcts)


CANDIDATE_GENERATORS.register("mcts", _make_mcts)


def make_generator(section: CandidateSection) -> CandidateGenerator:
    """The generator a config section names."""
    return CANDIDATE_GENERATORS.get(section.type, "type")(section)


def generator_api_test(generator: CandidateGenerator, pool: ModelPool, agents: Sequence[AgentSpec],
                       question_texts: Sequence[str], key) -> GeneratedCandidates:
    """Conformance test for a candidate generator (raises AssertionError on a violation).

    Checks: one entry per question and agent; each agent's samples, answers, ids and
    token counts align; every slot's utility is its share of the agent's samples and
    they sum to at most 1; equal canonical answers share an id across agents and
    different ones do not; costs are non-negative integers with at least one call per
    agent; the same key gives the same candidates; the first questions of a window
    are generated the same when the window is cut shorter (window-size independence).
    """
    import jax

    out = generator.generate(pool, agents, question_texts, key)
    assert isinstance(out, GeneratedCandidates), type(out)
    assert len(out.questions) == len(question_texts) == len(out.costs)
    for q, (question, costs) in enumerate(zip(out.questions, out.costs)):
        assert question.num_agents == len(agents) == len(costs), f"question {q}: wrong number of agents"
        for i, (agent, cost) in enumerate(zip(question.agents, costs)):
            k = agent.num_samples
            assert k >= 1 and len(agent.answers) == len(agent.answer_ids) == len(agent.tokens) == k
            assert all(isinstance(x, int) and x >= 0 for x in cost) and cost.calls >= 1, cost
            total = 0.0
            for slot in agent.slots:
                assert 0.0 <= slot.utility <= 1.0
                if slot.answer_id >= 0:
                    assert abs(slot.utility - agent.answer_ids.count(slot.answer_id) / k) < 1e-6
                    assert question.answers_by_id[slot.answer_id] is not None
                total += slot.utility
            assert total <= 1.0 + 1e-6, f"question {q} agent {i}: utilities sum to {total}"
        seen: dict[str, int] = {}
        for answer_id, answer in question.answers_by_id.items():
            assert seen.setdefault(answer, answer_id) == answer_id, f"answer {answer!r} has two ids"
    again = generator.generate(pool, agents, question_texts, key)
    assert [[a.texts for a in q.agents] for q in again.questions] == \
           [[a.texts for a in q.agents] for q in out.questions], "not reproducible from the key"
    if len(question_texts) > 1:
        cut = generator.generate(pool, agents, question_texts[:1], jax.random.clone(key))
        assert [a.answer_ids for a in cut.questions[0].agents] == [a.answer_ids for a in out.questions[0].agents], \
            "the first question's candidates depend on the window size"
    return out
