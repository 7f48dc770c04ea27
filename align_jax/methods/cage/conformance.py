"""The conformance test every CAGE objective must pass (pgx's ``api_test`` style).

    from align_jax.methods.cage.conformance import objective_api_test
    objective_api_test(MyObjective(...), ctx)

It checks the contract of :class:`~align_jax.methods.cage.objectives.Objective` on
random candidates and tokens: params and state are pytrees of arrays, every state leaf
leads with ``[R]`` (or is a scalar shared by the rows), ``values`` gives finite
float32 ``[R, M]``, ``update`` keeps the tree structure, shapes and dtypes (so the
state can be a ``while_loop`` carry and be donated), finished rows keep their values,
``values`` and ``update`` compile once (a second call with new arrays does not
retrace), they run under ``lax.scan``, and ``sequence_scores`` returns one finite
float per completion.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.llm.sampler import SamplerStepState
from align_jax.methods.cage.objectives import Completion, DecodeContext

__all__ = ["objective_api_test"]


def _fail(objective, message: str):
    raise AssertionError(f"objective {getattr(objective, 'name', type(objective).__name__)!r}: {message}")


def _step(ctx: DecodeContext, t: int, done) -> SamplerStepState:
    rows = ctx.num_rows
    return SamplerStepState(jnp.asarray(t, jnp.int32), jnp.zeros((rows, ctx.max_new_tokens), jnp.int32),
                            jnp.full((rows,), t, jnp.int32), jnp.asarray(done, bool), None)


def _signature(tree):
    return jax.tree.structure(tree), [(tuple(x.shape), jnp.dtype(x.dtype)) for x in jax.tree.leaves(tree)]


def objective_api_test(objective, ctx: DecodeContext, *, num_candidates: int = 8, seed: int = 0) -> None:
    """Raises ``AssertionError`` (naming the objective and the broken rule) unless
    ``objective`` follows the objective contract on ``ctx``.

    Args:
      objective: the objective to check (built, e.g. from its registry factory).
      ctx: a decode context with at least 2 rows and ``max_new_tokens >= 3``.
      num_candidates: M.
      seed: seeds the random candidates and tokens.
    """
    rows, vocab, m = ctx.num_rows, ctx.vocab_size, num_candidates
    if rows < 2 or ctx.max_new_tokens < 3:
        raise ValueError("objective_api_test needs a context with >= 2 rows and max_new_tokens >= 3")
    for attr in ("name", "description"):
        if not isinstance(getattr(objective, attr, None), str) or not getattr(objective, attr):
            _fail(objective, f"needs a non-empty str attribute {attr!r}")
    if not objective.description.startswith(f"{objective.name} = "):
        _fail(objective, f"description must read '{objective.name} = ...', got {objective.description!r}")

    params = objective.init_params(ctx)
    state = objective.init_state(ctx)
    for what, tree in (("params", params), ("state", state)):
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            if not isinstance(leaf, (jax.Array, np.ndarray)):
                _fail(objective, f"{what} leaf {jax.tree_util.keystr(path)} is a {type(leaf).__name__}, not an array")
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if not isinstance(leaf, jax.Array):
            _fail(objective, f"state leaf {jax.tree_util.keystr(path)} must be a jax.Array (it is donated)")
        if leaf.ndim and leaf.shape[0] != rows:
            _fail(objective, f"state leaf {jax.tree_util.keystr(path)} has shape {leaf.shape}; "
                             f"per-row leaves lead with R={rows} (shared ones are scalars)")

    rng = np.random.default_rng(seed)
    cands = [jnp.asarray(rng.integers(0, vocab, (rows, m)), jnp.int32) for _ in range(2)]
    tokens = [jnp.asarray(rng.integers(0, vocab, (rows,)), jnp.int32) for _ in range(3)]
    live = _step(ctx, 0, np.zeros(rows, bool))

    traces = {"values": 0, "update": 0}

    def values_fn(p, s, c, st):
        traces["values"] += 1
        return objective.values(p, s, c, st)

    def update_fn(p, s, t, st):
        traces["update"] += 1
        return objective.update(p, s, t, st)

    values_jit, update_jit = jax.jit(values_fn), jax.jit(update_fn)

    q = objective.values(params, state, cands[0], live)
    if tuple(q.shape) != (rows, m) or q.dtype != jnp.float32:
        _fail(objective, f"values must be float32 [R, M]=({rows}, {m}), got {q.dtype}{list(q.shape)}")
    if not bool(jnp.all(jnp.isfinite(q))):
        _fail(objective, "values are not all finite")
    q_jit = values_jit(params, state, cands[0], live)
    np.testing.assert_allclose(np.asarray(q_jit), np.asarray(q), rtol=1e-5, atol=1e-5,
                               err_msg=f"objective {objective.name!r}: jitted values differ from eager ones")

    sig = _signature(state)
    new = update_jit(params, state, tokens[0], live)
    if _signature(new) != sig:
        _fail(objective, f"update changed the state's structure, shapes or dtypes: {_signature(new)} != {sig}")
    values_jit(params, new, cands[1], _step(ctx, 1, np.zeros(rows, bool)))

    done = np.arange(rows) % 2 == 1
    before = values_jit(params, new, cands[1], _step(ctx, 1, done))
    newer = update_jit(params, new, tokens[1], _step(ctx, 1, done))
    after = values_jit(params, newer, cands[1], _step(ctx, 2, done))
    if _signature(newer) != sig:
        _fail(objective, "update changed the state's structure, shapes or dtypes on the second call")
    np.testing.assert_allclose(np.asarray(after)[done], np.asarray(before)[done], rtol=1e-6, atol=1e-6,
                               err_msg=f"objective {objective.name!r}: a finished row's values changed on update")
    if traces != {"values": 1, "update": 1}:
        _fail(objective, f"retraced on a second call with new arrays of the same shapes: {traces} traces")

    def body(s, t):
        return objective.update(params, s, t, live), None

    scanned, _ = jax.lax.scan(body, state, jnp.stack(tokens))
    if _signature(scanned) != sig:
        _fail(objective, "update under lax.scan changed the state's signature")

    ids = np.asarray(tokens[0]).reshape(rows, 1).tolist()
    completions = [Completion(r // ctx.num_samples, ids[r] + [int(cands[0][r, 0])],
                              ctx.tokenizer.decode(ids[r] + [int(cands[0][r, 0])], skip_special_tokens=True))
                   for r in range(rows)]
    scores = np.asarray(objective.sequence_scores(completions, ctx))
    if scores.shape != (rows,) or not np.issubdtype(scores.dtype, np.floating) or not np.all(np.isfinite(scores)):
        _fail(objective, f"sequence_scores must be {rows} finite floats, got {scores.dtype}{list(scores.shape)}")
    if not isinstance(objective.summary(ctx), dict):
        _fail(objective, "summary(ctx) must return a dict")
