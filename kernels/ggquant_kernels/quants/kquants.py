"""k-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: quantize and dequantize, bit-exact with ggml.

Ports of ggml/src/ggml-quants.c. ``ggml_quantize_chunk`` runs ``quantize_<type>``, which takes
the ``quantize_row_<type>_ref`` path when the importance matrix is NULL and the
``quantize_row_<type>_impl`` path (a different search, weighted by the imatrix) otherwise;
both are ported here. Dequantizers port ``dequantize_row_<type>`` (the type traits' to_float).

Row layout: a row of n_per_row floats is n_per_row / QK_K super-blocks of QK_K = 256
values; each super-block is one ``block_<type>`` of ggml-common.h, byte for byte:

    Q2_K  84 B: scales[16] (lo nibble scale, hi nibble min) | qs[64] | d fp16 | dmin fp16
    Q3_K 110 B: hmask[32] | qs[64] | scales[12] (16 x 6 bit) | d fp16
    Q4_K 144 B: d fp16 | dmin fp16 | scales[12] (8 x 6-bit scale + 8 x 6-bit min) | qs[128]
    Q5_K 176 B: d fp16 | dmin fp16 | scales[12] | qh[32] | qs[128]
    Q6_K 210 B: ql[128] | qh[64] | scales[16] int8 | d fp16

Numba: per-block functions are ``njit`` with the common.JIT options. One ``parallel=True``
kernel per direction serves all five types (``prange`` over rows, dispatch on the GGML type
id): rows are independent, so the bytes do not depend on the thread count. Without an
imatrix the kernel receives an empty float32 array and use_qw=False, so each kernel has
exactly one compiled specialisation. ``row_quantizer``/``row_dequantizer`` build the registry's
plain Python entry points (legacy.py uses them too).

DEQUANTIZER LOOPS (here and in legacy.py). The dequantizers get the block size ``qk`` (from
gguf's table) as a run-time argument and run their innermost loops to ``qk // 16`` etc.
instead of a literal 16: with a compile-time trip count LLVM unrolls such a short loop
completely before its loop vectorizer runs, and numba switches the SLP vectorizer off, so
the unrolled code stays scalar; with a run-time trip count the loop vectorizer emits 8-wide
SIMD code (2-4x faster). Each inner loop is straight-line (no branches, no table lookups,
contiguous loads and stores, the per-block scales hoisted out of it). Offsets are built from
compile-time constants and loop counters only, so that LLVM can prove the indices are not
negative: a run-time factor in an index keeps numba's negative-index wrap-around, which
turns every vector store back into 8 scalar ones. The float arithmetic is unchanged
(elementwise IEEE float32, same operations in the same order as the C), so the bytes are too.
"""

import numba as nb
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..common import GROUP_MAX_EPS, JIT
from ..qsearch import (
    F32,
    WORK_FLOATS,
    WORK_INTS,
    as_int8,
    fp16_to_fp32,
    fp32_to_fp16,
    get_scale_min_k4,
    get_u16,
    make_q3_quants,
    make_qkx2_quants,
    make_qkx3_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    put_u16,
)

_T = GGMLQuantizationType
QK_K = GGML_QUANT_SIZES[_T.Q4_K][0]  # 256 values per super-block
Q2_K_BYTES = GGML_QUANT_SIZES[_T.Q2_K][1]
Q3_K_BYTES = GGML_QUANT_SIZES[_T.Q3_K][1]
Q4_K_BYTES = GGML_QUANT_SIZES[_T.Q4_K][1]
Q5_K_BYTES = GGML_QUANT_SIZES[_T.Q5_K][1]
Q6_K_BYTES = GGML_QUANT_SIZES[_T.Q6_K][1]

# Parameters of the make_qkx*_quants searches, as each C caller passes them (float32).
Q2_K_REF_RMIN, Q2_K_REF_RDELTA, Q2_K_REF_NSTEP = F32(-0.5), F32(0.1), 15
Q4_K_REF_RMIN, Q4_K_REF_RDELTA, Q4_K_REF_NSTEP = F32(-1.0), F32(0.1), 20
Q5_K_REF_RMIN, Q5_K_REF_RDELTA, Q5_K_REF_NSTEP = F32(-0.5), F32(0.1), 15
IMPL_RMIN, IMPL_RDELTA, IMPL_NSTEP = F32(-0.9), F32(0.05), 36  # all *_impl callers of qkx3

F_QK_K = F32(QK_K)


@nb.njit(**JIT)
def _sum_sq(x, xo, n):
    """Sequential float32 sum of x*x over x[xo:xo+n] (the C loops sum_x2 += x[l]*x[l])."""
    s = F32(0.0)
    for l in range(n):
        v = x[xo + l]
        s += v * v
    return s


@nb.njit(**JIT)
def _pack_2bit(L, out, qo):
    """qs of Q2_K/Q3_K: per 128-group, byte l holds L[l], L[l+32], L[l+64], L[l+96] (2 bits each)."""
    for j in range(0, QK_K, 128):
        for l in range(32):
            a = np.int64(L[j + l])
            b = np.int64(L[j + l + 32])
            c = np.int64(L[j + l + 64])
            d = np.int64(L[j + l + 96])
            out[qo + j // 4 + l] = (a | (b << 2) | (c << 4) | (d << 6)) & 0xFF


# ----------------------------------------------------------------------------- Q2_K


@nb.njit(**JIT)
def _q2_k_block(x, xo, qw, use_qw, out, oo, L, Laux, weights, scales, mins, sw, Ls, Lm, work):
    """One super-block: quantize_row_q2_K_ref (use_qw False) / quantize_row_q2_K_impl."""
    so, qso, do_ = oo, oo + 16, oo + 80
    if not use_qw:
        max_scale = F32(0.0)
        max_min = F32(0.0)
        for j in range(16):
            for l in range(16):
                weights[l] = abs(x[xo + 16 * j + l])
            s, m = make_qkx2_quants(16, 3, x, xo + 16 * j, weights, 0, L, 16 * j, Laux,
                                    Q2_K_REF_RMIN, Q2_K_REF_RDELTA, Q2_K_REF_NSTEP, True, work)
            scales[j] = s
            mins[j] = m
            if s > max_scale:
                max_scale = s
            if m > max_min:
                max_min = m
        if max_scale > F32(0.0):
            iscale = F32(15.0) / max_scale
            for j in range(16):
                out[so + j] = nearest_int(iscale * scales[j]) & 0xFF
            put_u16(out, do_, fp32_to_fp16(max_scale / F32(15.0)))
        else:
            for j in range(16):
                out[so + j] = 0
            put_u16(out, do_, fp32_to_fp16(F32(0.0)))
        if max_min > F32(0.0):
            iscale = F32(15.0) / max_min
            for j in range(16):
                out[so + j] = (np.int64(out[so + j]) | (nearest_int(iscale * mins[j]) << 4)) & 0xFF
            put_u16(out, do_ + 2, fp32_to_fp16(max_min / F32(15.0)))
        else:
            put_u16(out, do_ + 2, fp32_to_fp16(F32(0.0)))
        dm = fp16_to_fp32(get_u16(out, do_))
        mm = fp16_to_fp32(get_u16(out, do_ + 2))
    else:
        sigma2 = _sum_sq(x, xo, QK_K) / F_QK_K  # no factor 2 for Q2_K
        for j in range(16):
            qo = xo + 16 * j  # the imatrix slice has the same offset within the row as x
            for l in range(16):
                v = x[xo + 16 * j + l]
                weights[16 * j + l] = qw[qo + l] * np.sqrt(sigma2 + v * v)
            s = F32(0.0)
            for l in range(16):
                s += weights[16 * j + l]
            sw[j] = s
            sc, m = make_qkx3_quants(16, 3, x, xo + 16 * j, weights, 16 * j, True, L, 16 * j, Laux,
                                     IMPL_RMIN, IMPL_RDELTA, IMPL_NSTEP, False, work)
            scales[j] = sc
            mins[j] = m
        dm = make_qp_quants(16, 15, scales, 0, Ls, 0, sw, 0, work)
        mm = make_qp_quants(16, 15, mins, 0, Lm, 0, sw, 0, work)
        put_u16(out, do_, fp32_to_fp16(dm))
        put_u16(out, do_ + 2, fp32_to_fp16(mm))
        dm = fp16_to_fp32(get_u16(out, do_))
        mm = fp16_to_fp32(get_u16(out, do_ + 2))
        for j in range(16):
            out[so + j] = (np.int64(Ls[j]) | (np.int64(Lm[j]) << 4)) & 0xFF
    # Re-quantize with the stored scales; a sub-block with d == 0 keeps its search levels.
    for j in range(16):
        sc = np.int64(out[so + j])
        d = dm * F32(sc & 0xF)
        if d == F32(0.0):
            continue
        m = mm * F32(sc >> 4)
        for ii in range(16):
            l = nearest_int((x[xo + 16 * j + ii] + m) / d)
            L[16 * j + ii] = max(0, min(3, l))
    _pack_2bit(L, out, qso)


@nb.njit(**JIT)
def _dq_q2_k_row(b, yr, qk):
    """dequantize_row_q2_K: sub-block s (16 values) is dl * ((q >> shift) & 3) - ml."""
    sub = qk // 16  # 16 values per scale; a run-time trip count (see DEQUANTIZER LOOPS)
    for i in range(yr.size // QK_K):
        bo = i * Q2_K_BYTES
        d = fp16_to_fp32(get_u16(b, bo + 80))
        dmin = fp16_to_fp32(get_u16(b, bo + 82))
        for s in range(16):
            # C order: two 128-value halves (q += 32), four shifts, two 16-byte parts each.
            sc = np.int32(b[bo + s])
            dl = d * F32(sc & 0xF)
            ml = dmin * F32(sc >> 4)
            q = bo + 16 + 32 * (s // 8) + 16 * (s % 2)
            shift = 2 * ((s // 2) % 4)
            yo = i * QK_K + 16 * s
            for l in range(sub):
                yr[yo + l] = dl * F32((np.int32(b[q + l]) >> shift) & 3) - ml


# ----------------------------------------------------------------------------- Q3_K


@nb.njit(**JIT)
def _q3_k_scale(out, so, j):
    """6-bit scale j of a Q3_K block minus 32 (the C `sc` computation, as int8)."""
    lo = (np.int64(out[so + j]) & 0xF) if j < 8 else (np.int64(out[so + j - 8]) >> 4)
    return (lo | (((np.int64(out[so + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32


@nb.njit(**JIT)
def _q3_k_put_scale(out, so, j, l):
    """Store 6-bit level l (0..63) as scale j (packing of quantize_row_q3_K_ref/_impl)."""
    if j < 8:
        out[so + j] = l & 0xF
    else:
        out[so + j - 8] = (np.int64(out[so + j - 8]) | ((l & 0xF) << 4)) & 0xFF
    l >>= 4
    out[so + 8 + j % 4] = (np.int64(out[so + 8 + j % 4]) | (l << (2 * (j // 4)))) & 0xFF


@nb.njit(**JIT)
def _q3_k_block(x, xo, qw, use_qw, out, oo, L, weights, scales, sw, Ls, work, lbuf):
    """One super-block: quantize_row_q3_K_ref (use_qw False) / quantize_row_q3_K_impl."""
    hmo, qso, so, do_ = oo, oo + 32, oo + 96, oo + 108
    for k in range(12):
        out[so + k] = 0
    if not use_qw:
        max_scale = F32(0.0)
        amax = F32(0.0)
        for j in range(16):
            s = make_q3_quants(16, 4, x, xo + 16 * j, L, 16 * j, True)
            scales[j] = s
            a = abs(s)
            if a > amax:
                amax = a
                max_scale = s
        if max_scale != F32(0.0):  # C: if (max_scale) -- NaN counts as true
            iscale = F32(-32.0) / max_scale
            for j in range(16):
                l = as_int8(nearest_int(iscale * scales[j]))
                l = max(-32, min(31, l)) + 32
                _q3_k_put_scale(out, so, j, l)
            put_u16(out, do_, fp32_to_fp16(F32(1.0) / iscale))
        else:
            put_u16(out, do_, fp32_to_fp16(F32(0.0)))
    else:
        sigma2 = F32(2.0) * _sum_sq(x, xo, QK_K) / F_QK_K
        for j in range(16):
            qo = xo + 16 * j
            for l in range(16):
                v = x[xo + 16 * j + l]
                weights[16 * j + l] = qw[qo + l] * np.sqrt(sigma2 + v * v)
            s = F32(0.0)
            for l in range(16):
                s += weights[16 * j + l]
            sw[j] = s
            scales[j] = make_qx_quants(16, 4, x, xo + 16 * j, L, 16 * j, 1, weights, 16 * j, True, work, lbuf)
        d_block = make_qx_quants(16, 32, scales, 0, Ls, 0, 1, sw, 0, True, work, lbuf)
        for j in range(16):
            _q3_k_put_scale(out, so, j, np.int64(Ls[j]))
        put_u16(out, do_, fp32_to_fp16(d_block))
    dall = fp16_to_fp32(get_u16(out, do_))
    for j in range(16):
        d = dall * F32(_q3_k_scale(out, so, j))
        if d == F32(0.0):
            continue
        for ii in range(16):
            l = nearest_int(x[xo + 16 * j + ii] / d)
            L[16 * j + ii] = max(-4, min(3, l)) + 4
    # High bit of each level: element j goes to hmask[j % 32], bit j // 32 (branch-free form
    # of the C's `if (L[j] > 3) { hmask[m] |= hm; L[j] -= 4; }`).
    for m in range(32):
        hm = 0
        for b in range(8):
            j = 32 * b + m
            h = np.int64(L[j] > 3)
            hm |= h << b
            L[j] -= 4 * h
        out[hmo + m] = hm
    _pack_2bit(L, out, qso)


@nb.njit(**JIT)
def _dq_q3_k_row(b, yr, qk):
    """dequantize_row_q3_K: dl * (((q >> shift) & 3) - (hmask bit ? 0 : 4)), 16 values per scale."""
    sub = qk // 16  # run-time trip count (see DEQUANTIZER LOOPS)
    for i in range(yr.size // QK_K):
        bo = i * Q3_K_BYTES
        d_all = fp16_to_fp32(get_u16(b, bo + 108))
        for s in range(16):
            # C order as Q2_K; the hmask bit m moves one place per shift, across both halves.
            dl = d_all * F32(_q3_k_scale(b, bo + 96, s))
            q = bo + 32 + 32 * (s // 8) + 16 * (s % 2)
            hm = bo + 16 * (s % 2)
            shift = 2 * ((s // 2) % 4)
            mbit = s // 2
            yo = i * QK_K + 16 * s
            for l in range(sub):
                lo = (np.int32(b[q + l]) >> shift) & 3
                minus4 = 4 - (((np.int32(b[hm + l]) >> mbit) & 1) << 2)
                yr[yo + l] = dl * F32(lo - minus4)


# ----------------------------------------------------------------------------- Q4_K / Q5_K


@nb.njit(**JIT)
def _put_scales_k4(out, so, Ls, Lm, clamp63):
    """6-bit scale/min packing of Q4_K/Q5_K (inverse of get_scale_min_k4). The values are
    uint8 as in C; clamp63 applies the MIN(63, .) that some callers do first."""
    for j in range(8):
        ls = np.int64(Ls[j])
        lm = np.int64(Lm[j])
        if clamp63:
            ls = min(63, ls)
            lm = min(63, lm)
        if j < 4:
            out[so + j] = ls
            out[so + j + 4] = lm
        else:
            out[so + j + 4] = ((ls & 0xF) | ((lm & 0xF) << 4)) & 0xFF
            out[so + j - 4] = (np.int64(out[so + j - 4]) | ((ls >> 4) << 6)) & 0xFF
            out[so + j] = (np.int64(out[so + j]) | ((lm >> 4) << 6)) & 0xFF


_f32a, _u8a = nb.types.float32[::1], nb.types.uint8[::1]
_i64, _b = nb.types.int64, nb.types.boolean


# Explicit signature: one compiled version for both nmax values (Q4_K and Q5_K).
_SIG_Q45_LEVELS = nb.types.void(
    _f32a, _i64, _f32a, _b, _i64, _u8a, _i64, _u8a, _u8a, _f32a, _f32a, _f32a, _f32a, _u8a, _u8a, _f32a
)


@nb.njit(_SIG_Q45_LEVELS, **JIT)
def _q45_k_levels(x, xo, qw, use_qw, nmax, out, oo, L, Laux, weights, scales, mins, sw, Ls, Lm, work):
    """Levels L (0..nmax) and d/dmin/scales[12] of one Q4_K (nmax 15) or Q5_K (nmax 31)
    super-block, written to out[oo:oo+16]. Ports the shared part of
    quantize_row_q{4,5}_K_ref (use_qw False) and quantize_row_q{4,5}_K_impl."""
    so = oo + 4
    if not use_qw:
        if nmax == 15:
            rmin, rdelta, nstep = Q4_K_REF_RMIN, Q4_K_REF_RDELTA, Q4_K_REF_NSTEP
        else:
            rmin, rdelta, nstep = Q5_K_REF_RMIN, Q5_K_REF_RDELTA, Q5_K_REF_NSTEP
        max_scale = F32(0.0)
        max_min = F32(0.0)
        for j in range(8):
            av_x = np.sqrt(_sum_sq(x, xo + 32 * j, 32) / F32(32.0))
            for l in range(32):
                weights[l] = av_x + abs(x[xo + 32 * j + l])
            s, m = make_qkx2_quants(32, nmax, x, xo + 32 * j, weights, 0, L, 32 * j, Laux,
                                    rmin, rdelta, nstep, False, work)
            scales[j] = s
            mins[j] = m
            if s > max_scale:
                max_scale = s
            if m > max_min:
                max_min = m
        inv_scale = F32(63.0) / max_scale if max_scale > F32(0.0) else F32(0.0)
        inv_min = F32(63.0) / max_min if max_min > F32(0.0) else F32(0.0)
        for j in range(8):
            # uint8_t ls = nearest_int(...): the uint8 wrap happens before MIN(63, ls)
            Ls[j] = nearest_int(inv_scale * scales[j]) & 0xFF
            Lm[j] = nearest_int(inv_min * mins[j]) & 0xFF
        _put_scales_k4(out, so, Ls, Lm, True)
        put_u16(out, oo, fp32_to_fp16(max_scale / F32(63.0)))
        put_u16(out, oo + 2, fp32_to_fp16(max_min / F32(63.0)))
    else:
        sigma2 = F32(2.0) * _sum_sq(x, xo, QK_K) / F_QK_K
        for j in range(8):
            qo = xo + 32 * j
            for l in range(32):
                v = x[xo + 32 * j + l]
                weights[l] = qw[qo + l] * np.sqrt(sigma2 + v * v)
            s = F32(0.0)
            for l in range(32):
                s += weights[l]
            sw[j] = s
            sc, m = make_qkx3_quants(32, nmax, x, xo + 32 * j, weights, 0, True, L, 32 * j, Laux,
                                     IMPL_RMIN, IMPL_RDELTA, IMPL_NSTEP, False, work)
            scales[j] = sc
            mins[j] = m
        d_block = make_qp_quants(8, 63, scales, 0, Ls, 0, sw, 0, work)
        m_block = make_qp_quants(8, 63, mins, 0, Lm, 0, sw, 0, work)
        # quantize_row_q5_K_impl clamps with MIN(63, .); quantize_row_q4_K_impl does not.
        _put_scales_k4(out, so, Ls, Lm, nmax == 31)
        put_u16(out, oo, fp32_to_fp16(d_block))
        put_u16(out, oo + 2, fp32_to_fp16(m_block))
    dh = fp16_to_fp32(get_u16(out, oo))
    dmh = fp16_to_fp32(get_u16(out, oo + 2))
    for j in range(8):
        sc, m = get_scale_min_k4(j, out, so)
        d = dh * F32(sc)
        if d == F32(0.0):
            continue
        dm = dmh * F32(m)
        for ii in range(32):
            l = nearest_int((x[xo + 32 * j + ii] + dm) / d)
            L[32 * j + ii] = max(0, min(nmax, l))


@nb.njit(**JIT)
def _q4_k_pack(L, out, oo):
    """qs of Q4_K: per 64-group, byte l holds L[l] (low nibble) and L[l+32] (high nibble)."""
    q = oo + 16
    for j in range(0, QK_K, 64):
        for l in range(32):
            out[q + l] = np.int64(L[j + l]) | (np.int64(L[j + l + 32]) << 4)
        q += 32


@nb.njit(**JIT)
def _q5_k_pack(L, out, oo):
    """qh/qs of Q5_K (quantize_row_q5_K_ref): bit 4 of L[64g+j] and L[64g+j+32] go to qh[j]
    bits 2g and 2g+1, the low nibbles to qs as in Q4_K."""
    qh = oo + 16
    ql = oo + 48
    for k in range(32):
        out[qh + k] = 0
    m1 = 1
    m2 = 2
    for nn in range(0, QK_K, 64):
        for j in range(32):
            l1 = np.int64(L[nn + j])
            if l1 > 15:
                l1 -= 16
                out[qh + j] = np.int64(out[qh + j]) | m1
            l2 = np.int64(L[nn + j + 32])
            if l2 > 15:
                l2 -= 16
                out[qh + j] = np.int64(out[qh + j]) | m2
            out[ql + j] = (l1 | (l2 << 4)) & 0xFF
        m1 <<= 2
        m2 <<= 2
        ql += 32


@nb.njit(**JIT)
def _dq_q4_k_row(b, yr, qk):
    """dequantize_row_q4_K: 64 values per 32 bytes, d1 * lo - m1 then d2 * hi - m2."""
    n32 = qk // 8  # run-time trip count (see DEQUANTIZER LOOPS)
    for i in range(yr.size // QK_K):
        bo = i * Q4_K_BYTES
        d = fp16_to_fp32(get_u16(b, bo))
        dmin = fp16_to_fp32(get_u16(b, bo + 2))
        for j in range(4):
            sc, m = get_scale_min_k4(2 * j, b, bo + 4)
            d1 = d * F32(sc)
            m1 = dmin * F32(m)
            sc, m = get_scale_min_k4(2 * j + 1, b, bo + 4)
            d2 = d * F32(sc)
            m2 = dmin * F32(m)
            q = bo + 16 + 32 * j
            yo = i * QK_K + 64 * j
            for l in range(n32):
                v = np.int32(b[q + l])
                yr[yo + l] = d1 * F32(v & 0xF) - m1
                yr[yo + 32 + l] = d2 * F32(v >> 4) - m2


@nb.njit(**JIT)
def _dq_q5_k_row(b, yr, qk):
    """dequantize_row_q5_K: as Q4_K plus a 5th bit from qh (bits 2j and 2j+1 for group j)."""
    n32 = qk // 8  # run-time trip count (see DEQUANTIZER LOOPS)
    for i in range(yr.size // QK_K):
        bo = i * Q5_K_BYTES
        d = fp16_to_fp32(get_u16(b, bo))
        dmin = fp16_to_fp32(get_u16(b, bo + 2))
        for j in range(4):
            sc, m = get_scale_min_k4(2 * j, b, bo + 4)
            d1 = d * F32(sc)
            m1 = dmin * F32(m)
            sc, m = get_scale_min_k4(2 * j + 1, b, bo + 4)
            d2 = d * F32(sc)
            m2 = dmin * F32(m)
            ql = bo + 48 + 32 * j
            yo = i * QK_K + 64 * j
            for l in range(n32):
                v = np.int32(b[ql + l])
                h = np.int32(b[bo + 16 + l]) >> (2 * j)  # C: qh[l] & u1 (u1 = 1 << 2j), & u2 (u2 = 2u1)
                yr[yo + l] = d1 * F32((v & 0xF) | ((h & 1) << 4)) - m1
                yr[yo + 32 + l] = d2 * F32((v >> 4) | ((h & 2) << 3)) - m2


# ----------------------------------------------------------------------------- Q6_K


@nb.njit(**JIT)
def _q6_k_block(x, xo, qw, use_qw, out, oo, L, scales, work, lbuf):
    """One super-block: quantize_row_q6_K_ref / quantize_row_q6_K_impl. They are the same code
    except that the impl passes the raw imatrix slice to make_qx_quants as weights (no sigma2
    formula); without it the weights are x*x (make_qx_quants rmse_type 1, qw NULL)."""
    qlo, qho, so, do_ = oo, oo + 128, oo + 192, oo + 208
    max_scale = F32(0.0)
    max_abs_scale = F32(0.0)
    for ib in range(16):
        s = make_qx_quants(16, 32, x, xo + 16 * ib, L, 16 * ib, 1, qw, xo + 16 * ib, use_qw, work, lbuf)
        scales[ib] = s
        a = abs(s)
        if a > max_abs_scale:
            max_abs_scale = a
            max_scale = s
    if max_abs_scale < GROUP_MAX_EPS:
        for k in range(Q6_K_BYTES):
            out[oo + k] = 0
        put_u16(out, do_, fp32_to_fp16(F32(0.0)))
        return
    iscale = F32(-128.0) / max_scale
    put_u16(out, do_, fp32_to_fp16(F32(1.0) / iscale))
    for ib in range(16):
        out[so + ib] = min(127, nearest_int(iscale * scales[ib])) & 0xFF  # stored as int8
    dh = fp16_to_fp32(get_u16(out, do_))
    for j in range(16):
        d = dh * F32(as_int8(out[so + j]))
        if d == F32(0.0):
            continue
        for ii in range(16):
            l = nearest_int(x[xo + 16 * j + ii] / d)
            L[16 * j + ii] = max(-32, min(31, l)) + 32
    ql = qlo
    qh = qho
    for j in range(0, QK_K, 128):
        for l in range(32):
            a = np.int64(L[j + l])
            b = np.int64(L[j + l + 32])
            c = np.int64(L[j + l + 64])
            e = np.int64(L[j + l + 96])
            out[ql + l] = ((a & 0xF) | ((c & 0xF) << 4)) & 0xFF
            out[ql + l + 32] = ((b & 0xF) | ((e & 0xF) << 4)) & 0xFF
            out[qh + l] = ((a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6)) & 0xFF
        ql += 64
        qh += 32


@nb.njit(**JIT)
def _dq_q6_k_row(b, yr, qk):
    """dequantize_row_q6_K: y = d * sc[is] * q (left to right, so (d * sc) first), q in -32..31."""
    sub = qk // 16  # run-time trip count (see DEQUANTIZER LOOPS)
    sc8 = b.view(np.int8)
    for i in range(yr.size // QK_K):
        bo = i * Q6_K_BYTES
        d = fp16_to_fp32(get_u16(b, bo + 208))
        for half in range(2):  # C: y += 128, ql += 64, qh += 32, sc += 8
            ql = bo + 64 * half
            qh = bo + 128 + 32 * half
            sc = bo + 192 + 8 * half
            for is_ in range(2):  # C: is = l / 16 inside the l loop, split into two loops here
                d1 = d * F32(sc8[sc + is_])
                d2 = d * F32(sc8[sc + is_ + 2])
                d3 = d * F32(sc8[sc + is_ + 4])
                d4 = d * F32(sc8[sc + is_ + 6])
                o = 16 * is_
                yo = i * QK_K + 128 * half + o
                for l in range(sub):
                    l0 = np.int32(b[ql + o + l])
                    l32 = np.int32(b[ql + o + l + 32])
                    h = np.int32(b[qh + o + l])
                    yr[yo + l] = d1 * F32(((l0 & 0xF) | ((h & 3) << 4)) - 32)
                    yr[yo + l + 32] = d2 * F32(((l32 & 0xF) | (((h >> 2) & 3) << 4)) - 32)
                    yr[yo + l + 64] = d3 * F32(((l0 >> 4) | (((h >> 4) & 3) << 4)) - 32)
                    yr[yo + l + 96] = d4 * F32(((l32 >> 4) | (((h >> 6) & 3) << 4)) - 32)


# ----------------------------------------------------------------------------- kernels

# One parallel kernel per direction for the whole family, dispatching on the GGML type id:
# numba re-optimizes every callee linked into each parallel kernel, so one kernel per type
# multiplied the cold compile time. Rows are independent (prange over rows, scratch allocated
# once per row), so the bytes do not depend on the thread count.
Q2_K_ID, Q3_K_ID, Q4_K_ID, Q5_K_ID, Q6_K_ID = (int(t) for t in (_T.Q2_K, _T.Q3_K, _T.Q4_K, _T.Q5_K, _T.Q6_K))


@nb.njit(parallel=True, **JIT)
def _quantize_kquants(x, qw, use_qw, out, type_id):
    nrows, n = x.shape
    for r in nb.prange(nrows):
        L = np.empty(QK_K, np.uint8)
        L8 = np.empty(QK_K, np.int8)
        Laux = np.empty(32, np.uint8)
        weights = np.empty(QK_K, np.float32)
        scales = np.empty(16, np.float32)
        mins = np.empty(16, np.float32)
        sw = np.empty(16, np.float32)
        Ls = np.empty(16, np.uint8)
        Lm = np.empty(16, np.uint8)
        Ls8 = np.empty(16, np.int8)
        work = np.empty(WORK_FLOATS, np.float32)
        lbuf = np.empty(WORK_INTS, np.int32)
        xr = x[r]
        orow = out[r]
        for i in range(n // QK_K):
            xo = i * QK_K
            if type_id == Q2_K_ID:
                _q2_k_block(xr, xo, qw, use_qw, orow, i * Q2_K_BYTES, L, Laux, weights, scales, mins, sw, Ls, Lm,
                            work)
            elif type_id == Q3_K_ID:
                _q3_k_block(xr, xo, qw, use_qw, orow, i * Q3_K_BYTES, L8, weights, scales, sw, Ls8, work, lbuf)
            elif type_id == Q4_K_ID:
                oo = i * Q4_K_BYTES
                _q45_k_levels(xr, xo, qw, use_qw, 15, orow, oo, L, Laux, weights, scales, mins, sw, Ls, Lm, work)
                _q4_k_pack(L, orow, oo)
            elif type_id == Q5_K_ID:
                oo = i * Q5_K_BYTES
                _q45_k_levels(xr, xo, qw, use_qw, 31, orow, oo, L, Laux, weights, scales, mins, sw, Ls, Lm, work)
                _q5_k_pack(L, orow, oo)
            else:
                _q6_k_block(xr, xo, qw, use_qw, orow, i * Q6_K_BYTES, L8, scales, work, lbuf)


@nb.njit(parallel=True, **JIT)
def _dequantize_kquants(data, y, type_id, qk):
    for r in nb.prange(y.shape[0]):
        if type_id == Q2_K_ID:
            _dq_q2_k_row(data[r], y[r], qk)
        elif type_id == Q3_K_ID:
            _dq_q3_k_row(data[r], y[r], qk)
        elif type_id == Q4_K_ID:
            _dq_q4_k_row(data[r], y[r], qk)
        elif type_id == Q5_K_ID:
            _dq_q5_k_row(data[r], y[r], qk)
        else:
            _dq_q6_k_row(data[r], y[r], qk)


# ----------------------------------------------------------------------------- registry


_NO_QW = np.empty(0, dtype=np.float32)


def row_quantizer(kernel, qtype):
    block, type_size = GGML_QUANT_SIZES[qtype]

    def quantize(x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        nrows, n_per_row = x.shape
        if n_per_row % block:
            raise ValueError(f"{qtype.name}: n_per_row={n_per_row} is not a multiple of {block}")
        out = np.empty((nrows, n_per_row // block * type_size), dtype=np.uint8)
        if imatrix is None:
            kernel(x, _NO_QW, False, out, int(qtype))
        else:
            qw = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
            if qw.size != n_per_row:
                raise ValueError(f"{qtype.name}: imatrix has {qw.size} values, expected {n_per_row}")
            kernel(x, qw, True, out, int(qtype))
        return out

    quantize.__name__ = f"quantize_{qtype.name.lower()}"
    return quantize


def row_dequantizer(kernel, qtype):
    block, type_size = GGML_QUANT_SIZES[qtype]

    def dequantize(data: np.ndarray, n_per_row: int) -> np.ndarray:
        data = np.ascontiguousarray(data, dtype=np.uint8)
        n_per_row = int(n_per_row)
        if n_per_row % block:
            raise ValueError(f"{qtype.name}: n_per_row={n_per_row} is not a multiple of {block}")
        data = data.reshape(-1, n_per_row // block * type_size)
        y = np.empty((data.shape[0], n_per_row), dtype=np.float32)
        kernel(data, y, int(qtype), block)  # block: run-time trip counts (see DEQUANTIZER LOOPS)
        return y

    dequantize.__name__ = f"dequantize_{qtype.name.lower()}"
    return dequantize


_KQUANTS = (_T.Q2_K, _T.Q3_K, _T.Q4_K, _T.Q5_K, _T.Q6_K)
QUANTIZE = {t: row_quantizer(_quantize_kquants, t) for t in _KQUANTS}
DEQUANTIZE = {t: row_dequantizer(_dequantize_kquants, t) for t in _KQUANTS}
