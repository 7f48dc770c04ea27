"""Hugging Face model directories (``config.json`` + ``*.safetensors`` + tokenizer) -> :class:`Transformer`.

Errors are :class:`~align_jax.llm.params.WeightsError` naming the file and the tensor or
field at fault. Import these names from :mod:`align_jax.llm.weights`.
"""

from __future__ import annotations

import json
import os
import pathlib
import re

import numpy as np

from align_jax.llm.model import SUPPORTED_ARCHS, ModelConfig
from align_jax.llm.params import LoadedModel, WeightsError, _check_finite, model_from_arrays, quantize_arrays
from align_jax.llm.tokenizer import ChatTokenizer, TokenizerError

__all__ = [
    "config_from_hf",
    "load_hf_dir",
]


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
