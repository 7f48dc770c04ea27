"""rStar-style Monte-Carlo tree search over reasoning steps, batched over B trees (pure JAX core).

Tree statistics live in padded arrays (:class:`Tree`, mctx layout); selection,
expansion bookkeeping and back-propagation are jitted and vmapped over all trees, and
the LLM expansions of one *wave* across all trees form one sampler batch
(:func:`plan_wave` -> generate -> :func:`apply_wave`).  See
:mod:`align_jax.methods.mcts.tree` for the search semantics and why the loop is ours
rather than ``mctx.search``, and :mod:`align_jax.methods.mcts.wave` for the wave loop.

With an LLM: :class:`MCTSGenerator` (:mod:`~align_jax.methods.mcts.generator`, registered
as the ``mcts`` candidate generator: ``candidates: {type: mcts, mcts: {...}}`` in a
reason config) and the rStar baseline rows (:mod:`~align_jax.methods.mcts.rstar`,
methods ``rstar`` and ``rstar_discriminator``).
"""

from align_jax.methods.mcts.config import UTILITIES, MCTSSection
from align_jax.methods.mcts.generator import (
    SEARCH_LISTENERS,
    MCTSGenerator,
    SearchStats,
    WaveStats,
    first_paragraph,
    has_final_answer,
    split_steps,
)
from align_jax.methods.mcts.rstar import RStarDiscriminator, RStarMajority, masked_prefix
from align_jax.methods.mcts.tree import (
    A1,
    A2,
    A3,
    A4,
    A5,
    ACTION_NAMES,
    NO_ACTION,
    NO_ANSWER,
    NO_CHILD,
    NO_PARENT,
    REWARD_MODES,
    ROOT_INDEX,
    TerminalAnswers,
    Tree,
    TreeSpec,
    answer_agreement,
    backpropagate,
    expand,
    init_tree,
    make_tree_spec,
    node_capacity,
    select,
    slot_availability,
    terminal_answers,
    terminal_reward,
)
from align_jax.methods.mcts.wave import (
    ExpansionResult,
    WavePlan,
    apply_wave,
    new_children,
    plan_wave,
    resolve,
    run_search,
    search_done,
)

__all__ = [
    "MCTSSection",
    "UTILITIES",
    "MCTSGenerator",
    "SearchStats",
    "WaveStats",
    "SEARCH_LISTENERS",
    "has_final_answer",
    "first_paragraph",
    "split_steps",
    "RStarMajority",
    "RStarDiscriminator",
    "masked_prefix",
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
    "WavePlan",
    "ExpansionResult",
    "plan_wave",
    "apply_wave",
    "resolve",
    "new_children",
    "run_search",
    "search_done",
]
