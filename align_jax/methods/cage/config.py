"""The CAGE weight-sweep config (one YAML file in ``configs/``), validated at load time."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Optional

from align_jax.config import ConfigError, FieldError, load_config
from align_jax.game.types import GameInputError
from align_jax.methods.cage.guide import DEFAULT_GUIDE_PROMPT, DEFAULT_NEUTRAL_PROMPT
from align_jax.methods.cage.objectives import DEFAULT_PHRASES, OBJECTIVES
from align_jax.methods.cage.processor import PROCESSOR_METHODS, check_weights
from align_jax.registry import check_name

__all__ = ["METHODS", "CageConfig", "load_cage_config", "config_error", "remember_source"]

#: All methods of :func:`~align_jax.methods.cage.run.run_cage`.
METHODS = PROCESSOR_METHODS + ("base", "best_of_n")


@dataclasses.dataclass(frozen=True)
class CageConfig:
    """A CAGE weight sweep.

    Attributes:
      name: run name; results go to ``output_dir/name/seed<seed>``.
      seed: PRNG seed.
      base_model: the steered model (short name, GGUF or checkpoint directory).
      guide_model: the guide of the ``guide`` objective.
      dataset, split, num_questions, offset, data_dir: the prompt set.
      system_prompt: the base model's system prompt.
      guide_prompt / neutral_prompt: the guide's objective and reference system prompts.
      objectives: J names registered in :data:`~align_jax.methods.cage.objectives.OBJECTIVES`,
        in weight order.
      weights: the grid, a list of J-vectors (``>= 0``).
      methods: subset of :data:`METHODS`.
      top_m: M candidate tokens per step (``<= V``, checked once the model is loaded).
      tau: KL temperature of ``cage`` and ``linear`` (``> 0``).
      beta: reward scale of ``args`` (``> 0``).
      solver_max_iters: Newton steps allowed to each ``cage`` equilibrium solve; a
        step whose solve has not converged by then is counted per row
        (``unconverged_steps``) and in the summary.
      temperature: the base model's sampling temperature (``> 0``).
      max_new_tokens: T.
      best_of_n: N samples for ``best_of_n`` (the first one is the ``base`` output).
      max_guide_tokens: L guide ids per base token.
      phrases: answer phrases of the ``format`` objective.
      batch_questions: questions per decode call; each call decodes all of its questions
        for every weight vector at once (``batch_questions x len(weights)`` rows), so this
        bounds memory (the guide's cache holds ``2 x rows x (prompt + L T)`` slots).
      param_dtype: weight dtype of both models (None = float32; ``bfloat16`` is the
        mixed-precision mode of :mod:`align_jax.llm.model`).
      output_dir: where run directories go.
    """

    name: str
    seed: int = 0
    base_model: str = "smollm2-135m"
    guide_model: str = "smollm2-135m"
    dataset: str = "gsm8k"
    split: str = "test"
    num_questions: int = 6
    offset: int = 0
    data_dir: Optional[str] = None
    system_prompt: str = "Solve the math problem step by step."
    guide_prompt: str = DEFAULT_GUIDE_PROMPT
    neutral_prompt: str = DEFAULT_NEUTRAL_PROMPT
    objectives: list[str] = dataclasses.field(default_factory=lambda: ["guide", "brevity", "format"])
    weights: list[list[float]] = dataclasses.field(default_factory=lambda: [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    methods: list[str] = dataclasses.field(default_factory=lambda: list(METHODS))
    top_m: int = 16
    tau: float = 1.0
    beta: float = 1.0
    solver_max_iters: int = 100
    temperature: float = 1.0
    max_new_tokens: int = 64
    best_of_n: int = 4
    max_guide_tokens: int = 4
    phrases: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_PHRASES))
    batch_questions: int = 8
    param_dtype: Optional[str] = None
    output_dir: str = "runs"

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise FieldError("name", f"must be a non-empty name without '/', got {self.name!r}")
        if not self.objectives:
            raise FieldError("objectives", "need at least one objective")
        for i, obj in enumerate(self.objectives):
            check_name(OBJECTIVES, obj, field=f"objectives.{i}")
        if len(set(self.objectives)) != len(self.objectives):
            raise FieldError("objectives", f"objectives must be distinct, got {self.objectives}")
        if not self.weights:
            raise FieldError("weights", "need at least one weight vector")
        for i, w in enumerate(self.weights):
            try:
                check_weights(w, len(self.objectives), field=f"weights.{i}")
            except GameInputError as exc:
                raise FieldError(f"weights.{i}", str(exc)) from None
        for i, m in enumerate(self.methods):
            if m not in METHODS:
                raise FieldError(f"methods.{i}", f"unknown method {m!r} (known: {', '.join(METHODS)})")
        if not self.methods:
            raise FieldError("methods", "need at least one method")
        if self.top_m < 1:
            raise FieldError("top_m", f"must be >= 1, got {self.top_m}")
        for name in ("tau", "beta", "temperature"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise FieldError(name, f"must be > 0 and finite, got {value}")
        if self.param_dtype not in (None, "float32", "bfloat16"):
            raise FieldError("param_dtype", f"must be float32 or bfloat16 (or omitted), got {self.param_dtype!r}")
        for name in ("num_questions", "max_new_tokens", "best_of_n", "max_guide_tokens", "batch_questions",
                     "solver_max_iters"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.offset < 0:
            raise FieldError("offset", f"must be >= 0, got {self.offset}")
        if "format" in self.objectives and (not self.phrases or any(not p for p in self.phrases)):
            raise FieldError("phrases", "need at least one non-empty phrase")


# The file each loaded config came from (for errors found after loading, e.g. top_m > V).
# Keyed by id; the config is kept with its path so that a reused id cannot match.
_SOURCES: dict = {}


def remember_source(config: CageConfig, path) -> CageConfig:
    """Records that ``config`` was read from ``path`` (see :func:`config_error`); returns it."""
    _SOURCES[id(config)] = (config, os.fspath(path))
    return config


def load_cage_config(path) -> CageConfig:
    """Loads and validates a CAGE config (errors name file, line and key).

    Raises:
      ConfigError: unreadable file, unknown key, wrong type, bad value or unknown
        objective / method name (``file:line: key: message``).
    """
    return remember_source(load_config(path, CageConfig), path)


def config_error(config: CageConfig, key: str, message: str) -> ConfigError:
    """A :class:`ConfigError` naming ``key`` (and its ``file:line`` when ``config`` came from a file).

    ``key`` may be dotted (``objectives.1``); the line of its deepest part found is used.
    """
    import yaml

    entry = _SOURCES.get(id(config))
    path = entry[1] if entry is not None and entry[0] is config else None
    where = "<config>"
    if path is not None:
        where = path
        node = yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
        for part in key.split("."):
            child = None
            if isinstance(node, yaml.MappingNode):
                child = next(((k, v) for k, v in node.value if k.value == part), None)
            elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
                child = (node.value[int(part)], node.value[int(part)])
            if child is None:
                break
            where = f"{path}:{child[0].start_mark.line + 1}"
            node = child[1]
    return ConfigError(f"{where}: {key}: {message}")
