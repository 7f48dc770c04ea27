"""The ``reason`` run's config: agents, candidates, principal, game, methods, baselines.

One :class:`ReasonConfig` per YAML file in ``configs/`` (:func:`load_reason_config`
reports bad input as ``file:line: key: message``), plus what the run derives from
it: the run directory, the settings hash stamped on its rows, the enabled methods and
the agents' :class:`~align_jax.methods.candidates.AgentSpec`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np

from align_jax.config import FieldError, load_config
from align_jax.data import datasets as datasets_lib
from align_jax.methods.candidates import PROMPT_STYLES, AgentSpec
from align_jax.methods.econ.reason_method import EconSection
from align_jax.methods.generators import CandidateSection
from align_jax.methods.principals import PrincipalSection, model_field_error
from align_jax.methods.reason_methods import DEFAULT_METHODS, REASON_METHODS, Method
from align_jax.runner import run_dir as _run_dir
from align_jax.runner import settings_hash
from align_jax.sections import GameSection

__all__ = [
    "AgentSection",
    "DebateSection",
    "ReasonConfig",
    "SETTINGS_EXCLUDE",
    "load_reason_config",
    "run_dir",
    "reason_settings_hash",
    "enabled_methods",
    "agent_specs",
]


_DTYPES = ("float32", "bfloat16")


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
        error = model_field_error("model", self.model)
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
      candidates: the candidate generator (:class:`~align_jax.methods.generators.CandidateSection`,
        ``type: sampled``).
      principal: :class:`~align_jax.methods.principals.PrincipalSection`.
      game: the game settings (T = ``num_rounds``, ``step_size`` = eta, ...).
      methods: the reported methods, in table order (names of
        :data:`~align_jax.methods.reason_methods.REASON_METHODS`; default all).
      greedy: also run greedy CoT per agent (the ``greedy`` method).
      debate: :class:`DebateSection`.
      econ: :class:`~align_jax.methods.econ.reason_method.EconSection`: run ECON with a policy
        trained in simulation (method ``econ``, results ``econ/<policy>``); None = no ECON rows.
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
    candidates: CandidateSection = dataclasses.field(default_factory=CandidateSection)
    principal: PrincipalSection = dataclasses.field(default_factory=PrincipalSection)
    game: GameSection = dataclasses.field(default_factory=GameSection)
    methods: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_METHODS))
    greedy: bool = True
    debate: DebateSection = dataclasses.field(default_factory=DebateSection)
    econ: Optional[EconSection] = None
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
        if not self.methods:
            raise FieldError("methods", "need at least one method")
        for i, name in enumerate(self.methods):
            REASON_METHODS.get(name, f"methods.{i}")
            if self.methods.index(name) != i:
                raise FieldError(f"methods.{i}", f"duplicate method {name!r}")
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
    return _run_dir(config.output_dir, config.name, config.seed)


SETTINGS_EXCLUDE = ("limit", "output_dir", "bootstrap_samples", "name", "data_dir")
"""Settings that do not change a question's row (where the data lives; the window partition starts at ``offset``
and keys do not depend on how many questions a window holds)."""


def reason_settings_hash(config: ReasonConfig) -> str:
    """The settings hash stamped on every row (:func:`align_jax.runner.settings_hash`)."""
    return settings_hash(config, exclude=SETTINGS_EXCLUDE)


def enabled_methods(config: ReasonConfig) -> list[Method]:
    """The config's methods that its other switches leave on, in table order."""
    methods = [REASON_METHODS.get(name, "methods") for name in config.methods]
    return [m for m in methods if m.enabled(config)]


def agent_specs(config: ReasonConfig) -> list[AgentSpec]:
    """The agents as generation needs them (few-shot exemplars drawn from GSM8K train)."""
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
