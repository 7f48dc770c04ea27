"""Benchmark: CAGE equilibria solved per second, JAX (jit + vmap) vs NumPy.

Workload: ``P`` decoding positions (``2^10 .. 2^16``), ``M = 32`` candidate
tokens, ``J = 3`` principals; base policies ``pi0 ~ Dirichlet(0.3)`` (peaked,
like an LLM's top-32), objectives ``Q ~ N(0, 1)``, weights ``(1, 0.5, 0.25)``,
``tau = 0.5`` (flags change them).

Ours: :func:`align_jax.game.common_agency.solve_equilibrium`, jitted and
vmapped over positions (Newton on the stacked first-order conditions in a
``lax.while_loop``), as run by ``solve_equilibria`` after its host-side
checks, in two variants: one ``vmap`` over all ``P`` positions, and vmapped
chunks of 256 positions under ``lax.map`` (the library default).  Compile
time is reported separately; columns: ``ratio`` = NumPy time / JAX time,
``max|dpi|`` = max abs policy difference JAX vs NumPy, ``vs closed`` = JAX vs
the closed-form welfare maximiser, ``iters`` = max Newton steps JAX/NumPy,
``conv`` = fraction of positions converged.

Reference: the same algorithm (same Newton step, trust region, stopping rule
and float32 dtype) written in **vectorised NumPy over positions** (one array
program per iteration for the whole batch, finished positions masked) -- the
straightforward NumPy port, faster than a per-position Python loop.  The
two must agree: we print the max abs difference of the policies and the
max deviation from the closed-form welfare maximiser.

Run:  python experiments/bench_cage.py [--min-log2 10] [--max-log2 16] [--tau 0.5] [--repeats 1]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.game import common_agency as ca


def numpy_solve(base_logits, objectives, weights, tau, config: ca.SolverConfig):
    """Vectorised NumPy port of ``solve_equilibrium`` (all tokens valid).

    Args:
      base_logits: float32 ``[P, M]``; objectives: float32 ``[P, J, M]``;
      weights: float32 ``[J]``; tau: float.

    Returns:
      (policy ``[P, M]``, incentives ``[P, J, M]``, iterations ``[P]``, residual ``[P]``).
    """
    dtype = np.float32
    tau = dtype(tau)
    eps = np.finfo(dtype).eps
    cap = dtype(ca._exp_cap(dtype))
    num_principals = objectives.shape[1]

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    logpi0 = log_softmax(base_logits.astype(dtype))
    pi0 = np.exp(logpi0)
    a = weights[None, :, None] * objectives
    a = a - a.max(-1, keepdims=True)
    scale = tau + (a.max(-1) - a.min(-1)).max(-1)  # [P]

    def normalise(y):
        return y - np.einsum("pjm,pm->pj", y, pi0)[..., None]

    def measure(y):
        z = logpi0 + y.sum(1) / tau
        z = z - z.max(-1, keepdims=True)
        e = np.exp(z)
        total_mass = e.sum(-1, keepdims=True)
        pi = e / total_mass
        x = z - np.log(total_mass) - logpi0
        price = tau * np.exp(np.minimum(-x, cap))
        f = y - a - price[:, None, :]
        res = 0.5 * (f.max(-1) - f.min(-1)).max(-1) / scale
        max_y = np.abs(y).max((1, 2))
        log_odds = num_principals * max_y / tau + np.abs(logpi0).max(-1)
        noise = eps * (max_y + price.max(-1) * (1 + log_odds))
        return res, np.maximum(dtype(config.tol), 4 * noise / scale), pi, price

    y = normalise(np.zeros_like(objectives, dtype=dtype))
    res, tol, pi, price = measure(y)
    prev_res = np.full_like(res, np.inf)
    clipped = np.ones(res.shape, bool)
    iters = np.zeros(res.shape, np.int32)
    sum_a = a.sum(1)
    for _ in range(config.max_iters):
        stalled = (res <= tol) & (res > 0.5 * prev_res) & ~clipped
        active = (res > config.tol) & ~stalled
        if not active.any():
            break
        s = tau / (tau + num_principals * price)
        sum_y = y.sum(1)
        s_sum_f = s * (sum_y - sum_a) - tau * (1.0 - s)
        lam = (pi * s_sum_f).sum(-1, keepdims=True) / (pi * s).sum(-1, keepdims=True)
        delta = s * lam - s_sum_f
        step_clipped = (np.abs(delta) > config.max_log_step * tau).any(-1)
        delta = np.clip(delta, -config.max_log_step * tau, config.max_log_step * tau)
        y_next = normalise(a + ((sum_y + delta - sum_a) / num_principals)[:, None, :])
        res_next, tol_next, pi_next, price_next = measure(y_next)
        upd = active[:, None]
        y = np.where(upd[..., None], y_next, y)
        pi, price = np.where(upd, pi_next, pi), np.where(upd, price_next, price)
        prev_res = np.where(active, res, prev_res)
        res = np.where(active, res_next, res)
        tol = np.where(active, tol_next, tol)
        clipped = np.where(active, step_clipped, clipped)
        iters = iters + active
    logpi = log_softmax(logpi0 + y.sum(1) / tau)
    return np.exp(logpi), y, iters, res


def make_workload(num_positions, num_tokens, num_principals, seed=0):
    rng = np.random.default_rng(seed)
    base = np.log(rng.dirichlet(np.full(num_tokens, 0.3), size=num_positions)).astype(np.float32)
    base = np.maximum(base, -80.0)  # Dirichlet(0.3) can underflow to 0 in float32
    objectives = rng.normal(size=(num_positions, num_principals, num_tokens)).astype(np.float32)
    return base, objectives


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--min-log2", type=int, default=10)
    parser.add_argument("--max-log2", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--tau", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per size (min is reported), same for both")
    args = parser.parse_args()

    num_tokens, weights = args.tokens, np.array([1.0, 0.5, 0.25], np.float32)
    num_principals = len(weights)
    config = ca.SolverConfig()
    print(f"jax {jax.__version__}  device: {jax.devices()[0].device_kind} ({jax.default_backend()})")
    print(f"M={num_tokens} tokens, J={num_principals} principals, tau={args.tau}, weights={weights.tolist()}, {config}")
    print(
        f"reference: vectorised NumPy (same algorithm, float32); "
        f"min of {args.repeats} timed run(s) each after a warm-up\n"
    )

    # the library's batched core (what solve_equilibria runs after its host-side checks)
    variants = {"vmap": None, "chunks of 256": 256}
    closed = jax.jit(jax.vmap(ca.welfare_maximizer, in_axes=(0, 0, None, None)))
    print(
        f"{'P':>7} {'variant':>14} {'compile s':>9} {'jax s':>8} {'jax eq/s':>10} {'numpy s':>8} {'numpy eq/s':>10} "
        f"{'ratio':>6} {'max|dpi|':>9} {'vs closed':>9} {'iters':>6} {'conv':>5}"
    )
    for log2 in range(args.min_log2, args.max_log2 + 1):
        num_positions = 2**log2
        base, objectives = make_workload(num_positions, num_tokens, num_principals, seed=log2)
        b, q = jnp.asarray(base), jnp.asarray(objectives)
        w = jnp.broadcast_to(jnp.asarray(weights), (num_positions, num_principals))
        t = jnp.full((num_positions,), args.tau, jnp.float32)
        v = jnp.ones((num_positions, num_tokens), bool)
        y0 = jnp.zeros_like(q)
        call = (b, q, w, t, v, y0)

        numpy_solve(base[:8], objectives[:8], weights, args.tau, config)  # warm-up
        numpy_s = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            np_policy, _, np_iters, _ = numpy_solve(base, objectives, weights, args.tau, config)
            numpy_s = min(numpy_s, time.perf_counter() - start)
        closed_policy = np.exp(np.asarray(closed(b, q, jnp.asarray(weights), jnp.float32(args.tau))))

        for name, chunk_size in variants.items():
            start = time.perf_counter()
            compiled = ca._solve_batch.lower(*call, config=config, chunk_size=chunk_size).compile()
            compile_s = time.perf_counter() - start
            jax.block_until_ready(compiled(*call))  # warm-up
            jax_s = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                result = jax.block_until_ready(compiled(*call))
                jax_s = min(jax_s, time.perf_counter() - start)
            policy = np.asarray(result.policy)
            diff = float(np.max(np.abs(policy - np_policy)))
            vs_closed = float(np.max(np.abs(policy - closed_policy)))
            iters = int(np.max(np.asarray(result.iterations)))
            conv = float(np.mean(np.asarray(result.converged)))
            print(
                f"{num_positions:>7} {name:>14} {compile_s:>9.2f} {jax_s:>8.4f} {num_positions / jax_s:>10.0f} "
                f"{numpy_s:>8.4f} {num_positions / numpy_s:>10.0f} {numpy_s / jax_s:>6.1f} "
                f"{diff:>9.1e} {vs_closed:>9.1e} {iters:>3}/{int(np_iters.max()):<2} {conv:>5.3f}"
            )


if __name__ == "__main__":
    main()
