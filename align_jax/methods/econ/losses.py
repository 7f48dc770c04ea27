"""ECON's rewards and losses: local TD, mixer TD, consistency and the BNE term.

Shapes: B batch, N executors, F features, A actions, C commitment features.  A batch is a
:class:`Transition` with a leading B axis.  Notation: ``Q_i(o, a)`` the local Q of executor
i (online parameters theta), ``Qbar_i`` the same with the target parameters thetabar,
``m_i`` the presence mask, ``b_i`` the belief state, ``e_i``/``g`` the encoded beliefs and
group representation, ``Mix(q; e, g)`` the monotone mixer of
:mod:`~align_jax.methods.econ.networks`.

Rewards (per executor i, per round; :func:`combine_rewards`)::

    R_i = w_TS R_TS_i + w_AL R_AL_i + w_CC R_CC_i        (w >= 0, default 0.5 / 0.3 / 0.2)

Targets (:func:`td_target`; ``d`` = 1 when the question ended)::

    y_i   = r_i   + gamma (1 - d) max_a' Qbar_i(o'_i, a')
    y_tot = r_tot + gamma (1 - d) Mixbar( [max_a' Qbar_j(o'_j, a')]_j ; ebar', gbar' )

Losses (each a mean over the batch; agent sums are over present executors)::

    L_TD   = sum_{b,i} m_i (Q_i(o_i, a_i) - y_i)^2 / sum_{b,i} m_i
    L_mix  = mean_b (Mix([Q_j(o_j, a_j)]_j; e, g) - y_tot)^2
    L_cons = sum_{b,i} m_i ||b_i W_c + b_c - c||^2 / (C sum_{b,i} m_i)        c: commitment features
    L_BNE  = sum_{b,i} m_i [Mix(q^(i); e, g) - Mix(q; e, g)] / sum_{b,i} m_i,
             q = [Q_j(o_j, a_j)]_j,  q^(i) = q with q_i replaced by max_a Q_i(o_i, a)

    L = td_weight L_TD + mixer_weight L_mix + consistency_weight L_cons + bne_weight L_BNE

Learnable reward weights (``train.reward_weight_lr`` > 0; :func:`update_reward_weights`).  The
paper says alpha is learned but gives no objective; its public code fits alpha to the observed
reward components with the reward-difference loss ``L_dr = sum_b ||r_b - alpha||^2`` and keeps
alpha on the simplex.  We use that objective, as exponentiated gradient (mirror descent on the
simplex, no optimiser state)::

    alpha = softmax(theta),  theta <- theta - lr grad_theta ||rbar - alpha||^2

where ``rbar`` is the mean reward-component vector of the rewards paid since the last update.
Its fixed point is the Euclidean projection of E[r] onto the simplex: alpha moves weight
towards the components that are large on average.  A component that starts at weight 0
stays at 0.

L_BNE is the gain executor i would get by a unilateral deviation from its chosen action to
its best alternative, valued by the current joint Q: the exploitability of the chosen
profile.  Because the mixer is monotone in each local Q, the best deviation of executor i
under Q_tot is exactly its local argmax, so the maximum over the A grid actions is exact
and costs N extra mixer calls.  Every gain is >= 0 and is 0 when every chosen action is a
best response (a Bayesian Nash equilibrium of the learned game).  Targets carry no gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from align_jax.methods.econ.config import TrainConfig
from align_jax.methods.econ.networks import EconNetworks, EconParams, agent_forward, encode, mix

__all__ = [
    "Transition",
    "zero_transitions",
    "LossInfo",
    "combine_rewards",
    "reward_weight_loss",
    "update_reward_weights",
    "td_target",
    "local_td_loss",
    "mixer_td_loss",
    "consistency_loss",
    "bne_gains",
    "bne_loss",
    "econ_loss",
]


class Transition(NamedTuple):
    """One round of one question, as stored in the replay buffer (add a leading B for a batch).

    Attributes:
      obs: [N, F] observations the actions were chosen from.
      action: [N] int32 grid actions.
      local_reward: [N].
      team_reward: [].
      next_obs: [N, F].
      done: [] float 1.0 when the question ended (no bootstrap).
      mask: [N] presence mask.
      commit_features: [C] the round's commitment features.
    """

    obs: jax.Array
    action: jax.Array
    local_reward: jax.Array
    team_reward: jax.Array
    next_obs: jax.Array
    done: jax.Array
    mask: jax.Array
    commit_features: jax.Array


def zero_transitions(num_executors: int, obs_dim: int, commit_dim: int, batch: tuple[int, ...] = ()) -> Transition:
    """An all-zero :class:`Transition` with leading axes ``batch`` (a buffer's example or storage)."""
    n, f, b = num_executors, obs_dim, tuple(batch)
    return Transition(obs=jnp.zeros(b + (n, f)), action=jnp.zeros(b + (n,), jnp.int32),
                      local_reward=jnp.zeros(b + (n,)), team_reward=jnp.zeros(b), next_obs=jnp.zeros(b + (n, f)),
                      done=jnp.zeros(b), mask=jnp.zeros(b + (n,)), commit_features=jnp.zeros(b + (commit_dim,)))


class LossInfo(NamedTuple):
    """The loss and its parts (scalars).

    Attributes:
      total: L.
      td: L_TD.  mixer: L_mix.  consistency: L_cons.  bne: L_BNE.
      q_tot: mean Q_tot of the batch.
    """

    total: jax.Array
    td: jax.Array
    mixer: jax.Array
    consistency: jax.Array
    bne: jax.Array
    q_tot: jax.Array


def combine_rewards(components: jax.Array, weights: jax.Array) -> jax.Array:
    """``R = w_TS R_TS + w_AL R_AL + w_CC R_CC``: components [..., 3], weights [3] -> [...]."""
    return components @ weights


def reward_weight_loss(weights: jax.Array, mean_components: jax.Array) -> jax.Array:
    """L_dr per sample: ``||rbar - alpha||^2`` for weights [3] and mean components [3] -> []."""
    return jnp.sum((mean_components - weights) ** 2)


def update_reward_weights(weights: jax.Array, mean_components: jax.Array, learning_rate: float,
                          ready: jax.Array | bool = True) -> jax.Array:
    """One exponentiated-gradient step of alpha on L_dr (module docstring).

    Args:
      weights: [3] alpha on the simplex (``>= 0``, summing to 1).
      mean_components: [3] mean (R_TS, R_AL, R_CC) of the rewards paid since the last step.
      learning_rate: the step size on the logits ``theta = log alpha``.
      ready: [] bool; when false (no reward was paid) alpha is returned unchanged.
    Returns:
      [3] the new alpha, on the simplex.
    """
    # d/dtheta ||rbar - softmax(theta)||^2 = 2 alpha * (d - alpha . d), d = alpha - rbar; the step
    # softmax(theta - lr g) is alpha exp(-lr g), normalised (a zero weight stays zero)
    d = weights - mean_components
    grad = 2.0 * weights * (d - weights @ d)
    new = weights * jnp.exp(-learning_rate * grad)
    return jnp.where(ready, new / new.sum(), weights)


def td_target(reward: jax.Array, done: jax.Array, next_value: jax.Array, gamma: float) -> jax.Array:
    """``y = r + gamma (1 - done) next_value`` (any matching shapes), without gradient."""
    return jax.lax.stop_gradient(reward + gamma * (1.0 - done) * next_value)


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def local_td_loss(q_taken: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """L_TD: q_taken [B, N], target [B, N], mask [B, N] -> []."""
    return _masked_mean((q_taken - target) ** 2, mask)


def mixer_td_loss(q_tot: jax.Array, target: jax.Array) -> jax.Array:
    """L_mix: q_tot [B], target [B] -> []."""
    return jnp.mean((q_tot - target) ** 2)


def consistency_loss(commit_pred: jax.Array, commit_features: jax.Array, mask: jax.Array) -> jax.Array:
    """L_cons: commit_pred [B, N, C], commit_features [B, C], mask [B, N] -> []."""
    sq = jnp.mean((commit_pred - commit_features[:, None, :]) ** 2, axis=-1)
    return _masked_mean(sq, mask)


def bne_gains(nets: EconNetworks, params: EconParams, q_taken: jax.Array, q_best: jax.Array, encoded: jax.Array,
              group: jax.Array, mask: jax.Array) -> jax.Array:
    """Each executor's gain from deviating to its best action, one sample.

    Args:
      q_taken: [N] Q_i(o_i, a_i).  q_best: [N] max_a Q_i(o_i, a).
      encoded: [N, D].  group: [D].  mask: [N].
    Returns:
      [N] ``Mix(q^(i)) - Mix(q)`` (>= 0; 0 for absent executors).
    """
    base = mix(nets, params, q_taken, encoded, group, mask)
    n = q_taken.shape[0]
    deviated = jnp.where(jnp.eye(n, dtype=bool), q_best[None, :], q_taken[None, :])  # [N, N]: row i deviates
    values = jax.vmap(lambda q: mix(nets, params, q, encoded, group, mask))(deviated)
    return (values - base) * mask


def bne_loss(gains: jax.Array, mask: jax.Array) -> jax.Array:
    """L_BNE: gains [B, N], mask [B, N] -> []."""
    return _masked_mean(gains, mask)


def _forward(nets: EconNetworks, params: EconParams, target_params: EconParams, tr: Transition, gamma: float):
    beliefs, q = agent_forward(nets, params, tr.obs)
    q_taken = jnp.take_along_axis(q, tr.action[:, None], axis=-1)[:, 0]
    encoded, group, commit_pred = encode(nets, params, beliefs, tr.mask)
    q_tot = mix(nets, params, q_taken, encoded, group, tr.mask)
    gains = bne_gains(nets, params, q_taken, q.max(-1), encoded, group, tr.mask)

    next_beliefs, next_q = agent_forward(nets, target_params, tr.next_obs)
    next_max = next_q.max(-1)
    next_encoded, next_group, _ = encode(nets, target_params, next_beliefs, tr.mask)
    next_tot = mix(nets, target_params, next_max, next_encoded, next_group, tr.mask)
    y_local = td_target(tr.local_reward, tr.done, next_max, gamma)
    y_tot = td_target(tr.team_reward, tr.done, next_tot, gamma)
    return q_taken, q_tot, gains, commit_pred, y_local, y_tot


def econ_loss(params: EconParams, target_params: EconParams, nets: EconNetworks, batch: Transition,
              config: TrainConfig) -> tuple[jax.Array, LossInfo]:
    """L of the module docstring on a batch (leading B axis); differentiate w.r.t. ``params``.

    Returns:
      (L, :class:`LossInfo`).
    """
    q_taken, q_tot, gains, commit_pred, y_local, y_tot = jax.vmap(
        lambda tr: _forward(nets, params, jax.lax.stop_gradient(target_params), tr, config.gamma))(batch)
    td = local_td_loss(q_taken, y_local, batch.mask)
    mixer = mixer_td_loss(q_tot, y_tot)
    consistency = consistency_loss(commit_pred, batch.commit_features, batch.mask)
    bne = bne_loss(gains, batch.mask)
    total = (config.td_weight * td + config.mixer_weight * mixer + config.consistency_weight * consistency
             + config.bne_weight * bne)
    return total, LossInfo(total=total, td=td, mixer=mixer, consistency=consistency, bne=bne, q_tot=q_tot.mean())
