"""ALIGN vs the baselines on GSM8K, GSM-Hard and MATH-500, side by side (issue 18, scope 3).

Reads finished ``align-jax reason`` runs (their ``summary.json`` and ``config.json``; ``replay.json``
when ``align-jax replay`` ran on them, for the principal's pairwise accuracy) and writes one markdown
table with a column per run: accuracy [95% CI] per method, ALIGN's paired differences, and cost per
question. No model is loaded; it takes about a second.

The GSM8K study ran with the verifier principal; its candidates were also replayed with the
program-of-thought principal (``docs/results/pot_principal``, ``experiments/pot_replay.py``). That replay
becomes a column of its own ("GSM8K, pot (replay)"): the baselines are the run's (they do not depend on
the principal), ALIGN and best-of-N are the replay's, so the three datasets can be compared at the same
principal.

    python experiments/reason_datasets.py                       # -> docs/results/reason_datasets.{md,png}
    python experiments/reason_datasets.py --runs GSM8K=docs/results/reason_gsm8k_100/seed0 ...
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

from align_jax.methods.reason_report import comparison_markdown
from align_jax.runio import atomic_write

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
DEFAULT_RUNS = (
    ("GSM8K, verifier (100 q)", RESULTS / "reason_gsm8k_100" / "seed0"),
    ("GSM-Hard, pot (50 q)", RESULTS / "reason_gsmhard_50" / "seed0"),
    ("MATH-500, pot (50 q)", RESULTS / "reason_math500_50" / "seed0"),
)
POT_REPLAY = RESULTS / "pot_principal" / "summary.json"
# Rows in reading order: ALIGN and what it is compared with first, then the single agents, then the floors.
ORDER = ("align", "best_of_n", "sc_pooled", "fair_single", "debate", "econ/", "rstar", "sc/", "greedy/",
         "uniform_principal", "random", "pass@k")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"{path}: missing (run the study first: align-jax reason <config>)") from None
    except json.JSONDecodeError as err:
        raise SystemExit(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from None


def load_run(label: str, directory: Path) -> tuple[str, dict, dict]:
    """``(label, summary, config)`` of a finished run; the stored principal's pairwise accuracy from
    ``replay.json`` when present (``summary['principal_pairwise']``)."""
    summary = _read_json(directory / "summary.json")
    config = _read_json(directory / "config.json")
    replay = directory / "replay.json"
    if replay.is_file():
        stored = [v for k, v in _read_json(replay)["principals"].items() if k.startswith("stored")]
        if stored and stored[0].get("pairwise_accuracy") is not None:
            summary["principal_pairwise"] = stored[0]["pairwise_accuracy"]
    return label, summary, config


def pot_replay_column(base: tuple[str, dict, dict], replay_path: Path = POT_REPLAY) -> tuple[str, dict, dict]:
    """The GSM8K run's column with ALIGN and best-of-N from the program-of-thought replay."""
    label, summary, config = base
    pot = _read_json(replay_path)["principals"]["pot"]
    derived = copy.deepcopy(summary)
    for name in ("align", "best_of_n"):
        derived["methods"][name] = {**derived["methods"][name], "accuracy": pot[name]["mean"],
                                    "ci_low": pot[name]["ci_low"], "ci_high": pot[name]["ci_high"]}
    derived["differences"] = {"align - sc_pooled": pot["align - sc_pooled"]}
    derived["principal_pairwise"] = pot["pairwise_accuracy"]
    derived.pop("wall_s_per_question", None)
    config = {**config, "principal": {**config["principal"], "type": "pot (replay)"}}
    return f"{label.split(',')[0].split(' ')[0]}, pot (replay)", derived, config


def method_order(studies) -> list[str]:
    names: list[str] = []
    for _, summary, _ in studies:
        names += [m for m in summary["methods"] if m not in names]

    def rank(name: str) -> tuple[int, str]:
        for i, prefix in enumerate(ORDER):
            if name == prefix or (prefix.endswith("/") and name.startswith(prefix)):
                return i, name
        return len(ORDER), name

    return sorted(names, key=rank)


FIGURE_METHODS = ("align", "best_of_n", "sc_pooled", "debate", "greedy/zs-t0.7", "pass@k")


def figure(studies, path: Path, methods=FIGURE_METHODS) -> Path:
    """Grouped bars: accuracy with its 95% interval per method (rows) and run (one colour each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = [m for m in methods if any(m in s["methods"] for _, s, _ in studies)]
    height = 0.8 / len(studies)
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(methods) * max(1, len(studies) / 2) + 1.5))
    base = np.arange(len(methods))[::-1].astype(float)
    for j, (label, summary, _) in enumerate(studies):
        entries = [summary["methods"].get(m) for m in methods]
        acc = np.array([e["accuracy"] if e else np.nan for e in entries])
        low = np.array([e["ci_low"] if e else np.nan for e in entries])
        high = np.array([e["ci_high"] if e else np.nan for e in entries])
        y = base + 0.4 - height * (j + 0.5)
        ax.barh(y, acc, height=height * 0.9, xerr=np.vstack([acc - low, high - acc]), capsize=2,
                label=label, color=f"C{j}", alpha=0.85)
    ax.set_yticks(base)
    ax.set_yticklabels(methods, fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy (95% paired bootstrap interval)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("ALIGN vs baselines across datasets (Qwen2.5-Coder-0.5B agents)", fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    tmp.replace(path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", metavar="LABEL=DIR",
                        help="runs to compare (default: the committed GSM8K, GSM-Hard and MATH-500 studies)")
    parser.add_argument("--no-pot-replay", action="store_true", help="leave out the GSM8K pot replay column")
    parser.add_argument("--out", type=Path, default=RESULTS / "reason_datasets.md")
    parser.add_argument("--no-figure", action="store_true", help="skip the figure (written next to --out, .png)")
    args = parser.parse_args(argv)
    if args.runs:
        pairs = []
        for spec in args.runs:
            if "=" not in spec:
                parser.error(f"--runs {spec!r}: expected LABEL=DIR")
            label, directory = spec.split("=", 1)
            pairs.append((label, Path(directory)))
    else:
        pairs = [(label, d) for label, d in DEFAULT_RUNS if (d / "summary.json").is_file()]
    studies = [load_run(label, d) for label, d in pairs]
    if not studies:
        parser.error("no finished run found")
    if not args.no_pot_replay and not args.runs and POT_REPLAY.is_file() and studies[0][1]["dataset"] == "gsm8k":
        studies.insert(1, pot_replay_column(studies[0]))
    table = comparison_markdown(studies, method_order(studies))
    pairwise = " | ".join(f"{s['principal_pairwise']:.3f}" if "principal_pairwise" in s else "-"
                          for _, s, _ in studies)
    table += f"| *principal pairwise accuracy* | {pairwise} |\n"
    text = ("# ALIGN vs the baselines across datasets\n\n"
            "Written by `python experiments/reason_datasets.py` from the runs' `summary.json` / `config.json` "
            "(and `replay.json` for the principal's within-question pairwise accuracy). Intervals: paired 95% "
            "bootstrap over questions.\n\n" + table)
    atomic_write(args.out, text)
    if not args.no_figure:
        figure(studies, args.out.with_suffix(".png"))
    print(text)
    print(f"wrote {os.path.relpath(args.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
