"""Small-block types: ternary TQ1_0 / TQ2_0, the FP4 types MXFP4 / NVFP4, and the sign / 2-bit
types Q1_0 / Q2_0: quantize and dequantize, bit-exact with ggml.

Ports of ggml-quants.c: `quantize_row_{tq1_0, tq2_0, mxfp4, nvfp4, q1_0, q2_0}_ref` (what
`ggml_quantize_chunk` runs for these types: none of them reads the importance matrix;
quantize_q1_0 / quantize_q2_0 take a per-row path when given one, with the same result) and
`dequantize_row_*` (block layouts: ggml-common.h):

    TQ1_0  256 values, 54 B: qs[48] (5 trits per byte) | qh[4] (4 trits per byte) | d fp16
    TQ2_0  256 values, 66 B: qs[64] (4 x 2-bit codes per byte) | d fp16
    MXFP4   32 values, 17 B: e (E8M0 exponent) | qs[16] (E2M1 nibbles: low half, then high half)
    NVFP4   64 values, 36 B: d[4] (UE4M3 scale per 16 values) | qs[32] (E2M1 nibbles per 16)
    Q1_0   128 values, 18 B: d fp16 | qs[16] (one sign bit per value: +d or -d)
    Q2_0    64 values, 18 B: d fp16 | qs[16] (2-bit codes q, value (q - 1) * d)

Q2_0 (GGML_TYPE_Q2_0 = 42) is in the vendored ggml but not in gguf 0.19.0's
GGMLQuantizationType, so it has no registry entry (ggquant.quant.types is keyed by that enum and
gguf-py cannot read or write such tensors); its kernels are here, keyed by Q2_0_ID, and tested
against ggml all the same.

Tables come from gguf-py where it has them (kvalues and the E8M0 decoding of MXFP4); the UE4M3
decoding of NVFP4 (ggml-impl.h ggml_ue4m3_to_fp32, not in gguf-py 0.19) is computed below for all
256 codes, exactly (ldexpf of small integers).
"""

import numba as nb
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, QK_K
from gguf import quants as gq

from ..common import F32, JIT, dequantize_buffers, f32_bits, fp16_to_fp32, get_u16
from ..qsearch import c_f32_to_int_lowbyte, c_roundf, fp32_to_fp16, put_u16

T = GGMLQuantizationType

# ggml-common.h kvalues_mxfp4 (e2m1 values doubled), from gguf-py MXFP4.kvalues.
KVALUES_MXFP4 = np.array(gq.MXFP4.kvalues, dtype=np.float32)  # [16]
# ggml-impl.h ggml_e8m0_to_fp32_half for every byte (0 and 1 give the denormals 2^-128, 2^-127;
# 255 gives 2^127, ggml does not special-case NaN), from gguf-py MXFP4.e8m0_to_fp32_half.
E8M0_TO_FP32_HALF = np.ascontiguousarray(
    gq.MXFP4.e8m0_to_fp32_half(np.arange(256, dtype=np.uint8)), dtype=np.float32
)  # [256]

# ggml-quants.c dequantize_row_tq1_0: pow3 = {1, 3, 9, 27, 81, 243}; gguf-py only has these
# inline, so the five used are spelled out here.
TQ1_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.int32)

TQ1_BYTES = GGML_QUANT_SIZES[T.TQ1_0][1]  # qs[48] | qh[QK_K/64] | d
TQ1_QS = (QK_K - 4 * QK_K // 64) // 5
TQ1_QH = QK_K // 64
TQ1_WIDE = TQ1_QS - TQ1_QS % 32  # qs[0:32] is read in runs of 32, the rest (qs[32:48]) in runs of 16
TQ1_NARROW = TQ1_QS - TQ1_WIDE
TQ1_QH_POW3 = np.repeat(TQ1_POW3[:4], TQ1_QH).astype(np.int32)  # qh's 4 passes of 4 bytes, as 16 values
TQ2_BYTES = GGML_QUANT_SIZES[T.TQ2_0][1]  # qs[QK_K/4] | d
TQ2_RUN = 32  # dequantize_row_tq2_0 reads qs in runs of 32 bytes, each 4 times (2 bits each)
MXFP4_BLOCK, MXFP4_BYTES = GGML_QUANT_SIZES[T.MXFP4]  # e | qs[16]


# ggml-impl.h ggml_ue4m3_to_fp32 for every byte: 0 and 0x7F are 0; exponent (x >> 3) & 0xF with
# bias 7 (0: subnormal man * 2^-9); the result is halved like kvalues_mxfp4 is doubled.
def _ue4m3_table():
    t = np.zeros(256, dtype=np.float32)
    for x in range(256):
        if x in (0, 0x7F):
            continue
        e, m = (x >> 3) & 0xF, x & 7
        raw = np.ldexp(np.float32(m), -9) if e == 0 else np.ldexp(np.float32(1.0 + m / 8.0), e - 7)
        t[x] = np.float32(raw) * np.float32(0.5)
    return t


UE4M3_TO_FP32_HALF = _ue4m3_table()  # [256]
NVFP4_BLOCK, NVFP4_BYTES = GGML_QUANT_SIZES[T.NVFP4]  # d[4] | qs[32]
NVFP4_SUB = 16  # QK_NVFP4_SUB: values per UE4M3 scale
NVFP4_NSUB = NVFP4_BLOCK // NVFP4_SUB
Q1_0_BLOCK, Q1_0_BYTES = GGML_QUANT_SIZES[T.Q1_0]  # d | qs[16]
# GGML_TYPE_Q2_0 (ggml.h) and its block (ggml-common.h QK2_0 = 64, block_q2_0 = d | qs[16]):
# not in gguf 0.19.0's tables, so spelled out here.
Q2_0_ID = 42
Q2_0_BLOCK, Q2_0_BYTES = 64, 18
_F0, _F1 = F32(0.0), F32(1.0)
_I63 = F32(9.223372036854775808e18)  # 2**63
_I31 = F32(2147483648.0)  # 2**31


@nb.njit(cache=True, inline="always")
def _trit(byte, pow3):
    """ggml-quants.c dequantize_row_tq1_0: q = (uint8)(byte * pow3[n]); xi = (q * 3) >> 8; value xi - 1.

    numba types int32 arithmetic as int64; the explicit int32 before the float conversion lets
    LLVM narrow the whole chain to 32-bit lanes and convert with vcvtdq2ps (an int64 -> float32
    conversion is half as wide on AVX-512 and does not vectorize on AVX2).
    """
    q = (np.int32(byte) * pow3) & np.int32(0xFF)  # the uint8 wrap of the C
    return F32(np.int32(((q * np.int32(3)) >> np.int32(8)) - np.int32(1)))


@nb.njit(cache=True)
def _row_tq1_0(src, y, pow3, narrow, qh_pow3):
    """ggml-quants.c dequantize_row_tq1_0: base-3 digits packed 5 per byte (4 per qh byte), read by q*3 >> 8.

    narrow (TQ1_NARROW = 16) and qh_pow3 (TQ1_QH_POW3) are constants passed at run time on purpose
    (see _row_tq2_0): with constant bounds LLVM unrolls the 16- and 4-byte passes into scalar
    code; with opaque ones it vectorizes them. The four qh passes (4 bytes each) run as one
    loop of 16 values, value k from qh[k % 4] and pow3[k // 4], the C's order of outputs.
    """
    for i in range(src.size // TQ1_BYTES):
        b = i * TQ1_BYTES
        d = fp16_to_fp32(get_u16(src, b + TQ1_QS + TQ1_QH))
        o = i * QK_K
        # qs[0:32]: five passes of 32 (one trit per power of 3), then qs[32:48]: five of 16
        for n in range(5):
            p = np.int32(pow3[n])
            for m in range(TQ1_WIDE):
                y[o + m] = _trit(src[b + m], p) * d
            o += TQ1_WIDE
        for n in range(5):
            p = np.int32(pow3[n])
            for m in range(narrow):
                y[o + m] = _trit(src[b + TQ1_WIDE + m], p) * d
            o += TQ1_QS - TQ1_WIDE
        # qh: four passes over its 4 bytes
        for k in range(qh_pow3.size):
            y[o + k] = _trit(src[b + TQ1_QS + k % TQ1_QH], qh_pow3[k]) * d


@nb.njit(cache=True)
def _row_tq2_0(src, y, run):
    """ggml-quants.c dequantize_row_tq2_0: 2-bit codes q, value (q - 1) * d (int32: see _trit).

    run is always TQ2_RUN (32, the C's inner loop length) but arrives as a run-time argument
    on purpose: with a constant bound LLVM fully unrolls the m loop into scalar code (no alias
    information between y and src); with an opaque bound it keeps the loop and vectorizes it
    behind a run-time alias check (measured 3.3 -> 11.9 GB/s on one core). Only the m loop
    bound may be opaque: an opaque step on the j loop loses the vectorization again.
    """
    for i in range(src.size // TQ2_BYTES):
        b = i * TQ2_BYTES
        d = fp16_to_fp32(get_u16(src, b + QK_K // 4))
        o = i * QK_K
        for j in range(0, QK_K // 4, TQ2_RUN):
            for l in range(4):
                for m in range(run):
                    q = (np.int32(src[b + j + m]) >> np.int32(2 * l)) & np.int32(3)
                    y[o + m] = F32(np.int32(q - np.int32(1))) * d
                o += TQ2_RUN


@nb.njit(cache=True)
def _row_mxfp4(src, y, kvalues, e8m0_half):
    """ggml-quants.c dequantize_row_mxfp4: e2m1 nibbles (low half, then high half) times e8m0/2."""
    half = MXFP4_BLOCK // 2
    for i in range(src.size // MXFP4_BYTES):
        b = i * MXFP4_BYTES
        d = e8m0_half[src[b]]
        o = i * MXFP4_BLOCK
        for j in range(half):
            q = src[b + 1 + j]
            y[o + j] = kvalues[q & 0x0F] * d
            y[o + j + half] = kvalues[q >> 4] * d


@nb.njit(parallel=True, cache=True)
def _deq_tq1_0(data, out, pow3, narrow, qh_pow3):
    for r in nb.prange(data.shape[0]):
        _row_tq1_0(data[r], out[r], pow3, narrow, qh_pow3)


@nb.njit(parallel=True, cache=True)
def _deq_tq2_0(data, out, run):
    for r in nb.prange(data.shape[0]):
        _row_tq2_0(data[r], out[r], run)


@nb.njit(parallel=True, cache=True)
def _deq_mxfp4(data, out, kvalues, e8m0_half):
    for r in nb.prange(data.shape[0]):
        _row_mxfp4(data[r], out[r], kvalues, e8m0_half)



@nb.njit(**JIT)
def _row_nvfp4(src, y, kvalues, ue4m3_half):
    """ggml-quants.c dequantize_row_nvfp4: per 16 values, E2M1 nibbles (low 8, then high 8) times
    the sub-block's UE4M3 scale (halved)."""
    half = NVFP4_SUB // 2
    for i in range(src.size // NVFP4_BYTES):
        b = i * NVFP4_BYTES
        for s in range(NVFP4_NSUB):
            d = ue4m3_half[src[b + s]]
            o = i * NVFP4_BLOCK + s * NVFP4_SUB
            for j in range(half):
                q = src[b + NVFP4_NSUB + s * half + j]
                y[o + j] = kvalues[q & 0x0F] * d
                y[o + j + half] = kvalues[q >> 4] * d


@nb.njit(**JIT)
def _row_q1_0(src, y):
    """ggml-quants.c dequantize_row_q1_0: bit j set -> d, clear -> -d."""
    for i in range(src.size // Q1_0_BYTES):
        b = i * Q1_0_BYTES
        d = fp16_to_fp32(get_u16(src, b))
        o = i * Q1_0_BLOCK
        for j in range(Q1_0_BLOCK):
            y[o + j] = d if (src[b + 2 + j // 8] >> (j % 8)) & 1 else -d


@nb.njit(**JIT)
def _row_q2_0(src, y):
    """ggml-quants.c dequantize_row_q2_0: ((int)q - 1) * d for the 2-bit code q."""
    for i in range(src.size // Q2_0_BYTES):
        b = i * Q2_0_BYTES
        d = fp16_to_fp32(get_u16(src, b))
        o = i * Q2_0_BLOCK
        for j in range(Q2_0_BLOCK):
            q = (np.int32(src[b + 2 + j // 4]) >> np.int32(2 * (j % 4))) & np.int32(3)
            y[o + j] = F32(q - np.int32(1)) * d


# ---------------------------------------------------------------------------------------------
# Quantizers (ggml-quants.c quantize_row_*_ref)
# ---------------------------------------------------------------------------------------------

@nb.njit(**JIT)
def _lround_plus1(v):
    """C `int xi = lroundf(v) + 1`: round half away from zero; glibc returns (long)v beyond the
    long range and for NaN, i.e. LONG_MIN, whose + 1 truncated to int is 1."""
    if not abs(v) < _I63:
        return 1
    return np.int64(c_roundf(v)) + 1


@nb.njit(**JIT)
def _abs_max_amax(x, xo, n):
    """amax = MAX(amax, fabsf(v)) over x[xo:xo+n] (MAX(a, b) = a > b ? a : b)."""
    amax = _F0
    for j in range(n):
        a = abs(x[xo + j])
        amax = amax if amax > a else a
    return amax


@nb.njit(**JIT)
def _tq_scale(x, xo, out, dpos):
    amax = _abs_max_amax(x, xo, QK_K)
    d = amax
    put_u16(out, dpos, fp32_to_fp16(d))
    return _F1 / d if d != _F0 else _F0


@nb.njit(**JIT)
def _tq1_byte(x, xo, stride, ntrits, idv):
    """ntrits base-3 digits (MSB first: q = 3*q + xi, in uint8), scaled to a byte by the ceiling
    division q*256/243 (qh bytes get a trailing zero trit first)."""
    q = 0
    for n in range(ntrits):
        xi = _lround_plus1(x[xo + n * stride] * idv)
        q = (q * 3) & 0xFF
        q = (q + xi) & 0xFF
    if ntrits == 4:
        q = (q * 3) & 0xFF
    return ((q * 256 + (243 - 1)) // 243) & 0xFF


@nb.njit(**JIT)
def _quantize_tq1_0_row(x, out):
    for i in range(x.size // QK_K):
        xo = i * QK_K
        b = i * TQ1_BYTES
        idv = _tq_scale(x, xo, out, b + TQ1_QS + TQ1_QH)
        for m in range(TQ1_WIDE):  # qs[0:32]: values xo + m + n*32, n = 0..4
            out[b + m] = _tq1_byte(x, xo + m, TQ1_WIDE, 5, idv)
        xo += 5 * TQ1_WIDE
        for m in range(TQ1_QS - TQ1_WIDE):  # qs[32:48]: strides of 16
            out[b + TQ1_WIDE + m] = _tq1_byte(x, xo + m, TQ1_QS - TQ1_WIDE, 5, idv)
        xo += 5 * (TQ1_QS - TQ1_WIDE)
        for j in range(TQ1_QH):  # qh: 4 trits, stride 4
            out[b + TQ1_QS + j] = _tq1_byte(x, xo + j, TQ1_QH, 4, idv)


@nb.njit(**JIT)
def _quantize_tq2_0_row(x, out):
    for i in range(x.size // QK_K):
        xo = i * QK_K
        b = i * TQ2_BYTES
        idv = _tq_scale(x, xo, out, b + QK_K // 4)
        for j in range(0, QK_K // 4, 32):
            for m in range(32):
                q = 0
                for n in range(4):
                    xi = _lround_plus1(x[xo + m + n * 32] * idv)
                    q = (q + ((xi & 3) << (2 * n))) & 0xFF
                out[b + j + m] = q
            xo += 4 * 32


@nb.njit(**JIT)
def _fp4_indices(x, xo, n, e, kvalues, best, err_buf):
    """best[0:n] = ggml-quants.c best_index_mxfp4(x[xo + j], e) for j < n: the first level with
    the least |kvalues[i]*e - x|, computed candidate by candidate over all n values at once (the
    same compares per value, in the same candidate order; vectorizes).

    kvalues_mxfp4 is 0, 1, 2, 3, 4, 6, 8, 12 (indices 0..7) then 0, -1, ..., -12 (8..15). For
    x >= 0 no negative level is ever strictly closer than its positive twin, and ties go to the
    lower index, so only 0..7 can win; for x < 0 only 0 and 9..15 (index 8, the second zero,
    always ties with 0): the same index as the C's full scan, in half the work. The negative
    levels are exact negations of the positive ones (fl(-v*e) = -fl(v*e)). A NaN x compares
    false everywhere and gets 0, as in the C."""
    c0 = kvalues[0] * e
    for j in range(n):
        best[j] = 0
        err_buf[j] = abs(c0 - x[xo + j])
    for i in range(1, 8):
        c = kvalues[i] * e
        for j in range(n):
            xj = x[xo + j]
            pos = xj >= _F0
            err = abs((c if pos else -c) - xj)
            better = err < err_buf[j]
            best[j] = (i if pos else 8 + i) if better else best[j]
            err_buf[j] = err if better else err_buf[j]


# The MXFP4 scale d = 2^(e-128) (E8M0 halved) for which _mxfp4_index holds: the half-levels
# 0.5*d and the levels up to 12*d are normal floats and finite.
_MXFP4_D_MIN = F32(2.0 ** -125)
_MXFP4_D_MAX = F32(2.0 ** 123)
# Midpoints between consecutive positive levels 0, 1, 2, 3, 4, 6, 8, 12 (kvalues_mxfp4[0:8])
_M0, _M1, _M2, _M3, _M4, _M5, _M6 = F32(0.5), F32(1.5), F32(2.5), F32(3.5), F32(5.0), F32(7.0), F32(10.0)


@nb.njit(inline="always", **JIT)
def _mxfp4_index(x, d):
    """best_index_mxfp4(x, d) without the scan, for a block whose amax < 16*d and
    _MXFP4_D_MIN <= d <= _MXFP4_D_MAX (what the quantizer's exponent gives every finite amax
    of normal range): the number of midpoints between consecutive levels that |x| is strictly
    above, plus 8 for a negative x off level 0.

    Why it is the C's index. The levels c_k = kvalues[k]*d are exact, as are the midpoints.
    |x| < 16*d, so for the two levels around |x| (consecutive, ratio <= 2, or 0 and d) both
    errors |c - |x|| are exact (Sterbenz; |x| itself for c = 0) and every other level is at
    least d further away, far more than float32 rounding of a value below 16*d can close: the
    C's rounded errors fall strictly, then (after at most one tie) rise strictly. So its first
    least error is the upper of the two levels iff that error is exactly smaller, i.e. iff
    |x| > their midpoint; at the midpoint the tie goes to the lower index, as the C's strict <
    does. For x < 0 the negative levels (9..15, exact negations) mirror the positive ones,
    index 8 (-0) ties with 0 and loses; a NaN x is above no midpoint and gets 0, as in the C.
    """
    a = abs(x)
    k = ((np.int32(a > _M0 * d) + np.int32(a > _M1 * d)) + (np.int32(a > _M2 * d) + np.int32(a > _M3 * d))
         + (np.int32(a > _M4 * d) + np.int32(a > _M5 * d)) + np.int32(a > _M6 * d))
    return k + np.int32(8) if (x < _F0 and k > 0) else k


@nb.njit(**JIT)
def _quantize_mxfp4_row(x, out, kvalues, e8m0_half):
    half = MXFP4_BLOCK // 2
    best = np.empty(MXFP4_BLOCK, np.int32)
    err_buf = np.empty(MXFP4_BLOCK, np.float32)
    for i in range(x.size // MXFP4_BLOCK):
        xo = i * MXFP4_BLOCK
        b = i * MXFP4_BYTES
        amax = _F0
        for j in range(MXFP4_BLOCK):
            a = abs(x[xo + j])
            amax = a if amax < a else amax  # C: if (amax < fabsf(v)) amax = fabsf(v)
        # (uint8_t)(floorf(log2f(amax)) - 2 + 127), in float; log2f from the same libm as ggml's
        e = c_f32_to_int_lowbyte(np.floor(np.log2(amax)) - F32(2) + F32(127)) if amax > _F0 else 0
        out[b] = e
        d = e8m0_half[e]
        if d >= _MXFP4_D_MIN and d <= _MXFP4_D_MAX and amax < F32(16.0) * d:
            for j in range(half):
                lo = _mxfp4_index(x[xo + j], d)
                hi = _mxfp4_index(x[xo + half + j], d)
                out[b + 1 + j] = np.uint8(lo | (hi << np.int32(4)))
        else:  # denormal, huge or non-finite blocks: the C's scan as it is
            _fp4_indices(x, xo, MXFP4_BLOCK, d, kvalues, best, err_buf)
            for j in range(half):
                out[b + 1 + j] = best[j] | (best[half + j] << 4)


@nb.njit(**JIT)
def _fp32_to_ue4m3(x):
    """ggml-impl.h ggml_fp32_to_ue4m3: round to the nearest UE4M3 (ties up), saturating at 0x7E."""
    if not x > _F0:
        return 0
    if x > F32(448.0):
        x = F32(448.0)
    bits = np.int64(f32_bits(x))
    fp32_exp = ((bits >> 23) & 0xFF) - 127
    fp32_man = (bits >> 20) & 0x7
    ue_exp = fp32_exp + 7
    if ue_exp <= 0:
        man = np.int64(x * F32(512.0) + F32(0.5))  # positive: (int) truncates
        if man > 7:
            man = 7
        if man < 1:
            return 0
        return man
    if ue_exp >= 15:
        return 0x7E
    ue_man = fp32_man + ((bits >> 19) & 1)
    if ue_man > 7:
        ue_man = 0
        ue_exp += 1
        if ue_exp >= 15:
            return 0x7E
    return (ue_exp << 3) | ue_man


@nb.njit(**JIT)
def _quantize_nvfp4_row(x, out, kvalues, ue4m3_half):
    half = NVFP4_SUB // 2
    best = np.empty(NVFP4_SUB, np.int32)
    err_buf = np.empty(NVFP4_SUB, np.float32)
    for i in range(x.size // NVFP4_BLOCK):
        b = i * NVFP4_BYTES
        for s in range(NVFP4_NSUB):
            xo = i * NVFP4_BLOCK + s * NVFP4_SUB
            amax = _F0
            for j in range(NVFP4_SUB):
                a = abs(x[xo + j])
                amax = a if amax < a else amax
            ue = _fp32_to_ue4m3(amax / F32(6.0))
            out[b + s] = ue
            _fp4_indices(x, xo, NVFP4_SUB, ue4m3_half[ue], kvalues, best, err_buf)
            for j in range(half):
                out[b + NVFP4_NSUB + s * half + j] = best[j] | (best[half + j] << 4)


@nb.njit(**JIT)
def _quantize_q1_0_row(x, out):
    for i in range(x.size // Q1_0_BLOCK):
        xo = i * Q1_0_BLOCK
        b = i * Q1_0_BYTES
        sum_abs = _F0
        for j in range(Q1_0_BLOCK):
            sum_abs += abs(x[xo + j])
        put_u16(out, b, fp32_to_fp16(sum_abs / F32(Q1_0_BLOCK)))
        for j in range(Q1_0_BLOCK // 8):
            out[b + 2 + j] = 0
        for j in range(Q1_0_BLOCK):
            if x[xo + j] >= _F0:
                out[b + 2 + j // 8] |= np.uint8(1 << (j % 8))


@nb.njit(**JIT)
def _quantize_q2_0_row(x, out):
    for i in range(x.size // Q2_0_BLOCK):
        xo = i * Q2_0_BLOCK
        b = i * Q2_0_BYTES
        amax = _F0
        for j in range(Q2_0_BLOCK):
            a = abs(x[xo + j])
            if a > amax:
                amax = a
        d = amax
        idv = _F1 / d if d > _F0 else _F0
        put_u16(out, b, fp32_to_fp16(d))
        for j in range(Q2_0_BLOCK // 4):
            out[b + 2 + j] = 0
        for j in range(Q2_0_BLOCK):
            v = x[xo + j] * idv
            # (int)roundf(v) + 1, clamped to [0, 3]; out-of-range / NaN converts to INT_MIN (x86)
            q = np.int64(c_roundf(v)) + 1 if abs(v) < _I31 else -1
            q = max(0, min(3, q))
            out[b + 2 + j // 4] |= np.uint8(q << (2 * (j % 4)))


LOWBIT_IDS = TQ1_0_ID, TQ2_0_ID, MXFP4_ID, NVFP4_ID, Q1_0_ID = (
    int(T.TQ1_0), int(T.TQ2_0), int(T.MXFP4), int(T.NVFP4), int(T.Q1_0))


@nb.njit(parallel=True, **JIT)
def _quantize_lowbit(x, out, type_id, kvalues, e8m0_half, ue4m3_half):
    """One parallel kernel for the family (prange over rows, dispatch on the type id)."""
    for r in nb.prange(x.shape[0]):
        if type_id == TQ1_0_ID:
            _quantize_tq1_0_row(x[r], out[r])
        elif type_id == TQ2_0_ID:
            _quantize_tq2_0_row(x[r], out[r])
        elif type_id == MXFP4_ID:
            _quantize_mxfp4_row(x[r], out[r], kvalues, e8m0_half)
        elif type_id == NVFP4_ID:
            _quantize_nvfp4_row(x[r], out[r], kvalues, ue4m3_half)
        elif type_id == Q1_0_ID:
            _quantize_q1_0_row(x[r], out[r])
        else:
            _quantize_q2_0_row(x[r], out[r])


@nb.njit(parallel=True, **JIT)
def _dequantize_lowbit(data, out, type_id, kvalues, ue4m3_half):
    for r in nb.prange(data.shape[0]):
        if type_id == NVFP4_ID:
            _row_nvfp4(data[r], out[r], kvalues, ue4m3_half)
        elif type_id == Q1_0_ID:
            _row_q1_0(data[r], out[r])
        else:
            _row_q2_0(data[r], out[r])


# ---------------------------------------------------------------------------------------------
# Entry points: (x float32[n_rows, n_per_row], imatrix) -> uint8[n_rows, row_bytes], and back
# ---------------------------------------------------------------------------------------------

def _sizes(type_id):
    return (Q2_0_BLOCK, Q2_0_BYTES) if type_id == Q2_0_ID else GGML_QUANT_SIZES[T(type_id)]


def _name(type_id):
    return "Q2_0" if type_id == Q2_0_ID else T(type_id).name


def _prepare(type_id, data, n_per_row):
    return dequantize_buffers(_name(type_id), *_sizes(int(type_id)), data, n_per_row)


def _quantizer(type_id):
    def quantize(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        """ggml_quantize_chunk for this type: the imatrix is not used by ggml."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        block, type_size = _sizes(type_id)
        n_rows, n_per_row = x.shape
        if n_per_row % block:
            raise ValueError(f"{_name(type_id)}: n_per_row={n_per_row} is not a multiple of {block}")
        out = np.empty((n_rows, n_per_row // block * type_size), dtype=np.uint8)
        _quantize_lowbit(x, out, type_id, KVALUES_MXFP4, E8M0_TO_FP32_HALF, UE4M3_TO_FP32_HALF)
        return out

    quantize.__name__ = f"quantize_{_name(type_id).lower()}"
    return quantize


def _dequantizer(type_id):
    def dequantize(data, n_per_row):
        data, out = _prepare(type_id, data, n_per_row)
        _dequantize_lowbit(data, out, type_id, KVALUES_MXFP4, UE4M3_TO_FP32_HALF)
        return out

    dequantize.__name__ = f"dequantize_{_name(type_id).lower()}"
    return dequantize


def dequantize_tq1_0(data, n_per_row):
    data, out = _prepare(T.TQ1_0, data, n_per_row)
    _deq_tq1_0(data, out, TQ1_POW3, TQ1_NARROW, TQ1_QH_POW3)
    return out


def dequantize_tq2_0(data, n_per_row):
    data, out = _prepare(T.TQ2_0, data, n_per_row)
    _deq_tq2_0(data, out, TQ2_RUN)
    return out


def dequantize_mxfp4(data, n_per_row):
    data, out = _prepare(T.MXFP4, data, n_per_row)
    _deq_mxfp4(data, out, KVALUES_MXFP4, E8M0_TO_FP32_HALF)
    return out



quantize_q2_0 = _quantizer(Q2_0_ID)
dequantize_q2_0 = _dequantizer(Q2_0_ID)

QUANTIZE = {T(t): _quantizer(t) for t in LOWBIT_IDS}

DEQUANTIZE = {
    T.TQ1_0: dequantize_tq1_0,
    T.TQ2_0: dequantize_tq2_0,
    T.MXFP4: dequantize_mxfp4,
    T.NVFP4: _dequantizer(NVFP4_ID),
    T.Q1_0: _dequantizer(Q1_0_ID),
}
