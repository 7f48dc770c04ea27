"""Tokenizer and chat-template glue.

:class:`ChatTokenizer` wraps a ``transformers`` fast tokenizer (a ``tokenizers``
``Tokenizer`` underneath) and adds what generation needs: every token id that ends
a turn, the padding id, and the model's own chat template.

It is built from one of three sources:

* GGUF metadata (``tokenizer.ggml.*``): byte-level BPE vocabularies (``model = gpt2``,
  the Llama-3 / SmolLM / Qwen2 family) are rebuilt here with ``tokenizers`` directly,
  with the pre-tokenizer of the model's original ``tokenizer.json`` chosen from
  ``tokenizer.ggml.pre`` (SmolLM: individual digits + GPT-2 byte-level regex; Qwen2:
  NFC normalisation + the Qwen2 split regex; Llama-3 style: transformers' regex
  table). Other vocabularies (sentencepiece, unigram) go through transformers' own
  GGUF converter.
* a Hugging Face model directory (``tokenizer.json`` + ``tokenizer_config.json``).
* a directory written by :meth:`ChatTokenizer.save` (our converted checkpoints).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Iterable, Sequence

__all__ = ["ChatTokenizer", "TokenizerError", "END_OF_TURN_TOKENS", "read_gguf_tokenizer_metadata", "token_ids"]

# Tokens that end an assistant turn in the chat templates of the families we support.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
)

_TOKENIZER_META = "align_jax_tokenizer.json"

# GGUF token_type values (llama.cpp `llama_token_type`).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


def token_ids(item, what: str, index: int, tokenizer, vocab: int, *, add_special_tokens: bool = False,
              no_tokenizer: str = "no tokenizer was given") -> list[int]:
    """``item`` (a string, encoded by ``tokenizer``, or a 1-D sequence of int ids) as a checked id list.

    The shared input check of the sampler's prompts and the scorer's prompts and continuations.

    Args:
      item: a string or a 1-D integer sequence.
      what, index: how the error names the item (``"prompt", 3`` -> ``prompt 3 ...``).
      tokenizer: encodes strings; None when the caller has none.
      vocab: the model's vocabulary size; every id must lie in ``[0, vocab)``.
      add_special_tokens: passed to ``tokenizer.encode``.
      no_tokenizer: the clause naming the missing tokenizer in the error for a string item.

    Raises:
      ValueError: a string without a tokenizer, a non-1-D or non-integer sequence, no tokens, or an
        id outside the vocabulary, each naming ``what`` and ``index``.
    """
    import numpy as np

    if isinstance(item, str):
        if tokenizer is None:
            raise ValueError(f"{what} {index} is a string but {no_tokenizer}; pass token ids")
        ids = list(tokenizer.encode(item, add_special_tokens=add_special_tokens))
    else:
        arr = np.asarray(item)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"{what} {index} must be a string or a 1-D sequence of int token ids, "
                             f"got {arr.dtype}{list(arr.shape)}")
        ids = [int(x) for x in arr]
    if not ids:
        raise ValueError(f"{what} {index} is empty (0 tokens): at least one token is needed")
    bad = [x for x in ids if x < 0 or x >= vocab]
    if bad:
        raise ValueError(f"{what} {index} has token id {bad[0]} outside the vocabulary [0, {vocab})")
    return ids


class TokenizerError(ValueError):
    """A tokenizer could not be built from the given source (the message names it)."""


def _field_value(field) -> Any:
    """Decode a gguf ReaderField (string, scalar or array) to Python values."""
    return field.contents()


def read_gguf_tokenizer_metadata(reader, path: str = "<gguf>") -> dict:
    """The ``tokenizer.*`` metadata of an open ``gguf.GGUFReader`` as plain Python values.

    Keys are the GGUF key names without the ``tokenizer.`` prefix (``ggml.tokens``,
    ``ggml.merges``, ``chat_template`` ...), plus ``general.architecture``.
    """
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            try:
                meta[key[len("tokenizer."):]] = _field_value(field)
            except Exception as err:  # a corrupt field: name it
                raise TokenizerError(f"{path}: cannot read metadata field {key!r}: {err}") from err
    arch = reader.fields.get("general.architecture")
    meta["general.architecture"] = _field_value(arch) if arch is not None else None
    return meta


def _byte_level_pretokenizer(pre: str | None):
    """(normalizer, pre_tokenizer) matching the original tokenizer.json of the model family."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    byte_level_plain = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    if pre in ("qwen2", "deepseek-r1-qwen"):
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        return normalizers.NFC(), pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"), byte_level_plain]
        )
    if pre == "smollm":
        return None, pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # older transformers
        GGUF_PRE_TOKENIZER_SPLITS = {}
    split = GGUF_PRE_TOKENIZER_SPLITS.get(pre)
    if split is not None:
        return None, pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level_plain]
        )
    # "gpt2", "default" and unknown byte-level vocabularies: GPT-2's own regex.
    return None, pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)


def _build_byte_level_bpe(meta: dict, path: str):
    """A ``tokenizers.Tokenizer`` for a byte-level BPE vocabulary described by GGUF metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    tokens = meta.get("ggml.tokens")
    merges = meta.get("ggml.merges")
    if not tokens:
        raise TokenizerError(f"{path}: GGUF metadata has no tokenizer.ggml.tokens")
    if merges is None:
        raise TokenizerError(f"{path}: byte-level BPE GGUF metadata has no tokenizer.ggml.merges")
    vocab = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    merge_pairs = []
    for line_no, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"{path}: tokenizer.ggml.merges[{line_no}] = {merge!r} is not 'a b'")
        merge_pairs.append((parts[0], parts[1]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False, byte_fallback=False))
    normalizer, pre_tokenizer = _byte_level_pretokenizer(meta.get("ggml.pre"))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    token_types = list(meta.get("ggml.token_type") or ())
    special = [
        AddedToken(token, special=True, normalized=False)
        for token, ttype in zip(tokens, token_types)
        if ttype == _TOKEN_TYPE_CONTROL
    ]
    user = [
        AddedToken(token, special=False, normalized=False)
        for token, ttype in zip(tokens, token_types)
        if ttype == _TOKEN_TYPE_USER_DEFINED
    ]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    bos_id = meta.get("ggml.bos_token_id")
    if meta.get("ggml.add_bos_token") and bos_id is not None:
        bos = tokens[int(bos_id)]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, int(bos_id))]
        )
    return tok


def _unique(ids: Iterable[int]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None and int(i) >= 0))


class ChatTokenizer:
    """A fast tokenizer plus the ids generation stops on and the model's chat template.

    Attributes:
      hf_tokenizer: the wrapped ``transformers`` fast tokenizer.
      eos_token_ids: every id that ends generation (eos and the chat end-of-turn tokens).
      pad_token_id: id used to pad batches.
      vocab_size: number of ids the tokenizer can emit (may be below the model's V).
    """

    def __init__(self, hf_tokenizer, eos_token_ids: Sequence[int], pad_token_id: int | None = None):
        self.hf_tokenizer = hf_tokenizer
        eos = _unique(eos_token_ids)
        if not eos:
            raise TokenizerError("ChatTokenizer needs at least one eos token id")
        self.eos_token_ids: tuple[int, ...] = eos
        if pad_token_id is None:
            pad_token_id = hf_tokenizer.pad_token_id
        self.pad_token_id: int = int(pad_token_id if pad_token_id is not None else eos[0])
        self.vocab_size: int = len(hf_tokenizer)

    # ------------------------------------------------------------------ use
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text`` (no BOS unless ``add_special_tokens`` and the model adds one)."""
        if not isinstance(text, str):
            raise TypeError(f"ChatTokenizer.encode expects str, got {type(text).__name__}")
        return list(self.hf_tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """:meth:`encode` for many strings (one call into the Rust tokenizer)."""
        out = self.hf_tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
        return [list(ids) for ids in out]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list or a 1-D array)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.hf_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` (``[{"role": ..., "content": ...}]``) with the model's own template."""
        if not self.hf_tokenizer.chat_template:
            raise TokenizerError("this tokenizer has no chat template")
        well_formed = isinstance(messages, list) and all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages
        )
        if not well_formed:
            raise TokenizerError("messages must be a list of {'role': ..., 'content': ...} dicts")
        return self.hf_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template, or None."""
        return self.hf_tokenizer.chat_template

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"ChatTokenizer(vocab_size={self.vocab_size}, eos_token_ids={self.eos_token_ids}, "
            f"pad_token_id={self.pad_token_id})"
        )

    # ------------------------------------------------------------ building
    @classmethod
    def from_gguf_metadata(cls, meta: dict, path: str = "<gguf>") -> "ChatTokenizer":
        """Build from :func:`read_gguf_tokenizer_metadata` output."""
        from transformers import PreTrainedTokenizerFast

        tokens = meta.get("ggml.tokens")
        if not tokens:
            raise TokenizerError(f"{path}: GGUF file has no tokenizer (tokenizer.ggml.tokens missing)")
        model_type = meta.get("ggml.model")

        def token_of(key):
            index = meta.get(key)
            if index is None:
                return None
            index = int(index)
            if not 0 <= index < len(tokens):
                raise TokenizerError(f"{path}: tokenizer.{key}={index} is outside the vocabulary of {len(tokens)}")
            return tokens[index]

        special = {
            name: token_of(f"ggml.{key}")
            for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                              ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))
        }
        special = {k: v for k, v in special.items() if v is not None}
        if model_type == "gpt2":
            backend = _build_byte_level_bpe(meta, path)
        else:
            try:
                from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

                renamed = {
                    "tokenizer_type": model_type, "pre_tokenizer_type": meta.get("ggml.pre"),
                    "tokens": tokens, "scores": meta.get("ggml.scores"), "token_type": meta.get("ggml.token_type"),
                    "bos_token_id": meta.get("ggml.bos_token_id"), "eos_token_id": meta.get("ggml.eos_token_id"),
                    "unk_token_id": meta.get("ggml.unknown_token_id"),
                    "pad_token_id": meta.get("ggml.padding_token_id"),
                }
                if meta.get("ggml.merges") is not None:
                    renamed["merges"] = meta["ggml.merges"]
                if meta.get("ggml.add_space_prefix") is not None:
                    renamed["add_prefix_space"] = meta["ggml.add_space_prefix"]
                backend, _ = convert_gguf_tokenizer(meta.get("general.architecture"), renamed)
            except Exception as err:
                raise TokenizerError(
                    f"{path}: cannot build a tokenizer of type tokenizer.ggml.model={model_type!r}: {err}"
                ) from err
        hf = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=meta.get("chat_template"), **special)
        vocab = {tok: i for i, tok in enumerate(tokens)}
        eos_ids = [meta.get("ggml.eos_token_id"), meta.get("ggml.eot_token_id"), meta.get("ggml.eom_token_id")]
        eos_ids += [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab and t in (hf.all_special_tokens or [])]
        token_types = meta.get("ggml.token_type") or [0] * len(tokens)
        eos_ids += [vocab[t] for t in END_OF_TURN_TOKENS
                    if t in vocab and token_types[vocab[t]] == _TOKEN_TYPE_CONTROL]
        eos_ids = [i for i in eos_ids if i is not None]
        if not eos_ids:
            raise TokenizerError(f"{path}: GGUF metadata names no eos token (tokenizer.ggml.eos_token_id)")
        pad = meta.get("ggml.padding_token_id")
        return cls(hf, eos_ids, None if pad is None else int(pad))

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> "ChatTokenizer":
        """Build from a ``.gguf`` file's metadata (reads no tensor data)."""
        import gguf

        try:
            reader = gguf.GGUFReader(str(path))
        except Exception as err:
            raise TokenizerError(f"{path}: not a readable GGUF file: {err}") from err
        return cls.from_gguf_metadata(read_gguf_tokenizer_metadata(reader, str(path)), str(path))

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> "ChatTokenizer":
        """Build from a Hugging Face model directory (tokenizer.json / tokenizer_config.json).

        End-of-generation ids come from ``generation_config.json`` and ``config.json``
        (``eos_token_id``, int or list), the tokenizer's eos token, and any chat
        end-of-turn token (``<|im_end|>``, ``<|eot_id|>`` ...) registered as special.
        """
        from transformers import AutoTokenizer

        path = pathlib.Path(path)
        if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise TokenizerError(f"{path}: no tokenizer.json or tokenizer_config.json in this directory")
        try:
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as err:
            raise TokenizerError(f"{path}: cannot load the tokenizer: {err}") from err
        eos_ids: list[int] = []
        for name in ("generation_config.json", "config.json"):
            cfg_file = path / name
            if cfg_file.is_file():
                try:
                    value = json.loads(cfg_file.read_text()).get("eos_token_id")
                except json.JSONDecodeError as err:
                    raise TokenizerError(f"{cfg_file}: invalid JSON: {err}") from err
                if isinstance(value, int):
                    eos_ids.append(value)
                elif isinstance(value, list):
                    eos_ids.extend(int(v) for v in value)
        if hf.eos_token_id is not None:
            eos_ids.append(hf.eos_token_id)
        specials = set(hf.all_special_tokens)
        vocab = hf.get_vocab()
        eos_ids += [vocab[t] for t in END_OF_TURN_TOKENS if t in specials and t in vocab]
        if not eos_ids:
            raise TokenizerError(f"{path}: no eos token id in generation_config.json, config.json or the tokenizer")
        return cls(hf, eos_ids, hf.pad_token_id)

    # --------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` and ``align_jax_tokenizer.json`` (special tokens, eos ids, template)."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf_tokenizer.backend_tokenizer.save(str(directory / "tokenizer.json"))
        hf = self.hf_tokenizer
        meta = {
            "eos_token_ids": list(self.eos_token_ids),
            "pad_token_id": self.pad_token_id,
            "chat_template": hf.chat_template,
            "special_tokens": {
                name: getattr(hf, name)
                for name in ("bos_token", "eos_token", "unk_token", "pad_token")
                if getattr(hf, name, None) is not None
            },
        }
        (directory / _TOKENIZER_META).write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ChatTokenizer":
        """Inverse of :meth:`save`."""
        from transformers import PreTrainedTokenizerFast

        directory = pathlib.Path(directory)
        meta_file = directory / _TOKENIZER_META
        tok_file = directory / "tokenizer.json"
        for needed in (meta_file, tok_file):
            if not needed.is_file():
                raise TokenizerError(f"{directory}: missing {needed.name}")
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as err:
            raise TokenizerError(f"{meta_file}: invalid JSON at line {err.lineno}: {err.msg}") from err
        for key in ("eos_token_ids", "pad_token_id"):
            if key not in meta:
                raise TokenizerError(f"{meta_file}: missing field {key!r}")
        try:
            # tokenizer_file (not tokenizer_object): loads once, without a deep copy.
            hf = PreTrainedTokenizerFast(
                tokenizer_file=str(tok_file), chat_template=meta.get("chat_template"),
                **meta.get("special_tokens", {}),
            )
        except Exception as err:
            raise TokenizerError(f"{tok_file}: cannot read the saved tokenizer: {err}") from err
        return cls(hf, meta["eos_token_ids"], meta["pad_token_id"])

    @classmethod
    def is_saved_dir(cls, directory: str | os.PathLike) -> bool:
        """Whether ``directory`` holds a tokenizer written by :meth:`save`."""
        return (pathlib.Path(directory) / _TOKENIZER_META).is_file()
