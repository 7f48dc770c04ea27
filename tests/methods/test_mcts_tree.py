"""The pure-JAX MCTS tree core: invariants, agreement with a Python reference, UCT on a
scripted environment with a known optimal path, reproducibility, no retracing, bad input."""

from __future__ import annotations

import contextlib

import chex
import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest

import align_jax.methods.mcts as mcts
from align_jax.config import ConfigError, FieldError, config_from_dict
from align_jax.methods.mcts import A1, A2, A3, A4, A5, ExpansionResult, MCTSSection

from tests.methods.mcts_reference import F32, RefTree

TREE_FIELDS = ("node_visits", "node_value_sum", "parent", "children_index", "node_depth", "node_action",
               "terminal", "terminal_visits", "answer_id", "node_reward")


# --------------------------------------------------------------------------- helpers


def random_env(tree, plan, key):
    """Random expansions: A2 children and ~30% of the others terminal, answers in 0..3."""
    shape = plan.child_valid.shape
    k_term, k_answer, k_reward = jax.random.split(key, 3)
    terminal = (jax.random.uniform(k_term, shape) < 0.3) | (plan.child_action == A2)
    answer = jax.random.randint(k_answer, shape, 0, 4)
    reward = jax.random.uniform(k_reward, shape)
    return ExpansionResult(terminal=terminal, answer_id=answer, reward=reward)


def check_invariants(spec, tree):
    t = jax.tree.map(np.asarray, tree)
    m = spec.max_nodes
    for b in range(tree.batch_size):
        n = int(t.num_nodes[b])
        assert 1 <= n <= m
        used = np.arange(m) < n
        visits, children = t.node_visits[b], t.children_index[b]
        # visits of a node = sum of its children's visits + rollouts that ended there
        child_visits = np.where(children >= 0, visits[np.maximum(children, 0)], 0).sum(-1)
        np.testing.assert_array_equal(visits, child_visits + t.terminal_visits[b])
        assert visits[0] == t.rollouts_done[b] == spec.num_rollouts
        value = t.node_value_sum[b] / np.maximum(visits, 1)
        assert np.all(value >= -1e-6) and np.all(value <= 1 + 1e-6)
        assert np.all(t.node_depth[b][used] <= spec.max_depth) and np.all(t.node_depth[b][used] >= 0)
        assert np.all(t.terminal[b][used & (t.node_depth[b] == spec.max_depth)])
        # only terminal nodes end rollouts; terminal nodes have no children
        assert np.all(t.terminal_visits[b][~t.terminal[b]] == 0)
        assert np.all(children[t.terminal[b] & (t.terminal_visits[b] > 0)] == -1)
        # unused slots untouched
        assert np.all(visits[~used] == 0) and np.all(children[~used] == -1) and np.all(t.parent[b][~used] == -1)
        # structure: each used non-root node is in its parent's slot of its own action kind
        for node in range(1, n):
            parent = t.parent[b, node]
            assert 0 <= parent < node
            slot = int(np.nonzero(children[parent] == node)[0][0])
            assert spec.slot_actions[slot] == t.node_action[b, node]
            assert t.node_depth[b, node] == t.node_depth[b, parent] + 1
            if t.node_action[b, node] == A5:
                assert parent == 0
            if t.node_action[b, node] == A4:
                assert t.node_action[b, parent] == A3


def ref_arrays_batch(refs):
    arrays = [r.arrays() for r in refs]
    return {k: np.stack([a[k] for a in arrays]) for k in arrays[0]}


def tree_from_refs(refs):
    batch = ref_arrays_batch(refs)
    return mcts.Tree(**{k: jnp.asarray(v) for k, v in batch.items()})


def assert_tree_equals_refs(tree, refs):
    batch = ref_arrays_batch(refs)
    for name, expected in batch.items():
        got = np.asarray(getattr(tree, name))
        if name == "node_value_sum":
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(got, expected, err_msg=name)


@contextlib.contextmanager
def no_compilation():
    events = []

    def listener(name, *args, **kwargs):
        if name.startswith("/jax/core/compile"):
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert not events, f"compiled before raising: {events}"


# --------------------------------------------------------------------------- spec / config


def test_spec_layout_and_capacity():
    spec = mcts.make_tree_spec(rollouts=16, max_depth=5, children_per_expansion=2)
    assert spec.slot_actions == (A1, A1, A2, A2, A3, A3, A4, A4, A5, A5)
    # 1 + root slots (no A4) + R (D-1) inner slots (no A5)
    assert spec.max_nodes == 1 + 8 + 16 * 4 * 8
    spec = mcts.make_tree_spec(rollouts=3, max_depth=2, actions=("A3", "A1"), children_per_expansion={"A3": 2})
    assert spec.slot_actions == (A1, A3, A3) and spec.max_nodes == 1 + 3 + 3 * 1 * 3
    section = MCTSSection()
    assert section.tree_spec().num_rollouts == 16 and section.exploration == 2.0
    loaded = config_from_dict(MCTSSection, {"actions": ["A1", "A2"], "rollouts": 4})
    assert loaded.actions == ("A1", "A2") and loaded.tree_spec().slot_actions == (A1, A1, A2, A2)


@pytest.mark.parametrize("changes,field", [
    (dict(rollouts=0), "rollouts"),
    (dict(rollouts=2.5), "rollouts"),
    (dict(max_depth=0), "max_depth"),
    (dict(actions=("A1", "A9")), "actions"),
    (dict(actions=("A1", "A1")), "actions"),
    (dict(actions=("A4", "A5")), "actions"),
    (dict(actions=()), "actions"),
    (dict(children_per_expansion=0), "children_per_expansion"),
    (dict(exploration=-1.0), "exploration"),
    (dict(exploration=float("nan")), "exploration"),
    (dict(utility="votes"), "utility"),
    (dict(reward="verifier"), "reward"),
    (dict(max_nodes=3), "max_nodes"),
])
def test_bad_input_names_the_field_before_any_compile(changes, field):
    with no_compilation():
        with pytest.raises(FieldError) as info:
            MCTSSection(**changes)
        assert info.value.field == field and field in str(info.value)
        assert isinstance(info.value, ValueError)
        with pytest.raises(ConfigError, match=rf"mcts_test: {field}"):
            config_from_dict(MCTSSection, {k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()},
                             source="mcts_test")


def test_make_tree_spec_rejects_unknown_action_name():
    with no_compilation():
        with pytest.raises(ValueError, match="unknown action 'B1'"):
            mcts.make_tree_spec(actions=("A1", "B1"))
        with pytest.raises(FieldError, match="children_per_expansion"):
            mcts.make_tree_spec(actions=("A1",), children_per_expansion={"A2": 1})
        with pytest.raises(FieldError, match="batch_size"):
            mcts.init_tree(mcts.make_tree_spec(), 0)


# --------------------------------------------------------------------------- invariants


SEARCH_SPEC = dict(rollouts=12, max_depth=4, children_per_expansion=1)


def random_search(key, reward="confidence", max_nodes=None, exploration=2.0, batch=16):
    spec = mcts.make_tree_spec(reward=reward, max_nodes=max_nodes, **SEARCH_SPEC)
    tree, waves = mcts.run_search(spec, mcts.init_tree(spec, batch), key, random_env, exploration=exploration)
    return spec, tree, waves


def test_invariants_after_random_rollouts():
    spec, tree, waves = random_search(jax.random.key(1))
    check_invariants(spec, tree)
    assert int(waves) <= spec.num_rollouts * spec.max_depth
    assert bool(jnp.all(mcts.search_done(spec, tree)))
    assert int(tree.num_dead_ends.sum()) == 0  # the default capacity cannot overflow
    assert int(tree.num_nodes.max()) > 1 + 4  # the searches went below the root's children
    answers = mcts.terminal_answers(tree, utility="visits")
    totals = np.asarray(jnp.where(answers.first, answers.utility, 0.0).sum(-1))
    has_answer = np.asarray(answers.first.any(-1))
    np.testing.assert_allclose(totals[has_answer], 1.0, rtol=1e-5)


def test_action_availability_in_plans():
    spec = mcts.make_tree_spec(**SPECS[0])  # slots A1..A5, one each (compiled programs shared)
    tree = mcts.init_tree(spec, WAVE_BATCH)
    plan = mcts.plan_wave(spec, tree)
    assert plan.leaf.tolist() == [0, 0, 0] and bool(plan.active.all())
    # at the root: A5 yes, A4 no (the root was not created by A3)
    assert plan.child_valid[0].tolist() == [True, True, True, False, True]
    np.testing.assert_array_equal(plan.child_index[0], [1, 2, 3, -1, 4])
    none = np.zeros((WAVE_BATCH, 5), bool)
    tree = mcts.apply_wave(spec, tree, plan, ExpansionResult(terminal=none, answer_id=np.full((WAVE_BATCH, 5), -1)))
    plan = mcts.plan_wave(spec, tree)  # descends into the first child (A1, node 1): A1-A3, no A4/A5
    assert int(plan.leaf[0]) == 1 and plan.child_valid[0].tolist() == [True, True, True, False, False]
    assert int(plan.leaf_action[0]) == A1 and int(plan.child_depth[0]) == 2 and not bool(plan.must_answer[0])
    # below the A3 child (node 3): A4 becomes available
    avail = mcts.slot_availability(jnp.array([A3, A1, -1]), jnp.array([False, False, True]), spec.slot_actions)
    assert avail.tolist() == [[True, True, True, True, False], [True, True, True, False, False],
                              [True, True, True, False, True]]
    # a restricted action set has only its own slots
    spec2 = mcts.make_tree_spec(rollouts=2, max_depth=2, actions=("A2", "A5"), children_per_expansion=2)
    plan2 = mcts.plan_wave(spec2, mcts.init_tree(spec2, 1))
    assert plan2.child_action[0].tolist() == [A2, A2, A5, A5] and bool(plan2.child_valid[0].all())


def test_low_level_expand_masks_illegal_children_and_depth():
    spec = mcts.make_tree_spec(rollouts=2, max_depth=1, children_per_expansion=1)
    tree = mcts.init_tree(spec, 2)
    actions = jnp.tile(jnp.arange(5, dtype=jnp.int32), (2, 1))
    valid = jnp.array([[True] * 5, [False] * 5])
    tree = mcts.expand(tree, jnp.zeros(2, jnp.int32), actions, valid, jnp.zeros((2, 5), bool),
                       jnp.full((2, 5), 3, jnp.int32), max_depth=spec.max_depth)
    # tree 0: A4 refused at the root; children at max depth 1 are terminal and keep their answer
    assert tree.children_index[0, 0].tolist() == [1, 2, 3, -1, 4] and int(tree.num_nodes[0]) == 5
    assert bool(tree.terminal[0, 1:5].all()) and tree.answer_id[0, 1:5].tolist() == [3, 3, 3, 3]
    # tree 1: nothing produced -> the root is a dead end
    assert int(tree.num_nodes[1]) == 1 and bool(tree.terminal[1, 0]) and int(tree.num_dead_ends[1]) == 1
    # expanding an already expanded node is a no-op
    again = mcts.expand(tree, jnp.zeros(2, jnp.int32), actions, valid, jnp.zeros((2, 5), bool),
                        jnp.zeros((2, 5), jnp.int32), max_depth=spec.max_depth)
    chex.assert_trees_all_equal(again, tree)


# --------------------------------------------------------------------------- vs the Python reference


def random_ref_tree(rng, spec, expansions):
    """A random tree built by the reference (random leaves, random children), then random stats."""
    ref = RefTree(*spec)
    a = spec.num_slots
    for _ in range(expansions):
        open_leaves = [i for i in range(len(ref.nodes)) if ref.is_stop(i) and not ref.nodes[i]["terminal"]]
        if not open_leaves:
            break
        leaf = int(rng.choice(open_leaves))
        ref.expand(leaf, rng.random(a) < 0.8, rng.random(a) < 0.3, rng.integers(0, 3, a), rng.random(a))
    for node in ref.nodes:
        node["visits"] = int(rng.integers(0, 4))
        node["value_sum"] = F32(rng.random() * node["visits"])
    return ref


@pytest.mark.parametrize("seed", range(4))
def test_select_and_backprop_match_reference_on_random_trees(seed):
    rng = np.random.default_rng(seed)
    spec = mcts.make_tree_spec(rollouts=6, max_depth=4, children_per_expansion={"A1": 2, "A3": 2, "A4": 1},
                               actions=("A1", "A2", "A3", "A4"), reward="confidence")
    for _ in range(5):
        refs = [random_ref_tree(rng, spec, int(rng.integers(0, 12))) for _ in range(8)]
        tree = tree_from_refs(refs)
        exploration = rng.choice([0.0, 0.5, 2.0, 5.0], size=8).astype(np.float32)
        leaves = mcts.select(tree, exploration, max_depth=spec.max_depth)
        assert leaves.tolist() == [r.select(c) for r, c in zip(refs, exploration)]
        # rewards: the confidence helper vs the reference's, then back-up from random nodes
        leaves = np.array([rng.integers(0, len(r.nodes)) for r in refs], np.int32)
        conf = mcts.terminal_reward(tree, jnp.asarray(leaves))
        np.testing.assert_array_equal(np.asarray(conf), [r.terminal_reward(int(l)) for r, l in zip(refs, leaves)])
        reward = rng.random(8).astype(np.float32)
        tree = mcts.backpropagate(tree, jnp.asarray(leaves), jnp.asarray(reward), max_depth=spec.max_depth)
        for r, leaf, value in zip(refs, leaves, reward):
            r.backpropagate(int(leaf), value)
        assert_tree_equals_refs(tree, refs)


SPECS = [
    dict(rollouts=5, max_depth=3, children_per_expansion=1, reward="confidence"),
    dict(rollouts=6, max_depth=2, actions=("A1", "A2", "A3", "A4"), children_per_expansion=2, reward="given"),
    dict(rollouts=4, max_depth=4, actions=("A1", "A3", "A4", "A5"), children_per_expansion={"A1": 2},
         reward="confidence"),
    dict(rollouts=8, max_depth=3, actions=("A1", "A2", "A3", "A5"), children_per_expansion=1, max_nodes=9,
         reward="given"),
]
WAVE_BATCH = 3


@pytest.mark.parametrize("spec_index", range(len(SPECS)))
def test_waves_match_reference(spec_index):
    """Whole searches, wave by wave: plans, then every tree array after each wave (B = 3, 4 seeds)."""
    spec = mcts.make_tree_spec(**SPECS[spec_index])
    rng = np.random.default_rng(100 + spec_index)
    batch, a = WAVE_BATCH, spec.num_slots
    dead_ends = 0
    for _ in range(4):  # random seeds
        exploration = rng.choice([0.3, 1.0, 2.0], size=batch).astype(np.float32)
        tree = mcts.init_tree(spec, batch)
        refs = [RefTree(*spec) for _ in range(batch)]
        for _wave in range(spec.num_rollouts * spec.max_depth + 1):
            plan = jax.tree.map(np.asarray, mcts.plan_wave(spec, tree, exploration))
            for b, (r, c) in enumerate(zip(refs, exploration)):
                leaf, active, valid, index = r.plan(c)
                assert (bool(plan.active[b]), plan.child_valid[b].tolist(), plan.child_index[b].tolist()) == (
                    active, valid, index)
                if active:
                    assert int(plan.leaf[b]) == leaf
            if not plan.active.any():
                break
            result = ExpansionResult(
                terminal=(rng.random((batch, a)) < 0.35) | (plan.child_action == A2),
                answer_id=rng.integers(-1, 3, (batch, a)).astype(np.int32),
                reward=rng.random((batch, a)).astype(np.float32),
                valid=rng.random((batch, a)) < 0.9,
            )
            tree = mcts.apply_wave(spec, tree, plan, result, exploration)
            for b, (r, c) in enumerate(zip(refs, exploration)):
                r.apply(c, int(plan.leaf[b]), bool(plan.active[b]), plan.child_valid[b] & result.valid[b],
                        result.terminal[b], result.answer_id[b], result.reward[b])
            assert_tree_equals_refs(tree, refs)
        else:
            raise AssertionError("search did not finish within R * D waves")
        check_invariants(spec, tree)
        dead_ends += int(tree.num_dead_ends.sum())
    if spec.max_nodes < mcts.node_capacity(spec.num_rollouts, spec.max_depth, spec.slot_actions):
        assert dead_ends > 0  # capacity overflow: dead ends, never an out-of-range node


# --------------------------------------------------------------------------- scripted known optimum

OPTIMAL_SLOT = 1


def _on_optimal_path(tree_b, node, depth):
    def up(_, carry):
        node, ok = carry
        parent = tree_b.parent[node]
        live = parent != mcts.NO_PARENT
        ok = ok & jnp.where(live, tree_b.children_index[jnp.maximum(parent, 0), OPTIMAL_SLOT] == node, True)
        return jnp.where(live, parent, node), ok

    return jax.lax.fori_loop(0, depth, up, (node, jnp.bool_(True)))[1]


def optimal_path_env(tree, plan, key):
    """Depth-3 tree (A1 x 2 slots): the leaf reached by slot 1 three times pays 1, every other 0.1."""
    del key
    shape = plan.child_valid.shape
    leaf_on_path = jax.vmap(lambda t, leaf: _on_optimal_path(t, leaf, 3))(tree, plan.leaf)
    reward = jnp.where(leaf_on_path[:, None] & (jnp.arange(shape[1]) == OPTIMAL_SLOT), 1.0, 0.1)
    return ExpansionResult(terminal=jnp.zeros(shape, bool), answer_id=jnp.zeros(shape, jnp.int32), reward=reward)


def test_uct_finds_the_known_optimal_path():
    spec = mcts.make_tree_spec(rollouts=16, max_depth=3, actions=("A1",), children_per_expansion=2, reward="given")
    tree, waves = mcts.run_search(spec, mcts.init_tree(spec, 2), jax.random.key(0), optimal_path_env,
                                  exploration=jnp.array([2.0, 1.0]))
    check_invariants(spec, tree)
    assert int(waves) == 1 + 2 + 4  # every internal node expanded once; revisiting terminals is free
    for b in range(2):
        node = 0
        for _ in range(3):  # follow the most visited child
            children = tree.children_index[b, node]
            assert int(jnp.argmax(tree.node_visits[b, children])) == OPTIMAL_SLOT
            node = int(children[OPTIMAL_SLOT])
        assert float(tree.node_reward[b, node]) == 1.0
        root_children = tree.node_visits[b, tree.children_index[b, 0]]
        assert int(root_children[OPTIMAL_SLOT]) > int(root_children[1 - OPTIMAL_SLOT])
    # with c = 2 on a 16-rollout budget the optimal leaf gets the largest share of visits
    leaf_visits = jnp.where(tree.terminal[0], tree.terminal_visits[0], 0)
    assert float(tree.node_reward[0, jnp.argmax(leaf_visits)]) == 1.0


def test_confidence_reward_favours_the_consistent_answer():
    """Half the terminal children answer 7, the others scatter over 30 answers: the rStar
    confidence reward concentrates the visits on 7 (host-driven waves, as with an LLM)."""
    spec = mcts.make_tree_spec(**SPECS[0])  # confidence reward; programs shared with the tests above
    rng = np.random.default_rng(3)
    tree = mcts.init_tree(spec, WAVE_BATCH)
    while not bool(mcts.search_done(spec, tree).all()):
        plan = mcts.plan_wave(spec, tree)
        terminal = np.asarray(plan.child_action == A2) | (rng.random(plan.child_valid.shape) < 0.3)
        answer = np.where(np.asarray(plan.child_index) % 2 == 0, 7, rng.integers(10, 40, plan.child_valid.shape))
        tree = mcts.apply_wave(spec, tree, plan, ExpansionResult(terminal=terminal, answer_id=answer.astype(np.int32)))
    check_invariants(spec, tree)
    for utility in ("visits", "reward"):
        answers = mcts.terminal_answers(tree, utility=utility)
        best = jnp.take_along_axis(answers.answer_id, jnp.argmax(answers.utility, -1)[:, None], 1)[:, 0]
        assert best.tolist() == [7] * WAVE_BATCH, utility
        # a node's utility is its answer's share of the tree's terminal mass
        ids, util = np.asarray(answers.answer_id[0]), np.asarray(answers.utility[0])
        mass = np.asarray(tree.terminal_visits[0] if utility == "visits" else tree.node_value_sum[0], np.float64)
        mass = np.where(ids >= 0, mass, 0.0)
        for node in np.nonzero(ids >= 0)[0]:
            np.testing.assert_allclose(util[node], mass[ids == ids[node]].sum() / mass.sum(), rtol=1e-5)


def test_answer_agreement_known_values():
    answers = jnp.array([3, 3, 5, -1, 3, 5], jnp.int32)
    weight = jnp.array([1, 1, 1, 1, 0, 1], jnp.float32)
    share = mcts.answer_agreement(answers, weight, jnp.array([3, 5, 9, -1]))
    np.testing.assert_allclose(np.asarray(share), [0.5, 0.5, 0.0, 0.0])
    assert float(mcts.answer_agreement(answers, jnp.zeros(6), jnp.int32(3))) == 0.0


# --------------------------------------------------------------------------- reproducibility / compilation


def test_reproducible_from_the_key():
    _, first, _ = random_search(jax.random.key(7))
    _, again, _ = random_search(jax.random.key(7))
    _, other, _ = random_search(jax.random.key(8))
    chex.assert_trees_all_equal(first, again)
    assert not all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(first, other))


def test_no_retrace_on_second_call():
    from align_jax.methods.mcts import wave

    spec = mcts.make_tree_spec(**SPECS[0])
    sizes = []
    for seed, c in ((0, 2.0), (1, 0.5)):  # new key, new exploration value, new data: same programs
        random_search(jax.random.key(seed), exploration=c)
        tree = mcts.init_tree(spec, WAVE_BATCH)
        plan = mcts.plan_wave(spec, tree, c)
        result = ExpansionResult(terminal=np.ones((WAVE_BATCH, 5), bool),
                                 answer_id=np.full((WAVE_BATCH, 5), seed, np.int32))
        tree = mcts.apply_wave(spec, tree, plan, result, c)
        leaves = mcts.select(tree, c, max_depth=spec.max_depth)
        tree = mcts.backpropagate(tree, leaves, jnp.full(WAVE_BATCH, c), max_depth=spec.max_depth)
        mcts.terminal_reward(tree, leaves)
        sizes.append([f._cache_size() for f in (wave._run_search, wave._plan_wave, wave._apply_wave, mcts.select,
                                                 mcts.backpropagate, mcts.terminal_reward)])
    assert sizes[0] == sizes[1], sizes
    # chex's trace counter on a jitted user of the core
    step = jax.jit(chex.assert_max_traces(lambda t, c: mcts.select(t, c, max_depth=spec.max_depth), n=1))
    step(tree, 1.0)
    step(tree, 3.0)


def test_public_names_documented():
    import inspect

    for name in mcts.__all__:
        obj = getattr(mcts, name)
        if inspect.isfunction(obj) or inspect.isclass(obj) or hasattr(obj, "__wrapped__"):
            doc = inspect.getdoc(obj)
            assert doc and len(doc) > 10, name
