"""ALIGN against the baselines on GSM8K / GSM-Hard / MATH-500: ``align-jax reason config.yaml``.

One run = one :class:`ReasonConfig` (a YAML file in ``configs/``). The questions are
cut into fixed *windows* of ``batch_questions`` consecutive questions (window w holds
questions ``[w B, (w + 1) B)`` of the configured list); each window is processed as a
batch:

1. candidates: every agent's K samples of every question (:func:`candidates.sample_agents`,
   one prefill per prompt shared by its K samples, batched across the window);
2. self-consistency slots and canonical answer ids (:func:`candidates.build_question_candidates`);
3. the principal's scores (:mod:`align_jax.methods.principals`);
4. ALIGN: ``CandidateSet [Q, N, K]`` -> :func:`align_jax.game.play` (:func:`align.play_window`);
5. baselines on the same questions: best-of-N by the principal, self-consistency per
   agent and pooled, the engine's fair single agent / random / uniform+principal,
   pass@k, greedy CoT per agent (temperature 0, one sample) and multi-agent debate.

Every question's row (all candidate texts and answers, utilities, principal scores,
each method's pick, correctness and cost, the game's diagnostics, wall time) is
appended atomically to ``<output_dir>/<name>/seed<seed>/results.jsonl``. A rerun skips
questions already in the file. A window with some questions missing is recomputed in
full (its keys and shapes depend only on the window), and only the missing rows are
written, so an interrupted and resumed run writes the same rows as an uninterrupted
one. Rows carry a hash of the settings that determine them; a rerun with different
settings under the same name is refused. At the end the run directory gets
``summary.md`` / ``summary.json`` (accuracy per method with paired 95% bootstrap
intervals over questions, tokens and model calls per question) and ``accuracy.png``.

Keys: window w uses ``fold_in(key(seed), w)``, then ``fold_in(., stage)`` per stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json

from align_jax.runio import append_jsonl, atomic_write, read_jsonl
import os
import logging
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import numpy as np

from align_jax.config import ConfigError, FieldError, config_to_dict, load_config
from align_jax.data import datasets as datasets_lib
from align_jax.data.answers import extract_answer, is_correct
from align_jax.game.types import GameInputError, GameParams
from align_jax.methods import baselines as baselines_lib
from align_jax.methods.align import play_window
from align_jax.methods.candidates import (
    PROMPT_STYLES,
    AgentSpec,
    Cost,
    ModelPool,
    build_question_candidates,
    sample_agents,
    slot_correctness,
    stack_candidate_sets,
)
from align_jax.methods.principals import PRINCIPAL_TYPES, score_questions
from align_jax.simulate import GameSection

__all__ = [
    "AgentSection",
    "PrincipalSection",
    "DebateSection",
    "ReasonConfig",
    "ReasonReport",
    "load_reason_config",
    "run_dir",
    "run_reason",
    "method_names",
    "summarize",
    "bootstrap_interval",
    "summary_markdown",
    "print_summary",
    "accuracy_figure",
    "add_reason_subcommand",
]

_DTYPES = ("float32", "bfloat16")
logger = logging.getLogger(__name__)


def _model_field_error(field: str, name: str) -> Optional[FieldError]:
    from align_jax.llm import registry

    if not isinstance(name, str) or not name.strip():
        return FieldError(field, "must be a model name or path")
    if registry.is_registered(name):
        return None
    path = Path(name).expanduser()
    if (path.is_file() and path.suffix == ".gguf") or path.is_dir():
        return None
    return FieldError(
        field,
        f"unknown model {name!r}: expected one of {', '.join(sorted(registry.MODELS))}, "
        "a .gguf file or a model / checkpoint directory",
    )


@dataclasses.dataclass(frozen=True)
class AgentSection:
    """One agent (an entry of ``agents:``).

    Attributes:
      model: short model name (``smollm2-135m``, ``qwen2.5-coder-0.5b``) or a path
        (``.gguf`` file, Hugging Face directory, align_jax checkpoint).
      name: label in results; default ``agent<i>``.
      prompt_style: ``zero_shot_cot`` (chat template + step-by-step / ``\\boxed{}``
        instruction) or ``few_shot_cot`` (``num_fewshot`` GSM8K train exemplars).
      num_fewshot: exemplars for ``few_shot_cot``.
      temperature: sampling temperature (>= 0).
      top_p: nucleus mass in ``(0, 1]``.
      num_samples: K >= 1 candidate samples per question.
      max_new_tokens: generation budget per sample.
      stop: extra stop strings.
    """

    model: str
    name: str = ""
    prompt_style: str = "zero_shot_cot"
    num_fewshot: int = 4
    temperature: float = 0.7
    top_p: float = 0.95
    num_samples: int = 8
    max_new_tokens: int = 256
    stop: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.prompt_style not in PROMPT_STYLES:
            raise FieldError("prompt_style", f"must be one of {', '.join(PROMPT_STYLES)}, got {self.prompt_style!r}")
        if self.num_samples < 1:
            raise FieldError("num_samples", f"K must be >= 1, got {self.num_samples}")
        if self.max_new_tokens < 1:
            raise FieldError("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise FieldError("temperature", f"must be finite and >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise FieldError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.prompt_style == "few_shot_cot" and self.num_fewshot < 1:
            raise FieldError("num_fewshot", f"few_shot_cot needs num_fewshot >= 1, got {self.num_fewshot}")
        if self.num_fewshot < 0:
            raise FieldError("num_fewshot", f"must be >= 0, got {self.num_fewshot}")
        if any(not s for s in self.stop):
            raise FieldError("stop", "stop strings must be non-empty")
        error = _model_field_error("model", self.model)
        if error is not None:
            raise error


@dataclasses.dataclass(frozen=True)
class PrincipalSection:
    """The ``principal:`` section (see :mod:`align_jax.methods.principals`).

    Attributes:
      type: ``verifier``, ``ranker``, ``oracle`` or ``noisy_oracle``.
      model: the judging LLM for ``verifier`` / ``ranker`` (default: the first agent's model).
      flip_rate: flip probability of ``noisy_oracle``.
      batch_size: rows per scoring call.
    """

    type: str = "verifier"
    model: Optional[str] = None
    flip_rate: float = 0.1
    batch_size: int = 8

    def __post_init__(self):
        if self.type not in PRINCIPAL_TYPES:
            raise FieldError("type", f"unknown principal type {self.type!r}; expected one of {', '.join(PRINCIPAL_TYPES)}")
        if not 0.0 <= self.flip_rate <= 1.0:
            raise FieldError("flip_rate", f"must be in [0, 1], got {self.flip_rate}")
        if self.batch_size < 1:
            raise FieldError("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.model is not None:
            error = _model_field_error("model", self.model)
            if error is not None:
                raise error


@dataclasses.dataclass(frozen=True)
class DebateSection:
    """The ``debate:`` section.

    Attributes:
      rounds: R debate rounds after round 0 (0 disables the debate baseline).
      max_chars: each other agent's solution is shown as its last ``max_chars`` characters.
    """

    rounds: int = 2
    max_chars: int = 600

    def __post_init__(self):
        if self.rounds < 0:
            raise FieldError("rounds", f"must be >= 0, got {self.rounds}")
        if self.max_chars < 1:
            raise FieldError("max_chars", f"must be >= 1, got {self.max_chars}")


@dataclasses.dataclass(frozen=True)
class ReasonConfig:
    """An ALIGN-vs-baselines run (one YAML file in ``configs/``).

    Attributes:
      name: run name; results go to ``output_dir/name/seed<seed>``.
      dataset: ``gsm8k``, ``gsm-hard`` or ``math500`` (or an alias).
      split: dataset split (``test``; GSM8K also ``train``).
      data_dir: directory with the JSONL files (default: ``$ALIGN_JAX_DATA_DIR`` or
        ``../shared/data``).
      offset: skip this many questions.
      limit: at most this many questions (None: all).
      seed: PRNG seed (sampling, noisy oracle, bootstrap).
      batch_questions: questions per window (the sampler batches across them).
      fewshot_seed: which GSM8K train exemplars few-shot agents see.
      agents: the N agents (at least one).
      principal: :class:`PrincipalSection`.
      game: the game settings (T = ``num_rounds``, ``step_size`` = eta, ...).
      greedy: also run greedy CoT per agent.
      debate: :class:`DebateSection`.
      bootstrap_samples: resamples for the 95% intervals.
      dtype: activation / KV-cache dtype (``float32`` or ``bfloat16``).
      param_dtype: weight dtype (None = ``dtype``); ``bfloat16`` with ``dtype: float32`` is
        the mixed-precision mode, about 2x faster on CPUs with bfloat16 matrix units.
      quantized: keep the GGUF's block-quantized weights as int8 codes + scales
        (``load_pretrained(quantized=True)``): the same weights in a quarter of the memory,
        3-4x faster decoding on a CPU. Combined with ``param_dtype: bfloat16`` the products
        run in bfloat16 (on AMX tile units where available), fastest for large batches.
      output_dir: parent of run directories.
    """

    name: str
    dataset: str = "gsm8k"
    split: str = "test"
    data_dir: Optional[str] = None
    offset: int = 0
    limit: Optional[int] = None
    seed: int = 0
    batch_questions: int = 4
    fewshot_seed: int = 0
    agents: list[AgentSection] = dataclasses.field(default_factory=list)
    principal: PrincipalSection = dataclasses.field(default_factory=PrincipalSection)
    game: GameSection = dataclasses.field(default_factory=GameSection)
    greedy: bool = True
    debate: DebateSection = dataclasses.field(default_factory=DebateSection)
    bootstrap_samples: int = 2000
    dtype: str = "float32"
    param_dtype: Optional[str] = None
    quantized: bool = False
    output_dir: str = "runs"

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise FieldError("name", f"must be a non-empty name without '/', got {self.name!r}")
        if not self.agents:
            raise FieldError("agents", "the agents list is empty: define at least one agent (model, prompt_style, ...)")
        names = self.agent_names()
        for i, name in enumerate(names):
            if names.index(name) != i:
                raise FieldError(f"agents.{i}.name", f"duplicate agent name {name!r}")
            if "/" in name:
                raise FieldError(f"agents.{i}.name", f"must not contain '/', got {name!r}")
        if self.batch_questions < 1:
            raise FieldError("batch_questions", f"must be >= 1, got {self.batch_questions}")
        if self.offset < 0:
            raise FieldError("offset", f"must be >= 0, got {self.offset}")
        if self.limit is not None and self.limit < 1:
            raise FieldError("limit", f"must be >= 1 (or omitted for all questions), got {self.limit}")
        if self.bootstrap_samples < 1:
            raise FieldError("bootstrap_samples", f"must be >= 1, got {self.bootstrap_samples}")
        if self.dtype not in _DTYPES:
            raise FieldError("dtype", f"must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.param_dtype is not None and self.param_dtype not in _DTYPES:
            raise FieldError("param_dtype", f"must be one of {', '.join(_DTYPES)} (or omitted), got {self.param_dtype!r}")
        spec = _dataset_spec(self.dataset)
        if self.split not in spec.files:
            raise FieldError("split", f"dataset {spec.name!r} has no split {self.split!r}; available: {', '.join(spec.files)}")
        try:
            directory = datasets_lib.resolve_data_dir(self.data_dir)
        except datasets_lib.DatasetError as exc:
            raise FieldError("data_dir", str(exc)) from None
        where = "data_dir" if self.data_dir is not None else "dataset"
        path = directory / spec.files[self.split]
        if not path.is_file():
            raise FieldError(where, f"data directory {str(directory)!r} has no {spec.files[self.split]} "
                                    f"(expected file {str(path)!r} for dataset {spec.name!r} split {self.split!r})")
        for i, agent in enumerate(self.agents):
            train = directory / datasets_lib.DATASETS["gsm8k"].files["train"]
            if agent.prompt_style == "few_shot_cot" and not train.is_file():
                raise FieldError(f"agents.{i}.prompt_style",
                                 f"few_shot_cot draws exemplars from GSM8K train, but {str(train)!r} is missing")

    def agent_names(self) -> list[str]:
        """Each agent's label (its ``name`` or ``agent<i>``)."""
        return [agent.name or f"agent{i}" for i, agent in enumerate(self.agents)]

    def principal_model(self) -> str:
        """The judging model of an LLM principal."""
        return self.principal.model or self.agents[0].model


def _dataset_spec(name: str):
    lowered = name.strip().lower() if isinstance(name, str) else ""
    for spec in datasets_lib.DATASETS.values():
        if lowered == spec.name or lowered in spec.aliases:
            return spec
    raise FieldError("dataset", f"unknown dataset {name!r}; known: {', '.join(datasets_lib.dataset_names())}")


def load_reason_config(path) -> ReasonConfig:
    """Loads and validates a reason config; errors name the file, line and key."""
    return load_config(path, ReasonConfig)


def run_dir(config: ReasonConfig) -> Path:
    """``output_dir/name/seed<seed>``."""
    return Path(config.output_dir) / config.name / f"seed{config.seed}"


def _settings_hash(config: ReasonConfig) -> str:
    """Hash of every setting that determines a question's row (not limit, output, bootstrap)."""
    data = config_to_dict(config)
    for key in ("limit", "output_dir", "bootstrap_samples", "name"):
        data.pop(key, None)
    if not data.get("quantized"):
        data.pop("quantized", None)  # runs from before the option keep their hash
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def method_names(config: ReasonConfig) -> list[str]:
    """The methods a run reports, in table order."""
    names = ["align", "best_of_n", "uniform_principal", "fair_single", "sc_pooled"]
    names += [f"sc/{a}" for a in config.agent_names()]
    if config.greedy:
        names += [f"greedy/{a}" for a in config.agent_names()]
    if config.debate.rounds > 0:
        names.append("debate")
    names += ["random", "pass@k"]
    return names


# --------------------------------------------------------------------------------------
# JSONL
# --------------------------------------------------------------------------------------


def _read_rows(path: Path) -> dict[str, dict]:
    """Finished rows by question id (a line cut by a crash is skipped: its question is redone)."""
    rows: dict[str, dict] = {}
    for line_number, row in read_jsonl(path):
        if not isinstance(row, dict) or "question_id" not in row:
            raise ConfigError(f"{path}:{line_number}: not a results row (no 'question_id')")
        rows.setdefault(row["question_id"], row)
    return rows


def _append_line(path: Path, row: dict) -> None:
    append_jsonl(path, [row])


_atomic_write = atomic_write


# --------------------------------------------------------------------------------------
# One window
# --------------------------------------------------------------------------------------


def _agent_specs(config: ReasonConfig) -> list[AgentSpec]:
    specs = []
    for name, agent in zip(config.agent_names(), config.agents):
        exemplars: tuple = ()
        if agent.prompt_style == "few_shot_cot":
            exemplars = tuple(datasets_lib.fewshot_exemplars(agent.num_fewshot, config.fewshot_seed, config.data_dir))
        specs.append(AgentSpec(
            name=name, model=agent.model, prompt_style=agent.prompt_style, temperature=agent.temperature,
            top_p=agent.top_p, num_samples=agent.num_samples, max_new_tokens=agent.max_new_tokens,
            exemplars=exemplars, stop=tuple(agent.stop),
        ))
    return specs


def _cost_dict(cost: Cost) -> dict:
    return {"calls": int(cost.calls), "gen_tokens": int(cost.gen_tokens), "prompt_tokens": int(cost.prompt_tokens)}


def _method(answer: Optional[str], correct: float, cost: Cost, **extra) -> dict:
    return {"answer": answer, "correct": float(correct), "cost": _cost_dict(cost), **extra}


def process_window(config: ReasonConfig, agents: Sequence[AgentSpec], pool: ModelPool,
                   problems: Sequence[datasets_lib.Problem], key: jax.Array) -> list[dict]:
    """Runs every method on one window of questions; returns one row per question."""
    from align_jax.game.scenarios import utility_correlation

    start = time.perf_counter()
    texts_q = [p.question for p in problems]
    names = [a.name for a in agents]
    num_slots = max(a.num_samples for a in agents)

    stages: dict[str, float] = {}

    def lap(stage: str) -> None:
        stages[stage] = time.perf_counter() - start - sum(stages.values())
        logger.info("window of %d questions: %s took %.1f s", len(problems), stage, stages[stage])

    texts, tokens, sample_costs = sample_agents(pool, agents, texts_q, jax.random.fold_in(key, 0))
    lap("sampling")
    questions = [build_question_candidates(texts[q], tokens[q]) for q in range(len(problems))]
    correct_maps = [slot_correctness(question, p.gold) for question, p in zip(questions, problems)]

    scores = score_questions(
        config.principal.type, pool=pool, model=config.principal_model(), question_texts=texts_q,
        question_ids=[p.id for p in problems], questions=questions, correct_by_id=correct_maps,
        num_slots=num_slots, flip_rate=config.principal.flip_rate, seed=config.seed,
        batch_size=config.principal.batch_size,
    )
    lap("principal")
    candidates = stack_candidate_sets(questions, [s.score for s in scores], correct_maps, num_slots)
    game_config = config.game.game_config(record_trajectory=False)
    align_rows = play_window(game_config, GameParams.create(config.game.step_size), candidates, questions,
                             jax.random.fold_in(key, 1))
    correlation = np.asarray(jax.vmap(utility_correlation)(candidates))
    host = jax.device_get(candidates)
    lap("align")

    greedy = None
    if config.greedy:
        greedy = sample_agents(pool, agents, texts_q, jax.random.fold_in(key, 2), num_samples=1,
                               temperature_override=0.0)
        lap("greedy")
    debates = None
    if config.debate.rounds > 0:
        debates = baselines_lib.debate(
            pool, agents, texts_q, [[texts[q][i][0] for i in range(len(agents))] for q in range(len(problems))],
            jax.random.fold_in(key, 3), num_rounds=config.debate.rounds, max_chars=config.debate.max_chars,
            golds=[p.gold for p in problems],
        )
        lap("debate")
    wall = time.perf_counter() - start

    rows = []
    for q, (problem, question) in enumerate(zip(problems, questions)):
        correct_map = correct_maps[q]
        sampling = sum(sample_costs[q], Cost())
        principal_cost = scores[q].cost
        first_sample_cost = sum(
            (Cost(1, question.agents[i].tokens[0], sample_costs[q][i].prompt_tokens) for i in range(len(agents))),
            Cost(),
        )
        methods: dict[str, dict] = {}
        a = align_rows[q]
        methods["align"] = _method(a["answer"], a["correct"], sampling + principal_cost,
                                   agent=names[a["chosen_agent"]])
        best = baselines_lib.best_of_n(host.principal_score[q], host.valid[q], host.answer_id[q], host.correct[q],
                                       question.answers_by_id)
        methods["best_of_n"] = _method(best.answer, best.correct, sampling + principal_cost)
        for name in ("uniform_principal", "fair_single"):
            cost = sampling + principal_cost if name == "uniform_principal" else sampling
            methods[name] = _method(None, a["baselines"][name], cost)
        all_ids = [x for agent in question.agents for x in agent.answer_ids]
        all_answers = [x for agent in question.agents for x in agent.answers]
        pooled = baselines_lib.majority_vote(all_ids, all_answers, correct_map)
        methods["sc_pooled"] = _method(pooled.answer, pooled.correct, sampling)
        for i, agent in enumerate(question.agents):
            vote = baselines_lib.majority_vote(agent.answer_ids, agent.answers, correct_map)
            methods[f"sc/{names[i]}"] = _method(vote.answer, vote.correct, sample_costs[q][i])
        greedy_rows = None
        if greedy is not None:
            g_texts, g_tokens, g_costs = greedy
            greedy_rows = []
            for i in range(len(agents)):
                text = g_texts[q][i][0]
                answer = extract_answer(text)
                ok = is_correct(answer, problem.gold)
                methods[f"greedy/{names[i]}"] = _method(answer, float(ok), g_costs[q][i])
                greedy_rows.append({"agent": names[i], "text": text, "answer": answer, "correct": ok,
                                    "tokens": int(g_tokens[q][i][0])})
        debate_rows = None
        if debates is not None:
            d = debates[q]
            methods["debate"] = _method(d.pick.answer, d.pick.correct, first_sample_cost + d.cost)
            debate_rows = [[{"agent": names[i], "text": t, "answer": ans} for i, (t, ans) in enumerate(rnd)]
                           for rnd in d.rounds]
        methods["random"] = _method(None, a["baselines"]["random"], sampling)
        methods["pass@k"] = _method(None, baselines_lib.pass_at_k([ag.answer_ids for ag in question.agents],
                                                                 correct_map), sampling)
        agents_rows = []
        for i, agent in enumerate(question.agents):
            agents_rows.append({
                "name": names[i],
                "samples": [
                    {"text": t, "answer": ans, "answer_id": aid, "tokens": tok,
                     "correct": bool(correct_map.get(aid, False))}
                    for t, ans, aid, tok in zip(agent.texts, agent.answers, agent.answer_ids, agent.tokens)
                ],
                "slots": [
                    {"answer_id": slot.answer_id, "answer": slot.answer, "count": slot.count,
                     "utility": slot.utility, "representative": slot.representative,
                     "principal_score": float(host.principal_score[q, i, s]),
                     "correct": bool(host.correct[q, i, s])}
                    for s, slot in enumerate(agent.slots)
                ],
                "cost": _cost_dict(sample_costs[q][i]),
            })
        game = {k: v for k, v in a.items() if k not in ("baselines", "answer", "correct")}
        game["utility_correlation"] = float(correlation[q])
        rows.append({
            "question_id": problem.id,
            "question": problem.question,
            "gold": problem.gold,
            "agents": agents_rows,
            "principal": {"type": config.principal.type, "cost": _cost_dict(principal_cost)},
            "game": game,
            "greedy": greedy_rows,
            "debate": debate_rows,
            "methods": methods,
            "wall_s": wall / len(problems),
            "window_wall_s": wall,
            "stage_wall_s": {k: v / len(problems) for k, v in stages.items()},  # this question's share
        })
    return rows


# --------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------


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
               on_question: Optional[Callable[[dict], None]] = None) -> ReasonReport:
    """Runs (or resumes) a reason run; see the module docstring.

    Args:
      config: the validated :class:`ReasonConfig`.
      progress: show a rich progress bar.
      figures: write ``accuracy.png``.
      pool: a :class:`ModelPool` to reuse (default: a new one; models load lazily,
        only when a window has work).
      on_question: called with each new row right after it is written (an exception
        raised there stops the run; a rerun resumes).

    Raises:
      ConfigError: the results file was written with different settings.
      DatasetError / WeightsError: data or model files are unusable.
    """
    wall_start = time.perf_counter()
    problems = datasets_lib.load_dataset(config.dataset, config.split, config.data_dir,
                                         limit=config.limit, offset=config.offset)
    out = run_dir(config)
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings_hash(config)
    results_path = out / "results.jsonl"
    done = _read_rows(results_path)
    for question_id, row in done.items():
        if row.get("settings_hash") != settings:
            raise ConfigError(
                f"{results_path}: question {question_id} was computed with different settings "
                f"(hash {row.get('settings_hash')} != {settings}); use another name/output_dir or delete the file"
            )
    _atomic_write(out / "config.json", json.dumps(config_to_dict(config), indent=2, sort_keys=True))
    agents = _agent_specs(config)
    pool = pool if pool is not None else ModelPool(dtype=config.dtype, param_dtype=config.param_dtype,
                                                   quantized=config.quantized)
    base_key = jax.random.key(config.seed)
    b = config.batch_questions
    windows = [problems[j:j + b] for j in range(0, len(problems), b)]

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn()]
    finished = sum(p.id in done for p in problems)
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task(f"{config.name}: questions", total=len(problems), completed=finished)
        for w, window in enumerate(windows):
            if all(p.id in done for p in window):
                continue
            rows = process_window(config, agents, pool, window, jax.random.fold_in(base_key, w))
            for row in rows:
                if row["question_id"] in done:
                    continue
                row["settings_hash"] = settings
                _append_line(results_path, row)
                done[row["question_id"]] = row
                bar.advance(task)
                if on_question is not None:
                    on_question(row)

    rows = [done[p.id] for p in problems]
    summary = summarize(rows, config)
    summary["run_wall_s"] = time.perf_counter() - wall_start
    _atomic_write(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
    _atomic_write(out / "summary.md", summary_markdown(config, summary))
    if figures and rows:
        accuracy_figure(config, summary, out / "accuracy.png")
    return ReasonReport(rows, summary, out, time.perf_counter() - wall_start)


# --------------------------------------------------------------------------------------
# Summary, intervals, figure
# --------------------------------------------------------------------------------------


def bootstrap_interval(values: np.ndarray, indices: np.ndarray) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``values [Q]`` over resamples ``indices [B, Q]``."""
    means = np.asarray(values, np.float64)[indices].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def summarize(rows: Sequence[dict], config: ReasonConfig) -> dict:
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
        diff = correct["align"] - correct[other]
        low, high = bootstrap_interval(diff, indices)
        differences[f"align - {other}"] = {"mean": float(diff.mean()), "ci_low": low, "ci_high": high}
    summary["differences"] = differences
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
    summary["wall_s_per_question"] = float(np.mean([row["wall_s"] for row in rows]))
    summary["wall_s_total"] = float(np.sum([row["wall_s"] for row in rows]))
    stage_names = dict.fromkeys(k for row in rows for k in row.get("stage_wall_s", {}))
    summary["stage_wall_s_total"] = {k: float(np.sum([row.get("stage_wall_s", {}).get(k, 0.0) for row in rows]))
                                     for k in stage_names}
    return summary


def summary_markdown(config: ReasonConfig, summary: dict) -> str:
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
        g = summary["game"]
        lines += ["", "ALIGN game diagnostics (means over questions): "
                  f"Nash gap {g['nash_gap']:.4f}, Pareto compliance {g['pareto_compliance']:.3f}, "
                  f"rounds {g['rounds_played']:.1f}, max regret / bound {g['max_regret_over_bound']:.3f}, "
                  f"corr(agent utility, principal score) {g['utility_correlation']:.3f}, "
                  f"distinct answers per agent {g['distinct_answers_per_agent']:.2f}, "
                  f"no-answer samples {g['no_answer_rate']:.3f}."]
        lines += ["", f"Wall time: {summary['wall_s_total']:.1f} s in windows "
                  f"({summary['wall_s_per_question']:.1f} s / question; by stage: "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in summary["stage_wall_s_total"].items()) + "); "
                  f"intervals: {summary['bootstrap_samples']} paired bootstrap resamples of questions."]
    return "\n".join(lines) + "\n"


def print_summary(config: ReasonConfig, summary: dict) -> None:
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


def accuracy_figure(config: ReasonConfig, summary: dict, path: Path) -> Path:
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


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _reason_command(args) -> int:
    import sys

    from align_jax.llm.registry import ModelPackageError
    from align_jax.llm.weights import WeightsError

    try:
        config = load_reason_config(args.config)
        overrides = {}
        for key in ("limit", "seed", "output_dir"):
            value = getattr(args, key)
            if value is not None:
                overrides[key] = value
        if overrides:
            config = dataclasses.replace(config, **overrides)
        report = run_reason(config, progress=not args.quiet, figures=not args.no_figures)
    except (ConfigError, FieldError, GameInputError, datasets_lib.DatasetError, WeightsError, ModelPackageError) as exc:
        print(f"align-jax: error: {exc}", file=sys.stderr)
        return 2
    print_summary(config, report.summary)
    print(f"wall time {report.wall_s:.1f} s; results: {report.directory}")
    return 0


def add_reason_subcommand(subparsers) -> argparse.ArgumentParser:
    """Adds ``reason CONFIG [--limit N] [--seed S] [--output-dir DIR] [--no-figures] [--quiet]``."""
    parser = subparsers.add_parser("reason", help="ALIGN vs baselines on GSM8K / GSM-Hard / MATH-500 with real models")
    parser.add_argument("config", help="YAML reason config (see configs/reason_*.yaml)")
    parser.add_argument("--limit", type=int, help="override limit (number of questions)")
    parser.add_argument("--seed", type=int, help="override seed")
    parser.add_argument("--output-dir", help="override output_dir")
    parser.add_argument("--no-figures", action="store_true", help="skip accuracy.png")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_reason_command)
    return parser
