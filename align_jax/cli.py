"""The ``align-jax`` command.

    align-jax simulate configs/theorem1_sweep.yaml [--scenarios N] [--output-dir DIR] [--no-figures]
                       [--devices D] [--coordinator HOST:PORT --num-processes P --process-id I | --distributed]
    align-jax reason configs/reason_small.yaml      ALIGN + baselines with real LLMs on math benchmarks
    align-jax replay configs/reason_small.yaml      swap the principal on a finished reason run (no model)
    align-jax cage configs/cage_small.yaml          CAGE multi-objective decoding over a weight grid
                                                    (``align-jax align`` is its deprecated old name)
    align-jax econ train|eval configs/econ_sim.yaml ECON in simulation: train (resumable), evaluate
    align-jax reason|cage CONFIG --shard I/N        one shard of a run (1-based); --merge joins them
    align-jax launch --shards N [--ray-address ADDR] reason CONFIG
                                                    the shards as Ray tasks, then the merge

Every command runs on the shared runner (:mod:`align_jax.runner`) and reports bad input
here, in one place: ``align-jax: error: <file>:<line>: <field>: <message>`` and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional, Sequence

__all__ = ["main", "build_parser", "user_errors"]

_SIMULATE_OVERRIDES = ("scenarios_per_point", "seed", "output_dir")


def _simulate(args) -> int:
    from align_jax import simulate
    from align_jax.runner import apply_overrides

    from align_jax import distributed

    # Before anything touches a JAX backend (loading the config does).
    distributed.initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)
    config = apply_overrides(simulate.load_simulate_config(args.config), args, _SIMULATE_OVERRIDES)
    if args.devices is not None:
        config = dataclasses.replace(config, devices=args.devices)
    frame = simulate.run_simulation(config, progress=not args.quiet, figures=not args.no_figures)
    if distributed.is_writer():
        simulate.print_summary(config, frame)
        print(f"results: {simulate.run_dir(config)}")
    return 0


def _add_device_arguments(parser) -> None:
    group = parser.add_argument_group("devices and processes (see align_jax.distributed)")
    group.add_argument("--devices", type=int, default=None, help="devices to shard games over (default: all)")
    group.add_argument("--coordinator", default=None, help="host:port of process 0 of a multi-process run")
    group.add_argument("--num-processes", type=int, default=None, help="processes in a multi-process run")
    group.add_argument("--process-id", type=int, default=None, help="this process's id, 0 .. num-processes - 1")
    group.add_argument("--distributed", action="store_true",
                       help="join a multi-process run described by the cluster's environment (SLURM, TPU pod)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    from align_jax.cluster import add_launch_subcommand
    from align_jax.methods.cage import add_cage_subcommand
    from align_jax.methods.econ.run import add_econ_subcommand
    from align_jax.methods.reason import add_reason_subcommand
    from align_jax.methods.replay import add_replay_subcommand
    from align_jax.runner import add_run_arguments

    parser = argparse.ArgumentParser(prog="align-jax", description=__doc__.strip().splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="synthetic sweep of the ALIGN delegation game")
    add_run_arguments(sim, _SIMULATE_OVERRIDES, flags={"scenarios_per_point": "--scenarios"})
    _add_device_arguments(sim)
    sim.set_defaults(func=_simulate)
    add_reason_subcommand(sub)
    add_replay_subcommand(sub)
    add_cage_subcommand(sub)
    add_econ_subcommand(sub)
    add_launch_subcommand(sub)
    return parser


def user_errors() -> tuple[type, ...]:
    """The exception types that mean bad input (reported as one line, exit 2), not a bug."""
    from align_jax.cluster import LaunchError
    from align_jax.config import ConfigError, FieldError
    from align_jax.data.datasets import DatasetError
    from align_jax.game.types import GameInputError
    from align_jax.llm.registry import ModelPackageError
    from align_jax.llm.weights import WeightsError
    from align_jax.runio import CorruptResultsError

    return (ConfigError, FieldError, GameInputError, DatasetError, WeightsError, ModelPackageError, CorruptResultsError,
            LaunchError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs one ``align-jax`` sub-command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except user_errors() as exc:
        print(f"align-jax: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
