"""Slow, independent references for the ALIGN delegation game engine.

Two implementations of :func:`align_jax.game.delegation.play` that share no
game logic with the engine (and little with each other), used to test it and
to benchmark it:

* :func:`play_python`: an obviously-correct plain Python loop over games,
  rounds, agents and slots that follows the definitions literally (Python
  floats, i.e. float64; e.g. the number of others ranked above a slot is
  counted by looping over the opponents' slots, weighting each by its
  probability in expected mode).
* :func:`play_numpy`: what a careful researcher writes in NumPy: broadcasting
  over ``[Q, N, K, N, K]`` (the outrank tensor is built once per batch) and a
  Python loop over rounds only.

Both return a :class:`~align_jax.game.types.GameResult` whose leaves are NumPy
arrays (same fields, shapes and meaning as the engine's; ``trajectory`` is
filled when ``config.record_trajectory``).  They implement the Hedge learner
only, and only games in which every agent has a valid slot (the engine's
abstaining agents are tested against the game without them instead).

This is a test oracle: it lives under ``tests/`` (imported as
``tests.game.reference`` by the tests and by ``experiments/bench_game.py``),
not in the package.

The game (see :mod:`align_jax.game.delegation`), per game with N agents and K
slots, rounds ``t = 1..T``:

    pi_t^i(k)  ∝ valid_i(k) exp(eta_t^i S_{t-1}^i(k)),   S_t^i = sum_{s<=t} r_s^i
    f(k; a^{-i}) = 1 - 2 (#{j != i: s_j(a_j) > s_i(k)} + 0.5 #{j != i: s_j(a_j) = s_i(k)}) / (N - 1)
                   (f = 1 when N = 1)
    r_t^i(k)   = u_i(k) f(k; a_t^{-i})                     (0 on invalid slots)
    eta_t^i    = eta  (constant)  or  c sqrt(log K_i / t)  (anytime)

In expected mode ``f`` is averaged over the others' current mixed strategies.

Sampled-mode randomness.  The engine draws agent ``i``'s round-``t``
submission of game ``q`` as ``jax.random.categorical(k_i, log pi_t^i)`` with
``k_{q} = split(key, Q)[q]`` and ``(k_1..k_N) = split(fold_in(k_q, t), N)``;
categorical is the Gumbel-max trick ``argmax_k(g(k) + log pi(k))``.  The
draw depends on the policy, so it cannot be precomputed; instead
:func:`engine_gumbel_noise` reproduces the engine's Gumbel noise
``g[q, t, i, k]`` with ``jax.random.gumbel`` (the only JAX call the references
make) and the references take the argmax themselves.  With the same key, the
references therefore play the engine's exact draws (up to float32 vs float64
near-ties of ``g + log pi``, which have probability ~1e-7 per draw).  Callers
may instead pass explicit ``draws`` int ``[Q, T, N]`` (the submitted slots of
every round, e.g. to compare the two references with each other).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import numpy as np

from align_jax.game.types import (
    Baselines,
    CandidateSet,
    GameConfig,
    GameInputError,
    GameParams,
    GameResult,
    Outcome,
    Trajectory,
    validate_candidates,
)

__all__ = ["engine_gumbel_noise", "play_python", "play_numpy"]

# The engine takes log(max(pi, 1e-38)) before drawing; the references do too.
_LOG_FLOOR = 1e-38


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _gumbel_noise(key, num_games, num_rounds, num_agents, num_candidates):
    def per_game(game_key):
        def per_round(t):
            agent_keys = jax.random.split(jax.random.fold_in(game_key, t), num_agents)
            return jax.vmap(lambda k: jax.random.gumbel(k, (num_candidates,), np.float32))(agent_keys)

        return jax.vmap(per_round)(np.arange(1, num_rounds + 1, dtype=np.int32))

    return jax.vmap(per_game)(jax.random.split(key, num_games))


def engine_gumbel_noise(
    key: jax.Array, num_games: int, num_rounds: int, num_agents: int, num_candidates: int
) -> np.ndarray:
    """The Gumbel noise behind the engine's sampled-mode draws.

    Args:
      key: the key given to :func:`align_jax.game.delegation.play`.
      num_games, num_rounds, num_agents, num_candidates: Q, T, N, K.

    Returns:
      float32 ``[Q, T, N, K]``: ``g[q, t-1, i]`` is the noise with which the
      engine draws agent ``i``'s submission in round ``t`` of game ``q``
      (``argmax_k(g(k) + log max(pi(k), 1e-38))`` over valid slots).
    """
    return np.asarray(_gumbel_noise(key, int(num_games), int(num_rounds), int(num_agents), int(num_candidates)))


# ----------------------------------------------------------------------------
# Input handling shared by both references (boundary checks, no game logic).
# ----------------------------------------------------------------------------


def _prepare(config, candidates, params, draws, key, validate=True):
    """Validates and batches the inputs; returns numpy leaves ``[Q, N, K]``."""
    if not isinstance(config, GameConfig):
        raise GameInputError(f"config must be a GameConfig, got {type(config).__name__}")
    if not isinstance(candidates, CandidateSet):
        raise GameInputError(f"expected a CandidateSet, got {type(candidates).__name__}")
    if config.learner != "hedge":
        raise GameInputError(f"the references implement the Hedge learner only, got {config.learner!r}", "learner")
    candidates = CandidateSet(*(np.asarray(x) for x in candidates))
    if validate:
        validate_candidates(candidates)
        empty = ~candidates.valid.any(axis=-1)
        if empty.any():
            raise GameInputError(
                f"the references need a valid slot for every agent; none at (question, agent) "
                f"{tuple(int(i) for i in np.argwhere(empty)[0])}"
            )
    single = candidates.valid.ndim == 2
    if single:
        candidates = CandidateSet(*(x[None] for x in candidates))
    if candidates.valid.ndim != 3:
        raise GameInputError(
            f"candidates must be [Q, N, K] or [N, K], got valid.shape={candidates.valid.shape}"
        )
    q, n, k = candidates.valid.shape
    if params is None:
        params = GameParams.create(0.1)
    step = params.step_size if isinstance(params, GameParams) else params
    step = np.asarray(GameParams.create(np.asarray(step, np.float32)).step_size, np.float32)
    if step.ndim == 0:
        step = np.broadcast_to(step, (q,))
    elif step.shape != (q,):
        raise GameInputError(f"GameParams.step_size must be a scalar or [Q={q}], got shape {step.shape}")
    noise = None
    if config.mode == "sampled":
        if draws is not None:
            draws = np.asarray(draws)
            if single and draws.ndim == 2:
                draws = draws[None]
            if draws.shape != (q, config.num_rounds, n):
                raise GameInputError(
                    f"draws must be int [Q={q}, T={config.num_rounds}, N={n}], got shape {draws.shape}"
                )
            picked_valid = np.take_along_axis(
                np.broadcast_to(candidates.valid[:, None], (q, config.num_rounds, n, k)),
                np.clip(draws, 0, k - 1)[..., None],
                axis=-1,
            )[..., 0]
            bad = (draws < 0) | (draws >= k) | ~picked_valid
            if bad.any():
                idx = tuple(int(i) for i in np.argwhere(bad)[0])
                raise GameInputError(
                    f"draws[{idx[0]}, {idx[1]}, {idx[2]}] = {draws[idx]} is not a valid slot of that agent"
                )
            draws = draws.astype(np.int64)
        elif key is not None:
            noise = engine_gumbel_noise(key, q, config.num_rounds, n, k).astype(np.float64)
        else:
            raise GameInputError("sampled mode needs `draws` [Q, T, N] or the engine's `key`")
    return candidates, step, draws, noise, single


def _unbatch(result: GameResult) -> GameResult:
    return jax.tree.map(lambda x: x[0], result)


# ----------------------------------------------------------------------------
# (a) The plain Python loop.
# ----------------------------------------------------------------------------


def _py_step_size(schedule: str, base: float, t: float, num_valid: int) -> float:
    if schedule == "constant":
        return base
    return base * math.sqrt(math.log(max(num_valid, 1)) / t)


def _py_hedge(cum_reward: list, valid: list, eta: float) -> list:
    """pi(k) = exp(eta S(k) - m) / sum_l exp(eta S(l) - m) over valid slots."""
    top = max(eta * cum_reward[k] for k in range(len(valid)) if valid[k])
    weights = [math.exp(eta * cum_reward[k] - top) if valid[k] else 0.0 for k in range(len(valid))]
    total = sum(weights)
    return [w / total for w in weights]


def _py_expected_feedback(score, valid, n, i, k, profile) -> float:
    """1 - 2 E[#others above + 0.5 #others tied] / (N - 1), others playing ``profile``."""
    if n == 1:
        return 1.0
    above = 0.0
    for j in range(n):
        if j == i:
            continue
        for l in range(len(valid[j])):
            if not valid[j][l]:
                continue
            if score[j][l] > score[i][k]:
                above += profile[j][l]
            elif score[j][l] == score[i][k]:
                above += 0.5 * profile[j][l]
    return 1.0 - 2.0 * above / (n - 1)


def _py_sampled_feedback(score, n, i, k, submission) -> float:
    """1 - 2 (#others above + 0.5 #others tied) / (N - 1) against pure submissions."""
    if n == 1:
        return 1.0
    above = 0.0
    for j in range(n):
        if j == i:
            continue
        if score[j][submission[j]] > score[i][k]:
            above += 1.0
        elif score[j][submission[j]] == score[i][k]:
            above += 0.5
    return 1.0 - 2.0 * above / (n - 1)


def _py_slot_payoff(g, profile) -> list:
    n = len(g["valid"])
    return [
        [
            g["u"][i][k] * _py_expected_feedback(g["s"], g["valid"], n, i, k, profile) if g["valid"][i][k] else 0.0
            for k in range(len(g["valid"][i]))
        ]
        for i in range(n)
    ]


def _py_deviation_gain(g, profile) -> list:
    payoff = _py_slot_payoff(g, profile)
    gains = []
    for i in range(len(g["valid"])):
        best = max(payoff[i][k] for k in range(len(payoff[i])) if g["valid"][i][k])
        current = sum(profile[i][k] * payoff[i][k] for k in range(len(payoff[i])))
        gains.append(max(best - current, 0.0))
    return gains


def _py_pareto(g) -> list:
    u, s, valid = g["u"], g["s"], g["valid"]
    mask = []
    for i in range(len(valid)):
        row = []
        for k in range(len(valid[i])):
            dominated = False
            for l in range(len(valid[i])):
                if (
                    valid[i][l]
                    and u[i][l] >= u[i][k]
                    and s[i][l] >= s[i][k]
                    and (u[i][l] > u[i][k] or s[i][l] > s[i][k])
                ):
                    dominated = True
            row.append(valid[i][k] and not dominated)
        mask.append(row)
    return mask


def _py_argmax(values: list) -> int:
    """Index of the largest value, the lowest index on ties."""
    best = 0
    for k in range(1, len(values)):
        if values[k] > values[best]:
            best = k
    return best


def _py_draw(policy_row, valid_row, noise_row) -> int:
    """Gumbel-max draw ``argmax_k g(k) + log max(pi(k), 1e-38)`` over valid slots."""
    keys = [
        noise_row[k] + math.log(max(policy_row[k], _LOG_FLOOR)) if valid_row[k] else -math.inf
        for k in range(len(valid_row))
    ]
    return _py_argmax(keys)


def _py_regret_bound(schedule, base, rounds, num_valid, sum_eta_w2) -> float:
    """log K / eta_{T+1} + sum_t eta_t W_t^2 / 8, zero when K = 1."""
    if num_valid <= 1:
        return 0.0
    return math.log(num_valid) / _py_step_size(schedule, base, rounds + 1.0, num_valid) + sum_eta_w2 / 8.0


def _py_baselines(g) -> Baselines:
    n, valid, u, s, v, c, ids = (len(g["valid"]), g["valid"], g["u"], g["s"], g["v"], g["correct"], g["ids"])
    slots = [(i, k) for i in range(n) for k in range(len(valid[i])) if valid[i][k]]

    def outcome_uniform_over(chosen):
        return Outcome(
            principal_value=sum(v[i][k] for i, k in chosen) / len(chosen),
            correct=sum(float(c[i][k]) for i, k in chosen) / len(chosen),
        )

    # Fair single agent: pooled utility of each answer, uniform over the best
    # answers, then uniform over the (valid) slots that carry the answer.
    answers = sorted({ids[i][k] for i, k in slots})
    pooled = {}
    for a in answers:
        total = 0.0
        for j in range(n):
            best_j = 0.0
            for l in range(len(valid[j])):
                if valid[j][l] and ids[j][l] == a:
                    best_j = max(best_j, u[j][l])
            total += best_j
        pooled[a] = total / n
    top = max(pooled.values())
    best_answers = [a for a in answers if pooled[a] == top]
    fair_value = fair_correct = 0.0
    for a in best_answers:
        carriers = [(i, k) for i, k in slots if ids[i][k] == a]
        one = outcome_uniform_over(carriers)
        fair_value += one.principal_value / len(best_answers)
        fair_correct += one.correct / len(best_answers)
    fair = Outcome(fair_value, fair_correct)

    best_value = max(v[i][k] for i, k in slots)
    oracle = outcome_uniform_over([(i, k) for i, k in slots if v[i][k] == best_value])
    random = outcome_uniform_over(slots)

    # Uniform submissions, principal takes the top score, lower agent index on ties:
    # P(pick (i, k)) = (1/K_i) prod_{j<i} P(s_j < s_i(k)) prod_{j>i} P(s_j <= s_i(k)).
    up_value = up_correct = 0.0
    for i, k in slots:
        prob = 1.0 / sum(valid[i])
        for j in range(n):
            if j == i:
                continue
            beaten = 0
            for l in range(len(valid[j])):
                if valid[j][l] and (s[j][l] < s[i][k] if j < i else s[j][l] <= s[i][k]):
                    beaten += 1
            prob *= beaten / sum(valid[j])
        up_value += prob * v[i][k]
        up_correct += prob * float(c[i][k])
    return Baselines(fair, oracle, random, Outcome(up_value, up_correct))


def _py_play_one(config: GameConfig, g: dict, base: float, draws, noise) -> dict:
    valid, u, s = g["valid"], g["u"], g["s"]
    n, k_slots = len(valid), len(valid[0])
    num_valid = [sum(1 for k in range(k_slots) if valid[i][k]) for i in range(n)]
    pareto = _py_pareto(g)
    sched = config.schedule

    cum_reward = [[0.0] * k_slots for _ in range(n)]
    cum_played = [0.0] * n
    sum_policy = [[0.0] * k_slots for _ in range(n)]
    sum_eta_w2 = [0.0] * n
    pareto_mass = 0.0
    rounds = 0
    active = True
    records = []
    for t in range(1, config.num_rounds + 1):
        eta = [_py_step_size(sched, base, float(t), num_valid[i]) for i in range(n)]
        policy = [_py_hedge(cum_reward[i], valid[i], eta[i]) for i in range(n)]
        if config.mode == "sampled":
            if draws is not None:
                submission = [int(draws[t - 1][i]) for i in range(n)]
            else:
                submission = [_py_draw(policy[i], valid[i], noise[t - 1][i]) for i in range(n)]
        reward = [[0.0] * k_slots for _ in range(n)]
        for i in range(n):
            for k in range(k_slots):
                if not valid[i][k]:
                    continue
                if config.mode == "expected":
                    feedback = _py_expected_feedback(s, valid, n, i, k, policy)
                else:
                    feedback = _py_sampled_feedback(s, n, i, k, submission)
                reward[i][k] = u[i][k] * feedback
        was_active = active
        if active:
            for i in range(n):
                rewards_i = [reward[i][k] for k in range(k_slots) if valid[i][k]]
                width = max(rewards_i) - min(rewards_i)
                for k in range(k_slots):
                    cum_reward[i][k] += reward[i][k]
                    sum_policy[i][k] += policy[i][k]
                cum_played[i] += sum(policy[i][k] * reward[i][k] for k in range(k_slots))
                sum_eta_w2[i] += eta[i] * width**2
            pareto_mass += sum(
                sum(policy[i][k] for k in range(k_slots) if pareto[i][k]) for i in range(n)
            ) / n
            rounds += 1
        if config.early_stop_tol > 0:
            moved = 0.0
            for i in range(n):
                eta_next = _py_step_size(sched, base, float(t + 1), num_valid[i])
                following = _py_hedge(cum_reward[i], valid[i], eta_next)
                for k in range(k_slots):
                    moved = max(moved, abs(following[k] - policy[i][k]))
            active = active and moved >= config.early_stop_tol
        if config.record_trajectory:
            regret = [
                max(cum_reward[i][k] for k in range(k_slots) if valid[i][k]) - cum_played[i] for i in range(n)
            ]
            bound = [_py_regret_bound(sched, base, rounds, num_valid[i], sum_eta_w2[i]) for i in range(n)]
            average = [[sum_policy[i][k] / max(rounds, 1) for k in range(k_slots)] for i in range(n)]
            records.append(
                dict(
                    regret=regret,
                    regret_bound=bound,
                    nash_gap=max(_py_deviation_gain(g, average)),
                    policy=policy,
                    active=was_active,
                )
            )

    average = [[sum_policy[i][k] / max(rounds, 1) for k in range(k_slots)] for i in range(n)]
    submission = [
        _py_argmax([average[i][k] if valid[i][k] else -1.0 for k in range(k_slots)]) for i in range(n)
    ]
    chosen = _py_argmax([s[i][submission[i]] for i in range(n)])
    slot = submission[chosen]
    gains = _py_deviation_gain(g, average)
    out = dict(
        average_policy=average,
        final_policy=[
            _py_hedge(cum_reward[i], valid[i], _py_step_size(sched, base, rounds + 1.0, num_valid[i]))
            for i in range(n)
        ],
        submission=submission,
        chosen_agent=chosen,
        chosen_answer=g["ids"][chosen][slot],
        align=Outcome(g["v"][chosen][slot], float(g["correct"][chosen][slot])),
        baselines=_py_baselines(g),
        rounds_played=rounds,
        regret=[max(cum_reward[i][k] for k in range(k_slots) if valid[i][k]) - cum_played[i] for i in range(n)],
        regret_bound=[_py_regret_bound(sched, base, rounds, num_valid[i], sum_eta_w2[i]) for i in range(n)],
        deviation_gain=gains,
        nash_gap=max(gains),
        pareto_compliance=sum(1.0 for i in range(n) if pareto[i][submission[i]]) / n,
        pareto_mass=pareto_mass / max(rounds, 1),
        trajectory=records,
    )
    return out


def play_python(
    config: GameConfig,
    candidates: CandidateSet,
    params: Optional[GameParams] = None,
    draws=None,
    *,
    key: Optional[jax.Array] = None,
    validate: bool = True,
) -> GameResult:
    """The game as a plain Python loop (float64), one game at a time.

    Args:
      config: the :class:`GameConfig` (mode, schedule, T, early stop, trajectory).
      candidates: :class:`CandidateSet` with ``[Q, N, K]`` (or ``[N, K]``) leaves,
        NumPy or JAX arrays.
      params: :class:`GameParams` or a float / ``[Q]`` step size; default 0.1.
      draws: sampled mode only: int ``[Q, T, N]`` submitted slots per round.
      key: sampled mode only, instead of ``draws``: the engine's key; the
        draws then follow the engine's (see the module docstring).
      validate: check the candidates on the host first (as the engine does).

    Returns:
      :class:`GameResult` with NumPy leaves, batched like ``candidates``.

    Raises:
      GameInputError: bad candidates, step size or draws.
    """
    candidates, step, draws, noise, single = _prepare(config, candidates, params, draws, key, validate)
    q = candidates.valid.shape[0]
    games = []
    for game in range(q):
        g = dict(
            valid=candidates.valid[game].astype(bool).tolist(),
            u=candidates.agent_utility[game].astype(np.float64).tolist(),
            s=candidates.principal_score[game].astype(np.float64).tolist(),
            v=candidates.principal_value[game].astype(np.float64).tolist(),
            correct=candidates.correct[game].astype(bool).tolist(),
            ids=candidates.answer_id[game].astype(np.int64).tolist(),
        )
        games.append(
            _py_play_one(
                config,
                g,
                float(step[game]),
                None if draws is None else draws[game].tolist(),
                None if noise is None else noise[game].tolist(),
            )
        )
    result = _stack_python(games, config)
    return _unbatch(result) if single else result


def _stack_python(games: list, config: GameConfig) -> GameResult:
    def field(name, dtype=np.float64):
        return np.asarray([g[name] for g in games], dtype)

    def outcome(get):
        return Outcome(
            principal_value=np.asarray([get(g).principal_value for g in games], np.float64),
            correct=np.asarray([get(g).correct for g in games], np.float64),
        )

    trajectory = None
    if config.record_trajectory:
        trajectory = Trajectory(
            regret=np.asarray([[r["regret"] for r in g["trajectory"]] for g in games], np.float64),
            regret_bound=np.asarray([[r["regret_bound"] for r in g["trajectory"]] for g in games], np.float64),
            nash_gap=np.asarray([[r["nash_gap"] for r in g["trajectory"]] for g in games], np.float64),
            policy=np.asarray([[r["policy"] for r in g["trajectory"]] for g in games], np.float64),
            active=np.asarray([[r["active"] for r in g["trajectory"]] for g in games], bool),
        )
    return GameResult(
        average_policy=field("average_policy"),
        final_policy=field("final_policy"),
        submission=field("submission", np.int32),
        chosen_agent=field("chosen_agent", np.int32),
        chosen_answer=field("chosen_answer", np.int32),
        align=outcome(lambda g: g["align"]),
        baselines=Baselines(
            fair_single=outcome(lambda g: g["baselines"].fair_single),
            oracle=outcome(lambda g: g["baselines"].oracle),
            random=outcome(lambda g: g["baselines"].random),
            uniform_principal=outcome(lambda g: g["baselines"].uniform_principal),
        ),
        rounds_played=field("rounds_played", np.int32),
        regret=field("regret"),
        regret_bound=field("regret_bound"),
        deviation_gain=field("deviation_gain"),
        nash_gap=field("nash_gap"),
        pareto_compliance=field("pareto_compliance"),
        pareto_mass=field("pareto_mass"),
        trajectory=trajectory,
    )


# ----------------------------------------------------------------------------
# (b) Vectorized NumPy over the batch: [Q, N, K, N, K] broadcasting.
# ----------------------------------------------------------------------------


def _np_outrank(score: np.ndarray, dtype) -> np.ndarray:
    """``C[q, i, k, j, l] = 1[s_j(l) > s_i(k)] + 0.5 1[s_j(l) = s_i(k)]``, zero for ``j = i``.

    Returned reshaped to ``[Q, N*K, N*K]`` for a batched matrix-vector product.
    """
    q, n, k = score.shape
    mine = score[:, :, :, None, None]
    theirs = score[:, None, None, :, :]
    weight = (theirs > mine).astype(dtype) + dtype(0.5) * (theirs == mine).astype(dtype)
    weight *= (1 - np.eye(n, dtype=dtype))[None, :, None, :, None]
    return weight.reshape(q, n * k, n * k)


def _np_feedback(outrank: np.ndarray, opponents: np.ndarray) -> np.ndarray:
    """``E f`` ``[Q, N, K]`` from the outrank tensor and the others' play ``[Q, N, K]``."""
    q, n, k = opponents.shape
    if n == 1:
        return np.ones_like(opponents)
    above = np.matmul(outrank, opponents.reshape(q, n * k, 1)).reshape(q, n, k)
    return 1 - 2 * above / (n - 1)


def _np_step_size(schedule: str, base: np.ndarray, t: float, num_valid: np.ndarray) -> np.ndarray:
    """``eta_t`` ``[Q, N]``."""
    if schedule == "constant":
        return np.broadcast_to(base[:, None], num_valid.shape).astype(num_valid.dtype)
    return base[:, None] * np.sqrt(np.log(np.maximum(num_valid, 1)) / t)


def _np_hedge(cum_reward: np.ndarray, valid: np.ndarray, eta: np.ndarray) -> np.ndarray:
    logits = np.where(valid, eta[..., None] * cum_reward, -np.inf)
    logits = logits - logits.max(axis=-1, keepdims=True)
    weights = np.where(valid, np.exp(logits), 0)
    return weights / weights.sum(axis=-1, keepdims=True)


def _np_first_near_argmax(values: np.ndarray, dtype) -> np.ndarray:
    """The lowest index within ``16 eps`` of the row maximum ``[..., K] -> [...]``.

    Identical slots (same utility and score) have equal policies in exact
    arithmetic, but the batched BLAS product can round identical rows of the
    outrank tensor differently, by an ulp, depending on the row's position;
    an exact ``argmax`` would then break such ties arbitrarily.  The engine and
    the Python loop break them toward the lowest index, and so does this.
    """
    top = values.max(axis=-1, keepdims=True)
    near = values >= top - 16 * np.finfo(dtype).eps * np.maximum(np.abs(top), 1)
    return np.argmax(near, axis=-1).astype(np.int32)


def _np_masked_max(x, valid, axis=-1):
    return np.where(valid, x, -np.inf).max(axis=axis)


def _np_regret_bound(schedule, base, rounds, num_valid, sum_eta_w2):
    eta_next = _np_step_size(schedule, base, (rounds + 1.0)[:, None], num_valid)
    safe = np.where(num_valid > 1, eta_next, 1.0)
    return np.where(num_valid > 1, np.log(np.maximum(num_valid, 1)) / safe + sum_eta_w2 / 8, 0.0)


def _np_deviation_gain(outrank, u, valid, profile):
    payoff = np.where(valid, u * _np_feedback(outrank, profile), 0)
    best = _np_masked_max(payoff, valid)
    return np.maximum(best - (profile * payoff).sum(-1), 0)


def _np_pareto(u, s, valid):
    uo, so, us, ss = u[:, :, None, :], s[:, :, None, :], u[:, :, :, None], s[:, :, :, None]
    dominated = (valid[:, :, None, :] & (uo >= us) & (so >= ss) & ((uo > us) | (so > ss))).any(-1)
    return valid & ~dominated


def _np_expected_outcome(weight, value, correct):
    weight = weight / weight.sum(axis=(-2, -1), keepdims=True)
    return Outcome(
        principal_value=(weight * value).sum(axis=(-2, -1)),
        correct=(weight * correct).sum(axis=(-2, -1)),
    )


def _np_baselines(ids, valid, u, s, value, correct, dtype) -> Baselines:
    q, n, k = valid.shape
    value = np.where(valid, value, 0).astype(dtype)
    correct = correct.astype(dtype)
    flat_ids = ids.reshape(q, 1, 1, n * k)
    # Fair single agent: pooled utility of the answer of each slot.
    same = (ids[:, :, :, None, None] == ids[:, None, None, :, :]) & valid[:, None, None, :, :]
    best_per_agent = np.where(same, u[:, None, None, :, :], 0).max(-1)  # [Q, N, K, N]
    pooled = np.where(valid, best_per_agent.sum(-1) / n, -np.inf)
    tied = valid & (pooled == pooled.max(axis=(-2, -1), keepdims=True))
    carriers = ((ids[..., None] == flat_ids) & tied.reshape(q, 1, 1, n * k)).sum(-1)
    num_answers = np.where(tied, 1.0 / np.maximum(carriers, 1), 0).sum(axis=(-2, -1), keepdims=True)
    fair = _np_expected_outcome(np.where(tied, 1.0 / (np.maximum(carriers, 1) * num_answers), 0), value, correct)
    masked_value = np.where(valid, value, -np.inf)
    oracle = _np_expected_outcome(
        (valid & (masked_value == masked_value.max(axis=(-2, -1), keepdims=True))).astype(dtype), value, correct
    )
    random = _np_expected_outcome(valid.astype(dtype), value, correct)
    # Uniform submissions + principal's top pick (ties to the lower agent index).
    uniform = valid / valid.sum(-1, keepdims=True)
    mine, theirs = s[:, :, :, None, None], s[:, None, None, :, :]
    p_less = ((theirs < mine) * uniform[:, None, None]).sum(-1)  # [Q, N, K, N]
    p_leq = ((theirs <= mine) * uniform[:, None, None]).sum(-1)
    agent = np.arange(n)
    factor = np.where(
        (agent[None, :] < agent[:, None])[None, :, None, :],
        p_less,
        np.where((agent[None, :] > agent[:, None])[None, :, None, :], p_leq, 1.0),
    )
    weight = uniform * factor.prod(-1)
    uniform_principal = Outcome((weight * value).sum(axis=(-2, -1)), (weight * correct).sum(axis=(-2, -1)))
    return Baselines(fair, oracle, random, uniform_principal)


def play_numpy(
    config: GameConfig,
    candidates: CandidateSet,
    params: Optional[GameParams] = None,
    draws=None,
    *,
    key: Optional[jax.Array] = None,
    validate: bool = True,
    dtype=np.float64,
) -> GameResult:
    """The game vectorized in NumPy over the batch (a loop over rounds only).

    Same arguments and result as :func:`play_python`; ``dtype`` is the float
    type of the computation (``np.float32`` matches the engine's precision and
    is what the benchmark uses; ``np.float64`` is the default for tests).
    Memory: the outrank tensor ``[Q, N*K, N*K]`` dominates.
    """
    candidates, step, draws, noise, single = _prepare(config, candidates, params, draws, key, validate)
    dtype = np.dtype(dtype).type
    q, n, k = candidates.valid.shape
    valid = candidates.valid.astype(bool)
    u = np.where(valid, candidates.agent_utility, 0).astype(dtype)
    s = candidates.principal_score.astype(dtype)
    base = step.astype(dtype)
    num_valid = valid.sum(-1).astype(dtype)  # [Q, N]
    outrank = _np_outrank(s, dtype)
    pareto = _np_pareto(u, s, valid)
    games = np.arange(q)

    cum_reward = np.zeros((q, n, k), dtype)
    cum_played = np.zeros((q, n), dtype)
    sum_policy = np.zeros((q, n, k), dtype)
    sum_eta_w2 = np.zeros((q, n), dtype)
    pareto_mass = np.zeros(q, dtype)
    rounds = np.zeros(q, np.int32)
    active = np.ones(q, bool)
    records = []
    for t in range(1, config.num_rounds + 1):
        eta = _np_step_size(config.schedule, base, dtype(t), num_valid)
        policy = _np_hedge(cum_reward, valid, eta)
        if config.mode == "expected":
            opponents = policy
        else:
            if draws is not None:
                submitted = draws[:, t - 1]
            else:
                with np.errstate(divide="ignore"):
                    log_policy = np.where(valid, np.log(np.maximum(policy, _LOG_FLOOR)), -np.inf)
                submitted = np.argmax(noise[:, t - 1] + log_policy, axis=-1)
            opponents = np.zeros_like(policy)
            np.put_along_axis(opponents, submitted[..., None], 1, axis=-1)
        reward = np.where(valid, u * _np_feedback(outrank, opponents), 0)
        width = _np_masked_max(reward, valid) - (-_np_masked_max(-reward, valid))
        on = active.astype(dtype)
        cum_reward += on[:, None, None] * reward
        cum_played += on[:, None] * (policy * reward).sum(-1)
        sum_policy += on[:, None, None] * policy
        sum_eta_w2 += on[:, None] * eta * width**2
        pareto_mass += on * (policy * pareto).sum(-1).mean(-1)
        rounds += active
        was_active = active
        if config.early_stop_tol > 0:
            following = _np_hedge(cum_reward, valid, _np_step_size(config.schedule, base, dtype(t + 1), num_valid))
            moved = np.abs(following - policy).max(axis=(-2, -1))
            active = active & (moved >= config.early_stop_tol)
        if config.record_trajectory:
            average = sum_policy / np.maximum(rounds, 1)[:, None, None]
            records.append(
                Trajectory(
                    regret=_np_masked_max(cum_reward, valid) - cum_played,
                    regret_bound=_np_regret_bound(config.schedule, base, rounds.astype(dtype), num_valid, sum_eta_w2),
                    nash_gap=_np_deviation_gain(outrank, u, valid, average).max(-1),
                    policy=policy,
                    active=was_active,
                )
            )

    played = np.maximum(rounds, 1).astype(dtype)
    average = sum_policy / played[:, None, None]
    submission = _np_first_near_argmax(np.where(valid, average, -1), dtype)
    submitted_scores = np.take_along_axis(s, submission[..., None], -1)[..., 0]
    chosen = np.argmax(submitted_scores, axis=-1).astype(np.int32)
    slot = submission[games, chosen]
    gains = _np_deviation_gain(outrank, u, valid, average)
    trajectory = None
    if config.record_trajectory:
        trajectory = Trajectory(*(np.stack(parts, axis=1) for parts in zip(*records)))
    result = GameResult(
        average_policy=average,
        final_policy=_np_hedge(
            cum_reward, valid, _np_step_size(config.schedule, base, (rounds + 1.0).astype(dtype)[:, None], num_valid)
        ),
        submission=submission,
        chosen_agent=chosen,
        chosen_answer=candidates.answer_id[games, chosen, slot].astype(np.int32),
        align=Outcome(
            principal_value=candidates.principal_value[games, chosen, slot].astype(dtype),
            correct=candidates.correct[games, chosen, slot].astype(dtype),
        ),
        baselines=_np_baselines(
            candidates.answer_id, valid, u, s, candidates.principal_value, candidates.correct, dtype
        ),
        rounds_played=rounds,
        regret=_np_masked_max(cum_reward, valid) - cum_played,
        regret_bound=_np_regret_bound(config.schedule, base, rounds.astype(dtype), num_valid, sum_eta_w2),
        deviation_gain=gains,
        nash_gap=gains.max(-1),
        pareto_compliance=np.take_along_axis(pareto, submission[..., None], -1)[..., 0].mean(-1),
        pareto_mass=pareto_mass / played,
        trajectory=trajectory,
    )
    return _unbatch(result) if single else result
