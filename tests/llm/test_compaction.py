"""Decoding that halves its batch as rows finish gives the tokens of the plain decode."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from align_jax.llm import decode_loop
from align_jax.llm.sampler import Sampler

from .test_sampler import tiny_model

EOS = (1, 8, 9, 13, 37)  # ids that end most of this tiny model's rows early, at different steps


@pytest.fixture(scope="module")
def samplers():
    model = tiny_model("qwen2", seed=3)
    return Sampler(model, compact_min_rows=2), Sampler(model, compact_min_rows=None)


def _prompts(count: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(6, 40, size=int(rng.integers(1, 12))).tolist() for _ in range(count)]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_compacted_decode_equals_plain_decode(samplers, temperature, monkeypatch):
    compacting, plain = samplers
    sizes = []
    original = decode_loop._take_rows

    def counting(carry, index):
        sizes.append(int(index.shape[0]))
        return original(carry, index)

    monkeypatch.setattr(decode_loop, "_take_rows", counting)
    kw = dict(key=jax.random.key(4), num_samples=2, max_new_tokens=24, temperature=temperature, top_p=0.9,
              eos_token_ids=EOS)
    prompts = _prompts(8)  # R = 16 rows
    a = compacting.generate(prompts, **kw)
    b = plain.generate(prompts, **kw)
    lengths = b.lengths.ravel()
    assert lengths.min() < lengths.max(), "rows must finish at different steps for the test to mean anything"
    assert sizes and sizes[0] == 8, f"the batch was never compacted: {sizes}"
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    np.testing.assert_allclose(a.sampling_logprobs, b.sampling_logprobs, atol=1e-5)
    assert a.finish_reasons == b.finish_reasons
    assert a.num_steps == b.num_steps


def test_small_batches_and_processors_are_not_compacted(samplers):
    compacting, _ = samplers
    with pytest.raises(ValueError, match="logits processors"):
        spec = decode_loop.DecodeSpec(max_new_tokens=4, logits_processor=lambda logits, state: logits)
        decode_loop.decode_compacting(None, None, None, None, np.zeros(2, np.int32), None, None, None,
                                      spec=spec, num_samples=1)
    with pytest.raises(ValueError, match="compact_min_rows"):
        Sampler(tiny_model("qwen2"), compact_min_rows=0)
