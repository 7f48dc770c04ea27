"""Expansion waves: the search loop over B trees, with one LLM batch per wave.

A *wave* advances every unfinished tree by one expansion:

1. :func:`plan_wave` (jitted, read-only) finds in each tree the node to expand (UCT
   descent from the root, see :func:`~align_jax.methods.mcts.tree.select`) and lays out
   its children: ``child_valid [B, A]`` marks the slots to generate, each with its action
   kind ``child_action [B, A]``.  The caller turns all valid slots of all trees into one
   sampler batch (rows = valid ``(b, j)``; the children of one node share its prompt
   prefix, so one prefill serves them).
2. The caller extracts, per generated child, whether it is terminal (contains a final
   answer; forced when ``must_answer``) and its canonical answer id (and optionally a
   reward, for ``reward="given"``), as an :class:`ExpansionResult`.
3. :func:`apply_wave` (jitted) adds the children, then *resolves*: while a tree's UCT
   descent ends at a terminal node, that rollout is complete, so its reward is backed up
   and the next rollout's descent starts, until the descent ends at an expandable node
   (next wave's work) or all ``R`` rollouts are done.  Rollouts that re-reach an existing
   terminal cost no LLM call.

Repeat until :func:`search_done` (``plan.active.any()`` is False once all are done); at
most ``R * D`` waves.  Trees from
:func:`~align_jax.methods.mcts.tree.init_tree` and from :func:`apply_wave` are always
resolved, so every active tree of a plan has work.  :func:`run_search` runs the whole
loop under one ``jit`` for a pure-JAX ``expand_fn`` (scripted environments, tests,
benchmarks); an LLM caller runs the same three steps from Python.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from align_jax.methods.mcts.tree import (
    NO_CHILD,
    ROOT_INDEX,
    Tree,
    TreeSpec,
    _backprop_rows,
    _exclusive_count,
    _expand_rows,
    _scatter,
    _select_rows,
    _terminal_reward_at,
    slot_availability,
)

__all__ = [
    "WavePlan",
    "ExpansionResult",
    "plan_wave",
    "apply_wave",
    "resolve",
    "new_children",
    "run_search",
    "search_done",
]


class WavePlan(NamedTuple):
    """What one wave asks the caller to generate (B trees, A child slots).

    Attributes:
      leaf: int32 ``[B]`` the node to expand (meaningless where not ``active``).
      active: bool ``[B]`` the tree has work this wave (False once its R rollouts are done).
      child_action: int32 ``[B, A]`` action kind (``A1`` .. ``A5``) of each slot.
      child_valid: bool ``[B, A]`` slots to generate: available at ``leaf`` (A5 only at the
        root, A4 only below A3), within node capacity, and ``active``.
      child_index: int32 ``[B, A]`` node index each valid child will get if all of them
        are kept (``NO_CHILD`` elsewhere); after :func:`apply_wave`, :func:`new_children`
        gives the indices actually used.
      child_depth: int32 ``[B]`` depth of the children.
      must_answer: bool ``[B]`` the children are at max depth, hence terminal: the prompt
        should ask for the final answer.
      leaf_action: int32 ``[B]`` action kind that created ``leaf`` (``NO_ACTION`` at the root).
    """

    leaf: jax.Array
    active: jax.Array
    child_action: jax.Array
    child_valid: jax.Array
    child_index: jax.Array
    child_depth: jax.Array
    must_answer: jax.Array
    leaf_action: jax.Array


class ExpansionResult(NamedTuple):
    """What the caller generated for a :class:`WavePlan` (``[B, A]`` each).

    Attributes:
      terminal: bool, the child's text contains a final answer.
      answer_id: int32, its canonical answer (``NO_ANSWER`` if none).
      reward: float32 in ``[0, 1]``, used when ``spec.reward == "given"`` (None: zeros).
      valid: bool, children actually produced (None: ``plan.child_valid``); a planned
        child left out is not added, and a node left with no child becomes a dead end.
    """

    terminal: jax.Array
    answer_id: jax.Array
    reward: Optional[jax.Array] = None
    valid: Optional[jax.Array] = None


def _needs_backup_at(spec: TreeSpec, tree: Tree, b, leaf) -> jax.Array:
    """Tree ``b``'s descent ended where no expansion can happen (terminal, or no slot/node
    left) while rollouts remain: the rollout is complete."""
    available = slot_availability(tree.node_action[b, leaf], leaf == ROOT_INDEX, spec.slot_actions)
    can_grow = jnp.any(available) & (tree.num_nodes[b] < spec.max_nodes)
    return (tree.rollouts_done[b] < spec.num_rollouts) & (tree.terminal[b, leaf] | ~can_grow)


def _complete_rows(spec: TreeSpec, tree: Tree, rows, leaf, enabled, checked: bool) -> Tree:
    """Backs up the rollouts ending at ``leaf`` (made a dead end if not terminal) in the enabled rows."""
    batch = tree.node_visits.shape[0]
    safe = jnp.minimum(rows, batch - 1)
    was_terminal = tree.terminal[safe, leaf]
    dead_end = enabled & ~was_terminal
    # A non-terminal leaf here is a dead end; its answer and reward are already none, so
    # the reward below (computed before marking it) is unaffected.
    reward = jax.vmap(_terminal_reward_at, in_axes=(None, 0, 0, None))(tree, safe, leaf, spec.reward)
    rows_on = jnp.where(enabled, rows, batch) if checked else rows
    tree = tree._replace(
        terminal=_scatter(tree.terminal, (rows_on, leaf), was_terminal | enabled, add=False, checked=checked),
        num_dead_ends=_scatter(tree.num_dead_ends, rows_on, dead_end.astype(jnp.int32), add=True, checked=checked),
        rollouts_done=_scatter(tree.rollouts_done, rows_on, enabled.astype(jnp.int32), add=True, checked=checked),
    )
    return _backprop_rows(tree, rows, leaf, reward, enabled, spec.max_depth, checked=checked)


def _resolve_step(spec: TreeSpec, carry, rows, exploration):
    """Completes one rollout in each pending tree among ``rows`` (B = padding), then re-selects there."""
    tree, leaf, pending = carry
    batch = tree.node_visits.shape[0]
    safe = jnp.minimum(rows, batch - 1)
    enabled = pending[safe] & (rows < batch)
    tree = _complete_rows(spec, tree, rows, leaf[safe], enabled, checked=True)
    new_leaf = _select_rows(tree, safe, exploration[safe], spec.max_depth)
    new_pending = jax.vmap(functools.partial(_needs_backup_at, spec), in_axes=(None, 0, 0))(tree, safe, new_leaf)
    return tree, leaf.at[rows].set(new_leaf, mode="drop"), pending.at[rows].set(new_pending, mode="drop")


def _compact_size(batch: int) -> int:
    return min(batch, max(32, batch // 8))


def _resolve_batch(spec: TreeSpec, tree: Tree, exploration) -> Tree:
    """Backs up rollouts until every unfinished tree's descent ends at an expandable node.

    Each iteration completes one rollout in up to ``_compact_size(B)`` pending trees
    (gathered with ``nonzero``), so an iteration costs O(pending trees), not O(B).  A tree
    completes at most R rollouts, so the loop ends.  Most trees need one backup per wave,
    a few (whose search has converged on known terminals) many: those run alone in the
    last, cheap iterations instead of holding the whole batch.
    """
    batch = tree.node_visits.shape[0]
    rows = jnp.arange(batch, dtype=jnp.int32)
    leaf = _select_rows(tree, rows, exploration, spec.max_depth)
    pending = jax.vmap(functools.partial(_needs_backup_at, spec), in_axes=(None, 0, 0))(tree, rows, leaf)
    size = _compact_size(batch)

    def step(carry):
        pending_rows = jnp.nonzero(carry[2], size=size, fill_value=batch)[0].astype(jnp.int32)
        return _resolve_step(spec, carry, pending_rows, exploration)

    return jax.lax.while_loop(lambda c: jnp.any(c[2]), step, (tree, leaf, pending))[0]


def _plan_at(spec: TreeSpec, tree: Tree, b, leaf) -> WavePlan:
    active = (tree.rollouts_done[b] < spec.num_rollouts) & ~tree.terminal[b, leaf]
    available = slot_availability(tree.node_action[b, leaf], leaf == ROOT_INDEX, spec.slot_actions) & active
    index = tree.num_nodes[b] + _exclusive_count(available)
    valid = available & (index < spec.max_nodes)
    depth = tree.node_depth[b, leaf] + 1
    return WavePlan(
        leaf=leaf,
        active=active,
        child_action=jnp.asarray(spec.slot_actions, jnp.int32),
        child_valid=valid,
        child_index=jnp.where(valid, index, NO_CHILD),
        child_depth=depth,
        must_answer=depth >= spec.max_depth,
        leaf_action=tree.node_action[b, leaf],
    )


def _plan_batch(spec: TreeSpec, tree: Tree, exploration) -> WavePlan:
    rows = jnp.arange(tree.node_visits.shape[0], dtype=jnp.int32)
    leaf = _select_rows(tree, rows, exploration, spec.max_depth)
    return jax.vmap(functools.partial(_plan_at, spec), in_axes=(None, 0, 0))(tree, rows, leaf)


def _apply_batch(spec: TreeSpec, tree: Tree, plan: WavePlan, result: ExpansionResult, exploration) -> Tree:
    rows = jnp.arange(tree.node_visits.shape[0], dtype=jnp.int32)
    tree = _expand_rows(tree, rows, plan.leaf, plan.child_action, plan.child_valid & result.valid, result.terminal,
                        result.answer_id, result.reward, plan.active, spec.max_depth)
    return _resolve_batch(spec, tree, exploration)


def _batched_exploration(tree: Tree, exploration) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(exploration, jnp.float32), (tree.node_visits.shape[0],))


@functools.partial(jax.jit, static_argnums=(0,))
def _plan_wave(spec, tree, exploration):
    return _plan_batch(spec, tree, _batched_exploration(tree, exploration))


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(1,))
def _apply_wave(spec, tree, plan, result, exploration):
    return _apply_batch(spec, tree, plan, result, _batched_exploration(tree, exploration))


@functools.partial(jax.jit, static_argnums=(0,))
def _resolve(spec, tree, exploration):
    return _resolve_batch(spec, tree, _batched_exploration(tree, exploration))


def _check_tree(spec: TreeSpec, tree: Tree) -> None:
    if not isinstance(spec, TreeSpec):
        raise TypeError(f"spec must be a TreeSpec (see make_tree_spec), got {type(spec).__name__}")
    expected = (tree.node_visits.shape[0], spec.max_nodes, spec.num_slots)
    if tree.children_index.shape != expected:
        raise ValueError(f"tree.children_index has shape {tree.children_index.shape}, spec expects [B, M, A] = "
                         f"{list(expected)}")


def plan_wave(spec: TreeSpec, tree: Tree, exploration=2.0) -> WavePlan:
    """The node to expand in each tree and the children to generate (see the module docstring).

    Args:
      spec: static layout; tree: B resolved trees; exploration: UCT constant c (float or
        float32 ``[B]``, traced).
    """
    _check_tree(spec, tree)
    return _plan_wave(spec, tree, exploration)


def _normalize_result(plan: WavePlan, result: ExpansionResult) -> ExpansionResult:
    shape = plan.child_valid.shape
    if not isinstance(result, ExpansionResult):
        raise TypeError(f"result must be an ExpansionResult, got {type(result).__name__}")
    for name in ("terminal", "answer_id", "reward", "valid"):
        value = getattr(result, name)
        if value is not None and tuple(jnp.shape(value)) != tuple(shape):
            raise ValueError(f"result.{name} has shape {tuple(jnp.shape(value))}, the plan's [B, A] is {tuple(shape)}")
    return ExpansionResult(
        terminal=jnp.asarray(result.terminal, bool),
        answer_id=jnp.asarray(result.answer_id, jnp.int32),
        reward=jnp.zeros(shape, jnp.float32) if result.reward is None else jnp.asarray(result.reward, jnp.float32),
        valid=jnp.ones(shape, bool) if result.valid is None else jnp.asarray(result.valid, bool),
    )


def apply_wave(spec: TreeSpec, tree: Tree, plan: WavePlan, result: ExpansionResult, exploration=2.0) -> Tree:
    """Adds the generated children, then backs up every rollout that is now complete.

    ``tree``'s buffers are donated (do not reuse the argument).

    Args:
      spec, tree, plan: as given to / returned by :func:`plan_wave`.
      result: the generated children, ``[B, A]`` each.
      exploration: UCT constant c, the same as in :func:`plan_wave`.

    Returns:
      The resolved trees: each unfinished tree's next descent ends at an expandable node.
    """
    _check_tree(spec, tree)
    return _apply_wave(spec, tree, plan, _normalize_result(plan, result), exploration)


def resolve(spec: TreeSpec, tree: Tree, exploration=2.0) -> Tree:
    """Backs up the rollouts whose descent ends at a terminal node (done by :func:`apply_wave`).

    Needed only after editing trees with the low-level ``expand`` / ``backpropagate``.
    """
    _check_tree(spec, tree)
    return _resolve(spec, tree, exploration)


@jax.jit
def new_children(tree: Tree, plan: WavePlan) -> jax.Array:
    """int32 ``[B, A]`` node index of each child added by the wave of ``plan`` (``NO_CHILD`` = none)."""
    children = jnp.take_along_axis(tree.children_index, plan.leaf[:, None, None], axis=1)[:, 0]
    return jnp.where(plan.active[:, None], children, NO_CHILD)


def search_done(spec: TreeSpec, tree: Tree) -> jax.Array:
    """bool ``[B]``: all R rollouts backed up."""
    return tree.rollouts_done >= spec.num_rollouts


ExpandFn = Callable[[Tree, WavePlan, jax.Array], ExpansionResult]


@functools.partial(jax.jit, static_argnames=("spec", "expand_fn", "max_waves"), donate_argnums=(0,))
def _run_search(tree, key, exploration, *, spec, expand_fn, max_waves):
    exploration = _batched_exploration(tree, exploration)

    def unfinished(carry):
        tree, wave = carry
        return (wave < max_waves) & jnp.any(tree.rollouts_done < spec.num_rollouts)

    def one_wave(carry):
        tree, wave = carry
        plan = _plan_batch(spec, tree, exploration)
        result = expand_fn(tree, plan, jax.random.fold_in(key, wave))
        result = result._replace(
            reward=jnp.zeros(plan.child_valid.shape, jnp.float32) if result.reward is None else result.reward,
            valid=jnp.ones(plan.child_valid.shape, bool) if result.valid is None else result.valid,
        )
        return _apply_batch(spec, tree, plan, result, exploration), wave + 1

    tree = _resolve_batch(spec, tree, exploration)
    return jax.lax.while_loop(unfinished, one_wave, (tree, jnp.int32(0)))


def run_search(spec: TreeSpec, tree: Tree, key: jax.Array, expand_fn: ExpandFn, exploration=2.0,
               max_waves: Optional[int] = None) -> tuple[Tree, jax.Array]:
    """The whole wave loop under one ``jit``, for a pure-JAX expansion function.

    Args:
      spec: static layout.
      tree: B trees (usually fresh from ``init_tree``); its buffers are donated.
      key: consumed; wave w passes ``fold_in(key, w)`` to ``expand_fn``.
      expand_fn: ``(tree, plan, key) -> ExpansionResult`` (pure JAX; hashable, e.g. a
        module-level function: a static argument).
      exploration: UCT constant c (float or float32 ``[B]``).
      max_waves: stop after this many waves (default ``R * D``, enough to finish: a rollout
        expands at most one node per depth below D).

    Returns:
      (trees, number of waves run).
    """
    _check_tree(spec, tree)
    if max_waves is None:
        max_waves = spec.num_rollouts * spec.max_depth
    return _run_search(tree, key, exploration, spec=spec, expand_fn=expand_fn, max_waves=max_waves)
