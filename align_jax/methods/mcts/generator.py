"""The ``mcts`` candidate generator: rStar-style search with an LLM, one sampler batch per wave.

One tree per (question, agent), B = Q N trees, ordered question-major (``b = q N + i``).
The pure-JAX core (:mod:`~align_jax.methods.mcts.tree`, :mod:`~align_jax.methods.mcts.wave`)
picks, in every unfinished tree, the node to expand and its child slots
(:func:`~align_jax.methods.mcts.wave.plan_wave`); this module turns the slots of all trees
into prompts, runs them as **one sampler call per wave and model**, reads each child's
text (terminal? answer?) and hands the result back
(:func:`~align_jax.methods.mcts.wave.apply_wave`), until every tree has done its R rollouts.

Prompts.  An agent's chat prompt is its usual one (:func:`~align_jax.methods.candidates.agent_conversation`,
zero- or few-shot CoT) rendered with the model's chat template; the node's *trajectory*
(the texts of the nodes on its path, one paragraph each) follows as the start of the
assistant's answer, and the action's cue after it:

  ====  =====================================================  ============================
  A1    trajectory (the model writes its next paragraph)        cut at the first blank line
  A2    trajectory (the model writes on to its final answer)    full completion
  A3    trajectory + ``Sub-question k:``                        cut at the first blank line
  A4    trajectory up to the parent A3's sub-question line +    cut at the first blank line
        ``Let's answer this sub-question again, carefully:``   (replaces the parent's answer)
  A5    a separate user turn: rephrase the question             cut at the first blank line;
        (root only)                                             enters trajectories as
                                                                ``Restating the problem: ...``
  ====  =====================================================  ============================

One-step children (A1, A3, A4, A5) keep at most ``step_tokens`` tokens; A2 children and
every child at ``max_depth`` (the plan's ``must_answer``) are full completions of at most
``answer_tokens`` tokens (default: the agent's ``max_new_tokens``, one sampled CoT's
budget).  A wave's call decodes the largest budget among its rows and every child is
cut to its own on the host; since the decode loop runs until its slowest row ends, a
one-step row in a wave that also holds full completions costs no extra decode steps.

Terminal children: the child's own text holds a final answer (``\\boxed{}``, ``####`` or
"the answer is"), or it is at ``max_depth``.  Its answer is
:func:`~align_jax.data.answers.extract_answer` of its whole trajectory; equal answers get
one id per question (:func:`~align_jax.data.answers.canonicalize` over the question's
answers so far: ids of earlier answers never move).  Reward: rStar's confidence (the
share of the tree's answered terminal nodes agreeing), computed in the jitted core.

Prefix reuse.  The ``c`` children of one (node, action) share one prompt row: the sampler
prefills it once and draws the ``c`` samples from the shared KV cache.  Per wave we count
prefill tokens three ways (:class:`SearchStats`): ``prefill_tokens`` (what ran: one
prefill per prompt row), ``prefill_tokens_no_reuse`` (one prefill per child, as a
per-sample implementation would do) and ``prefill_tokens_node_shared`` (the node's
prompts' common token prefix once plus each prompt's distinct suffix: what a prefix
cache over the node's prompts would run).

Batch shape.  A wave's prompt rows are padded (repeating the last row) to the next power
of two, so each model compiles one prefill and one decode per (row bucket, prompt
bucket, budget); ``batch fill`` = real rows / padded rows.

Candidates.  Each rollout ends at one terminal node, so an agent has exactly R
*samples*: the trajectory of every terminal node, repeated once per terminal visit
(rollouts that ended there).  They go through
:func:`~align_jax.methods.candidates.build_question_candidates` with the extractor fixed
to the tree's answers, so a slot's utility is its answer's share of the R terminal
visits (``utility: visits``, the default) -- the same path and meaning as sampled
self-consistency.  With ``utility: reward`` a slot's utility is instead its answer's
share of the backed-up reward mass.  Dead ends (nothing could be added) are samples
without an answer, as unextractable CoT samples are.

Keys.  Wave w, model group g uses ``fold_in(fold_in(key, w), g)``; rows are ordered
question-major and the sampler keys row r with ``fold_in(., r)``, so question q's search
does not depend on the questions after it in the window.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import numpy as np

from align_jax.data.answers import canonicalize, extract_answer
from align_jax.methods.candidates import (
    AgentSpec,
    Cost,
    ModelPool,
    QuestionCandidates,
    agent_conversation,
    build_question_candidates,
)
from align_jax.methods.mcts.config import MCTSSection
from align_jax.methods.mcts.tree import A1, A2, A3, A4, A5, NO_ANSWER, ROOT_INDEX, init_tree, terminal_answers
from align_jax.methods.mcts.wave import ExpansionResult, apply_wave, new_children, plan_wave

logger = logging.getLogger(__name__)

__all__ = [
    "MCTSGenerator",
    "SearchStats",
    "WaveStats",
    "SEARCH_LISTENERS",
    "REPHRASE_INSTRUCTION",
    "SUBQUESTION_CUE",
    "REANSWER_CUE",
    "RESTATE_PREFIX",
    "has_final_answer",
    "first_paragraph",
    "split_steps",
]

REPHRASE_INSTRUCTION = ("Rephrase the following math problem in your own words, listing every given number "
                        "and condition. Do not solve it.")
SUBQUESTION_CUE = "Sub-question {k}:"
REANSWER_CUE = "Let's answer this sub-question again, carefully:"
RESTATE_PREFIX = "Restating the problem: "

_FINAL_ANSWER_RE = re.compile(r"\\(?:boxed|fbox)\s*\{|^\s*####\s*\S|\b(?:the )?final answer\b|\bthe answer is\b",
                              re.IGNORECASE | re.MULTILINE)
_BLANK_LINE_RE = re.compile(r"\n[ \t]*\n")


def has_final_answer(text: str) -> bool:
    """Whether a step states a final answer (``\\boxed{}``, a ``####`` line, "the answer is", "final answer")."""
    return bool(_FINAL_ANSWER_RE.search(text))


def first_paragraph(text: str) -> str:
    """``text`` up to its first blank line after some content (leading blank lines dropped), right-stripped."""
    stripped = text.lstrip("\n")
    match = _BLANK_LINE_RE.search(stripped)
    return (stripped[:match.start()] if match else stripped).rstrip()


def split_steps(text: str) -> list[str]:
    """A trajectory's steps: its non-empty paragraphs (the unit of A1 and of the discriminator's mask)."""
    return [p.strip() for p in _BLANK_LINE_RE.split(text) if p.strip()]


class WaveStats(NamedTuple):
    """One wave of one generate call.

    Attributes:
      active_trees: trees that expanded a node.
      rows: prompt rows (one per (node, action kind)); padded_rows: rows after padding to
        the power-of-two bucket (summed over the wave's sampler calls).
      children: sequences generated (rows x children per action), padding excluded.
      calls: sampler calls (one per model).
      max_new_tokens: the decode budget of the wave's calls (the largest).
      llm_s / tree_s / host_s: wall time in sampler calls, in the jitted tree steps
        (plan + apply, to the host), in prompt building and answer reading.
      prefill_tokens / prefill_tokens_no_reuse / prefill_tokens_node_shared: see the
        module docstring (real rows only).
      gen_tokens: generated tokens kept.
      too_long: prompt rows not generated because prompt + ``answer_tokens`` exceeds the
        model's context (their children are not added; a node left with none is a dead end).
      prefill_s: the part of ``llm_s`` spent in the sampler's prefill (``Sampler.stage_seconds``);
        a node-level prefix cache could save at most ``prefill_s (1 - node_shared / prefill_tokens)``.
    """

    active_trees: int
    rows: int
    padded_rows: int
    children: int
    calls: int
    max_new_tokens: int
    llm_s: float
    tree_s: float
    host_s: float
    prefill_tokens: int
    prefill_tokens_no_reuse: int
    prefill_tokens_node_shared: int
    gen_tokens: int
    too_long: int = 0
    prefill_s: float = 0.0

    @property
    def batch_fill(self) -> float:
        """Real prompt rows / padded rows of the wave's sampler batches."""
        return self.rows / max(self.padded_rows, 1)


@dataclasses.dataclass
class SearchStats:
    """Cost and timing of one :meth:`MCTSGenerator.generate` call (a window).

    Attributes:
      num_questions, num_agents: Q, N (B = Q N trees).
      waves: per-wave :class:`WaveStats`.
      wall_s: the whole call.
      nodes: ``[B]`` node slots used per tree; dead_ends: ``[B]`` dead ends per tree.
      terminal_nodes: ``[B]`` terminal nodes per tree.
      questions: the Q question texts (to key a log of the stats).
    """

    num_questions: int
    num_agents: int
    questions: list = dataclasses.field(default_factory=list)
    waves: list = dataclasses.field(default_factory=list)
    wall_s: float = 0.0
    nodes: list = dataclasses.field(default_factory=list)
    dead_ends: list = dataclasses.field(default_factory=list)
    terminal_nodes: list = dataclasses.field(default_factory=list)

    def totals(self) -> dict:
        """Sums over waves, plus the mean batch fill and the wall-time shares."""
        keys = ("rows", "padded_rows", "children", "calls", "llm_s", "tree_s", "host_s", "prefill_tokens",
                "prefill_tokens_no_reuse", "prefill_tokens_node_shared", "gen_tokens", "too_long", "prefill_s")
        out = {k: sum(getattr(w, k) for w in self.waves) for k in keys}
        out["num_waves"] = len(self.waves)
        out["wall_s"] = self.wall_s
        out["batch_fill_mean"] = float(np.mean([w.batch_fill for w in self.waves])) if self.waves else 0.0
        out["batch_fill_rows"] = out["rows"] / max(out["padded_rows"], 1)
        out["llm_share"] = out["llm_s"] / self.wall_s if self.wall_s else 0.0
        out["tree_share"] = out["tree_s"] / self.wall_s if self.wall_s else 0.0
        out["host_share"] = out["host_s"] / self.wall_s if self.wall_s else 0.0
        return out

    def to_dict(self) -> dict:
        """JSON-ready: totals, per-wave records and per-tree node counts."""
        return {
            "num_questions": self.num_questions, "num_agents": self.num_agents, "questions": list(self.questions),
            "totals": self.totals(),
            "waves": [dict(w._asdict(), batch_fill=w.batch_fill) for w in self.waves],
            "nodes": list(self.nodes), "dead_ends": list(self.dead_ends), "terminal_nodes": list(self.terminal_nodes),
        }


SEARCH_LISTENERS: list[Callable[[SearchStats], None]] = []
"""Called with every :class:`SearchStats` an :class:`MCTSGenerator` produces (experiments
append a function here to log the search's cost next to the run's rows)."""


class _Node(NamedTuple):
    parent: int
    action: int
    text: str  # the node's paragraph as it enters trajectories
    tokens: int  # generated tokens kept


class _Row(NamedTuple):
    tree: int
    kind: int
    slots: tuple  # slot indices j of this kind that are valid
    prompt_ids: list
    cue: str  # text put before the generated text in the node
    complete: bool  # full completion (A2 / must_answer) vs one step
    budget: int  # tokens kept at most
    temperature: float
    top_p: float


def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class MCTSGenerator:
    """rStar-style MCTS candidates (see the module docstring).

    Args:
      section: the search parameters (:class:`~align_jax.methods.mcts.config.MCTSSection`).

    Attributes:
      name: ``"mcts"``.
      last_stats: the :class:`SearchStats` of the latest :meth:`generate` call.
      last_tree: the latest call's final trees (host numpy :class:`~align_jax.methods.mcts.tree.Tree`, B = Q N).
    """

    name = "mcts"

    def __init__(self, section: Optional[MCTSSection] = None):
        self.section = section if section is not None else MCTSSection()
        self.section.tree_spec()  # validated
        self.last_stats: Optional[SearchStats] = None
        self.last_tree = None

    def rollouts(self, agents: Sequence[AgentSpec]) -> int:
        """R: the section's ``rollouts``, or the agents' largest ``num_samples`` when unset.

        Raises:
          ValueError: naming ``candidates.mcts.rollouts`` when R exceeds every agent's K (an
            agent's R terminal-visit samples must fit the CandidateSet's K slots), or when
            there is no agent.
        """
        if not agents:
            raise ValueError("the MCTS generator needs at least one agent")
        largest = max(int(a.num_samples) for a in agents)
        rollouts = self.section.rollouts if self.section.rollouts is not None else largest
        if rollouts > largest:
            raise ValueError(f"candidates.mcts.rollouts: each agent's MCTS candidates are its R = {rollouts} "
                             f"rollouts, more than the largest num_samples K = {largest} (the CandidateSet's "
                             f"slots); raise the agents' num_samples or lower rollouts")
        return rollouts

    # ------------------------------------------------------------------ text

    def _trajectory(self, nodes: dict, node: int) -> list[str]:
        path = []
        while node != ROOT_INDEX:
            path.append(nodes[node])
            node = nodes[node].parent
        paragraphs: list[str] = []
        for entry in reversed(path):
            if entry.action == A4 and paragraphs:
                paragraphs[-1] = entry.text  # the re-answer replaces the parent sub-question's answer
            else:
                paragraphs.append(entry.text)
        return paragraphs

    @staticmethod
    def _join(paragraphs: Sequence[str]) -> str:
        return "".join(p + "\n\n" for p in paragraphs)

    def _subquestion_number(self, nodes: dict, node: int) -> int:
        count = 0
        while node != ROOT_INDEX:
            count += nodes[node].action == A3
            node = nodes[node].parent
        return count + 1

    def _prompt(self, pool: ModelPool, agent: AgentSpec, question: str, nodes: dict, leaf: int, kind: int,
                base: str) -> tuple[str, str]:
        """(prompt text, cue) of action ``kind`` at ``leaf``."""
        if kind == A5:
            return pool.render_chat(agent.model, [{"role": "user", "content": f"{REPHRASE_INSTRUCTION}\n\n{question}"}]), ""
        paragraphs = self._trajectory(nodes, leaf)
        if kind in (A1, A2):
            return base + self._join(paragraphs), ""
        if kind == A3:
            cue = SUBQUESTION_CUE.format(k=self._subquestion_number(nodes, leaf))
            return base + self._join(paragraphs) + cue, cue
        # A4: the leaf is an A3 node; keep its sub-question line, answer it again
        subquestion = nodes[leaf].text.split("\n", 1)[0]
        cue = f"{subquestion}\n{REANSWER_CUE}"
        return base + self._join(paragraphs[:-1]) + cue, cue

    # ------------------------------------------------------------------ search

    def generate(self, pool: ModelPool, agents: Sequence[AgentSpec], question_texts: Sequence[str], key):
        """Searches B = Q N trees and returns their candidates (``GeneratedCandidates``).

        Args:
          pool: the model pool; agents: N :class:`AgentSpec` (model, prompt style,
            temperature, top-p are used; the largest ``num_samples`` is R unless the section
            sets ``rollouts``; ``max_new_tokens`` is replaced by the section's
            ``step_tokens`` / ``answer_tokens``);
          question_texts: Q questions; key: consumed (see the module docstring).
        """
        from align_jax.methods.generators import GeneratedCandidates

        section = self.section
        spec = section.tree_spec(self.rollouts(agents))  # checked before any model is touched
        start = time.perf_counter()
        num_q, n = len(question_texts), len(agents)
        batch = num_q * n
        stats = SearchStats(num_q, n, list(question_texts))
        models = list(dict.fromkeys(a.model for a in agents))
        nodes: list[dict] = [{} for _ in range(batch)]
        costs = [[Cost() for _ in range(n)] for _ in range(num_q)]
        answers_seen: list[list[Optional[str]]] = [[] for _ in range(num_q)]
        bases = {}
        for q, question in enumerate(question_texts):
            for i, agent in enumerate(agents):
                bases[q, i] = pool.render_chat(agent.model, agent_conversation(question, agent))
        t0 = time.perf_counter()
        # Trees padded to a power of two (at least 16) so that windows of different sizes share
        # one compiled plan/apply; padding trees start with all rollouts done (never active).
        padded_batch = max(16, _bucket(batch))
        tree = init_tree(spec, padded_batch)
        tree = tree._replace(rollouts_done=tree.rollouts_done.at[batch:].set(spec.num_rollouts))
        tree_s = time.perf_counter() - t0
        context = {m: pool.sampler(m).config.max_position_embeddings for m in models}
        model_budget = {m: max(section.answer_budget(a.max_new_tokens) for a in agents if a.model == m) for m in models}
        wave = 0
        while True:
            t0 = time.perf_counter()
            plan = plan_wave(spec, tree, section.exploration)
            host_plan = jax.device_get(plan)
            tree_s += time.perf_counter() - t0
            if not host_plan.active.any():
                break
            t_host = time.perf_counter()
            wave_key = jax.random.fold_in(key, wave)
            slot_kinds = np.asarray(host_plan.child_action)
            terminal = np.zeros(slot_kinds.shape, bool)
            answer_id = np.full(slot_kinds.shape, NO_ANSWER, np.int32)
            valid = np.zeros(slot_kinds.shape, bool)
            child_text: dict[tuple[int, int], _Node] = {}
            rows_by_model: dict[str, list[_Row]] = {m: [] for m in models}
            node_shared = too_long = 0
            for b in np.flatnonzero(host_plan.active):
                q, i = divmod(int(b), n)
                agent = agents[i]
                leaf = int(host_plan.leaf[b])
                must_answer = bool(host_plan.must_answer[b])
                tokenizer = pool.tokenizer(agent.model)
                node_prompts = []
                for kind in ACTION_ORDER:
                    slots = tuple(int(j) for j in np.flatnonzero(host_plan.child_valid[b] & (slot_kinds[b] == kind)))
                    if not slots or (kind == A5 and must_answer):
                        continue  # A5 children at max depth would be terminal without an answer: not generated
                    text, cue = self._prompt(pool, agent, question_texts[q], nodes[b], leaf, kind, bases[q, i])
                    ids = list(tokenizer.encode(text, add_special_tokens=False))
                    if len(ids) + model_budget[agent.model] > context[agent.model]:
                        too_long += 1  # no room to generate: these children are not made
                        continue
                    node_prompts.append(ids)
                    complete = kind == A2 or must_answer
                    budget = (section.answer_budget(agent.max_new_tokens) if complete
                              else section.step_budget(agent.max_new_tokens))
                    rows_by_model[agent.model].append(_Row(int(b), kind, slots, ids, cue, complete, budget,
                                                           agent.temperature, agent.top_p))
                if node_prompts:
                    common = min(_lcp(node_prompts[0], p) for p in node_prompts)
                    node_shared += common + sum(len(p) - common for p in node_prompts)
            host_s = time.perf_counter() - t_host
            llm_s = prefill_s = 0.0
            num_rows = padded = children = calls = prefill = no_reuse = gen = 0
            budget = 0
            c = section.children_per_expansion
            for g, model in enumerate(models):
                rows = rows_by_model[model]
                if not rows:
                    continue
                max_new = max(r.budget for r in rows)
                budget = max(budget, max_new)
                stop = tuple(dict.fromkeys(s for a in agents if a.model == model for s in a.stop))
                size = _bucket(len(rows))
                padded_rows = rows + [rows[-1]] * (size - len(rows))
                t0 = time.perf_counter()
                sampler = pool.sampler(model)
                before = sampler.stage_seconds["prefill"]
                out = sampler.generate(
                    [r.prompt_ids for r in padded_rows], key=jax.random.fold_in(wave_key, g), num_samples=c,
                    max_new_tokens=max_new, temperature=np.asarray([r.temperature for r in padded_rows], np.float32),
                    top_p=np.asarray([r.top_p for r in padded_rows], np.float32), stop=stop)
                llm_s += time.perf_counter() - t0
                prefill_s += sampler.stage_seconds["prefill"] - before
                t_host = time.perf_counter()
                tokenizer = pool.tokenizer(model)
                for r, row in enumerate(rows):
                    b = row.tree
                    q, i = divmod(b, n)
                    leaf = int(host_plan.leaf[b])
                    num_rows += 1
                    prefill += len(row.prompt_ids)
                    no_reuse += len(row.prompt_ids) * len(row.slots)
                    tree_cost = Cost(calls=len(row.slots), prompt_tokens=len(row.prompt_ids))
                    for k, j in enumerate(row.slots):
                        length = int(out.lengths[r, k])
                        if length <= row.budget:
                            generated, kept_tokens = out.text[r][k], length
                        else:  # a longer budget ran for another row: cut to this row's
                            ids = np.asarray(out.tokens[r, k, :row.budget]).tolist()
                            generated, kept_tokens = tokenizer.decode(ids, skip_special_tokens=True), row.budget
                        if not row.complete:
                            generated = first_paragraph(generated)
                            kept_tokens = min(kept_tokens, len(tokenizer.encode(generated, add_special_tokens=False)))
                        if row.kind == A5:
                            text = RESTATE_PREFIX + first_paragraph(generated)
                        else:
                            text = (row.cue + generated).strip() if row.cue else generated.strip()
                        child_text[b, j] = _Node(leaf, row.kind, text, kept_tokens)
                        valid[b, j] = True
                        is_terminal = row.kind != A5 and (row.complete or has_final_answer(text))
                        terminal[b, j] = is_terminal
                        if is_terminal:
                            paragraphs = self._trajectory(nodes[b], leaf)
                            paragraphs = (paragraphs[:-1] if row.kind == A4 and paragraphs else paragraphs) + [text]
                            answer = extract_answer(self._join(paragraphs))
                            if answer is not None:
                                answers_seen[q].append(answer)
                                answer_id[b, j] = int(canonicalize(answers_seen[q])[-1])
                        tree_cost = tree_cost + Cost(gen_tokens=kept_tokens)
                        gen += kept_tokens
                    costs[q][i] = costs[q][i] + tree_cost
                    children += len(row.slots)
                padded += size
                calls += 1
                host_s += time.perf_counter() - t_host
            t0 = time.perf_counter()
            tree = apply_wave(spec, tree, plan, ExpansionResult(terminal=terminal, answer_id=answer_id, valid=valid),
                              section.exploration)
            added = np.asarray(jax.device_get(new_children(tree, plan)))
            tree_s += time.perf_counter() - t0
            for (b, j), node in child_text.items():
                if added[b, j] >= 0:
                    nodes[b][int(added[b, j])] = node
            stats.waves.append(WaveStats(int(host_plan.active.sum()), num_rows, padded, children, calls, budget,
                                         llm_s, tree_s, host_s, prefill, no_reuse, node_shared, gen, too_long,
                                         prefill_s))
            logger.info("wave %d: %d trees, %d prompt rows (%d padded), %d children, budget %d, llm %.1f s, "
                        "tree %.2f s", wave, stats.waves[-1].active_trees, num_rows, padded, children, budget, llm_s,
                        tree_s)
            tree_s = 0.0
            wave += 1
        t0 = time.perf_counter() - tree_s  # the last (empty) plan counts too
        host_tree = jax.device_get(tree)
        reward_view = jax.device_get(terminal_answers(tree, utility="reward")) if section.utility == "reward" else None
        final_tree_s = time.perf_counter() - t0
        questions = self._candidates(host_tree, reward_view, nodes, num_q, n, answers_seen)
        stats.wall_s = time.perf_counter() - start
        if stats.waves:  # the final read-back counts as tree bookkeeping of the last wave
            stats.waves[-1] = stats.waves[-1]._replace(tree_s=stats.waves[-1].tree_s + final_tree_s)
        host_tree = jax.tree.map(lambda x: x[:batch], host_tree)
        stats.nodes = [int(x) for x in host_tree.num_nodes]
        stats.dead_ends = [int(x) for x in host_tree.num_dead_ends]
        stats.terminal_nodes = [int(np.sum(host_tree.terminal[b, :host_tree.num_nodes[b]])) for b in range(batch)]
        self.last_stats = stats
        self.last_tree = host_tree
        for listener in list(SEARCH_LISTENERS):
            listener(stats)
        return GeneratedCandidates(questions, costs)

    def _candidates(self, tree, reward_view, nodes, num_q: int, n: int, answers_seen) -> list[QuestionCandidates]:
        questions = []
        for q in range(num_q):
            agent_texts, agent_tokens, lookup = [], [], {}
            reward_share: list[dict] = []
            for i in range(n):
                b = q * n + i
                texts, tokens, shares = [], [], {}
                for node in range(1, int(tree.num_nodes[b])):
                    visits = int(tree.terminal_visits[b, node])
                    if visits == 0:
                        continue
                    path_tokens, walk = 0, node
                    while walk != ROOT_INDEX:
                        path_tokens += nodes[b][walk].tokens
                        walk = nodes[b][walk].parent
                    text = self._join(self._trajectory(nodes[b], node)).rstrip()
                    answer = extract_answer(text) if tree.answer_id[b, node] != NO_ANSWER else None
                    lookup.setdefault(text, answer)
                    texts += [text] * visits
                    tokens += [path_tokens] * visits
                    if reward_view is not None and answer is not None:
                        shares[answer] = max(shares.get(answer, 0.0), float(reward_view.utility[b, node]))
                if int(tree.terminal_visits[b, ROOT_INDEX]):  # the root itself was a dead end
                    texts += [""] * int(tree.terminal_visits[b, ROOT_INDEX])
                    tokens += [0] * int(tree.terminal_visits[b, ROOT_INDEX])
                    lookup.setdefault("", None)
                agent_texts.append(texts)
                agent_tokens.append(tokens)
                reward_share.append(shares)
            question = build_question_candidates(agent_texts, agent_tokens, extract=lambda t: lookup.get(t))
            if reward_view is not None:
                agents = []
                for i, agent in enumerate(question.agents):
                    slots = tuple(dataclasses.replace(s, utility=reward_share[i].get(s.answer, 0.0))
                                  if s.answer is not None else s for s in agent.slots)
                    agents.append(dataclasses.replace(agent, slots=slots))
                question = dataclasses.replace(question, agents=tuple(agents))
            questions.append(question)
        return questions


ACTION_ORDER = (A1, A2, A3, A4, A5)
