"""Benchmarks (GSM8K, GSM-Hard, MATH-500) and answer extraction / equivalence."""

from align_jax.data.answers import (
    MATH_VERIFY_TIMEOUT_S,
    answers_equal,
    canonicalize,
    extract_answer,
    is_correct,
    normalize_answer,
)
from align_jax.data.datasets import (
    DATA_DIR_ENV,
    DATASETS,
    DatasetError,
    DatasetSpec,
    Problem,
    dataset_names,
    fewshot_exemplars,
    load_dataset,
    resolve_data_dir,
)

__all__ = [
    "MATH_VERIFY_TIMEOUT_S",
    "answers_equal",
    "canonicalize",
    "extract_answer",
    "is_correct",
    "normalize_answer",
    "DATA_DIR_ENV",
    "DATASETS",
    "DatasetError",
    "DatasetSpec",
    "Problem",
    "dataset_names",
    "fewshot_exemplars",
    "load_dataset",
    "resolve_data_dir",
]
