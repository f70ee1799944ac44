"""The exact packers on their own: random codes and scales (including awkward magnitudes) packed
into Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 dequantize in ggml to exactly the source values, and every case
that cannot be exact is refused with a reason.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from ggquant.quant import transcode as tc
from tests.oracles import ggml as ggml_oracle
from tests.quantized.util import assert_bits_equal

pytest.importorskip("llama_cpp")

ROWS, N = 32, 1024
RANGES = {T.Q4_0: (-8, 7), T.Q5_0: (-16, 15), T.Q8_0: (-128, 127), T.Q4_1: (0, 15), T.Q5_1: (0, 31)}


def _fp16_values(rng, shape, magnitude):
    """Random fp16-representable float32 values of roughly the given magnitude, both signs."""
    x = rng.standard_normal(shape) * magnitude
    return x.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 1e-6, 2e3], ids=["normal", "unit", "subnormal_fp16", "large"])
@pytest.mark.parametrize("qtype", list(RANGES), ids=lambda t: t.name)
def test_packers_equal_ggml(qtype, magnitude):
    rng = np.random.default_rng(int(qtype) * 7 + int(np.log10(magnitude) + 10))
    lo, hi = RANGES[qtype]
    u = rng.integers(lo, hi + 1, size=(ROWS, N)).astype(np.int16)
    u[0] = 0  # an all-zero row
    u[1, :32] = hi  # a block at the top of the range
    u[2, 32:64] = lo
    d = _fp16_values(rng, (ROWS, N // 32), magnitude)
    d[3] = 0.0  # zero scales
    m = _fp16_values(rng, (ROWS, N // 32), magnitude * 4) if qtype in (T.Q4_1, T.Q5_1) else None
    blocks = tc.AffineBlocks(u, d, m)
    res = tc.transcode(blocks, [qtype])
    assert isinstance(res, tc.Transcoded), res
    assert res.data.shape == (ROWS, tc.row_bytes(qtype, N))
    want = blocks.dequantize()
    assert_bits_equal(ggml_oracle.dequantize(qtype, res.data, N), want, qtype.name)
    assert tc.verify_blocks(res, want) is None


def test_fp16_max_scale_is_exact():
    u = np.full((1, 32), 7, dtype=np.int16)
    d = np.array([[65504.0]], dtype=np.float32)
    res = tc.transcode(tc.AffineBlocks(u, d), [T.Q4_0])
    assert_bits_equal(ggml_oracle.dequantize(T.Q4_0, res.data, 32), np.full((1, 32), 7 * 65504.0, np.float32), "")


@pytest.mark.parametrize("scale, phrase", [(1e-30, "not an fp16 value"), (1e30, "not an fp16 value"),
                                           (0.1, "not an fp16 value"), (7e4, "not an fp16 value")])
def test_scales_fp16_cannot_hold(scale, phrase):
    u = np.arange(32, dtype=np.int16).reshape(1, 32) % 8
    res = tc.transcode(tc.AffineBlocks(u, np.array([[scale]], dtype=np.float32)), tc.DEFAULT_CANDIDATES)
    assert isinstance(res, str) and phrase in res


def test_constant_block_with_unrepresentable_scale():
    """A block whose codes are all equal holds one value; its scale does not need fp16."""
    u = np.zeros((2, 64), dtype=np.int16)
    u[1, 32:] = np.arange(32) % 16
    d = np.array([[1.0011717677116394e-07, 0.5], [3e-9, 0.25]], dtype=np.float32)
    m = np.array([[0.0, -1.0], [0.01251220703125, 0.0]], dtype=np.float32)  # bf16(0.0125)
    blocks = tc.AffineBlocks(u, d, m)
    res = tc.transcode(blocks, [T.Q4_1])
    assert isinstance(res, tc.Transcoded), res
    assert_bits_equal(ggml_oracle.dequantize(T.Q4_1, res.data, 64), blocks.dequantize(), "constant blocks")


def test_codes_out_of_range_fall_through_candidates():
    u = np.zeros((1, 32), dtype=np.int16)
    u[0, 0] = -9  # beyond Q4_0, inside Q5_0
    blocks = tc.AffineBlocks(u, np.ones((1, 1), np.float32))
    assert tc.transcode(blocks, [T.Q4_0, T.Q5_0]).qtype == T.Q5_0
    why = tc.transcode(blocks, [T.Q4_0])
    assert isinstance(why, str) and "[-8, 7]" in why


def test_offset_shift_makes_signed_codes_fit_q4_1():
    """Signed codes (k in [-8, 7]) go to Q4_1 by shifting each block (m' = -c*d must be fp16)."""
    rng = np.random.default_rng(5)
    k = rng.integers(-8, 8, size=(8, 256)).astype(np.int16)
    d = np.abs(_fp16_values(rng, (8, 8), 1e-2))  # negative scales: see the sign-of-zero test
    blocks = tc.AffineBlocks(k, d)
    res = tc.transcode(blocks, [T.Q4_1])
    assert isinstance(res, tc.Transcoded), res
    assert_bits_equal(ggml_oracle.dequantize(T.Q4_1, res.data, 256), blocks.dequantize(), "shifted")


def test_offset_type_with_integer_ratio_goes_to_symmetric_type():
    """w = d*u + m with m = -c*d is d*(u - c): a symmetric type holds it."""
    u = (np.arange(64, dtype=np.int16) % 16).reshape(1, 64)
    d = np.array([[0.5, 0.25]], dtype=np.float32)
    m = np.array([[-4.0, -2.0]], dtype=np.float32)  # c = 8 in both blocks
    blocks = tc.AffineBlocks(u, d, m)
    res = tc.transcode(blocks, [T.Q4_0])
    assert res.qtype == T.Q4_0
    assert_bits_equal(ggml_oracle.dequantize(T.Q4_0, res.data, 64), blocks.dequantize(), "")
    m[0, 1] = -2.1
    assert "not an integer multiple" in tc.transcode(tc.AffineBlocks(u, d, m), [T.Q4_0])


def test_verification_catches_the_sign_of_zero():
    """A negative scale through an offset type gives +0 where the source gives -0."""
    u = np.zeros((1, 32), dtype=np.int16)
    u[0, 1] = 3
    blocks = tc.AffineBlocks(u, np.array([[-0.5]], np.float32))
    res = tc.transcode(blocks, [T.Q4_1])
    assert isinstance(res, tc.Transcoded)
    assert "differ" in tc.verify_blocks(res, blocks.dequantize())
    assert tc.verify_blocks(tc.transcode(blocks, [T.Q4_0]), blocks.dequantize()) is None


def test_rows_not_multiple_of_32():
    blocks = tc.AffineBlocks(np.zeros((1, 48), np.int16), np.ones((1, 1), np.float32))
    assert "32-element" in tc.transcode(blocks, tc.DEFAULT_CANDIDATES)


@pytest.mark.parametrize("qtype", [T.F16, T.BF16, T.F32])
def test_exact_float(qtype):
    w = np.array([[1.0, -2.5, 0.0, 65280.0]], dtype=np.float32)  # values both fp16 and bf16 hold
    res = tc.exact_float(w, [qtype])
    assert_bits_equal(ggml_oracle.dequantize(qtype, res.data, 4), w, qtype.name)
    odd = np.array([[1.0 + 2 ** -20]], dtype=np.float32)
    if qtype != T.F32:
        assert isinstance(tc.exact_float(odd, [qtype]), str)
