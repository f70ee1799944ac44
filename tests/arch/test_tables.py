"""The architecture tables as data, checked against gguf-py's own declaration of each GGUF
architecture (gguf.MODEL_TENSORS, constants.py): every name-table entry of every registered
family produces a tensor its GGUF architecture has (the text GGUF's `model_arch`, the mmproj's
MODEL_ARCH.MMPROJ), as gguf-py's tensor_mapping.py ensures by filtering its map with
MODEL_TENSORS[arch] (TensorNameMap.__init__). A new family module is checked without editing
this file: families() finds it through its @register."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES

from ggquant.arch import arch_class, families, gguf_arch_class
from ggquant.arch.base import MMPROJ, TEXT, map_name, unmap_name

FAMILIES = families()


def _llama_cpp_constants() -> str:
    """gguf-py/gguf/constants.py of the llama.cpp the converter tests run (newer than the pinned gguf)."""
    from tests.oracles.llama_converter import llama_cpp_source

    return (llama_cpp_source() / "gguf-py" / "gguf" / "constants.py").read_text(encoding="utf-8")


def _parts(cls):
    """(part, GGUF architecture of that file) of a family."""
    return ((TEXT, cls.model_arch), (MMPROJ, MODEL_ARCH.MMPROJ))


def test_the_gemma_families_are_registered():
    assert {c.__name__ for c in FAMILIES} >= {"Gemma3", "Gemma4"}


@pytest.mark.parametrize("cls", FAMILIES, ids=lambda c: c.__name__)
def test_every_table_entry_is_a_tensor_of_its_gguf_architecture(cls):
    for part, arch in _parts(cls):
        table = cls.TEXT_TENSORS if part == TEXT else cls.MMPROJ_TENSORS
        for rule in table:
            if isinstance(rule.tensor, str):  # a tensor the pinned gguf does not declare yet
                assert f'"{rule.tensor}"' in _llama_cpp_constants(), (
                    f"{cls.__name__} {part}: '{rule.hf}' -> '{rule.tensor}' is not a tensor of llama.cpp's gguf-py")
                continue
            assert rule.tensor in MODEL_TENSORS[arch], (
                f"{cls.__name__} {part}: '{rule.hf}' -> {rule.tensor.name} ('{rule.gguf}') is not a tensor of "
                f"gguf MODEL_ARCH.{arch.name}")
            assert rule.gguf.startswith(TENSOR_NAMES[rule.tensor])


@pytest.mark.parametrize("cls", FAMILIES, ids=lambda c: c.__name__)
def test_every_table_entry_is_reached_and_read_back(cls):
    """An HF name of each entry's form maps through the whole table (first match wins) to that
    entry's GGUF name, and that GGUF name maps back to the HF name (convert --to hf)."""
    for part, _ in _parts(cls):
        table = cls.TEXT_TENSORS if part == TEXT else cls.MMPROJ_TENSORS
        for rule in table:
            for suffix in rule.suffixes:
                hf = rule.hf.format(bid=0) + suffix
                hit = rule.match(hf)
                assert hit is not None and map_name(table, hf) == hit, f"{cls.__name__} {part}: {hf} -> {hit}"
                assert unmap_name(table, hit[0]) == (hf, hit[1]), f"{cls.__name__} {part}: {hit[0]} -> {hf}"


@pytest.mark.parametrize("cls", FAMILIES, ids=lambda c: c.__name__)
def test_generated_tensors_are_tensors_of_the_architecture(cls):
    allowed = {TENSOR_NAMES[t] for t in MODEL_TENSORS[cls.model_arch]}
    for name in cls.GENERATED:
        assert name.removesuffix(".weight") in allowed, f"{cls.__name__} generates {name}"


@pytest.mark.parametrize("cls", FAMILIES, ids=lambda c: c.__name__)
def test_family_is_found_by_its_hf_and_gguf_architectures(cls):
    assert cls.hf_architectures
    for hf in cls.hf_architectures:
        assert arch_class(hf) is cls
    if cls.gguf_arch != MODEL_ARCH_NAMES[cls.model_arch]:  # an architecture the pinned gguf does not name yet
        assert f'"{cls.gguf_arch}"' in _llama_cpp_constants(), f"{cls.gguf_arch} is not a llama.cpp architecture"
    family = gguf_arch_class(cls.gguf_arch, Path("m.gguf"))
    assert family is cls or issubclass(cls, family)  # a variant (Gemma 4 Unified) reads back as its family
