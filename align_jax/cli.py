"""The ``align-jax`` command.

    align-jax simulate configs/theorem1_sweep.yaml [--scenarios N] [--output-dir DIR] [--no-figures]
    align-jax reason configs/reason_small.yaml      ALIGN + baselines with real LLMs on math benchmarks
    align-jax replay configs/reason_small.yaml      swap the principal on a finished reason run (no model)
    align-jax align configs/cage_small.yaml         CAGE multi-objective decoding over a weight grid
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional, Sequence

__all__ = ["main"]


def _simulate(args) -> int:
    from align_jax import simulate

    config = simulate.load_simulate_config(args.config)
    overrides = {}
    if args.scenarios is not None:
        overrides["scenarios_per_point"] = args.scenarios
    if args.output_dir is not None:
        overrides["output_dir"] = args.output_dir
    if args.seed is not None:
        overrides["seed"] = args.seed
    if overrides:
        config = dataclasses.replace(config, **overrides)
    frame = simulate.run_simulation(config, progress=not args.quiet, figures=not args.no_figures)
    simulate.print_summary(config, frame)
    print(f"results: {simulate.run_dir(config)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align-jax", description=__doc__.strip().splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="synthetic sweep of the ALIGN delegation game")
    sim.add_argument("config", help="YAML sweep config (see configs/)")
    sim.add_argument("--scenarios", type=int, help="override scenarios_per_point")
    sim.add_argument("--seed", type=int, help="override seed")
    sim.add_argument("--output-dir", help="override output_dir")
    sim.add_argument("--no-figures", action="store_true", help="skip the figures")
    sim.add_argument("--quiet", action="store_true", help="no progress bar")
    sim.set_defaults(func=_simulate)
    from align_jax.methods.reason import add_reason_subcommand
    from align_jax.methods.cage import add_align_subcommand
    from align_jax.methods.replay import add_replay_subcommand

    add_reason_subcommand(sub)
    add_replay_subcommand(sub)
    add_align_subcommand(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from align_jax.config import ConfigError
    from align_jax.game.types import GameInputError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, GameInputError) as exc:
        print(f"align-jax: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
