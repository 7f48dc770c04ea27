"""Device meshes for the sampler and scoring: data parallel rows, tensor parallel weights.

A mesh has two named axes, :data:`DATA_AXIS` (``"data"``, size d) and :data:`MODEL_AXIS`
(``"model"``, size m), over ``d * m`` devices:

* **data**: the R rows of a batch are split into d contiguous blocks, one per data index;
  every data index holds a full replica of the (model-sharded) weights.
* **model** (Megatron-style tensor parallelism): the q/k/v, gate and up projections are
  column-parallel (``kernel [D, out]`` split over ``out``, whole heads per device), the o and
  down projections row-parallel (``kernel [in, D]`` split over ``in``), so a block needs one
  all-reduce after attention and one after the MLP; the KV cache ``[R, Hkv, S, hd]`` is split
  over its KV heads; the embedding ``[V, D]`` and an untied LM head ``[D, V]`` over the
  vocabulary (replicated when m does not divide V); norms are replicated.

The weights, the batch and the cache carry :class:`jax.sharding.NamedSharding` s; the compiled
programs of :mod:`~align_jax.llm.decoding`, :mod:`~align_jax.llm.decode_loop` and
:mod:`~align_jax.llm.scoring` take the mesh as a static argument and pin the cache, the row
buffers and the logits with sharding constraints; XLA's SPMD partitioner propagates the rest
and inserts the collectives (two all-reduces per layer, an all-gather of the sampled step's
logits over the vocabulary).

Validation (:func:`check_mesh`) reads only the :class:`~align_jax.llm.model.ModelConfig`, so it
can run before any weight is loaded (e.g. on :func:`~align_jax.llm.hf_loader.read_hf_config`'s
result); :class:`~align_jax.llm.sampler.Sampler` and
:func:`~align_jax.llm.scoring.score_continuations` call it before moving a weight::

    mesh = make_mesh(data=4, model=2)               # 8 devices: rows 4 ways, weights 2 ways
    sampler = Sampler(loaded, mesh=mesh)            # weights sharded once, here
    out = sampler.generate(prompts, key=key, num_samples=8, temperature=0.7)
    scores = score_continuations(loaded, prompts=prompts, continuations=texts, mesh=mesh)
 Not sharded: block-quantized weights and the native CPU
kernels (:mod:`align_jax.llm.kernels`); a mesh needs a dense model and, on the CPU backend,
``ALIGN_JAX_NATIVE_KERNELS=0`` (the XLA path, which is what GPUs run).

Shapes: R rows, B prompts, K samples per prompt, S cache slots, V vocabulary, D hidden size,
H query heads, Hkv KV heads, hd head dimension, I MLP width, d data axis size, m model axis size.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from align_jax.llm.model import KVCache, ModelConfig

__all__ = [
    "DATA_AXIS",
    "MODEL_AXIS",
    "make_mesh",
    "check_mesh",
    "padded_rows",
    "param_spec",
    "param_shardings",
    "shard_params",
    "cache_spec",
    "row_spec",
    "constrain",
    "constrain_cache",
    "constrain_rows",
]

DATA_AXIS = "data"
"""Name of the mesh axis the batch rows are split over."""

MODEL_AXIS = "model"
"""Name of the mesh axis the weights (heads, MLP width, vocabulary) are split over."""

# Flat parameter names (``layers.3.self_attn.q_proj.kernel``) -> how they split over the model axis.
_COLUMN = re.compile(r"^layers\.\d+\.(self_attn\.(q|k|v)_proj|mlp\.(gate|up)_proj)\.(kernel|bias)$")
_ROW = re.compile(r"^layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)\.kernel$")


def make_mesh(data: int | None = None, model: int = 1, *, devices: Sequence | None = None) -> Mesh:
    """A ``(data, model)`` mesh with axes :data:`DATA_AXIS`, :data:`MODEL_AXIS` (``AxisType.Auto``).

    Args:
      data: d, rows split this many ways; default ``len(devices) // model``.
      model: m, weights split this many ways (tensor parallel).
      devices: the devices to use (default ``jax.devices()``); the first ``d * m`` are laid out
        row-major, so the m devices of one data index are neighbours.

    Raises:
      ValueError: a size below 1, or more devices asked for than there are.
    """
    devices = list(jax.devices() if devices is None else devices)
    for name, size in (("model", model), ("data", data)):
        if size is not None and (isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1):
            raise ValueError(f"make_mesh: {name}={size!r}; expected an int >= 1")
    if data is None:
        data = max(len(devices) // model, 1)
    if data * model > len(devices):
        raise ValueError(f"make_mesh: data={data} x model={model} = {data * model} devices, but only "
                         f"{len(devices)} are available")
    grid = np.array(devices[:data * model], dtype=object).reshape(data, model)
    return Mesh(grid, (DATA_AXIS, MODEL_AXIS), axis_types=(AxisType.Auto, AxisType.Auto))


def _axis_size(mesh: Mesh, name: str) -> int:
    return int(mesh.shape[name])


def check_mesh(mesh: Any, config: ModelConfig) -> Mesh:
    """Check that ``mesh`` can run a model of shape ``config``; returns it with ``Auto`` axes.

    Reads only the config, so it can be called before loading weights. The model axis size m
    must divide ``num_heads``, ``num_kv_heads`` (the cache is split over KV heads) and
    ``intermediate_size``; the model must be dense (no ``quantized`` modules); on the CPU
    backend the native kernels must be off (``ALIGN_JAX_NATIVE_KERNELS=0``), since their
    custom calls cannot be partitioned. The batch needs no check: callers pad it to a multiple
    of the data axis (:func:`padded_rows`) and drop the padding from their output.

    Raises:
      TypeError: ``mesh`` is not a ``jax.sharding.Mesh``.
      ValueError: a missing axis, an extra axis of size > 1, or a size that does not divide a
        field of the config (the message names the axis, its size and the field).
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (see align_jax.llm.sharding.make_mesh), "
                        f"got {type(mesh).__name__}")
    names = tuple(mesh.axis_names)
    for axis in (DATA_AXIS, MODEL_AXIS):
        if axis not in names:
            raise ValueError(f"mesh has axes {names}; it needs an axis named {axis!r} "
                             f"(rows are split over {DATA_AXIS!r}, weights over {MODEL_AXIS!r}; "
                             f"size 1 turns one off)")
    for axis in names:
        if axis not in (DATA_AXIS, MODEL_AXIS) and _axis_size(mesh, axis) != 1:
            raise ValueError(f"mesh axis {axis!r} has size {_axis_size(mesh, axis)}; only {DATA_AXIS!r} and "
                             f"{MODEL_AXIS!r} may be larger than 1")
    m = _axis_size(mesh, MODEL_AXIS)
    for field in ("num_heads", "num_kv_heads", "intermediate_size"):
        value = getattr(config, field)
        if value % m:
            raise ValueError(f"mesh axis {MODEL_AXIS!r} has size {m}, which does not divide "
                             f"ModelConfig.{field}={value} (each device needs whole "
                             f"{'heads' if 'heads' in field else 'MLP columns'}); use a model axis size "
                             f"dividing {math.gcd(config.num_heads, config.num_kv_heads, config.intermediate_size)}")
    if config.quantized:
        raise ValueError(f"a mesh needs a dense model: ModelConfig.quantized lists {len(config.quantized)} "
                         f"block-quantized modules (e.g. {config.quantized[0][0]!r}), which are not sharded; "
                         f"load the model with quantized=False")
    if mesh.size > 1:
        _check_xla_path()
    if tuple(mesh.axis_types) != (AxisType.Auto,) * len(names):
        mesh = Mesh(mesh.devices, names, axis_types=(AxisType.Auto,) * len(names))
    return mesh


def _check_xla_path() -> None:
    """Raise when the native CPU kernels (unpartitionable custom calls) would be traced."""
    from align_jax.llm import kernels

    if jax.default_backend() != "cpu":
        return
    loaded = kernels.load.cache_info().currsize > 0 and kernels.load()
    if kernels.native_enabled() or loaded:
        raise ValueError(
            "a mesh of more than one device on the CPU backend needs the XLA path: set "
            "ALIGN_JAX_NATIVE_KERNELS=0 before the first model call in this process (the native "
            "CPU kernels are custom calls that XLA cannot split over devices)"
            + (" -- they were already loaded in this process" if loaded else ""))


def padded_rows(rows: int, mesh: Mesh | None) -> int:
    """``rows`` rounded up to a multiple of the data axis size (``rows`` without a mesh)."""
    if mesh is None:
        return rows
    d = _axis_size(mesh, DATA_AXIS)
    return -(-rows // d) * d


def param_spec(name: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The ``PartitionSpec`` of the parameter with flat name ``name`` and ``shape``.

    ``layers.i.self_attn.{q,k,v}_proj`` and ``layers.i.mlp.{gate,up}_proj``: kernel
    ``[D, out]`` -> ``P(None, "model")``, bias ``[out]`` -> ``P("model")``;
    ``layers.i.self_attn.o_proj`` / ``layers.i.mlp.down_proj`` kernel ``[in, D]`` ->
    ``P("model", None)``; ``embed_tokens.embedding [V, D]`` -> ``P("model", None)`` and
    ``lm_head.kernel [D, V]`` -> ``P(None, "model")`` when m divides V; anything else
    (norms, an indivisible vocabulary) replicated, ``P()``. Replicated over the data axis.
    """
    m = _axis_size(mesh, MODEL_AXIS)
    if m == 1:
        return P()
    if _COLUMN.match(name):
        return P(None, MODEL_AXIS) if len(shape) == 2 else P(MODEL_AXIS)
    if _ROW.match(name):
        return P(MODEL_AXIS, None)
    if name == "embed_tokens.embedding" and shape[0] % m == 0:
        return P(MODEL_AXIS, None)
    if name == "lm_head.kernel" and shape[1] % m == 0:
        return P(None, MODEL_AXIS)
    return P()


def _flat_name(path) -> str:
    parts = []
    for entry in path:
        key = getattr(entry, "key", None)
        if key is None:
            key = getattr(entry, "idx", None)
        if key is not None:
            parts.append(str(key))
    return ".".join(parts)


def param_shardings(state: Any, mesh: Mesh) -> Any:
    """``NamedSharding`` s for every array of ``state`` (from ``nnx.split(model)``), by
    parameter path (:func:`param_spec`); a pytree shaped like ``state``."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, param_spec(_flat_name(path), tuple(x.shape), mesh)), state)


def shard_params(state: Any, mesh: Mesh) -> Any:
    """``state`` placed on ``mesh`` (:func:`param_shardings`); arrays already placed so are
    not copied. Host (NumPy) leaves go straight to their shards."""
    return jax.device_put(state, param_shardings(state, mesh))


def cache_spec(config: ModelConfig, rows_split: bool = True) -> KVCache:
    """A :class:`~align_jax.llm.model.KVCache` of ``PartitionSpec`` s: per layer
    ``[R, Hkv, S, hd]`` -> ``P("data", "model", None, None)``, positions ``[R, S]`` ->
    ``P("data", None)`` (``rows_split=False``: rows replicated, for a batch the data axis
    does not divide)."""
    rows = DATA_AXIS if rows_split else None
    layer = P(rows, MODEL_AXIS, None, None)
    return KVCache(k=(layer,) * config.num_layers, v=(layer,) * config.num_layers,
                   positions=P(rows, None) if config.has_sliding_layers else None)


def row_spec(ndim: int) -> P:
    """``P("data", None, ...)``: an ``ndim``-dimensional array split over its first (row) axis."""
    return P(DATA_AXIS, *([None] * (ndim - 1)))


def constrain(x: jax.Array, mesh: Mesh | None, spec: P) -> jax.Array:
    """``with_sharding_constraint(x, NamedSharding(mesh, spec))``, or ``x`` without a mesh."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _rows_divide(mesh: Mesh, rows: int) -> bool:
    return rows % _axis_size(mesh, DATA_AXIS) == 0


def constrain_rows(x: jax.Array, mesh: Mesh | None) -> jax.Array:
    """``x [R, ...]`` split over rows (:func:`row_spec`) when d divides R, else replicated;
    ``x`` without a mesh. Step logits ``[R, V]`` pinned so are whole over the vocabulary
    on every device of a row block (an all-gather over the model axis), so sampling sees
    every logit of its rows."""
    if mesh is None:
        return x
    spec = row_spec(x.ndim) if _rows_divide(mesh, x.shape[0]) else P()
    return constrain(x, mesh, spec)


def constrain_cache(cache: KVCache, mesh: Mesh | None, config: ModelConfig) -> KVCache:
    """``cache`` pinned to :func:`cache_spec` (rows split when d divides R); unchanged without a mesh."""
    if mesh is None:
        return cache
    specs = cache_spec(config, _rows_divide(mesh, cache.batch_size))
    return KVCache(k=tuple(constrain(x, mesh, s) for x, s in zip(cache.k, specs.k)),
                   v=tuple(constrain(x, mesh, s) for x, s in zip(cache.v, specs.v)),
                   positions=None if cache.positions is None else constrain(cache.positions, mesh, specs.positions))
