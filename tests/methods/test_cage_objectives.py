"""CAGE objectives: every registered objective passes the shipped conformance test; objectives are
built from the registry by name, and an unknown name is an error naming the field."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from flax import nnx

from align_jax.config import ConfigError, config_from_dict
from align_jax.llm.model import Transformer
from align_jax.llm.weights import LoadedModel
from align_jax.methods import cage
from align_jax.methods.cage.conformance import objective_api_test
from tests.llm.conftest import make_tiny_config, make_tiny_tokenizer

VOCAB = 96
CONVS = ([{"role": "user", "content": "What is 3 + 4?"}], [{"role": "user", "content": "Name a colour."}])


@pytest.fixture(scope="module")
def guide():
    cfg = make_tiny_config("qwen2", max_position_embeddings=512)
    return LoadedModel(cfg, Transformer(cfg, rngs=nnx.Rngs(5)), make_tiny_tokenizer(), "tiny-guide")


def _config(**changes):
    data = dict(name="x", guide_model="tiny-guide", objectives=["guide", "brevity", "format"],
                weights=[[1.0, 1.0, 1.0]], max_guide_tokens=2)
    data.update(changes)
    return config_from_dict(cage.CageConfig, data)


def _load(guide):
    def load_model(name):
        assert name == "tiny-guide", name
        return guide
    return load_model


@pytest.mark.parametrize("name", sorted(cage.OBJECTIVES.names()))
def test_every_registered_objective_passes_the_conformance_test(name, guide):
    config = _config(objectives=[name], weights=[[1.0]])
    (objective,) = cage.build_objectives(config, _load(guide))
    assert objective.name == name
    tok = guide.tokenizer
    ctx = cage.DecodeContext(tok, VOCAB, CONVS, 2, 4, tuple(tok.eos_token_ids))
    objective_api_test(objective, ctx)


def test_conformance_test_catches_a_broken_objective(guide):
    """The conformance test is not vacuous: an objective whose state loses its row axis, or whose
    values are not [R, M], fails it with a message naming the rule."""
    tok = guide.tokenizer
    ctx = cage.DecodeContext(tok, VOCAB, CONVS, 2, 4, tuple(tok.eos_token_ids))

    class RowlessState(cage.BrevityObjective):
        def init_state(self, ctx):
            return {"counter": jnp.zeros((3,), jnp.int32)}

    class WrongValues(cage.BrevityObjective):
        def values(self, params, state, candidate_ids, step):
            return jnp.zeros(candidate_ids.shape[:1])

    class ChangesDtype(cage.FormatObjective):
        def update(self, params, state, tokens, step):
            return {"matched": state["matched"].astype(jnp.float32)}

    with pytest.raises(AssertionError, match=r"state leaf .*counter.* per-row leaves lead with R=4"):
        objective_api_test(RowlessState(), ctx)
    with pytest.raises(AssertionError, match=r"values must be float32 \[R, M\]=\(4, 8\)"):
        objective_api_test(WrongValues(), ctx)
    with pytest.raises(AssertionError, match="update changed the state's structure, shapes or dtypes"):
        objective_api_test(ChangesDtype(), ctx)


def test_objectives_are_built_from_the_registry_in_config_order(guide):
    config = _config(objectives=["format", "guide"], weights=[[1.0, 2.0]], phrases=["ANSWER:"],
                     guide_prompt="Be terse.")
    built = cage.build_objectives(config, _load(guide))
    assert [type(o) for o in built] == [cage.FormatObjective, cage.GuideObjective]
    assert built[0].phrases == ("ANSWER:",)
    assert built[1].objective_prompt == "Be terse." and built[1].max_guide_tokens == 2
    assert set(cage.OBJECTIVES.names()) == {"guide", "brevity", "format"}


def test_unknown_objective_name_is_an_error_naming_the_field():
    """Old code: a name other than guide/brevity silently became the format objective."""
    config = _config(objectives=["brevity", "format"], weights=[[1.0, 1.0]])
    config.objectives[1] = "formatt"  # lists in a frozen config stay mutable: changed after validation
    with pytest.raises(ConfigError, match=r"objectives\.1: unknown objective 'formatt'; known: .*format"):
        cage.build_objectives(config, lambda name: pytest.fail("no model is needed"))
    with pytest.raises(ConfigError, match=r"objectives\.0: unknown objective 'speed'"):
        config_from_dict(cage.CageConfig, dict(name="x", objectives=["speed"], weights=[[1.0]]))
