"""``align-jax econ train|eval CONFIG``: simulated ECON training with checkpoints and resume.

``train`` trains S = ``run.num_seeds`` seeds at once (one jitted, vmapped program) in
segments of ``run.checkpoint_every`` steps, saving an orbax checkpoint of the whole train
state after each, under a progress bar.  Killed and rerun with the same command, it
restores the newest checkpoint and continues: because every step and update folds its
index into the run's key, the resumed run reproduces the uninterrupted one (same curve,
same parameters).  A checkpoint directory written by another config, or a corrupt one, is
refused with a :class:`~align_jax.methods.econ.checkpoint.CheckpointError` naming the
directory; nothing is overwritten.  At the end it writes the training curve
(``train_curve.csv``, ``train_curve.png``).

``eval`` restores the finished run and evaluates, on the same questions and randomness,
the learned policy, the initial policy (belief networks frozen at initialisation), a
uniformly random policy and the fixed-parameter baseline.  One row per (seed, policy) is
appended atomically to ``results.jsonl`` (a rerun adds only missing rows), then
``summary.md`` / ``summary.json`` (means over seeds with 95% bootstrap intervals over seeds,
and paired differences learned - baseline) and ``accuracy.png``.

Run directory: ``<run.output_dir>/<name>/seed<seed>/`` with ``config.json``,
``checkpoints/``, the curve, the rows and the summary.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from align_jax import runner
from align_jax.config import ConfigError, config_to_dict, load_config
from align_jax.methods.econ.checkpoint import Checkpointer
from align_jax.methods.econ.config import EconConfig, RunSettings
from align_jax.methods.econ.networks import EconNetworks
from align_jax.methods.econ.train import EconTrainer, EvalResult, TrainState, make_trainer

__all__ = [
    "POLICIES",
    "TrainOutcome",
    "load_econ_config",
    "econ_run_dir",
    "econ_settings_hash",
    "seed_keys",
    "eval_keys",
    "seed_programs",
    "train_run",
    "eval_run",
    "trained_seed",
    "trained_policies",
    "eval_rows",
    "summarize_rows",
    "add_econ_subcommand",
]

#: The evaluated policies, in :class:`~align_jax.methods.econ.train.EvalResult` order.
POLICIES = ("learned", "initial", "random", "fixed")


class TrainOutcome(NamedTuple):
    """What :func:`train_run` did.

    Attributes:
      state: the final (or, when stopped early, the last) :class:`TrainState`, stacked over S seeds.
      directory: the run directory.
      resumed_from: the step restored from a checkpoint (0 = fresh start).
      steps_run: steps trained by this call.
      finished: whether ``train.num_steps`` were reached.
      seconds: wall time of the training loop (compilation included).
    """

    state: TrainState
    directory: Path
    resumed_from: int
    steps_run: int
    finished: bool
    seconds: float


def load_econ_config(path) -> EconConfig:
    """Reads an ECON YAML config (``file:line: field: message`` on bad input)."""
    return load_config(path, EconConfig)


def econ_run_dir(config: EconConfig) -> Path:
    """``run.output_dir/<name>/seed<seed>``."""
    return runner.run_dir(config.run.output_dir, config.name, config.seed)


def econ_settings_hash(config: EconConfig) -> str:
    """Hash of every setting that determines the numbers (not the output directory, the
    checkpoint interval or the number of checkpoints kept)."""
    neutral = dataclasses.replace(config.run, output_dir=RunSettings.output_dir,
                                  checkpoint_every=RunSettings.checkpoint_every, max_to_keep=RunSettings.max_to_keep)
    # the real fine-tuning section has its own checkpoints (econ.real_train); it does not change the simulated run
    return runner.settings_hash(dataclasses.replace(config, run=neutral, real=None))


def seed_keys(config: EconConfig) -> jax.Array:
    """[S] keys, seed i = ``jax.random.key(seed + i)`` (so a one-seed run of seed + i equals row i)."""
    return jax.vmap(jax.random.key)(config.seed + jnp.arange(config.run.num_seeds))


def _checkpointer(config: EconConfig, directory: Path) -> Checkpointer:
    return Checkpointer(directory / "checkpoints", settings=econ_settings_hash(config),
                        config=json.loads(json.dumps(config_to_dict(config))), max_to_keep=config.run.max_to_keep)


_PROGRAMS: dict[int, tuple] = {}


def seed_programs(trainer: EconTrainer) -> tuple:
    """``(init, segment, evaluate)``: the trainer's functions vmapped over S seeds and jitted,
    built once per trainer (so repeated runs, resumes and evaluations reuse the compiled programs),
    with XLA optimisation level 0 when ``run.fast_compile``.

    ``init(keys [S]) -> TrainState [S]`` (the config's ``env`` parameters);
    ``segment(state [S], num_steps) -> TrainState [S]``;
    ``evaluate(state [S], keys [S]) -> EvalResult [S]``.
    """
    entry = _PROGRAMS.get(id(trainer))
    if entry is None or entry[0] is not trainer:
        options = {"xla_backend_optimization_level": 0} if trainer.config.run.fast_compile else None
        jit = functools.partial(jax.jit, compiler_options=options)
        programs = (jit(jax.vmap(lambda k: trainer.init_state(k))),
                    jit(jax.vmap(trainer.train_segment, in_axes=(0, None))),
                    jit(jax.vmap(trainer.evaluate)))
        entry = _PROGRAMS[id(trainer)] = (trainer, programs)
    return entry[1]


def eval_keys(config: EconConfig) -> jax.Array:
    """[S] evaluation keys: ``split(key(run.eval_seed), S)``."""
    return jax.random.split(jax.random.key(config.run.eval_seed), config.run.num_seeds)


def train_run(config: EconConfig, *, progress: bool = True, figures: bool = True,
              stop_after_segments: Optional[int] = None, trainer: Optional[EconTrainer] = None) -> TrainOutcome:
    """Trains (or resumes) the run of ``config``; see the module docstring.

    Args:
      stop_after_segments: stop after this many segments as if killed (tests, demos).
      trainer: a prebuilt :func:`make_trainer` of ``config`` (reuses its compiled programs).
    Raises:
      CheckpointError: the checkpoint directory belongs to another config or is corrupt.
    """
    directory = econ_run_dir(config)
    checkpoints = _checkpointer(config, directory)  # refuses a foreign directory before writing anything
    trainer = trainer or make_trainer(config)
    init, segment, _ = seed_programs(trainer)
    start = time.perf_counter()
    state = init(seed_keys(config))
    resumed = checkpoints.latest_step() or 0
    if resumed:
        state = checkpoints.restore(state)
    # only now that the checkpoint is known to be good is anything written
    runner.RunFiles(directory, key_field="key", settings=econ_settings_hash(config), config=config)
    total, every = config.train.num_steps, config.run.checkpoint_every or config.train.num_steps
    step, segments = resumed, 0
    with runner.progress_bar(progress) as bar:
        task = bar.add_task(f"econ train {config.name} ({config.run.num_seeds} seeds)", total=total, completed=step)
        while step < total and (stop_after_segments is None or segments < stop_after_segments):
            length = min(every, total - step)
            state = segment(state, length)
            jax.block_until_ready(state)
            step += length
            segments += 1
            checkpoints.save(step, state)
            bar.update(task, completed=step)
    seconds = time.perf_counter() - start
    finished = step >= total
    if finished:
        _write_curve(config, state, directory, figures)
    return TrainOutcome(state=state, directory=directory, resumed_from=resumed, steps_run=step - resumed,
                        finished=finished, seconds=seconds)


def _curve_records(config: EconConfig, state: TrainState) -> list[dict]:
    log = jax.tree.map(np.asarray, state.log)
    records = []
    for s in range(config.run.num_seeds):
        for p in range(log.episodes.shape[1]):
            episodes = float(log.episodes[s, p])
            records.append(dict(
                seed=config.seed + s, period=p, step=(p + 1) * config.train.update_every, episodes=episodes,
                accuracy=float(log.correct[s, p]) / episodes if episodes else float("nan"),
                team_reward=float(log.team_reward[s, p]) / episodes if episodes else float("nan"),
                epsilon=float(log.epsilon[s, p]), updated=bool(log.updated[s, p]),
                **{f"loss_{k}": float(v[s, p]) for k, v in log.loss._asdict().items()}))
    return records


def _write_curve(config: EconConfig, state: TrainState, directory: Path, figures: bool) -> None:
    records = _curve_records(config, state)
    runner.write_csv(directory / "train_curve.csv", records)
    if not figures:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = jax.tree.map(np.asarray, state.log)
    window = max(1, log.episodes.shape[1] // 32)
    kernel = np.ones(window)
    correct = np.convolve(log.correct.sum(0), kernel, "valid")
    episodes = np.maximum(np.convolve(log.episodes.sum(0), kernel, "valid"), 1)
    steps = (np.arange(len(correct)) + window) * config.train.update_every
    loss = log.loss.total.mean(0)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.plot(steps, correct / episodes)
    ax1.set(xlabel="training step", ylabel="commitment accuracy (exploring)",
            title=f"{config.name}: {config.run.num_seeds} seeds")
    ax2.plot((np.arange(len(loss)) + 1) * config.train.update_every, loss)
    ax2.set(xlabel="training step", ylabel="loss", yscale="log")
    fig.tight_layout()
    fig.savefig(directory / "train_curve.png", dpi=120)
    plt.close(fig)


def eval_rows(config: EconConfig, result: EvalResult, reward_weights=None) -> list[dict]:
    """One row per (seed, policy) from a seed-stacked :class:`EvalResult`; ``reward_weights``
    [S, 3], the weights each seed ended with (learned alpha when ``train.reward_weight_lr`` > 0),
    is recorded in every row when given."""
    rows = []
    res = jax.tree.map(np.asarray, result)
    alpha = None if reward_weights is None else np.asarray(reward_weights)
    for s in range(config.run.num_seeds):
        for name in POLICIES:
            pe = getattr(res, name)
            rows.append(dict(
                key=f"seed{config.seed + s}/{name}", seed=config.seed + s, policy=name,
                questions=config.train.eval_questions, accuracy=float(pe.accuracy[s]), rounds=float(pe.rounds[s]),
                team_reward=float(pe.team_reward[s]), executor_accuracy=float(pe.executor_accuracy[s]),
                temperature=[float(x) for x in pe.temperature[s]], top_p=[float(x) for x in pe.top_p[s]]))
            if alpha is not None:
                rows[-1]["reward_weights"] = [float(x) for x in alpha[s]]
    return rows


def summarize_rows(rows: list[dict], *, samples: int = 2000, seed: int = 0) -> dict:
    """Per policy: mean accuracy / rounds / team reward over seeds, a 95% bootstrap interval of
    the mean accuracy over seeds (resamples shared by all policies) and the paired
    difference ``learned - policy`` with its interval."""
    seeds = sorted({r["seed"] for r in rows})
    table = {p: {r["seed"]: r for r in rows if r["policy"] == p} for p in POLICIES}
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(seeds), size=(samples, len(seeds)))
    out: dict[str, Any] = {"seeds": len(seeds), "policies": {}}

    def interval(values):
        means = np.asarray(values)[indices].mean(1)
        return [float(x) for x in np.percentile(means, [2.5, 97.5])]

    learned = np.array([table["learned"][s]["accuracy"] for s in seeds]) if table["learned"] else None
    for p in POLICIES:
        if not table[p] or any(s not in table[p] for s in seeds):
            continue
        acc = np.array([table[p][s]["accuracy"] for s in seeds])
        entry = dict(accuracy=float(acc.mean()), accuracy_ci=interval(acc),
                     rounds=float(np.mean([table[p][s]["rounds"] for s in seeds])),
                     team_reward=float(np.mean([table[p][s]["team_reward"] for s in seeds])),
                     temperature=np.exp(np.mean([np.log(table[p][s]["temperature"]) for s in seeds], 0)).tolist())
        if learned is not None and p != "learned":
            diff = learned - acc
            entry["learned_minus"] = float(diff.mean())
            entry["learned_minus_ci"] = interval(diff)
        out["policies"][p] = entry
    alphas = [r["reward_weights"] for r in rows if "reward_weights" in r]
    if alphas:
        out["reward_weights"] = np.mean(alphas, 0).tolist()
    return out


def _summary_markdown(config: EconConfig, summary: dict) -> str:
    lines = [f"# ECON simulated evaluation: {config.name}", "",
             f"{summary['seeds']} seeds x {config.train.eval_questions} questions, N={config.sim.num_executors} "
             f"executors, G={config.sim.num_groups} coordinators, {config.train.num_steps} training steps. "
             "95% bootstrap intervals over seeds.", "",
             "| policy | accuracy | 95% CI | learned - policy | 95% CI | rounds | team reward | temperature |",
             "|---|---|---|---|---|---|---|---|"]
    for name, e in summary["policies"].items():
        ci = "[{:.3f}, {:.3f}]".format(*e["accuracy_ci"])
        diff = f"{e['learned_minus']:+.3f}" if "learned_minus" in e else ""
        dci = "[{:+.3f}, {:+.3f}]".format(*e["learned_minus_ci"]) if "learned_minus_ci" in e else ""
        temps = ", ".join(f"{t:.2f}" for t in e["temperature"])
        lines.append(f"| {name} | {e['accuracy']:.3f} | {ci} | {diff} | {dci} | {e['rounds']:.2f} | "
                     f"{e['team_reward']:.3f} | {temps} |")
    if "reward_weights" in summary:
        learned = "learned (train.reward_weight_lr > 0)" if config.train.reward_weight_lr > 0 else "fixed"
        lines += ["", f"Reward weights (ts, al, cc), {learned}, mean over seeds: "
                      + ", ".join(f"{w:.3f}" for w in summary["reward_weights"])]
    return "\n".join(lines) + "\n"


def _finished(config: EconConfig, directory: Path) -> tuple[Checkpointer, int]:
    """The run's checkpoints and its final step; a ConfigError when training is not finished."""
    checkpoints = _checkpointer(config, directory)
    step = checkpoints.latest_step()
    if step is None or step < config.train.num_steps:
        raise ConfigError(f"{directory / 'checkpoints'}: training is not finished (step {step or 0} of "
                          f"{config.train.num_steps}); run `align-jax econ train` with this config first")
    return checkpoints, step


def eval_run(config: EconConfig, *, progress: bool = True, figures: bool = True,
             trainer: Optional[EconTrainer] = None) -> dict:
    """Evaluates the finished run of ``config`` (see the module docstring); returns the summary.

    Raises:
      CheckpointError: no finished checkpoint, or one of another config / corrupt.
    """
    directory = econ_run_dir(config)
    checkpoints, step = _finished(config, directory)
    files = runner.RunFiles(directory, key_field="key", settings=econ_settings_hash(config), config=config)
    keys = [f"seed{config.seed + s}/{p}" for s in range(config.run.num_seeds) for p in POLICIES]
    trainer = trainer or make_trainer(config)

    def compute(unit: runner.Unit) -> list[dict]:
        init, _, evaluate = seed_programs(trainer)
        state = checkpoints.restore(init(seed_keys(config)), step)
        return eval_rows(config, evaluate(state, eval_keys(config)), state.env_params.reward_weights)

    runner.run_units(files, [runner.Unit(keys=tuple(keys), label="evaluate")], compute,
                     description=f"econ eval {config.name}", progress=progress)
    rows = files.rows(keys)
    summary = summarize_rows(rows)
    summary.update(name=config.name, settings_hash=econ_settings_hash(config), jax_version=jax.__version__,
                   device=str(jax.devices()[0]))
    files.write_json("summary.json", summary)
    files.write_text("summary.md", _summary_markdown(config, summary))
    if figures:
        _accuracy_figure(config, summary, directory / "accuracy.png")
    return summary


def trained_seed(config: EconConfig, seed_index: int = 0) -> tuple[EconNetworks, TrainState]:
    """``(networks, final TrainState of seed seed_index)`` of the finished run.

    Raises:
      ConfigError: training is not finished, or ``seed_index`` is not a seed of the run.
      CheckpointError: the checkpoints were written by another config, or are corrupt.
    """
    if not 0 <= seed_index < config.run.num_seeds:
        raise ConfigError(f"{config.name}: seed_index {seed_index} is not one of the run's "
                          f"{config.run.num_seeds} seeds")
    checkpoints, step = _finished(config, econ_run_dir(config))
    trainer = make_trainer(config)
    init, _, _ = seed_programs(trainer)
    state = checkpoints.restore(init(seed_keys(config)), step)
    return trainer.networks, jax.tree.map(lambda x: x[seed_index], state)


def trained_policies(config: EconConfig, seed_index: int = 0):
    """``(networks, learned params, initial params)`` of seed ``seed_index`` of the finished run.

    The learned parameters are the belief networks after training; the initial ones are the
    same networks at step 0 (the "without BNE" baseline: belief networks frozen at their
    initial policy).  Raises as :func:`trained_seed`.
    """
    nets, state = trained_seed(config, seed_index)
    return nets, state.params, state.initial_params


def _accuracy_figure(config: EconConfig, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["policies"])
    acc = np.array([summary["policies"][n]["accuracy"] for n in names])
    ci = np.array([summary["policies"][n]["accuracy_ci"] for n in names])
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(names, acc, yerr=np.abs(ci.T - acc), capsize=4)
    ax.set(ylabel="commitment accuracy", ylim=(0, 1), title=f"{config.name} ({summary['seeds']} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _overrides(config: EconConfig, args) -> EconConfig:
    run_changes = {}
    if args.output_dir is not None:
        run_changes["output_dir"] = args.output_dir
    if args.num_seeds is not None:
        run_changes["num_seeds"] = args.num_seeds
    changes: dict[str, Any] = {}
    if args.seed is not None:
        changes["seed"] = args.seed
    if run_changes:
        changes["run"] = dataclasses.replace(config.run, **run_changes)
    return dataclasses.replace(config, **changes) if changes else config


def _train_command(args) -> int:
    config = _overrides(load_econ_config(args.config), args)
    outcome = train_run(config, progress=not args.quiet, figures=not args.no_figures)
    log = jax.tree.map(np.asarray, outcome.state.log)
    tail = max(1, log.episodes.shape[1] // 8)
    acc = log.correct[:, -tail:].sum() / max(log.episodes[:, -tail:].sum(), 1)
    steps = outcome.steps_run * config.train.num_envs * config.run.num_seeds
    print(f"trained {outcome.steps_run} steps x {config.run.num_seeds} seeds "
          f"({'resumed from step ' + str(outcome.resumed_from) if outcome.resumed_from else 'fresh'}) in "
          f"{outcome.seconds:.1f}s ({steps / max(outcome.seconds, 1e-9):.0f} env steps/s, compilation included); "
          f"last-eighth training accuracy {acc:.3f}")
    if config.real is not None and outcome.finished:
        from align_jax.methods.econ.real_train import CURVE_FIELDS, finetune_dir, finetune_run

        state = finetune_run(config, progress=not args.quiet)
        curve = np.asarray(state.curve)
        acc_col = CURVE_FIELDS.index("accuracy")
        print(f"real fine-tuning on {config.real.dataset}/{config.real.split}: {int(state.batches)} of "
              f"{config.real.num_batches} batches, {int(state.count)} transitions; training-episode accuracy "
              f"per batch {', '.join(f'{x:.2f}' for x in curve[:int(state.batches), acc_col])}")
        print(f"real fine-tuning results: {finetune_dir(config)}")
    print(f"results: {outcome.directory}")
    return 0


def _eval_command(args) -> int:
    config = _overrides(load_econ_config(args.config), args)
    summary = eval_run(config, progress=not args.quiet, figures=not args.no_figures)
    print(_summary_markdown(config, summary))
    print(f"results: {econ_run_dir(config)}")
    return 0


def add_econ_subcommand(subparsers) -> None:
    """Adds ``econ train CONFIG`` and ``econ eval CONFIG`` to an ``argparse`` subparsers object."""
    econ = subparsers.add_parser("econ", help="ECON: train belief networks and mixer in simulation, evaluate",
                                 description="ECON in the simulated environment (see configs/econ_sim.yaml)")
    actions = econ.add_subparsers(dest="econ_command", required=True)
    for name, func, help_text in (("train", _train_command, "train (resumes from the newest checkpoint)"),
                                  ("eval", _eval_command, "evaluate a finished run against the baselines")):
        parser = actions.add_parser(name, help=help_text)
        runner.add_run_arguments(parser, ("seed", "output_dir"))
        parser.add_argument("--num-seeds", dest="num_seeds", type=int, default=None, help="override run.num_seeds")
        parser.set_defaults(func=func)
