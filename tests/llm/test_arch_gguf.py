"""Gemma 3 through the GGUF loader: a tiny random transformers model written the way llama.cpp's
converter lays it out (norm scales stored as ``1 + w``, ``attn_q_norm`` / ``post_ffw_norm`` names,
``gemma3.attention.sliding_window``), loaded with :func:`align_jax.llm.weights.load_gguf` and
compared with the transformers model it came from."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import run_model, tiny_gguf_vocab

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

WINDOW = 8
_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _add_tiny_tokenizer(writer) -> list[str]:
    """The tiny byte-level BPE vocabulary of ``tiny_gguf_vocab`` as GGUF tokenizer metadata."""
    tokens, types, merges = tiny_gguf_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    return tokens


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tiny_gemma3():
    torch.manual_seed(5)
    config = transformers.Gemma3TextConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=8,
        max_position_embeddings=256, rms_norm_eps=1e-6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.2 if name.endswith("norm.weight") else 0.1
            param.copy_(scale * torch.randn_like(param))
    return model.eval()


def _write_gemma3_gguf(path, model, *, pattern: int = 2):
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(1000000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_sliding_window(WINDOW)
    writer.add_uint32("gemma3.attention.sliding_window_pattern", pattern)
    tokens = _add_tiny_tokenizer(writer)
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    for name, value in model.state_dict().items():
        value = value.detach().float().numpy()
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            continue  # tied
        else:
            _, _, layer, rest = name.split(".", 3)
            gguf_name = f"blk.{layer}.{_NAMES[rest]}"
        if gguf_name.endswith("norm.weight"):
            value = value + 1.0  # llama.cpp's converter folds Gemma's (1 + w) into the stored scale
        writer.add_tensor(gguf_name, np.ascontiguousarray(value, np.float32))
    _finish(writer)
    return path


def test_gemma3_gguf_matches_transformers(tmp_path):
    from align_jax.llm.weights import load_gguf

    model = _tiny_gemma3()
    loaded = load_gguf(_write_gemma3_gguf(tmp_path / "tiny-gemma3.gguf", model))
    config = loaded.config
    assert config.arch == "gemma3" and config.sliding_window == WINDOW
    assert [config.layer_is_sliding(i) for i in range(3)] == [True, False, True]
    assert config.rope_local_theta == 10000.0 and config.attention_scale == 8 ** -0.5
    assert config.tie_word_embeddings and loaded.model.lm_head is None
    tokens = np.random.default_rng(2).integers(0, 96, size=(2, 3 * WINDOW))
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    ours, _ = run_model(loaded.model, tokens, positions)
    assert ref.std() > 0.5
    assert np.abs(np.asarray(ours) - ref).max() < 1e-3


def test_gemma3_gguf_default_pattern_is_every_sixth_layer(tmp_path):
    """Without ``sliding_window_pattern`` in the file, layers 6, 12, ... are global, as llama.cpp runs Gemma 3."""
    import gguf as gguf_lib

    from align_jax.llm.gguf_loader import config_from_gguf

    path = tmp_path / "meta.gguf"
    writer = gguf_lib.GGUFWriter(str(path), "gemma3")
    for key, value in (("block_count", 12), ("context_length", 64), ("embedding_length", 32),
                       ("feed_forward_length", 64), ("attention.head_count", 4), ("attention.head_count_kv", 1),
                       ("attention.key_length", 8), ("attention.sliding_window", 16)):
        writer.add_uint32(f"gemma3.{key}", value)
    writer.add_float32("gemma3.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_tensor("token_embd.weight", np.zeros((96, 32), np.float32))
    _finish(writer)
    config = config_from_gguf(gguf_lib.GGUFReader(str(path)), path)
    assert [i for i in range(12) if not config.layer_is_sliding(i)] == [5, 11]


_PHI3_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.qkv_proj.weight": "attn_qkv.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _tiny_phi3():
    torch.manual_seed(6)
    config = transformers.Phi3Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, original_max_position_embeddings=16,
        sliding_window=WINDOW, rope_theta=10000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_scaling={"type": "longrope", "short_factor": [1.0, 1.2, 1.5, 2.0],
                      "long_factor": [1.5, 2.5, 4.0, 6.0]})
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.2 * torch.randn_like(param))
    return model.eval()


def _write_phi3_gguf(path, model, quantize=()):
    """As llama.cpp's Phi3MiniModel converter writes it (fused attn_qkv / ffn_up, rope_factors_* tensors)."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "phi3")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_sliding_window(WINDOW)
    tokens = _add_tiny_tokenizer(writer)
    scaling = cfg.rope_parameters
    writer.add_tensor("rope_factors_long.weight", np.asarray(scaling["long_factor"], np.float32))
    writer.add_tensor("rope_factors_short.weight", np.asarray(scaling["short_factor"], np.float32))
    for name, value in model.state_dict().items():
        value = np.ascontiguousarray(value.detach().float().numpy(), np.float32)
        gguf_name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}.get(name)
        if gguf_name is None:
            _, _, layer, rest = name.split(".", 3)
            gguf_name = f"blk.{layer}.{_PHI3_NAMES[rest]}"
        if any(gguf_name.endswith(q) for q in quantize):
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, value)
    _finish(writer)
    return path


def test_phi3_gguf_matches_transformers_and_splits_quantized_fused_tensors(tmp_path):
    """Fused attn_qkv / ffn_up split into q/k/v and gate/up, longrope factors read from the file;
    with ``quantized=True`` the fused Q8_0 codes are split by rows and give the dequantized model's logits."""
    from align_jax.llm.weights import load_gguf

    model = _tiny_phi3()
    loaded = load_gguf(_write_phi3_gguf(tmp_path / "tiny-phi3.gguf", model))
    config = loaded.config
    assert config.arch == "phi3" and config.sliding_window == WINDOW
    assert config.rope_scaling_dict["rope_type"] == "longrope"
    assert config.rope_scaling_dict["original_max_position_embeddings"] == 16
    tokens = np.random.default_rng(3).integers(0, 96, size=(2, 3 * WINDOW))  # 24 > 16: long factors
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    ours, _ = run_model(loaded.model, tokens, positions)
    assert np.abs(np.asarray(ours) - ref).max() < 1e-3
    quantize = ("attn_qkv.weight", "ffn_up.weight")
    path = _write_phi3_gguf(tmp_path / "tiny-phi3-q8.gguf", model, quantize=quantize)
    dense, packed = load_gguf(path), load_gguf(path, quantized=True)
    assert {p for p, _, _ in packed.config.quantized} == {
        f"layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                       "mlp.gate_proj", "mlp.up_proj")}
    a, _ = run_model(dense.model, tokens, positions)
    b, _ = run_model(packed.model, tokens, positions)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() < 1e-4


def test_llama3_gguf_rope_freqs_match_transformers_llama3_scaling(tmp_path):
    """llama.cpp stores Llama 3.x RoPE scaling as a ``rope_freqs`` tensor of per-frequency divisors
    (convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors); loaded, it reproduces transformers'
    ``"llama3"`` scaling."""
    import math

    from align_jax.llm.weights import load_gguf

    from .conftest import hf_to_gguf_tensors, make_tiny_config, torch_state_numpy, write_tiny_gguf

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    torch.manual_seed(8)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, rope_scaling=scaling)).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            param.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.25 * torch.randn_like(param))
    freqs = 1.0 / (10000.0 ** (np.arange(0, 8, 2, dtype=np.float32) / 8))
    factors = []
    for freq in freqs:  # llama.cpp's formula
        wavelen = 2 * math.pi / freq
        if wavelen < 16 / 4.0:
            factors.append(1.0)
        elif wavelen > 16 / 1.0:
            factors.append(8.0)
        else:
            smooth = (16 / wavelen - 1.0) / (4.0 - 1.0)
            factors.append(1 / ((1 - smooth) / 8.0 + smooth))
    config = make_tiny_config("llama")
    tensors = hf_to_gguf_tensors(torch_state_numpy(hf), config)
    tensors["rope_freqs.weight"] = np.asarray(factors, np.float32)
    loaded = load_gguf(write_tiny_gguf(tmp_path / "tiny-llama3.gguf", config, tensors))
    assert loaded.config.rope_scaling_dict["rope_type"] == "freq_factors"
    tokens = np.random.default_rng(4).integers(0, 96, size=(2, 24))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    ours, _ = run_model(loaded.model, tokens, np.broadcast_to(np.arange(24), tokens.shape))
    assert np.abs(np.asarray(ours) - ref).max() < 1e-3
