"""ECON: belief-driven coordination of executor LLMs by a coordinator (arXiv 2506.08292).

The pure-JAX learning core and the simulated environment:

* :mod:`~align_jax.methods.econ.config`: frozen configs (networks, simulator, training,
  reward weights) that validate themselves with field-named errors;
* :mod:`~align_jax.methods.econ.networks`: per-executor belief networks, the attention
  belief encoder and the monotone QMIX-style mixer (Flax NNX, used as pure functions);
* :mod:`~align_jax.methods.econ.losses`: rewards, local TD, mixer TD, consistency and BNE
  losses;
* :mod:`~align_jax.methods.econ.buffer`: the flashbax replay buffer;
* :mod:`~align_jax.methods.econ.sim`: the vmappable simulated environment (flat and
  hierarchical) and its calibration hook;
* :mod:`~align_jax.methods.econ.train`: ``make_train(config) -> train(key)``, resumable
  segments and evaluation against baselines;
* :mod:`~align_jax.methods.econ.checkpoint`: orbax checkpoints that refuse another
  config's directory and detect corrupt files;
* :mod:`~align_jax.methods.econ.run`: ``align-jax econ train|eval`` (segments, checkpoints,
  resume, evaluation rows, summary, figures);
* :mod:`~align_jax.methods.econ.real`: the real pipeline (coordinator strategy, executors
  at per-row temperature / top-p from the belief networks, LLM commitment) on our sampler;
* :mod:`~align_jax.methods.econ.reference`: a slow NumPy reference (tests, benchmark).
"""

from align_jax.methods.econ.checkpoint import CheckpointError, Checkpointer
from align_jax.methods.econ.config import (DEFAULT_REWARD_WEIGHTS, REWARD_NAMES, EconConfig, EnvSettings, NetworkConfig,
                                           RunSettings, SimConfig, TrainConfig, check_reward_weights)
from align_jax.methods.econ.losses import LossInfo, Transition, combine_rewards, econ_loss, td_target
from align_jax.methods.econ.networks import (BeliefEncoder, BeliefNetwork, EconNetworks, EconParams, QMixer,
                                             action_grid, agent_forward, encode, init_networks, mix)
from align_jax.methods.econ.sim import (Action, AccuracyFit, Env, EnvParams, EnvState, EnvStep, calibrated_params,
                                        fit_accuracy_curve, make_env_params, make_sim_env)
from align_jax.methods.econ.real import RealEconSettings, belief_policy, fixed_policy, run_econ_questions
from align_jax.methods.econ.run import TrainOutcome, eval_run, load_econ_config, train_run
from align_jax.methods.econ.train import (EconTrainer, EvalResult, PolicyEval, TrainLog, TrainState, make_train,
                                          make_trainer)

__all__ = [
    "DEFAULT_REWARD_WEIGHTS",
    "REWARD_NAMES",
    "EconConfig",
    "EnvSettings",
    "RunSettings",
    "NetworkConfig",
    "SimConfig",
    "TrainConfig",
    "check_reward_weights",
    "LossInfo",
    "Transition",
    "combine_rewards",
    "econ_loss",
    "td_target",
    "BeliefEncoder",
    "BeliefNetwork",
    "EconNetworks",
    "EconParams",
    "QMixer",
    "action_grid",
    "agent_forward",
    "encode",
    "init_networks",
    "mix",
    "Action",
    "AccuracyFit",
    "Env",
    "EnvParams",
    "EnvState",
    "EnvStep",
    "calibrated_params",
    "fit_accuracy_curve",
    "make_env_params",
    "make_sim_env",
    "EconTrainer",
    "EvalResult",
    "PolicyEval",
    "TrainLog",
    "TrainState",
    "make_train",
    "make_trainer",
    "CheckpointError",
    "Checkpointer",
    "TrainOutcome",
    "load_econ_config",
    "train_run",
    "eval_run",
    "RealEconSettings",
    "belief_policy",
    "fixed_policy",
    "run_econ_questions",
]
