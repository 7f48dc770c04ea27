"""A simulated ECON environment in pure JAX: one question, N executors, rounds of commitment.

Shapes: N executor slots, G coordinators (groups of M = N/G executors), K answers per
question (id 0 is the gold answer), T = ``max_rounds``, F = observation features,
C = :data:`COMMITMENT_DIM` commitment features.

The interface is gymnax-style and is what the real-LLM environment will implement too
(:class:`Env`)::

    obs, state = env.reset(key, params)                 # obs [N, F]
    out = env.step(key, state, action, params)          # action: Action(temperature [N], top_p [N])
    out.obs, out.state, out.local_reward [N], out.team_reward [], out.done [], out.info

``step`` auto-resets: when ``done`` the returned state/obs are those of a fresh question,
and ``info`` describes the round that just ended.  Static structure is a
:class:`~align_jax.methods.econ.config.SimConfig`; every number is a leaf of
:class:`EnvParams`, so one compiled program serves a whole sweep (``vmap`` over params).

The generative model (one question; everything is resampled at reset)::

    d ~ N(difficulty_mean, difficulty_std^2)                 question difficulty
    s_g ~ N(strategy_quality, strategy_std^2)                coordinator g's strategy quality
    delta_k ~ N(0, distractor_scale^2), k = 1..K-1           popularity of the wrong answers

Executor i (in group g(i)) with action (tau_i, p_i) answers correctly with probability::

    p_correct_i = sigmoid(skill_i + strategy_gain * s_g(i) - d
                          - temperature_curvature * (ln tau_i - ln tau*_i)^2
                          - top_p_curvature * (p_i - best_top_p)^2)

so accuracy peaks at the executor's best temperature tau*_i; a wrong answer is drawn from
``softmax(delta / tau_i)`` truncated to its top-p nucleus of mass p_i (the *concentration*
of the wrong answers: low tau / low p pile them onto the most popular distractor, which
majority vote then cannot out-vote).  From round 1 on, with probability ``anchoring`` an
executor repeats the previous commitment instead (it sees the commitment, never the
other executors' answers).

A coordinator over answers a_1..a_n (the ``coordinate`` rule): with probability
``exp(-overload_rate * max(0, n - coordinator_capacity))`` it reads every answer, and then
commits the gold answer when it is among them with probability ``coordinator_skill``
(it recognises it), otherwise the majority answer (ties at random); when overloaded it
commits one executor's answer chosen at random.  In the hierarchical variant each of the
G coordinators commits over its group and a central combiner applies the same rule, with
``central_skill``, to the G group commitments.  (The overload term is a *modelling
assumption* standing in for the paper's report that one coordinator handles many
executors badly; it is a parameter, 0 switches it off.)

The stop rule: the question ends after round t when t = T-1, or t >= 1 and the commitment
equals the previous one, or the variance of the chosen parameters across the active
executors, ``Var_i(tau_i) + Var_i(p_i)``, is below ``variance_threshold`` (0.01).

Rewards of round t (paid when the question ends, 0 otherwise, so that prolonging a
question earns nothing)::

    R_TS_i = [a_i = gold]        R_AL_i = [a_i = commitment]
    R_CC_i = (R_AL_i + novelty_i) / 2,  novelty_i = 1 - #{j != i active: a_j = a_i} / #{j != i active}
    local_i = w_TS R_TS_i + w_AL R_AL_i + w_CC R_CC_i
    team    = w_TS [commitment = gold] + mean_i (w_AL R_AL_i + w_CC R_CC_i)     (over active i)

(R_AL is the cosine similarity of identical / different answers' embeddings, 1 or 0;
the real environment uses sentence embeddings.)

Calibration hook: :func:`fit_accuracy_curve` fits (skill, best temperature, curvature,
difficulty spread) to measured per-question correctness rates at several temperatures;
:func:`calibrated_params` turns the fit into :class:`EnvParams`.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.methods.econ.config import (DEFAULT_REWARD_WEIGHTS, TEMPERATURE_RANGE, TOP_P_RANGE, SimConfig,
                                           check_reward_weights, reward_weight_vector)
from align_jax.methods.econ.losses import combine_rewards

__all__ = [
    "COMMITMENT_DIM",
    "Action",
    "EnvParams",
    "EnvState",
    "StepInfo",
    "EnvStep",
    "Env",
    "make_sim_env",
    "make_env_params",
    "observation_dim",
    "normalise_action",
    "coordinate",
    "answer_distribution",
    "AccuracyFit",
    "fit_accuracy_curve",
    "calibrated_params",
]

#: C: commitment features ``[vote share of the commitment, commitment changed, unanimity]``.
COMMITMENT_DIM = 3


class Action(NamedTuple):
    """The executors' generation parameters.

    Attributes:
      temperature: [N] in [0.1, 2.0].
      top_p: [N] in [0.1, 0.95].
    """

    temperature: jax.Array
    top_p: jax.Array


class EnvParams(NamedTuple):
    """Every number of the simulator (array leaves; ``vmap`` over them to sweep).

    Attributes:
      executor_mask: [N] 1.0 for present executors, 0.0 for absent slots.
      skill: [N] executor ability (a logit).
      log_best_temperature: [N] ln tau*_i.
      temperature_curvature: [] accuracy loss per squared log-temperature error.
      best_top_p, top_p_curvature: [] the same for top-p.
      difficulty_mean, difficulty_std: [] question difficulty distribution (logits).
      distractor_scale: [] spread of the wrong answers' popularity logits.
      strategy_quality, strategy_std, strategy_gain: [] the coordinator's strategy effect.
      coordinator_skill, central_skill: [] probability of recognising a proposed gold answer.
      coordinator_capacity, overload_rate: [] the overload model (see the module docstring).
      anchoring: [] probability of repeating the previous commitment from round 1 on.
      observation_noise: [] std of the executors' noisy view of difficulty and strategy.
      variance_threshold: [] the stop rule's parameter-variance threshold.
      reward_weights: [3] (w_TS, w_AL, w_CC).
    """

    executor_mask: jax.Array
    skill: jax.Array
    log_best_temperature: jax.Array
    temperature_curvature: jax.Array
    best_top_p: jax.Array
    top_p_curvature: jax.Array
    difficulty_mean: jax.Array
    difficulty_std: jax.Array
    distractor_scale: jax.Array
    strategy_quality: jax.Array
    strategy_std: jax.Array
    strategy_gain: jax.Array
    coordinator_skill: jax.Array
    central_skill: jax.Array
    coordinator_capacity: jax.Array
    overload_rate: jax.Array
    anchoring: jax.Array
    observation_noise: jax.Array
    variance_threshold: jax.Array
    reward_weights: jax.Array


class EnvState(NamedTuple):
    """One question in progress.

    Attributes:
      difficulty: [] d.
      strategy: [G] the coordinators' strategy qualities.
      distractor_logits: [K-1] wrong answers' popularity.
      difficulty_obs, strategy_obs: [N] the executors' noisy views.
      round: [] int32 round index t (0-based) of the next step.
      prev_commitment: [] int32, -1 before round 0.
      prev_action: [N, 2] normalised previous (temperature, top-p), 0 before round 0.
      prev_agree: [N] previous [a_i = commitment].
      prev_commit_features: [C].
    """

    difficulty: jax.Array
    strategy: jax.Array
    distractor_logits: jax.Array
    difficulty_obs: jax.Array
    strategy_obs: jax.Array
    round: jax.Array
    prev_commitment: jax.Array
    prev_action: jax.Array
    prev_agree: jax.Array
    prev_commit_features: jax.Array


class StepInfo(NamedTuple):
    """What happened in the round that a step played (before any auto-reset).

    Attributes:
      commitment: [] int32 committed answer id.
      commit_correct: [] bool, commitment = gold.
      commit_features: [C] the commitment's features (target of the consistency loss).
      answers: [N] int32 executors' answers.
      answer_correct: [N] bool.
      p_correct: [N] the executors' probability of a correct answer this round.
      reward_components: [N, 3] (R_TS, R_AL, R_CC) of this round, paid or not.
      rounds: [] int32 rounds played so far on this question (t + 1).
    """

    commitment: jax.Array
    commit_correct: jax.Array
    commit_features: jax.Array
    answers: jax.Array
    answer_correct: jax.Array
    p_correct: jax.Array
    reward_components: jax.Array
    rounds: jax.Array


class EnvStep(NamedTuple):
    """The result of :attr:`Env.step`.

    Attributes:
      obs: [N, F] next observations (of a fresh question when ``done``).
      state: the next :class:`EnvState` (auto-reset when ``done``).
      local_reward: [N] executors' rewards (0 for absent executors, 0 unless ``done``).
      team_reward: [] the team reward (0 unless ``done``).
      done: [] bool, the question ended this round.
      info: :class:`StepInfo`.
    """

    obs: jax.Array
    state: EnvState
    local_reward: jax.Array
    team_reward: jax.Array
    done: jax.Array
    info: StepInfo


class Env(NamedTuple):
    """An ECON environment: a pair of pure functions plus its static sizes.

    Attributes:
      reset: ``(key, params) -> (obs [N, F], state)``.
      step: ``(key, state, action, params) -> EnvStep``; auto-resets.
      num_executors: N.
      observation_dim: F.
      commitment_dim: C.
    """

    reset: Callable
    step: Callable
    num_executors: int
    observation_dim: int
    commitment_dim: int


def observation_dim(sim: SimConfig) -> int:
    """F = 9 + T: [difficulty view, strategy view, prev temperature, prev top-p, prev
    agreement, prev commitment features (C=3), one-hot round (T), present flag]."""
    return 6 + COMMITMENT_DIM + sim.max_rounds


def normalise_action(temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """[..., 2]: log-temperature and top-p mapped linearly onto [-1, 1] over their ranges."""
    lo, hi = math.log(TEMPERATURE_RANGE[0]), math.log(TEMPERATURE_RANGE[1])
    t = 2.0 * (jnp.log(temperature) - lo) / (hi - lo) - 1.0
    p = 2.0 * (top_p - TOP_P_RANGE[0]) / (TOP_P_RANGE[1] - TOP_P_RANGE[0]) - 1.0
    return jnp.stack([t, p], axis=-1)


def make_env_params(
    sim: SimConfig,
    *,
    difficulty: float = 0.0,
    difficulty_std: float = 1.0,
    heterogeneity: float = 0.0,
    best_temperature: float = 0.7,
    skill: float = 0.5,
    num_active: Optional[int] = None,
    reward_weights: Mapping[str, float] = DEFAULT_REWARD_WEIGHTS,
    **overrides,
) -> EnvParams:
    """Default simulator parameters, pure ``jnp`` (so ``vmap``-able over its scalars).

    Heterogeneity spreads the executors around the defaults with fixed offsets
    ``o_i = linspace(-1, 1, N)`` (0 when N = 1)::

        ln tau*_i = ln best_temperature + heterogeneity * o_i
        skill_i   = skill - heterogeneity * |o_i|

    so with heterogeneity the best temperatures differ and the outer executors are weaker.

    Args:
      sim: the static config (N, G, K, T).
      difficulty, difficulty_std: mean and std of question difficulty (logits).
      heterogeneity: executor heterogeneity (>= 0).
      best_temperature: the central executor's tau*.
      skill: the central executor's ability (logit of accuracy at tau*, d = 0, s = 0).
      num_active: N' <= N present executors (slots N'..N-1 masked); None = all N.
      reward_weights: ``{ts, al, cc}`` weights (validated: FieldError on unknown names).
      **overrides: any other :class:`EnvParams` field by name.

    Raises:
      FieldError: bad reward weights.  TypeError: an unknown override.
    """
    check_reward_weights(reward_weights)
    n = sim.num_executors
    scalars = (difficulty, difficulty_std, heterogeneity, best_temperature, skill, num_active, *overrides.values())
    # NumPy when every number is concrete (no per-op compilation), jnp when traced (vmap/jit)
    concrete = all(v is None or isinstance(v, (int, float, np.ndarray, np.generic)) for v in scalars)
    xp = np if concrete else jnp
    f32 = lambda x: xp.asarray(x, xp.float32)  # noqa: E731
    offsets = np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros((1,))
    het = f32(heterogeneity)
    active = n if num_active is None else num_active
    values = dict(
        executor_mask=(xp.arange(n) < active).astype(xp.float32),
        skill=f32(skill) - het * np.abs(offsets).astype(np.float32),
        log_best_temperature=xp.log(f32(best_temperature)) + het * offsets.astype(np.float32),
        temperature_curvature=f32(1.0),
        best_top_p=f32(0.9),
        top_p_curvature=f32(2.0),
        difficulty_mean=f32(difficulty),
        difficulty_std=f32(difficulty_std),
        distractor_scale=f32(1.5),
        strategy_quality=f32(0.5),
        strategy_std=f32(0.5),
        strategy_gain=f32(0.5),
        coordinator_skill=f32(0.5),
        central_skill=f32(0.5),
        coordinator_capacity=f32(3.0),
        overload_rate=f32(0.3),
        anchoring=f32(0.3),
        observation_noise=f32(0.5),
        variance_threshold=f32(0.01),
        reward_weights=f32(reward_weight_vector(reward_weights)),
    )
    for name, value in overrides.items():
        if name not in values:
            raise TypeError(f"unknown EnvParams field {name!r}")
        values[name] = f32(value)
    values = {k: jnp.asarray(v, jnp.float32) for k, v in values.items()}
    return EnvParams(**values)


def answer_distribution(p_correct: jax.Array, distractor_logits: jax.Array, temperature: jax.Array,
                        top_p: jax.Array) -> jax.Array:
    """One executor's answer distribution [K]: gold with ``p_correct``, the rest spread
    over the wrong answers by ``softmax(distractor_logits / temperature)`` truncated to
    its top-p nucleus (smallest set of most popular wrong answers with mass >= top_p).

    Args:
      p_correct: [] probability of the gold answer.
      distractor_logits: [K-1].
      temperature, top_p: [].
    """
    wrong = jax.nn.softmax(distractor_logits / temperature)
    order = jnp.argsort(-wrong)
    sorted_mass = wrong[order]
    keep_sorted = (jnp.cumsum(sorted_mass) - sorted_mass) < top_p
    keep = jnp.zeros_like(keep_sorted).at[order].set(keep_sorted)
    wrong = jnp.where(keep, wrong, 0.0)
    wrong = wrong / wrong.sum()
    return jnp.concatenate([p_correct[None], (1.0 - p_correct) * wrong])


def _gumbel(u: jax.Array) -> jax.Array:
    return -jnp.log(-jnp.log(u))


def coordinate(u: jax.Array, answers: jax.Array, mask: jax.Array, skill: jax.Array, capacity: jax.Array,
               overload_rate: jax.Array, num_answers: int) -> jax.Array:
    """One coordinator's commitment over answers [M] with presence mask [M] (the rule of
    the module docstring).

    Args:
      u: [K + 2 + M] uniforms in (0, 1): K tie-breaks, recognition, reading, M for the
        overloaded random pick.
      answers: [M] int32.  mask: [M] presence.
      skill, capacity, overload_rate: [].
      num_answers: K.
    Returns:
      [] int32 committed answer id.
    """
    k = num_answers
    votes = (jax.nn.one_hot(answers, k) * mask[:, None]).sum(0)
    majority = jnp.argmax(votes + 0.5 * u[:k])  # ties broken uniformly; unvoted answers never win
    recognise = (votes[0] > 0) & (u[k] < skill)
    clarity = jnp.exp(-overload_rate * jnp.maximum(mask.sum() - capacity, 0.0))
    reads = u[k + 1] < clarity
    picked = answers[jnp.argmax(jnp.where(mask > 0, 0.0, -jnp.inf) + _gumbel(u[k + 2:]))]
    return jnp.where(reads, jnp.where(recognise, 0, majority), picked).astype(jnp.int32)


def _masked_var(x: jax.Array, mask: jax.Array) -> jax.Array:
    n = jnp.maximum(mask.sum(), 1.0)
    mean = (x * mask).sum() / n
    return (mask * (x - mean) ** 2).sum() / n


def _uniform(key: jax.Array, size: int) -> jax.Array:
    # one random op per call: XLA compiles every threefry draw separately, so the simulator
    # draws all of a step's randomness at once and slices it.
    return jax.lax.optimization_barrier(jax.random.uniform(key, (size,), minval=1e-7, maxval=1.0 - 1e-7))


def make_sim_env(sim: SimConfig) -> Env:
    """The simulated environment for the static config ``sim`` (see the module docstring).

    Each ``reset`` and each ``step`` draws its randomness with a single uniform draw from
    its key (normals by the inverse normal CDF)."""
    n, g, m, k, t_max = sim.num_executors, sim.num_groups, sim.group_size, sim.num_answers, sim.max_rounds
    group_of = jnp.arange(n) // m
    n_reset = 1 + g + (k - 1) + 2 * n
    n_coord = k + 2 + m
    n_central = (k + 2 + g) if g > 1 else 0
    n_step = n * k + n + g * n_coord + n_central

    def observe(state: EnvState, params: EnvParams) -> jax.Array:
        mask = params.executor_mask
        feats = jnp.concatenate([
            state.difficulty_obs[:, None],
            state.strategy_obs[:, None],
            state.prev_action,
            state.prev_agree[:, None],
            jnp.broadcast_to(state.prev_commit_features, (n, COMMITMENT_DIM)),
            jnp.broadcast_to(jax.nn.one_hot(state.round, t_max), (n, t_max)),
        ], axis=1)
        return jnp.concatenate([feats * mask[:, None], mask[:, None]], axis=1)

    def reset_from(u: jax.Array, params: EnvParams):
        z = jax.scipy.special.ndtri(u)
        z_d, z_s, z_w, z_do, z_so = jnp.split(z, np.cumsum([1, g, k - 1, n]))
        difficulty = params.difficulty_mean + params.difficulty_std * z_d[0]
        strategy = params.strategy_quality + params.strategy_std * z_s
        state = EnvState(
            difficulty=difficulty,
            strategy=strategy,
            distractor_logits=params.distractor_scale * z_w,
            difficulty_obs=difficulty + params.observation_noise * z_do,
            strategy_obs=strategy[group_of] + params.observation_noise * z_so,
            round=jnp.zeros((), jnp.int32),
            prev_commitment=jnp.full((), -1, jnp.int32),
            prev_action=jnp.zeros((n, 2)),
            prev_agree=jnp.zeros((n,)),
            prev_commit_features=jnp.zeros((COMMITMENT_DIM,)),
        )
        return observe(state, params), state

    def reset(key: jax.Array, params: EnvParams):
        return reset_from(_uniform(key, n_reset), params)

    def commit(u_groups: jax.Array, u_central: jax.Array, answers: jax.Array, params: EnvParams) -> jax.Array:
        mask = params.executor_mask
        group_commit = jax.vmap(coordinate, in_axes=(0, 0, 0, None, None, None, None))(
            u_groups.reshape(g, n_coord), answers.reshape(g, m), mask.reshape(g, m), params.coordinator_skill,
            params.coordinator_capacity, params.overload_rate, k)
        if g == 1:
            return group_commit[0]
        group_present = (mask.reshape(g, m).sum(1) > 0).astype(jnp.float32)
        return coordinate(u_central, group_commit, group_present, params.central_skill, params.coordinator_capacity,
                          params.overload_rate, k)

    def step(key: jax.Array, state: EnvState, action: Action, params: EnvParams) -> EnvStep:
        u = _uniform(key, n_step + n_reset)
        u_ans, u_anchor, u_groups, u_central, u_reset = jnp.split(
            u, np.cumsum([n * k, n, g * n_coord, n_central]))
        mask = params.executor_mask
        temperature = jnp.clip(action.temperature, *TEMPERATURE_RANGE)
        top_p = jnp.clip(action.top_p, *TOP_P_RANGE)
        logit = (params.skill + params.strategy_gain * state.strategy[group_of] - state.difficulty
                 - params.temperature_curvature * (jnp.log(temperature) - params.log_best_temperature) ** 2
                 - params.top_p_curvature * (top_p - params.best_top_p) ** 2)
        p_correct = jax.nn.sigmoid(logit)
        probs = jax.vmap(answer_distribution, in_axes=(0, None, 0, 0))(
            p_correct, state.distractor_logits, temperature, top_p)
        fresh = jnp.argmax(jnp.log(probs) + _gumbel(u_ans.reshape(n, k)), axis=-1)
        anchored = (state.round > 0) & (u_anchor < params.anchoring)
        answers = jnp.where(anchored, state.prev_commitment, fresh).astype(jnp.int32)
        commitment = commit(u_groups, u_central, answers, params)

        n_active = jnp.maximum(mask.sum(), 1.0)
        agree = (answers == commitment).astype(jnp.float32)
        correct = answers == 0
        same = (answers[:, None] == answers[None, :]).astype(jnp.float32) * mask[None, :] * (1.0 - jnp.eye(n))
        others = mask.sum() - mask
        novelty = jnp.where(others > 0, 1.0 - same.sum(1) / jnp.maximum(others, 1.0), 1.0)
        contribution = 0.5 * (agree + novelty)
        components = jnp.stack([correct.astype(jnp.float32), agree, contribution], axis=1) * mask[:, None]
        w = params.reward_weights
        local = combine_rewards(components, w)
        team = (w[0] * (commitment == 0) + (w[1] * agree + w[2] * contribution) @ mask / n_active)

        share = (agree * mask).sum() / n_active
        changed = ((state.round > 0) & (commitment != state.prev_commitment)).astype(jnp.float32)
        commit_features = jnp.stack([share, changed, (share >= 1.0).astype(jnp.float32)])
        variance = _masked_var(temperature, mask) + _masked_var(top_p, mask)
        done = ((state.round >= t_max - 1) | ((state.round > 0) & (commitment == state.prev_commitment))
                | (variance < params.variance_threshold))

        next_state = state._replace(
            round=state.round + 1,
            prev_commitment=commitment,
            prev_action=normalise_action(temperature, top_p),
            prev_agree=agree,
            prev_commit_features=commit_features,
        )
        reset_obs, reset_state = reset_from(u_reset, params)
        state_out = jax.tree.map(lambda a, b: jnp.where(done, a, b), reset_state, next_state)
        obs = jnp.where(done, reset_obs, observe(next_state, params))
        paid = done.astype(jnp.float32)
        info = StepInfo(
            commitment=commitment,
            commit_correct=commitment == 0,
            commit_features=commit_features,
            answers=answers,
            answer_correct=correct,
            p_correct=p_correct,
            reward_components=components,
            rounds=state.round + 1,
        )
        return EnvStep(obs=obs, state=state_out, local_reward=local * paid, team_reward=team * paid, done=done,
                       info=info)

    return Env(reset=reset, step=step, num_executors=n, observation_dim=observation_dim(sim),
               commitment_dim=COMMITMENT_DIM)


# ----------------------------------------------------------------------------------------
# Calibration hook
# ----------------------------------------------------------------------------------------


class AccuracyFit(NamedTuple):
    """The accuracy curve fitted by :func:`fit_accuracy_curve`.

    Attributes:
      skill: mean per-question logit at the best temperature (the sim's ``skill`` with d = 0).
      best_temperature: tau*.
      temperature_curvature: c in ``- c (ln tau - ln tau*)^2``.
      difficulty_std: spread of the per-question logits (the sim's ``difficulty_std``).
      rmse: root-mean-square error of the fitted rates against the measured ones.
      num_questions: Q.
    """

    skill: float
    best_temperature: float
    temperature_curvature: float
    difficulty_std: float
    rmse: float
    num_questions: int


def fit_accuracy_curve(temperatures: Sequence[float], correct_rates, *, num_samples: Optional[int] = None,
                       temperature_curvature: Optional[float] = None) -> AccuracyFit:
    """Fits the simulator's accuracy curve to measured per-question correctness rates.

    This is the calibration hook: give it, for Q questions, the fraction of correct samples
    at each of M temperatures (e.g. from the committed ``docs/results/reason_gsm8k_100`` rows
    at 0.7 and 1.0 plus a small temperature sweep), and it fits::

        logit(rate_qm) = alpha_q - c (ln tau_m - ln tau*)^2 ,   alpha_q = skill - d_q

    by least squares with a free intercept per question and a shared quadratic in
    ``x = ln tau`` (``alpha_q + b1 x + b2 x^2``, then ``c = -b2``, ``ln tau* = -b1 / (2 b2)``).
    Rates are clipped to ``[eps, 1 - eps]`` with ``eps = 0.5 / num_samples`` (or 0.02).
    ``skill`` is the mean of alpha_q and ``difficulty_std`` their standard deviation.
    With fewer than three temperatures the curvature is not identified: pass
    ``temperature_curvature`` and only tau* is fitted.  A fit without an interior
    maximum (b2 >= 0) reports the best measured temperature and a small curvature.
    Top-p is not fitted (the sim keeps ``best_top_p``); host-side NumPy.

    Args:
      temperatures: [M] distinct temperatures > 0.
      correct_rates: [Q, M] fraction correct (or [M] for one pooled rate per temperature).
      num_samples: samples behind each rate (sets the clipping).
      temperature_curvature: fix c (required when M < 3).

    Raises:
      ValueError: shapes disagree, rates outside [0, 1], or M < 3 without a curvature.
    """
    x = np.log(np.asarray(temperatures, np.float64))
    rates = np.asarray(correct_rates, np.float64)
    if rates.ndim == 1:
        rates = rates[None]
    if rates.ndim != 2 or rates.shape[1] != x.shape[0]:
        raise ValueError(f"correct_rates must be [Q, {x.shape[0]}], got {np.shape(correct_rates)}")
    if np.any(rates < 0) or np.any(rates > 1) or not np.all(np.isfinite(rates)):
        raise ValueError("correct_rates must lie in [0, 1]")
    if len(np.unique(x)) != len(x) or not np.all(np.isfinite(x)):
        raise ValueError("temperatures must be distinct and > 0")
    if len(x) < 3 and temperature_curvature is None:
        raise ValueError("need >= 3 temperatures to fit the curvature, or pass temperature_curvature")
    eps = 0.5 / num_samples if num_samples else 0.02
    y = np.log(np.clip(rates, eps, 1 - eps)) - np.log1p(-np.clip(rates, eps, 1 - eps))
    yc = y - y.mean(1, keepdims=True)
    xc, x2c = x - x.mean(), x ** 2 - (x ** 2).mean()
    q = y.shape[0]
    if temperature_curvature is None:
        design = np.stack([np.tile(xc, q), np.tile(x2c, q)], axis=1)
        (b1, b2), *_ = np.linalg.lstsq(design, yc.reshape(-1), rcond=None)
    else:
        b2 = -float(temperature_curvature)
        (b1,), *_ = np.linalg.lstsq(np.tile(xc, q)[:, None], (yc - b2 * x2c).reshape(-1), rcond=None)
    if b2 < -1e-6:
        curvature, log_best = -b2, -b1 / (2 * b2)
    else:  # no interior maximum: fall back on the best measured temperature
        curvature, log_best = 1e-3, x[int(np.argmax(rates.mean(0)))]
        b2, b1 = -curvature, 2 * curvature * log_best
    alpha = y.mean(1) - b1 * x.mean() - b2 * (x ** 2).mean()
    peak = alpha + b1 * log_best + b2 * log_best ** 2  # alpha_q at tau*
    fitted = 1 / (1 + np.exp(-(alpha[:, None] + b1 * x + b2 * x ** 2)))
    return AccuracyFit(
        skill=float(peak.mean()),
        best_temperature=float(np.exp(log_best)),
        temperature_curvature=float(curvature),
        difficulty_std=float(peak.std()),
        rmse=float(np.sqrt(np.mean((fitted - rates) ** 2))),
        num_questions=int(q),
    )


def calibrated_params(sim: SimConfig, fit: AccuracyFit, *, top_p: Optional[float] = None, **kwargs) -> EnvParams:
    """:func:`make_env_params` with the fitted skill, best temperature, curvature and
    difficulty spread.  The measurements ran without a coordinator's strategy, so the
    strategy effect of the simulator comes on top of them; if they used a top-p other than
    ``best_top_p`` (0.9), pass it and the skill is corrected by the top-p penalty.
    ``kwargs`` go to :func:`make_env_params` (heterogeneity, num_active, overrides ...)."""
    skill = fit.skill
    if top_p is not None:
        skill += float(kwargs.get("top_p_curvature", 2.0)) * (top_p - float(kwargs.get("best_top_p", 0.9))) ** 2
    return make_env_params(sim, skill=skill, best_temperature=fit.best_temperature,
                           difficulty_std=fit.difficulty_std,
                           temperature_curvature=fit.temperature_curvature, **kwargs)
