"""The block-quantized matmul alone: our native kernel vs XLA's float32 dot on the same weights.

Work: ``y = x @ w.T`` for the Qwen2.5-Coder-0.5B shapes of one decoder layer's largest
product (``w [4864, 896]``, the MLP gate) and of the LM head (``w [151936, 896]``), with
``x [M, 896]`` for M = 1, 8, 32, 128. ``w`` is a random Q8_0-style block matrix (int8 codes,
one float32 scale per 32), the same values in every column:

* ``ours f32``: :func:`align_jax.llm.quant.quantized_matmul` (native kernel, exact float32);
* ``ours bf16``: the same with ``compute_dtype="bfloat16"`` (AMX tile units where present);
* ``xla f32``: ``jnp.dot`` with the dequantized float32 matrix (what a dense model does);
* ``xla dequant``: the pure-XLA fallback (int8 -> float32 inside the jit, then the dot);
* ``torch f32``: ``torch.matmul`` with the dequantized float32 matrix (the reference).

Each figure is the median of ``--reps`` timed calls after a compile call (compile time printed
separately), ``block_until_ready`` on every call; GB/s counts the bytes of the weight format
each side reads. Usage::

    python experiments/bench_qmatmul.py [--reps 20] [--out docs/results/bench/qmatmul_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.llm import kernels
from align_jax.llm import quant as Q


def timed(fn, *args, reps: int) -> tuple[float, float]:
    """(compile + first call seconds, median steady seconds)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times))


def torch_time(x: np.ndarray, w: np.ndarray, reps: int) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    tx, tw = torch.from_numpy(x), torch.from_numpy(w)
    with torch.inference_mode():
        torch.matmul(tx, tw.T)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.matmul(tx, tw.T)
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,8,32,128")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows_list = [int(r) for r in args.rows.split(",") if r]
    native = kernels.load()
    print(f"jax {jax.__version__} on {jax.devices()[0]} ({os.cpu_count()} CPUs); native kernel: "
          f"{'yes, ' + str(kernels.library_path()) if native else 'no (XLA fallback)'}")
    rng = np.random.default_rng(0)
    results = []
    f_ours = jax.jit(Q.quantized_matmul, static_argnames="compute_dtype")
    f_dense = jax.jit(lambda x, w: jnp.dot(x, w.T))
    f_xla = jax.jit(Q._xla_matmul)
    header = (f"{'shape':>14} {'M':>4} | {'ours f32':>9} {'ours bf16':>9} {'xla f32':>9} {'xla deq':>9} "
              f"{'torch f32':>9} (ms) | {'ours/xla':>8} {'ours/torch':>10} {'GB/s ours':>9}")
    print(header)
    for n, k in [(4864, 896), (151936, 896)]:
        codes = rng.integers(-127, 128, (n, k), dtype=np.int8)
        scale = (rng.uniform(0.5, 1.5, (n, k // 32)) * 1e-3).astype(np.float32)
        dense = Q.dequantize_numpy(Q.QuantizedTensor(codes, scale, None, 32))
        c, s, w = jnp.asarray(codes), jnp.asarray(scale), jnp.asarray(dense)
        for m in rows_list:
            x = rng.standard_normal((m, k)).astype(np.float32)
            xj = jnp.asarray(x)
            compile_ours, ours = timed(f_ours, xj, c, s, None, reps=args.reps)
            _, ours_bf16 = timed(lambda x, c, s: f_ours(x, c, s, None, compute_dtype="bfloat16"), xj, c, s,
                                 reps=args.reps)
            _, xla = timed(f_dense, xj, w, reps=args.reps)
            _, xla_deq = timed(f_xla, xj, c, s, None, reps=max(3, args.reps // 4))
            torch_s = torch_time(x, dense, args.reps)
            got = np.asarray(f_ours(xj, c, s, None))
            ref = x.astype(np.float64) @ dense.T.astype(np.float64)
            err = float(np.abs(got - ref).max() / np.abs(ref).max())
            row = dict(n=n, k=k, m=m, ours_s=ours, ours_bf16_s=ours_bf16, xla_f32_s=xla, xla_dequant_s=xla_deq,
                       torch_f32_s=torch_s, compile_ours_s=compile_ours - ours, rel_err_vs_f64=err,
                       ours_gb_s=n * k * 1.125 / ours / 1e9)
            results.append(row)
            ts = f"{1e3 * torch_s:9.2f}" if torch_s else f"{'-':>9}"
            ratio_t = f"{torch_s / ours:9.2f}x" if torch_s else f"{'-':>10}"
            print(f"{f'[{n},{k}]':>14} {m:>4} | {1e3 * ours:9.2f} {1e3 * ours_bf16:9.2f} {1e3 * xla:9.2f} "
                  f"{1e3 * xla_deq:9.2f} {ts}      | {xla / ours:7.2f}x {ratio_t} {row['ours_gb_s']:9.1f}")
    print("compile (ours, first call minus a steady call): "
          + ", ".join(f"{r['compile_ours_s']:.2f}s" for r in results))
    print(f"max relative error of ours vs a float64 product: {max(r['rel_err_vs_f64'] for r in results):.1e}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"jax": jax.__version__, "native": native, "rows": results}, fh, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
