"""Shared helpers for the convert tests: byte comparison with a readable first difference."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ggquant.formats.gguf import GGUFReader


def first_difference(ref: Path, ours: Path) -> str:
    """A one-line description of the first way `ours` differs from `ref` (metadata, then tensors)."""
    a, b = GGUFReader(ref), GGUFReader(ours)
    try:
        if list(a.fields) != list(b.fields):
            only_a = [k for k in a.fields if k not in b.fields]
            only_b = [k for k in b.fields if k not in a.fields]
            return f"metadata keys differ: only in reference {only_a}, only in ours {only_b}, order {list(b.fields)}"
        for k, fa in a.fields.items():
            fb = b.fields[k]
            if (fa.type, fa.item_type) != (fb.type, fb.item_type):
                return f"key {k}: type {fa.type.name}/{fa.item_type} vs ours {fb.type.name}/{fb.item_type}"
            va, vb = fa.value, fb.value
            same = va == vb if isinstance(va, (str, list)) else np.array_equal(np.asarray(va), np.asarray(vb))
            if not same:
                return f"key {k}: {str(va)[:120]!r} vs ours {str(vb)[:120]!r}"
        ta = [(t.name, t.shape, t.qtype.name) for t in a.tensors]
        tb = [(t.name, t.shape, t.qtype.name) for t in b.tensors]
        if ta != tb:
            for i, (x, y) in enumerate(zip(ta, tb)):
                if x != y:
                    return f"tensor #{i}: reference {x} vs ours {y}"
            return f"tensor count {len(ta)} vs ours {len(tb)}"
        for t in a.tensors:
            u = b.tensor(t.name)
            if not np.array_equal(t.raw(), u.raw()):
                return f"tensor {t.name} ({t.qtype.name}): data bytes differ"
        return "header layout or padding differs"
    finally:
        a.close()
        b.close()


def assert_identical(ref: Path, ours: Path) -> None:
    if Path(ref).read_bytes() != Path(ours).read_bytes():
        raise AssertionError(f"{ours} differs from llama.cpp's {ref}: {first_difference(ref, ours)}")


def assert_same_tensors(ref: Path, ours: Path) -> None:
    """The same tensors (names and types in order, bytes) whatever the metadata says."""
    with GGUFReader(ref) as b, GGUFReader(ours) as a:
        assert [(t.name, t.qtype) for t in a.tensors] == [(t.name, t.qtype) for t in b.tensors]
        for t in b.tensors:
            assert np.array_equal(a.tensor(t.name).raw(), t.raw()), f"{t.name} ({t.qtype.name})"
