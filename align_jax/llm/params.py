"""Parameter arrays -> :class:`Transformer`: the shared core of every weights loader.

``{flat parameter name: array}`` dicts (``layers.3.self_attn.q_proj.kernel``, kernels
``[in, out]``; ``...codes`` / ``.scale`` / ``.offset`` for quantized modules) are checked
and merged into an NNX model without random init (:func:`model_from_arrays`); dense
weight matrices can be quantized to Q8_0 (:func:`quantize_arrays`). Also holds
:class:`WeightsError` and :class:`LoadedModel`, which the GGUF
(:mod:`align_jax.llm.gguf_loader`), Hugging Face (:mod:`align_jax.llm.hf_loader`) and
checkpoint (:mod:`align_jax.llm.weights`) loaders share. Import these names from
:mod:`align_jax.llm.weights`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from align_jax.llm.model import ModelConfig, Transformer
from align_jax.llm.quant import quantize_q8_0
from align_jax.llm.tokenizer import ChatTokenizer

__all__ = [
    "WeightsError",
    "ModelLoadError",
    "LoadedModel",
    "expected_shapes",
    "model_from_arrays",
    "quantized_entries",
    "quantize_arrays",
    "split_fused",
]


class WeightsError(ValueError):
    """Weights or a model description could not be loaded; the message names the file and the field."""


ModelLoadError = WeightsError


class LoadedModel(NamedTuple):
    """A ready model.

    Attributes:
      config: the static :class:`ModelConfig`.
      model: the :class:`Transformer` holding real weights.
      tokenizer: the matching :class:`ChatTokenizer`.
      source: the file or directory the weights were read from.
    """

    config: ModelConfig
    model: Transformer
    tokenizer: ChatTokenizer
    source: str


# --------------------------------------------------------------------------- arrays -> model
def _flat_path(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _abstract_model(config: ModelConfig):
    return nnx.split(Transformer(config, rngs=None))


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """``{flat parameter name: shape}`` of a :class:`Transformer` with ``config``."""
    _, state = _abstract_model(config)
    return {_flat_path(path): tuple(var.get_value().shape) for path, var in nnx.to_flat_state(state)}


def refuse_quantized_mesh(source: str, quantized: bool, mesh) -> None:
    """Before any tensor is read: a mesh cannot hold quantized weights (they are not sharded)."""
    if mesh is not None and quantized:
        raise ValueError(f"{source}: a mesh needs a dense model (quantized weights are not sharded); "
                         "load with quantized=False")


def _placer(config: ModelConfig, mesh):
    """``place(flat name, host array, dtype) -> jax.Array``: on the default device, or straight into
    the parameter's shards on ``mesh`` (checked against ``config``)."""
    if mesh is None:
        return lambda key, value, dtype: jnp.asarray(value, dtype=dtype)
    from jax.sharding import NamedSharding

    from align_jax.llm import sharding

    mesh = sharding.check_mesh(mesh, config)

    def place(key: str, value: np.ndarray, dtype) -> jax.Array:
        host = np.asarray(value, dtype=dtype)
        return jax.device_put(host, NamedSharding(mesh, sharding.param_spec(key, host.shape, mesh)))

    return place


def model_from_arrays(
    config: ModelConfig,
    arrays: dict[str, np.ndarray],
    source: str,
    names: dict[str, str] | None = None,
    *,
    mesh=None,
) -> Transformer:
    """Build a :class:`Transformer` from ``{flat parameter name: array}`` without random init.

    With ``mesh`` (a ``jax.sharding.Mesh`` with axes ``"data"`` and ``"model"``,
    :func:`~align_jax.llm.sharding.make_mesh`) every parameter goes from host memory straight to
    its shards (:func:`~align_jax.llm.sharding.param_spec`): a device receives only its slice of a
    tensor-parallel weight, and no device ever holds a whole model that is split over the model
    axis. The mesh is checked against ``config`` first (:func:`~align_jax.llm.sharding.check_mesh`).

    Args:
      config: the model shape; arrays are cast to ``config.param_dtype`` (else ``config.dtype``),
        except the codes (int8) and scales / offsets (float32) of quantized modules.
      arrays: one entry per parameter (``layers.0.self_attn.q_proj.kernel`` ..., or
        ``...q_proj.codes`` / ``.scale`` / ``.offset`` for the modules ``config.quantized`` lists).
      source: file/dir named in error messages.
      names: optional ``{flat name: name in the source file}`` for error messages.
      mesh: optional device mesh the weights are placed on (None: the default device).

    Raises:
      WeightsError: a parameter is missing, has the wrong shape, or is not finite.
      ValueError / TypeError: ``mesh`` does not fit ``config`` (:func:`~align_jax.llm.sharding.check_mesh`).
    """
    names = names or {}
    place = _placer(config, mesh)
    graphdef, state = _abstract_model(config)
    new_flat = []
    for path, var in nnx.to_flat_state(state):
        key = _flat_path(path)
        want = tuple(var.get_value().shape)
        dtype = var.get_value().dtype  # the param dtype; int8 / float32 for quantized codes / scales
        shown = names.get(key, key)
        if key not in arrays:
            raise WeightsError(f"{source}: tensor {shown!r} (parameter {key}) is missing")
        value = arrays[key]
        if tuple(value.shape) != want:
            raise WeightsError(
                f"{source}: tensor {shown!r} has shape {tuple(value.shape)}, expected {want} for parameter {key}"
            )
        new_flat.append((path, var.replace(place(key, value, dtype))))
    extra = sorted(set(arrays) - {_flat_path(p) for p, _ in nnx.to_flat_state(state)})
    if extra:
        raise WeightsError(f"{source}: unexpected tensors {[names.get(k, k) for k in extra][:8]}")
    return nnx.merge(graphdef, nnx.from_flat_state(new_flat))


def _check_finite(arrays: dict[str, np.ndarray], source: str, names: dict[str, str]) -> None:
    for key, value in arrays.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise WeightsError(f"{source}: tensor {names.get(key, key)!r} contains NaN or inf values")


def quantized_entries(arrays: dict[str, np.ndarray]) -> tuple:
    """``ModelConfig.quantized`` for a parameter dict: one ``(module, block_size, has_offset)``
    per module with ``codes`` (block size = ``codes.shape[1] / scale.shape[1]``)."""
    entries = []
    for key, codes in arrays.items():
        if key.endswith(".codes"):
            module = key[: -len(".codes")]
            scale = arrays.get(f"{module}.scale")
            if scale is None or scale.ndim != 2 or codes.ndim != 2 or codes.shape[1] % max(scale.shape[1], 1):
                raise WeightsError(f"quantized module {module!r}: codes {codes.shape} and scale "
                                   f"{None if scale is None else scale.shape} do not match")
            entries.append((module, codes.shape[1] // scale.shape[1], f"{key[: -len('.codes')]}.offset" in arrays))
    return tuple(entries)


def quantize_arrays(arrays: dict[str, np.ndarray], config: ModelConfig, source: str = "",
                    names: dict[str, str] | None = None) -> tuple[dict[str, np.ndarray], ModelConfig]:
    """Quantize a dense model's weight matrices to Q8_0 (:func:`align_jax.llm.quant.quantize_q8_0`).

    Every ``kernel`` (``[in, out]``) and the embedding table whose input size is a multiple
    of 32 becomes ``codes`` / ``scale``; norms, biases and other matrices stay as they are.
    Returns the new arrays and the config with ``quantized`` set. Used for sources that
    are not GGUF (Hugging Face directories, our dense checkpoints) when ``quantized=True``.
    """
    names = names or {}
    expected = expected_shapes(config.replace(quantized=()))
    out: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        if key in expected and tuple(value.shape) != expected[key]:
            raise WeightsError(f"{source}: tensor {names.get(key, key)!r} has shape {tuple(value.shape)}, "
                               f"expected {expected[key]} for parameter {key}")
        module, leaf = key.rsplit(".", 1)
        weight = None
        if leaf == "kernel" and value.shape[0] % 32 == 0:
            weight = np.asarray(value, np.float32).T  # [out, in]
        elif key == "embed_tokens.embedding" and value.shape[1] % 32 == 0:
            weight = np.asarray(value, np.float32)  # [V, D]
        if weight is None:
            out[key] = value
            continue
        packed = quantize_q8_0(weight)
        out[f"{module}.codes"], out[f"{module}.scale"] = packed.codes, packed.scale
    return out, config.replace(quantized=quantized_entries(out))


def split_fused(key: str, value: np.ndarray, config: ModelConfig, source: str) -> list[tuple[str, np.ndarray]]:
    """Phi-3's fused ``[in, out]`` kernels as our modules' kernels (the columns sliced).

    ``layers.{i}.qkv`` (``qkv_proj``, columns ``[q (H hd) | k (Hkv hd) | v (Hkv hd)]``) ->
    ``self_attn.{q,k,v}_proj.kernel``; ``layers.{i}.gate_up`` (``gate_up_proj``, columns
    ``[gate (I) | up (I)]``) -> ``mlp.{gate,up}_proj.kernel``. Other keys pass through.
    ``layers.{i}.qkv.codes`` / ``.scale`` / ``.offset`` (block-quantized, ``[out, in]`` rows) are
    split by rows into the same modules' codes / scales / offsets.
    """
    leaf = None
    prefix, _, kind = key.rpartition(".")
    if kind in ("codes", "scale", "offset"):  # quantized: [out, in / ...] rows
        leaf = kind
        prefix, _, kind = prefix.rpartition(".")
    if kind == "qkv":
        sizes = [("self_attn.q_proj", config.num_heads * config.head_dim),
                 ("self_attn.k_proj", config.num_kv_heads * config.head_dim),
                 ("self_attn.v_proj", config.num_kv_heads * config.head_dim)]
    elif kind == "gate_up":
        sizes = [("mlp.gate_proj", config.intermediate_size), ("mlp.up_proj", config.intermediate_size)]
    else:
        return [(key, value)]
    total = sum(n for _, n in sizes)
    axis = 1 if leaf is None else 0
    if value.ndim != 2 or value.shape[axis] != total:
        raise WeightsError(f"{source}: fused tensor for {key} has shape {tuple(value.shape)}, expected "
                           f"{total} {'columns after transposing' if leaf is None else 'rows'}")
    out, start = [], 0
    for module, n in sizes:
        part = value[:, start:start + n] if leaf is None else value[start:start + n]
        out.append((f"{prefix}.{module}.{leaf or 'kernel'}", np.ascontiguousarray(part)))
        start += n
    return out
