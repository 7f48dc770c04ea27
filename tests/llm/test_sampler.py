"""Tests for the jitted batched sampler and the token-selection rule (tiny random models, CPU)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from align_jax.llm import decoding
from align_jax.llm import sampler as sampler_lib
from align_jax.llm.logits import ban_tokens, compose_processors, sample_tokens, tempered_logsumexp, top_candidates
from align_jax.llm.model import ModelConfig, Transformer, forward, init_cache
from align_jax.llm.sampler import Sampler, hidden_states, lm_head, prompt_bucket

VOCAB = 43
CHARS = "abcdefghijklmnopqrstuvwxyz .,!?0123456789"


def tiny_config(arch: str = "qwen2", vocab: int = VOCAB) -> ModelConfig:
    return ModelConfig(
        arch=arch, vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-6,
        max_position_embeddings=128, tie_word_embeddings=(arch == "llama"),
        attention_bias=(arch == "qwen2"),
    )


def tiny_model(arch: str = "qwen2", seed: int = 0, vocab: int = VOCAB) -> Transformer:
    model = Transformer(tiny_config(arch, vocab), rngs=nnx.Rngs(seed))
    # Sharpen the random init (std 0.02 gives near-uniform logits) so greedy paths
    # have clear margins and differ between prompts.
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x * 8.0 if x.ndim == 2 else x, state)
    return nnx.merge(graphdef, state)


def char_tokenizer():
    """A real ChatTokenizer over a character-level WordLevel vocabulary (id 0 = <pad>, 1 = <eos>)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from align_jax.llm.tokenizer import ChatTokenizer

    vocab = {"<pad>": 0, "<eos>": 1}
    for c in CHARS:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    return ChatTokenizer(hf, [1], 0)


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def sampler(model):
    return Sampler(model)


PROMPTS = [[3, 4, 5], [7, 8, 9, 10, 11, 12, 13], [20]]
KEY = jax.random.key(0)
EVEN_IDS = [1] + list(range(0, VOCAB, 2))  # even ids and id 1 (<eos> of the char tokenizer)
BAN_EVEN = ban_tokens(EVEN_IDS)  # one object, so tests sharing it share the compiled decode


_REF_LEN = 32


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _ref_forward(graphdef, state, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return forward(graphdef, state, tokens, positions)[0]


def full_logits(model, sequences):
    """Reference: plain causal forward (``Transformer.__call__`` without a cache) over each
    sequence, right-padded to 32 (causality makes the padding invisible), one jit.

    Returns float64 ``[n, 32, V]``; position j holds the logits after ``sequence[: j + 1]``.
    """
    tokens = np.zeros((len(sequences), _REF_LEN), np.int32)
    for i, seq in enumerate(sequences):
        tokens[i, : len(seq)] = seq
    graphdef, state = nnx.split(model)
    return np.asarray(_ref_forward(graphdef, state, jnp.asarray(tokens)), np.float64)


def log_softmax_np(x):
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


# --------------------------------------------------------------------------- internals


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hidden_states_and_head_equal_model_call(arch):
    m = tiny_model(arch, seed=1)
    graphdef, state = nnx.split(m)
    tokens = jnp.asarray([[1, 2, 3, 4, 5, 6], [0, 0, 9, 8, 7, 6]], jnp.int32)
    positions = jnp.asarray([[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]], jnp.int32)
    kv_mask = jnp.asarray([[True] * 6, [False, False] + [True] * 4])
    cache_mask = jnp.concatenate([kv_mask, jnp.ones((2, 4), bool)], axis=1)

    @jax.jit
    def both(state):
        mm = nnx.merge(graphdef, state)
        ref, _ = mm(tokens, positions, None, 0, kv_mask)
        h, _ = hidden_states(mm, tokens, positions, None, 0, kv_mask)
        ref_c, ref_cache = mm(tokens, positions, init_cache(mm.config, 2, 10), 0, cache_mask)
        h_c, cache = hidden_states(mm, tokens, positions, init_cache(mm.config, 2, 10), 0, cache_mask)
        return ref, lm_head(mm, h), ref_c, lm_head(mm, h_c), ref_cache.k, cache.k

    ref, ours, ref_c, ours_c, ref_k, ours_k = both(state)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    np.testing.assert_allclose(ours_c, ref_c, atol=1e-5)
    np.testing.assert_allclose(ours_k, ref_k, atol=1e-6)
    assert np.abs(np.asarray(ref)).max() > 0.1  # non-trivial logits


def test_prompt_bucket():
    assert [prompt_bucket(n, steps=2) for n in (1, 16, 17, 24, 25, 100, 128, 129, 193)] == [
        16, 16, 24, 24, 32, 128, 128, 192, 256]
    assert [prompt_bucket(n) for n in (1, 16, 17, 20, 21, 100, 129, 140, 161, 193, 225, 257)] == [
        16, 16, 20, 20, 24, 112, 160, 160, 192, 224, 256, 320]
    assert [prompt_bucket(n, steps=1) for n in (1, 17, 100, 129)] == [16, 32, 128, 256]
    assert [prompt_bucket(n, minimum=1, steps=2) for n in (1, 2, 3, 5, 7)] == [1, 2, 3, 6, 8]
    for steps in (1, 2, 4, 8):
        buckets = set()
        for n in range(1, 1025):  # covers the length; padding at most 1 / (steps + 1) above the minimum
            b = prompt_bucket(n, steps=steps)
            buckets.add(b)
            assert n <= b and (b <= 16 or (steps + 1) * (b - n) < b), (n, steps, b)
        assert len([b for b in buckets if 512 < b <= 1024]) == steps  # programs per doubling
    with pytest.raises(ValueError, match="steps"):
        prompt_bucket(10, steps=3)


# --------------------------------------------------------------------------- greedy / cache


def test_greedy_equals_stepwise_argmax_of_full_forward(model, sampler):
    out = sampler.generate(PROMPTS, key=KEY, num_samples=2, max_new_tokens=8, temperature=0.0,
                           eos_token_ids=())
    assert out.tokens.shape == (3, 2, 8)
    seqs = [list(p) for p in PROMPTS]
    expected, expected_lp = [[] for _ in PROMPTS], [[] for _ in PROMPTS]
    for _ in range(8):  # step-by-step argmax over full no-cache forward passes
        logits = full_logits(model, seqs)
        for b, seq in enumerate(seqs):
            row = logits[b, len(seq) - 1]
            tok = int(np.argmax(row))
            expected[b].append(tok)
            expected_lp[b].append(log_softmax_np(row)[tok])
            seq.append(tok)
    for b in range(3):
        for k in range(2):
            assert out.tokens[b, k].tolist() == expected[b], (b, k)
            np.testing.assert_allclose(out.logprobs[b, k], expected_lp[b], atol=1e-4)
            np.testing.assert_array_equal(out.sampling_logprobs[b, k], 0.0)
    assert out.lengths.tolist() == [[8, 8]] * 3
    assert out.finish_reasons == [["length", "length"]] * 3
    assert out.prompt_tokens.tolist() == [3, 7, 1]
    assert out.generated_tokens == 48 and out.num_steps == 8
    assert out.text is None
    # greedy paths differ between prompts (the test would be vacuous otherwise)
    assert len({tuple(out.tokens[b, 0]) for b in range(3)}) == 3


def test_cached_decode_logprobs_equal_full_recompute(model, sampler):
    """Sampled (not greedy) paths: every raw log-prob the cached decoder reports equals the
    log-softmax of a full no-cache forward over prompt + tokens so far."""
    out = sampler.generate(PROMPTS, key=jax.random.key(3), num_samples=2, max_new_tokens=8,
                           temperature=1.0, eos_token_ids=())
    seqs = [list(PROMPTS[b]) + out.tokens[b, k].tolist() for b in range(3) for k in range(2)]
    ref = log_softmax_np(full_logits(model, seqs))
    for r, seq in enumerate(seqs):
        b, k = divmod(r, 2)
        p = len(PROMPTS[b])
        expected = [ref[r, p + t - 1, seq[p + t]] for t in range(8)]
        np.testing.assert_allclose(out.logprobs[b, k], expected, atol=1e-4)
        # T=1, top_p=1: the sampling distribution is the model's own
        np.testing.assert_allclose(out.sampling_logprobs[b, k], expected, atol=1e-4)


def test_left_padding_does_not_change_a_row(sampler):
    kw = dict(num_samples=2, max_new_tokens=8, temperature=1.0, eos_token_ids=())
    short = sampler.generate(PROMPTS, key=KEY, **kw)  # bucket 16
    padded = sampler.generate([PROMPTS[0], list(range(2, 40)), PROMPTS[2]], key=KEY, **kw)  # bucket 48
    # prompts 0 and 2 get 32 more pad slots and a different neighbour: same samples
    for b in (0, 2):
        np.testing.assert_array_equal(short.tokens[b], padded.tokens[b])
        np.testing.assert_allclose(short.logprobs[b], padded.logprobs[b], atol=1e-5)
    greedy_short = sampler.generate(PROMPTS, key=KEY, num_samples=2, max_new_tokens=8,
                                    temperature=0.0, eos_token_ids=())
    greedy_padded = sampler.generate([PROMPTS[0], list(range(2, 40)), PROMPTS[2]], key=KEY,
                                     num_samples=2, max_new_tokens=8, temperature=[0.0, 0.0, 1.0],
                                     eos_token_ids=())
    np.testing.assert_array_equal(greedy_short.tokens[0], greedy_padded.tokens[0])


def test_reproducible_with_key_and_different_with_another(sampler):
    kw = dict(num_samples=2, max_new_tokens=8, temperature=1.0, eos_token_ids=())
    a = sampler.generate(PROMPTS, key=jax.random.key(11), **kw)
    b = sampler.generate(PROMPTS, key=jax.random.key(11), **kw)
    c = sampler.generate(PROMPTS, key=jax.random.key(12), **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    # the K samples of one prompt differ from each other
    assert all(not np.array_equal(a.tokens[b, 0], a.tokens[b, 1]) for b in range(3))
    # a raw uint32 key works too, and is reproducible
    d = sampler.generate(PROMPTS, key=jax.random.PRNGKey(11), **kw)
    e = sampler.generate(PROMPTS, key=jax.random.PRNGKey(11), **kw)
    np.testing.assert_array_equal(d.tokens, e.tokens)


def test_one_key_per_prompt_makes_a_prompt_independent_of_its_batch(sampler):
    """With typed keys [B], prompt b samples with keys[b]: the same as a call of its own whose single
    key K gives it fold_in(K, 0), and the same in any order or company."""
    prompts = [[3, 4, 5, 6], [7, 8, 9, 10], [11, 12, 13, 14]]  # one length: one prompt bucket throughout
    kw = dict(num_samples=2, max_new_tokens=8, temperature=1.0, top_p=0.9, eos_token_ids=())
    own = [jax.random.key(20 + b) for b in range(3)]
    keys = jnp.stack([jax.random.fold_in(k, 0) for k in own])
    together = sampler.generate(prompts, key=keys, **kw)
    for b, prompt in enumerate(prompts):
        alone = sampler.generate([prompt], key=own[b], **kw)
        np.testing.assert_array_equal(together.tokens[b], alone.tokens[0])
        np.testing.assert_allclose(together.logprobs[b], alone.logprobs[0], atol=1e-5)
    swapped = sampler.generate(prompts[::-1], key=keys[::-1], **kw)
    np.testing.assert_array_equal(swapped.tokens[::-1], together.tokens)
    single = sampler.generate(prompts, key=jax.random.key(20), **kw)  # one key: prompts differ by position
    assert not np.array_equal(single.tokens[1], together.tokens[1])
    with pytest.raises(ValueError, match=r"one typed key per prompt \(shape \(3,\)\), got a key array of shape \(2,\)"):
        sampler.generate(prompts, key=keys[:2], **kw)


@pytest.mark.parametrize("settings", [
    dict(temperature=1e-6),
    dict(temperature=1.0, top_p=1e-6),
    dict(temperature=1.5, top_k=1),
])
def test_degenerate_sampling_equals_greedy(sampler, settings):
    greedy = sampler.generate(PROMPTS, key=KEY, num_samples=2, max_new_tokens=8,
                              temperature=0.0, eos_token_ids=())
    other = sampler.generate(PROMPTS, key=jax.random.key(5), num_samples=2, max_new_tokens=8,
                             eos_token_ids=(), **settings)
    np.testing.assert_array_equal(other.tokens, greedy.tokens)


def test_per_row_temperature(sampler):
    greedy = sampler.generate(PROMPTS, key=KEY, num_samples=2, max_new_tokens=8,
                              temperature=0.0, eos_token_ids=())
    mixed = sampler.generate(PROMPTS, key=KEY, num_samples=2, max_new_tokens=8,
                             temperature=[[0.0, 2.0], [0.0, 2.0], [0.0, 2.0]], eos_token_ids=())
    np.testing.assert_array_equal(mixed.tokens[:, 0], greedy.tokens[:, 0])
    assert not np.array_equal(mixed.tokens[:, 1], greedy.tokens[:, 1])
    np.testing.assert_array_equal(mixed.sampling_logprobs[:, 0], 0.0)
    assert np.all(mixed.sampling_logprobs[:, 1] < 0)


# --------------------------------------------------------------------------- stopping


def test_stop_on_eos(sampler):
    kw = dict(num_samples=2, max_new_tokens=8, temperature=0.0)
    greedy = sampler.generate(PROMPTS, key=KEY, eos_token_ids=(), **kw)
    paths = greedy.tokens[:, 0].tolist()
    eos = paths[1][3]
    out = sampler.generate(PROMPTS, key=KEY, eos_token_ids=(eos,), **kw)
    for b, path in enumerate(paths):
        n = path.index(eos) + 1 if eos in path else 8
        for k in range(2):
            assert out.lengths[b, k] == n
            assert out.finish_reasons[b][k] == ("eos" if eos in path else "length")
            assert out.tokens[b, k, :n].tolist() == path[:n]
            assert np.all(out.tokens[b, k, n:] == 0)  # pad id without a tokenizer
            assert np.all(out.logprobs[b, k, n:] == 0)
    if all(eos in path for path in paths):  # the loop stopped once every row had finished
        assert out.num_steps == max(path.index(eos) + 1 for path in paths)
    ignored = sampler.generate(PROMPTS, key=KEY, eos_token_ids=(eos,), ignore_eos=True, **kw)
    np.testing.assert_array_equal(ignored.tokens, greedy.tokens)
    assert ignored.num_steps == 8


def test_early_exit_when_all_rows_finish(sampler):
    """Every row's first greedy token is an EOS id: one decoding step only."""
    greedy = sampler.generate(PROMPTS, key=KEY, num_samples=2, max_new_tokens=8,
                              temperature=0.0, eos_token_ids=())
    firsts = tuple(int(t) for t in np.unique(greedy.tokens[:, :, 0]))
    out = sampler.generate(PROMPTS, key=KEY, num_samples=2, max_new_tokens=8,
                           temperature=0.0, eos_token_ids=firsts)
    assert out.num_steps == 1 and np.all(out.lengths == 1)
    assert out.finish_reasons == [["eos", "eos"]] * 3


def test_stop_token_sequence_on_device(sampler):
    kw = dict(num_samples=2, max_new_tokens=8, temperature=0.0, eos_token_ids=())
    greedy = sampler.generate(PROMPTS, key=KEY, **kw)
    path = greedy.tokens[2, 0].tolist()
    seq = tuple(path[2:4])
    end = next(i for i in range(1, 8) if tuple(path[i - 1:i + 1]) == seq) + 1
    out = sampler.generate(PROMPTS, key=KEY, stop_token_sequences=[seq], **kw)
    assert out.lengths[2, 0] == end and out.finish_reasons[2][0] == "stop"
    assert out.tokens[2, 0, :end].tolist() == path[:end]


def test_stop_strings_and_text_with_a_tokenizer(model):
    tok = char_tokenizer()
    assert tok.vocab_size == VOCAB
    s = Sampler(model, tok)
    prompts = ["the cat sat", "a dog", "hello, world"]
    # sampled, with the special ids (and every even id) banned so each token is one character;
    # the per-row, per-step keys make the tokens before a stop identical across the two runs
    kw = dict(num_samples=2, max_new_tokens=8, temperature=1.0, ignore_eos=True,
              logits_processor=BAN_EVEN)
    greedy = s.generate(prompts, key=KEY, **kw)
    text = greedy.text[0][0]
    assert text == tok.decode(greedy.tokens[0, 0]) and len(text) == 8
    stop = text[4:6]
    cut = text.find(stop)
    out = s.generate(prompts, key=KEY, stop=[stop], **kw)
    assert out.text[0][0] == text[:cut]
    assert out.finish_reasons[0][0] == "stop"
    # the kept tokens are the shortest prefix whose text contains the stop string
    n = int(out.lengths[0, 0])
    assert stop in tok.decode(out.tokens[0, 0, :n]) and stop not in tok.decode(out.tokens[0, 0, : n - 1])
    assert np.all(out.tokens[0, 0, n:] == tok.pad_token_id)
    for b in (1, 2):  # other rows: cut exactly where their own text contains the stop string
        full = greedy.text[b][0]
        assert out.text[b][0] == (full[: full.find(stop)] if stop in full else full)


def test_a_tokenizer_whose_pad_id_is_outside_the_vocabulary_is_refused(model):
    """Prompts are left-padded with the tokenizer's pad id; an id past the embedding table reads NaN
    and every row would decode garbage, so the mismatch is an error at construction."""
    tok = char_tokenizer()

    class Wider:
        pad_token_id = VOCAB + 3
        eos_token_ids = tok.eos_token_ids

    with pytest.raises(ValueError, match=rf"pad_token_id={VOCAB + 3} is outside .*\[0, {VOCAB}\)"):
        Sampler(model, Wider())


# --------------------------------------------------------------------------- processor hook


def test_ban_processor_never_emits_banned_tokens(sampler):
    banned = EVEN_IDS
    out = sampler.generate(PROMPTS, key=KEY, num_samples=2, max_new_tokens=8, temperature=1.0,
                           eos_token_ids=(), logits_processor=BAN_EVEN)
    assert not np.isin(out.tokens, banned).any()
    base = sampler.generate(PROMPTS, key=KEY, num_samples=2, max_new_tokens=8, temperature=1.0,
                            eos_token_ids=())
    assert np.isin(base.tokens, banned).any()  # without the ban they do appear
    # raw log-probs stay those of the model (before the processor), sampling ones renormalise
    assert np.all(out.sampling_logprobs > out.logprobs)


def test_processor_sees_step_state_and_threads_user_state(sampler):
    """A processor forcing token (step + offset[row]) and an update counting emitted tokens."""
    rows = 3 * 2
    offsets = jnp.arange(rows, dtype=jnp.int32)

    def force(logits, state):
        vocab = logits.shape[-1]
        target = (state.step + state.user["offset"]) % vocab
        # the tokens buffer holds exactly the previous steps' choices (else ban everything)
        steps = jnp.arange(state.tokens.shape[1])[None, :]
        prev_ok = jnp.all(jnp.where(steps < state.step,
                                    state.tokens == (steps + state.user["offset"][:, None]) % vocab, True))
        hit = (jnp.arange(vocab)[None, :] == target[:, None]) & prev_ok
        return jnp.where(hit, 0.0, -1e9)

    def count(user, tokens, state):
        return {**user, "count": user["count"] + (tokens >= 0).astype(jnp.int32),
                "pos_sum": user["pos_sum"] + state.positions}

    user = {"offset": offsets, "count": jnp.zeros(rows, jnp.int32), "pos_sum": jnp.zeros(rows, jnp.int32)}
    out = sampler.generate(PROMPTS, key=KEY, num_samples=2, max_new_tokens=8, temperature=1.0,
                           eos_token_ids=(), logits_processor=force, processor_update=count,
                           processor_state=user)
    expected = (np.arange(8)[None, :] + np.arange(rows)[:, None]) % VOCAB
    np.testing.assert_array_equal(out.tokens.reshape(rows, 8), expected)
    np.testing.assert_array_equal(out.processor_state["count"], 8)
    prompt_len = np.repeat([len(p) for p in PROMPTS], 2)
    np.testing.assert_array_equal(out.processor_state["pos_sum"], 8 * prompt_len + 28)
    np.testing.assert_allclose(out.sampling_logprobs, 0.0, atol=1e-6)  # one allowed token
    dropped = sampler.generate(PROMPTS, key=KEY, num_samples=2, max_new_tokens=8, temperature=1.0,
                               eos_token_ids=(), logits_processor=force, processor_update=count,
                               processor_state=user, return_processor_state=False)
    assert dropped.processor_state is None
    np.testing.assert_array_equal(dropped.tokens, out.tokens)


def test_compose_processors_and_bad_ban_ids():
    logits = jnp.zeros((2, 5))
    proc = compose_processors(ban_tokens([1]), ban_tokens([3]))
    out = np.asarray(proc(logits, None))
    assert np.isinf(out[:, [1, 3]]).all() and np.isfinite(out[:, [0, 2, 4]]).all()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ban_tokens([7])(logits, None)
    with pytest.raises(ValueError, match="empty"):
        ban_tokens([])


# --------------------------------------------------------------------------- distribution


def _chi_square_ok(counts, probs, n):
    """Pearson chi-square over categories with expected count >= 5, compared with a loose
    bound (mean df, sd sqrt(2 df): df + 6 sd is a p-value far below 1e-6 for a wrong sampler)."""
    expected = probs * n
    keep = expected >= 5
    stat = float((((counts - expected) ** 2)[keep] / expected[keep]).sum())
    df = int(keep.sum()) - 1
    return stat < df + 6 * np.sqrt(2 * df), stat, df


LOGITS = np.log(np.array([0.30, 0.22, 0.15, 0.12, 0.09, 0.06, 0.04, 0.02], np.float64))


def _reference_probs(logits, temperature, top_p, top_k):
    z = logits / temperature
    p = np.exp(z - z.max()); p /= p.sum()
    order = np.argsort(-p, kind="stable")
    q = np.zeros_like(p)
    sorted_p = p[order]
    if top_k is not None:
        sorted_p = np.where(np.arange(len(p)) < top_k, sorted_p, 0.0)
        sorted_p /= sorted_p.sum()
    before = np.cumsum(sorted_p) - sorted_p
    sorted_p = np.where(before < top_p, sorted_p, 0.0)
    q[order] = sorted_p / sorted_p.sum()
    return q


@pytest.mark.parametrize("temperature,top_p,top_k", [
    (1.0, 1.0, None), (0.5, 1.0, None), (2.0, 1.0, None), (1.0, 0.6, None), (1.0, 1.0, 3),
    (0.7, 0.8, 5),
])
def test_sample_tokens_frequencies_match_distribution(temperature, top_p, top_k):
    n = 40000
    logits = jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (n, len(LOGITS)))
    keys = jax.random.split(jax.random.key(7), n)
    out = jax.jit(sample_tokens, static_argnames=("top_k", "num_candidates", "full_vocab"))(
        keys, logits, jnp.full((n,), temperature), jnp.full((n,), top_p), top_k=top_k,
        num_candidates=6)
    probs = _reference_probs(LOGITS, temperature, top_p, top_k)
    counts = np.bincount(np.asarray(out.tokens), minlength=len(LOGITS))
    assert np.all(counts[probs == 0] == 0)
    ok, stat, df = _chi_square_ok(counts, probs, n)
    assert ok, (stat, df, counts, probs * n)
    np.testing.assert_allclose(np.asarray(out.sampling_logprobs), np.log(probs[np.asarray(out.tokens)]), atol=1e-5)


def test_top_p_uses_a_candidate_set_not_a_full_sort():
    """With top_p < 1 and num_candidates=C, only the C largest logits can be drawn."""
    n, vocab = 4000, 50
    logits = jnp.zeros((n, vocab))  # uniform: the nucleus for top_p=0.99 is 50 tokens
    keys = jax.random.split(jax.random.key(1), n)
    fn = lambda k, l, t, p: sample_tokens(k, l, t, p, num_candidates=4)  # noqa: E731
    out = jax.jit(fn)(keys, logits, jnp.ones(n), jnp.full((n,), 0.99))
    assert set(np.unique(np.asarray(out.tokens))) == {0, 1, 2, 3}
    jaxpr = str(jax.make_jaxpr(fn)(keys, logits, jnp.ones(n), jnp.full((n,), 0.99)))
    assert "top_k[" in jaxpr and " sort[" not in jaxpr


@pytest.mark.parametrize("vocab,count,block", [(10_000, 64, 64), (10_000, 64, 512), (5_003, 7, 256), (300, 5, 64),
                                               (100, 8, 512), (151_936, 64, 64)])
def test_top_candidates_equal_lax_top_k_ids_and_tie_order(vocab, count, block):
    """The block-maxima top-C returns exactly lax.top_k's values and ids, ties included (lower id first)."""
    logits = jax.random.normal(jax.random.key(vocab), (8, vocab)) * 3.0
    logits = logits.at[1, vocab - 1].set(50.0).at[2, 0].set(40.0)  # maxima at both ends
    logits = logits.at[3, :].set(jnp.round(logits[3] * 2) / 2)  # many ties
    logits = logits.at[4, :].set(jnp.round(logits[4]))  # ties across the block maxima
    logits = logits.at[5, :].set(0.0).at[5, 3].set(1.0)  # all but one tied: the lowest ids win
    logits = logits.at[6, ::3].set(-jnp.inf)  # banned ids
    values, ids = jax.jit(functools.partial(top_candidates, count=count, block=block))(logits)
    ref_values, ref_ids = jax.lax.top_k(logits, count)
    np.testing.assert_array_equal(np.asarray(values), np.asarray(ref_values))
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ref_ids))


def test_tempered_logsumexp_is_bitwise_jax_logsumexp_of_the_tempered_logits():
    """Same bits as ``jax.nn.logsumexp(logits / T)``, banned tokens, all-banned and +inf rows included."""
    logits = jax.random.normal(jax.random.key(5), (7, 5000)) * 4.0
    logits = logits.at[1, ::3].set(-jnp.inf).at[2, :].set(-jnp.inf).at[3, 17].set(jnp.inf)
    temperature = jnp.asarray([0.7, 1.0, 0.3, 1.3, 1e-3, 2.0, 0.95])
    got = jax.jit(tempered_logsumexp)(logits, temperature)
    ref = jax.jit(lambda x, t: jax.nn.logsumexp(x / t[:, None], axis=-1))(logits, temperature)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    assert np.isneginf(np.asarray(got)[2]) and np.isposinf(np.asarray(got)[3])


def test_all_greedy_fast_path_equals_general_path():
    logits = jax.random.normal(jax.random.key(3), (16, 9000)).at[4, 7].set(100.0).at[4, 9].set(100.0)
    keys = jax.random.split(jax.random.key(0), 16)
    zeros, ones = jnp.zeros(16), jnp.ones(16)
    general = sample_tokens(keys, logits, zeros, ones)
    fast = sample_tokens(keys, logits, zeros, ones, all_greedy=True)
    np.testing.assert_array_equal(np.asarray(general.tokens), np.asarray(fast.tokens))
    assert int(fast.tokens[4]) == 7  # ties go to the lower id
    jaxpr = str(jax.make_jaxpr(lambda l: sample_tokens(keys, l, zeros, ones, all_greedy=True))(logits))
    assert "top_k[" not in jaxpr


def test_sampler_end_to_end_frequencies(sampler):
    """Through the whole sampler: first tokens drawn with a processor that imposes known logits."""
    table = jnp.full((VOCAB,), -jnp.inf).at[: len(LOGITS)].set(jnp.asarray(LOGITS, jnp.float32))

    def fixed(logits, state):
        return jnp.broadcast_to(table, logits.shape)

    k = 4096
    out = sampler.generate([PROMPTS[0]], key=jax.random.key(2), num_samples=k, max_new_tokens=1,
                           temperature=1.0, top_p=0.9, eos_token_ids=(), logits_processor=fixed)
    probs = _reference_probs(LOGITS, 1.0, 0.9, None)
    counts = np.bincount(out.tokens[0, :, 0], minlength=VOCAB)[: len(LOGITS)]
    assert counts.sum() == k
    ok, stat, df = _chi_square_ok(counts, probs, k)
    assert ok, (stat, df, counts)


# --------------------------------------------------------------------------- compilation


def test_no_retrace_on_second_call_with_same_bucket(sampler):
    kw = dict(num_samples=2, max_new_tokens=8, eos_token_ids=())
    sampler.generate(PROMPTS, key=jax.random.key(0), temperature=0.8, top_p=1.0, **kw)
    before = dict(sampler_lib.TRACE_COUNTS)
    # different prompts and lengths (same bucket 16), different key / temperature / top_p values
    sampler.generate([[9, 9, 9, 9, 9, 9], [1], list(range(16))], key=jax.random.key(9),
                     temperature=[0.3, 1.7, 1.0], top_p=1.0, **kw)
    assert dict(sampler_lib.TRACE_COUNTS) == before


# --------------------------------------------------------------------------- one-step API


def _start(sampler, prompts=PROMPTS, num_samples=1, slots=12):
    return sampler.start(sampler.prepare(prompts, num_samples=num_samples, max_new_tokens=slots))


def _assert_next_token_logits(model, logits, seqs):
    """Row b of ``logits`` is the full no-cache forward pass's next-token logits after ``seqs[b]``."""
    ref = full_logits(model, seqs)
    for b, seq in enumerate(seqs):
        np.testing.assert_allclose(logits[b], ref[b, len(seq) - 1], atol=1e-4)


def test_prefill_and_step_logits_equal_full_forward(model, sampler):
    """prefill + step (one token, several tokens, ragged counts) == a full no-cache forward pass."""
    logits, state = _start(sampler)
    assert state.num_rows == 3 and state.cache.num_slots == 16 + 12
    _assert_next_token_logits(model, logits, PROMPTS)
    seqs = [list(p) for p in PROMPTS]
    # one token per row
    first = jnp.asarray([5, 6, 7], jnp.int32)
    logits, state = sampler.step(state, first)
    for b in range(3):
        seqs[b].append(int(first[b]))
    _assert_next_token_logits(model, logits, seqs)
    # then up to 3 tokens per row, row 1 feeding 2 and row 2 none (its logits are to be ignored)
    block = jnp.asarray([[11, 12, 13], [14, 15, 16], [17, 18, 19]], jnp.int32)
    counts = jnp.asarray([3, 2, 0], jnp.int32)
    logits, state = sampler.step(state, block, counts)
    for b in range(3):
        seqs[b] += np.asarray(block[b, : int(counts[b])]).tolist()
    np.testing.assert_array_equal(state.positions, [len(s) for s in seqs])
    assert int(state.next_slot) == 16 + 1 + 3
    # and one more single token: the padded slots of the short rows stay invisible
    last = jnp.asarray([21, 22, 23], jnp.int32)
    logits, state = sampler.step(state, last)
    for b in range(3):
        seqs[b].append(int(last[b]))
    _assert_next_token_logits(model, logits, seqs)


def test_step_matches_the_samplers_own_decode(sampler):
    """Greedy decoding driven by prefill/step reproduces Sampler.generate's greedy tokens."""
    out = sampler.generate(PROMPTS, key=KEY, num_samples=1, max_new_tokens=6, temperature=0.0, eos_token_ids=())
    logits, state = _start(sampler, slots=6)
    tokens = []
    for _ in range(6):
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        tokens.append(np.asarray(tok))
        logits, state = sampler.step(state, tok)
    np.testing.assert_array_equal(np.stack(tokens, axis=1), out.tokens[:, 0])


def test_gather_and_copy_rows_then_step_equal_stepping_the_original_rows(sampler):
    tok = jnp.asarray([9, 10, 11], jnp.int32)
    _, state = _start(sampler)
    want, _ = sampler.step(state, tok)  # the original rows stepped
    # gather to another row count: rows [2, 0, 0, 1]; the input is kept (not donated)
    _, state = _start(sampler)
    picked = decoding.gather(state, [2, 0, 0, 1])
    assert not state.cache.k[0].is_deleted() and picked.num_rows == 4
    got, picked = sampler.step(picked, tok[jnp.asarray([2, 0, 0, 1])])
    np.testing.assert_allclose(got, want[jnp.asarray([2, 0, 0, 1])], atol=1e-5)
    # gather with the same row count reorders in place (donated)
    _, state = _start(sampler)
    order = [1, 2, 0]
    moved = decoding.gather(state, order)
    assert state.cache.k[0].is_deleted()
    got, _ = sampler.step(moved, tok[jnp.asarray(order)])
    np.testing.assert_allclose(got, want[jnp.asarray(order)], atol=1e-5)
    # copy row 0 over rows 1 and 2 (branching a node into children): all three now continue row 0
    _, state = _start(sampler)
    branched = decoding.copy(state, [0, 0], [1, 2])
    assert state.cache.k[0].is_deleted()
    np.testing.assert_array_equal(branched.positions, [3, 3, 3])
    got, _ = sampler.step(branched, jnp.full((3,), 9, jnp.int32))
    for r in range(3):
        np.testing.assert_allclose(got[r], want[0], atol=1e-5)
    # bad rows are refused before any jit
    _, state = _start(sampler)
    with pytest.raises(ValueError, match=r"rows has row 3 outside \[0, 3\)"):
        decoding.gather(state, [0, 3])
    with pytest.raises(ValueError, match="repeated row"):
        decoding.copy(state, [0, 1], [2, 2])
    with pytest.raises(ValueError, match="src_rows has 1 rows and dst_rows 2"):
        decoding.copy(state, [0], [1, 2])
    with pytest.raises(ValueError, match=r"tokens must be \[R\] or \[R, L\] with R=3"):
        sampler.step(state, jnp.zeros((2,), jnp.int32))


def test_step_api_donates_and_does_not_retrace(sampler):
    _, state = _start(sampler)
    cache_leaf = state.cache.k[0]
    _, state = sampler.step(state, jnp.asarray([1, 2, 3], jnp.int32))
    assert cache_leaf.is_deleted()  # stepped in place
    state = decoding.gather(state, [2, 1, 0])
    state = decoding.copy(state, [0], [1])
    before = dict(decoding.TRACE_COUNTS)
    # second round: other prompts in the same bucket, other tokens and rows
    _, state = _start(sampler, [[4, 4], [9] * 9, [1, 2, 3, 4]])
    _, state = sampler.step(state, jnp.asarray([7, 8, 9], jnp.int32))
    state = decoding.gather(state, [0, 0, 1])
    state = decoding.copy(state, [2], [0])
    assert dict(decoding.TRACE_COUNTS) == before


def test_module_level_step_api_equals_the_sampler_methods(sampler):
    """decoding.prefill/step with (graphdef, params) == Sampler.start/step; the sampler and the
    package re-export the very same functions (one implementation, no copy)."""
    import align_jax.llm as llm

    for name in ("DecodeState", "prefill", "step", "gather", "copy"):
        assert getattr(sampler_lib, name) is getattr(decoding, name) is getattr(llm, name)
    assert sampler_lib.TRACE_COUNTS is decoding.TRACE_COUNTS
    batch = sampler.prepare(PROMPTS, num_samples=2, max_new_tokens=4)
    want, state = sampler.start(batch)
    got, raw = decoding.prefill(sampler.graphdef, sampler.state, jnp.asarray(batch.tokens),
                                jnp.asarray(batch.prompt_lengths), num_samples=2, max_new_tokens=4)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(raw.kv_mask, state.kv_mask)
    tok = jnp.arange(6, dtype=jnp.int32) + 3
    want, _ = sampler.step(state, tok)
    got, _ = decoding.step(sampler.graphdef, sampler.state, raw, tok)
    np.testing.assert_array_equal(got, want)


def test_processor_state_update_donation_and_selected_return(sampler):
    """A processor returning (logits, user) updates the state; params are seen but never donated;
    with donate_processor_state the state passed in is consumed; return_processor_state selects."""
    rows = 3

    def proc(logits, state):
        seen = state.user["seen"] + (state.params["bias"][5] > 0).astype(jnp.int32)
        return logits + state.params["bias"], {**state.user, "seen": seen}

    def update(user, tokens, state):
        return {**user, "count": user["count"] + 1, "seen_at_update": state.user["seen"]}

    params = {"bias": jnp.zeros((VOCAB,), jnp.float32).at[5].set(1e4)}  # forces token 5
    user = {"seen": jnp.zeros(rows, jnp.int32), "count": jnp.zeros(rows, jnp.int32),
            "seen_at_update": jnp.zeros(rows, jnp.int32)}
    out = sampler.generate(PROMPTS, key=KEY, max_new_tokens=4, eos_token_ids=(), logits_processor=proc,
                           processor_update=update, processor_state=user, processor_params=params,
                           donate_processor_state=True, return_processor_state=lambda u: u["seen"])
    assert np.all(out.tokens == 5)
    np.testing.assert_array_equal(out.processor_state, [4, 4, 4])
    assert user["seen"].is_deleted() and not params["bias"].is_deleted()
    kept = {k: jnp.zeros(rows, jnp.int32) for k in ("seen", "count", "seen_at_update")}
    out = sampler.generate(PROMPTS, key=KEY, max_new_tokens=4, eos_token_ids=(), logits_processor=proc,
                           processor_update=update, processor_state=kept, processor_params=params)
    assert not kept["seen"].is_deleted()  # not donated by default
    np.testing.assert_array_equal(out.processor_state["count"], [4, 4, 4])
    np.testing.assert_array_equal(out.processor_state["seen_at_update"], [4, 4, 4])  # the processor's update


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompts=[]), "prompts is empty"),
    (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
    (dict(prompts=[[1, 2], list(range(1, 40)) * 3]), r"prompt 1 has 117 tokens; with max_new_tokens=16 it needs 133"),
    (dict(prompts=[[1, VOCAB]]), "prompt 0 has token id 43 outside the vocabulary"),
    (dict(temperature=-0.1), "temperature must be finite and >= 0"),
    (dict(temperature=float("nan")), "temperature must be finite"),
    (dict(temperature=[1.0, 1.0, 1.0]), r"temperature has shape \(3,\)"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]; row 0 has 1.5"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(num_samples=0), "num_samples must be an int >= 1"),
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
    (dict(top_k=0), "top_k must be None or an int >= 1"),
    (dict(key=None), "key is required"),
    (dict(key=jnp.zeros(3)), "key must be jax.random.key"),
    (dict(prompts=["text"]), "prompt 0 is a string but the sampler has no tokenizer"),
    (dict(eos_token_ids=None), "eos_token_ids is required"),
])
def test_bad_input_raises_clear_errors(sampler, kwargs, match):
    call = dict(prompts=[[1, 2], [3]], key=KEY, max_new_tokens=16, eos_token_ids=())
    call.update(kwargs)
    prompts = call.pop("prompts")
    with pytest.raises(ValueError, match=match):
        sampler.generate(prompts, **call)


def test_sampler_rejects_non_models():
    with pytest.raises(TypeError, match="LoadedModel or a Transformer"):
        Sampler(object())
