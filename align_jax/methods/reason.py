"""ALIGN against the baselines on GSM8K / GSM-Hard / MATH-500: ``align-jax reason config.yaml``.

One run = one :class:`ReasonConfig` (a YAML file in ``configs/``). The questions are
cut into fixed *windows* of ``batch_questions`` consecutive questions (window w holds
questions ``[w B, (w + 1) B)`` of the configured list); each window is processed as a
batch (:func:`process_window`):

1. candidates: the configured generator (``candidates: {type: sampled}``, a
   :mod:`~align_jax.methods.generators` plug-in): every agent's K samples of every
   question with self-consistency slots and canonical answer ids;
2. the principal's scores (``principal: {type: ...}``, a
   :mod:`~align_jax.methods.principals` plug-in);
3. ALIGN: ``CandidateSet [Q, N, K]`` -> the game engine (:func:`align.play_window`);
4. the configured methods (``methods: [...]``, :mod:`~align_jax.methods.reason_methods`
   plug-ins): ALIGN's pick, best-of-N by the principal, self-consistency per agent and
   pooled, the engine's fair single agent / random / uniform+principal, pass@k, greedy
   CoT per agent (temperature 0) and multi-agent debate.

Every question's row (a :class:`~align_jax.methods.rows.ReasonRow`: all candidate texts
and answers, utilities, principal scores, each method's pick, correctness and cost,
the game's diagnostics, wall time) is appended atomically to
``<output_dir>/<name>/seed<seed>/results.jsonl`` through the shared runner
(:mod:`align_jax.runner`). A rerun skips questions already in the file. A window with
some questions missing is recomputed in full and only the missing rows are written,
so an interrupted and resumed run writes the same rows as an uninterrupted one. Rows
carry a hash of the settings that determine them (fields at their default are left
out, so a new defaulted config field keeps old runs resumable); a rerun with different
settings under the same name is refused. At the end the run directory gets
``summary.md`` / ``summary.json`` (:mod:`~align_jax.methods.reason_report`: accuracy per
method with paired 95% bootstrap intervals over questions, tokens and model calls per
question) and ``accuracy.png``.

Several machines: ``--shard I/N`` computes only the windows ``I-1, I-1+N, ...`` into
``<run dir>/shards/<I>-of-<N>/`` and ``--merge`` joins the finished shards into the run's
``results.jsonl`` (the unsharded run's rows, in question order) and writes the summary;
``align-jax launch`` runs the shards as Ray tasks (:mod:`align_jax.shards`,
:mod:`align_jax.cluster`).

Keys: window w uses ``fold_in(key(seed), w)``, then ``fold_in(., stage)`` per stage;
inside a stage, question q of the window gets ``fold_in(., q)``-derived keys, so a row
does not depend on how many questions its window holds (``limit`` is not a setting).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import numpy as np

from align_jax.data import datasets as datasets_lib
from align_jax.data.answers import collect_math_verify_failures
from align_jax.game.types import GameParams
from align_jax.methods.align import play_window
from align_jax.methods.candidates import AgentSpec, ModelPool, slot_correctness, stack_candidate_sets
from align_jax.methods.generators import CandidateGenerator, make_generator
from align_jax.methods.principals import Principal, PrincipalBatch, make_principal
from align_jax.methods.reason_config import (
    SETTINGS_EXCLUDE,
    AgentSection,
    DebateSection,
    ReasonConfig,
    agent_specs,
    enabled_methods,
    load_reason_config,
    reason_settings_hash,
    run_dir,
)
from align_jax.methods.reason_methods import Window
from align_jax.methods.reason_report import (
    accuracy_figure,
    bootstrap_interval,
    method_names,
    print_summary,
    summarize,
    summary_markdown,
)
from align_jax.methods.rows import (
    AgentRecord,
    CostRecord,
    GameRecord,
    PrincipalRecord,
    ReasonRow,
    SampleRecord,
    SlotRecord,
    read_rows,
    row_to_dict,
)
from align_jax.runner import RunFiles, Unit, add_run_arguments, apply_overrides, run_units
from align_jax.shards import Shard

__all__ = [
    "ReasonReport",
    "build_window",
    "process_window",
    "run_reason",
    "add_reason_subcommand",
    # re-exported from reason_config and reason_report
    "AgentSection",
    "DebateSection",
    "ReasonConfig",
    "SETTINGS_EXCLUDE",
    "load_reason_config",
    "run_dir",
    "reason_settings_hash",
    "enabled_methods",
    "agent_specs",
    "method_names",
    "summarize",
    "bootstrap_interval",
    "summary_markdown",
    "print_summary",
    "accuracy_figure",
]

logger = logging.getLogger(__name__)


def _cost_record(cost) -> CostRecord:
    return CostRecord(int(cost.calls), int(cost.gen_tokens), int(cost.prompt_tokens))


class _StageTimer:
    """Wall time per stage of a window (each lap is the time since the previous one)."""

    def __init__(self, questions: int):
        self.start = time.perf_counter()
        self.questions = questions
        self.stages: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        self.stages[stage] = time.perf_counter() - self.start - sum(self.stages.values())
        logger.info("window of %d questions: %s took %.1f s", self.questions, stage, self.stages[stage])

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def build_window(config: ReasonConfig, agents: Sequence[AgentSpec], pool: Optional[ModelPool],
                 problems: Sequence[datasets_lib.Problem], key: jax.Array, *,
                 generator: CandidateGenerator, principal: Principal,
                 timer: Optional[_StageTimer] = None) -> tuple[Window, np.ndarray]:
    """The shared stages of a window: candidates, principal scores and the ALIGN game.

    Returns:
      The :class:`~align_jax.methods.reason_methods.Window` every method reads, and
      ``corr(agent utility, principal score)`` per question, float ``[Q]``.
    """
    from align_jax.game.scenarios import utility_correlation

    timer = timer or _StageTimer(len(problems))
    texts_q = [p.question for p in problems]
    num_slots = max(a.num_samples for a in agents)
    generated = generator.generate(pool, agents, texts_q, jax.random.fold_in(key, 0))
    timer.lap("sampling")
    questions = generated.questions
    correct_maps, check_failures = [], []
    for question, problem in zip(questions, problems):
        with collect_math_verify_failures() as failures:  # undecided verdicts count as wrong; keep the count
            correct_maps.append(slot_correctness(question, problem.gold))
        check_failures.append(len(failures))
    scores = principal.score(PrincipalBatch(texts_q, [p.id for p in problems], questions, correct_maps, num_slots))
    timer.lap("principal")
    candidates = stack_candidate_sets(questions, [s.score for s in scores], correct_maps, num_slots)
    game_rows = play_window(config.game.game_config(record_trajectory=False), GameParams.create(config.game.step_size),
                            candidates, questions, jax.random.fold_in(key, 1))
    correlation = np.asarray(jax.vmap(utility_correlation)(candidates))
    timer.lap("align")
    window = Window(config, agents, pool, problems, key, questions, generated.costs, correct_maps,
                    [s.cost for s in scores], jax.device_get(candidates), game_rows, check_failures)
    return window, correlation


def process_window(config: ReasonConfig, agents: Sequence[AgentSpec], pool: Optional[ModelPool],
                   problems: Sequence[datasets_lib.Problem], key: jax.Array, *,
                   generator: Optional[CandidateGenerator] = None,
                   principal: Optional[Principal] = None) -> list[dict]:
    """Runs the shared stages and every enabled method on one window; one row dict per question.

    Stages (wall time of each recorded per question in ``stage_wall_s``): ``sampling``
    (the candidate generator, key ``fold_in(key, 0)``), ``principal``, ``align`` (the
    game, key ``fold_in(key, 1)``), then each method that calls models (``greedy``,
    ``debate``); the other methods are host-side selection rules over the window.
    """
    generator = generator or make_generator(config.candidates)
    principal = principal or make_principal(config.principal, pool=pool, default_model=config.principal_model(),
                                            seed=config.seed)
    timer = _StageTimer(len(problems))
    window, correlation = build_window(config, agents, pool, problems, key, generator=generator,
                                       principal=principal, timer=timer)
    questions, host, game_rows = window.questions, window.candidates, window.game
    scores_cost = window.principal_costs
    methods = enabled_methods(config)
    outputs = {}
    for method in sorted(methods, key=lambda m: m.stage is None):  # model calls first, under their stage timer
        outputs[method.name] = method.run(window)
        if method.stage is not None:
            timer.lap(method.stage)
    wall = timer.elapsed()
    stages = timer.stages
    correct_maps = window.correct_maps

    rows = []
    names = window.agent_names
    for q, (problem, question) in enumerate(zip(problems, questions)):
        agents_rows = []
        for i, agent in enumerate(question.agents):
            samples = [SampleRecord(t, ans, aid, tok, bool(correct_maps[q].get(aid, False)))
                       for t, ans, aid, tok in zip(agent.texts, agent.answers, agent.answer_ids, agent.tokens)]
            slots = [SlotRecord(slot.answer_id, slot.answer, slot.count, slot.utility, slot.representative,
                                float(host.principal_score[q, i, s]), bool(host.correct[q, i, s]))
                     for s, slot in enumerate(agent.slots)]
            agents_rows.append(AgentRecord(names[i], samples, slots, _cost_record(window.sample_costs[q][i])))
        game = {k: v for k, v in game_rows[q].items() if k not in ("baselines", "answer", "correct")}
        sections = {"greedy": None, "debate": None, "econ": None}
        results = {}
        for method in methods:
            output = outputs[method.name][q]
            results.update(output.results)
            if method.section is not None:
                sections[method.section] = output.section
        row = ReasonRow(
            question_id=problem.id, question=problem.question, gold=problem.gold, agents=agents_rows,
            principal=PrincipalRecord(config.principal.type, _cost_record(scores_cost[q])),
            game=GameRecord(**game, utility_correlation=float(correlation[q])),
            greedy=sections["greedy"], debate=sections["debate"], methods=results,
            wall_s=wall / len(problems), window_wall_s=wall,
            stage_wall_s={k: v / len(problems) for k, v in stages.items()},  # this question's share
            math_verify_failures=window.check_failures[q] or None,
            econ=sections["econ"],
        )
        rows.append(row_to_dict(row))
    return rows


class ReasonReport(NamedTuple):
    """What :func:`run_reason` returns.

    Attributes:
      rows: the results rows of the configured questions, in question order.
      summary: :func:`summarize` output.
      directory: the run directory.
      wall_s: wall time of this call (model loading and compilation included).
    """

    rows: list
    summary: dict
    directory: Path
    wall_s: float


def run_reason(config: ReasonConfig, *, progress: bool = True, figures: bool = True,
               pool: Optional[ModelPool] = None,
               on_question: Optional[Callable[[dict], None]] = None,
               shard: Optional[Shard] = None, merge: bool = False) -> ReasonReport:
    """Runs (or resumes) a reason run; see the module docstring.

    Args:
      config: the validated :class:`ReasonConfig`.
      progress: show a rich progress bar.
      figures: write ``accuracy.png``.
      pool: a :class:`ModelPool` to reuse (default: a new one; models load lazily,
        only when a window has work).
      on_question: called with each new row right after it is written (an exception
        raised there stops the run; a rerun resumes).
      shard: compute only this shard's windows, in its own directory (the report's rows
        and summary are the shard's).
      merge: merge the finished shards into the run directory first (no model is loaded
        when they are complete).

    Raises:
      ConfigError: the results file was written with different settings, or holds a
        malformed row (file and line named).
      DatasetError / WeightsError: data or model files are unusable.
    """
    wall_start = time.perf_counter()
    problems = datasets_lib.load_dataset(config.dataset, config.split, config.data_dir,
                                         limit=config.limit, offset=config.offset)
    files = RunFiles(run_dir(config), key_field="question_id", settings=reason_settings_hash(config),
                     shard=shard, merge=merge)
    read_rows(files.results_path)  # every finished row checked against the row schema
    files.write_json("config.json", dataclasses.asdict(config))
    agents = agent_specs(config)
    for method in enabled_methods(config):  # run-start checks of methods with their own inputs (before any model)
        if hasattr(method, "prepare"):
            method.prepare(config)
    pool = pool if pool is not None else ModelPool(dtype=config.dtype, param_dtype=config.param_dtype,
                                                   quantized=config.quantized)
    generator = make_generator(config.candidates)
    principal = None  # built on the first window with work, so a finished run loads no model
    base_key = jax.random.key(config.seed)
    b = config.batch_questions
    units = [Unit(tuple(p.id for p in problems[j:j + b]), f"window {j // b}", (j // b, problems[j:j + b]))
             for j in range(0, len(problems), b)]

    def compute(unit: Unit) -> list[dict]:
        nonlocal principal
        if principal is None:
            principal = make_principal(config.principal, pool=pool, default_model=config.principal_model(),
                                       seed=config.seed)
        w, window = unit.payload
        return process_window(config, agents, pool, window, jax.random.fold_in(base_key, w),
                              generator=generator, principal=principal)

    description = f"{config.name}: questions" + (f" (shard {shard})" if shard is not None else "")
    run_units(files, units, compute, description=description, progress=progress, on_row=on_question)
    rows = files.rows(p.id for p in problems)
    summary = summarize(rows, config)
    summary["run_wall_s"] = time.perf_counter() - wall_start
    files.write_json("summary.json", summary)
    files.write_text("summary.md", summary_markdown(config, summary))
    if figures and rows:
        accuracy_figure(config, summary, files.path("accuracy.png"))
    return ReasonReport(rows, summary, files.directory, time.perf_counter() - wall_start)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------

_OVERRIDES = ("limit", "seed", "output_dir")


def _reason_config(args) -> ReasonConfig:
    return apply_overrides(load_reason_config(args.config), args, _OVERRIDES)


def _reason_command(args) -> int:
    config = _reason_config(args)
    report = run_reason(config, progress=not args.quiet, figures=not args.no_figures, shard=args.shard,
                        merge=args.merge)
    print_summary(config, report.summary)
    if args.shard is not None:
        print(f"shard {args.shard}: {len(report.rows)} questions; merge the shards with --merge")
    print(f"wall time {report.wall_s:.1f} s; results: {report.directory}")
    return 0


def add_reason_subcommand(subparsers) -> argparse.ArgumentParser:
    """Adds ``reason CONFIG [--limit N] [--seed S] [--output-dir DIR] [--shard I/N | --merge] [--no-figures]
    [--quiet]``."""
    parser = subparsers.add_parser("reason", help="ALIGN vs baselines on GSM8K / GSM-Hard / MATH-500 with real models")
    add_run_arguments(parser, _OVERRIDES, shards=True)
    parser.set_defaults(func=_reason_command, run_directory=lambda args: run_dir(_reason_config(args)))
    return parser
