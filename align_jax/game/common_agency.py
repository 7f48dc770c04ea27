r"""CAGE: the common-agency game over candidate tokens and its EPEC solver.

One decoding position is a game between one agent (the LLM) and ``J``
principals (alignment objectives) over ``M`` candidate tokens (the base
model's top-M).  Shapes: ``J`` principals, ``M`` candidate tokens, ``P``
positions in a batch.

The game (``G_ref``, the one implemented here)
----------------------------------------------
Inputs: base policy ``pi0 [M]`` (given as logits ``log pi0`` up to a constant;
``-inf`` or ``valid=False`` marks a masked token, which gets probability 0 and
is ignored everywhere), objective values ``Q [J, M]``, trade-off weights
``w [J] >= 0`` and a temperature ``tau > 0``.  Write ``a_k = w_k Q_k`` for
principal ``k``'s value of each token and ``S = sum_k Y_k``.

* Principal ``k`` offers incentives ``Y_k [M]``, normalised by
  ``<pi0, Y_k> = 0`` (it may tax tokens, not only reward them).
* The agent maximises ``<pi, S> - tau KL(pi || pi0)``, so it answers
  ``pi*(Y) = softmax(log pi0 + S / tau)``.  We write ``r = pi / pi0``.
* Principal ``k`` pays its incentive on the token the agent picks:
  ``U_k(Y) = w_k <pi*(Y), Q_k> - <pi*(Y), Y_k>``.

Why a normalisation is needed, and which one.  ``pi*`` is unchanged when a
constant is added to ``Y_k``, but the payment is not: without a constraint a
principal lowers its constant without bound and no equilibrium exists.  The
two classical choices give different games:

1. ``<pi0, Y_k> = 0`` (used here).  On this set ``<pi, Y_k> = <pi - pi0, Y_k>``:
   the principal pays for the change of the agent's behaviour it buys, and
   constants become payoff-irrelevant, so the normalisation is a pure gauge
   of the baseline-subtracted game ``U_k = <pi, a_k> - <pi - pi0, Y_k>``.
2. Limited liability ``Y_k >= 0`` (Bernheim and Whinston's menu auctions).
   Its first-order conditions give truthful threshold contracts
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

Derivation for ``G_ref``.  Fix ``Y_{-k}`` and let principal ``k`` choose the
policy it induces: ``Y_k = tau log r - S_{-k} + c`` with ``c`` set by the
normalisation.  Its payoff becomes

    U_k(pi) = <pi, a_k + S_{-k}> - tau KL(pi||pi0) - tau KL(pi0||pi) - <pi0, S_{-k}>,

strictly concave in ``pi``, so the first-order condition characterises the
best response.  In incentive coordinates it reads (gauge constants ``c_k``)

    Y_k = a_k + tau / r + c_k            (truthful up to a term common to all k)

i.e. every principal's schedule reports its own value ``a_k`` plus the common
"price of moving the agent" ``tau pi0 / pi`` -- the token-level analogue of
Bernheim-Whinston truthful schedules; incentives differ across principals
exactly by ``a_k - a_j`` (plus constants).  Summing over ``k`` and inserting
the agent's response ``tau log r = S - tau log Z``:

    tau log r_i - J tau / r_i = (Q^T w)_i - nu            for every valid i,

which is the stationarity condition of the **welfare**

    W(pi) = <pi, Q^T w> - tau KL(pi || pi0) - J tau KL(pi0 || pi)

on the simplex.  ``W`` is strictly concave, so the equilibrium policy exists
and is unique, and it is ``argmax W``; the normalised incentives are then
unique too (``Y_k = a_k + tau / r + c_k``).  For ``J = 1`` this is
``<pi, a> - tau KL(pi||pi0) - tau KL(pi0||pi)``.  The cost term is ``J c(pi)`` with
``c(pi) = tau KL(pi0 || pi)``: each principal's price of suppressing tokens
the base model likes (``tau / r_i`` per unit of ``pi_i``).  Compared with the
review's ``<pi, Qw> - J tau KL(pi||pi0) - J c_min(pi)``, the forward-KL factor
is 1 here (the agent bears it once) and the per-principal cost is the reverse
KL instead of ``c_min``.  Consequences worth knowing: ``w = 0`` gives
``pi0``; a principal with ``w_k = 0`` is not neutral (it adds
``tau KL(pi0||pi)``: it earns ``tau chi^2(pi0||pi) >= 0`` by selling
counter-steering); ``tau -> 0`` approaches the argmax of ``Q^T w``.

Closed form.  With ``L_i = log J - ((Q^T w)_i - nu) / tau`` the token equation
is ``omega + log omega = L_i`` for ``omega = J / r_i``, i.e.
``r_i = J / omega(L_i)`` with Wright's omega function, and the scalar ``nu``
solves ``sum_i pi0_i r_i = 1`` (monotone; bracket
``[min Qw + J tau, max Qw + J tau]``).  :func:`welfare_maximizer`.

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

Baselines on the same inputs: :func:`linear_mixing_logits`
(``log pi0 + Q^T w / tau``, multi-objective decoding) and
:func:`reward_guided_logits` / :func:`reward_guided_choice` (ARGS-style
``log pi0 + beta Q^T w`` over the top-M, argmax or sampled).

Boundary checks (host side, before compilation): :func:`check_game_inputs`
and :func:`check_top_m`; :func:`solve_equilibria` calls the former.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.game.types import GameInputError

__all__ = [
    "SolverConfig",
    "EquilibriumResult",
    "agent_response",
    "principal_utilities",
    "principal_gradients",
    "equilibrium_incentives",
    "welfare",
    "welfare_maximizer",
    "wright_omega_log",
    "solve_equilibrium",
    "solve_equilibria",
    "solve_limited_liability",
    "limited_liability_welfare",
    "linear_mixing_logits",
    "reward_guided_logits",
    "reward_guided_choice",
    "check_game_inputs",
    "check_top_m",
]


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """Static settings of the EPEC solver (hashable; a static ``jit`` argument).

    Attributes:
      max_iters: iteration cap of the Newton loop.
      tol: stop when :attr:`EquilibriumResult.residual` (relative, see there)
        is ``<= tol``.  ``1e-5`` suits float32; use ``1e-10`` in float64.
      max_log_step: per-token trust region, the largest change of a token's
        total incentive in units of ``tau`` (its log-odds ``S_i / tau``) in one
        Newton step.
    """

    max_iters: int = 200
    tol: float = 1e-5
    max_log_step: float = 3.0

    def __post_init__(self):
        if int(self.max_iters) < 1:
            raise GameInputError(
                f"SolverConfig.max_iters must be >= 1, got {self.max_iters}",
                field="SolverConfig.max_iters",
            )
        if not (float(self.tol) > 0 and math.isfinite(self.tol)):
            raise GameInputError(
                f"SolverConfig.tol must be a positive finite number, got {self.tol}",
                field="SolverConfig.tol",
            )
        if not (float(self.max_log_step) > 0 and math.isfinite(self.max_log_step)):
            raise GameInputError(
                f"SolverConfig.max_log_step must be a positive finite number, got {self.max_log_step}",
                field="SolverConfig.max_log_step",
            )


class EquilibriumResult(NamedTuple):
    """Output of :func:`solve_equilibrium` (leading ``[P]`` axis when batched).

    Attributes:
      policy: float ``[M]``, the agent's equilibrium policy ``pi*(Y)`` (0 on
        masked tokens).
      log_policy: float ``[M]``, its log (``-inf`` on masked tokens).
      incentives: float ``[J, M]``, ``Y_k`` with ``<pi0, Y_k> = 0`` (0 on masked
        tokens).
      iterations: int32 ``[]``, Newton steps taken.
      residual: float ``[]``, ``max_k (max_i F_ki - min_i F_ki) / 2`` over valid
        tokens, divided by ``tau + max_k spread(a_k)``, where
        ``F_k = Y_k - w_k Q_k - tau pi0 / pi`` is the first-order condition in
        incentive units (zero up to a constant at the equilibrium).
      converged: bool ``[]``: everything finite and ``residual <= max(tol,
        floor)``, where ``floor`` is 4x the rounding noise of ``F`` in the
        working dtype (see ``_foc``); it matters only in float32 when incentives
        are large in units of ``tau`` (e.g. ``tau = 1e-3`` or weights ``1e3``).
    """

    policy: jax.Array
    log_policy: jax.Array
    incentives: jax.Array
    iterations: jax.Array
    residual: jax.Array
    converged: jax.Array


# ----------------------------------------------------------------------------
# helpers


def _exp_cap(dtype) -> float:
    """Largest exponent used for ``pi0 / pi`` (keeps products finite)."""
    return 0.6 * float(np.log(np.finfo(dtype).max))


def _valid_mask(base_logits: jax.Array, valid: jax.Array | None) -> jax.Array:
    finite = jnp.isfinite(base_logits)
    return finite if valid is None else jnp.logical_and(finite, valid)


def _base_log_policy(base_logits: jax.Array, valid: jax.Array) -> jax.Array:
    """``log pi0`` over valid tokens, 0 (not -inf) on masked ones to keep math finite."""
    z = jnp.where(valid, base_logits, -jnp.inf)
    logpi0 = jax.nn.log_softmax(z)
    return jnp.where(valid, logpi0, 0.0)


def _log_policy(logpi0: jax.Array, total_incentive: jax.Array, tau, valid: jax.Array):
    """``log softmax(log pi0 + S / tau)`` over valid tokens, ``-inf`` elsewhere."""
    z = jnp.where(valid, logpi0 + total_incentive / tau, -jnp.inf)
    return jax.nn.log_softmax(z)


def _masked_max(x, valid, axis=-1):
    return jnp.max(jnp.where(valid, x, -jnp.inf), axis=axis)


def _masked_min(x, valid, axis=-1):
    return jnp.min(jnp.where(valid, x, jnp.inf), axis=axis)


def _values(objectives: jax.Array, weights: jax.Array, valid: jax.Array) -> jax.Array:
    """``a_k = w_k Q_k`` centred per principal by its max over valid tokens.

    Shifting ``a_k`` by a constant changes neither the policy nor the
    normalised incentives; centring keeps magnitudes small in float32.
    """
    a = weights[:, None] * jnp.where(valid[None, :], objectives, 0.0)
    a = a - _masked_max(a, valid[None, :])[:, None]
    return jnp.where(valid[None, :], a, 0.0)


def _normalise(incentives, pi0, valid):
    """Project each ``Y_k`` onto ``<pi0, Y_k> = 0`` and zero masked tokens."""
    y = jnp.where(valid[None, :], incentives, 0.0)
    return jnp.where(valid[None, :], y - (y @ pi0)[:, None], 0.0)


# ----------------------------------------------------------------------------
# the game


def agent_response(base_logits, incentives, tau, valid=None):
    """The agent's KL-regularised best response ``pi*(Y)``.

    ``pi*(Y) = softmax(log pi0 + sum_k Y_k / tau)`` over valid tokens.

    Args:
      base_logits: float ``[M]``, ``log pi0`` up to a constant (``-inf`` masks).
      incentives: float ``[J, M]``.
      tau: float ``[]``, ``> 0``.
      valid: optional bool ``[M]``.

    Returns:
      float ``[M]`` log-policy (``-inf`` on masked tokens).
    """
    valid = _valid_mask(base_logits, valid)
    logpi0 = _base_log_policy(base_logits, valid)
    return _log_policy(logpi0, jnp.sum(incentives, axis=0), tau, valid)


def principal_utilities(base_logits, objectives, weights, incentives, tau, valid=None):
    """Each principal's payoff ``U_k = w_k <pi*(Y), Q_k> - <pi*(Y), Y_k>``.

    Args:
      base_logits: float ``[M]``; objectives: float ``[J, M]``; weights:
      float ``[J]``; incentives: float ``[J, M]``; tau: float ``[]``; valid:
      optional bool ``[M]``.

    Returns:
      float ``[J]``.  Equal to ``<pi, a_k> - <pi - pi0, Y_k>`` when the
      incentives satisfy the normalisation ``<pi0, Y_k> = 0``.
    """
    valid = _valid_mask(base_logits, valid)
    pi = jnp.exp(agent_response(base_logits, incentives, tau, valid))
    q = jnp.where(valid[None, :], objectives, 0.0)
    y = jnp.where(valid[None, :], incentives, 0.0)
    return weights * (q @ pi) - y @ pi


def principal_gradients(base_logits, objectives, weights, incentives, tau, valid=None):
    """Each principal's gradient of its own payoff w.r.t. its own incentives.

    ``g_k = d U_k / d Y_k`` (others held fixed), projected onto the tangent
    space ``{d : <pi0, d> = 0}`` of the normalisation, computed with
    ``jax.grad``.  Zero at an equilibrium (first-order conditions).

    Returns:
      float ``[J, M]`` (0 on masked tokens).
    """
    valid = _valid_mask(base_logits, valid)
    pi0 = jnp.exp(jnp.where(valid, _base_log_policy(base_logits, valid), -jnp.inf))
    num_principals = incentives.shape[0]

    def own(k):
        def u(y_k):
            y = incentives.at[k].set(y_k)
            return principal_utilities(base_logits, objectives, weights, y, tau, valid)[k]

        return jax.grad(u)(incentives[k])

    grads = jnp.stack([own(k) for k in range(num_principals)])
    grads = jnp.where(valid[None, :], grads, 0.0)
    return grads - (grads @ pi0)[:, None] * pi0[None, :] / jnp.sum(pi0 * pi0)


def welfare(log_policy, base_logits, objectives, weights, tau, valid=None):
    """The welfare whose maximiser is the equilibrium policy of ``G_ref``.

    ``W(pi) = <pi, Q^T w> - tau KL(pi || pi0) - J tau KL(pi0 || pi)``.

    Args:
      log_policy: float ``[M]`` (``-inf`` allowed on masked tokens).
      base_logits, objectives ``[J, M]``, weights ``[J]``, tau ``[]``, valid.

    Returns:
      float ``[]`` (``-inf`` if ``pi`` puts no mass where ``pi0`` does).
    """
    valid = _valid_mask(base_logits, valid)
    logpi0 = _base_log_policy(base_logits, valid)
    pi0 = jnp.where(valid, jnp.exp(logpi0), 0.0)
    logpi = jnp.where(valid, log_policy, 0.0)
    pi = jnp.where(valid, jnp.exp(log_policy), 0.0)
    value = jnp.sum(pi * (weights @ jnp.where(valid[None, :], objectives, 0.0)))
    kl_forward = jnp.sum(jnp.where(pi > 0, pi * (logpi - logpi0), 0.0))
    kl_reverse = jnp.sum(pi0 * (logpi0 - jnp.where(valid, log_policy, 0.0)))
    num_principals = objectives.shape[0]
    return value - tau * kl_forward - num_principals * tau * kl_reverse


def wright_omega_log(z: jax.Array, num_steps: int = 8) -> jax.Array:
    """``log omega(z)`` for Wright's omega function, ``omega + log omega = z``.

    Solves ``exp(t) + t = z`` for ``t`` by Newton's method started right of
    the root (``t0 = log z`` for ``z > 1``, else ``t0 = z``); the function is
    convex and increasing, so the iterates decrease monotonically to the
    root with no overshoot.  Finite for every finite ``z``.

    Args:
      z: float array, any shape.
      num_steps: Newton steps (8 gives float64 accuracy on the whole line).

    Returns:
      ``t = log omega(z)``, same shape.
    """
    t = jnp.where(z > 1.0, jnp.log(jnp.maximum(z, 1.0)), z)

    def body(_, t):
        e = jnp.exp(jnp.minimum(t, z))  # exp(t) <= exp(z) right of the root's range
        return t - (e + t - z) / (e + 1.0)

    return jax.lax.fori_loop(0, num_steps, body, t)


@functools.partial(jax.jit, static_argnames=("num_steps",))
def welfare_maximizer(base_logits, objectives, weights, tau, valid=None, *, num_steps: int = 100):
    """Closed-form ``argmax W`` (the equilibrium policy), via Wright's omega.

    ``r_i = pi_i / pi0_i = J / omega(L_i)``, ``L_i = log J - ((Q^T w)_i - nu) / tau``,
    with the scalar ``nu`` found by safeguarded Newton (bisection fallback)
    on ``phi(nu) = log sum_i pi0_i r_i(nu) = 0`` inside the bracket
    ``[min_i (Q^T w)_i + J tau, max_i (Q^T w)_i + J tau]``.

    Args:
      base_logits: float ``[M]``; objectives: float ``[J, M]``; weights:
        float ``[J]``; tau: float ``[]``; valid: optional bool ``[M]``.
      num_steps: cap on the scalar root-finding iterations.

    Returns:
      float ``[M]`` log-policy (``-inf`` on masked tokens).
    """
    valid = _valid_mask(base_logits, valid)
    logpi0 = _base_log_policy(base_logits, valid)
    num_principals = objectives.shape[0]
    log_j = jnp.log(jnp.asarray(num_principals, dtype=logpi0.dtype))
    value = jnp.sum(_values(objectives, weights, valid), axis=0)  # Q^T w, shifted
    jt = num_principals * tau

    def log_ratio(nu):
        t = wright_omega_log(log_j - (value - nu) / tau)
        return log_j - t, t

    def phi(nu):
        x, t = log_ratio(nu)
        z = jnp.where(valid, logpi0 + x, -jnp.inf)
        lse = jax.scipy.special.logsumexp(z)
        pi = jnp.exp(z - lse)
        # d phi / d nu = -<pi, 1 / (tau (1 + omega))>
        dphi = -jnp.sum(pi / (tau * (1.0 + jnp.exp(t))))
        return lse, dphi

    lo = _masked_min(value, valid) + jt
    hi = _masked_max(value, valid) + jt
    eps = jnp.finfo(logpi0.dtype).eps

    def cond(state):
        i, lo, hi, _, _, best_f = state
        return (i < num_steps) & (jnp.abs(best_f) > 4 * eps) & (hi - lo > eps * (jnp.abs(hi) + jnp.abs(lo) + tau))

    def body(state):
        i, lo, hi, nu, best_nu, best_f = state
        f, df = phi(nu)
        better = jnp.abs(f) < jnp.abs(best_f)
        best_nu, best_f = jnp.where(better, nu, best_nu), jnp.where(better, f, best_f)
        lo = jnp.where(f > 0, nu, lo)  # phi decreasing: f > 0 means the root is right of nu
        hi = jnp.where(f > 0, hi, nu)
        newton = nu - f / df
        inside = (newton >= lo) & (newton <= hi) & jnp.isfinite(newton)
        nu_next = jnp.where(inside, newton, 0.5 * (lo + hi))
        return i + 1, lo, hi, nu_next, best_nu, best_f

    nu0 = 0.5 * (lo + hi)
    init = (jnp.asarray(0), lo, hi, nu0, nu0, jnp.asarray(jnp.inf, logpi0.dtype))
    _, _, _, _, nu, _ = jax.lax.while_loop(cond, body, init)
    x, _ = log_ratio(nu)
    return _log_policy(logpi0, tau * x, tau, valid)


def equilibrium_incentives(log_policy, base_logits, objectives, weights, tau, valid=None):
    """Each principal's equilibrium incentive for a given equilibrium policy.

    ``Y_k = w_k Q_k + tau pi0 / pi + c_k`` with ``c_k`` fixing ``<pi0, Y_k> = 0``.
    Paired with :func:`welfare_maximizer`, this gives the full equilibrium in
    closed form.

    Returns:
      float ``[J, M]`` (0 on masked tokens).
    """
    valid = _valid_mask(base_logits, valid)
    logpi0 = _base_log_policy(base_logits, valid)
    pi0 = jnp.where(valid, jnp.exp(logpi0), 0.0)
    x = jnp.where(valid, log_policy - logpi0, 0.0)
    inv_r = jnp.exp(jnp.minimum(-x, _exp_cap(x.dtype)))
    y = _values(objectives, weights, valid) + tau * inv_r[None, :]
    return _normalise(y, pi0, valid)


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
    objectives = jnp.asarray(objectives)
    dtype = jnp.result_type(objectives.dtype, jnp.float32)
    base_logits = jnp.asarray(base_logits, dtype)
    objectives = objectives.astype(dtype)
    weights = jnp.asarray(weights, dtype)
    tau = jnp.asarray(tau, dtype)
    num_principals, _ = objectives.shape
    valid = _valid_mask(base_logits, valid)
    logpi0 = _base_log_policy(base_logits, valid)
    pi0 = jnp.where(valid, jnp.exp(logpi0), 0.0)
    a = _values(objectives, weights, valid)
    log_j = jnp.log(jnp.asarray(num_principals, dtype))
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
    objectives = jnp.asarray(objectives)
    dtype = jnp.result_type(objectives.dtype, jnp.float32)
    base_logits = jnp.asarray(base_logits, dtype)
    objectives = objectives.astype(dtype)
    weights = jnp.asarray(weights, dtype)
    tau = jnp.asarray(tau, dtype)
    num_principals, _ = objectives.shape
    valid = _valid_mask(base_logits, valid)
    logpi0 = _base_log_policy(base_logits, valid)
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


# ----------------------------------------------------------------------------
# baselines


def linear_mixing_logits(base_logits, objectives, weights, tau, valid=None):
    """Linear logit mixing (multi-objective decoding): ``log softmax(log pi0 + Q^T w / tau)``.

    This is also the policy of ``G_ref`` without the principals' payment
    (the agent maximising ``<pi, Q^T w> - tau KL(pi||pi0)`` directly).

    Args:
      base_logits ``[..., M]``, objectives ``[..., J, M]``, weights ``[..., J]``,
      tau ``[...]`` (broadcastable), valid optional bool ``[..., M]``.

    Returns:
      float ``[..., M]`` log-policy (``-inf`` on masked tokens).
    """
    valid = _valid_mask(base_logits, valid)
    mix = jnp.einsum("...j,...jm->...m", weights, jnp.where(valid[..., None, :], objectives, 0.0))
    z = jnp.where(valid, base_logits + mix / jnp.asarray(tau)[..., None], -jnp.inf)
    return jax.nn.log_softmax(z, axis=-1)


def reward_guided_logits(base_logits, objectives, weights, beta, valid=None):
    """ARGS-style reward-guided scores over the top-M: ``log pi0 + beta Q^T w``.

    Returns:
      float ``[..., M]`` normalised log-probabilities of the reranked
      distribution (``-inf`` on masked tokens).
    """
    valid = _valid_mask(base_logits, valid)
    logpi0 = jax.nn.log_softmax(jnp.where(valid, base_logits, -jnp.inf), axis=-1)
    mix = jnp.einsum("...j,...jm->...m", weights, jnp.where(valid[..., None, :], objectives, 0.0))
    z = jnp.where(valid, logpi0 + jnp.asarray(beta)[..., None] * mix, -jnp.inf)
    return jax.nn.log_softmax(z, axis=-1)


def reward_guided_choice(base_logits, objectives, weights, beta, key=None, valid=None):
    """ARGS token choice: argmax of :func:`reward_guided_logits`, or a sample.

    Args:
      key: ``None`` for greedy (argmax); a PRNG key (consumed) to sample.

    Returns:
      int32 ``[...]`` index into the ``M`` candidates.
    """
    scores = reward_guided_logits(base_logits, objectives, weights, beta, valid)
    if key is None:
        return jnp.argmax(scores, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, scores, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------
# boundary checks


def check_top_m(m, vocab_size) -> int:
    """Check the number of candidate tokens ``M`` against the vocabulary size ``V``.

    Returns ``M`` as an int.  Raises :class:`GameInputError` (a ``ValueError``) naming ``top_m``.
    """
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)):
        raise GameInputError(f"top_m: must be an integer, got {m!r}", field="top_m")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise GameInputError(
            f"vocab_size: must be a positive integer, got {vocab_size!r}",
            field="vocab_size",
        )
    if m < 1:
        raise GameInputError(f"top_m: must be >= 1, got {m}", field="top_m")
    if m > vocab_size:
        raise GameInputError(
            f"top_m: {m} candidate tokens is larger than the vocabulary size {vocab_size}",
            field="top_m",
        )
    return int(m)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_game_inputs(base_logits, objectives, weights, tau, valid=None, *, batched: bool = False) -> None:
    """Validate game inputs on the host, before anything is compiled.

    Shapes (``batched=False``): base_logits ``[M]``, objectives ``[J, M]``,
    weights ``[J]``, tau scalar, valid ``[M]``.  With ``batched=True`` a
    leading ``[P]`` on base_logits/objectives/valid, weights ``[J]`` or
    ``[P, J]``, tau scalar or ``[P]``.  Value checks run only on concrete
    (non-traced) inputs.

    Raises:
      GameInputError (a ValueError, with ``.field``): naming the field: wrong shapes, the number of weights not
        equal to the number of objectives, negative / NaN / inf weights,
        ``tau <= 0`` or non-finite, NaN / inf objectives on valid tokens,
        NaN or ``+inf`` base logits, or a position with no valid token.
    """
    lead = 1 if batched else 0
    b_shape, q_shape = np.shape(base_logits), np.shape(objectives)
    w_shape, t_shape = np.shape(weights), np.shape(tau)
    if len(b_shape) != 1 + lead:
        raise GameInputError(
            f"base_logits: expected {1 + lead} dims ([{'P, ' * lead}M]), got shape {b_shape}",
            field="base_logits",
        )
    if len(q_shape) != 2 + lead:
        raise GameInputError(
            f"objectives: expected {2 + lead} dims ([{'P, ' * lead}J, M]), got shape {q_shape}",
            field="objectives",
        )
    if q_shape[-1] != b_shape[-1] or (batched and q_shape[0] != b_shape[0]):
        raise GameInputError(
            f"objectives: shape {q_shape} does not match base_logits {b_shape} (M or P differ)",
            field="objectives",
        )
    num_objectives = q_shape[-2]
    if num_objectives < 1:
        raise GameInputError("objectives: need at least one objective (J >= 1)", field="objectives")
    if len(w_shape) == 0 or w_shape[-1] != num_objectives:
        raise GameInputError(
            f"weights: {w_shape[-1] if w_shape else 'a scalar'} weight(s) given for {num_objectives} objectives",
            field="weights",
        )
    if len(w_shape) > 1 + lead or (len(w_shape) == 2 and w_shape[0] != q_shape[0]):
        raise GameInputError(
            f"weights: shape {w_shape} must be [J]{' or [P, J]' if batched else ''}",
            field="weights",
        )
    if not (len(t_shape) == 0 or (batched and t_shape == (q_shape[0],))):
        raise GameInputError(
            f"tau: shape {t_shape} must be a scalar{' or [P]' if batched else ''}",
            field="tau",
        )
    if valid is not None and np.shape(valid) != b_shape:
        raise GameInputError(
            f"valid: shape {np.shape(valid)} must equal base_logits' {b_shape}",
            field="valid",
        )

    if _is_concrete(weights):
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w)):
            raise GameInputError(f"weights: must be finite, got {w.tolist()}", field="weights")
        if np.any(w < 0):
            raise GameInputError(f"weights: must be >= 0, got {w.tolist()}", field="weights")
    if _is_concrete(tau):
        t = np.asarray(tau, dtype=np.float64)
        if not np.all(np.isfinite(t)):
            raise GameInputError(f"tau: must be finite, got {t.tolist()}", field="tau")
        if np.any(t <= 0):
            raise GameInputError(f"tau: must be > 0, got {t.tolist()}", field="tau")
    if _is_concrete(base_logits) and (valid is None or _is_concrete(valid)):
        b = np.asarray(base_logits, dtype=np.float64)
        if np.any(np.isnan(b)) or np.any(b == np.inf):
            bad = np.argwhere(np.isnan(b) | (b == np.inf))[0].tolist()
            raise GameInputError(
                f"base_logits: NaN or +inf at index {bad} (use -inf to mask a token)",
                field="base_logits",
            )
        v = np.isfinite(b) if valid is None else (np.isfinite(b) & np.asarray(valid, bool))
        if not np.all(np.any(v, axis=-1)):
            bad = np.argwhere(~np.any(v, axis=-1).reshape(-1))[0].tolist()
            raise GameInputError(
                f"base_logits/valid: position {bad} has no valid candidate token",
                field="base_logits/valid",
            )
        if _is_concrete(objectives):
            q = np.asarray(objectives, dtype=np.float64)
            bad_q = ~np.isfinite(q) & v[..., None, :]
            if np.any(bad_q):
                raise GameInputError(
                    f"objectives: NaN or inf at index {np.argwhere(bad_q)[0].tolist()}",
                    field="objectives",
                )
