"""Candidate-set construction from given texts (no model): frequencies, no-answer slots, shared ids."""

import numpy as np
import pytest

from align_jax.game import diagnostics, validate_candidates
from align_jax.methods.candidates import (
    NO_ANSWER_BASE,
    PADDING_ID,
    AgentSpec,
    Cost,
    agent_conversation,
    build_question_candidates,
    slot_correctness,
    stack_candidate_sets,
)
from align_jax.methods import baselines


def _texts():
    return [
        # agent 0: K=5, answers 18, 18, 20, none, 18 -> slots {18: 3/5, 20: 1/5}
        ["so 16 - 3 - 4 = 9 and 9 * 2 = 18. The answer is 18.", "#### 18", "\\boxed{20}", "I am not sure.",
         "She makes $18.00 a day"],
        # agent 1: K=3, answers 20, 36/2, 1,000 -> ids shared with agent 0 for 20 and 18
        ["The answer is 20", "so it is \\boxed{\\frac{36}{2}}", "total: 1,000"],
        # agent 2: K=2, nothing extractable
        ["no idea", "none"],
    ]


def test_frequencies_slots_and_representatives():
    qc = build_question_candidates(_texts(), [[5, 6, 7, 8, 9], [1, 2, 3], [4, 4]])
    a0, a1, a2 = qc.agents
    assert a0.answers == ("18", "18", "20", None, "18")
    assert [(s.answer, s.count, s.utility, s.representative) for s in a0.slots] == [
        ("18", 3, 3 / 5, 0), ("20", 1, 1 / 5, 2)]
    # the unextractable sample counts in the denominator but gets no slot
    assert sum(s.utility for s in a0.slots) == pytest.approx(4 / 5)
    assert a0.tokens == (5, 6, 7, 8, 9)
    assert a0.answer_ids[3] == -1
    assert [s.count for s in a1.slots] == [1, 1, 1]
    for agent in qc.agents:
        assert sum(s.utility for s in agent.slots) <= 1.0 + 1e-12


def test_ids_coincide_across_agents_for_equal_answers():
    qc = build_question_candidates(_texts())
    a0, a1, _ = qc.agents
    ids0 = {s.answer: s.answer_id for s in a0.slots}
    ids1 = {s.answer: s.answer_id for s in a1.slots}
    assert ids1["20"] == ids0["20"]
    assert ids1["\\frac{36}{2}"] == ids0["18"]  # equal by answers_equal, different strings
    assert ids1["1000"] not in ids0.values()
    assert sorted(qc.answers_by_id) == [0, 1, 2]
    assert qc.answers_by_id[ids0["18"]] == "18"


def test_no_answer_slot_is_unique_negative_zero_utility_and_never_correct():
    qc = build_question_candidates(_texts())
    (slot,) = qc.agents[2].slots
    assert slot.answer_id == NO_ANSWER_BASE - 2
    assert slot.utility == 0.0 and slot.answer is None and slot.count == 0
    # two agents without answers get different ids (a no-answer never matches another)
    both = build_question_candidates([["x"], ["y"]])
    assert both.agents[0].slots[0].answer_id != both.agents[1].slots[0].answer_id
    correct = slot_correctness(qc, "18")
    assert slot.answer_id not in correct or not correct[slot.answer_id]


def test_stack_pads_to_K_and_sets_value_to_correctness():
    qc = build_question_candidates(_texts())
    correct = slot_correctness(qc, "18")
    assert correct == {0: True, 1: False, 2: False}
    score = np.arange(3 * 5, dtype=np.float32).reshape(3, 5)
    cands = stack_candidate_sets([qc, qc], [score, score], [correct, correct])
    assert cands.valid.shape == (2, 3, 5)  # K = max samples of any agent
    validate_candidates(cands)
    valid = np.asarray(cands.valid[0])
    assert valid.sum(axis=1).tolist() == [2, 3, 1]
    ids = np.asarray(cands.answer_id[0])
    assert (ids[~valid] == PADDING_ID).all()
    np.testing.assert_allclose(np.asarray(cands.agent_utility[0, 0, :2]), [0.6, 0.2])
    np.testing.assert_array_equal(np.asarray(cands.correct[0]), np.asarray(cands.principal_value[0]) > 0.5)
    assert bool(cands.correct[0, 0, 0]) and not bool(cands.correct[0, 1, 0])
    # principal scores are copied only where a slot exists
    np.testing.assert_array_equal(np.asarray(cands.principal_score[0])[valid], score[valid])
    assert (np.asarray(cands.principal_score[0])[~valid] == 0).all()


def test_pooled_utility_matches_pooled_sample_frequency():
    # with equal K the engine's pooled utility is the answer's frequency among all N*K samples
    texts = [["1", "1", "2", "x"], ["1", "2", "2", "2"]]
    qc = build_question_candidates(texts)
    correct = slot_correctness(qc, "2")
    cands = stack_candidate_sets([qc], [np.zeros((2, 4))], [correct])
    pooled = np.asarray(diagnostics.pooled_utility(cands._replace(**{k: v[0] for k, v in cands._asdict().items()})))
    # answer "1": 3 of 8 samples, answer "2": 4 of 8
    assert pooled[0, 0] == pytest.approx(3 / 8) and pooled[0, 1] == pytest.approx(4 / 8)
    vote = baselines.majority_vote([x for a in qc.agents for x in a.answer_ids],
                                   [x for a in qc.agents for x in a.answers], correct)
    assert vote.answer == "2" and vote.correct == 1.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least one agent"):
        build_question_candidates([])
    with pytest.raises(ValueError, match="agent 1: expected a non-empty list"):
        build_question_candidates([["1"], []])
    with pytest.raises(ValueError, match="agent 0: 2 token counts for 1 samples"):
        build_question_candidates([["1"]], [[1, 2]])


def test_conversations():
    zero = agent_conversation("What is 2+3?", AgentSpec("a", "m"))
    assert len(zero) == 1 and zero[0]["content"].startswith("What is 2+3?") and "\\boxed{}" in zero[0]["content"]
    few = agent_conversation("Q?", AgentSpec("a", "m", prompt_style="few_shot_cot",
                                             exemplars=(("E1?", "s1 #### 1"), ("E2?", "s2 #### 2"))))
    assert [m["role"] for m in few] == ["user", "assistant", "user", "assistant", "user"]
    assert few[1]["content"] == "s1 #### 1" and few[-1]["content"] == "Q?"
    with pytest.raises(ValueError, match="unknown prompt_style"):
        agent_conversation("Q", AgentSpec("a", "m", prompt_style="tree"))
    assert Cost(1, 2, 3) + Cost(4, 5, 6) == Cost(5, 7, 9)
    assert sum([Cost(1, 1, 1)] * 3, Cost()).total_tokens == 6


def test_baseline_rules_tie_breaks_are_expectations():
    vote = baselines.majority_vote([0, 1, -1, 1, 0], ["a", "b", None, "b", "a"], {0: True, 1: False})
    assert vote.correct == 0.5 and vote.answer == "a"
    assert baselines.majority_vote([-1, -1], [None, None], {}) == baselines.Pick(None, -1, 0.0)
    score = np.array([[0.9, 0.1], [0.9, 0.0]])
    valid = np.array([[True, True], [True, False]])
    ids = np.array([[3, 4], [5, -1]])
    correct = np.array([[True, False], [False, False]])
    best = baselines.best_of_n(score, valid, ids, correct, {3: "x", 4: "y", 5: "z"})
    assert best.correct == 0.5 and best.answer == "x"
    assert baselines.pass_at_k([[0, -1], [2]], {0: False, 2: True}) == 1.0
    assert baselines.pass_at_k([[0, -1], [2]], {0: False, 2: False}) == 0.0


def test_greedy_rows_with_the_same_prompt_are_decoded_once(tiny_pool, tiny_checkpoint, monkeypatch):
    """Two agents that differ only in temperature decode the same greedy text: one row each
    question is decoded and both agents get it (and their own cost); sampled calls keep every row."""
    import jax

    from align_jax.methods.candidates import AgentSpec, sample_agents

    agents = [AgentSpec("a", tiny_checkpoint, temperature=0.7, num_samples=2, max_new_tokens=6),
              AgentSpec("b", tiny_checkpoint, temperature=1.0, num_samples=2, max_new_tokens=6)]
    questions = ["What is 2 + 3?", "Tom has 4 apples and eats one. How many are left?"]
    rows = []
    original = tiny_pool.generate_chat

    def counting(name, conversations, **kw):
        rows.append(len(conversations))
        return original(name, conversations, **kw)

    monkeypatch.setattr(tiny_pool, "generate_chat", counting)
    texts, tokens, costs = sample_agents(tiny_pool, agents, questions, jax.random.key(0), num_samples=1,
                                         temperature_override=0.0)
    assert rows == [2], "each question's greedy prompt should be decoded once for both agents"
    for q in range(2):
        assert texts[q][0] == texts[q][1] and tokens[q][0] == tokens[q][1]
        assert costs[q][0] == costs[q][1] and costs[q][0].calls == 1
    monkeypatch.setattr(tiny_pool, "generate_chat", original)
    single, _, _ = sample_agents(tiny_pool, agents[:1], questions, jax.random.key(0), num_samples=1,
                                 temperature_override=0.0)
    assert [single[q][0] for q in range(2)] == [texts[q][0] for q in range(2)], "sharing changed the text"
    monkeypatch.setattr(tiny_pool, "generate_chat", counting)
    sample_agents(tiny_pool, agents, questions, jax.random.key(0))
    assert rows[-1] == 4, "sampled rows must never be merged"
