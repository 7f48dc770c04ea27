"""Tokenizer: GGUF-metadata tokenizers vs transformers' own GGUF tokenizer, chat templates, persistence."""

from __future__ import annotations

import json
import os
import pathlib
import unicodedata

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from align_jax.llm.tokenizer import ChatTokenizer, TokenizerError

from .conftest import make_tiny_config, write_tiny_gguf

STRINGS = [
    "Hello world",
    "the thing in a theatre",
    "12345 apples cost $3.50!",
    "x = 2024; y=x**2 - 0.5e-3",
    "  leading spaces\n\n\ttabs   and trailing   ",
    "naïve café 日本語 😀 Ünïcödé — “quotes” ‘single’ «guillemets»",
    "don't I'll WE'RE it's",
    "ab\r\ncd   \n",
    "<|im_start|>user\nWhat is 7*8?<|im_end|>\n<|im_start|>assistant\n",
    "",
    " ",
    "\u00e9 vs e\u0301",  # precomposed vs combining accent
]


def _reference_gguf_tokenizer(path):
    from transformers import AutoTokenizer

    path = pathlib.Path(path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _assert_same(ours: ChatTokenizer, ref, strings):
    for text in strings:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_gguf_path(request, tmp_path_factory):
    config = make_tiny_config(request.param)
    tensors = {"token_embd.weight": np.zeros((96, 32), np.float32)}
    return write_tiny_gguf(tmp_path_factory.mktemp("tok") / f"{request.param}.gguf", config, tensors)


def test_tiny_gguf_tokenizer_matches_transformers(tiny_gguf_path):
    ours = ChatTokenizer.from_gguf(tiny_gguf_path)
    ref = _reference_gguf_tokenizer(tiny_gguf_path)
    # Both use merges: "the" must become one token after a space.
    assert ours.hf_tokenizer.convert_ids_to_tokens(ours.encode(" the")) == ["Ġthe"]
    # Qwen2 normalises to NFC (as its tokenizer.json does); transformers' GGUF path does not.
    nfc = [unicodedata.normalize("NFC", s) for s in STRINGS]
    _assert_same(ours, ref, nfc)
    assert ours.eos_token_ids == (95, 93)  # tokenizer.ggml.eos_token_id first, then <|endoftext|>
    assert ours.pad_token_id == 93
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 7*8?"}]
    assert ours.apply_chat_template(messages) == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages, add_generation_prompt=False).endswith("What is 7*8?<|im_end|>\n")
    # control tokens stay whole
    assert ours.encode("<|im_end|>") == [95]


def test_qwen2_pretokenizer_normalises_nfc(tmp_path):
    config = make_tiny_config("qwen2")
    path = write_tiny_gguf(tmp_path / "q.gguf", config, {"token_embd.weight": np.zeros((96, 32), np.float32)})
    tok = ChatTokenizer.from_gguf(path)
    # 'é' (U+00E9) is outside the tiny byte alphabet's merges but NFC makes both spellings identical
    assert tok.encode("cafe\u0301") == tok.encode("caf\u00e9")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([chr(b) for b in range(32, 119)] + ["<|im_end|>", "the", " the"]),
                max_size=30).map("".join))
def test_byte_level_roundtrip_is_lossless(text):
    """Every string over the tiny vocabulary's bytes (and control tokens) decodes back exactly."""
    tok = _ROUNDTRIP_TOKENIZER[0]
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


_ROUNDTRIP_TOKENIZER: list = []


@pytest.fixture(autouse=True, scope="module")
def _roundtrip_tokenizer(tmp_path_factory):
    config = make_tiny_config("llama")
    path = write_tiny_gguf(tmp_path_factory.mktemp("rt") / "rt.gguf", config,
                           {"token_embd.weight": np.zeros((96, 32), np.float32)})
    _ROUNDTRIP_TOKENIZER[:] = [ChatTokenizer.from_gguf(path)]
    yield


def test_save_load_roundtrip(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path)
    assert ChatTokenizer.is_saved_dir(tmp_path)
    again = ChatTokenizer.load(tmp_path)
    for text in STRINGS:
        assert again.encode(text) == tiny_tokenizer.encode(text)
    assert again.eos_token_ids == tiny_tokenizer.eos_token_ids
    assert again.pad_token_id == tiny_tokenizer.pad_token_id
    msgs = [{"role": "user", "content": "hi"}]
    assert again.apply_chat_template(msgs) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert again.encode_batch(["hi", "hello"]) == [again.encode("hi"), again.encode("hello")]
    assert again.decode(np.array(again.encode("hello"))) == "hello"


def test_hf_dir_tokenizer_eos_from_generation_config(tiny_tokenizer, tmp_path):
    tiny_tokenizer.hf_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [94, 95]}))
    tok = ChatTokenizer.from_hf_dir(tmp_path)
    assert set(tok.eos_token_ids) == {94, 95}  # <|im_end|> and <|endoftext|>
    assert tok.encode("the") == tiny_tokenizer.encode("the")


def test_errors(tiny_tokenizer, tmp_path):
    with pytest.raises(TypeError, match="expects str"):
        tiny_tokenizer.encode(123)
    with pytest.raises(TokenizerError, match="list of"):
        tiny_tokenizer.apply_chat_template([{"content": "no role"}])
    with pytest.raises(TokenizerError, match="missing align_jax_tokenizer.json"):
        ChatTokenizer.load(tmp_path)
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        ChatTokenizer.from_hf_dir(tmp_path)
    config = make_tiny_config("llama")
    path = write_tiny_gguf(tmp_path / "notok.gguf", config, {"token_embd.weight": np.zeros((96, 32), np.float32)},
                           with_tokenizer=False)
    with pytest.raises(TokenizerError, match="tokenizer.ggml.tokens missing"):
        ChatTokenizer.from_gguf(path)
    with pytest.raises(TokenizerError, match="at least one eos"):
        ChatTokenizer(tiny_tokenizer.hf_tokenizer, [])


# ----------------------------------------------------------------------------- real models (slow)
def _gsm8k_questions(count):
    path = pathlib.Path(os.environ.get("ALIGN_JAX_DATA_DIR", "/work/shared/data")) / "gsm8k" / "test.jsonl"
    if not path.is_file():
        return []
    with open(path) as handle:
        return [json.loads(next(handle))["question"] for _ in range(count)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-coder-0.5b"])
def test_real_gguf_tokenizer_matches_transformers(name):
    from align_jax.llm import registry

    try:
        path = registry.resolve_gguf(name)
    except registry.ModelPackageError as err:
        pytest.skip(str(err))
    ours = ChatTokenizer.from_gguf(path)
    ref = _reference_gguf_tokenizer(path)
    strings = [unicodedata.normalize("NFC", s) for s in STRINGS] + _gsm8k_questions(20)
    strings += ["def f(x):\n    return [i**2 for i in range(x)]  # 10000", "1,234,567.89 and 3.14159"]
    non_ascii_digits = "３４５ ٣٤٥ ¹²"
    if name == "smollm2-135m":
        # SmolLM2's tokenizer.json (and llama.cpp's 'smollm' pre-tokenizer, regex \p{N}) splits every
        # Unicode digit; transformers' GGUF converter uses the plain GPT-2 regex, which only agrees
        # for ASCII digits (the vocabulary has no multi-digit tokens). Check ours splits them all.
        pieces = [p for p, _ in ours.hf_tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(non_ascii_digits)]
        assert len(pieces) == 10, pieces
    else:
        strings.append(non_ascii_digits)
    _assert_same(ours, ref, strings)
    messages = [{"role": "user", "content": strings[-3]}]
    assert ours.apply_chat_template(messages) == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    vocab = ours.hf_tokenizer.get_vocab()
    assert vocab["<|im_end|>"] in ours.eos_token_ids and vocab["<|endoftext|>"] in ours.eos_token_ids


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-coder-0.5b"])
def test_real_tokenizer_roundtrip_any_unicode(name):
    """decode(encode(text)) == text (NFC for Qwen2) for arbitrary Unicode text the vocabulary can spell."""
    from hypothesis import assume
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from align_jax.llm import registry

    try:
        tok = ChatTokenizer.from_gguf(registry.resolve_gguf(name))
    except registry.ModelPackageError as err:
        pytest.skip(str(err))
    vocab = tok.hf_tokenizer.get_vocab()
    spelled = {b for b, ch in bytes_to_unicode().items() if ch in vocab}  # SmolLM2 lacks 21 byte tokens
    normalise = name.startswith("qwen")

    @settings(max_examples=150, deadline=None)
    @given(st.text(max_size=60))
    def roundtrip(text):
        assume(set(text.encode("utf-8")) <= spelled)
        expected = unicodedata.normalize("NFC", text) if normalise else text
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == expected

    roundtrip()


@pytest.mark.parametrize("item,match", [
    ("text", "continuation 2 is a string but no tokenizer was given; pass token ids"),
    ([[1, 2]], r"continuation 2 must be a string or a 1-D sequence of int token ids, got int64\[1, 2\]"),
    ([1.5], r"got float64\[1\]"),
    ([], "continuation 2 is empty"),
    ([3, -1], r"continuation 2 has token id -1 outside the vocabulary \[0, 10\)"),
    ([3, 10], "token id 10 outside"),
])
def test_token_ids_names_the_item_in_every_error(item, match):
    from align_jax.llm.tokenizer import token_ids

    with pytest.raises(ValueError, match=match):
        token_ids(item, "continuation", 2, None, 10)
    assert token_ids(np.asarray([0, 9], np.int32), "prompt", 0, None, 10) == [0, 9]
