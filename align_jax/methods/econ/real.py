"""ECON with real LLMs through our sampler: coordinator strategy, executors with per-row
temperature / top-p chosen by the belief networks, an LLM commitment, the stop rule.

One call of :func:`run_econ_questions` processes Q questions together (B = Q x N executor
rows per round in ONE ``generate_chat`` call, each row with its own temperature and top-p)::

    round 0:  coordinator (Q prompts)  -> strategy s_q (<= strategy_tokens, no answer) + format
    round t:  executor i of question q sees (question, s_q, format, commitment c_q^{t-1}) only,
              never the other executors' outputs; its action (tau_i, p_i) = grid[argmax_a Q_i(o_i, a)]
              (belief networks, greedy) or a fixed / random baseline policy
              coordinator (Q prompts) sees the N answers -> commitment c_q^t (an LLM call;
              majority vote of the executors when its output has no extractable answer)
    stop:     c_q^t = c_q^{t-1} (t >= 1), or Var_i(tau_i) + Var_i(p_i) < variance_threshold,
              or t = max_rounds - 1

Hierarchical variant (``num_groups`` G > 1, the paper's scaling): G coordinators per question
each write a strategy for their group of M = N / G executors and commit over that group's
answers; a central LLM call sees the G group commitments and makes the commitment c_q^t
(majority of the group commitments when its reply has no answer).  Calls per question:
G strategies, then per round N executors + G group commitments + 1 central.

The executors' observation is the simulator's layout (:func:`~align_jax.methods.econ.sim.observation_dim`):
the difficulty and strategy views are unobserved (0) for real questions; the previous
action, agreement with the previous commitment, the commitment features
``[vote share, changed, unanimity]`` and the one-hot round come from the run itself.  So a
policy trained in simulation applies unchanged (sim-to-real transfer; its difficulty
input is 0, i.e. an average question).

Rewards of a round (returned for training and diagnostics): R_TS = [a_i = gold]; R_AL by
``settings.action_likelihood``: ``"answer"``, [a_i = commitment] (exact answer equivalence, the
simulator's R_AL), or ``"embedding"``, the paper's cosine ``<e(y_i), e(c)>`` of the executor's
output y_i and the coordinator's commitment response c, with e the unit mean of the model's own
final hidden states (:func:`~align_jax.llm.scoring.text_embeddings`: the executors' model is
already loaded, so no second model and no download; a sentence-embedding model such as MiniLM
would need torch at run time); R_CC = (agreement + novelty) / 2 as in the simulator, with the
exact agreement [a_i = commitment].  Embeddings cost N + 1 forward passes per question per round
(billed as calls and prompt tokens).

Rows are plain dicts with the answer, correctness, rounds, the chosen parameters and the
cost (model calls, generated and prompt tokens), the fields of a reason row's method record.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.data.answers import canonicalize, is_correct
from align_jax.data import extract_answer
from align_jax.methods.econ.networks import EconNetworks, EconParams
from align_jax.methods.econ.sim import COMMITMENT_DIM, normalise_action, observation_dim
from align_jax.methods.econ.config import SimConfig

__all__ = ["RealEconSettings", "ACTION_LIKELIHOODS", "STRATEGY_PROMPT", "COMMIT_PROMPT", "belief_policy", "greedy_program", "fixed_policy",
           "run_econ_questions", "real_observation_dim"]

STRATEGY_PROMPT = ("You coordinate a team solving a math problem. In at most two sentences, give a strategy "
                   "for solving it. Do NOT compute or state the answer. Then say: 'Answer format: \\boxed{}'.\n\n"
                   "Problem: {question}")
EXECUTOR_PROMPT = ("{question}\n\nCoordinator's strategy: {strategy}\n{commitment}"
                   "Please reason step by step, and put your final answer within \\boxed{{}}.")
CENTRAL_PROMPT = ("Problem: {question}\n\nThe group coordinators committed to these answers:\n{answers}\n\n"
                  "Which answer is correct? Reply with the final answer within \\boxed{{}}.")
#: Round t's central commitment key is ``fold_in(key, CENTRAL_KEY + t)`` (hierarchical variant only).
CENTRAL_KEY = 1000
COMMIT_PROMPT = ("Problem: {question}\n\nThe executors proposed these answers:\n{answers}\n\n"
                 "Which answer is correct? Reply with the final answer within \\boxed{{}}.")


@dataclasses.dataclass(frozen=True)
class RealEconSettings:
    """Static settings of the real pipeline.

    Attributes:
      model: the model name / path for the coordinator and the executors.
      num_executors: N.
      max_rounds: T (paper: 5).
      variance_threshold: stop when ``Var(tau) + Var(p)`` across executors is below it (0.01).
      strategy_tokens: the coordinator's strategy budget (paper: 50).
      executor_tokens, commit_tokens: generation budgets.
      coordinator_temperature: the coordinator's sampling temperature (top-p 0.95).
      num_groups: G coordinators, each with its own strategy and commitment over a group of
        M = N / G executors; for G > 1 a central LLM call combines the G group commitments
        (the paper's hierarchical variant).
      action_likelihood: R_AL, ``"answer"`` (exact answer agreement) or ``"embedding"`` (cosine
        of the model's mean-pooled hidden states; see the module docstring).
    """

    model: str
    num_executors: int = 3
    max_rounds: int = 5
    variance_threshold: float = 0.01
    strategy_tokens: int = 50
    executor_tokens: int = 256
    commit_tokens: int = 64
    coordinator_temperature: float = 0.7
    action_likelihood: str = "answer"
    num_groups: int = 1

    def __post_init__(self):
        if self.num_groups < 1 or self.num_executors % self.num_groups:
            raise ValueError(f"num_groups={self.num_groups} must be >= 1 and divide num_executors={self.num_executors}")
        if self.action_likelihood not in ACTION_LIKELIHOODS:
            raise ValueError(f"action_likelihood must be one of {', '.join(ACTION_LIKELIHOODS)}, "
                             f"got {self.action_likelihood!r}")


#: The two forms of R_AL (see the module docstring).
ACTION_LIKELIHOODS = ("answer", "embedding")


@functools.lru_cache(maxsize=8)
def greedy_program(nets: EconNetworks) -> Callable:
    """``(params, obs [B, N, F]) -> [B, N]`` greedy grid actions, jitted once per networks (so every
    policy and window of a run shares one compiled program per batch shape)."""
    from align_jax.methods.econ.train import greedy_actions

    return jax.jit(lambda p, o: greedy_actions(nets, p, o))


def belief_policy(nets: EconNetworks, params: EconParams) -> Callable:
    """``obs [B, N, F] -> (temperature [B, N], top_p [B, N])``, greedy w.r.t. the belief networks'
    local Q (one jitted forward per round)."""
    grid = np.asarray(nets.grid, np.float32)
    greedy = greedy_program(nets)

    def act(obs):
        index = np.asarray(greedy(params, jnp.asarray(obs, jnp.float32)))
        return grid[index, 0], grid[index, 1]

    return act


def fixed_policy(temperature: float, top_p: float) -> Callable:
    """Every executor at one (temperature, top-p)."""
    return lambda obs: (np.full(obs.shape[:2], temperature), np.full(obs.shape[:2], top_p))


def _observations(n: int, max_rounds: int, round_: int, prev_action, prev_agree, prev_features) -> np.ndarray:
    """[Q, N, F] in the simulator's layout (difficulty and strategy views unobserved = 0)."""
    q = prev_agree.shape[0]
    feats = np.concatenate([
        np.zeros((q, n, 2)), prev_action, prev_agree[..., None],
        np.broadcast_to(prev_features[:, None, :], (q, n, COMMITMENT_DIM)),
        np.broadcast_to(np.eye(max_rounds)[round_], (q, n, max_rounds)), np.ones((q, n, 1))], axis=-1)
    return feats.astype(np.float32)


def _committed(answers: Sequence[Optional[str]], reply: str) -> Optional[str]:
    """A coordinator's commitment over ``answers``: the answer its ``reply`` states (an
    executor's spelling when equivalent to one), else the majority answer, else None."""
    k = len(answers)
    ids = canonicalize(list(answers) + [extract_answer(reply)])
    votes = [i for i in ids[:k] if i >= 0]
    commit_id = ids[k] if ids[k] >= 0 else (max(set(votes), key=votes.count) if votes else -1)
    if commit_id < 0:
        return None
    return answers[list(ids[:k]).index(commit_id)] if commit_id in ids[:k] else extract_answer(reply)


def run_econ_questions(pool, settings: RealEconSettings, questions: Sequence[str], golds: Sequence[str],
                       policy: Callable, key: jax.Array) -> list[dict]:
    """Runs ECON on Q questions (see the module docstring); one row per question.

    Args:
      pool: a :class:`~align_jax.methods.candidates.ModelPool`.
      policy: ``obs [Q, N, F] -> (temperature [Q, N], top_p [Q, N])`` (:func:`belief_policy`,
        :func:`fixed_policy`).
      key: consumed; round t's executors use ``fold_in(key, 2 t + 1)``, its commitment
        ``fold_in(key, 2 t + 2)``, the strategy ``fold_in(key, 0)``.
    Returns:
      Q dicts: ``answer, correct, rounds, strategy, commitments, temperatures, top_ps,
      reward_components [rounds, N, 3] (R_TS, R_AL, R_CC), observations [rounds, N, F] (what the
      policy acted on), commit_features [rounds, C] (after each round),
      cost {calls, gen_tokens, prompt_tokens}``.
    """
    q_num, n, t_max = len(questions), settings.num_executors, settings.max_rounds
    model = settings.model
    cost = np.zeros((q_num, 3), np.int64)  # calls, gen tokens, prompt tokens

    def generate(conversations, k, max_new_tokens, temperature, top_p, owners):
        out = pool.generate_chat(model, conversations, key=k, num_samples=1, max_new_tokens=max_new_tokens,
                                 temperature=np.asarray(temperature, np.float32), top_p=np.asarray(top_p, np.float32))
        for row, owner in enumerate(owners):
            if owner >= 0:
                cost[owner] += (1, int(out.tokens[row].sum()), int(out.prompt_tokens[row]))
        return [texts[0] for texts in out.texts]

    g_num, m = settings.num_groups, n // settings.num_groups
    # G strategies per question (q-major): coordinator g's strategy guides executors g M .. (g + 1) M - 1
    strategies = generate([[{"role": "user", "content": STRATEGY_PROMPT.replace("{question}", q)}]
                           for q in questions for _ in range(g_num)],
                          jax.random.fold_in(key, 0), settings.strategy_tokens,
                          np.full(q_num * g_num, settings.coordinator_temperature), np.full(q_num * g_num, 0.95),
                          [q for q in range(q_num) for _ in range(g_num)])
    active = np.ones(q_num, bool)
    commitments: list[list[Optional[str]]] = [[] for _ in range(q_num)]
    temps: list[list[list[float]]] = [[] for _ in range(q_num)]
    tops: list[list[list[float]]] = [[] for _ in range(q_num)]
    rewards: list[list] = [[] for _ in range(q_num)]
    observations: list[list] = [[] for _ in range(q_num)]
    features: list[list] = [[] for _ in range(q_num)]
    rounds = np.zeros(q_num, int)
    prev_action = np.zeros((q_num, n, 2))
    prev_agree = np.zeros((q_num, n))
    prev_features = np.zeros((q_num, COMMITMENT_DIM))
    for t in range(t_max):
        obs = _observations(n, t_max, t, prev_action, prev_agree, prev_features)
        temperature, top_p = (np.clip(x, lo, hi) for x, (lo, hi) in zip(policy(obs), ((0.1, 2.0), (0.1, 0.95))))
        for q in np.flatnonzero(active):
            observations[q].append(obs[q].tolist())
        conversations, owners = [], []
        for q in range(q_num):  # every row every round (static batch shape); finished questions are not billed
            previous = commitments[q][-1] if commitments[q] else None
            note = f"Coordinator's previous commitment: {previous}\n" if previous is not None else ""
            for i in range(n):
                text = EXECUTOR_PROMPT.format(question=questions[q], strategy=strategies[q * g_num + i // m].strip(),
                                              commitment=note)
                conversations.append([{"role": "user", "content": text}])
            owners += [q if active[q] else -1] * n
        texts = generate(conversations, jax.random.fold_in(key, 2 * t + 1), settings.executor_tokens,
                         temperature.reshape(-1), top_p.reshape(-1), owners)
        answers = [[extract_answer(texts[q * n + i]) for i in range(n)] for q in range(q_num)]
        listing = ["\n".join(f"Executor {i + 1}: {answers[q][i] if answers[q][i] is not None else '(no answer)'}"
                             for i in range(g * m, (g + 1) * m)) for q in range(q_num) for g in range(g_num)]
        replies = generate([[{"role": "user", "content": COMMIT_PROMPT.format(question=questions[j // g_num],
                                                                              answers=listing[j])}]
                            for j in range(q_num * g_num)], jax.random.fold_in(key, 2 * t + 2), settings.commit_tokens,
                           np.full(q_num * g_num, settings.coordinator_temperature), np.full(q_num * g_num, 0.95),
                           [q if active[q] else -1 for q in range(q_num) for _ in range(g_num)])
        group_commit = [[_committed(answers[q][g * m:(g + 1) * m], replies[q * g_num + g]) for g in range(g_num)]
                        for q in range(q_num)]
        if g_num == 1:
            final_replies = replies
            final = [group_commit[q][0] for q in range(q_num)]
        else:  # the central LLM combines the G group commitments
            central = ["\n".join(f"Group {g + 1}: {c if c is not None else '(no answer)'}"
                                 for g, c in enumerate(group_commit[q])) for q in range(q_num)]
            final_replies = generate([[{"role": "user", "content": CENTRAL_PROMPT.format(question=questions[q],
                                                                                         answers=central[q])}]
                                      for q in range(q_num)], jax.random.fold_in(key, CENTRAL_KEY + t),
                                     settings.commit_tokens, np.full(q_num, settings.coordinator_temperature),
                                     np.full(q_num, 0.95), [q if active[q] else -1 for q in range(q_num)])
            final = [_committed(group_commit[q], final_replies[q]) for q in range(q_num)]
        for q in range(q_num):
            if not active[q]:
                continue
            row = answers[q]
            commitment = final[q]
            ids = canonicalize(list(row) + [commitment])
            commit_id = ids[n] if commitment is not None else -1
            agree = np.array([float(commit_id >= 0 and i == commit_id) for i in ids[:n]])
            others = np.array([sum(ids[j] == ids[i] for j in range(n) if j != i) for i in range(n)], float)
            novelty = 1.0 - others / max(n - 1, 1)
            correct = np.array([float(a is not None and is_correct(a, golds[q])) for a in row])
            likelihood = agree
            if settings.action_likelihood == "embedding":
                emb, spent = pool.embed(model, texts[q * n:(q + 1) * n] + [final_replies[q]])
                cost[q] += (spent.calls, 0, spent.prompt_tokens)
                likelihood = np.clip(emb[:n] @ emb[n], -1.0, 1.0)
            rewards[q].append(np.stack([correct, likelihood, 0.5 * (agree + novelty)], 1).tolist())
            changed = float(t > 0 and commitment != commitments[q][-1])
            share = float(agree.mean())
            prev_features[q] = [share, changed, float(share >= 1.0)]
            features[q].append(prev_features[q].tolist())
            stop = ((t > 0 and commitment == commitments[q][-1]) or t == t_max - 1
                    or np.var(temperature[q]) + np.var(top_p[q]) < settings.variance_threshold)
            commitments[q].append(commitment)
            temps[q].append(temperature[q].tolist())
            tops[q].append(top_p[q].tolist())
            prev_agree[q] = agree
            rounds[q] = t + 1
            if stop:
                active[q] = False
        prev_action = np.asarray(normalise_action(jnp.asarray(temperature), jnp.asarray(top_p)))
        if not active.any():
            break
    rows = []
    for q in range(q_num):
        answer = commitments[q][-1]
        rows.append(dict(answer=answer, correct=float(answer is not None and is_correct(answer, golds[q])),
                         rounds=int(rounds[q]), strategy=strategies[q], commitments=commitments[q],
                         temperatures=temps[q], top_ps=tops[q], reward_components=rewards[q],
                         observations=observations[q], commit_features=features[q],
                         cost=dict(calls=int(cost[q, 0]), gen_tokens=int(cost[q, 1]),
                                   prompt_tokens=int(cost[q, 2]))))
    return rows


def real_observation_dim(settings: RealEconSettings) -> int:
    """F of the real pipeline's observations (the simulator's, for ``max_rounds``)."""
    return observation_dim(SimConfig(num_executors=settings.num_executors, max_rounds=settings.max_rounds))
