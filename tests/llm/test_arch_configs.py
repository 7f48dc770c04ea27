"""The papers' model families from their Hugging Face ``config.json`` alone (no weights, no GPU), and
``configs/align_paper_gsm8k.yaml``: it names the missing model directory, and loads once they exist.

The ``config.json`` dicts below carry the fields of the published checkpoints that decide the
architecture (model type, sliding window, RoPE scaling, fused projections)."""

from __future__ import annotations

import json
import pathlib

import pytest

from align_jax.llm.weights import WeightsError, read_hf_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAPER_CONFIG = ROOT / "configs" / "align_paper_gsm8k.yaml"


def _longrope(n):
    return {"type": "longrope", "short_factor": [1.0 + 0.01 * i for i in range(n)],
            "long_factor": [1.0 + 0.5 * i for i in range(n)]}


HF_CONFIGS = {
    "Ministral-8B-Instruct-2410": {
        "model_type": "mistral", "architectures": ["MistralForCausalLM"], "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 4096, "intermediate_size": 12288, "max_position_embeddings": 32768,
        "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
        "rope_theta": 100000000.0, "sliding_window": 32768, "tie_word_embeddings": False, "vocab_size": 131072},
    "zephyr-7b-beta": {
        "model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_act": "silu", "hidden_size": 4096,
        "intermediate_size": 14336, "max_position_embeddings": 32768, "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
        "sliding_window": 4096, "tie_word_embeddings": False, "vocab_size": 32000},
    "Phi-3-mini-4k-instruct": {
        "model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "hidden_act": "silu", "hidden_size": 3072,
        "intermediate_size": 8192, "max_position_embeddings": 4096, "original_max_position_embeddings": 4096,
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-05,
        "rope_scaling": None, "rope_theta": 10000.0, "sliding_window": 2047, "tie_word_embeddings": False,
        "attention_bias": False, "vocab_size": 32064},
    "Phi-3-mini-128k-instruct": {
        "model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "hidden_act": "silu", "hidden_size": 3072,
        "intermediate_size": 8192, "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-05,
        "rope_scaling": _longrope(48), "rope_theta": 10000.0, "sliding_window": 262144,
        "tie_word_embeddings": False, "vocab_size": 32064},
    "Qwen2.5-7B-Instruct": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "hidden_size": 3584,
        "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28,
        "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 131072, "use_sliding_window": False,
        "tie_word_embeddings": False, "vocab_size": 152064},
    "Llama-3.1-8B-Instruct": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "hidden_size": 4096,
        "intermediate_size": 14336, "max_position_embeddings": 131072, "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": False, "vocab_size": 128256},
    "gemma-3-1b-it": {
        "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "intermediate_size": 6912,
        "max_position_embeddings": 32768, "num_attention_heads": 4, "num_hidden_layers": 26,
        "num_key_value_heads": 1, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
        "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512,
        "sliding_window_pattern": 6, "final_logit_softcapping": None, "attn_logit_softcapping": None,
        "vocab_size": 262144},
}


def _write_dirs(root: pathlib.Path, names) -> None:
    for name in names:
        directory = root / "models" / name
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(HF_CONFIGS[name]))


def test_published_configs_map_to_our_decoder(tmp_path):
    _write_dirs(tmp_path, HF_CONFIGS)
    read = {name: read_hf_config(tmp_path / "models" / name) for name in HF_CONFIGS}
    ministral, zephyr = read["Ministral-8B-Instruct-2410"], read["zephyr-7b-beta"]
    assert (ministral.arch, ministral.sliding_window, ministral.head_dim) == ("mistral", 32768, 128)
    assert zephyr.sliding_window == 4096 and all(zephyr.layer_is_sliding(i) for i in range(32))
    phi4k, phi128k = read["Phi-3-mini-4k-instruct"], read["Phi-3-mini-128k-instruct"]
    assert phi4k.arch == "phi3" and phi4k.sliding_window == 2047 and phi4k.rope_scaling == ()
    scaling = phi128k.rope_scaling_dict
    assert scaling["rope_type"] == "longrope" and scaling["original_max_position_embeddings"] == 4096
    assert len(scaling["long_factor"]) == 48
    qwen = read["Qwen2.5-7B-Instruct"]
    assert qwen.arch == "qwen2" and qwen.attention_bias and not qwen.has_sliding_layers
    qwen_sliding = read_hf_config_from_dict(dict(HF_CONFIGS["Qwen2.5-7B-Instruct"], use_sliding_window=True))
    assert [i for i in range(28) if qwen_sliding.layer_is_sliding(i)] == []  # max_window_layers = 28
    qwen_sliding = read_hf_config_from_dict(dict(HF_CONFIGS["Qwen2.5-7B-Instruct"], use_sliding_window=True,
                                                 max_window_layers=20))
    assert [i for i in range(28) if qwen_sliding.layer_is_sliding(i)] == list(range(20, 28))
    llama = read["Llama-3.1-8B-Instruct"]
    assert llama.rope_scaling_dict == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    gemma = read["gemma-3-1b-it"]
    assert gemma.arch == "gemma3" and gemma.tie_word_embeddings and gemma.rope_local_theta == 10000.0
    assert [i for i in range(26) if not gemma.layer_is_sliding(i)] == [5, 11, 17, 23]


def test_llama3_rope_scaling_matches_transformers():
    """Inverse frequencies of the Llama 3.1 scaling, against transformers' own function."""
    import numpy as np

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from align_jax.llm.model import rope_inv_freq

    cfg = dict(HF_CONFIGS["Llama-3.1-8B-Instruct"])
    cfg.pop("model_type"), cfg.pop("architectures")
    hf_config = transformers.LlamaConfig(**cfg)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, torch.device("cpu"))
    ours = read_hf_config_from_dict(HF_CONFIGS["Llama-3.1-8B-Instruct"])
    got, factor = rope_inv_freq(ours.head_dim, ours.rope_theta, ours.rope_scaling)
    assert factor == 1.0
    np.testing.assert_allclose(np.asarray(got), expected.numpy(), rtol=1e-6)


def read_hf_config_from_dict(config_json):
    from align_jax.llm.hf_loader import config_from_hf

    return config_from_hf(config_json, "<test>")


def test_unsupported_fields_are_named(tmp_path):
    bad = dict(HF_CONFIGS["Llama-3.1-8B-Instruct"], rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(WeightsError, match="rope_type='yarn'"):
        read_hf_config_from_dict(bad)
    with pytest.raises(WeightsError, match="multimodal Gemma 3"):
        read_hf_config_from_dict({"model_type": "gemma3"})
    with pytest.raises(WeightsError, match="no such model directory"):
        read_hf_config(tmp_path / "absent")


def test_paper_config_names_the_missing_directory(tmp_path, monkeypatch):
    from align_jax.methods.reason_config import load_reason_config
    from align_jax.config import ConfigError

    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError, match=r"align_paper_gsm8k.yaml:\d+: agents.0.model: .*Ministral-8B-Instruct-2410"):
        load_reason_config(PAPER_CONFIG)
    _write_dirs(tmp_path, ["Ministral-8B-Instruct-2410", "zephyr-7b-beta", "Phi-3-mini-4k-instruct"])
    with pytest.raises(ConfigError, match=r"principal.model: .*Qwen2.5-7B-Instruct"):
        load_reason_config(PAPER_CONFIG)


def test_paper_config_loads_and_matches_the_paper(tmp_path, monkeypatch):
    from align_jax.methods.reason_config import load_reason_config

    monkeypatch.setenv("HOME", str(tmp_path))
    names = ["Ministral-8B-Instruct-2410", "zephyr-7b-beta", "Phi-3-mini-4k-instruct", "Qwen2.5-7B-Instruct"]
    _write_dirs(tmp_path, names)
    config = load_reason_config(PAPER_CONFIG)
    assert len(config.agents) == 3 and {a.num_samples for a in config.agents} == {16}  # K
    assert config.game.num_rounds == 20 and config.game.step_size == 0.1  # T, eta
    archs = [read_hf_config(a.model).arch for a in config.agents]
    assert archs == ["mistral", "mistral", "phi3"]
    assert read_hf_config(config.principal.model).arch == "qwen2"
