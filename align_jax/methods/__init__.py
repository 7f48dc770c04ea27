"""What a researcher runs: ALIGN end to end with real LLMs, baselines, CAGE decoding."""

from align_jax.methods.align import play_window
from align_jax.methods.candidates import ModelPool, build_question_candidates, stack_candidate_sets
from align_jax.methods.reason import ReasonConfig, load_reason_config, run_reason
from align_jax.methods.replay import ReplayPrincipal, replay_run

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
]
