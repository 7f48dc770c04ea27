"""Decode-step attention: one new query per row against a static KV cache.

For query head ``h = j * G + g`` of row ``b`` (kv head ``j``; G = H / Hkv query heads per kv
head)::

    score[s] = scale * q[b, j, g] . k[b, j, s]          for the slots s with visible[b, s]
    out[b, j, g] = sum_s softmax(score)[s] v[b, j, s]

A row with no visible slot attends uniformly to all S slots (the semantics of masking the
scores to the lowest float before the softmax, which :func:`decode_attention_reference`
does and the decoder used before).

:func:`decode_attention` runs the native kernel of :mod:`align_jax.llm.kernels` on the CPU
(each (row, kv head) pair reads its keys and values once; XLA:CPU spends about 1 ms per layer
on the same work at 32 rows and 256 slots, as a dozen small fused ops) and
:func:`decode_attention_reference` elsewhere. Shapes: B rows, Hkv kv heads, G query heads per
kv head, S cache slots, hd head dimension.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["decode_attention", "decode_attention_reference"]


def decode_attention_reference(q: jax.Array, keys: jax.Array, values: jax.Array, visible: jax.Array,
                               scale: float) -> jax.Array:
    """XLA form of :func:`decode_attention` (float32 softmax): ``[B, Hkv, G, hd]``."""
    batch = ((0, 1), (0, 1))
    scores = jax.lax.dot_general(keys, q, (((3,), (3,)), batch), preferred_element_type=jnp.float32) * scale
    scores = jnp.where(visible[:, None, :, None], scores, jnp.finfo(jnp.float32).min)  # [B, Hkv, S, G]
    probs = jax.nn.softmax(scores, axis=2).astype(values.dtype)
    return jax.lax.dot_general(probs, values, (((2,), (2,)), batch))  # [B, Hkv, G, hd]


def decode_attention(q: jax.Array, keys: jax.Array, values: jax.Array, visible: jax.Array,
                     scale: float) -> jax.Array:
    """Attention of one query per row over the cache.

    Args:
      q: ``[B, Hkv, G, hd]`` queries (after RoPE).
      keys, values: ``[B, Hkv, S, hd]``, the cache (already holding this step's key/value).
      visible: bool ``[B, S]``, the slots each row may attend to.
      scale: the score scale, usually ``hd ** -0.5``.

    Returns:
      ``[B, Hkv, G, hd]`` in ``values.dtype``. float32 inputs with ``hd`` a multiple of 16 use
      the native kernel on the CPU; anything else the XLA reference.
    """
    from align_jax.llm import kernels

    b, hkv, g, hd = q.shape
    native_ok = (q.dtype == keys.dtype == values.dtype == jnp.float32 and hd % 16 == 0 and hd <= 256
                 and keys.shape[:2] == (b, hkv) and keys.shape[3] == hd and visible.shape == (b, keys.shape[2]))
    if not (native_ok and kernels.load()):
        return decode_attention_reference(q, keys, values, visible, scale)

    def native(q, keys, values, visible):
        call = jax.ffi.ffi_call(kernels.ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                vmap_method="sequential")
        return call(q, keys, values, visible.astype(bool), scale=np.float32(scale))

    def fallback(q, keys, values, visible):
        return decode_attention_reference(q, keys, values, visible, scale)

    return jax.lax.platform_dependent(q, keys, values, visible, cpu=native, default=fallback)
