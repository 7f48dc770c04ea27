"""ECON training in the PureJaxRL style: the whole run is one jitted pure function of a key.

::

    trainer = make_trainer(config)                   # static structure, built once
    state = trainer.train(key)                       # one jit; E questions x num_steps rounds
    states = jax.vmap(trainer.train)(keys)           # seeds as a vmap axis
    result = trainer.evaluate(state, key)            # learned policy vs baselines
    state.log                                        # the training curve (per update period)

    # the same run in resumable segments (what a checkpointing runner calls):
    state = trainer.init_state(key)
    state = trainer.train_segment(state, 64)
    state = trainer.train_segment(state, 64)         # == trainer.train_segment(init, 128)

Shapes: E = ``num_envs`` parallel questions, N executors, A grid actions, P =
``num_steps / update_every`` update periods.

One *step*: every executor of every question picks a grid action epsilon-greedily from
its own Q (``epsilon`` linear from ``epsilon_start`` to ``epsilon_end`` over
``epsilon_decay_steps``), the environment plays one round (auto-resetting finished
questions), E transitions go into the replay buffer.  One *period* is ``update_every``
steps (a ``lax.scan``) followed by one update: a batch of ``batch_size`` transitions, the
loss of :mod:`~align_jax.methods.econ.losses`, global-norm clipping and Adam
(``learning_rate``), then ``thetabar <- tau theta + (1 - tau) thetabar``.  The update is
discarded (by a select, not a branch) until the buffer holds a batch, so the program has
no step-dependent branch and is the same under ``vmap``.  Periods run in a ``fori_loop``
whose trip count is a traced argument: every segment length shares one compiled program.
Per-step keys are ``fold_in(fold_in(key, 0), step)`` and per-update keys
``fold_in(fold_in(key, 1), update)``, so a run cut into segments consumes exactly the same
randomness as an uninterrupted one, and the curve is written into ``state.log`` at the
period's index.

The networks are ``nnx`` modules used through ``(graphdef, state)``: the train state holds
only pure pytrees (:class:`~align_jax.methods.econ.networks.EconParams`).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from align_jax.methods.econ.buffer import make_replay_buffer, sample_batch
from align_jax.methods.econ.config import EconConfig
from align_jax.methods.econ.losses import LossInfo, Transition, econ_loss, update_reward_weights, zero_transitions
from align_jax.methods.econ.networks import (EconNetworks, EconParams, agent_forward, init_networks,
                                             network_graphdefs)
from align_jax.methods.econ.sim import Action, Env, EnvParams, EnvState, make_env_params, make_sim_env

__all__ = [
    "TrainLog",
    "TrainState",
    "PolicyEval",
    "EvalResult",
    "EconTrainer",
    "make_trainer",
    "make_train",
    "make_update",
    "epsilon_schedule",
    "greedy_actions",
]


class TrainLog(NamedTuple):
    """The training curve, one entry per update period (leaves [P], P = num_steps / update_every),
    kept inside the train state so that a resumed run continues the same curve.  Entries of
    periods not yet run are 0; periods beyond P (training past ``num_steps``) are not logged.

    Attributes:
      episodes: questions that ended during the period (all E parallel questions).
      correct: of those, how many ended with a correct commitment.
      team_reward: sum of their team rewards.
      epsilon: exploration rate at the period's last step.
      updated: whether the period's update was applied (false until the buffer holds a batch).
      loss: :class:`~align_jax.methods.econ.losses.LossInfo` of the period's update.
    """

    episodes: jax.Array
    correct: jax.Array
    team_reward: jax.Array
    epsilon: jax.Array
    updated: jax.Array
    loss: LossInfo


class TrainState(NamedTuple):
    """Everything a training run carries (a pytree; checkpoint it to resume).

    Attributes:
      params: online parameters theta.
      target_params: target parameters thetabar.
      initial_params: theta at step 0 (the frozen-belief baseline of ``evaluate``).
      opt_state: the optax state (of the parameters raveled into one vector).
      buffer_state: the flashbax buffer state.
      env_state: [E] the questions in progress.
      obs: [E, N, F] their current observations.
      env_params: the simulator's :class:`~align_jax.methods.econ.sim.EnvParams`.
      key: the run's base key (never advanced; steps fold their index in).
      step: [] int32 steps done.
      num_updates: [] int32 update periods done.
      log: the :class:`TrainLog`.
    """

    params: EconParams
    target_params: EconParams
    initial_params: EconParams
    opt_state: optax.OptState
    buffer_state: object
    env_state: EnvState
    obs: jax.Array
    env_params: EnvParams
    key: jax.Array
    step: jax.Array
    num_updates: jax.Array
    log: TrainLog


class PolicyEval(NamedTuple):
    """One policy's evaluation over Q questions (scalars).

    Attributes:
      accuracy: fraction of questions whose final commitment is correct.
      rounds: mean rounds played per question.
      team_reward: mean team reward per question.
      executor_accuracy: mean correctness of the present executors' final answers.
      temperature: [N] the temperature each executor played (geometric mean over the rounds
        played, every question weighing the same).
      top_p: [N] the top-p each executor played (mean over the rounds played, likewise).
    """

    accuracy: jax.Array
    rounds: jax.Array
    team_reward: jax.Array
    executor_accuracy: jax.Array
    temperature: jax.Array
    top_p: jax.Array


class EvalResult(NamedTuple):
    """The learned policy against the baselines, on the same questions and randomness.

    Attributes:
      learned: greedy w.r.t. the trained Q.
      initial: greedy w.r.t. the initial Q (belief networks frozen at their initial
        policy: the issue's "without BNE").
      random: a uniformly random grid action per executor per round.
      fixed: every executor at (``baseline_temperature``, ``baseline_top_p``).
      greedy_temperature: [N] the learned policy's first-round temperature (geometric mean
        over the questions).
      greedy_top_p: [N] its first-round top-p (mean over the questions).
    """

    learned: PolicyEval
    initial: PolicyEval
    random: PolicyEval
    fixed: PolicyEval
    greedy_temperature: jax.Array
    greedy_top_p: jax.Array


class EconTrainer(NamedTuple):
    """The pure functions of one static configuration (see the module docstring).

    Attributes:
      config: the :class:`~align_jax.methods.econ.config.EconConfig`.
      env: the simulated :class:`~align_jax.methods.econ.sim.Env`.
      networks: the static :class:`~align_jax.methods.econ.networks.EconNetworks`.
      default_env_params: the :class:`~align_jax.methods.econ.sim.EnvParams` of ``config.env``.
      init_state: ``(key, env_params=None) -> TrainState`` (jitted; consumes key).
      train_segment: ``(state, num_steps) -> TrainState`` (jitted; ``num_steps`` is a traced
        argument, a multiple of ``update_every``, so every segment length shares one program).
      train: ``(key, env_params=None) -> TrainState``, the whole run (``num_steps``) as one jit.
      evaluate: ``(state, key) -> EvalResult`` (jitted).
    """

    config: EconConfig
    env: Env
    networks: EconNetworks
    default_env_params: EnvParams
    init_state: Callable
    train_segment: Callable
    train: Callable
    evaluate: Callable


def epsilon_schedule(step: jax.Array, start: float, end: float, decay_steps: int) -> jax.Array:
    """``end + (start - end) max(0, 1 - step / decay_steps)``."""
    frac = jnp.clip(1.0 - step / decay_steps, 0.0, 1.0)
    return end + (start - end) * frac


def greedy_actions(nets: EconNetworks, params: EconParams, obs: jax.Array) -> jax.Array:
    """obs [..., N, F] -> greedy grid actions [..., N] (int32)."""
    flat = obs.reshape((-1,) + obs.shape[-2:])
    q = jax.vmap(lambda o: agent_forward(nets, params, o)[1])(flat)
    return jnp.argmax(q, axis=-1).astype(jnp.int32).reshape(obs.shape[:-1])


def _strong(tree):
    """The same pytree with every weakly typed leaf made strong (flashbax's ``current_index``
    is a weak int32): a restored checkpoint's leaves are strong, and the programs must see
    the same types before and after a resume, or they would compile twice."""
    return jax.tree.map(lambda x: jax.lax.convert_element_type(x, x.dtype) if getattr(x, "weak_type", False)
                        else x, tree)


def make_update(nets: EconNetworks, tr) -> tuple[optax.GradientTransformation, Callable]:
    """ECON's parameter update, shared by simulated and real training.

    Returns ``(optimizer, update)`` with ``update(params, target_params, opt_state, batch) ->
    (params, target_params, opt_state, LossInfo)``: the gradient of
    :func:`~align_jax.methods.econ.losses.econ_loss` on ``batch`` (a
    :class:`~align_jax.methods.econ.losses.Transition` with a leading B axis), global-norm
    clipping (``tr.max_grad_norm`` > 0) and Adam (``tr.learning_rate``) on the parameters
    raveled into one vector, then the soft target update ``thetabar <- tau theta + (1 - tau) thetabar``.
    ``opt_state`` is ``optimizer.init(ravel_pytree(params)[0])``.  Pure; jit it or call it inside a jit.
    """
    optimizer = optax.adam(tr.learning_rate)
    if tr.max_grad_norm > 0:
        optimizer = optax.chain(optax.clip_by_global_norm(tr.max_grad_norm), optimizer)

    def update(params: EconParams, target_params: EconParams, opt_state, batch: Transition):
        (_, info), grads = jax.value_and_grad(econ_loss, has_aux=True)(params, target_params, nets, batch, tr)
        # the optimiser works on one flat vector: a handful of ops instead of a few per tensor
        flat, unravel = ravel_pytree(params)
        updates, opt_state = optimizer.update(ravel_pytree(grads)[0], opt_state, flat)
        new_flat = flat + updates
        target_flat = optax.incremental_update(new_flat, ravel_pytree(target_params)[0], tr.tau)
        return unravel(new_flat), unravel(target_flat), opt_state, info

    return optimizer, update


def make_trainer(config: EconConfig) -> EconTrainer:
    """Builds the jitted pure functions for ``config`` (see the module docstring)."""
    sim_cfg, net_cfg, tr = config.sim, config.network, config.train
    env = make_sim_env(sim_cfg)
    n, e_envs, a_num = sim_cfg.num_executors, tr.num_envs, net_cfg.num_actions
    default_env_params = make_env_params(sim_cfg, reward_weights=config.reward_weights,
                                         **config.env.kwargs())
    nets = network_graphdefs(net_cfg, env.observation_dim, env.commitment_dim)
    grid = jnp.asarray(nets.grid, jnp.float32)  # [A, 2]
    buffer = make_replay_buffer(tr)
    optimizer, apply_update = make_update(nets, tr)

    def to_action(index: jax.Array) -> Action:
        return Action(temperature=grid[index, 0], top_p=grid[index, 1])

    num_periods = tr.num_steps // tr.update_every

    learn_alpha = tr.reward_weight_lr > 0

    def init_state_fn(key: jax.Array, env_params: EnvParams) -> TrainState:
        if learn_alpha:  # alpha lives on the simplex
            env_params = env_params._replace(reward_weights=env_params.reward_weights
                                             / env_params.reward_weights.sum())
        k_net, k_env, k_run = jax.random.split(key, 3)
        _, params = init_networks(net_cfg, env.observation_dim, env.commitment_dim, n, k_net)
        obs, env_state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k_env, e_envs), env_params)
        zeros = jnp.zeros((num_periods,))
        log = TrainLog(episodes=zeros, correct=zeros, team_reward=zeros, epsilon=zeros,
                       updated=jnp.zeros((num_periods,), bool), loss=LossInfo(*([zeros] * len(LossInfo._fields))))
        return TrainState(
            params=params, target_params=params, initial_params=params,
            opt_state=optimizer.init(ravel_pytree(params)[0]),
            buffer_state=_strong(buffer.init(zero_transitions(n, env.observation_dim, env.commitment_dim))), env_state=env_state, obs=obs, env_params=env_params,
            key=k_run, step=jnp.zeros((), jnp.int32), num_updates=jnp.zeros((), jnp.int32), log=log)

    def env_step(state: TrainState, _):
        keys = jax.random.split(jax.random.fold_in(jax.random.fold_in(state.key, 0), state.step), e_envs + 1)
        u = jax.random.uniform(keys[0], (2, e_envs, n))
        epsilon = epsilon_schedule(state.step, tr.epsilon_start, tr.epsilon_end, tr.epsilon_decay_steps)
        greedy = greedy_actions(nets, state.params, state.obs)
        uniform_action = jnp.minimum((u[1] * a_num).astype(jnp.int32), a_num - 1)
        index = jnp.where(u[0] < epsilon, uniform_action, greedy).astype(jnp.int32)
        out = jax.vmap(env.step, in_axes=(0, 0, 0, None))(keys[1:], state.env_state, to_action(index),
                                                          state.env_params)
        done = out.done.astype(jnp.float32)
        transitions = Transition(
            obs=state.obs, action=index, local_reward=out.local_reward, team_reward=out.team_reward,
            next_obs=out.obs, done=done, mask=jnp.broadcast_to(state.env_params.executor_mask, (e_envs, n)),
            commit_features=out.info.commit_features)
        paid = done[:, None] * transitions.mask  # [E, N]: the executors whose reward was paid this step
        metrics = jnp.concatenate([
            jnp.stack([done.sum(), (done * out.info.commit_correct).sum(), out.team_reward.sum(), epsilon,
                       paid.sum()]),
            (out.info.reward_components * paid[..., None]).sum((0, 1))])  # [5 + 3]
        state = state._replace(buffer_state=buffer.add(state.buffer_state, transitions), env_state=out.state,
                               obs=out.obs, step=state.step + 1)
        return state, metrics

    def update(state: TrainState) -> tuple[TrainState, LossInfo, jax.Array]:
        key = jax.random.fold_in(jax.random.fold_in(state.key, 1), state.num_updates)
        batch = sample_batch(buffer, state.buffer_state, key)
        params, target_params, opt_state, info = apply_update(state.params, state.target_params,
                                                              state.opt_state, batch)
        ready = buffer.can_sample(state.buffer_state)
        keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(ready, x, y), a, b)  # noqa: E731
        state = state._replace(params=keep(params, state.params),
                               target_params=keep(target_params, state.target_params),
                               opt_state=keep(opt_state, state.opt_state))
        return state, info, ready

    def period(_, state: TrainState) -> TrainState:
        state, metrics = jax.lax.scan(env_step, state, None, length=tr.update_every)
        state, info, ready = update(state)
        if learn_alpha:
            count, components = metrics[:, 4].sum(), metrics[:, 5:].sum(0)
            alpha = update_reward_weights(state.env_params.reward_weights, components / jnp.maximum(count, 1.0),
                                          tr.reward_weight_lr, ready=count > 0)
            state = state._replace(env_params=state.env_params._replace(reward_weights=alpha))
        i = state.num_updates
        put = lambda log, value: log.at[i].set(value, mode="drop")  # noqa: E731
        totals = metrics.sum(0)
        log = state.log
        log = TrainLog(episodes=put(log.episodes, totals[0]), correct=put(log.correct, totals[1]),
                       team_reward=put(log.team_reward, totals[2]), epsilon=put(log.epsilon, metrics[-1, 3]),
                       updated=put(log.updated, ready), loss=jax.tree.map(put, log.loss, info))
        return state._replace(num_updates=i + 1, log=log)

    def segment(state: TrainState, num_steps) -> TrainState:
        if isinstance(num_steps, int) and num_steps % tr.update_every:
            raise ValueError(f"num_steps must be a multiple of update_every={tr.update_every}, got {num_steps}")
        return jax.lax.fori_loop(0, jnp.asarray(num_steps, jnp.int32) // tr.update_every, period, state)

    def train_fn(key: jax.Array, env_params: EnvParams) -> TrainState:
        return segment(init_state_fn(key, env_params), tr.num_steps)

    jit_init = jax.jit(init_state_fn)
    jit_segment = jax.jit(segment)
    jit_train = jax.jit(train_fn)

    def train_segment(state: TrainState, num_steps) -> TrainState:
        if isinstance(num_steps, int) and num_steps % tr.update_every:
            raise ValueError(f"num_steps must be a multiple of update_every={tr.update_every}, got {num_steps}")
        return jit_segment(state, num_steps)

    def init_state(key: jax.Array, env_params: Optional[EnvParams] = None) -> TrainState:
        return jit_init(key, default_env_params if env_params is None else env_params)

    def train(key: jax.Array, env_params: Optional[EnvParams] = None) -> TrainState:
        return jit_train(key, default_env_params if env_params is None else env_params)

    # ------------------------------------------------------------------ evaluation
    def rollout(act: Callable, key: jax.Array, env_params: EnvParams):
        """One question to its end under ``act(obs [N, F], key) -> Action``.

        Returns [4 + 2N]: commitment correct, rounds, team reward, executors' final accuracy,
        then per executor the mean log temperature and mean top-p over the rounds played."""
        k_reset, k_steps = jax.random.split(key)
        obs, env_state = env.reset(k_reset, env_params)
        mask = env_params.executor_mask

        def body(carry, k):
            obs, env_state, finished, result, played = carry
            k_act, k_env = jax.random.split(k)
            action = act(obs, k_act)
            out = env.step(k_env, env_state, action, env_params)
            newly = out.done & ~finished
            executor_acc = (out.info.answer_correct * mask).sum() / jnp.maximum(mask.sum(), 1.0)
            now = jnp.stack([out.info.commit_correct.astype(jnp.float32), out.info.rounds.astype(jnp.float32),
                             out.team_reward, executor_acc])
            live = (~finished).astype(jnp.float32)
            played = played + live * jnp.concatenate([jnp.log(action.temperature), action.top_p])
            return (out.obs, out.state, finished | out.done, jnp.where(newly, now, result), played), None

        init = (obs, env_state, jnp.zeros((), bool), jnp.zeros((4,)), jnp.zeros((2 * n,)))
        (_, _, _, result, played), _ = jax.lax.scan(body, init, jax.random.split(k_steps, sim_cfg.max_rounds))
        return jnp.concatenate([result, played / result[1]])

    def evaluate_fn(state: TrainState, key: jax.Array) -> EvalResult:
        env_params = state.env_params
        keys = jax.random.split(key, tr.eval_questions)
        fixed = jnp.asarray([tr.baseline_temperature, tr.baseline_top_p], jnp.float32)
        both = jax.tree.map(lambda a, b: jnp.stack([a, b]), state.params, state.initial_params)

        def act(policy: jax.Array, obs: jax.Array, k: jax.Array) -> Action:
            # policy 0 learned, 1 initial (greedy w.r.t. that Q), 2 uniform random, 3 fixed.
            params = jax.tree.map(lambda x: x[jnp.minimum(policy, 1)], both)
            index = greedy_actions(nets, params, obs)
            index = jnp.where(policy == 2, jnp.minimum((jax.random.uniform(k, (n,)) * a_num).astype(jnp.int32),
                                                       a_num - 1), index)
            values = jnp.where(policy == 3, fixed[None, :], grid[index])
            return Action(temperature=values[:, 0], top_p=values[:, 1])

        # one program for the four policies, and the same questions and keys for each of them
        per_policy = jax.vmap(lambda p: jax.vmap(lambda k: rollout(functools.partial(act, p), k, env_params))(
            keys).mean(0))(jnp.arange(4))
        evals = [PolicyEval(accuracy=r[0], rounds=r[1], team_reward=r[2], executor_accuracy=r[3],
                            temperature=jnp.exp(r[4:4 + n]), top_p=r[4 + n:]) for r in per_policy]
        first_obs = jax.vmap(lambda k: env.reset(jax.random.split(k)[0], env_params)[0])(keys)  # [Q, N, F]
        index = greedy_actions(nets, state.params, first_obs)  # [Q, N]
        return EvalResult(learned=evals[0], initial=evals[1], random=evals[2], fixed=evals[3],
                          greedy_temperature=jnp.exp(jnp.log(grid[index, 0]).mean(0)),
                          greedy_top_p=grid[index, 1].mean(0))

    return EconTrainer(config=config, env=env, networks=nets, default_env_params=default_env_params,
                       init_state=init_state, train_segment=train_segment, train=train,
                       evaluate=jax.jit(evaluate_fn))


def make_train(config: EconConfig) -> Callable:
    """PureJaxRL's entry point: ``train(key, env_params=None) -> TrainState`` (curve in ``.log``),
    the whole run as one jit; ``jax.vmap(make_train(config))(keys)`` trains many seeds at once."""
    return make_trainer(config).train

