r"""CAGE, part 3: decoding baselines and host-side boundary checks.

Shapes: ``J`` principals, ``M`` candidate tokens, ``P`` positions in a batch;
the game itself is in :mod:`align_jax.game.agency_game`, its solver in
:mod:`align_jax.game.agency_solver`.

Baselines on the same inputs: :func:`linear_mixing_logits`
(``log pi0 + Q^T w / tau``, multi-objective decoding) and
:func:`reward_guided_logits` / :func:`reward_guided_choice` (ARGS-style
``log pi0 + beta Q^T w`` over the top-M, argmax or sampled).

Boundary checks (host side, before compilation): :func:`check_game_inputs`
and :func:`check_top_m`; 
:func:`~align_jax.game.agency_solver.solve_equilibria` calls the former.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.game.agency_game import _valid_mask
from align_jax.game.types import GameInputError

__all__ = [
    "linear_mixing_logits",
    "reward_guided_logits",
    "reward_guided_choice",
    "check_game_inputs",
    "check_top_m",
]


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
