"""ECON configuration: frozen dataclasses for the networks, the simulator and training.

Everything here is *static* structure (array shapes, loop lengths, optimiser settings):
it is closed over by :func:`~align_jax.methods.econ.train.make_train` and fixes one
compiled program.  Numbers one sweeps inside a single compiled program (difficulty,
heterogeneity, executor mask, reward weights ...) live in the simulator's params pytree
(:class:`~align_jax.methods.econ.sim.EnvParams`) instead.

Every config validates itself in ``__post_init__`` and raises
:class:`~align_jax.config.FieldError` naming the offending key, so
:func:`~align_jax.config.load_config` reports ``file:line: section.key: message``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional

from align_jax.config import FieldError
from align_jax.runner import ADDED_FIELD

__all__ = [
    "REWARD_NAMES",
    "DEFAULT_REWARD_WEIGHTS",
    "NetworkConfig",
    "SimConfig",
    "TrainConfig",
    "EnvSettings",
    "RunSettings",
    "RealTrainSettings",
    "EconConfig",
    "check_reward_weights",
    "reward_weight_vector",
]

#: Reward components, in the order of every reward-weight vector:
#: ``ts`` task correctness R_TS, ``al`` action likelihood R_AL, ``cc`` collaborative
#: contribution R_CC.
REWARD_NAMES: tuple[str, ...] = ("ts", "al", "cc")

#: The paper's weights: R = 0.5 R_TS + 0.3 R_AL + 0.2 R_CC.
DEFAULT_REWARD_WEIGHTS: dict[str, float] = {"ts": 0.5, "al": 0.3, "cc": 0.2}

#: The ranges the paper allows for the executors' generation parameters.
TEMPERATURE_RANGE = (0.1, 2.0)
TOP_P_RANGE = (0.1, 0.95)


def check_reward_weights(weights: Mapping[str, float], field: str = "reward_weights") -> None:
    """Validates a ``{name: weight}`` mapping.

    Raises:
      FieldError: ``field.<name>`` for an unknown name or a negative / non-finite
        weight; ``field`` when the mapping is empty or every weight is zero.
    """
    if not isinstance(weights, Mapping):
        raise FieldError(field, f"must be a mapping {{name: weight}}, got {weights!r}")
    if not weights:
        raise FieldError(field, f"need at least one reward weight (known: {', '.join(REWARD_NAMES)})")
    for name, value in weights.items():
        if name not in REWARD_NAMES:
            raise FieldError(f"{field}.{name}", f"unknown reward {name!r} (known: {', '.join(REWARD_NAMES)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise FieldError(f"{field}.{name}", f"must be a finite number, got {value!r}")
        if value < 0:
            raise FieldError(f"{field}.{name}", f"must be >= 0, got {value}")
    if sum(weights.values()) <= 0:
        raise FieldError(field, "at least one reward weight must be > 0")


def reward_weight_vector(weights: Mapping[str, float]) -> tuple[float, float, float]:
    """``(w_TS, w_AL, w_CC)`` from a validated mapping; missing names weigh 0."""
    return tuple(float(weights.get(name, 0.0)) for name in REWARD_NAMES)  # type: ignore[return-value]


def _positive_int(obj, *names: str, minimum: int = 1) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise FieldError(name, f"must be an integer >= {minimum}, got {value!r}")


def _finite(obj, name: str, *, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FieldError(name, f"must be a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise FieldError(name, f"must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise FieldError(name, f"must be <= {high}, got {value}")


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    """Sizes of the belief networks, the belief encoder and the mixer, and the action grid.

    The executor's action is one point of a discrete grid of
    ``num_temperatures x num_top_ps`` (temperature, top-p) pairs, A actions in all:
    temperatures geometric in ``[temperature_min, temperature_max]``, top-p linear in
    ``[top_p_min, top_p_max]``.  A discrete grid makes the TD max and the BNE
    best-alternative term exact maxima over A values.

    Attributes:
      belief_dim: D, the belief state size (paper: 128).
      hidden_dim: H, hidden width of the belief network and of the encoder's MLP.
      num_heads: attention heads of the belief encoder (paper: 4); divides ``belief_dim``.
      num_blocks: attention blocks of the belief encoder (paper: 2); 0 = pooling only.
      mixer_embed_dim: E, width of the monotone mixing layer.
      num_temperatures, num_top_ps: the action grid.
      temperature_min, temperature_max: in [0.1, 2.0].
      top_p_min, top_p_max: in [0.1, 0.95].
    """

    belief_dim: int = 128
    hidden_dim: int = 128
    num_heads: int = 4
    num_blocks: int = 2
    mixer_embed_dim: int = 32
    num_temperatures: int = 8
    num_top_ps: int = 4
    temperature_min: float = TEMPERATURE_RANGE[0]
    temperature_max: float = TEMPERATURE_RANGE[1]
    top_p_min: float = TOP_P_RANGE[0]
    top_p_max: float = TOP_P_RANGE[1]

    def __post_init__(self):
        _positive_int(self, "belief_dim", "hidden_dim", "num_heads", "mixer_embed_dim", "num_temperatures",
                      "num_top_ps")
        _positive_int(self, "num_blocks", minimum=0)
        if self.belief_dim % self.num_heads:
            raise FieldError("num_heads", f"must divide belief_dim={self.belief_dim}, got {self.num_heads}")
        for name in ("temperature_min", "temperature_max"):
            _finite(self, name, low=TEMPERATURE_RANGE[0], high=TEMPERATURE_RANGE[1])
        for name in ("top_p_min", "top_p_max"):
            _finite(self, name, low=TOP_P_RANGE[0], high=TOP_P_RANGE[1])
        if self.temperature_min > self.temperature_max:
            raise FieldError("temperature_min", f"must be <= temperature_max={self.temperature_max}")
        if self.top_p_min > self.top_p_max:
            raise FieldError("top_p_min", f"must be <= top_p_max={self.top_p_max}")

    @property
    def num_actions(self) -> int:
        """A = num_temperatures * num_top_ps."""
        return self.num_temperatures * self.num_top_ps


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """Static shape of the simulated environment.

    Attributes:
      num_executors: N executor slots (paper default 3); absent executors are masked
        by ``EnvParams.executor_mask``, so one compiled program serves every N' <= N.
      num_groups: G coordinators.  1 = the flat method (one coordinator commits);
        G > 1 = the paper's hierarchical variant: executors ``g*N/G ... (g+1)*N/G - 1``
        report to coordinator g and a central combiner commits over the G group
        commitments (e.g. N=9, G=3).  ``num_executors`` must be a multiple of it.
      max_rounds: T, rounds per question (paper: at most 5).
      num_answers: K distinct answers a question's answer distribution has (id 0 is gold).
    """

    num_executors: int = 3
    num_groups: int = 1
    max_rounds: int = 5
    num_answers: int = 6

    def __post_init__(self):
        _positive_int(self, "num_executors", "num_groups", "max_rounds")
        _positive_int(self, "num_answers", minimum=2)
        if self.num_executors % self.num_groups:
            raise FieldError("num_groups",
                             f"must divide num_executors={self.num_executors}, got {self.num_groups}")

    @property
    def group_size(self) -> int:
        """M = N / G executors per coordinator."""
        return self.num_executors // self.num_groups


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training of the belief networks, the encoder and the mixer (PureJaxRL style).

    One training *step* advances ``num_envs`` simulated questions by one round each
    (``num_envs`` environment steps) and adds ``num_envs`` transitions to the replay
    buffer; every ``update_every`` steps one Adam step is taken on a sampled batch,
    then target networks move by ``tau``.

    Attributes:
      num_steps: training steps per seed (a multiple of ``update_every``).
      num_envs: parallel simulated questions per seed.
      learning_rate, gamma, tau: Adam step size, discount, soft target update rate.
      batch_size: transitions per update (paper: 16).
      update_every: steps between updates (paper: 8).
      buffer_size: replay capacity in transitions.
      epsilon_start, epsilon_end, epsilon_decay_steps: epsilon-greedy exploration,
        linear from start to end over the first ``epsilon_decay_steps`` steps.
      td_weight, mixer_weight, consistency_weight, bne_weight: loss weights.
      max_grad_norm: global-norm gradient clipping (0 disables).
      reward_weight_lr: 0 keeps the reward weights fixed at ``reward_weights``; > 0 learns them
        (the paper's learnable alpha): they start at ``reward_weights`` normalised to sum 1 and
        take one exponentiated-gradient step of this size per update period on the
        reward-difference loss of the paper's public code
        (:func:`~align_jax.methods.econ.losses.update_reward_weights`).
      eval_questions: questions per policy in :func:`~align_jax.methods.econ.train.evaluate`.
      baseline_temperature, baseline_top_p: the fixed-parameter baseline policy.
    """

    num_steps: int = 2048
    num_envs: int = 4
    learning_rate: float = 1e-3
    gamma: float = 0.99
    tau: float = 0.01
    batch_size: int = 16
    update_every: int = 8
    buffer_size: int = 4096
    epsilon_start: float = 1.0
    epsilon_end: float = 0.05
    epsilon_decay_steps: int = 1024
    td_weight: float = 1.0
    mixer_weight: float = 1.0
    consistency_weight: float = 0.1
    bne_weight: float = 0.1
    max_grad_norm: float = 10.0
    reward_weight_lr: float = 0.0
    eval_questions: int = 512
    baseline_temperature: float = 1.0
    baseline_top_p: float = 0.95

    def __post_init__(self):
        _positive_int(self, "num_steps", "num_envs", "batch_size", "update_every", "eval_questions",
                      "epsilon_decay_steps")
        _positive_int(self, "buffer_size")
        if self.num_steps % self.update_every:
            raise FieldError("num_steps", f"must be a multiple of update_every={self.update_every}, "
                                          f"got {self.num_steps}")
        _finite(self, "learning_rate", low=0.0, low_open=True)
        _finite(self, "gamma", low=0.0, high=1.0)
        _finite(self, "tau", low=0.0, high=1.0)
        for name in ("epsilon_start", "epsilon_end"):
            _finite(self, name, low=0.0, high=1.0)
        for name in ("td_weight", "mixer_weight", "consistency_weight", "bne_weight", "max_grad_norm", "reward_weight_lr"):
            _finite(self, name, low=0.0)
        _finite(self, "baseline_temperature", low=TEMPERATURE_RANGE[0], high=TEMPERATURE_RANGE[1])
        _finite(self, "baseline_top_p", low=TOP_P_RANGE[0], high=TOP_P_RANGE[1])


@dataclasses.dataclass(frozen=True)
class EnvSettings:
    """The simulator's numbers for a run (the arguments of
    :func:`~align_jax.methods.econ.sim.make_env_params`); they become array leaves of
    ``EnvParams``, so changing them does not recompile.

    Attributes:
      difficulty, difficulty_std: mean and std of question difficulty (logits).
      heterogeneity: spread of the executors' best temperatures and skills (>= 0).
      best_temperature: the central executor's best temperature tau*, in [0.1, 2.0].
      skill: the central executor's ability (logit).
      num_active: N' <= N present executors (None = all).
      overrides: any other ``EnvParams`` field by name (e.g. ``overload_rate: 0.0``).
    """

    difficulty: float = 0.0
    difficulty_std: float = 1.0
    heterogeneity: float = 0.0
    best_temperature: float = 0.7
    skill: float = 0.5
    num_active: Optional[int] = None
    overrides: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("difficulty", "skill"):
            _finite(self, name)
        _finite(self, "difficulty_std", low=0.0)
        _finite(self, "heterogeneity", low=0.0)
        _finite(self, "best_temperature", low=TEMPERATURE_RANGE[0], high=TEMPERATURE_RANGE[1])
        if self.num_active is not None:
            _positive_int(self, "num_active")
        from align_jax.methods.econ.sim import EnvParams  # sim imports this module

        settable = set(EnvParams._fields) - {"executor_mask", "skill", "log_best_temperature", "difficulty_mean",
                                             "difficulty_std", "reward_weights"}
        for name, value in self.overrides.items():
            if name not in settable:
                raise FieldError(f"overrides.{name}",
                                 f"unknown simulator parameter (known: {', '.join(sorted(settable))})")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise FieldError(f"overrides.{name}", f"must be a finite number, got {value!r}")

    def kwargs(self) -> dict:
        """Keyword arguments of :func:`~align_jax.methods.econ.sim.make_env_params`."""
        return dict(difficulty=self.difficulty, difficulty_std=self.difficulty_std, heterogeneity=self.heterogeneity,
                    best_temperature=self.best_temperature, skill=self.skill, num_active=self.num_active,
                    **self.overrides)

    def __hash__(self) -> int:
        return hash((self.difficulty, self.difficulty_std, self.heterogeneity, self.best_temperature, self.skill,
                     self.num_active, tuple(sorted(self.overrides.items()))))


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Where and how ``align-jax econ train|eval`` runs (none of it changes the numbers,
    except ``num_seeds`` and ``eval_seed``).

    Attributes:
      output_dir: runs go to ``output_dir/<name>/seed<seed>/``.
      num_seeds: S seeds trained at once (a vmap axis); seed i uses ``seed + i``.
      checkpoint_every: steps between orbax checkpoints (a multiple of
        ``train.update_every``); 0 = only at the end.
      max_to_keep: checkpoints kept.
      eval_seed: key of the evaluation questions.
      fast_compile: compile with XLA's backend optimisation level 0 (measured on a 2-core
        CPU: programs compile 2-6x faster and run about 4x slower); for tiny runs and tests.
    """

    output_dir: str = "runs"
    num_seeds: int = 1
    checkpoint_every: int = 512
    max_to_keep: int = 2
    eval_seed: int = 1
    fast_compile: bool = False

    def __post_init__(self):
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise FieldError("output_dir", f"must be a non-empty path, got {self.output_dir!r}")
        _positive_int(self, "num_seeds", "max_to_keep")
        _positive_int(self, "checkpoint_every", "eval_seed", minimum=0)


@dataclasses.dataclass(frozen=True)
class RealTrainSettings:
    """Real-model fine-tuning of the belief networks and mixer after simulated training
    (:mod:`~align_jax.methods.econ.real_train`): ECON episodes of the real pipeline on
    ``dataset`` / ``split`` questions, epsilon-greedy w.r.t. the belief networks, their
    transitions kept, and ``updates_per_batch`` TD updates after every ``batch_questions``.

    Attributes:
      model: the coordinator's and executors' model (name or path, as in a reason config).
      dataset, split: the training questions (GSM8K train by default; never the test split
        a reason run evaluates on).
      limit, offset: how many questions (>= 1) and from where.
      batch_questions: questions per episode batch (one checkpoint each).
      updates_per_batch: TD updates after each batch (batch size ``train.batch_size``, drawn
        uniformly from every transition collected so far).
      epsilon: exploration rate of the executors' grid actions (in [0, 1]).
      strategy_tokens, executor_tokens, commit_tokens: generation budgets (>= 1).
      coordinator_temperature: the coordinator's sampling temperature (> 0).
      variance_threshold: the stop rule's threshold (>= 0).
      param_dtype: weight dtype of the model (``float32`` or ``bfloat16``).
      action_likelihood: the form of R_AL in the training rewards: ``answer`` (exact answer
        agreement with the commitment, the simulator's) or ``embedding`` (cosine of the model's
        mean-pooled hidden states of the executor's output and the commitment response).
      data_dir: the data directory (default ``$ALIGN_JAX_DATA_DIR``).
    """

    model: str = "qwen2.5-coder-0.5b"
    dataset: str = "gsm8k"
    split: str = "train"
    limit: int = 32
    offset: int = 0
    batch_questions: int = 8
    updates_per_batch: int = 32
    epsilon: float = 0.2
    strategy_tokens: int = 50
    executor_tokens: int = 256
    commit_tokens: int = 64
    coordinator_temperature: float = 0.7
    variance_threshold: float = 0.01
    param_dtype: str = "bfloat16"
    action_likelihood: str = dataclasses.field(default="answer", metadata=ADDED_FIELD)
    data_dir: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            raise FieldError("model", f"must be a model name or path, got {self.model!r}")
        _positive_int(self, "limit", "batch_questions", "updates_per_batch", "strategy_tokens", "executor_tokens",
                      "commit_tokens")
        _positive_int(self, "offset", minimum=0)
        _finite(self, "epsilon", low=0.0, high=1.0)
        _finite(self, "coordinator_temperature", low=0.0, low_open=True)
        _finite(self, "variance_threshold", low=0.0)
        if self.param_dtype not in ("float32", "bfloat16"):
            raise FieldError("param_dtype", f"must be float32 or bfloat16, got {self.param_dtype!r}")
        if self.action_likelihood not in ("answer", "embedding"):
            raise FieldError("action_likelihood", f"must be answer or embedding, got {self.action_likelihood!r}")
        from align_jax.data import datasets as datasets_lib

        if self.dataset not in datasets_lib.dataset_names():
            raise FieldError("dataset", f"unknown dataset {self.dataset!r} (known: "
                                        f"{', '.join(datasets_lib.dataset_names())})")

    @property
    def num_batches(self) -> int:
        return -(-self.limit // self.batch_questions)


@dataclasses.dataclass(frozen=True)
class EconConfig:
    """One ECON experiment: networks, simulator, training and the reward weights.

    Attributes:
      name: run name.
      seed: PRNG seed of the first run (seeds are a vmap axis of ``train``).
      network, sim, train: the sections above.
      reward_weights: ``{name: weight}`` over :data:`REWARD_NAMES`, weights ``>= 0``
        (missing names weigh 0).  Default 0.5 / 0.3 / 0.2.
      env: the simulator's numbers (:class:`EnvSettings`).
      run: output directory, seeds, checkpoints (:class:`RunSettings`).
      real: optional real-model fine-tuning after simulated training (:class:`RealTrainSettings`);
        ``align-jax econ train`` runs it when present.
    """

    name: str = "econ"
    seed: int = 0
    network: NetworkConfig = dataclasses.field(default_factory=NetworkConfig)
    sim: SimConfig = dataclasses.field(default_factory=SimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    reward_weights: dict[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_REWARD_WEIGHTS))
    env: EnvSettings = dataclasses.field(default_factory=EnvSettings)
    run: RunSettings = dataclasses.field(default_factory=RunSettings)
    real: Optional[RealTrainSettings] = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise FieldError("name", f"must be a non-empty name without '/', got {self.name!r}")
        check_reward_weights(self.reward_weights)
        if self.train.batch_size > self.train.buffer_size:
            raise FieldError("train.batch_size", f"must be <= train.buffer_size={self.train.buffer_size}")
        if self.env.num_active is not None and self.env.num_active > self.sim.num_executors:
            raise FieldError("env.num_active", f"must be <= sim.num_executors={self.sim.num_executors}, "
                                               f"got {self.env.num_active}")
        if self.run.checkpoint_every % self.train.update_every:
            raise FieldError("run.checkpoint_every", f"must be a multiple of train.update_every="
                                                     f"{self.train.update_every}, got {self.run.checkpoint_every}")

    def __hash__(self) -> int:  # the dict field would make the generated hash fail
        return hash((self.name, self.seed, self.network, self.sim, self.train,
                     tuple(sorted(self.reward_weights.items())), self.env, self.run, self.real))
