"""Batched products (prefill, T > 1) of the torch/CUDA backend on tensor-core operand types
(issue 17): the fp16 dequantization kernel and the fused dequantize-and-dot kernel against torch
references (on a GPU, or on the CPU under TRITON_INTERPRET=1 with triton installed; they skip in
CI), and the whole model with fp16/bf16 prefill products against the float32 path and against
token-by-token decode (torch on the CPU in CI; also on a GPU when there is one)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

torch = pytest.importorskip("torch")

from tests.runtime.test_cuda_kernels import _kernels, _weights  # noqa: E402 (the kernel tests' helpers)

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if HAS_CUDA else "cpu"
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


BLOCK_TYPES = [T.Q8_0, T.Q4_0, T.Q5_0, T.Q6_K, T.Q4_K, T.IQ4_XS, T.IQ3_S, T.IQ2_S, T.IQ4_NL, T.IQ3_XXS, T.IQ2_XS]


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_dequant_half_is_the_rounded_dequantization(qtype):
    from ggquant.runtime.cuda import repack

    ck = _kernels()
    n, k = 45, 768
    raw, ref = _weights(qtype, n, k, seed=int(qtype))
    kind, parts = repack(torch, qtype, torch.from_numpy(raw).to(DEV), k, packed=True)
    got = ck.dequant_half(torch, kind, parts, n, k).cpu()
    want = torch.from_numpy(ref).to(torch.float16)
    assert got.dtype == torch.float16 and got.shape == (n, k)
    if kind != "q4_k":  # a product of exact factors (int8: s * q; i-quants: ggml's): one rounding, bit-equal
        assert torch.equal(got, want)
    else:  # Q4_K: d*sc*q - dmin*m may be contracted to an fma on the GPU: at most one fp16 step apart
        step = (want.float().abs() * 2.0 ** -10).clamp_min(2.0 ** -24)
        assert ((got.float() - want.float()).abs() <= step).all()


@pytest.mark.parametrize("qtype,m,n,k", [(T.Q8_0, 37, 300, 512), (T.Q4_K, 130, 70, 768), (T.Q6_K, 5, 256, 256),
                                         (T.Q4_0, 64, 129, 320), (T.IQ4_XS, 20, 70, 768), (T.IQ3_S, 9, 33, 512),
                                         (T.IQ2_S, 17, 40, 768), (T.IQ4_NL, 11, 50, 512),
                                         (T.IQ3_XXS, 6, 70, 512), (T.IQ2_XS, 9, 30, 768)], ids=str)
def test_matmul_q_equals_fp16_product(qtype, m, n, k):
    from ggquant.runtime.cuda import repack

    ck = _kernels()
    raw, ref = _weights(qtype, n, k, seed=n + k)
    kind, parts = repack(torch, qtype, torch.from_numpy(raw).to(DEV), k, packed=True)
    x = torch.from_numpy(np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)).to(torch.float16)
    got = ck.matmul_q(torch, kind, parts, x.to(DEV), n, k).cpu().double().numpy()
    w = torch.from_numpy(ref).to(torch.float16).double().numpy()
    terms = np.abs(x.double().numpy()) @ np.abs(w).T
    want = x.double().numpy() @ w.T
    assert np.isfinite(got).all()
    assert (np.abs(got - want) <= 1e-5 * terms + 1e-6).all()  # float32 accumulation of exact fp16 products


@pytest.mark.parametrize("qtype,T_,xdiv", [(T.Q4_K, 40, 4), (T.Q8_0, 70, 1), (T.F16, 33, 4), (T.BF16, 33, 4), (T.IQ4_XS, 24, 1),
                                           (T.Q6_K, 9, 4)], ids=str)
def test_matmul_id_equals_fp16_product_per_expert(qtype, T_, xdiv):
    """The grouped expert product (ggml_mul_mat_id for T > 1): every slot equals its expert's fp16
    product, whatever the experts' row counts (none, fewer than a tile, several tiles)."""
    from ggquant.runtime.cuda import repack
    from tests.runtime.test_cuda_kernels import _routing

    ck = _kernels()
    if qtype == T.BF16 and INTERPRET and not HAS_CUDA:
        pytest.skip("Triton 3.6's interpreter computes tl.dot of bfloat16 tiles wrongly (checked on the GPU)")
    E, n, k, kk = 6, 70, 512, 4
    raw, ref = _weights(qtype, E * n, k, seed=int(qtype))
    kind, parts = repack(torch, qtype, torch.from_numpy(raw).to(DEV), k, packed=True)
    ids = _routing(T_, kk, E, T_).reshape(-1)
    dt = torch.bfloat16 if qtype == T.BF16 else torch.float16
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((T_ * kk // xdiv, k)).astype(np.float32)).to(dt)
    got = ck.matmul_id(torch, kind, parts, x.to(DEV), torch.from_numpy(ids).to(DEV), xdiv, n, k, E).cpu().double()
    w = torch.from_numpy(ref).to(dt).double().numpy().reshape(E, n, k)
    xd = x.double().numpy()
    for s, e in enumerate(ids):
        want = w[e] @ xd[s // xdiv]
        terms = np.abs(w[e]) @ np.abs(xd[s // xdiv])
        assert (np.abs(got[s].numpy() - want) <= 1e-5 * terms + 1e-6).all(), (s, e)


def _model(path, device, **kw):
    from ggquant.formats.gguf import GGUFReader
    from ggquant.runtime.cuda import CUDABackend
    from ggquant.runtime.model import ARCHITECTURES

    r = GGUFReader(path)
    return ARCHITECTURES[r.get("general.architecture")](r, CUDABackend(device=device, **kw))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,outtype", [("gemma4_e4b", "q8_0"), ("gemma4_e4b", "bf16"), ("gemma4_a4b", "q8_0")])
def test_half_prefill_agrees_with_float32_prefill_and_decode(reference_gguf, name, outtype, device):
    """fp16/bf16 operands (PREFILL_MODE) change the prompt's logits by rounding only: against the
    float32 products, and against decoding the same tokens one at a time (batch-1 matvec, float32).
    The 26B-A4B-like MoE: its experts through the grouped kernel (matmul_id) where Triton runs."""
    from ggquant.runtime.model import Session

    path = reference_gguf(name, outtype)
    ids = [2] + [int(t) for t in np.random.default_rng(3).integers(21, 500, 39)]
    f32 = Session(_model(path, device, prefill="f32"), 64, n_batch=64).eval(ids, "all")
    modes = ["cublas"] + (["triton"] if device == "cuda" or INTERPRET else [])
    for mode in modes:
        m = _model(path, device, prefill=mode)
        half = Session(m, 64, n_batch=64).eval(ids, "all")
        assert np.isfinite(half).all()
        d = np.abs(half - f32)
        assert d.max() <= 0.01 * np.abs(f32).max(), (mode, d.max())  # measured ~2e-3 (Q8_0)
        assert (half.argmax(-1) == f32.argmax(-1)).mean() >= 0.9, mode
        s = Session(m, 64, n_batch=64)
        dec = np.concatenate([s.eval([t], "all") for t in ids])
        assert np.abs(dec - half).max() <= 0.01 * np.abs(dec).max(), mode
    # the f32 mode is the old path: unchanged products, so the prompt equals its own decode closely
    s = Session(_model(path, device, prefill="f32"), 64, n_batch=64)
    dec = np.concatenate([s.eval([t], "all") for t in ids])
    assert np.abs(dec - f32).max() <= 1e-3 * np.abs(f32).max()
