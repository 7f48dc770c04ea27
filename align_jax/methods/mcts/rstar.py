"""The rStar baseline rows of a ``reason`` run with MCTS candidates.

* ``rstar`` -- ``rstar/<agent>``: rStar's answer without its discriminator: the majority
  answer over the agent's R rollouts (each rollout votes for the answer of the terminal
  node it ended at; ties count as the expected correctness of a uniform pick among them).
  Cost: the agent's search.
* ``rstar_discriminator`` -- ``rstar_disc/<agent>``: rStar's mutual consistency. For each
  distinct terminal trajectory of the agent, a second model (``candidates.mcts.discriminator``)
  sees the question (zero-shot prompt) and the first ``ceil((1 - mask_fraction) S)``
  of its S steps (at most S - 1) and completes the rest greedily; the trajectory is
  *accepted* when the completion's answer equals the trajectory's. The pick is the answer
  with the most rollouts among accepted trajectories (the plain majority when none is
  accepted). Cost: the agent's search plus the discriminator's calls (one sampler call
  per window, rows padded to a power of two).

Both are enabled only when ``candidates.type`` is ``mcts`` (and, for the second, a
discriminator is configured), so runs with sampled candidates keep their rows.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import jax
import numpy as np

from align_jax.data.answers import canonicalize, extract_answer
from align_jax.methods import baselines as baselines_lib
from align_jax.methods.candidates import Cost, agent_conversation
from align_jax.methods.mcts.generator import split_steps

__all__ = ["RStarMajority", "RStarDiscriminator", "masked_prefix"]


def _is_mcts(config) -> bool:
    return getattr(getattr(config, "candidates", None), "type", None) == "mcts"


@dataclasses.dataclass(frozen=True)
class RStarMajority:
    """``rstar/<agent>``: majority over the agent's MCTS rollouts (rStar without discriminator)."""

    name: str = "rstar"
    section: Optional[str] = None
    stage: Optional[str] = None

    def enabled(self, config) -> bool:
        """Only with ``candidates: {type: mcts}``."""
        return _is_mcts(config)

    def result_names(self, agent_names: Sequence[str]) -> list[str]:
        """``rstar/<agent>`` per agent."""
        return [f"rstar/{a}" for a in agent_names]

    def run(self, window) -> list:
        """One output per question (see the module docstring)."""
        from align_jax.methods.reason_methods import MethodOutput, method_record

        outputs = []
        for q, question in enumerate(window.questions):
            results = {}
            for i, agent in enumerate(question.agents):
                vote = baselines_lib.majority_vote(agent.answer_ids, agent.answers, window.correct_maps[q])
                results[f"rstar/{window.agent_names[i]}"] = method_record(vote.answer, vote.correct,
                                                                          window.sample_costs[q][i])
            outputs.append(MethodOutput(results))
        return outputs


def masked_prefix(text: str, mask_fraction: float) -> str:
    """The first ``min(S - 1, ceil((1 - mask_fraction) S))`` steps of a trajectory of S steps,
    each followed by a blank line (empty for a one-step trajectory)."""
    steps = split_steps(text)
    keep = min(len(steps) - 1, math.ceil((1.0 - mask_fraction) * len(steps)))
    return "".join(s + "\n\n" for s in steps[:max(keep, 0)])


@dataclasses.dataclass(frozen=True)
class RStarDiscriminator:
    """``rstar_disc/<agent>``: rStar's mutual-consistency check by a discriminator model."""

    name: str = "rstar_discriminator"
    section: Optional[str] = None
    stage: Optional[str] = "discriminator"
    key_stage: int = 4
    batch_size: int = 32

    def enabled(self, config) -> bool:
        """Only with MCTS candidates and ``candidates.mcts.discriminator`` set."""
        return _is_mcts(config) and config.candidates.mcts.discriminator is not None

    def result_names(self, agent_names: Sequence[str]) -> list[str]:
        """``rstar_disc/<agent>`` per agent."""
        return [f"rstar_disc/{a}" for a in agent_names]

    def run(self, window) -> list:
        """One output per question (see the module docstring)."""
        from align_jax.methods.reason_methods import MethodOutput, method_record

        section = window.config.candidates.mcts
        model = section.discriminator or window.agents[0].model  # (disabled without one; the fallback serves tests)
        pool = window.pool
        jobs = []  # (q, i, text, answer_id, visits)
        for q, question in enumerate(window.questions):
            for i, agent in enumerate(question.agents):
                seen = {}
                for text, answer_id in zip(agent.texts, agent.answer_ids):
                    if answer_id >= 0:
                        seen[text] = (answer_id, seen.get(text, (answer_id, 0))[1] + 1)
                jobs += [(q, i, text, aid, visits) for text, (aid, visits) in seen.items()]
        accepted = [False] * len(jobs)
        costs = [[Cost() for _ in window.agents] for _ in window.questions]
        if jobs:
            sampler, tokenizer = pool.sampler(model), pool.tokenizer(model)
            prompts = []
            for q, i, text, _, _ in jobs:
                conversation = agent_conversation(window.problems[q].question,
                                                  dataclasses.replace(window.agents[i], prompt_style="zero_shot_cot",
                                                                      exemplars=()))
                prompts.append(list(tokenizer.encode(pool.render_chat(model, conversation)
                                                     + masked_prefix(text, section.mask_fraction),
                                                     add_special_tokens=False)))
            key = jax.random.fold_in(window.key, self.key_stage)
            for start in range(0, len(jobs), self.batch_size):
                chunk = list(range(start, min(start + self.batch_size, len(jobs))))
                size = 1 << max(0, (len(chunk) - 1).bit_length())
                rows = [prompts[j] for j in chunk] + [prompts[chunk[-1]]] * (size - len(chunk))
                budget = max(section.answer_budget(a.max_new_tokens) for a in window.agents)
                out = sampler.generate(rows, key=jax.random.fold_in(key, start), num_samples=1,
                                       max_new_tokens=budget, temperature=0.0)
                for r, j in enumerate(chunk):
                    q, i, text, answer_id, _ = jobs[j]
                    completion = masked_prefix(text, section.mask_fraction) + out.text[r][0]
                    answer = extract_answer(completion)
                    reference = window.questions[q].answers_by_id.get(answer_id)
                    accepted[j] = answer is not None and canonicalize([reference, answer]).tolist() == [0, 0]
                    costs[q][i] = costs[q][i] + Cost(1, int(out.lengths[r, 0]), len(prompts[j]))
        outputs = []
        for q, question in enumerate(window.questions):
            results = {}
            for i, agent in enumerate(question.agents):
                votes = {}
                for (jq, ji, _, answer_id, visits), ok in zip(jobs, accepted):
                    if jq == q and ji == i and ok:
                        votes[answer_id] = votes.get(answer_id, 0) + visits
                if votes:
                    top = max(votes.values())
                    tied = [a for a, v in votes.items() if v == top]
                    correct = float(np.mean([bool(window.correct_maps[q].get(a, False)) for a in tied]))
                    answer = question.answers_by_id[tied[0]]
                else:
                    vote = baselines_lib.majority_vote(agent.answer_ids, agent.answers, window.correct_maps[q])
                    answer, correct = vote.answer, vote.correct
                results[f"rstar_disc/{window.agent_names[i]}"] = method_record(
                    answer, correct, window.sample_costs[q][i] + costs[q][i])
            outputs.append(MethodOutput(results))
        return outputs
