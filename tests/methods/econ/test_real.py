"""The real ECON pipeline end to end on the tiny random model: coordinator strategy,
executors at per-row temperature / top-p chosen by belief networks, LLM commitment, stop rule,
costs."""

import jax
import numpy as np

from align_jax.methods.econ.networks import init_networks
from align_jax.methods.econ.real import RealEconSettings, belief_policy, fixed_policy, real_observation_dim
from align_jax.methods.econ.sim import COMMITMENT_DIM

from tests.methods.conftest import QUESTIONS
from tests.methods.econ.conftest import tiny_network


def test_real_pipeline_runs_end_to_end_on_the_tiny_model(tiny_checkpoint, tiny_pool):
    # one token budget for all three calls: one compiled decode per batch size
    settings = RealEconSettings(model=tiny_checkpoint, num_executors=3, max_rounds=2, strategy_tokens=8,
                                executor_tokens=8, commit_tokens=8)
    network = tiny_network()
    nets, params = init_networks(network, real_observation_dim(settings), COMMITMENT_DIM, 3, jax.random.key(0))
    questions = [q for q, _ in QUESTIONS[:2]]
    golds = [a.split("####")[-1].strip() for _, a in QUESTIONS[:2]]
    from align_jax.methods.econ.real import run_econ_questions

    rows = run_econ_questions(tiny_pool, settings, questions, golds, belief_policy(nets, params), jax.random.key(1))
    grid_t = {t for t, _ in nets.grid}
    for row in rows:
        assert 1 <= row["rounds"] <= 2 and len(row["commitments"]) == row["rounds"]
        assert all(t in {float(np.float32(g)) for g in grid_t} or np.isclose(t, list(grid_t)).any()
                   for ts in row["temperatures"] for t in ts)
        assert row["correct"] in (0.0, 1.0)
        # strategy + N executors + commitment per round
        assert row["cost"]["calls"] == 1 + row["rounds"] * (3 + 1)
        assert row["cost"]["gen_tokens"] > 0 and row["cost"]["prompt_tokens"] > 0
        assert np.asarray(row["reward_components"]).shape == (row["rounds"], 3, 3)
    # equal parameters: the variance rule stops every question after its first round
    rows = run_econ_questions(tiny_pool, settings, questions, golds, fixed_policy(0.7, 0.9), jax.random.key(1))
    assert [r["rounds"] for r in rows] == [1, 1]
    assert all(r["temperatures"] == [[0.7, 0.7, 0.7]] or np.allclose(r["temperatures"], 0.7) for r in rows)


def test_embedding_action_likelihood_is_the_cosine_to_the_commitment(tiny_checkpoint, tiny_pool):
    """R_AL = <e(executor output), e(commitment response)> with the model's own embeddings; the
    agreement and novelty of R_CC stay exact; the N + 1 embedding passes per round are billed."""
    import pytest

    settings = RealEconSettings(model=tiny_checkpoint, num_executors=3, max_rounds=2, strategy_tokens=8,
                                executor_tokens=8, commit_tokens=8, action_likelihood="embedding")
    seen = []
    rows = _run_recording(tiny_pool, "embed", lambda texts, out: seen.append((list(texts), out[0])), settings, 1)
    assert len(seen) == 2  # one round each (equal parameters), one call per question
    for row, (texts, emb) in zip(rows, seen):
        r_al = np.asarray(row["reward_components"])[0, :, 1]
        np.testing.assert_allclose(r_al, emb[:3] @ emb[3], rtol=1e-5, atol=1e-6)
        assert np.all(np.abs(r_al) <= 1.0)
        # strategy + 3 executors + commitment, plus 3 + 1 embedding passes
        assert row["cost"]["calls"] == 1 + (3 + 1) + (3 + 1)
    with pytest.raises(ValueError, match="action_likelihood must be one of"):
        RealEconSettings(model="m", action_likelihood="bleu")


def test_hierarchical_variant_commits_through_a_central_call(tiny_checkpoint, tiny_pool):
    """N = 4 executors under G = 2 coordinators: 2 strategies, per round 4 executors + 2 group
    commitments + 1 central call; executors of group g see coordinator g's strategy."""
    import pytest

    settings = RealEconSettings(model=tiny_checkpoint, num_executors=4, num_groups=2, max_rounds=2,
                                strategy_tokens=8, executor_tokens=8, commit_tokens=8)
    prompts, outputs = [], []

    def record(conversations, out):
        prompts.append([c[0]["content"] for c in conversations])
        outputs.append([texts[0] for texts in out.texts])

    rows = _run_recording(tiny_pool, "generate_chat", record, settings, 2)
    # strategies (Q x G), executors (Q x N), group commitments (Q x G), central (Q); one round (equal parameters)
    assert [len(p) for p in prompts] == [4, 8, 4, 2]
    assert all("group coordinators committed" in p for p in prompts[3])
    for q in range(2):
        executors = prompts[1][4 * q:4 * q + 4]
        strategy = [s.strip() for s in outputs[0][2 * q:2 * q + 2]]
        assert all(f"Coordinator's strategy: {strategy[i // 2]}" in executors[i] for i in range(4))
    for row in rows:
        assert row["rounds"] == 1 and row["cost"]["calls"] == 2 + (4 + 2 + 1)
    with pytest.raises(ValueError, match="num_groups=3 must be >= 1 and divide num_executors=4"):
        RealEconSettings(model="m", num_executors=4, num_groups=3)


def _run_recording(pool, method: str, record, settings, seed: int):
    """ECON on the first two questions with the fixed policy, ``pool.<method>`` wrapped so that
    ``record(inputs, output)`` sees every call."""
    from align_jax.methods.econ.real import run_econ_questions

    original = getattr(pool, method)

    def spy(name, items, **kw):
        out = original(name, items, **kw)
        record(items, out)
        return out

    setattr(pool, method, spy)
    try:
        return run_econ_questions(pool, settings, [q for q, _ in QUESTIONS[:2]],
                                  [a.split("####")[-1].strip() for _, a in QUESTIONS[:2]], fixed_policy(0.7, 0.9),
                                  jax.random.key(seed))
    finally:
        delattr(pool, method)
