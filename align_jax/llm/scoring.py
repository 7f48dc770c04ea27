"""Batched log-probability of given continuations under a prompt (principal / verifier path).

For a prompt ``x`` and a continuation ``y = (y_1..y_m)`` tokenised separately and
concatenated (``ids = x ++ y``), the score is

    log p(y | x) = sum_i log softmax(logits(x ++ y_<i))[y_i]

computed by one causal forward pass over ``x ++ y``, and the mean is that sum over m.
Pass token ids for the continuation (e.g. the sampler's output tokens) to score exactly
what was generated; strings are re-tokenised, which may differ at the boundary.

Batching: pairs are sorted by total length, cut into chunks of ``batch_size`` rows
(the last chunk padded with dummy rows), each chunk right-padded to a power-of-two
length bucket, and scored by one jitted function, so a new call reuses the compiled
programs of earlier calls with the same ``batch_size`` and bucket. Inside the jit the
LM head runs row by row (``lax.map``), so memory holds one row of ``[L, V]`` float32
logits, not ``[batch_size, L, V]``.

Several devices: with a ``mesh`` (:mod:`~align_jax.llm.sharding`) the weights are sharded
(tensor parallel over ``"model"``), the rows of a chunk are split over ``"data"`` (the chunk
rounded up to a multiple of its size with dummy rows), and the LM head runs one row per data
index at a time (memory one ``[L, V / m]`` row of logits per device).

Shapes: N pairs, n rows in a chunk, L length bucket, V vocabulary, M longest continuation.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from align_jax.llm import sharding
from align_jax.llm.decoding import TRACE_COUNTS, hidden_states, lm_head, prompt_bucket
from align_jax.llm.tokenizer import token_ids

__all__ = ["ScoreOutput", "score_continuations", "token_logprobs", "mean_hidden", "text_embeddings"]


class ScoreOutput(NamedTuple):
    """Scores of N (prompt, continuation) pairs.

    Attributes:
      token_logprobs: float32 ``[N, M]`` ``log p(y_i | x, y_<i)``, 0 after ``num_tokens``.
      num_tokens: int32 ``[N]`` continuation lengths m in tokens.
      sum_logprob: float32 ``[N]`` ``log p(y | x)``.
      mean_logprob: float32 ``[N]`` ``sum_logprob / num_tokens``.
      prompt_tokens: int32 ``[N]`` prompt lengths in tokens.
    """

    token_logprobs: np.ndarray
    num_tokens: np.ndarray
    sum_logprob: np.ndarray
    mean_logprob: np.ndarray
    prompt_tokens: np.ndarray


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh"))
def token_logprobs(graphdef, state, tokens, total_lengths, *, mesh=None):
    """``log p(tokens[:, j] | tokens[:, :j])`` for right-padded ``tokens int32 [n, L]``.

    ``mesh`` (static): the mesh ``state`` is sharded on, whose data axis size d divides n, or
    None. Returns float32 ``[n, L]``: entry j (``1 <= j < total_lengths``) is the log-prob of
    token j; entry 0 and padding entries are 0.
    """
    TRACE_COUNTS["score"] += 1
    model = nnx.merge(graphdef, state)
    n, length = tokens.shape
    tokens = sharding.constrain_rows(tokens, mesh)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (n, length))
    valid = positions < total_lengths[:, None]
    h, _ = hidden_states(model, tokens, positions, None, 0, valid)

    def row_logprobs(args):
        h_row, tok_row = args  # [L, D], [L]
        logits = lm_head(model, h_row[:-1])  # [L-1, V] predicts tokens 1..L-1
        picked = jnp.take_along_axis(logits, tok_row[1:, None], axis=-1)[:, 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    if mesh is None:
        lp = jax.lax.map(row_logprobs, (h, tokens))  # [n, L-1]
    else:  # step i takes row i of each device's block: [n/d, d, ...] with d split over "data"
        d = int(mesh.shape[sharding.DATA_AXIS])
        blocks = lambda x: sharding.constrain(  # noqa: E731
            x.reshape(d, n // d, *x.shape[1:]).swapaxes(0, 1), mesh,
            jax.sharding.PartitionSpec(None, sharding.DATA_AXIS))
        lp = jax.lax.map(jax.vmap(row_logprobs), (blocks(h), blocks(tokens)))  # [n/d, d, L-1]
        lp = sharding.constrain_rows(lp.swapaxes(0, 1).reshape(n, length - 1), mesh)
    lp = jnp.concatenate([jnp.zeros((n, 1), jnp.float32), lp], axis=1)
    return jnp.where(valid & (positions > 0), lp, 0.0)


def score_continuations(model, tokenizer=None, prompts: Sequence = (), continuations: Sequence = (), *,
                        batch_size: int = 4, min_bucket: int = 16,
                        add_special_tokens: bool = False, mesh: jax.sharding.Mesh | None = None) -> ScoreOutput:
    """Score each continuation under its prompt.

    Args:
      model: a ``LoadedModel``, a ``Transformer``, or a ``(graphdef, state)`` pair from
        ``nnx.split`` (split once and reuse it when scoring in a loop).
      tokenizer: a ``ChatTokenizer`` (defaults to the ``LoadedModel``'s); only needed
        for string inputs.
      prompts: N prompts, or one prompt shared by all continuations (strings or ids;
        strings are encoded with ``add_special_tokens``).
      continuations: N continuations (strings encoded without special tokens, or ids).
      batch_size: rows per jitted chunk (static; memory ~ batch_size * L * D plus
        one ``[L, V]`` float32 row of logits).
      min_bucket: smallest length bucket.
      mesh: optional device mesh (:func:`~align_jax.llm.sharding.make_mesh`), checked against
        the model's config before any weight moves (``ValueError`` naming the axis and the
        field); ``batch_size`` is then rounded up to a multiple of its data axis. The weights are
        placed with :func:`~align_jax.llm.sharding.shard_params` on every call; when scoring in
        a loop, pass ``(graphdef, shard_params(state, mesh))`` once made (not copied again).

    Returns:
      :class:`ScoreOutput` in the input order.
    """
    if hasattr(model, "model") and hasattr(model, "config") and not isinstance(model, nnx.Module):
        tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        model = model.model
    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)
    elif isinstance(model, tuple) and len(model) == 2:
        graphdef, state = model
    else:
        raise TypeError(f"score_continuations needs a LoadedModel, a Transformer or (graphdef, state), got {type(model).__name__}")
    config = nnx.merge(graphdef, state).config if not isinstance(model, nnx.Module) else model.config
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if mesh is not None:
        mesh = sharding.check_mesh(mesh, config)
        batch_size = sharding.padded_rows(int(batch_size), mesh)
    if isinstance(prompts, str) or isinstance(continuations, str):
        raise TypeError("prompts and continuations must be lists (wrap a single string in a list)")
    num = len(continuations)
    if num == 0:
        raise ValueError("continuations is empty: pass at least one continuation")
    if len(prompts) not in (1, num):
        raise ValueError(f"got {len(prompts)} prompts for {num} continuations; pass one prompt or one per continuation")
    vocab = config.vocab_size
    prompt_ids = [token_ids(p, "prompt", i, tokenizer, vocab, add_special_tokens=add_special_tokens) for i, p in enumerate(prompts)]
    if len(prompt_ids) == 1:
        prompt_ids = prompt_ids * num
    cont_ids = [token_ids(c, "continuation", i, tokenizer, vocab) for i, c in enumerate(continuations)]
    totals = np.asarray([len(p) + len(c) for p, c in zip(prompt_ids, cont_ids)], np.int32)
    context = config.max_position_embeddings
    too_long = np.flatnonzero(totals > context)
    if too_long.size:
        i = int(too_long[0])
        raise ValueError(
            f"pair {i}: prompt ({len(prompt_ids[i])} tokens) + continuation ({len(cont_ids[i])} tokens) "
            f"= {totals[i]} tokens exceeds the model's context (max_position_embeddings={context})"
        )

    if mesh is not None:  # after every input check: a bad input moves no weight
        state = sharding.shard_params(state, mesh)
    order = np.argsort(totals, kind="stable")
    max_cont = max(len(c) for c in cont_ids)
    out_lp = np.zeros((num, max_cont), np.float32)
    for start in range(0, num, batch_size):
        rows = order[start:start + batch_size]
        bucket = prompt_bucket(int(totals[rows].max()), min_bucket)
        tokens = np.zeros((batch_size, bucket), np.int32)
        lengths = np.ones((batch_size,), np.int32)  # dummy rows: one token, nothing scored
        for j, r in enumerate(rows):
            ids = prompt_ids[r] + cont_ids[r]
            tokens[j, :len(ids)] = ids
            lengths[j] = len(ids)
        lp = np.asarray(token_logprobs(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), mesh=mesh))
        for j, r in enumerate(rows):
            p, m = len(prompt_ids[r]), len(cont_ids[r])
            out_lp[r, :m] = lp[j, p:p + m]
    num_tokens = np.asarray([len(c) for c in cont_ids], np.int32)
    sums = out_lp.sum(axis=1, dtype=np.float64).astype(np.float32)
    return ScoreOutput(
        token_logprobs=out_lp, num_tokens=num_tokens, sum_logprob=sums,
        mean_logprob=(sums / num_tokens).astype(np.float32),
        prompt_tokens=np.asarray([len(p) for p in prompt_ids], np.int32),
    )


@functools.partial(jax.jit, static_argnames=("graphdef",))
def mean_hidden(graphdef, state, tokens, lengths):
    """Unit-norm mean of the final-norm hidden states over each row's tokens.

    ``tokens int32 [n, L]`` right-padded, ``lengths int32 [n]`` (>= 1) -> float32 ``[n, D]``:
    ``e = mean_{j < len} h_j / ||mean_{j < len} h_j||`` (causal attention, so token j sees
    tokens 0..j; the mean pools every prefix state).
    """
    TRACE_COUNTS["embed"] += 1
    model = nnx.merge(graphdef, state)
    n, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (n, length))
    valid = positions < lengths[:, None]
    h, _ = hidden_states(model, tokens, positions, None, 0, valid)
    weight = valid.astype(jnp.float32)[..., None]
    mean = (h.astype(jnp.float32) * weight).sum(1) / jnp.maximum(weight.sum(1), 1.0)
    return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def text_embeddings(model, tokenizer=None, texts: Sequence[str] = (), *, batch_size: int = 8, max_tokens: int = 512,
                    min_bucket: int = 16) -> np.ndarray:
    """Sentence embeddings from the decoder itself: :func:`mean_hidden` of each text.

    Args:
      model: a ``LoadedModel`` or a ``(graphdef, state)`` pair.
      tokenizer: the ``ChatTokenizer`` (defaults to the ``LoadedModel``'s).
      texts: N strings (encoded without special tokens; an empty string embeds as one
        end-of-text / pad token).
      batch_size: rows per jitted chunk (static).
      max_tokens: texts are cut to their first ``max_tokens`` tokens (>= 1; also bounded by
        the model's context).
    Returns:
      float32 ``[N, D]``, unit rows, in the input order (rows of equal texts are equal).
    """
    if hasattr(model, "model") and hasattr(model, "config") and not isinstance(model, nnx.Module):
        tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        graphdef, state = nnx.split(model.model)
    elif isinstance(model, tuple) and len(model) == 2:
        graphdef, state = model
    else:
        raise TypeError(f"text_embeddings needs a LoadedModel or (graphdef, state), got {type(model).__name__}")
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings (wrap a single string in a list)")
    if tokenizer is None:
        raise ValueError("text_embeddings needs a tokenizer for string inputs")
    config = nnx.merge(graphdef, state).config
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
    limit = min(int(max_tokens), config.max_position_embeddings)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = [(list(tokenizer.encode(t))[:limit] or [pad]) if isinstance(t, str) else None for t in texts]
    for i, row in enumerate(ids):
        if row is None:
            raise TypeError(f"texts[{i}]: expected a string, got {type(texts[i]).__name__}")
    out = np.zeros((len(ids), config.hidden_size), np.float32)
    order = np.argsort([len(r) for r in ids], kind="stable")
    for start in range(0, len(ids), batch_size):
        rows = order[start:start + batch_size]
        bucket = prompt_bucket(max(len(ids[r]) for r in rows), min_bucket)
        tokens = np.zeros((batch_size, bucket), np.int32)
        lengths = np.ones((batch_size,), np.int32)
        for j, r in enumerate(rows):
            tokens[j, :len(ids[r])] = ids[r]
            lengths[j] = len(ids[r])
        emb = np.asarray(mean_hidden(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths)))
        out[rows] = emb[:len(rows)]
    return out
