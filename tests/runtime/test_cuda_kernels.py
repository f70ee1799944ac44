"""The decode path of the torch/CUDA backend: repacked weight layouts (exact, checked everywhere
with torch on the CPU), the Triton kernels against torch references (on a GPU, or on the CPU
under TRITON_INTERPRET=1 when triton is installed), and the CUDA-graph decode against eager
decoding (GPU only). CI has neither triton nor a GPU: those tests skip there."""

from __future__ import annotations

import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from ggquant.quant import types as qt

torch = pytest.importorskip("torch")

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if HAS_CUDA else "cpu"


def _kernels():
    if not (HAS_CUDA or INTERPRET):
        pytest.skip("Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1)")
    pytest.importorskip("triton")
    from ggquant.kernels.cuda import triton

    return triton


def _weights(qtype, n, k, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, k)) * rng.uniform(0.1, 3, (n, 1))).astype(np.float32)
    im = (rng.random(k) + 0.1).astype(np.float32) if qt.get(qtype).uses_imatrix else None  # IQ2_XXS/XS, IQ1_S need one
    raw = qt.quantize(x, qtype, im)
    return raw, qt.dequantize(raw, qtype, x.shape)


# issue 14: torch decoders + int8 repacks of the i-quants, ternary, FP4 and sign types
LOW_BIT_TYPES = [T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M, T.IQ4_NL, T.IQ4_XS,
                 T.TQ1_0, T.TQ2_0, T.MXFP4, T.NVFP4, T.Q1_0]


@pytest.mark.parametrize("qtype", LOW_BIT_TYPES, ids=lambda t: t.name)
def test_low_bit_decoders_equal_ggml_to_float(qtype):
    """The torch decoder of each low-bit type equals ggml's to_float bit for bit (also through the
    int8 repack the Triton matvec reads, and the packed layout where the type has one)."""
    from ggquant.kernels.cuda.dequant import dequantize_parts
    from ggquant.runtime.cuda import dequantize, repack
    from tests.oracles import ggml as ggml_oracle

    raw, _ = _weights(qtype, 5, 1024, seed=int(qtype))
    ref = ggml_oracle.dequantize(qtype, raw, 1024)
    got = dequantize(torch, qtype, torch.from_numpy(raw), 1024).numpy()
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))
    for packed in (False, True):
        kind, parts = repack(torch, qtype, torch.from_numpy(raw), 1024, packed)
        assert np.array_equal(dequantize_parts(torch, kind, parts).numpy().view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q5_0, T.Q6_K, T.Q4_K, *LOW_BIT_TYPES],
                         ids=lambda t: t.name)
def test_repacked_layout_holds_ggml_values(qtype):
    from ggquant.kernels.cuda.dequant import dequantize_parts
    from ggquant.runtime.cuda import repack

    raw, ref = _weights(qtype, 6, 512)
    for packed in (False, True):
        kind, parts = repack(torch, qtype, torch.from_numpy(raw), 512, packed)
        got = dequantize_parts(torch, kind, parts).numpy()
        assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qtype,n,k", [(T.F32, 40, 384), (T.BF16, 300, 512), (T.F16, 7, 96),
                                       (T.Q8_0, 300, 512), (T.Q8_0, 5, 288), (T.Q4_K, 300, 512),
                                       (T.Q4_K, 3, 768), (T.Q4_K, 33, 1280),
                                       (T.Q4_0, 40, 320), (T.Q5_0, 17, 512), (T.Q6_K, 30, 768),
                                       (T.IQ2_S, 20, 512), (T.IQ3_S, 9, 768), (T.IQ1_M, 12, 512),
                                       (T.TQ2_0, 8, 512), (T.NVFP4, 10, 320), (T.Q1_0, 6, 384),
                                       (T.IQ4_NL, 16, 320),
                                       # issue 14's packed layouts: partial row blocks, partial NSB tiles
                                       (T.IQ4_XS, 33, 1280), (T.IQ4_XS, 3, 768), (T.IQ3_S, 45, 1280),
                                       (T.IQ2_S, 7, 1280), (T.IQ2_S, 37, 768), (T.IQ4_NL, 35, 800),
                                       (T.IQ3_XXS, 21, 1280), (T.IQ2_XS, 18, 768)], ids=str)
def test_matvec_equals_dequantized_product(qtype, n, k):
    from ggquant.runtime.cuda import repack

    ck = _kernels()
    raw, ref = _weights(qtype, n, k, seed=n + k)
    kind, parts = repack(torch, qtype, torch.from_numpy(raw).to(DEV), k, packed=True)  # (packed where one exists)
    x = torch.from_numpy(np.random.default_rng(1).standard_normal(k).astype(np.float32)).to(DEV)
    got = ck.matvec(torch, kind, parts, x, n, k).cpu().numpy().astype(np.float64)
    want = ref.astype(np.float64) @ x.cpu().numpy().astype(np.float64)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(ref).sum(1).max()


def _routing(T_, k, E, seed):
    """ids [T, k]: k distinct experts per token, some experts never chosen, one chosen often."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.permutation(E)[:k] for _ in range(T_)])
    ids[::3, 0] = E - 1
    return ids.astype(np.int32)


@pytest.mark.parametrize("qtype,xdiv", [(T.Q4_K, 2), (T.Q4_K, 1), (T.Q8_0, 2), (T.BF16, 1), (T.IQ4_XS, 1),
                                        (T.Q6_K, 2), (T.IQ2_S, 1)], ids=str)
def test_matvec_over_stacked_experts(qtype, xdiv):
    """matvec with ids (ggml_mul_mat_id at decode): slot s = expert ids[s] times x row s // xdiv,
    each as the single-matrix matvec of that expert computes it."""
    from ggquant.runtime.cuda import repack

    ck = _kernels()
    E, n, k, T_, kk = 5, 36, 512, 3, 2
    raw, ref = _weights(qtype, E * n, k, seed=int(qtype))
    kind, parts = repack(torch, qtype, torch.from_numpy(raw).to(DEV), k, packed=True)
    ids = _routing(T_, kk, E, 3).reshape(-1)
    x = np.random.default_rng(1).standard_normal((T_ * kk // xdiv, k)).astype(np.float32)
    got = ck.matvec(torch, kind, parts, torch.from_numpy(x).to(DEV), n, k, ids=torch.from_numpy(ids).to(DEV),
                    xdiv=xdiv).cpu().numpy()
    assert got.shape == (T_ * kk, n)
    w = ref.reshape(E, n, k).astype(np.float64)
    for s, e in enumerate(ids):
        want = w[e] @ x[s // xdiv].astype(np.float64)
        assert np.abs(got[s] - want).max() <= 1e-4 * np.abs(w[e]).sum(1).max(), (s, e)


PACKED_KINDS = {T.IQ4_XS: "iq4_xs", T.IQ3_S: "iq3_s", T.IQ2_S: "iq2_s", T.IQ4_NL: "iq4_nl", T.IQ3_XXS: "iq3_xxs",
                T.IQ2_XS: "iq2_xs"}  # issue 14


@pytest.mark.parametrize("qtype", list(PACKED_KINDS), ids=lambda t: t.name)
def test_backend_keeps_packed_iquant_layout(qtype):
    """With kernels (a GPU, or TRITON_INTERPRET=1) and packed_iquants the backend keeps IQ4_XS /
    IQ3_S / IQ2_S ... weights in their packed layout and multiplies with it (batch 1: the matvec;
    batch 3: the batched path); without triton (CI) it keeps the block bytes and dequantizes them,
    same products."""
    from types import SimpleNamespace

    from ggquant.runtime.cuda import CUDABackend

    if INTERPRET:
        _kernels()  # the interpreter fix
    n, k = 19, 512
    raw, ref = _weights(qtype, n, k, seed=int(qtype) + 5)
    be = CUDABackend(device=DEV, packed_iquants=True)
    w = be.weight(SimpleNamespace(name="blk.0.ffn_up.weight", qtype=qtype, shape=(n, k), raw=lambda: raw))
    if be.kern is None:
        assert w.kind is None and w.raw is not None
    else:
        assert w.kind == PACKED_KINDS[qtype] and w.raw is None
        assert 8 * sum(p.numel() * p.element_size() for p in w.parts) / (n * k) <= 4.5  # the block's bits, not int8's
    x = np.random.default_rng(4).standard_normal((3, k)).astype(np.float32)
    want = x.astype(np.float64) @ ref.astype(np.float64).T
    tol = 1e-4 * np.abs(ref).sum(1).max()
    for rows in (x[:1], x):
        got = be.to_numpy(be.matmul(be.asarray(rows), w))
        assert np.abs(got - want[: len(rows)]).max() <= tol


def test_rms_norm_rope_geglu_kernels():
    from ggquant.runtime.cpu import gelu_table, rope_cache

    ck = _kernels()
    rng = np.random.default_rng(2)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(DEV)  # noqa: E731
    x, r, w = rng.standard_normal((3, 80)), rng.standard_normal((3, 80)), rng.uniform(0.5, 1.5, 80)
    xt = t(x)
    want = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * w + r
    assert np.abs(ck.rms_norm(torch, xt, t(w), 1e-6, residual=t(r)).cpu().numpy() - want).max() < 1e-5
    assert np.abs(ck.rms_norm(torch, xt, None, 1e-6).cpu().numpy()
                  - x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)).max() < 1e-5

    # norm + NeoX rope over the first 2*half of D dims, positions from a device tensor
    T_, H, D, half = 3, 2, 40, 16
    q = rng.standard_normal((T_, H, D))
    qw = rng.uniform(0.5, 1.5, D)
    pos = np.array([5, 0, 17])
    cos, sin = rope_cache(np.arange(32), 2 * half, 10000.0, 1.0, None)
    n = q / np.sqrt((q * q).mean(-1, keepdims=True) + 1e-6) * qw
    c, s = cos[pos][:, None, :], sin[pos][:, None, :]
    want = np.concatenate([n[..., :half] * c - n[..., half:2 * half] * s,
                           n[..., :half] * s + n[..., half:2 * half] * c, n[..., 2 * half:]], -1)
    got = ck.norm_rope(torch, t(q), t(qw), 1e-6, torch.as_tensor(pos, device=DEV), t(cos), t(sin), True, True)
    assert np.abs(got.cpu().numpy() - want).max() < 1e-5

    g, u = rng.standard_normal(3000) * 6, rng.standard_normal(3000)
    tanh = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * g * (1 + 0.044715 * g * g)))
    assert np.abs(ck.geglu(torch, t(g), t(u), None).cpu().numpy() - tanh * u).max() < 1e-5
    table = gelu_table()
    idx = g.astype(np.float32).astype(np.float16).view(np.uint16)
    ggml = np.where(g >= 10, g, np.where(g <= -10, 0, table[idx]))
    assert np.array_equal(ck.geglu(torch, t(g), None, t(table)).cpu().numpy(), ggml.astype(np.float32))


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("qtype", ["f32", "q8_0"])
def test_graph_decode_equals_eager_decode(reference_gguf, qtype):
    """The replayed graphs (prefill chunks; decode: several positions per graph, and a second KV
    window) give the eager steps' logits, and the same cache contents."""
    import ggquant.runtime.cuda as cuda
    from ggquant.formats.gguf import GGUFReader
    from ggquant.runtime.model import ARCHITECTURES, Session

    path = reference_gguf("gemma4_e4b", qtype)
    old = cuda.GRAPH_KV_STEP
    cuda.GRAPH_KV_STEP = 16  # cross a window boundary within a short test
    try:
        outs = []
        for graphs in (False, True):
            r = GGUFReader(path)
            m = ARCHITECTURES[r.get("general.architecture")](r, cuda.CUDABackend(device="cuda", graphs=graphs))
            s = Session(m, 64, n_batch=16)
            got = []
            # prefill shapes (chunks of 16 + 4) run eagerly, are captured on their second call and
            # replayed from the third: the last two prompts (one of other tokens) come from graphs
            for p in ([2] + list(range(100, 119)),) * 3 + ([2] + list(range(150, 169)),):
                s.reset()
                got.append(s.eval(p, "all"))
            got += [s.eval([t], "last") for t in range(300, 330)]
            outs.append(np.concatenate(got))
            if graphs:
                assert sum(k[1] > 1 for k in m.backend._graph_cache) == 2  # both prefill shapes replayed
        assert np.abs(outs[0] - outs[1]).max() <= 1e-5
        assert np.array_equal(outs[0].argmax(-1), outs[1].argmax(-1))
    finally:
        cuda.GRAPH_KV_STEP = old


@pytest.mark.parametrize("n_kv,window,D", [(9, 0, 64), (300, 0, 32), (600, 100, 48)])
def test_attention_decode_kernel(n_kv, window, D):
    ck = _kernels()
    rng = np.random.default_rng(n_kv)
    H, hkv, n_ctx = 4, 2, 640
    q = rng.standard_normal((H, D)).astype(np.float32)
    k = rng.standard_normal((hkv, n_ctx, D)).astype(np.float32)
    v = rng.standard_normal((hkv, n_ctx, D)).astype(np.float32)
    p = n_kv - 3  # keys after the query position (up to n_kv) are masked
    j = np.arange(n_kv)
    ok = (j <= p) & ((window == 0) | (p - j < window))
    want = np.empty((H, D))
    for h in range(H):
        s = (k[h // 2, :n_kv] @ q[h]).astype(np.float64) * 0.5
        s[~ok] = -np.inf
        e = np.exp(s - s.max())
        want[h] = (e / e.sum()) @ v[h // 2, :n_kv]
    t = lambda a: torch.from_numpy(a).to(DEV)  # noqa: E731
    got = ck.attention_decode(torch, t(q), t(k), t(v), torch.tensor([p], device=DEV), n_kv, window, 0.5)
    assert np.abs(got.cpu().numpy() - want).max() < 1e-5


@pytest.mark.parametrize("D,T,window,g,pos0", [(64, 5, 0, 1, 0), (64, "blocks", 16, 4, 37), (256, "blocks", 0, 2, 100),
                                               (256, 5, 4, 1, 50), (512, "blocks", 24, 2, 13), (512, 3, 0, 4, 300)],
                         ids=str)
def test_attention_prefill_kernel(D, T, window, g, pos0):
    """Flash attention of T queries at positions pos0.. (a prefill after a cached prefix; "blocks":
    rows over two blocks of BM and a part) against float64 attention on the same fp16-rounded
    operands, and against the backend's torch path (baddbmm over the masked float32 cache)."""
    from types import SimpleNamespace

    from ggquant.runtime.cuda import CUDABackend

    ck = _kernels()
    hkv = 2
    H = hkv * g
    if T == "blocks":  # rows = token * g + head in group: 2 BM-row blocks and 3 tokens more
        T = 2 * ck.ATTN_PREFILL_CONFIG[D][0] // g + 3
    n_kv = pos0 + T + 11  # keys after the last query (a captured step's rounded window) are masked
    n_ctx = n_kv + 20
    rng = np.random.default_rng(D + T)
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    k = rng.standard_normal((hkv, n_ctx, D)).astype(np.float32)
    v = rng.standard_normal((hkv, n_ctx, D)).astype(np.float32)
    k[:, pos0 + T:] *= 50  # never visible: any leak shows
    v[:, pos0 + T:] *= 50
    scale = np.float32(1 / np.sqrt(D))
    pos = np.arange(pos0, pos0 + T)
    t = lambda a: torch.from_numpy(a).to(DEV)  # noqa: E731
    got = ck.attention_prefill(torch, t(q), t(k), t(v), t(pos), n_kv, window, float(scale)).cpu().numpy()
    assert got.shape == (T, H, D)
    be = CUDABackend(device=DEV, kernels=False)  # the torch path
    ref = be.attention(t(q), SimpleNamespace(k=t(k), v=t(v)), n_kv, pos, window, float(scale)).cpu().numpy()

    # The kernel's operands: q * scale, k, v and the weights p rounded to fp16 (u = 2^-11 relative;
    # p below fp16's normal range: 2^-25 absolute), products of fp16 values exact in float32, sums
    # in float32 (at most n * 2^-24 relative of the sum of |terms| for n terms). A score off by
    # delta scales its weight by exp(delta), and weights off by a factor within 1 +- rho move the
    # output by at most 2 rho / (1 - rho) * sum_j pi_j |v_j - o| (pi = softmax, o = output).
    u, f32 = 2.0 ** -11, 2.0 ** -24
    qh = (q * scale).astype(np.float16).astype(np.float64)
    kh, vh = k.astype(np.float16).astype(np.float64), v.astype(np.float16).astype(np.float64)
    j = np.arange(n_kv)
    for ti in range(T):
        vis = (j <= pos[ti]) & ((window == 0) | (pos[ti] - j < window))
        n = int(vis.sum())
        for h in range(H):
            kk, vv = kh[h // g, :n_kv][vis], vh[h // g, :n_kv][vis]
            kx, vx = k[h // g, :n_kv][vis], v[h // g, :n_kv][vis]
            s = kk @ qh[ti, h]
            pi = np.exp(s - s.max())
            pi /= pi.sum()
            o = pi @ vv
            # float32 accumulation (scores over D, p.v and l over n keys, the rescalings)
            acc = n * 4 * f32 * (pi @ np.abs(vv))
            rho = u + D * f32 * (np.abs(kk) @ np.abs(qh[ti, h])).max() + 2.0 ** -20
            tol = 2.1 * rho * (pi @ np.abs(vv - o)) + acc + n * 2.0 ** -25 * np.abs(vv - o).max(0)
            err = np.abs(got[ti, h] - o)
            assert (err <= tol).all(), (ti, h, err.max(), tol.min())
            # the torch path (float32 operands, float32 sums): the rounding of q * scale and k moves
            # a score by (2u + u^2) sum_d |q_d k_d| scale, its float32 sum by D 2^-24 of that; v's
            # rounding moves o by u sum_j pi_j |v_j|; plus its own float32 accumulation
            qk = (np.abs(kx) @ np.abs(q[ti, h])).max() * scale
            rho_t = (2 * u + u * u + D * f32) * qk
            tol_t = tol + 2.1 * rho_t * (pi @ np.abs(vx - o)) + u * (pi @ np.abs(vx)) + acc
            assert (np.abs(got[ti, h] - ref[ti, h * D:(h + 1) * D])<= tol_t).all(), (ti, h)
