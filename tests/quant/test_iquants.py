"""The dequantizers of ggquant.kernels.quants.iquants (grid i-quants) and lowbit (ternary, MXFP4)
against ggml's to_float, bit for bit.

Three kinds of input:
- random block bytes whose fp16 scales are forced finite (several magnitude regimes);
- grid sweeps: block bytes whose grid-index fields enumerate every entry of the type's grid,
  which proves the tables derived from gguf-py equal ggml-common.h's (they are static in
  libggml, so they can only be observed through to_float);
- what ggml's own quantizer (ggml_quantize_chunk, with an imatrix) writes for random data.
"""

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, QK_K
from gguf import GGMLQuantizationType as T

from ggquant.kernels.quants import iquants, lowbit
from tests.oracles import ggml as ggml_oracle

DEQUANTIZE = {**iquants.DEQUANTIZE, **{t: lowbit.DEQUANTIZE[t] for t in (T.TQ1_0, T.TQ2_0, T.MXFP4)}}
TYPES = list(DEQUANTIZE)
# Types whose ggml quantizer reads quant_weights (research note imatrix-and-quants.md §1.4).
IMATRIX_TYPES = {T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M}

N_ROWS = 32
N_PER_ROW = 2048


def _assert_bit_equal(ours, ref):
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    a, b = ours.view(np.uint32), ref.view(np.uint32)
    if not np.array_equal(a, b):
        bad = np.argwhere(a != b)
        r, c = bad[0]
        raise AssertionError(
            f"{len(bad)} of {a.size} values differ; first at [{r}, {c}]: ours {ours[r, c]!r} "
            f"(0x{a[r, c]:08x}) vs ggml {ref[r, c]!r} (0x{b[r, c]:08x})"
        )


def _check(qtype, data, n_per_row):
    ours = DEQUANTIZE[qtype](data, n_per_row)
    ref = ggml_oracle.dequantize(qtype, data, n_per_row)
    _assert_bit_equal(ours, ref)


def _blocks(data, qtype):
    """View uint8 [n_rows, row_bytes] as writable [n_blocks, type_size]."""
    return data.reshape(-1, GGML_QUANT_SIZES[qtype][1])


# ------------------------------------------------------------------ fp16 scale fields

def _fp16_scales(rng, n, regime):
    """n finite fp16 bit patterns (uint16) for one magnitude regime."""
    if regime == "normal":
        v = rng.standard_normal(n)
    elif regime == "tiny":  # fp16 subnormals and the smallest normals, and signed zeros
        v = rng.standard_normal(n) * 2.0**-20
        v[::7] = 0.0
        v[1::7] = -0.0
    elif regime == "huge":  # up to the fp16 maximum 65504
        v = rng.uniform(-65504, 65504, n)
    else:  # "mixed": every exponent of fp16, finite
        bits = rng.integers(0, 0x7C00, n).astype(np.uint16)
        bits |= (rng.integers(0, 2, n).astype(np.uint16) << 15)
        return bits
    return np.asarray(v, dtype=np.float16).view(np.uint16)


def _set_scales(qtype, data, rng, regime):
    """Overwrite each block's fp16 super-block scale with a finite value (in place)."""
    if regime == "raw":
        return  # leave the random bytes: inf and NaN scales included
    blocks = _blocks(data, qtype)
    n = blocks.shape[0]
    h = _fp16_scales(rng, n, regime)
    if qtype == T.MXFP4:
        return  # e8m0 scale: every byte value is meaningful, nothing to force
    if qtype == T.IQ1_M:
        # ggml-common.h block_iq1_m / dequantize_row_iq1_m: the fp16 d lives in the top nibble
        # of the four u16 scale words (bits 12-15 of word k hold bits 4k..4k+3 of d).
        off = QK_K // 8 + QK_K // 16
        for k in range(4):
            hi = off + 2 * k + 1
            blocks[:, hi] = (blocks[:, hi] & 0x0F) | (((h >> (4 * k)) & 0xF).astype(np.uint8) << 4)
        return
    # d is the first field, except for TQ1_0 / TQ2_0 where it is the last.
    pos = blocks.shape[1] - 2 if qtype in (T.TQ1_0, T.TQ2_0) else 0
    blocks[:, pos] = (h & 0xFF).astype(np.uint8)
    blocks[:, pos + 1] = (h >> 8).astype(np.uint8)


def _random_data(qtype, n_rows, n_per_row, seed, regime):
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n_rows, n_per_row // block * size), dtype=np.uint8)
    _set_scales(qtype, data, rng, regime)
    return data


# "raw" keeps inf/NaN scales: ggml applies the +-1 grid signs as a sign flip, which shows on
# NaNs (a multiply by -1 would keep the NaN's sign); this pins that we match it.
REGIMES = ["normal", "tiny", "huge", "mixed", "raw"]


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_random_blocks_match_ggml(qtype, regime):
    data = _random_data(qtype, N_ROWS, N_PER_ROW, seed=int(qtype) * 10 + REGIMES.index(regime), regime=regime)
    _check(qtype, data, N_PER_ROW)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_single_block_row(qtype):
    n = GGML_QUANT_SIZES[qtype][0]
    data = _random_data(qtype, 3, n, seed=7, regime="normal")
    _check(qtype, data, n)


def test_mxfp4_every_e8m0_exponent():
    """ggml_e8m0_to_fp32_half: bytes 0 and 1 are denormals, 255 is 2^127 (no NaN case); x 12 overflows to inf."""
    block, size = GGML_QUANT_SIZES[T.MXFP4]
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, size=(4, 256 * size), dtype=np.uint8)
    blocks = _blocks(data, T.MXFP4)
    blocks[:, 0] = np.tile(np.arange(256, dtype=np.uint8), 4)
    blocks[:256, 1:] = 0x77  # code 7 (value 12) in both nibbles: 2^127 * 12 = inf
    _check(T.MXFP4, data, 256 * block)


def test_ternary_all_codes():
    """TQ1_0: every byte (including the >= 243 ones ggml never writes); TQ2_0: every 2-bit code."""
    for qtype in (T.TQ1_0, T.TQ2_0):
        block, size = GGML_QUANT_SIZES[qtype]
        data = _random_data(qtype, 1, 64 * block, seed=5, regime="normal")
        blocks = _blocks(data, qtype)
        blocks[:, : size - 2] = (np.arange(blocks.shape[0] * (size - 2)) % 256).reshape(blocks.shape[0], -1)
        _check(qtype, data, 64 * block)


# ------------------------------------------------------------------ grid sweeps

def _sweep_data(qtype, n_blocks, seed=11):
    block, size = GGML_QUANT_SIZES[qtype]
    data = _random_data(qtype, 1, n_blocks * block, seed=seed, regime="normal")
    return data, _blocks(data, qtype)


def _sweep_iq2_xxs():
    # block_iq2_xxs: d | 8 x (4 grid index bytes, u32 signs+scale); 256 grid entries
    data, b = _sweep_data(T.IQ2_XXS, 8)
    idx = np.arange(256).reshape(8, 8, 4)
    for g in range(8):
        b[:, 2 + 8 * g: 2 + 8 * g + 4] = idx[:, g, :]
    return data


def _sweep_iq2_xs():
    # block_iq2_xs: d | qs[32] u16 = 9-bit index | 7 sign bits | scales[8]; 512 entries
    data, b = _sweep_data(T.IQ2_XS, 16)
    qs = b[:, 2:66].copy().view("<u2")
    qs[:] = (qs & 0xFE00) | np.arange(512).reshape(16, 32)
    b[:, 2:66] = qs.view(np.uint8)
    return data


def _sweep_iq2_s():
    # block_iq2_s: d | qs[32] | signs[32] | qh[8] | scales[8]; index = qs | 2 bits of qh << 8
    data, b = _sweep_data(T.IQ2_S, 32)
    k = np.arange(1024).reshape(32, 8, 4)  # [block, ib32, l]
    b[:, 2:34] = (k & 0xFF).reshape(32, 32)
    b[:, 66:74] = ((k >> 8) << (2 * np.arange(4))).sum(axis=-1)
    return data


def _sweep_iq3_xxs():
    # block_iq3_xxs: d | qs[64] grid indices | 8 x u32 signs+scale; 256 entries
    data, b = _sweep_data(T.IQ3_XXS, 4)
    b[:, 2:66] = np.arange(256).reshape(4, 64)
    return data


def _sweep_iq3_s():
    # block_iq3_s: d | qs[64] | qh[8] | signs[32] | scales[4]; index of qs[8*ib + p] gets qh[ib] bit p
    data, b = _sweep_data(T.IQ3_S, 8)
    k = np.arange(512).reshape(8, 8, 8)  # [block, ib32, p]
    b[:, 2:66] = (k & 0xFF).reshape(8, 64)
    b[:, 66:74] = ((k >> 8) << np.arange(8)).sum(axis=-1)
    return data


def _sweep_iq1_s():
    # block_iq1_s: d | qs[32] | qh[8] u16 (3 high index bits per group of 8, then scale and delta sign)
    data, b = _sweep_data(T.IQ1_S, 64)
    k = np.arange(2048).reshape(64, 8, 4)  # [block, ib, l]
    b[:, 2:34] = (k & 0xFF).reshape(64, 32)
    qh = b[:, 34:50].copy().view("<u2")
    qh[:] = (qh & 0xF000) | ((k >> 8) << (3 * np.arange(4))).sum(axis=-1)
    b[:, 34:50] = qh.view(np.uint8)
    return data


def _sweep_iq1_m():
    # block_iq1_m: qs[32] | qh[16] | scales[8]; qs[4*ib + l] gets bits 0-2 (even l) or 4-6 (odd l)
    # of qh[2*ib + l//2]; bits 3 and 7 (delta signs) stay random.
    data, b = _sweep_data(T.IQ1_M, 64)
    k = np.arange(2048).reshape(64, 8, 2, 2)  # [block, ib, l//2, l%2]
    b[:, 0:32] = (k & 0xFF).reshape(64, 32)
    hi = ((k >> 8) << np.array([0, 4])).sum(axis=-1).reshape(64, 16)
    b[:, 32:48] = (b[:, 32:48] & 0x88) | hi
    return data


SWEEPS = {
    T.IQ2_XXS: _sweep_iq2_xxs, T.IQ2_XS: _sweep_iq2_xs, T.IQ2_S: _sweep_iq2_s,
    T.IQ3_XXS: _sweep_iq3_xxs, T.IQ3_S: _sweep_iq3_s, T.IQ1_S: _sweep_iq1_s, T.IQ1_M: _sweep_iq1_m,
}


@pytest.mark.parametrize("qtype", list(SWEEPS), ids=lambda t: t.name)
def test_every_grid_entry_matches_ggml(qtype):
    """The grids derived from gguf-py equal ggml-common.h's: each entry goes through ggml's to_float."""
    data = SWEEPS[qtype]()
    _check(qtype, data, data.shape[1] // GGML_QUANT_SIZES[qtype][1] * GGML_QUANT_SIZES[qtype][0])


# ------------------------------------------------------------------ ggml-quantized data

def _source(kind, rng, n_rows, n_per_row):
    if kind == "normal":
        return rng.standard_normal((n_rows, n_per_row)).astype(np.float32)
    if kind == "heavy":
        return (10 * rng.standard_t(2, (n_rows, n_per_row))).astype(np.float32)
    if kind == "outlier":
        x = (rng.standard_normal((n_rows, n_per_row)) * 1e-2).astype(np.float32)
        x[np.arange(n_rows), rng.integers(0, n_per_row, n_rows)] = 50.0
        return x
    if kind == "zero_const":
        x = np.zeros((n_rows, n_per_row), dtype=np.float32)
        x[1::2] = 0.75
        return x
    raise ValueError(kind)


def _imatrix(kind, rng, n_per_row):
    if kind == "positive":
        return rng.uniform(0.01, 5.0, n_per_row).astype(np.float32)
    if kind == "zeros":
        w = rng.uniform(0.01, 5.0, n_per_row).astype(np.float32)
        w[rng.random(n_per_row) < 0.3] = 0
        return w
    return np.ones(n_per_row, dtype=np.float32)  # "equal"


# Types that ignore the imatrix are quantized once per source, without one.
QUANTIZED_CASES = [
    pytest.param(qtype, source, imatrix, id=f"{qtype.name}-{source}-{imatrix}")
    for qtype in TYPES
    for source in ("normal", "heavy", "outlier", "zero_const")
    for imatrix in (("positive", "zeros", "equal") if qtype in IMATRIX_TYPES else (None,))
]


@pytest.mark.parametrize("qtype,source,imatrix", QUANTIZED_CASES)
def test_ggml_quantized_data(qtype, source, imatrix):
    rng = np.random.default_rng(int(qtype) * 100 + len(source) * 10 + len(imatrix or ""))
    n_rows, n_per_row = 8, 512
    x = _source(source, rng, n_rows, n_per_row)
    w = None if imatrix is None else _imatrix(imatrix, rng, n_per_row)
    q = ggml_oracle.quantize(qtype, x, w)
    _check(qtype, q, n_per_row)


# ------------------------------------------------------------------ contract

def test_registry_contract():
    for qtype, fn in DEQUANTIZE.items():
        block, size = GGML_QUANT_SIZES[qtype]
        out = fn(np.zeros((2, 2 * size), dtype=np.uint8), 2 * block)
        assert out.dtype == np.float32 and out.shape == (2, 2 * block)
        with pytest.raises(ValueError, match=qtype.name):
            fn(np.zeros((2, 2 * size + 1), dtype=np.uint8), 2 * block)


def test_non_contiguous_input():
    qtype = T.IQ2_S
    data = _random_data(qtype, 8, 512, seed=1, regime="normal")
    wide = np.zeros((8, data.shape[1] * 2), dtype=np.uint8)
    wide[:, ::2] = data
    _assert_bit_equal(DEQUANTIZE[qtype](wide[:, ::2], 512), ggml_oracle.dequantize(qtype, data, 512))
