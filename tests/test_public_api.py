"""Every public name is exported and documented (as optax's CI enforces)."""

import importlib
import inspect

import pytest

PACKAGES = ["align_jax", "align_jax.game", "align_jax.data", "align_jax.llm", "align_jax.methods",
            "align_jax.methods.cage", "align_jax.methods.principals", "align_jax.runner", "align_jax.registry",
            "align_jax.methods.reason_methods", "align_jax.methods.generators", "align_jax.methods.rows",
            "align_jax.game.learner", "align_jax.game.conformance", "align_jax.llm.decoding",
            "align_jax.methods.mcts", "align_jax.methods.econ", "align_jax.sandbox"]


def public_names():
    for package in PACKAGES:
        module = importlib.import_module(package)
        for name in getattr(module, "__all__", []):
            yield package, name


@pytest.mark.parametrize("package,name", list(public_names()))
def test_public_name_is_documented(package, name):
    module = importlib.import_module(package)
    obj = getattr(module, name)
    if inspect.isfunction(obj) or inspect.isclass(obj):
        doc = inspect.getdoc(obj)
        assert doc and len(doc.strip()) > 10, f"{package}.{name} has no docstring"


def test_top_level_reexports_play():
    import align_jax

    assert align_jax.play is importlib.import_module("align_jax.game.delegation").play
