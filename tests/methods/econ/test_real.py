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
