"""Principal ablation without a model: replay the ALIGN game on a finished run's candidates.

``align-jax replay configs/<name>.yaml [--principals stored arithmetic noisy_oracle ...]``
reads the run's ``results.jsonl`` (every candidate's text, answer, self-consistency
utility, correctness and the principal's score are stored per slot), swaps the
principal, and plays the delegation game again on the same candidates. It answers the
question a verifier run cannot: *how good must the principal be for ALIGN to beat
self-consistency on these candidates?*

Principals replayed (:class:`ReplayPrincipal`):

* ``stored``: the run's own principal scores (reproduces the run's ALIGN, best-of-N and
  uniform + principal results exactly; a consistency check of the stored rows);
* any registered principal that needs no model
  (:data:`~align_jax.methods.principals.PRINCIPALS`): ``oracle``, ``arithmetic``,
  ``noisy_oracle`` (written ``noisy_oracle@0.2``, or bare to sweep ``--flip-rates``), and
  whatever is registered later. A principal whose scores depend on the seed
  (``seeded``, the noisy oracle) is averaged over ``noise_seeds`` draws (seeds
  ``seed, seed + 1, ...``; the first reproduces a run made with that principal).

For every principal the report gives, with paired 95% bootstrap intervals over
questions (the same resamples for all methods), the accuracy of ALIGN, best-of-N and
uniform submissions + the principal's pick, ALIGN and best-of-N minus pooled
self-consistency, the principal's within-question pairwise ranking accuracy
(probability that a correct slot outscores a wrong one of the same question, ties
counted half; averaged over the questions that have both) with its share of ties, and
corr(agent utility, principal score). The principal-independent methods of the run
(pooled self-consistency, the fair single agent, a random candidate, pass@k) are the
reference lines. Outputs go to the run directory: ``replay.json``, ``replay.md`` and
``replay.png`` (accuracy against the principal's pairwise accuracy), rendered by
:mod:`align_jax.methods.replay_report`.

No model is loaded. The rows are read with :func:`~align_jax.methods.rows.read_rows`
(schema errors name file and line) and must carry the config's settings hash
(:class:`~align_jax.runner.RunFiles`). The game is replayed window by window with the
run's own window keys (one jit-compiled program per window shape), so ``mode: sampled``
runs replay exactly too.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Optional, Sequence

import jax
import numpy as np

from align_jax.config import ConfigError, FieldError
from align_jax.game.types import GameParams
from align_jax.methods import baselines as baselines_lib
from align_jax.methods.align import play_window
from align_jax.methods.candidates import AgentCandidates, QuestionCandidates, Slot, stack_candidate_sets
from align_jax.methods.principals import (
    PRINCIPALS,
    Principal,
    PrincipalBatch,
    PrincipalModelError,
    PrincipalSection,
    make_principal,
    model_free_principals,
)
from align_jax.methods.replay_report import STORED, replay_figure, replay_markdown
from align_jax.methods.reason import (
    ReasonConfig,
    bootstrap_interval,
    load_reason_config,
    reason_settings_hash,
    run_dir,
)
from align_jax.methods.rows import read_rows
from align_jax.runner import RunFiles, add_run_arguments, apply_overrides

__all__ = [
    "REFERENCE_METHODS",
    "STORED",
    "DEFAULT_PRINCIPALS",
    "DEFAULT_FLIP_RATES",
    "ReplayPrincipal",
    "replay_principals",
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

DEFAULT_PRINCIPALS = (STORED, "oracle", "arithmetic", "noisy_oracle")
DEFAULT_FLIP_RATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)

_REPLAYED = ("align", "best_of_n", "uniform_principal")
_OVERRIDES = ("seed", "output_dir", "limit")


def _model_free() -> list[str]:
    return [STORED, *model_free_principals()]


@dataclasses.dataclass(frozen=True)
class ReplayPrincipal:
    """One principal to replay.

    Attributes:
      type: ``stored`` or a registered principal that needs no model.
      flip_rate: the section's ``flip_rate`` (None: the section default; used by ``noisy_oracle``).

    Raises:
      ConfigError: an unknown type, one that needs a model, or a flip rate outside ``[0, 1]``.
    """

    type: str
    flip_rate: Optional[float] = None

    def __post_init__(self):
        if self.flip_rate is not None and not 0.0 <= self.flip_rate <= 1.0:
            raise ConfigError(f"replay principal {self.label}: flip_rate must be in [0, 1], got {self.flip_rate}")
        if self.type == STORED:
            return
        if self.type not in PRINCIPALS:
            raise ConfigError(f"unknown replay principal {self.type!r}; known: {', '.join(_model_free())}")
        try:
            make_principal(self.section())
        except PrincipalModelError:
            raise ConfigError(f"principal {self.type!r} scores with an LLM, and replay loads no model; replay "
                              f"{STORED!r} for the run's own {self.type} scores, or one of: "
                              f"{', '.join(_model_free())}") from None

    @property
    def label(self) -> str:
        """``type``, or ``type@flip_rate``."""
        return self.type if self.flip_rate is None else f"{self.type}@{self.flip_rate:g}"

    def section(self) -> PrincipalSection:
        """The ``principal:`` section this replay principal stands for (not for ``stored``)."""
        if self.flip_rate is None:
            return PrincipalSection(type=self.type)
        return PrincipalSection(type=self.type, flip_rate=self.flip_rate)

    def build(self, seed: int) -> Principal:
        """The principal, seeded with ``seed``."""
        return make_principal(self.section(), seed=seed)


def replay_principals(specs: Sequence[str], flip_rates: Sequence[float] = DEFAULT_FLIP_RATES) -> list[ReplayPrincipal]:
    """Parses ``NAME`` / ``NAME@RATE`` specs; a bare principal that has a ``flip_rate``
    (the noisy oracle) is swept over ``flip_rates``.

    Raises:
      ConfigError: an unknown or model-needing name, or a malformed rate.
    """
    out: list[ReplayPrincipal] = []
    for spec in specs:
        name, _, rate = spec.partition("@")
        if rate:
            try:
                value = float(rate)
            except ValueError:
                raise ConfigError(f"replay principal {spec!r}: {rate!r} is not a flip rate") from None
            out.append(ReplayPrincipal(name, value))
            continue
        principal = ReplayPrincipal(name)
        if name != STORED and hasattr(principal.build(0), "flip_rate"):
            out += [ReplayPrincipal(name, float(f)) for f in flip_rates]
        else:
            out.append(principal)
    labels = [p.label for p in out]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ConfigError(f"replay principals named twice: {', '.join(duplicates)}")
    return out


def default_principals(flip_rates: Sequence[float] = DEFAULT_FLIP_RATES) -> list[ReplayPrincipal]:
    """``stored``, ``oracle``, ``arithmetic`` and ``noisy_oracle`` at each flip rate."""
    return replay_principals(DEFAULT_PRINCIPALS, flip_rates)


# --------------------------------------------------------------------------------------
# Rows -> candidates
# --------------------------------------------------------------------------------------


def _question_from_row(row: dict) -> tuple[QuestionCandidates, dict[int, bool]]:
    agents = []
    answers_by_id: dict[int, str] = {}
    correct_by_id: dict[int, bool] = {}
    for agent in row["agents"]:
        samples = agent["samples"]
        slots = tuple(Slot(int(s["answer_id"]), s["answer"], int(s["count"]), float(s["utility"]),
                           int(s["representative"])) for s in agent["slots"])
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
    return QuestionCandidates(tuple(agents), answers_by_id), correct_by_id


def questions_from_rows(rows: Sequence[dict], where: str = "results") -> tuple[list[QuestionCandidates], list[dict]]:
    """Rebuilds each row's :class:`QuestionCandidates` and ``answer id -> correct`` map.

    The rows are assumed schema-checked (:func:`~align_jax.methods.rows.read_rows`).

    Raises:
      ConfigError: a row without agents, or agents whose slots point outside their samples.
    """
    built = []
    for row in rows:
        question, correct = _question_from_row(row)
        name = f"{where}: question {row.get('question_id')!r}"
        if not question.agents:
            raise ConfigError(f"{name}: results row has no agents")
        for i, agent in enumerate(question.agents):
            if any(not 0 <= slot.representative < agent.num_samples for slot in agent.slots):
                raise ConfigError(f"{name}: agent {i}: a slot's representative is not one of its "
                                  f"{agent.num_samples} samples")
        built.append((question, correct))
    return [b[0] for b in built], [b[1] for b in built]


def stored_scores(row: dict, num_slots: int) -> np.ndarray:
    """The run's principal score of each slot, float32 ``[N, K]`` (0 beyond an agent's slots)."""
    score = np.zeros((len(row["agents"]), num_slots), np.float32)
    for i, agent in enumerate(row["agents"]):
        for s, slot in enumerate(agent["slots"]):
            score[i, s] = float(slot["principal_score"])
    return score


def _pairwise(score: np.ndarray, valid: np.ndarray, correct: np.ndarray) -> tuple[float, float]:
    """(P(score of a correct slot > score of a wrong slot) with ties 1/2, share of tied pairs);
    NaN without both kinds of slot."""
    good = score[valid & correct]
    bad = score[valid & ~correct]
    if good.size == 0 or bad.size == 0:
        return float("nan"), float("nan")
    diff = good[:, None] - bad[None, :]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0))), float(np.mean(diff == 0))


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
      config: the run's config (game settings, K, seed, window size).
      rows: the run's results rows (Q of them), in the run's question order starting at
        its first question (row ``j`` was in window ``j // batch_questions``).
      principal: which principal's scores to use.
      noise_seeds: draws averaged per question for a ``seeded`` principal (seeds
        ``config.seed + d``).
      questions: ``questions_from_rows(rows)`` if already built.

    Returns:
      ``{name: float64 [Q]}`` for ``align``, ``best_of_n``, ``uniform_principal`` (each
      question's correctness, averaged over draws), ``pairwise`` (the principal's
      pairwise ranking accuracy, NaN where a question has no correct or no wrong slot),
      ``ties`` (share of tied correct/wrong pairs), ``utility_correlation``,
      ``nash_gap``, ``align_score`` and ``sc_pooled_score`` (the principal's score of
      ALIGN's pick and of the pooled majority answer).

    Raises:
      ValueError: ``noise_seeds < 1``.
    """
    from align_jax.game.scenarios import utility_correlation

    if noise_seeds < 1:
        raise ValueError(f"noise_seeds must be >= 1, got {noise_seeds}")
    if questions is None:
        questions = questions_from_rows(rows)
    qs, correct_maps = questions
    num_slots = max(a.num_samples for a in config.agents)
    batch = PrincipalBatch([row["question"] for row in rows], [row["question_id"] for row in rows], qs,
                           correct_maps, num_slots)
    seeded = principal.type != STORED and principal.build(config.seed).seeded
    draws = noise_seeds if seeded else 1
    game_config = config.game.game_config(record_trajectory=False)
    params = GameParams.create(config.game.step_size)
    names = (*_REPLAYED, "pairwise", "ties", "utility_correlation", "nash_gap", "align_score", "sc_pooled_score")
    totals = {name: np.zeros(len(rows)) for name in names}
    for d in range(draws):
        if principal.type == STORED:
            scores = [stored_scores(row, num_slots) for row in rows]
        else:
            scores = [s.score for s in principal.build(config.seed + d).score(batch)]
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
            pairwise, ties = _pairwise(host.principal_score[q], host.valid[q], host.correct[q])
            totals["pairwise"][q] += pairwise
            totals["ties"][q] += ties
        totals["utility_correlation"] += correlation
    return {name: value / draws for name, value in totals.items()}


def replay_run(config: ReasonConfig, principals: Optional[Sequence[ReplayPrincipal]] = None, *,
               noise_seeds: int = 5, limit: Optional[int] = None, bootstrap_samples: Optional[int] = None,
               write: bool = True, figures: bool = True) -> dict:
    """Replays every principal on the finished rows of ``config``'s run; see the module docstring.

    Args:
      config: the run's config (its ``results.jsonl`` must exist).
      principals: default :func:`default_principals`.
      noise_seeds: draws per question of a seeded principal.
      limit: use only the first ``limit`` rows in question order (default ``config.limit``).
      bootstrap_samples: resamples for the intervals (default the config's).
      write: write ``replay.json`` / ``replay.md`` to the run directory.
      figures: also write ``replay.png``.

    Returns:
      The report dict (``questions``, ``reference`` and ``principals`` entries with
      accuracies, intervals and the principal diagnostics).

    Raises:
      ConfigError: no results file, a malformed row (file:line), or rows of other settings
        than ``config``'s (file:line).
      CorruptResultsError: a corrupt line in the middle of the results file.
    """
    directory = run_dir(config)
    path = directory / "results.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path}: no results file; run `align-jax reason` with this config first")
    rows = list(read_rows(path).values())  # schema-checked; first row per question, in file order
    files = RunFiles(directory, key_field="question_id", settings=reason_settings_hash(config))
    limit = limit if limit is not None else config.limit
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
        defined = np.isfinite(result["pairwise"])
        entry = {"type": principal.type, "flip_rate": principal.flip_rate,
                 **{m: stat(result[m]) for m in _REPLAYED},
                 "pairwise_accuracy": float(result["pairwise"][defined].mean()) if defined.any() else None,
                 "pairwise_ties": float(result["ties"][defined].mean()) if defined.any() else None,
                 "pairwise_questions": int(defined.sum()),
                 "utility_correlation": float(result["utility_correlation"].mean()),
                 "nash_gap": float(result["nash_gap"].mean()),
                 "principal_utility": {"align": stat(result["align_score"]),
                                       "sc_pooled": stat(result["sc_pooled_score"]),
                                       "align - sc_pooled": stat(result["align_score"] - result["sc_pooled_score"])}}
        if "sc_pooled" in reference:
            entry["align - sc_pooled"] = stat(result["align"] - reference["sc_pooled"])
            entry["best_of_n - sc_pooled"] = stat(result["best_of_n"] - reference["sc_pooled"])
        if principal.type == STORED:
            entry["reproduces_run"] = all(
                bool(np.allclose(result[m], [row["methods"][m]["correct"] for row in rows], atol=1e-6))
                for m in _REPLAYED if m in rows[0]["methods"])
            entry["by_agent"] = _score_by_agent(rows)
        report["principals"][principal.label] = entry
    if write:
        files.write_json("replay.json", report)
        files.write_text("replay.md", replay_markdown(report))
        if figures:
            replay_figure(report, files.path("replay.png"))
    return report


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _replay_command(args) -> int:
    config = apply_overrides(load_reason_config(args.config), args, _OVERRIDES)
    if args.noise_seeds < 1:
        raise ConfigError(f"--noise-seeds: must be >= 1, got {args.noise_seeds}")
    for rate in args.flip_rates:
        if not 0.0 <= rate <= 1.0:
            raise ConfigError(f"--flip-rates: each rate must be in [0, 1], got {rate}")
    try:
        principals = replay_principals(args.principals, args.flip_rates)
    except (ConfigError, FieldError) as exc:
        raise ConfigError(f"--principals: {exc}") from None
    report = replay_run(config, principals, noise_seeds=args.noise_seeds, figures=not args.no_figures)
    print(replay_markdown(report))
    print(f"results: {run_dir(config)}/replay.{{json,md{',png' if not args.no_figures else ''}}}")
    return 0


def add_replay_subcommand(subparsers) -> argparse.ArgumentParser:
    """Adds ``replay CONFIG [--principals NAME[@RATE] ...] [--flip-rates F ...] [--noise-seeds S]
    [--limit N] [--seed S] [--output-dir DIR] [--no-figures]``."""
    parser = subparsers.add_parser("replay", help="swap the principal on a finished reason run's candidates (no model)")
    add_run_arguments(parser, _OVERRIDES, quiet=False)
    parser.add_argument("--principals", nargs="+", default=list(DEFAULT_PRINCIPALS), metavar="NAME[@RATE]",
                        help=f"principals to replay: {STORED!r} (the run's own scores) or registered principals "
                             "without a model; a bare noisy_oracle sweeps --flip-rates "
                             f"(default: {' '.join(DEFAULT_PRINCIPALS)})")
    parser.add_argument("--flip-rates", type=float, nargs="+", default=list(DEFAULT_FLIP_RATES),
                        help="noisy-oracle flip rates (default 0 0.1 ... 0.5)")
    parser.add_argument("--noise-seeds", type=int, default=5, help="draws averaged per question for seeded "
                        "principals (default 5)")
    parser.set_defaults(func=_replay_command)
    return parser
