"""The methods of a ``reason`` run: the ``Method`` plug-in point and the shipped methods.

A window of Q questions is processed in shared stages first (see
:mod:`align_jax.methods.reason`): candidates (a :mod:`generator
<align_jax.methods.generators>`), the principal's scores, and the ALIGN game on the
``CandidateSet [Q, N, K]``. The result is a :class:`Window`. Every method then turns
the window into one :class:`MethodOutput` per question: the results it reports
(``{result name: MethodRecord}``) and, optionally, a row section of its own
(``greedy``, ``debate``). Configs select methods by name (``methods: [...]``, in
table order); a new method is one object with this interface plus one
``REASON_METHODS.register`` line.

Costs: a method's cost is what it would spend on its own. Methods that use the
sampled candidates pay for all samples (``sampling``); those that use the principal's
scores pay for the principal too; greedy and debate pay for their own model calls
(debate's round 0 is each agent's first sample).

Keys: the window's key is ``fold_in(key(seed), w)``; shared stage s uses
``fold_in(window_key, s)`` (0 candidates, 1 game) and a method with model calls uses
``fold_in(window_key, method.key_stage)`` (2 greedy, 3 debate).

:func:`method_api_test` is the conformance test every registered method must pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Protocol, Sequence

import jax
import numpy as np

from align_jax.data.answers import extract_answer, is_correct
from align_jax.methods import baselines as baselines_lib
from align_jax.methods.candidates import AgentSpec, Cost, ModelPool, QuestionCandidates, sample_agents
from align_jax.methods.rows import CostRecord, DebateEntry, GreedyRecord, MethodRecord
from align_jax.registry import Registry

__all__ = [
    "Window",
    "MethodOutput",
    "Method",
    "REASON_METHODS",
    "DEFAULT_METHODS",
    "method_record",
    "method_api_test",
]


class Window(NamedTuple):
    """Everything the shared stages computed for a window of Q questions.

    Attributes:
      config: the run's ``ReasonConfig``.
      agents: the N :class:`AgentSpec`.
      pool: the :class:`ModelPool` (for methods that call models).
      problems: the Q dataset problems (``id``, ``question``, ``gold``).
      key: the window's PRNG key.
      questions: Q :class:`QuestionCandidates`.
      sample_costs: ``[Q][N]`` :class:`Cost` of the candidates.
      correct_maps: per question, canonical answer id -> correct.
      principal_costs: Q :class:`Cost` of the principal.
      candidates: the host ``CandidateSet`` (numpy leaves ``[Q, N, K]``).
      game: per question the ALIGN game's outcome (:func:`align.play_window` dicts).
      check_failures: per question, the candidates' correctness checks math-verify could not
        decide (counted as wrong).
    """

    config: Any
    agents: Sequence[AgentSpec]
    pool: Optional[ModelPool]
    problems: Sequence[Any]
    key: jax.Array
    questions: Sequence[QuestionCandidates]
    sample_costs: Sequence[Sequence[Cost]]
    correct_maps: Sequence[dict]
    principal_costs: Sequence[Cost]
    candidates: Any
    game: Sequence[dict]
    check_failures: Sequence[int] = ()

    @property
    def agent_names(self) -> list[str]:
        return [a.name for a in self.agents]

    def sampling_cost(self, q: int) -> Cost:
        """All agents' sampling cost of question ``q``."""
        return sum(self.sample_costs[q], Cost())

    def scored_cost(self, q: int) -> Cost:
        """Sampling plus the principal for question ``q``."""
        return self.sampling_cost(q) + self.principal_costs[q]


class MethodOutput(NamedTuple):
    """One question's output of a method.

    Attributes:
      results: ``{result name: MethodRecord}`` (e.g. ``sc/<agent>`` for every agent).
      section: the method's own row section (``None`` when it has none).
    """

    results: dict
    section: Any = None


class Method(Protocol):
    """A selection rule or pipeline over a window (see the module docstring).

    Attributes:
      name: the registry name.
      section: the row field that receives :attr:`MethodOutput.section`, or None.
      stage: the stage-timer label of a method that calls models (None: negligible host work).

    Optional hooks: ``prepare(config)``, called once when a run starts, before any model is
    loaded (to check the method's own inputs, e.g. ECON's trained checkpoint); and a
    ``config`` parameter of ``result_names`` for names that depend on the method's config
    section (:func:`declared_result_names`).
    """

    name: str
    section: Optional[str]
    stage: Optional[str]

    def enabled(self, config) -> bool:
        """Whether the config's other switches leave the method on (``greedy``, ``debate.rounds``)."""

    def result_names(self, agent_names: Sequence[str]) -> list[str]:
        """The result names this method reports, in table order."""

    def run(self, window: Window) -> list[MethodOutput]:
        """One output per question of the window."""


def method_record(answer: Optional[str], correct: float, cost: Cost, **extra) -> MethodRecord:
    """A :class:`MethodRecord` from a pick, its correctness and a :class:`Cost`."""
    return MethodRecord(answer, float(correct), CostRecord(int(cost.calls), int(cost.gen_tokens),
                                                           int(cost.prompt_tokens)), **extra)


@dataclasses.dataclass(frozen=True)
class _Simple:
    """A method reporting one result per question from a per-question function ``pick(window, q)``."""

    name: str
    pick: Callable[[Window, int], MethodRecord]
    section: Optional[str] = None
    stage: Optional[str] = None

    def enabled(self, config) -> bool:
        return True

    def result_names(self, agent_names: Sequence[str]) -> list[str]:
        return [self.name]

    def run(self, window: Window) -> list[MethodOutput]:
        return [MethodOutput({self.name: self.pick(window, q)}) for q in range(len(window.problems))]


def _align(window: Window, q: int) -> MethodRecord:
    game = window.game[q]
    return method_record(game["answer"], game["correct"], window.scored_cost(q),
                         agent=window.agent_names[game["chosen_agent"]])


def _best_of_n(window: Window, q: int) -> MethodRecord:
    host = window.candidates
    best = baselines_lib.best_of_n(host.principal_score[q], host.valid[q], host.answer_id[q], host.correct[q],
                                   window.questions[q].answers_by_id)
    return method_record(best.answer, best.correct, window.scored_cost(q))


def _engine_baseline(name: str, scored: bool):
    def pick(window: Window, q: int) -> MethodRecord:
        cost = window.scored_cost(q) if scored else window.sampling_cost(q)
        return method_record(None, window.game[q]["baselines"][name], cost)

    return pick


def _sc_pooled(window: Window, q: int) -> MethodRecord:
    question = window.questions[q]
    ids = [x for agent in question.agents for x in agent.answer_ids]
    answers = [x for agent in question.agents for x in agent.answers]
    vote = baselines_lib.majority_vote(ids, answers, window.correct_maps[q])
    return method_record(vote.answer, vote.correct, window.sampling_cost(q))


def _pass_at_k(window: Window, q: int) -> MethodRecord:
    ids = [agent.answer_ids for agent in window.questions[q].agents]
    return method_record(None, baselines_lib.pass_at_k(ids, window.correct_maps[q]), window.sampling_cost(q))


@dataclasses.dataclass(frozen=True)
class SelfConsistencyPerAgent:
    """``sc/<agent>``: each agent's own majority answer over its K samples."""

    name: str = "self_consistency"
    section: Optional[str] = None
    stage: Optional[str] = None

    def enabled(self, config) -> bool:
        return True

    def result_names(self, agent_names: Sequence[str]) -> list[str]:
        return [f"sc/{a}" for a in agent_names]

    def run(self, window: Window) -> list[MethodOutput]:
        outputs = []
        for q, question in enumerate(window.questions):
            results = {}
            for i, agent in enumerate(question.agents):
                vote = baselines_lib.majority_vote(agent.answer_ids, agent.answers, window.correct_maps[q])
                results[f"sc/{window.agent_names[i]}"] = method_record(vote.answer, vote.correct,
                                                                       window.sample_costs[q][i])
            outputs.append(MethodOutput(results))
        return outputs


@dataclasses.dataclass(frozen=True)
class GreedyCoT:
    """``greedy/<agent>``: one temperature-0 chain of thought per agent (row section ``greedy``)."""

    name: str = "greedy"
    section: Optional[str] = "greedy"
    stage: Optional[str] = "greedy"
    key_stage: int = 2

    def enabled(self, config) -> bool:
        return bool(config.greedy)

    def result_names(self, agent_names: Sequence[str]) -> list[str]:
        return [f"greedy/{a}" for a in agent_names]

    def run(self, window: Window) -> list[MethodOutput]:
        texts_q = [p.question for p in window.problems]
        texts, tokens, costs = sample_agents(window.pool, window.agents, texts_q,
                                             jax.random.fold_in(window.key, self.key_stage), num_samples=1,
                                             temperature_override=0.0)
        outputs = []
        for q, problem in enumerate(window.problems):
            results, section = {}, []
            for i, name in enumerate(window.agent_names):
                text = texts[q][i][0]
                answer = extract_answer(text)
                ok = is_correct(answer, problem.gold)
                results[f"greedy/{name}"] = method_record(answer, float(ok), costs[q][i])
                section.append(GreedyRecord(name, text, answer, ok, int(tokens[q][i][0])))
            outputs.append(MethodOutput(results, section))
        return outputs


@dataclasses.dataclass(frozen=True)
class Debate:
    """Multi-agent debate (Du et al.): round 0 is each agent's first sample, then ``debate.rounds``
    rounds in which each agent sees the others' latest solutions; the final majority vote
    (row section ``debate``)."""

    name: str = "debate"
    section: Optional[str] = "debate"
    stage: Optional[str] = "debate"
    key_stage: int = 3

    def enabled(self, config) -> bool:
        return config.debate.rounds > 0

    def result_names(self, agent_names: Sequence[str]) -> list[str]:
        return ["debate"]

    def run(self, window: Window) -> list[MethodOutput]:
        config = window.config
        n = len(window.agents)
        initial = [[question.agents[i].texts[0] for i in range(n)] for question in window.questions]
        debates = baselines_lib.debate(
            window.pool, window.agents, [p.question for p in window.problems], initial,
            jax.random.fold_in(window.key, self.key_stage), num_rounds=config.debate.rounds,
            max_chars=config.debate.max_chars, golds=[p.gold for p in window.problems])
        outputs = []
        for q, (question, result) in enumerate(zip(window.questions, debates)):
            first = sum((Cost(1, question.agents[i].tokens[0], window.sample_costs[q][i].prompt_tokens)
                         for i in range(n)), Cost())
            section = [[DebateEntry(window.agent_names[i], text, answer) for i, (text, answer) in enumerate(rnd)]
                       for rnd in result.rounds]
            outputs.append(MethodOutput({"debate": method_record(result.pick.answer, result.pick.correct,
                                                                 first + result.cost)}, section))
        return outputs


REASON_METHODS: Registry = Registry("method")
"""``name -> Method``; a config's ``methods:`` list selects and orders them."""

REASON_METHODS.register("align", _Simple("align", _align))
REASON_METHODS.register("best_of_n", _Simple("best_of_n", _best_of_n))
REASON_METHODS.register("uniform_principal", _Simple("uniform_principal", _engine_baseline("uniform_principal", True)))
REASON_METHODS.register("fair_single", _Simple("fair_single", _engine_baseline("fair_single", False)))
REASON_METHODS.register("sc_pooled", _Simple("sc_pooled", _sc_pooled))
REASON_METHODS.register("self_consistency", SelfConsistencyPerAgent())
REASON_METHODS.register("greedy", GreedyCoT())
REASON_METHODS.register("debate", Debate())
REASON_METHODS.register("random", _Simple("random", _engine_baseline("random", False)))
REASON_METHODS.register("pass@k", _Simple("pass@k", _pass_at_k))

from align_jax.methods.mcts.rstar import RStarDiscriminator, RStarMajority  # noqa: E402  (rStar rows, MCTS runs only)

REASON_METHODS.register("rstar", RStarMajority())
REASON_METHODS.register("rstar_discriminator", RStarDiscriminator())

from align_jax.methods.econ.reason_method import EconMethod  # noqa: E402  (ECON rows, runs with an `econ:` section)

REASON_METHODS.register("econ", EconMethod())

DEFAULT_METHODS = tuple(REASON_METHODS.names())
"""Every shipped method, in table order (the default of ``ReasonConfig.methods``)."""


def declared_result_names(method: Method, agent_names: Sequence[str], config) -> list[str]:
    """``method.result_names``; a method whose names depend on its own config section (ECON's
    policies) declares a ``config`` parameter and receives the run's config."""
    import inspect

    if "config" in inspect.signature(method.result_names).parameters:
        return method.result_names(agent_names, config=config)
    return method.result_names(agent_names)


def method_api_test(method: Method, window: Window) -> list[MethodOutput]:
    """Conformance test for a reason method (raises AssertionError on a violation).

    Checks: one output per question; exactly the declared result names; correctness in
    ``[0, 1]``; a pick's answer is one of the question's extracted answers or None;
    non-negative integer costs; a section iff the method declares one; the same window
    gives the same output.
    """
    outputs = method.run(window)
    assert len(outputs) == len(window.problems), f"{method.name}: {len(outputs)} outputs"
    names = set(declared_result_names(method, window.agent_names, window.config))
    for q, output in enumerate(outputs):
        assert set(output.results) == names, f"{method.name}: results {sorted(output.results)} != {sorted(names)}"
        for result_name, record in output.results.items():
            assert isinstance(record, MethodRecord), type(record)
            assert 0.0 <= record.correct <= 1.0 and np.isfinite(record.correct), (result_name, record.correct)
            assert all(isinstance(v, int) and v >= 0 for v in dataclasses.astuple(record.cost)), record.cost
            if record.answer is not None:
                known = {a for agent in window.questions[q].agents for a in agent.answers}
                if method.section is None:
                    assert record.answer in known, f"{result_name}: answer {record.answer!r} is no candidate's"
        assert (output.section is not None) == (method.section is not None), method.name
    again = method.run(window)
    assert [o.results for o in again] == [o.results for o in outputs], f"{method.name}: not deterministic"
    return outputs
