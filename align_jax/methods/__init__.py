"""What a researcher runs: ALIGN end to end with real LLMs, baselines, CAGE decoding.

Plug-in registries (configs select entries by name; each interface ships a conformance test):
:data:`PRINCIPALS`, :data:`CANDIDATE_GENERATORS`, :data:`REASON_METHODS` and CAGE's
:data:`OBJECTIVES`.
"""

from align_jax.methods.align import play_window
from align_jax.methods.cage import OBJECTIVES, CageConfig, load_cage_config, run_cage
from align_jax.methods.candidates import ModelPool, build_question_candidates, stack_candidate_sets
from align_jax.methods.generators import CANDIDATE_GENERATORS, CandidateGenerator, generator_api_test
from align_jax.methods.principals import PRINCIPALS, Principal, make_principal
from align_jax.methods.reason import ReasonConfig, load_reason_config, run_reason
from align_jax.methods.reason_methods import REASON_METHODS, Method, method_api_test
from align_jax.methods.replay import ReplayPrincipal, replay_run
from align_jax.methods.rows import ReasonRow, read_rows

__all__ = [
    "play_window",
    "ModelPool",
    "build_question_candidates",
    "stack_candidate_sets",
    "ReasonConfig",
    "load_reason_config",
    "run_reason",
    "ReplayPrincipal",
    "replay_run",
    "PRINCIPALS",
    "Principal",
    "make_principal",
    "CANDIDATE_GENERATORS",
    "CandidateGenerator",
    "generator_api_test",
    "REASON_METHODS",
    "Method",
    "method_api_test",
    "OBJECTIVES",
    "CageConfig",
    "load_cage_config",
    "run_cage",
    "ReasonRow",
    "read_rows",
]
