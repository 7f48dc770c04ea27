"""The sampler and scoring on a device mesh (data and tensor parallel) equal one device.

8 forced host devices need ``XLA_FLAGS`` before JAX starts, so every check runs in one fresh
process (:data:`_CHECKS`) that prints a JSON report; the tests below read it. The process runs
the XLA path (``ALIGN_JAX_NATIVE_KERNELS=0``, what GPUs run). Tiny random models: a Qwen2-style
one (8 query heads, 4 KV heads, biases, untied head) and a Mistral-style one (tied
embeddings, sliding window, so the cache carries slot positions).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

_CHECKS = textwrap.dedent("""
    import json, os
    import jax, numpy as np
    from flax import nnx
    from align_jax.llm import sharding
    from align_jax.llm.model import ModelConfig, Transformer
    from align_jax.llm.sampler import Sampler
    from align_jax.llm.scoring import score_continuations

    assert len(jax.devices()) == 8, jax.devices()
    report = {}

    def config(arch, **changes):
        base = dict(arch=arch, vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=8, num_kv_heads=4, head_dim=8, rope_theta=1e4, rms_norm_eps=1e-6,
                    max_position_embeddings=128, tie_word_embeddings=arch != "qwen2",
                    attention_bias=arch == "qwen2")
        base.update(changes)
        return ModelConfig(**base)

    def model(cfg, seed=0):
        graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))
        # sharpen the std-0.02 init so greedy paths have clear margins
        return nnx.merge(graphdef, jax.tree.map(lambda x: x * 8.0 if x.ndim == 2 else x, state))

    qwen = model(config("qwen2"))
    mistral = model(config("mistral", sliding_window=4), seed=1)
    prompts = [[3, 4, 5], [7, 8, 9, 10, 11, 12, 13], [20], [5, 6], [1, 2, 3, 4], [9], [10, 11], [12, 13, 14]]
    greedy = dict(key=jax.random.key(0), max_new_tokens=8, temperature=0.0, eos_token_ids=())
    sampled = dict(key=jax.random.key(1), max_new_tokens=8, temperature=0.8, top_p=0.9, num_samples=2,
                   eos_token_ids=(2,))

    def spec_of(x):  # the PartitionSpec as a list, trailing Nones dropped
        spec = list(x.sharding.spec)
        while spec and spec[-1] is None:
            spec.pop()
        return spec

    def compare(name, mdl, mesh, batch, **kw):
        ref = Sampler(mdl).generate(batch, **kw)
        mesh = sharding.make_mesh(*mesh) if isinstance(mesh, tuple) else mesh
        out = Sampler(mdl, mesh=mesh).generate(batch, **kw)
        report[name] = dict(
            tokens_equal=bool(np.array_equal(out.tokens, ref.tokens)),
            lengths_equal=bool(np.array_equal(out.lengths, ref.lengths)),
            steps=[out.num_steps, ref.num_steps],
            logprob_err=float(np.abs(out.logprobs - ref.logprobs).max()),
            sampling_logprob_err=float(np.abs(out.sampling_logprobs - ref.sampling_logprobs).max()),
            shape=list(out.tokens.shape), ref_shape=list(ref.tokens.shape))

    # jax.make_mesh gives Explicit axes; the sampler runs them as Auto (the partitioner decides)
    compare("greedy_8x1", qwen, jax.make_mesh((8, 1), ("data", "model")), prompts, **greedy)
    for shape in [(1, 2), (1, 4), (4, 2)]:
        compare(f"greedy_{shape[0]}x{shape[1]}", qwen, shape, prompts, **greedy)
    compare("sliding_tied_4x2", mistral, (4, 2), prompts, **greedy)
    # sampled, K = 2: 3 prompts x 2 samples = 6 rows on a data axis of 4, padded to 4 prompts (8 rows)
    compare("sampled_padded_4x2", qwen, (4, 2), prompts[:3], **sampled)

    # a second call with new prompts of the same bucket reuses the compiled prefill and decode
    from align_jax.llm.decoding import TRACE_COUNTS
    smp = Sampler(qwen, mesh=sharding.make_mesh(4, 2))
    smp.generate(prompts, **greedy)
    before = dict(TRACE_COUNTS)
    smp.generate([p[::-1] for p in prompts], **greedy)
    report["retraces"] = {k: TRACE_COUNTS[k] - before.get(k, 0) for k in ("prefill", "decode")}

    # the one-step API on a mesh: prefill + 3 steps == one device
    for label, mesh in (("ref", None), ("mesh", sharding.make_mesh(4, 2))):
        smp = Sampler(qwen, mesh=mesh)
        logits, state = smp.start(smp.prepare(prompts, max_new_tokens=4))
        trail = [np.asarray(logits)]
        for t in range(3):
            logits, state = smp.step(state, np.argmax(np.asarray(logits), axis=-1))
            trail.append(np.asarray(logits))
        report.setdefault("one_step", {})[label] = np.stack(trail).tolist()
        if mesh is not None:
            report["one_step_cache_spec"] = spec_of(state.cache.k[0])

    conts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [11], [12, 13], [14, 15, 16], [17]]
    score_ref = score_continuations(qwen, None, prompts, conts, batch_size=8)
    for shape, batch_size in [((8, 1), 8), ((1, 4), 8), ((4, 2), 8), ((4, 2), 3)]:
        out = score_continuations(qwen, None, prompts, conts, batch_size=batch_size,
                                  mesh=sharding.make_mesh(*shape))
        report[f"score_{shape[0]}x{shape[1]}_b{batch_size}"] = dict(
            token_err=float(np.abs(out.token_logprobs - score_ref.token_logprobs).max()),
            sum_err=float(np.abs(out.sum_logprob - score_ref.sum_logprob).max()))

    # the sharded weights: q column-parallel, o row-parallel, vocabulary split, norms replicated
    smp = Sampler(qwen, mesh=sharding.make_mesh(4, 2))
    layer = smp.state["layers"][0]
    report["specs"] = {name: spec_of(x) for name, x in [
        ("q_kernel", layer["self_attn"]["q_proj"]["kernel"][...]),
        ("q_bias", layer["self_attn"]["q_proj"]["bias"][...]),
        ("o_kernel", layer["self_attn"]["o_proj"]["kernel"][...]),
        ("down_kernel", layer["mlp"]["down_proj"]["kernel"][...]),
        ("embedding", smp.state["embed_tokens"]["embedding"][...]),
        ("lm_head", smp.state["lm_head"]["kernel"][...]),
        ("norm", smp.state["norm"]["scale"][...])]}

    # weights loaded straight onto the mesh: each device gets only its slice of a split weight
    import tempfile
    from align_jax.llm.weights import load_checkpoint, load_pretrained, save_checkpoint
    from tests.llm.conftest import make_tiny_tokenizer
    qwen96 = model(config("qwen2", vocab_size=96), seed=2)  # the tiny tokenizer's 96 ids
    ckpt = os.path.join(tempfile.mkdtemp(), "tiny-qwen2")
    save_checkpoint(ckpt, qwen96, make_tiny_tokenizer(), source="random init (test_sharding)")
    mesh42 = sharding.make_mesh(4, 2)
    loaded = load_pretrained(ckpt, mesh=mesh42)
    graphdef, lstate = nnx.split(loaded.model)
    flat = jax.tree_util.tree_leaves_with_path(lstate)
    want = sharding.param_shardings(lstate, mesh42)
    report["loaded_specs_match"] = all(
        x.sharding.is_equivalent_to(w, x.ndim) for (_, x), w in zip(flat, jax.tree_util.tree_leaves(want)))
    q = loaded.model.layers[0].self_attn.q_proj.kernel[...]
    report["loaded_q_shards"] = sorted({tuple(s.data.shape) for s in q.addressable_shards})
    report["loaded_q_shape"] = list(q.shape)
    report["loaded_devices"] = len(q.sharding.device_set)
    ref = Sampler(qwen96).generate(prompts, **greedy)
    out = Sampler(loaded, mesh=mesh42).generate(prompts, **greedy)
    report["loaded_tokens_equal"] = bool(np.array_equal(out.tokens, ref.tokens))
    report["loaded_logprob_err"] = float(np.abs(out.logprobs - ref.logprobs).max())

    # bad input: every error before any weight is sharded
    moved = []
    original = sharding.shard_params
    sharding.shard_params = lambda *a, **k: moved.append(1) or original(*a, **k)
    devices = np.array(jax.devices())
    bad = {
        "kv_heads": lambda: Sampler(qwen, mesh=sharding.make_mesh(1, 8)),
        "heads": lambda: sharding.check_mesh(sharding.make_mesh(1, 8), config("qwen2", num_heads=12, num_kv_heads=4)),
        "intermediate": lambda: sharding.check_mesh(sharding.make_mesh(1, 4), config("qwen2", intermediate_size=66)),
        "missing_axis": lambda: Sampler(qwen, mesh=jax.sharding.Mesh(devices.reshape(4, 2), ("batch", "model"))),
        "extra_axis": lambda: sharding.check_mesh(
            jax.sharding.Mesh(devices.reshape(2, 2, 2), ("data", "model", "pipe")), qwen.config),
        "score_kv_heads": lambda: score_continuations(qwen, None, prompts, conts, mesh=sharding.make_mesh(1, 8)),
        "quantized": lambda: sharding.check_mesh(sharding.make_mesh(2, 1), config(
            "qwen2", quantized=(("layers.0.mlp.up_proj", 32, False),))),
        "not_a_mesh": lambda: Sampler(qwen, mesh="data=8"),
        "load_kv_heads": lambda: load_checkpoint(ckpt, mesh=sharding.make_mesh(1, 8)),
        "load_quantized": lambda: load_pretrained(ckpt, quantized=True, mesh=mesh42),
    }
    errors = {}
    for name, call in bad.items():
        try:
            call()
            errors[name] = None
        except (ValueError, TypeError) as err:
            errors[name] = f"{type(err).__name__}: {err}"
    os.environ["ALIGN_JAX_NATIVE_KERNELS"] = "1"
    try:
        sharding.check_mesh(sharding.make_mesh(2, 1), qwen.config)
        errors["native"] = None
    except ValueError as err:
        errors["native"] = f"ValueError: {err}"
    os.environ["ALIGN_JAX_NATIVE_KERNELS"] = "0"
    sharding.check_mesh(sharding.make_mesh(1, 1), qwen.config)  # one device: nothing to split
    report["errors"] = errors
    report["weights_moved"] = len(moved)
    print("REPORT " + json.dumps(report))
""")


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()  # keeps conftest's O0
    env["ALIGN_JAX_NATIVE_KERNELS"] = "0"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _CHECKS], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("REPORT ")][-1]
    return json.loads(line[len("REPORT "):])


@pytest.mark.parametrize("case", ["greedy_8x1", "greedy_1x2", "greedy_1x4", "greedy_4x2", "sliding_tied_4x2",
                                  "sampled_padded_4x2"])
def test_sampler_on_mesh_equals_one_device(report, case):
    row = report[case]
    assert row["shape"] == row["ref_shape"]
    assert row["tokens_equal"] and row["lengths_equal"], row
    assert row["steps"][0] == row["steps"][1], row  # padding rows never extend the decode
    assert row["logprob_err"] < 1e-5, row
    assert row["sampling_logprob_err"] < 1e-5, row


def test_second_call_on_a_mesh_does_not_retrace(report):
    assert report["retraces"] == {"prefill": 0, "decode": 0}


def test_one_step_api_on_mesh_equals_one_device(report):
    import numpy as np

    ref, mesh = np.asarray(report["one_step"]["ref"]), np.asarray(report["one_step"]["mesh"])
    np.testing.assert_allclose(mesh, ref, atol=1e-5, rtol=1e-5)
    assert report["one_step_cache_spec"] == ["data", "model"]


@pytest.mark.parametrize("case", ["score_8x1_b8", "score_1x4_b8", "score_4x2_b8", "score_4x2_b3"])
def test_scoring_on_mesh_equals_one_device(report, case):
    assert report[case]["token_err"] < 1e-5, report[case]
    assert report[case]["sum_err"] < 1e-5, report[case]


def test_weights_are_split_megatron_style(report):
    specs = report["specs"]
    assert specs["q_kernel"] == [None, "model"]
    assert specs["q_bias"] == ["model"]
    assert specs["o_kernel"] == specs["down_kernel"] == ["model"]
    assert specs["embedding"] == ["model"]
    assert specs["lm_head"] == [None, "model"]
    assert specs["norm"] == []


@pytest.mark.parametrize("case,words", [
    ("kv_heads", ["'model'", "size 8", "ModelConfig.num_kv_heads=4"]),
    ("heads", ["'model'", "size 8", "ModelConfig.num_heads=12"]),
    ("intermediate", ["'model'", "size 4", "ModelConfig.intermediate_size=66"]),
    ("missing_axis", ["'data'", "('batch', 'model')"]),
    ("extra_axis", ["'pipe'", "size 2"]),
    ("score_kv_heads", ["'model'", "size 8", "num_kv_heads=4"]),
    ("quantized", ["quantized", "layers.0.mlp.up_proj"]),
    ("not_a_mesh", ["TypeError", "jax.sharding.Mesh"]),
    ("load_kv_heads", ["'model'", "size 8", "ModelConfig.num_kv_heads=4"]),
    ("load_quantized", ["a mesh needs a dense model", "quantized=False"]),
    ("native", ["ALIGN_JAX_NATIVE_KERNELS=0"]),
])
def test_bad_mesh_is_a_clear_error_before_weights_move(report, case, words):
    message = report["errors"][case]
    assert message is not None, f"{case}: no error"
    for word in words:
        assert word in message, (case, message)
    assert report["weights_moved"] == 0


def test_weights_load_straight_into_their_shards(report):
    """load_pretrained(mesh=): every weight carries its parameter's sharding, a column-parallel
    kernel is split in two on the model axis (no device holds it whole), and the sampler on the
    loaded model equals one device."""
    assert report["loaded_specs_match"]
    rows, cols = report["loaded_q_shape"]
    assert report["loaded_q_shards"] == [[rows, cols // 2]]
    assert report["loaded_devices"] == 8
    assert report["loaded_tokens_equal"] and report["loaded_logprob_err"] < 1e-5
