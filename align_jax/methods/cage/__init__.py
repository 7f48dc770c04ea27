r"""CAGE decoding: multi-objective test-time alignment with trade-off weights.

At every decoding step the base model's next-token distribution is restricted to its
top-``M`` tokens; each objective (a *principal*) values those candidates,
``Q [R, J, M]``; the common-agency equilibrium of :mod:`align_jax.game.common_agency`
turns ``(log pi0, Q, w, tau)`` into the agent's policy ``pi*``, from which the next
token is drawn. ``align-jax cage CONFIG`` sweeps a grid of weights against linear
mixing, ARGS, the base model and best-of-N.

Modules, one concern each:

* :mod:`.objectives` -- the :class:`Objective` interface, the :data:`OBJECTIVES`
  registry, the ``brevity`` and ``format`` objectives (with the phrase automaton);
* :mod:`.guide` -- the ``guide`` objective (a second model stepped in lockstep through
  the sampler's one-step API);
* :mod:`.conformance` -- :func:`objective_api_test`, which every objective must pass;
* :mod:`.processor` -- :class:`CageState`, :func:`make_processor` and the decode drivers;
* :mod:`.metrics` -- hypervolume and dominance counts;
* :mod:`.config` -- :class:`CageConfig` and :func:`load_cage_config`;
* :mod:`.report` -- summary, table and figure;
* :mod:`.run` -- :func:`run_cage` on the shared runner and the ``cage`` command
  (``align`` is its deprecated alias).

Shapes: B prompts, K samples per prompt, R = B K rows, V base vocabulary, M candidate
tokens, J objectives, T new tokens, W weight vectors.
"""

from align_jax.methods.cage.objectives import (
    DEFAULT_PHRASES,
    OBJECTIVES,
    BrevityObjective,
    Completion,
    DecodeContext,
    FormatObjective,
    Objective,
    ObjectiveFactory,
    phrase_transitions,
    token_texts,
)
from align_jax.methods.cage.guide import (
    DEFAULT_GUIDE_PROMPT,
    DEFAULT_NEUTRAL_PROMPT,
    GuideObjective,
    GuideParams,
    GuideState,
)
from align_jax.methods.cage.processor import (
    PROCESSOR_METHODS,
    CageState,
    check_weights,
    decode_weight_grid,
    decode_with_method,
    init_cage,
    make_processor,
)
from align_jax.methods.cage.metrics import dominance_counts, hypervolume
from align_jax.methods.cage.config import METHODS, CageConfig, load_cage_config
from align_jax.methods.cage.report import summarise, summary_markdown, tradeoff_figure
from align_jax.methods.cage.run import add_cage_subcommand, build_objectives, run_cage, run_dir
from align_jax.methods.cage.conformance import objective_api_test

__all__ = [
    "METHODS",
    "PROCESSOR_METHODS",
    "OBJECTIVES",
    "DEFAULT_PHRASES",
    "DEFAULT_GUIDE_PROMPT",
    "DEFAULT_NEUTRAL_PROMPT",
    "DecodeContext",
    "Completion",
    "Objective",
    "ObjectiveFactory",
    "BrevityObjective",
    "FormatObjective",
    "GuideObjective",
    "GuideParams",
    "GuideState",
    "phrase_transitions",
    "token_texts",
    "objective_api_test",
    "CageState",
    "check_weights",
    "init_cage",
    "make_processor",
    "decode_with_method",
    "decode_weight_grid",
    "hypervolume",
    "dominance_counts",
    "CageConfig",
    "load_cage_config",
    "build_objectives",
    "run_cage",
    "run_dir",
    "summarise",
    "summary_markdown",
    "tradeoff_figure",
    "add_cage_subcommand",
]
