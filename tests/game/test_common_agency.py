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

M, J = 8, 3


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


@pytest.mark.parametrize("num_principals", [1, 2, 3])
def test_closed_form_maximizer_matches_generic_convex_solver(num_principals):
    """argmax W from the Wright-omega closed form == scipy SLSQP on the simplex."""
    base, objectives, weights = _game(3 + num_principals, m=5, j=num_principals, dtype=np.float64)
    tau = 0.7
    pi0 = np.exp(base - scipy.special.logsumexp(base))
    qw = weights @ objectives
    with jax.enable_x64(True):
        closed = np.exp(np.asarray(ca.welfare_maximizer(base, objectives, weights, tau)))
        w_closed = float(ca.welfare(jnp.log(closed), base, objectives, weights, tau))
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
        jitted = jax.jit(ca.solve_equilibrium, static_argnames="config")(
            base, objectives, weights, tau, config=config
        )
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
    np.testing.assert_allclose(results.incentives, jnp.broadcast_to(results.incentives[0], results.incentives.shape), atol=2e-5)
    # the starting policies were far apart
    start = jax.vmap(lambda y0: jnp.exp(ca.agent_response(base, y0, tau)))(inits)
    assert float(jnp.max(jnp.abs(start - results.policy[0]))) > 0.3


def test_first_order_conditions_hold_at_equilibrium_and_fail_elsewhere():
    base, objectives, weights = _game(31)
    tau = 0.5
    result = ca.solve_equilibrium(base, objectives, weights, tau)
    grads = ca.principal_gradients(base, objectives, weights, result.incentives, tau)
    assert float(jnp.max(jnp.abs(grads))) < 2e-6
    # the test has teeth: the linear-mixing profile Y_k = w_k Q_k is not an equilibrium
    truthful = weights[:, None] * objectives
    truthful = truthful - (truthful @ jnp.exp(jax.nn.log_softmax(base)))[:, None]
    assert float(jnp.max(jnp.abs(ca.principal_gradients(base, objectives, weights, truthful, tau)))) > 1e-2


def test_no_profitable_unilateral_deviation():
    """Nash check: random normalised deviations of one principal never raise its payoff."""
    base, objectives, weights = _game(41)
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
                u = jax.vmap(lambda y: ca.principal_utilities(base, objectives, weights, y, tau))(deviated)
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
    w_eq = ca.welfare(eq.log_policy, base, objectives, weights, tau)
    others = [ca.linear_mixing_logits(base, objectives, weights, tau)]
    others += [jax.nn.log_softmax(jax.random.normal(jax.random.key(i), (M,)) * 2) for i in range(20)]
    for lp in others:
        assert float(ca.welfare(lp, base, objectives, weights, tau)) < float(w_eq)
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
    assert float(jnp.max(jnp.abs(result.policy[0][~mask]))) == 0.0
    assert bool(jnp.all(jnp.isfinite(closed)))
    np.testing.assert_allclose(result.policy[0], closed, atol=1e-4)


def test_vmapped_batch_equals_per_item():
    games = [_game(80 + i) for i in range(6)]
    base = np.stack([g[0] for g in games])
    objectives = np.stack([g[1] for g in games])
    weights = np.stack([g[2] for g in games])
    taus = np.array([0.01, 0.1, 0.5, 1.0, 4.0, 50.0], np.float32)
    batch = ca.solve_equilibria(base, objectives, weights, taus)
    for i in range(len(games)):
        single = ca.solve_equilibrium(base[i], objectives[i], weights[i], taus[i])
        np.testing.assert_allclose(batch.policy[i], single.policy, atol=1e-7)
        np.testing.assert_allclose(batch.incentives[i], single.incentives, atol=1e-5)
        assert int(batch.iterations[i]) == int(single.iterations)


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
