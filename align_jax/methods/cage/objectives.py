r"""CAGE objectives (principals): the interface, its name registry, brevity and format.

An objective values the M candidate tokens of every row at each decoding step and
scores finished outputs. It is the optax pattern (pure ``init`` / ``update`` functions
over explicit state) split in two pytrees:

* ``params = init_params(ctx)``: constants shared by the rows (lookup tables, a guide
  model's weights). An argument of the decode ``jit``, never donated or changed.
* ``state = init_state(ctx)``: what changes as rows grow; every leaf has a leading
  ``[R]`` (or is a scalar shared by the rows). Donated to the decode, so it is updated
  in place (a guide's KV cache is not held twice).
* ``values(params, state, candidate_ids [R, M], step) -> Q [R, M]`` float32 (traced);
* ``update(params, state, tokens [R], step) -> state`` after each step (traced; rows
  with ``step.done`` keep their values);
* ``sequence_scores(completions, ctx) -> [N]`` sequence-level scores of finished
  outputs (host side; evaluation and best-of-N);
* ``summary(ctx) -> dict``: extra fields for the run summary (may be empty).

A new objective is one class plus one registration of a factory
``(config: CageConfig, load_model: name -> LoadedModel) -> Objective`` in
:data:`OBJECTIVES`; configs select it by name (``objectives: [guide, brevity, format]``),
and :func:`align_jax.methods.cage.conformance.objective_api_test` checks it.

Shapes: R rows (B prompts x K samples, row ``b K + k``), V base vocabulary, M
candidate tokens, P answer phrases.

Shipped here:

* :class:`BrevityObjective` -- ``Q(c) = 1`` for end-of-sequence tokens, 0 else (the
  value of stopping now); sequence score ``-length / T``.
* :class:`FormatObjective` -- progress toward an answer phrase ("The answer is",
  "####", "\\boxed{"): a per-row character automaton (KMP over each phrase,
  precomputed per vocabulary token on the host, ``[P, states, V]`` int8) gives
  ``Q(c) = max_p (matched chars of p after c) / len(p)`` while no phrase has been
  completed, and 0 once one has (satisfied). Sequence score: 1 when the text contains
  a phrase followed by a number, else 0.

The guide objective (a second model's implicit reward) is in :mod:`.guide`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.registry import Registry

__all__ = [
    "DecodeContext",
    "Completion",
    "Objective",
    "ObjectiveFactory",
    "OBJECTIVES",
    "BrevityObjective",
    "FormatObjective",
    "DEFAULT_PHRASES",
    "phrase_transitions",
    "token_texts",
]


@dataclasses.dataclass(frozen=True)
class DecodeContext:
    """What an objective needs to build its params and state (host side).

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


class Objective(Protocol):
    """A principal: values candidate tokens during decoding and scores finished outputs.

    See the module docstring for the contract. Implementations may subclass this
    protocol to inherit the defaults (no params, no state, ``update`` keeps the state,
    empty summary). ``values`` and ``update`` are traced inside the sampler's ``jit``
    (no host syncs); build an objective once and reuse it, since the processor closes
    over it and the compiled decode is keyed on the processor's identity.

    Attributes:
      name: the registry name (also the ``score_<name>`` column of result rows).
      description: one line for the run summary, ``"<name> = what the score is"``.
    """

    name: str
    description: str

    def init_params(self, ctx: DecodeContext) -> Any:
        """Constant pytree shared by the rows (never donated)."""
        return ()

    def init_state(self, ctx: DecodeContext) -> Any:
        """Initial state pytree: array leaves with a leading ``[R]`` (or scalars)."""
        return ()

    def values(self, params: Any, state: Any, candidate_ids: jax.Array, step: Any) -> jax.Array:
        """``Q [R, M]`` float32 for base ids ``candidate_ids int32 [R, M]``."""
        ...

    def update(self, params: Any, state: Any, tokens: jax.Array, step: Any) -> Any:
        """State after the rows emitted ``tokens int32 [R]`` (``step.done`` rows keep their values)."""
        return state

    def sequence_scores(self, completions: Sequence[Completion], ctx: DecodeContext) -> np.ndarray:
        """float64 ``[N]`` sequence-level scores (larger is better)."""
        ...

    def summary(self, ctx: DecodeContext) -> dict:
        """Extra summary fields (host side, after decoding)."""
        return {}


#: ``(config: CageConfig, load_model: Callable[[str], LoadedModel]) -> Objective``.
ObjectiveFactory = Callable[[Any, Callable[[str], Any]], Objective]

#: Objective factories by config name.
OBJECTIVES: Registry[ObjectiveFactory] = Registry("objective")


def token_texts(tokenizer, vocab_size: int) -> list[str]:
    """Text of every base id (empty for ids beyond the tokenizer; specials kept)."""
    size = min(int(vocab_size), len(tokenizer))
    texts = tokenizer.hf_tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False)
    return list(texts) + [""] * (int(vocab_size) - size)


class BrevityObjective(Objective):
    """``Q(c) = 1`` if ``c`` ends the sequence (an EOS id), else 0; sequence score ``-len / T``.

    Params: ``{"table": float32 [V]}``; no state.
    """

    name = "brevity"
    description = "brevity = -tokens / max_new_tokens"

    def init_params(self, ctx):
        table = np.zeros((ctx.vocab_size,), np.float32)
        table[[t for t in ctx.eos_token_ids if t < ctx.vocab_size]] = 1.0
        return {"table": jnp.asarray(table)}

    def values(self, params, state, candidate_ids, step):
        return jnp.take(params["table"], candidate_ids, axis=0)

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


def phrase_transitions(phrases: Sequence[str], texts: Sequence[str]) -> np.ndarray:
    """int8 ``[P, Smax + 1, V]``: state of phrase p's automaton after reading token v's text
    from state s (states beyond ``len(p)`` unused, set to 0). Vectorised over V with NumPy."""
    max_len = max(len(p) for p in phrases)
    if max_len > 126:
        raise ValueError("phrases must be shorter than 127 characters")
    vocab = len(texts)
    width = max((len(t) for t in texts), default=1) or 1
    out = np.zeros((len(phrases), max_len + 1, vocab), np.int8)
    for pi, phrase in enumerate(phrases):
        alphabet = {ch: i for i, ch in enumerate(sorted(set(phrase)))}
        delta = _kmp_automaton(phrase, alphabet)
        other = len(alphabet)
        chars = np.full((vocab, width), -1, np.int32)  # -1: past the end of the token
        for v, text in enumerate(texts):
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

    Params: ``{"trans": int8 [P, Smax + 1, V], "lengths": int32 [P]}``; state
    ``{"matched": int32 [R, P]}`` (each phrase's automaton state per row).

    Args:
      phrases: target phrases (default ``"The answer is"``, ``"####"``, ``"\\boxed{"``).
    """

    name = "format"
    description = "format = share with an answer phrase and a number"

    def __init__(self, phrases: Sequence[str] = DEFAULT_PHRASES):
        phrases = tuple(phrases)
        if not phrases or any(not isinstance(p, str) or not p for p in phrases):
            raise ValueError(f"FormatObjective: phrases must be non-empty strings, got {phrases!r}")
        self.phrases = phrases
        self._pattern = re.compile("(" + "|".join(re.escape(p) for p in phrases) + ")" + _NUMBER_AFTER)
        self._cache: dict = {}

    def init_params(self, ctx):
        key = (id(ctx.tokenizer), ctx.vocab_size)
        if key not in self._cache:
            trans = phrase_transitions(self.phrases, token_texts(ctx.tokenizer, ctx.vocab_size))
            self._cache[key] = jnp.asarray(trans)
        return {"trans": self._cache[key], "lengths": jnp.asarray([len(p) for p in self.phrases], jnp.int32)}

    def init_state(self, ctx):
        return {"matched": jnp.zeros((ctx.num_rows, len(self.phrases)), jnp.int32)}

    @staticmethod
    def _next(params, state, ids):
        """Automaton states ``[R, P, ...]`` after ``ids [R, ...]``."""
        trans, matched = params["trans"], state["matched"]  # [P, S, V], [R, P]
        num_phrases = matched.shape[1]
        extra = ids.ndim - 1
        rows_states = matched.reshape(matched.shape + (1,) * extra)  # [R, P, 1..]
        p_index = jnp.arange(num_phrases).reshape((1, num_phrases) + (1,) * extra)
        return trans[p_index, rows_states, ids[:, None]].astype(jnp.int32)

    def values(self, params, state, candidate_ids, step):
        lengths = params["lengths"]
        nxt = self._next(params, state, candidate_ids)  # [R, P, M]
        progress = jnp.max(nxt.astype(jnp.float32) / lengths.astype(jnp.float32)[None, :, None], axis=1)
        satisfied = jnp.any(state["matched"] >= lengths[None, :], axis=1)
        return jnp.where(satisfied[:, None], 0.0, progress)

    def update(self, params, state, tokens, step):
        nxt = self._next(params, state, tokens)  # [R, P]
        return {"matched": jnp.where(step.done[:, None], state["matched"], nxt)}

    def sequence_scores(self, completions, ctx):
        return np.asarray([1.0 if self._pattern.search(c.text) else 0.0 for c in completions], np.float64)


@OBJECTIVES.register("brevity")
def make_brevity(config, load_model) -> BrevityObjective:
    """The ``brevity`` objective (no settings)."""
    return BrevityObjective()


@OBJECTIVES.register("format")
def make_format(config, load_model) -> FormatObjective:
    """The ``format`` objective with the config's ``phrases``."""
    return FormatObjective(config.phrases)
