"""The decoder's matmuls at decoding sizes: ours (XLA) against torch's (oneDNN), same shapes, one run.

Work: the matmuls of one decoding step of Qwen2.5-0.5B (24 layers of q / k / v / o / gate / up /
down projections, then the tied LM head over a 151,936 vocabulary) at ``R`` rows, with bfloat16
weights and float32 activations, the mixed-precision mode the reason configs use:

* ``ours``: :func:`align_jax.llm.model._mixed_dot`, the function every projection and the LM head
  of the decoder call (activations cast to bfloat16, products accumulated in float32, XLA:CPU);
* ``reference``: ``torch.matmul`` on bfloat16 operands (oneDNN), the activation cast included.

Each shape is timed as one call doing its matmul with each of its (24 or 1) weight matrices: one
jitted program for ours (so JAX's per-call dispatch is paid once per shape, not per matmul), a
Python loop for torch. Median of ``--reps`` calls after a compile call (compile time printed
separately), ``block_until_ready`` on every call; a step's figure is the sum over its shapes.
The question it answers (issue 17): would a faster matrix multiply make a decoding step, and so
the measured bound of ``experiments/reason_cost_accounting.py``, much faster on this CPU? Usage::

    python experiments/bench_decode_matmul.py [--rows 8,32,128,256] [--reps 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.llm.model import _mixed_dot
from bench_qmatmul import timed  # the sibling script (experiments/ is the script's directory)

HIDDEN, INTER, KV, VOCAB, LAYERS = 896, 4864, 128, 151936, 24
# (name, K, N, times per step): one layer's projections x 24, then the LM head once
SHAPES = [("q", HIDDEN, HIDDEN, LAYERS), ("k", HIDDEN, KV, LAYERS), ("v", HIDDEN, KV, LAYERS),
          ("o", HIDDEN, HIDDEN, LAYERS), ("gate", HIDDEN, INTER, LAYERS), ("up", HIDDEN, INTER, LAYERS),
          ("down", INTER, HIDDEN, LAYERS), ("lm_head", HIDDEN, VOCAB, 1)]


def torch_seconds(x: np.ndarray, ws_kn: np.ndarray, reps: int) -> float:
    """Median seconds of ``torch.matmul(x.to(bf16), w)`` for every ``w [K, N]`` of ``ws_kn`` (bfloat16)."""
    import torch

    tx = torch.from_numpy(x)
    tws = [torch.from_numpy(w).to(torch.bfloat16) for w in ws_kn]

    def call():
        return [torch.matmul(tx.to(torch.bfloat16), tw) for tw in tws]

    with torch.inference_mode():
        call()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="8,32,128,256", help="comma-separated R (rows per decoding step)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", help="write the figures as JSON here too")
    args = parser.parse_args(argv)
    try:
        rows = [int(r) for r in args.rows.split(",")]
    except ValueError:
        parser.error(f"--rows: {args.rows!r} is not a comma-separated list of integers")
    if any(r < 1 for r in rows) or args.reps < 1:
        parser.error("--rows entries and --reps must be >= 1")
    import torch

    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs; bf16 weights, f32 activations")
    print("per-matmul ms are per weight matrix (the shape's time / its count)")
    print(f"{'R':>4} {'matmul':>8} {'K x N':>14} {'ours ms':>9} {'torch ms':>9} {'ours GF/s':>10} "
          f"{'torch GF/s':>11} {'ours/torch':>11} {'compile s':>10}")
    results = []
    for r in rows:
        step_ours = step_torch = 0.0
        for name, k, n, count in SHAPES:
            x = rng.standard_normal((r, k), dtype=np.float32)
            # the LM head is the tied embedding [V, D], contracted on D as the decoder does
            contract = 1 if name == "lm_head" else 0
            shape = (count, n, k) if contract else (count, k, n)
            ws = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(jnp.bfloat16)
            # separate weight arrays, as the decoder's layers hold them (a Python loop over layers)
            fn = jax.jit(lambda a, bs, c=contract: [_mixed_dot(a, b, c, jnp.float32) for b in bs])
            compile_s, shape_ours = timed(fn, jnp.asarray(x), [jnp.asarray(w) for w in ws], reps=args.reps)
            shape_torch = torch_seconds(x, np.asarray(ws, np.float32).transpose(0, 2, 1) if contract
                                        else np.asarray(ws, np.float32), args.reps)
            step_ours += shape_ours
            step_torch += shape_torch
            ours, ref = shape_ours / count, shape_torch / count  # per weight matrix
            flops = 2.0 * r * k * n
            print(f"{r:4d} {name:>8} {f'{k}x{n}':>14} {1e3 * ours:9.3f} {1e3 * ref:9.3f} {flops / ours / 1e9:10.0f} "
                  f"{flops / ref / 1e9:11.0f} {ref / ours:10.2f}x {compile_s:10.2f}", flush=True)
            results.append({"rows": r, "matmul": name, "k": k, "n": n, "ours_s": ours, "torch_s": ref,
                            "compile_s": compile_s})
        print(f"{r:4d} {'step':>8} {'(sum)':>14} {1e3 * step_ours:9.1f} {1e3 * step_torch:9.1f} {'':>10} {'':>11} "
              f"{step_torch / step_ours:10.2f}x   -> {r / step_ours:.0f} vs {r / step_torch:.0f} tok/s (matmuls only)",
              flush=True)
        results.append({"rows": r, "matmul": "step", "ours_s": step_ours, "torch_s": step_torch})
    print("ours/torch > 1: ours faster. A step's tok/s counts only its matmuls (no attention, norms or token choice).")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"argv": sys.argv[1:], "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
