"""ECON training throughput: the jitted, seed-vmapped JAX program vs a straightforward
NumPy/Python loop of the same simulator and update (``align_jax.methods.econ.reference``).

Both run the same configuration: the paper's network sizes (belief dim 128, hidden 128,
mixer 32) with the pooling-only belief encoder (``num_blocks = 0``, the part the NumPy
reference implements), N = 3 executors, 4 parallel questions per seed, an update of
batch 16 every 8 steps.  An *environment step* is one round of one question (N executor
answers, a commitment, rewards); the update work per environment step is the same on
both sides.  JAX: compilation timed separately, then S seeds x ``--steps`` steps in one
call, ``block_until_ready``.  NumPy: one seed, as many steps as fit in ``--numpy-seconds``.

    python experiments/bench_econ.py                       # prints, writes docs/results/econ_sim/bench.json
    python experiments/bench_econ.py --seeds 8 --steps 512 --numpy-seconds 5    # quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np

from align_jax.methods.econ.config import EconConfig, NetworkConfig, SimConfig, TrainConfig
from align_jax.methods.econ.networks import init_networks
from align_jax.methods.econ.reference import NumpyTrainer, params_to_numpy
from align_jax.methods.econ.train import make_trainer


def bench_config(steps: int, size: str = "paper") -> EconConfig:
    """The benchmarked configuration: ``paper`` sizes (belief/hidden 128, mixer 32) or the
    ``small`` ones of configs/econ_sim.yaml (32 / 64 / 16), pooling-only encoder."""
    network = NetworkConfig(num_blocks=0) if size == "paper" else NetworkConfig(
        belief_dim=32, hidden_dim=64, mixer_embed_dim=16, num_blocks=0)
    return EconConfig(name="bench", network=network, sim=SimConfig(num_executors=3),
                      train=TrainConfig(num_steps=steps, num_envs=4, epsilon_decay_steps=max(8, steps // 2)))


def bench_jax(config: EconConfig, seeds: int) -> dict:
    trainer = make_trainer(config)
    train = jax.jit(jax.vmap(trainer.train))
    keys = jax.vmap(jax.random.key)(np.arange(seeds))
    start = time.perf_counter()
    compiled = train.lower(keys).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(keys))  # warm-up (first-call allocations)
    start = time.perf_counter()
    state = compiled(keys)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    env_steps = seeds * config.train.num_steps * config.train.num_envs
    return dict(seeds=seeds, steps_per_seed=config.train.num_steps, env_steps=env_steps, seconds=seconds,
                compile_seconds=compile_s, env_steps_per_s=env_steps / seconds,
                updates_per_s=seeds * config.train.num_steps / config.train.update_every / seconds,
                final_loss=float(np.mean(np.asarray(state.log.loss.total)[:, -1])))


def bench_numpy(config: EconConfig, seconds: float) -> dict:
    trainer = make_trainer(config)
    env = trainer.env
    _, params = init_networks(config.network, env.observation_dim, env.commitment_dim, config.sim.num_executors,
                              jax.random.key(0))
    ref = NumpyTrainer(config, params_to_numpy(params), trainer.default_env_params, trainer.networks.grid, seed=0)
    ref.run(2 * config.train.update_every)  # warm-up, reaches a first update
    start = time.perf_counter()
    steps = ref.run(config.train.num_steps, time_limit=seconds)
    elapsed = time.perf_counter() - start
    env_steps = steps * config.train.num_envs
    return dict(seeds=1, steps=steps, env_steps=env_steps, seconds=elapsed, env_steps_per_s=env_steps / elapsed,
                updates_per_s=steps / config.train.update_every / elapsed)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2048, help="training steps per seed (JAX)")
    parser.add_argument("--numpy-seconds", type=float, default=30.0)
    parser.add_argument("--size", choices=("paper", "small"), default="paper", help="network sizes")
    parser.add_argument("--out", default="docs/results/econ_sim/bench.json")
    args = parser.parse_args(argv)
    config = bench_config(args.steps, args.size)
    ours = bench_jax(config, args.seeds)
    ref = bench_numpy(config, args.numpy_seconds)
    result = dict(size=args.size, config=dataclasses.asdict(config), jax=ours, numpy=ref,
                  ratio=ours["env_steps_per_s"] / ref["env_steps_per_s"], jax_version=jax.__version__,
                  device=str(jax.devices()[0]), cpu_count=os.cpu_count(), platform=platform.platform())
    print(f"JAX {jax.__version__} on {result['device']} ({os.cpu_count()} CPUs), {args.size} network sizes")
    print(f"numpy loop, 1 seed:            {ref['env_steps_per_s']:10.0f} env steps/s "
          f"({ref['steps']} steps in {ref['seconds']:.1f}s)")
    print(f"jax jit+vmap, {args.seeds} seeds:       {ours['env_steps_per_s']:10.0f} env steps/s "
          f"({ours['env_steps']} env steps in {ours['seconds']:.2f}s; compile {ours['compile_seconds']:.1f}s)")
    print(f"ratio: {result['ratio']:.0f}x")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
