"""The torch backend (ggquant/runtime/cuda.py): block dequantizers equal ggml's, and the model
agrees with the CPU backend (max |dlogit| <= 1e-2 on the tiny F32 models). Everything runs with
torch on the CPU in CI; the same tests run on a GPU when torch.cuda.is_available()."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from ggquant.formats.gguf import GGUFReader
from ggquant.quant import types as qt
from ggquant.runtime.model import ARCHITECTURES, Session, load_model

torch = pytest.importorskip("torch")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q5_0, T.Q4_1, T.Q5_1, T.Q4_K, T.Q5_K,
                                   T.Q6_K],
                         ids=lambda t: t.name)
@pytest.mark.parametrize("device", DEVICES)
def test_torch_dequantize_equals_ggml(qtype, device):
    from ggquant.runtime.cuda import dequantize

    rng = np.random.default_rng(int(qtype))
    x = (rng.standard_normal((6, 512)) * rng.uniform(0.1, 3, (6, 1))).astype(np.float32)
    raw = qt.quantize(x, qtype)
    ref = qt.dequantize(raw, qtype, x.shape)
    got = dequantize(torch, qtype, torch.from_numpy(raw).to(device), 512).cpu().numpy()
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


def _torch_model(path, device, gelu="ggml"):
    from ggquant.runtime.cuda import CUDABackend

    r = GGUFReader(path)
    return ARCHITECTURES[r.get("general.architecture")](r, CUDABackend(gelu=gelu, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["gemma4_e4b", "gemma4_e2b", "gemma3_text", "gemma4_a4b", "gemma4_31b",
                                  "llama3", "mistral", "qwen2", "qwen3", "ministral3"])
def test_torch_backend_agrees_with_cpu_backend(reference_gguf, name, device):
    path = reference_gguf(name, "f32")
    rng = np.random.default_rng(1)
    ids = [2] + [int(t) for t in rng.integers(21, 500, 39)]
    cpu = Session(load_model(path, threads=2), 64).eval(ids, "all")
    m = _torch_model(path, device)
    s = Session(m, 64, n_batch=16)
    got = np.concatenate([s.eval(ids[:30], "all")] + [s.eval([t], "all") for t in ids[30:]])
    assert np.abs(got - cpu).max() <= 1e-2
    assert np.array_equal(got.argmax(-1), cpu.argmax(-1))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_backend_runs_quantized_gguf(reference_gguf, device):
    path = reference_gguf("gemma4_e4b", "q8_0")
    ids = [2, 100, 200, 300, 400]
    cpu = Session(load_model(path, threads=2), 16).eval(ids, "all")
    got = Session(_torch_model(path, device), 16).eval(ids, "all")
    # the CPU backend quantizes activations to Q8_0 like llama.cpp (research note: ~0.3 on this model), torch does not
    assert np.abs(got - cpu).max() <= 0.5
    assert (got.argmax(-1) == cpu.argmax(-1)).mean() >= 0.8
