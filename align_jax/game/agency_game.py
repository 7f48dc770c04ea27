r"""CAGE, part 1: the common-agency game ``G_ref``, its welfare and closed form.

One decoding position is a game between one agent (the LLM) and ``J``
principals (alignment objectives) over ``M`` candidate tokens (the base
model's top-M).  Shapes: ``J`` principals, ``M`` candidate tokens, ``P``
positions in a batch.  The EPEC solver and the limited-liability variant live
in :mod:`align_jax.game.agency_solver`, the decoding baselines and boundary
checks in :mod:`align_jax.game.agency_baselines`;
:mod:`align_jax.game.common_agency` re-exports all of them.

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
2. Limited liability ``Y_k >= 0`` (Bernheim and Whinston's menu auctions),
   a different game: see :mod:`align_jax.game.agency_solver`.

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
        working dtype (see ``agency_solver._foc``); it matters only in float32
        when incentives are large in units of ``tau`` (e.g. ``tau = 1e-3`` or
        weights ``1e3``).
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
