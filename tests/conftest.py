"""Shared pytest fixtures: tiny random checkpoints and their llama.cpp reference GGUFs.

Checkpoints come from fixtures.TINY_MODELS and GGUFs from llama.cpp's own converter
(tests/reference.py); both are cached under $GGQUANT_CACHE or <repo>/.cache/fixtures, so only
the first run pays for building and converting.

    tiny_model_dir("gemma4_e4b")                      -> HF checkpoint folder
    reference_gguf("gemma4_e4b", "q8_0")              -> text GGUF
    reference_gguf("gemma4_e4b", "f16", mmproj=True)  -> mmproj GGUF
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

# $GGML_LIB_DIR: run llama.cpp on another build of ggml (e.g. for AVX2, with GGQUANT_CPU_ISA=avx2,
# on an AVX-512 host: .ci/isa-check). Loading its libraries first makes llama-cpp-python's libllama
# bind to them (the dynamic loader reuses an already loaded soname).
if os.environ.get("GGML_LIB_DIR"):
    for _lib in ("libggml-base.so.0", "libggml-cpu.so.0", "libggml.so.0"):
        ctypes.CDLL(os.path.join(os.environ["GGML_LIB_DIR"], _lib), mode=ctypes.RTLD_GLOBAL)

from ggquant.fixtures import TINY_MODELS, tiny_model


def _interpreter_scalar_index_fix():
    """Triton 3.6's interpreter holds a kernel's scalar arguments as 1-element 1-D numpy arrays and
    converts them with int(array) when used as a Python index - `range(0, K, BK)` over a runtime
    K, the loop of every matvec kernel. numpy >= 2.4 refuses int() on ndim > 0 arrays ("only
    0-dimensional arrays can be converted to Python scalars"), so under TRITON_INTERPRET=1 every
    such kernel failed. Re-patch __index__ to take the one element (.item()); the GPU compiler is
    not involved."""
    from triton.runtime import interpreter as ti

    if getattr(ti._patch_lang_tensor, "ggquant_fixed", False):
        return
    orig = ti._patch_lang_tensor

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched.ggquant_fixed = True
    ti._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":  # the Triton kernels on the CPU (tests/runtime/test_cuda*.py)
    try:
        _interpreter_scalar_index_fix()
    except ImportError:  # no triton: those tests skip
        pass


# Conversions made together in one converter process the first time any is requested (one
# process imports torch/transformers once; that import is most of a tiny conversion's time).
DEFAULT_REFERENCE_CONVERSIONS: tuple[tuple[str, str, bool], ...] = (
    ("gemma4_e4b", "f32", False),
    ("gemma4_e4b", "q8_0", False),
    ("gemma4_e4b", "f16", True),
    ("gemma4_e2b", "f32", False),
    ("gemma4_e2b", "q8_0", False),
    ("gemma4_e2b", "f16", True),
    ("gemma4_e4b_text", "f32", False),
    ("gemma3_text", "f32", False),
    ("gemma3_vision", "f32", False),
    ("gemma3_vision", "f16", True),
    ("gemma4_a4b", "f32", False),
    ("gemma4_31b", "f32", False),
    ("gemma4_unified", "f32", False),
)


@pytest.fixture(scope="session")
def tiny_model_dir():
    """Factory: tiny_model_dir(name) -> folder of a fixtures.TINY_MODELS checkpoint."""
    return tiny_model


@pytest.fixture(scope="session")
def reference_gguf():
    """Factory: reference_gguf(name, outtype="f32", mmproj=False) -> llama.cpp-converted GGUF.

    Raises the converter's error (with its stderr) when that conversion failed.
    """
    from tests.oracles.llama_converter import cached_reference_ggufs

    results: dict[tuple[str, str, bool], Path | Exception] = {}

    def get(name: str, outtype: str = "f32", mmproj: bool = False) -> Path:
        want = (name, outtype, bool(mmproj))
        if want not in results:
            batch = [want] + [c for c in DEFAULT_REFERENCE_CONVERSIONS if c not in results and c != want]
            paths = cached_reference_ggufs([(tiny_model(n), o, m) for n, o, m in batch])
            results.update(zip(batch, paths))
        r = results[want]
        if isinstance(r, Exception):
            raise r
        return r

    return get


@pytest.fixture(scope="session")
def tiny_gemma4_e4b() -> Path:
    return tiny_model("gemma4_e4b")


@pytest.fixture(scope="session")
def tiny_gemma4_e2b() -> Path:
    return tiny_model("gemma4_e2b")


@pytest.fixture(scope="session")
def tiny_gemma4_e4b_text() -> Path:
    return tiny_model("gemma4_e4b_text")


@pytest.fixture(scope="session")
def tiny_gemma3_text() -> Path:
    return tiny_model("gemma3_text")


@pytest.fixture(scope="session")
def tiny_gemma3_vision() -> Path:
    return tiny_model("gemma3_vision")


__all__ = ["DEFAULT_REFERENCE_CONVERSIONS", "TINY_MODELS"]
