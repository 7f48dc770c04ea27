"""Tests for batched continuation scoring (tiny random model, CPU)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from align_jax.llm import sampler as sampler_lib
from align_jax.llm.sampler import Sampler
from align_jax.llm.scoring import score_continuations

from .test_sampler import VOCAB, char_tokenizer, full_logits, log_softmax_np, tiny_model

PAIRS = [
    ([3, 4, 5], [6, 7]),
    ([9], [10, 11, 12, 13, 14]),
    ([1, 2, 3, 4, 5, 6, 7, 8], [2]),
    ([30, 31], [32, 33, 34]),
    ([20, 21, 22, 23], [24, 25, 26, 27, 28, 29, 30]),
]


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2")


def reference_scores(model, pairs):
    """Sum over continuation tokens of log-softmax of a plain full forward."""
    seqs = [list(p) + list(c) for p, c in pairs]
    lp = log_softmax_np(full_logits(model, seqs))
    out = []
    for r, (p, c) in enumerate(pairs):
        out.append([lp[r, len(p) + i - 1, c[i]] for i in range(len(c))])
    return out


def test_scores_equal_log_softmax_of_full_forward(model):
    # batch_size=2 -> three chunks, the last padded with a dummy row; pairs sorted by length inside
    out = score_continuations(model, None, [p for p, _ in PAIRS], [c for _, c in PAIRS], batch_size=2)
    ref = reference_scores(model, PAIRS)
    assert out.token_logprobs.shape == (5, 7)
    for i, (p, c) in enumerate(PAIRS):
        np.testing.assert_allclose(out.token_logprobs[i, : len(c)], ref[i], atol=1e-4)
        assert np.all(out.token_logprobs[i, len(c):] == 0)
        assert out.sum_logprob[i] == pytest.approx(sum(ref[i]), abs=1e-4)
        assert out.mean_logprob[i] == pytest.approx(sum(ref[i]) / len(c), abs=1e-4)
    assert out.num_tokens.tolist() == [len(c) for _, c in PAIRS]
    assert out.prompt_tokens.tolist() == [len(p) for p, _ in PAIRS]
    assert np.all(out.sum_logprob < 0)


def test_one_prompt_shared_by_many_continuations_and_graphdef_state_input(model):
    prompt = [3, 4, 5]
    conts = [[6], [6, 7], [8, 9, 10]]
    shared = score_continuations(nnx.split(model), None, [prompt], conts, batch_size=4)
    each = score_continuations(model, None, [prompt] * 3, conts, batch_size=4)
    np.testing.assert_allclose(shared.sum_logprob, each.sum_logprob, atol=1e-6)
    # log p(6, 7 | x) = log p(6 | x) + log p(7 | x, 6)
    assert shared.token_logprobs[1, 0] == pytest.approx(shared.sum_logprob[0], abs=1e-5)


def test_string_inputs_match_token_ids(model):
    tok = char_tokenizer()
    prompts, conts = ["the cat", "a dog says"], [" sat.", " woof"]
    by_text = score_continuations(model, tok, prompts, conts)
    by_ids = score_continuations(model, None, [tok.encode(p) for p in prompts], [tok.encode(c) for c in conts])
    np.testing.assert_allclose(by_text.token_logprobs, by_ids.token_logprobs, atol=1e-6)
    assert by_text.num_tokens.tolist() == [5, 5]


def test_scoring_a_sample_reproduces_the_samplers_logprobs(model):
    """The verifier path and the sampler agree: score(sampled tokens) = sum of raw log-probs."""
    prompts = [[3, 4, 5], [7, 8, 9, 10]]
    out = Sampler(model).generate(prompts, key=jax.random.key(4), num_samples=2, max_new_tokens=8,
                                  temperature=1.0, eos_token_ids=())
    conts = [out.tokens[b, k].tolist() for b in range(2) for k in range(2)]
    scored = score_continuations(model, None, [prompts[0]] * 2 + [prompts[1]] * 2, conts)
    np.testing.assert_allclose(scored.token_logprobs, out.logprobs.reshape(4, 8), atol=1e-4)
    np.testing.assert_allclose(scored.sum_logprob, out.logprobs.reshape(4, 8).sum(-1), atol=1e-3)


def test_no_retrace_on_second_call_with_same_bucket(model):
    graph_state = nnx.split(model)
    score_continuations(graph_state, None, [[1, 2]], [[3, 4]], batch_size=2)
    before = sampler_lib.TRACE_COUNTS["score"]
    score_continuations(graph_state, None, [[5, 6, 7], [8]], [[9], [10, 11, 12]], batch_size=2)
    assert sampler_lib.TRACE_COUNTS["score"] == before


@pytest.mark.parametrize("prompts,conts,kwargs,match", [
    ([[1]], [], {}, "continuations is empty"),
    ([[1], [2]], [[3], [4], [5]], {}, "got 2 prompts for 3 continuations"),
    ([[1]], [[2], []], {}, "continuation 1 is empty"),
    ([[]], [[2]], {}, "prompt 0 is empty"),
    ([[1]], [[2, VOCAB]], {}, f"continuation 0 has token id {VOCAB} outside the vocabulary"),
    ([[1], list(range(1, 40)) * 3], [[2], [3] * 20], {}, r"pair 1: prompt \(117 tokens\) \+ continuation \(20 tokens\) = 137"),
    ([[1]], [[2]], {"batch_size": 0}, "batch_size must be an int >= 1"),
    (["text"], [[2]], {}, "prompt 0 is a string but no tokenizer was given"),
])
def test_bad_input_raises_clear_errors(model, prompts, conts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        score_continuations(model, None, prompts, conts, **kwargs)


def test_text_embeddings_are_the_unit_mean_of_the_hidden_states(tiny_qwen2_model, tiny_tokenizer):
    """text_embeddings == normalise(mean_j h_j) of each text alone, whatever the batch, padding and order."""
    import jax.numpy as jnp

    from align_jax.llm.scoring import text_embeddings

    texts = ["The answer is 12.", "abc", "The answer is 12.", "a much longer text about numbers 1 2 3 4 5 6 7 8 9"]
    split = nnx.split(tiny_qwen2_model)
    emb = text_embeddings(split, tiny_tokenizer, texts, batch_size=2)
    assert emb.shape == (4, tiny_qwen2_model.config.hidden_size) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(emb[0], emb[2], rtol=1e-5, atol=1e-6)
    for i, text in list(enumerate(texts))[:2]:  # the reference, eagerly, on two of them
        ids = jnp.asarray([tiny_tokenizer.encode(text)], jnp.int32)
        h, _ = tiny_qwen2_model.hidden_states(ids, jnp.arange(ids.shape[1])[None], None, 0,
                                              jnp.ones(ids.shape, bool))
        mean = np.asarray(h[0], np.float32).mean(0)
        np.testing.assert_allclose(emb[i], mean / np.linalg.norm(mean), rtol=1e-4, atol=1e-5)
    alone = text_embeddings(split, tiny_tokenizer, texts[1:2], batch_size=4)
    np.testing.assert_allclose(alone[0], emb[1], rtol=1e-4, atol=1e-5)
    assert abs(float(emb[0] @ emb[1])) < 1.0 - 1e-4  # different texts are not collinear
    with pytest.raises(TypeError, match="texts must be a list"):
        text_embeddings(split, tiny_tokenizer, "one string")
