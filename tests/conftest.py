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
