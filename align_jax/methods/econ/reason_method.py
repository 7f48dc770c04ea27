"""ECON as a method of a ``reason`` run: the real pipeline (:mod:`~align_jax.methods.econ.real`) on
each window's questions, next to ALIGN and the baselines, with a policy trained in simulation.

A reason config selects it with an ``econ:`` section::

    econ:
      config: configs/econ_sim.yaml     # a finished `align-jax econ train` run: its belief networks
      policies: [learned, initial]      # results econ/learned and econ/initial ("without BNE")
      executor_tokens: 256

The executors' observation layout is the simulator's, so the trained belief networks act on
real questions unchanged (sim-to-real transfer; see :mod:`~align_jax.methods.econ.real`);
the number of executors N and of rounds T are those of the trained run.  Policies:

* ``learned``: greedy w.r.t. the trained belief networks' local Q (trained in simulation);
* ``real``: the same after real-model fine-tuning on training questions (the ECON config's
  ``real:`` section, :mod:`~align_jax.methods.econ.real_train`);
* ``initial``: the same networks at their initialisation (ECON without BNE training);
* ``fixed``: every executor at ``fixed_temperature`` / ``fixed_top_p``.

Each policy reports ``econ/<policy>`` (answer, correctness, model calls and tokens of the
strategy, executor and commitment calls) and the row's ``econ`` section keeps its rounds,
strategy, commitments and chosen parameters.  Round r of window w uses the window key
folded with the method's stage and the policy's index, so rows do not depend on which
other methods run.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Optional, Sequence

import jax

from align_jax.config import FieldError
from align_jax.methods.candidates import Cost

__all__ = ["EconSection", "EconMethod", "ECON_POLICIES"]

ECON_POLICIES = ("learned", "real", "initial", "fixed")


@dataclasses.dataclass(frozen=True)
class EconSection:
    """The ``econ:`` section of a reason config.

    Attributes:
      config: path of the ECON YAML config whose finished training run provides the belief
        networks (N executors and T rounds come from it).
      seed_index: which of the run's seeds to use (>= 0).
      policies: the evaluated policies, a non-empty subset of :data:`ECON_POLICIES`.
      model: the coordinator's and executors' model (default: the first agent's model).
      variance_threshold: stop when ``Var(tau) + Var(p)`` across executors is below it.
      strategy_tokens, executor_tokens, commit_tokens: generation budgets (>= 1).
      coordinator_temperature: the coordinator's sampling temperature (> 0).
      fixed_temperature, fixed_top_p: the ``fixed`` policy's parameters.
    """

    config: str
    seed_index: int = 0
    policies: list[str] = dataclasses.field(default_factory=lambda: ["learned", "initial"])
    model: Optional[str] = None
    variance_threshold: float = 0.01
    strategy_tokens: int = 50
    executor_tokens: int = 256
    commit_tokens: int = 64
    coordinator_temperature: float = 0.7
    fixed_temperature: float = 0.7
    fixed_top_p: float = 0.9

    def __post_init__(self):
        if not Path(self.config).is_file():
            raise FieldError("config", f"ECON config file not found: {self.config!r} (the YAML of a finished "
                                       "`align-jax econ train` run)")
        if self.seed_index < 0:
            raise FieldError("seed_index", f"must be >= 0, got {self.seed_index}")
        if not self.policies:
            raise FieldError("policies", f"need at least one of {', '.join(ECON_POLICIES)}")
        for i, name in enumerate(self.policies):
            if name not in ECON_POLICIES:
                raise FieldError(f"policies.{i}", f"unknown policy {name!r}; known: {', '.join(ECON_POLICIES)}")
            if self.policies.index(name) != i:
                raise FieldError(f"policies.{i}", f"duplicate policy {name!r}")
        for name in ("strategy_tokens", "executor_tokens", "commit_tokens"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be >= 1, got {getattr(self, name)}")
        if not self.coordinator_temperature > 0:
            raise FieldError("coordinator_temperature", f"must be > 0, got {self.coordinator_temperature}")
        if not 0 < self.fixed_top_p <= 1:
            raise FieldError("fixed_top_p", f"must be in (0, 1], got {self.fixed_top_p}")
        if not self.fixed_temperature >= 0:
            raise FieldError("fixed_temperature", f"must be >= 0, got {self.fixed_temperature}")
        if not self.variance_threshold >= 0:
            raise FieldError("variance_threshold", f"must be >= 0, got {self.variance_threshold}")
        trained = self.trained_config()
        if self.seed_index >= trained.run.num_seeds:
            raise FieldError("seed_index", f"the run of {self.config!r} has {trained.run.num_seeds} seed(s), "
                                           f"got seed_index {self.seed_index}")

    def trained_config(self):
        """The ECON config of the trained run (file, line and field named on bad input)."""
        return _load_econ_config(str(Path(self.config).resolve()))


@functools.lru_cache(maxsize=8)
def _load_econ_config(path: str):
    from align_jax.methods.econ.run import load_econ_config

    return load_econ_config(path)


@functools.lru_cache(maxsize=4)
def _policies(path: str, seed_index: int):
    """``(networks, learned, initial)`` of a finished run, restored once per process."""
    from align_jax.methods.econ.run import trained_policies

    return trained_policies(_load_econ_config(path), seed_index)


def check_trained(section: EconSection) -> None:
    """Restores the trained networks (a clear error before any LLM is loaded if the run is not
    finished or its checkpoints are another config's or corrupt)."""
    _policies(str(Path(section.config).resolve()), section.seed_index)
    if "real" in section.policies:
        _real_params(str(Path(section.config).resolve()), section.seed_index)


@functools.lru_cache(maxsize=4)
def _real_params(path: str, seed_index: int):
    """``(networks, params)`` after real fine-tuning, restored once per process."""
    from align_jax.methods.econ.real_train import finetuned_params

    return finetuned_params(_load_econ_config(path), seed_index)


@dataclasses.dataclass(frozen=True)
class EconMethod:
    """``econ/<policy>`` rows (row section ``econ``); enabled by a config's ``econ:`` section."""

    name: str = "econ"
    section: Optional[str] = "econ"
    stage: Optional[str] = "econ"
    key_stage: int = 4

    def enabled(self, config) -> bool:
        return getattr(config, "econ", None) is not None

    def result_names(self, agent_names: Sequence[str], config=None) -> list[str]:
        policies = config.econ.policies if config is not None and config.econ is not None else ["learned", "initial"]
        return [f"econ/{p}" for p in policies]

    def prepare(self, config) -> None:
        """Run-start check (before any model is loaded)."""
        check_trained(config.econ)

    def run(self, window) -> list:
        from align_jax.methods.econ.real import RealEconSettings, belief_policy, fixed_policy, run_econ_questions
        from align_jax.methods.reason_methods import MethodOutput, method_record
        from align_jax.methods.rows import EconRecord

        section: EconSection = window.config.econ
        trained = section.trained_config()
        networks, learned, initial = _policies(str(Path(section.config).resolve()), section.seed_index)
        settings = RealEconSettings(
            model=section.model or window.agents[0].model, num_executors=trained.sim.num_executors,
            num_groups=trained.sim.num_groups,
            max_rounds=trained.sim.max_rounds, variance_threshold=section.variance_threshold,
            strategy_tokens=section.strategy_tokens, executor_tokens=section.executor_tokens,
            commit_tokens=section.commit_tokens, coordinator_temperature=section.coordinator_temperature)
        make = {"learned": lambda: belief_policy(networks, learned),
                "real": lambda: belief_policy(*_real_params(str(Path(section.config).resolve()), section.seed_index)),
                "initial": lambda: belief_policy(networks, initial),
                "fixed": lambda: fixed_policy(section.fixed_temperature, section.fixed_top_p)}
        questions = [p.question for p in window.problems]
        golds = [p.gold for p in window.problems]
        outputs = [({}, {}) for _ in questions]
        for index, policy in enumerate(section.policies):
            key = jax.random.fold_in(jax.random.fold_in(window.key, self.key_stage), index)
            rows = run_econ_questions(window.pool, settings, questions, golds, make[policy](), key)
            for q, row in enumerate(rows):
                cost = Cost(row["cost"]["calls"], row["cost"]["gen_tokens"], row["cost"]["prompt_tokens"])
                outputs[q][0][f"econ/{policy}"] = method_record(row["answer"], row["correct"], cost)
                outputs[q][1][policy] = EconRecord(row["rounds"], row["strategy"], row["commitments"],
                                                   row["temperatures"], row["top_ps"])
        return [MethodOutput(results, section_records) for results, section_records in outputs]
