"""The report side of ``align-jax replay``: the markdown table and the figure.

:func:`~align_jax.methods.replay.replay_run` builds the report dict (per principal:
accuracies with paired bootstrap intervals, pairwise ranking accuracy and ties,
corr(utility, score), Nash gap, the principal's score of the picks; the
principal-independent reference methods) and writes ``replay.md`` with
:func:`replay_markdown` and ``replay.png`` with :func:`replay_figure`. Both read only
that dict (as stored in ``replay.json``), so a report can be re-rendered without
replaying.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

__all__ = ["STORED", "replay_markdown", "replay_figure"]

STORED = "stored"
"""The replay principal that reuses the run's own scores."""


def _ci(s: dict) -> str:
    return f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"


def _signed_ci(s: Optional[dict]) -> str:
    return "n/a" if not s else f"{s['mean']:+.3f} [{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]"


def replay_markdown(report: dict) -> str:
    """The replay table as markdown."""
    lines = [
        f"# {report['name']}: principal replay on {report['questions']} {report['dataset']} questions",
        "",
        f"Same candidates, different principals (the run's own principal: {report['run_principal']}); "
        f"seeded principals (noisy oracles) averaged over {report['noise_seeds']} draws per question; 95% paired "
        "bootstrap intervals over questions. Pairwise acc.: P(a correct slot outscores a wrong slot of the same "
        "question), ties counted half (ties: their share), over the questions with both kinds of slot.",
        "",
        "| principal | pairwise acc. | ties | corr(utility, score) | Nash gap | ALIGN | best-of-N "
        "| uniform + principal | ALIGN - SC pooled | best-of-N - SC pooled "
        "| principal's score of the pick: ALIGN - SC pooled |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, p in report["principals"].items():
        pairwise = "n/a" if p["pairwise_accuracy"] is None else f"{p['pairwise_accuracy']:.3f}"
        ties = "n/a" if p.get("pairwise_ties") is None else f"{p['pairwise_ties']:.3f}"
        lines.append(f"| {label} | {pairwise} | {ties} | {p['utility_correlation']:+.3f} | {p['nash_gap']:.3f} | "
                     f"{_ci(p['align'])} | {_ci(p['best_of_n'])} | {_ci(p['uniform_principal'])} | "
                     f"{_signed_ci(p.get('align - sc_pooled'))} | {_signed_ci(p.get('best_of_n - sc_pooled'))} | "
                     f"{_signed_ci(p['principal_utility']['align - sc_pooled'])} |")
    lines += ["", "Principal-independent reference: "
              + ", ".join(f"{m} {_ci(s)}" for m, s in report["reference"].items()) + "."]
    stored = report["principals"].get(STORED)
    if stored is not None:
        lines += ["", "Replaying the stored scores reproduces every recorded ALIGN, best-of-N and uniform + principal "
                  f"result: {'yes' if stored.get('reproduces_run') else 'NO'}."]
        lines += ["", f"The run's {report['run_principal']} principal by agent (mean score of the agent's slots; "
                  "share of its slots that are correct): "
                  + "; ".join(f"{a['agent']} {a['mean_score']:.3f} ({a['slot_accuracy']:.3f} of {a['slots']})"
                              for a in stored["by_agent"]) + "."]
    return "\n".join(lines) + "\n"


def replay_figure(report: dict, path: Path) -> Path:
    """Accuracy against the principal's pairwise ranking accuracy.

    Lines: the flip-rate sweeps (one point per flip rate, with 95% bands); markers: every
    other principal (the run's stored scores as stars) at its pairwise accuracy;
    horizontal lines: the principal-independent methods.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [(label, p) for label, p in report["principals"].items() if p["pairwise_accuracy"] is not None]
    swept = sorted((p for _, p in entries if p["flip_rate"] is not None), key=lambda p: p["pairwise_accuracy"])
    single = [(label, p) for label, p in entries if p["flip_rate"] is None]
    fig, ax = plt.subplots(figsize=(9.0, 4.4))
    styles = {"align": ("C0", "ALIGN"), "best_of_n": ("C1", "best-of-N"),
              "uniform_principal": ("C2", "uniform + principal")}
    if swept:
        x = np.array([p["pairwise_accuracy"] for p in swept])
        for method, (color, label) in styles.items():
            ax.plot(x, [p[method]["mean"] for p in swept], "o-", color=color, label=f"{label}, {swept[0]['type']}")
            ax.fill_between(x, [p[method]["ci_low"] for p in swept], [p[method]["ci_high"] for p in swept],
                            color=color, alpha=0.15)
        for p in swept:
            ax.annotate(f"f={p['flip_rate']:g}", (p["pairwise_accuracy"], p["align"]["mean"]),
                        textcoords="offset points", xytext=(3, 6), fontsize=6, color="C0")
    markers = iter("DsPXv^<>")
    for name, p in single:
        marker = "*" if name == STORED else next(markers, "o")
        title = f"the run's {report['run_principal']}" if name == STORED else name
        for method, (color, label) in styles.items():
            ax.plot([p["pairwise_accuracy"]], [p[method]["mean"]], marker, color=color, ms=12 if marker == "*" else 8,
                    mec="k", label=f"{label}, {title}")
    ref_styles = {"sc_pooled": ("C3", "--"), "fair_single": ("C4", "-."), "random": ("C7", "--"), "pass@k": ("k", "-")}
    for method, s in report["reference"].items():
        color, ls = ref_styles.get(method, ("C8", "--"))
        ax.axhline(s["mean"], color=color, ls=ls, lw=1.0, label=method)
    ax.axvline(0.5, color="0.6", lw=0.8, ls=":")
    ax.set_xlabel("principal's pairwise ranking accuracy (P[correct slot outscores wrong]; 0.5 = no signal)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{report['name']}: {report['questions']} {report['dataset']} questions, same candidates, "
                 "principal swapped", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
