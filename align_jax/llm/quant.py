"""Block-quantized weights: GGUF blocks kept as int8 codes, and the matmul that uses them.

Every GGUF block format handled here stores, for each block of ``bs`` consecutive
weights along the input dimension, integer codes and a float scale (and for some
formats an offset)::

    w[n, k] = scale[n, j] * codes[n, k] + offset[n, j],      j = k // bs

=========  ====  =========================  =======================================
format     bs    codes                      scale / offset (float32)
=========  ====  =========================  =======================================
Q4_0       32    q - 8     in [-8, 7]       d
Q4_1       32    q         in [0, 15]       d / m
Q5_0       32    q - 16    in [-16, 15]     d
Q5_1       32    q         in [0, 31]       d / m
Q8_0       32    q         in [-128, 127]   d
Q2_K       16    q         in [0, 3]        d * sc_j / -(dmin * m_j)
Q4_K       32    q         in [0, 15]       d * sc_j / -(dmin * m_j)
Q5_K       32    q         in [0, 31]       d * sc_j / -(dmin * m_j)
Q6_K       16    q - 32    in [-32, 31]     d * sc_j
=========  ====  =========================  =======================================

:func:`unpack_gguf` turns a tensor's raw GGUF bytes into ``(codes int8 [N, K], scale
f32 [N, K/bs], offset f32 [N, K/bs] or None)``. The codes are read with ``gguf``'s own
bit unpacking (its ``dequantize_blocks`` applied to the blocks with their scale fields
set to 1 and their offsets to 0), the scales and offsets from the block headers with
the same float32 products ``gguf`` computes. ``scale * codes + offset`` in float32 is
then bit-identical to ``gguf.quants.dequantize`` (``scale * codes`` is exact in float32
for every format above, so the one rounding is that of the addition); a test checks
this for every format on random blocks and on the real models' tensors.

:func:`quantized_matmul` multiplies activations by such a matrix without ever
materialising it in float32: on the CPU through the native kernel of
:mod:`align_jax.llm.kernels` (which streams 1.25 bytes per weight for block 32
instead of 4), elsewhere, or where the kernel cannot be built, by dequantizing in XLA.
The weights are the same float32 values in both cases; only the summation order of
the matmul differs from a dense float32 model.

Shapes: N outputs (rows of the code matrix), K inputs, bs block size, nb = K / bs.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "QUANTIZED_GGUF_TYPES",
    "QuantizedTensor",
    "unpack_gguf",
    "dequantize_numpy",
    "dequantize",
    "quantized_matmul",
    "quantize_q8_0",
    "COMPUTE_DTYPES",
]


class QuantizedTensor(NamedTuple):
    """A block-quantized matrix ``w [N, K] = scale * codes + offset`` (per block of ``block_size``).

    Attributes:
      codes: int8 ``[N, K]``.
      scale: float32 ``[N, K / block_size]``.
      offset: float32 ``[N, K / block_size]``, or None (zero).
      block_size: bs, 16 or 32.
    """

    codes: np.ndarray
    scale: np.ndarray
    offset: np.ndarray | None
    block_size: int


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """float32 ``[nblk, 1]`` from the little-endian float16 at byte ``start`` of each block."""
    return np.ascontiguousarray(blocks[:, start:start + 2]).view(np.float16).astype(np.float32)


def _k_scale_min(blocks: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
    import gguf

    sc, m = gguf.quants.Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, start:start + 12]))
    return sc.astype(np.float32), m.astype(np.float32)


# Per format: sub-block size; the header bytes that make every scale 1 and every offset 0
# (byte offset, bytes); and the function reading (scale [nblk, nsub], offset or None).
_ONE_F16 = np.float16(1.0).tobytes()
_ZERO_F16 = np.float16(0.0).tobytes()
_LAYOUTS = {
    "Q4_0": (32, [(0, _ONE_F16)], lambda b: (_f16(b, 0), None)),
    "Q4_1": (32, [(0, _ONE_F16), (2, _ZERO_F16)], lambda b: (_f16(b, 0), _f16(b, 2))),
    "Q5_0": (32, [(0, _ONE_F16)], lambda b: (_f16(b, 0), None)),
    "Q5_1": (32, [(0, _ONE_F16), (2, _ZERO_F16)], lambda b: (_f16(b, 0), _f16(b, 2))),
    "Q8_0": (32, [(0, _ONE_F16)], lambda b: (_f16(b, 0), None)),
    # Q2_K: scales[16] (low nibble sc, high nibble m), qs[64], d, dmin
    "Q2_K": (16, [(0, bytes([0x01] * 16)), (80, _ONE_F16), (82, _ZERO_F16)],
             lambda b: (_f16(b, 80) * (b[:, :16] & 0xF).astype(np.float32),
                        -(_f16(b, 82) * (b[:, :16] >> 4).astype(np.float32)))),
    # Q4_K / Q5_K: d, dmin, 12 bytes of packed 6-bit (sc, m), then the codes
    "Q4_K": (32, [(0, _ONE_F16), (2, _ZERO_F16), (4, bytes([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1]))],
             lambda b: _k_scales(b)),
    "Q5_K": (32, [(0, _ONE_F16), (2, _ZERO_F16), (4, bytes([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1]))],
             lambda b: _k_scales(b)),
    # Q6_K: ql[128], qh[64], scales[16] (int8), d
    "Q6_K": (16, [(192, bytes([1] * 16)), (208, _ONE_F16)],
             lambda b: (_f16(b, 208) * np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32), None)),
}


def _k_scales(blocks: np.ndarray):
    sc, m = _k_scale_min(blocks, 4)
    return _f16(blocks, 0) * sc, -(_f16(blocks, 2) * m)


#: GGUF block formats :func:`unpack_gguf` keeps quantized (others load dequantized).
QUANTIZED_GGUF_TYPES = tuple(_LAYOUTS)


def unpack_gguf(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> QuantizedTensor:
    """Codes, scales and offsets of one GGUF tensor.

    Args:
      raw: the tensor's bytes as stored (uint8, any shape; ``GGUFReader`` tensor data).
      type_name: its ``gguf.GGMLQuantizationType`` name, one of :data:`QUANTIZED_GGUF_TYPES`.
      shape: ``(N, K)`` in torch order (``reversed`` ggml shape): rows are outputs.

    Returns:
      :class:`QuantizedTensor` with codes ``[N, K]`` and scale/offset ``[N, K / bs]``.
    """
    import gguf

    if type_name not in _LAYOUTS:
        raise ValueError(f"GGML type {type_name} is not kept quantized; supported: {QUANTIZED_GGUF_TYPES}")
    qtype = gguf.GGMLQuantizationType[type_name]
    block_elems, type_size = gguf.GGML_QUANT_SIZES[qtype]
    sub, unit_fields, read_scales = _LAYOUTS[type_name]
    rows, cols = int(shape[0]), int(shape[1])
    if cols % block_elems:
        raise ValueError(f"{type_name} tensor of shape {shape}: K={cols} is not a multiple of {block_elems}")
    blocks = np.asarray(raw, dtype=np.uint8).reshape(-1, type_size)
    if blocks.shape[0] != rows * cols // block_elems:
        raise ValueError(f"{type_name} tensor of shape {shape}: {blocks.shape[0]} blocks, "
                         f"expected {rows * cols // block_elems}")
    unit = blocks.copy()
    for start, value in unit_fields:
        unit[:, start:start + len(value)] = np.frombuffer(value, np.uint8)
    kind = getattr(gguf.quants, type_name)
    codes = kind.dequantize_blocks(unit).astype(np.int8).reshape(rows, cols)
    scale, offset = read_scales(blocks)
    scale = np.ascontiguousarray(scale, np.float32).reshape(rows, cols // sub)
    if offset is not None:
        offset = np.ascontiguousarray(offset, np.float32).reshape(rows, cols // sub)
    return QuantizedTensor(codes, scale, offset, sub)


def dequantize_numpy(tensor: QuantizedTensor) -> np.ndarray:
    """float32 ``[N, K]`` = ``scale * codes + offset`` (bit-identical to ``gguf``'s dequantization)."""
    codes, scale, offset, bs = tensor
    n, k = codes.shape
    out = codes.reshape(n, k // bs, bs).astype(np.float32) * scale[:, :, None]
    if offset is not None:
        out = out + offset[:, :, None]
    return out.reshape(n, k)


def quantize_q8_0(weight: np.ndarray) -> QuantizedTensor:
    """Quantize a float matrix ``[N, K]`` (K a multiple of 32) to Q8_0 with ``gguf``'s reference quantizer.

    For dense checkpoints (Hugging Face directories): int8 codes and one scale per 32
    weights, bit-exact with llama.cpp's Q8_0. Unlike the GGUF formats above this changes
    the weights (by at most half a step, ``max|w| / 254`` per block).
    """
    import gguf

    weight = np.ascontiguousarray(weight, np.float32)
    packed = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0)
    return unpack_gguf(packed, "Q8_0", weight.shape)


def dequantize(codes: jax.Array, scale: jax.Array, offset: jax.Array | None) -> jax.Array:
    """JAX form of :func:`dequantize_numpy`: float32 ``[N, K]`` (block size ``K / nb``)."""
    n, k = codes.shape
    nb = scale.shape[-1]
    w = codes.reshape(n, nb, k // nb).astype(jnp.float32) * scale[:, :, None]
    if offset is not None:
        w = w + offset[:, :, None]
    return w.reshape(n, k)


def _xla_matmul(x2, codes, scale, offset, compute_dtype="float32"):
    w = dequantize(codes, scale, offset)
    if compute_dtype == "bfloat16":
        x2, w = x2.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    return jax.lax.dot_general(x2, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


COMPUTE_DTYPES = ("float32", "bfloat16")


def quantized_matmul(x: jax.Array, codes: jax.Array, scale: jax.Array, offset: jax.Array | None = None,
                     compute_dtype: str = "float32") -> jax.Array:
    """``x [..., K] @ w.T`` for the block-quantized ``w [N, K]``; float32 ``[..., N]``.

    ``w = scale * codes + offset`` per block (``block_size = K / scale.shape[1]``).

    ``compute_dtype="float32"`` (default): the exact float32 product of ``x`` and ``w``
    (only the summation order differs from a dense matmul). ``"bfloat16"``: ``x`` and
    ``w`` are rounded to bfloat16 and the products accumulated in float32, the same
    arithmetic as a dense model with ``param_dtype="bfloat16"``; on CPUs with AMX tile
    units the native kernel then runs products of 16 or more rows on them.

    On the CPU the native kernel streams the int8 codes (falling back to XLA when it cannot
    be built); on other backends XLA dequantizes and multiplies.
    """
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"quantized_matmul: compute_dtype={compute_dtype!r}; expected one of {COMPUTE_DTYPES}")
    from align_jax.llm import kernels

    lead, k = x.shape[:-1], x.shape[-1]
    n = codes.shape[0]
    if codes.shape[1] != k or scale.shape[0] != n or k % scale.shape[1]:
        raise ValueError(f"quantized_matmul: x [..., {k}], codes {codes.shape}, scale {scale.shape} disagree")
    rows = int(np.prod(lead, dtype=np.int64)) if lead else 1
    x2 = x.reshape(rows, k).astype(jnp.float32)
    block = k // scale.shape[1]
    if rows == 0:
        return jnp.zeros((*lead, n), jnp.float32)
    if kernels.load() and block % 16 == 0:
        no_offset = jnp.zeros((n, 0), jnp.float32)

        def native(x2, codes, scale, offset):
            call = jax.ffi.ffi_call(kernels.QMATMUL_TARGET, jax.ShapeDtypeStruct((rows, n), jnp.float32),
                                    vmap_method="sequential")
            return call(x2, codes, scale, no_offset if offset is None else offset, block_size=np.int64(block),
                        bf16=np.int64(compute_dtype == "bfloat16"))

        def fallback(x2, codes, scale, offset):
            return _xla_matmul(x2, codes, scale, offset, compute_dtype)

        out = jax.lax.platform_dependent(x2, codes, scale, offset, cpu=native, default=fallback)
    else:
        out = _xla_matmul(x2, codes, scale, offset, compute_dtype)
    return out.reshape(*lead, n)
