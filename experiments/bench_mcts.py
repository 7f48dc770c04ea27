"""Benchmark: MCTS tree bookkeeping (select + expand + back-propagate), jitted JAX vs plain Python.

Workload: B trees (``2^10 .. 2^16``) each run a whole rStar-style search -- R = 16
rollouts, max depth D = 5, all five actions A1..A5 with one child each per expansion
(A = 5 slots, M = 261 node slots), ``confidence`` terminal reward -- against a
*scripted* expansion environment instead of the LLM: a child's terminal flag and
answer id are a hash of (tree, node index), so both implementations build identical
trees.  A2 children are terminal, other children with probability 0.3, answers in 0..3.

A *tree advance* is one expansion wave of one tree: UCT selection of the node to
expand, adding its children, and backing up every rollout that completes (including
rollouts that re-reach an existing terminal, which cost no LLM call).  We report
tree advances per second.

Ours: :func:`align_jax.methods.mcts.run_search` -- the wave loop under one ``jit``,
every step vmapped over the B trees (``lax.while_loop`` over waves).  Compile time is
reported separately (AOT ``lower().compile()``); the timed run is the second call of
the compiled program, ``block_until_ready``.  We also time the host-driven loop an LLM
caller uses (``plan_wave`` / ``apply_wave`` from Python, one dispatch pair per wave).

Reference: ``tests/methods/mcts_reference.py``, a dict/list tree in plain Python (the
same algorithm, float32 arithmetic), run on fewer trees and scaled per tree.  The
``match`` column checks that the reference's trees equal ours (visits, node count).

Run:  python experiments/bench_mcts.py [--quick] [--min-log2 10] [--max-log2 16] [--ref-trees 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import align_jax.methods.mcts as mcts  # noqa: E402
from align_jax.methods.mcts import wave  # noqa: E402
from tests.methods.mcts_reference import RefTree  # noqa: E402

TERMINAL_PERCENT = 30
NUM_ANSWERS = 4
MASK32 = 0xFFFFFFFF


def _mix_py(tree_id: int, node: int) -> int:
    h = (tree_id * 0x9E3779B1 + node * 0x85EBCA77 + 0x165667B1) & MASK32
    h ^= h >> 15
    h = (h * 0x2C1B3C6D) & MASK32
    h ^= h >> 12
    return h


def _mix_jax(tree_id, node):
    h = tree_id.astype(jnp.uint32) * jnp.uint32(0x9E3779B1) + node.astype(jnp.uint32) * jnp.uint32(0x85EBCA77)
    h = h + jnp.uint32(0x165667B1)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x2C1B3C6D)
    return h ^ (h >> 12)


def scripted_env(tree, plan, key):
    """Hash-scripted expansions (the key is unused: the environment is deterministic)."""
    del key
    batch = plan.child_valid.shape[0]
    h = _mix_jax(jnp.arange(batch)[:, None], plan.child_index)
    terminal = (plan.child_action == mcts.A2) | ((h % 100).astype(jnp.int32) < TERMINAL_PERCENT)
    answer = ((h >> 8) % NUM_ANSWERS).astype(jnp.int32)
    return mcts.ExpansionResult(terminal=terminal, answer_id=answer)


def reference_search(spec, tree_ids, exploration):
    """Plain-Python searches of the given trees; returns (trees, expansions)."""
    refs, expansions = [], 0
    for tree_id in tree_ids:
        ref = RefTree(*spec)
        while True:
            leaf, active, valid, index = ref.plan(exploration)
            if not active:
                break
            terminal, answer = [], []
            for kind, node in zip(spec.slot_actions, index):
                h = _mix_py(tree_id, node & MASK32)
                terminal.append(kind == mcts.A2 or h % 100 < TERMINAL_PERCENT)
                answer.append((h >> 8) % NUM_ANSWERS)
            ref.apply(exploration, leaf, active, valid, terminal, answer, [0.0] * len(valid))
            expansions += 1
        refs.append(ref)
    return refs, expansions


def count_expansions(tree) -> int:
    expanded = jnp.any(tree.children_index != mcts.NO_CHILD, axis=-1).sum() + tree.num_dead_ends.sum()
    return int(expanded)


def host_waves(spec, tree, exploration):
    """The loop an LLM caller runs: plan, (generate), apply, once per wave."""
    waves = 0
    while True:
        plan = mcts.plan_wave(spec, tree, exploration)
        if not bool(plan.active.any()):
            return tree, waves
        tree = mcts.apply_wave(spec, tree, plan, scripted_env(tree, plan, None), exploration)
        waves += 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--min-log2", type=int, default=10)
    parser.add_argument("--max-log2", type=int, default=16)
    parser.add_argument("--step", type=int, default=2, help="log2 step between batch sizes")
    parser.add_argument("--ref-trees", type=int, default=256, help="trees searched by the Python reference")
    parser.add_argument("--rollouts", type=int, default=16)
    parser.add_argument("--max-depth", type=int, default=5)
    parser.add_argument("--exploration", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true", help="2^10 and 2^12 trees, 64 reference trees")
    args = parser.parse_args()
    if args.quick:
        args.max_log2 = min(args.max_log2, 12)
        args.ref_trees = min(args.ref_trees, 64)

    spec = mcts.make_tree_spec(rollouts=args.rollouts, max_depth=args.max_depth, children_per_expansion=1)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"{os.cpu_count()} CPUs visible")
    print(f"spec: R={spec.num_rollouts} rollouts, D={spec.max_depth}, A={spec.num_slots} slots "
          f"(A1..A5 x 1), M={spec.max_nodes} nodes, reward={spec.reward}, c={args.exploration}")

    # Reference: per-tree cost, measured once on the first ref_trees trees.
    start = time.perf_counter()
    refs, ref_expansions = reference_search(spec, range(args.ref_trees), args.exploration)
    ref_seconds = time.perf_counter() - start
    ref_rate = ref_expansions / ref_seconds
    print(f"reference (plain Python): {args.ref_trees} trees, {ref_expansions} tree advances in "
          f"{ref_seconds:.2f} s = {ref_rate:,.0f} advances/s")
    ref_visits = np.array([r.nodes[0]["visits"] for r in refs])
    ref_nodes = np.array([len(r.nodes) for r in refs])

    header = (f"{'trees':>7} {'compile s':>9} {'run s':>8} {'waves':>5} {'advances':>9} {'ours adv/s':>12} "
              f"{'ref adv/s':>10} {'ratio':>6} {'match':>5}")
    print(header)
    print("-" * len(header))
    key = jax.random.key(0)
    for log2 in range(args.min_log2, args.max_log2 + 1, args.step):
        batch = 2 ** log2
        tree = mcts.init_tree(spec, batch)
        start = time.perf_counter()
        compiled = wave._run_search.lower(tree, key, args.exploration, spec=spec, expand_fn=scripted_env,
                                          max_waves=spec.num_rollouts * spec.max_depth).compile()
        compile_seconds = time.perf_counter() - start
        if batch <= 2 ** 12:  # warm-up run (skipped at large sizes to keep the run short)
            jax.block_until_ready(compiled(tree, key, args.exploration))
            tree = mcts.init_tree(spec, batch)
        tree = jax.block_until_ready(tree)
        start = time.perf_counter()
        out, waves = jax.block_until_ready(compiled(tree, key, args.exploration))
        seconds = time.perf_counter() - start
        advances = count_expansions(out)
        rate = advances / seconds
        n = min(args.ref_trees, batch)
        match = (np.array_equal(np.asarray(out.node_visits[:n, 0]), ref_visits[:n])
                 and np.array_equal(np.asarray(out.num_nodes[:n]), ref_nodes[:n])
                 and bool(jnp.all(out.rollouts_done == spec.num_rollouts)))
        print(f"{batch:>7} {compile_seconds:>9.2f} {seconds:>8.3f} {int(waves):>5} {advances:>9} {rate:>12,.0f} "
              f"{ref_rate:>10,.0f} {rate / ref_rate:>6.0f} {'yes' if match else 'NO':>5}", flush=True)
        del out, tree

    # The host-driven loop (one plan_wave + apply_wave dispatch per wave), at the smallest size.
    batch = 2 ** args.min_log2
    tree, _ = host_waves(spec, mcts.init_tree(spec, batch), args.exploration)  # compiles
    jax.block_until_ready(tree)
    tree = jax.block_until_ready(mcts.init_tree(spec, batch))
    start = time.perf_counter()
    tree, waves = host_waves(spec, tree, args.exploration)
    jax.block_until_ready(tree)
    seconds = time.perf_counter() - start
    rate = count_expansions(tree) / seconds
    print(f"host-driven waves (plan_wave/apply_wave per wave, as with an LLM), {batch} trees: {waves} waves in "
          f"{seconds:.3f} s = {seconds / waves * 1e3:.1f} ms/wave, {rate:,.0f} advances/s "
          f"({rate / ref_rate:.0f}x the reference)")


if __name__ == "__main__":
    main()
