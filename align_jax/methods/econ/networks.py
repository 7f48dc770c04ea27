"""ECON's networks in Flax NNX, used as pure functions of ``(graphdef, state)`` pytrees.

Shapes: N executors, F observation features, D = ``belief_dim``, H = ``hidden_dim``,
A = actions (the (temperature, top-p) grid), E = ``mixer_embed_dim``, C commitment
features, B batch.

* :class:`BeliefNetwork` (one per executor; their parameters are stacked on a leading N
  axis)::

      h = relu(o W_in + b_in)            [H]    o: the executor's local history features [F]
      b = tanh(h W_b + b_b)              [D]    the belief state
      Q = relu(b W_q1 + b_q1) W_q2 + b_q2 [A]   local Q-values over the action grid

  The executor's action is ``argmax_a Q`` (greedy) on the grid of :func:`action_grid`.

* :class:`BeliefEncoder`: ``num_blocks`` pre-LayerNorm transformer blocks of multi-head
  self-attention (``num_heads``) over the N belief states, keys of absent executors masked,
  giving encoded beliefs ``e_i`` [N, D] and the group representation
  ``g = sum_i m_i e_i / sum_i m_i`` [D]; its ``commitment_head`` maps each belief state to
  the commitment's feature space, ``c_hat_i = b_i W_c + b_c`` [C] (consistency loss).

* :class:`QMixer` (QMIX-style, monotone): with hypernetworks conditioned on the group
  representation (and, for the per-agent weights, on ``e_i``)::

      W1_i = |[e_i, g] V_1 + c_1|          [E]   non-negative
      b1   = g V_b + c_b                   [E]
      w2   = |g V_2 + c_2|                 [E]   non-negative
      b2   = relu(g V_3 + c_3) v_4 + c_4    []
      Q_tot = w2 . elu(sum_i m_i Q_i W1_i + b1) + b2

  ``dQ_tot/dQ_i = m_i sum_e w2_e elu'(.)_e W1_ie >= 0`` since ``elu' > 0``: Q_tot is monotone
  in every local Q, and the same mixer parameters serve any N (the per-agent weights come
  from a shared hypernetwork).

Everything is created by :func:`init_networks` and applied by :func:`agent_forward`,
:func:`encode`, :func:`mix`; those take a :class:`EconNetworks` (graphdefs, static) and a
:class:`EconParams` (states, a pytree), so a jitted training step works on pure pytrees.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from align_jax.methods.econ.config import NetworkConfig

__all__ = [
    "BeliefNetwork",
    "BeliefEncoder",
    "QMixer",
    "EconNetworks",
    "EconParams",
    "action_grid",
    "network_graphdefs",
    "init_networks",
    "agent_forward",
    "encode",
    "mix",
]


class BeliefNetwork(nnx.Module):
    """One executor's belief network: local history features [F] -> belief [D], Q [A]."""

    def __init__(self, obs_dim: int, config: NetworkConfig, *, rngs: nnx.Rngs):
        d, h, a = config.belief_dim, config.hidden_dim, config.num_actions
        self.input_layer = nnx.Linear(obs_dim, h, rngs=rngs)
        self.belief_layer = nnx.Linear(h, d, rngs=rngs)
        self.q_hidden = nnx.Linear(d, h, rngs=rngs)
        self.q_out = nnx.Linear(h, a, rngs=rngs)

    def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        """obs [..., F] -> (belief [..., D], q_values [..., A])."""
        belief = jnp.tanh(self.belief_layer(jax.nn.relu(self.input_layer(obs))))
        return belief, self.q_out(jax.nn.relu(self.q_hidden(belief)))


class _EncoderBlock(nnx.Module):
    def __init__(self, config: NetworkConfig, *, rngs: nnx.Rngs):
        d = config.belief_dim
        self.attention_norm = nnx.LayerNorm(d, rngs=rngs)
        # no projection biases: a key bias only adds q . b_k to every logit of a query, which the
        # softmax ignores, so its gradient is pure round-off that Adam would amplify
        self.attention = nnx.MultiHeadAttention(num_heads=config.num_heads, in_features=d, decode=False,
                                                use_bias=False, keep_rngs=False, rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(d, rngs=rngs)
        self.mlp_in = nnx.Linear(d, config.hidden_dim, rngs=rngs)
        self.mlp_out = nnx.Linear(config.hidden_dim, d, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        attn_mask = (mask[None, None, :] > 0)  # [1, 1, N] over (heads, queries, keys)
        x = x + self.attention(self.attention_norm(x), mask=attn_mask, deterministic=True)
        return x + self.mlp_out(jax.nn.relu(self.mlp_in(self.mlp_norm(x))))


class BeliefEncoder(nnx.Module):
    """Attention over the N belief states -> encoded beliefs [N, D], group [D]; and the
    commitment head belief [.., D] -> [.., C]."""

    def __init__(self, config: NetworkConfig, commitment_dim: int, *, rngs: nnx.Rngs):
        self.blocks = nnx.List([_EncoderBlock(config, rngs=rngs) for _ in range(config.num_blocks)])
        self.commitment_head = nnx.Linear(config.belief_dim, commitment_dim, rngs=rngs)

    def __call__(self, beliefs: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """beliefs [N, D], mask [N] -> (encoded [N, D], group [D]); absent slots ignored."""
        x = beliefs
        for block in self.blocks:
            x = block(x, mask)
        group = (x * mask[:, None]).sum(0) / jnp.maximum(mask.sum(), 1.0)
        return x, group


class QMixer(nnx.Module):
    """Monotone mixing of local Qs into Q_tot (see the module docstring for the equation)."""

    def __init__(self, config: NetworkConfig, *, rngs: nnx.Rngs):
        d, e = config.belief_dim, config.mixer_embed_dim
        self.hyper_w1 = nnx.Linear(2 * d, e, rngs=rngs)
        self.hyper_b1 = nnx.Linear(d, e, rngs=rngs)
        self.hyper_w2 = nnx.Linear(d, e, rngs=rngs)
        self.hyper_b2_hidden = nnx.Linear(d, e, rngs=rngs)
        self.hyper_b2_out = nnx.Linear(e, 1, rngs=rngs)

    def weights(self, encoded: jax.Array, group: jax.Array):
        """(W1 [N, E] >= 0, b1 [E], w2 [E] >= 0, b2 []) from encoded [N, D] and group [D]."""
        n = encoded.shape[0]
        z = jnp.concatenate([encoded, jnp.broadcast_to(group, (n, group.shape[-1]))], axis=-1)
        w1 = jnp.abs(self.hyper_w1(z))
        b1 = self.hyper_b1(group)
        w2 = jnp.abs(self.hyper_w2(group))
        b2 = self.hyper_b2_out(jax.nn.relu(self.hyper_b2_hidden(group)))[0]
        return w1, b1, w2, b2

    def __call__(self, local_q: jax.Array, encoded: jax.Array, group: jax.Array, mask: jax.Array) -> jax.Array:
        """local_q [N], encoded [N, D], group [D], mask [N] -> Q_tot []."""
        w1, b1, w2, b2 = self.weights(encoded, group)
        hidden = jax.nn.elu((local_q * mask) @ w1 + b1)
        return hidden @ w2 + b2


class EconNetworks(NamedTuple):
    """The static halves (``nnx.GraphDef``) of the three networks.

    Attributes:
      belief: graphdef of one :class:`BeliefNetwork`.
      encoder: graphdef of the :class:`BeliefEncoder`.
      mixer: graphdef of the :class:`QMixer`.
      grid: the action grid, a static tuple of A (temperature, top-p) pairs.
    """

    belief: nnx.GraphDef
    encoder: nnx.GraphDef
    mixer: nnx.GraphDef
    grid: tuple


class EconParams(NamedTuple):
    """The trainable halves (``nnx.State`` pytrees).

    Attributes:
      belief: state of the N belief networks, every leaf with a leading N axis.
      encoder: state of the belief encoder.
      mixer: state of the mixer.
    """

    belief: nnx.State
    encoder: nnx.State
    mixer: nnx.State


def action_grid(config: NetworkConfig) -> tuple[tuple[float, float], ...]:
    """The A = num_temperatures x num_top_ps (temperature, top-p) pairs, action
    ``a = i_t * num_top_ps + i_p``; temperatures geometric, top-p linear over the ranges."""
    nt, npp = config.num_temperatures, config.num_top_ps
    lo, hi = math.log(config.temperature_min), math.log(config.temperature_max)
    temps = [math.exp(lo + (hi - lo) * i / (nt - 1)) if nt > 1 else math.exp((lo + hi) / 2) for i in range(nt)]
    tops = [config.top_p_min + (config.top_p_max - config.top_p_min) * j / (npp - 1) if npp > 1
            else config.top_p_max for j in range(npp)]
    return tuple((t, p) for t in temps for p in tops)


def _kernel_fan_in(parent: str, shape: tuple) -> int:
    if len(shape) == 2:
        return shape[0]
    if len(shape) == 3:  # attention: query/key/value [D, heads, head_dim], out [heads, head_dim, D]
        return shape[0] if parent in ("query", "key", "value") else shape[0] * shape[1]
    raise ValueError(f"unexpected kernel shape {shape} under {parent!r}")


def _random_state(abstract: nnx.State, key: jax.Array, kernel_scale: Callable[[tuple], float],
                  copies: Optional[int] = None) -> nnx.State:
    """Fills an abstract state: every ``kernel`` ~ N(0, scale / fan_in) clipped at 2 std
    (lecun-normal-like), ``bias`` 0, LayerNorm ``scale`` 1, all kernels from ONE normal draw
    (one random op instead of one per tensor: XLA compiles a threefry draw per op).  With
    ``copies`` every leaf gets a leading axis of that size (independent draws)."""
    pure = abstract.to_pure_dict()
    leaves: list[tuple[tuple, jax.ShapeDtypeStruct]] = []

    def walk(node, path):
        for name, value in node.items():
            if isinstance(value, dict):
                walk(value, path + (name,))
            else:
                leaves.append((path + (name,), value))

    walk(pure, ())
    lead = () if copies is None else (copies,)
    kernels = [(p, v) for p, v in leaves if p[-1] == "kernel"]
    total = sum(math.prod(v.shape) for _, v in kernels)
    noise = jnp.clip(jax.random.normal(key, lead + (total,)), -2.0, 2.0)
    offset, filled = 0, {}
    for path, value in leaves:
        if path[-1] == "kernel":
            size = math.prod(value.shape)
            std = math.sqrt(kernel_scale(path) / _kernel_fan_in(str(path[-2]), value.shape))
            filled[path] = std * noise[..., offset:offset + size].reshape(lead + value.shape)
            offset += size
        elif path[-1] in ("bias", "scale"):
            filled[path] = jnp.full(lead + value.shape, 1.0 if path[-1] == "scale" else 0.0, value.dtype)
        else:
            raise ValueError(f"no initialiser for parameter {'/'.join(map(str, path))}")

    def build(node, path):
        return {name: build(value, path + (name,)) if isinstance(value, dict) else filled[path + (name,)]
                for name, value in node.items()}

    nnx.replace_by_pure_dict(abstract, build(pure, ()))
    return abstract


def network_graphdefs(config: NetworkConfig, obs_dim: int, commitment_dim: int) -> EconNetworks:
    """The static :class:`EconNetworks` alone (no arrays are created)."""
    return EconNetworks(
        belief=nnx.graphdef(nnx.eval_shape(lambda: BeliefNetwork(obs_dim, config, rngs=nnx.Rngs(0)))),
        encoder=nnx.graphdef(nnx.eval_shape(lambda: BeliefEncoder(config, commitment_dim, rngs=nnx.Rngs(0)))),
        mixer=nnx.graphdef(nnx.eval_shape(lambda: QMixer(config, rngs=nnx.Rngs(0)))),
        grid=action_grid(config),
    )


def init_networks(config: NetworkConfig, obs_dim: int, commitment_dim: int, num_executors: int,
                  key: jax.Array) -> tuple[EconNetworks, EconParams]:
    """Creates the networks; traceable (may run under ``jit``/``vmap``); consumes ``key``.

    Kernels are drawn N(0, s / fan_in) clipped at 2 std, with s = 1 except the mixer's
    hypernetwork kernels (s = 1 / E, which keeps the initial Q_tot on the rewards' scale
    instead of O(E)); biases 0, LayerNorm scales 1.

    Returns:
      (networks, params): static graphdefs and the parameter pytree, with N = ``num_executors``
      independently initialised belief networks (leading axis N).
    """
    k_belief, k_enc, k_mix = jax.random.split(key, 3)
    abstract = lambda make: nnx.split(nnx.eval_shape(make))[1]  # noqa: E731
    one = lambda path: 1.0  # noqa: E731
    belief = _random_state(abstract(lambda: BeliefNetwork(obs_dim, config, rngs=nnx.Rngs(0))), k_belief, one,
                           copies=num_executors)
    encoder = _random_state(abstract(lambda: BeliefEncoder(config, commitment_dim, rngs=nnx.Rngs(0))), k_enc, one)
    mixer = _random_state(abstract(lambda: QMixer(config, rngs=nnx.Rngs(0))), k_mix,
                          lambda path: 1.0 / config.mixer_embed_dim)
    return network_graphdefs(config, obs_dim, commitment_dim), EconParams(belief, encoder, mixer)


def agent_forward(nets: EconNetworks, params: EconParams, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Every executor's own network on its own observation.

    Args:
      obs: [N, F].
    Returns:
      (beliefs [N, D], q_values [N, A]).
    """
    return jax.vmap(lambda state, o: nnx.merge(nets.belief, state)(o))(params.belief, obs)


def encode(nets: EconNetworks, params: EconParams, beliefs: jax.Array, mask: jax.Array):
    """beliefs [N, D], mask [N] -> (encoded [N, D], group [D], commitment prediction [N, C])."""
    encoder = nnx.merge(nets.encoder, params.encoder)
    encoded, group = encoder(beliefs, mask)
    return encoded, group, encoder.commitment_head(beliefs)


def mix(nets: EconNetworks, params: EconParams, local_q: jax.Array, encoded: jax.Array, group: jax.Array,
        mask: jax.Array) -> jax.Array:
    """local_q [N], encoded [N, D], group [D], mask [N] -> Q_tot [] (monotone in local_q)."""
    return nnx.merge(nets.mixer, params.mixer)(local_q, encoded, group, mask)
