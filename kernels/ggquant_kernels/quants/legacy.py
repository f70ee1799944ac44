"""Legacy quants Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: quantize and dequantize, bit-exact with ggml.

Ports of ggml/src/ggml-quants.c. ``ggml_quantize_chunk`` calls ``quantize_q4_0`` etc.: with a
NULL importance matrix that is ``quantize_row_<type>_ref`` over the whole chunk; with an
imatrix it is ``quantize_row_<type>_impl`` per row (weighted make_qx_quants / make_qkx3_quants
searches with sigma2 taken over the whole row). ``quantize_q8_0`` ignores the imatrix.
Dequantizers port ``dequantize_row_<type>``.

Blocks of 32 values (ggml-common.h):

    Q4_0 18 B: d fp16 | qs[16]            (level l in 0..15 means (l - 8) * d)
    Q4_1 20 B: d fp16 | m fp16 | qs[16]   (l * d + m)
    Q5_0 22 B: d fp16 | qh[4] | qs[16]    (5th bits in qh, a little-endian uint32)
    Q5_1 24 B: d fp16 | m fp16 | qh[4] | qs[16]
    Q8_0 34 B: d fp16 | qs[32] int8

Numba conventions as in kquants.py (common.JIT options, one parallel kernel per direction
for the family dispatching on the GGML type id, empty imatrix + flag when there is none).
"""

import numba as nb
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# The Python entry wrappers (allocate the output, pick the imatrix flag) are shared with kquants.
from .kquants import row_dequantizer, row_quantizer
from ..common import JIT
from ..qsearch import (
    F32,
    WORK_FLOATS,
    WORK_INTS,
    as_int8,
    c_f32_to_int_lowbyte,
    c_roundf,
    fp16_to_fp32,
    fp32_to_fp16,
    get_u16,
    make_qkx3_quants,
    make_qx_quants,
    put_u16,
)

_T = GGMLQuantizationType
QK = GGML_QUANT_SIZES[_T.Q4_0][0]  # 32 values per block, same for all five types
Q4_0_BYTES = GGML_QUANT_SIZES[_T.Q4_0][1]
Q4_1_BYTES = GGML_QUANT_SIZES[_T.Q4_1][1]
Q5_0_BYTES = GGML_QUANT_SIZES[_T.Q5_0][1]
Q5_1_BYTES = GGML_QUANT_SIZES[_T.Q5_1][1]
Q8_0_BYTES = GGML_QUANT_SIZES[_T.Q8_0][1]

# make_qkx3_quants parameters of quantize_row_q4_1_impl / quantize_row_q5_1_impl
IMPL_RMIN, IMPL_RDELTA, IMPL_NSTEP = F32(-0.9), F32(0.05), 36
FLT_MAX = F32(np.finfo(np.float32).max)


@nb.njit(**JIT)
def _abs_max(x, xo):
    """The value with the largest |x| in a block (first one wins; C `if (amax < fabsf(v))`)."""
    amax = F32(0.0)
    vmax = F32(0.0)
    for j in range(QK):
        v = x[xo + j]
        if amax < abs(v):
            amax = abs(v)
            vmax = v
    return vmax


@nb.njit(**JIT)
def _min_max(x, xo):
    vmin = FLT_MAX
    vmax = -FLT_MAX
    for j in range(QK):
        v = x[xo + j]
        if v < vmin:
            vmin = v
        if v > vmax:
            vmax = v
    return vmin, vmax


@nb.njit(**JIT)
def _inv(d):
    # C: const float id = d ? 1.0f/d : 0.0f;  (NaN is true)
    return F32(1.0) / d if d != F32(0.0) else F32(0.0)


@nb.njit(**JIT)
def _row_sigma2(x, n):
    """quantize_row_q*_impl: sigma2 = sum(x*x) / n_per_row over the whole row (float32)."""
    s = F32(0.0)
    for j in range(n):
        s += x[j] * x[j]
    return s / F32(n)


@nb.njit(**JIT)
def _block_weights(x, xo, qw, sigma2, weight):
    for j in range(QK):
        v = x[xo + j]
        weight[j] = qw[xo + j] * np.sqrt(sigma2 + v * v)


@nb.njit(**JIT)
def _get_u32(b, pos):
    """Little-endian uint32 at b[pos:pos+4] (the C memcpy of qh), as int64."""
    return np.int64(b[pos]) | (np.int64(b[pos + 1]) << 8) | (np.int64(b[pos + 2]) << 16) | (np.int64(b[pos + 3]) << 24)


@nb.njit(**JIT)
def _put_q5_bits(out, qso, qho, L, Lo):
    """qs nibbles and the 5th-bit word qh of Q5_0/Q5_1 from 32 levels L[Lo:Lo+32] (0..31)."""
    qh = np.int64(0)  # C uint32_t; 32 bits used
    for j in range(QK // 2):
        xi0 = np.int64(L[Lo + j]) & 0xFF
        xi1 = np.int64(L[Lo + j + QK // 2]) & 0xFF
        out[qso + j] = (xi0 & 0x0F) | ((xi1 & 0x0F) << 4)
        qh |= ((xi0 & 0x10) >> 4) << j
        qh |= ((xi1 & 0x10) >> 4) << (j + QK // 2)
    for k in range(4):
        out[qho + k] = (qh >> (8 * k)) & 0xFF


# ----------------------------------------------------------------------------- Q4_0


@nb.njit(**JIT)
def _q4_0_row(xr, qw, use_qw, orow, L8, Lu, Laux, weight, work, lbuf):
    n = xr.size
    L = L8
    sigma2 = _row_sigma2(xr, n) if use_qw else F32(0.0)
    for ib in range(n // QK):
        xo = ib * QK
        oo = ib * Q4_0_BYTES
        if use_qw:
            # quantize_row_q4_0_impl
            _block_weights(xr, xo, qw, sigma2, weight)
            d = make_qx_quants(QK, 8, xr, xo, L, 0, 1, weight, 0, True, work, lbuf)
            put_u16(orow, oo, fp32_to_fp16(d))
            for j in range(16):
                orow[oo + 2 + j] = (np.int64(L[j]) | (np.int64(L[j + 16]) << 4)) & 0xFF
        else:
            # quantize_row_q4_0_ref
            d = _abs_max(xr, xo) / F32(-8.0)
            id_ = _inv(d)
            put_u16(orow, oo, fp32_to_fp16(d))
            for j in range(16):
                x0 = xr[xo + j] * id_
                x1 = xr[xo + 16 + j] * id_
                # (uint8_t)MIN(15, (int8_t)(x0 + 8.5f)): truncation, not rounding
                xi0 = min(15, as_int8(c_f32_to_int_lowbyte(x0 + F32(8.5)))) & 0xFF
                xi1 = min(15, as_int8(c_f32_to_int_lowbyte(x1 + F32(8.5)))) & 0xFF
                orow[oo + 2 + j] = (xi0 | (xi1 << 4)) & 0xFF


@nb.njit(**JIT)
def _dq_q4_0_row(b, yr, qk):
    """dequantize_row_q4_0: y[j] = (lo nibble - 8) * d, y[j + 16] = (hi nibble - 8) * d."""
    half = qk // 2  # run-time trip count: see DEQUANTIZER LOOPS in kquants.py
    for ib in range(yr.size // QK):
        bo = ib * Q4_0_BYTES
        yo = ib * QK
        d = fp16_to_fp32(get_u16(b, bo))
        for j in range(half):
            q = np.int32(b[bo + 2 + j])
            yr[yo + j] = F32((q & 0x0F) - 8) * d
            yr[yo + QK // 2 + j] = F32((q >> 4) - 8) * d


# ----------------------------------------------------------------------------- Q4_1


@nb.njit(**JIT)
def _q4_1_row(xr, qw, use_qw, orow, L8, Lu, Laux, weight, work, lbuf):
    n = xr.size
    L = Lu
    sigma2 = _row_sigma2(xr, n) if use_qw else F32(0.0)
    for ib in range(n // QK):
        xo = ib * QK
        oo = ib * Q4_1_BYTES
        if use_qw:
            # quantize_row_q4_1_impl
            _block_weights(xr, xo, qw, sigma2, weight)
            d, the_min = make_qkx3_quants(QK, 15, xr, xo, weight, 0, True, L, 0, Laux,
                                          IMPL_RMIN, IMPL_RDELTA, IMPL_NSTEP, False, work)
            put_u16(orow, oo, fp32_to_fp16(d))
            put_u16(orow, oo + 2, fp32_to_fp16(-the_min))
            for j in range(16):
                orow[oo + 4 + j] = (np.int64(L[j]) | (np.int64(L[j + 16]) << 4)) & 0xFF
        else:
            # quantize_row_q4_1_ref
            vmin, vmax = _min_max(xr, xo)
            d = (vmax - vmin) / F32(15.0)
            id_ = _inv(d)
            put_u16(orow, oo, fp32_to_fp16(d))
            put_u16(orow, oo + 2, fp32_to_fp16(vmin))
            for j in range(16):
                x0 = (xr[xo + j] - vmin) * id_
                x1 = (xr[xo + 16 + j] - vmin) * id_
                xi0 = min(15, as_int8(c_f32_to_int_lowbyte(x0 + F32(0.5)))) & 0xFF
                xi1 = min(15, as_int8(c_f32_to_int_lowbyte(x1 + F32(0.5)))) & 0xFF
                orow[oo + 4 + j] = (xi0 | (xi1 << 4)) & 0xFF


@nb.njit(**JIT)
def _dq_q4_1_row(b, yr, qk):
    """dequantize_row_q4_1: y = nibble * d + m (a product, then a sum: no FMA in the C)."""
    half = qk // 2  # run-time trip count: see DEQUANTIZER LOOPS in kquants.py
    for ib in range(yr.size // QK):
        bo = ib * Q4_1_BYTES
        yo = ib * QK
        d = fp16_to_fp32(get_u16(b, bo))
        m = fp16_to_fp32(get_u16(b, bo + 2))
        for j in range(half):
            q = np.int32(b[bo + 4 + j])
            yr[yo + j] = F32(q & 0x0F) * d + m
            yr[yo + QK // 2 + j] = F32(q >> 4) * d + m


# ----------------------------------------------------------------------------- Q5_0


@nb.njit(**JIT)
def _q5_0_row(xr, qw, use_qw, orow, L8, Lu, Laux, weight, work, lbuf):
    n = xr.size
    L = L8
    sigma2 = _row_sigma2(xr, n) if use_qw else F32(0.0)
    for ib in range(n // QK):
        xo = ib * QK
        oo = ib * Q5_0_BYTES
        if use_qw:
            # quantize_row_q5_0_impl
            _block_weights(xr, xo, qw, sigma2, weight)
            d = make_qx_quants(QK, 16, xr, xo, L, 0, 1, weight, 0, True, work, lbuf)
            put_u16(orow, oo, fp32_to_fp16(d))
        else:
            # quantize_row_q5_0_ref: (uint8_t)MIN(31, (int8_t)(x0 + 16.5f))
            d = _abs_max(xr, xo) / F32(-16.0)
            id_ = _inv(d)
            put_u16(orow, oo, fp32_to_fp16(d))
            for j in range(QK):
                L[j] = min(31, as_int8(c_f32_to_int_lowbyte(xr[xo + j] * id_ + F32(16.5))))
        _put_q5_bits(orow, oo + 6, oo + 2, L, 0)


@nb.njit(**JIT)
def _dq_q5_0_row(b, yr):
    n = yr.size
    for ib in range(n // QK):
        bo = ib * Q5_0_BYTES
        yo = ib * QK
        d = fp16_to_fp32(get_u16(b, bo))
        qh = _get_u32(b, bo + 2)
        for j in range(16):
            xh_0 = ((qh >> j) << 4) & 0x10
            xh_1 = (qh >> (j + 12)) & 0x10
            q = np.int64(b[bo + 6 + j])
            yr[yo + j] = F32(((q & 0x0F) | xh_0) - 16) * d
            yr[yo + j + 16] = F32(((q >> 4) | xh_1) - 16) * d


# ----------------------------------------------------------------------------- Q5_1


@nb.njit(**JIT)
def _q5_1_row(xr, qw, use_qw, orow, L8, Lu, Laux, weight, work, lbuf):
    n = xr.size
    L = Lu
    sigma2 = _row_sigma2(xr, n) if use_qw else F32(0.0)
    for ib in range(n // QK):
        xo = ib * QK
        oo = ib * Q5_1_BYTES
        if use_qw:
            # quantize_row_q5_1_impl
            _block_weights(xr, xo, qw, sigma2, weight)
            d, the_min = make_qkx3_quants(QK, 31, xr, xo, weight, 0, True, L, 0, Laux,
                                          IMPL_RMIN, IMPL_RDELTA, IMPL_NSTEP, False, work)
            put_u16(orow, oo, fp32_to_fp16(d))
            put_u16(orow, oo + 2, fp32_to_fp16(-the_min))
        else:
            # quantize_row_q5_1_ref: (uint8_t)(x0 + 0.5f), no clamp
            vmin, vmax = _min_max(xr, xo)
            d = (vmax - vmin) / F32(31.0)
            id_ = _inv(d)
            put_u16(orow, oo, fp32_to_fp16(d))
            put_u16(orow, oo + 2, fp32_to_fp16(vmin))
            for j in range(QK):
                L[j] = c_f32_to_int_lowbyte((xr[xo + j] - vmin) * id_ + F32(0.5))
        _put_q5_bits(orow, oo + 8, oo + 4, L, 0)


@nb.njit(**JIT)
def _dq_q5_1_row(b, yr):
    n = yr.size
    for ib in range(n // QK):
        bo = ib * Q5_1_BYTES
        yo = ib * QK
        d = fp16_to_fp32(get_u16(b, bo))
        m = fp16_to_fp32(get_u16(b, bo + 2))
        qh = _get_u32(b, bo + 4)
        for j in range(16):
            xh_0 = ((qh >> j) << 4) & 0x10
            xh_1 = (qh >> (j + 12)) & 0x10
            q = np.int64(b[bo + 8 + j])
            yr[yo + j] = F32((q & 0x0F) | xh_0) * d + m
            yr[yo + j + 16] = F32((q >> 4) | xh_1) * d + m


# ----------------------------------------------------------------------------- Q8_0


@nb.njit(**JIT)
def _q8_0_row(xr, qw, use_qw, orow, L8, Lu, Laux, weight, work, lbuf):
    # quantize_q8_0 -> quantize_row_q8_0_ref whatever the imatrix (qw/use_qw are unused).
    n = xr.size
    for ib in range(n // QK):
        xo = ib * QK
        oo = ib * Q8_0_BYTES
        amax = F32(0.0)
        for j in range(QK):
            a = abs(xr[xo + j])
            amax = amax if amax > a else a  # MAX(amax, fabsf(v))
        d = amax / F32(127.0)
        id_ = _inv(d)
        put_u16(orow, oo, fp32_to_fp16(d))
        for j in range(QK):
            orow[oo + 2 + j] = c_f32_to_int_lowbyte(c_roundf(xr[xo + j] * id_))


@nb.njit(**JIT)
def _dq_q8_0_row(b, yr, qk):
    """dequantize_row_q8_0: y = qs * d (qs int8)."""
    qs = b.view(np.int8)
    for ib in range(yr.size // QK):
        bo = ib * Q8_0_BYTES
        yo = ib * QK
        d = fp16_to_fp32(get_u16(b, bo))
        for j in range(qk):  # run-time trip count: see DEQUANTIZER LOOPS in kquants.py
            yr[yo + j] = F32(qs[bo + 2 + j]) * d


# ----------------------------------------------------------------------------- kernels

# One parallel kernel per direction for the whole family, dispatching on the GGML type id:
# numba re-optimizes every callee linked into each parallel kernel, so one kernel per type
# multiplied the cold compile time. Rows are independent (prange over chunks of rows, scratch
# allocated once per chunk), so the bytes do not depend on the thread count.
ROWS_PER_TASK = 8
Q4_0_ID, Q4_1_ID, Q5_0_ID, Q5_1_ID, Q8_0_ID = (int(t) for t in (_T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1, _T.Q8_0))


@nb.njit(parallel=True, **JIT)
def _quantize_legacy(x, qw, use_qw, out, type_id):
    nrows = x.shape[0]
    for task in nb.prange((nrows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        L8 = np.empty(QK, np.int8)
        Lu = np.empty(QK, np.uint8)
        Laux = np.empty(QK, np.uint8)
        weight = np.empty(QK, np.float32)
        work = np.empty(WORK_FLOATS, np.float32)
        lbuf = np.empty(WORK_INTS, np.int32)
        for r in range(task * ROWS_PER_TASK, min(nrows, (task + 1) * ROWS_PER_TASK)):
            if type_id == Q4_0_ID:
                _q4_0_row(x[r], qw, use_qw, out[r], L8, Lu, Laux, weight, work, lbuf)
            elif type_id == Q4_1_ID:
                _q4_1_row(x[r], qw, use_qw, out[r], L8, Lu, Laux, weight, work, lbuf)
            elif type_id == Q5_0_ID:
                _q5_0_row(x[r], qw, use_qw, out[r], L8, Lu, Laux, weight, work, lbuf)
            elif type_id == Q5_1_ID:
                _q5_1_row(x[r], qw, use_qw, out[r], L8, Lu, Laux, weight, work, lbuf)
            else:
                _q8_0_row(x[r], qw, use_qw, out[r], L8, Lu, Laux, weight, work, lbuf)


@nb.njit(parallel=True, **JIT)
def _dequantize_legacy(data, y, type_id, qk):
    # qk: the block size, passed at run time (see DEQUANTIZER LOOPS in kquants.py).
    nrows = y.shape[0]
    for task in nb.prange((nrows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for r in range(task * ROWS_PER_TASK, min(nrows, (task + 1) * ROWS_PER_TASK)):
            if type_id == Q4_0_ID:
                _dq_q4_0_row(data[r], y[r], qk)
            elif type_id == Q4_1_ID:
                _dq_q4_1_row(data[r], y[r], qk)
            elif type_id == Q5_0_ID:
                _dq_q5_0_row(data[r], y[r])
            elif type_id == Q5_1_ID:
                _dq_q5_1_row(data[r], y[r])
            else:
                _dq_q8_0_row(data[r], y[r], qk)


# ----------------------------------------------------------------------------- registry

_LEGACY = (_T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1, _T.Q8_0)
# Q8_0 ignores the imatrix (quantize_q8_0); the wrapper still checks its length.
QUANTIZE = {t: row_quantizer(_quantize_legacy, t) for t in _LEGACY}
DEQUANTIZE = {t: row_dequantizer(_dequantize_legacy, t) for t in _LEGACY}
