"""Token choice per decode step: our exact top-C candidates against ``lax.top_k``, same logits, one run.

Work: the top ``C = 64`` logits (values and ids) of ``R`` rows of a ``V = 151,936`` vocabulary
(Qwen2.5's), what :func:`align_jax.llm.logits.sample_tokens` needs for top-p sampling at every
decoding step (the whole ``sample_tokens`` call, temperature 0.7 and top-p 0.95, is timed too):

* ``ours``: :func:`align_jax.llm.logits.top_candidates` (block maxima: the C blocks of 64 ids
  with the largest maxima hold the top C);
* ``reference``: ``jax.lax.top_k(logits, C)`` over the whole vocabulary (XLA's own top-k).

Both return the same values and ids (checked here on every shape, ties included in the tests).
Each figure is the median of ``--reps`` timed calls after a compile call (compile time printed
separately), ``block_until_ready`` on every call. Usage::

    python experiments/bench_token_choice.py [--rows 8,32,128,256] [--reps 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.llm.logits import sample_tokens, top_candidates
from bench_qmatmul import timed  # the sibling script (experiments/ is the script's directory)

VOCAB, COUNT = 151_936, 64


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="8,32,128,256")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    ours = jax.jit(lambda x: top_candidates(x, COUNT))
    reference = jax.jit(lambda x: jax.lax.top_k(x, COUNT))
    sample = jax.jit(lambda k, x, t, p: sample_tokens(k, x, t, p, full_vocab=False))
    print(f"jax {jax.__version__} on {jax.devices()[0]} ({os.cpu_count()} CPUs); V={VOCAB}, C={COUNT}; "
          f"load avg {os.getloadavg()[0]:.2f}")
    print("   R | top-C ours (ms) | lax.top_k (ms) | ref / ours | whole sample_tokens (ms) | compile ours / ref (s)")
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        logits = jax.random.normal(jax.random.key(rows), (rows, VOCAB)) * 3.0
        keys = jax.random.split(jax.random.key(0), rows)
        temperature, top_p = jnp.full((rows,), 0.7), jnp.full((rows,), 0.95)
        c_ours, t_ours = timed(ours, logits, reps=args.reps)
        c_ref, t_ref = timed(reference, logits, reps=args.reps)
        a, b = ours(logits), reference(logits)
        if not (np.array_equal(np.asarray(a[0]), np.asarray(b[0])) and np.array_equal(np.asarray(a[1]), np.asarray(b[1]))):
            print(f"R={rows}: ours and lax.top_k disagree", file=sys.stderr)
            return 1
        _, s_ours = timed(sample, keys, logits, temperature, top_p, reps=args.reps)
        row = {"rows": rows, "top_c_ms": t_ours * 1e3, "lax_top_k_ms": t_ref * 1e3, "sample_tokens_ms": s_ours * 1e3,
               "compile_ours_s": c_ours - t_ours, "compile_ref_s": c_ref - t_ref}
        results.append(row)
        print(f"{rows:4d} | {row['top_c_ms']:15.2f} | {row['lax_top_k_ms']:14.2f} | {t_ref / t_ours:10.2f} | "
              f"{row['sample_tokens_ms']:24.2f} | {row['compile_ours_s']:.2f} / {row['compile_ref_s']:.2f}", flush=True)
    print(f"load avg after: {os.getloadavg()[0]:.2f}")
    if args.out:
        from align_jax.runio import atomic_write

        atomic_write(args.out, json.dumps({"vocab": VOCAB, "count": COUNT, "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
