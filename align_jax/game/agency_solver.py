r"""CAGE, part 2: the EPEC solver of ``G_ref`` and the limited-liability variant.

Shapes: ``J`` principals, ``M`` candidate tokens, ``P`` positions in a batch.
The game, its welfare ``W`` and the closed-form equilibrium are in
:mod:`align_jax.game.agency_game` (see its docstring for the derivation);
:mod:`align_jax.game.common_agency` re-exports everything.

EPEC solver.  :func:`solve_equilibrium` stacks every principal's first-order
condition ``F_k(Y) = Y_k - a_k - tau / r(S) = const`` (the agent's optimality
is substituted through ``pi*(Y)``; this is the stacked-KKT approach to an
equilibrium problem with equilibrium constraints) and runs Newton's method on
the stacked system from any initial profile ``Y^0``.  The Jacobian
``I + 1 1^T (x) D`` (``D = diag(1/r)(I - 1 pi^T)``) is inverted in ``O(J M)``
(diagonal plus rank one) on the aggregate.  Globalisation: a per-token
trust region, each step moves ``S_i / tau`` by at most
``SolverConfig.max_log_step``.  From ``Y^0 = 0`` (the agent at ``pi0``) it
takes 3-6 steps on typical inputs and ~25 at the extremes tested; from a far
start, a token with ``log r`` far below its target gains about 1 per step
(Newton on an exponential), so steps grow with ``|log r^0 - log r*|``.  The
loop is a ``lax.while_loop`` with tolerance and iteration cap; under
``vmap`` finished positions are masked.  Plain best-response dynamics were
tried and rejected: Jacobi diverges for ``J >= 3`` once a token is
suppressed (its linearisation has eigenvalue ``-(J-1)/(1+r_i)``) and
Gauss-Seidel with exact best responses had not converged after 200 sweeps
at ``tau = 0.1``, ``|Q| ~ 10`` (rate ``1 - O(r_i)``).

Limited liability.  Replacing the normalisation ``<pi0, Y_k> = 0`` of
``G_ref`` by ``Y_k >= 0`` (Bernheim and Whinston's menu auctions) gives a
different game.  Its first-order conditions give truthful threshold contracts
``Y_k = (a_k - u_k)_+`` with ``u_k = tau + <pi, min(a_k, u_k)>`` and, for
``J = 1``, the welfare ``<pi, a> - tau KL(pi||pi0) - c_min(pi)`` with
``c_min(pi) = tau max_i log(pi0_i / pi_i)`` (the least constant that keeps
the incentive nonnegative).  For ``J >= 2`` we found no welfare it
maximises (the equilibrium incentive ``sum_k (a_k - u_k(pi))_+`` is not a
gradient field in ``pi``: its Jacobian is not symmetric).  Available as
:func:`solve_limited_liability` (Gauss-Seidel exact best responses in the
thresholds ``u [J]``; uniqueness observed in tests, not proved) with
:func:`limited_liability_welfare` for ``J = 1``.  The review's welfare is
the ``J = 1`` form with ``a = Q^T w / J`` scaled by ``J``, which is neither
variant's equilibrium for ``J >= 2``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from align_jax.game.agency_baselines import check_game_inputs
from align_jax.game.agency_game import (
    EquilibriumResult,
    SolverConfig,
    _base_log_policy,
    _exp_cap,
    _log_policy,
    _masked_max,
    _masked_min,
    _normalise,
    _valid_mask,
    _values,
)
from align_jax.game.types import GameInputError

__all__ = [
    "solve_equilibrium",
    "solve_equilibria",
    "solve_limited_liability",
    "limited_liability_welfare",
]


# ----------------------------------------------------------------------------
# EPEC solver


def _foc(y, a, logpi0, tau, valid):
    """Stacked first-order conditions at incentives ``y``.

    Returns ``(F [J, M], pi [M], tau / r [M], noise [])`` (0 on masked tokens)
    where ``noise`` bounds the rounding error of ``F`` in the working dtype:
    ``eps (max|Y| + max(tau / r) (1 + J max|Y| / tau + max|log pi0|))``.
    One ``exp`` for the softmax and one for ``pi0 / pi`` per token.
    """
    z = jnp.where(valid, logpi0 + jnp.sum(y, axis=0) / tau, -jnp.inf)
    z = z - jnp.max(z)
    e = jnp.exp(z)
    total_mass = jnp.sum(e)
    pi = e / total_mass
    x = jnp.where(valid, z - jnp.log(total_mass) - logpi0, 0.0)  # log r
    price = jnp.where(valid, tau * jnp.exp(jnp.minimum(-x, _exp_cap(x.dtype))), 0.0)
    f = jnp.where(valid[None, :], y - a - price[None, :], 0.0)
    # log r carries the rounding of S / tau (S summed from J incentives) and of log pi0
    max_y = jnp.max(jnp.abs(y))
    log_odds = y.shape[0] * max_y / tau + jnp.max(jnp.abs(logpi0))
    noise = jnp.finfo(f.dtype).eps * (max_y + jnp.max(price) * (1.0 + log_odds))
    return f, pi, price, noise


def _scale(a, tau, valid):
    """``tau + max_k spread(a_k)``: the unit of the relative residual."""
    spread_a = _masked_max(a, valid[None, :]) - _masked_min(a, valid[None, :])
    return tau + jnp.max(spread_a)


def _residual(f, valid):
    spread_f = _masked_max(f, valid[None, :]) - _masked_min(f, valid[None, :])
    return 0.5 * jnp.max(spread_f)


def _prepare(objectives, base_logits, weights, tau, valid):
    """Common input preparation of the solvers: one float dtype (at least float32), the valid
    mask and ``log pi0``. Returns ``(objectives, base_logits, weights, tau, valid, logpi0, dtype)``."""
    objectives = jnp.asarray(objectives)
    dtype = jnp.result_type(objectives.dtype, jnp.float32)
    base_logits = jnp.asarray(base_logits, dtype)
    objectives = objectives.astype(dtype)
    weights = jnp.asarray(weights, dtype)
    tau = jnp.asarray(tau, dtype)
    valid = _valid_mask(base_logits, valid)
    return objectives, base_logits, weights, tau, valid, _base_log_policy(base_logits, valid), dtype


@functools.partial(jax.jit, static_argnames=("config",))
def solve_equilibrium(
    base_logits,
    objectives,
    weights,
    tau,
    valid=None,
    init_incentives=None,
    *,
    config: SolverConfig = SolverConfig(),
) -> EquilibriumResult:
    """Equilibrium of the common-agency game at one position (Newton on the stacked FOCs).

    Pure, jitted (``config`` static) and traceable: no input validation here
    (call :func:`check_game_inputs` at the boundary, or use
    :func:`solve_equilibria`).  Batch it with ``jax.vmap``; sizes ``J`` and
    ``M`` are static.

    One Newton step from ``Y`` (``F_k`` the FOC residuals, ``pi`` the agent's
    response, ``r = pi / pi0``, ``s = r / (r + J)``):

        Delta = clip(s (lambda - sum_k F_k), +-max_log_step tau),  lambda: <pi, Delta> = 0
        Y_k  <- normalise(Y_k - F_k + (Delta + sum_j F_j) / J)
              = normalise(w_k Q_k + (S + Delta - sum_j w_j Q_j) / J)

    (unclipped, this is exactly Newton's step ``delta_k = -F_k - Delta / r`` up
    to gauge constants; the clip is a per-token trust region).

    Args:
      base_logits: float ``[M]``, ``log pi0`` up to a constant, ``-inf`` masks.
      objectives: float ``[J, M]``, ``Q``.
      weights: float ``[J]``, ``w >= 0``.
      tau: float ``[]``, ``> 0``.
      valid: optional bool ``[M]`` (at least one valid token).
      init_incentives: optional float ``[J, M]`` starting profile (default 0,
        i.e. the agent starts at ``pi0``); any finite profile converges to the
        same equilibrium.
      config: static :class:`SolverConfig`.

    Returns:
      :class:`EquilibriumResult`.
    """
    objectives, base_logits, weights, tau, valid, logpi0, dtype = _prepare(objectives, base_logits, weights,
                                                                           tau, valid)
    num_principals, _ = objectives.shape
    pi0 = jnp.where(valid, jnp.exp(logpi0), 0.0)
    a = _values(objectives, weights, valid)
    if init_incentives is None:
        y0 = jnp.zeros_like(objectives)
    else:
        y0 = jnp.asarray(init_incentives, dtype)
    y0 = _normalise(y0, pi0, valid)
    scale = _scale(a, tau, valid)

    def measure(y):
        f, pi, price, noise = _foc(y, a, logpi0, tau, valid)
        # the residual cannot go below the rounding noise of F: stop there too
        tol = jnp.maximum(config.tol, 4.0 * noise / scale)
        return _residual(f, valid) / scale, tol, pi, price

    def cond(state):
        it, res, tol, prev_res, clipped = state[1:6]
        # stop at tol, or at the rounding floor once full Newton steps stop gaining
        stalled = (res <= tol) & (res > 0.5 * prev_res) & ~clipped
        return (it < config.max_iters) & (res > config.tol) & ~stalled

    def body(state):
        y, it, res, _, _, _, pi, price = state
        s = jnp.where(valid, tau / (tau + num_principals * price), 0.0)  # r / (r + J)
        # s * sum_k F_k without overflow: sum F = (S - sum a) - J tau / r and
        # s * J tau / r = tau (1 - s).
        sum_y, sum_a = jnp.sum(y, axis=0), jnp.sum(a, axis=0)
        s_sum_f = jnp.where(valid, s * (sum_y - sum_a) - tau * (1.0 - s), 0.0)
        lam = jnp.sum(pi * s_sum_f) / jnp.sum(pi * s)
        delta = s * lam - s_sum_f  # aggregate Newton step, <pi, Delta> = 0
        # Trust region: each token's incentive log-odds S_i / tau moves by at
        # most max_log_step (so log r_i moves by at most twice that).
        clipped = jnp.any(jnp.abs(delta) > config.max_log_step * tau)
        delta = jnp.clip(delta, -config.max_log_step * tau, config.max_log_step * tau)
        # Exact Newton for the principals' differences, the (clipped) aggregate
        # step shared equally: Y_k - F_k + (Delta + sum F) / J, with the tau / r
        # terms cancelled exactly.
        y_next = _normalise(a + ((sum_y + delta - sum_a) / num_principals)[None, :], pi0, valid)
        res_next, tol_next, pi_next, price_next = measure(y_next)
        return y_next, it + 1, res_next, tol_next, res, clipped, pi_next, price_next

    res0, tol0, pi_init, price_init = measure(y0)
    init = (
        y0, jnp.asarray(0, jnp.int32), res0, tol0, jnp.asarray(jnp.inf, dtype), jnp.asarray(True), pi_init, price_init
    )
    y, iters, res, tol = jax.lax.while_loop(cond, body, init)[:4]
    logpi = _log_policy(logpi0, jnp.sum(y, axis=0), tau, valid)
    policy = jnp.where(valid, jnp.exp(logpi), 0.0)
    finite = jnp.all(jnp.isfinite(y)) & jnp.all(jnp.isfinite(policy)) & jnp.isfinite(res)
    return EquilibriumResult(
        policy=policy,
        log_policy=logpi,
        incentives=y,
        iterations=iters,
        residual=res,
        converged=finite & (res <= tol),
    )


@functools.partial(jax.jit, static_argnames=("config", "chunk_size"))
def _solve_batch(base_logits, objectives, weights, tau, valid, init_incentives, config, chunk_size):
    def fn(args):
        return solve_equilibrium(*args, config=config)

    args = (base_logits, objectives, weights, tau, valid, init_incentives)
    if chunk_size is None or chunk_size >= base_logits.shape[0]:
        return jax.vmap(fn)(args)
    return jax.lax.map(fn, args, batch_size=chunk_size)


def solve_equilibria(
    base_logits,
    objectives,
    weights,
    tau,
    valid=None,
    init_incentives=None,
    *,
    config: SolverConfig = SolverConfig(),
    chunk_size: int | None = 256,
) -> EquilibriumResult:
    """Validated, jitted and vmapped :func:`solve_equilibrium` over ``P`` positions.

    Positions are solved ``chunk_size`` at a time (``lax.map`` over vmapped
    chunks): the working set stays in cache and each chunk's Newton loop
    stops when its own slowest position converges (2-3x faster than one vmap
    at ``P = 2^14..2^16`` on CPU).  ``None`` vmaps the whole batch at once.

    Args:
      base_logits: float ``[P, M]``.
      objectives: float ``[P, J, M]``.
      weights: float ``[J]`` (shared) or ``[P, J]``.
      tau: float scalar or ``[P]``.
      valid: optional bool ``[P, M]``.
      init_incentives: optional float ``[P, J, M]``.
      config: static :class:`SolverConfig`.
      chunk_size: static positive int or ``None``.

    Returns:
      :class:`EquilibriumResult` with a leading ``[P]`` axis.

    Raises:
      GameInputError (a ValueError): naming the field, for bad shapes or values (see
        :func:`check_game_inputs`).  One compile per ``(P, J, M, dtype, config)``.
    """
    check_game_inputs(base_logits, objectives, weights, tau, valid, batched=True)
    objectives = jnp.asarray(objectives)
    dtype = jnp.result_type(objectives.dtype, jnp.float32)
    num_positions, num_principals, num_tokens = objectives.shape
    weights = jnp.broadcast_to(jnp.asarray(weights, dtype), (num_positions, num_principals))
    tau = jnp.broadcast_to(jnp.asarray(tau, dtype), (num_positions,))
    base_logits = jnp.asarray(base_logits, dtype)
    valid = jnp.ones((num_positions, num_tokens), bool) if valid is None else jnp.asarray(valid, bool)
    if init_incentives is None:
        init_incentives = jnp.zeros((num_positions, num_principals, num_tokens), dtype)
    else:
        init_incentives = jnp.asarray(init_incentives, dtype)
        if init_incentives.shape != objectives.shape:
            raise GameInputError(
                f"init_incentives: shape {init_incentives.shape} must equal objectives' {objectives.shape}",
                field="init_incentives",
            )
    bad_chunk = isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    if chunk_size is not None and bad_chunk:
        raise GameInputError(
            f"chunk_size: must be a positive int or None, got {chunk_size!r}",
            field="chunk_size",
        )
    return _solve_batch(
        base_logits, objectives.astype(dtype), weights, tau, valid, init_incentives, config, chunk_size
    )


# ----------------------------------------------------------------------------
# the limited-liability variant (Y_k >= 0)


def limited_liability_welfare(log_policy, base_logits, objectives, weights, tau, valid=None):
    """``<pi, Q^T w> - tau KL(pi || pi0) - c_min(pi)``, ``c_min(pi) = tau max_i log(pi0_i / pi_i)``.

    The welfare maximised by the ``J = 1`` equilibrium of the limited-liability
    game (:func:`solve_limited_liability`); ``c_min`` is the least constant
    that keeps the single principal's incentive ``tau log(pi / pi0) + c``
    nonnegative.  (For ``J >= 2`` no such welfare is known; see the module
    docstring.)

    Returns:
      float ``[]``.
    """
    valid = _valid_mask(base_logits, valid)
    logpi0 = _base_log_policy(base_logits, valid)
    logpi = jnp.where(valid, log_policy, 0.0)
    pi = jnp.where(valid, jnp.exp(log_policy), 0.0)
    value = jnp.sum(pi * (weights @ jnp.where(valid[None, :], objectives, 0.0)))
    kl_forward = jnp.sum(jnp.where(pi > 0, pi * (logpi - logpi0), 0.0))
    c_min = tau * _masked_max(logpi0 - logpi, valid)
    return value - tau * kl_forward - c_min


@functools.partial(jax.jit, static_argnames=("config",))
def solve_limited_liability(
    base_logits,
    objectives,
    weights,
    tau,
    valid=None,
    init_thresholds=None,
    *,
    config: SolverConfig = SolverConfig(),
) -> EquilibriumResult:
    """Equilibrium of the limited-liability game (``Y_k >= 0``) at one position.

    Same agent and payoffs as :func:`solve_equilibrium` but each principal's
    incentives are constrained to ``Y_k >= 0`` instead of ``<pi0, Y_k> = 0``.
    The KKT conditions of principal ``k``'s best response (a concave problem
    in the policy it induces) are the truthful threshold contract

        Y_k = (a_k - u_k)_+,   u_k = tau + <pi, min(a_k, u_k)>   (= tau + U_k),

    and ``u_k -> u_k - tau - <pi, min(a_k, u_k)>`` is nondecreasing in ``u_k``
    with a sign change on ``[min a_k + tau, max a_k + tau]``.  The solver is
    Gauss-Seidel diagonalisation: each sweep gives every principal in turn
    its exact best response (bisection for ``u_k``, the others fixed) until
    the thresholds stop moving.  Uniqueness is observed (tests), not proved.

    Args:
      as :func:`solve_equilibrium`; ``init_thresholds``: optional float ``[J]``
      (default ``max_i a_ki + tau``, i.e. no principal pays).
      ``config.max_iters`` caps the sweeps; ``config.tol`` is the relative
      threshold change that stops them.

    Returns:
      :class:`EquilibriumResult` with ``incentives = (a_k - u_k)_+ >= 0`` (min
      0 over valid tokens) and ``residual = max_k |u_k - tau - U_k|`` over
      ``tau + max_k spread(a_k)``.
    """
    objectives, base_logits, weights, tau, valid, logpi0, dtype = _prepare(objectives, base_logits, weights,
                                                                           tau, valid)
    num_principals, _ = objectives.shape
    a = _values(objectives, weights, valid)
    lo = _masked_min(a, valid[None, :]) + tau  # [J]
    hi = _masked_max(a, valid[None, :]) + tau
    scale = _scale(a, tau, valid)
    num_bisect = int(jnp.finfo(dtype).nmant) + 12

    def contracts(u):
        return jnp.where(valid[None, :], jnp.maximum(a - u[:, None], 0.0), 0.0)

    def gap(u_k, k, others):
        """``u_k - tau - <pi, min(a_k, u_k)>`` with the others' incentives fixed."""
        y_k = jnp.where(valid, jnp.maximum(a[k] - u_k, 0.0), 0.0)
        pi = jnp.exp(_log_policy(logpi0, others + y_k, tau, valid))
        return u_k - tau - jnp.sum(jnp.where(valid, pi * jnp.minimum(a[k], u_k), 0.0))

    def best_response(k, u):
        others = jnp.sum(contracts(u), axis=0) - contracts(u)[k]

        def bisect(_, bracket):
            left, right = bracket
            mid = 0.5 * (left + right)
            up = gap(mid, k, others) > 0
            return jnp.where(up, left, mid), jnp.where(up, mid, right)

        left, right = jax.lax.fori_loop(0, num_bisect, bisect, (lo[k], hi[k]))
        return u.at[k].set(0.5 * (left + right))

    def sweep(u):
        return jax.lax.fori_loop(0, num_principals, best_response, u)

    def residual(u):
        total = jnp.sum(contracts(u), axis=0)
        gaps = jax.vmap(lambda k: gap(u[k], k, total - contracts(u)[k]))(jnp.arange(num_principals))
        return jnp.max(jnp.abs(gaps)) / scale

    u0 = hi if init_thresholds is None else jnp.clip(jnp.asarray(init_thresholds, dtype), lo, hi)

    def cond(state):
        _, it, change = state
        return (it < config.max_iters) & (change > config.tol)

    def body(state):
        u, it, _ = state
        u_next = sweep(u)
        return u_next, it + 1, jnp.max(jnp.abs(u_next - u)) / scale

    u, iters, _ = jax.lax.while_loop(cond, body, (u0, jnp.asarray(0, jnp.int32), jnp.asarray(jnp.inf, dtype)))
    y = contracts(u)
    logpi = _log_policy(logpi0, jnp.sum(y, axis=0), tau, valid)
    policy = jnp.where(valid, jnp.exp(logpi), 0.0)
    res = residual(u)
    floor = 8 * jnp.finfo(dtype).eps * (1.0 + jnp.max(jnp.abs(a)) / scale)
    finite = jnp.all(jnp.isfinite(y)) & jnp.all(jnp.isfinite(policy)) & jnp.isfinite(res)
    return EquilibriumResult(
        policy=policy,
        log_policy=logpi,
        incentives=y,
        iterations=iters,
        residual=res,
        converged=finite & (res <= jnp.maximum(config.tol, floor)),
    )
