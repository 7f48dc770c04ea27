"""Tiny ECON configs shared by the econ tests (small networks, so programs compile fast),
and one trained tiny run shared by test_train.py and test_run.py (compiled once)."""

from __future__ import annotations

import dataclasses

import pytest

from align_jax.methods.econ.config import EconConfig, EnvSettings, NetworkConfig, RunSettings, SimConfig, TrainConfig
from align_jax.methods.econ.networks import action_grid


def tiny_network(**changes) -> NetworkConfig:
    base = dict(belief_dim=8, hidden_dim=16, num_heads=2, num_blocks=1, mixer_embed_dim=8, num_temperatures=5,
                num_top_ps=2)
    base.update(changes)
    return NetworkConfig(**base)


def tiny_config(num_executors: int = 2, **train_changes) -> EconConfig:
    train = dict(num_steps=1024, num_envs=8, update_every=2, epsilon_decay_steps=512, batch_size=16,
                 buffer_size=2048, eval_questions=256)
    train.update(train_changes)
    return EconConfig(name="tiny", network=tiny_network(), sim=SimConfig(num_executors=num_executors, max_rounds=3),
                      train=TrainConfig(**train))


def known_best_config(output_dir: str = "runs") -> EconConfig:
    """The tiny config on a one-round task (variance threshold 100 stops every question after
    its first round) whose accuracy peaks sharply at a temperature on the action grid (the
    middle of 5 temperatures, 0.447); two seeds, a checkpoint every 512 of 1024 steps, XLA
    optimisation level 0 (compiles in about half the time; the run is short)."""
    config = tiny_config()
    best = action_grid(config.network)[4][0]
    env = EnvSettings(best_temperature=best, overrides={"temperature_curvature": 2.0, "variance_threshold": 100.0})
    return dataclasses.replace(config, env=env, run=RunSettings(output_dir=output_dir, num_seeds=2,
                                                                checkpoint_every=512, fast_compile=True))


@pytest.fixture(scope="session")
def trained_tiny():
    """The known-best tiny config trained uninterrupted (2 seeds, vmapped) and evaluated,
    through the same compiled programs that ``align-jax econ train|eval`` use."""
    import jax

    from align_jax.methods.econ.run import eval_keys, seed_keys, seed_programs
    from align_jax.methods.econ.train import make_trainer

    config = known_best_config()
    trainer = make_trainer(config)
    init_fn, segment, evaluate = seed_programs(trainer)
    init = init_fn(seed_keys(config))
    final = segment(init, config.train.num_steps)
    result = evaluate(final, eval_keys(config))
    jax.block_until_ready(result)
    return dict(config=config, trainer=trainer, best=config.env.best_temperature, init=init, segment=segment,
                evaluate=evaluate, final=final, result=result)


@pytest.fixture(scope="session")
def resumed(trained_tiny, tmp_path_factory):
    """The tiny run killed after its first checkpoint (step 512), then rerun to the end (a
    finished simulated run on disk, shared by the run, reason and real fine-tuning tests)."""
    from align_jax.methods.econ.run import train_run

    config = dataclasses.replace(known_best_config(str(tmp_path_factory.mktemp("econ_runs"))))
    trainer = trained_tiny["trainer"]
    first = train_run(config, progress=False, figures=False, stop_after_segments=1, trainer=trainer)
    second = train_run(config, progress=False, figures=False, trainer=trainer)
    # read now: a later test may clear JAX's caches
    return dict(config=config, first=first, second=second, segment_cache_size=trained_tiny["segment"]._cache_size())
