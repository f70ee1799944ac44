"""Helpers for the quantized-checkpoint tests: open a fixture folder, compare float32 bit patterns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ggquant.formats.quantized import open_quantized
from ggquant.formats.quantized.records import QuantizedModel
from tests.oracles.llama_logits import llama_cpp_logits


def open_dir(d: Path, via: str = "torch") -> QuantizedModel:
    """Read a fixture folder through open_quantized; via="torch" (safetensors' torch loader) or
    "numpy" (raw storage arrays: BF16 as uint16 bits, the ggquant.formats.safetensors convention)."""
    cfg = json.loads((Path(d) / "config.json").read_text())
    from safetensors import safe_open

    f = safe_open(str(Path(d) / "model.safetensors"), "pt")
    names = list(f.keys())
    if via == "torch":
        return open_quantized(cfg, names, f.get_tensor, d)
    from ggquant.formats.quantized.records import torch_to_numpy

    return open_quantized(cfg, names, lambda n: torch_to_numpy(f.get_tensor(n))[0], d)


def bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def assert_bits_equal(got: np.ndarray, want: np.ndarray, what: str = "") -> None:
    got = np.ascontiguousarray(got, dtype=np.float32)
    want = np.ascontiguousarray(want, dtype=np.float32)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    bad = bits(got) != bits(want)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise AssertionError(f"{what}: {int(bad.sum())} values differ, first at [{r}, {c}]: "
                             f"{got[r, c]!r} vs {want[r, c]!r}")


def assert_runtime_equals_llama_cpp(path) -> np.ndarray:
    """llama.cpp runs `path` and ggquant's runtime gives its logits bit for bit (40 tokens, batch);
    returns them."""
    from ggquant.runtime.model import Session, load_model

    ids = [2] + list(range(40, 79))
    ref = llama_cpp_logits(path, ids)
    ours = Session(load_model(path, threads=2), 64).eval(ids, "all")
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    return ref


def assert_torch_backend_meets_dequantized(checkpoint: Path, tmp_path: Path, tol: float = 1e-3) -> None:
    """The NVFP4 checkpoint converted at f32 and run by the torch backend (torch on the CPU; also
    CUDA where present), which dequantizes the blocks to float32 and applies their scales without
    quantizing activations, meets the CPU runtime on its float32 dequantization within tol, same
    argmax (tests.quantized.gemma4_quantized.dequantized_copy)."""
    import torch

    from ggquant.convert import convert
    from ggquant.formats.gguf import GGUFReader
    from ggquant.runtime.cuda import CUDABackend
    from ggquant.runtime.model import ARCHITECTURES, Session, load_model
    from tests.quantized import gemma4_quantized as G

    nv = convert(checkpoint, outtype="f32", outfile=tmp_path / "nvfp4.gguf").written[0]
    ref = convert(G.dequantized_copy(checkpoint), outtype="f32", outfile=tmp_path / "ref.gguf").written[0]
    ids = [2] + list(range(40, 79))
    want = Session(load_model(ref, threads=2), 64).eval(ids, "all")
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        with GGUFReader(nv) as r:
            model = ARCHITECTURES[r.get("general.architecture")](r, CUDABackend(device=device))
            got = Session(model, 64, n_batch=16).eval(ids, "all")
        assert np.abs(got - want).max() <= tol
        assert np.array_equal(got.argmax(-1), want.argmax(-1))
