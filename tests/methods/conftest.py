"""Fixtures for the methods tests: a tiny random checkpoint and a tiny GSM8K-format data directory.

The tiny model (2 layers, vocabulary 96, random weights) writes gibberish made of the
printable bytes, digits included, so the last-number fallback often extracts a digit;
the data directory's gold answers are single digits, so some candidates are right
and the correctness plumbing is exercised with non-trivial values.
"""

from __future__ import annotations

import json

import pytest

from align_jax.config import config_from_dict

from tests.llm.conftest import make_tiny_config, make_tiny_tokenizer

QUESTIONS = [
    ("What is 3 + 4?", "3 + 4 = 7\n#### 7"),
    ("What is 9 - 7?", "9 - 7 = 2\n#### 2"),
    ("What is 2 * 3?", "2 * 3 = 6\n#### 6"),
    ("What is 8 / 2?", "8 / 2 = 4\n#### 4"),
    ("What is 1 + 0?", "1 + 0 = 1\n#### 1"),
    ("What is 5 + 0?", "5 + 0 = 5\n#### 5"),
]
TRAIN = [
    ("What is 1 + 1?", "1 + 1 = 2\n#### 2"),
    ("What is 4 - 1?", "4 - 1 = 3\n#### 3"),
    ("What is 2 + 2?", "2 + 2 = 4\n#### 4"),
]


def _write_jsonl(path, pairs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in pairs))


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    _write_jsonl(root / "gsm8k" / "test.jsonl", QUESTIONS)
    _write_jsonl(root / "gsm8k" / "train.jsonl", TRAIN)
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """An align_jax checkpoint directory of a tiny random qwen2 model (a valid ``model:`` path)."""
    from flax import nnx

    from align_jax.llm.model import Transformer
    from align_jax.llm.weights import save_checkpoint

    path = tmp_path_factory.mktemp("models") / "tiny-qwen2"
    model = Transformer(make_tiny_config("qwen2", max_position_embeddings=1024), rngs=nnx.Rngs(3))
    save_checkpoint(path, model, make_tiny_tokenizer(), source="random init (tests)")
    return str(path)


@pytest.fixture(scope="session")
def tiny_pool(tiny_checkpoint):
    """One ModelPool for the whole session, so compiled programs are reused across tests."""
    from align_jax.methods.candidates import ModelPool

    return ModelPool()


LIMIT = 4


def tiny_config(checkpoint, data_dir, output_dir, **changes):
    data = dict(
        name="tiny",
        data_dir=str(data_dir),
        limit=LIMIT,
        batch_questions=2,
        seed=3,
        output_dir=str(output_dir),
        agents=[
            dict(model=checkpoint, name="zs", temperature=1.0, top_p=0.9, num_samples=4, max_new_tokens=8),
            dict(model=checkpoint, name="fs", prompt_style="few_shot_cot", num_fewshot=1, temperature=0.8,
                 top_p=0.9, num_samples=3, max_new_tokens=8),
        ],
        principal=dict(type="oracle"),
        game=dict(num_rounds=5),
        debate=dict(rounds=1, max_chars=40),
        bootstrap_samples=200,
    )
    data.update(changes)
    from align_jax.methods import reason

    return config_from_dict(reason.ReasonConfig, data)


@pytest.fixture(scope="session")
def full_run(tiny_checkpoint, tiny_data_dir, tiny_pool, tmp_path_factory):
    config = tiny_config(tiny_checkpoint, tiny_data_dir, tmp_path_factory.mktemp("full"))
    from align_jax.methods import reason

    return config, reason.run_reason(config, progress=False, pool=tiny_pool)
