"""Principals: the plug-in interface and registry, the shipped conformance test on every
registered principal (LLM ones on the tiny random model), and each principal's own scores."""

from __future__ import annotations

import dataclasses
import hashlib
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from align_jax.config import ConfigError, config_from_dict
from align_jax.methods import principals
from align_jax.methods.candidates import Cost, build_question_candidates, slot_correctness
from align_jax.methods.principals import (
    PRINCIPALS,
    PrincipalBatch,
    PrincipalModelError,
    PrincipalScores,
    PrincipalSection,
    make_principal,
)
from align_jax.methods.principals.arithmetic import (
    NO_STEP_SCORE,
    ArithmeticPrincipal,
    arithmetic_score,
    arithmetic_steps,
)
from align_jax.methods.principals.conformance import PrincipalContractError, example_batch, principal_api_test
from align_jax.registry import UnknownNameError

TEXTS = [["x = 7", "so 7", "maybe 3", "no idea"], ["it is 3", "7", "nothing"]]
MODEL_FREE = ("oracle", "noisy_oracle", "arithmetic")


@pytest.fixture
def question():
    return build_question_candidates(TEXTS)


# ---- registry and config section --------------------------------------------------------------


def test_every_principal_is_registered_and_selected_by_type():
    assert PRINCIPALS.names() == ("verifier", "ranker", "oracle", "noisy_oracle", "arithmetic", "pot")
    for name in MODEL_FREE:
        principal = make_principal(PrincipalSection(type=name))
        assert principal.name == name and not principal.needs_model
    assert isinstance(make_principal(PrincipalSection(type="arithmetic")), principals.Principal)


@pytest.mark.parametrize(("data", "pattern"), [
    (dict(type="judge"), r"<dict>: type: unknown principal 'judge'; known: verifier, ranker, oracle, noisy_oracle, "
                         r"arithmetic"),
    (dict(type="noisy_oracle", flip_rate=1.5), r"flip_rate: must be in \[0, 1\]"),
    (dict(batch_size=0), r"batch_size: must be >= 1"),
    (dict(model="no-such-model"), r"model: unknown model 'no-such-model'"),
])
def test_section_errors_name_the_field(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(PrincipalSection, data)
    with pytest.raises(UnknownNameError) as raised:
        PrincipalSection(type="judge")
    assert raised.value.field == "type"


def test_llm_principal_without_a_model_is_a_clear_error():
    with pytest.raises(PrincipalModelError, match="'verifier' scores with an LLM and needs a model pool.*"
                                                  "without a model: oracle, noisy_oracle, arithmetic"):
        make_principal(PrincipalSection(type="verifier"))
    with pytest.raises(PrincipalModelError, match="'ranker' scores with an LLM and needs a model \\(principal.model"):
        make_principal(PrincipalSection(type="ranker"), pool=object())


# ---- the shipped conformance test -----------------------------------------------------------------


@pytest.mark.parametrize("name", PRINCIPALS.names())
def test_every_registered_principal_passes_the_conformance_test(name, tiny_pool, tiny_checkpoint):
    principal = make_principal(PrincipalSection(type=name, flip_rate=0.4, batch_size=3), pool=tiny_pool,
                               default_model=tiny_checkpoint, seed=7)
    # LLM principals batch prompts of different lengths together: float32 rounding moves the logits a little
    out = principal_api_test(principal, atol=2e-4 if principal.needs_model else 0.0)
    assert len(out) == example_batch().size
    if not principal.seeded:  # an unseeded principal ignores the seed
        other = make_principal(PrincipalSection(type=name, flip_rate=0.4, batch_size=3), pool=tiny_pool,
                               default_model=tiny_checkpoint, seed=8).score(example_batch())
        for a, b in zip(out, other):
            np.testing.assert_allclose(a.score, b.score, atol=2e-4)


def test_seeded_principal_depends_on_the_seed():
    batch = example_batch()
    draws = [np.concatenate([s.score.ravel() for s in make_principal(
        PrincipalSection(type="noisy_oracle", flip_rate=0.5), seed=seed).score(batch)]) for seed in range(4)]
    assert len({d.tobytes() for d in draws}) > 1


@dataclasses.dataclass(frozen=True)
class _Broken:
    """A principal with one contract violation, to show the conformance test catches it."""

    flaw: str
    name = "broken"
    needs_model = False
    answer_level = True
    seeded = False
    calls = [0]

    def score(self, batch: PrincipalBatch) -> list[PrincipalScores]:
        self.calls[0] += 1
        out = []
        for q, question in enumerate(batch.questions):
            score = principals.oracle_scores(question, batch.correct_by_id[q], batch.num_slots).score
            cost = Cost()
            if self.flaw == "float64":
                score = score.astype(np.float64)
            elif self.flaw == "shape":
                score = score[:, :-1]
            elif self.flaw == "nan":
                score[0, 0] = np.nan
            elif self.flaw == "padding":
                score[:, -1] = 1.0
            elif self.flaw == "window":  # depends on the question's position in the window
                score = score + np.float32(q) * (score != 0)
            elif self.flaw == "random":
                score = score + np.float32(self.calls[0]) * (score != 0)
            elif self.flaw == "slot_level":  # claims answer_level but scores agents differently
                score = score * np.arange(1, question.num_agents + 1, dtype=np.float32)[:, None]
            elif self.flaw == "cost":
                cost = Cost(calls=1)
            elif self.flaw == "negative_cost":
                cost = Cost(calls=-1)
            elif self.flaw == "mutates":
                batch.correct_by_id[q][0] = not batch.correct_by_id[q].get(0, False)
            out.append(PrincipalScores(score, cost))
        return out[:-1] if self.flaw == "short" else out


@pytest.mark.parametrize(("flaw", "pattern"), [
    ("float64", "float32"), ("shape", r"shape \(3, 3\), expected \[N, K\] = \(3, 4\)"), ("nan", "non-finite"),
    ("padding", "beyond its"), ("window", "scored alone"), ("random", "twice"), ("slot_level", "answer-level"),
    ("cost", "zero cost"), ("negative_cost", "non-negative integer"), ("mutates", "modified the batch"),
    ("short", "a list of 3"),
])
def test_the_conformance_test_catches_each_broken_rule(flaw, pattern):
    with pytest.raises(PrincipalContractError, match=pattern):
        principal_api_test(_Broken(flaw))


def test_conformance_caught_the_old_noisy_oracle_flipping_padding():
    """Before the plug-in interface the noisy oracle flipped padding entries too (harmless for
    the game, which masks them, but [N, K] scores must be 0 beyond each agent's slots)."""
    batch = example_batch()
    for q, question in enumerate(batch.questions):
        flipped = principals.noisy_oracle_scores(question, batch.correct_by_id[q], 4, flip_rate=1.0, seed=0,
                                                 question_id="q").score
        exact = principals.oracle_scores(question, batch.correct_by_id[q], 4).score
        for i, agent in enumerate(question.agents):
            slots = len(agent.slots)
            np.testing.assert_array_equal(flipped[i, :slots], 1 - exact[i, :slots])
            assert (flipped[i, slots:] == 0).all()


# ---- oracle and noisy oracle ----------------------------------------------------------------------


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
    valid = np.array([[1, 1, 0, 0], [1, 1, 0, 0]], bool)  # two slots each ("no idea" has no answer)
    np.testing.assert_array_equal(flipped.score, np.where(valid, 1 - exact, 0))
    a = principals.noisy_oracle_scores(question, correct, 4, flip_rate=0.3, seed=5, question_id="q9")
    b = principals.noisy_oracle_scores(question, correct, 4, flip_rate=0.3, seed=5, question_id="q9")
    np.testing.assert_array_equal(a.score, b.score)  # a function of (seed, question id)
    flips = np.mean([
        (principals.noisy_oracle_scores(question, correct, 4, flip_rate=0.3, seed=5, question_id=f"q{i}").score
         != exact)[valid]
        for i in range(400)
    ])
    assert abs(flips - 0.3) < 0.035  # 1600 Bernoulli(0.3) draws: sd 0.011
    with pytest.raises(ValueError, match="flip_rate"):
        principals.noisy_oracle_scores(question, correct, 4, flip_rate=1.5, seed=0, question_id="q")


def test_noisy_oracle_flips_are_the_documented_function_of_seed_and_question(question):
    """The flips every earlier run and replay used: uniforms from sha256("<seed>/<question id>")."""
    correct = slot_correctness(question, "7")
    exact = principals.oracle_scores(question, correct, 4).score
    digest = hashlib.sha256(b"11/gsm8k/test/5").digest()
    uniforms = np.random.default_rng(int.from_bytes(digest[:8], "little")).random((2, 4))
    expected = np.where(uniforms < 0.35, 1 - exact, exact)
    got = make_principal(PrincipalSection(type="noisy_oracle", flip_rate=0.35), seed=11).score(
        PrincipalBatch(["q"], ["gsm8k/test/5"], [question], [correct], 4))[0].score
    valid = np.array([[1, 1, 0, 0], [1, 1, 0, 0]], bool)  # two slots each ("no idea" has no answer)
    np.testing.assert_array_equal(got[valid], expected[valid])


# ---- verifier and ranker (tiny random model) ------------------------------------------------------


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
    registered = make_principal(PrincipalSection(type="verifier"), pool=tiny_pool, default_model=tiny_checkpoint)
    via_registry = registered.score(PrincipalBatch(["What is 3+4?"], ["q"], [question], [{}], 4))[0]
    np.testing.assert_array_equal(via_registry.score, out.score)
    assert via_registry.cost == out.cost


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


# ---- arithmetic -----------------------------------------------------------------------------------


def _checked(text):
    return [(step.text, step.correct) for step in arithmetic_steps(text)]


def test_arithmetic_share_of_correct_steps():
    assert arithmetic_score("3 * 4 = 12 apples, and 12 - 2 = 10 left.") == 1.0
    assert arithmetic_score("3 * 4 = 12 apples, and 12 - 2 = 9 left.") == 0.5  # one of two wrong
    assert arithmetic_score("3 * 4 = 13 apples, and 12 - 2 = 9 left.") == 0.0
    assert arithmetic_score("2 + 2 = 4. 4 * 3 = 12. 12 / 5 = 2.5. #### 2.5") == pytest.approx(2 / 3)
    # no checkable step: the neutral prior, between all-wrong and all-right
    for text in ("The answer is 42.", "x + 5 = 10 so x = 5", "It costs $18 = 18 dollars.", ""):
        assert arithmetic_steps(text) == [] and arithmetic_score(text) == NO_STEP_SCORE == 0.5


@pytest.mark.parametrize(("text", "expected"), [
    # exact arithmetic with Fraction; chains; precedence; parentheses; powers; implicit products
    ("2 + 3 + 4 = 9", [("2 + 3 + 4 = 9", True)]),
    ("2 + 3 * 4 = 20", [("2 + 3 * 4 = 20", False)]),
    ("(2 + 3) * 4 = 20 = 5 * 4", [("( 2 + 3 ) * 4 = 20", True)]),  # "20 = 5 * 4" restates, computes nothing
    ("2(3 + 4) = 14 and 3^2 = 9", [("2 ( 3 + 4 ) = 14", True), ("3 ^ 2 = 9", True)]),
    ("0.1 + 0.2 = 0.3", [("0.1 + 0.2 = 0.3", True)]),  # exact, not binary floating point
    # number formats: thousands, decimals, currency, percent (both readings)
    ("$1,200 + $2,500.50 = $3,700.50", [("1,200 + 2,500.50 = 3,700.50", True)]),
    ("50% * 40 = 20 and 100% - 20% = 80% and 25% of 80 = 20", [("50% * 40 = 20", True),
                                                             ("100% - 20% = 80%", True), ("25% * 80 = 20", True)]),
    # operators written as symbols, words and LaTeX
    ("3 x 4 = 12, 3×4 = 12, 12 ÷ 4 = 3, 5 times 3 = 15", [("3 * 4 = 12", True), ("3 * 4 = 12", True),
                                                        ("12 / 4 = 3", True), ("5 * 3 = 15", True)]),
    ("\\[ 60 \\text{ meters/sprint} \\times 3 \\text{ sprints} = 180 \\text{ meters} \\]", [("60 * 3 = 180", True)]),
    ("\\( \\frac{3}{4} \\cdot 20 = 15 \\) and \\dfrac{\\frac{1}{2}}{2} = 0.25 and 10 \\div 4 = 2.5",
     [("( ( 3 ) / ( 4 ) ) * 20 = 15", True), ("( ( ( ( 1 ) / ( 2 ) ) ) / ( 2 ) ) = 0.25", True),
      ("10 / 4 = 2.5", True)]),
    ("**Step 1:** 3 + 4 = **7**", [("3 + 4 = 7", True)]),
    ("She makes 9 * 2 = $<<9*2=18>>18 a day.", [("9 * 2 = 18", True)]),  # GSM8K annotation not counted twice
    # units between numbers and operators are skipped; prose is not arithmetic
    ("2 hours * 60 minutes/hour = 120 minutes", [("2 * 60 = 120", True)]),
    ("3 hours = 3 * 60 minutes = 180 minutes", [("3 * 60 = 180", True)]),  # "3 = 3 * 60" restates a given
    ("8/11 x = 162", []),  # a single letter is a variable, not a unit
    ("- 3 * 4 = 12", [("3 * 4 = 12", True)]),  # a bullet, not a minus
    ("5 - 8 = -3", [("5 - 8 = - 3", True)]),
    ("60 * 3 = 180 + 60 = 240", [("60 * 3 = 180 + 60", True), ("180 + 60 = 240", True)]),  # running total
    ("50,000 * 20 = 10,00000", []),  # irregular digit groups are not read as numbers
    ("5 / 0 = 0", [("5 / 0 = 0", False)]),
])
def test_arithmetic_reader(text, expected):
    assert _checked(text) == expected


@pytest.mark.parametrize(("text", "correct"), [
    # rounded to nearest or truncated at the shown decimals
    ("10 / 3 = 3.33", True), ("10 / 3 = 3.3", True), ("2 / 3 = 0.67", True), ("2 / 3 = 0.66", True),
    ("100 / 3 = 33", True), ("7 / 2 = 4", True), ("7 / 2 = 3", True), ("0 - 7 / 2 = -4", True),
    ("10 / 3 = 4", False), ("2 / 3 = 0.68", False), ("10 / 3 = 3.34", False), ("10 / 3 = 3.32", False),
    ("7 / 2 = 3.4", False), ("5 * 3 = 16", False), ("1.5 * 3 = 4.4", False),  # the exact value fits: no tolerance
    ("1 / 8 = 12.5%", True), ("1 / 3 = 33.3%", True), ("1 / 3 = 34%", False),
])
def test_arithmetic_rounding_tolerance(text, correct):
    [step] = arithmetic_steps(text)
    assert step.correct is correct, step


_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


@settings(max_examples=200, deadline=None)
@given(a=st.integers(0, 10**7), b=st.integers(1, 10**4), op=st.sampled_from(sorted(_OPS)),
       delta=st.sampled_from([0, 1, -1, 10]), commas=st.booleans())
def test_arithmetic_property_exact_results(a, b, op, delta, commas):
    """An exactly written result is right, any other one wrong (results with up to 4 decimals)."""
    value = _OPS[op](Fraction(a), Fraction(b))
    if (value * 10**4).denominator != 1:
        return
    claimed = value + delta
    text_a = f"{a:,}" if commas else str(a)
    shown = format(claimed.numerator / claimed.denominator, ",.4f" if commas else ".4f").rstrip("0").rstrip(".")
    [step] = arithmetic_steps(f"So {text_a} {op} {b} = {shown} in total.")
    assert step.computed == value and step.correct is (delta == 0), (step, shown)


def test_arithmetic_principal_scores_each_slot_by_its_representative():
    qc = build_question_candidates([
        ["3 * 4 = 12 so \\boxed{12}", "3 * 4 = 13 so \\boxed{13}", "3 * 4 = 12, oh 12 - 1 = 13 so \\boxed{13}"],
        ["I guess \\boxed{12}"],
    ])
    [out] = ArithmeticPrincipal().score(PrincipalBatch(["q"], ["q"], [qc], [{}], 3))
    # agent 0: slots "12" (sample 0: 1 of 1 right) and "13" (sample 1 is its representative: 0 of 1)
    np.testing.assert_array_equal(out.score, np.array([[1.0, 0.0, 0.0], [NO_STEP_SCORE, 0.0, 0.0]], np.float32))
    assert out.cost == Cost()
