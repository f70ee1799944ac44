"""Dequantizers for the grid-based i-quants, the ternary types and MXFP4, bit-exact with ggml.

Ports of ggml-quants.c `dequantize_row_{iq2_xxs, iq2_xs, iq2_s, iq3_xxs, iq3_s, iq1_s, iq1_m,
tq1_0, tq2_0, mxfp4}` (block layouts: ggml-common.h). Quantizing these types comes later,
so QUANTIZE is empty.

Tables: the design forbids re-declaring tables gguf already has, and gguf-py 0.19
(`gguf/quants.py`) carries every grid these dequantizers need (packed as `grid_hex` +
`grid_map` in its IQ classes), `ksigns`, the doubled-e2m1 `kvalues` and the e8m0 -> fp32/2
conversion of MXFP4. They are derived from gguf-py at import time below; the tests check
them against ggml by sweeping every grid index through ggml's own to_float.

Exactness: ggml computes `db * grid[j] * (signs & kmask ? -1.f : 1.f)` in float32, and the
compiled library applies the +-1 as a sign flip. For any non-NaN product a multiply by +-1 is
that same flip (-0.0 included) and vectorizes; only a NaN fp16 scale tells them apart (ggml's
output NaN has its sign bit toggled, a multiply would keep it), so blocks with a NaN scale take
an explicit negation path (see _put_signed).
All constants are np.float32 (a Python float literal would promote to float64 in numba).
"""

import numba as nb
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, QK_K
from gguf import quants as gq

from ..common import F32, fp16_to_fp32, get_u16

T = GGMLQuantizationType


# ---------------------------------------------------------------------------------------------
# Tables, derived from gguf-py's data
# ---------------------------------------------------------------------------------------------

def _gguf_grid(cls) -> np.ndarray:
    """gguf-py's unpacked grid of an IQ class as a C-contiguous float32 [n_entries, group]."""
    cls.init_grid()  # idempotent; gguf-py itself calls it before its first dequantize
    return np.ascontiguousarray(cls.grid.reshape(cls.grid_shape), dtype=np.float32)


# ggml-common.h iq2xxs_grid / iq2xs_grid / iq2s_grid: 8 bytes each of {0x08, 0x19, 0x2b}.
IQ2XXS_GRID = _gguf_grid(gq.IQ2_XXS)  # [256, 8]
IQ2XS_GRID = _gguf_grid(gq.IQ2_XS)  # [512, 8]
IQ2S_GRID = _gguf_grid(gq.IQ2_S)  # [1024, 8]
# ggml-common.h iq3xxs_grid / iq3s_grid: 4 bytes each.
IQ3XXS_GRID = _gguf_grid(gq.IQ3_XXS)  # [256, 4]
IQ3S_GRID = _gguf_grid(gq.IQ3_S)  # [512, 4]
# ggml-common.h iq1s_grid: 8 int8 each of {-1, 0, 1}; shared by IQ1_S and IQ1_M.
IQ1S_GRID = _gguf_grid(gq.IQ1_S)  # [2048, 8]

# ggml-common.h ksigns_iq2xs: 7 sign bits -> byte with an even number of set bits.
KSIGNS_IQ2XS = np.frombuffer(gq.IQ2_XXS.ksigns, dtype=np.uint8).copy()  # [128]

# ggml-common.h kmask_iq2xs[j] = 1 << j: element j of a group of 8 is negated when bit j of
# its sign byte is set. (Not in gguf-py; it is only the bit positions 0..7, so derived here.)
KMASK_IQ2XS = (1 << np.arange(8, dtype=np.uint32)).astype(np.uint8)  # [8]
# The +-1.f factor ggml multiplies by, per sign byte and element.
SIGN_FACTORS = np.where(
    (np.arange(256, dtype=np.uint32)[:, None] & KMASK_IQ2XS[None, :]) != 0, F32(-1.0), F32(1.0)
).astype(np.float32)  # [256 sign bytes, 8]

# ggml-common.h IQ1S_DELTA == IQ1M_DELTA == 0.125f (gguf-py IQ1_S.delta).
IQ1S_DELTA = F32(gq.IQ1_S.delta)

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

# Block byte sizes (gguf GGML_QUANT_SIZES) and the field offsets inside each block
# (ggml-common.h struct layouts; QK_K = 256).
IQ2XXS_BYTES = GGML_QUANT_SIZES[T.IQ2_XXS][1]  # d | qs[QK_K/8] u16 (8 groups of 2 x u32)
IQ2XS_BYTES = GGML_QUANT_SIZES[T.IQ2_XS][1]  # d | qs[QK_K/8] u16 | scales[QK_K/32]
IQ2XS_SCALES = 2 + QK_K // 4
IQ2S_BYTES = GGML_QUANT_SIZES[T.IQ2_S][1]  # d | qs[QK_K/8] | signs[QK_K/8] | qh[QK_K/32] | scales[QK_K/32]
IQ2S_SIGNS = 2 + QK_K // 8
IQ2S_QH = 2 + QK_K // 4
IQ2S_SCALES = IQ2S_QH + QK_K // 32
IQ3XXS_BYTES = GGML_QUANT_SIZES[T.IQ3_XXS][1]  # d | qs[QK_K/4] | scales_and_signs[QK_K/8] (u32 each 32)
IQ3XXS_SAS = 2 + QK_K // 4
IQ3S_BYTES = GGML_QUANT_SIZES[T.IQ3_S][1]  # d | qs[QK_K/4] | qh[QK_K/32] | signs[QK_K/8] | scales[QK_K/64]
IQ3S_QH = 2 + QK_K // 4
IQ3S_SIGNS = IQ3S_QH + QK_K // 32
IQ3S_SCALES = IQ3S_SIGNS + QK_K // 8
IQ1S_BYTES = GGML_QUANT_SIZES[T.IQ1_S][1]  # d | qs[QK_K/8] | qh[QK_K/32] u16
IQ1S_QH = 2 + QK_K // 8
IQ1M_BYTES = GGML_QUANT_SIZES[T.IQ1_M][1]  # qs[QK_K/8] | qh[QK_K/16] | scales[QK_K/32] (4 x u16)
IQ1M_QH = QK_K // 8
IQ1M_SCALES = IQ1M_QH + QK_K // 16
TQ1_BYTES = GGML_QUANT_SIZES[T.TQ1_0][1]  # qs[48] | qh[QK_K/64] | d
TQ1_QS = (QK_K - 4 * QK_K // 64) // 5
TQ1_QH = QK_K // 64
TQ1_WIDE = TQ1_QS - TQ1_QS % 32  # qs[0:32] is read in runs of 32, the rest (qs[32:48]) in runs of 16
TQ2_BYTES = GGML_QUANT_SIZES[T.TQ2_0][1]  # qs[QK_K/4] | d
TQ2_RUN = 32  # dequantize_row_tq2_0 reads qs in runs of 32 bytes, each 4 times (2 bits each)
MXFP4_BLOCK, MXFP4_BYTES = GGML_QUANT_SIZES[T.MXFP4]  # e | qs[16]

assert TQ1_QS + TQ1_QH + 2 == TQ1_BYTES and IQ3S_SCALES + QK_K // 64 == IQ3S_BYTES
assert IQ1M_SCALES + QK_K // 32 == IQ1M_BYTES and IQ2S_SCALES + QK_K // 32 == IQ2S_BYTES

_HALF = F32(0.5)
_QUARTER = F32(0.25)


@nb.njit(cache=True, inline="always")
def _put_signed(y, o, db, grid, g, signf, s, k0, nan_scale):
    """y[o + j] = db * grid[g, j] * signf[s, k0 + j] for j < grid.shape[1] (one grid entry).

    nan_scale (the block's fp16 d is NaN, so every product is NaN): negate explicitly, as the
    compiled ggml does; otherwise the multiply by +-1 gives identical bits and vectorizes.
    The branch is per block, so it is always predicted.
    """
    if nan_scale:
        for j in range(grid.shape[1]):
            v = db * grid[g, j]
            y[o + j] = -v if signf[s, k0 + j] < F32(0.0) else v
    else:
        for j in range(grid.shape[1]):
            y[o + j] = db * grid[g, j] * signf[s, k0 + j]


@nb.njit(cache=True, inline="always")
def _u32(buf, pos):
    """Little-endian uint32 at buf[pos:pos+4], as int64 (memcpy into uint32_t in the C)."""
    return (np.int64(buf[pos]) | (np.int64(buf[pos + 1]) << 8)
            | (np.int64(buf[pos + 2]) << 16) | (np.int64(buf[pos + 3]) << 24))


# ---------------------------------------------------------------------------------------------
# Per-row kernels. src: uint8[row_bytes], y: float32[n_per_row].
# ---------------------------------------------------------------------------------------------

@nb.njit(cache=True)
def _row_iq2_xxs(src, y, grid, ksigns, signf):
    """ggml-quants.c dequantize_row_iq2_xxs: per 32, 4 grid bytes + u32 (4 x 7 sign bits, 4-bit scale)."""
    for i in range(src.size // IQ2XXS_BYTES):
        b = i * IQ2XXS_BYTES
        d = fp16_to_fp32(get_u16(src, b))
        nan_scale = d != d
        o = i * QK_K
        for ib32 in range(QK_K // 32):
            p = b + 2 + 8 * ib32
            aux1 = _u32(src, p + 4)
            db = d * (_HALF + F32(aux1 >> 28)) * _QUARTER
            for l in range(4):
                g = np.int64(src[p + l])
                s = ksigns[(aux1 >> (7 * l)) & 127]
                _put_signed(y, o, db, grid, g, signf, s, 0, nan_scale)
                o += 8


@nb.njit(cache=True)
def _row_iq2_xs(src, y, grid, ksigns, signf):
    """ggml-quants.c dequantize_row_iq2_xs: u16 = 9-bit grid index | 7 sign bits; two 4-bit scales per 32."""
    for i in range(src.size // IQ2XS_BYTES):
        b = i * IQ2XS_BYTES
        d = fp16_to_fp32(get_u16(src, b))
        nan_scale = d != d
        o = i * QK_K
        for ib32 in range(QK_K // 32):
            sc = np.int64(src[b + IQ2XS_SCALES + ib32])
            db0 = d * (_HALF + F32(sc & 0xF)) * _QUARTER
            db1 = d * (_HALF + F32(sc >> 4)) * _QUARTER
            for l in range(4):
                q = np.int64(get_u16(src, b + 2 + 2 * (4 * ib32 + l)))
                dl = db0 if l < 2 else db1
                g = q & 511
                s = ksigns[q >> 9]
                _put_signed(y, o, dl, grid, g, signf, s, 0, nan_scale)
                o += 8


@nb.njit(cache=True)
def _row_iq2_s(src, y, grid, signf):
    """ggml-quants.c dequantize_row_iq2_s: 10-bit grid index (qs byte + 2 bits of qh), explicit sign bytes."""
    for i in range(src.size // IQ2S_BYTES):
        b = i * IQ2S_BYTES
        d = fp16_to_fp32(get_u16(src, b))
        nan_scale = d != d
        o = i * QK_K
        for ib32 in range(QK_K // 32):
            sc = np.int64(src[b + IQ2S_SCALES + ib32])
            db0 = d * (_HALF + F32(sc & 0xF)) * _QUARTER
            db1 = d * (_HALF + F32(sc >> 4)) * _QUARTER
            qh = np.int64(src[b + IQ2S_QH + ib32])
            for l in range(4):
                dl = db0 if l < 2 else db1
                g = np.int64(src[b + 2 + 4 * ib32 + l]) | ((qh << (8 - 2 * l)) & 0x300)
                s = src[b + IQ2S_SIGNS + 4 * ib32 + l]
                _put_signed(y, o, dl, grid, g, signf, s, 0, nan_scale)
                o += 8


@nb.njit(cache=True)
def _row_iq3_xxs(src, y, grid, ksigns, signf):
    """ggml-quants.c dequantize_row_iq3_xxs: byte grid indices of 4; u32 per 32 = 4 x 7 sign bits + 4-bit scale."""
    for i in range(src.size // IQ3XXS_BYTES):
        b = i * IQ3XXS_BYTES
        d = fp16_to_fp32(get_u16(src, b))
        nan_scale = d != d
        o = i * QK_K
        for ib32 in range(QK_K // 32):
            aux = _u32(src, b + IQ3XXS_SAS + 4 * ib32)
            db = d * (_HALF + F32(aux >> 28)) * _HALF
            q = b + 2 + 8 * ib32
            for l in range(4):
                s = ksigns[(aux >> (7 * l)) & 127]
                g1 = np.int64(src[q + 2 * l])
                g2 = np.int64(src[q + 2 * l + 1])
                _put_signed(y, o, db, grid, g1, signf, s, 0, nan_scale)
                _put_signed(y, o + 4, db, grid, g2, signf, s, 4, nan_scale)
                o += 8


@nb.njit(cache=True)
def _row_iq3_s(src, y, grid, signf):
    """ggml-quants.c dequantize_row_iq3_s: 9-bit grid indices (qs byte + 1 qh bit), odd scales 1 + 2*s."""
    for i in range(src.size // IQ3S_BYTES):
        b = i * IQ3S_BYTES
        d = fp16_to_fp32(get_u16(src, b))
        nan_scale = d != d
        o = i * QK_K
        # The C walks ib32 in pairs sharing one scale byte (low nibble, then high nibble).
        for ib32 in range(QK_K // 32):
            sc = np.int64(src[b + IQ3S_SCALES + ib32 // 2])
            if ib32 % 2 == 0:
                db = d * F32(1 + 2 * (sc & 0xF))
            else:
                db = d * F32(1 + 2 * (sc >> 4))
            qh = np.int64(src[b + IQ3S_QH + ib32])
            q = b + 2 + 8 * ib32
            for l in range(4):
                g1 = np.int64(src[q + 2 * l]) | ((qh << (8 - 2 * l)) & 256)
                g2 = np.int64(src[q + 2 * l + 1]) | ((qh << (7 - 2 * l)) & 256)
                s = src[b + IQ3S_SIGNS + 4 * ib32 + l]
                _put_signed(y, o, db, grid, g1, signf, s, 0, nan_scale)
                _put_signed(y, o + 4, db, grid, g2, signf, s, 4, nan_scale)
                o += 8


@nb.njit(cache=True)
def _row_iq1_s(src, y, grid, delta):
    """ggml-quants.c dequantize_row_iq1_s: 11-bit grid index; u16 qh per 32 = 4 x 3 high bits, 3-bit scale, delta sign."""
    for i in range(src.size // IQ1S_BYTES):
        b = i * IQ1S_BYTES
        d = fp16_to_fp32(get_u16(src, b))
        o = i * QK_K
        for ib in range(QK_K // 32):
            qh = np.int64(get_u16(src, b + IQ1S_QH + 2 * ib))
            dl = d * F32(2 * ((qh >> 12) & 7) + 1)
            dlt = -delta if qh & 0x8000 else delta
            for l in range(4):
                g = np.int64(src[b + 2 + 4 * ib + l]) | (((qh >> (3 * l)) & 7) << 8)
                for j in range(8):
                    y[o + j] = dl * (grid[g, j] + dlt)
                o += 8


@nb.njit(cache=True)
def _row_iq1_m(src, y, grid, delta):
    """ggml-quants.c dequantize_row_iq1_m: fp16 scale spread over the top nibbles of 4 u16 scale words."""
    for i in range(src.size // IQ1M_BYTES):
        b = i * IQ1M_BYTES
        sc0 = np.int64(get_u16(src, b + IQ1M_SCALES))
        sc1 = np.int64(get_u16(src, b + IQ1M_SCALES + 2))
        sc2 = np.int64(get_u16(src, b + IQ1M_SCALES + 4))
        sc3 = np.int64(get_u16(src, b + IQ1M_SCALES + 6))
        # iq1m_scale_t: the union's u16 read back as the fp16 d
        h = (sc0 >> 12) | ((sc1 >> 8) & 0x00F0) | ((sc2 >> 4) & 0x0F00) | (sc3 & 0xF000)
        d = fp16_to_fp32(np.uint16(h))
        o = i * QK_K
        for ib in range(QK_K // 32):
            s = np.int64(get_u16(src, b + IQ1M_SCALES + 2 * (ib // 2)))
            sh = 6 * (ib % 2)
            dl1 = d * F32(2 * ((s >> sh) & 7) + 1)
            dl2 = d * F32(2 * ((s >> (sh + 3)) & 7) + 1)
            for l in range(4):
                qh = np.int64(src[b + IQ1M_QH + 2 * ib + l // 2])
                # idx[l]: low byte | 3 bits of qh (bits 0-2 for even l, 4-6 for odd l);
                # delta sign: qh bit 3 (even l) or bit 7 (odd l).
                if l % 2 == 0:
                    g = np.int64(src[b + 4 * ib + l]) | ((qh << 8) & 0x700)
                    neg = qh & 0x08
                else:
                    g = np.int64(src[b + 4 * ib + l]) | ((qh << 4) & 0x700)
                    neg = qh & 0x80
                dlt = -delta if neg else delta
                dl = dl1 if l < 2 else dl2
                for j in range(8):
                    y[o + j] = dl * (grid[g, j] + dlt)
                o += 8


@nb.njit(cache=True, inline="always")
def _trit(byte, pow3):
    """ggml-quants.c dequantize_row_tq1_0: q = (uint8)(byte * pow3[n]); xi = (q * 3) >> 8; value xi - 1.

    int32 arithmetic throughout: int64 -> float32 conversion does not vectorize on AVX2.
    """
    q = (np.int32(byte) * pow3) & np.int32(0xFF)  # the uint8 wrap of the C
    return F32(((q * np.int32(3)) >> np.int32(8)) - np.int32(1))


@nb.njit(cache=True)
def _row_tq1_0(src, y, pow3):
    """ggml-quants.c dequantize_row_tq1_0: base-3 digits packed 5 per byte (4 per qh byte), read by q*3 >> 8."""
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
            for m in range(TQ1_QS - TQ1_WIDE):
                y[o + m] = _trit(src[b + TQ1_WIDE + m], p) * d
            o += TQ1_QS - TQ1_WIDE
        # qh: four passes over its 4 bytes
        for n in range(4):
            p = np.int32(pow3[n])
            for j in range(TQ1_QH):
                y[o + j] = _trit(src[b + TQ1_QS + j], p) * d
            o += TQ1_QH


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
                    y[o + m] = F32(q - np.int32(1)) * d
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


# ---------------------------------------------------------------------------------------------
# Parallel entry kernels: rows are independent, so the result is the same for any thread count.
# ---------------------------------------------------------------------------------------------

@nb.njit(parallel=True, cache=True)
def _deq_iq2_xxs(data, out, grid, ksigns, signf):
    for r in nb.prange(data.shape[0]):
        _row_iq2_xxs(data[r], out[r], grid, ksigns, signf)


@nb.njit(parallel=True, cache=True)
def _deq_iq2_xs(data, out, grid, ksigns, signf):
    for r in nb.prange(data.shape[0]):
        _row_iq2_xs(data[r], out[r], grid, ksigns, signf)


@nb.njit(parallel=True, cache=True)
def _deq_iq2_s(data, out, grid, signf):
    for r in nb.prange(data.shape[0]):
        _row_iq2_s(data[r], out[r], grid, signf)


@nb.njit(parallel=True, cache=True)
def _deq_iq3_xxs(data, out, grid, ksigns, signf):
    for r in nb.prange(data.shape[0]):
        _row_iq3_xxs(data[r], out[r], grid, ksigns, signf)


@nb.njit(parallel=True, cache=True)
def _deq_iq3_s(data, out, grid, signf):
    for r in nb.prange(data.shape[0]):
        _row_iq3_s(data[r], out[r], grid, signf)


@nb.njit(parallel=True, cache=True)
def _deq_iq1_s(data, out, grid, delta):
    for r in nb.prange(data.shape[0]):
        _row_iq1_s(data[r], out[r], grid, delta)


@nb.njit(parallel=True, cache=True)
def _deq_iq1_m(data, out, grid, delta):
    for r in nb.prange(data.shape[0]):
        _row_iq1_m(data[r], out[r], grid, delta)


@nb.njit(parallel=True, cache=True)
def _deq_tq1_0(data, out, pow3):
    for r in nb.prange(data.shape[0]):
        _row_tq1_0(data[r], out[r], pow3)


@nb.njit(parallel=True, cache=True)
def _deq_tq2_0(data, out, run):
    for r in nb.prange(data.shape[0]):
        _row_tq2_0(data[r], out[r], run)


@nb.njit(parallel=True, cache=True)
def _deq_mxfp4(data, out, kvalues, e8m0_half):
    for r in nb.prange(data.shape[0]):
        _row_mxfp4(data[r], out[r], kvalues, e8m0_half)


# ---------------------------------------------------------------------------------------------
# Registry entries: (data uint8[n_rows, row_bytes], n_per_row) -> float32[n_rows, n_per_row]
# ---------------------------------------------------------------------------------------------

def _prepare(qtype, data, n_per_row):
    block, type_size = GGML_QUANT_SIZES[qtype]
    if n_per_row % block:
        raise ValueError(f"{qtype.name}: rows of {n_per_row} elements are not a whole number of {block}-element blocks")
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != n_per_row // block * type_size:
        raise ValueError(
            f"{qtype.name}: expected uint8 [n_rows, {n_per_row // block * type_size}] for rows of {n_per_row} "
            f"elements, got shape {data.shape}"
        )
    return data, np.empty((data.shape[0], n_per_row), dtype=np.float32)


def dequantize_iq2_xxs(data, n_per_row):
    data, out = _prepare(T.IQ2_XXS, data, n_per_row)
    _deq_iq2_xxs(data, out, IQ2XXS_GRID, KSIGNS_IQ2XS, SIGN_FACTORS)
    return out


def dequantize_iq2_xs(data, n_per_row):
    data, out = _prepare(T.IQ2_XS, data, n_per_row)
    _deq_iq2_xs(data, out, IQ2XS_GRID, KSIGNS_IQ2XS, SIGN_FACTORS)
    return out


def dequantize_iq2_s(data, n_per_row):
    data, out = _prepare(T.IQ2_S, data, n_per_row)
    _deq_iq2_s(data, out, IQ2S_GRID, SIGN_FACTORS)
    return out


def dequantize_iq3_xxs(data, n_per_row):
    data, out = _prepare(T.IQ3_XXS, data, n_per_row)
    _deq_iq3_xxs(data, out, IQ3XXS_GRID, KSIGNS_IQ2XS, SIGN_FACTORS)
    return out


def dequantize_iq3_s(data, n_per_row):
    data, out = _prepare(T.IQ3_S, data, n_per_row)
    _deq_iq3_s(data, out, IQ3S_GRID, SIGN_FACTORS)
    return out


def dequantize_iq1_s(data, n_per_row):
    data, out = _prepare(T.IQ1_S, data, n_per_row)
    _deq_iq1_s(data, out, IQ1S_GRID, IQ1S_DELTA)
    return out


def dequantize_iq1_m(data, n_per_row):
    data, out = _prepare(T.IQ1_M, data, n_per_row)
    _deq_iq1_m(data, out, IQ1S_GRID, IQ1S_DELTA)
    return out


def dequantize_tq1_0(data, n_per_row):
    data, out = _prepare(T.TQ1_0, data, n_per_row)
    _deq_tq1_0(data, out, TQ1_POW3)
    return out


def dequantize_tq2_0(data, n_per_row):
    data, out = _prepare(T.TQ2_0, data, n_per_row)
    _deq_tq2_0(data, out, TQ2_RUN)
    return out


def dequantize_mxfp4(data, n_per_row):
    data, out = _prepare(T.MXFP4, data, n_per_row)
    _deq_mxfp4(data, out, KVALUES_MXFP4, E8M0_TO_FP32_HALF)
    return out


QUANTIZE = {}

DEQUANTIZE = {
    T.IQ2_XXS: dequantize_iq2_xxs,
    T.IQ2_XS: dequantize_iq2_xs,
    T.IQ2_S: dequantize_iq2_s,
    T.IQ3_XXS: dequantize_iq3_xxs,
    T.IQ3_S: dequantize_iq3_s,
    T.IQ1_S: dequantize_iq1_s,
    T.IQ1_M: dequantize_iq1_m,
    T.TQ1_0: dequantize_tq1_0,
    T.TQ2_0: dequantize_tq2_0,
    T.MXFP4: dequantize_mxfp4,
}
