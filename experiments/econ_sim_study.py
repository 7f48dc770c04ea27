"""ECON in simulation at scale: with vs without BNE across difficulty x heterogeneity, and
more executors flat vs hierarchical.  Writes CSV rows, summary.md/json and figures.

Part A (``bne``): for each (difficulty, heterogeneity) point, S seeds trained at once (one
jitted program, seeds vmapped; the point's numbers are array arguments, so every point
reuses it) and evaluated on the same questions with four policies:

* ``learned``   greedy w.r.t. the trained Q (full loss, BNE term included);
* ``initial``   belief networks frozen at their initial policy (the issue's "without BNE");
* ``fixed``     every executor at temperature 1.0, top-p 0.95;
* ``random``    a uniformly random grid action per executor per round;

plus ``learned_no_bne``: the same training with ``bne_weight = 0`` (an ablation of the loss term).

Part B (``scaling``): N' = 3, 5, 7, 9 executors under one coordinator (9 slots, absent ones
masked, so one program) vs 9 executors under 3 coordinators and a central combiner, with
the simulator's coordinator-overload term on (overload_rate 0.3, capacity 3: the default)
and off (0.0).  The overload term is a modelling assumption that stands in for the
paper's observation; the off setting shows what the result owes to it.

Part C (``alpha``): the same points as part A trained with learnable reward weights
(``train.reward_weight_lr`` = ``--alpha-lr``, :func:`~align_jax.methods.econ.losses.update_reward_weights`),
paired by seed and evaluation questions with part A's ``learned`` (fixed 0.5 / 0.3 / 0.2): the
paper's "fixed alpha" ablation, and the alpha each point ends with.

    python experiments/econ_sim_study.py                      # 64 seeds, about 10-15 min on 2 CPU cores
    python experiments/econ_sim_study.py --seeds 8 --steps 512 --out /tmp/econ_quick   # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from align_jax.methods.econ.config import EconConfig, SimConfig
from align_jax.methods.econ.run import POLICIES, load_econ_config
from align_jax.methods.econ.sim import make_env_params
from align_jax.methods.econ.train import make_trainer

DIFFICULTIES = (-1.0, 0.0, 1.0)
HETEROGENEITIES = (0.0, 0.5, 1.0)


def _program(config: EconConfig):
    """``(env_params, keys [S], eval_keys [S]) -> (EvalResult [S], log [S])``, one jit."""
    trainer = make_trainer(config)

    def one(env_params, key, eval_key):
        state = trainer.train(key, env_params)
        return trainer.evaluate(state, eval_key), state.log

    return trainer, jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))


def _rows(result, log, base: dict, seeds: np.ndarray, policies=POLICIES, rename=None) -> list[dict]:
    result = jax.tree.map(np.asarray, result)
    rows = []
    tail = max(1, log.episodes.shape[1] // 8)
    train_acc = np.asarray(log.correct[:, -tail:]).sum(1) / np.maximum(np.asarray(log.episodes[:, -tail:]).sum(1), 1)
    for s, seed in enumerate(seeds):
        for p in policies:
            pe = getattr(result, p)
            rows.append(dict(base, seed=int(seed), policy=(rename or {}).get(p, p), accuracy=float(pe.accuracy[s]),
                             rounds=float(pe.rounds[s]), team_reward=float(pe.team_reward[s]),
                             executor_accuracy=float(pe.executor_accuracy[s]),
                             temperature=json.dumps([round(float(x), 4) for x in pe.temperature[s]]),
                             train_accuracy_last=float(train_acc[s])))
    return rows


def bne_study(base: EconConfig, seeds: np.ndarray, keys, eval_keys) -> pd.DataFrame:
    rows = []
    variants = (("bne", base), ("no_bne", dataclasses.replace(base, train=dataclasses.replace(base.train,
                                                                                           bne_weight=0.0))))
    for variant, config in variants:
        trainer, program = _program(config)
        for d in DIFFICULTIES:
            for h in HETEROGENEITIES:
                start = time.perf_counter()
                params = make_env_params(config.sim, **dict(config.env.kwargs(), difficulty=d, heterogeneity=h),
                                         reward_weights=config.reward_weights)
                result, log = program(params, keys, eval_keys)
                jax.block_until_ready(result)
                point = dict(difficulty=d, heterogeneity=h,
                             best_temperatures=json.dumps([round(float(t), 4) for t in
                                                           np.exp(np.asarray(params.log_best_temperature))]))
                if variant == "bne":
                    rows += _rows(result, log, point, seeds)
                else:
                    rows += _rows(result, log, point, seeds, policies=("learned",),
                                  rename={"learned": "learned_no_bne"})
                print(f"  bne study {variant} d={d:+.1f} h={h:.1f}: "
                      f"learned {float(result.learned.accuracy.mean()):.3f} "
                      f"initial {float(result.initial.accuracy.mean()):.3f} "
                      f"fixed {float(result.fixed.accuracy.mean()):.3f} ({time.perf_counter() - start:.1f}s)",
                      flush=True)
    return pd.DataFrame(rows)


def alpha_study(base: EconConfig, seeds: np.ndarray, keys, eval_keys, lr: float) -> pd.DataFrame:
    rows = []
    config = dataclasses.replace(base, train=dataclasses.replace(base.train, reward_weight_lr=lr))
    trainer = make_trainer(config)

    def one(env_params, key, eval_key):
        state = trainer.train(key, env_params)
        return trainer.evaluate(state, eval_key), state.log, state.env_params.reward_weights

    program = jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))
    for d in DIFFICULTIES:
        for h in HETEROGENEITIES:
            start = time.perf_counter()
            params = make_env_params(config.sim, **dict(config.env.kwargs(), difficulty=d, heterogeneity=h),
                                     reward_weights=config.reward_weights)
            result, log, alpha = program(params, keys, eval_keys)
            jax.block_until_ready(result)
            new = _rows(result, log, dict(difficulty=d, heterogeneity=h, alpha_lr=lr), seeds, policies=("learned",),
                        rename={"learned": "learned_alpha"})
            for row, a in zip(new, np.asarray(alpha)):
                row.update(alpha_ts=float(a[0]), alpha_al=float(a[1]), alpha_cc=float(a[2]))
            rows += new
            print(f"  alpha study d={d:+.1f} h={h:.1f}: learned alpha {float(result.learned.accuracy.mean()):.3f}, "
                  f"alpha {np.round(np.asarray(alpha).mean(0), 3).tolist()} ({time.perf_counter() - start:.1f}s)",
                  flush=True)
    return pd.DataFrame(rows)


def summarize_alpha(bne: pd.DataFrame, alpha: pd.DataFrame) -> tuple[str, list]:
    """Part C's table: learned alpha vs fixed alpha (part A's ``learned``), paired by seed."""
    rng = np.random.default_rng(1)
    lr = float(alpha.alpha_lr.iloc[0])
    lines = [f"## C. Learnable reward weights (alpha, exponentiated gradient on L_dr, lr {lr}) vs fixed "
             "0.5 / 0.3 / 0.2", "",
             "| difficulty | heterogeneity | fixed alpha | learned alpha | learned - fixed | final alpha (ts, al, cc) |",
             "|---|---|---|---|---|---|"]
    out = []
    for (d, h), group in alpha.groupby(["difficulty", "heterogeneity"]):
        fixed = bne[(bne.difficulty == d) & (bne.heterogeneity == h) & (bne.policy == "learned")]
        fixed = fixed.sort_values("seed")["accuracy"].to_numpy()
        group = group.sort_values("seed")
        learned = group["accuracy"].to_numpy()
        diff = learned - fixed
        a = group[["alpha_ts", "alpha_al", "alpha_cc"]].to_numpy().mean(0)
        entry = dict(difficulty=d, heterogeneity=h, fixed=[float(fixed.mean()), *_ci(fixed, rng)],
                     learned=[float(learned.mean()), *_ci(learned, rng)], diff=[float(diff.mean()), *_ci(diff, rng)],
                     alpha=a.tolist())
        out.append(entry)
        lines.append(f"| {d:+.1f} | {h:.1f} | {entry['fixed'][0]:.3f} [{entry['fixed'][1]:.3f}, {entry['fixed'][2]:.3f}] "
                     f"| {entry['learned'][0]:.3f} [{entry['learned'][1]:.3f}, {entry['learned'][2]:.3f}] "
                     f"| {entry['diff'][0]:+.3f} [{entry['diff'][1]:+.3f}, {entry['diff'][2]:+.3f}] "
                     f"| {a[0]:.2f}, {a[1]:.2f}, {a[2]:.2f} |")
    return "\n".join(lines) + "\n", out


def scaling_study(base: EconConfig, seeds: np.ndarray, keys, eval_keys) -> pd.DataFrame:
    rows = []
    env = dataclasses.replace(base.env, heterogeneity=0.0, difficulty=0.0)
    setups = [("flat", SimConfig(num_executors=9, num_groups=1, max_rounds=base.sim.max_rounds), (3, 5, 7, 9)),
              ("hierarchical", SimConfig(num_executors=9, num_groups=3, max_rounds=base.sim.max_rounds), (9,))]
    for variant, sim, actives in setups:
        config = dataclasses.replace(base, sim=sim, env=env)
        trainer, program = _program(config)
        for overload in (0.3, 0.0):
            for n_active in actives:
                start = time.perf_counter()
                kwargs = dict(env.kwargs(), num_active=n_active, overload_rate=overload)
                params = make_env_params(sim, **kwargs, reward_weights=config.reward_weights)
                result, log = program(params, keys, eval_keys)
                jax.block_until_ready(result)
                point = dict(variant=variant, executors=n_active, coordinators=sim.num_groups, overload_rate=overload)
                new = _rows(result, log, point, seeds, policies=("learned", "fixed", "initial"))
                for row in new:  # LLM calls per question: executors + coordinators (+ central) per round
                    per_round = n_active + sim.num_groups + (1 if sim.num_groups > 1 else 0)
                    row["calls_per_question"] = row["rounds"] * per_round
                rows += new
                print(f"  scaling {variant} N={n_active} overload={overload}: learned "
                      f"{float(result.learned.accuracy.mean()):.3f} fixed {float(result.fixed.accuracy.mean()):.3f} "
                      f"({time.perf_counter() - start:.1f}s)", flush=True)
    return pd.DataFrame(rows)


def _ci(values: np.ndarray, rng: np.random.Generator, samples: int = 2000) -> tuple[float, float]:
    idx = rng.integers(0, len(values), size=(samples, len(values)))
    low, high = np.percentile(values[idx].mean(1), [2.5, 97.5])
    return float(low), float(high)


def summarize(bne: pd.DataFrame, scaling: pd.DataFrame) -> tuple[str, dict]:
    rng = np.random.default_rng(0)
    out: dict = {"bne": [], "scaling": []}
    lines = ["## A. With vs without BNE (mean commitment accuracy over seeds, 95% bootstrap CI over seeds)", "",
             "| difficulty | heterogeneity | learned (BNE) | learned, bne_weight=0 | initial (frozen) | fixed T=1.0 | "
             "random | learned - initial | learned - fixed | learned temperatures | best temperatures |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (d, h), group in bne.groupby(["difficulty", "heterogeneity"]):
        acc = {p: g.sort_values("seed")["accuracy"].to_numpy() for p, g in group.groupby("policy")}
        entry = dict(difficulty=d, heterogeneity=h)
        cells = []
        for p in ("learned", "learned_no_bne", "initial", "fixed", "random"):
            mean, (lo, hi) = float(acc[p].mean()), _ci(acc[p], rng)
            entry[p] = [mean, lo, hi]
            cells.append(f"{mean:.3f} [{lo:.3f}, {hi:.3f}]")
        for other in ("initial", "fixed"):
            diff = acc["learned"] - acc[other]
            lo, hi = _ci(diff, rng)
            entry[f"learned_minus_{other}"] = [float(diff.mean()), lo, hi]
            cells.append(f"{diff.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]")
        learned_t = np.exp(np.mean([np.log(json.loads(t)) for t in group[group.policy == "learned"]["temperature"]], 0))
        cells.append(", ".join(f"{t:.2f}" for t in learned_t))
        cells.append(", ".join(f"{t:.2f}" for t in json.loads(group["best_temperatures"].iloc[0])))
        lines.append(f"| {d:+.1f} | {h:.1f} | " + " | ".join(cells) + " |")
        out["bne"].append(entry)
    lines += ["", "## B. More executors: one coordinator (flat) vs 3 coordinators + central (hierarchical)", "",
              "| overload_rate | variant | executors | learned | fixed T=1.0 | initial | rounds (learned) | "
              "LLM calls / question (learned) |", "|---|---|---|---|---|---|---|---|"]
    for (overload, variant, n), group in scaling.groupby(["overload_rate", "variant", "executors"], sort=False):
        acc = {p: g.sort_values("seed")["accuracy"].to_numpy() for p, g in group.groupby("policy")}
        learned = group[group.policy == "learned"]
        cells, entry = [], dict(overload_rate=overload, variant=variant, executors=int(n))
        for p in ("learned", "fixed", "initial"):
            mean, (lo, hi) = float(acc[p].mean()), _ci(acc[p], rng)
            entry[p] = [mean, lo, hi]
            cells.append(f"{mean:.3f} [{lo:.3f}, {hi:.3f}]")
        entry["rounds"], entry["calls"] = float(learned.rounds.mean()), float(learned.calls_per_question.mean())
        lines.append(f"| {overload} | {variant} | {int(n)} | " + " | ".join(cells)
                     + f" | {entry['rounds']:.2f} | {entry['calls']:.1f} |")
        out["scaling"].append(entry)
    return "\n".join(lines) + "\n", out


def figures(bne: pd.DataFrame, scaling: pd.DataFrame, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hets = sorted(bne.heterogeneity.unique())
    fig, axes = plt.subplots(1, len(hets), figsize=(4 * len(hets), 3.3), sharey=True)
    for ax, h in zip(np.atleast_1d(axes), hets):
        sub = bne[bne.heterogeneity == h]
        for p in ("learned", "learned_no_bne", "initial", "fixed", "random"):
            g = sub[sub.policy == p].groupby("difficulty")["accuracy"]
            mean, sem = g.mean(), g.std() / np.sqrt(g.count())
            ax.errorbar(mean.index, mean.values, yerr=1.96 * sem.values, marker="o", capsize=3, label=p)
        ax.set(title=f"heterogeneity {h}", xlabel="difficulty (logit)")
    np.atleast_1d(axes)[0].set_ylabel("commitment accuracy")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "bne_study.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.3), sharey=True)
    for ax, overload in zip(axes, (0.3, 0.0)):
        sub = scaling[(scaling.overload_rate == overload) & (scaling.policy == "learned")]
        flat = sub[sub.variant == "flat"].groupby("executors")["accuracy"]
        mean, sem = flat.mean(), flat.std() / np.sqrt(flat.count())
        ax.errorbar(mean.index, mean.values, yerr=1.96 * sem.values, marker="o", capsize=3,
                    label="flat (1 coordinator)")
        hier = sub[sub.variant == "hierarchical"].groupby("executors")["accuracy"]
        mean, sem = hier.mean(), hier.std() / np.sqrt(hier.count())
        ax.errorbar(mean.index, mean.values, yerr=1.96 * sem.values, marker="s", capsize=3, ls="none",
                    label="hierarchical (3 + central)")
        ax.set(title=f"overload_rate {overload}", xlabel="executors")
    axes[0].set_ylabel("commitment accuracy (learned)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scaling_study.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/econ_sim.yaml")
    parser.add_argument("--seeds", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2048)
    parser.add_argument("--eval-questions", type=int, default=512)
    parser.add_argument("--out", default="docs/results/econ_sim")
    parser.add_argument("--parts", default="bne,scaling,alpha")
    parser.add_argument("--alpha-lr", type=float, default=0.1, help="reward_weight_lr of part C")
    args = parser.parse_args(argv)
    base = load_econ_config(args.config)
    base = dataclasses.replace(base, train=dataclasses.replace(base.train, num_steps=args.steps,
                                                               eval_questions=args.eval_questions))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = np.arange(args.seeds)
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
    eval_keys = jax.random.split(jax.random.key(10_000), args.seeds)
    start = time.perf_counter()
    parts = args.parts.split(",")
    bne = bne_study(base, seeds, keys, eval_keys) if "bne" in parts else pd.read_csv(out / "bne_study.csv")
    bne.to_csv(out / "bne_study.csv", index=False)
    scaling = (scaling_study(base, seeds, keys, eval_keys) if "scaling" in parts
               else pd.read_csv(out / "scaling_study.csv"))
    scaling.to_csv(out / "scaling_study.csv", index=False)
    text, data = summarize(bne, scaling)
    if "alpha" in parts or (out / "alpha_study.csv").exists():
        alpha = (alpha_study(base, seeds, keys, eval_keys, args.alpha_lr) if "alpha" in parts
                 else pd.read_csv(out / "alpha_study.csv"))
        alpha.to_csv(out / "alpha_study.csv", index=False)
        alpha_text, data["alpha"] = summarize_alpha(bne, alpha)
        text += "\n" + alpha_text
    header = (f"# ECON simulated study\n\n{args.seeds} seeds per setting, {args.steps} training steps x "
              f"{base.train.num_envs} questions per seed, {args.eval_questions} evaluation questions per policy "
              f"(the same questions and randomness for every policy of a seed), network {base.network}, "
              f"config {args.config}.  JAX {jax.__version__} on {jax.devices()[0]}; "
              f"{time.perf_counter() - start:.0f}s wall for parts {args.parts}.\n\n"
              f"Reproduce: `python experiments/econ_sim_study.py --seeds {args.seeds} --steps {args.steps}`\n\n")
    (out / "summary.md").write_text(header + text)
    (out / "summary.json").write_text(json.dumps(dict(seeds=args.seeds, steps=args.steps, **data), indent=2))
    figures(bne, scaling, out)
    print(header + text)


if __name__ == "__main__":
    main()
