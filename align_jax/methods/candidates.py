"""Chain-of-thought candidate generation and the real-data :class:`CandidateSet`.

Pipeline for one window of Q questions and N agents (each agent: a model, a prompt
style, a temperature/top-p and K_i samples):

1. :func:`agent_conversation` builds each agent's chat prompt (``zero_shot_cot``: the
   question plus a step-by-step / ``\\boxed{}`` instruction; ``few_shot_cot``: n GSM8K
   train exemplars as earlier user/assistant turns, solutions ending in ``#### <answer>``).
2. :func:`sample_agents` draws the K_i samples of every (question, agent) pair through
   :class:`ModelPool`, one ``generate_chat`` call per group of agents that share a model,
   K and ``max_new_tokens``: the sampler prefills each prompt once and draws its K samples
   from the shared KV cache, and the call batches across the window's questions.
3. :func:`build_question_candidates` turns the texts into slots with
   self-consistency utilities (below); :func:`stack_candidate_sets` pads them into a
   ``CandidateSet`` with leaves ``[Q, N, K]`` (``K = max_i K_i``).

Self-consistency slots of agent i (K_i samples, extracted answers ``a_1..a_{K_i}``):
one slot per distinct canonical answer ``c`` with utility ``u_i(c) = #{k: a_k = c} / K_i``;
samples with no extractable answer count in the denominator but get no slot, so
``sum_c u_i(c) <= 1``. An agent with no extractable answer at all gets one "no answer"
slot with utility 0 and the answer id ``-2 - i`` (unique, negative, never correct).
Canonical ids come from one :func:`align_jax.data.answers.canonicalize` call over all
agents' answers of the question, so equal answers from different agents share an id.
Padding slots have id ``-1`` and ``valid = False``.

:class:`ModelPool` is the only place that touches the LLM stack (``load_pretrained``,
``Sampler``, ``score_continuations``): a change there is one edit here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from align_jax.data.answers import canonicalize, extract_answer, is_correct
from align_jax.game.types import CandidateSet, make_candidates

__all__ = [
    "PROMPT_STYLES",
    "ZERO_SHOT_INSTRUCTION",
    "NO_ANSWER_BASE",
    "PADDING_ID",
    "AgentSpec",
    "Cost",
    "Slot",
    "AgentCandidates",
    "QuestionCandidates",
    "Generation",
    "ModelPool",
    "agent_conversation",
    "build_question_candidates",
    "slot_correctness",
    "stack_candidate_sets",
    "sample_agents",
]

PROMPT_STYLES = ("zero_shot_cot", "few_shot_cot")
ZERO_SHOT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
NO_ANSWER_BASE = -2
"""Agent i's "no answer" slot has answer id ``NO_ANSWER_BASE - i``."""
PADDING_ID = -1
"""Answer id of padding slots (``valid = False``)."""


@dataclasses.dataclass(frozen=True)
class AgentSpec:
    """What generation needs to know about one agent (the config's agent entry).

    Attributes:
      name: label used in results (``greedy/<name>``, ``sc/<name>``).
      model: short model name or path given to ``load_pretrained``.
      prompt_style: ``"zero_shot_cot"`` or ``"few_shot_cot"``.
      temperature: sampling temperature (> 0 for K > 1 to be useful).
      top_p: nucleus mass in ``(0, 1]``.
      num_samples: K_i.
      max_new_tokens: generation budget per sample.
      exemplars: ``(question, solution)`` pairs for ``few_shot_cot`` (empty otherwise).
      stop: extra stop strings.
    """

    name: str
    model: str
    prompt_style: str = "zero_shot_cot"
    temperature: float = 0.7
    top_p: float = 0.95
    num_samples: int = 8
    max_new_tokens: int = 256
    exemplars: tuple[tuple[str, str], ...] = ()
    stop: tuple[str, ...] = ()


class Cost(NamedTuple):
    """Compute spent, in model calls and tokens.

    Attributes:
      calls: sequences generated (one per sample) plus sequences scored.
      gen_tokens: newly generated tokens kept.
      prompt_tokens: tokens run through a forward pass as context: each sampling
        prompt once (its K samples share one prefill), each scored sequence in full.
    """

    calls: int = 0
    gen_tokens: int = 0
    prompt_tokens: int = 0

    def __add__(self, other: "Cost") -> "Cost":  # type: ignore[override]
        return Cost(self.calls + other.calls, self.gen_tokens + other.gen_tokens,
                    self.prompt_tokens + other.prompt_tokens)

    @property
    def total_tokens(self) -> int:
        return self.gen_tokens + self.prompt_tokens


def agent_conversation(question: str, agent: AgentSpec) -> list[dict]:
    """The chat messages agent ``agent`` sees for ``question``.

    ``zero_shot_cot``: one user turn ``"<question>\\n<ZERO_SHOT_INSTRUCTION>"``.
    ``few_shot_cot``: for each exemplar a user turn (its question) and an assistant
    turn (its GSM8K solution, ending in ``#### <answer>``), then the question.
    """
    if agent.prompt_style == "zero_shot_cot":
        return [{"role": "user", "content": f"{question}\n{ZERO_SHOT_INSTRUCTION}"}]
    if agent.prompt_style == "few_shot_cot":
        messages = []
        for exemplar_question, solution in agent.exemplars:
            messages.append({"role": "user", "content": exemplar_question})
            messages.append({"role": "assistant", "content": solution})
        messages.append({"role": "user", "content": question})
        return messages
    raise ValueError(f"unknown prompt_style {agent.prompt_style!r}; expected one of {PROMPT_STYLES}")


# --------------------------------------------------------------------------------------
# Slots and self-consistency utilities (host side, no model)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Slot:
    """One distinct answer of one agent.

    Attributes:
      answer_id: canonical id (shared across agents), or ``NO_ANSWER_BASE - i``.
      answer: the extracted answer of the representative sample (None: no answer).
      count: samples of the agent carrying this answer (0 for the no-answer slot).
      utility: ``count / K_i``.
      representative: index of the first sample with this answer (its text is the
        slot's solution shown to a verifier).
    """

    answer_id: int
    answer: Optional[str]
    count: int
    utility: float
    representative: int


@dataclasses.dataclass(frozen=True)
class AgentCandidates:
    """One agent's K_i samples of one question and its slots.

    Attributes:
      texts: the K_i completions.
      answers: extracted answer per sample (None: nothing extractable).
      answer_ids: canonical id per sample (``-1`` for no answer).
      tokens: generated tokens per sample.
      slots: distinct answers in order of first appearance.
    """

    texts: tuple[str, ...]
    answers: tuple[Optional[str], ...]
    answer_ids: tuple[int, ...]
    tokens: tuple[int, ...]
    slots: tuple[Slot, ...]

    @property
    def num_samples(self) -> int:
        return len(self.texts)


@dataclasses.dataclass(frozen=True)
class QuestionCandidates:
    """All agents' candidates for one question.

    Attributes:
      agents: one :class:`AgentCandidates` per agent (N).
      answers_by_id: canonical id -> representative extracted answer.
    """

    agents: tuple[AgentCandidates, ...]
    answers_by_id: Mapping[int, str]

    @property
    def num_agents(self) -> int:
        return len(self.agents)


def build_question_candidates(
    agent_texts: Sequence[Sequence[str]],
    agent_tokens: Optional[Sequence[Sequence[int]]] = None,
    *,
    extract: Callable[[str], Optional[str]] = extract_answer,
) -> QuestionCandidates:
    """Self-consistency slots of N agents from their sample texts (see module docstring).

    Args:
      agent_texts: ``agent_texts[i]`` the K_i >= 1 completions of agent i.
      agent_tokens: generated token counts, same layout (default zeros).
      extract: answer extractor (``extract_answer``).

    Returns:
      :class:`QuestionCandidates`; per agent ``sum(slot.utility) <= 1``.

    Raises:
      ValueError: no agents, or an agent with no samples.
    """
    if len(agent_texts) == 0:
        raise ValueError("build_question_candidates needs at least one agent")
    answers: list[list[Optional[str]]] = []
    for i, texts in enumerate(agent_texts):
        if isinstance(texts, str) or len(texts) == 0:
            raise ValueError(f"agent {i}: expected a non-empty list of sample texts, got {texts!r:.60}")
        answers.append([extract(text) for text in texts])
    flat = [a for agent in answers for a in agent]
    flat_ids = canonicalize(flat)
    answers_by_id: dict[int, str] = {}
    for answer, answer_id in zip(flat, flat_ids):
        if answer_id >= 0 and int(answer_id) not in answers_by_id:
            answers_by_id[int(answer_id)] = answer
    agents = []
    offset = 0
    for i, texts in enumerate(agent_texts):
        k = len(texts)
        ids = [int(x) for x in flat_ids[offset:offset + k]]
        offset += k
        tokens = tuple(int(t) for t in agent_tokens[i]) if agent_tokens is not None else (0,) * k
        if len(tokens) != k:
            raise ValueError(f"agent {i}: {len(tokens)} token counts for {k} samples")
        counts: dict[int, int] = {}
        first: dict[int, int] = {}
        for index, answer_id in enumerate(ids):
            if answer_id < 0:
                continue
            counts[answer_id] = counts.get(answer_id, 0) + 1
            first.setdefault(answer_id, index)
        if counts:
            slots = tuple(
                Slot(answer_id, answers[i][first[answer_id]], count, count / k, first[answer_id])
                for answer_id, count in counts.items()
            )
        else:
            slots = (Slot(NO_ANSWER_BASE - i, None, 0, 0.0, 0),)
        agents.append(AgentCandidates(tuple(texts), tuple(answers[i]), tuple(ids), tokens, slots))
    return QuestionCandidates(tuple(agents), answers_by_id)


def slot_correctness(question: QuestionCandidates, gold: str) -> dict[int, bool]:
    """Whether each canonical answer id is correct (``is_correct`` on its representative).

    Negative ids (no answer, padding) are never correct.
    """
    return {answer_id: is_correct(answer, gold) for answer_id, answer in question.answers_by_id.items()}


def stack_candidate_sets(
    questions: Sequence[QuestionCandidates],
    principal_scores: Sequence[np.ndarray],
    correct_by_id: Sequence[Mapping[int, bool]],
    num_slots: Optional[int] = None,
) -> CandidateSet:
    """Pads Q questions' slots into one ``CandidateSet`` with leaves ``[Q, N, K]``.

    Args:
      questions: Q :class:`QuestionCandidates` with the same N.
      principal_scores: per question a float ``[N, K]`` array (entries beyond an
        agent's slots are ignored).
      correct_by_id: per question, canonical id -> correctness.
      num_slots: K; default the largest number of samples of any agent (an upper
        bound on the distinct answers, so K is the same for every window of a run).

    Returns:
      ``CandidateSet`` with ``principal_value = correct`` (the principal truly wants
      a correct answer) and ``agent_utility`` the self-consistency frequencies.
    """
    if not questions:
        raise ValueError("stack_candidate_sets needs at least one question")
    n = questions[0].num_agents
    k = num_slots or max(agent.num_samples for q in questions for agent in q.agents)
    shape = (len(questions), n, k)
    answer_id = np.full(shape, PADDING_ID, np.int32)
    valid = np.zeros(shape, bool)
    utility = np.zeros(shape, np.float32)
    score = np.zeros(shape, np.float32)
    correct = np.zeros(shape, bool)
    for q, (question, scores, correct_map) in enumerate(zip(questions, principal_scores, correct_by_id)):
        if question.num_agents != n:
            raise ValueError(f"question {q} has {question.num_agents} agents, expected {n}")
        scores = np.asarray(scores, np.float32)
        for i, agent in enumerate(question.agents):
            if len(agent.slots) > k:
                raise ValueError(f"question {q} agent {i} has {len(agent.slots)} slots > K={k}")
            for s, slot in enumerate(agent.slots):
                answer_id[q, i, s] = slot.answer_id
                valid[q, i, s] = True
                utility[q, i, s] = slot.utility
                score[q, i, s] = scores[i, s]
                correct[q, i, s] = bool(correct_map.get(slot.answer_id, False))
    return make_candidates(
        utility, score, valid=valid, answer_id=answer_id,
        principal_value=correct.astype(np.float32), correct=correct,
    )


# --------------------------------------------------------------------------------------
# The LLM adapter
# --------------------------------------------------------------------------------------


class Generation(NamedTuple):
    """Host-side result of one batched chat generation (B prompts, K samples).

    Attributes:
      texts: ``texts[b][k]``.
      tokens: int ``[B, K]`` generated tokens kept per sample.
      prompt_tokens: int ``[B]`` prompt lengths.
    """

    texts: list
    tokens: np.ndarray
    prompt_tokens: np.ndarray


class ModelPool:
    """Loads each distinct model once and serves generation and scoring.

    The thin adapter between the methods and :mod:`align_jax.llm`.

    Args:
      dtype: ``"float32"`` or ``"bfloat16"`` for ``load_pretrained``.
      param_dtype: weight dtype for ``load_pretrained`` (None = ``dtype``).
      preloaded: optional ``{name: LoadedModel}`` used instead of loading (tests).
      quantized: ``load_pretrained(quantized=...)``: keep GGUF block-quantized weights.
    """

    def __init__(self, dtype: str = "float32", preloaded: Optional[Mapping[str, object]] = None,
                 param_dtype: Optional[str] = None, quantized: bool = False):
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.quantized = quantized
        self._loaded: dict[str, object] = dict(preloaded or {})
        self._samplers: dict[str, object] = {}
        self._split: dict[str, tuple] = {}

    def loaded(self, name: str):
        """The ``LoadedModel`` for ``name`` (loaded on first use)."""
        if name not in self._loaded:
            from align_jax.llm.weights import load_pretrained

            self._loaded[name] = load_pretrained(name, dtype=self.dtype, param_dtype=self.param_dtype,
                                                 quantized=self.quantized)
        return self._loaded[name]

    def tokenizer(self, name: str):
        return self.loaded(name).tokenizer

    def sampler(self, name: str):
        if name not in self._samplers:
            from align_jax.llm.sampler import Sampler

            self._samplers[name] = Sampler(self.loaded(name))
        return self._samplers[name]

    def render_chat(self, name: str, messages: list[dict]) -> str:
        """The prompt text of ``messages`` under the model's chat template (generation prompt added)."""
        return self.tokenizer(name).apply_chat_template(list(messages), add_generation_prompt=True)

    def generate_chat(self, name: str, conversations: Sequence[list[dict]], *, key, num_samples: int,
                      max_new_tokens: int, temperature, top_p, stop: Sequence[str] = ()) -> Generation:
        """K samples for each of B conversations in one prefill + one decode.

        ``temperature`` / ``top_p``: scalars or ``[B]`` arrays (per prompt).
        """
        out = self.sampler(name).generate_chat(
            list(conversations), key=key, num_samples=int(num_samples), max_new_tokens=int(max_new_tokens),
            temperature=temperature, top_p=top_p, stop=tuple(stop),
        )
        return Generation(texts=out.text, tokens=np.asarray(out.lengths), prompt_tokens=np.asarray(out.prompt_tokens))

    def embed(self, name: str, texts: Sequence[str], *, batch_size: int = 8,
              max_tokens: int = 512) -> tuple[np.ndarray, Cost]:
        """Unit-norm sentence embeddings ``[M, D]`` of ``texts`` from the model's own mean-pooled
        final hidden states (:func:`~align_jax.llm.scoring.text_embeddings`) and the cost (one
        call and its tokens per text)."""
        from align_jax.llm.scoring import text_embeddings

        if name not in self._split:
            from flax import nnx

            self._split[name] = nnx.split(self.loaded(name).model)
        tokenizer = self.tokenizer(name)
        emb = text_embeddings(self._split[name], tokenizer, list(texts), batch_size=batch_size, max_tokens=max_tokens)
        tokens = sum(min(len(tokenizer.encode(t)), max_tokens) for t in texts)
        return emb, Cost(calls=len(texts), gen_tokens=0, prompt_tokens=int(tokens))

    def label_logprobs(self, name: str, prompts: Sequence[str], labels: Sequence[str], *,
                       batch_size: int = 8) -> tuple[np.ndarray, Cost]:
        """``log p(label | prompt)`` for every prompt and label, ``[P, M]``, and the cost.

        When every label is a single token, each prompt takes one forward pass (the
        sampler's prefill; the labels are read off the next-token distribution), in
        chunks of ``batch_size`` prompts sorted by length. Otherwise every
        (prompt, label) pair is scored with ``score_continuations`` (M passes per prompt).
        """
        import jax
        import jax.numpy as jnp

        tokenizer = self.tokenizer(name)
        label_ids = [tokenizer.encode(label) for label in labels]
        num_prompts = len(prompts)
        if not all(len(ids) == 1 for ids in label_ids):
            pair_prompts = [p for p in prompts for _ in labels]
            logprob, cost = self.score(name, pair_prompts, list(labels) * num_prompts, batch_size=batch_size)
            return logprob.reshape(num_prompts, len(labels)), cost
        sampler = self.sampler(name)
        encoded = sampler.encode_prompts(list(prompts))
        order = np.argsort([len(ids) for ids in encoded], kind="stable")
        columns = np.asarray([ids[0] for ids in label_ids], np.int32)
        out = np.zeros((num_prompts, len(labels)), np.float64)
        for start in range(0, num_prompts, batch_size):
            rows = list(order[start:start + batch_size])
            chunk = [encoded[r] for r in rows]
            chunk += [chunk[-1]] * (batch_size - len(chunk))  # static batch shape: one compile per bucket
            batch = sampler.prepare(chunk, num_samples=1, max_new_tokens=1, temperature=0.0)
            _, last_logits = sampler.prefill(batch)
            logprobs = np.asarray(jax.device_get(jax.nn.log_softmax(last_logits, axis=-1)[:, jnp.asarray(columns)]))
            out[rows] = logprobs[:len(rows)]
        cost = Cost(calls=num_prompts, gen_tokens=0, prompt_tokens=int(sum(len(ids) for ids in encoded)))
        return out, cost

    def score(self, name: str, prompts: Sequence[str], continuations: Sequence[str], *,
              batch_size: int = 8) -> tuple[np.ndarray, Cost]:
        """``log p(continuation | prompt)`` per pair ``[M]`` and the cost (one call per pair)."""
        from align_jax.llm.scoring import score_continuations

        if name not in self._split:
            from flax import nnx

            self._split[name] = nnx.split(self.loaded(name).model)
        out = score_continuations(self._split[name], self.tokenizer(name), list(prompts), list(continuations),
                                  batch_size=batch_size)
        cost = Cost(calls=len(continuations), gen_tokens=0,
                    prompt_tokens=int(np.sum(out.prompt_tokens) + np.sum(out.num_tokens)))
        return np.asarray(out.sum_logprob, np.float64), cost


def sample_agents(
    pool: ModelPool,
    agents: Sequence[AgentSpec],
    questions: Sequence[str],
    key,
    *,
    num_samples: Optional[int] = None,
    temperature_override: Optional[float] = None,
    conversations: Optional[Sequence[Sequence[list[dict]]]] = None,
) -> tuple[list[list[list[str]]], list[list[list[int]]], list[list[Cost]]]:
    """Samples every (question, agent) pair, batched per group of agents sharing a model.

    Agents with the same ``(model, K, max_new_tokens, stop, prompt_style)`` go into one
    ``generate_chat`` call whose B = (agents in group) x Q prompts carry per-prompt
    temperature and top-p; each prompt is prefilled once for its K samples. (Grouping
    by prompt style keeps zero-shot prompts from being padded to few-shot lengths, and
    B is the same for every full window, so each group compiles once per run.)

    Args:
      pool: the :class:`ModelPool`.
      agents: N :class:`AgentSpec`.
      questions: Q question texts.
      key: PRNG key for this call (folded with the group index).
      num_samples: override K for every agent (1 for greedy / debate turns).
      temperature_override: e.g. 0.0 for greedy decoding.
      conversations: ``conversations[q][i]`` messages to use instead of
        :func:`agent_conversation` (debate turns).

    Returns:
      ``(texts[q][i][k], tokens[q][i][k], cost[q][i])``.
    """
    import jax

    n, num_q = len(agents), len(questions)
    texts: list[list[list[str]]] = [[[] for _ in range(n)] for _ in range(num_q)]
    tokens: list[list[list[int]]] = [[[] for _ in range(n)] for _ in range(num_q)]
    costs: list[list[Cost]] = [[Cost() for _ in range(n)] for _ in range(num_q)]
    groups: dict[tuple, list[int]] = {}
    for i, agent in enumerate(agents):
        k = num_samples if num_samples is not None else agent.num_samples
        # Prompt styles differ a lot in length: separate calls avoid padding short prompts to long ones.
        style = agent.prompt_style if conversations is None else "given"
        groups.setdefault((agent.model, int(k), int(agent.max_new_tokens), tuple(agent.stop), style), []).append(i)
    for group_index, ((model, k, max_new, stop, _), members) in enumerate(groups.items()):
        convs, temps, top_ps, owners = [], [], [], []
        # question-major rows: row b = q * len(members) + m, so a row's sampling key
        # (``fold_in(key, b)`` in the sampler) does not depend on the window's length
        for q, question in enumerate(questions):
            for i in members:
                agent = agents[i]
                convs.append(conversations[q][i] if conversations is not None else agent_conversation(question, agent))
                temps.append(agent.temperature if temperature_override is None else temperature_override)
                top_ps.append(agent.top_p)
                owners.append((q, i))
        # Greedy rows (temperature 0) with the same conversation decode to the same text (e.g.
        # two agents that differ only in temperature, run at temperature 0): decode each once.
        # A row's cost is still what the agent would have paid alone.
        unique, source = _dedup_greedy_rows(convs, temps)
        out = pool.generate_chat(
            model, [convs[b] for b in unique], key=jax.random.fold_in(key, group_index), num_samples=k,
            max_new_tokens=max_new, temperature=np.asarray([temps[b] for b in unique], np.float32),
            top_p=np.asarray([top_ps[b] for b in unique], np.float32), stop=stop,
        )
        for b, (q, i) in enumerate(owners):
            u = source[b]
            texts[q][i] = list(out.texts[u])
            tokens[q][i] = [int(t) for t in out.tokens[u]]
            costs[q][i] = Cost(calls=k, gen_tokens=int(out.tokens[u].sum()), prompt_tokens=int(out.prompt_tokens[u]))
    return texts, tokens, costs


def _dedup_greedy_rows(conversations: Sequence[list[dict]], temperatures: Sequence[float]) -> tuple[list[int], list[int]]:
    """``(unique, source)``: the rows to decode, and for every row ``b`` the index into ``unique``
    of the row whose output it takes.  When every row is greedy (temperature 0), rows with equal
    conversations share one decode; a call with any sampled row is left alone, since a sampled
    row's key depends on its index in the call."""
    import json

    if any(float(t) != 0.0 for t in temperatures):
        return list(range(len(conversations))), list(range(len(conversations)))
    unique: list[int] = []
    source: list[int] = []
    seen: dict[str, int] = {}
    for b, conversation in enumerate(conversations):
        fingerprint = json.dumps(conversation, sort_keys=True)
        if fingerprint in seen:
            source.append(seen[fingerprint])
            continue
        seen[fingerprint] = len(unique)
        source.append(len(unique))
        unique.append(b)
    return unique, source
