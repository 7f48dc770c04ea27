"""Compiled decoder programs: the prefill and the public one-step decoding API.

For callers that drive decoding themselves (a guide model stepped in lockstep with
CAGE, tree search that branches rows): :func:`prefill` returns the last logits and a
:class:`DecodeState` (cache, key mask, positions, next slot); :func:`step` feeds up to L
tokens per row and returns the logits after each row's last real one; :func:`gather`
and :func:`copy` select or overwrite cache rows. All four are pure, jitted functions of
``(graphdef, params)`` / the state, and ``step``, ``copy`` (and ``gather`` when it keeps
the row count) donate the state, so the cache is updated in place: never reuse a state
passed to them. :class:`~align_jax.llm.sampler.Sampler` wraps them with its weights
(:meth:`~align_jax.llm.sampler.Sampler.start` / :meth:`~align_jax.llm.sampler.Sampler.step`).

Also here: the compilation helpers (:func:`prompt_bucket`, the prompt padding that
bounds how many programs get compiled, and :func:`enable_compilation_cache`) and the
shared decoder pieces: :func:`hidden_states` / :func:`lm_head` (the LM head applied only
where logits are needed), :func:`left_pad_mask`, and :func:`prefill_cache`, the
sampler's prefill (cache and last logits, repeated K times).
The batched while-loop decode is in :mod:`align_jax.llm.decode_loop`.

Shapes: B prompts, K samples per prompt, R = B * K rows (row ``b K + k``), P prompt
bucket, T slots reserved after the prompt, S = P + T cache slots, V vocabulary, D hidden
size, L tokens per step.
"""

from __future__ import annotations

import collections
import functools
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from align_jax.llm import model as model_lib
from align_jax.llm import sharding

__all__ = [
    "DecodeState",
    "prefill",
    "step",
    "gather",
    "copy",
    "prefill_cache",
    "hidden_states",
    "lm_head",
    "left_pad_mask",
    "prompt_bucket",
    "enable_compilation_cache",
    "TRACE_COUNTS",
]

# Number of times each compiled function has been traced (for retrace tests).
TRACE_COUNTS: collections.Counter = collections.Counter()


def enable_compilation_cache(path: str | None = None, *, min_compile_time_secs: float = 1.0) -> str:
    """Turn on JAX's persistent compilation cache and return its directory.

    The directory is ``path``, else ``$ALIGN_JAX_CACHE``, else
    ``~/.cache/align_jax/jax_cache``. Programs that took at least
    ``min_compile_time_secs`` to compile are stored, so a second run of a script
    loads the sampler's compiled prefill/decode from disk instead of recompiling.
    """
    path = path or os.environ.get("ALIGN_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "align_jax", "jax_cache"
    )
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    return path


def prompt_bucket(length: int, minimum: int = 16, steps: int = 4) -> int:
    """Padded length for a prompt (or scored sequence) of ``length`` tokens.

    With ``p`` the smallest power of two ``>= max(length, minimum)``, the buckets between
    ``p / 2`` and ``p`` are ``steps`` equal steps apart: ``steps=1`` gives powers of two,
    ``steps=2`` adds the midpoints (..., 96, 128, 192, 256), the default ``steps=4`` the
    quarters (..., 128, 160, 192, 224, 256, 320, ...). A padded prompt is then at most
    ``1 / (steps + 1)`` padding (above the minimum) at the cost of ``steps`` compiled
    programs per doubling of the length; the persistent compilation cache keeps each one.
    A batch of GSM8K chat prompts of up to ~140 tokens pads to 160 (steps 4), 192 (steps 2)
    or 256 (steps 1), and every padded position costs as much as a real one in the prefill.
    """
    if steps < 1 or steps & (steps - 1):
        raise ValueError(f"prompt_bucket: steps={steps!r}; expected a power of two >= 1")
    length = max(int(length), int(minimum), 1)
    power = 1 << (length - 1).bit_length()
    quantum = max(power // (2 * steps), 1)
    return max(min(-(-length // quantum) * quantum, power), int(minimum))


# ---------------------------------------------------------------------------
# Decoder pieces that keep memory at one position of logits.
# ---------------------------------------------------------------------------


def hidden_states(model, tokens, positions, cache=None, cache_index=0, kv_mask=None):
    """The decoder's final-norm hidden states ``[B, L, D]`` (no LM head) and the cache.

    :meth:`Transformer.hidden_states`: prefill and scoring apply the LM head to only
    the positions they need instead of materialising ``[B, L, V]`` float32 logits
    (5 GB for B=32, L=256 on a 152k vocabulary).
    """
    return model.hidden_states(tokens, positions, cache, cache_index, kv_mask)


def lm_head(model, h):
    """Float32 logits ``[..., V]`` for hidden states ``h [..., D]`` (:meth:`Transformer.logits`)."""
    return model.logits(h)


def left_pad_mask(prompt_lengths, bucket: int, num_slots: int):
    """bool ``[rows, S]``: slot j holds a real token of the row iff ``j >= bucket - len``."""
    slots = jnp.arange(num_slots, dtype=jnp.int32)
    return slots[None, :] >= (bucket - prompt_lengths)[:, None]


def _prefill_impl(model, tokens, prompt_lengths, num_samples: int, max_new_tokens: int, mesh=None):
    """Prompts ``[B, P]`` -> (KVCache for R = B*K rows and S = P + T slots, last logits f32 ``[R, V]``).

    With a ``mesh`` (:mod:`~align_jax.llm.sharding`) the prompts and the cache are split over
    the data axis (when it divides their rows) and the cache over KV heads; the logits are
    split over rows only."""
    batch, bucket = tokens.shape
    num_slots = bucket + max_new_tokens
    tokens = sharding.constrain_rows(tokens, mesh)
    positions = jnp.maximum(jnp.arange(bucket, dtype=jnp.int32)[None, :] - (bucket - prompt_lengths)[:, None], 0)
    kv_mask = left_pad_mask(prompt_lengths, bucket, num_slots)
    cache = sharding.constrain_cache(model_lib.init_cache(model.config, batch, num_slots), mesh, model.config)
    h, cache = hidden_states(model, tokens, positions, cache, 0, kv_mask)
    last_logits = lm_head(model, h[:, -1])
    if num_samples > 1:
        cache = jax.tree.map(lambda x: jnp.repeat(x, num_samples, axis=0), cache)
        last_logits = jnp.repeat(last_logits, num_samples, axis=0)
    return sharding.constrain_cache(cache, mesh, model.config), sharding.constrain_rows(last_logits, mesh)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_samples", "max_new_tokens", "mesh"))
def prefill_cache(graphdef, state, tokens, prompt_lengths, *, num_samples: int, max_new_tokens: int, mesh=None):
    """The sampler's prefill: left-padded prompts ``[B, P]`` -> (KVCache for R = B*K rows
    and S = P + T slots, last logits f32 ``[R, V]``), input of :func:`~align_jax.llm.decode_loop.decode`.
    ``mesh`` (static): a :func:`~align_jax.llm.sharding.check_mesh`-ed mesh whose shardings
    ``state`` carries (:func:`~align_jax.llm.sharding.shard_params`), or None."""
    TRACE_COUNTS["prefill"] += 1
    return _prefill_impl(nnx.merge(graphdef, state), tokens, prompt_lengths, num_samples, max_new_tokens, mesh)



# ---------------------------------------------------------------------------
# The one-step API: prefill / step / gather / copy on a DecodeState.
# ---------------------------------------------------------------------------


class DecodeState(NamedTuple):
    """A batch of rows being decoded one step at a time (R rows, S cache slots).

    Attributes:
      cache: :class:`~align_jax.llm.model.KVCache`, per layer ``[R, Hkv, S, hd]``.
      kv_mask: bool ``[R, S]``: slots that hold (or will hold) a real token of the
        row; left padding and the padding of short steps are False. Attention also
        hides every slot at or after the one being written, so slots not written yet
        may be True.
      positions: int32 ``[R]`` RoPE position of each row's next token.
      next_slot: int32 ``[]`` first cache slot of the next write, shared by the rows
        (a step of L tokens writes slots ``[next_slot, next_slot + L)`` of every row).
    """

    cache: Any
    kv_mask: jax.Array
    positions: jax.Array
    next_slot: jax.Array

    @property
    def num_rows(self) -> int:
        """R."""
        return self.kv_mask.shape[0]


@functools.partial(jax.jit, static_argnames=("graphdef", "num_samples", "max_new_tokens", "mesh"))
def prefill(graphdef, params, tokens, prompt_lengths, *, num_samples: int = 1, max_new_tokens: int, mesh=None):
    """Runs left-padded prompts once and returns ``(logits f32 [R, V], DecodeState)``.

    Args:
      graphdef, params: ``nnx.split(model)`` (``graphdef`` static, ``params`` arrays).
      tokens: int32 ``[B, P]`` prompts, left-padded (:meth:`~align_jax.llm.sampler.Sampler.prepare` makes them).
      prompt_lengths: int32 ``[B]`` real lengths.
      num_samples: K rows per prompt (row ``b K + k``), static.
      max_new_tokens: slots reserved after the prompt bucket (S = P + this), static.
      mesh: (static) a mesh ``params`` is sharded on (:mod:`~align_jax.llm.sharding`), or None;
        the state's cache and row arrays are then split over its data axis.

    Returns:
      The logits after each row's last prompt token and the state whose next write
      goes to slot P at position ``prompt_lengths[b]``.
    """
    TRACE_COUNTS["prefill_state"] += 1
    cache, logits = _prefill_impl(nnx.merge(graphdef, params), tokens, prompt_lengths, num_samples,
                                  max_new_tokens, mesh)
    bucket = tokens.shape[1]
    lengths = sharding.constrain_rows(jnp.repeat(prompt_lengths.astype(jnp.int32), num_samples), mesh)
    kv_mask = sharding.constrain_rows(left_pad_mask(lengths, bucket, bucket + max_new_tokens), mesh)
    return logits, DecodeState(cache, kv_mask, lengths, jnp.asarray(bucket, jnp.int32))


def _step_impl(model, state: DecodeState, tokens, num_tokens=None, mesh=None):
    """The body of :func:`step` on a merged model."""
    if tokens.ndim == 1:
        tokens = tokens[:, None]
    rows, width = tokens.shape
    offsets = jnp.arange(width, dtype=jnp.int32)
    count = jnp.full((rows,), width, jnp.int32) if num_tokens is None else jnp.asarray(num_tokens, jnp.int32)
    real = offsets[None, :] < count[:, None]  # [R, L]
    kv_mask = jax.lax.dynamic_update_slice(state.kv_mask, real, (0, state.next_slot))
    positions = state.positions[:, None] + offsets[None, :]
    h, cache = hidden_states(model, tokens, positions, state.cache, state.next_slot, kv_mask)
    last = h[:, -1] if num_tokens is None else jnp.take_along_axis(
        h, jnp.maximum(count - 1, 0)[:, None, None], axis=1)[:, 0]
    logits = sharding.constrain_rows(lm_head(model, last), mesh)
    if mesh is not None:
        cache = sharding.constrain_cache(cache, mesh, model.config)
        kv_mask = sharding.constrain_rows(kv_mask, mesh)
    return logits, DecodeState(cache, kv_mask, state.positions + count, state.next_slot + width)


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh"), donate_argnames=("state",))
def step(graphdef, params, state: DecodeState, tokens, num_tokens=None, *, mesh=None):
    """Feeds each row its next tokens; returns ``(logits f32 [R, V], new DecodeState)``.

    Args:
      graphdef, params: ``nnx.split(model)``.
      state: the rows' :class:`DecodeState` (donated: its cache is updated in place).
      tokens: int32 ``[R]`` (one token per row) or ``[R, L]``.
      num_tokens: optional int32 ``[R]`` in ``[0, L]``: row r feeds only
        ``tokens[r, :num_tokens[r]]``; the rest is written as masked padding. Default L.

    Returns:
      The logits after each row's last real token (rows with ``num_tokens == 0``
      return the logits of the last slot, to be ignored) and the state advanced by
      ``num_tokens`` positions and L slots. The caller keeps ``next_slot + L <= S``
      (a write past the cache is clamped, as for any ``dynamic_update_slice``).
      With ``mesh`` (static, the mesh ``params`` is sharded on) the new state keeps the
      prefill's shardings (:mod:`~align_jax.llm.sharding`).
    """
    TRACE_COUNTS["step"] += 1
    return _step_impl(nnx.merge(graphdef, params), state, tokens, num_tokens, mesh)


def _take_rows(state: DecodeState, rows) -> DecodeState:
    take = lambda x: jnp.take(x, rows, axis=0)  # noqa: E731
    return DecodeState(jax.tree.map(take, state.cache), take(state.kv_mask), take(state.positions), state.next_slot)


@jax.jit
def _gather(state, rows):
    TRACE_COUNTS["gather"] += 1
    return _take_rows(state, rows)


@functools.partial(jax.jit, donate_argnames=("state",))
def _gather_donated(state, rows):
    TRACE_COUNTS["gather"] += 1
    return _take_rows(state, rows)


@functools.partial(jax.jit, donate_argnames=("state",))
def _copy(state, src_rows, dst_rows):
    TRACE_COUNTS["copy"] += 1
    put = lambda x: x.at[dst_rows].set(jnp.take(x, src_rows, axis=0))  # noqa: E731
    return DecodeState(jax.tree.map(put, state.cache), put(state.kv_mask), put(state.positions), state.next_slot)


def _check_rows(name: str, rows, limit: int):
    """Host-side range check of concrete row indices (traced ones pass through)."""
    if isinstance(rows, jax.core.Tracer):
        return rows
    arr = np.asarray(rows)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be a 1-D sequence of int row indices, got {arr.dtype}{list(arr.shape)}")
    bad = arr[(arr < 0) | (arr >= limit)]
    if bad.size:
        raise ValueError(f"{name} has row {int(bad[0])} outside [0, {limit})")
    return jnp.asarray(arr, jnp.int32)


def gather(state: DecodeState, rows) -> DecodeState:
    """The state of rows ``rows int32 [R']`` (repeats allowed): row i of the result is row
    ``rows[i]`` of ``state`` (cache, mask, position; ``next_slot`` is shared).

    ``state`` is donated when ``R' == R`` (a reordering or a resampling of the rows, as
    beam or tree search does each wave), so do not reuse it then; with another row count
    it is kept.

    Raises:
      ValueError: a concrete row index outside ``[0, R)``.
    """
    rows = _check_rows("rows", rows, state.num_rows)
    if rows.shape[0] == state.num_rows:
        return _gather_donated(state, rows)
    return _gather(state, rows)


def copy(state: DecodeState, src_rows, dst_rows) -> DecodeState:
    """``state`` with rows ``dst_rows [n]`` overwritten by rows ``src_rows [n]`` (in place:
    ``state`` is donated). Branching a node into several children is
    ``copy(state, [parent] * n, children)``.

    Raises:
      ValueError: lengths differ, an index out of range, or a repeated destination.
    """
    src = _check_rows("src_rows", src_rows, state.num_rows)
    dst = _check_rows("dst_rows", dst_rows, state.num_rows)
    if src.shape != dst.shape:
        raise ValueError(f"src_rows has {src.shape[0]} rows and dst_rows {dst.shape[0]}; they must match")
    if not isinstance(dst, jax.core.Tracer) and len(set(np.asarray(dst).tolist())) != dst.shape[0]:
        raise ValueError("dst_rows has a repeated row (which copy would win is undefined)")
    return _copy(state, src, dst)
