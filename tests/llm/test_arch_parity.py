"""Parity of the newer families with transformers (PyTorch, float32) on tiny random configs.

Each case builds a transformers model from its own config class, saves it as a Hugging Face
directory, loads it with :func:`align_jax.llm.weights.load_pretrained` and checks

* logits of a left-padded batch, prompts longer than the sliding window: max |diff| < 1e-3;
* greedy decoding, 32 new tokens, through our :class:`~align_jax.llm.sampler.Sampler` (prefill +
  cached decode steps) against transformers' ``generate``: identical tokens.

Families: Llama 3.x RoPE scaling (``"llama3"``), Mistral (sliding window on every layer), Phi-3
(fused ``qkv_proj`` / ``gate_up_proj``, ``"longrope"`` with both factor sets exercised), Gemma 3
text (interleaved local/global layers, q/k norms, sandwich norms, scaled and tied embeddings,
a local RoPE base). ``_hf_config("qwen2_sliding")`` (Qwen2 with ``use_sliding_window``) passes
the same checks; it is left out of the default run to keep it short.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from .conftest import make_tiny_tokenizer, run_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, WINDOW, PHI3_ORIGINAL, LONG_PROMPT = 96, 8, 64, 70
BATCH, PROMPT_LEN, NEW_TOKENS, PAD = 2, 20, 32, 4

COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _hf_config(case: str):
    """transformers config of each case (head_dim 8, window 8, 2 layers)."""
    if case == "llama3":
        return transformers.LlamaConfig(head_dim=8, rope_theta=10000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}, **COMMON)
    if case == "mistral":
        return transformers.MistralConfig(head_dim=8, sliding_window=WINDOW, rope_theta=10000.0, **COMMON)
    if case == "phi3":
        # original context 64: 20-token prompts + 32 new tokens stay short, 70-token prompts are long
        return transformers.Phi3Config(
            sliding_window=WINDOW, original_max_position_embeddings=PHI3_ORIGINAL, rope_theta=10000.0,
            rope_scaling={"type": "longrope", "short_factor": [1.0, 1.3, 1.7, 2.2],
                          "long_factor": [1.5, 2.5, 4.0, 6.0]}, **COMMON)
    if case == "gemma3":
        return transformers.Gemma3TextConfig(
            head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                             "full_attention": {"rope_type": "default", "rope_theta": 10000.0}},
            **COMMON)
    if case == "qwen2_sliding":
        return transformers.Qwen2Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                                        rope_theta=10000.0, **COMMON)
    raise KeyError(case)


CASES = ["llama3", "mistral", "phi3", "gemma3"]  # qwen2_sliding: available, not run by default (time)


def _torch_model(case: str):
    torch.manual_seed(11)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(case), dtype=torch.float32)
    gemma = case == "gemma3"
    with torch.no_grad():  # weights large enough that logits spread out and greedy paths differ
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_((0.0 if gemma else 1.0) + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.5 * torch.randn_like(param))
            else:
                param.copy_((0.2 if gemma else 0.25) * torch.randn_like(param))
    return model.eval()


@pytest.fixture(scope="module", params=CASES)
def pair(request, tmp_path_factory):
    """(case, torch model, our LoadedModel) sharing weights through the HF safetensors path."""
    from align_jax.llm.weights import load_pretrained

    model = _torch_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    make_tiny_tokenizer().hf_tokenizer.save_pretrained(directory)
    return request.param, model, load_pretrained(str(directory))


def test_config_read_from_hf_directory(pair):
    case, _, loaded = pair
    config = loaded.config
    expected_arch = {"llama3": "llama", "qwen2_sliding": "qwen2"}.get(case, case)
    assert config.arch == expected_arch
    if case == "llama3":
        assert config.rope_scaling_dict["rope_type"] == "llama3" and not config.has_sliding_layers
    if case in ("mistral", "phi3"):
        assert config.sliding_window == WINDOW and all(config.layer_is_sliding(i) for i in range(2))
    if case == "phi3":
        assert config.rope_scaling_dict["rope_type"] == "longrope"
        assert config.rope_scaling_dict["original_max_position_embeddings"] == PHI3_ORIGINAL
    if case == "gemma3":
        assert [config.layer_is_sliding(i) for i in range(2)] == [True, False]
        assert config.rope_local_theta == 100.0 and config.tie_word_embeddings
        assert config.attention_scale == 16 ** -0.5
    if case == "qwen2_sliding":
        assert [config.layer_is_sliding(i) for i in range(2)] == [False, True]
    assert type(config).from_dict(config.to_dict()) == config


def _prompts(seed: int, length: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, VOCAB, size=(BATCH, length))


@pytest.mark.parametrize("length", [PROMPT_LEN, LONG_PROMPT])
def test_logits_match_transformers_beyond_the_window(pair, length):
    """Left-padded batch of prompts 2.5x the window; 70 tokens switch Phi-3 to long_factor."""
    case, torch_model, loaded = pair
    if length == LONG_PROMPT and case != "phi3":
        pytest.skip("the long prompt is for Phi-3's long_factor switch")
    tokens = _prompts(0, length)
    mask = np.ones((BATCH, length), bool)
    mask[1, :PAD] = False
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        ref = torch_model(torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                          position_ids=torch.tensor(positions)).logits.numpy()
    ours, _ = run_model(loaded.model, tokens, positions, kv_mask=mask)
    ours = np.asarray(ours)
    assert ref.std() > 0.5  # logits spread out: agreement is not trivially near-uniform
    diff = max(np.abs(ours[0] - ref[0]).max(), np.abs(ours[1, PAD:] - ref[1, PAD:]).max())
    assert diff < 1e-3, (case, length, diff)


def test_window_hides_old_tokens(pair):
    """A one-token change more than (layers x window) positions back leaves the last logits of an
    all-sliding model bit-identical; the global layers of the others still see it."""
    case, _, loaded = pair
    length = PROMPT_LEN  # > 2 layers x window: token 0 is outside the last token's receptive field
    tokens = _prompts(3, length)
    changed = tokens.copy()
    changed[:, 0] = (changed[:, 0] + 1) % VOCAB
    positions = np.broadcast_to(np.arange(length), (BATCH, length))
    last = [np.asarray(run_model(loaded.model, t, positions)[0])[:, -1] for t in (tokens, changed)]
    if case in ("mistral", "phi3"):
        np.testing.assert_array_equal(last[0], last[1])
    else:
        assert np.abs(last[0] - last[1]).max() > 1e-6


@pytest.mark.parametrize("length", [PROMPT_LEN, pytest.param(LONG_PROMPT, marks=pytest.mark.slow)])
def test_greedy_32_tokens_through_sampler_match_generate(pair, length):
    """Prefill + cached decode (window masked on every step) == transformers' greedy generate.

    Phi-3 runs twice: within the original context (short_factor throughout) and, in the slow
    run, from a prompt beyond it (long_factor throughout; the default run checks the long
    factors through the logits test). A generation that crosses the boundary is not compared:
    transformers then recomputes the whole prefix with the long factors, we keep the cache (see
    :mod:`align_jax.llm.model`)."""
    from align_jax.llm.sampler import Sampler

    case, torch_model, loaded = pair
    if length == LONG_PROMPT and case != "phi3":
        pytest.skip("the long prompt is for Phi-3's long_factor")
    prompts = [list(p) for p in _prompts(1, length)]
    prompts[1] = prompts[1][PAD:]  # two lengths: the sampler left-pads the shorter one
    sampler = Sampler(loaded)
    out = sampler.generate(prompts, key=jax.random.key(0), max_new_tokens=NEW_TOKENS, temperature=0.0,
                           eos_token_ids=())
    for b, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = torch_model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                       pad_token_id=0, eos_token_id=None)[0, len(prompt):].numpy()
        assert out.tokens[b, 0].tolist() == ref.tolist(), (case, b)
    assert len({tuple(out.tokens[b, 0].tolist()) for b in range(BATCH)}) == BATCH  # not a degenerate path


def test_step_by_step_cache_with_a_hole_equals_full_forward(pair):
    """Gemma 3 (local and global layers): prefill 5 tokens, then decode 1 token per step, leaving
    slot 5 empty (masked). The window is measured in positions, not slots, so every step's logits
    equal the cache-free pass, also once the window has slid past the prompt."""
    from align_jax.llm.model import init_cache

    case, _, loaded = pair
    if case != "gemma3":
        pytest.skip("one family is enough: the cache path is shared")
    length, slots = PROMPT_LEN, 32
    tokens = _prompts(4, length)
    full, _ = run_model(loaded.model, tokens, np.broadcast_to(np.arange(length), (BATCH, length)))
    full = np.asarray(full)
    cache = init_cache(loaded.config, BATCH, slots)
    kv_mask = np.zeros((BATCH, slots), bool)
    kv_mask[:, :5] = True
    logits, cache = run_model(loaded.model, tokens[:, :5], np.broadcast_to(np.arange(5), (BATCH, 5)), cache, 0,
                              kv_mask)
    np.testing.assert_allclose(np.asarray(logits), full[:, :5], atol=1e-4)
    for pos in range(5, length):  # the token at position p goes to slot p + 1
        kv_mask[:, pos + 1] = True
        logits, cache = run_model(loaded.model, tokens[:, pos:pos + 1], np.full((BATCH, 1), pos), cache, pos + 1,
                                  kv_mask)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, pos], atol=1e-4)
    assert np.asarray(cache.positions)[0, 6:length + 1].tolist() == list(range(5, length))


def test_config_validation_of_new_fields():
    from .conftest import make_tiny_config

    with pytest.raises(ValueError, match="rope_type='yarn'"):
        make_tiny_config("llama", rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="missing"):
        make_tiny_config("llama", rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match="head_dim / 2"):
        make_tiny_config("phi3", rope_scaling={"rope_type": "longrope", "short_factor": [1.0],
                                               "long_factor": [1.0], "original_max_position_embeddings": 8})
    with pytest.raises(ValueError, match="sliding_window is None"):
        make_tiny_config("gemma3", layer_types=("sliding_attention", "full_attention"))
    with pytest.raises(ValueError, match="layer_types has 1"):
        make_tiny_config("gemma3", sliding_window=4, layer_types=("full_attention",))
    config = make_tiny_config("llama", rope_scaling={"rope_type": "default"})
    assert config.rope_scaling == () and not config.has_sliding_layers
