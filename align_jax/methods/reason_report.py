"""Summaries of a ``reason`` run: accuracy per method with paired bootstrap intervals,
cost per question, game diagnostics; the markdown table, the rich table and the figure.

Every function reads the rows as written (dicts of :class:`~align_jax.methods.rows.ReasonRow`
shape), so finished runs reprint without recomputing anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

__all__ = [
    "method_names",
    "bootstrap_interval",
    "summarize",
    "summary_markdown",
    "print_summary",
    "accuracy_figure",
    "comparison_markdown",
]


def method_names(config) -> list[str]:
    """The result names a run reports, in table order (its enabled methods' names)."""
    from align_jax.methods.reason_methods import REASON_METHODS, declared_result_names

    names: list[str] = []
    for name in config.methods:
        method = REASON_METHODS.get(name, "methods")
        if method.enabled(config):
            names += declared_result_names(method, config.agent_names(), config)
    return names




def bootstrap_interval(values: np.ndarray, indices: np.ndarray) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``values [Q]`` over resamples ``indices [B, Q]``."""
    means = np.asarray(values, np.float64)[indices].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def summarize(rows: Sequence[dict], config) -> dict:
    """Accuracy per method with 95% bootstrap intervals, cost per question, game diagnostics.

    The resamples of questions are drawn once (numpy, ``seed``) and shared by all
    methods, so the intervals of paired differences (``align - X``) are valid too.
    """
    names = method_names(config)
    q = len(rows)
    summary: dict[str, Any] = {"name": config.name, "dataset": config.dataset, "questions": q,
                               "seed": config.seed, "bootstrap_samples": config.bootstrap_samples,
                               "jax_version": jax.__version__, "device": str(jax.devices()[0]), "methods": {}}
    if q == 0:
        return summary
    rng = np.random.default_rng(config.seed)
    indices = rng.integers(0, q, size=(config.bootstrap_samples, q))
    correct = {m: np.array([row["methods"][m]["correct"] for row in rows], np.float64) for m in names}
    for m in names:
        costs = [row["methods"][m]["cost"] for row in rows]
        low, high = bootstrap_interval(correct[m], indices)
        calls = float(np.mean([c["calls"] for c in costs]))
        gen = float(np.mean([c["gen_tokens"] for c in costs]))
        prompt = float(np.mean([c["prompt_tokens"] for c in costs]))
        summary["methods"][m] = {"accuracy": float(correct[m].mean()), "ci_low": low, "ci_high": high,
                                 "calls_per_question": calls, "gen_tokens_per_question": gen,
                                 "total_tokens_per_question": gen + prompt}
    differences = {}
    for other in ("sc_pooled", "best_of_n", "fair_single"):
        if "align" not in correct or other not in correct:
            continue
        diff = correct["align"] - correct[other]
        low, high = bootstrap_interval(diff, indices)
        differences[f"align - {other}"] = {"mean": float(diff.mean()), "ci_low": low, "ci_high": high}
    econ = [m for m in names if m.startswith("econ/")]
    pairs = [(m, other) for m in econ for other in ("sc_pooled", "align", "debate") if other in correct]
    pairs += [(m, other) for m in econ for other in ("econ/initial", "econ/fixed")
              if m in ("econ/real", "econ/learned") and other in correct]
    for m, other in pairs:  # ECON's comparisons (only in runs with an econ section)
        diff = correct[m] - correct[other]
        low, high = bootstrap_interval(diff, indices)
        differences[f"{m} - {other}"] = {"mean": float(diff.mean()), "ci_low": low, "ci_high": high}
    summary["differences"] = differences
    if not all(row.get("game") for row in rows):  # a run without ALIGN has no game
        return _timings(summary, rows)
    game = [row["game"] for row in rows]
    regret = np.array([np.max(np.asarray(g["regret"]) / np.maximum(np.asarray(g["regret_bound"]), 1e-12))
                       for g in game])
    summary["game"] = {
        "nash_gap": float(np.mean([g["nash_gap"] for g in game])),
        "pareto_compliance": float(np.mean([g["pareto_compliance"] for g in game])),
        "rounds_played": float(np.mean([g["rounds_played"] for g in game])),
        "max_regret_over_bound": float(regret.mean()),
        "utility_correlation": float(np.mean([g["utility_correlation"] for g in game])),
        "distinct_answers_per_agent": float(np.mean([len(a["slots"]) for row in rows for a in row["agents"]])),
        "no_answer_rate": float(np.mean([s["answer"] is None for row in rows for a in row["agents"]
                                         for s in a["samples"]])),
    }
    return _timings(summary, rows)


def _timings(summary: dict, rows: Sequence[dict]) -> dict:
    """Adds math-verify failures and the wall times (per question, total, per stage) to ``summary``."""
    failures = int(sum(row.get("math_verify_failures") or 0 for row in rows))
    if failures:  # left out when none, so runs without failures reprint as before
        summary["math_verify_failures"] = failures
    summary["wall_s_per_question"] = float(np.mean([row["wall_s"] for row in rows]))
    summary["wall_s_total"] = float(np.sum([row["wall_s"] for row in rows]))
    stage_names = dict.fromkeys(k for row in rows for k in row.get("stage_wall_s", {}))
    summary["stage_wall_s_total"] = {k: float(np.sum([row.get("stage_wall_s", {}).get(k, 0.0) for row in rows]))
                                     for k in stage_names}
    return summary


def summary_markdown(config, summary: dict) -> str:
    """The accuracy table (method, accuracy, 95% CI, calls, tokens per question) as markdown."""
    lines = [
        f"# {config.name}: {summary['questions']} {config.dataset} questions (seed {config.seed})",
        "",
        f"Principal: {config.principal.type}; agents: "
        + ", ".join(f"{n} ({a.model}, {a.prompt_style}, T={a.temperature}, K={a.num_samples})"
                    for n, a in zip(config.agent_names(), config.agents)),
        "",
        "| method | accuracy | 95% CI | model calls / q | generated tokens / q | total tokens / q |",
        "|---|---|---|---|---|---|",
    ]
    for m, s in summary["methods"].items():
        lines.append(f"| {m} | {s['accuracy']:.3f} | [{s['ci_low']:.3f}, {s['ci_high']:.3f}] | "
                     f"{s['calls_per_question']:.1f} | {s['gen_tokens_per_question']:.0f} | "
                     f"{s['total_tokens_per_question']:.0f} |")
    if "differences" in summary:
        lines += ["", "| paired difference | mean | 95% CI |", "|---|---|---|"]
        for k, d in summary["differences"].items():
            lines.append(f"| {k} | {d['mean']:+.3f} | [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] |")
    if "game" in summary:
        g = summary["game"]
        lines += ["", "ALIGN game diagnostics (means over questions): "
                  f"Nash gap {g['nash_gap']:.4f}, Pareto compliance {g['pareto_compliance']:.3f}, "
                  f"rounds {g['rounds_played']:.1f}, max regret / bound {g['max_regret_over_bound']:.3f}, "
                  f"corr(agent utility, principal score) {g['utility_correlation']:.3f}, "
                  f"distinct answers per agent {g['distinct_answers_per_agent']:.2f}, "
                  f"no-answer samples {g['no_answer_rate']:.3f}."]
    if "wall_s_total" in summary:
        lines += ["", f"Wall time: {summary['wall_s_total']:.1f} s in windows "
                  f"({summary['wall_s_per_question']:.1f} s / question; by stage: "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in summary["stage_wall_s_total"].items()) + "); "
                  f"intervals: {summary['bootstrap_samples']} paired bootstrap resamples of questions."]
    if summary.get("math_verify_failures"):
        lines += ["", f"math-verify could not decide {summary['math_verify_failures']} correctness checks "
                      "(exception or time-out; counted as wrong; see the run's warnings)."]
    return "\n".join(lines) + "\n"


def print_summary(config, summary: dict) -> None:
    """Prints the accuracy table with rich."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{config.name}: {summary['questions']} {config.dataset} questions")
    for col in ("method", "accuracy", "95% CI", "calls/q", "gen tokens/q", "total tokens/q"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for m, s in summary["methods"].items():
        table.add_row(m, f"{s['accuracy']:.3f}", f"[{s['ci_low']:.3f}, {s['ci_high']:.3f}]",
                      f"{s['calls_per_question']:.1f}", f"{s['gen_tokens_per_question']:.0f}",
                      f"{s['total_tokens_per_question']:.0f}")
    Console().print(table)


def accuracy_figure(config, summary: dict, path: Path) -> Path:
    """Horizontal bars: accuracy per method with its 95% bootstrap interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["methods"])
    acc = np.array([summary["methods"][m]["accuracy"] for m in names])
    low = np.array([summary["methods"][m]["ci_low"] for m in names])
    high = np.array([summary["methods"][m]["ci_high"] for m in names])
    colors = ["C0" if m == "align" else "C3" if m == "pass@k" else "C7" for m in names]
    fig, ax = plt.subplots(figsize=(7.0, 0.38 * len(names) + 1.4))
    y = np.arange(len(names))[::-1]
    ax.barh(y, acc, xerr=np.vstack([acc - low, high - acc]), color=colors, capsize=3, alpha=0.85)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy (95% bootstrap interval)")
    ax.set_title(f"{config.name}: {summary['questions']} {config.dataset} questions, principal={config.principal.type}",
                 fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def comparison_markdown(studies: Sequence[tuple[str, dict, dict]],
                        methods: Sequence[str] | None = None) -> str:
    """Several finished runs side by side (one column per run): accuracy [95% CI] per method,
    ALIGN's paired differences, and cost per question.

    Args:
      studies: ``(label, summary, config)`` per run: a :func:`summarize` dict (``summary.json``) and
        the run's config as a dict (``config.json``; its ``principal.type`` and agents' K label the
        column).
      methods: the rows, in order (default: every method of the first run, then the others' new ones).

    Returns:
      markdown: the accuracy table (a method a run does not report shows ``-``), then one row per
      paired difference ``align - X``, then questions, principal, K, generated tokens and wall seconds
      per question.

    Raises:
      ValueError: no studies, or a summary without questions or methods.
    """
    if not studies:
        raise ValueError("comparison_markdown needs at least one (label, summary, config)")
    for label, summary, _ in studies:
        if not summary.get("questions") or not summary.get("methods"):
            raise ValueError(f"run {label!r} has no summarized questions (summary keys: {sorted(summary)})")
    if methods is None:
        methods = []
        for _, summary, _ in studies:
            methods += [m for m in summary["methods"] if m not in methods]

    def cell(entry: dict | None, signed: bool = False) -> str:
        if entry is None:
            return "-"
        value = entry.get("accuracy", entry.get("mean"))
        fmt = "{:+.3f}" if signed else "{:.3f}"
        return f"{fmt.format(value)} [{fmt.format(entry['ci_low'])}, {fmt.format(entry['ci_high'])}]"

    header = "| | " + " | ".join(label for label, _, _ in studies) + " |"
    rule = "|---|" + "---|" * len(studies)
    lines = [header, rule]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(cell(s["methods"].get(m)) for _, s, _ in studies) + " |")
    differences: list[str] = []
    for _, summary, _ in studies:
        differences += [d for d in summary.get("differences", {}) if d not in differences]
    for d in differences:
        lines.append(f"| {d} | " + " | ".join(cell(s.get("differences", {}).get(d), True)
                                              for _, s, _ in studies) + " |")

    def info(summary: dict, config: dict) -> dict:
        agents = config.get("agents") or []
        align = summary["methods"].get("align", {})
        return {"questions": str(summary["questions"]),
                "principal": str((config.get("principal") or {}).get("type", "?")),
                "K per agent": "/".join(str(a.get("num_samples", "?")) for a in agents) or "?",
                "ALIGN generated tokens / q": f"{align['gen_tokens_per_question']:.0f}" if align else "-",
                "wall s / q": f"{summary['wall_s_per_question']:.1f}" if "wall_s_per_question" in summary else "-"}

    infos = [info(s, c) for _, s, c in studies]
    for key in infos[0]:
        lines.append(f"| *{key}* | " + " | ".join(i[key] for i in infos) + " |")
    return "\n".join(lines) + "\n"
