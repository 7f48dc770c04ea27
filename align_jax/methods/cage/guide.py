r"""The ``guide`` objective: weak-to-strong guidance by a small model's implicit reward.

``Q(c) = log p_g(c | objective prompt, x, y_<t) - log p_g(c | neutral prompt, x, y_<t)``.
The guide runs *inside* the decode ``jit``, stepped in lockstep with the base model
through the sampler's one-step API (:func:`align_jax.llm.sampler.prefill` /
:func:`~align_jax.llm.sampler.step` / :func:`~align_jax.llm.sampler.gather`), with
its own KV cache holding two contexts per row (objective and neutral prompt). The
cache is part of the objective's *state*, which the decode donates, so it is updated
in place; the guide's weights are part of its *params* (never donated).

Different tokenizers are handled by a vocabulary map built on the host: every base
token is decoded to text and re-encoded with the guide's tokenizer (at most
``max_guide_tokens`` = L ids; longer re-encodings are truncated and counted in
:attr:`GuideObjective.truncated_tokens`, reported in the run summary as
``guide_truncated_tokens``). Approximations, stated: a candidate is valued by the
guide's log-prob of the *first* guide token of its re-encoding; the guide's context
is the concatenation of per-token re-encodings, which can differ from re-encoding the
whole text at token boundaries, and byte-level base tokens that are not valid UTF-8 on
their own decode to U+FFFD. With the same tokenizer (SmolLM2 guiding SmolLM2) the map
is the identity and Q is exact. Sequence score: the mean per-token implicit reward of
the completion re-encoded by the guide (:func:`align_jax.llm.scoring.score_continuations`).

Shapes: R rows, V base vocabulary, Vg guide vocabulary, L guide ids per base token,
Sg guide cache slots (prompt bucket + L T), Hkv / hd the guide's kv heads / head size.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.llm import decoding
from align_jax.llm import sampler as sampler_lib
from align_jax.methods.cage.objectives import OBJECTIVES, Objective, token_texts

__all__ = [
    "GuideObjective",
    "GuideParams",
    "GuideState",
    "DEFAULT_GUIDE_PROMPT",
    "DEFAULT_NEUTRAL_PROMPT",
]

DEFAULT_GUIDE_PROMPT = (
    "You are a concise math tutor. Give a short solution and finish with 'The answer is N.'"
)
DEFAULT_NEUTRAL_PROMPT = "You are a helpful assistant."

#: The two guide contexts of a row, in the order of the guide state's second axis.
SIDES = ("objective", "neutral")


class GuideParams(NamedTuple):
    """The guide's constants (never donated).

    Attributes:
      model: the guide's weights (``nnx.State``; arguments of the jit, not constants).
      map_ids: int32 ``[V, L]`` guide ids of each base token (padded).
      map_len: int32 ``[V]`` number of guide ids of each base token (``1..L``).
    """

    model: Any
    map_ids: jax.Array
    map_len: jax.Array


class GuideState(NamedTuple):
    """The guide's lockstep decoding state: two contexts per row (objective, neutral).

    Attributes:
      decode: a :class:`~align_jax.llm.sampler.DecodeState` whose per-row leaves are
        ``[R, 2, ...]`` (cache per layer ``[R, 2, Hkv, Sg, hd]``, ``kv_mask [R, 2, Sg]``,
        ``positions [R, 2]``; ``next_slot []`` shared), reshaped to the sampler's 2R rows
        (row ``2 r + side``) for each step.
      logp: float32 ``[R, 2, Vg]`` guide log-probs of the next token in each context.
    """

    decode: decoding.DecodeState
    logp: jax.Array


def _split_rows(tree, rows: int):
    """Leaves ``[2R, ...] -> [R, 2, ...]`` (scalars kept)."""
    return jax.tree.map(lambda x: x.reshape((rows, 2) + x.shape[1:]) if x.ndim else x, tree)


def _merge_rows(tree):
    """Leaves ``[R, 2, ...] -> [2R, ...]`` (scalars kept)."""
    return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]) if x.ndim else x, tree)


class GuideObjective(Objective):
    """Implicit reward of a small guide model (weak-to-strong), see the module docstring.

    Args:
      guide: a ``LoadedModel`` (config, model, tokenizer).
      objective_prompt: the system prompt describing the objective.
      neutral_prompt: the reference system prompt.
      max_guide_tokens: L, the most guide ids fed per base token.
    """

    name = "guide"
    description = "guide = mean implicit reward per guide token"

    def __init__(self, guide, objective_prompt: str = DEFAULT_GUIDE_PROMPT,
                 neutral_prompt: str = DEFAULT_NEUTRAL_PROMPT, max_guide_tokens: int = 4):
        if int(max_guide_tokens) < 1:
            raise ValueError(f"max_guide_tokens must be >= 1, got {max_guide_tokens}")
        self.guide = guide
        self.objective_prompt = objective_prompt
        self.neutral_prompt = neutral_prompt
        self.max_guide_tokens = int(max_guide_tokens)
        self.sampler = sampler_lib.Sampler(guide)
        self.graphdef = self.sampler.graphdef
        self.truncated_tokens = 0
        self._maps: dict = {}

    # -- host side ------------------------------------------------------------
    def vocab_map(self, tokenizer, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
        """``(map_ids int32 [V, L], map_len int32 [V])`` base id -> guide ids (cached).

        Sets :attr:`truncated_tokens` to the number of base ids whose re-encoding has
        more than L guide ids (0 when the tokenizers are the same).
        """
        key = (id(tokenizer), int(vocab_size))
        if key not in self._maps:
            self._maps[key] = self._build_map(tokenizer, int(vocab_size))
        map_ids, map_len, self.truncated_tokens = self._maps[key]
        return map_ids, map_len

    def _build_map(self, tokenizer, vocab_size: int):
        gtok = self.guide.tokenizer
        num_l = self.max_guide_tokens
        map_ids = np.zeros((vocab_size, num_l), np.int32)
        map_len = np.ones((vocab_size,), np.int32)
        g_eos = int(gtok.eos_token_ids[0])
        truncated = 0
        same = (tokenizer is gtok) or (
            len(tokenizer) == len(gtok)
            and tokenizer.hf_tokenizer.get_vocab() == gtok.hf_tokenizer.get_vocab()
        )
        if same:
            map_ids[:, 0] = np.minimum(np.arange(vocab_size), self.guide.config.vocab_size - 1)
        else:
            texts = token_texts(tokenizer, vocab_size)
            encoded = gtok.encode_batch([t if t else " " for t in texts])
            for v, ids in enumerate(encoded):
                if not texts[v] or not ids:
                    ids = [g_eos]
                if len(ids) > num_l:
                    truncated += 1
                    ids = ids[:num_l]
                map_ids[v, : len(ids)] = ids
                map_len[v] = len(ids)
        base_eos = [t for t in getattr(tokenizer, "eos_token_ids", ()) if t < vocab_size]
        map_ids[base_eos, 0] = g_eos
        map_len[base_eos] = 1
        return map_ids, map_len, truncated

    def prompts(self, conversations, which: str) -> list[str]:
        """The guide's chat prompts of ``conversations`` with the ``which`` system prompt
        (``"objective"`` or ``"neutral"``; the conversations' own system messages are dropped)."""
        system = self.objective_prompt if which == "objective" else self.neutral_prompt
        out = []
        for conv in conversations:
            msgs = [m for m in conv if m.get("role") != "system"]
            out.append(self.guide.tokenizer.apply_chat_template(
                [{"role": "system", "content": system}] + list(msgs), add_generation_prompt=True))
        return out

    def init_params(self, ctx):
        map_ids, map_len = self.vocab_map(ctx.tokenizer, ctx.vocab_size)
        return GuideParams(self.sampler.state, jnp.asarray(map_ids), jnp.asarray(map_len))

    def init_state(self, ctx):
        """Prefills the 2B guide prompts once (prompt ``2 b + side``) and gathers them to
        the R = B K rows x 2 sides (row ``2 (b K + k) + side`` of the sampler's batch)."""
        num_prompts = len(ctx.conversations)
        per_side = [self.prompts(ctx.conversations, side) for side in SIDES]
        prompts = [per_side[s][b] for b in range(num_prompts) for s in range(2)]
        steps = ctx.max_new_tokens * self.max_guide_tokens
        batch = self.sampler.prepare(prompts, num_samples=1, max_new_tokens=steps)
        logits, state = self.sampler.start(batch)
        rows = ctx.num_rows
        prompt_of_row = np.repeat(np.arange(num_prompts), ctx.num_samples)  # [R]
        order = (2 * prompt_of_row[:, None] + np.arange(2)[None, :]).reshape(-1)  # [2R]
        state = decoding.gather(state, order)
        logp = jax.nn.log_softmax(jnp.take(logits, jnp.asarray(order), axis=0), axis=-1)
        return GuideState(_split_rows(state, rows), logp.reshape(rows, 2, -1))

    def summary(self, ctx):
        self.vocab_map(ctx.tokenizer, ctx.vocab_size)
        return {"guide_truncated_tokens": self.truncated_tokens}

    # -- traced ---------------------------------------------------------------
    def values(self, params, state, candidate_ids, step):
        guide_ids = jnp.take(params.map_ids[:, 0], candidate_ids, axis=0)  # [R, M]
        lp_obj = jnp.take_along_axis(state.logp[:, 0], guide_ids, axis=-1)
        lp_neu = jnp.take_along_axis(state.logp[:, 1], guide_ids, axis=-1)
        return lp_obj - lp_neu

    def update(self, params, state, tokens, step):
        rows = tokens.shape[0]
        seq = jnp.take(params.map_ids, tokens, axis=0)  # [R, L]
        count = jnp.where(step.done, 0, jnp.take(params.map_len, tokens, axis=0))  # [R]
        seq = jnp.repeat(seq, 2, axis=0)  # [2R, L], row 2 r + side
        count = jnp.repeat(count, 2, axis=0)  # [2R]
        logits, decode = decoding.step(self.graphdef, params.model, _merge_rows(state.decode), seq, count)
        logp = jnp.where((count > 0)[:, None], jax.nn.log_softmax(logits, axis=-1), _merge_rows(state.logp))
        return GuideState(_split_rows(decode, rows), logp.reshape(rows, 2, -1))

    def sequence_scores(self, completions, ctx):
        from align_jax.llm.scoring import score_continuations

        convs = [ctx.conversations[c.prompt_index] for c in completions]
        texts = [c.text if c.text else " " for c in completions]
        cont = self.guide.tokenizer.encode_batch(texts)
        cont = [ids if ids else [int(self.guide.tokenizer.eos_token_ids[0])] for ids in cont]
        split = (self.graphdef, self.sampler.state)
        obj = score_continuations(split, self.guide.tokenizer, self.prompts(convs, "objective"), cont)
        neu = score_continuations(split, self.guide.tokenizer, self.prompts(convs, "neutral"), cont)
        return (obj.sum_logprob.astype(np.float64) - neu.sum_logprob) / np.maximum(obj.num_tokens, 1)


@OBJECTIVES.register("guide")
def make_guide(config, load_model) -> GuideObjective:
    """The ``guide`` objective: ``config.guide_model`` with its prompts and ``max_guide_tokens``."""
    return GuideObjective(load_model(config.guide_model), config.guide_prompt, config.neutral_prompt,
                          config.max_guide_tokens)
