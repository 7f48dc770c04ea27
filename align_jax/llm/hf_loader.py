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

from align_jax.llm.model import ModelConfig
from align_jax.llm.params import (LoadedModel, WeightsError, _check_finite, model_from_arrays, quantize_arrays,
                                  refuse_quantized_mesh, split_fused)
from align_jax.llm.tokenizer import ChatTokenizer, TokenizerError

__all__ = [
    "HF_MODEL_TYPES",
    "config_from_hf",
    "read_hf_config",
    "split_fused",
    "load_hf_dir",
]


#: Hugging Face ``model_type`` -> our ``ModelConfig.arch``.
HF_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral", "phi3": "phi3",
                  "gemma3_text": "gemma3"}
_HIDDEN_ACT = {"gemma3": "gelu_pytorch_tanh"}


def _rope_from_hf(config_json: dict, path, arch: str) -> tuple[float, dict, float | None]:
    """``(global theta, global scaling dict, local theta or None)`` from either the transformers-5
    ``rope_parameters`` (flat, or per layer type for Gemma 3) or the older ``rope_theta`` /
    ``rope_scaling`` / ``rope_local_base_freq`` fields."""
    params = config_json.get("rope_parameters") or {}
    local = None
    if "full_attention" in params or "sliding_attention" in params:
        local_params = params.get("sliding_attention") or {}
        params = params.get("full_attention") or {}
        if _rope_kind(local_params, path) != "default":
            raise WeightsError(f"{path}: field 'rope_parameters.sliding_attention' has RoPE scaling "
                               f"{_rope_kind(local_params, path)!r}; only the global layers may scale RoPE")
        local = local_params.get("rope_theta")
    scaling = dict(config_json.get("rope_scaling") or {})
    scaling.update(params)
    theta = scaling.pop("rope_theta", None) or config_json.get("rope_theta")
    if theta is None:
        theta = 1000000.0 if arch == "gemma3" else 10000.0
    if arch == "gemma3" and local is None:
        local = config_json.get("rope_local_base_freq", 10000.0)
    kind = _rope_kind(scaling, path)
    partial = scaling.pop("partial_rotary_factor", config_json.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise WeightsError(f"{path}: field 'partial_rotary_factor'={partial!r} is not supported (only 1.0)")
    if kind == "default":
        return float(theta), {}, None if local is None else float(local)
    keep = {"linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
            "longrope": ("short_factor", "long_factor", "original_max_position_embeddings", "attention_factor",
                         "factor")}[kind]
    out = {"rope_type": kind}
    for key in keep:
        value = scaling.get(key)
        if value is None and key == "original_max_position_embeddings":
            value = config_json.get("original_max_position_embeddings")
        if value is not None:
            out[key] = value
    return float(theta), out, None if local is None else float(local)


def _rope_kind(scaling: dict, path) -> str:
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    kind = {"su": "longrope"}.get(kind, kind)
    if kind not in ("default", "linear", "llama3", "longrope"):
        raise WeightsError(f"{path}: RoPE scaling rope_type={kind!r} is not supported "
                           "(supported: default, linear, llama3, longrope/su)")
    return kind


def _sliding_from_hf(config_json: dict, arch: str, num_layers: int, path) -> tuple[int | None, tuple]:
    """``(sliding_window, layer_types)`` as transformers reads them for each family."""
    window = config_json.get("sliding_window")
    layer_types = tuple(config_json.get("layer_types") or ())
    if arch == "llama":
        return None, ()
    if arch == "qwen2":
        if not config_json.get("use_sliding_window"):
            return None, ()
        if not layer_types:
            first = int(config_json.get("max_window_layers", num_layers))
            layer_types = tuple("sliding_attention" if i >= first else "full_attention" for i in range(num_layers))
    elif arch == "gemma3":
        if not layer_types:
            pattern = int(config_json.get("sliding_window_pattern") or config_json.get("_sliding_window_pattern") or 6)
            layer_types = tuple("sliding_attention" if (i + 1) % pattern else "full_attention"
                                for i in range(num_layers))
        if config_json.get("use_bidirectional_attention"):
            raise WeightsError(f"{path}: field 'use_bidirectional_attention'=true is not supported")
    else:  # mistral, phi3: every layer slides when sliding_window is set
        layer_types = ()
    if window is None:
        if "sliding_attention" in layer_types:
            raise WeightsError(f"{path}: field 'layer_types' names sliding layers but 'sliding_window' is missing")
        return None, ()
    if "sliding_attention" not in layer_types and layer_types:
        return None, ()
    return int(window), layer_types


def config_from_hf(config_json: dict, path, dtype: str = "float32") -> ModelConfig:
    """:class:`ModelConfig` from a Hugging Face ``config.json`` dict.

    ``model_type`` llama (incl. Llama 3.x ``"llama3"`` RoPE scaling), qwen2, mistral, phi3
    (``"longrope"`` / ``"su"`` scaling) or gemma3_text; see :data:`HF_MODEL_TYPES`.
    """
    model_type = config_json.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        hint = ""
        if model_type == "gemma3":
            hint = " (a multimodal Gemma 3 checkpoint: only the text-only gemma3_text models, e.g. 270M / 1B, load)"
        raise WeightsError(f"{path}: unsupported model_type={model_type!r}{hint}; supported: {list(HF_MODEL_TYPES)}")
    arch = HF_MODEL_TYPES[model_type]

    def field(name, default=None):
        if name in config_json and config_json[name] is not None:
            return config_json[name]
        if default is None:
            raise WeightsError(f"{path}: field {name!r} is missing")
        return default

    act_field = "hidden_activation" if arch == "gemma3" else "hidden_act"
    want_act = _HIDDEN_ACT.get(arch, "silu")
    act = config_json.get(act_field) or config_json.get("hidden_act") or want_act
    if act != want_act:
        raise WeightsError(f"{path}: field {act_field!r}={act!r} is not supported for {model_type} (only {want_act!r})")
    if config_json.get("mlp_bias"):
        raise WeightsError(f"{path}: field 'mlp_bias'=true is not supported")
    for name in ("final_logit_softcapping", "attn_logit_softcapping"):
        if config_json.get(name) is not None:
            raise WeightsError(f"{path}: field {name!r}={config_json[name]!r} is not supported")
    theta, scaling, local_theta = _rope_from_hf(config_json, path, arch)
    heads = int(field("num_attention_heads"))
    hidden = int(field("hidden_size"))
    head_dim = config_json.get("head_dim") or hidden // heads
    num_layers = int(field("num_hidden_layers"))
    window, layer_types = _sliding_from_hf(config_json, arch, num_layers, path)
    bias = True if arch == "qwen2" else bool(config_json.get("attention_bias", False))
    if arch == "phi3" and bias:
        raise WeightsError(f"{path}: field 'attention_bias'=true is not supported for phi3")
    tie_default = arch == "gemma3"
    try:
        return ModelConfig(
            arch=arch,
            vocab_size=int(field("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(field("intermediate_size")),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=int(config_json.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rope_theta=float(theta),
            rms_norm_eps=float(field("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(field("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config_json.get("tie_word_embeddings", tie_default)),
            attention_bias=bias,
            dtype=dtype,
            rope_scaling=scaling,
            sliding_window=window,
            layer_types=layer_types,
            rope_local_theta=local_theta,
            query_pre_attn_scalar=(float(config_json.get("query_pre_attn_scalar", 256))
                                   if arch == "gemma3" else None),
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
_GEMMA_LAYER_MAP = {
    "self_attn.q_norm.weight": ("self_attn.q_norm.scale", False),
    "self_attn.k_norm.weight": ("self_attn.k_norm.scale", False),
    "pre_feedforward_layernorm.weight": ("pre_feedforward_layernorm.scale", False),
    "post_feedforward_layernorm.weight": ("post_feedforward_layernorm.scale", False),
}
#: Phi-3's fused projections, split into our modules: name -> (module, kinds of the column blocks).
_PHI3_FUSED = {"self_attn.qkv_proj.weight": "qkv", "mlp.gate_up_proj.weight": "gate_up"}
_HF_GLOBAL_MAP = {
    "model.embed_tokens.weight": ("embed_tokens.embedding", False),
    "model.norm.weight": ("norm.scale", False),
    "lm_head.weight": ("lm_head.kernel", True),
}
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _hf_target(name: str, arch: str = "llama") -> tuple[str, bool] | None:
    if name in _HF_GLOBAL_MAP:
        return _HF_GLOBAL_MAP[name]
    match = _HF_LAYER_RE.match(name)
    if match:
        layer_map = {**_HF_LAYER_MAP, **_GEMMA_LAYER_MAP} if arch == "gemma3" else _HF_LAYER_MAP
        if arch == "phi3" and match.group(2) in _PHI3_FUSED:
            return f"layers.{int(match.group(1))}.{_PHI3_FUSED[match.group(2)]}", True
        if match.group(2) in layer_map:
            target, transpose = layer_map[match.group(2)]
            return f"layers.{int(match.group(1))}.{target}", transpose
    return None


def read_hf_config(path: str | os.PathLike, dtype: str = "float32") -> ModelConfig:
    """The :class:`ModelConfig` of a Hugging Face model directory, from its ``config.json`` alone
    (no weights read): checks that a directory holds a model this decoder runs, without a GPU."""
    path = pathlib.Path(path).expanduser()
    if not path.is_dir():
        raise WeightsError(f"{path}: no such model directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise WeightsError(f"{path}: no config.json in this directory (not a Hugging Face model dir)")
    try:
        config_json = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise WeightsError(f"{config_file}: invalid JSON at line {err.lineno}: {err.msg}") from err
    return config_from_hf(config_json, config_file, dtype)


def _weight_files(path: pathlib.Path) -> list[pathlib.Path]:
    """The safetensors files holding the transformers weights of ``path``.

    Those listed by ``model.safetensors.index.json`` when it exists; otherwise every
    ``*.safetensors`` except Mistral's native-format ``consolidated*.safetensors`` (which
    repositories such as Ministral-8B ship next to the transformers shards)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise WeightsError(f"{index}: not a safetensors index (no 'weight_map'): {err}") from err
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightsError(f"{index}: lists weight files missing from the directory: {missing[:4]}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if len(files) > 1:
        files = [f for f in files if not f.name.startswith("consolidated")] or files
    if not files:
        raise WeightsError(f"{path}: no *.safetensors weight files in this directory")
    return files


def load_hf_dir(path: str | os.PathLike, *, dtype: str = "float32", param_dtype: str | None = None,
                quantized: bool = False, mesh=None) -> LoadedModel:
    """Load a Hugging Face model directory: ``config.json``, ``*.safetensors``, tokenizer files.

    ``quantized``: quantize the weight matrices to Q8_0 (:func:`quantize_arrays`).
    ``mesh``: place every weight straight into its shards on this device mesh
    (:func:`~align_jax.llm.params.model_from_arrays`; the mesh is checked against the config
    before any tensor is read).
    """
    from safetensors import safe_open

    path = pathlib.Path(path).expanduser()
    config = read_hf_config(path, dtype).replace(param_dtype=param_dtype)
    if mesh is not None:  # before any tensor is read
        from align_jax.llm.sharding import check_mesh

        refuse_quantized_mesh(str(path), quantized, mesh)
        check_mesh(mesh, config)
    files = _weight_files(path)
    arrays: dict[str, np.ndarray] = {}
    names: dict[str, str] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="numpy") as handle:
                for name in handle.keys():
                    if name.endswith("rotary_emb.inv_freq"):
                        continue
                    target = _hf_target(name, config.arch)
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
                    for part, part_value in split_fused(key, np.asarray(value, dtype=np.float32), config,
                                                        f"{file}:{name}"):
                        arrays[part] = part_value
                        names[part] = f"{file.name}:{name}"
        except WeightsError:
            raise
        except Exception as err:
            raise WeightsError(f"{file}: cannot read safetensors file: {err}") from err
    _check_finite(arrays, str(path), names)
    if quantized:
        arrays, config = quantize_arrays(arrays, config, str(path), names)
    model = model_from_arrays(config, arrays, str(path), names, mesh=mesh)
    try:
        tokenizer = ChatTokenizer.from_hf_dir(path)
    except TokenizerError as err:
        raise WeightsError(str(err)) from err
    return LoadedModel(config, model, tokenizer, str(path))
