"""The one-pass exact packing kernel (ggquant.kernels.quants.transcode) that `ggquant convert` uses:
the same bytes as the general packer (ggquant.quant.transcode), ggml dequantizes them to the
source values bit for bit, and every block that cannot be exact is reported at its index; the
converter's chunk path (convert.encode.exact_chunk) then falls back to the general packer.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from ggquant.convert.encode import exact_chunk
from ggquant.formats.quantized.records import AffineQuantTensor
from ggquant.kernels.quants.transcode import pack_exact
from ggquant.quant import transcode as tc
from tests.oracles import ggml as ggml_oracle
from tests.quantized.util import assert_bits_equal

pytest.importorskip("llama_cpp")

ROWS, N = 24, 512
RANGES = {T.Q4_0: (-8, 7), T.Q5_0: (-16, 15), T.Q8_0: (-128, 127), T.Q4_1: (0, 15), T.Q5_1: (0, 31)}
OFFSET = (T.Q4_1, T.Q5_1)


def _case(qtype, seed):
    rng = np.random.default_rng(seed)
    lo, hi = RANGES[qtype]
    u = rng.integers(lo, hi + 1, (ROWS, N)).astype(np.int16)
    u[0] = 0
    u[1, :32], u[1, 32:64] = lo, hi  # blocks at both ends of the range
    d = (rng.standard_normal((ROWS, N // 32)) * 1e-2).astype(np.float16).astype(np.float32)
    d[2] = 0.0
    d[3, 0], d[3, 1], d[3, 2] = -0.0, 65504.0, 2.0 ** -24  # sign of zero, fp16 max, fp16 subnormal
    d[4] = -np.abs(d[4])  # negative scales
    m = (rng.standard_normal((ROWS, N // 32)) * 3e-2).astype(np.float16).astype(np.float32) if qtype in OFFSET else None
    return u, d, m


@pytest.mark.parametrize("qtype", list(RANGES), ids=lambda t: t.name)
def test_kernel_equals_general_packer_and_ggml(qtype):
    u, d, m = _case(qtype, int(qtype))
    out, bad = pack_exact(qtype, u, d, m)
    assert (bad == -1).all()
    ref = tc.transcode(tc.AffineBlocks(u, d, m), [qtype])
    assert ref.qtype == qtype and np.array_equal(out, ref.data)
    assert_bits_equal(ggml_oracle.dequantize(qtype, out, N), tc.AffineBlocks(u, d, m).dequantize(), qtype.name)


@pytest.mark.parametrize("qtype", list(RANGES), ids=lambda t: t.name)
def test_kernel_reports_the_first_inexact_block(qtype):
    u, d, m = _case(qtype, 100 + int(qtype))
    lo, hi = RANGES[qtype]
    d[5, 3] = np.float32(0.1)  # not an fp16 value
    d[6, 7] = np.float32(1e-30)  # below fp16's range
    d[7, 2] = np.float32(7e4)  # beyond 65504
    d[8, 9] = np.float32(np.nan)
    u[9, 4 * 32 + 5] = hi + 1  # a code out of range
    u[10, 6 * 32 + 31] = lo - 1
    _, bad = pack_exact(qtype, u, d, m)
    want = np.full(ROWS, -1)
    want[[5, 6, 7, 8, 9, 10]] = [3, 7, 2, 9, 4, 6]
    if m is not None:
        m[11, 1] = np.float32(1e-3) + np.float32(1e-9)  # an offset fp16 cannot hold
        _, bad = pack_exact(qtype, u, d, m)
        want[11] = 1
    assert np.array_equal(bad, want)


def test_exact_chunk_falls_back_to_the_general_packer_for_constant_blocks():
    # mlx gives an all-equal group a scale fp16 cannot hold (e.g. -1e-7): the kernel refuses the
    # block, the general packer rewrites it as u = 1, d = value (ggquant.quant.transcode)
    u = np.random.default_rng(0).integers(0, 16, (4, 64)).astype(np.uint8)
    u[1, :32] = 0
    s = np.full((4, 2), 2.0 ** -6, np.float32)
    s[1, 0] = np.float32(-1e-7)
    b = np.full((4, 2), -0.0625, np.float32)
    b[1, 0] = 0.125  # the group's value: w = -1e-7 * 0 + 0.125
    rec = AffineQuantTensor("w", (4, 64), "test affine 4-bit", "mlx/affine", (), 4, 32,
                            lambda rr: (u[rr[0]:rr[1]], s[rr[0]:rr[1]], b[rr[0]:rr[1]]))
    _, bad = pack_exact(T.Q4_1, rec.blocks().u, rec.blocks().d, rec.blocks().m)
    assert bad[1] == 0
    out = exact_chunk(rec, T.Q4_1, (0, 4))
    assert not isinstance(out, str), out
    assert_bits_equal(ggml_oracle.dequantize(T.Q4_1, out, 64), rec.dequantize(), "Q4_1")
    # and a scale nothing can rescue is reported with the general packer's reason
    s[2, 1] = np.float32(0.1)
    assert "not an fp16 value" in exact_chunk(rec, T.Q4_1, (0, 4))
