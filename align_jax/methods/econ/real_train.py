"""ECON trained on real episodes: the belief networks and mixer of a finished simulated run,
fine-tuned with the same TD / BNE losses on transitions of the real pipeline
(:mod:`~align_jax.methods.econ.real`) on GSM8K train questions.

::

    theta_0 = the simulated run's parameters (seed ``seed_index``)
    for batch b = 0 .. ceil(limit / batch_questions) - 1:
        questions  = the batch's training questions (dataset / split / offset of the ``real:`` section)
        episodes   = run_econ_questions(pool, ..., policy = epsilon-greedy w.r.t. Q_i(o_i, .; theta_b),
                                        key = fold_in(fold_in(key(seed), 7), b))
        D          = D + transitions(episodes)                       (every round of every question)
        theta_{b+1} = U updates of econ_loss on minibatches drawn uniformly from D
                      (update u uses fold_in(fold_in(key(seed), 8), b * U + u))
        checkpoint (theta, thetabar, Adam state, D, b + 1); then the batch's episode rows

A transition of question q, round t (the simulator's reward timing, :mod:`~align_jax.methods.econ.sim`:
rewards are paid when the question ends, 0 before)::

    obs = o_t [N, F]  (what the policy acted on)      action = grid index of (tau_i, p_i) [N]
    next_obs = o_{t+1} (zeros after the last round)   done = [t = rounds - 1]
    local_i = w . (R_TS_i, R_AL_i, R_CC_i) at the last round, else 0
    team    = w_TS [commitment = gold] + mean_i (w_AL R_AL_i + w_CC R_CC_i) at the last round, else 0
    commit_features = [vote share, changed, unanimity] after round t

w: the reward weights the simulated run ended with (``reward_weights``, or the learned alpha
when ``train.reward_weight_lr`` > 0); fine-tuning keeps them fixed.

A killed run restarts from its last checkpoint and reproduces the uninterrupted run (every
batch's LLM calls and every update draw their keys from their indices); the episode rows of a
batch finished before the checkpoint are not written twice (``episodes.jsonl`` is keyed by
question).  Files: ``<run dir>/real/`` with ``checkpoints/``, ``episodes.jsonl``, ``curve.csv``
(per batch: accuracy of the commitments, rounds, mean temperature, loss parts) and ``curve.png``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from align_jax import runner
from align_jax.runio import atomic_write
from align_jax.config import ConfigError, config_to_dict
from align_jax.methods.econ.checkpoint import Checkpointer
from align_jax.methods.econ.config import EconConfig, RealTrainSettings
from align_jax.methods.econ.losses import LossInfo, Transition, zero_transitions
from align_jax.methods.econ.networks import EconNetworks, EconParams
from align_jax.methods.econ.real import RealEconSettings, greedy_program, run_econ_questions
from align_jax.methods.econ.sim import COMMITMENT_DIM

__all__ = ["FinetuneState", "CURVE_FIELDS", "real_settings", "explore_policy", "episode_transitions",
           "make_finetune", "finetune_dir", "finetune_run", "finetuned_params"]

#: Columns of the fine-tuning curve, one row per episode batch.
CURVE_FIELDS = ("questions", "accuracy", "rounds", "temperature", "transitions") + tuple(
    f"loss_{name}" for name in LossInfo._fields)


class FinetuneState(NamedTuple):
    """Everything real fine-tuning carries (a pytree; checkpointed after every batch).

    Attributes:
      params, target_params: theta and thetabar.
      opt_state: the optax state (of the raveled parameters).
      data: the collected :class:`~align_jax.methods.econ.losses.Transition` s, leaves [D, ...]
        with capacity D = limit x max_rounds (rows at and past ``count`` are zeros).
      count: [] int32 transitions collected.
      batches: [] int32 episode batches done.
      curve: [num_batches, len(CURVE_FIELDS)] the per-batch curve (rows not yet run are 0).
    """

    params: EconParams
    target_params: EconParams
    opt_state: object
    data: Transition
    count: jax.Array
    batches: jax.Array
    curve: jax.Array


def real_settings(config: EconConfig) -> RealEconSettings:
    """The real pipeline's settings from ``config.real`` (N and T of the simulated run)."""
    real = _section(config)
    return RealEconSettings(model=real.model, num_executors=config.sim.num_executors, num_groups=config.sim.num_groups,
                            max_rounds=config.sim.max_rounds, variance_threshold=real.variance_threshold,
                            strategy_tokens=real.strategy_tokens, executor_tokens=real.executor_tokens,
                            commit_tokens=real.commit_tokens, coordinator_temperature=real.coordinator_temperature,
                            action_likelihood=real.action_likelihood)


def _section(config: EconConfig) -> RealTrainSettings:
    if config.real is None:
        raise ConfigError(f"{config.name}: the config has no `real:` section (real-model fine-tuning)")
    return config.real


def explore_policy(nets: EconNetworks, params: EconParams, epsilon: float, key: jax.Array,
                   record: list) -> Callable:
    """``obs [Q, N, F] -> (temperature [Q, N], top_p [Q, N])``: each executor's greedy grid action
    w.r.t. its local Q, replaced by a uniform one with probability ``epsilon`` (round r draws
    from ``fold_in(key, r)``).  Appends each round's grid indices [Q, N] to ``record``."""
    grid = np.asarray(nets.grid, np.float32)
    greedy = greedy_program(nets)

    def act(obs):
        k_u, k_a = jax.random.split(jax.random.fold_in(key, len(record)))
        index = np.asarray(greedy(params, jnp.asarray(obs, jnp.float32)))
        explore = np.asarray(jax.random.uniform(k_u, index.shape)) < epsilon
        uniform = np.asarray(jax.random.randint(k_a, index.shape, 0, len(grid)))
        index = np.where(explore, uniform, index).astype(np.int32)
        record.append(index)
        return grid[index, 0], grid[index, 1]

    return act


def episode_transitions(rows: list[dict], indices: list[np.ndarray], weights) -> Transition:
    """The transitions of real episodes (see the module docstring), leaves [sum of rounds, ...].

    Args:
      rows: :func:`~align_jax.methods.econ.real.run_econ_questions` rows of Q questions.
      indices: per round, the [Q, N] grid actions the policy played (:func:`explore_policy`'s record).
      weights: (w_TS, w_AL, w_CC).
    """
    w = np.asarray(weights, np.float32)
    out = {name: [] for name in Transition._fields}
    for q, row in enumerate(rows):
        obs = np.asarray(row["observations"], np.float32)  # [R, N, F]
        comps = np.asarray(row["reward_components"], np.float32)  # [R, N, 3]
        feats = np.asarray(row["commit_features"], np.float32)  # [R, C]
        rounds, n = obs.shape[0], obs.shape[1]
        if comps.shape[0] != rounds or feats.shape != (rounds, COMMITMENT_DIM):
            raise ValueError(f"question {q}: {rounds} observations, {comps.shape[0]} reward rounds, "
                             f"commit features {feats.shape}")
        for t in range(rounds):
            last = t == rounds - 1
            local = comps[t] @ w if last else np.zeros(n, np.float32)
            team = (w[0] * row["correct"] + float((comps[t, :, 1] * w[1] + comps[t, :, 2] * w[2]).mean())
                    if last else 0.0)
            out["obs"].append(obs[t])
            out["action"].append(np.asarray(indices[t][q], np.int32))
            out["local_reward"].append(local.astype(np.float32))
            out["team_reward"].append(np.float32(team))
            out["next_obs"].append(np.zeros_like(obs[t]) if last else obs[t + 1])
            out["done"].append(np.float32(last))
            out["mask"].append(np.ones(n, np.float32))
            out["commit_features"].append(feats[t])
    return Transition(**{k: np.stack(v) for k, v in out.items()})


@functools.lru_cache(maxsize=4)
def make_finetune(config: EconConfig, nets: EconNetworks) -> tuple[Callable, Callable]:
    """``(init, train_on)`` for ``config``:

    ``init(params) -> FinetuneState`` (Adam state fresh, no transitions);
    ``train_on(state, key) -> (state, LossInfo of the last update)``: ``updates_per_batch``
    updates (:func:`~align_jax.methods.econ.train.make_update`) on minibatches of
    ``train.batch_size`` drawn uniformly from the first ``count`` transitions (one jit, a
    ``lax.scan`` over the updates; update u uses ``fold_in(key, u)``).  Built once per
    (config, networks), so a resumed run in the same process reuses the compiled update.
    """
    from align_jax.methods.econ.train import make_update

    real, tr = _section(config), config.train
    optimizer, update = make_update(nets, tr)
    capacity = real.limit * config.sim.max_rounds
    n = config.sim.num_executors

    def init(params: EconParams) -> FinetuneState:
        return FinetuneState(params=params, target_params=params, opt_state=optimizer.init(ravel_pytree(params)[0]),
                             data=zero_transitions(n, _obs_dim(config), COMMITMENT_DIM, (capacity,)), count=jnp.zeros((), jnp.int32),
                             batches=jnp.zeros((), jnp.int32),
                             curve=jnp.zeros((real.num_batches, len(CURVE_FIELDS)), jnp.float32))

    @jax.jit
    def train_on(state: FinetuneState, key: jax.Array):
        def body(carry, u):
            params, target, opt = carry
            idx = jax.random.randint(jax.random.fold_in(key, u), (tr.batch_size,), 0, jnp.maximum(state.count, 1))
            batch = jax.tree.map(lambda x: x[idx], state.data)
            params, target, opt, info = update(params, target, opt, batch)
            return (params, target, opt), info

        (params, target, opt), infos = jax.lax.scan(body, (state.params, state.target_params, state.opt_state),
                                                    jnp.arange(real.updates_per_batch))
        return state._replace(params=params, target_params=target, opt_state=opt), jax.tree.map(lambda x: x[-1], infos)

    return init, train_on


def _obs_dim(config: EconConfig) -> int:
    from align_jax.methods.econ.sim import observation_dim

    return observation_dim(config.sim)


def finetune_dir(config: EconConfig) -> Path:
    """``<run dir>/real``."""
    from align_jax.methods.econ.run import econ_run_dir

    return econ_run_dir(config) / "real"


def _hash(config: EconConfig) -> str:
    from align_jax.methods.econ.run import econ_settings_hash

    # data_dir is a location, not a setting; fields added later are left out at their default
    real = runner.stable_asdict(dataclasses.replace(_section(config), data_dir=None))
    blob = json.dumps({"sim": econ_settings_hash(config), "real": real}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _checkpointer(config: EconConfig) -> Checkpointer:
    return Checkpointer(finetune_dir(config) / "checkpoints", settings=_hash(config),
                        config=json.loads(json.dumps(config_to_dict(config))), max_to_keep=2)


@functools.lru_cache(maxsize=4)
def _template(config: EconConfig, seed_index: int):
    """``(networks, FinetuneState at batch 0, train_on, reward weights)`` from the finished simulated
    run: its learned parameters, and the reward weights it ended with (the configured ones, or
    the learned alpha when ``train.reward_weight_lr`` > 0)."""
    from align_jax.methods.econ.run import trained_seed

    nets, trained = trained_seed(config, seed_index)
    init, train_on = make_finetune(config, nets)
    return nets, init(trained.params), train_on, tuple(float(w) for w in trained.env_params.reward_weights)


def finetuned_params(config: EconConfig, seed_index: int = 0) -> tuple[EconNetworks, EconParams]:
    """The networks and the parameters after real fine-tuning (a ConfigError naming the
    checkpoint directory when it is not finished; CheckpointError when foreign or corrupt)."""
    real = _section(config)
    nets, template, _, _ = _template(config, seed_index)
    checkpoints = _checkpointer(config)
    step = checkpoints.latest_step()
    if step is None or step < real.num_batches:
        raise ConfigError(f"{checkpoints.directory}: real fine-tuning is not finished (batch {step or 0} of "
                          f"{real.num_batches}); run `align-jax econ train` with {config.name}'s config first")
    return nets, checkpoints.restore(template, step).params


def finetune_run(config: EconConfig, *, pool=None, seed_index: int = 0, progress: bool = True,
                 figures: bool = True, stop_after: Optional[int] = None) -> FinetuneState:
    """Fine-tunes the finished simulated run of ``config`` on real episodes (module docstring);
    resumes from the last checkpoint.  ``pool`` defaults to a
    :class:`~align_jax.methods.candidates.ModelPool` at ``real.param_dtype``; ``stop_after``
    stops after that many batches of this call (tests: a kill between checkpoints); ``figures``
    draws ``curve.png`` next to ``curve.csv``."""
    from align_jax.data import datasets as datasets_lib
    from align_jax.methods.candidates import ModelPool

    real = _section(config)
    problems = datasets_lib.load_dataset(real.dataset, real.split, limit=real.limit, offset=real.offset,
                                         data_dir=real.data_dir)
    if len(problems) < real.limit:
        raise ConfigError(f"real.limit: {real.dataset}/{real.split} has {len(problems)} questions from offset "
                          f"{real.offset}, fewer than limit={real.limit}")
    nets, state, train_on, weights = _template(config, seed_index)
    checkpoints = _checkpointer(config)
    step = checkpoints.latest_step()
    if step is not None:
        state = checkpoints.restore(state, step)
    files = runner.RunFiles(finetune_dir(config), key_field="question_id", settings=_hash(config), config=config)
    pool = pool or ModelPool(dtype="float32", param_dtype=real.param_dtype)
    settings = real_settings(config)
    base = jax.random.key(config.seed + seed_index)
    done_now = 0
    with runner.progress_bar(progress) as bar:
        task = bar.add_task(f"econ real {config.name}", total=real.num_batches, completed=int(state.batches))
        for b in range(int(state.batches), real.num_batches):
            if stop_after is not None and done_now >= stop_after:
                break
            chunk = problems[b * real.batch_questions:(b + 1) * real.batch_questions]
            state, rows = _episode_batch(state, b, chunk, nets, train_on, pool, settings, weights, real.epsilon, base)
            files.record([dict(question_id=p.id, batch=b, correct=r["correct"], rounds=r["rounds"],
                               answer=r["answer"], gold=p.gold, temperatures=r["temperatures"], top_ps=r["top_ps"],
                               commitments=r["commitments"], cost=r["cost"]) for p, r in zip(chunk, rows)])
            checkpoints.save(b + 1, state)
            done_now += 1
            bar.advance(task)
    if int(state.batches) == real.num_batches:
        _write_curve(finetune_dir(config), np.asarray(state.curve), figures)
    return state


def _episode_batch(state: FinetuneState, b: int, chunk, nets, train_on, pool, settings, weights, epsilon, base):
    """Batch ``b``: episodes on ``chunk``, their transitions added, the updates, the curve row."""
    record: list = []
    policy = explore_policy(nets, state.params, epsilon, jax.random.fold_in(jax.random.fold_in(base, 9), b), record)
    rows = run_econ_questions(pool, settings, [p.question for p in chunk], [p.gold for p in chunk], policy,
                              jax.random.fold_in(jax.random.fold_in(base, 7), b))
    new = episode_transitions(rows, record, weights)
    count = int(state.count)
    data = jax.tree.map(lambda d, x: d.at[count:count + x.shape[0]].set(x), state.data, new)
    state = state._replace(data=data, count=jnp.asarray(count + new.done.shape[0], jnp.int32))
    state, info = train_on(state, jax.random.fold_in(jax.random.fold_in(base, 8), b))
    temps = np.concatenate([np.asarray(r["temperatures"]).reshape(-1) for r in rows])
    curve = [len(rows), float(np.mean([r["correct"] for r in rows])), float(np.mean([r["rounds"] for r in rows])),
             float(np.exp(np.log(temps).mean())), float(state.count)] + [float(x) for x in info]
    state = state._replace(curve=state.curve.at[b].set(jnp.asarray(curve, jnp.float32)),
                           batches=jnp.asarray(b + 1, jnp.int32))
    return state, rows


def _write_curve(directory: Path, curve: np.ndarray, figures: bool = True) -> None:
    lines = ["batch," + ",".join(CURVE_FIELDS)] + [f"{b}," + ",".join(f"{x:.6g}" for x in row)
                                                   for b, row in enumerate(curve)]
    atomic_write(directory / "curve.csv", "\n".join(lines) + "\n")
    if not figures:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3))
    x = np.arange(len(curve))
    for ax, col, label in zip(axes, (1, 3, 5), ("commitment accuracy (training batch)", "mean temperature",
                                                 "loss (last update)")):
        ax.plot(x, curve[:, col], marker="o")
        ax.set_xlabel("episode batch")
        ax.set_title(label, fontsize=9)
    fig.tight_layout()
    fig.savefig(directory / "curve.png", dpi=120)
    plt.close(fig)
