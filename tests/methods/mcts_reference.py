"""Slow plain-Python reference of the MCTS tree core (one tree = a list of dict nodes).

Written independently of :mod:`align_jax.methods.mcts` from the documented semantics:
UCT descent (unvisited children first, ties to the lowest slot), expansion of all
available slots of a node (A5 only at the root, A4 only below A3), terminal at max
depth, dead ends, back-up of one visit and the reward along the path, and the rStar
confidence reward.  Arithmetic is numpy float32 so that the JAX core (float32) can be
compared exactly on visits and structure and to rounding on values.
"""

from __future__ import annotations

import math

import numpy as np

A3, A4, A5 = 2, 3, 4
F32 = np.float32


class RefTree:
    """One tree.  ``nodes[i]`` is a dict; ``children`` is a list of A slots (-1 = empty)."""

    def __init__(self, num_rollouts, max_depth, slot_actions, max_nodes, reward="confidence"):
        self.num_rollouts = num_rollouts
        self.max_depth = max_depth
        self.slot_actions = list(slot_actions)
        self.max_nodes = max_nodes
        self.reward_mode = reward
        self.rollouts_done = 0
        self.dead_ends = 0
        self.nodes = [self._node(parent=-1, depth=0, action=-1)]

    def _node(self, parent, depth, action, terminal=False, answer=-1, reward=0.0):
        return dict(visits=0, value_sum=F32(0.0), parent=parent, children=[-1] * len(self.slot_actions),
                    depth=depth, action=action, terminal=terminal, terminal_visits=0, answer=answer,
                    reward=F32(reward))

    # -- primitives ---------------------------------------------------------
    def available(self, node_id):
        node = self.nodes[node_id]
        out = []
        for kind in self.slot_actions:
            ok = True
            if kind == A5 and node_id != 0:
                ok = False
            if kind == A4 and node["action"] != A3:
                ok = False
            out.append(ok)
        return out

    def is_stop(self, node_id):
        node = self.nodes[node_id]
        return node["terminal"] or all(c == -1 for c in node["children"])

    def select(self, c):
        node_id = 0
        while not self.is_stop(node_id):
            node = self.nodes[node_id]
            best_slot, best_score = None, None
            parent_visits = F32(max(node["visits"], 1))
            for slot, child_id in enumerate(node["children"]):
                if child_id == -1:
                    continue
                child = self.nodes[child_id]
                if child["visits"] == 0:
                    score = math.inf
                else:
                    n = F32(child["visits"])
                    score = F32(child["value_sum"] / n) + F32(c) * np.sqrt(np.log(parent_visits) / n)
                if best_score is None or score > best_score:
                    best_slot, best_score = slot, score
            node_id = node["children"][best_slot]
        return node_id

    def expand(self, leaf, child_valid, child_terminal, child_answer, child_reward):
        node = self.nodes[leaf]
        if node["terminal"] or any(c != -1 for c in node["children"]):
            return
        available = self.available(leaf)
        depth = node["depth"] + 1
        added = 0
        for slot, kind in enumerate(self.slot_actions):
            if not (child_valid[slot] and available[slot]) or len(self.nodes) >= self.max_nodes:
                continue
            terminal = bool(child_terminal[slot]) or depth >= self.max_depth
            node["children"][slot] = len(self.nodes)
            self.nodes.append(self._node(parent=leaf, depth=depth, action=kind, terminal=terminal,
                                         answer=int(child_answer[slot]) if terminal else -1,
                                         reward=float(child_reward[slot]) if terminal else 0.0))
            added += 1
        if added == 0:
            self.make_dead_end(leaf)

    def make_dead_end(self, node_id):
        node = self.nodes[node_id]
        node.update(terminal=True, answer=-1, reward=F32(0.0))
        self.dead_ends += 1

    def terminal_reward(self, leaf):
        if self.reward_mode == "given":
            return self.nodes[leaf]["reward"]
        answer = self.nodes[leaf]["answer"]
        answers = [n["answer"] for n in self.nodes if n["terminal"] and n["answer"] != -1]
        if answer == -1 or not answers:
            return F32(0.0)
        return F32(F32(sum(a == answer for a in answers)) / F32(len(answers)))

    def backpropagate(self, leaf, reward):
        self.nodes[leaf]["terminal_visits"] += 1
        node_id = leaf
        while node_id != -1:
            node = self.nodes[node_id]
            node["visits"] += 1
            node["value_sum"] = F32(node["value_sum"] + F32(reward))
            node_id = node["parent"]

    # -- waves --------------------------------------------------------------
    def needs_backup(self, leaf):
        return self.nodes[leaf]["terminal"] or not any(self.available(leaf)) or len(self.nodes) >= self.max_nodes

    def resolve(self, c):
        while self.rollouts_done < self.num_rollouts:
            leaf = self.select(c)
            if not self.needs_backup(leaf):
                return
            if not self.nodes[leaf]["terminal"]:
                self.make_dead_end(leaf)
            self.backpropagate(leaf, self.terminal_reward(leaf))
            self.rollouts_done += 1

    def plan(self, c):
        """(leaf, active, child_valid list, child_index list)."""
        leaf = self.select(c)
        active = self.rollouts_done < self.num_rollouts and not self.nodes[leaf]["terminal"]
        valid, index, next_id = [], [], len(self.nodes)
        for ok in self.available(leaf):
            ok = ok and active and next_id < self.max_nodes
            valid.append(ok)
            index.append(next_id if ok else -1)
            next_id += ok
        return leaf, active, valid, index

    def apply(self, c, leaf, active, child_valid, child_terminal, child_answer, child_reward):
        if active:
            self.expand(leaf, child_valid, child_terminal, child_answer, child_reward)
        self.resolve(c)

    # -- views --------------------------------------------------------------
    def arrays(self):
        """The tree as the JAX core's per-tree arrays (unused slots padded likewise)."""
        m, a = self.max_nodes, len(self.slot_actions)
        out = dict(
            node_visits=np.zeros(m, np.int32), node_value_sum=np.zeros(m, np.float32),
            parent=np.full(m, -1, np.int32), children_index=np.full((m, a), -1, np.int32),
            node_depth=np.full(m, -1, np.int32), node_action=np.full(m, -1, np.int32),
            terminal=np.zeros(m, bool), terminal_visits=np.zeros(m, np.int32),
            answer_id=np.full(m, -1, np.int32), node_reward=np.zeros(m, np.float32))
        for i, n in enumerate(self.nodes):
            out["node_visits"][i] = n["visits"]
            out["node_value_sum"][i] = n["value_sum"]
            out["parent"][i] = n["parent"]
            out["children_index"][i] = n["children"]
            out["node_depth"][i] = n["depth"]
            out["node_action"][i] = n["action"]
            out["terminal"][i] = n["terminal"]
            out["terminal_visits"][i] = n["terminal_visits"]
            out["answer_id"][i] = n["answer"]
            out["node_reward"][i] = n["reward"]
        out["num_nodes"] = len(self.nodes)
        out["rollouts_done"] = self.rollouts_done
        out["num_dead_ends"] = self.dead_ends
        return out

    @classmethod
    def from_arrays(cls, arrays, num_rollouts, max_depth, slot_actions, max_nodes, reward="confidence",
                    rollouts_done=0):
        """A reference tree holding the given per-tree arrays (for testing primitives on random trees)."""
        tree = cls(num_rollouts, max_depth, slot_actions, max_nodes, reward)
        tree.nodes = []
        for i in range(int(arrays["num_nodes"])):
            node = tree._node(parent=int(arrays["parent"][i]), depth=int(arrays["node_depth"][i]),
                              action=int(arrays["node_action"][i]), terminal=bool(arrays["terminal"][i]),
                              answer=int(arrays["answer_id"][i]), reward=float(arrays["node_reward"][i]))
            node.update(visits=int(arrays["node_visits"][i]), value_sum=F32(arrays["node_value_sum"][i]),
                        children=[int(c) for c in arrays["children_index"][i]],
                        terminal_visits=int(arrays["terminal_visits"][i]))
            tree.nodes.append(node)
        tree.rollouts_done = rollouts_done
        return tree
