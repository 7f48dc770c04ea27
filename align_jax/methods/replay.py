"""Principal ablation without a model: replay the ALIGN game on a finished run's candidates.

``align-jax replay configs/<name>.yaml`` reads the run's ``results.jsonl`` (every
candidate's answer, self-consistency utility, correctness and the principal's score
are stored per slot), swaps the principal, and plays the delegation game again on the
same candidates. It answers the question a verifier run cannot: *how good must the
principal be for ALIGN to beat self-consistency on these candidates?*

Principals replayed (each a :class:`ReplayPrincipal`):

* ``stored``: the run's own principal scores (reproduces the run's ALIGN and
  best-of-N picks exactly; a consistency check of the stored rows);
* ``oracle``: 1 for a correct slot, 0 otherwise;
* ``noisy_oracle`` at each flip rate ``f``: the oracle with every slot's judgement
  flipped independently with probability ``f`` (``f = 0.5`` carries no signal),
  averaged over ``noise_seeds`` independent flip draws per question.

For every principal the report gives, with paired 95% bootstrap intervals over
questions (the same resamples for all methods), the accuracy of ALIGN, best-of-N
and uniform submissions + the principal's pick, ALIGN minus pooled self-consistency,
the principal's within-question pairwise ranking accuracy (probability that a
correct slot outscores a wrong one of the same question, ties counted half) and
corr(agent utility, principal score). The principal-independent methods of the run
(pooled self-consistency, the fair single agent, a random candidate, pass@k) are the
reference lines. Outputs go to the run directory: ``replay.json``, ``replay.md`` and
``replay.png`` (accuracy against the principal's pairwise accuracy).

No model is loaded. The game is replayed window by window with the run's own window
keys (one jit-compiled program per window shape), so ``mode: sampled`` runs replay
exactly too; the first noise draw of ``noisy_oracle`` uses the run's seed, so it
reproduces a run made with that principal.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence

import jax
import numpy as np

from align_jax.config import ConfigError
from align_jax.game.types import GameParams
from align_jax.methods import baselines as baselines_lib
from align_jax.methods.align import play_window
from align_jax.methods.candidates import AgentCandidates, QuestionCandidates, Slot, stack_candidate_sets
from align_jax.methods.principals import noisy_oracle_scores, oracle_scores
from align_jax.methods.reason import (
    ReasonConfig,
    _read_rows,
    bootstrap_interval,
    load_reason_config,
    run_dir,
)
from align_jax.runio import atomic_write

__all__ = [
    "REFERENCE_METHODS",
    "ReplayPrincipal",
    "default_principals",
    "questions_from_rows",
    "stored_scores",
    "replay_principal",
    "replay_run",
    "replay_markdown",
    "replay_figure",
    "add_replay_subcommand",
]

REFERENCE_METHODS = ("sc_pooled", "fair_single", "random", "pass@k")
"""Methods of the run that do not depend on the principal (reference lines)."""

_REPLAYED = ("align", "best_of_n", "uniform_principal")


@dataclasses.dataclass(frozen=True)
class ReplayPrincipal:
    """One principal to replay.

    Attributes:
      type: ``stored``, ``oracle`` or ``noisy_oracle``.
      flip_rate: flip probability of ``noisy_oracle`` (ignored otherwise).
    """

    type: str
    flip_rate: float = 0.0

    def __post_init__(self):
        if self.type not in ("stored", "oracle", "noisy_oracle"):
            raise ValueError(f"unknown replay principal {self.type!r}; expected stored, oracle or noisy_oracle")
        if not 0.0 <= self.flip_rate <= 1.0:
            raise ValueError(f"flip_rate must be in [0, 1], got {self.flip_rate}")

    @property
    def label(self) -> str:
        return f"noisy_oracle@{self.flip_rate:g}" if self.type == "noisy_oracle" else self.type


def default_principals(flip_rates: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)) -> list[ReplayPrincipal]:
    """``stored``, ``oracle`` and ``noisy_oracle`` at each flip rate."""
    return [ReplayPrincipal("stored"), ReplayPrincipal("oracle")] + [
        ReplayPrincipal("noisy_oracle", float(f)) for f in flip_rates
    ]


# --------------------------------------------------------------------------------------
# Rows -> candidates
# --------------------------------------------------------------------------------------


def _question_from_row(row: dict, where: str) -> tuple[QuestionCandidates, dict[int, bool]]:
    try:
        agents = []
        answers_by_id: dict[int, str] = {}
        correct_by_id: dict[int, bool] = {}
        for agent in row["agents"]:
            samples = agent["samples"]
            slots = tuple(
                Slot(int(s["answer_id"]), s["answer"], int(s["count"]), float(s["utility"]), int(s["representative"]))
                for s in agent["slots"]
            )
            for slot, stored in zip(slots, agent["slots"]):
                if slot.answer_id >= 0:
                    answers_by_id.setdefault(slot.answer_id, slot.answer)
                    correct_by_id[slot.answer_id] = bool(stored["correct"])
            agents.append(AgentCandidates(
                texts=tuple(s["text"] for s in samples),
                answers=tuple(s["answer"] for s in samples),
                answer_ids=tuple(int(s["answer_id"]) for s in samples),
                tokens=tuple(int(s["tokens"]) for s in samples),
                slots=slots,
            ))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: not a complete results row ({type(exc).__name__}: {exc})") from None
    if not agents:
        raise ConfigError(f"{where}: results row has no agents")
    return QuestionCandidates(tuple(agents), answers_by_id), correct_by_id


def questions_from_rows(rows: Sequence[dict], where: str = "results") -> tuple[list[QuestionCandidates], list[dict]]:
    """Rebuilds each row's :class:`QuestionCandidates` and ``answer id -> correct`` map."""
    built = [_question_from_row(row, f"{where}: question {row.get('question_id')!r}") for row in rows]
    return [b[0] for b in built], [b[1] for b in built]


def stored_scores(row: dict, num_slots: int) -> np.ndarray:
    """The run's principal score of each slot, float32 ``[N, K]`` (0 beyond an agent's slots)."""
    score = np.zeros((len(row["agents"]), num_slots), np.float32)
    for i, agent in enumerate(row["agents"]):
        for s, slot in enumerate(agent["slots"]):
            score[i, s] = float(slot["principal_score"])
    return score


def _pairwise_accuracy(score: np.ndarray, valid: np.ndarray, correct: np.ndarray) -> float:
    """P(score of a correct slot > score of a wrong slot), ties 1/2; NaN without both kinds."""
    good = score[valid & correct]
    bad = score[valid & ~correct]
    if good.size == 0 or bad.size == 0:
        return float("nan")
    diff = good[:, None] - bad[None, :]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def _score_by_agent(rows: Sequence[dict]) -> list[dict]:
    """Per agent: mean stored principal score of its slots, and the share of its slots that are correct."""
    out = []
    for i, agent in enumerate(rows[0]["agents"]):
        slots = [s for row in rows for s in row["agents"][i]["slots"]]
        out.append({"agent": agent["name"],
                    "mean_score": float(np.mean([s["principal_score"] for s in slots])),
                    "slot_accuracy": float(np.mean([s["correct"] for s in slots])),
                    "slots": len(slots)})
    return out


def _pooled_majority_score(question: QuestionCandidates, score: np.ndarray) -> float:
    """The principal's score of the pooled self-consistency answer: the mean score of the slots
    carrying it, in expectation over tied majority answers (0 when no sample has an answer)."""
    counts: dict[int, int] = {}
    for agent in question.agents:
        for answer_id in agent.answer_ids:
            if answer_id >= 0:
                counts[answer_id] = counts.get(answer_id, 0) + 1
    if not counts:
        return 0.0
    top = max(counts.values())
    values = []
    for answer_id in (a for a, c in counts.items() if c == top):
        values.append(np.mean([score[i, s] for i, agent in enumerate(question.agents)
                               for s, slot in enumerate(agent.slots) if slot.answer_id == answer_id]))
    return float(np.mean(values))


# --------------------------------------------------------------------------------------
# Replay
# --------------------------------------------------------------------------------------


def replay_principal(config: ReasonConfig, rows: Sequence[dict], principal: ReplayPrincipal, *,
                     noise_seeds: int = 5, questions=None) -> dict[str, np.ndarray]:
    """Plays the game on the rows' candidates under ``principal``.

    Args:
      config: the run's config (game settings, K, seed).
      rows: the run's results rows (Q of them), in the run's question order starting at
        its first question (row ``j`` was in window ``j // batch_questions``).
      principal: which principal's scores to use.
      noise_seeds: independent flip draws averaged per question (``noisy_oracle`` only).
      questions: ``questions_from_rows(rows)`` if already built.

    Returns:
      ``{method: float64 [Q]}`` for ``align``, ``best_of_n``, ``uniform_principal`` (each
      question's correctness, averaged over flip draws), ``pairwise`` (the principal's
      pairwise ranking accuracy, NaN where a question has no correct or no wrong slot)
      and ``utility_correlation``.
    """
    from align_jax.game.scenarios import utility_correlation

    if questions is None:
        questions = questions_from_rows(rows)
    qs, correct_maps = questions
    num_slots = max(a.num_samples for a in config.agents)
    draws = noise_seeds if principal.type == "noisy_oracle" else 1
    if draws < 1:
        raise ValueError(f"noise_seeds must be >= 1, got {noise_seeds}")
    game_config = config.game.game_config(record_trajectory=False)
    params = GameParams.create(config.game.step_size)
    names = (*_REPLAYED, "pairwise", "utility_correlation", "nash_gap", "align_score", "sc_pooled_score")
    totals = {name: np.zeros(len(rows)) for name in names}
    for d in range(draws):
        if principal.type == "stored":
            scores = [stored_scores(row, num_slots) for row in rows]
        elif principal.type == "oracle":
            scores = [oracle_scores(q, c, num_slots).score for q, c in zip(qs, correct_maps)]
        else:
            scores = [noisy_oracle_scores(q, c, num_slots, flip_rate=principal.flip_rate, seed=config.seed + d,
                                          question_id=row["question_id"]).score
                      for q, c, row in zip(qs, correct_maps, rows)]
        candidates = stack_candidate_sets(qs, scores, correct_maps, num_slots)
        # the run's windows and keys (``fold_in(fold_in(key(seed), w), 1)``), so that
        # ``mode: sampled`` games replay exactly too
        played = []
        base_key = jax.random.key(config.seed)
        b = config.batch_questions
        for w, start in enumerate(range(0, len(rows), b)):
            window = jax.tree.map(lambda x: x[start:start + b], candidates)
            played += play_window(game_config, params, window, qs[start:start + b],
                                  jax.random.fold_in(jax.random.fold_in(base_key, w), 1))
        correlation = np.asarray(jax.vmap(utility_correlation)(candidates), np.float64)
        host = jax.device_get(candidates)
        for q, question in enumerate(qs):
            totals["align"][q] += played[q]["correct"]
            totals["uniform_principal"][q] += played[q]["baselines"]["uniform_principal"]
            totals["nash_gap"][q] += played[q]["nash_gap"]
            totals["align_score"][q] += host.principal_score[q, played[q]["chosen_agent"], played[q]["chosen_slot"]]
            totals["sc_pooled_score"][q] += _pooled_majority_score(question, host.principal_score[q])
            totals["best_of_n"][q] += baselines_lib.best_of_n(
                host.principal_score[q], host.valid[q], host.answer_id[q], host.correct[q], question.answers_by_id
            ).correct
            totals["pairwise"][q] += _pairwise_accuracy(host.principal_score[q], host.valid[q], host.correct[q])
        totals["utility_correlation"] += correlation
    return {name: value / draws for name, value in totals.items()}


def replay_run(config: ReasonConfig, principals: Optional[Sequence[ReplayPrincipal]] = None, *,
               noise_seeds: int = 5, limit: Optional[int] = None, bootstrap_samples: Optional[int] = None,
               write: bool = True, figures: bool = True) -> dict:
    """Replays every principal on the finished rows of ``config``'s run; see the module docstring.

    Args:
      config: the run's config (its ``results.jsonl`` must exist).
      principals: default :func:`default_principals`.
      noise_seeds: flip draws per noisy-oracle question.
      limit: use only the first ``limit`` rows (in question order).
      bootstrap_samples: resamples for the intervals (default the config's).
      write: write ``replay.json`` / ``replay.md`` to the run directory.
      figures: also write ``replay.png``.

    Returns:
      The report dict (``questions``, ``reference`` and ``principals`` entries with
      accuracies, intervals and the principal diagnostics).

    Raises:
      ConfigError: no results file, a malformed row, or rows of different settings.
    """
    directory = run_dir(config)
    path = directory / "results.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path}: no results file; run `align-jax reason` with this config first")
    rows = list(_read_rows(path).values())  # first row per question, in file order
    hashes = {row.get("settings_hash") for row in rows}
    if len(hashes) > 1:
        raise ConfigError(f"{path}: rows were computed with different settings (hashes {sorted(map(str, hashes))})")
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise ConfigError(f"{path}: no finished questions to replay")
    principals = list(principals) if principals is not None else default_principals()
    questions = questions_from_rows(rows, str(path))
    q = len(rows)
    rng = np.random.default_rng(config.seed)
    indices = rng.integers(0, q, size=(bootstrap_samples or config.bootstrap_samples, q))

    def stat(values: np.ndarray) -> dict:
        low, high = bootstrap_interval(values, indices)
        return {"mean": float(values.mean()), "ci_low": low, "ci_high": high}

    reference = {m: np.array([row["methods"][m]["correct"] for row in rows], np.float64)
                 for m in REFERENCE_METHODS if m in rows[0]["methods"]}
    report: dict = {"name": config.name, "dataset": config.dataset, "questions": q, "seed": config.seed,
                    "noise_seeds": noise_seeds, "run_principal": config.principal.type,
                    "reference": {m: stat(v) for m, v in reference.items()}, "principals": {}}
    for principal in principals:
        result = replay_principal(config, rows, principal, noise_seeds=noise_seeds, questions=questions)
        pairwise = result["pairwise"][np.isfinite(result["pairwise"])]
        entry = {"type": principal.type, "flip_rate": principal.flip_rate if principal.type == "noisy_oracle" else None,
                 **{m: stat(result[m]) for m in _REPLAYED},
                 "pairwise_accuracy": float(pairwise.mean()) if pairwise.size else None,
                 "pairwise_questions": int(pairwise.size),
                 "utility_correlation": float(result["utility_correlation"].mean()),
                 "nash_gap": float(result["nash_gap"].mean()),
                 "principal_utility": {"align": stat(result["align_score"]), "sc_pooled": stat(result["sc_pooled_score"]),
                                       "align - sc_pooled": stat(result["align_score"] - result["sc_pooled_score"])}}
        if "sc_pooled" in reference:
            entry["align - sc_pooled"] = stat(result["align"] - reference["sc_pooled"])
        if principal.type == "stored":
            recorded = np.array([row["methods"]["align"]["correct"] for row in rows], np.float64)
            entry["reproduces_run"] = bool(np.allclose(result["align"], recorded, atol=1e-6))
            entry["by_agent"] = _score_by_agent(rows)
        report["principals"][principal.label] = entry
    if write:
        atomic_write(directory / "replay.json", json.dumps(report, indent=2, sort_keys=True))
        atomic_write(directory / "replay.md", replay_markdown(report))
        if figures:
            replay_figure(report, directory / "replay.png")
    return report


def _ci(s: dict) -> str:
    return f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"


def _signed_ci(s: dict) -> str:
    return f"{s['mean']:+.3f} [{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]"


def replay_markdown(report: dict) -> str:
    """The replay table as markdown."""
    lines = [
        f"# {report['name']}: principal replay on {report['questions']} {report['dataset']} questions",
        "",
        f"Same candidates, different principals (the run's own principal: {report['run_principal']}); "
        f"noisy oracles averaged over {report['noise_seeds']} flip draws per question; 95% paired bootstrap "
        "intervals over questions.",
        "",
        "| principal | pairwise acc. | corr(utility, score) | Nash gap | ALIGN | best-of-N | uniform + principal "
        "| ALIGN - SC pooled | principal's score of the pick: ALIGN - SC pooled |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, p in report["principals"].items():
        pairwise = "n/a" if p["pairwise_accuracy"] is None else f"{p['pairwise_accuracy']:.3f}"
        diff = p.get("align - sc_pooled")
        diff_text = _signed_ci(diff) if diff else "n/a"
        lines.append(f"| {label} | {pairwise} | {p['utility_correlation']:+.3f} | {p['nash_gap']:.3f} | {_ci(p['align'])} | "
                     f"{_ci(p['best_of_n'])} | {_ci(p['uniform_principal'])} | {diff_text} | "
                     f"{_signed_ci(p['principal_utility']['align - sc_pooled'])} |")
    lines += ["", "Principal-independent reference: "
              + ", ".join(f"{m} {_ci(s)}" for m, s in report["reference"].items()) + "."]
    stored = report["principals"].get("stored")
    if stored is not None:
        lines += ["", "Replaying the stored scores reproduces every recorded ALIGN pick: "
                  f"{'yes' if stored.get('reproduces_run') else 'NO'}."]
        lines += ["", f"The run's {report['run_principal']} principal by agent (mean score of the agent's slots; "
                  "share of its slots that are correct): "
                  + "; ".join(f"{a['agent']} {a['mean_score']:.3f} ({a['slot_accuracy']:.3f} of {a['slots']})"
                              for a in stored["by_agent"]) + "."]
    return "\n".join(lines) + "\n"


def replay_figure(report: dict, path: Path) -> Path:
    """Accuracy against the principal's pairwise ranking accuracy.

    Lines: the noisy oracles (one point per flip rate, with 95% bands); stars: the
    run's own principal at its pairwise accuracy; horizontal lines: the
    principal-independent methods.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    noisy = [p for p in report["principals"].values()
             if p["type"] == "noisy_oracle" and p["pairwise_accuracy"] is not None]
    noisy.sort(key=lambda p: p["pairwise_accuracy"])
    fig, ax = plt.subplots(figsize=(9.0, 4.4))
    styles = {"align": ("C0", "ALIGN"), "best_of_n": ("C1", "best-of-N"), "uniform_principal": ("C2", "uniform + principal")}
    if noisy:
        x = np.array([p["pairwise_accuracy"] for p in noisy])
        for method, (color, label) in styles.items():
            mean = np.array([p[method]["mean"] for p in noisy])
            low = np.array([p[method]["ci_low"] for p in noisy])
            high = np.array([p[method]["ci_high"] for p in noisy])
            ax.plot(x, mean, "o-", color=color, label=f"{label}, noisy oracle")
            ax.fill_between(x, low, high, color=color, alpha=0.15)
        for p in noisy:
            ax.annotate(f"f={p['flip_rate']:g}", (p["pairwise_accuracy"], p["align"]["mean"]),
                        textcoords="offset points", xytext=(3, 6), fontsize=6, color="C0")
    stored = report["principals"].get("stored")
    if stored is not None and stored["pairwise_accuracy"] is not None:
        for method, (color, label) in styles.items():
            ax.plot([stored["pairwise_accuracy"]], [stored[method]["mean"]], "*", color=color, ms=12, mec="k",
                    label=f"{label}, the run's {report['run_principal']}")
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
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _replay_command(args) -> int:
    import sys

    from align_jax.config import FieldError

    try:
        config = load_reason_config(args.config)
        if args.output_dir is not None:
            config = dataclasses.replace(config, output_dir=args.output_dir)
        if args.seed is not None:
            config = dataclasses.replace(config, seed=args.seed)
        if args.noise_seeds < 1:
            raise ConfigError(f"--noise-seeds: must be >= 1, got {args.noise_seeds}")
        for rate in args.flip_rates:
            if not 0.0 <= rate <= 1.0:
                raise ConfigError(f"--flip-rates: each rate must be in [0, 1], got {rate}")
        report = replay_run(config, default_principals(args.flip_rates), noise_seeds=args.noise_seeds,
                            limit=args.limit, figures=not args.no_figures)
    except (ConfigError, FieldError) as exc:
        print(f"align-jax: error: {exc}", file=sys.stderr)
        return 2
    print(replay_markdown(report))
    print(f"results: {run_dir(config)}/replay.{{json,md{',png' if not args.no_figures else ''}}}")
    return 0


def add_replay_subcommand(subparsers) -> argparse.ArgumentParser:
    """Adds ``replay CONFIG [--flip-rates F ...] [--noise-seeds S] [--limit N] [--output-dir DIR]``."""
    parser = subparsers.add_parser("replay", help="swap the principal on a finished reason run's candidates (no model)")
    parser.add_argument("config", help="the reason run's YAML config")
    parser.add_argument("--flip-rates", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
                        help="noisy-oracle flip rates (default 0 0.1 ... 0.5)")
    parser.add_argument("--noise-seeds", type=int, default=5, help="flip draws averaged per question (default 5)")
    parser.add_argument("--limit", type=int, help="replay only the first N finished questions")
    parser.add_argument("--seed", type=int, help="override seed (selects the run directory)")
    parser.add_argument("--output-dir", help="override output_dir")
    parser.add_argument("--no-figures", action="store_true", help="skip replay.png")
    parser.set_defaults(func=_replay_command)
    return parser
