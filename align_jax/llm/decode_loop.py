"""The batched decode: one compiled ``lax.while_loop`` that fills a ``[R, T]`` token buffer.

:class:`~align_jax.llm.sampler.Sampler` runs it after :func:`~align_jax.llm.decoding.prefill_cache`
(the cache is donated and updated in place). Step t draws token t of every row with the
key ``fold_in(fold_in(fold_in(key, b), k), t)`` (or ``fold_in(fold_in(key[b], k), t)`` with one key
per prompt), so sample k of prompt b does not depend on K or on the other prompts; the loop stops as soon as every row has finished (EOS id,
on-device stop-token sequence, or T tokens). A logits processor sees a
:class:`SamplerStepState` each step and may thread its own state (``user``) through the
loop. The static settings are a hashable :class:`DecodeSpec` (one compiled program per
value); the output is a device-side :class:`DecodeResult`.

Shapes: R = B * K rows (row ``b K + k``), T = ``max_new_tokens``, S cache slots, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from align_jax.llm import sharding
from align_jax.llm.decoding import TRACE_COUNTS, left_pad_mask
from align_jax.llm.logits import DEFAULT_NUM_CANDIDATES, sample_tokens

__all__ = [
    "SamplerStepState",
    "DecodeSpec",
    "DecodeResult",
    "decode",
    "decode_donating",
    "decode_compacting",
    "FINISH_LENGTH",
    "FINISH_EOS",
    "FINISH_STOP",
    "FINISH_NAMES",
]

FINISH_LENGTH, FINISH_EOS, FINISH_STOP = 0, 1, 2
#: Finish code -> the reason reported in :attr:`~align_jax.llm.sampler.SampleOutput.finish_reasons`.
FINISH_NAMES = {FINISH_LENGTH: "length", FINISH_EOS: "eos", FINISH_STOP: "stop"}


class SamplerStepState(NamedTuple):
    """What a logits processor sees at one decoding step (all leaves traced).

    Attributes:
      step: int32 scalar t, index of the token being chosen (0 = first new token).
      tokens: int32 ``[R, T]`` tokens generated so far; entries ``>= t`` are padding.
      positions: int32 ``[R]`` RoPE position of the token being chosen
        (the row's prompt length + t).
      done: bool ``[R]`` rows that have already finished (their choice is discarded).
      user: the caller's pytree (``processor_state``), threaded through the loop and
        updated by the processor (when it returns ``(logits, user)``) and by
        ``processor_update``.
      params: the caller's constant pytree (``processor_params``: tables, a guide
        model's weights), an argument of the jit that is never donated nor updated.
    """

    step: jax.Array
    tokens: jax.Array
    positions: jax.Array
    done: jax.Array
    user: Any
    params: Any = None


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """Static (hashable) part of a decode call; one compiled program per distinct value.

    Attributes:
      max_new_tokens: T, size of the token buffer.
      top_k: static top-k (None = off).
      num_candidates: candidate-set size C for top-p when ``top_k`` is None.
      full_vocab: whether some row samples from the full vocabulary (top_p == 1, no top_k).
      all_greedy: every row has temperature 0 (token choice is a plain ``argmax``).
      eos_token_ids: ids that finish a row (empty with ``ignore_eos``).
      stop_token_sequences: token-id sequences that finish a row when generated.
      pad_token_id: id written after a row finished.
      logits_processor: ``(logits f32[R, V], SamplerStepState) -> logits`` or
        ``-> (logits, user)`` (the new user pytree, seen by ``processor_update``), or None.
        Compared by identity: reuse the same function object to avoid recompiles.
      processor_update: ``(user, tokens int32[R], SamplerStepState) -> user`` or None,
        run after each step to advance the processor's own state.
    """

    max_new_tokens: int
    top_k: int | None = None
    num_candidates: int = DEFAULT_NUM_CANDIDATES
    full_vocab: bool = True
    all_greedy: bool = False
    eos_token_ids: tuple[int, ...] = ()
    stop_token_sequences: tuple[tuple[int, ...], ...] = ()
    pad_token_id: int = 0
    logits_processor: Callable | None = None
    processor_update: Callable | None = None


class DecodeResult(NamedTuple):
    """Device-side output of :meth:`Sampler.decode` (R rows, T = max_new_tokens).

    Attributes:
      tokens: int32 ``[R, T]``, ``pad_token_id`` after each row's length.
      lengths: int32 ``[R]`` generated tokens per row, including the EOS / stop token.
      logprobs: float32 ``[R, T]`` raw model log-probs of the tokens (0 after length).
      sampling_logprobs: float32 ``[R, T]`` log-probs under the sampling distribution.
      finish_code: int32 ``[R]``: 0 length, 1 EOS, 2 on-device stop sequence.
      num_steps: int32 scalar, decoding steps run (< T when all rows stopped early).
      processor_state: the final user pytree.
      cache: the KV cache after decoding (it aliases the donated input buffer, so
        the loop updates it in place; slots ``[P, P + num_steps - 1)`` hold the
        generated tokens' keys/values).
    """

    tokens: jax.Array
    lengths: jax.Array
    logprobs: jax.Array
    sampling_logprobs: jax.Array
    finish_code: jax.Array
    num_steps: jax.Array
    processor_state: Any
    cache: Any



class _Carry(NamedTuple):
    step: jax.Array
    cache: Any
    last_tokens: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    sampling_logprobs: jax.Array
    lengths: jax.Array
    done: jax.Array
    finish_code: jax.Array
    user: Any


def per_prompt_keys(key) -> bool:
    """Whether ``key`` is typed keys ``[B]``, one per prompt (else one key for the whole call)."""
    return bool(jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 1)


def _decode_impl(graphdef, state, cache, first_logits, prompt_lengths, key, temperature, top_p,
                 processor_state, processor_params, row_active=None, row_ids=None, *, spec: DecodeSpec,
                 num_samples: int, mesh=None, stop_below: int = 0, resume: bool = False):
    """Fills the ``[R, T]`` token buffer from a prefilled cache; returns a :class:`DecodeResult`.

    Args:
      graphdef, state: ``nnx.split(model)`` (``graphdef`` static).
      cache: the KVCache of :func:`~align_jax.llm.decoding.prefill_cache` (donated).
      first_logits: f32 ``[R, V]`` logits after each row's last prompt token.
      prompt_lengths: int32 ``[R]`` real prompt length of each row.
      key: the PRNG key of the call, or typed keys ``[B]``, one per prompt (prompt b's key is
        then ``key[b]`` instead of ``fold_in(key, b)``); temperature, top_p: f32 ``[R]``.
      processor_state, processor_params: the logits processor's user and constant pytrees.
      row_active: optional bool ``[R]``; False marks a padding row (added so that a mesh's
        data axis divides R), finished before the first step (no tokens, length 0).
      spec: the static :class:`DecodeSpec`; num_samples: K (static).
      mesh: (static) the mesh ``state`` is sharded on (:mod:`~align_jax.llm.sharding`), or None:
        the cache stays split over rows and KV heads, the row buffers over rows, and each
        step's logits are gathered whole over the vocabulary.
      row_ids: optional int32 ``[R]``, the row each row is in the original batch (its sampling
        key); default ``arange(R)``. Set by :func:`decode_compacting` for a compacted batch.
      stop_below: (static) leave the loop early once at most this many rows are still
        decoding (0: run to the end); :func:`decode_compacting` then drops the finished rows.
      resume: (static) ``cache`` is a whole loop state (a ``_Carry``) of an earlier call made
        with ``stop_below``, and ``first_logits`` is ignored; the call returns the loop state
        instead of a :class:`DecodeResult` whenever ``stop_below > 0 or resume``.
    """
    TRACE_COUNTS["decode"] += 1
    model = nnx.merge(graphdef, state)
    rows = prompt_lengths.shape[0]
    kv_cache = cache.cache if resume else cache
    bucket = kv_cache.num_slots - spec.max_new_tokens
    num_slots = kv_cache.num_slots
    kv_mask = left_pad_mask(prompt_lengths, bucket, num_slots)
    if row_ids is None:
        row_ids = jnp.arange(rows, dtype=jnp.int32)
    if not per_prompt_keys(key):  # one key: prompt b's is fold_in(key, b)
        row_keys = jax.vmap(
            lambda r: jax.random.fold_in(jax.random.fold_in(key, r // num_samples), r % num_samples)
        )(row_ids)
    else:  # one key per prompt ([B] typed keys): the prompt's key is its own
        row_keys = jax.vmap(lambda r: jax.random.fold_in(key[r // num_samples], r % num_samples))(row_ids)
    eos = jnp.asarray(spec.eos_token_ids, jnp.int32) if spec.eos_token_ids else None
    rows_of = lambda x: sharding.constrain_rows(x, mesh)  # noqa: E731

    def choose(carry: _Carry, logits: jax.Array) -> _Carry:
        t = carry.step
        step_state = SamplerStepState(t, carry.tokens, prompt_lengths + t, carry.done, carry.user,
                                      processor_params)
        raw_norm = jax.nn.logsumexp(logits, axis=-1)
        processed = logits
        if spec.logits_processor is not None:
            processed = spec.logits_processor(logits, step_state)
            if isinstance(processed, tuple):  # (logits, user): the processor updated its state
                processed, new_user = processed
                step_state = step_state._replace(user=new_user)
        keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(row_keys)
        sampled = sample_tokens(
            keys, processed, temperature, top_p, top_k=spec.top_k,
            num_candidates=spec.num_candidates, full_vocab=spec.full_vocab,
            all_greedy=spec.all_greedy,
        )
        active = ~carry.done
        token = jnp.where(active, sampled.tokens, spec.pad_token_id)
        raw_lp = jnp.take_along_axis(logits, sampled.tokens[:, None], axis=-1)[:, 0] - raw_norm
        tokens = jax.lax.dynamic_update_slice(carry.tokens, token[:, None], (0, t))
        logprobs = jax.lax.dynamic_update_slice(
            carry.logprobs, jnp.where(active, raw_lp, 0.0)[:, None], (0, t))
        sampling_logprobs = jax.lax.dynamic_update_slice(
            carry.sampling_logprobs, jnp.where(active, sampled.sampling_logprobs, 0.0)[:, None], (0, t))
        finish = carry.finish_code
        ended = jnp.zeros_like(active)
        if eos is not None:
            hit = active & jnp.any(token[:, None] == eos[None, :], axis=-1)
            finish = jnp.where(hit, FINISH_EOS, finish)
            ended = ended | hit
        for seq in spec.stop_token_sequences:
            n = len(seq)
            window = jax.lax.dynamic_slice(tokens, (0, jnp.maximum(t + 1 - n, 0)), (rows, n))
            hit = active & (t + 1 >= n) & jnp.all(window == jnp.asarray(seq, jnp.int32)[None], axis=-1)
            finish = jnp.where(hit & ~ended, FINISH_STOP, finish)
            ended = ended | hit
        user = step_state.user
        if spec.processor_update is not None:
            user = spec.processor_update(user, token, step_state)
        return carry._replace(
            step=t + 1, last_tokens=token, tokens=tokens, logprobs=logprobs,
            sampling_logprobs=sampling_logprobs, lengths=carry.lengths + active.astype(jnp.int32),
            done=carry.done | ended, finish_code=finish, user=user,
        )

    t_max = spec.max_new_tokens

    def cond(c: _Carry):
        return (c.step < t_max) & (jnp.sum(~c.done) > stop_below)

    def body(c: _Carry) -> _Carry:
        prev = c.step - 1
        positions = (prompt_lengths + prev)[:, None]
        logits, new_cache = model(c.last_tokens[:, None], positions, c.cache, bucket + prev, kv_mask)
        if mesh is not None:
            new_cache = sharding.constrain_cache(new_cache, mesh, model.config)
        return choose(c._replace(cache=new_cache), rows_of(logits[:, 0]))

    if resume:
        return jax.lax.while_loop(cond, body, cache)
    carry = _Carry(
        step=jnp.zeros((), jnp.int32),
        cache=sharding.constrain_cache(cache, mesh, model.config),
        last_tokens=rows_of(jnp.zeros((rows,), jnp.int32)),
        tokens=rows_of(jnp.full((rows, t_max), spec.pad_token_id, jnp.int32)),
        logprobs=rows_of(jnp.zeros((rows, t_max), jnp.float32)),
        sampling_logprobs=rows_of(jnp.zeros((rows, t_max), jnp.float32)),
        lengths=rows_of(jnp.zeros((rows,), jnp.int32)),
        done=rows_of(jnp.zeros((rows,), bool) if row_active is None else ~row_active.astype(bool)),
        finish_code=rows_of(jnp.zeros((rows,), jnp.int32)),
        user=processor_state,
    )
    carry = choose(carry, rows_of(first_logits))
    carry = jax.lax.while_loop(cond, body, carry)
    if stop_below > 0:
        return carry
    return DecodeResult(
        tokens=carry.tokens, lengths=carry.lengths, logprobs=carry.logprobs,
        sampling_logprobs=carry.sampling_logprobs, finish_code=carry.finish_code,
        num_steps=carry.step, processor_state=carry.user, cache=carry.cache,
    )


_DECODE_STATIC = ("graphdef", "spec", "num_samples", "mesh", "stop_below", "resume")
decode = jax.jit(_decode_impl, static_argnames=_DECODE_STATIC, donate_argnames=("cache",))
# The same program with the processor state donated too (a guide model's KV cache in
# the processor state is then updated in place instead of living twice in memory).
decode_donating = jax.jit(_decode_impl, static_argnames=_DECODE_STATIC,
                          donate_argnames=("cache", "processor_state"))


@jax.jit
def _take_rows(carry: _Carry, index: jax.Array) -> _Carry:
    """The loop state of rows ``index`` (every leaf but the shared step is row-major)."""
    step = carry.step
    taken = jax.tree.map(lambda x: x[index], carry._replace(step=None))
    return taken._replace(step=step)


def decode_compacting(graphdef, state, cache, first_logits, prompt_lengths, key, temperature, top_p, *,
                      spec: DecodeSpec, num_samples: int, min_rows: int = 8) -> DecodeResult:
    """:func:`decode` that halves its batch whenever half of the rows have finished.

    A batch decodes until its longest row ends, so rows that finished early keep costing a
    full row of every step. Here the loop leaves the compiled program once at most ``R / 2``
    rows are still decoding; their loop state (KV cache, token buffers, flags) is gathered into
    an ``R / 2``-row batch (the free places filled with finished copies) and decoding goes on
    there, down to ``min_rows`` rows. Each row keeps its sampling key (``row_ids``) and its own
    computation, so the tokens are those of :func:`decode`; one program is compiled per batch
    size on the ladder ``R, R / 2, ...`` (reused by every later call of the same shape).
    Without a logits processor only (a processor's state has no known row layout).

    Args: as :func:`decode` (no processor, no mesh); ``min_rows``: smallest compacted batch.

    Returns:
      :class:`DecodeResult` with host (NumPy) arrays for the original R rows; ``cache`` and
      ``processor_state`` are None.
    """
    if spec.logits_processor is not None or spec.processor_update is not None:
        raise ValueError("decode_compacting: logits processors are not supported; use decode")
    rows = int(prompt_lengths.shape[0])
    t_max = spec.max_new_tokens
    out = {
        "tokens": np.full((rows, t_max), spec.pad_token_id, np.int32),
        "logprobs": np.zeros((rows, t_max), np.float32),
        "sampling_logprobs": np.zeros((rows, t_max), np.float32),
        "lengths": np.zeros((rows,), np.int32),
        "finish_code": np.zeros((rows,), np.int32),
    }
    owner = np.arange(rows)  # original row of each current row; -1 for a filler

    def half(size: int) -> int:
        return size // 2 if size // 2 >= min_rows else 0

    def write(carry: _Carry, which: np.ndarray) -> None:
        host = jax.device_get({name: getattr(carry, name) for name in out})
        for name, value in host.items():
            out[name][owner[which]] = value[which]

    static = dict(spec=spec, num_samples=num_samples)
    carry = decode(graphdef, state, cache, first_logits, prompt_lengths, key, temperature, top_p, None, None,
                   None, None, stop_below=half(rows), **static)
    if not half(rows):  # too few rows to compact: a plain decode
        host = jax.device_get(carry)
        return host._replace(processor_state=None, cache=None)
    size = rows
    while True:
        step, done = jax.device_get((carry.step, carry.done))
        real = owner >= 0
        if int(step) >= t_max or bool(done.all()) or not half(size):
            write(carry, np.flatnonzero(real))
            break
        write(carry, np.flatnonzero(done & real))
        keep = np.flatnonzero(~done)
        size = half(size)
        fill = size - keep.size
        index = np.concatenate([keep, np.full(fill, keep[0])]).astype(np.int32)
        carry = _take_rows(carry, jnp.asarray(index))
        carry = carry._replace(done=carry.done.at[keep.size:].set(True))
        owner = np.concatenate([owner[keep], np.full(fill, -1)])
        pick = jnp.asarray(index)
        prompt_lengths, temperature, top_p = prompt_lengths[pick], temperature[pick], top_p[pick]
        row_ids = jnp.asarray(np.maximum(owner, 0), jnp.int32)
        carry = decode(graphdef, state, carry, None, prompt_lengths, key, temperature, top_p, None, None,
                       None, row_ids, stop_below=half(size), resume=True, **static)
    return DecodeResult(tokens=out["tokens"], lengths=out["lengths"], logprobs=out["logprobs"],
                        sampling_logprobs=out["sampling_logprobs"], finish_code=out["finish_code"],
                        num_steps=np.asarray(step, np.int32), processor_state=None, cache=None)
