"""Decoder numerics: parity with transformers' PyTorch Llama/Qwen2, KV-cache consistency, masking, dtypes."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from align_jax.llm.model import KVCache, ModelConfig, Transformer, forward, init_cache

from .conftest import make_tiny_config, make_tiny_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _torch_tiny_model(arch: str, seed: int, **overrides):
    """A tiny random transformers model with weights large enough to make logits vary."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    common.update(overrides)
    if arch == "llama":
        cfg = transformers.LlamaConfig(head_dim=8, rope_theta=5000.0, rms_norm_eps=1e-5,
                                       tie_word_embeddings=False, **common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.5 * torch.randn_like(param))
            else:
                param.copy_(0.25 * torch.randn_like(param))
    return model.eval()


def _save_hf(model, directory):
    model.save_pretrained(directory)
    make_tiny_tokenizer().hf_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(params=["llama", "qwen2"])
def torch_and_ours(request, tmp_path):
    """(torch model, our LoadedModel) sharing weights through the HF safetensors path."""
    from align_jax.llm.weights import load_pretrained

    model = _torch_tiny_model(request.param, seed=7)
    loaded = load_pretrained(str(_save_hf(model, tmp_path / request.param)))
    return model, loaded


def test_logits_match_transformers(torch_and_ours):
    torch_model, loaded = torch_and_ours
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 96, size=(3, 17))
    with torch.no_grad():
        ref = torch_model(torch.tensor(tokens)).logits.numpy()
    positions = np.broadcast_to(np.arange(17), (3, 17))
    ours, cache = loaded.model(jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32))
    assert cache is None
    assert ours.dtype == jnp.float32 and ours.shape == (3, 17, 96)
    # The weights make logits spread out, so agreement is not trivially near-uniform.
    assert ref.std() > 1.0
    np.testing.assert_array_less(np.abs(np.asarray(ours) - ref).max(), 1e-3)
    # Tied embeddings (qwen2 fixture) vs untied (llama fixture) were read correctly.
    assert loaded.config.tie_word_embeddings == (loaded.config.arch == "qwen2")
    assert loaded.config.attention_bias == (loaded.config.arch == "qwen2")


def test_left_padded_batch_matches_transformers(torch_and_ours):
    """Left padding with kv_mask + per-row positions equals transformers with attention_mask/position_ids."""
    torch_model, loaded = torch_and_ours
    rng = np.random.default_rng(1)
    length, pad = 12, 5
    tokens = rng.integers(0, 96, size=(2, length))
    mask = np.ones((2, length), bool)
    mask[1, :pad] = False
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        ref = torch_model(
            torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
            position_ids=torch.tensor(positions),
        ).logits.numpy()
    ours, _ = loaded.model(jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32), kv_mask=jnp.asarray(mask))
    ours = np.asarray(ours)
    assert np.isfinite(ours).all()  # padding queries see no key: must not become NaN
    np.testing.assert_array_less(np.abs(ours[0] - ref[0]).max(), 1e-3)
    np.testing.assert_array_less(np.abs(ours[1, pad:] - ref[1, pad:]).max(), 1e-3)
    # The padded row's real tokens equal the same tokens run alone.
    alone, _ = loaded.model(jnp.asarray(tokens[1:, pad:], jnp.int32), jnp.arange(length - pad)[None])
    np.testing.assert_allclose(ours[1, pad:], np.asarray(alone)[0], atol=1e-4)


def test_cached_greedy_matches_transformers_generate(torch_and_ours):
    """Greedy decoding with our KV cache reproduces transformers' generate token for token."""
    torch_model, loaded = torch_and_ours
    prompt = np.array([[5, 17, 42, 8, 77, 3]])
    new = 20
    with torch.no_grad():
        ref = torch_model.generate(torch.tensor(prompt), max_new_tokens=new, do_sample=False,
                                   pad_token_id=0, eos_token_id=None)[0, prompt.shape[1]:].numpy()
    cache = init_cache(loaded.config, 1, 32)
    kv_mask = jnp.zeros((1, 32), bool).at[:, : prompt.shape[1]].set(True)
    logits, cache = loaded.model(jnp.asarray(prompt, jnp.int32), jnp.arange(prompt.shape[1])[None], cache, 0, kv_mask)
    out = []
    token = int(jnp.argmax(logits[0, -1]))
    for step in range(new):
        out.append(token)
        index = prompt.shape[1] + step
        kv_mask = kv_mask.at[:, index].set(True)
        logits, cache = loaded.model(jnp.array([[token]], jnp.int32), jnp.array([[index]]), cache, index, kv_mask)
        token = int(jnp.argmax(logits[0, -1]))
    np.testing.assert_array_equal(np.array(out), ref)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_incremental_decode_equals_full_recompute(arch):
    config = make_tiny_config(arch)
    model = Transformer(config, rngs=nnx.Rngs(3))
    graphdef, state = nnx.split(model)
    step = jax.jit(forward)
    tokens = jax.random.randint(jax.random.key(0), (2, 11), 0, config.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(11), (2, 11))
    full, _ = step(graphdef, state, tokens, positions, None, 0, None)
    cache = init_cache(config, 2, 16)
    kv_mask = jnp.zeros((2, 16), bool).at[:, :4].set(True)
    chunks, = [[]]
    logits, cache = step(graphdef, state, tokens[:, :4], positions[:, :4], cache, 0, kv_mask)
    chunks.append(logits)
    # then one chunk of 3 tokens and single tokens, cache_index traced
    kv_mask = kv_mask.at[:, 4:7].set(True)
    logits, cache = step(graphdef, state, tokens[:, 4:7], positions[:, 4:7], cache, jnp.int32(4), kv_mask)
    chunks.append(logits)
    for t in range(7, 11):
        kv_mask = kv_mask.at[:, t].set(True)
        logits, cache = step(graphdef, state, tokens[:, t:t + 1], positions[:, t:t + 1], cache, jnp.int32(t), kv_mask)
        chunks.append(logits)
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), np.asarray(full), atol=2e-5)
    assert isinstance(cache, KVCache)
    assert cache.k.shape == (config.num_layers, 2, 16, config.num_kv_heads, config.head_dim)
    # slots past the written region are untouched zeros
    assert float(jnp.abs(cache.k[:, :, 11:]).max()) == 0.0


def test_cache_respects_kv_mask_and_future_slots():
    """A query never sees masked slots nor slots after its own position, even when they hold data."""
    config = make_tiny_config("llama")
    model = Transformer(config, rngs=nnx.Rngs(4))
    tokens = jnp.array([[11, 12, 13, 14, 15, 16]], jnp.int32)
    positions = jnp.arange(6)[None]
    cache = init_cache(config, 1, 8)
    # Fill all 6 slots, then re-run token 2 at index 2 with the cache: it must not see slots 3..5.
    _, cache = model(tokens, positions, cache, 0, jnp.ones((1, 8), bool))
    logits_at_2, _ = model(tokens[:, 2:3], positions[:, 2:3], cache, 2, jnp.ones((1, 8), bool))
    full, _ = model(tokens[:, :3], positions[:, :3])
    np.testing.assert_allclose(np.asarray(logits_at_2)[0, 0], np.asarray(full)[0, 2], atol=2e-5)
    # Masking slot 0 changes the result (the mask is honoured).
    masked, _ = model(tokens[:, 2:3], positions[:, 2:3], cache, 2, jnp.ones((1, 8), bool).at[0, 0].set(False))
    assert np.abs(np.asarray(masked) - np.asarray(logits_at_2)).max() > 1e-3


def test_bfloat16_close_to_float32():
    config = make_tiny_config("qwen2")
    model32 = Transformer(config, rngs=nnx.Rngs(5))
    state = nnx.state(model32)
    model16 = Transformer(config.replace(dtype="bfloat16"), rngs=nnx.Rngs(5))
    nnx.update(model16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), state))
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, config.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    l32, _ = model32(tokens, positions)
    l16, _ = model16(tokens, positions)
    assert l16.dtype == jnp.float32
    assert model16.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
    cache = init_cache(model16.config, 2, 9)
    assert cache.k.dtype == jnp.bfloat16
    scale = float(jnp.abs(l32).max())
    assert float(jnp.abs(l16 - l32).max()) < 0.05 * scale
    assert float(jnp.abs(l16 - l32).max()) > 0  # really ran in lower precision


def test_forward_jit_does_not_retrace_for_new_weights_or_cache_index():
    config = make_tiny_config("llama")
    graphdef, state = nnx.split(Transformer(config, rngs=nnx.Rngs(6)))
    _, other_state = nnx.split(Transformer(config, rngs=nnx.Rngs(7)))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, tokens, positions, cache, index, kv_mask):
        return forward(graphdef, state, tokens, positions, cache, index, kv_mask)

    cache = init_cache(config, 1, 8)
    mask = jnp.ones((1, 8), bool)
    a, _ = step(state, jnp.array([[1]]), jnp.array([[0]]), cache, jnp.int32(0), mask)
    b, _ = step(other_state, jnp.array([[1]]), jnp.array([[3]]), cache, jnp.int32(3), mask)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3  # weights really are arguments


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("arch", "gpt2", "arch"),
        ("num_kv_heads", 3, "multiple"),
        ("head_dim", 7, "even"),
        ("dtype", "float16", "dtype"),
        ("vocab_size", 0, "vocab_size"),
    ],
)
def test_config_validation_names_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        make_tiny_config("llama", **{field: value})


def test_config_roundtrip_and_hashable():
    config = make_tiny_config("qwen2")
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert hash(config) == hash(ModelConfig.from_dict(config.to_dict()))
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({**config.to_dict(), "rope_scaling": None})
