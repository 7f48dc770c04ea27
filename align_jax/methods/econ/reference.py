"""A slow, straightforward NumPy/Python reference of ECON's simulator and update.

It exists to check the JAX implementation (same loss and gradients on the same batch,
``tests/methods/econ/test_reference.py``) and as the baseline of the throughput benchmark
(``experiments/bench_econ.py``).  It covers the pooling-only encoder (``num_blocks = 0``):
attention blocks are not implemented here.  Gradients are written out by hand.

Everything follows :mod:`~align_jax.methods.econ.networks`, :mod:`~align_jax.methods.econ.losses`
and :mod:`~align_jax.methods.econ.sim` equation by equation; the simulator draws its
randomness from a NumPy generator (so trajectories differ from the JAX ones in their
random numbers, not in their law).  Parameters are nested dicts of NumPy arrays in the
layout of ``nnx.State.to_pure_dict()``: ``{"belief": ..., "encoder": ..., "mixer": ...}``.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from align_jax.methods.econ.config import TEMPERATURE_RANGE, TOP_P_RANGE, EconConfig, TrainConfig
from align_jax.methods.econ.sim import COMMITMENT_DIM

__all__ = ["params_to_numpy", "loss_and_grads", "NumpyEnv", "NumpyTrainer"]


def params_to_numpy(params) -> dict:
    """:class:`~align_jax.methods.econ.networks.EconParams` -> nested dict of float64 arrays."""

    def conv(node):
        return {k: conv(v) if isinstance(v, dict) else np.asarray(v, np.float64) for k, v in node.items()}

    return {"belief": conv(params.belief.to_pure_dict()), "encoder": conv(params.encoder.to_pure_dict()),
            "mixer": conv(params.mixer.to_pure_dict())}


def _lin(p):
    return p["kernel"], p["bias"]


def _elu(x):
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0.0)))


def _elu_grad(x):
    return np.where(x > 0, 1.0, np.exp(np.minimum(x, 0.0)))


def _agents(p, obs):
    """obs [B, N, F] -> cache dict with beliefs [B, N, D] and q [B, N, A]."""
    bp = p["belief"]
    w_in, b_in = _lin(bp["input_layer"])
    w_b, b_b = _lin(bp["belief_layer"])
    w_q1, b_q1 = _lin(bp["q_hidden"])
    w_q2, b_q2 = _lin(bp["q_out"])
    a1 = np.einsum("bnf,nfh->bnh", obs, w_in) + b_in
    h1 = np.maximum(a1, 0.0)
    belief = np.tanh(np.einsum("bnh,nhd->bnd", h1, w_b) + b_b)
    a3 = np.einsum("bnd,ndh->bnh", belief, w_q1) + b_q1
    h3 = np.maximum(a3, 0.0)
    q = np.einsum("bnh,nha->bna", h3, w_q2) + b_q2
    return dict(obs=obs, a1=a1, h1=h1, belief=belief, a3=a3, h3=h3, q=q)


def _group(belief, mask):
    return (belief * mask[..., None]).sum(1) / np.maximum(mask.sum(1), 1.0)[:, None]


def _mixer_parts(p, encoded, group):
    mp = p["mixer"]
    n = encoded.shape[1]
    z = np.concatenate([encoded, np.broadcast_to(group[:, None, :], encoded.shape)], axis=-1)
    u1 = z @ mp["hyper_w1"]["kernel"] + mp["hyper_w1"]["bias"]
    b1 = group @ mp["hyper_b1"]["kernel"] + mp["hyper_b1"]["bias"]
    u2 = group @ mp["hyper_w2"]["kernel"] + mp["hyper_w2"]["bias"]
    a4 = group @ mp["hyper_b2_hidden"]["kernel"] + mp["hyper_b2_hidden"]["bias"]
    h4 = np.maximum(a4, 0.0)
    b2 = (h4 @ mp["hyper_b2_out"]["kernel"] + mp["hyper_b2_out"]["bias"])[:, 0]
    del n
    return dict(z=z, u1=u1, w1=np.abs(u1), b1=b1, u2=u2, w2=np.abs(u2), a4=a4, h4=h4, b2=b2)


def _mix_value(parts, q, mask):
    x = np.einsum("bn,bne->be", q * mask, parts["w1"]) + parts["b1"]
    return x, (_elu(x) * parts["w2"]).sum(-1) + parts["b2"]


def _zeros_like(tree):
    return {k: _zeros_like(v) if isinstance(v, dict) else np.zeros_like(v) for k, v in tree.items()}


def loss_and_grads(p: dict, target: dict, batch: dict, config: TrainConfig) -> tuple[float, dict, dict]:
    """The loss of :mod:`~align_jax.methods.econ.losses` and its gradient w.r.t. ``p``.

    Args:
      p, target: online and target parameters (:func:`params_to_numpy` layout).
      batch: dict of arrays with the fields of ``Transition`` and a leading B axis.
      config: the loss weights and gamma.
    Returns:
      (loss, parts {td, mixer, consistency, bne}, grads in the layout of ``p``).
    """
    obs, act, mask = batch["obs"], batch["action"].astype(int), batch["mask"]
    bsz, n = act.shape
    # ---- targets (no gradient)
    tc = _agents(target, batch["next_obs"])
    next_max = tc["q"].max(-1)
    t_group = _group(tc["belief"], mask)
    _, next_tot = _mix_value(_mixer_parts(target, tc["belief"], t_group), next_max, mask)
    gamma, done = config.gamma, batch["done"]
    y_local = batch["local_reward"] + gamma * (1.0 - done)[:, None] * next_max
    y_tot = batch["team_reward"] + gamma * (1.0 - done) * next_tot
    # ---- forward
    c = _agents(p, obs)
    q = c["q"]
    q_taken = np.take_along_axis(q, act[..., None], -1)[..., 0]
    best = q.argmax(-1)
    q_best = q.max(-1)
    belief = c["belief"]
    group = _group(belief, mask)
    enc = p["encoder"]["commitment_head"]
    c_hat = belief @ enc["kernel"] + enc["bias"]
    parts = _mixer_parts(p, belief, group)
    x, q_tot = _mix_value(parts, q_taken, mask)
    hid = _elu(x)
    delta = q_best - q_taken  # [B, N]
    x_dev = x[:, None, :] + (mask * delta)[..., None] * parts["w1"]  # [B, N, E]
    gains = ((_elu(x_dev) - hid[:, None, :]) * parts["w2"][:, None, :]).sum(-1) * mask
    m_tot = max(mask.sum(), 1.0)
    cdim = c_hat.shape[-1]
    td = (mask * (q_taken - y_local) ** 2).sum() / m_tot
    mixer = np.mean((q_tot - y_tot) ** 2)
    cons = (mask * ((c_hat - batch["commit_features"][:, None, :]) ** 2).mean(-1)).sum() / m_tot
    bne = gains.sum() / m_tot
    loss = (config.td_weight * td + config.mixer_weight * mixer + config.consistency_weight * cons
            + config.bne_weight * bne)
    # ---- backward
    g = _zeros_like(p)
    d_qt = config.td_weight * 2.0 * mask * (q_taken - y_local) / m_tot
    d_qtot = config.mixer_weight * 2.0 * (q_tot - y_tot) / bsz
    d_chat = config.consistency_weight * 2.0 * mask[..., None] * (c_hat - batch["commit_features"][:, None, :]) / (
        cdim * m_tot)
    d_gain = config.bne_weight * mask / m_tot
    w1, w2 = parts["w1"], parts["w2"]
    # Q_tot = elu(x) . w2 + b2
    d_w2 = d_qtot[:, None] * hid
    d_b2 = d_qtot
    d_x = d_qtot[:, None] * w2 * _elu_grad(x)
    # gains_i = (elu(x_dev_i) - elu(x)) . w2
    dev_diff = _elu(x_dev) - hid[:, None, :]
    d_w2 += (d_gain[..., None] * dev_diff).sum(1)
    d_xdev = d_gain[..., None] * w2[:, None, :] * _elu_grad(x_dev)  # [B, N, E]
    d_x += d_xdev.sum(1) - d_gain.sum(1)[:, None] * w2 * _elu_grad(x)
    d_delta = mask * (d_xdev * w1).sum(-1)
    d_w1 = (mask * delta)[..., None] * d_xdev
    # x = sum_i m_i q_i W1_i + b1
    d_qt = d_qt + mask * np.einsum("be,bne->bn", d_x, w1) - d_delta
    d_qbest = d_delta
    d_w1 += (mask * q_taken)[..., None] * d_x[:, None, :]
    d_b1 = d_x
    mp, gm = p["mixer"], g["mixer"]
    d_u1 = d_w1 * np.sign(parts["u1"])
    gm["hyper_w1"]["kernel"] = np.einsum("bnz,bne->ze", parts["z"], d_u1)
    gm["hyper_w1"]["bias"] = d_u1.sum((0, 1))
    d_z = d_u1 @ mp["hyper_w1"]["kernel"].T
    dim = belief.shape[-1]
    d_belief = d_z[..., :dim].copy()
    d_group = d_z[..., dim:].sum(1)
    gm["hyper_b1"]["kernel"] = group.T @ d_b1
    gm["hyper_b1"]["bias"] = d_b1.sum(0)
    d_group += d_b1 @ mp["hyper_b1"]["kernel"].T
    d_u2 = d_w2 * np.sign(parts["u2"])
    gm["hyper_w2"]["kernel"] = group.T @ d_u2
    gm["hyper_w2"]["bias"] = d_u2.sum(0)
    d_group += d_u2 @ mp["hyper_w2"]["kernel"].T
    gm["hyper_b2_out"]["kernel"] = parts["h4"].T @ d_b2[:, None]
    gm["hyper_b2_out"]["bias"] = np.array([d_b2.sum()])
    d_a4 = d_b2[:, None] * mp["hyper_b2_out"]["kernel"][:, 0][None, :] * (parts["a4"] > 0)
    gm["hyper_b2_hidden"]["kernel"] = group.T @ d_a4
    gm["hyper_b2_hidden"]["bias"] = d_a4.sum(0)
    d_group += d_a4 @ mp["hyper_b2_hidden"]["kernel"].T
    # encoder (pooling): group = sum_i m_i b_i / sum_i m_i ; commitment head
    d_belief += mask[..., None] * d_group[:, None, :] / np.maximum(mask.sum(1), 1.0)[:, None, None]
    g["encoder"]["commitment_head"]["kernel"] = np.einsum("bnd,bnc->dc", belief, d_chat)
    g["encoder"]["commitment_head"]["bias"] = d_chat.sum((0, 1))
    d_belief += d_chat @ enc["kernel"].T
    # local Qs -> belief networks
    a_num = q.shape[-1]
    d_q = np.eye(a_num)[act] * d_qt[..., None] + np.eye(a_num)[best] * d_qbest[..., None]
    bp, gb = p["belief"], g["belief"]
    gb["q_out"]["kernel"] = np.einsum("bnh,bna->nha", c["h3"], d_q)
    gb["q_out"]["bias"] = d_q.sum(0)
    d_a3 = np.einsum("bna,nha->bnh", d_q, bp["q_out"]["kernel"]) * (c["a3"] > 0)
    gb["q_hidden"]["kernel"] = np.einsum("bnd,bnh->ndh", belief, d_a3)
    gb["q_hidden"]["bias"] = d_a3.sum(0)
    d_belief += np.einsum("bnh,ndh->bnd", d_a3, bp["q_hidden"]["kernel"])
    d_a2 = d_belief * (1.0 - belief ** 2)
    gb["belief_layer"]["kernel"] = np.einsum("bnh,bnd->nhd", c["h1"], d_a2)
    gb["belief_layer"]["bias"] = d_a2.sum(0)
    d_a1 = np.einsum("bnd,nhd->bnh", d_a2, bp["belief_layer"]["kernel"]) * (c["a1"] > 0)
    gb["input_layer"]["kernel"] = np.einsum("bnf,bnh->nfh", obs, d_a1)
    gb["input_layer"]["bias"] = d_a1.sum(0)
    info = dict(td=td, mixer=mixer, consistency=cons, bne=bne)
    del n
    return float(loss), info, g


def _leaves(tree, out=None):
    out = [] if out is None else out
    for k in sorted(tree, key=str):
        v = tree[k]
        if isinstance(v, dict):
            _leaves(v, out)
        else:
            out.append(v)
    return out


class NumpyEnv:
    """The simulator of :mod:`~align_jax.methods.econ.sim`, one question, in plain Python.

    Args:
      params: an :class:`~align_jax.methods.econ.sim.EnvParams` (converted to NumPy).
      num_groups, max_rounds, num_answers: as in ``SimConfig``.
      rng: a ``numpy.random.Generator``.
    """

    def __init__(self, params, num_groups: int, max_rounds: int, num_answers: int, rng: np.random.Generator):
        self.p = {k: np.asarray(v, np.float64) for k, v in params._asdict().items()}
        self.n = len(self.p["executor_mask"])
        self.g, self.t_max, self.k = num_groups, max_rounds, num_answers
        self.m = self.n // num_groups
        self.rng = rng
        self.reset()

    def reset(self) -> np.ndarray:
        p, r = self.p, self.rng
        self.difficulty = p["difficulty_mean"] + p["difficulty_std"] * r.standard_normal()
        self.strategy = p["strategy_quality"] + p["strategy_std"] * r.standard_normal(self.g)
        self.distractor = p["distractor_scale"] * r.standard_normal(self.k - 1)
        groups = [i // self.m for i in range(self.n)]
        self.d_obs = self.difficulty + p["observation_noise"] * r.standard_normal(self.n)
        self.s_obs = self.strategy[groups] + p["observation_noise"] * r.standard_normal(self.n)
        self.round, self.prev_commit = 0, -1
        self.prev_action = np.zeros((self.n, 2))
        self.prev_agree = np.zeros(self.n)
        self.prev_cf = np.zeros(COMMITMENT_DIM)
        return self.observe()

    def observe(self) -> np.ndarray:
        rows = []
        for i in range(self.n):
            mi = self.p["executor_mask"][i]
            onehot = np.zeros(self.t_max)
            onehot[min(self.round, self.t_max - 1)] = 1.0
            feats = np.concatenate([[self.d_obs[i], self.s_obs[i]], self.prev_action[i], [self.prev_agree[i]],
                                    self.prev_cf, onehot])
            rows.append(np.concatenate([feats * mi, [mi]]))
        return np.stack(rows)

    def _answer(self, i: int, temperature: float, top_p: float) -> int:
        p = self.p
        logit = (p["skill"][i] + p["strategy_gain"] * self.strategy[i // self.m] - self.difficulty
                 - p["temperature_curvature"] * (math.log(temperature) - p["log_best_temperature"][i]) ** 2
                 - p["top_p_curvature"] * (top_p - p["best_top_p"]) ** 2)
        p_correct = 1.0 / (1.0 + math.exp(-logit))
        wrong = np.exp(self.distractor / temperature - np.max(self.distractor / temperature))
        wrong /= wrong.sum()
        order = np.argsort(-wrong)
        cum, keep = 0.0, np.zeros(len(wrong), bool)
        for j in order:
            if cum < top_p:
                keep[j] = True
            cum += wrong[j]
        wrong = np.where(keep, wrong, 0.0)
        wrong /= wrong.sum()
        probs = np.concatenate([[p_correct], (1 - p_correct) * wrong])
        return int(self.rng.choice(self.k, p=probs / probs.sum()))

    def _coordinate(self, answers, mask, skill) -> int:
        p, r = self.p, self.rng
        votes = np.zeros(self.k)
        for a, mi in zip(answers, mask):
            votes[a] += mi
        top = np.flatnonzero(votes == votes.max())
        majority = int(r.choice(top))
        recognise = votes[0] > 0 and r.random() < skill
        clarity = math.exp(-p["overload_rate"] * max(sum(mask) - p["coordinator_capacity"], 0.0))
        if r.random() < clarity:
            return 0 if recognise else majority
        present = [a for a, mi in zip(answers, mask) if mi > 0]
        return int(r.choice(present))

    def step(self, temperature: np.ndarray, top_p: np.ndarray):
        """One round; returns (obs, local_reward [N], team_reward, done, commit_features, commit_correct)."""
        p, mask = self.p, self.p["executor_mask"]
        temperature = np.clip(temperature, *TEMPERATURE_RANGE)
        top_p = np.clip(top_p, *TOP_P_RANGE)
        answers = []
        for i in range(self.n):
            if self.round > 0 and self.rng.random() < p["anchoring"]:
                answers.append(self.prev_commit)
            else:
                answers.append(self._answer(i, float(temperature[i]), float(top_p[i])))
        group_commits, present = [], []
        for gi in range(self.g):
            sl = slice(gi * self.m, (gi + 1) * self.m)
            present.append(float(mask[sl].sum() > 0))
            group_commits.append(self._coordinate(answers[sl], mask[sl], p["coordinator_skill"]))
        commit = group_commits[0] if self.g == 1 else self._coordinate(group_commits, present, p["central_skill"])
        n_active = max(mask.sum(), 1.0)
        w = p["reward_weights"]
        local, al_cc = np.zeros(self.n), 0.0
        agree = np.array([float(a == commit) for a in answers])
        for i in range(self.n):
            others = sum(mask[j] for j in range(self.n) if j != i)
            same = sum(mask[j] for j in range(self.n) if j != i and answers[j] == answers[i])
            novelty = 1.0 - same / others if others > 0 else 1.0
            cc = 0.5 * (agree[i] + novelty)
            local[i] = mask[i] * (w[0] * (answers[i] == 0) + w[1] * agree[i] + w[2] * cc)
            al_cc += mask[i] * (w[1] * agree[i] + w[2] * cc)
        team = w[0] * (commit == 0) + al_cc / n_active
        share = (agree * mask).sum() / n_active
        changed = float(self.round > 0 and commit != self.prev_commit)
        cf = np.array([share, changed, float(share >= 1.0)])

        def var(x):
            mean = (x * mask).sum() / n_active
            return (mask * (x - mean) ** 2).sum() / n_active

        done = (self.round >= self.t_max - 1 or (self.round > 0 and commit == self.prev_commit)
                or var(temperature) + var(top_p) < p["variance_threshold"])
        correct = commit == 0
        if done:
            obs = self.reset()
            return obs, local, team, True, cf, correct
        lo, hi = math.log(TEMPERATURE_RANGE[0]), math.log(TEMPERATURE_RANGE[1])
        self.prev_action = np.stack([2 * (np.log(temperature) - lo) / (hi - lo) - 1,
                                     2 * (top_p - TOP_P_RANGE[0]) / (TOP_P_RANGE[1] - TOP_P_RANGE[0]) - 1], 1)
        self.prev_agree, self.prev_cf, self.prev_commit = agree, cf, commit
        self.round += 1
        return self.observe(), np.zeros(self.n), 0.0, False, cf, correct


class NumpyTrainer:
    """The training loop of :mod:`~align_jax.methods.econ.train` in NumPy/Python (one seed).

    Args:
      config: an :class:`~align_jax.methods.econ.config.EconConfig` with ``network.num_blocks == 0``.
      params: initial parameters (:func:`params_to_numpy` layout).
      env_params: the simulator's :class:`~align_jax.methods.econ.sim.EnvParams`.
      grid: the A (temperature, top-p) pairs.
      seed: NumPy seed.
    """

    def __init__(self, config: EconConfig, params: dict, env_params, grid, seed: int = 0):
        if config.network.num_blocks != 0:
            raise NotImplementedError("the NumPy reference implements num_blocks = 0 only")
        self.cfg, self.tr = config, config.train
        self.rng = np.random.default_rng(seed)
        self.params = params
        self.target = {k: _copy(v) for k, v in params.items()}
        self.grid = np.asarray(grid, np.float64)
        self.envs = [NumpyEnv(env_params, config.sim.num_groups, config.sim.max_rounds, config.sim.num_answers,
                              self.rng) for _ in range(self.tr.num_envs)]
        self.obs = [e.observe() for e in self.envs]
        self.mask = np.asarray(env_params.executor_mask, np.float64)
        n, f = self.obs[0].shape
        cap = self.tr.buffer_size
        self.buf = dict(obs=np.zeros((cap, n, f)), action=np.zeros((cap, n), int), local_reward=np.zeros((cap, n)),
                        team_reward=np.zeros(cap), next_obs=np.zeros((cap, n, f)), done=np.zeros(cap),
                        mask=np.zeros((cap, n)), commit_features=np.zeros((cap, COMMITMENT_DIM)))
        self.size = self.pos = 0
        self.m = [np.zeros_like(x) for x in _leaves(self.params)]
        self.v = [np.zeros_like(x) for x in _leaves(self.params)]
        self.t = 0
        self.step_count = 0
        self.losses: list[float] = []

    def _epsilon(self) -> float:
        frac = min(max(1.0 - self.step_count / self.tr.epsilon_decay_steps, 0.0), 1.0)
        return self.tr.epsilon_end + (self.tr.epsilon_start - self.tr.epsilon_end) * frac

    def step(self) -> None:
        """One training step: E rounds, E transitions, and an update every ``update_every`` steps."""
        eps, a_num = self._epsilon(), len(self.grid)
        for e, env in enumerate(self.envs):
            obs = self.obs[e]
            q = _agents(self.params, obs[None])["q"][0]
            action = np.where(self.rng.random(len(q)) < eps, self.rng.integers(0, a_num, len(q)), q.argmax(-1))
            next_obs, local, team, done, cf, _ = env.step(self.grid[action, 0], self.grid[action, 1])
            item = dict(obs=obs, action=action, local_reward=local * done, team_reward=team * done,
                        next_obs=next_obs, done=float(done), mask=self.mask, commit_features=cf)
            for k, v in item.items():
                self.buf[k][self.pos] = v
            self.pos = (self.pos + 1) % self.tr.buffer_size
            self.size = min(self.size + 1, self.tr.buffer_size)
            self.obs[e] = next_obs
        self.step_count += 1
        if self.step_count % self.tr.update_every == 0 and self.size >= self.tr.batch_size:
            self.update()

    def update(self) -> None:
        """One Adam step on a uniformly sampled batch, then the soft target update."""
        idx = self.rng.integers(0, self.size, self.tr.batch_size)
        batch = {k: v[idx] for k, v in self.buf.items()}
        loss, _, grads = loss_and_grads(self.params, self.target, batch, self.tr)
        self.losses.append(loss)
        gl, pl, tl = _leaves(grads), _leaves(self.params), _leaves(self.target)
        norm = math.sqrt(sum(float((x ** 2).sum()) for x in gl))
        if self.tr.max_grad_norm > 0 and norm >= self.tr.max_grad_norm:
            gl = [x / norm * self.tr.max_grad_norm for x in gl]
        self.t += 1
        b1, b2, lr, eps = 0.9, 0.999, self.tr.learning_rate, 1e-8
        for i, (gi, pi, ti) in enumerate(zip(gl, pl, tl)):
            self.m[i] = b1 * self.m[i] + (1 - b1) * gi
            self.v[i] = b2 * self.v[i] + (1 - b2) * gi ** 2
            m_hat = self.m[i] / (1 - b1 ** self.t)
            v_hat = self.v[i] / (1 - b2 ** self.t)
            pi -= lr * m_hat / (np.sqrt(v_hat) + eps)
            ti *= 1 - self.tr.tau
            ti += self.tr.tau * pi

    def run(self, num_steps: int, time_limit: Optional[float] = None) -> int:
        """Runs up to ``num_steps`` steps (stopping after ``time_limit`` seconds); returns steps run."""
        import time

        start = time.perf_counter()
        for i in range(num_steps):
            self.step()
            if time_limit is not None and time.perf_counter() - start > time_limit:
                return i + 1
        return num_steps


def _copy(tree):
    return {k: _copy(v) if isinstance(v, dict) else v.copy() for k, v in tree.items()}
