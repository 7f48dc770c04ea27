"""The Flax side: decoder, offline weights, tokenizer, batched sampler, one-step decoding, scoring,
device meshes (data and tensor parallel)."""

from align_jax.llm.decoding import DecodeState, copy, gather, prefill, step
from align_jax.llm.logits import ban_tokens, compose_processors, sample_tokens
from align_jax.llm.model import KVCache, ModelConfig, Transformer, forward, init_cache
from align_jax.llm.quant import QUANTIZED_GGUF_TYPES, QuantizedTensor, quantized_matmul, unpack_gguf
from align_jax.llm.registry import MODELS, ModelPackageError, resolve_gguf
from align_jax.llm.sampler import SampleOutput, Sampler, SamplerStepState, enable_compilation_cache
from align_jax.llm.scoring import ScoreOutput, score_continuations
from align_jax.llm.sharding import DATA_AXIS, MODEL_AXIS, check_mesh, make_mesh, param_shardings, shard_params
from align_jax.llm.tokenizer import ChatTokenizer, TokenizerError
from align_jax.llm.weights import (
    LoadedModel,
    ModelLoadError,
    WeightsError,
    load_checkpoint,
    load_gguf,
    load_hf_dir,
    load_pretrained,
    save_checkpoint,
)

__all__ = [
    "ban_tokens",
    "compose_processors",
    "sample_tokens",
    "KVCache",
    "ModelConfig",
    "Transformer",
    "forward",
    "init_cache",
    "QUANTIZED_GGUF_TYPES",
    "QuantizedTensor",
    "quantized_matmul",
    "unpack_gguf",
    "MODELS",
    "ModelPackageError",
    "resolve_gguf",
    "SampleOutput",
    "Sampler",
    "SamplerStepState",
    "enable_compilation_cache",
    "DecodeState",
    "prefill",
    "step",
    "gather",
    "copy",
    "ScoreOutput",
    "score_continuations",
    "DATA_AXIS",
    "MODEL_AXIS",
    "make_mesh",
    "check_mesh",
    "param_shardings",
    "shard_params",
    "ChatTokenizer",
    "TokenizerError",
    "LoadedModel",
    "ModelLoadError",
    "WeightsError",
    "load_checkpoint",
    "load_gguf",
    "load_hf_dir",
    "load_pretrained",
    "save_checkpoint",
]
