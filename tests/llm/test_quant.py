"""Block-quantized weights: GGUF unpacking (bit-exact with gguf), the native CPU kernel against
references, quantized models against dense ones (tiny GGUF, HF dir, checkpoint), and bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from align_jax.llm import kernels
from align_jax.llm import quant as Q
from align_jax.llm.model import ModelConfig, QuantizedEmbed, QuantizedLinear, Transformer
from align_jax.llm.sampler import Sampler
from align_jax.llm.weights import WeightsError, load_checkpoint, load_gguf, load_pretrained, save_checkpoint

from .conftest import (
    TINY_POSITIONS,
    TINY_TOKENS,
    hf_to_gguf_tensors,
    make_tiny_config,
    make_tiny_tokenizer,
    make_torch_tiny_model,
    run_model,
    torch_state_numpy,
    write_tiny_gguf,
)

TOKENS, POSITIONS = TINY_TOKENS, TINY_POSITIONS


def _random_blocks(type_name: str, n_blocks: int, rng) -> np.ndarray:
    """Random GGUF blocks of ``type_name`` whose float16 fields are finite, realistic scales."""
    qtype = gguf.GGMLQuantizationType[type_name]
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for start, value in Q._LAYOUTS[type_name][1]:
        if len(value) == 2:  # a float16 scale / offset field
            raw[:, start:start + 2] = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16).view(
                np.uint8).reshape(-1, 2)
    return raw


@pytest.mark.parametrize("type_name", Q.QUANTIZED_GGUF_TYPES)
def test_unpack_is_bit_exact_with_gguf_dequantize(type_name):
    rng = np.random.default_rng(sum(map(ord, type_name)))
    block_elems, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    rows, cols = 6, 2 * block_elems
    raw = _random_blocks(type_name, rows * cols // block_elems, rng)
    expected = gguf.quants.dequantize(raw.reshape(-1), gguf.GGMLQuantizationType[type_name]).reshape(rows, cols)
    unpacked = Q.unpack_gguf(raw, type_name, (rows, cols))
    assert unpacked.codes.dtype == np.int8 and unpacked.codes.shape == (rows, cols)
    assert unpacked.scale.shape == (rows, cols // unpacked.block_size)
    assert unpacked.block_size in (16, 32)
    assert len(np.unique(unpacked.codes)) > 3  # real codes, not a constant
    ours = Q.dequantize_numpy(unpacked)
    np.testing.assert_array_equal(ours.view(np.uint32), expected.astype(np.float32).view(np.uint32))
    # the JAX form gives the same bits
    again = Q.dequantize(jnp.asarray(unpacked.codes), jnp.asarray(unpacked.scale),
                         None if unpacked.offset is None else jnp.asarray(unpacked.offset))
    np.testing.assert_array_equal(np.asarray(again), ours)


def test_unpack_rejects_bad_shapes_and_types():
    raw = _random_blocks("Q8_0", 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="not a multiple of 32"):
        Q.unpack_gguf(raw, "Q8_0", (4, 40))
    with pytest.raises(ValueError, match="4 blocks, expected 8"):
        Q.unpack_gguf(raw, "Q8_0", (4, 64))
    with pytest.raises(ValueError, match="IQ2_XXS is not kept quantized"):
        Q.unpack_gguf(raw, "IQ2_XXS", (4, 32))


def test_quantize_q8_0_matches_gguf():
    weight = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    packed = Q.quantize_q8_0(weight)
    reference = gguf.quants.dequantize(gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0),
                                       gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(Q.dequantize_numpy(packed), reference)
    assert np.abs(Q.dequantize_numpy(packed) - weight).max() <= np.abs(weight).max() / 254 + 1e-7


def _problem(rng, n, k, block, with_offset):
    codes = rng.integers(-32, 32, (n, k), dtype=np.int8)
    scale = rng.uniform(0.5, 1.5, (n, k // block)).astype(np.float32) * 0.01
    offset = (rng.standard_normal((n, k // block)) * 0.01).astype(np.float32) if with_offset else None
    return codes, scale, offset


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 13, 40, 101])
@pytest.mark.parametrize("block,with_offset", [(32, True), (32, False), (16, False), (16, True)])
def test_quantized_matmul_matches_float64_reference(rows, block, with_offset):
    """Native kernel (every row-count path, column tails: N = 37) == dense float64 product."""
    rng = np.random.default_rng(rows * 100 + block + with_offset)
    n, k = 37, 96
    codes, scale, offset = _problem(rng, n, k, block, with_offset)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = Q.dequantize_numpy(Q.QuantizedTensor(codes, scale, offset, block)).astype(np.float64)
    expected = x.astype(np.float64) @ w.T
    args = (jnp.asarray(codes), jnp.asarray(scale), None if offset is None else jnp.asarray(offset))
    got = np.asarray(jax.jit(Q.quantized_matmul)(jnp.asarray(x), *args))
    assert got.shape == (rows, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * np.abs(expected).max())
    xla = np.asarray(jax.jit(Q._xla_matmul)(jnp.asarray(x), *args))
    np.testing.assert_allclose(got, xla, rtol=0, atol=2e-5 * np.abs(expected).max())


def test_quantized_matmul_leading_dims_and_dtype():
    rng = np.random.default_rng(3)
    codes, scale, offset = _problem(rng, 8, 64, 32, True)
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    flat = Q.quantized_matmul(jnp.asarray(x.reshape(6, 64)), codes, scale, offset)
    out = Q.quantized_matmul(jnp.asarray(x, jnp.bfloat16), codes, scale, offset)
    assert out.shape == (2, 3, 8) and out.dtype == jnp.float32
    full = Q.quantized_matmul(jnp.asarray(x), codes, scale, offset)
    np.testing.assert_array_equal(np.asarray(full).reshape(6, 8), np.asarray(flat))
    with pytest.raises(ValueError, match="disagree"):
        Q.quantized_matmul(jnp.ones((2, 48)), codes, scale, offset)


def test_native_kernel_is_used_on_cpu():
    if kernels.compiler() is None or not kernels.native_enabled():
        pytest.skip("no C++ compiler (the XLA path is used)")
    assert kernels.load()
    codes, scale, offset = _problem(np.random.default_rng(0), 8, 64, 32, True)
    hlo = jax.jit(Q.quantized_matmul).lower(jnp.ones((2, 64)), codes, scale, offset).as_text()
    assert kernels.QMATMUL_TARGET in hlo
    assert kernels.library_path().is_file()


def test_concurrent_products_do_not_deadlock():
    """Many independent products in one program: XLA runs them on every pool thread at once,
    and a kernel that waited for its own pool tasks to start would hang (it once did)."""
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from align_jax.llm.quant import quantized_matmul
        rng = np.random.default_rng(0)
        ws = [(rng.integers(-8, 8, (512, 256), dtype=np.int8), np.ones((512, 8), np.float32)) for _ in range(12)]
        f = jax.jit(lambda x, ws: sum(quantized_matmul(x, c, s) for c, s in ws))
        for rows in (1, 5, 24):
            f(jnp.ones((rows, 256)), ws).block_until_ready()
        print("ok")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_failed_build_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("ALIGN_JAX_CACHE", str(tmp_path))
    kernels.load.cache_clear()
    try:
        with pytest.raises(kernels.KernelBuildError):
            kernels.build()
        with pytest.warns(RuntimeWarning, match="native CPU kernels unavailable"):
            assert kernels.load() is False
        codes, scale, offset = _problem(np.random.default_rng(0), 8, 64, 32, True)
        fresh = jax.jit(lambda *args: Q.quantized_matmul(*args))  # not jit's trace cache of the native version
        hlo = fresh.lower(jnp.ones((2, 64)), codes, scale, offset).as_text()
        assert kernels.QMATMUL_TARGET not in hlo  # the XLA path
    finally:
        kernels.load.cache_clear()


# ----------------------------------------------------------------------------- models
def test_config_quantized_validation_and_json_roundtrip():
    config = make_tiny_config("qwen2", quantized=[["layers.1.mlp.up_proj", 32, True], ("embed_tokens", 16, False)])
    assert config.quantized == (("embed_tokens", 16, False), ("layers.1.mlp.up_proj", 32, True))
    assert ModelConfig.from_dict(__import__("json").loads(__import__("json").dumps(config.to_dict()))) == config
    hash(config)
    with pytest.raises(ValueError, match="not a quantizable module path"):
        make_tiny_config("qwen2", quantized=[("layers.0.input_layernorm", 32, False)])
    with pytest.raises(ValueError, match="block_size 24"):
        make_tiny_config("qwen2", quantized=[("lm_head", 24, False)])
    with pytest.raises(ValueError, match="twice"):
        make_tiny_config("qwen2", quantized=[("lm_head", 32, False), ("lm_head", 16, False)])
    with pytest.raises(ValueError, match="does not have"):
        Transformer(make_tiny_config("qwen2", quantized=[("layers.7.mlp.up_proj", 32, False)]), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="does not have"):  # tied model: no lm_head
        Transformer(make_tiny_config("qwen2", quantized=[("lm_head", 32, False)]), rngs=nnx.Rngs(0))


def _tiny_torch_gguf(tmp_path, arch, quantize_types):
    model = make_torch_tiny_model(arch, seed=5)
    config = make_tiny_config(arch)
    tensors = hf_to_gguf_tensors(torch_state_numpy(model), config)
    kinds = {}
    for i, name in enumerate(sorted(n for n in tensors if n.endswith(".weight") and tensors[n].ndim == 2)):
        kinds[name] = quantize_types[i % len(quantize_types)]
    path = write_tiny_gguf(tmp_path / f"{arch}.gguf", config, tensors, quantize=kinds)
    return path, kinds


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantized_gguf_model_equals_dequantized_model(arch, tmp_path):
    """The same GGUF loaded quantized and dequantized: same logits (to summation order) and the
    same greedy tokens; llama's permuted q/k rows are un-permuted in codes and scales alike."""
    path, kinds = _tiny_torch_gguf(tmp_path, arch, ["Q8_0", "Q4_1", "Q5_0", "Q4_0", "Q5_1"])
    dense = load_gguf(path)
    quantized = load_gguf(path, quantized=True)
    assert dense.config.quantized == ()
    listed = {p for p, _, _ in quantized.config.quantized}
    assert "embed_tokens" in listed and "layers.0.self_attn.q_proj" in listed and "layers.1.mlp.down_proj" in listed
    assert isinstance(quantized.model.layers[0].self_attn.k_proj, QuantizedLinear)
    assert isinstance(quantized.model.embed_tokens, QuantizedEmbed)
    offsets = {p for p, _, has_offset in quantized.config.quantized if has_offset}
    assert offsets and offsets != listed  # Q4_1 / Q5_1 carry offsets, the others do not
    a, _ = run_model(dense.model, TOKENS, POSITIONS)
    b, _ = run_model(quantized.model, TOKENS, POSITIONS)
    a, b = np.asarray(a), np.asarray(b)
    assert np.abs(a - b).max() < 1e-5 * max(1.0, np.abs(a).max())
    prompts = [[5, 9, 13, 40], [60, 61]]
    key = jax.random.key(0)
    one = Sampler(dense).generate(prompts, key=key, max_new_tokens=24, temperature=0.0, ignore_eos=True)
    two = Sampler(quantized).generate(prompts, key=key, max_new_tokens=24, temperature=0.0, ignore_eos=True)
    np.testing.assert_array_equal(one.tokens, two.tokens)
    # the quantized form is about a quarter of the dense bytes for these matrices
    dense_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(dense.model, nnx.Param)))
    quant_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(quantized.model, nnx.Param)))
    assert quant_bytes < 0.45 * dense_bytes


def test_k_quant_gguf_loads_quantized(tmp_path):
    """K-quant tensors (no numpy quantizer in gguf) written as raw random blocks: the quantized
    model holds exactly gguf's dequantized values (block 16 for Q6_K / Q2_K, 32 for Q4_K / Q5_K)."""
    config = make_tiny_config("qwen2", hidden_size=256, intermediate_size=256, num_heads=4, num_kv_heads=2,
                              head_dim=64)
    rng = np.random.default_rng(0)
    tensors, raw = {}, {}
    shapes = {"token_embd.weight": (96, 256), "output_norm.weight": (256,)}
    for i in range(config.num_layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (256,), f"blk.{i}.ffn_norm.weight": (256,),
                       f"blk.{i}.attn_q.weight": (256, 256), f"blk.{i}.attn_k.weight": (128, 256),
                       f"blk.{i}.attn_v.weight": (128, 256), f"blk.{i}.attn_output.weight": (256, 256),
                       f"blk.{i}.attn_q.bias": (256,), f"blk.{i}.attn_k.bias": (128,), f"blk.{i}.attn_v.bias": (128,),
                       f"blk.{i}.ffn_gate.weight": (256, 256), f"blk.{i}.ffn_up.weight": (256, 256),
                       f"blk.{i}.ffn_down.weight": (256, 256)})
    kinds = ["Q4_K", "Q5_K", "Q6_K", "Q2_K"]
    j = 0
    for name, shape in shapes.items():
        if len(shape) == 2:
            kind = kinds[j % len(kinds)]
            j += 1
            block_elems, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
            raw[name] = (_random_blocks(kind, shape[0] * shape[1] // block_elems, rng).reshape(shape[0], -1), kind)
        else:
            tensors[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    path = write_tiny_gguf(tmp_path / "k.gguf", config, tensors, raw=raw)
    dense = load_gguf(path)
    quantized = load_gguf(path, quantized=True)
    assert {b for _, b, _ in quantized.config.quantized} == {16, 32}
    for name, (blocks, kind) in raw.items():
        if not name.startswith("blk.1."):
            continue
        module = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                  "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                  "ffn_down": "mlp.down_proj"}[name.split(".")[2]]
        q_mod = quantized.model.layers[1]
        d_mod = dense.model.layers[1]
        for part in module.split("."):
            q_mod, d_mod = getattr(q_mod, part), getattr(d_mod, part)
        w = Q.dequantize(q_mod.codes[...], q_mod.scale[...], None if q_mod.offset is None else q_mod.offset[...])
        np.testing.assert_array_equal(np.asarray(w).T, np.asarray(d_mod.kernel[...]))
    a, _ = run_model(dense.model, TOKENS, POSITIONS)
    b, _ = run_model(quantized.model, TOKENS, POSITIONS)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-4 * np.abs(np.asarray(a)).max())


def test_quantized_checkpoint_roundtrip_and_dense_sources(tmp_path):
    path, _ = _tiny_torch_gguf(tmp_path, "llama", ["Q8_0", "Q4_1"])
    quantized = load_gguf(path, quantized=True)
    target = save_checkpoint(tmp_path / "ckpt", quantized.model, quantized.tokenizer)
    again = load_checkpoint(target)
    assert again.config == quantized.config
    assert again.model.layers[0].mlp.up_proj.codes[...].dtype == jnp.int8
    a, _ = run_model(quantized.model, TOKENS, POSITIONS)
    b, _ = run_model(again.model, TOKENS, POSITIONS)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a dense checkpoint loaded with quantized=True becomes Q8_0 (close to, not equal to, the dense model)
    dense = load_gguf(path)
    dense_dir = save_checkpoint(tmp_path / "dense", dense.model, dense.tokenizer)
    q8 = load_pretrained(str(dense_dir), quantized=True)
    assert q8.config.quantized and all(b == 32 and not o for _, b, o in q8.config.quantized)
    c, _ = run_model(dense.model, TOKENS, POSITIONS)
    d, _ = run_model(q8.model, TOKENS, POSITIONS)
    err = np.abs(np.asarray(c) - np.asarray(d)).max()
    assert 0 < err < 0.05 * np.abs(np.asarray(c)).max()


def test_quantized_hf_dir_is_q8_0(tmp_path):
    model = make_torch_tiny_model("qwen2", seed=2)
    directory = tmp_path / "hf"
    model.save_pretrained(directory)
    make_tiny_tokenizer().hf_tokenizer.save_pretrained(directory)
    dense = load_pretrained(str(directory))
    q8 = load_pretrained(str(directory), quantized=True)
    assert {p for p, _, _ in q8.config.quantized} >= {"embed_tokens", "layers.0.mlp.down_proj"}
    a, _ = run_model(dense.model, TOKENS, POSITIONS)
    b, _ = run_model(q8.model, TOKENS, POSITIONS)
    err = np.abs(np.asarray(a) - np.asarray(b)).max()
    assert 0 < err < 0.05 * np.abs(np.asarray(a)).max()


def test_truncated_quantized_tensor_names_it(tmp_path):
    path, _ = _tiny_torch_gguf(tmp_path, "qwen2", ["Q8_0"])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(WeightsError, match=r"tiny|qwen2\.gguf"):
        load_gguf(path, quantized=True)


@pytest.mark.parametrize("rows", [1, 4, 5, 8, 9, 15, 16, 17, 33, 40])
@pytest.mark.parametrize("block,with_offset", [(32, True), (16, False)])
def test_bfloat16_compute_matches_xla_bfloat16(rows, block, with_offset):
    """compute_dtype="bfloat16": x and w rounded to bfloat16, float32 accumulation, whichever path
    runs (pair dot products for few rows, AMX tiles from 16 rows where the CPU has them, partial
    tiles and column tails included: N = 40, rows not multiples of 16)."""
    rng = np.random.default_rng(rows + block)
    n, k = 40, 128
    codes, scale, offset = _problem(rng, n, k, block, with_offset)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    args = (jnp.asarray(codes), jnp.asarray(scale), None if offset is None else jnp.asarray(offset))
    got = np.asarray(jax.jit(Q.quantized_matmul, static_argnames="compute_dtype")(
        jnp.asarray(x), *args, compute_dtype="bfloat16"))
    want = np.asarray(jax.jit(Q._xla_matmul, static_argnames="compute_dtype")(
        jnp.asarray(x), *args, compute_dtype="bfloat16"))
    exact = np.asarray(jax.jit(Q.quantized_matmul)(jnp.asarray(x), *args))
    scale_ = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale_)
    assert np.abs(got - exact).max() > 1e-5 * scale_  # really rounded to bfloat16
    with pytest.raises(ValueError, match="compute_dtype='float16'"):
        Q.quantized_matmul(jnp.asarray(x), *args, compute_dtype="float16")


@pytest.mark.parametrize("rows,n", [(600, 48), (1027, 40), (520, 64)])
def test_bfloat16_compute_many_rows(rows, n):
    """Prefill-sized products in bfloat16 mode: from 512 rows the tile-unit path also splits rows
    between threads (pieces of whole 32-row pairs, the last one partial), and with N % 16 == 0
    it reads only the tile copy of x (no rounded float32 copy): both == XLA's bfloat16 product."""
    rng = np.random.default_rng(rows + n)
    k = 96
    codes, scale, offset = _problem(rng, n, k, 32, False)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    args = (jnp.asarray(codes), jnp.asarray(scale), None)
    got = np.asarray(jax.jit(Q.quantized_matmul, static_argnames="compute_dtype")(
        jnp.asarray(x), *args, compute_dtype="bfloat16"))
    want = np.asarray(jax.jit(Q._xla_matmul, static_argnames="compute_dtype")(
        jnp.asarray(x), *args, compute_dtype="bfloat16"))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    for part in (x[:1], x[-33:]):  # a row's result does not depend on the rows beside it
        alone = np.asarray(Q.quantized_matmul(jnp.asarray(part), *args, compute_dtype="bfloat16"))
        np.testing.assert_allclose(alone, got[:1] if len(part) == 1 else got[-33:], rtol=0,
                                   atol=1e-5 * np.abs(want).max())


def test_quantized_bfloat16_model(tmp_path):
    """``param_dtype="bfloat16"`` on a quantized model: bfloat16 products (rounded inputs and
    weights, float32 accumulation), an error of the dense bfloat16 model's size, and the same
    logits for a row whether its batch takes the tile path (many rows) or not (one prompt)."""
    path, _ = _tiny_torch_gguf(tmp_path, "qwen2", ["Q8_0", "Q4_1"])
    dense32 = load_gguf(path)
    dense16 = load_gguf(path, param_dtype="bfloat16")
    quantized = load_gguf(path, quantized=True, param_dtype="bfloat16")
    assert quantized.model.layers[0].mlp.up_proj.compute_dtype == "bfloat16"
    assert load_gguf(path, quantized=True).model.layers[0].mlp.up_proj.compute_dtype == "float32"
    tokens = np.tile(TOKENS, (9, 1))  # 18 prompts x 12 positions = 216 rows per product
    positions = np.tile(POSITIONS, (9, 1))
    reference = np.asarray(run_model(dense32.model, tokens, positions)[0])
    dense_err = np.abs(np.asarray(run_model(dense16.model, tokens, positions)[0]) - reference).max()
    batch = np.asarray(run_model(quantized.model, tokens, positions)[0])
    quant_err = np.abs(batch - reference).max()
    assert 0.1 * dense_err < quant_err < 2 * dense_err
    single = np.asarray(run_model(quantized.model, TOKENS[:1], POSITIONS[:1])[0])  # 12 rows per product
    np.testing.assert_allclose(single[0], batch[0], rtol=0, atol=1e-4 * np.abs(reference).max())


def test_two_stage_argmax_equals_jnp_argmax():
    from align_jax.llm.logits import argmax

    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 1000)).astype(np.float32)
    x[1, 700] = x[1, 3] = 9.0           # ties: the lower id wins
    x[2, :] = -np.inf                   # all banned
    x[3, 999] = 50.0                    # last entry (the padded block)
    x[4, 10] = np.nan                   # NaN counts as the maximum, as in jnp.argmax
    got = np.asarray(jax.jit(argmax)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(x), axis=-1)))
    assert got.dtype == np.int32 and list(got[1:4]) == [3, 0, 999]
    assert np.asarray(argmax(jnp.asarray(x[:, :100]))).tolist() == np.asarray(jnp.argmax(x[:, :100], -1)).tolist()
    assert argmax(jnp.asarray(x).reshape(5, 1, 1000)).shape == (5, 1)


@pytest.mark.parametrize("shape", [(1, 2, 7, 37, 64), (5, 3, 3, 100, 64), (4, 2, 4, 40, 128), (2, 1, 1, 16, 16)])
def test_decode_attention_matches_reference(shape):
    """Native decode attention == the XLA formulation, including a row with no visible slot
    (uniform over all slots), padding slots and S not a multiple of 16."""
    from align_jax.llm.attention import decode_attention, decode_attention_reference

    b, hkv, g, s, hd = shape
    rng = np.random.default_rng(s)
    q = jnp.asarray(2 * rng.standard_normal((b, hkv, g, hd)).astype(np.float32))
    k = jnp.asarray(rng.standard_normal((b, hkv, s, hd)).astype(np.float32))
    v = jnp.asarray(rng.standard_normal((b, hkv, s, hd)).astype(np.float32))
    visible = rng.random((b, s)) < 0.5
    visible[0, :] = False
    visible = jnp.asarray(visible)
    got = np.asarray(jax.jit(decode_attention, static_argnums=4)(q, k, v, visible, hd ** -0.5))
    want = np.asarray(jax.jit(decode_attention_reference, static_argnums=4)(q, k, v, visible, hd ** -0.5))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    if kernels.compiler() is not None and kernels.native_enabled():
        hlo = jax.jit(decode_attention, static_argnums=4).lower(q, k, v, visible, hd ** -0.5).as_text()
        assert kernels.ATTENTION_TARGET in hlo


def test_decode_attention_masked_slots_cannot_poison_the_softmax():
    """Masked slots (an unwritten cache slot, say) whose scores exceed the visible maximum by
    80-95 must not enter the softmax at all. A kernel that multiplied exp(score - max) by a 0
    mask got NaN for differences near 88.7 (exp overflows to inf or NaN), and a real decode
    step turned to garbage after 55 tokens."""
    from align_jax.llm.attention import decode_attention, decode_attention_reference

    b, hkv, g, s, hd = 2, 1, 1, 48, 16
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, hkv, g, hd)).astype(np.float32)
    direction = q[:, :, :1] / np.sum(q[:, :, :1] ** 2, axis=-1, keepdims=True)  # q . direction = 1
    visible = np.zeros((b, s), bool)
    visible[:, [0, 3, 17, 30, 33, 47]] = True  # a few visible slots in every block of 16
    target = np.where(visible[0], -10.0, -10.0 + np.linspace(80.0, 95.0, s)).astype(np.float32)
    k = target[None, None, :, None] * direction  # score of slot j = target[j]
    v = rng.standard_normal((b, hkv, s, hd)).astype(np.float32)
    args = [jnp.asarray(a, jnp.float32) if a.dtype != bool else jnp.asarray(a) for a in (q, k, v, visible)]
    got = np.asarray(jax.jit(decode_attention, static_argnums=4)(*args, 1.0))
    want = np.asarray(jax.jit(decode_attention_reference, static_argnums=4)(*args, 1.0))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
