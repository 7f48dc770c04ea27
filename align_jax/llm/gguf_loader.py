"""GGUF files -> :class:`Transformer`: metadata, tensor reading, dequantization.

:func:`load_gguf` reads config and tokenizer from the GGUF metadata and dequantizes every
tensor with ``gguf.quants.dequantize`` (or, with ``quantized=True``, keeps block-quantized
weight matrices as int8 codes + scales, :mod:`align_jax.llm.quant`). Errors are
:class:`~align_jax.llm.params.WeightsError` naming the file and the tensor or metadata
field at fault. Import these names from :mod:`align_jax.llm.weights`.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import re

import numpy as np

from align_jax.llm.model import SUPPORTED_ARCHS, ModelConfig
from align_jax.llm.params import (LoadedModel, WeightsError, _check_finite, model_from_arrays, quantized_entries,
                                  split_fused)
from align_jax.llm.quant import QUANTIZED_GGUF_TYPES, unpack_gguf
from align_jax.llm.tokenizer import ChatTokenizer, TokenizerError, read_gguf_tokenizer_metadata

__all__ = [
    "SUPPORTED_GGUF_TYPES",
    "config_from_gguf",
    "gguf_arrays",
    "load_gguf",
]


def _gguf_types() -> dict[str, int]:
    import gguf

    return {name: int(getattr(gguf.GGMLQuantizationType, name)) for name in SUPPORTED_GGUF_TYPES}


#: GGML tensor types this loader dequantizes (names as in ``gguf.GGMLQuantizationType``).
SUPPORTED_GGUF_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


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
    rope_scaling = {}
    if scaling == "linear":
        factor = _meta(reader, f"{arch}.rope.scaling.factor", path, default=1.0, required=False)
        if float(factor) != 1.0:
            rope_scaling = {"rope_type": "linear", "factor": _f32_decimal(factor)}
    elif scaling not in ("none", None):
        raise WeightsError(f"{path}: unsupported RoPE scaling {arch}.rope.scaling.type={scaling!r}")
    tensors = {t.name: t for t in reader.tensors}
    if arch == "phi3" and "rope_factors_long.weight" in tensors:  # Phi-3 128K: longrope
        if rope_scaling:
            raise WeightsError(f"{path}: both {arch}.rope.scaling.type and rope_factors_* tensors are set")
        original = _meta(reader, f"{arch}.rope.scaling.original_context_length", path)
        factors = {}
        for kind in ("long", "short"):
            tensor = tensors.get(f"rope_factors_{kind}.weight")
            if tensor is None:
                raise WeightsError(f"{path}: tensor 'rope_factors_{kind}.weight' is missing")
            factors[f"{kind}_factor"] = tuple(float(x) for x in _dequantize(tensor, path).reshape(-1))
        rope_scaling = {"rope_type": "longrope", "original_max_position_embeddings": int(original), **factors}
    if "rope_freqs.weight" in tensors:  # Llama 3.x: per-frequency divisors of inv_freq (llama.cpp's freq_factors)
        if rope_scaling:
            raise WeightsError(f"{path}: both {arch}.rope.scaling.type and tensor 'rope_freqs.weight' are set")
        rope_scaling = {"rope_type": "freq_factors",
                        "factors": tuple(float(x) for x in _dequantize(tensors["rope_freqs.weight"], path).reshape(-1))}
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
    num_layers = int(_meta(reader, f"{arch}.block_count", path))
    gemma = {}
    if arch == "phi3":  # every layer slides when the window is set (0: none, as llama.cpp writes Phi-4)
        window = int(_meta(reader, f"{arch}.attention.sliding_window", path, default=0, required=False))
        gemma = dict(sliding_window=window or None)
    if arch == "gemma3":  # as llama.cpp (llama-model.cpp) runs it: every 6th layer global
        window = int(_meta(reader, f"{arch}.attention.sliding_window", path))
        pattern = int(_meta(reader, f"{arch}.attention.sliding_window_pattern", path, default=6, required=False))
        gemma = dict(
            sliding_window=window,
            layer_types=tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)),
            rope_local_theta=10000.0,  # llama.cpp's rope_freq_base_train_swa for gemma3
            # Gemma 3 27B (62 layers) scales by (D / H) ** -0.5, the others by head_dim ** -0.5.
            query_pre_attn_scalar=float(hidden // heads if num_layers == 62 else head_dim),
        )
    try:
        return ModelConfig(
            arch=arch,
            vocab_size=emb_shape[1],
            hidden_size=hidden,
            intermediate_size=int(_meta(reader, f"{arch}.feed_forward_length", path)),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rope_theta=_f32_decimal(_meta(reader, f"{arch}.rope.freq_base", path, default=10000.0, required=False)),
            rms_norm_eps=_f32_decimal(_meta(reader, f"{arch}.attention.layer_norm_rms_epsilon", path)),
            max_position_embeddings=int(_meta(reader, f"{arch}.context_length", path)),
            tie_word_embeddings="output.weight" not in tensors,
            attention_bias="blk.0.attn_q.bias" in tensors,
            dtype=dtype,
            rope_scaling=rope_scaling,
            **gemma,
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
_GEMMA_GGUF_LAYER_MAP = {
    "attn_norm.weight": ("input_layernorm.scale", False),
    "post_attention_norm.weight": ("post_attention_layernorm.scale", False),
    "ffn_norm.weight": ("pre_feedforward_layernorm.scale", False),
    "post_ffw_norm.weight": ("post_feedforward_layernorm.scale", False),
    "attn_q_norm.weight": ("self_attn.q_norm.scale", False),
    "attn_k_norm.weight": ("self_attn.k_norm.scale", False),
}
#: Phi-3's fused tensors: attn_qkv ([q | k | v] rows) and ffn_up (its gate_up_proj: [gate | up] rows).
_PHI3_GGUF_LAYER_MAP = {
    "attn_qkv.weight": ("qkv", True),
    "ffn_up.weight": ("gate_up", True),
}
_GGUF_SKIPPED = ("rope_factors_long.weight", "rope_factors_short.weight", "rope_freqs.weight")  # read into the config
_GGUF_GLOBAL_MAP = {
    "token_embd.weight": ("embed_tokens.embedding", False),
    "output_norm.weight": ("norm.scale", False),
    "output.weight": ("lm_head.kernel", True),
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def _gguf_target(name: str, arch: str = "llama") -> tuple[str, bool] | None:
    if name in _GGUF_GLOBAL_MAP:
        return _GGUF_GLOBAL_MAP[name]
    match = _BLOCK_RE.match(name)
    if match:
        layer_map = {"gemma3": {**_GGUF_LAYER_MAP, **_GEMMA_GGUF_LAYER_MAP},
                     "phi3": {**_GGUF_LAYER_MAP, **_PHI3_GGUF_LAYER_MAP}}.get(arch, _GGUF_LAYER_MAP)
        if match.group(2) in layer_map:
            target, transpose = layer_map[match.group(2)]
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

    Llama q/k weights are un-permuted; Gemma 3 norm scales (stored as ``1 + w``) have 1
    subtracted; kernels are transposed to ``[in, out]``.

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
        if tensor.name in _GGUF_SKIPPED:
            continue
        target = _gguf_target(tensor.name, config.arch)
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
            module = target.rsplit(".", 1)[0] if target.endswith((".kernel", ".embedding")) else target  # fused: as is
            unpacked = _unpack(tensor, path)
            out = [(f"{module}.codes", unpermute(tensor, unpacked.codes)),
                   (f"{module}.scale", unpermute(tensor, unpacked.scale))]
            if unpacked.offset is not None:
                out.append((f"{module}.offset", unpermute(tensor, unpacked.offset)))
            return [part for name, value in out
                    for part in split_fused(name, np.ascontiguousarray(value), config, f"{path}:{tensor.name}")]
        value = unpermute(tensor, _dequantize(tensor, path))
        if config.arch == "gemma3" and tensor.name.endswith("norm.weight"):
            value = value - 1.0  # llama.cpp stores Gemma's (1 + w) norm scales; our RMSNorm adds the 1
        if transpose:
            value = np.ascontiguousarray(value.T)
        return split_fused(target, value, config, f"{path}:{tensor.name}")

    workers = num_threads or min(4, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = dict(item for items in pool.map(convert, jobs) for item in items)
    for key in list(arrays):
        match = re.match(r"^(layers\.\d+)\.(self_attn|mlp)\.", key)
        if key not in names and match and config.arch == "phi3":  # a part of a fused tensor
            fused = names.get(f"{match.group(1)}.{'qkv' if match.group(2) == 'self_attn' else 'gate_up'}")
            if fused:
                names[key] = fused
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


def load_gguf(path: str | os.PathLike, *, dtype: str = "float32", param_dtype: str | None = None,
              quantized: bool = False, mesh=None) -> LoadedModel:
    """Load a ``.gguf`` file: weights, config and tokenizer from its metadata.

    By default every tensor is dequantized to float (``param_dtype``). With ``quantized``
    the block-quantized weight matrices stay quantized (int8 codes + per-block scales,
    :mod:`align_jax.llm.quant`): the same weight values in a quarter of the memory, and
    decoding on the CPU streams a quarter of the bytes.

    ``mesh``: place every weight straight into its shards on this device mesh (dense models
    only; :func:`~align_jax.llm.params.model_from_arrays`).
    """
    path = pathlib.Path(path).expanduser()
    arrays, names, config, tokenizer = _convert_gguf(path, dtype, quantized)
    config = config.replace(param_dtype=param_dtype)
    model = model_from_arrays(config, arrays, str(path), names, mesh=mesh)
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
