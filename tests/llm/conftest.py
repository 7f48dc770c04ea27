"""Shared fixtures for the LLM stack: tiny random configs, models and a tiny tokenizer.

Other test files may use:
  tiny_llama_config / tiny_qwen2_config: ModelConfig (float32, vocab 96).
  tiny_llama_model / tiny_qwen2_model: Transformer with random weights (seeded).
  tiny_tokenizer: a ChatTokenizer (byte-level BPE over a 96-token vocabulary with
    <|im_start|>/<|im_end|>/<|endoftext|> and a ChatML template), no files needed.
"""

from __future__ import annotations

import pytest

from align_jax.llm.model import ModelConfig, Transformer

TINY_VOCAB = 96


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
