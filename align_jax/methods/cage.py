r"""CAGE decoding: multi-objective test-time alignment with trade-off weights.

At every decoding step the base model's next-token distribution is restricted
to its top-``M`` tokens; each objective (a *principal*) values those candidates,
``Q [R, J, M]``; the common-agency equilibrium of
:mod:`align_jax.game.common_agency` (``solve_equilibrium``, vmapped over the R
rows) turns ``(log pi0, Q, w, tau)`` into the agent's policy ``pi*``, and the
next token is drawn from ``pi*`` (tokens outside the top-M get ``-inf``).  The
equilibrium policy maximises ``<pi, Q^T w> - tau KL(pi||pi0) - J tau KL(pi0||pi)``
(see that module's docstring).

Shapes: B prompts, K samples per prompt, R = B K rows, V base vocabulary,
Vg guide vocabulary, M candidate tokens, J objectives, T new tokens, L guide
tokens per base token.

Objectives (principals) share one small interface, :class:`Objective`:

* ``init_state(ctx)``: host side, before decoding; returns a pytree of arrays
  (per-row leaves have a leading ``[R]``) threaded through the sampler's loop;
* ``values(state, candidate_ids [R, M], step) -> Q [R, M]`` (pure JAX, traced);
* ``update(state, tokens [R], step) -> state`` after each step (pure JAX);
* ``sequence_scores(completions) -> [N]``: the sequence-level score of finished
  outputs (host side; used for evaluation and best-of-N).

The three objectives shipped here:

* :class:`GuideObjective` -- weak-to-strong guidance: the implicit reward of a
  small guide model, ``Q(c) = log p_g(c | objective prompt, x, y_<t) - log p_g(c |
  neutral prompt, x, y_<t)``.  The guide runs *inside* the decode ``jit`` with its
  own KV cache (two contexts per row), stepped in lockstep with the base model.
  Different tokenizers are handled by a vocabulary map built on the host: every
  base token is decoded to text and re-encoded with the guide's tokenizer (at most
  ``max_guide_tokens`` = L ids, longer re-encodings are truncated and counted in
  ``GuideObjective.truncated_tokens``).  Approximations, stated: a candidate is
  valued by the guide's log-prob of the *first* guide token of its re-encoding;
  the guide's context is the concatenation of per-token re-encodings, which can
  differ from re-encoding the whole text at token boundaries, and byte-level
  base tokens that are not valid UTF-8 on their own decode to U+FFFD.  With the
  same tokenizer (SmolLM2 guiding SmolLM2) the map is the identity and Q is exact.
  Sequence score: the mean per-token implicit reward of the completion re-encoded
  by the guide (:func:`align_jax.llm.scoring.score_continuations`).
* :class:`BrevityObjective` -- ``Q(c) = 1`` for end-of-sequence tokens, 0 else (the
  value of stopping now); sequence score ``-length / T``.
* :class:`FormatObjective` -- progress toward an answer phrase ("The answer is",
  "####", "\\boxed{"): a per-row character automaton (KMP over each phrase,
  precomputed per vocabulary token on the host, ``[phrases, states, V]`` int8)
  gives ``Q(c) = max_p (matched chars of p after c) / len(p)`` while no phrase has
  been completed, and 0 once one has (satisfied).  Sequence score: 1 when the
  text contains a phrase followed by a number, else 0.

Methods on the same prompts (:data:`METHODS`): ``cage`` (this equilibrium),
``linear`` (``log pi0 + Q^T w / tau``, multi-objective decoding), ``args``
(ARGS-greedy: argmax of ``log pi0 + beta Q^T w`` over the top-M), ``base`` (the
base model sampled at the configured temperature) and ``best_of_n`` (N base
samples, the one with the largest ``sum_k w_k s_k`` of sequence scores).

:func:`run_align` sweeps a grid of weight vectors (``align-jax align CONFIG``):
results go to ``<output_dir>/<name>/seed<seed>/`` as ``results.jsonl`` (one row
per method, weight and question; a rerun skips work already there),
``results.csv``, ``summary.md`` / ``summary.json`` (per-point means, hypervolume
and dominance counts per method) and ``tradeoff.png``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json

from align_jax.runio import append_jsonl, atomic_write, read_jsonl
import math
import os
import re
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from align_jax.config import ConfigError, FieldError, config_to_dict, load_config
from align_jax.game.common_agency import (
    SolverConfig,
    check_top_m,
    linear_mixing_logits,
    reward_guided_logits,
    solve_equilibrium,
)
from align_jax.game.types import GameInputError

__all__ = [
    "METHODS",
    "PROCESSOR_METHODS",
    "OBJECTIVES",
    "DecodeContext",
    "Completion",
    "Objective",
    "BrevityObjective",
    "FormatObjective",
    "GuideObjective",
    "CageState",
    "make_processor",
    "init_cage_state",
    "decode_with_method",
    "decode_weight_grid",
    "check_weights",
    "AlignConfig",
    "load_align_config",
    "run_align",
    "run_dir",
    "hypervolume",
    "dominance_counts",
    "add_align_subcommand",
]

#: Decoding methods that go through the logits processor.
PROCESSOR_METHODS = ("cage", "linear", "args")
#: All methods of :func:`run_align`.
METHODS = ("cage", "linear", "args", "base", "best_of_n")
#: Objective names accepted in a config.
OBJECTIVES = ("guide", "brevity", "format")


# ----------------------------------------------------------------------------
# the objective interface


@dataclasses.dataclass(frozen=True)
class DecodeContext:
    """What an objective needs to build its initial state (host side).

    Attributes:
      tokenizer: the base model's ``ChatTokenizer``.
      vocab_size: V, the base model's vocabulary (logits width; may exceed the
        tokenizer's size).
      conversations: B chat conversations (lists of ``{"role", "content"}``).
      num_samples: K rows per prompt (row ``b K + k``).
      max_new_tokens: T.
      eos_token_ids: ids that end a row.
    """

    tokenizer: Any
    vocab_size: int
    conversations: tuple
    num_samples: int
    max_new_tokens: int
    eos_token_ids: tuple

    @property
    def num_rows(self) -> int:
        """R = B K."""
        return len(self.conversations) * self.num_samples


class Completion(NamedTuple):
    """One finished output, for sequence-level scoring.

    Attributes:
      prompt_index: b, index of its conversation.
      token_ids: generated base ids (including a final EOS when there is one).
      text: decoded text (special tokens skipped).
    """

    prompt_index: int
    token_ids: list
    text: str


class Objective:
    """A principal: values candidate tokens during decoding and scores finished outputs.

    Subclasses set ``name`` and implement the four methods below.  ``values`` and
    ``update`` are traced inside the sampler's ``jit`` (no host syncs); build an
    objective once and reuse it, since the processor closes over it and the
    compiled decode is keyed on the processor's identity.
    """

    name: str = "objective"

    def init_state(self, ctx: DecodeContext) -> Any:
        """Initial state pytree (array leaves; per-row leaves lead with ``[R]``)."""
        raise NotImplementedError

    def values(self, state: Any, candidate_ids: jax.Array, step: Any) -> jax.Array:
        """``Q [R, M]`` float32 for base ids ``candidate_ids int32 [R, M]``."""
        raise NotImplementedError

    def update(self, state: Any, tokens: jax.Array, step: Any) -> Any:
        """State after the rows emitted ``tokens int32 [R]`` (``step.done`` rows ignored)."""
        return state

    def sequence_scores(self, completions: Sequence[Completion], ctx: DecodeContext) -> np.ndarray:
        """float64 ``[N]`` sequence-level scores (larger is better)."""
        raise NotImplementedError


def _token_texts(tokenizer, vocab_size: int) -> list[str]:
    """Text of every base id (empty for ids beyond the tokenizer; specials kept)."""
    size = min(int(vocab_size), len(tokenizer))
    texts = tokenizer.hf_tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False)
    return list(texts) + [""] * (int(vocab_size) - size)


class BrevityObjective(Objective):
    """``Q(c) = 1`` if ``c`` ends the sequence (an EOS id), else 0; sequence score ``-len / T``."""

    name = "brevity"

    def init_state(self, ctx):
        table = np.zeros((ctx.vocab_size,), np.float32)
        table[[t for t in ctx.eos_token_ids if t < ctx.vocab_size]] = 1.0
        return {"table": jnp.asarray(table)}

    def values(self, state, candidate_ids, step):
        return jnp.take(state["table"], candidate_ids, axis=0)

    def sequence_scores(self, completions, ctx):
        return np.asarray([-len(c.token_ids) / ctx.max_new_tokens for c in completions], np.float64)


DEFAULT_PHRASES = ("The answer is", "####", "\\boxed{")
_NUMBER_AFTER = r"\s*\$?\s*-?[\d,]*\.?\d"


def _kmp_automaton(phrase: str, alphabet: dict) -> np.ndarray:
    """``delta [len(p) + 1, |A| + 1]`` char automaton; the last column is "any other char";
    the full-match state ``len(p)`` is absorbing."""
    n = len(phrase)
    delta = np.zeros((n + 1, len(alphabet) + 1), np.int32)
    for s in range(n + 1):
        for ch, a in alphabet.items():
            if s == n:
                delta[s, a] = n
                continue
            text = phrase[:s] + ch
            k = min(len(text), n)
            while k > 0 and not text.endswith(phrase[:k]):
                k -= 1
            delta[s, a] = k
        delta[s, -1] = n if s == n else 0
    return delta


def phrase_transitions(phrases: Sequence[str], token_texts: Sequence[str]) -> np.ndarray:
    """int8 ``[P, Smax + 1, V]``: state of phrase p's automaton after reading token v's text
    from state s (states beyond ``len(p)`` unused, set to 0).  Vectorised over V with NumPy."""
    max_len = max(len(p) for p in phrases)
    if max_len > 126:
        raise ValueError("phrases must be shorter than 127 characters")
    vocab = len(token_texts)
    width = max((len(t) for t in token_texts), default=1) or 1
    out = np.zeros((len(phrases), max_len + 1, vocab), np.int8)
    for pi, phrase in enumerate(phrases):
        alphabet = {ch: i for i, ch in enumerate(sorted(set(phrase)))}
        delta = _kmp_automaton(phrase, alphabet)
        other = len(alphabet)
        chars = np.full((vocab, width), -1, np.int32)  # -1: past the end of the token
        for v, text in enumerate(token_texts):
            if text:
                chars[v, : len(text)] = [alphabet.get(ch, other) for ch in text]
        states = np.broadcast_to(np.arange(len(phrase) + 1, dtype=np.int32)[:, None],
                                 (len(phrase) + 1, vocab)).copy()
        for j in range(width):
            col = chars[:, j]
            live = col >= 0
            if not live.any():
                break
            stepped = delta[states, np.where(live, col, 0)[None, :]]
            states = np.where(live[None, :], stepped, states)
        out[pi, : len(phrase) + 1] = states.astype(np.int8)
    return out


class FormatObjective(Objective):
    """Progress toward an answer phrase (see the module docstring).

    Args:
      phrases: target phrases (default ``"The answer is"``, ``"####"``, ``"\\boxed{"``).
    """

    name = "format"

    def __init__(self, phrases: Sequence[str] = DEFAULT_PHRASES):
        phrases = tuple(phrases)
        if not phrases or any(not isinstance(p, str) or not p for p in phrases):
            raise ValueError(f"FormatObjective: phrases must be non-empty strings, got {phrases!r}")
        self.phrases = phrases
        self._pattern = re.compile("(" + "|".join(re.escape(p) for p in phrases) + ")" + _NUMBER_AFTER)
        self._cache: dict = {}

    def init_state(self, ctx):
        key = (id(ctx.tokenizer), ctx.vocab_size)
        if key not in self._cache:
            trans = phrase_transitions(self.phrases, _token_texts(ctx.tokenizer, ctx.vocab_size))
            self._cache[key] = jnp.asarray(trans)
        lengths = jnp.asarray([len(p) for p in self.phrases], jnp.int32)
        return {
            "trans": self._cache[key],
            "lengths": lengths,
            "matched": jnp.zeros((ctx.num_rows, len(self.phrases)), jnp.int32),
        }

    def _next(self, state, ids):
        """Automaton states ``[R, P, ...]`` after ``ids [R, ...]``."""
        trans, matched = state["trans"], state["matched"]  # [P, S, V], [R, P]
        num_phrases = matched.shape[1]
        extra = ids.ndim - 1
        rows_states = matched.reshape(matched.shape + (1,) * extra)  # [R, P, 1..]
        p_index = jnp.arange(num_phrases).reshape((1, num_phrases) + (1,) * extra)
        return trans[p_index, rows_states, ids[:, None]].astype(jnp.int32)

    def values(self, state, candidate_ids, step):
        lengths = state["lengths"].astype(jnp.float32)
        nxt = self._next(state, candidate_ids)  # [R, P, M]
        progress = jnp.max(nxt.astype(jnp.float32) / lengths[None, :, None], axis=1)
        satisfied = jnp.any(state["matched"] >= state["lengths"][None, :], axis=1)
        return jnp.where(satisfied[:, None], 0.0, progress)

    def update(self, state, tokens, step):
        nxt = self._next(state, tokens)  # [R, P]
        matched = jnp.where(step.done[:, None], state["matched"], nxt)
        return {**state, "matched": matched}

    def sequence_scores(self, completions, ctx):
        return np.asarray([1.0 if self._pattern.search(c.text) else 0.0 for c in completions], np.float64)


class GuideState(NamedTuple):
    """The guide's lockstep decoding state (2R guide rows: R objective-prompt rows, then R neutral).

    Attributes:
      params: the guide's weights (``nnx.State``; arguments of the jit, not constants).
      cache: guide ``KVCache`` (per layer ``[2R, Hkv, Sg, hd]``).
      kv_mask: bool ``[2R, Sg]`` slots holding real tokens.
      positions: int32 ``[2R]`` RoPE position of the next guide token.
      next_slot: int32 ``[]`` first cache slot of the next write (shared by rows).
      logp: float32 ``[2R, Vg]`` guide log-probs of the next token.
      map_ids: int32 ``[V, L]`` guide ids of each base token (padded).
      map_len: int32 ``[V]`` number of guide ids of each base token (``1..L``).
    """

    params: Any
    cache: Any
    kv_mask: jax.Array
    positions: jax.Array
    next_slot: jax.Array
    logp: jax.Array
    map_ids: jax.Array
    map_len: jax.Array


DEFAULT_GUIDE_PROMPT = (
    "You are a concise math tutor. Give a short solution and finish with 'The answer is N.'"
)
DEFAULT_NEUTRAL_PROMPT = "You are a helpful assistant."


class GuideObjective(Objective):
    """Implicit reward of a small guide model (weak-to-strong), see the module docstring.

    Args:
      guide: a ``LoadedModel`` (config, model, tokenizer).
      objective_prompt: the system prompt describing the objective.
      neutral_prompt: the reference system prompt.
      max_guide_tokens: L, the most guide ids fed per base token.
    """

    name = "guide"

    def __init__(self, guide, objective_prompt: str = DEFAULT_GUIDE_PROMPT,
                 neutral_prompt: str = DEFAULT_NEUTRAL_PROMPT, max_guide_tokens: int = 4):
        from align_jax.llm.sampler import Sampler

        if int(max_guide_tokens) < 1:
            raise ValueError(f"max_guide_tokens must be >= 1, got {max_guide_tokens}")
        self.guide = guide
        self.objective_prompt = objective_prompt
        self.neutral_prompt = neutral_prompt
        self.max_guide_tokens = int(max_guide_tokens)
        self.sampler = Sampler(guide)
        self.graphdef = self.sampler.graphdef
        self.truncated_tokens = 0
        self._maps: dict = {}

    # -- host side ------------------------------------------------------------
    def vocab_map(self, tokenizer, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
        """``(map_ids int32 [V, L], map_len int32 [V])`` base id -> guide ids (cached)."""
        key = (id(tokenizer), int(vocab_size))
        if key in self._maps:
            return self._maps[key]
        gtok = self.guide.tokenizer
        num_l = self.max_guide_tokens
        map_ids = np.zeros((vocab_size, num_l), np.int32)
        map_len = np.ones((vocab_size,), np.int32)
        g_eos = int(gtok.eos_token_ids[0])
        same = (tokenizer is gtok) or (
            len(tokenizer) == len(gtok)
            and tokenizer.hf_tokenizer.get_vocab() == gtok.hf_tokenizer.get_vocab()
        )
        if same:
            map_ids[:, 0] = np.minimum(np.arange(vocab_size), self.guide.config.vocab_size - 1)
            self.truncated_tokens = 0
        else:
            texts = _token_texts(tokenizer, vocab_size)
            encoded = gtok.encode_batch([t if t else " " for t in texts])
            truncated = 0
            for v, ids in enumerate(encoded):
                if not texts[v] or not ids:
                    ids = [g_eos]
                if len(ids) > num_l:
                    truncated += 1
                    ids = ids[:num_l]
                map_ids[v, : len(ids)] = ids
                map_len[v] = len(ids)
            self.truncated_tokens = truncated
        base_eos = [t for t in getattr(tokenizer, "eos_token_ids", ()) if t < vocab_size]
        map_ids[base_eos, 0] = g_eos
        map_len[base_eos] = 1
        self._maps[key] = (map_ids, map_len)
        return self._maps[key]

    def _prompts(self, conversations, which: str) -> list[str]:
        system = self.objective_prompt if which == "objective" else self.neutral_prompt
        out = []
        for conv in conversations:
            msgs = [m for m in conv if m.get("role") != "system"]
            out.append(self.guide.tokenizer.apply_chat_template(
                [{"role": "system", "content": system}] + list(msgs), add_generation_prompt=True))
        return out

    def init_state(self, ctx):
        map_ids, map_len = self.vocab_map(ctx.tokenizer, ctx.vocab_size)
        prompts = self._prompts(ctx.conversations, "objective") + self._prompts(ctx.conversations, "neutral")
        steps = ctx.max_new_tokens * self.max_guide_tokens
        batch = self.sampler.prepare(prompts, num_samples=ctx.num_samples, max_new_tokens=steps)
        cache, logits = self.sampler.prefill(batch)
        bucket = batch.tokens.shape[1]
        slots = np.arange(bucket + steps)
        lengths = np.repeat(batch.prompt_lengths, ctx.num_samples)
        kv_mask = slots[None, :] >= (bucket - lengths)[:, None]
        return GuideState(
            params=self.sampler.state, cache=cache, kv_mask=jnp.asarray(kv_mask),
            positions=jnp.asarray(lengths, jnp.int32), next_slot=jnp.asarray(bucket, jnp.int32),
            logp=jax.nn.log_softmax(logits, axis=-1), map_ids=jnp.asarray(map_ids),
            map_len=jnp.asarray(map_len),
        )

    # -- traced ---------------------------------------------------------------
    def values(self, state, candidate_ids, step):
        rows = candidate_ids.shape[0]
        guide_ids = jnp.take(state.map_ids[:, 0], candidate_ids, axis=0)  # [R, M]
        lp_obj = jnp.take_along_axis(state.logp[:rows], guide_ids, axis=-1)
        lp_neu = jnp.take_along_axis(state.logp[rows:], guide_ids, axis=-1)
        return lp_obj - lp_neu

    def update(self, state, tokens, step):
        from align_jax.llm.sampler import hidden_states, lm_head

        model = nnx.merge(self.graphdef, state.params)
        num_l = state.map_ids.shape[1]
        seq = jnp.take(state.map_ids, tokens, axis=0)  # [R, L]
        count = jnp.where(step.done, 0, jnp.take(state.map_len, tokens, axis=0))  # [R]
        seq, count = jnp.concatenate([seq, seq]), jnp.concatenate([count, count])  # [2R, L], [2R]
        offsets = jnp.arange(num_l, dtype=jnp.int32)
        real = offsets[None, :] < count[:, None]
        kv_mask = jax.lax.dynamic_update_slice(state.kv_mask, real, (0, state.next_slot))
        positions = state.positions[:, None] + offsets[None, :]
        h, cache = hidden_states(model, seq, positions, state.cache, state.next_slot, kv_mask)
        last = jnp.take_along_axis(h, jnp.maximum(count - 1, 0)[:, None, None], axis=1)[:, 0]
        logp = jax.nn.log_softmax(lm_head(model, last), axis=-1)
        logp = jnp.where((count > 0)[:, None], logp, state.logp)
        return state._replace(cache=cache, kv_mask=kv_mask, positions=state.positions + count,
                              next_slot=state.next_slot + num_l, logp=logp)

    def sequence_scores(self, completions, ctx):
        from align_jax.llm.scoring import score_continuations

        convs = [ctx.conversations[c.prompt_index] for c in completions]
        texts = [c.text if c.text else " " for c in completions]
        cont = self.guide.tokenizer.encode_batch(texts)
        cont = [ids if ids else [int(self.guide.tokenizer.eos_token_ids[0])] for ids in cont]
        split = (self.graphdef, self.sampler.state)
        obj = score_continuations(split, self.guide.tokenizer, self._prompts(convs, "objective"), cont)
        neu = score_continuations(split, self.guide.tokenizer, self._prompts(convs, "neutral"), cont)
        return (obj.sum_logprob.astype(np.float64) - neu.sum_logprob) / np.maximum(obj.num_tokens, 1)


# ----------------------------------------------------------------------------
# the logits processor


class CageState(NamedTuple):
    """The processor's state (``SamplerStepState.user``); numbers are array leaves, so one
    compiled decode serves a whole weight sweep.

    Attributes:
      weights: float32 ``[R, J]`` trade-off weights ``w >= 0``, one vector per row (so one
        decode can sweep a whole weight grid: row ``b W + w`` carries grid point ``w``).
      tau: float32 ``[]`` KL temperature (``cage`` and ``linear``).
      beta: float32 ``[]`` reward scale of ``args``.
      base_temperature: float32 ``[]``: ``pi0 = softmax(logits / base_temperature)``.
      objective_states: tuple of the J objectives' states.
    """

    weights: jax.Array
    tau: jax.Array
    beta: jax.Array
    base_temperature: jax.Array
    objective_states: tuple


def check_weights(weights, num_objectives: int, field: str = "weights") -> np.ndarray:
    """float32 ``[J]`` weights, or :class:`GameInputError` naming ``field`` (count, sign, finiteness)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.shape[0] != num_objectives:
        raise GameInputError(
            f"{field}: {w.shape[0] if w.ndim == 1 else 'shape ' + str(w.shape)} weight(s) given for "
            f"{num_objectives} objectives", field=field)
    if not np.all(np.isfinite(w)):
        raise GameInputError(f"{field}: must be finite, got {w.tolist()}", field=field)
    if np.any(w < 0):
        raise GameInputError(f"{field}: must be >= 0, got {w.tolist()}", field=field)
    return w.astype(np.float32)


def init_cage_state(objectives: Sequence[Objective], ctx: DecodeContext, weights, *, tau: float = 1.0,
                    beta: float = 1.0, base_temperature: float = 1.0) -> CageState:
    """Validated initial :class:`CageState` (host side; every objective's ``init_state`` runs here).

    ``weights``: one J-vector for every row, or ``[R, J]`` (R = ``ctx.num_rows``), one per row.
    """
    rows = ctx.num_rows
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim == 2:
        if w.shape[0] != rows:
            raise GameInputError(f"weights: {w.shape[0]} weight vectors for {rows} rows", field="weights")
        w = np.stack([check_weights(row, len(objectives), field=f"weights[{r}]") for r, row in enumerate(w)])
    else:
        w = np.broadcast_to(check_weights(weights, len(objectives)), (rows, len(objectives)))
    for name, value in (("tau", tau), ("beta", beta), ("base_temperature", base_temperature)):
        if not (math.isfinite(float(value)) and float(value) > 0):
            raise GameInputError(f"{name}: must be > 0 and finite, got {value}", field=name)
    return CageState(
        weights=jnp.asarray(w, jnp.float32), tau=jnp.asarray(tau, jnp.float32), beta=jnp.asarray(beta, jnp.float32),
        base_temperature=jnp.asarray(base_temperature, jnp.float32),
        objective_states=tuple(obj.init_state(ctx) for obj in objectives),
    )


def make_processor(objectives: Sequence[Objective], *, method: str = "cage", top_m: int = 16,
                   vocab_size: int, solver_config: SolverConfig = SolverConfig(max_iters=100)):
    """``(processor, processor_update)`` for :meth:`Sampler.generate`.

    ``processor(logits f32 [R, V], step) -> logits``: ``log pi0`` over the top-M of
    ``logits / base_temperature``; ``Q [R, J, M]`` from the objectives; then

    * ``cage``: ``log pi*`` of ``solve_equilibrium`` (vmapped over R);
    * ``linear``: ``log softmax(log pi0 + Q^T w / tau)``;
    * ``args``: 0 at ``argmax(log pi0 + beta Q^T w)`` (ARGS-greedy);

    and ``-inf`` outside the top-M.  Decode with ``temperature=1, top_p=1`` so the
    sampled distribution is exactly this one.  Build once and reuse (the sampler
    caches its compiled decode by the processor's identity).

    Raises:
      GameInputError: unknown method, no objectives, or ``top_m`` not in ``[1, V]``.
    """
    if method not in PROCESSOR_METHODS:
        raise GameInputError(f"method: must be one of {PROCESSOR_METHODS}, got {method!r}", field="method")
    objectives = tuple(objectives)
    if not objectives:
        raise GameInputError("objectives: need at least one objective", field="objectives")
    top_m = check_top_m(top_m, vocab_size)

    def processor(logits, step):
        state: CageState = step.user
        scaled = logits.astype(jnp.float32) / state.base_temperature
        cand_logits, cand_ids = jax.lax.top_k(scaled, top_m)  # [R, M]
        q = jnp.stack([obj.values(s, cand_ids, step) for obj, s in zip(objectives, state.objective_states)],
                      axis=1).astype(jnp.float32)  # [R, J, M]
        weights = jnp.broadcast_to(state.weights, (logits.shape[0], len(objectives)))  # [R, J]
        if method == "cage":
            solve = lambda b, o, w: solve_equilibrium(b, o, w, state.tau, config=solver_config)  # noqa: E731
            log_policy = jax.vmap(solve)(cand_logits, q, weights).log_policy
        elif method == "linear":
            log_policy = linear_mixing_logits(cand_logits, q, weights, state.tau)
        else:
            scores = reward_guided_logits(cand_logits, q, weights, state.beta)
            best = jnp.argmax(scores, axis=-1)
            log_policy = jnp.where(jnp.arange(top_m)[None, :] == best[:, None], 0.0, -jnp.inf)
        rows = jnp.arange(logits.shape[0])[:, None]
        return jnp.full(logits.shape, -jnp.inf, jnp.float32).at[rows, cand_ids].set(log_policy)

    def update(user: CageState, tokens, step):
        new = tuple(obj.update(s, tokens, step) for obj, s in zip(objectives, user.objective_states))
        return user._replace(objective_states=new)

    return processor, update


def decode_with_method(sampler, objectives, processors: dict, conversations, *, method: str, weights,
                       key, max_new_tokens: int, num_samples: int = 1, tau: float = 1.0, beta: float = 1.0,
                       temperature: float = 1.0):
    """Decode B conversations with one method; returns the sampler's ``SampleOutput``.

    ``processors`` maps a method to its ``(processor, update)`` pair (from
    :func:`make_processor`, built once).  ``base`` samples the raw model at
    ``temperature``; processor methods sample at temperature 1 from the processed
    distribution, whose ``pi0`` uses ``temperature``.
    """
    if method == "base":
        return sampler.generate_chat(list(conversations), key=key, num_samples=num_samples,
                                     max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0)
    tok = sampler.tokenizer
    ctx = DecodeContext(tok, sampler.config.vocab_size, tuple(conversations), num_samples, max_new_tokens,
                        tuple(tok.eos_token_ids))
    state = init_cage_state(objectives, ctx, weights, tau=tau, beta=beta, base_temperature=temperature)
    processor, update = processors[method]
    return sampler.generate_chat(list(conversations), key=key, num_samples=num_samples,
                                 max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0,
                                 logits_processor=processor, processor_update=update,
                                 processor_state=state, return_processor_state=False)


def decode_weight_grid(sampler, objectives, processors, conversations, *, method: str, weight_grid,
                       key, max_new_tokens: int, tau: float = 1.0, beta: float = 1.0,
                       temperature: float = 1.0):
    """Decode B conversations once per weight vector of ``weight_grid [W, J]``, in one call.

    Every prompt is prefilled once and its W rows (``row = b W + w``, weights
    ``weight_grid[w]``) decode together: one compiled program and one batch of
    ``B W`` rows serve the whole sweep. Row ``(b, w)`` draws from the key
    ``fold_in(fold_in(key, b), w)`` (the sampler's per-sample keys), so its tokens do
    not depend on the other grid points.  Returns the sampler's ``SampleOutput`` with
    the grid on the sample axis (``tokens [B, W, T]``, ``text[b][w]``).
    """
    grid = np.asarray(weight_grid, dtype=np.float64)
    if grid.ndim != 2 or grid.shape[0] < 1:
        raise GameInputError(f"weight_grid: expected [W, J] weight vectors, got shape {grid.shape}",
                             field="weight_grid")
    per_row = np.tile(grid, (len(conversations), 1))  # row b W + w -> grid[w]
    return decode_with_method(sampler, objectives, processors, conversations, method=method, weights=per_row,
                              key=key, max_new_tokens=max_new_tokens, num_samples=grid.shape[0], tau=tau,
                              beta=beta, temperature=temperature)


# ----------------------------------------------------------------------------
# Pareto metrics


def hypervolume(points, reference) -> float:
    """Exact hypervolume dominated by ``points [n, J]`` above ``reference [J]`` (maximisation).

    Coordinate compression: the union of boxes ``[reference, p]`` is measured cell by
    cell on the grid of the points' coordinates (``O(n^(J+1))``, for small n).
    """
    pts = np.asarray(points, np.float64).reshape(-1, np.shape(reference)[0])
    ref = np.asarray(reference, np.float64)
    pts = pts[np.all(pts > ref, axis=1)]
    if len(pts) == 0:
        return 0.0
    axes = [np.unique(np.concatenate([[ref[j]], pts[:, j]])) for j in range(len(ref))]
    total = 0.0
    for cell in itertools.product(*[range(len(a) - 1) for a in axes]):
        upper = np.asarray([axes[j][i + 1] for j, i in enumerate(cell)])
        if np.any(np.all(pts >= upper, axis=1)):
            total += float(np.prod([axes[j][i + 1] - axes[j][i] for j, i in enumerate(cell)]))
    return total


def dominance_counts(points_by_method: dict) -> dict:
    """For every method: how many of its points some other method's point dominates
    (``dominated``) and how many other methods' points it dominates (``dominates``)."""
    def dom(a, b):
        return bool(np.all(a >= b) and np.any(a > b))

    out = {}
    for m, pts in points_by_method.items():
        others = [np.asarray(p) for o, ps in points_by_method.items() if o != m for p in ps]
        mine = [np.asarray(p) for p in pts]
        out[m] = {
            "dominated": sum(any(dom(o, p) for o in others) for p in mine),
            "dominates": sum(any(dom(p, o) for p in mine) for o in others),
            "points": len(mine),
        }
    return out


# ----------------------------------------------------------------------------
# the experiment


@dataclasses.dataclass(frozen=True)
class AlignConfig:
    """A CAGE weight sweep (one YAML file in ``configs/``).

    Attributes:
      name: run name; results go to ``output_dir/name/seed<seed>``.
      seed: PRNG seed.
      base_model: the steered model (short name, GGUF or checkpoint directory).
      guide_model: the guide of the ``guide`` objective.
      dataset, split, num_questions, offset, data_dir: the prompt set.
      system_prompt: the base model's system prompt.
      guide_prompt / neutral_prompt: the guide's objective and reference system prompts.
      objectives: J names from :data:`OBJECTIVES`, in weight order.
      weights: the grid, a list of J-vectors (``>= 0``).
      methods: subset of :data:`METHODS`.
      top_m: M candidate tokens per step (``<= V``, checked once the model is loaded).
      tau: KL temperature of ``cage`` and ``linear`` (``> 0``).
      beta: reward scale of ``args`` (``> 0``).
      temperature: the base model's sampling temperature (``> 0``).
      max_new_tokens: T.
      best_of_n: N samples for ``best_of_n`` (the first one is the ``base`` output).
      max_guide_tokens: L guide ids per base token.
      phrases: answer phrases of the ``format`` objective.
      batch_questions: questions per decode call; each call decodes all of its questions
        for every weight vector at once (``batch_questions x len(weights)`` rows), so this
        bounds memory (the guide's cache holds ``2 x rows x (prompt + L T)`` slots).
      param_dtype: weight dtype of both models (None = float32; ``bfloat16`` is the
        mixed-precision mode of :mod:`align_jax.llm.model`).
      output_dir: where run directories go.
    """

    name: str
    seed: int = 0
    base_model: str = "smollm2-135m"
    guide_model: str = "smollm2-135m"
    dataset: str = "gsm8k"
    split: str = "test"
    num_questions: int = 6
    offset: int = 0
    data_dir: Optional[str] = None
    system_prompt: str = "Solve the math problem step by step."
    guide_prompt: str = DEFAULT_GUIDE_PROMPT
    neutral_prompt: str = DEFAULT_NEUTRAL_PROMPT
    objectives: list[str] = dataclasses.field(default_factory=lambda: ["guide", "brevity", "format"])
    weights: list[list[float]] = dataclasses.field(default_factory=lambda: [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    methods: list[str] = dataclasses.field(default_factory=lambda: list(METHODS))
    top_m: int = 16
    tau: float = 1.0
    beta: float = 1.0
    temperature: float = 1.0
    max_new_tokens: int = 64
    best_of_n: int = 4
    max_guide_tokens: int = 4
    phrases: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_PHRASES))
    batch_questions: int = 8
    param_dtype: Optional[str] = None
    output_dir: str = "runs"

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise FieldError("name", f"must be a non-empty name without '/', got {self.name!r}")
        if not self.objectives:
            raise FieldError("objectives", "need at least one objective")
        for i, obj in enumerate(self.objectives):
            if obj not in OBJECTIVES:
                raise FieldError(f"objectives.{i}", f"unknown objective {obj!r} (known: {', '.join(OBJECTIVES)})")
        if len(set(self.objectives)) != len(self.objectives):
            raise FieldError("objectives", f"objectives must be distinct, got {self.objectives}")
        if not self.weights:
            raise FieldError("weights", "need at least one weight vector")
        for i, w in enumerate(self.weights):
            try:
                check_weights(w, len(self.objectives), field=f"weights.{i}")
            except GameInputError as exc:
                raise FieldError(f"weights.{i}", str(exc)) from None
        for i, m in enumerate(self.methods):
            if m not in METHODS:
                raise FieldError(f"methods.{i}", f"unknown method {m!r} (known: {', '.join(METHODS)})")
        if not self.methods:
            raise FieldError("methods", "need at least one method")
        if self.top_m < 1:
            raise FieldError("top_m", f"must be >= 1, got {self.top_m}")
        for name in ("tau", "beta", "temperature"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise FieldError(name, f"must be > 0 and finite, got {value}")
        if self.param_dtype not in (None, "float32", "bfloat16"):
            raise FieldError("param_dtype", f"must be float32 or bfloat16 (or omitted), got {self.param_dtype!r}")
        for name in ("num_questions", "max_new_tokens", "best_of_n", "max_guide_tokens", "batch_questions"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.offset < 0:
            raise FieldError("offset", f"must be >= 0, got {self.offset}")
        if "format" in self.objectives and (not self.phrases or any(not p for p in self.phrases)):
            raise FieldError("phrases", "need at least one non-empty phrase")


_SOURCES: dict = {}


def load_align_config(path) -> AlignConfig:
    """Loads and validates an align config (errors name file, line and key)."""
    config = load_config(path, AlignConfig)
    _SOURCES[id(config)] = os.fspath(path)
    return config


def _config_error(config: AlignConfig, key: str, message: str) -> ConfigError:
    """A ConfigError naming ``key``'s line when ``config`` came from a file."""
    import yaml

    path = _SOURCES.get(id(config))
    where = "<config>"
    if path is not None:
        where = path
        node = yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
        if isinstance(node, yaml.MappingNode):
            for k, _ in node.value:
                if k.value == key:
                    where = f"{path}:{k.start_mark.line + 1}"
    return ConfigError(f"{where}: {key}: {message}")


def run_dir(config: AlignConfig) -> Path:
    """``output_dir/name/seed<seed>``."""
    return Path(config.output_dir) / config.name / f"seed{config.seed}"


def _settings_hash(config: AlignConfig) -> str:
    """Hash of the settings a row depends on. Not ``num_questions``: chunks start at fixed
    multiples of ``batch_questions``, so a longer or shorter run keeps the rows it shares."""
    skip = ("weights", "methods", "output_dir", "num_questions")
    keep = {k: v for k, v in config_to_dict(config).items() if k not in skip}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


def _read_rows(path: Path) -> dict:
    """Finished rows by key (a line cut by a crash is skipped: that unit is redone)."""
    return {row["key"]: row for _, row in read_jsonl(path)}


def _append_rows(path: Path, rows: list) -> None:
    append_jsonl(path, rows)


_atomic_write = atomic_write


def _build_objectives(config: AlignConfig, guide_loaded) -> list[Objective]:
    out = []
    for name in config.objectives:
        if name == "guide":
            out.append(GuideObjective(guide_loaded, config.guide_prompt, config.neutral_prompt,
                                      config.max_guide_tokens))
        elif name == "brevity":
            out.append(BrevityObjective())
        else:
            out.append(FormatObjective(config.phrases))
    return out


def _completions(output, num_prompts: int, sample: int = 0, offset: int = 0) -> list[Completion]:
    """Sample ``sample`` of each of the call's prompts; ``prompt_index`` is ``offset + b`` (global)."""
    return [Completion(offset + b, output.tokens[b, sample, : output.lengths[b, sample]].tolist(),
                       output.text[b][sample]) for b in range(num_prompts)]


def run_align(config: AlignConfig, *, progress: bool = True, figures: bool = True,
              base=None, guide=None) -> dict:
    """Run (or resume) a weight sweep; returns the summary dict (also written to disk).

    ``base`` / ``guide``: optional preloaded ``LoadedModel``s (default: load
    ``config.base_model`` / ``config.guide_model``).
    """
    from align_jax.data import datasets
    from align_jax.data.answers import extract_answer, is_correct
    from align_jax.llm.sampler import Sampler
    from align_jax.llm.weights import load_pretrained

    problems = datasets.load_dataset(config.dataset, config.split, config.data_dir,
                                     limit=config.num_questions, offset=config.offset)
    base = base if base is not None else load_pretrained(config.base_model, param_dtype=config.param_dtype)
    vocab = base.config.vocab_size
    if config.top_m > vocab:
        raise _config_error(config, "top_m", f"{config.top_m} candidate tokens is larger than the base "
                                             f"model's vocabulary size {vocab}")
    if "guide" in config.objectives and guide is None:
        guide = base if config.guide_model == config.base_model else load_pretrained(
            config.guide_model, param_dtype=config.param_dtype)
    objectives = _build_objectives(config, guide)
    sampler = Sampler(base)
    convs = tuple([{"role": "system", "content": config.system_prompt}, {"role": "user", "content": p.question}]
                  for p in problems)
    ctx = DecodeContext(base.tokenizer, vocab, convs, 1, config.max_new_tokens, tuple(base.tokenizer.eos_token_ids))
    processors = {m: make_processor(objectives, method=m, top_m=config.top_m, vocab_size=vocab)
                  for m in PROCESSOR_METHODS if m in config.methods}

    out = run_dir(config)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "config.json", json.dumps(config_to_dict(config), indent=2, sort_keys=True))
    results_path = out / "results.jsonl"
    done = _read_rows(results_path)
    settings = _settings_hash(config)
    stale = [k for k, r in done.items() if r.get("settings") != settings]
    if stale:
        raise ConfigError(f"{results_path}: holds rows from different settings (e.g. {stale[0]}); "
                          f"use another name or output_dir")
    root = jax.random.key(config.seed)

    def score_rows(method, w_index, weights, completions, wall_s, extra=None):
        scores = np.stack([obj.sequence_scores(completions, ctx) for obj in objectives], axis=1)  # [B, J]
        rows = []
        for c, s in zip(completions, scores):
            p = problems[c.prompt_index]
            pred = extract_answer(c.text)
            row = {"key": f"{method}|{w_index}|{p.id}", "settings": settings, "method": method,
                   "weight_index": w_index, "weights": [float(x) for x in weights], "question_id": p.id,
                   "text": c.text, "num_tokens": len(c.token_ids), "answer": pred,
                   "correct": bool(pred is not None and is_correct(pred, p.gold)), "wall_s": wall_s,
                   **{f"score_{o.name}": float(v) for o, v in zip(objectives, s)}}
            row.update(extra or {})
            rows.append(row)
        return rows

    # A unit is one decode call: the base samples of a chunk of questions, or one processor
    # method on a chunk for every weight vector at once (see `decode_weight_grid`).
    chunk = config.batch_questions
    starts = list(range(0, len(problems), chunk))
    units = []
    if "base" in config.methods or "best_of_n" in config.methods:
        units += [("sampled", c) for c in starts]
    units += [(m, c) for m in PROCESSOR_METHODS if m in config.methods for c in starts]
    t_start = time.perf_counter()
    for unit_index, (method, c0) in enumerate(units):
        part = problems[c0:c0 + chunk]
        part_convs = convs[c0:c0 + chunk]
        if method == "sampled":
            keys_needed = ([f"base|-|{p.id}" for p in part] if "base" in config.methods else [])
            if "best_of_n" in config.methods:
                keys_needed += [f"best_of_n|{i}|{p.id}" for i in range(len(config.weights)) for p in part]
        else:
            keys_needed = [f"{method}|{i}|{p.id}" for i in range(len(config.weights)) for p in part]
        if all(k in done for k in keys_needed):
            continue
        t0 = time.perf_counter()
        if method == "sampled":
            n = config.best_of_n if "best_of_n" in config.methods else 1
            output = decode_with_method(sampler, objectives, processors, part_convs, method="base", weights=None,
                                        key=jax.random.fold_in(jax.random.fold_in(root, 0), c0),
                                        max_new_tokens=config.max_new_tokens, num_samples=n,
                                        temperature=config.temperature)
            wall = time.perf_counter() - t0
            per_sample = [_completions(output, len(part), k, c0) for k in range(n)]
            scores = np.stack([np.stack([o.sequence_scores(cs, ctx) for o in objectives], axis=1)
                               for cs in per_sample], axis=1)  # [B, N, J]
            rows = []
            if "base" in config.methods:
                rows += score_rows("base", "-", [], per_sample[0], wall)
            if "best_of_n" in config.methods:
                for i, w in enumerate(config.weights):
                    pick = np.argmax(scores @ np.asarray(w, np.float64), axis=1)  # [B]
                    chosen = [per_sample[int(pick[b])][b] for b in range(len(part))]
                    rows += score_rows("best_of_n", i, w, chosen, wall)
                    for r, b in zip(rows[-len(part):], range(len(part))):
                        r["picked_sample"] = int(pick[b])
        else:
            method_key = jax.random.fold_in(root, 1 + PROCESSOR_METHODS.index(method))
            output = decode_weight_grid(sampler, objectives, processors, part_convs, method=method,
                                        weight_grid=config.weights, key=jax.random.fold_in(method_key, c0),
                                        tau=config.tau, beta=config.beta, max_new_tokens=config.max_new_tokens,
                                        temperature=config.temperature)
            wall = time.perf_counter() - t0
            rows = []
            for i, w in enumerate(config.weights):
                rows += score_rows(method, i, w, _completions(output, len(part), i, c0), wall,
                                   {"unit_rows": len(part) * len(config.weights)})
        rows = [r for r in rows if r["key"] not in done]
        _append_rows(results_path, rows)
        done.update({r["key"]: r for r in rows})
        if progress:
            print(f"[{unit_index + 1}/{len(units)}] {method} questions {c0}..{c0 + len(part) - 1}"
                  f" {time.perf_counter() - t0:.1f}s", flush=True)

    summary = _summarise(config, objectives, list(done.values()))
    summary["wall_s"] = time.perf_counter() - t_start
    summary["guide_truncated_tokens"] = next((o.truncated_tokens for o in objectives if o.name == "guide"), None)
    import pandas as pd

    frame = pd.DataFrame([{k: v for k, v in r.items() if k != "weights"} | {"weights": json.dumps(r["weights"])}
                          for r in done.values()])
    tmp = out / f".results.csv.tmp{os.getpid()}"
    frame.to_csv(tmp, index=False)
    os.replace(tmp, out / "results.csv")
    _atomic_write(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
    _atomic_write(out / "summary.md", summary_markdown(config, summary))
    if figures:
        tradeoff_figure(config, summary, out / "tradeoff.png")
    return summary


def _summarise(config: AlignConfig, objectives, rows: list) -> dict:
    names = [o.name for o in objectives]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["method"], str(r["weight_index"])), []).append(r)
    points = []
    for (method, w_index), members in sorted(groups.items()):
        point = {"method": method, "weight_index": w_index, "weights": members[0]["weights"], "n": len(members),
                 "accuracy": float(np.mean([m["correct"] for m in members])),
                 "mean_tokens": float(np.mean([m["num_tokens"] for m in members]))}
        for name in names:
            point[name] = float(np.mean([m[f"score_{name}"] for m in members]))
        points.append(point)
    by_method: dict = {}
    for p in points:
        by_method.setdefault(p["method"], []).append([p[n] for n in names])
    all_pts = np.asarray([v for vs in by_method.values() for v in vs], np.float64)
    lo, hi = all_pts.min(axis=0), all_pts.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    ref = np.full(len(names), -0.01)  # just below the normalised minimum
    hv = {m: hypervolume((np.asarray(v) - lo) / span, ref) for m, v in by_method.items()}
    return {"objectives": names, "points": points, "hypervolume": hv,
            "dominance": dominance_counts(by_method),
            "normalisation": {"min": lo.tolist(), "max": hi.tolist()}}


def summary_markdown(config: AlignConfig, summary: dict) -> str:
    """Markdown table: one line per (method, weight) with mean objective scores and accuracy."""
    names = summary["objectives"]
    head = ["method", "weights"] + names + ["accuracy", "tokens"]
    guide = f"guide {config.guide_model}, " if "guide" in config.objectives else ""
    lines = [f"# {config.name} (seed {config.seed}, {config.num_questions} questions, base {config.base_model}, "
             f"{guide}M={config.top_m}, tau={config.tau})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in summary["points"]:
        cells = [p["method"], str(p["weights"])] + [f"{p[n]:.3f}" for n in names]
        cells += [f"{p['accuracy']:.2f}", f"{p['mean_tokens']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Scores: " + ", ".join({"guide": "guide = mean implicit reward per guide token",
                                          "brevity": "brevity = -tokens / max_new_tokens",
                                          "format": "format = share with an answer phrase and a number"}[n]
                                         for n in names) + ".", "",
              "| method | hypervolume (normalised) | points | dominated by others | others dominated |",
              "|---|---|---|---|---|"]
    for m, hv in summary["hypervolume"].items():
        d = summary["dominance"][m]
        lines.append(f"| {m} | {hv:.4f} | {d['points']} | {d['dominated']} | {d['dominates']} |")
    return "\n".join(lines) + "\n"


_STYLE = {"cage": ("C0", "o"), "linear": ("C1", "s"), "args": ("C2", "^"), "best_of_n": ("C3", "v"),
          "base": ("k", "*")}


def tradeoff_figure(config: AlignConfig, summary: dict, path: Path) -> Path:
    """Objective vs objective, one panel per pair, one point per weight, one series per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = summary["objectives"]
    pairs = list(itertools.combinations(names, 2)) or [(names[0], "accuracy")]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4), squeeze=False)
    for ax, (x, y) in zip(axes.flat, pairs):
        for method in dict.fromkeys(p["method"] for p in summary["points"]):
            pts = [p for p in summary["points"] if p["method"] == method]
            color, marker = _STYLE.get(method, ("C7", "x"))
            ax.plot([p[x] for p in pts], [p[y] for p in pts], marker=marker, color=color, linestyle=":",
                    label=method)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{config.name}: trade-offs (one point per weight vector)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------
# CLI


def _align_command(args) -> int:
    config = load_align_config(args.config)
    overrides = {}
    for key in ("num_questions", "output_dir", "seed", "max_new_tokens"):
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    if overrides:
        path = _SOURCES.get(id(config))
        config = dataclasses.replace(config, **overrides)
        if path is not None:
            _SOURCES[id(config)] = path
    summary = run_align(config, progress=not args.quiet, figures=not args.no_figures)
    print(Path(run_dir(config) / "summary.md").read_text(encoding="utf-8"))
    print(f"results: {run_dir(config)} ({summary['wall_s']:.1f}s)")
    return 0


def add_align_subcommand(subparsers) -> None:
    """Adds ``align CONFIG`` to an ``argparse`` subparsers object (the ``align-jax`` CLI)."""
    p = subparsers.add_parser("align", help="CAGE multi-objective decoding: weight sweep vs baselines")
    p.add_argument("config", help="YAML config (see configs/cage_small.yaml)")
    p.add_argument("--num-questions", dest="num_questions", type=int, help="override num_questions")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, help="override max_new_tokens")
    p.add_argument("--seed", type=int, help="override seed")
    p.add_argument("--output-dir", dest="output_dir", help="override output_dir")
    p.add_argument("--no-figures", action="store_true", help="skip the figure")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_align_command)
