"""Decoder-only transformer in Flax NNX for the Llama (SmolLM2) and Qwen2 families.

One readable file, in the style of the Flax NNX Gemma example and jax-llm-examples:

* RMSNorm -> grouped-query self-attention with rotary embeddings -> residual ->
  RMSNorm -> SwiGLU MLP -> residual, repeated ``num_layers`` times, then a final
  RMSNorm and the (optionally tied) language-model head.
* Grouped-query attention is computed by reshaping the queries to
  ``[B, L, num_kv_heads, G, head_dim]`` (``G = num_heads // num_kv_heads``) and
  contracting against the un-repeated keys/values with ``einsum``: k/v are never
  tiled.
* The KV cache holds one static-shape array per layer for k and for v,
  ``[B, Hkv, S, hd]`` (heads before slots, the layout the attention contractions
  consume without a transpose), updated in place with ``lax.dynamic_update_slice``,
  so a jitted decode step that donates the cache copies nothing: no layer slices a
  stacked ``[num_layers, ...]`` array (on a CPU that copy cost 40% of a decode step).
* Logits are always float32 (the final matmul accumulates in float32 even when
  the parameters are bfloat16).
* Mixed precision: ``param_dtype="bfloat16"`` with ``dtype="float32"`` stores the
  weights in bfloat16 (half the bytes a decode step streams) while activations,
  norms, RoPE, attention and the KV cache stay float32; every projection is
  ``dot(x.astype(bf16), W_bf16)`` accumulated in float32. XLA:CPU runs such matmuls
  on the bfloat16 matrix units (AMX / AVX512-BF16) 2.5-4x faster than float32 for
  8 or more rows, but 3-10x *slower* for fewer rows, so :func:`matmul` pads the
  rows to :data:`MIN_MATMUL_ROWS` (a batch-1 decode step multiplies 8 rows).
* Quantized weights: the modules ``ModelConfig.quantized`` lists hold a GGUF's block-quantized
  matrices as int8 codes + per-block scales (:class:`QuantizedLinear`, :class:`QuantizedEmbed`,
  :mod:`align_jax.llm.quant`) and multiply through a native XLA:CPU kernel that streams the
  codes: the same weight values as the float32 model at about a quarter of the bytes.

Shapes use B batch, L new tokens, S cache slots, V vocabulary, D hidden size,
H query heads, Hkv key/value heads, G = H / Hkv, hd head dimension.

For jitted code use :func:`forward` on ``nnx.split(model)``: the weights are then
ordinary array arguments, never static values.
"""

from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from align_jax.llm.attention import decode_attention
from align_jax.llm.quant import quantized_matmul

__all__ = [
    "ModelConfig",
    "KVCache",
    "init_cache",
    "Transformer",
    "QuantizedLinear",
    "QuantizedEmbed",
    "forward",
    "matmul",
    "MIN_MATMUL_ROWS",
    "SUPPORTED_ARCHS",
]

SUPPORTED_ARCHS = ("llama", "qwen2")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static shape of a decoder; hashable, so usable as a ``jax.jit`` static argument.

    Attributes:
      arch: ``"llama"`` or ``"qwen2"``.
      vocab_size: V, rows of the embedding table.
      hidden_size: D.
      intermediate_size: width of the SwiGLU MLP.
      num_layers: number of decoder blocks.
      num_heads: H query heads.
      num_kv_heads: Hkv key/value heads (H must be a multiple of Hkv).
      head_dim: hd, per-head width (q_proj maps D -> H * hd).
      rope_theta: RoPE base, ``inv_freq_i = theta ** (-2 i / hd)``.
      rms_norm_eps: epsilon inside the RMSNorm square root.
      max_position_embeddings: the model's context length (used to validate
        cache sizes by callers).
      tie_word_embeddings: whether the LM head reuses the embedding table.
      attention_bias: whether q/k/v projections have biases (True for qwen2).
      dtype: ``"float32"`` or ``"bfloat16"``, for activations and the KV cache
        (and for parameters unless ``param_dtype`` is set).
      param_dtype: ``None`` (= ``dtype``), ``"float32"`` or ``"bfloat16"``: the storage
        dtype of the parameters. ``dtype="float32", param_dtype="bfloat16"`` is the
        mixed-precision mode described in the module docstring.
      quantized: the modules stored block-quantized, as ``(path, block_size, has_offset)``
        triples: ``path`` is ``"layers.{i}.self_attn.{q,k,v,o}_proj"``,
        ``"layers.{i}.mlp.{gate,up,down}_proj"``, ``"embed_tokens"`` or ``"lm_head"``.
        Such a module holds int8 ``codes [out, in]``, float32 ``scale [out, in / bs]`` and
        optionally ``offset`` instead of a float kernel (see :mod:`align_jax.llm.quant`).
        Their storage does not follow ``param_dtype``; their arithmetic does: with bfloat16
        parameters they multiply bfloat16-rounded inputs and weights with float32
        accumulation (the dense mixed-precision arithmetic, on AMX tile units where the
        CPU has them), else exactly in float32. Empty (the default): a dense model.
    """

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    dtype: str = "float32"
    param_dtype: str | None = None
    quantized: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "quantized", _normalise_quantized(self.quantized))
        if self.arch not in SUPPORTED_ARCHS:
            raise ValueError(
                f"ModelConfig.arch={self.arch!r} is not supported; expected one of {SUPPORTED_ARCHS}"
            )
        if self.dtype not in _DTYPES:
            raise ValueError(
                f"ModelConfig.dtype={self.dtype!r} is not supported; expected one of {tuple(_DTYPES)}"
            )
        if self.param_dtype is not None and self.param_dtype not in _DTYPES:
            raise ValueError(
                f"ModelConfig.param_dtype={self.param_dtype!r} is not supported; expected None or one of "
                f"{tuple(_DTYPES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for RoPE")
        if not self.rope_theta > 0:
            raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"ModelConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")

    @property
    def jnp_dtype(self):
        """The JAX dtype named by :attr:`dtype` (activations and cache)."""
        return _DTYPES[self.dtype]

    @property
    def jnp_param_dtype(self):
        """The JAX dtype parameters are stored in (:attr:`param_dtype`, else :attr:`dtype`)."""
        return _DTYPES[self.param_dtype or self.dtype]

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (e.g. ``config.replace(dtype="bfloat16")``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain-JSON form (inverse of :meth:`from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """Build from :meth:`to_dict` output; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}")
        return cls(**data)


def _normalise_quantized(entries) -> tuple:
    """``quantized`` as a sorted tuple of ``(path, block_size, has_offset)`` (JSON gives lists)."""
    out = []
    for entry in entries or ():
        try:
            path, block, has_offset = entry
        except (TypeError, ValueError):
            raise ValueError(f"ModelConfig.quantized entries are (path, block_size, has_offset), got {entry!r}") from None
        if not isinstance(path, str) or not _QUANTIZABLE.match(path):
            raise ValueError(f"ModelConfig.quantized: {path!r} is not a quantizable module path")
        if isinstance(block, bool) or not isinstance(block, int) or block <= 0 or block % 16:
            raise ValueError(f"ModelConfig.quantized: {path!r} has block_size {block!r}; expected a multiple of 16")
        out.append((path, int(block), bool(has_offset)))
    paths = [p for p, _, _ in out]
    if len(set(paths)) != len(paths):
        raise ValueError("ModelConfig.quantized names a module twice")
    return tuple(sorted(out))


_QUANTIZABLE = re.compile(
    r"^(embed_tokens|lm_head|layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj))$"
)


class KVCache(NamedTuple):
    """Static-shape key/value cache, one array per layer.

    Attributes:
      k: tuple of ``num_layers`` arrays ``[B, Hkv, S, hd]``: keys after RoPE, config dtype.
      v: tuple of ``num_layers`` arrays ``[B, Hkv, S, hd]``: values, config dtype.
    """

    k: tuple
    v: tuple

    @property
    def num_slots(self) -> int:
        """S, the number of cache slots."""
        return self.k[0].shape[2]

    @property
    def batch_size(self) -> int:
        """B, the number of rows."""
        return self.k[0].shape[0]

    def stacked(self) -> tuple[jax.Array, jax.Array]:
        """``(k, v)`` stacked to ``[num_layers, B, Hkv, S, hd]`` (for inspection and tests)."""
        return jnp.stack(self.k), jnp.stack(self.v)


def init_cache(config: ModelConfig, batch_size: int, max_len: int) -> KVCache:
    """Zero cache for ``batch_size`` rows of ``max_len`` slots (per layer ``[B, Hkv, S, hd]``)."""
    if batch_size <= 0 or max_len <= 0:
        raise ValueError(f"init_cache needs batch_size > 0 and max_len > 0, got {batch_size}, {max_len}")
    shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
    zeros = lambda: jnp.zeros(shape, config.jnp_dtype)  # noqa: E731
    return KVCache(k=tuple(zeros() for _ in range(config.num_layers)),
                   v=tuple(zeros() for _ in range(config.num_layers)))


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables ``[B, L, hd/2]`` in float32 for integer ``positions [B, L]``.

    ``angle[b, l, i] = positions[b, l] * theta ** (-2 i / hd)``.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, L, heads, hd]`` with the half-split (Hugging Face) convention.

    ``out = x * cos + rotate_half(x) * sin`` where ``rotate_half([x1, x2]) = [-x2, x1]``;
    computed in float32 and cast back to ``x.dtype``.
    """
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = x32[..., :half], x32[..., half:]
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _param(rngs, shape: tuple[int, ...], dtype, kind: str) -> nnx.Param:
    """A parameter: ``normal(0, 0.02)`` weights, zero biases, unit norm scales.

    With ``rngs=None`` the value is a ``jax.ShapeDtypeStruct`` placeholder: the
    weight loaders build the module this way (no random init, no tracing) and then
    fill every parameter with real values.
    """
    if rngs is None:
        return nnx.Param(jax.ShapeDtypeStruct(shape, dtype))
    if kind == "codes":  # random int8 codes in [-8, 8)
        return nnx.Param(jax.random.randint(rngs.params(), shape, -8, 8, jnp.int32).astype(jnp.int8))
    if kind == "scale":  # positive scales around 0.02 / 4, so w has about the "normal" init's size
        return nnx.Param(0.005 * jax.random.uniform(rngs.params(), shape, dtype, 0.5, 1.5))
    if kind == "offset":
        return nnx.Param(0.002 * jax.random.normal(rngs.params(), shape, dtype))
    if kind == "normal":
        return nnx.Param(0.02 * jax.random.normal(rngs.params(), shape, dtype))
    if kind == "zeros":
        return nnx.Param(jnp.zeros(shape, dtype))
    return nnx.Param(jnp.ones(shape, dtype))


MIN_MATMUL_ROWS = 8
"""Rows a mixed-precision :func:`matmul` is padded to (see the module docstring)."""


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x [..., K] @ w [K, N]`` in ``x.dtype``.

    Same dtypes: a plain ``jnp.dot``. Otherwise (bfloat16 weights, float32
    activations) ``x`` is cast to ``w.dtype`` and the product accumulated in
    ``x.dtype``, with the flattened rows padded to at least :data:`MIN_MATMUL_ROWS`.
    """
    if w.dtype == x.dtype:
        return jnp.dot(x, w)
    return _mixed_dot(x, w, 0, x.dtype)


def _mixed_dot(x: jax.Array, w: jax.Array, w_contract: int, out_dtype) -> jax.Array:
    """``x [..., K]`` (cast to ``w.dtype``) contracted with axis ``w_contract`` of the 2-D ``w``,
    accumulated in ``out_dtype``; rows flattened and padded to :data:`MIN_MATMUL_ROWS`."""
    lead, k = x.shape[:-1], x.shape[-1]
    rows = 1
    for n in lead:
        rows *= n
    flat = x.reshape(rows, k).astype(w.dtype)
    if rows < MIN_MATMUL_ROWS:
        flat = jnp.pad(flat, ((0, MIN_MATMUL_ROWS - rows), (0, 0)))
    out = jax.lax.dot_general(flat, w, (((1,), (w_contract,)), ((), ())), preferred_element_type=out_dtype)
    return out[:rows].reshape(*lead, w.shape[1 - w_contract])


class RMSNorm(nnx.Module):
    """``y = scale * (x / sqrt(mean(x^2) + eps))``, normalised in float32 (as in Hugging Face Llama)."""

    def __init__(self, dim: int, eps: float, dtype, rngs):
        self.eps = eps
        self.scale = _param(rngs, (dim,), dtype, "ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias)`` with ``kernel [in, out]`` (the transpose of torch's ``weight``)."""

    def __init__(self, din: int, dout: int, bias: bool, dtype, rngs):
        self.kernel = _param(rngs, (din, dout), dtype, "normal")
        self.bias = _param(rngs, (dout,), dtype, "zeros") if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = matmul(x, self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table ``embedding [V, D]`` (rows returned in ``out_dtype``)."""

    def __init__(self, vocab: int, dim: int, dtype, rngs, out_dtype=None):
        self.embedding = _param(rngs, (vocab, dim), dtype, "normal")
        self.out_dtype = out_dtype or dtype

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.out_dtype)


def _compute_dtype(param_dtype) -> str:
    """A quantized module multiplies in bfloat16 (x and w rounded, float32 accumulation) when the
    model's parameter dtype is bfloat16, as the dense mixed-precision mode does; else in float32."""
    return "bfloat16" if param_dtype == jnp.bfloat16 else "float32"


class _BlockQuantized(nnx.Module):
    """Holds ``codes`` int8 ``[N, K]``, ``scale`` float32 ``[N, K / bs]`` and optionally ``offset``."""

    def _init_codes(self, n: int, k: int, block_size: int, has_offset: bool, rngs, compute_dtype: str) -> None:
        self.compute_dtype = compute_dtype
        if k % block_size:
            raise ValueError(f"{type(self).__name__}: size {k} is not a multiple of block_size {block_size}")
        nb = k // block_size
        self.codes = _param(rngs, (n, k), jnp.int8, "codes")
        self.scale = _param(rngs, (n, nb), jnp.float32, "scale")
        self.offset = _param(rngs, (n, nb), jnp.float32, "offset") if has_offset else None

    def product(self, x: jax.Array) -> jax.Array:
        """float32 ``x [..., K] @ w.T`` with ``w = scale * codes + offset`` (no bias)."""
        offset = None if self.offset is None else self.offset[...]
        return quantized_matmul(x, self.codes[...], self.scale[...], offset, self.compute_dtype)


class QuantizedLinear(_BlockQuantized):
    """``y = x @ w.T (+ bias)`` for a block-quantized ``w [out, in]`` (see :mod:`align_jax.llm.quant`).

    Parameters: ``codes`` int8 ``[out, in]``, ``scale`` float32 ``[out, in / bs]``, ``offset``
    float32 ``[out, in / bs]`` or None, ``bias [out]``. The product is computed by
    :func:`~align_jax.llm.quant.quantized_matmul` (in float32, or in bfloat16 accumulated in
    float32 when the model's ``param_dtype`` is bfloat16) and returned in ``x.dtype``.
    """

    def __init__(self, din: int, dout: int, bias: bool, block_size: int, has_offset: bool, dtype, rngs):
        self._init_codes(dout, din, block_size, has_offset, rngs, _compute_dtype(dtype))
        self.bias = _param(rngs, (dout,), dtype, "zeros") if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.product(x).astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class QuantizedEmbed(_BlockQuantized):
    """Token embedding stored block-quantized: ``codes [V, D]``, ``scale`` / ``offset [V, D / bs]``.

    A lookup dequantizes only the rows it gathers (the same values as the dense table);
    :meth:`product` is the tied LM head.
    """

    def __init__(self, vocab: int, dim: int, block_size: int, has_offset: bool, rngs, out_dtype, dtype):
        self._init_codes(vocab, dim, block_size, has_offset, rngs, _compute_dtype(dtype))
        self.out_dtype = out_dtype

    def __call__(self, tokens: jax.Array) -> jax.Array:
        codes = jnp.take(self.codes[...], tokens, axis=0)  # [B, L, D]
        scale = jnp.take(self.scale[...], tokens, axis=0)  # [B, L, nb]
        nb = scale.shape[-1]
        rows = codes.reshape(*codes.shape[:-1], nb, -1).astype(jnp.float32) * scale[..., None]
        if self.offset is not None:
            rows = rows + jnp.take(self.offset[...], tokens, axis=0)[..., None]
        return rows.reshape(codes.shape).astype(self.out_dtype)


def _linear(cfg: ModelConfig, din: int, dout: int, bias: bool, rngs, path: str = ""):
    """A dense :class:`Linear`, or a :class:`QuantizedLinear` when ``cfg.quantized`` lists ``path``."""
    for name, block, has_offset in cfg.quantized:
        if name == path:
            return QuantizedLinear(din, dout, bias, block, has_offset, cfg.jnp_param_dtype, rngs)
    return Linear(din, dout, bias, cfg.jnp_param_dtype, rngs)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE and an optional static KV cache."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None, path: str = "self_attn"):
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = _linear(cfg, d, cfg.num_heads * hd, cfg.attention_bias, rngs, f"{path}.q_proj")
        self.k_proj = _linear(cfg, d, cfg.num_kv_heads * hd, cfg.attention_bias, rngs, f"{path}.k_proj")
        self.v_proj = _linear(cfg, d, cfg.num_kv_heads * hd, cfg.attention_bias, rngs, f"{path}.v_proj")
        self.o_proj = _linear(cfg, cfg.num_heads * hd, d, False, rngs, f"{path}.o_proj")

    def __call__(self, x, cos, sin, mask, layer_cache=None, cache_index=0, fresh: bool = False):
        """Attend.

        Args:
          x: ``[B, L, D]`` normalised hidden states.
          cos, sin: ``[B, L, hd/2]`` RoPE tables.
          mask: bool ``[B, L, S]`` (or ``[B, L, L]`` without a cache): query l may see key s.
          layer_cache: this layer's ``(k, v)``, each ``[B, Hkv, S, hd]``, or None.
          cache_index: int32 scalar, first slot written.
          fresh: (static) the cache is being filled from slot 0 (a prefill): the L new keys
            are written to it but attended to directly, and ``mask`` is ``[B, L, L]``; the
            S - L empty slots are not computed over.

        Returns:
          ``([B, L, D], updated (k, v) or None)``.
        """
        b, l, _ = x.shape
        hkv, hd = self.num_kv_heads, self.head_dim
        groups = self.num_heads // hkv
        q = self.q_proj(x).reshape(b, l, self.num_heads, hd)
        k = self.k_proj(x).reshape(b, l, hkv, hd)
        v = self.v_proj(x).reshape(b, l, hkv, hd)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        k = k.transpose(0, 2, 1, 3)  # [B, Hkv, L, hd]
        v = v.transpose(0, 2, 1, 3)
        if layer_cache is not None:
            cache_k, cache_v = layer_cache
            start = (0, 0, cache_index, 0)
            keys = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
            values = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
            layer_cache = (keys, values)
            if fresh:
                keys, values = k.astype(cache_k.dtype), v.astype(cache_v.dtype)
        else:
            keys, values = k, v
        # keys/values: [B, Hkv, S, hd]; queries regrouped to [B, Hkv, N = G*L, hd]
        # (n = g * L + l). Both contractions are written as dot_generals whose
        # operands are already in the layout the CPU matmul wants (scores [B, Hkv, S, N],
        # softmax over S): 5x faster per decode step than letting einsum pick, which
        # transposed the cache.
        s_len = keys.shape[2]
        qn = q.reshape(b, l, hkv, groups, hd).transpose(0, 2, 3, 1, 4).reshape(b, hkv, groups * l, hd)
        if layer_cache is not None and l == 1:
            # A decode step: one query per row (the native kernel on the CPU, see attention.py).
            out = decode_attention(qn, keys, values, mask[:, 0, :], hd ** -0.5)  # [B, Hkv, G, hd]
            return self.o_proj(out.reshape(b, 1, self.num_heads * hd)), layer_cache
        batch_dims = ((0, 1), (0, 1))
        scores = jax.lax.dot_general(
            keys, qn, (((3,), (3,)), batch_dims), preferred_element_type=jnp.float32
        ) * (hd ** -0.5)  # [B, Hkv, S, N]
        scores = scores.reshape(b, hkv, s_len, groups, l)
        visible = mask.transpose(0, 2, 1)[:, None, :, None, :]  # [B, 1, S, 1, L]
        scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=2).astype(values.dtype).reshape(b, hkv, s_len, groups * l)
        out = jax.lax.dot_general(probs, values, (((2,), (2,)), batch_dims))  # [B, Hkv, N, hd]
        out = out.reshape(b, hkv, groups, l, hd).transpose(0, 3, 1, 2, 4)  # [B, L, Hkv, G, hd]
        out = out.reshape(b, l, self.num_heads * hd)
        return self.o_proj(out), layer_cache


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None, path: str = "mlp"):
        self.gate_proj = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, False, rngs, f"{path}.gate_proj")
        self.up_proj = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, False, rngs, f"{path}.up_proj")
        self.down_proj = _linear(cfg, cfg.intermediate_size, cfg.hidden_size, False, rngs, f"{path}.down_proj")

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``h += attn(norm(h)); h += mlp(norm(h))``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None, path: str = "layers.0"):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_param_dtype, rngs)
        self.self_attn = Attention(cfg, rngs=rngs, path=f"{path}.self_attn")
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_param_dtype, rngs)
        self.mlp = MLP(cfg, rngs=rngs, path=f"{path}.mlp")

    def __call__(self, h, cos, sin, mask, cache, cache_index, fresh: bool = False):
        attn_out, cache = self.self_attn(
            self.input_layernorm(h), cos, sin, mask, cache, cache_index, fresh
        )
        h = h + attn_out
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, cache


class Transformer(nnx.Module):
    """Llama / Qwen2 decoder.

    ``rngs``: random ``normal(0, 0.02)`` init; ``rngs=None`` builds shape-only
    placeholders (``jax.ShapeDtypeStruct``) for the weight loaders to fill.

    Parameter layout (kernels are ``[in, out]``, i.e. the transpose of torch's ``weight``):
    ``embed_tokens.embedding [V, D]``, ``layers[i].self_attn.{q,k,v,o}_proj.{kernel,bias}``,
    ``layers[i].mlp.{gate,up,down}_proj.kernel``, ``layers[i].{input,post_attention}_layernorm.scale``,
    ``norm.scale``, and ``lm_head.kernel [D, V]`` when embeddings are untied.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs | None):
        self.config = config
        dtype = config.jnp_param_dtype
        known = {path for path, _, _ in config.quantized}
        embed_quant = [(b, o) for path, b, o in config.quantized if path == "embed_tokens"]
        if embed_quant:
            block, has_offset = embed_quant[0]
            self.embed_tokens = QuantizedEmbed(config.vocab_size, config.hidden_size, block, has_offset,
                                               rngs, config.jnp_dtype, dtype)
        else:
            self.embed_tokens = Embed(config.vocab_size, config.hidden_size, dtype, rngs, config.jnp_dtype)
        self.layers = nnx.List([DecoderLayer(config, rngs=rngs, path=f"layers.{i}") for i in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, rngs)
        if not config.tie_word_embeddings:
            self.lm_head = _linear(config, config.hidden_size, config.vocab_size, False, rngs, "lm_head")
        else:
            self.lm_head = None
        valid = {"embed_tokens"} | ({"lm_head"} if not config.tie_word_embeddings else set())
        valid |= {f"layers.{i}.{m}" for i in range(config.num_layers) for m in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
        if known - valid:
            raise ValueError(f"ModelConfig.quantized names modules this model does not have: {sorted(known - valid)[:4]}")

    def __call__(self, tokens, positions, cache=None, cache_index=0, kv_mask=None, *, last_only: bool = False):
        """Run the decoder on ``L`` new tokens per row.

        Args:
          tokens: int32 ``[B, L]``.
          positions: int32 ``[B, L]`` RoPE positions (left-padded rows start at 0
            on their first real token).
          cache: :class:`KVCache` (per layer ``[B, Hkv, S, hd]``) or None.
          cache_index: int32 scalar (may be traced): first cache slot written.
          kv_mask: bool ``[B, S]`` with a cache, ``[B, L]`` without; False marks padding keys.
          last_only: (static) compute logits for the last position only, returning
            ``[B, 1, V]``: a long prefill then never materialises ``[B, L, V]``.

        With a cache, new k/v go to slots ``[cache_index, cache_index + L)`` of every
        row, and query ``l`` of row ``b`` attends to slot ``j`` iff
        ``kv_mask[b, j] and j <= cache_index + l``. Without a cache, attention is
        causal over the ``L`` tokens, masked by ``kv_mask`` if given.

        The caller must keep ``cache_index + L <= S``: like every
        ``lax.dynamic_update_slice``, an out-of-range write is clamped (silently
        overwriting the last slots), since a traced index cannot raise.

        Returns:
          ``(logits float32 [B, L, V], updated KVCache or None)``.
        """
        h, cache = self.hidden_states(tokens, positions, cache, cache_index, kv_mask)
        if last_only:
            h = h[:, -1:]
        return self.logits(h), cache

    def hidden_states(self, tokens, positions, cache=None, cache_index=0, kv_mask=None):
        """Final-norm hidden states ``[B, L, D]`` (no LM head) and the updated cache.

        Same arguments and masking as :meth:`__call__`; ``self.logits(h)`` of the
        result equals ``__call__``'s logits. Lets callers apply the head to only the
        positions they need.
        """
        b, l = tokens.shape
        h = self.embed_tokens(tokens)
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_theta)
        # A prefill (a cache filled from a static slot 0) attends to its own L keys only,
        # not to the S - L empty slots after them.
        fresh = cache is not None and isinstance(cache_index, int) and cache_index == 0 and l > 1
        cache_index = jnp.asarray(cache_index, jnp.int32)
        query_pos = jnp.arange(l, dtype=jnp.int32)
        if cache is None or fresh:  # causal over the L new positions
            mask = jnp.broadcast_to((query_pos[None, :] <= query_pos[:, None])[None], (b, l, l))
            if fresh and kv_mask is not None:
                kv_mask = kv_mask[:, :l]
        else:
            s = cache.num_slots
            slots = jnp.arange(s, dtype=jnp.int32)
            mask = slots[None, :] <= (cache_index + query_pos)[:, None]  # [L, S]
            mask = jnp.broadcast_to(mask[None], (b, l, s))
        if kv_mask is not None:
            mask = mask & kv_mask[:, None, :].astype(bool)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i])
            h, layer_cache = layer(h, cos, sin, mask, layer_cache, cache_index, fresh)
            if layer_cache is not None:
                new_k.append(layer_cache[0])
                new_v.append(layer_cache[1])
        if cache is not None:
            cache = KVCache(tuple(new_k), tuple(new_v))
        return self.norm(h), cache

    def logits(self, h: jax.Array) -> jax.Array:
        """float32 logits ``[..., V]`` of final-norm hidden states ``h [..., D]`` (tied or untied head)."""
        if isinstance(self.lm_head, QuantizedLinear):
            return self.lm_head.product(h)
        if self.lm_head is None and isinstance(self.embed_tokens, QuantizedEmbed):
            return self.embed_tokens.product(h)  # codes [V, D]: the tied head
        if self.lm_head is None:
            head = self.embed_tokens.embedding[...]  # [V, D]
            contract = ((h.ndim - 1,), (1,))
        else:
            head = self.lm_head.kernel[...]  # [D, V]
            contract = ((h.ndim - 1,), (0,))
        if head.dtype == h.dtype:
            out = jax.lax.dot_general(h, head, (contract, ((), ())), preferred_element_type=jnp.float32)
            return out.astype(jnp.float32)
        return _mixed_dot(h, head, contract[1][0], jnp.float32)  # mixed precision, as in `matmul`


def forward(graphdef, state, tokens, positions, cache=None, cache_index=0, kv_mask=None, *, last_only=False):
    """Pure-function form of :meth:`Transformer.__call__` for ``jax.jit``.

    ``graphdef, state = nnx.split(model)``; the weights in ``state`` are ordinary
    array arguments (``graphdef`` and ``last_only`` are static). Returns
    ``(logits float32 [B, L, V] (or [B, 1, V] with last_only), KVCache or None)``.
    """
    model = nnx.merge(graphdef, state)
    return model(tokens, positions, cache, cache_index, kv_mask, last_only=last_only)
