"""Figures for synthetic sweeps (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

__all__ = ["simulation_figures"]

_STYLE = {
    "align": ("ALIGN", "C0", "o"),
    "fair_single": ("fair single agent (pooled)", "C1", "s"),
    "uniform_principal": ("uniform submissions + principal", "C2", "^"),
    "oracle": ("oracle (principal's best)", "C3", "v"),
    "random": ("random candidate", "C7", "x"),
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _groups(config, rows):
    others = [k for k in config.sweep if k != config.x_axis]
    keyfn = lambda r: tuple(r.get(k) for k in others)  # noqa: E731
    groups = {}
    for row in rows:
        groups.setdefault(keyfn(row), []).append(row)
    return others, groups


def simulation_figures(config, rows: list[dict], out: Path) -> list[Path]:
    """Writes the sweep's figures into ``out``; returns their paths.

    * ``utility_vs_<x>.png``: principal utility of ALIGN and every baseline
      against the x-axis sweep key (one panel per combination of the other
      swept keys), with 95% intervals;
    * ``advantage_vs_<x>.png``: ALIGN minus fair single agent and minus
      uniform+principal, and the gap to the oracle;
    * ``regret_and_nash_gap_vs_T.png`` when trajectories were recorded:
      regret with the Hedge bound and a ``sqrt(T)`` guide, and the Nash gap of
      the averaged profile on log-log axes with a ``T^-1/2`` guide.
    """
    plt = _plt()
    paths = []
    x_key = config.x_axis
    others, groups = _groups(config, rows)
    if x_key in config.sweep and len(config.sweep[x_key]) > 1:
        ncols = min(3, len(groups))
        nrows = int(np.ceil(len(groups) / ncols))
        for kind in ("utility", "advantage"):
            fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
            for ax, (group, members) in zip(axes.flat, groups.items()):
                members = sorted(members, key=lambda r: r[x_key])
                xs = np.array([r[x_key] for r in members], float)
                if kind == "utility":
                    for method, (label, color, marker) in _STYLE.items():
                        ys = np.array([r[f"{method}_value"] for r in members])
                        err = 1.96 * np.array([r[f"{method}_value_se"] for r in members])
                        ax.errorbar(xs, ys, yerr=err, label=label, color=color, marker=marker, ms=4, capsize=2)
                    ax.set_ylabel("principal utility (mean)")
                else:
                    for col, label, color in (
                        ("adv_fair", "ALIGN − fair single agent", "C1"),
                        ("adv_uniform", "ALIGN − uniform+principal", "C2"),
                        ("gap_oracle", "oracle − ALIGN", "C3"),
                    ):
                        ys = np.array([r[col] for r in members])
                        err = 1.96 * np.array([r[f"{col}_se"] for r in members])
                        ax.errorbar(xs, ys, yerr=err, label=label, color=color, marker="o", ms=4, capsize=2)
                    ax.axhline(0.0, color="k", lw=0.8)
                    ax.set_ylabel("difference in principal utility")
                ax.set_xlabel(x_key)
                ax.set_title(", ".join(f"{k}={v}" for k, v in zip(others, group)) or config.name, fontsize=9)
                ax.grid(alpha=0.3)
            for ax in list(axes.flat)[len(groups):]:
                ax.axis("off")
            axes.flat[0].legend(fontsize=7)
            fig.suptitle(f"{config.name}: {config.scenarios_per_point} games per point")
            fig.tight_layout()
            path = out / f"{kind}_vs_{x_key}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            paths.append(path)
    with_traj = [r for r in rows if "trajectory" in r]
    if with_traj:
        colors = itertools.cycle([f"C{i}" for i in range(10)])
        fig, (ax_r, ax_n) = plt.subplots(1, 2, figsize=(11, 4.2))
        for row in with_traj:
            color = next(colors)
            label = ", ".join(f"{k}={row[k]}" for k in config.sweep) or config.name
            t = np.arange(1, len(row["trajectory"]["regret"]) + 1)
            ax_r.plot(t, row["trajectory"]["regret_max"], color=color, label=f"max-agent regret ({label})")
            ax_r.plot(t, row["trajectory"]["regret_bound"], color=color, ls="--", label="Hedge bound")
            gap = np.maximum(np.array(row["trajectory"]["nash_gap"]), 1e-12)
            ax_n.loglog(t, gap, color=color, label=label)
        t_last = t[-1]
        ref_r = np.sqrt(t) * with_traj[0]["trajectory"]["regret_bound"][-1] / np.sqrt(t_last)
        ax_r.plot(t, ref_r, color="k", lw=0.8, ls=":", label=r"$\propto\sqrt{T}$")
        ax_r.set_xscale("log")
        ax_r.set_yscale("log")
        ax_r.set_xlabel("round T")
        ax_r.set_ylabel("external regret (mean over games)")
        ax_r.legend(fontsize=6)
        ax_r.grid(alpha=0.3, which="both")
        gap0 = max(float(np.asarray(with_traj[0]["trajectory"]["nash_gap"])[0]), 1e-6)
        ax_n.loglog(t, gap0 / np.sqrt(t), color="k", lw=0.8, ls=":", label=r"$\propto T^{-1/2}$")
        ax_n.set_xlabel("round T")
        ax_n.set_ylabel("Nash gap of the time-averaged profile")
        ax_n.legend(fontsize=6)
        ax_n.grid(alpha=0.3, which="both")
        fig.tight_layout()
        path = out / "regret_and_nash_gap_vs_T.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
