"""Padded-array search trees for rStar-style MCTS, batched over B trees (pure JAX).

One tree per (question, agent).  Nodes are reasoning steps; an edge is one of rStar's
action kinds:

  ====  ==========================================================
  A1    propose the next one-step thought
  A2    propose all remaining steps to the answer (usually terminal)
  A3    ask and answer a sub-question
  A4    re-answer the last sub-question (only below an A3 node)
  A5    rephrase the question (only at the root)
  ====  ==========================================================

Layout (mctx style).  All buffers are allocated up front; M = ``spec.max_nodes`` node
slots, A = ``spec.num_slots`` child slots per node.  The child slots of every node
have a fixed action kind, ``spec.slot_actions[j]`` (for example ``(A1, A1, A2, A2, ...)``:
``children_per_expansion`` slots per allowed kind); a slot whose kind is not available
at a node stays empty (``NO_CHILD``).  Node 0 is the root; nodes are numbered in
creation order, the children of one expansion in slot order.

Search semantics (rStar).  A *rollout* is a root-to-terminal path: UCT descends from
the root; an unexpanded non-terminal leaf is expanded (all its available slots at
once: one LLM generation per slot) and the descent continues into its first unvisited
child, and so on until a terminal node is reached; only then is the terminal's reward
back-propagated (one visit and the reward added to every node on the path).  Because
visits only come from backups, ``node_visits = sum(children visits) +
terminal_visits`` holds at every node.  Selection is deterministic (unvisited children
first, ties to the lowest slot), so between two backups the descent from the root
retraces the path of the rollout in progress and no cursor needs to be stored: a
rollout spans up to ``max_depth`` expansion *waves*, see :mod:`align_jax.methods.mcts.wave`.

Terminal nodes: a child the caller flags terminal (its text has a final answer), every
node at ``max_depth``, and a *dead end* -- a node whose expansion added no child
(no node slot left, or the caller produced nothing); a dead end has no answer.
Terminal reward (``spec.reward``): ``"confidence"`` (rStar) is the share of the tree's
answered terminal nodes whose answer id equals this node's (0 without an answer);
``"given"`` is the reward the caller attached to the node when creating it (a
verifier score, or a scripted environment's reward), expected in ``[0, 1]``.

Node capacity.  A rollout expands at most one node per depth ``0 .. max_depth-1``, the
root only once, so ``max_nodes = 1 + S_root + R (D - 1) S_inner`` never overflows,
with R rollouts, D = max depth, S_root = slots usable at the root (all but A4) and
S_inner = slots usable below it (all but A5) (:func:`node_capacity`).  A smaller
``max_nodes`` saves memory; an expansion that does not fit keeps the children that do
(in slot order), and a node with none left becomes a dead end.

Why not ``mctx.search``.  mctx's contract is a ``recurrent_fn(params, key, action,
embedding)`` called *inside* the jitted search loop once per simulation, over a fixed
action space with prior logits, returning a value for every new leaf, and it adds one
edge per simulation.  Here an expansion is a batch of LLM text generations of several
kinds (A1..A5, several children each) whose state is text on the host, run by the
sampler between jitted steps; there is no prior or value network (the reward exists
only at terminals and depends on the tree's own answer set), and one expansion adds
all of a node's children.  Forcing that through ``recurrent_fn`` would need a host
callback per simulation and fake priors/values.  So we keep mctx's conventions -- the
padded ``[B, N]`` / ``[B, N, A]`` arrays, ``ROOT_INDEX``/``NO_PARENT`` constants,
per-tree logic batched with ``vmap``, loops with static bounds -- and own the loop.

Batching.  The per-tree logic (UCT descent, path to the root, reward, which children
to add) is written for one tree ``b`` and vmapped over a vector of tree indices, reading
the batched arrays; the writes are one scatter per field at the batch level.  This
lets the resolve loop of :mod:`~align_jax.methods.mcts.wave` work on a compacted set of
pending trees, so its cost follows the trees that need work rather than B.
"""

from __future__ import annotations

import functools
from typing import Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from align_jax.config import FieldError

__all__ = [
    "ACTION_NAMES",
    "A1",
    "A2",
    "A3",
    "A4",
    "A5",
    "NO_ACTION",
    "ROOT_INDEX",
    "NO_PARENT",
    "NO_CHILD",
    "NO_ANSWER",
    "REWARD_MODES",
    "TreeSpec",
    "Tree",
    "node_capacity",
    "make_tree_spec",
    "init_tree",
    "slot_availability",
    "select",
    "expand",
    "backpropagate",
    "answer_agreement",
    "terminal_reward",
    "TerminalAnswers",
    "terminal_answers",
]

#: rStar action kinds, in code order (``A1`` = 0 ... ``A5`` = 4).
ACTION_NAMES = ("A1", "A2", "A3", "A4", "A5")
A1, A2, A3, A4, A5 = range(5)
#: ``node_action`` of the root (no action created it).
NO_ACTION = -1
ROOT_INDEX = 0
NO_PARENT = -1
NO_CHILD = -1
#: ``answer_id`` of a node without an answer (non-terminal, dead end, unparsable).
NO_ANSWER = -1
#: ``spec.reward`` values.
REWARD_MODES = ("confidence", "given")


class TreeSpec(NamedTuple):
    """Static structure of a tree batch (hashable: a static argument of ``jit``).

    Build it with :func:`make_tree_spec`, which validates it.

    Attributes:
      num_rollouts: R root-to-terminal rollouts per tree.
      max_depth: D; the root has depth 0, nodes at depth D are terminal.
      slot_actions: ``[A]`` action kind (``A1`` .. ``A5``) of each child slot.
      max_nodes: M node slots per tree.
      reward: terminal reward, one of :data:`REWARD_MODES`.
    """

    num_rollouts: int
    max_depth: int
    slot_actions: tuple
    max_nodes: int
    reward: str = "confidence"

    @property
    def num_slots(self) -> int:
        """A, child slots per node."""
        return len(self.slot_actions)


class Tree(NamedTuple):
    """A batch of B search trees with M node slots and A child slots (mctx layout).

    Attributes:
      node_visits: int32 ``[B, M]`` rollouts through the node.
      node_value_sum: float32 ``[B, M]`` sum of the rewards of those rollouts.
      parent: int32 ``[B, M]`` parent index (``NO_PARENT`` for the root and unused slots).
      children_index: int32 ``[B, M, A]`` child in each slot (``NO_CHILD`` = none).
      node_depth: int32 ``[B, M]`` depth (root 0; -1 for unused slots).
      node_action: int32 ``[B, M]`` action kind that created the node (``NO_ACTION`` at
        the root and in unused slots).
      terminal: bool ``[B, M]`` terminal nodes (answer given, at max depth, or dead end).
      terminal_visits: int32 ``[B, M]`` rollouts that ended at the node.
      answer_id: int32 ``[B, M]`` canonical answer of a terminal node (``NO_ANSWER`` = none).
      node_reward: float32 ``[B, M]`` caller-given reward (used when ``spec.reward == "given"``).
      num_nodes: int32 ``[B]`` node slots in use.
      rollouts_done: int32 ``[B]`` completed (backed-up) rollouts.
      num_dead_ends: int32 ``[B]`` nodes that became terminal because nothing could be added.
    """

    node_visits: jax.Array
    node_value_sum: jax.Array
    parent: jax.Array
    children_index: jax.Array
    node_depth: jax.Array
    node_action: jax.Array
    terminal: jax.Array
    terminal_visits: jax.Array
    answer_id: jax.Array
    node_reward: jax.Array
    num_nodes: jax.Array
    rollouts_done: jax.Array
    num_dead_ends: jax.Array

    @property
    def batch_size(self) -> int:
        """B."""
        return self.node_visits.shape[0]

    @property
    def node_value(self) -> jax.Array:
        """float32 ``[B, M]`` mean reward of the rollouts through each node (0 if unvisited)."""
        return self.node_value_sum / jnp.maximum(self.node_visits, 1).astype(jnp.float32)


# --------------------------------------------------------------------------- spec


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def node_capacity(num_rollouts: int, max_depth: int, slot_actions: Sequence[int]) -> int:
    """M that no search of ``num_rollouts`` rollouts can overflow: ``1 + S_root + R (D-1) S_inner``.

    S_root counts the slots usable at the root (all but A4), S_inner those usable below
    it (all but A5); a rollout expands at most one node per depth below D, the root once.
    """
    root_slots = sum(1 for a in slot_actions if a != A4)
    inner_slots = sum(1 for a in slot_actions if a != A5)
    return 1 + root_slots + num_rollouts * (max_depth - 1) * inner_slots


def make_tree_spec(
    rollouts: int = 16,
    max_depth: int = 5,
    actions: Sequence[str] = ACTION_NAMES,
    children_per_expansion: Union[int, Mapping[str, int]] = 2,
    max_nodes: Optional[int] = None,
    reward: str = "confidence",
) -> TreeSpec:
    """Validates search parameters and lays out the child slots.

    Args:
      rollouts: R >= 1.
      max_depth: D >= 1.
      actions: allowed action names (subset of :data:`ACTION_NAMES`, at least one of
        A1, A2, A3 so that every node below the root can be expanded).
      children_per_expansion: children per allowed action kind in one expansion (an int
        for all kinds, or a mapping name -> count over ``actions``).
      max_nodes: M (default :func:`node_capacity`, which cannot overflow).
      reward: one of :data:`REWARD_MODES`.

    Returns:
      A :class:`TreeSpec`; its slots are grouped by kind in code order (A1 first).

    Raises:
      FieldError: (a ``ValueError``) naming the offending field, before anything is
        traced or compiled.
    """
    if not _is_int(rollouts) or rollouts < 1:
        raise FieldError("rollouts", f"rollouts must be an integer >= 1, got {rollouts!r}")
    if not _is_int(max_depth) or max_depth < 1:
        raise FieldError("max_depth", f"max_depth must be an integer >= 1, got {max_depth!r}")
    if isinstance(actions, str) or not isinstance(actions, Sequence) or not actions:
        raise FieldError("actions", f"actions must be a non-empty list of {list(ACTION_NAMES)}, got {actions!r}")
    for name in actions:
        if name not in ACTION_NAMES:
            raise FieldError("actions", f"unknown action {name!r} in actions (known: {', '.join(ACTION_NAMES)})")
    if len(set(actions)) != len(actions):
        raise FieldError("actions", f"actions has duplicates: {list(actions)!r}")
    if not set(actions) & {"A1", "A2", "A3"}:
        raise FieldError("actions", f"actions must include A1, A2 or A3 (A4 and A5 alone cannot extend a "
                                    f"path), got {list(actions)!r}")
    if isinstance(children_per_expansion, Mapping):
        for name, count in children_per_expansion.items():
            if name not in actions:
                raise FieldError("children_per_expansion",
                                 f"children_per_expansion names {name!r}, which is not in actions {list(actions)!r}")
            if not _is_int(count) or count < 1:
                raise FieldError("children_per_expansion",
                                 f"children_per_expansion[{name!r}] must be an integer >= 1, got {count!r}")
        counts = {name: children_per_expansion.get(name, 1) for name in actions}
    else:
        if not _is_int(children_per_expansion) or children_per_expansion < 1:
            raise FieldError("children_per_expansion",
                             f"children_per_expansion must be an integer >= 1, got {children_per_expansion!r}")
        counts = {name: children_per_expansion for name in actions}
    slot_actions = tuple(code for code, name in enumerate(ACTION_NAMES) if name in counts
                         for _ in range(counts[name]))
    if reward not in REWARD_MODES:
        raise FieldError("reward", f"reward must be one of {', '.join(REWARD_MODES)}, got {reward!r}")
    root_slots = sum(1 for a in slot_actions if a != A4)
    if max_nodes is None:
        max_nodes = node_capacity(rollouts, max_depth, slot_actions)
    elif not _is_int(max_nodes) or max_nodes < 1 + root_slots:
        raise FieldError("max_nodes", f"max_nodes must be an integer >= {1 + root_slots} (the root and its "
                                      f"children), got {max_nodes!r}")
    return TreeSpec(num_rollouts=rollouts, max_depth=max_depth, slot_actions=slot_actions,
                    max_nodes=max_nodes, reward=reward)


# --------------------------------------------------------------------------- init


def init_tree(spec: TreeSpec, batch_size: int) -> Tree:
    """B empty trees (root only, unvisited, not terminal).

    Args:
      spec: the static layout (M = ``spec.max_nodes``, A = ``spec.num_slots``).
      batch_size: B.
    """
    if not isinstance(spec, TreeSpec):
        raise TypeError(f"spec must be a TreeSpec (see make_tree_spec), got {type(spec).__name__}")
    if not _is_int(batch_size) or batch_size < 1:
        raise FieldError("batch_size", f"batch_size must be an integer >= 1, got {batch_size!r}")
    return _init_tree(spec, batch_size)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_tree(spec: TreeSpec, batch_size: int) -> Tree:
    b, m, a = batch_size, spec.max_nodes, spec.num_slots
    node_depth = jnp.full((b, m), -1, jnp.int32).at[:, ROOT_INDEX].set(0)
    return Tree(
        node_visits=jnp.zeros((b, m), jnp.int32),
        node_value_sum=jnp.zeros((b, m), jnp.float32),
        parent=jnp.full((b, m), NO_PARENT, jnp.int32),
        children_index=jnp.full((b, m, a), NO_CHILD, jnp.int32),
        node_depth=node_depth,
        node_action=jnp.full((b, m), NO_ACTION, jnp.int32),
        terminal=jnp.zeros((b, m), bool),
        terminal_visits=jnp.zeros((b, m), jnp.int32),
        answer_id=jnp.full((b, m), NO_ANSWER, jnp.int32),
        node_reward=jnp.zeros((b, m), jnp.float32),
        num_nodes=jnp.ones((b,), jnp.int32),
        rollouts_done=jnp.zeros((b,), jnp.int32),
        num_dead_ends=jnp.zeros((b,), jnp.int32),
    )


# --------------------------------------------------------------------------- per-tree reads
# Functions ``*_at(tree, b, ...)`` read tree ``b`` of the batch (``b`` a scalar; they are
# vmapped over a vector of tree indices with the tree unbatched).  Writes are done at the
# batch level by ``*_rows`` functions with one scatter per field.  Writing the per-tree
# logic against explicit tree indices, rather than vmapping a function of one tree that
# returns an updated tree, lets a step touch only a compacted subset of the trees: the
# resolve loop (see ``wave.py``) costs O(pending trees) per iteration, not O(B).


def slot_availability(node_action: jax.Array, is_root: jax.Array, slot_actions: Sequence[int]) -> jax.Array:
    """bool ``[..., A]``: which child slots the action rules allow at a node.

    A5 (rephrase) only at the root; A4 (re-answer) only at a node created by A3; A1-A3
    anywhere.  The allowed action set is already in ``slot_actions``.

    Args:
      node_action: int32 ``[...]`` the node's own action kind.
      is_root: bool ``[...]``.
      slot_actions: static ``[A]`` kind of each slot.
    """
    kinds = jnp.asarray(slot_actions, jnp.int32)
    node_action = jnp.asarray(node_action)[..., None]
    is_root = jnp.asarray(is_root)[..., None]
    a5_ok = (kinds != A5) | is_root
    a4_ok = (kinds != A4) | (node_action == A3)
    return a5_ok & a4_ok


def _descend_at(tree: Tree, b, node, exploration) -> jax.Array:
    """One UCT step in tree ``b``: the chosen child of ``node``, or ``node`` if the descent stops there.

    Score of child c: ``Q(c) + exploration * sqrt(ln N(node) / N(c))``; unvisited children
    first; ties to the lowest slot (``argmax`` takes the first maximum).  The descent stops
    at a terminal node or at one without children (not yet expanded).
    """
    children = tree.children_index[b, node]  # [A]
    exists = children != NO_CHILD
    safe = jnp.maximum(children, 0)
    visits = tree.node_visits[b, safe]
    visits_f = jnp.maximum(visits, 1).astype(jnp.float32)
    mean = tree.node_value_sum[b, safe] / visits_f
    parent_visits = jnp.maximum(tree.node_visits[b, node], 1).astype(jnp.float32)
    bonus = exploration * jnp.sqrt(jnp.log(parent_visits) / visits_f)
    score = jnp.where(visits > 0, mean + bonus, jnp.inf)
    score = jnp.where(exists, score, -jnp.inf)
    stop = tree.terminal[b, node] | ~jnp.any(exists)
    return jnp.where(stop, node, children[jnp.argmax(score)])


def _select_at(tree: Tree, b, exploration, max_depth: int) -> jax.Array:
    # Depth never exceeds max_depth and nodes there are terminal: max_depth steps reach a stop.
    return jax.lax.fori_loop(0, max_depth, lambda _, node: _descend_at(tree, b, node, exploration),
                             jnp.int32(ROOT_INDEX))


def _path_at(tree: Tree, b, leaf, max_depth: int) -> jax.Array:
    """int32 ``[D + 1]``: ``leaf``, its parent, ... the root, then ``NO_PARENT`` padding."""

    def up(i, carry):
        path, node = carry
        path = path.at[i].set(node)
        return path, jnp.where(node != NO_PARENT, tree.parent[b, jnp.maximum(node, 0)], NO_PARENT)

    # A path has at most max_depth + 1 nodes (depths max_depth .. 0).
    path = jnp.full((max_depth + 1,), NO_PARENT, jnp.int32)
    return jax.lax.fori_loop(0, max_depth + 1, up, (path, jnp.asarray(leaf, jnp.int32)))[0]


def answer_agreement(answer_id: jax.Array, weight: jax.Array, query: jax.Array) -> jax.Array:
    """Share of the weight whose answer equals ``query``: ``sum_m w_m [a_m = q] / sum_m w_m``.

    Args:
      answer_id: int32 ``[M]``; weight: float/bool ``[M]`` (0 for entries to ignore);
      query: int32 ``[]`` (or ``[Q]`` for several queries).

    Returns:
      float32, the shape of ``query``; 0 where ``query`` is ``NO_ANSWER`` or the total
      weight is 0.  Entries whose answer is ``NO_ANSWER`` carry no weight.
    """
    query = jnp.asarray(query, jnp.int32)
    weight = jnp.asarray(weight, jnp.float32) * (answer_id != NO_ANSWER)
    total = jnp.sum(weight)
    agree = jnp.sum(weight * (answer_id == query[..., None]), axis=-1)
    return jnp.where((query != NO_ANSWER) & (total > 0), agree / jnp.maximum(total, 1e-30), 0.0)


def _terminal_reward_at(tree: Tree, b, leaf, reward_mode: str) -> jax.Array:
    if reward_mode == "given":
        return tree.node_reward[b, leaf]
    used = jnp.arange(tree.node_visits.shape[1]) < tree.num_nodes[b]
    return answer_agreement(tree.answer_id[b], tree.terminal[b] & used, tree.answer_id[b, leaf])


def _select_rows(tree: Tree, rows, exploration, max_depth: int) -> jax.Array:
    return jax.vmap(_select_at, in_axes=(None, 0, 0, None))(tree, rows, exploration, max_depth)


# --------------------------------------------------------------------------- batch writes
# ``rows`` int32 ``[S]`` are distinct tree indices.  With ``checked=False`` every row is a
# real tree (and masked-off updates write values back or add 0); with ``checked=True`` a
# row equal to B is padding and its updates are dropped.


def _scatter(array: jax.Array, index, values, *, add: bool, checked: bool) -> jax.Array:
    # XLA:CPU's bounds-checked ("drop") scatter is several times slower: use it only
    # where padding rows need it.
    mode = "drop" if checked else "promise_in_bounds"
    ref = array.at[index]
    return ref.add(values, mode=mode) if add else ref.set(values, mode=mode)


def _exclusive_count(mask: jax.Array) -> jax.Array:
    """int32 ``[..., A]``: number of True entries before each slot (a tiny triangular sum;
    XLA:CPU's reduce-window behind ``cumsum`` is slow)."""
    a = mask.shape[-1]
    before = jnp.arange(a)[None, :] < jnp.arange(a)[:, None]  # [j, k]: k < j
    return jnp.sum(before & mask[..., None, :], axis=-1).astype(jnp.int32)


def _backprop_rows(tree: Tree, rows, leaf, reward, enabled, max_depth: int, checked: bool = False) -> Tree:
    """One visit and ``reward`` along each enabled row's path; one terminal visit at its leaf."""
    batch = tree.node_visits.shape[0]
    safe = jnp.minimum(rows, batch - 1)
    paths = jax.vmap(_path_at, in_axes=(None, 0, 0, None))(tree, safe, leaf, max_depth)  # [S, D + 1]
    on_path = (paths != NO_PARENT) & enabled[:, None]
    if checked:
        path_rows = jnp.where(on_path, rows[:, None], batch)
        leaf_rows = jnp.where(enabled, rows, batch)
    else:
        path_rows = jnp.broadcast_to(rows[:, None], paths.shape)
        leaf_rows = rows
    path_nodes = jnp.where(on_path, paths, ROOT_INDEX)  # unchecked padding adds 0 to the root
    return tree._replace(
        node_visits=_scatter(tree.node_visits, (path_rows, path_nodes), on_path.astype(jnp.int32),
                             add=True, checked=checked),
        node_value_sum=_scatter(tree.node_value_sum, (path_rows, path_nodes),
                                jnp.where(on_path, jnp.asarray(reward, jnp.float32)[:, None], 0.0),
                                add=True, checked=checked),
        terminal_visits=_scatter(tree.terminal_visits, (leaf_rows, leaf), enabled.astype(jnp.int32),
                                 add=True, checked=checked),
    )


class _Children(NamedTuple):
    added: jax.Array  # bool [A]
    index: jax.Array  # int32 [A] node index of each added child
    depth: jax.Array  # int32 []
    terminal: jax.Array  # bool [A]
    answer: jax.Array  # int32 [A]
    reward: jax.Array  # float32 [A]
    dead_end: jax.Array  # bool []


def _children_at(tree: Tree, b, leaf, child_action, child_valid, child_terminal, child_answer, child_reward,
                 enabled, max_depth: int) -> _Children:
    """Which children of ``leaf`` in tree ``b`` are added, and their node fields."""
    m = tree.node_visits.shape[1]
    expandable = enabled & ~tree.terminal[b, leaf] & jnp.all(tree.children_index[b, leaf] == NO_CHILD)
    kinds = jnp.asarray(child_action, jnp.int32)
    available = slot_availability(tree.node_action[b, leaf], leaf == ROOT_INDEX, tuple(range(5)))[kinds.clip(0, 4)]
    wanted = expandable & child_valid & available & (kinds >= A1) & (kinds <= A5)
    index = tree.num_nodes[b] + _exclusive_count(wanted)
    added = wanted & (index < m)
    depth = tree.node_depth[b, leaf] + 1
    terminal = jnp.asarray(child_terminal, bool) | (depth >= max_depth)
    return _Children(
        added=added,
        index=index,
        depth=depth,
        terminal=terminal,
        answer=jnp.where(terminal, jnp.asarray(child_answer, jnp.int32), NO_ANSWER),
        reward=jnp.where(terminal, jnp.asarray(child_reward, jnp.float32), 0.0),
        dead_end=expandable & ~jnp.any(added),
    )


def _expand_rows(tree: Tree, rows, leaf, child_action, child_valid, child_terminal, child_answer, child_reward,
                 enabled, max_depth: int) -> Tree:
    """Adds the children of ``leaf[s]`` in tree ``rows[s]`` (rows: every tree, unchecked)."""
    new = jax.vmap(_children_at, in_axes=(None, 0, 0, 0, 0, 0, 0, 0, 0, None))(
        tree, rows, leaf, child_action, child_valid, child_terminal, child_answer, child_reward, enabled, max_depth)
    # Slots not added write the leaf's own (unchanged) values back to the leaf: every index
    # is in bounds and duplicate indices carry equal values.
    target = (rows[:, None], jnp.where(new.added, new.index, leaf[:, None]))

    def put(array, child_values, leaf_values=None):
        leaf_values = array[rows, leaf] if leaf_values is None else leaf_values
        values = jnp.where(new.added, child_values, leaf_values[:, None])
        return _scatter(array, target, values, add=False, checked=False)

    children_row = jnp.where(new.added, new.index, tree.children_index[rows, leaf])
    return tree._replace(
        parent=put(tree.parent, leaf[:, None]),
        children_index=_scatter(tree.children_index, (rows, leaf), children_row, add=False, checked=False),
        node_depth=put(tree.node_depth, new.depth[:, None]),
        node_action=put(tree.node_action, jnp.asarray(child_action, jnp.int32)),
        # A dead end (nothing added) becomes terminal; its answer and reward are already none.
        terminal=put(tree.terminal, new.terminal, tree.terminal[rows, leaf] | new.dead_end),
        answer_id=put(tree.answer_id, new.answer),
        node_reward=put(tree.node_reward, new.reward),
        num_nodes=tree.num_nodes.at[rows].add(jnp.sum(new.added, axis=-1, dtype=jnp.int32)),
        num_dead_ends=tree.num_dead_ends.at[rows].add(new.dead_end.astype(jnp.int32)),
    )


# --------------------------------------------------------------------------- batched API


def _all_rows(tree: Tree) -> jax.Array:
    return jnp.arange(tree.node_visits.shape[0], dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=("max_depth",))
def select(tree: Tree, exploration=2.0, *, max_depth: int) -> jax.Array:
    """Descends each tree from the root by UCT to the node where the descent stops.

    At each node the child maximising ``Q(c) + exploration * sqrt(ln N(node) / N(c))`` is
    taken (``Q`` = mean reward, ``N`` = visits); unvisited children come first and ties
    go to the lowest slot.  The descent stops at a terminal node (returned as such: its
    rollout is complete) or at an unexpanded one (the node to expand).

    Args:
      tree: B trees.
      exploration: UCT constant c, float or float32 ``[B]`` (a traced value: sweeping it
        does not recompile).
      max_depth: static D (the loop bound).

    Returns:
      int32 ``[B]`` the node index per tree.
    """
    exploration = jnp.broadcast_to(jnp.asarray(exploration, jnp.float32), (tree.batch_size,))
    return _select_rows(tree, _all_rows(tree), exploration, max_depth)


@functools.partial(jax.jit, static_argnames=("max_depth",))
def expand(tree: Tree, leaf: jax.Array, child_action: jax.Array, child_valid: jax.Array,
           child_terminal: jax.Array, child_answer: jax.Array, child_reward: Optional[jax.Array] = None,
           *, max_depth: int) -> Tree:
    """Adds the children of one node per tree.

    Child j goes into slot j of ``leaf``; new nodes get indices ``num_nodes, ...`` in slot
    order.  A child is *not* added when its slot is not valid, its action is not
    available at ``leaf`` (A5 off the root, A4 below a non-A3 node), no node slot is left,
    or ``leaf`` is terminal or already expanded.  Children at ``max_depth`` are terminal;
    only terminal children keep an answer and a reward.  An expandable ``leaf`` that gets
    no child becomes a terminal dead end (no answer).

    Args:
      tree: B trees.
      leaf: int32 ``[B]`` the node to expand.
      child_action: int32 ``[B, A]`` action kind of each child.
      child_valid: bool ``[B, A]`` children that exist.
      child_terminal: bool ``[B, A]`` the child's text contains a final answer.
      child_answer: int32 ``[B, A]`` the child's answer id (``NO_ANSWER`` if none).
      child_reward: float32 ``[B, A]`` reward of a terminal child (``reward="given"``), or None.
      max_depth: static D.

    Returns:
      The updated trees.
    """
    if child_reward is None:
        child_reward = jnp.zeros(child_valid.shape, jnp.float32)
    enabled = jnp.ones(leaf.shape, bool)
    return _expand_rows(tree, _all_rows(tree), jnp.asarray(leaf, jnp.int32), child_action, child_valid,
                        child_terminal, child_answer, child_reward, enabled, max_depth)


@functools.partial(jax.jit, static_argnames=("max_depth",))
def backpropagate(tree: Tree, leaf: jax.Array, reward: jax.Array, *, max_depth: int) -> Tree:
    """Adds one visit and ``reward`` to every node from ``leaf`` up to the root.

    Also counts the rollout in ``terminal_visits[leaf]`` (rollouts that ended there), so
    ``node_visits = sum(children visits) + terminal_visits`` stays true.

    Args:
      tree: B trees; leaf: int32 ``[B]``; reward: float32 ``[B]``; max_depth: static D
        (the path has at most D + 1 nodes).
    """
    reward = jnp.broadcast_to(jnp.asarray(reward, jnp.float32), (tree.batch_size,))
    enabled = jnp.ones((tree.batch_size,), bool)
    return _backprop_rows(tree, _all_rows(tree), jnp.asarray(leaf, jnp.int32), reward, enabled, max_depth)


@functools.partial(jax.jit, static_argnames=("reward_mode",))
def terminal_reward(tree: Tree, leaf: jax.Array, *, reward_mode: str = "confidence") -> jax.Array:
    """float32 ``[B]`` the reward a rollout ending at ``leaf`` backs up.

    ``"confidence"`` (rStar): :func:`answer_agreement` of the leaf's answer over the
    tree's terminal nodes that have an answer (each node counts once; 0 without an
    answer); ``"given"``: ``node_reward[leaf]``.
    """
    return jax.vmap(_terminal_reward_at, in_axes=(None, 0, 0, None))(tree, _all_rows(tree), leaf, reward_mode)


class TerminalAnswers(NamedTuple):
    """Per-node view of a tree batch's terminal answers (the candidates of each tree).

    Attributes:
      answer_id: int32 ``[B, M]`` the node's answer (``NO_ANSWER`` where not a terminal with one).
      utility: float32 ``[B, M]`` share of the tree's terminal mass with this answer.
      first: bool ``[B, M]`` the node is the lowest-index one with its answer: the distinct
        answers of tree b are ``answer_id[b, first[b]]``.
    """

    answer_id: jax.Array
    utility: jax.Array
    first: jax.Array


@functools.partial(jax.jit, static_argnames=("utility",))
def terminal_answers(tree: Tree, *, utility: str = "visits") -> TerminalAnswers:
    """Distinct terminal answers of each tree and their utility.

    The mass of a terminal node is its ``terminal_visits`` (``utility="visits"``) or the
    reward its rollouts backed up, ``node_value_sum`` (``utility="reward"``; a terminal
    node has no children, so this is exactly its rollouts' reward); a node's utility is
    the share of its tree's mass over nodes with the same answer.  O(M^2) per tree.
    """
    if utility not in ("visits", "reward"):
        raise FieldError("utility", f"utility must be 'visits' or 'reward', got {utility!r}")
    m = tree.node_visits.shape[1]
    answered = tree.terminal & (tree.answer_id != NO_ANSWER)
    answer = jnp.where(answered, tree.answer_id, NO_ANSWER)
    mass = tree.terminal_visits.astype(jnp.float32) if utility == "visits" else tree.node_value_sum
    mass = jnp.where(answered, mass, 0.0)
    share = jax.vmap(answer_agreement)(answer, mass, answer)
    same = answer[:, :, None] == answer[:, None, :]  # [B, M, M]
    earlier = jnp.tril(jnp.ones((m, m), bool), k=-1)
    first = answered & ~jnp.any(same & earlier & answered[:, None, :], axis=-1)
    return TerminalAnswers(answer_id=answer, utility=share, first=first)
