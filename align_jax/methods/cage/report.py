"""The summary of a CAGE weight sweep: per-point means, Pareto metrics, table and figure."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np

from align_jax.methods.cage.metrics import dominance_counts, hypervolume

__all__ = ["summarise", "summary_markdown", "tradeoff_figure"]


def summarise(objective_names, rows: list) -> dict:
    """Summary dict of result rows.

    ``points``: one per (method, weight index) with the mean of every objective's
    score, accuracy and tokens; ``hypervolume``: per method, of its points normalised
    to ``[0, 1]`` per objective over all methods (reference just below 0);
    ``dominance``: :func:`dominance_counts`; ``normalisation``: the min / max used.
    ``unconverged_steps`` (only when some rows record it): per method, the decoding
    steps whose equilibrium solve did not converge, of how many decoded tokens, and in
    how many rows.
    """
    names = list(objective_names)
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["method"], str(r["weight_index"])), []).append(r)
    points = []
    for (method, w_index), members in sorted(groups.items()):
        point = {"method": method, "weight_index": w_index, "weights": members[0]["weights"], "n": len(members),
                 "accuracy": float(np.mean([m["correct"] for m in members])),
                 "mean_tokens": float(np.mean([m["num_tokens"] for m in members]))}
        for name in names:
            point[name] = float(np.mean([m[f"score_{name}"] for m in members]))
        points.append(point)
    by_method: dict = {}
    for p in points:
        by_method.setdefault(p["method"], []).append([p[n] for n in names])
    all_pts = np.asarray([v for vs in by_method.values() for v in vs], np.float64)
    lo, hi = all_pts.min(axis=0), all_pts.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    ref = np.full(len(names), -0.01)  # just below the normalised minimum
    hv = {m: hypervolume((np.asarray(v) - lo) / span, ref) for m, v in by_method.items()}
    summary = {"objectives": names, "points": points, "hypervolume": hv,
               "dominance": dominance_counts(by_method),
               "normalisation": {"min": lo.tolist(), "max": hi.tolist()}}
    counted: dict = {}
    for r in rows:
        if "unconverged_steps" in r:
            c = counted.setdefault(r["method"], {"steps": 0, "decoded_tokens": 0, "rows": 0, "rows_counted": 0})
            c["steps"] += int(r["unconverged_steps"])
            c["decoded_tokens"] += int(r["num_tokens"])
            c["rows"] += int(r["unconverged_steps"] > 0)
            c["rows_counted"] += 1
    if counted:
        summary["unconverged_steps"] = counted
    return summary


def summary_markdown(config, summary: dict, descriptions: dict) -> str:
    """Markdown table: one line per (method, weight) with mean objective scores and accuracy.

    ``descriptions`` maps an objective name to its one-line description.
    """
    names = summary["objectives"]
    head = ["method", "weights"] + names + ["accuracy", "tokens"]
    guide = f"guide {config.guide_model}, " if "guide" in config.objectives else ""
    lines = [f"# {config.name} (seed {config.seed}, {config.num_questions} questions, base {config.base_model}, "
             f"{guide}M={config.top_m}, tau={config.tau})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in summary["points"]:
        cells = [p["method"], str(p["weights"])] + [f"{p[n]:.3f}" for n in names]
        cells += [f"{p['accuracy']:.2f}", f"{p['mean_tokens']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Scores: " + ", ".join(descriptions[n] for n in names) + ".", "",
              "| method | hypervolume (normalised) | points | dominated by others | others dominated |",
              "|---|---|---|---|---|"]
    for m, hv in summary["hypervolume"].items():
        d = summary["dominance"][m]
        lines.append(f"| {m} | {hv:.4f} | {d['points']} | {d['dominated']} | {d['dominates']} |")
    for m, c in summary.get("unconverged_steps", {}).items():
        lines += ["", f"Equilibrium solves not converged within solver_max_iters={config.solver_max_iters}: "
                      f"{m} {c['steps']} of {c['decoded_tokens']} decoding steps "
                      f"({c['rows']} of {c['rows_counted']} rows)."]
    return "\n".join(lines) + "\n"


_STYLE = {"cage": ("C0", "o"), "linear": ("C1", "s"), "args": ("C2", "^"), "best_of_n": ("C3", "v"),
          "base": ("k", "*")}


def tradeoff_figure(config, summary: dict, path: Path) -> Path:
    """Objective vs objective, one panel per pair, one point per weight, one series per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = summary["objectives"]
    pairs = list(itertools.combinations(names, 2)) or [(names[0], "accuracy")]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4), squeeze=False)
    for ax, (x, y) in zip(axes.flat, pairs):
        for method in dict.fromkeys(p["method"] for p in summary["points"]):
            pts = [p for p in summary["points"] if p["method"] == method]
            color, marker = _STYLE.get(method, ("C7", "x"))
            ax.plot([p[x] for p in pts], [p[y] for p in pts], marker=marker, color=color, linestyle=":",
                    label=method)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{config.name}: trade-offs (one point per weight vector)")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path
