"""Test-session hooks.

Every XLA:CPU executable JAX keeps alive holds about three memory maps of JIT-compiled code
(read-only, executable, read-write).  The default suite compiles well over ten thousand
programs; with JAX's caches holding all of them, a single pytest process passed the kernel's
``vm.max_map_count`` (65,530 here and on CI), after which LLVM's next ``mmap`` failed and the
compiler aborted (SIGABRT/SIGSEGV in ``backend_compile_and_load``, in whichever test happened
to compile next).  After each test module we drop JAX's compilation caches and collect, which
keeps the count near its per-module peak.

The suite compiles with XLA:CPU's backend (LLVM) optimization level 0 unless ``XLA_FLAGS``
already sets a level: the tests' programs are tiny, so compilation is most of their cost, and
level 0 compiles about 3x faster with the same semantics (results agree to float rounding).
Benchmarks, studies and the CLI keep XLA's default.  ``ALIGN_JAX_TEST_XLA_OPT=default`` runs
the suite at the default level.
"""
from __future__ import annotations

import gc
import os

OPT_FLAG = "--xla_backend_optimization_level"
if os.environ.get("ALIGN_JAX_TEST_XLA_OPT", "0") != "default" and OPT_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {OPT_FLAG}=0".strip()

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Free the executables a test module compiled once the module is done."""
    yield
    jax.clear_caches()
    gc.collect()
