r"""The CAGE logits processor and the decode drivers.

At every decoding step the base model's next-token distribution is restricted to its
top-``M`` tokens; each objective values those candidates, ``Q [R, J, M]``; the
common-agency equilibrium of :mod:`align_jax.game.common_agency`
(``solve_equilibrium``, vmapped over the R rows) turns ``(log pi0, Q, w, tau)`` into
the agent's policy ``pi*``, and the next token is drawn from ``pi*`` (tokens outside
the top-M get ``-inf``). The equilibrium policy maximises
``<pi, Q^T w> - tau KL(pi||pi0) - J tau KL(pi0||pi)`` (see that module's docstring).

The solver runs at most ``solver_config.max_iters`` Newton steps. A position whose
solve has not converged by then still uses the last iterate (a valid distribution
near the equilibrium), and is *counted*: :attr:`CageState.unconverged` holds the
number of such steps per row, which the run records per row and in its summary.
Counting rather than failing keeps one hard position from discarding a whole batch,
while making an unconverged solve visible instead of silent.

Shapes: B prompts, K samples per prompt, R = B K rows, V base vocabulary, M candidate
tokens, J objectives, T new tokens, W weight vectors.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.game.common_agency import (
    SolverConfig,
    check_top_m,
    linear_mixing_logits,
    reward_guided_logits,
    solve_equilibrium,
)
from align_jax.game.types import GameInputError
from align_jax.methods.cage.objectives import DecodeContext, Objective

__all__ = [
    "PROCESSOR_METHODS",
    "CageState",
    "check_weights",
    "init_cage",
    "make_processor",
    "decode_with_method",
    "decode_weight_grid",
]

#: Decoding methods that go through the logits processor.
PROCESSOR_METHODS = ("cage", "linear", "args")


class CageState(NamedTuple):
    """The processor's state (``SamplerStepState.user``, donated to the decode); numbers
    are array leaves, so one compiled decode serves a whole weight sweep.

    Attributes:
      weights: float32 ``[R, J]`` trade-off weights ``w >= 0``, one vector per row (so one
        decode can sweep a whole weight grid: row ``b W + w`` carries grid point ``w``).
      tau: float32 ``[]`` KL temperature (``cage`` and ``linear``).
      beta: float32 ``[]`` reward scale of ``args``.
      base_temperature: float32 ``[]``: ``pi0 = softmax(logits / base_temperature)``.
      unconverged: int32 ``[R]`` decoding steps of the row whose equilibrium solve did
        not converge within ``solver_config.max_iters`` (``cage`` only; finished rows
        are not counted).
      objective_states: tuple of the J objectives' states.
    """

    weights: jax.Array
    tau: jax.Array
    beta: jax.Array
    base_temperature: jax.Array
    unconverged: jax.Array
    objective_states: tuple


def check_weights(weights, num_objectives: int, field: str = "weights") -> np.ndarray:
    """float32 ``[J]`` weights, or :class:`GameInputError` naming ``field`` (count, sign, finiteness)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.shape[0] != num_objectives:
        raise GameInputError(
            f"{field}: {w.shape[0] if w.ndim == 1 else 'shape ' + str(w.shape)} weight(s) given for "
            f"{num_objectives} objectives", field=field)
    if not np.all(np.isfinite(w)):
        raise GameInputError(f"{field}: must be finite, got {w.tolist()}", field=field)
    if np.any(w < 0):
        raise GameInputError(f"{field}: must be >= 0, got {w.tolist()}", field=field)
    return w.astype(np.float32)


def init_cage(objectives: Sequence[Objective], ctx: DecodeContext, weights, *, tau: float = 1.0,
              beta: float = 1.0, base_temperature: float = 1.0) -> tuple[tuple, CageState]:
    """Validated ``(params, state)`` of the processor (host side; every objective's
    ``init_params`` and ``init_state`` run here).

    ``params`` is the tuple of the J objectives' params (pass it as the sampler's
    ``processor_params``); ``state`` the :class:`CageState` (``processor_state``).
    ``weights``: one J-vector for every row, or ``[R, J]`` (R = ``ctx.num_rows``), one per row.

    Raises:
      GameInputError: weights of the wrong count, negative or not finite; ``tau``,
        ``beta`` or ``base_temperature`` not positive and finite (the field is named).
    """
    rows = ctx.num_rows
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim == 2:
        if w.shape[0] != rows:
            raise GameInputError(f"weights: {w.shape[0]} weight vectors for {rows} rows", field="weights")
        w = np.stack([check_weights(row, len(objectives), field=f"weights[{r}]") for r, row in enumerate(w)])
    else:
        w = np.broadcast_to(check_weights(weights, len(objectives)), (rows, len(objectives)))
    for name, value in (("tau", tau), ("beta", beta), ("base_temperature", base_temperature)):
        if not (math.isfinite(float(value)) and float(value) > 0):
            raise GameInputError(f"{name}: must be > 0 and finite, got {value}", field=name)
    params = tuple(obj.init_params(ctx) for obj in objectives)
    state = CageState(
        weights=jnp.asarray(w, jnp.float32), tau=jnp.asarray(tau, jnp.float32), beta=jnp.asarray(beta, jnp.float32),
        base_temperature=jnp.asarray(base_temperature, jnp.float32),
        unconverged=jnp.zeros((rows,), jnp.int32),
        objective_states=tuple(obj.init_state(ctx) for obj in objectives),
    )
    return params, state


def make_processor(objectives: Sequence[Objective], *, method: str = "cage", top_m: int = 16,
                   vocab_size: int, solver_config: SolverConfig = SolverConfig(max_iters=100)):
    """``(processor, processor_update)`` for :meth:`Sampler.generate`.

    ``processor(logits f32 [R, V], step) -> (logits, CageState)``: ``log pi0`` over the
    top-M of ``logits / base_temperature``; ``Q [R, J, M]`` from the objectives
    (``step.params`` their params, ``step.user.objective_states`` their states); then

    * ``cage``: ``log pi*`` of ``solve_equilibrium`` (vmapped over R), counting the
      active rows whose solve did not converge in ``CageState.unconverged``;
    * ``linear``: ``log softmax(log pi0 + Q^T w / tau)``;
    * ``args``: 0 at ``argmax(log pi0 + beta Q^T w)`` (ARGS-greedy);

    and ``-inf`` outside the top-M. Decode with ``temperature=1, top_p=1`` so the
    sampled distribution is exactly this one. Build once and reuse (the sampler
    caches its compiled decode by the processor's identity).

    Raises:
      GameInputError: unknown method, no objectives, or ``top_m`` not in ``[1, V]``.
    """
    if method not in PROCESSOR_METHODS:
        raise GameInputError(f"method: must be one of {PROCESSOR_METHODS}, got {method!r}", field="method")
    objectives = tuple(objectives)
    if not objectives:
        raise GameInputError("objectives: need at least one objective", field="objectives")
    top_m = check_top_m(top_m, vocab_size)

    def processor(logits, step):
        state: CageState = step.user
        scaled = logits.astype(jnp.float32) / state.base_temperature
        cand_logits, cand_ids = jax.lax.top_k(scaled, top_m)  # [R, M]
        q = jnp.stack([obj.values(p, s, cand_ids, step)
                       for obj, p, s in zip(objectives, step.params, state.objective_states)],
                      axis=1).astype(jnp.float32)  # [R, J, M]
        weights = jnp.broadcast_to(state.weights, (logits.shape[0], len(objectives)))  # [R, J]
        if method == "cage":
            solve = lambda b, o, w: solve_equilibrium(b, o, w, state.tau, config=solver_config)  # noqa: E731
            result = jax.vmap(solve)(cand_logits, q, weights)
            log_policy = result.log_policy
            missed = ~result.converged & ~step.done
            state = state._replace(unconverged=state.unconverged + missed.astype(jnp.int32))
        elif method == "linear":
            log_policy = linear_mixing_logits(cand_logits, q, weights, state.tau)
        else:
            scores = reward_guided_logits(cand_logits, q, weights, state.beta)
            best = jnp.argmax(scores, axis=-1)
            log_policy = jnp.where(jnp.arange(top_m)[None, :] == best[:, None], 0.0, -jnp.inf)
        rows = jnp.arange(logits.shape[0])[:, None]
        return jnp.full(logits.shape, -jnp.inf, jnp.float32).at[rows, cand_ids].set(log_policy), state

    def update(user: CageState, tokens, step):
        new = tuple(obj.update(p, s, tokens, step)
                    for obj, p, s in zip(objectives, step.params, user.objective_states))
        return user._replace(objective_states=new)

    return processor, update


def _unconverged_only(state: CageState) -> dict:
    """What of the final processor state comes back to the host (not the guide's cache)."""
    return {"unconverged": state.unconverged}


def decode_with_method(sampler, objectives, processors: dict, conversations, *, method: str, weights,
                       key, max_new_tokens: int, num_samples: int = 1, tau: float = 1.0, beta: float = 1.0,
                       temperature: float = 1.0):
    """Decode B conversations with one method; returns the sampler's ``SampleOutput``.

    ``processors`` maps a method to its ``(processor, update)`` pair (from
    :func:`make_processor`, built once). ``base`` samples the raw model at
    ``temperature``; processor methods sample at temperature 1 from the processed
    distribution, whose ``pi0`` uses ``temperature``. For those, the output's
    ``processor_state`` is ``{"unconverged": int32 [R]}`` (see :class:`CageState`);
    the processor state is donated to the decode (the guide's cache lives once).
    """
    if method == "base":
        return sampler.generate_chat(list(conversations), key=key, num_samples=num_samples,
                                     max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0)
    tok = sampler.tokenizer
    ctx = DecodeContext(tok, sampler.config.vocab_size, tuple(conversations), num_samples, max_new_tokens,
                        tuple(tok.eos_token_ids))
    params, state = init_cage(objectives, ctx, weights, tau=tau, beta=beta, base_temperature=temperature)
    processor, update = processors[method]
    return sampler.generate_chat(list(conversations), key=key, num_samples=num_samples,
                                 max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0,
                                 logits_processor=processor, processor_update=update,
                                 processor_state=state, processor_params=params, donate_processor_state=True,
                                 return_processor_state=_unconverged_only)


def decode_weight_grid(sampler, objectives, processors, conversations, *, method: str, weight_grid,
                       key, max_new_tokens: int, tau: float = 1.0, beta: float = 1.0,
                       temperature: float = 1.0):
    """Decode B conversations once per weight vector of ``weight_grid [W, J]``, in one call.

    Every prompt is prefilled once and its W rows (``row = b W + w``, weights
    ``weight_grid[w]``) decode together: one compiled program and one batch of
    ``B W`` rows serve the whole sweep. Row ``(b, w)`` draws from the key
    ``fold_in(fold_in(key, b), w)`` (the sampler's per-sample keys), so its tokens do
    not depend on the other grid points. Returns the sampler's ``SampleOutput`` with
    the grid on the sample axis (``tokens [B, W, T]``, ``text[b][w]``).
    """
    grid = np.asarray(weight_grid, dtype=np.float64)
    if grid.ndim != 2 or grid.shape[0] < 1:
        raise GameInputError(f"weight_grid: expected [W, J] weight vectors, got shape {grid.shape}",
                             field="weight_grid")
    per_row = np.tile(grid, (len(conversations), 1))  # row b W + w -> grid[w]
    return decode_with_method(sampler, objectives, processors, conversations, method=method, weights=per_row,
                              key=key, max_new_tokens=max_new_tokens, num_samples=grid.shape[0], tau=tau,
                              beta=beta, temperature=temperature)
