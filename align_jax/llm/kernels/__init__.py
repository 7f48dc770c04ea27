"""Native CPU kernels for XLA, compiled on first use and registered through ``jax.ffi``.

* ``qmatmul.cc``: the block-quantized matrix multiply behind
  :func:`align_jax.llm.quant.quantized_matmul` (see that file's header for the maths and
  the loop structure). XLA:CPU cannot fuse an int8 -> float32 convert into its dot, so
  without it a quantized weight costs more to use than a float32 one.
* ``attention.cc``: decode-step attention of one new query per row against the KV cache,
  behind :func:`align_jax.llm.attention.decode_attention`.
* ``parallel.h``: the work splitting both share (pieces claimed by the caller and by
  tasks on XLA's intra-op pool); ``simd.h``: their vector helpers.

The source ships with the package and is compiled the first time it is needed, on the
machine that runs it (``-O3 -march=native``, so it uses the CPU's own vector width),
into ``$ALIGN_JAX_CACHE/kernels/<hash>/`` (default ``~/.cache/align_jax``). The hash
covers the source, the compiler and its flags, the JAX version (whose FFI headers are
compiled in) and the CPU's feature flags, so a changed source or another machine never
reuses a stale library. The library is written to a temporary file and renamed, so
concurrent first uses are safe.

Where there is no C++ compiler, or ``ALIGN_JAX_NATIVE_KERNELS=0`` is set, :func:`load`
returns False (with one warning saying why, when a build failed) and callers use their
pure-XLA path, which computes the same values more slowly.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import warnings

__all__ = ["KernelBuildError", "QMATMUL_TARGET", "ATTENTION_TARGET", "build", "compiler", "library_path", "load",
           "native_enabled"]

QMATMUL_TARGET = "align_jax_qmatmul_f32"
"""FFI target name of the block-quantized matmul (``x f32 [M, K]``, ``codes s8 [N, K]``,
``scale f32 [N, K/bs]``, ``offset f32 [N, K/bs] or [N, 0]`` -> ``f32 [M, N]``)."""

ATTENTION_TARGET = "align_jax_decode_attention_f32"
"""FFI target name of decode attention (``q [B, Hkv, G, hd]``, ``k, v [B, Hkv, S, hd]``,
``visible bool [B, S]`` -> ``[B, Hkv, G, hd]``, float32)."""

_DIR = pathlib.Path(__file__).parent
_SOURCES = (_DIR / "qmatmul.cc", _DIR / "attention.cc")
_HEADERS = (_DIR / "parallel.h", _DIR / "simd.h")
_TARGETS = {QMATMUL_TARGET: "AlignJaxQMatmulF32", ATTENTION_TARGET: "AlignJaxDecodeAttentionF32"}
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


class KernelBuildError(RuntimeError):
    """The native kernel could not be compiled or loaded; the message has the compiler's output."""


def compiler() -> str | None:
    """The C++ compiler used: ``$CXX``, else ``g++``, ``c++`` or ``clang++`` on the PATH (None if none)."""
    env = os.environ.get("CXX")
    if env:
        return shutil.which(env) or env
    for name in ("g++", "c++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def native_enabled() -> bool:
    """False when ``ALIGN_JAX_NATIVE_KERNELS`` is ``0``/``false``/``no`` (forces the XLA path)."""
    return os.environ.get("ALIGN_JAX_NATIVE_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _compiler_version(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else cxx
    except (OSError, subprocess.SubprocessError):
        return cxx


def library_path(cache_dir: str | os.PathLike | None = None, cxx: str | None = None) -> pathlib.Path:
    """Where the compiled library for this source, compiler, JAX version and CPU lives."""
    import jax

    from align_jax.llm.registry import cache_root

    cxx = cxx or compiler() or "c++"
    digest = hashlib.sha256()
    parts = [f.read_bytes() for f in (*_SOURCES, *_HEADERS)]
    for part in (*parts, _compiler_version(cxx).encode(), " ".join(_FLAGS).encode(),
                 jax.__version__.encode(), platform.machine().encode(), _cpu_flags().encode()):
        digest.update(part)
        digest.update(b"\0")
    return cache_root(cache_dir) / "kernels" / digest.hexdigest()[:16] / "libalign_jax_kernels.so"


def build(cache_dir: str | os.PathLike | None = None, *, force: bool = False) -> pathlib.Path:
    """Compile the kernels (unless already compiled) and return the library's path.

    Raises:
      KernelBuildError: no compiler, or the compiler failed (its output is in the message).
    """
    import jax

    cxx = compiler()
    if cxx is None:
        raise KernelBuildError("no C++ compiler found (set $CXX or install g++)")
    target = library_path(cache_dir, cxx)
    if target.is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
    os.close(handle)
    command = [cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, _SOURCES), "-o", tmp]
    names = ", ".join(s.name for s in _SOURCES)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise KernelBuildError(f"compiling {names} failed ({' '.join(command)}):\n{result.stderr.strip()[-4000:]}")
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as err:
        raise KernelBuildError(f"compiling {names} failed: {err}") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def load() -> bool:
    """Build (once per machine), load and register the native kernels with XLA:CPU.

    Returns True when :data:`QMATMUL_TARGET` and :data:`ATTENTION_TARGET` are registered.
    False when native kernels
    are disabled (``ALIGN_JAX_NATIVE_KERNELS=0``), the default backend is not the CPU,
    or the build failed; a failed build warns once, with the compiler's message.
    Cached: the work is done at most once per process.
    """
    import jax

    if not native_enabled() or jax.default_backend() != "cpu":
        return False
    try:
        path = build()
        library = ctypes.cdll.LoadLibrary(str(path))
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (KernelBuildError, OSError, AttributeError) as err:
        warnings.warn(
            f"align_jax: native CPU kernels unavailable, using the slower XLA path for quantized weights: {err}",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True
