"""Seconds per question of each window in reason runs of the same config, side by side (issue 17).

Every row of a reason run records its window's wall time (``window_wall_s``, model loading and
compilation included for the first window a process computes); this prints, for each window the
runs share (same question ids), the seconds per question of each run and the ratio of the first
run to each other one, then the same over all shared windows::

    python experiments/reason_window_times.py docs/results/reason_gsm8k_100/seed0 \\
        docs/results/reason_throughput/full/reason_gsm8k_100/seed0 [--out FILE]

Runs made on different days share the machine type, not its load: read the ratios with that in mind.

``--accuracy`` adds, on the questions every run has, each method's accuracy in each run and the
paired difference of each later run against the first, with a 95% bootstrap interval and a
family-wise one (Bonferroni over the M methods compared: the 1 - 0.05 / M interval, so that all M
hold together with 95% probability); 20000 resamples of the shared questions, seed 0. With M = 14
methods, 0.7 per-method 95% intervals are expected to exclude 0 even when the runs do not differ; the
family-wise column is the test of "every method agrees".
"""

from __future__ import annotations

import argparse
from pathlib import Path


def run_rows(run_dir: Path) -> list[dict]:
    """The rows of a run's ``results.jsonl`` (the runner's reader: a corrupt line names file and line)."""
    from align_jax.runio import read_jsonl

    return [row for _, row in read_jsonl(run_dir / "results.jsonl")]


def windows(run_dir: Path) -> dict[tuple, float]:
    """``{question ids of a window: seconds per question}`` of a run's ``results.jsonl``."""
    rows = run_rows(run_dir)
    groups: dict[float, list] = {}
    for row in rows:  # the rows of one window share its window_wall_s (one float, written once per window)
        groups.setdefault(row["window_wall_s"], []).append(row["question_id"])
    return {tuple(ids): wall / len(ids) for wall, ids in groups.items()}


def table(runs: list[Path]) -> str:
    per_run = [windows(run) for run in runs]
    shared = [ids for ids in per_run[0] if all(ids in other for other in per_run[1:])]
    head = "| window (first question) | questions | " + " | ".join(f"run {i + 1} s / q" for i in range(len(runs))) + " | " + \
        " | ".join(f"run 1 / run {i + 2}" for i in range(len(runs) - 1)) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(runs) - 1)]
    totals = [0.0] * len(runs)
    count = 0
    for ids in shared:
        secs = [w[ids] for w in per_run]
        totals = [t + s * len(ids) for t, s in zip(totals, secs)]
        count += len(ids)
        lines.append(f"| {ids[0]} | {len(ids)} | " + " | ".join(f"{s:.1f}" for s in secs) + " | " +
                     " | ".join(f"{secs[0] / s:.2f}x" for s in secs[1:]) + " |")
    if count:
        means = [t / count for t in totals]
        lines.append(f"| **all shared windows** | {count} | " + " | ".join(f"{m:.1f}" for m in means) + " | " +
                     " | ".join(f"{means[0] / m:.2f}x" for m in means[1:]) + " |")
    return "\n".join(lines) + "\n"


def accuracy_table(runs: list[Path], resamples: int = 20000) -> str:
    """Per method: accuracy in each run on the shared questions, and ``run k - run 1`` with its 95%
    interval and its family-wise (Bonferroni over the methods) 95% interval."""
    import numpy as np

    per_run = [{row["question_id"]: row["methods"] for row in run_rows(run)} for run in runs]
    shared = [q for q in per_run[0] if all(q in other for other in per_run[1:])]
    methods = [m for m in per_run[0][shared[0]] if all(m in other[q] for other in per_run for q in shared)]
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(shared), (resamples, len(shared)))
    lines = [f"Accuracy on the {len(shared)} questions every run has; differences paired by question.", "",
             "| method | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " | " +
             " | ".join(f"run {i + 2} - run 1 [95% CI] | family-wise CI" for i in range(len(runs) - 1)) + " |",
             "|" + "---|" * (1 + len(runs) + 2 * (len(runs) - 1))]
    alpha = 0.05 / len(methods)  # Bonferroni: each of the M intervals at 1 - 0.05 / M
    for method in methods:
        scores = np.asarray([[float(run[q][method]["correct"]) for q in shared] for run in per_run])
        cells = [f"{s.mean():.3f}" for s in scores]
        for other in scores[1:]:
            diff = other - scores[0]
            means = diff[picks].mean(axis=1)
            lo, hi = np.percentile(means, [2.5, 97.5])
            flo, fhi = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
            cells.append(f"{diff.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] | [{flo:+.3f}, {fhi:+.3f}]")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="reason run directories (results.jsonl) of one config")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--accuracy", action="store_true", help="also compare the methods' accuracies")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("give at least two runs")
    text = "\n".join(f"run {i + 1}: `{run}`" for i, run in enumerate(args.runs)) + "\n\n" + table(args.runs)
    if args.accuracy:
        text += "\n" + accuracy_table(args.runs)
    from reason_cost_accounting import emit  # the sibling script (experiments/ is the script's directory)

    emit(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
