"""CAGE decoding: processor = solver's pi*, w = 0 -> base top-M, brevity shortens, guide lockstep,
unconverged solves counted, the guide's cache donated, bad input."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from align_jax.config import ConfigError
from align_jax.game.common_agency import SolverConfig, solve_equilibrium
from align_jax.game.types import GameInputError
from align_jax.llm.model import Transformer
from align_jax.llm.sampler import SamplerStepState, Sampler
from align_jax.llm.weights import LoadedModel
from align_jax.methods import cage
from tests.llm.conftest import make_tiny_config, make_tiny_tokenizer

VOCAB = 96


@pytest.fixture(scope="module")
def models():
    tok = make_tiny_tokenizer()
    cfg = make_tiny_config("qwen2", max_position_embeddings=1024)
    base = LoadedModel(cfg, Transformer(cfg, rngs=nnx.Rngs(3)), tok, "tiny-base")
    guide = LoadedModel(cfg, Transformer(cfg, rngs=nnx.Rngs(5)), tok, "tiny-guide")
    return base, guide


def _ctx(tok, convs, rows_per_prompt=1, t=8):
    return cage.DecodeContext(tok, VOCAB, tuple(convs), rows_per_prompt, t, tuple(tok.eos_token_ids))


def _step(state, rows, t=0, params=None):
    return SamplerStepState(jnp.asarray(t, jnp.int32), jnp.zeros((rows, 8), jnp.int32),
                            jnp.zeros((rows,), jnp.int32), jnp.zeros((rows,), bool), state, params)


CONVS = [[{"role": "user", "content": "What is 3 + 4?"}], [{"role": "user", "content": "Name a colour."}]]


def test_processor_equals_solver_policy_on_top_m_and_zero_elsewhere(models):
    base, _ = models
    tok = base.tokenizer
    objs = [cage.BrevityObjective(), cage.FormatObjective()]
    top_m = 12
    proc, _ = cage.make_processor(objs, method="cage", top_m=top_m, vocab_size=VOCAB)
    logits = jax.random.normal(jax.random.key(0), (2, VOCAB)) * 3.0
    eos = tok.eos_token_ids[0]
    logits = logits.at[:, eos].set(10.0)  # EOS in the top-M so brevity is not a constant there
    params, state = cage.init_cage(objs, _ctx(tok, CONVS), [2.0, 3.0], tau=0.5)
    out, new_state = jax.jit(proc)(logits, _step(state, 2, params=params))
    np.testing.assert_array_equal(new_state.unconverged, [0, 0])
    probs = np.asarray(jax.nn.softmax(out, axis=-1))
    cand_logits, cand_ids = jax.lax.top_k(logits, top_m)
    q = jnp.stack([objs[0].values(params[0], state.objective_states[0], cand_ids, None),
                   objs[1].values(params[1], state.objective_states[1], cand_ids, None)], axis=1)
    for r in range(2):
        res = solve_equilibrium(cand_logits[r], q[r], jnp.asarray([2.0, 3.0]), 0.5, config=SolverConfig(max_iters=100))
        assert bool(res.converged)
        np.testing.assert_allclose(probs[r, np.asarray(cand_ids[r])], np.asarray(res.policy), atol=1e-5)
        outside = np.setdiff1d(np.arange(VOCAB), np.asarray(cand_ids[r]))
        assert np.all(probs[r, outside] == 0.0)
        # and the equilibrium really moved mass: brevity pushes EOS up
        base_p = np.asarray(jax.nn.softmax(cand_logits[r]))
        j = int(np.flatnonzero(np.asarray(cand_ids[r]) == eos)[0])
        assert probs[r, eos] > base_p[j] + 1e-3


@pytest.mark.parametrize("method", ["cage", "linear"])
def test_zero_weights_give_base_top_m_distribution(models, method):
    base, _ = models
    objs = [cage.BrevityObjective(), cage.FormatObjective()]
    proc, _ = cage.make_processor(objs, method=method, top_m=10, vocab_size=VOCAB)
    logits = jax.random.normal(jax.random.key(1), (3, VOCAB)) * 2.0
    params, state = cage.init_cage(objs, _ctx(base.tokenizer, CONVS[:1], 3), [0.0, 0.0], base_temperature=0.7)
    probs = np.asarray(jax.nn.softmax(jax.jit(proc)(logits, _step(state, 3, params=params))[0], axis=-1))
    vals, ids = jax.lax.top_k(logits, 10)
    expect = np.zeros_like(probs)
    np.put_along_axis(expect, np.asarray(ids), np.asarray(jax.nn.softmax(vals / 0.7, axis=-1)), axis=1)
    np.testing.assert_allclose(probs, expect, atol=1e-6)


def test_brevity_mass_grows_with_weight_and_args_picks_reranked_argmax(models):
    base, _ = models
    tok = base.tokenizer
    objs = [cage.BrevityObjective()]
    eos = tok.eos_token_ids[0]
    logits = jax.random.normal(jax.random.key(2), (1, VOCAB)).at[0, eos].set(2.5)
    proc = jax.jit(cage.make_processor(objs, method="cage", top_m=8, vocab_size=VOCAB)[0])
    masses = []
    for w in [0.0, 0.5, 1.0, 2.0, 4.0]:
        params, st = cage.init_cage(objs, _ctx(tok, CONVS[:1]), [w])
        masses.append(float(jax.nn.softmax(proc(logits, _step(st, 1, params=params))[0], axis=-1)[0, eos]))
    assert all(b > a for a, b in zip(masses, masses[1:])), masses
    args = jax.jit(cage.make_processor(objs, method="args", top_m=8, vocab_size=VOCAB)[0])
    params, st = cage.init_cage(objs, _ctx(tok, CONVS[:1]), [0.0])
    assert int(jnp.argmax(args(logits, _step(st, 1, params=params))[0][0])) == int(jnp.argmax(logits[0]))
    params, st = cage.init_cage(objs, _ctx(tok, CONVS[:1]), [100.0])
    out, _ = args(logits, _step(st, 1, params=params))
    assert int(jnp.argmax(out[0])) == eos and int(jnp.sum(jnp.isfinite(out))) == 1


def test_brevity_weight_shortens_generated_outputs(models):
    base, _ = models
    sampler = Sampler(base)
    objs = [cage.BrevityObjective(), cage.FormatObjective()]
    procs = {"cage": cage.make_processor(objs, method="cage", top_m=VOCAB, vocab_size=VOCAB)}
    convs = CONVS * 4
    lengths = {}
    for w in (0.0, 4.0):
        out = cage.decode_with_method(sampler, objs, procs, convs, method="cage", weights=[w, 0.0],
                                      key=jax.random.key(0), max_new_tokens=16)
        lengths[w] = out.lengths.mean()
    assert lengths[4.0] < 0.6 * lengths[0.0], lengths


@pytest.mark.parametrize("method", ["cage", "linear"])
def test_weight_grid_rows_carry_their_own_weights(models, method):
    """One decode over a weight grid: row (b, w) uses grid[w] and does not depend on the other points."""
    base, _ = models
    sampler = Sampler(base)
    objs = [cage.BrevityObjective(), cage.FormatObjective()]
    procs = {method: cage.make_processor(objs, method=method, top_m=VOCAB, vocab_size=VOCAB)}
    convs = CONVS * 3
    kw = dict(method=method, key=jax.random.key(4), max_new_tokens=16)
    mixed = cage.decode_weight_grid(sampler, objs, procs, convs, weight_grid=[[0.0, 0.0], [6.0, 0.0]], **kw)
    short = cage.decode_weight_grid(sampler, objs, procs, convs, weight_grid=[[6.0, 0.0], [6.0, 0.0]], **kw)
    free = cage.decode_weight_grid(sampler, objs, procs, convs, weight_grid=[[0.0, 0.0], [0.0, 0.0]], **kw)
    assert mixed.tokens.shape == (len(convs), 2, 16)
    # grid point w of the mixed call equals the same point of a call where every row has its weights
    np.testing.assert_array_equal(mixed.tokens[:, 1], short.tokens[:, 1])
    np.testing.assert_array_equal(mixed.tokens[:, 0], free.tokens[:, 0])
    # and the brevity weight really acts per row
    assert mixed.lengths[:, 1].mean() < 0.6 * mixed.lengths[:, 0].mean(), mixed.lengths
    with pytest.raises(GameInputError, match=r"weights\[1\]: must be >= 0"):
        cage.decode_weight_grid(sampler, objs, procs, convs[:1], weight_grid=[[0.0, 0.0], [-1.0, 0.0]], **kw)


def test_format_automaton_tracks_phrase_across_tokens(models):
    tok = models[0].tokenizer
    obj = cage.FormatObjective(("####",))
    params, state = obj.init_params(_ctx(tok, CONVS[:1])), obj.init_state(_ctx(tok, CONVS[:1]))
    hash_id, one_id, x_id = tok.encode("#")[0], tok.encode("1")[0], tok.encode("x")[0]
    ids = jnp.asarray([[hash_id, x_id, one_id]])
    st = _step(None, 1)
    np.testing.assert_allclose(np.asarray(obj.values(params, state, ids, st)), [[0.25, 0.0, 0.0]])
    for _ in range(3):
        state = obj.update(params, state, jnp.asarray([hash_id]), st)
    np.testing.assert_allclose(np.asarray(obj.values(params, state, ids, st)), [[1.0, 0.0, 0.0]])
    state = obj.update(params, state, jnp.asarray([hash_id]), st)  # completed: satisfied, Q = 0
    np.testing.assert_allclose(np.asarray(obj.values(params, state, ids, st)), [[0.0, 0.0, 0.0]])
    comps = [cage.Completion(0, [1], "so #### 42"), cage.Completion(0, [1], "#### no number")]
    np.testing.assert_allclose(obj.sequence_scores(comps, None), [1.0, 0.0])


def test_guide_lockstep_cache_matches_full_rescoring(models):
    """Q_guide after feeding tokens step by step == log p(c | obj prompt + y) - log p(c | neutral + y)."""
    from align_jax.llm.scoring import score_continuations

    _, guide = models
    tok = guide.tokenizer
    obj = cage.GuideObjective(guide, "Be brief.", "Be verbose.")
    ctx = _ctx(tok, CONVS, t=4)
    params, state = obj.init_params(ctx), obj.init_state(ctx)
    generated = [[tok.encode("7")[0], tok.encode(".")[0]], [tok.encode("R")[0], tok.encode("e")[0]]]
    update = jax.jit(obj.update)
    for t in range(2):
        state = update(params, state, jnp.asarray([g[t] for g in generated]), _step(None, 2, t))
    cands = jnp.asarray([[tok.encode(c)[0] for c in "ab1"]] * 2)
    q = np.asarray(obj.values(params, state, cands, None))
    for r in range(2):
        conts = [generated[r] + [int(c)] for c in cands[r]]
        lp_o = score_continuations(guide, None, [tok.encode(obj.prompts([CONVS[r]], "objective")[0])], conts)
        lp_n = score_continuations(guide, None, [tok.encode(obj.prompts([CONVS[r]], "neutral")[0])], conts)
        expect = lp_o.token_logprobs[:, 2] - lp_n.token_logprobs[:, 2]
        np.testing.assert_allclose(q[r], expect, atol=2e-4)
    assert np.abs(q).max() > 1e-3  # the two prompts really differ


def test_bad_inputs_raise_named_errors(models, tmp_path, tiny_data_dir):
    base, _ = models
    objs = [cage.BrevityObjective(), cage.FormatObjective()]
    ctx = _ctx(base.tokenizer, CONVS)
    with pytest.raises(GameInputError, match="weights: 1 weight"):
        cage.init_cage(objs, ctx, [1.0])
    with pytest.raises(GameInputError, match="must be >= 0"):
        cage.init_cage(objs, ctx, [1.0, -0.5])
    with pytest.raises(GameInputError, match="tau"):
        cage.init_cage(objs, ctx, [1.0, 1.0], tau=0.0)
    with pytest.raises(GameInputError, match="top_m: 97 candidate tokens is larger"):
        cage.make_processor(objs, top_m=97, vocab_size=VOCAB)

    def write(text):
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        return path

    cases = [
        ("name: x\nobjectives: [brevity, format]\nweights:\n  - [1.0, 0.0]\n  - [1.0]\n", ":5: weights.1: .*1 weight"),
        ("name: x\nobjectives: [brevity, format]\nweights:\n  - [1.0, -2.0]\n", ":4: weights.0: .*>= 0"),
        ("name: x\nobjectives: [brevity]\nweights: [[1.0]]\ntau: 0\n", ":4: tau: must be > 0"),
        ("name: x\nobjectives: [brevity, speed]\nweights: [[1.0, 1.0]]\n",
         ":2: objectives.1: unknown objective 'speed'; known: .*guide"),
        ("name: x\nobjectives: [brevity]\nweights: [[1.0]]\nsolver_max_iters: 0\n", ":4: solver_max_iters: must be >= 1"),
    ]
    for text, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            cage.load_cage_config(write(text))
    config = cage.load_cage_config(write("name: x\nobjectives: [brevity]\nweights: [[1.0]]\n"
                                         f"top_m: 500\noutput_dir: {tmp_path}\ndata_dir: {tiny_data_dir}\n"))
    with pytest.raises(ConfigError, match=r"bad.yaml:4: top_m: 500 candidate tokens is larger than .* 96"):
        cage.run_cage(config, base=base, progress=False)


def test_unconverged_solves_are_counted_per_active_row(models):
    """A solve cut at max_iters=1 is counted in CageState.unconverged, exactly for the active rows whose
    solver result says not converged; with the default cap every solve converges and nothing is counted."""
    tok = models[0].tokenizer
    objs = [cage.BrevityObjective(), cage.FormatObjective()]
    rows, top_m = 4, 12
    eos = tok.eos_token_ids[0]
    logits = (jax.random.normal(jax.random.key(7), (rows, VOCAB)) * 4.0).at[:, eos].set(12.0)
    params, state = cage.init_cage(objs, _ctx(tok, CONVS[:1], rows), [40.0, 60.0], tau=0.05)
    cand_logits, cand_ids = jax.lax.top_k(logits, top_m)
    q = jnp.stack([o.values(p, s, cand_ids, None) for o, p, s in zip(objs, params, state.objective_states)], axis=1)
    done = jnp.asarray([False, False, True, False])
    step = SamplerStepState(jnp.asarray(0, jnp.int32), jnp.zeros((rows, 8), jnp.int32),
                            jnp.zeros((rows,), jnp.int32), done, state, params)
    for max_iters in (1, 100):
        proc, _ = cage.make_processor(objs, method="cage", top_m=top_m, vocab_size=VOCAB,
                                      solver_config=SolverConfig(max_iters=max_iters))
        _, new = jax.jit(proc)(logits, step)
        solved = jax.vmap(lambda b, o, w: solve_equilibrium(b, o, w, 0.05, config=SolverConfig(max_iters=max_iters)))(
            cand_logits, q, state.weights)
        expect = (~np.asarray(solved.converged) & ~np.asarray(done)).astype(np.int32)
        np.testing.assert_array_equal(new.unconverged, expect)
        if max_iters == 1:
            assert expect.sum() >= 2, "the test problem must be hard enough for one Newton step"
        else:
            assert expect.sum() == 0
    # counts accumulate over a decode and come back from decode_with_method
    sampler = Sampler(models[0])
    proc1 = cage.make_processor(objs, method="cage", top_m=top_m, vocab_size=VOCAB,
                                solver_config=SolverConfig(max_iters=1))
    out = cage.decode_with_method(sampler, objs, {"cage": proc1}, CONVS, method="cage", weights=[40.0, 60.0],
                                  key=jax.random.key(0), max_new_tokens=6, tau=0.05)
    counts = np.asarray(out.processor_state["unconverged"])
    assert counts.shape == (2,) and np.all(counts <= out.lengths.reshape(-1)) and counts.sum() > 0


def test_guide_cache_is_donated_to_the_decode(models, monkeypatch):
    """The processor state (with the guide's KV cache) is donated: after decoding, the buffers passed in
    are deleted (updated in place, not held twice), while the guide's weights (params) stay alive."""
    base, guide = models
    sampler = Sampler(base)
    objs = [cage.GuideObjective(guide, "Be brief.", "Be verbose."), cage.BrevityObjective()]
    procs = {"cage": cage.make_processor(objs, method="cage", top_m=8, vocab_size=VOCAB)}
    seen = []
    real_init = cage.processor.init_cage

    def spy(*args, **kwargs):
        seen.append(real_init(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(cage.processor, "init_cage", spy)
    out = cage.decode_with_method(sampler, objs, procs, CONVS, method="cage", weights=[1.0, 1.0],
                                  key=jax.random.key(1), max_new_tokens=4)
    assert out.tokens.shape == (2, 1, 4)
    (params, state), = seen
    guide_state = state.objective_states[0]
    cache_leaves = jax.tree.leaves(guide_state.decode.cache)
    assert cache_leaves and all(x.is_deleted() for x in cache_leaves)
    assert guide_state.logp.is_deleted() and state.weights.is_deleted()
    assert not any(x.is_deleted() for x in jax.tree.leaves(params[0].model))
    assert not any(x.is_deleted() for x in jax.tree.leaves(cage.GuideObjective(guide).sampler.state))


def test_pareto_metrics_known_values():
    assert cage.hypervolume([[1.0, 1.0]], [0.0, 0.0]) == pytest.approx(1.0)
    assert cage.hypervolume([[2.0, 1.0], [1.0, 2.0]], [0.0, 0.0]) == pytest.approx(3.0)
    assert cage.hypervolume([[1.0, 1.0, 1.0], [0.5, 0.5, 2.0]], [0.0] * 3) == pytest.approx(1.25)
    counts = cage.dominance_counts({"a": [[1.0, 1.0]], "b": [[0.5, 0.5], [2.0, 0.0]]})
    assert counts["a"] == {"dominated": 0, "dominates": 1, "points": 1}
    assert counts["b"]["dominated"] == 1
