"""Principals: oracle, noisy oracle, verifier and ranker (the last two on the tiny random model)."""

from __future__ import annotations

import numpy as np
import pytest

from align_jax.methods import principals
from align_jax.methods.candidates import build_question_candidates, slot_correctness

TEXTS = [["x = 7", "so 7", "maybe 3", "no idea"], ["it is 3", "7", "nothing"]]


@pytest.fixture
def question():
    return build_question_candidates(TEXTS)


def test_oracle_scores_are_correctness(question):
    correct = slot_correctness(question, "7")
    out = principals.oracle_scores(question, correct, 4)
    assert out.score.shape == (2, 4) and out.cost.calls == 0
    np.testing.assert_array_equal(out.score, [[1, 0, 0, 0], [0, 1, 0, 0]])


def test_noisy_oracle_flip_rate_and_determinism(question):
    correct = slot_correctness(question, "7")
    exact = principals.oracle_scores(question, correct, 4).score
    same = principals.noisy_oracle_scores(question, correct, 4, flip_rate=0.0, seed=1, question_id="q")
    np.testing.assert_array_equal(same.score, exact)
    flipped = principals.noisy_oracle_scores(question, correct, 4, flip_rate=1.0, seed=1, question_id="q")
    np.testing.assert_array_equal(flipped.score, 1 - exact)
    a = principals.noisy_oracle_scores(question, correct, 4, flip_rate=0.3, seed=5, question_id="q9")
    b = principals.noisy_oracle_scores(question, correct, 4, flip_rate=0.3, seed=5, question_id="q9")
    np.testing.assert_array_equal(a.score, b.score)  # a function of (seed, question id)
    flips = np.mean([
        principals.noisy_oracle_scores(question, correct, 4, flip_rate=0.3, seed=5, question_id=f"q{i}").score != exact
        for i in range(400)
    ])
    assert abs(flips - 0.3) < 0.03  # 3200 Bernoulli(0.3) draws: sd 0.008
    with pytest.raises(ValueError, match="flip_rate"):
        principals.noisy_oracle_scores(question, correct, 4, flip_rate=1.5, seed=0, question_id="q")


def test_unknown_principal_type(question):
    with pytest.raises(ValueError, match="unknown principal type 'judge'"):
        principals.score_questions("judge", pool=None, model=None, question_texts=["q"], question_ids=["q"],
                                   questions=[question], correct_by_id=[{}], num_slots=4)
    with pytest.raises(ValueError, match="needs a model pool"):
        principals.score_questions("verifier", pool=None, model=None, question_texts=["q"], question_ids=["q"],
                                   questions=[question], correct_by_id=[{}], num_slots=4)


def test_label_logprobs_prefill_path_matches_score_continuations(tiny_pool, tiny_checkpoint):
    from align_jax.llm.scoring import score_continuations

    prompts = ["<|im_start|>user\nWhich?<|im_end|>\n<|im_start|>assistant\n", "pick one: ", "a somewhat longer prompt here"]
    labels = ["A", "B", "7"]  # single tokens in the tiny vocabulary: one prefill per prompt
    fast, cost = tiny_pool.label_logprobs(tiny_checkpoint, prompts, labels, batch_size=2)
    loaded = tiny_pool.loaded(tiny_checkpoint)
    ref = score_continuations(loaded, None, [p for p in prompts for _ in labels], labels * len(prompts))
    np.testing.assert_allclose(fast, ref.sum_logprob.reshape(3, 3), atol=2e-4)
    assert cost.calls == 3
    # multi-token labels fall back to pairwise scoring
    slow, cost = tiny_pool.label_logprobs(tiny_checkpoint, prompts[:1], ["Yes", "No"])
    ref = score_continuations(loaded, None, prompts[:1] * 2, ["Yes", "No"])
    np.testing.assert_allclose(slow[0], ref.sum_logprob, atol=2e-4)
    assert cost.calls == 2


def test_verifier_scores_each_slot_by_its_representative(tiny_pool, tiny_checkpoint, question):
    from align_jax.llm.scoring import score_continuations

    out = principals.verifier_scores(tiny_pool, tiny_checkpoint, ["What is 3+4?"], [question], 4)[0]
    loaded = tiny_pool.loaded(tiny_checkpoint)
    for i, agent in enumerate(question.agents):
        for s, slot in enumerate(agent.slots):
            prompt = tiny_pool.render_chat(tiny_checkpoint, principals.verifier_messages(
                "What is 3+4?", agent.texts[slot.representative]))
            ref = score_continuations(loaded, None, [prompt, prompt], ["Yes", "No"]).sum_logprob
            assert out.score[i, s] == pytest.approx(ref[0] - ref[1], abs=2e-4)
        assert (out.score[i, len(agent.slots):] == 0).all()
    assert out.cost.calls == 2 * sum(len(a.slots) for a in question.agents)  # "Yes"/"No" are 3 tokens here


def test_ranker_scores_answers_not_slots(tiny_pool, tiny_checkpoint):
    qc = build_question_candidates([["7", "3", "7"], ["3", "5"], ["none"]])
    out = principals.ranker_scores(tiny_pool, tiny_checkpoint, ["What is 3+4?"], [qc], 3)[0]
    ids = list(qc.answers_by_id)  # answers 7, 3, 5 in first-appearance order
    assert [qc.answers_by_id[a] for a in ids] == ["7", "3", "5"]
    by_id = {}
    for i, agent in enumerate(qc.agents[:2]):
        for s, slot in enumerate(agent.slots):
            by_id.setdefault(slot.answer_id, set()).add(float(out.score[i, s]))
    assert all(len(v) == 1 for v in by_id.values())  # same answer, same score across agents
    prefs = np.array([by_id[a].pop() for a in ids])
    # the average of two log-softmaxes over the M answers
    forward, backward = [], []
    for order, store in ((ids, forward), (ids[::-1], backward)):
        prompt = tiny_pool.render_chat(tiny_checkpoint, principals.ranker_messages(
            "What is 3+4?", [qc.answers_by_id[a] for a in order]))
        lp, _ = tiny_pool.label_logprobs(tiny_checkpoint, [prompt], ["A", "B", "C"])
        store.extend(lp[0] - np.log(np.exp(lp[0]).sum()))
    np.testing.assert_allclose(prefs, 0.5 * (np.array(forward) + np.array(backward)[::-1]), atol=1e-5)
    assert out.score[2, 0] == pytest.approx(prefs.min() - 1.0)  # "no answer" ranks below every answer
    assert out.cost.calls == 2
