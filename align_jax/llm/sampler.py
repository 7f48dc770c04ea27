"""Jit-compiled batched sampling with a static KV cache and a logits-processor hook.

Design (Flax NNX Gemma sampler / jax-llm-examples style):

* The model is split once, ``graphdef, state = nnx.split(model)``; the two compiled
  functions below take ``graphdef`` as a static argument and the weights ``state`` as
  ordinary array arguments (never ``nnx.jit`` on the module, never weights as constants).
* B prompts are tokenised on the host, left-padded to a bucket ``P >= max prompt
  length`` (by default a multiple of an eighth of the next power of two, at least
  ``min_prompt_bucket``; see :func:`prompt_bucket`), so prompts of similar length share
  one compiled program and at most four programs exist per doubling of the length.
* **Prefill** (one jit): the B prompts run once through the decoder into a cache of
  ``S = P + max_new_tokens`` slots; only the last position goes through the LM head.
  The cache and the last logits are then repeated K = ``num_samples`` times, giving
  R = B * K rows ordered ``row = b * K + k``.
* **Decode** (one jit, the cache donated): a fixed ``[R, max_new_tokens]`` token buffer
  filled inside ``lax.while_loop``, which stops as soon as every row has finished.
  Step t draws token t of every row with the key ``fold_in(fold_in(fold_in(key, b), k), t)``,
  so sample k of prompt b does not depend on K or on the other prompts.
* Rows finish on an EOS id (unless ``ignore_eos``), on a stop-token sequence
  (checked on device), or at ``max_new_tokens``. Stop *strings* are handled on the host
  after decoding: the text is cut before the first occurrence and the row's length
  is cut to the shortest token prefix whose text contains it. Each stop string is also
  tokenised on its own and used as an on-device stop-token sequence, which ends the
  row early when the model emits exactly that tokenisation (an optimisation; the
  host check is the authoritative one).

Log-probabilities returned per generated token:

* ``logprobs``: the raw model's ``log softmax(logits)[token]`` (before the logits
  processor, temperature, top-k and top-p) -- what a verifier would score.
* ``sampling_logprobs``: the log-probability under the distribution actually sampled
  from (after the processor, temperature, top-k, top-p; 0 for greedy rows).

Modules: :mod:`align_jax.llm.decoding` holds the compiled prefill and the one-step API
(:func:`prefill` / :func:`step` / :func:`gather` / :func:`copy` on a :class:`DecodeState`),
:mod:`align_jax.llm.decode_loop` the while-loop decode; this module is the host side
(validation, padding, stop strings, the :class:`Sampler`) and re-exports their names.

Shapes: B prompts, K samples per prompt, R = B * K rows, P prompt bucket, T =
``max_new_tokens``, S = P + T cache slots, V vocabulary, D hidden size, L tokens per step.
"""

from __future__ import annotations

import time

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from align_jax.llm import model as model_lib
from align_jax.llm import sharding
from align_jax.llm.decode_loop import (
    FINISH_NAMES,
    FINISH_STOP,
    DecodeResult,
    DecodeSpec,
    SamplerStepState,
    decode,
    decode_compacting,
    decode_donating,
    per_prompt_keys,
)
from align_jax.llm.decoding import (
    TRACE_COUNTS,
    DecodeState,
    copy,
    enable_compilation_cache,
    gather,
    hidden_states,
    lm_head,
    prefill,
    prefill_cache,
    prompt_bucket,
    step,
)
from align_jax.llm.logits import DEFAULT_NUM_CANDIDATES
from align_jax.llm.tokenizer import token_ids

__all__ = [
    "Sampler",
    "SampleOutput",
    "DecodeResult",
    "PreparedBatch",
    "SamplerStepState",
    "DecodeSpec",
    "DecodeState",
    "prefill",
    "step",
    "gather",
    "copy",
    "enable_compilation_cache",
    "prompt_bucket",
    "hidden_states",
    "lm_head",
    "TRACE_COUNTS",
]


class PreparedBatch(NamedTuple):
    """Host-side, validated, padded inputs for :meth:`Sampler.prefill` / :meth:`Sampler.decode`.

    Attributes:
      tokens: int32 ``[B, P]`` left-padded prompt ids.
      prompt_lengths: int32 ``[B]`` real prompt lengths.
      num_samples: K.
      max_new_tokens: T.
      temperature: float32 ``[R]``.
      top_p: float32 ``[R]``.
      num_prompts: the caller's B when the sampler has a mesh whose data axis does not divide
        ``B * K``: ``tokens`` then has dummy prompts (copies of prompt 0, greedy) appended until
        it does, whose rows finish before their first step and are dropped from the output;
        None when there is no padding.
    """

    tokens: np.ndarray
    prompt_lengths: np.ndarray
    num_samples: int
    max_new_tokens: int
    temperature: np.ndarray
    top_p: np.ndarray
    num_prompts: int | None = None

    @property
    def row_active(self) -> np.ndarray | None:
        """bool ``[R]``: False for the rows of padding prompts; None without padding."""
        if self.num_prompts is None:
            return None
        rows = self.tokens.shape[0] * self.num_samples
        return np.arange(rows) < self.num_prompts * self.num_samples


class SampleOutput(NamedTuple):
    """Host-side result of :meth:`Sampler.generate` (B prompts, K samples, T new tokens).

    Attributes:
      tokens: int32 ``[B, K, T]`` generated ids, ``pad_token_id`` after ``lengths``.
      lengths: int32 ``[B, K]`` generated tokens kept (including a final EOS; a stop
        string cuts the length to the shortest prefix containing it).
      logprobs: float32 ``[B, K, T]`` raw model log-probs (see module docstring), 0 after length.
      sampling_logprobs: float32 ``[B, K, T]`` log-probs under the sampling distribution.
      text: ``text[b][k]`` decoded completion (special tokens skipped, cut before a
        stop string), or None when the sampler has no tokenizer.
      finish_reasons: ``[b][k]`` one of ``"eos"``, ``"stop"``, ``"length"``.
      prompt_tokens: int32 ``[B]`` prompt lengths in tokens.
      generated_tokens: total generated tokens kept (``lengths.sum()``).
      num_steps: decoding steps actually run.
      processor_state: the final user pytree of the logits processor (host arrays), or None
        when :meth:`Sampler.generate` was called with ``return_processor_state=False``.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    logprobs: np.ndarray
    sampling_logprobs: np.ndarray
    text: list | None
    finish_reasons: list
    prompt_tokens: np.ndarray
    generated_tokens: int
    num_steps: int
    processor_state: Any = None


# ---------------------------------------------------------------------------
# Host-side validation and the user-facing class.
# ---------------------------------------------------------------------------


def _per_row(name: str, value, batch: int, num_samples: int) -> np.ndarray:
    """Broadcast a scalar, ``[B]``, ``[B, K]`` or ``[B*K]`` value to float32 ``[B*K]``."""
    arr = np.asarray(value, dtype=np.float64)
    rows = batch * num_samples
    if arr.ndim == 0:
        out = np.full((rows,), arr)
    elif arr.shape == (rows,):
        out = arr
    elif arr.shape == (batch,):
        out = np.repeat(arr, num_samples)
    elif arr.shape == (batch, num_samples):
        out = arr.reshape(rows)
    else:
        raise ValueError(
            f"{name} has shape {arr.shape}; expected a scalar, [B]=({batch},), "
            f"[B, K]=({batch}, {num_samples}) or [B*K]=({rows},)"
        )
    return out.astype(np.float32)


def _check_key(key, num_prompts: int | None = None) -> jax.Array:
    """A single key, or (with ``num_prompts``) typed keys ``[num_prompts]``, one per prompt."""
    if key is None:
        raise ValueError("key is required: pass jax.random.key(seed) (sampling is explicit and reproducible)")
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != () and not (num_prompts is not None and key.shape == (num_prompts,)):
            raise ValueError(f"key must be a single PRNG key or one typed key per prompt (shape ({num_prompts},)), "
                             f"got a key array of shape {key.shape}")
    elif key.shape != (2,) or key.dtype != jnp.uint32:
        raise ValueError(
            f"key must be jax.random.key(seed) or jax.random.PRNGKey(seed), got {key.dtype}{list(key.shape)}"
        )
    return key


def _batch_key(key, batch: "PreparedBatch") -> jax.Array:
    """:func:`_check_key` for a prepared batch: per-prompt keys are checked against its B prompts
    and extended with copies of the first key for the dummy prompts a mesh adds."""
    padded = batch.tokens.shape[0]
    key = _check_key(key, batch.num_prompts if batch.num_prompts is not None else padded)
    if per_prompt_keys(key) and padded > key.shape[0]:
        key = jnp.concatenate([key, jnp.repeat(key[:1], padded - key.shape[0])])
    return key


class Sampler:
    """Batched sampler over a :class:`~align_jax.llm.model.Transformer`.

    Build it once per model (``nnx.split`` happens here) and call :meth:`generate`
    (or :meth:`generate_chat`) many times; calls whose prompts fall in the same bucket
    and use the same static settings reuse one compiled prefill and one decode.

    Several devices: pass ``mesh`` (:func:`~align_jax.llm.sharding.make_mesh`, axes ``"data"``
    and ``"model"``); the weights are sharded once here (tensor parallel over ``"model"``,
    replicated over ``"data"``), each call's rows are split over ``"data"`` and the KV cache over
    KV heads (:mod:`~align_jax.llm.sharding`). When the data axis does not divide the rows
    ``B * K``, dummy prompts are appended and dropped again (see :class:`PreparedBatch`), so
    the output is the same as on one device.

    Example::

        loaded = load_pretrained("qwen2.5-coder-0.5b")
        sampler = Sampler(loaded)
        out = sampler.generate_chat([[{"role": "user", "content": question}]],
                                    key=jax.random.key(0), num_samples=4,
                                    max_new_tokens=256, temperature=0.7, top_p=0.95)
        out.text[0]   # 4 completions
    """

    def __init__(self, model, tokenizer=None, *, min_prompt_bucket: int = 16, bucket_steps: int = 4,
                 mesh: jax.sharding.Mesh | None = None, compact_min_rows: int | None = 8):
        """``model``: a ``LoadedModel`` (config, model, tokenizer) or a ``Transformer``
        (then pass ``tokenizer`` to use text prompts; token-id prompts need none).
        ``min_prompt_bucket`` and ``bucket_steps``: the prompt padding (:func:`prompt_bucket`).
        ``mesh``: optional device mesh, checked against the model's config
        (:func:`~align_jax.llm.sharding.check_mesh`, a ``ValueError`` naming the axis and
        the field) before any weight is moved.
        ``compact_min_rows``: decode batches of at least twice this many rows shrink by half
        whenever half of their rows have finished (:meth:`decode`); None turns that off."""
        if hasattr(model, "model") and hasattr(model, "config") and not isinstance(model, nnx.Module):
            tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
            model = model.model
        if not isinstance(model, nnx.Module) or not hasattr(model, "config"):
            raise TypeError(f"Sampler needs a LoadedModel or a Transformer, got {type(model).__name__}")
        self.config: model_lib.ModelConfig = model.config
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is not None and not 0 <= int(pad) < self.config.vocab_size:
            # prompts are left-padded with this id: outside the embedding table it reads NaN
            raise ValueError(f"the tokenizer's pad_token_id={pad} is outside the model's vocabulary "
                             f"[0, {self.config.vocab_size}) (ModelConfig.vocab_size): the tokenizer does "
                             f"not belong to this model")
        self.mesh = None if mesh is None else sharding.check_mesh(mesh, self.config)
        self.tokenizer = tokenizer
        self.graphdef, self.state = nnx.split(model)
        if self.mesh is not None:
            self.state = sharding.shard_params(self.state, self.mesh)
        self.min_prompt_bucket = int(min_prompt_bucket)
        self.bucket_steps = int(bucket_steps)
        if compact_min_rows is not None and int(compact_min_rows) < 1:
            raise ValueError(f"compact_min_rows must be >= 1 or None, got {compact_min_rows}")
        self.compact_min_rows = None if compact_min_rows is None else int(compact_min_rows)
        prompt_bucket(1, self.min_prompt_bucket, self.bucket_steps)  # validates steps
        #: Wall seconds :meth:`generate` has spent in each stage, summed over calls (compilation
        #: included): ``"prefill"`` (to the first logits on the host side of the device) and
        #: ``"decode"`` (the rest of the call).  Read it before and after a call to split that call.
        self.stage_seconds: dict[str, float] = {"prefill": 0.0, "decode": 0.0}

    # -- host-side preparation -------------------------------------------------

    def encode_prompts(self, prompts: Sequence, *, add_special_tokens: bool = False) -> list[list[int]]:
        """Strings (through the tokenizer) or token-id sequences -> lists of ids, validated."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) and not isinstance(prompts, np.ndarray):
            raise TypeError("prompts must be a list of strings or of token-id sequences")
        if len(prompts) == 0:
            raise ValueError("prompts is empty: pass at least one prompt")
        vocab = self.config.vocab_size
        return [token_ids(prompt, "prompt", i, self.tokenizer, vocab, add_special_tokens=add_special_tokens,
                          no_tokenizer="the sampler has no tokenizer") for i, prompt in enumerate(prompts)]

    def prepare(self, prompts: Sequence, *, num_samples: int = 1, max_new_tokens: int = 128,
                temperature=1.0, top_p=1.0, add_special_tokens: bool = False) -> PreparedBatch:
        """Validate and pad; every bad-input error is raised here, before any jit."""
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        ids = self.encode_prompts(prompts, add_special_tokens=add_special_tokens)
        context = self.config.max_position_embeddings
        for i, p in enumerate(ids):
            if len(p) + max_new_tokens > context:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it needs "
                    f"{len(p) + max_new_tokens} positions, more than the model's context "
                    f"(max_position_embeddings={context})"
                )
        batch = len(ids)
        temp = _per_row("temperature", temperature, batch, num_samples)
        bad = np.flatnonzero(~np.isfinite(temp) | (temp < 0))
        if bad.size:
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy); row {int(bad[0])} has {float(temp[bad[0]])}")
        topp = _per_row("top_p", top_p, batch, num_samples)
        bad = np.flatnonzero(~(topp > 0) | ~(topp <= 1))
        if bad.size:
            raise ValueError(f"top_p must be in (0, 1]; row {int(bad[0])} has {float(topp[bad[0]])}")
        lengths = np.asarray([len(p) for p in ids], np.int32)
        bucket = prompt_bucket(int(lengths.max()), self.min_prompt_bucket, self.bucket_steps)
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else 0
        tokens = np.full((batch, bucket), pad, np.int32)
        for i, p in enumerate(ids):
            tokens[i, bucket - len(p):] = p
        prepared = PreparedBatch(tokens, lengths, int(num_samples), int(max_new_tokens), temp, topp)
        return self._pad_for_mesh(prepared)

    def _pad_for_mesh(self, batch: PreparedBatch) -> PreparedBatch:
        """Append dummy prompts until the mesh's data axis divides the rows (no-op otherwise)."""
        if self.mesh is None:
            return batch
        data = int(self.mesh.shape[sharding.DATA_AXIS])
        b, k = batch.tokens.shape[0], batch.num_samples
        quantum = data // np.gcd(data, k)  # prompts per step that keep B' K a multiple of d
        extra = -b % quantum
        if extra == 0:
            return batch
        rows = extra * k
        return batch._replace(
            tokens=np.concatenate([batch.tokens, np.repeat(batch.tokens[:1], extra, axis=0)]),
            prompt_lengths=np.concatenate([batch.prompt_lengths, np.repeat(batch.prompt_lengths[:1], extra)]),
            temperature=np.concatenate([batch.temperature, np.zeros(rows, np.float32)]),
            top_p=np.concatenate([batch.top_p, np.ones(rows, np.float32)]),
            num_prompts=b,
        )

    # -- the two compiled stages -----------------------------------------------

    def prefill(self, batch: PreparedBatch):
        """Run the prompts once; returns ``(KVCache per layer [R, Hkv, S, hd], logits f32 [R, V])``."""
        return prefill_cache(
            self.graphdef, self.state, jnp.asarray(batch.tokens), jnp.asarray(batch.prompt_lengths),
            num_samples=batch.num_samples, max_new_tokens=batch.max_new_tokens, mesh=self.mesh,
        )

    def decode(self, batch: PreparedBatch, cache, first_logits, key, *, spec: DecodeSpec,
               processor_state: Any = None, processor_params: Any = None,
               donate_processor_state: bool = False) -> DecodeResult:
        """Decode from a prefilled cache (the cache is donated: do not reuse it; with
        ``donate_processor_state`` the processor state is donated too).

        Without a logits processor or mesh, and with ``compact_min_rows`` set, the batch is
        halved whenever half its rows have finished (:func:`~align_jax.llm.decode_loop.decode_compacting`:
        the same tokens, host arrays, ``cache=None``)."""
        if spec.max_new_tokens != batch.max_new_tokens:
            raise ValueError(f"spec.max_new_tokens={spec.max_new_tokens} != batch.max_new_tokens={batch.max_new_tokens}")
        row_lengths = np.repeat(batch.prompt_lengths, batch.num_samples)
        run = decode_donating if donate_processor_state else decode
        active = batch.row_active
        if (self.compact_min_rows and spec.logits_processor is None and spec.processor_update is None
                and processor_state is None and self.mesh is None and active is None):
            return decode_compacting(
                self.graphdef, self.state, cache, first_logits, jnp.asarray(row_lengths), _batch_key(key, batch),
                jnp.asarray(batch.temperature), jnp.asarray(batch.top_p), spec=spec,
                num_samples=batch.num_samples, min_rows=self.compact_min_rows)
        return run(
            self.graphdef, self.state, cache, first_logits, jnp.asarray(row_lengths),
            _batch_key(key, batch), jnp.asarray(batch.temperature), jnp.asarray(batch.top_p), processor_state,
            processor_params, None if active is None else jnp.asarray(active),
            spec=spec, num_samples=batch.num_samples, mesh=self.mesh,
        )

    # -- the one-step API with this sampler's weights ---------------------------

    def start(self, batch: PreparedBatch) -> tuple[jax.Array, DecodeState]:
        """:func:`prefill` of a prepared batch: ``(logits f32 [R, V], DecodeState)`` with
        ``batch.max_new_tokens`` free slots per row (with a mesh, R counts the padding rows of
        :class:`PreparedBatch`, last)."""
        return prefill(self.graphdef, self.state, jnp.asarray(batch.tokens), jnp.asarray(batch.prompt_lengths),
                       num_samples=batch.num_samples, max_new_tokens=batch.max_new_tokens, mesh=self.mesh)

    def step(self, state: DecodeState, tokens, num_tokens=None) -> tuple[jax.Array, DecodeState]:
        """:func:`step` with this sampler's weights (``state`` is donated)."""
        tokens = jnp.asarray(tokens, jnp.int32)
        if tokens.ndim not in (1, 2) or tokens.shape[0] != state.num_rows:
            raise ValueError(f"tokens must be [R] or [R, L] with R={state.num_rows}, got shape {tokens.shape}")
        if num_tokens is not None:
            num_tokens = jnp.asarray(num_tokens, jnp.int32)
            if num_tokens.shape != (state.num_rows,):
                raise ValueError(f"num_tokens must be [R]=({state.num_rows},), got shape {num_tokens.shape}")
        return step(self.graphdef, self.state, state, tokens, num_tokens, mesh=self.mesh)

    def make_spec(self, batch: PreparedBatch, *, top_k: int | None = None,
                  num_candidates: int = DEFAULT_NUM_CANDIDATES, eos_token_ids: Sequence[int] | None = None,
                  ignore_eos: bool = False, stop: Sequence[str] = (),
                  stop_token_sequences: Sequence[Sequence[int]] = (),
                  logits_processor: Callable | None = None,
                  processor_update: Callable | None = None) -> DecodeSpec:
        """The static decode settings for ``batch`` (validated)."""
        vocab = self.config.vocab_size
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        if top_k is not None:
            top_k = min(int(top_k), vocab)
        if isinstance(num_candidates, bool) or not isinstance(num_candidates, (int, np.integer)) or num_candidates < 1:
            raise ValueError(f"num_candidates must be an int >= 1, got {num_candidates!r}")
        if eos_token_ids is None:
            if self.tokenizer is None:
                raise ValueError("eos_token_ids is required when the sampler has no tokenizer (pass () for none)")
            eos_token_ids = self.tokenizer.eos_token_ids
        eos = () if ignore_eos else tuple(sorted({int(t) for t in eos_token_ids}))
        if isinstance(stop, str):
            stop = (stop,)
        sequences = [tuple(int(t) for t in s) for s in stop_token_sequences]
        for i, s in enumerate(stop):
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop[{i}] must be a non-empty string, got {s!r}")
            if self.tokenizer is None:
                raise ValueError("stop strings need a tokenizer; pass stop_token_sequences instead")
            ids = self.tokenizer.encode(s, add_special_tokens=False)
            if ids:
                sequences.append(tuple(int(t) for t in ids))
        for i, s in enumerate(sequences):
            if not s or any(t < 0 or t >= vocab for t in s):
                raise ValueError(f"stop token sequence {i} {s} is empty or has ids outside [0, {vocab})")
        sequences = tuple(dict.fromkeys(s for s in sequences if len(s) <= batch.max_new_tokens))
        full_vocab = top_k is None and bool(np.any((batch.top_p >= 1.0) & (batch.temperature > 0)))
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else 0
        return DecodeSpec(
            max_new_tokens=batch.max_new_tokens, top_k=top_k, num_candidates=int(num_candidates),
            full_vocab=full_vocab, all_greedy=bool(np.all(batch.temperature <= 0)), eos_token_ids=eos, stop_token_sequences=sequences,
            pad_token_id=int(pad), logits_processor=logits_processor, processor_update=processor_update,
        )

    # -- the user-facing call --------------------------------------------------

    def generate(self, prompts: Sequence, *, key, num_samples: int = 1, max_new_tokens: int = 128,
                 temperature=1.0, top_p=1.0, top_k: int | None = None,
                 num_candidates: int = DEFAULT_NUM_CANDIDATES, stop: Sequence[str] = (),
                 stop_token_sequences: Sequence[Sequence[int]] = (),
                 eos_token_ids: Sequence[int] | None = None, ignore_eos: bool = False,
                 logits_processor: Callable | None = None, processor_update: Callable | None = None,
                 processor_state: Any = None, processor_params: Any = None,
                 donate_processor_state: bool = False, add_special_tokens: bool = False,
                 return_processor_state: bool | Callable = True) -> SampleOutput:
        """Sample ``num_samples`` completions for each prompt.

        Args:
          prompts: B strings (tokenised with ``add_special_tokens``) or token-id lists.
          key: PRNG key; the same key gives the same samples. Or typed keys ``[B]`` (e.g.
            ``jax.vmap(jax.random.key)(seeds)``), one per prompt: prompt b then samples with
            ``key[b]`` where a single key would give it ``fold_in(key, b)``, so a prompt's samples
            do not depend on which other prompts share the call.
          num_samples: K completions per prompt (one prefill per prompt).
          max_new_tokens: T (static: one compiled decode per value).
          temperature: scalar, ``[B]``, ``[B, K]`` or ``[B*K]``; 0 = greedy.
          top_p: same shapes, in ``(0, 1]``.
          top_k: static top-k or None.
          num_candidates: candidate-set size for top-p without top-k (see ``logits.py``).
          stop: stop strings (host truncation + on-device token sequences).
          stop_token_sequences: extra id sequences that end a row on device.
          eos_token_ids: defaults to the tokenizer's ``eos_token_ids``.
          ignore_eos: generate exactly ``max_new_tokens`` unless a stop sequence hits.
          logits_processor: ``(logits f32[R, V], SamplerStepState) -> logits`` (or
            ``-> (logits, user)`` to update its state) applied each step inside the jit
            (e.g. CAGE steering, token bans).
          processor_update: ``(user, tokens int32[R], SamplerStepState) -> user``.
          processor_state: initial user pytree (array leaves), seen as ``state.user``.
          processor_params: constant pytree (array leaves, e.g. a guide model's weights),
            seen as ``state.params``; a jit argument, never donated.
          donate_processor_state: donate ``processor_state`` to the decode (a large state,
            such as a guide model's KV cache, is then updated in place rather than
            copied); the arrays passed in are deleted, so do not reuse them.
          return_processor_state: copy the final user pytree to the host into the output;
            False when it is large and not needed (a guide model's KV cache is GBs), or a
            function ``user -> pytree`` selecting the part to copy.

        With a mesh whose data axis does not divide ``B * K``, dummy prompts pad the batch
        (:class:`PreparedBatch`): a logits processor and its state then see ``R' > B * K`` rows
        (the padding rows last, always finished), and the output keeps the real rows only.

        Returns:
          :class:`SampleOutput`.
        """
        batch = self.prepare(prompts, num_samples=num_samples, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, add_special_tokens=add_special_tokens)
        spec = self.make_spec(batch, top_k=top_k, num_candidates=num_candidates, eos_token_ids=eos_token_ids,
                              ignore_eos=ignore_eos, stop=stop, stop_token_sequences=stop_token_sequences,
                              logits_processor=logits_processor, processor_update=processor_update)
        key = _batch_key(key, batch)
        t0 = time.perf_counter()
        cache, first_logits = self.prefill(batch)
        jax.block_until_ready(first_logits)  # so that the prefill's time is its own
        t1 = time.perf_counter()
        result = self.decode(batch, cache, first_logits, key, spec=spec, processor_state=processor_state,
                             processor_params=processor_params, donate_processor_state=donate_processor_state)
        if callable(return_processor_state):
            result = result._replace(processor_state=return_processor_state(result.processor_state))
        elif not return_processor_state:
            result = result._replace(processor_state=None)
        finished = self._finish(batch, spec, result, tuple([stop] if isinstance(stop, str) else stop))
        self.stage_seconds["prefill"] += t1 - t0
        self.stage_seconds["decode"] += time.perf_counter() - t1
        return finished

    def generate_chat(self, conversations: Sequence, **kwargs) -> SampleOutput:
        """:meth:`generate` on chat conversations (lists of ``{"role", "content"}`` dicts,
        or plain strings taken as one user message) through the model's chat template."""
        if self.tokenizer is None:
            raise ValueError("generate_chat needs a tokenizer")
        if isinstance(conversations, (str, dict)) or len(conversations) == 0:
            raise ValueError("conversations must be a non-empty list of conversations")
        prompts = []
        for conv in conversations:
            if isinstance(conv, str):
                conv = [{"role": "user", "content": conv}]
            prompts.append(self.tokenizer.apply_chat_template(list(conv), add_generation_prompt=True))
        return self.generate(prompts, **kwargs)

    def _finish(self, batch: PreparedBatch, spec: DecodeSpec, result: DecodeResult,
                stop: tuple[str, ...]) -> SampleOutput:
        """Device result -> host arrays, text, stop-string truncation."""
        tokens, lengths, logprobs, sampling_lp, finish, steps, user = jax.device_get(
            (result.tokens, result.lengths, result.logprobs, result.sampling_logprobs,
             result.finish_code, result.num_steps, result.processor_state))
        b, k, t = (batch.num_prompts or batch.tokens.shape[0]), batch.num_samples, batch.max_new_tokens
        rows = b * k  # padding rows of a mesh (after the real ones) are dropped
        tokens, lengths = np.array(tokens[:rows]), np.array(lengths[:rows])
        logprobs, sampling_lp = np.array(logprobs[:rows]), np.array(sampling_lp[:rows])
        finish = np.array(finish[:rows])
        texts = [] if self.tokenizer is not None else None
        for r in range(rows):
            n = int(lengths[r])
            if self.tokenizer is None:
                continue
            ids = tokens[r, :n].tolist()
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            cut = [text.find(s) for s in stop if s in text]
            if cut:
                text = text[: min(cut)]
                contains = lambda m: any(s in self.tokenizer.decode(ids[:m], skip_special_tokens=True) for s in stop)
                lo, hi = 1, n  # smallest m in [1, n] with contains(m); contains(n) is True
                while lo < hi:
                    mid = (lo + hi) // 2
                    if contains(mid):
                        hi = mid
                    else:
                        lo = mid + 1
                lengths[r] = lo
                finish[r] = FINISH_STOP
                tokens[r, lo:] = spec.pad_token_id
                logprobs[r, lo:] = 0.0
                sampling_lp[r, lo:] = 0.0
            texts.append(text)
        reasons = [FINISH_NAMES[int(c)] for c in finish]
        return SampleOutput(
            tokens=tokens.reshape(b, k, t),
            lengths=lengths.reshape(b, k),
            logprobs=logprobs.reshape(b, k, t),
            sampling_logprobs=sampling_lp.reshape(b, k, t),
            text=None if texts is None else [texts[i * k:(i + 1) * k] for i in range(b)],
            finish_reasons=[reasons[i * k:(i + 1) * k] for i in range(b)],
            prompt_tokens=batch.prompt_lengths[:b].copy(),
            generated_tokens=int(lengths.sum()),
            num_steps=int(steps),
            processor_state=user,
        )
