"""Conformance test every game learner must pass (pgx's ``api_test(env)`` style).

    from align_jax.game import conformance, hedge
    conformance.learner_api_test(hedge.hedge_learner(0.5, "anytime"))

:func:`learner_api_test` drives a :class:`~align_jax.game.learner.Learner`
through random, adversarial and extreme reward sequences on a batch of masked
slot sets ``[B, N, K]`` (with an agent that has no valid slot and one with a
single valid slot) and raises ``AssertionError`` naming the property that
failed:

1. state: ``init`` / ``update`` give pytrees of arrays whose structure, shapes
   and dtypes do not change from round to round (a ``lax.scan`` carry);
2. simplex: every policy is a distribution over the valid slots, zero on
   invalid slots, and all zero for an agent without valid slots; nothing NaN;
3. determinism: the same inputs give bit-identical outputs;
4. compilation: jitted ``policy`` / ``update`` do not retrace when fed the
   state ``update`` returned (same avals as ``init``'s, weak types included),
   a jitted run does not retrace for new values (``chex.assert_max_traces``),
   and it agrees with the unjitted run;
5. batching: leading axes ``[B, N, K]``, ``vmap`` over ``B`` and a loop over
   the games agree;
6. extremes: rewards of magnitude ``1e30`` and ``1e-30`` keep policies finite
   and on the simplex;
7. regret: with a ``regret_bound``, the measured external regret stays under
   it on random and adversarial sequences, the bound is ``>= 0`` and is ``0``
   for an agent with at most one valid slot.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from align_jax.game.learner import Learner

__all__ = ["learner_api_test"]


def _masks(batch: int, num_agents: int, num_candidates: int, rng: np.random.Generator) -> np.ndarray:
    """bool ``[B, N, K]``: random padding, an abstaining agent, a single-slot agent."""
    valid = rng.random((batch, num_agents, num_candidates)) < 0.7
    valid[..., 0] |= ~valid.any(-1)
    valid[0, -1, :] = False  # an agent with no valid slot
    if batch > 1:
        valid[1, 0, :] = False
        valid[1, 0, num_candidates - 1] = True  # an agent with exactly one valid slot
    return valid


def _rollout(learner: Learner, valid, rewards, adversarial: bool):
    """Plays ``T`` rounds; returns (policies [T, ..., K], rewards played [T, ..., K], states, bounds [T, ...])."""

    def step(state, inputs):
        t, reward = inputs
        t_float = t.astype(jnp.float32)
        policy = learner.policy(state, valid, t_float)
        if adversarial:  # reward the valid slot the learner likes least
            least = jnp.argmin(jnp.where(valid, policy, jnp.inf), axis=-1)
            reward = reward + jax.nn.one_hot(least, valid.shape[-1], dtype=reward.dtype)
        reward = jnp.where(valid, reward, 0.0)
        state = learner.update(state, reward, valid, t_float)
        bound = None if learner.regret_bound is None else learner.regret_bound(state, valid, t)
        return state, (policy, reward, bound)

    rounds = jnp.arange(1, rewards.shape[0] + 1, dtype=jnp.int32)
    final, (policies, played_rewards, bounds) = jax.lax.scan(step, learner.init(valid), (rounds, rewards))
    return policies, played_rewards, final, bounds


def _check_state(learner: Learner, valid) -> None:
    state = learner.init(valid)
    leaves = jax.tree.leaves(state)
    assert leaves, "state: init returned no arrays"
    for leaf in leaves:
        assert isinstance(leaf, jax.Array), f"state: a leaf of init's state is {type(leaf).__name__}, not a jax.Array"
    reward = jnp.where(valid, 0.5, 0.0).astype(jnp.float32)
    new = learner.update(state, reward, valid, jnp.float32(1.0))
    assert jax.tree.structure(new) == jax.tree.structure(state), (
        f"state: update changed the state's structure {jax.tree.structure(state)} -> {jax.tree.structure(new)}"
    )
    for a, b in zip(leaves, jax.tree.leaves(new)):
        assert a.shape == b.shape and a.dtype == b.dtype, (
            f"state: update changed a leaf from {a.dtype}{list(a.shape)} to {b.dtype}{list(b.shape)} (not a scan carry)"
        )


def _check_simplex(policies: np.ndarray, valid: np.ndarray, label: str, atol: float = 1e-5) -> None:
    valid = np.broadcast_to(valid, policies.shape)
    assert np.all(np.isfinite(policies)), f"simplex ({label}): a policy is not finite"
    assert np.all(policies >= 0.0), f"simplex ({label}): negative probability {policies.min()}"
    assert np.all(policies[~valid] == 0.0), f"simplex ({label}): mass on an invalid slot"
    total = policies.sum(-1)
    has_slot = valid.any(-1)
    assert np.all(np.abs(total[has_slot] - 1.0) <= atol), (
        f"simplex ({label}): a policy sums to {total[has_slot][np.argmax(np.abs(total[has_slot] - 1))]}, not 1"
    )
    assert np.all(total[~has_slot] == 0.0), f"simplex ({label}): an agent without valid slots has a non-zero policy"


def _check_regret(policies, rewards, bounds, valid, label: str) -> None:
    policies, rewards = np.asarray(policies, np.float64), np.asarray(rewards, np.float64)
    cum = rewards.sum(0)
    best = np.max(np.where(valid, cum, -np.inf), axis=-1)
    played = np.sum(policies * rewards, axis=(0, -1))
    has_slot = valid.any(-1)
    regret = np.where(has_slot, best - played, 0.0)
    bound = np.asarray(bounds, np.float64)[-1]
    assert not np.any(np.isnan(bound)), f"regret ({label}): the bound is NaN"
    assert np.all(bound >= 0), f"regret ({label}): negative bound {bound.min()}"
    assert np.all(bound[valid.sum(-1) <= 1] == 0), f"regret ({label}): non-zero bound for an agent with <= 1 valid slot"
    slack = 1e-4 * (1.0 + np.abs(bound)) + 1e-4 * np.abs(rewards).sum(0).max(-1)
    excess = regret - bound - slack
    assert np.all(excess <= 0), (
        f"regret ({label}): regret {regret.flat[np.argmax(excess)]} exceeds the bound {bound.flat[np.argmax(excess)]}"
    )


def learner_api_test(
    learner: Learner,
    *,
    batch: int = 4,
    num_agents: int = 3,
    num_candidates: int = 5,
    num_rounds: int = 24,
    seed: int = 0,
) -> None:
    """Checks that ``learner`` honours the :class:`~align_jax.game.learner.Learner` contract.

    Args:
      learner: the learner under test (built by its factory, e.g.
        ``LEARNERS.get("hedge")(0.5, "constant")``).
      batch, num_agents, num_candidates: the shape ``[B, N, K]`` of the test games.
      num_rounds: T, rounds per reward sequence.
      seed: seeds the random masks and rewards.

    Raises:
      AssertionError: the message names the violated property (see the module
        docstring for the list).
    """
    if not isinstance(learner, Learner):
        raise AssertionError(f"learner must be a Learner, got {type(learner).__name__}")
    rng = np.random.default_rng(seed)
    valid_np = _masks(batch, num_agents, num_candidates, rng)
    valid = jnp.asarray(valid_np)
    shape = (num_rounds, batch, num_agents, num_candidates)
    random_rewards = jnp.asarray(rng.uniform(-1.0, 1.0, shape) * rng.uniform(0.1, 3.0), jnp.float32)

    # 1. state
    _check_state(learner, valid)

    # 4. compilation: init's state and update's state have the same avals (no retrace of a
    # jitted policy / update on the second round), and a jitted run of T rounds does not
    # retrace for new reward values.  (Trace counters are reset first, as chex asks of
    # tests that call assert_max_traces repeatedly.)
    chex.clear_trace_counter()

    def policy_fn(state, valid, t):
        return learner.policy(state, valid, t)

    def update_fn(state, reward, valid, t):
        return learner.update(state, reward, valid, t)

    policy_jit = jax.jit(chex.assert_max_traces(policy_fn, n=1))
    update_jit = jax.jit(chex.assert_max_traces(update_fn, n=1))
    counted = jax.jit(chex.assert_max_traces(_rollout, n=1), static_argnums=(0, 3))
    rollout = jax.jit(_rollout, static_argnums=(0, 3))  # for the other checks (other shapes and modes)
    other = jnp.asarray(rng.uniform(-2.0, 2.0, shape), jnp.float32)
    try:
        state = learner.init(valid)
        for t in range(1, 4):
            policy_jit(state, valid, jnp.float32(t))
            state = update_jit(state, random_rewards[t - 1], valid, jnp.float32(t))
        policies, rewards, final, bounds = counted(learner, valid, random_rewards, False)
        counted(learner, valid, other, False)
    except AssertionError as exc:
        raise AssertionError(f"compilation: retraced on a second call with new values: {exc}") from None
    with jax.disable_jit():
        eager = _rollout(learner, valid, random_rewards, False)
    for got, want in zip(jax.tree.leaves((policies, final, bounds)), jax.tree.leaves((eager[0], eager[2], eager[3]))):
        np.testing.assert_allclose(
            np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6, err_msg="compilation: jit and eager runs disagree"
        )

    # 2. simplex, on random and adversarial sequences
    _check_simplex(np.asarray(policies), valid_np, "random rewards")
    adv_policies, adv_rewards, _, adv_bounds = rollout(learner, valid, 0.0 * random_rewards, True)
    _check_simplex(np.asarray(adv_policies), valid_np, "adversarial rewards")
    for leaf in jax.tree.leaves((final, bounds)):
        assert not np.any(np.isnan(np.asarray(leaf))), "simplex: NaN in the state or bound (abstaining agent?)"

    # 3. determinism
    again = rollout(learner, valid, random_rewards, False)
    for a, b in zip(jax.tree.leaves((policies, final, bounds)), jax.tree.leaves((again[0], again[2], again[3]))):
        assert np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True), "determinism: two identical runs differ"

    # 5. batching: [B, N, K] at once == vmap over B == one game at a time
    mapped = jax.jit(jax.vmap(lambda v, r: _rollout(learner, v, r, False), in_axes=(0, 1), out_axes=(1, 1, 0, 1)))
    by_vmap = mapped(valid, random_rewards)
    for game in range(batch):
        single = rollout(learner, valid[game], random_rewards[:, game], False)
        parts = zip(("policy", "reward", "state", "bound"), (policies, rewards, final, bounds), by_vmap, single)
        for name, at_once, vmapped, alone in parts:
            for x, y, z in zip(*(map(np.asarray, jax.tree.leaves(tree)) for tree in (at_once, vmapped, alone))):
                y = y[game] if name == "state" else y[:, game]
                if name != "state":
                    x = x[:, game]
                elif x.shape == (batch, *z.shape):
                    x = x[game]
                assert x.shape == z.shape, f"batching: a {name} leaf has shape {x.shape} batched, {z.shape} alone"
                for got, how in ((x, "batched"), (y, "vmapped")):
                    np.testing.assert_allclose(
                        got, z, rtol=1e-5, atol=1e-6, err_msg=f"batching: {name} of game {game}, {how} != alone"
                    )

    # 6. extremes
    for scale in (1e30, 1e-30):
        huge, _, huge_final, huge_bounds = rollout(learner, valid, random_rewards * jnp.float32(scale), False)
        _check_simplex(np.asarray(huge), valid_np, f"rewards of magnitude {scale:g}")
        for leaf in jax.tree.leaves((huge_final, huge_bounds)):
            assert not np.any(np.isnan(np.asarray(leaf))), f"extremes: NaN in the state or bound at magnitude {scale:g}"

    # 7. regret
    if learner.regret_bound is not None:
        _check_regret(policies, rewards, bounds, valid_np, "random rewards")
        _check_regret(adv_policies, adv_rewards, adv_bounds, valid_np, "adversarial rewards")
