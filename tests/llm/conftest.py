"""Shared fixtures for the LLM stack: tiny random configs, models and a tiny tokenizer.

Other test files may use:
  tiny_llama_config / tiny_qwen2_config: ModelConfig (float32, vocab 96).
  tiny_llama_model / tiny_qwen2_model: Transformer with random weights (seeded).
  tiny_tokenizer: a ChatTokenizer (byte-level BPE over a 96-token vocabulary with
    <|im_start|>/<|im_end|>/<|endoftext|> and a ChatML template), no files needed.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from align_jax.llm.model import ModelConfig, Transformer, forward

#: ``forward`` jitted with the graphdef static: tests call the model compiled, not op by op.
jit_forward = jax.jit(forward, static_argnums=0)


def run_model(model, tokens, positions, cache=None, cache_index=0, kv_mask=None):
    """Call ``model`` through :data:`jit_forward` (same contract as ``Transformer.__call__``)."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    if kv_mask is None:  # one trace for masked and unmasked calls
        kv_mask = jax.numpy.ones((tokens.shape[0], tokens.shape[1] if cache is None else cache.num_slots), bool)
    jnp = jax.numpy
    return jit_forward(
        graphdef, state, jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32),
        cache, jnp.asarray(cache_index, jnp.int32), jnp.asarray(kv_mask, bool),
    )

TINY_VOCAB = 96

#: Two rows of 12 token ids of the tiny vocabulary, and their positions (for logits comparisons).
TINY_TOKENS = np.array([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26],
                        [27, 18, 28, 18, 28, 45, 90, 45, 23, 53, 60, 28]], np.int32)
TINY_POSITIONS = np.broadcast_to(np.arange(12, dtype=np.int32), (2, 12))


def make_tiny_config(arch: str, **changes) -> ModelConfig:
    """A 2-layer config with GQA (4 query heads, 2 kv heads) and vocabulary 96."""
    base = dict(
        arch=arch,
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        rope_theta=10000.0 if arch == "llama" else 1000000.0,
        rms_norm_eps=1e-5 if arch == "llama" else 1e-6,
        max_position_embeddings=256,
        tie_word_embeddings=arch == "qwen2",
        attention_bias=arch == "qwen2",
        dtype="float32",
    )
    base.update(changes)
    return ModelConfig(**base)


@pytest.fixture
def tiny_llama_config() -> ModelConfig:
    return make_tiny_config("llama")


@pytest.fixture
def tiny_qwen2_config() -> ModelConfig:
    return make_tiny_config("qwen2")


@pytest.fixture
def tiny_llama_model(tiny_llama_config) -> Transformer:
    from flax import nnx

    return Transformer(tiny_llama_config, rngs=nnx.Rngs(0))


@pytest.fixture
def tiny_qwen2_model(tiny_qwen2_config) -> Transformer:
    from flax import nnx

    return Transformer(tiny_qwen2_config, rngs=nnx.Rngs(1))


CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tiny_tokenizer():
    """ChatTokenizer over 93 byte-level symbols + 3 control tokens (ids 93..95), built in memory."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from align_jax.llm.tokenizer import ChatTokenizer

    alphabet = [bytes_to_unicode()[b] for b in range(32, 125)]  # 93 printable bytes incl. space
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    for tok in specials:
        vocab[tok] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE
    )
    return ChatTokenizer(hf, [vocab["<|im_end|>"], vocab["<|endoftext|>"]], vocab["<|endoftext|>"])


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


def make_torch_tiny_model(arch: str, seed: int):
    """transformers twin of ``make_tiny_config(arch)``, with weights large enough to make logits vary."""
    import torch
    import transformers

    torch.manual_seed(seed)
    ours = make_tiny_config(arch)
    common = dict(
        vocab_size=ours.vocab_size, hidden_size=ours.hidden_size, intermediate_size=ours.intermediate_size,
        num_hidden_layers=ours.num_layers, num_attention_heads=ours.num_heads,
        num_key_value_heads=ours.num_kv_heads, max_position_embeddings=ours.max_position_embeddings,
        rope_theta=ours.rope_theta, rms_norm_eps=ours.rms_norm_eps, tie_word_embeddings=ours.tie_word_embeddings,
    )
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(head_dim=ours.head_dim, **common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.5 * torch.randn_like(param))
            else:
                param.copy_(0.25 * torch.randn_like(param))
    return model.eval()


# ----------------------------------------------------------------------------- tiny GGUF files
def tiny_gguf_vocab():
    """(tokens, token_types, merges) of a 96-token byte-level BPE vocabulary with real merges.

    87 single-byte symbols (bytes 32..118), 6 merged tokens and 3 control tokens.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    tokens = [b2u[b] for b in range(32, 119)]
    merges = ["h e", "Ġ t", "Ġt he", "i n", "in g", "Ġ a"]
    tokens += ["he", "Ġt", "Ġthe", "in", "ing", "Ġa"]
    tokens += ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 3) + [3, 3, 3]
    assert len(tokens) == 96
    return tokens, types, merges


def llama_cpp_permute(weight, n_heads):
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py LlamaModel.permute), for writing test files."""
    return (
        weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


_HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def hf_to_gguf_tensors(state_dict: dict, config: ModelConfig) -> dict:
    """Rename a transformers state dict (numpy, torch layout) to GGUF names, permuting llama q/k."""
    out = {}
    for name, value in state_dict.items():
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = value
        elif name == "model.norm.weight":
            out["output_norm.weight"] = value
        elif name == "lm_head.weight":
            if not config.tie_word_embeddings:
                out["output.weight"] = value
        else:
            _, _, layer, rest = name.split(".", 3)
            gguf_name = f"blk.{layer}.{_HF_TO_GGUF[rest]}"
            if config.arch == "llama" and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
                heads = config.num_heads if "q_proj" in rest else config.num_kv_heads
                value = llama_cpp_permute(value, heads)
            out[gguf_name] = value
    return out


def write_tiny_gguf(path, config: ModelConfig, tensors: dict, *, arch: str | None = None,
                    quantize: dict | None = None, raw: dict | None = None, with_tokenizer: bool = True,
                    chat_template: str = CHATML_TEMPLATE):
    """Write a GGUF file the way llama.cpp's converter lays it out.

    Args:
      tensors: ``{gguf name: float32 array in torch layout}``.
      arch: ``general.architecture`` (defaults to ``config.arch``).
      quantize: ``{gguf name: GGMLQuantizationType name}`` to store some tensors quantized.
      raw: ``{gguf name: (uint8 bytes array, ggml type name)}`` written as-is (for bad types).
    """
    import gguf
    import numpy as np

    arch = arch or config.arch
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if with_tokenizer:
        tokens, types, merges = tiny_gguf_vocab()
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2" if config.arch == "qwen2" else "smollm")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(tokens.index("<|im_start|>"))
        writer.add_eos_token_id(tokens.index("<|im_end|>"))
        writer.add_pad_token_id(tokens.index("<|endoftext|>"))
        writer.add_add_bos_token(False)
        writer.add_chat_template(chat_template)
    quantize = quantize or {}
    for name, value in tensors.items():
        value = np.ascontiguousarray(value, dtype=np.float32)
        if name in quantize:
            qtype = gguf.GGMLQuantizationType[quantize[name]]
            writer.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, value)
    for name, (data, type_name) in (raw or {}).items():
        writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[type_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def torch_state_numpy(model) -> dict:
    """``{name: float32 numpy array}`` of a torch model's state dict."""
    return {name: value.detach().float().numpy().copy() for name, value in model.state_dict().items()}
