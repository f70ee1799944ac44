"""The CPU products (kernels/cpu, dispatched by runtime/cpu.py) against ggml-cpu: activation conversion
byte for byte, products bit for bit."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from ggquant.kernels.cpu import actquant
from ggquant.kernels.cpu.matmul import ISA
from ggquant.quant import types as qt
from ggquant.runtime import cpu
from tests.oracles import ggml_cpu as oracle
from tests.oracles import ggml_graph as graph

QUANT_TYPES = [T.Q8_0, T.Q4_0, T.Q5_0, T.Q4_1, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K]
ALL_TYPES = [T.F32, T.F16, T.BF16, *QUANT_TYPES]


def _inputs(rng, rows, k):
    """Activation rows of every awkward kind: normal, heavy-tailed, zero, constant, one outlier,
    tiny and huge magnitudes, and values landing exactly on rounding ties."""
    x = [rng.standard_normal(k), rng.standard_t(2, k) * 10, np.zeros(k), np.full(k, -0.75)]
    one = rng.standard_normal(k) * 0.01
    one[k // 3] = 50.0
    x += [one, rng.standard_normal(k) * 1e-30, rng.standard_normal(k) * 6e4]
    tie = np.round(rng.standard_normal(k) * 64) / 2 * (1.0 / 127.0)  # many x*127/amax on .5
    tie[0] = 1.0
    x.append(tie)
    while len(x) < rows:
        x.append(rng.standard_normal(k) * rng.uniform(0.1, 10))
    return np.stack(x[:rows]).astype(np.float32)


def _q8_0_bytes(qs, d):
    T_, K = qs.shape
    blocks = np.empty((T_, K // 32, 34), np.uint8)
    blocks[:, :, :2] = d.astype(np.float16).view(np.uint8).reshape(T_, K // 32, 2)
    blocks[:, :, 2:] = qs.view(np.uint8).reshape(T_, K // 32, 32)
    return blocks.reshape(T_, -1)


def _q8_K_bytes(qs, d, bsums):
    T_, K = qs.shape
    nb = K // 256
    blocks = np.empty((T_, nb, 292), np.uint8)
    blocks[:, :, :4] = d.astype(np.float32).view(np.uint8).reshape(T_, nb, 4)
    blocks[:, :, 4:260] = qs.view(np.uint8).reshape(T_, nb, 256)
    blocks[:, :, 260:] = bsums.astype(np.int16).view(np.uint8).reshape(T_, nb, 32)
    return blocks.reshape(T_, -1)


@pytest.mark.parametrize("k", [256, 1024])
def test_q8_0_activation_bytes_equal_ggml(k):
    x = _inputs(np.random.default_rng(k), 12, k)
    qs, d = actquant.quantize_q8_0(x)
    assert np.array_equal(_q8_0_bytes(qs, d), oracle.from_float(T.Q8_0, x))


def _q8_1_bytes(qs, d, s):
    T_, K = qs.shape
    blocks = np.empty((T_, K // 32, 36), np.uint8)
    blocks[:, :, :2] = d.astype(np.float16).view(np.uint8).reshape(T_, K // 32, 2)
    blocks[:, :, 2:4] = s.astype(np.float16).view(np.uint8).reshape(T_, K // 32, 2)
    blocks[:, :, 4:] = qs.view(np.uint8).reshape(T_, K // 32, 32)
    return blocks.reshape(T_, -1)


@pytest.mark.parametrize("k", [256, 1024])
def test_q8_1_activation_bytes_equal_ggml(k):
    """Q8_1 (the activation of Q4_1 / Q5_1 products): quants, d and s = d * sum(quants)."""
    x = _inputs(np.random.default_rng(k + 2), 12, k)
    ref = oracle.from_float(T.Q8_1, x)[:, :k // 32 * 36]  # gguf-py's Q8_1 size (40) is stale: ggml's block is 36
    assert np.array_equal(_q8_1_bytes(*actquant.quantize_q8_1(x)), ref)


@pytest.mark.parametrize("k", [256, 1024])
def test_q8_K_activation_bytes_equal_ggml(k):
    x = _inputs(np.random.default_rng(k + 1), 12, k)
    qs, d, bsums = actquant.quantize_q8_K(x)
    assert np.array_equal(_q8_K_bytes(qs, d, bsums), oracle.from_float(T.Q8_K, x))


def test_f16_bf16_activation_rounding_equal_ggml():
    x = _inputs(np.random.default_rng(3), 12, 256)
    f16 = oracle.from_float(T.F16, x).view(np.float16).astype(np.float32)
    assert np.array_equal(actquant.round_f16(x).view(np.uint32), f16.view(np.uint32))


# Shapes that select every kernel ggml-cpu's mul_mat picks (tests/oracles/ggml_graph.py runs it): rows a
# multiple of 8 or 16 (CPU_REPACK Q4_0/Q4_K, tinyBLAS needs a multiple of 4) or not (37); K with
# and without vec_dot leftovers (1000 = 15 x 64 + 40); 1 token (vec_dot / gemv), 3 and 7 (vec_dot,
# repack gemm+gemv), 8 and 19 (tiled k-quants, tinyBLAS).
SHAPES = [(64, 1024), (37, 1024), (40, 1000)]


@pytest.mark.skipif(bool(ISA.unmatched), reason=f"llama.cpp's kernels for {ISA.unmatched} are not emulated")
@pytest.mark.parametrize("isa", [ISA.name])
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("ntok", [1, 3, 7, 8, 19])
def test_matmul_bit_identical_to_ggml_mul_mat(qtype, ntok, isa):
    """ggquant's product equals ggml's mul_mat as llama.cpp's CPU backend runs it on this host
    (the kernel for this ISA, weight type, row count and batch size), bit for bit."""
    rng = np.random.default_rng(int(qtype) * 10 + ntok)
    for n, k in SHAPES:
        if k % qt.get(qtype).block_size:
            continue
        w = qt.quantize(rng.standard_normal((n, k)).astype(np.float32), qtype)
        x = _inputs(rng, ntok, k) if ntok > 1 else rng.standard_normal((1, k)).astype(np.float32)
        got = cpu.matmul(w, qtype, x)
        ref = graph.mul_mat(qtype, w, x)
        assert np.array_equal(got.view(np.uint32), ref.view(np.uint32)), (n, k, np.mean(got != ref))


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_matmul_is_exact_dot_of_dequantized_blocks(qtype):
    """Integer parts are exact: the product equals float64 dequant(w) . dequant(act(x))."""
    rng = np.random.default_rng(int(qtype))
    n, k, ntok = 20, 768, 3
    w = qt.quantize(rng.standard_normal((n, k)).astype(np.float32), qtype)
    x = rng.standard_normal((ntok, k)).astype(np.float32)
    xc = cpu.convert_activation(qtype, x)
    block = 32 if qt.get(qtype).vec_dot_type in (T.Q8_0, T.Q8_1) else 256
    xd = (xc[0].reshape(ntok, -1, block) * xc[1][:, :, None].astype(np.float64)).reshape(ntok, k)
    ref = xd @ qt.dequantize(w, qtype, (n, k)).astype(np.float64).T
    if qt.get(qtype).vec_dot_type == T.Q8_1:
        # Q4_1 / Q5_1: the offset term m * sum(x) uses Q8_1's s = fp16(d * sum(q)), not the dequantized sum
        blocks = w.reshape(n, k // 32, -1)
        m = blocks[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float64)
        xsum = xd.reshape(ntok, -1, 32).sum(-1)
        ref += (xc[2].astype(np.float64) - xsum) @ m.T
    got = cpu.matmul_converted(w, qtype, xc)
    assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max()


def test_matmul_results_do_not_depend_on_thread_count():
    import numba

    rng = np.random.default_rng(5)
    w = qt.quantize(rng.standard_normal((70, 512)).astype(np.float32), T.Q4_K)
    x = rng.standard_normal((5, 512)).astype(np.float32)
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        a = cpu.matmul(w, T.Q4_K, x)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        b = cpu.matmul(w, T.Q4_K, x)
    finally:
        numba.set_num_threads(old)
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_unsupported_type_and_bad_shapes_raise():
    w = np.zeros((4, 18), np.uint8)
    with pytest.raises(ValueError, match="IQ2_XXS"):
        cpu.matmul(w, T.IQ2_XXS, np.zeros((1, 256), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        cpu.matmul(w, T.Q4_0, np.zeros((1, 64), np.float32))
