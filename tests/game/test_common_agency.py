"""Tests for the CAGE common-agency game and its EPEC solver (align_jax/game/common_agency.py)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.special

from align_jax.game import common_agency as ca
from align_jax.game.types import GameInputError

M, J = 8, 3

# jitted once per module: the tests share shapes, so each compiles once
_welfare = jax.jit(ca.welfare)
_gradients = jax.jit(ca.principal_gradients)
_utilities = jax.jit(jax.vmap(ca.principal_utilities, in_axes=(None, None, None, 0, None)))


def _game(seed, m=M, j=J, scale=1.0, dirichlet=1.0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    base = np.log(rng.dirichlet(np.full(m, dirichlet))).astype(dtype)
    objectives = (rng.normal(size=(j, m)) * scale).astype(dtype)
    weights = rng.uniform(0.2, 1.5, size=j).astype(dtype)
    return base, objectives, weights


def _np_welfare(pi, pi0, qw, tau, j):
    return pi @ qw - tau * np.sum(pi * np.log(pi / pi0)) - j * tau * np.sum(pi0 * np.log(pi0 / pi))


# ---------------------------------------------------------------------------
# building blocks


def test_wright_omega_log_matches_scipy():
    z = np.concatenate([np.linspace(-60, 5, 300), np.geomspace(5, 1e8, 300)])
    with jax.enable_x64(True):
        t = np.asarray(ca.wright_omega_log(jnp.asarray(z)))
    want = np.real(scipy.special.wrightomega(z))
    np.testing.assert_allclose(np.exp(t), want, rtol=1e-12)
    # and the defining equation omega + log omega = z
    np.testing.assert_allclose(np.exp(t) + t, z, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("num_principals", [1, 3])
def test_closed_form_maximizer_matches_generic_convex_solver(num_principals):
    """argmax W: Wright-omega closed form == EPEC solver == scipy (BFGS on logits, SLSQP on the simplex)."""
    base, objectives, weights = _game(3 + num_principals, m=5, j=num_principals, dtype=np.float64)
    tau = 0.7
    pi0 = np.exp(base - scipy.special.logsumexp(base))
    qw = weights @ objectives
    with jax.enable_x64(True):
        closed = np.exp(np.asarray(ca.welfare_maximizer(base, objectives, weights, tau)))
        w_closed = float(ca.welfare(jnp.log(closed), base, objectives, weights, tau))
        solved = ca.solve_equilibrium(base, objectives, weights, tau, config=ca.SolverConfig(tol=1e-12))
    # softmax parametrisation keeps SLSQP inside the simplex; maximise W
    res = scipy.optimize.minimize(
        lambda z: -_np_welfare(scipy.special.softmax(z), pi0, qw, tau, num_principals),
        np.zeros(5),
        method="BFGS",
        options={"gtol": 1e-10},
    )
    generic = scipy.special.softmax(res.x)
    slsqp = scipy.optimize.minimize(
        lambda p: -_np_welfare(p, pi0, qw, tau, num_principals),
        pi0,
        method="SLSQP",
        bounds=[(1e-9, 1.0)] * 5,
        constraints=[{"type": "eq", "fun": lambda p: p.sum() - 1.0}],
        options={"ftol": 1e-14, "maxiter": 500},
    )
    np.testing.assert_allclose(closed, generic, atol=1e-6)
    np.testing.assert_allclose(solved.policy, generic, atol=1e-6)  # the EPEC solver, independently
    np.testing.assert_allclose(closed, slsqp.x, atol=1e-5)
    assert w_closed == pytest.approx(_np_welfare(closed, pi0, qw, tau, num_principals), rel=1e-10)
    assert w_closed >= -res.fun - 1e-10


# ---------------------------------------------------------------------------
# the equilibrium


@pytest.mark.parametrize("tau", [0.05, 1.0, 20.0])
def test_solver_equilibrium_is_welfare_maximizer(tau):
    base, objectives, weights = _game(11)
    result = ca.solve_equilibrium(base, objectives, weights, tau)
    closed = jnp.exp(ca.welfare_maximizer(base, objectives, weights, tau))
    assert bool(result.converged)
    np.testing.assert_allclose(result.policy, closed, atol=2e-6)
    np.testing.assert_allclose(jnp.sum(result.policy), 1.0, atol=1e-6)
    # the incentives equal the closed-form ones: Y_k = w_k Q_k + tau pi0/pi + c_k
    np.testing.assert_allclose(
        result.incentives,
        ca.equilibrium_incentives(result.log_policy, base, objectives, weights, tau),
        atol=2e-4 * (1 + tau),
    )


def test_solver_float64_to_tight_tolerance_and_nonjit_path_agrees():
    base, objectives, weights = _game(12, dtype=np.float64)
    tau = 0.3
    config = ca.SolverConfig(tol=1e-12)
    with jax.enable_x64(True):
        jitted = ca.solve_equilibrium(base, objectives, weights, tau, config=config)
        with jax.disable_jit():
            eager = ca.solve_equilibrium(base, objectives, weights, tau, config=config)
        closed = np.exp(np.asarray(ca.welfare_maximizer(base, objectives, weights, tau)))
    assert jitted.policy.dtype == jnp.float64
    assert bool(jitted.converged) and float(jitted.residual) <= 1e-12
    np.testing.assert_allclose(jitted.policy, closed, atol=1e-12)
    np.testing.assert_allclose(eager.policy, jitted.policy, atol=1e-13)
    np.testing.assert_allclose(eager.incentives, jitted.incentives, atol=1e-10)
    assert int(eager.iterations) == int(jitted.iterations)


def test_uniqueness_from_random_initial_incentives():
    base, objectives, weights = _game(21)
    tau = 0.4
    inits = jax.random.normal(jax.random.key(0), (32, J, M)) * 4 * tau
    config = ca.SolverConfig(tol=1e-7)
    results = jax.vmap(
        lambda y0: ca.solve_equilibrium(base, objectives, weights, tau, init_incentives=y0, config=config)
    )(inits)
    assert bool(jnp.all(results.converged))
    assert int(jnp.max(results.iterations)) > int(jnp.min(results.iterations))  # the starts really differ
    np.testing.assert_allclose(results.policy, jnp.broadcast_to(results.policy[0], results.policy.shape), atol=2e-6)
    np.testing.assert_allclose(
        results.incentives, jnp.broadcast_to(results.incentives[0], results.incentives.shape), atol=2e-5
    )
    # the starting policies were far apart
    start = jax.vmap(lambda y0: jnp.exp(ca.agent_response(base, y0, tau)))(inits)
    assert float(jnp.max(jnp.abs(start - results.policy[0]))) > 0.3


def test_first_order_conditions_hold_at_equilibrium_and_fail_elsewhere():
    base, objectives, weights = _game(31)
    tau = 0.5
    result = ca.solve_equilibrium(base, objectives, weights, tau)
    grads = _gradients(base, objectives, weights, result.incentives, tau)
    assert float(jnp.max(jnp.abs(grads))) < 2e-6
    # the test has teeth: the linear-mixing profile Y_k = w_k Q_k is not an equilibrium
    truthful = weights[:, None] * objectives
    truthful = truthful - (truthful @ jnp.exp(jax.nn.log_softmax(base)))[:, None]
    assert float(jnp.max(jnp.abs(_gradients(base, objectives, weights, truthful, tau)))) > 1e-2


def test_no_profitable_unilateral_deviation():
    """Nash check: random normalised deviations of one principal never raise its payoff."""
    base, objectives, weights = _game(41, dtype=np.float64)
    tau = 0.8
    with jax.enable_x64(True):
        result = ca.solve_equilibrium(base, objectives, weights, tau, config=ca.SolverConfig(tol=1e-12))
        pi0 = np.exp(np.asarray(jax.nn.log_softmax(jnp.asarray(base, jnp.float64))))
        payoff = ca.principal_utilities(base, objectives, weights, result.incentives, tau)
        rng = np.random.default_rng(0)
        for k in range(J):
            for size in (1e-3, 0.1, 3.0):
                d = rng.normal(size=(64, M)) * size
                d -= (d @ pi0)[:, None]  # stay on <pi0, Y_k> = 0
                deviated = jnp.asarray(result.incentives)[None].repeat(64, 0).at[:, k].add(d)
                u = _utilities(base, objectives, weights, deviated, tau)
                assert float(jnp.max(u[:, k] - payoff[k])) <= 1e-12


def test_truthful_structure_and_normalisation():
    base, objectives, weights = _game(51)
    tau = 0.6
    result = ca.solve_equilibrium(base, objectives, weights, tau)
    pi0 = jnp.exp(jax.nn.log_softmax(base))
    np.testing.assert_allclose(result.incentives @ pi0, 0.0, atol=1e-5)
    # Y_k - Y_j = w_k Q_k - w_j Q_j + const
    a = weights[:, None] * objectives
    diff = (result.incentives[0] - result.incentives[1]) - (a[0] - a[1])
    np.testing.assert_allclose(diff - diff.mean(), 0.0, atol=1e-4)
    # baseline-subtracted payoff equals pay-on-pick payoff on the normalised set
    pi = result.policy
    u = ca.principal_utilities(base, objectives, weights, result.incentives, tau)
    np.testing.assert_allclose(u, a @ pi - result.incentives @ (pi - pi0), atol=1e-5)


def test_welfare_properties_and_limits():
    base, objectives, weights = _game(61)
    pi0 = jnp.exp(jax.nn.log_softmax(base))
    # zero weights: the equilibrium is pi0
    zero = ca.solve_equilibrium(base, objectives, jnp.zeros(J), 1.0)
    np.testing.assert_allclose(zero.policy, pi0, atol=1e-6)
    np.testing.assert_allclose(zero.incentives, 0.0, atol=1e-6)
    # huge tau: back to pi0; tiny tau: argmax of Q^T w
    big = ca.solve_equilibrium(base, objectives, weights, 1e3)
    assert float(jnp.max(jnp.abs(big.policy - pi0))) < 5e-3
    small = ca.solve_equilibrium(base, objectives, weights, 1e-3)
    assert int(jnp.argmax(small.policy)) == int(jnp.argmax(weights @ objectives))
    assert float(jnp.max(small.policy)) > 0.99
    # the equilibrium beats linear mixing and random policies on W
    tau = 0.5
    eq = ca.solve_equilibrium(base, objectives, weights, tau)
    w_eq = _welfare(eq.log_policy, base, objectives, weights, tau)
    others = [ca.linear_mixing_logits(base, objectives, weights, tau)]
    others += [jax.nn.log_softmax(jax.random.normal(jax.random.key(i), (M,)) * 2) for i in range(20)]
    for lp in others:
        assert float(_welfare(lp, base, objectives, weights, tau)) < float(w_eq)
    # more principals => stronger pull to pi0 (J tau KL(pi0 || pi)); a zero-weight
    # principal is not neutral
    extra = ca.solve_equilibrium(
        base, jnp.concatenate([objectives, objectives[:1]]), jnp.concatenate([weights, jnp.zeros(1)]), tau
    )
    kl = lambda p: float(jnp.sum(pi0 * (jnp.log(pi0) - jnp.log(p))))
    assert kl(extra.policy) < kl(eq.policy)


# ---------------------------------------------------------------------------
# numerics at the extremes


PEAKED = np.full(M, 1e-12 / (M - 1))
PEAKED[2] = 1.0 - 1e-12


@pytest.mark.parametrize("tau", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("weights", [[0.0, 0.0, 0.0], [1e3, 0.0, 1.0], [1e3, 1e3, 1e3]])
@pytest.mark.parametrize("base_kind", ["dirichlet", "peaked", "masked"])
def test_no_nan_at_extremes(tau, weights, base_kind):
    base, objectives, _ = _game(71)
    valid = np.ones(M, bool)
    if base_kind == "peaked":
        base = np.log(PEAKED).astype(np.float32)
    elif base_kind == "masked":
        base = base.copy()
        base[:3] = -np.inf  # pi0 with zeros
        valid[5] = False  # and an explicit mask
    weights = np.asarray(weights, np.float32)
    result = ca.solve_equilibria(base[None], objectives[None], weights, tau, valid[None])
    closed = jnp.exp(ca.welfare_maximizer(base, objectives, weights, tau, valid))
    mask = valid & np.isfinite(base)
    for leaf in (result.policy, result.incentives, result.residual):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    assert bool(result.converged[0])
    assert float(jnp.sum(result.policy)) == pytest.approx(1.0, abs=1e-5)
    assert float(jnp.sum(jnp.abs(jnp.where(mask, 0.0, result.policy[0])))) == 0.0
    assert bool(jnp.all(jnp.isfinite(closed)))
    np.testing.assert_allclose(result.policy[0], closed, atol=1e-4)


def test_vmapped_batch_equals_per_item():
    games = [_game(80 + i) for i in range(6)]
    base = np.stack([g[0] for g in games])
    objectives = np.stack([g[1] for g in games])
    weights = np.stack([g[2] for g in games])
    taus = np.array([0.01, 0.1, 0.5, 1.0, 4.0, 50.0], np.float32)
    batch = ca.solve_equilibria(base, objectives, weights, taus)
    chunked = ca.solve_equilibria(base, objectives, weights, taus, chunk_size=4)  # 4 + a remainder of 2
    np.testing.assert_array_equal(chunked.iterations, batch.iterations)
    np.testing.assert_allclose(chunked.policy, batch.policy, atol=2e-6)
    for i in range(len(games)):
        single = ca.solve_equilibrium(base[i], objectives[i], weights[i], float(taus[i]))
        # same algorithm, same iterations; only float32 op ordering differs
        np.testing.assert_allclose(batch.policy[i], single.policy, atol=2e-6)
        np.testing.assert_allclose(batch.incentives[i], single.incentives, atol=2e-5 * (1 + taus[i]))
        assert abs(int(batch.iterations[i]) - int(single.iterations)) <= 1
        assert bool(batch.converged[i]) and bool(single.converged)


def test_no_retrace_on_second_call():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def solve(base, objectives, weights, tau):
        return jax.vmap(lambda b, q: ca.solve_equilibrium(b, q, weights, tau))(base, objectives)

    chex.clear_trace_counter()
    b1, q1, w1 = _game(90)
    b2, q2, w2 = _game(91)
    first = solve(b1[None], q1[None], w1, 0.5)
    second = solve(b2[None], q2[None], w2, 2.0)  # new values, same shapes: no retrace
    assert not np.allclose(first.policy, second.policy)


# ---------------------------------------------------------------------------
# baselines


def test_linear_mixing_and_reward_guided_baselines():
    base, objectives, weights = _game(101)
    tau, beta = 0.7, 2.0
    pi0 = scipy.special.softmax(base.astype(np.float64))
    qw = weights.astype(np.float64) @ objectives
    want_mix = scipy.special.log_softmax(np.log(pi0) + qw / tau)
    np.testing.assert_allclose(ca.linear_mixing_logits(base, objectives, weights, tau), want_mix, atol=1e-5)
    want_args = scipy.special.log_softmax(np.log(pi0) + beta * qw)
    np.testing.assert_allclose(ca.reward_guided_logits(base, objectives, weights, beta), want_args, atol=1e-5)
    assert int(ca.reward_guided_choice(base, objectives, weights, beta)) == int(np.argmax(want_args))
    samples = jax.vmap(lambda k: ca.reward_guided_choice(base, objectives, weights, beta, key=k))(
        jax.random.split(jax.random.key(0), 20000)
    )
    freq = np.bincount(np.asarray(samples), minlength=M) / 20000
    np.testing.assert_allclose(freq, np.exp(want_args), atol=0.015)
    # masking: a masked token is never chosen and gets -inf
    masked = base.copy()
    masked[int(np.argmax(want_args))] = -np.inf
    assert int(ca.reward_guided_choice(masked, objectives, weights, beta)) != int(np.argmax(want_args))
    assert np.isneginf(np.asarray(ca.linear_mixing_logits(masked, objectives, weights, tau))).sum() == 1
    # batched shapes
    mix = ca.linear_mixing_logits(base[None].repeat(3, 0), objectives[None].repeat(3, 0), weights, jnp.full(3, tau))
    assert mix.shape == (3, M)


# ---------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(weights=np.array([1.0, -0.5, 1.0])), "weights: must be >= 0"),
        (dict(weights=np.array([1.0, 1.0])), "weights: 2 weight"),
        (dict(weights=np.array([1.0, np.nan, 1.0])), "weights: must be finite"),
        (dict(weights=np.array([1.0, np.inf, 1.0])), "weights: must be finite"),
        (dict(tau=0.0), "tau: must be > 0"),
        (dict(tau=-1.0), "tau: must be > 0"),
        (dict(tau=np.nan), "tau: must be finite"),
        (dict(objectives_nan=True), "objectives: NaN or inf"),
        (dict(base_nan=True), "base_logits: NaN"),
        (dict(all_masked=True), "no valid candidate token"),
        (dict(wrong_m=True), "objectives: shape"),
    ],
)
def test_bad_input_raises_naming_the_field(change, message):
    base, objectives, weights = _game(111)
    base, objectives = base[None].copy(), objectives[None].copy()
    tau = change.get("tau", 0.5)
    weights = change.get("weights", weights)
    if change.get("objectives_nan"):
        objectives[0, 1, 2] = np.nan
    if change.get("base_nan"):
        base[0, 3] = np.nan
    if change.get("all_masked"):
        base[0, :] = -np.inf
    if change.get("wrong_m"):
        objectives = objectives[..., :-1]
    with pytest.raises(ValueError, match=message):
        ca.solve_equilibria(base, objectives, weights, tau)


def test_nan_objective_on_masked_token_is_allowed():
    base, objectives, weights = _game(112)
    base, objectives = base.copy(), objectives.copy()
    base[4] = -np.inf
    objectives[:, 4] = np.nan  # never looked at
    result = ca.solve_equilibria(base[None], objectives[None], weights, 0.5)
    assert bool(jnp.all(jnp.isfinite(result.policy))) and float(result.policy[0, 4]) == 0.0


def test_check_top_m():
    assert ca.check_top_m(32, 151936) == 32
    with pytest.raises(ValueError, match="top_m: 64 candidate tokens is larger than the vocabulary size 50"):
        ca.check_top_m(64, 50)
    with pytest.raises(ValueError, match="top_m: must be >= 1"):
        ca.check_top_m(0, 50)
    with pytest.raises(ValueError, match="top_m: must be an integer"):
        ca.check_top_m(2.5, 50)


def test_solver_config_validation():
    with pytest.raises(ValueError, match="SolverConfig.tol"):
        ca.SolverConfig(tol=0.0)
    with pytest.raises(ValueError, match="SolverConfig.max_iters"):
        ca.SolverConfig(max_iters=0)


def test_check_game_inputs_unbatched_shapes():
    base, objectives, weights = _game(113)
    ca.check_game_inputs(base, objectives, weights, 0.5)  # fine
    with pytest.raises(ValueError, match="weights: 4 weight") as error:
        ca.check_game_inputs(base, objectives, np.ones(4), 0.5)
    assert isinstance(error.value, GameInputError) and error.value.field == "weights"
    with pytest.raises(ValueError, match="tau: shape"):
        ca.check_game_inputs(base, objectives, weights, np.ones(2))
    with pytest.raises(ValueError, match="valid: shape"):
        ca.check_game_inputs(base, objectives, weights, 0.5, valid=np.ones(M + 1, bool))
    with pytest.raises(ValueError, match="base_logits: expected 1 dims"):
        ca.check_game_inputs(base[None], objectives, weights, 0.5)
    with pytest.raises(ValueError, match="init_incentives: shape"):
        ca.solve_equilibria(base[None], objectives[None], weights, 0.5, init_incentives=np.zeros((1, J, M + 1)))


# ---------------------------------------------------------------------------
# the limited-liability variant (Y_k >= 0)


def test_limited_liability_single_principal_maximizes_its_welfare():
    """J = 1: the equilibrium policy maximises <pi, a> - tau KL(pi||pi0) - c_min(pi)."""
    base, objectives, weights = _game(121, m=6, j=1, dtype=np.float64)
    tau = 0.5
    with jax.enable_x64(True):
        result = ca.solve_limited_liability(base, objectives, weights, tau, config=ca.SolverConfig(tol=1e-13))
        welfare = jax.jit(jax.vmap(ca.limited_liability_welfare, in_axes=(0, None, None, None, None)))
        w_eq = float(ca.limited_liability_welfare(result.log_policy, base, objectives, weights, tau))
        rng = np.random.default_rng(0)
        for size in (1e-4, 1e-2, 1.0):
            perturbed = jax.nn.log_softmax(result.log_policy + rng.normal(size=(256, 6)) * size)
            assert float(jnp.max(welfare(perturbed, base, objectives, weights, tau))) <= w_eq + 1e-12
    pi0 = scipy.special.softmax(base)
    a = weights[0] * objectives[0]

    def neg_w(z):
        p = scipy.special.softmax(z)
        return -(p @ a - tau * np.sum(p * np.log(p / pi0)) - tau * np.max(np.log(pi0 / p)))

    generic = min(
        (scipy.optimize.minimize(neg_w, rng.normal(size=6), method="Nelder-Mead",
                                 options={"maxiter": 20000, "xatol": 1e-10, "fatol": 1e-13}) for _ in range(3)),
        key=lambda r: r.fun,
    )
    assert w_eq >= -generic.fun - 1e-9
    np.testing.assert_allclose(result.policy, scipy.special.softmax(generic.x), atol=5e-3)  # nonsmooth optimum


def test_limited_liability_is_a_nash_equilibrium_with_truthful_thresholds():
    base, objectives, weights = _game(122, dtype=np.float64)
    tau = 0.3
    with jax.enable_x64(True):
        result = ca.solve_limited_liability(base, objectives, weights, tau, config=ca.SolverConfig(tol=1e-13))
        y = np.asarray(result.incentives)
        assert y.min() == 0.0 and np.all(y.min(axis=1) == 0.0)  # Y_k >= 0, min 0
        payoff = np.asarray(ca.principal_utilities(base, objectives, weights, y, tau))
        # truthful threshold form: Y_k = (a_k - u_k)_+ with u_k = tau + U_k
        # (in coordinates where max_i a_ki = 0, which shifts U_k by -max_i a_ki)
        a = weights[:, None] * objectives
        thresholds = tau + payoff - a.max(axis=1)
        a = a - a.max(axis=1, keepdims=True)
        np.testing.assert_allclose(y, np.maximum(a - thresholds[:, None], 0.0), atol=1e-9)
        assert np.all(y.max(axis=1) > 0)  # every principal pays somewhere here
        assert float(result.residual) < 1e-10
        rng = np.random.default_rng(1)
        for k in range(J):
            for size in (1e-3, 0.1, 2.0):
                deviated = np.repeat(y[None], 128, 0)
                deviated[:, k] = np.maximum(y[k] + rng.normal(size=(128, M)) * size, 0.0)
                u = _utilities(base, objectives, weights, jnp.asarray(deviated), tau)
                assert float(jnp.max(u[:, k] - payoff[k])) <= 1e-12


def test_limited_liability_unique_from_random_thresholds_and_finite_at_extremes():
    base, objectives, weights = _game(123)
    config = ca.SolverConfig(tol=1e-7)
    inits = jax.random.uniform(jax.random.key(1), (16, J), minval=-3.0, maxval=3.0)
    results = jax.vmap(
        lambda u0: ca.solve_limited_liability(base, objectives, weights, 0.2, init_thresholds=u0, config=config)
    )(inits)
    assert bool(jnp.all(results.converged))
    np.testing.assert_allclose(results.policy, jnp.broadcast_to(results.policy[0], results.policy.shape), atol=1e-5)
    for tau in (1e-3, 1e3):
        for w in ([0.0, 0.0, 0.0], [1e3, 0.0, 1.0]):
            peaked = ca.solve_limited_liability(
                np.log(PEAKED).astype(np.float32), objectives, np.asarray(w, np.float32), tau
            )
            assert bool(jnp.all(jnp.isfinite(peaked.policy))) and bool(jnp.all(jnp.isfinite(peaked.incentives)))
            assert float(jnp.sum(peaked.policy)) == pytest.approx(1.0, abs=1e-5)
            assert float(jnp.min(peaked.incentives)) >= 0.0
