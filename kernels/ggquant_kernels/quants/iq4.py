"""IQ4_NL and IQ4_XS: 4-bit non-linear quants, bit-exact with ggml_quantize_chunk / to_float.

Both types share one search, ggml-quants.c quantize_row_iq4_nl_impl, called by the chunk
API (quantize_iq4_nl / quantize_iq4_xs) with ntry = 7, with or without an imatrix. Note that
the type traits' from_float_ref for IQ4_NL (quantize_row_iq4_nl_ref) uses ntry = -1 and
gives other bytes: the chunk path is the one llama-quantize runs, so that is what we port.

Layouts (ggml-common.h):
    block_iq4_nl (32 values, 18 bytes):  d fp16 | qs[16]
    block_iq4_xs (256 values, 136 bytes): d fp16 | scales_h u16 | scales_l[4] | qs[128]
qs[16*i + j] = L[32*i + j] | L[32*i + 16 + j] << 4 (i = 32-value sub-block), where L indexes
kvalues_iq4nl. IQ4_XS sub-block scales are 6-bit (l + 32): low nibble in scales_l (odd
sub-blocks in the high nibble), high 2 bits in scales_h at bit 2*ib.

Everything is float32 in the C (no doubles), loops run in index order, and candidate updates
use strict comparisons, so the first best candidate wins; the port keeps all of that.
"""

import numba as nb
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..common import F32, GROUP_MAX_EPS, fp16_to_fp32, fp32_to_fp16, get_u16, nearest_int, put_u16

# ggml-common.h kvalues_iq4nl: the 16 non-linear levels (sorted, int8).
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
# The C compares/multiplies floats with these int8 values, i.e. with their exact float32 images.
_KV = KVALUES_IQ4NL.astype(np.float32)
_N_LEVELS = 16
_KV0_INT = int(KVALUES_IQ4NL[0])  # values[0] = -127, used as an int in (itry + values[0])

QK4_NL = GGML_QUANT_SIZES[GGMLQuantizationType.IQ4_NL][0]  # 32
QK_K = GGML_QUANT_SIZES[GGMLQuantizationType.IQ4_XS][0]  # 256
_NL_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.IQ4_NL][1]  # 18
_XS_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.IQ4_XS][1]  # 136
_SUB = 32  # block_size argument of quantize_row_iq4_nl_impl for both types
_NTRY = 7  # quantize_iq4_nl / quantize_iq4_xs pass ntry = 7
# Byte offsets inside block_iq4_xs.
_XS_SCALES_H = 2
_XS_SCALES_L = 4
_XS_QS = 8
_NL_QS = 2


@nb.njit(cache=True, inline="always")
def best_index_int8_search(x):
    """ggml-quants.c best_index_int8(16, kvalues_iq4nl, x), ported literally.

    Binary search over the sorted levels, then `x - val[mu-1] < val[mu] - x ? mu-1 : mu`
    in float32. A NaN x falls through every comparison and returns 15, as in C. The hot
    loops use the equivalent table form below; this one is the specification it is
    checked against.
    """
    if x <= _KV[0]:
        return 0
    if x >= _KV[_N_LEVELS - 1]:
        return _N_LEVELS - 1
    ml = 0
    mu = _N_LEVELS - 1
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < _KV[mav]:
            mu = mav
        else:
            ml = mav
    if x - _KV[mu - 1] < _KV[mu] - x:
        return mu - 1
    return mu


def _half_step_table():
    """Level index for each integer k = floor(2x), k in [2*kv[0], 2*kv[15]].

    best_index_int8 picks the upper level exactly when x >= (a+b)/2 for neighbours a < b
    (near a midpoint both float32 differences x-a and b-x are exact, so the C comparison is
    the exact one). Every midpoint of two integers is a half-integer, so with k = floor(2x)
    (2x is exact) that test is k >= a+b, and the index is the number of midpoints with
    a+b <= k. Checked equal to best_index_int8_search for all 2**32 float32 patterns (once,
    offline); the tests re-check a dense sample around every level and midpoint.
    """
    kv = KVALUES_IQ4NL.astype(np.int64)
    sums = kv[:-1] + kv[1:]  # 2 * midpoints
    ks = np.arange(2 * kv[0], 2 * kv[-1] + 1)
    return np.searchsorted(sums, ks, side="right").astype(np.uint8)


_HALF_STEP_INDEX = _half_step_table()
_K_LO = F32(2 * int(KVALUES_IQ4NL[0]))  # -254
_K_HI = F32(2 * int(KVALUES_IQ4NL[-1]))  # 226


@nb.njit(cache=True, inline="always")
def best_index_int8(x):
    """Same result as best_index_int8_search for every float32 x (NaN -> 15), branch-light."""
    if x != x:
        return _N_LEVELS - 1
    k = np.floor(F32(2.0) * x)
    k = min(max(k, _K_LO), _K_HI)  # clamping also covers x <= -127, x >= 113 and +-inf
    return np.int64(_HALF_STEP_INDEX[np.int64(k) - np.int64(_K_LO)])


@nb.njit(cache=True)
def _subblock_scale(x, xo, weight, Lb):
    """The per-32 search of quantize_row_iq4_nl_impl (ntry = 7): returns the float scale d.

    x[xo:xo+32] are the values, weight[0:32] their weights; Lb[0:32] receives the levels of
    the first guess (ggml writes them but every caller re-derives L from the final scale).
    """
    amax = F32(0.0)
    vmax = F32(0.0)
    for j in range(_SUB):
        ax = F32(abs(x[xo + j]))
        if ax > amax:
            amax = ax
            vmax = x[xo + j]
    if amax < GROUP_MAX_EPS:
        return F32(0.0)
    # ntry > 0: d = -max/values[0]
    d = -vmax / _KV[0]
    inv = F32(1.0) / d
    sumqx = F32(0.0)
    sumq2 = F32(0.0)
    for j in range(_SUB):
        xj = x[xo + j]
        l = best_index_int8(inv * xj)
        Lb[j] = l
        q = _KV[l]
        w = weight[j]
        sumqx += w * q * xj
        sumq2 += w * q * q
    d = sumqx / sumq2 if sumq2 > F32(0.0) else F32(0.0)
    best = d * sumqx
    for itry in range(-_NTRY, _NTRY + 1):
        inv = F32(itry + _KV0_INT) / vmax
        sumqx = F32(0.0)
        sumq2 = F32(0.0)
        for j in range(_SUB):
            xj = x[xo + j]
            q = _KV[best_index_int8(inv * xj)]
            w = weight[j]
            sumqx += w * q * xj
            sumq2 += w * q * q
        if sumq2 > F32(0.0) and sumqx * sumqx > best * sumq2:
            d = sumqx / sumq2
            best = d * sumqx
    return d


@nb.njit(cache=True, inline="always")
def _weights(x, xo, qw, has_qw, sigma2, weight):
    """weight[j] = qw[j]*sqrtf(sigma2 + x[j]^2) with an imatrix, else x[j]^2."""
    if has_qw:
        for j in range(_SUB):
            xj = x[xo + j]
            weight[j] = qw[xo + j] * np.sqrt(sigma2 + xj * xj)
    else:
        for j in range(_SUB):
            xj = x[xo + j]
            weight[j] = xj * xj


@nb.njit(cache=True, inline="always")
def _sigma2(x, xo, n):
    # sigma2 = sum x^2 over the super-block, times 2.f/super_block_size (exact power of 2).
    s = F32(0.0)
    for j in range(n):
        s += x[xo + j] * x[xo + j]
    return s * (F32(2.0) / F32(n))


@nb.njit(cache=True, inline="always")
def _pack_qs(L, n, out, o):
    for i in range(n // 32):
        for j in range(16):
            out[o + 16 * i + j] = np.uint8(L[32 * i + j] | (L[32 * i + 16 + j] << 4))


@nb.njit(cache=True)
def _iq4_nl_row(x, qw, has_qw, out, weight, L):
    """quantize_iq4_nl for one row: quantize_row_iq4_nl_impl(32, 32, ..., ntry=7) per block."""
    nblock = x.size // QK4_NL
    for ib in range(nblock):
        xo = ib * QK4_NL
        o = ib * _NL_BYTES
        sigma2 = _sigma2(x, xo, QK4_NL)
        _weights(x, xo, qw, has_qw, sigma2, weight)
        d = _subblock_scale(x, xo, weight, L)
        # super_block_size == block_size branch: store fp16(d), then re-pick every level
        # with the unrounded d (an all-tiny block has d = 0 and gets level 8 everywhere).
        put_u16(out, o, fp32_to_fp16(d))
        inv = F32(1.0) / d if d != F32(0.0) else F32(0.0)
        for j in range(QK4_NL):
            L[j] = best_index_int8(inv * x[xo + j])
        _pack_qs(L, QK4_NL, out, o + _NL_QS)


@nb.njit(cache=True)
def _iq4_xs_row(x, qw, has_qw, out, weight, L, scales):
    """quantize_iq4_xs for one row: quantize_row_iq4_nl_impl(256, 32, ..., ntry=7) per super-block."""
    nblock = x.size // QK_K
    nsub = QK_K // _SUB
    for ibl in range(nblock):
        xb = ibl * QK_K
        o = ibl * _XS_BYTES
        sigma2 = _sigma2(x, xb, QK_K)
        max_scale = F32(0.0)
        amax_scale = F32(0.0)
        for ib in range(nsub):
            xo = xb + ib * _SUB
            _weights(x, xo, qw, has_qw, sigma2, weight)
            d = _subblock_scale(x, xo, weight, L[ib * _SUB:])
            scales[ib] = d
            abs_d = F32(abs(d))
            if abs_d > amax_scale:
                amax_scale = abs_d
                max_scale = d
        # Super-block scale d = -max_scale/32 (an all-zero block gives -0.0 -> fp16 0x8000).
        d = -max_scale / F32(32.0)
        put_u16(out, o, fp32_to_fp16(d))
        inv = F32(1.0) / d if d != F32(0.0) else F32(0.0)
        scales_h = 0
        for ib in range(nsub):
            l = nearest_int(inv * scales[ib])
            l = max(-32, min(31, l))
            dl = d * F32(l)
            idl = F32(1.0) / dl if dl != F32(0.0) else F32(0.0)
            xo = xb + ib * _SUB
            for j in range(_SUB):
                L[ib * _SUB + j] = best_index_int8(idl * x[xo + j])
            l += 32
            l_l = l & 0xF
            l_h = l >> 4
            if ib % 2 == 0:
                out[o + _XS_SCALES_L + ib // 2] = np.uint8(l_l)
            else:
                out[o + _XS_SCALES_L + ib // 2] |= np.uint8(l_l << 4)
            scales_h |= l_h << (2 * (ib % 8))
        put_u16(out, o + _XS_SCALES_H, np.uint16(scales_h))
        _pack_qs(L, QK_K, out, o + _XS_QS)


@nb.njit(parallel=True, cache=True)
def _quantize_iq4_nl(x, qw, has_qw):
    n_rows, n = x.shape
    out = np.zeros((n_rows, n // QK4_NL * _NL_BYTES), dtype=np.uint8)
    for r in nb.prange(n_rows):
        weight = np.empty(_SUB, dtype=np.float32)
        L = np.empty(QK4_NL, dtype=np.uint8)
        _iq4_nl_row(x[r], qw, has_qw, out[r], weight, L)
    return out


@nb.njit(parallel=True, cache=True)
def _quantize_iq4_xs(x, qw, has_qw):
    n_rows, n = x.shape
    out = np.zeros((n_rows, n // QK_K * _XS_BYTES), dtype=np.uint8)
    for r in nb.prange(n_rows):
        weight = np.empty(_SUB, dtype=np.float32)
        L = np.empty(QK_K, dtype=np.uint8)
        scales = np.empty(QK_K // _SUB, dtype=np.float32)
        _iq4_xs_row(x[r], qw, has_qw, out[r], weight, L, scales)
    return out


@nb.njit(parallel=True, cache=True)
def _dequantize_iq4_nl(data, n):
    """dequantize_row_iq4_nl: y = fp16(d) * kvalues[nibble] (float32 product)."""
    n_rows = data.shape[0]
    y = np.empty((n_rows, n), dtype=np.float32)
    for r in nb.prange(n_rows):
        row = data[r]
        yr = y[r]
        for ib in range(n // QK4_NL):
            o = ib * _NL_BYTES
            d = fp16_to_fp32(get_u16(row, o))
            yo = ib * QK4_NL
            for j in range(QK4_NL // 2):
                q = row[o + _NL_QS + j]
                yr[yo + j] = d * _KV[q & 0xF]
                yr[yo + j + 16] = d * _KV[q >> 4]
    return y


@nb.njit(parallel=True, cache=True)
def _dequantize_iq4_xs(data, n):
    """dequantize_row_iq4_xs: dl = fp16(d) * (ls - 32), y = dl * kvalues[nibble]."""
    n_rows = data.shape[0]
    y = np.empty((n_rows, n), dtype=np.float32)
    for r in nb.prange(n_rows):
        row = data[r]
        yr = y[r]
        for ibl in range(n // QK_K):
            o = ibl * _XS_BYTES
            d = fp16_to_fp32(get_u16(row, o))
            scales_h = np.int32(get_u16(row, o + _XS_SCALES_H))
            for ib in range(QK_K // _SUB):
                lo = (np.int32(row[o + _XS_SCALES_L + ib // 2]) >> (4 * (ib % 2))) & 0xF
                hi = (scales_h >> (2 * ib)) & 3
                dl = d * F32((lo | (hi << 4)) - 32)
                yo = ibl * QK_K + ib * _SUB
                qo = o + _XS_QS + ib * 16
                for j in range(16):
                    q = row[qo + j]
                    yr[yo + j] = dl * _KV[q & 0xF]
                    yr[yo + j + 16] = dl * _KV[q >> 4]
    return y


# --- registry entry points -------------------------------------------------------------

_NO_QW = np.zeros(0, dtype=np.float32)


def _prep(x, imatrix):
    x = np.ascontiguousarray(x, dtype=np.float32)
    if imatrix is None:
        return x, _NO_QW, False
    return x, np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1), True


def quantize_iq4_nl(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """float32 [n_rows, n] -> uint8 [n_rows, n/32*18], as ggml_quantize_chunk(IQ4_NL)."""
    return _quantize_iq4_nl(*_prep(x, imatrix))


def quantize_iq4_xs(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """float32 [n_rows, n] -> uint8 [n_rows, n/256*136], as ggml_quantize_chunk(IQ4_XS)."""
    return _quantize_iq4_xs(*_prep(x, imatrix))


def dequantize_iq4_nl(data: np.ndarray, n_per_row: int) -> np.ndarray:
    return _dequantize_iq4_nl(np.ascontiguousarray(data, dtype=np.uint8), n_per_row)


def dequantize_iq4_xs(data: np.ndarray, n_per_row: int) -> np.ndarray:
    return _dequantize_iq4_xs(np.ascontiguousarray(data, dtype=np.uint8), n_per_row)


QUANTIZE = {
    GGMLQuantizationType.IQ4_NL: quantize_iq4_nl,
    GGMLQuantizationType.IQ4_XS: quantize_iq4_xs,
}

DEQUANTIZE = {
    GGMLQuantizationType.IQ4_NL: dequantize_iq4_nl,
    GGMLQuantizationType.IQ4_XS: dequantize_iq4_xs,
}
