"""Decoder-only transformer in Flax NNX for the Llama (SmolLM2, Llama 3.x), Qwen2, Mistral, Phi-3
and Gemma 3 (text) families.

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

Family differences are static fields of :class:`ModelConfig`, so one decoder serves them all:

* RoPE scaling (``rope_scaling``): ``"llama3"`` (Llama 3.1-3.3: low frequencies divided by
  ``factor``, a smooth ramp between), ``"longrope"`` (Phi-3 128K, once called ``"su"``:
  per-frequency ``short_factor`` / ``long_factor``, the long set used when a row's largest
  position + 1 exceeds ``original_max_position_embeddings``; cos and sin scaled by
  ``attention_factor``), ``"linear"`` (positions divided by ``factor``), ``"freq_factors"``
  (llama.cpp's ``rope_freqs`` divisors). longrope decides per row and per call, from the row's
  largest position in the call. transformers decides per
  call from the whole batch, and when a generation crosses ``original_max_position_embeddings``
  its Phi-3 drops the cache and recomputes the prefix with the long factors. We keep the cached
  keys as they were computed (as vLLM does), so the two agree exactly whenever a sequence stays
  on one side of the boundary (a prompt longer than the original context is all long, a
  generation ending within it all short) and differ only after a crossing inside a generation.
* Sliding-window attention (Mistral, Phi-3, Gemma 3's local layers, Qwen2 with
  ``use_sliding_window``): a query at position ``p`` sees a key at position ``j`` only if
  ``p - j < sliding_window``, in the cache-free forward, the prefill and every cached decode step.
  ``layer_types`` says which layers slide (empty: all of them when ``sliding_window`` is set).
  The cache records each slot's position (``KVCache.positions``), so the window is measured in
  token positions even across masked slots; the cache is not rolling (S slots are kept).
* Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` are split into q/k/v and gate/up by the loaders
  (the same products, columns sliced), so the decoder's modules are Llama's.
* Gemma 3 (``arch="gemma3"``): ``(1 + w)`` RMSNorm, RMSNorm on q and k per head, norms before
  *and* after attention and MLP (``post_attention_layernorm`` normalises the attention output,
  ``pre_/post_feedforward_layernorm`` wrap the MLP), GELU (tanh) gating, embeddings scaled by
  ``sqrt(D)``, scores scaled by ``query_pre_attn_scalar ** -0.5``, and local (sliding) layers
  with their own RoPE base ``rope_local_theta`` and no RoPE scaling.

Shapes use B batch, L new tokens, S cache slots, V vocabulary, D hidden size,
H query heads, Hkv key/value heads, G = H / Hkv, hd head dimension.

For jitted code use :func:`forward` on ``nnx.split(model)``: the weights are then
ordinary array arguments, never static values.
"""

from __future__ import annotations

import dataclasses
import math
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

SUPPORTED_ARCHS = ("llama", "qwen2", "mistral", "phi3", "gemma3")
ROPE_SCALING_TYPES = ("linear", "llama3", "longrope", "freq_factors")
_ROPE_SCALING_KEYS = {
    "linear": ({"factor"}, set()),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}, set()),
    "longrope": ({"short_factor", "long_factor", "original_max_position_embeddings"}, {"attention_factor", "factor"}),
    "freq_factors": ({"factors"}, set()),
}
LAYER_TYPES = ("full_attention", "sliding_attention")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static shape of a decoder; hashable, so usable as a ``jax.jit`` static argument.

    Attributes:
      arch: one of :data:`SUPPORTED_ARCHS` (``"llama"``, ``"qwen2"``, ``"mistral"``,
        ``"phi3"``, ``"gemma3"``; mistral and phi3 use Llama's block, gemma3 its own, see the
        module docstring).
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
      rope_scaling: ``()`` (plain RoPE) or the scaling of the (global) layers as sorted
        ``(key, value)`` pairs (a dict is accepted and normalised): ``rope_type`` is one of
        :data:`ROPE_SCALING_TYPES`; ``"linear"`` needs ``factor``; ``"llama3"`` needs ``factor``,
        ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``;
        ``"longrope"`` needs ``short_factor`` and ``long_factor`` (``hd / 2`` numbers each) and
        ``original_max_position_embeddings``, and takes ``attention_factor`` (default
        ``sqrt(1 + ln(f) / ln(original))`` with ``f = factor`` or
        ``max_position_embeddings / original``); ``"freq_factors"`` (a GGUF's ``rope_freqs``
        tensor, how llama.cpp stores Llama 3.x scaling) needs ``factors`` (``hd / 2`` numbers),
        ``inv_freq_i = theta ** (-2 i / hd) / factors_i``.
      sliding_window: W, or None: a sliding layer's query at position p sees keys at positions
        ``p - W < j <= p``.
      layer_types: per layer ``"full_attention"`` or ``"sliding_attention"``; empty means every
        layer slides when ``sliding_window`` is set, none otherwise.
      rope_local_theta: RoPE base of the sliding layers (Gemma 3's ``rope_local_base_freq``; they
        then use no RoPE scaling); None: the sliding layers share the global RoPE.
      query_pre_attn_scalar: attention scores are scaled by ``query_pre_attn_scalar ** -0.5``;
        None: ``head_dim ** -0.5``.
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
    rope_scaling: tuple = ()
    sliding_window: int | None = None
    layer_types: tuple = ()
    rope_local_theta: float | None = None
    query_pre_attn_scalar: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "quantized", _normalise_quantized(self.quantized))
        object.__setattr__(self, "rope_scaling", _normalise_rope_scaling(self.rope_scaling, self.head_dim))
        object.__setattr__(self, "layer_types", tuple(self.layer_types or ()))
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
        if self.sliding_window is not None and (isinstance(self.sliding_window, bool)
                                                or not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ValueError(f"ModelConfig.sliding_window must be None or a positive int, got {self.sliding_window!r}")
        if self.layer_types:
            if len(self.layer_types) != self.num_layers:
                raise ValueError(f"ModelConfig.layer_types has {len(self.layer_types)} entries, expected "
                                 f"num_layers={self.num_layers}")
            bad = [t for t in self.layer_types if t not in LAYER_TYPES]
            if bad:
                raise ValueError(f"ModelConfig.layer_types: {bad[0]!r} is not one of {LAYER_TYPES}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("ModelConfig.layer_types names sliding layers but sliding_window is None")
        for name in ("rope_local_theta", "query_pre_attn_scalar"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"ModelConfig.{name} must be None or > 0, got {value!r}")

    def layer_is_sliding(self, index: int) -> bool:
        """Whether layer ``index`` uses sliding-window attention (see :attr:`layer_types`)."""
        if self.layer_types:
            return self.layer_types[index] == "sliding_attention"
        return self.sliding_window is not None

    @property
    def has_sliding_layers(self) -> bool:
        """Whether any layer slides (the cache then records slot positions)."""
        return any(self.layer_is_sliding(i) for i in range(self.num_layers))

    @property
    def rope_scaling_dict(self) -> dict:
        """:attr:`rope_scaling` as a dict (empty for plain RoPE)."""
        return dict(self.rope_scaling)

    @property
    def attention_scale(self) -> float:
        """The factor scores are multiplied by: ``query_pre_attn_scalar ** -0.5``, else ``head_dim ** -0.5``."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

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


def _normalise_rope_scaling(scaling, head_dim: int) -> tuple:
    """``rope_scaling`` as sorted ``(key, value)`` pairs, lists made tuples; validated."""
    if not scaling:
        return ()
    try:
        items = dict(scaling)
    except (TypeError, ValueError):
        raise ValueError(f"ModelConfig.rope_scaling must be a dict or (key, value) pairs, got {scaling!r}") from None
    kind = items.get("rope_type")
    if kind in (None, "default"):
        if set(items) - {"rope_type"}:
            raise ValueError(f"ModelConfig.rope_scaling has keys {sorted(items)} but no rope_type")
        return ()
    if kind not in ROPE_SCALING_TYPES:
        raise ValueError(f"ModelConfig.rope_scaling: rope_type={kind!r} is not supported; expected one of "
                         f"{ROPE_SCALING_TYPES}")
    required, optional = _ROPE_SCALING_KEYS[kind]
    missing = sorted(required - set(items))
    if missing:
        raise ValueError(f"ModelConfig.rope_scaling ({kind}) is missing {missing}")
    unknown = sorted(set(items) - required - optional - {"rope_type"})
    if unknown:
        raise ValueError(f"ModelConfig.rope_scaling ({kind}): unknown keys {unknown}")
    out = {}
    for key, value in items.items():
        if key == "rope_type":
            out[key] = value
        elif key in ("short_factor", "long_factor", "factors"):
            value = tuple(float(v) for v in value)
            if len(value) != head_dim // 2:
                raise ValueError(f"ModelConfig.rope_scaling.{key} has {len(value)} entries, expected head_dim / 2 = "
                                 f"{head_dim // 2}")
            out[key] = value
        elif value is not None:
            out[key] = int(value) if key == "original_max_position_embeddings" else float(value)
    return tuple(sorted(out.items()))


_QUANTIZABLE = re.compile(
    r"^(embed_tokens|lm_head|layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj))$"
)


class KVCache(NamedTuple):
    """Static-shape key/value cache, one array per layer.

    Attributes:
      k: tuple of ``num_layers`` arrays ``[B, Hkv, S, hd]``: keys after RoPE, config dtype.
      v: tuple of ``num_layers`` arrays ``[B, Hkv, S, hd]``: values, config dtype.
      positions: int32 ``[B, S]``, the RoPE position of the token in each slot (what sliding
        windows are measured in), for models with sliding layers; None otherwise.
    """

    k: tuple
    v: tuple
    positions: jax.Array | None = None

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
    positions = jnp.zeros((batch_size, max_len), jnp.int32) if config.has_sliding_layers else None
    return KVCache(k=tuple(zeros() for _ in range(config.num_layers)),
                   v=tuple(zeros() for _ in range(config.num_layers)), positions=positions)


def rope_inv_freq(head_dim: int, theta: float, scaling: tuple = (), max_position=None,
                  max_position_embeddings: int | None = None) -> tuple[jax.Array, float]:
    """RoPE inverse frequencies ``[hd/2]`` (float32) and the factor cos/sin are multiplied by.

    Plain: ``inv_freq_i = theta ** (-2 i / hd)``. ``scaling`` (``ModelConfig.rope_scaling``):

    * ``linear``: ``inv_freq / factor``.
    * ``llama3``: with ``wavelen = 2 pi / inv_freq``, ``lo = orig / low_freq_factor``,
      ``hi = orig / high_freq_factor``: unchanged where ``wavelen < hi``, ``/ factor`` where
      ``wavelen > lo``, else ``(1 - s) inv_freq / factor + s inv_freq`` with
      ``s = (orig / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)``.
    * ``longrope``: ``1 / (ext_i * theta ** (2 i / hd))`` with ``ext = long_factor`` when
      ``max_position + 1 > original_max_position_embeddings`` (``max_position`` may be traced,
      and an array ``[B]`` gives per-row frequencies ``[B, hd/2]``), else ``short_factor``;
      cos/sin are multiplied by ``attention_factor``. ``max_position`` may also be a bool
      array, read as "use the long factors".
    """
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    params = dict(scaling)
    kind = params.get("rope_type")
    if not kind:
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / params["factor"], 1.0
    if kind == "freq_factors":
        return inv_freq / jnp.asarray(params["factors"], jnp.float32), 1.0
    if kind == "llama3":
        factor, orig = params["factor"], params["original_max_position_embeddings"]
        low, high = params["low_freq_factor"], params["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > orig / low, inv_freq / factor, inv_freq)
        smooth = (orig / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < orig / high) & ~(wavelen > orig / low)
        return jnp.where(medium, smoothed, scaled), 1.0
    if kind == "longrope":
        orig = params["original_max_position_embeddings"]
        factor = params.get("factor") or (max_position_embeddings or orig) / orig
        attention_factor = params.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        base = theta ** exponents
        short = 1.0 / (jnp.asarray(params["short_factor"], jnp.float32) * base)
        long = 1.0 / (jnp.asarray(params["long_factor"], jnp.float32) * base)
        if max_position is None:
            return short, attention_factor
        max_position = jnp.asarray(max_position)
        use_long = max_position if max_position.dtype == jnp.bool_ else max_position + 1 > orig
        return jnp.where(use_long[..., None], long, short), attention_factor
    raise ValueError(f"unsupported rope_type {kind!r}")


def rope_tables(positions: jax.Array, head_dim: int, theta: float, scaling: tuple = (),
                max_position_embeddings: int | None = None, use_long=None) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables ``[B, L, hd/2]`` in float32 for integer ``positions [B, L]``.

    ``angle[b, l, i] = positions[b, l] * inv_freq_i`` (:func:`rope_inv_freq`). ``longrope``
    picks its factor set per row: ``use_long [B]`` if given, else whether the row's largest
    position + 1 exceeds the original context (a row's tokens all share one set).
    """
    if dict(scaling).get("rope_type") == "longrope":
        select = use_long if use_long is not None else jnp.max(positions, axis=-1)
        inv_freq, factor = rope_inv_freq(head_dim, theta, scaling, select, max_position_embeddings)
        inv_freq = inv_freq[..., None, :]  # [B, 1, hd/2]
    else:
        inv_freq, factor = rope_inv_freq(head_dim, theta, scaling, None, max_position_embeddings)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    if factor == 1.0:
        return jnp.cos(angles), jnp.sin(angles)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


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
    """``y = scale * (x / sqrt(mean(x^2) + eps))``, normalised in float32 (as in Hugging Face Llama).

    ``offset=True`` (Gemma): ``y = (1 + scale) * (x / sqrt(mean(x^2) + eps))``, all in float32
    and then cast (as Hugging Face's ``Gemma3RMSNorm``); ``scale`` then starts at zero.
    """

    def __init__(self, dim: int, eps: float, dtype, rngs, offset: bool = False):
        self.eps = eps
        self.offset = offset
        self.scale = _param(rngs, (dim,), dtype, "zeros" if offset else "ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (normed * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)
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
        self.scale = cfg.attention_scale
        if cfg.arch == "gemma3":  # RMSNorm of each head's q and k, before RoPE
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, cfg.jnp_param_dtype, rngs, offset=True)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, cfg.jnp_param_dtype, rngs, offset=True)
        else:
            self.q_norm = self.k_norm = None

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
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
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
            out = decode_attention(qn, keys, values, mask[:, 0, :], self.scale)  # [B, Hkv, G, hd]
            return self.o_proj(out.reshape(b, 1, self.num_heads * hd)), layer_cache
        batch_dims = ((0, 1), (0, 1))
        scores = jax.lax.dot_general(
            keys, qn, (((3,), (3,)), batch_dims), preferred_element_type=jnp.float32
        ) * self.scale  # [B, Hkv, S, N]
        scores = scores.reshape(b, hkv, s_len, groups, l)
        visible = mask.transpose(0, 2, 1)[:, None, :, None, :]  # [B, 1, S, 1, L]
        scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=2).astype(values.dtype).reshape(b, hkv, s_len, groups * l)
        out = jax.lax.dot_general(probs, values, (((2,), (2,)), batch_dims))  # [B, Hkv, N, hd]
        out = out.reshape(b, hkv, groups, l, hd).transpose(0, 3, 1, 2, 4)  # [B, L, Hkv, G, hd]
        out = out.reshape(b, l, self.num_heads * hd)
        return self.o_proj(out), layer_cache


class MLP(nnx.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))``, ``act`` SiLU (SwiGLU) or, for Gemma, tanh-GELU."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None, path: str = "mlp"):
        self.gate_proj = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, False, rngs, f"{path}.gate_proj")
        self.up_proj = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, False, rngs, f"{path}.up_proj")
        self.down_proj = _linear(cfg, cfg.intermediate_size, cfg.hidden_size, False, rngs, f"{path}.down_proj")
        self.gelu = cfg.arch == "gemma3"

    def __call__(self, x):
        gate = self.gate_proj(x)
        gate = jax.nn.gelu(gate, approximate=True) if self.gelu else jax.nn.silu(gate)
        return self.down_proj(gate * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``h += attn(norm(h)); h += mlp(norm(h))``.

    Gemma 3 (sandwich norms): ``h += post_attention_layernorm(attn(input_layernorm(h)));
    h += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))``.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None, path: str = "layers.0"):
        gemma = cfg.arch == "gemma3"
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_param_dtype, rngs, offset=gemma)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, rngs=rngs, path=f"{path}.self_attn")
        self.post_attention_layernorm = norm()
        self.mlp = MLP(cfg, rngs=rngs, path=f"{path}.mlp")
        if gemma:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        else:
            self.pre_feedforward_layernorm = self.post_feedforward_layernorm = None

    def __call__(self, h, cos, sin, mask, cache, cache_index, fresh: bool = False):
        attn_out, cache = self.self_attn(
            self.input_layernorm(h), cos, sin, mask, cache, cache_index, fresh
        )
        if self.pre_feedforward_layernorm is not None:
            h = h + self.post_attention_layernorm(attn_out)
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h))), cache
        h = h + attn_out
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, cache


class Transformer(nnx.Module):
    """Llama / Qwen2 / Mistral / Phi-3 / Gemma 3 decoder.

    ``rngs``: random ``normal(0, 0.02)`` init; ``rngs=None`` builds shape-only
    placeholders (``jax.ShapeDtypeStruct``) for the weight loaders to fill.

    Parameter layout (kernels are ``[in, out]``, i.e. the transpose of torch's ``weight``):
    ``embed_tokens.embedding [V, D]``, ``layers[i].self_attn.{q,k,v,o}_proj.{kernel,bias}``,
    ``layers[i].mlp.{gate,up,down}_proj.kernel``, ``layers[i].{input,post_attention}_layernorm.scale``,
    ``norm.scale``, and ``lm_head.kernel [D, V]`` when embeddings are untied; Gemma 3 adds
    ``layers[i].self_attn.{q,k}_norm.scale [hd]`` and ``layers[i].{pre,post}_feedforward_layernorm.scale``.
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
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, rngs, offset=config.arch == "gemma3")
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
        config = self.config
        b, l = tokens.shape
        h = self.embed_tokens(tokens)
        if config.arch == "gemma3":  # embeddings scaled by sqrt(D), rounded to the embedding dtype as in HF
            h = h * jnp.asarray(config.hidden_size ** 0.5, h.dtype)
        rope_global = rope_tables(positions, config.head_dim, config.rope_theta, config.rope_scaling,
                                  config.max_position_embeddings)
        rope_local = rope_global
        if config.rope_local_theta is not None and config.has_sliding_layers:
            rope_local = rope_tables(positions, config.head_dim, config.rope_local_theta)
        # A prefill (a cache filled from a static slot 0) attends to its own L keys only,
        # not to the S - L empty slots after them.
        fresh = cache is not None and isinstance(cache_index, int) and cache_index == 0 and l > 1
        cache_index = jnp.asarray(cache_index, jnp.int32)
        key_positions = positions  # [B, L] without a cache or in a prefill, else [B, S]
        if cache is not None and config.has_sliding_layers:
            if cache.positions is None:
                raise ValueError("this model has sliding-window layers: its KVCache needs positions "
                                 "(build it with init_cache)")
            slot_positions = jax.lax.dynamic_update_slice(
                cache.positions, positions.astype(jnp.int32), (0, cache_index))
            if not fresh:
                key_positions = slot_positions
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
        window_mask = mask
        if config.has_sliding_layers:  # a query at position p sees keys at p - W < j
            distance = positions[:, :, None] - key_positions[:, None, :]  # [B, L, S or L]
            window_mask = mask & (distance < config.sliding_window)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i])
            sliding = config.layer_is_sliding(i)
            cos, sin = rope_local if sliding else rope_global
            h, layer_cache = layer(h, cos, sin, window_mask if sliding else mask, layer_cache, cache_index, fresh)
            if layer_cache is not None:
                new_k.append(layer_cache[0])
                new_v.append(layer_cache[1])
        if cache is not None:
            cache = KVCache(tuple(new_k), tuple(new_v), slot_positions if config.has_sliding_layers else None)
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
