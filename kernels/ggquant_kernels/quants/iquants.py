"""The grid-based i-quants IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M: quantize and
dequantize, bit-exact with ggml.

Ports of ggml-quants.c `quantize_iq*` (the `quantize_row_iq*_impl` searches that
ggml_quantize_chunk runs, with or without an importance matrix; IQ2_XXS, IQ2_XS and IQ1_S require
one, as ggml_quantize_requires_imatrix says) and `dequantize_row_iq*` (block layouts:
ggml-common.h). The quantizers' search tables (iq2xs_init_impl / iq3xs_init_impl) are built in
iqtables.py.

Tables: the design forbids re-declaring tables gguf already has, and gguf-py 0.19
(`gguf/quants.py`) carries every grid these dequantizers need (packed as `grid_hex` +
`grid_map` in its IQ classes) and `ksigns`. They are derived from gguf-py at import time below;
the tests check them against ggml by sweeping every grid index through ggml's own to_float.

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

from . import iqtables
from ..common import F32, JIT, dequantize_buffers, fp16_to_fp32, get_u16
from ..qsearch import WORK_FLOATS, fp32_to_fp16, make_qp_quants, nearest_int, put_u16

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

assert IQ3S_SCALES + QK_K // 64 == IQ3S_BYTES
assert IQ1M_SCALES + QK_K // 32 == IQ1M_BYTES and IQ2S_SCALES + QK_K // 32 == IQ2S_BYTES

_HALF = F32(0.5)
_QUARTER = F32(0.25)
_U = np.uint64  # an index known to be >= 0: numba skips the negative-index wraparound


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


# ---------------------------------------------------------------------------------------------
# Registry entries: (data uint8[n_rows, row_bytes], n_per_row) -> float32[n_rows, n_per_row]
# ---------------------------------------------------------------------------------------------

def _prepare(qtype, data, n_per_row):
    return dequantize_buffers(qtype.name, *GGML_QUANT_SIZES[qtype], data, n_per_row)


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



DEQUANTIZE = {
    T.IQ2_XXS: dequantize_iq2_xxs,
    T.IQ2_XS: dequantize_iq2_xs,
    T.IQ2_S: dequantize_iq2_s,
    T.IQ3_XXS: dequantize_iq3_xxs,
    T.IQ3_S: dequantize_iq3_s,
    T.IQ1_S: dequantize_iq1_s,
    T.IQ1_M: dequantize_iq1_m,
}


# =============================================================================================
# Quantizers: ggml-quants.c quantize_iq2_xxs / iq2_xs / iq2_s / iq3_xxs / iq3_s / iq1_s / iq1_m
# =============================================================================================
#
# Each ports the C's quantize_row_<type>_impl for one super-block of QK_K values, statement by
# statement: float32 everywhere (the C has no doubles in these paths), loops in index order,
# C integer constants converted to float where the C converts them (`2*kMaxQ-1+is*0.1f` is the
# float 5.f + (float)is*0.1f), `MAX(a, b)` as `a > b ? a : b`, strict comparisons in every
# "better candidate" test so the first best wins. The search tables (grid, kmap, neighbour
# lists) are those of iq2xs_init_impl / iq3xs_init_impl (iqtables.py).
#
# Where ggml aborts (GGML_ASSERT on a point that found no neighbour, which only non-finite
# inputs cause: NaN/inf weights make every distance NaN), the kernel flags the row and the
# Python entry raises, naming the type.

_FLT_MAX = F32(np.finfo(np.float32).max)
_F0, _F1, _HALF_F = F32(0.0), F32(1.0), F32(0.5)
_GROUP_MAX_EPS = F32(1e-15)          # ggml-quants.c GROUP_MAX_EPS
_EPS_IQ3_XXS = F32(1e-8)             # GROUP_MAX_EPS_IQ3_XXS
_EPS_IQ2_S = F32(1e-8)               # GROUP_MAX_EPS_IQ2_S
_EPS_IQ1_M = F32(1e-7)               # GROUP_MAX_EPS_IQ1_M
_EPS_IQ1_S = F32(1e-12)              # GROUP_MAX_EPS_IQ1_S
_F_QK_K = F32(QK_K)
# the fudge factors each quantizer multiplies its stored super-block scale by
_FUDGE_IQ3_XXS, _FUDGE_IQ3_S, _FUDGE_IQ2_S = F32(1.0125), F32(1.033), F32(0.9875)
_FUDGE_IQ1_S, _FUDGE_IQ1_M = F32(1.125), F32(1.1125)
# IQ1S_DELTA == IQ1M_DELTA; x_p / x_m of quantize_row_iq1_{s,m}_impl: {-1+D, D, 1+D}, {-1-D, -D, 1-D}
_XP = np.array([F32(-1.0) + IQ1S_DELTA, IQ1S_DELTA, F32(1.0) + IQ1S_DELTA], dtype=np.float32)
_XM = np.array([F32(-1.0) - IQ1S_DELTA, -IQ1S_DELTA, F32(1.0) - IQ1S_DELTA], dtype=np.float32)
NLEVELS_IQ2 = 3  # levels of the IQ2 search grids (grid_map has 3 values; the C's pos = 2*l + 1)
NLEVELS_IQ3 = 8  # 3-bit levels of the IQ3 grids
_IQ1M_MASKS = np.array([0x00, 0x80, 0x08, 0x88], dtype=np.uint8)  # quantize_row_iq1_m_impl masks


@nb.njit(inline="always", **JIT)
def _sumx2(x, xo):
    s = _F0
    for i in range(QK_K):
        s += x[xo + i] * x[xo + i]
    return s


@nb.njit(inline="always", **JIT)
def _imatrix_weights(x, xo, qw, use_qw, sigma2, n, weight, waux, iq2s_default):
    """weight[i] = qw[i]*sqrtf(sigma2 + x^2); without qw: x^2, or IQ2_S's 0.25f*sigma2 + x^2.
    waux[i] = sqrtf(weight[i]) (waux may be weight's size 0 twin when unused: pass n_aux=0)."""
    for i in range(n):
        xi = x[xo + i]
        if use_qw:
            weight[i] = qw[xo + i] * np.sqrt(sigma2 + xi * xi)
        elif iq2s_default:
            weight[i] = F32(0.25) * sigma2 + xi * xi
        else:
            weight[i] = xi * xi
    for i in range(waux.size if waux.size < n else n):
        waux[i] = np.sqrt(weight[i])


@nb.njit(inline="always", **JIT)
def _abs_signs(x, xo, weight, xval, ngroups, even, signs):
    """xval = |x| per group of 8 and the group's sign bits; `even` (IQ2_XXS/XS, IQ3_XXS): an odd
    number of negatives flips the element with the smallest w*x*x, so 7 bits carry the signs."""
    for k in range(ngroups):
        nflip = 0
        s = 0
        for i in range(8):
            v = x[xo + 8 * k + i]
            if v >= _F0:
                xval[8 * k + i] = v
            else:
                xval[8 * k + i] = -v
                nflip += 1
                s |= 1 << i
        if even and nflip % 2:
            imin = 0
            v0 = x[xo + 8 * k]
            vmin = weight[8 * k] * v0 * v0
            for i in range(1, 8):
                vi = x[xo + 8 * k + i]
                ax = weight[8 * k + i] * vi * vi
                if ax < vmin:
                    vmin = ax
                    imin = i
            xval[8 * k + imin] = -xval[8 * k + imin]
            s ^= 1 << imin
        signs[k] = (s & 127) if even else s


@nb.njit(inline="always", **JIT)
def _max_of(v, n):
    m = v[0]
    for i in range(1, n):
        m = m if m > v[i] else v[i]  # MAX(max, v[i])
    return m


@nb.njit(inline="always", **JIT)
def _grid_neighbour(nbrs, off, grid, xval, xo, waux, scale, L, Lo, glev, lvt, d2):
    """iq2_find_best_neighbour / iq3_find_best_neighbour (G = grid.shape[1] = 8 or 4): the
    listed grid point with the least sum waux*(scale*q - x)^2; L[Lo:Lo+G] = its levels.

    IQ2 (G = 8, ~8-30 points a list): every term waux[i]*diff*diff depends only on the coordinate i
    and the point's level there (q = 2*level + 1, 3 levels), so the terms are computed once per
    coordinate and level (d2[l*8 + i]: three 8-wide vectors, the C's own float operations) and
    each listed point's distance adds its G terms up in the C's order ((0 + t0) + t1) + ...: the
    same bits as the C's loop, with a table read instead of a subtract and two multiplies per
    coordinate. IQ3 (G = 4, ~5-7 points) likewise, with 8 levels: its 32 terms (d2[i*8 + l],
    one 8-wide vector per coordinate) replace the C's conversion, subtract and three multiplies
    per coordinate of every point. The first least distance wins (strict <), as in the C.
    Returns -1 where ggml's GGML_ASSERT(grid_index >= 0) would abort.
    """
    g = grid.shape[1]
    n = np.int64(nbrs[_U(off)])
    best_d2 = _FLT_MAX
    gi = -1
    if g == 4:  # IQ3: ~5-7 points of 4 coordinates, each term one of 4 x 8 (coordinate, level) terms
        nl3 = NLEVELS_IQ3
        for i in range(4):
            xi = xval[_U(xo + i)]
            wi = waux[_U(xo + i)]
            for lv in range(nl3):  # one 8-wide vector per coordinate
                diff = scale * F32(2 * lv + 1) - xi
                d2[_U(i * nl3 + lv)] = wi * diff * diff
        for j in range(1, n + 1):
            idx = _U(nbrs[_U(off + j)])
            dd = _F0 + d2[_U(glev[idx, 0])]
            dd += d2[_U(nl3 + glev[idx, 1])]
            dd += d2[_U(2 * nl3 + glev[idx, 2])]
            dd += d2[_U(3 * nl3 + glev[idx, 3])]
            if dd < best_d2:
                best_d2 = dd
                gi = np.int64(idx)
        if gi >= 0:
            for i in range(4):
                L[_U(Lo + i)] = glev[gi, i]
        return gi
    nl = NLEVELS_IQ2
    for lv in range(nl):
        sq = scale * F32(2 * lv + 1)
        for i in range(g):
            diff = sq - xval[_U(xo + i)]
            d2[_U(8 * lv + i)] = waux[_U(xo + i)] * diff * diff
    gi = _list_argmin(nbrs, off, g, d2, lvt, glev)
    if gi >= 0:
        for i in range(g):
            L[_U(Lo + i)] = glev[gi, i]
    return gi


_SHORT_LIST = 16  # _list_argmin: lists up to this long are summed point by point


@nb.njit(inline="always", **JIT)
def _list_argmin(nbrs, off, g, d2, lvt, glev):
    """The listed point (3-level grid, G = 8) whose terms d2[level_i*8 + i] add up (in order
    ((0 + t0) + t1) + ...) to the least distance, the first one on ties; -1 if none is < FLT_MAX.

    The points are summed LIST_PAD at a time, coordinate by coordinate, from the transposed
    levels (iqtables: lvt[g*off + i*padded(n) + j]): the same adds per point as the C's loop,
    in the same order, with LLVM vectorizing across points (one zmm of 16 distances, kept in
    d2[g*3:]); the padding points' sums are never compared. (The C's loop, one point's 8
    dependent adds after the other, is latency-bound.) Indices are unsigned (_U) so that numba
    emits no negative-index wraparound, which would turn the vector loads into gathers, and
    the vector loop's trip count is opaque (always LIST_PAD), so that LLVM vectorizes it behind
    a run-time alias check instead of unrolling it into scalar code.

    Short lists (n <= _SHORT_LIST: most of IQ2_S's, median 5 points) are summed one point at a
    time from its levels glev[idx] instead: the same adds in the same order, without the padding
    to LIST_PAD points and the distances' round trip through d2 (IQ2_S quantize ~1.4x faster
    with the level-major terms; bench/quant.py, s21-iqspeed note).
    """
    nl = NLEVELS_IQ2
    pad = iqtables.LIST_PAD
    n = np.int64(nbrs[_U(off)])
    best_d2 = _FLT_MAX
    gi = -1
    if n <= _SHORT_LIST:
        for j in range(1, n + 1):
            idx = _U(nbrs[_U(off + j)])
            dd = _F0
            for i in range(8):
                dd += d2[_U(8 * glev[idx, i] + i)]
            if dd < best_d2:
                best_d2 = dd
                gi = np.int64(idx)
        return gi
    npad = (n + pad - 1) // pad * pad
    dv = g * nl  # d2[dv:dv + pad]: the distances of the current points
    for jb in range(0, npad, pad):
        m = min(pad, npad - jb)
        for jj in range(m):
            d2[_U(dv + jj)] = _F0
        for i in range(g):
            t0 = d2[_U(i)]
            t1 = d2[_U(8 + i)]
            t2 = d2[_U(16 + i)]
            row = g * off + i * npad + jb
            for jj in range(m):
                lv = lvt[_U(row + jj)]
                d2[_U(dv + jj)] += t0 if lv == 0 else (t1 if lv == 1 else t2)
        for jj in range(min(pad, n - jb)):
            dd = d2[_U(dv + jj)]
            if dd < best_d2:
                best_d2 = dd
                gi = np.int64(nbrs[_U(off + 1 + jb + jj)])
    return gi


@nb.njit(inline="always", **JIT)
def _trial_levels(id_, xval, xo, g, bits, kmax, L, Lo):
    """Levels nearest_int(0.5f*(id*x - 1)) clamped to [0, kMaxQ-1] of one group; its kmap code."""
    u = 0
    for i in range(g):
        l = nearest_int(_HALF_F * (id_ * xval[xo + i] - _F1))
        l = max(0, min(kmax - 1, l))
        L[Lo + i] = l
        u |= l << (bits * i)
    return u


@nb.njit(inline="always", **JIT)
def _grid_sums(weight, xval, L, n):
    """sumqx = sum (w*x)*q, sumq2 = sum (w*q)*q with q = 2*L + 1."""
    sumqx = _F0
    sumq2 = _F0
    for i in range(n):
        w = weight[i]
        q = F32(2 * L[i] + 1)
        sumqx += w * xval[i] * q
        sumq2 += w * q * q
    return sumqx, sumq2


@nb.njit(inline="always", **JIT)
def _grid_search(xval, weight, waux, n, g, bits, kmax, vmax, step, is_lo, is_hi, grid, kmap, nbrs, glev, lvt, d2,
                 L, Laux, on_grid, on_grid_aux, init_on_grid, scale):
    """The scale trials shared by IQ2_XS, IQ2_S, IQ3_XXS and IQ3_S:
    id = (2*kMaxQ-1 + is*step)/max for is in [is_lo, is_hi], each group snapped to the grid.
    Returns the scale; L / on_grid hold the best trial's levels (the C's `best` starts at 0)."""
    best = _F0
    ngroups = n // g
    for k in range(ngroups):
        on_grid[k] = init_on_grid
    base = F32(2 * kmax - 1)
    for is_ in range(is_lo, is_hi + 1):
        id_ = (base + F32(is_) * step) / vmax
        this_scale = _F1 / id_
        for k in range(ngroups):
            u = _trial_levels(id_, xval, g * k, g, bits, kmax, Laux, g * k)
            gi = kmap[u]
            on_grid_aux[k] = True
            if gi < 0:
                on_grid_aux[k] = False
                if _grid_neighbour(nbrs, -gi - 1, grid, xval, g * k, waux, this_scale, Laux, g * k, glev, lvt, d2) < 0:
                    return F32(np.nan)
        sumqx, sumq2 = _grid_sums(weight, xval, Laux, n)
        if sumq2 > _F0 and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            for i in range(n):
                L[i] = Laux[i]
            for k in range(ngroups):
                on_grid[k] = on_grid_aux[k]
    return scale


@nb.njit(inline="always", **JIT)
def _regrid(xval, weight, waux, n, g, bits, kmax, scale, grid, kmap, nbrs, glev, lvt, d2, L, on_grid, redo_all):
    """The C's second pass: groups off the grid (all groups for IQ3_S) re-snapped at the best
    scale, which is then refitted. Returns the scale (NaN where ggml would abort)."""
    n_not_ongrid = 0
    for k in range(n // g):
        if not on_grid[k]:
            n_not_ongrid += 1
    if n_not_ongrid > 0 and scale > _F0:
        id_ = _F1 / scale
        for k in range(n // g):
            if on_grid[k] and not redo_all:
                continue
            u = _trial_levels(id_, xval, g * k, g, bits, kmax, L, g * k)
            gi = kmap[u]
            if gi < 0:
                gi = _grid_neighbour(nbrs, -gi - 1, grid, xval, g * k, waux, scale, L, g * k, glev, lvt, d2)
                if gi < 0:
                    return F32(np.nan)
            for i in range(g):
                L[g * k + i] = (grid[gi, i] - 1) // 2
        sumqx, sumq2 = _grid_sums(weight, xval, L, n)
        if sumq2 > _F0:
            scale = sumqx / sumq2
    return scale


@nb.njit(**JIT)
def _subblock(x, xb, qw, use_qw, sigma2, n, g, bits, kmax, step, is_lo, is_hi, init_on_grid, redo_all, even,
              iq2s_default, eps, grid, kmap, nbrs, glev, lvt, d2, weight, waux, xval, L, Laux, on_grid, on_grid_aux,
              signs):
    """One sub-block of quantize_row_iq2_xs / iq2_s / iq3_xxs / iq3_s_impl (the four share it): the
    weights, |x| and the sign bytes, the scale trials, the re-snap of the groups off the grid, and
    the sign flip of a negative scale. Returns (scale, status): status 0 for a sub-block the C
    skips (max < eps; `!max` when eps is 0), 2 where ggml aborts (NaN scale), 1 otherwise."""
    _imatrix_weights(x, xb, qw, use_qw, sigma2, n, weight, waux, iq2s_default)
    _abs_signs(x, xb, weight, xval, n // 8, even, signs)
    vmax = _max_of(xval, n)
    for i in range(n):
        L[i] = 0
    if (vmax == _F0) if eps == _F0 else (vmax < eps):
        return _F0, 0
    scale = _grid_search(xval, weight, waux, n, g, bits, kmax, vmax, step, is_lo, is_hi, grid, kmap, nbrs, glev, lvt,
                         d2, L, Laux, on_grid, on_grid_aux, init_on_grid, vmax / F32(2 * kmax - 1))
    scale = _regrid(xval, weight, waux, n, g, bits, kmax, scale, grid, kmap, nbrs, glev, lvt, d2, L, on_grid, redo_all)
    if scale != scale:
        return scale, 2
    if scale < _F0:
        scale = -scale
        for k in range(n // 8):
            signs[k] = ((~signs[k]) & 127) if even else ~signs[k]
    return scale, 1


@nb.njit(inline="always", **JIT)
def _code(L, Lo, g, bits):
    u = 0
    for i in range(g):
        u |= np.int64(L[Lo + i]) << (bits * i)
    return u


@nb.njit(inline="always", **JIT)
def _scale_nibble(id_, s, lmax):
    """nearest_int(0.5f*(id*scale - 1)) clamped to [0, lmax]: a sub-block scale's stored code."""
    l = nearest_int(_HALF_F * (id_ * s - _F1))
    return max(0, min(lmax, l))


@nb.njit(**JIT)
def _put_nibbles(out, pos, id_, scales, n):
    """The n sub-block scales as 4-bit codes _scale_nibble(id, scale, 15), two per byte (even
    sub-block in the low nibble) from out[pos] on (IQ2_XS, IQ2_S, IQ3_S)."""
    for ib in range(0, n, 2):
        l1 = _scale_nibble(id_, scales[ib], 15)
        l2 = _scale_nibble(id_, scales[ib + 1], 15)
        out[pos + ib // 2] = np.uint8(l1 | (l2 << 4))


@nb.njit(inline="always", **JIT)
def _put_u32(out, pos, v):
    for k in range(4):
        out[pos + k] = np.uint8((v >> (8 * k)) & 0xFF)


@nb.njit(**JIT)
def _iq2_xxs_block(x, xo, qw, out, oo, grid, kmap, nbrs, glev, lvt, d2, weight, waux, xval, L, Laux, Lqp, scales, signs, q2, work):
    """quantize_row_iq2_xxs_impl, one super-block: 8 x 32 values, each 4 grid bytes + u32
    (4 x 7 sign bits, 4-bit scale). The imatrix is required. Returns False where ggml aborts."""
    kmax = 3
    for i in range(2 * (QK_K // 32)):
        q2[i] = 0
    put_u16(out, oo, fp32_to_fp16(_F0))
    max_scale = _F0
    sigma2 = _sumx2(x, xo) / _F_QK_K
    for ib in range(QK_K // 32):
        xb = xo + 32 * ib
        _imatrix_weights(x, xb, qw, True, sigma2, 32, weight, waux, False)
        _abs_signs(x, xb, weight, xval, 4, True, signs)
        if _max_of(xval, 32) < _GROUP_MAX_EPS:
            scales[ib] = _F0
            continue
        scale = make_qp_quants(32, kmax + 1, xval, 0, Lqp, 0, weight, 0, work)
        eff_max = scale * F32(kmax)
        if eff_max <= _F0:
            scales[ib] = _F0
            continue
        best = _F0
        for is_ in range(-6, 7):
            id_ = (F32(2 * kmax - 1) + F32(is_) * F32(0.1)) / eff_max
            this_scale = _F1 / id_
            for k in range(4):
                u = _trial_levels(id_, xval, 8 * k, 8, 2, kmax, Laux, 8 * k)
                gi = kmap[u]
                if gi < 0:
                    if _grid_neighbour(nbrs, -gi - 1, grid, xval, 8 * k, waux, this_scale, Laux, 8 * k, glev, lvt, d2) < 0:
                        return False
            sumqx, sumq2 = _grid_sums(weight, xval, Laux, 32)
            if sumq2 > _F0 and sumqx * sumqx > best * sumq2:
                scale = sumqx / sumq2
                best = scale * sumqx
                for i in range(32):
                    L[i] = Laux[i]
        if scale > _F0:
            id_ = _F1 / scale
            for k in range(4):
                u = _trial_levels(id_, xval, 8 * k, 8, 2, kmax, L, 8 * k)
                gi = kmap[u]
                if gi < 0:
                    gi = _grid_neighbour(nbrs, -gi - 1, grid, xval, 8 * k, waux, scale, L, 8 * k, glev, lvt, d2)
                    if gi < 0:
                        return False
                for i in range(8):
                    L[8 * k + i] = (grid[gi, i] - 1) // 2
            sumqx, sumq2 = _grid_sums(weight, xval, L, 32)
            if sumq2 > _F0:
                scale = sumqx / sumq2
        else:
            # scale is NaN (non-finite input): ggml packs make_qp_quants' levels and asserts
            return False
        if scale < _F0:
            scale = -scale
            for k in range(4):
                signs[k] = (~signs[k]) & 127
        for k in range(4):
            gi = kmap[_code(L, 8 * k, 8, 2)]
            if gi < 0:
                return False
            q2[2 * ib] |= np.uint32(gi) << np.uint32(8 * k)
            q2[2 * ib + 1] |= np.uint32(signs[k]) << np.uint32(7 * k)
        scales[ib] = scale
        max_scale = max_scale if max_scale > scale else scale
    if max_scale == _F0:  # C: if (!max_scale) memset(qs, 0)
        for i in range(QK_K // 4):
            out[oo + 2 + i] = 0
        return True
    d = max_scale / F32(31)
    put_u16(out, oo, fp32_to_fp16(d))
    id_ = _F1 / d
    for ib in range(QK_K // 32):
        q2[2 * ib + 1] |= np.uint32(_scale_nibble(id_, scales[ib], 15)) << np.uint32(28)
    for i in range(2 * (QK_K // 32)):
        _put_u32(out, oo + 2 + 4 * i, q2[i])
    return True


@nb.njit(**JIT)
def _iq2_xs_block(x, xo, qw, out, oo, grid, kmap, nbrs, glev, lvt, d2, weight, waux, xval, L, Laux, on_grid, on_grid_aux,
                  scales, signs, q2):
    """quantize_row_iq2_xs_impl, one super-block: 16 x 16 values, u16 = 9-bit grid index | 7 sign
    bits per 8, two 4-bit scales per byte. The imatrix is required."""
    kmax = 3
    for i in range(2 * (QK_K // 16)):
        q2[i] = 0
    for i in range(QK_K // 32):
        out[oo + IQ2XS_SCALES + i] = 0
    put_u16(out, oo, fp32_to_fp16(_F0))
    max_scale = _F0
    sigma2 = _sumx2(x, xo) / _F_QK_K
    for ib in range(QK_K // 16):
        scale, status = _subblock(x, xo + 16 * ib, qw, True, sigma2, 16, 8, 2, kmax, F32(0.1), -9, 9, True, False, True,
                                  False, _GROUP_MAX_EPS, grid, kmap, nbrs, glev, lvt, d2, weight, waux, xval, L, Laux,
                                  on_grid, on_grid_aux, signs)
        if status == 0:
            scales[ib] = _F0
            continue
        if status == 2:
            return False
        for k in range(2):
            gi = kmap[_code(L, 8 * k, 8, 2)]
            if gi < 0:
                return False
            q2[2 * ib + k] = np.uint16(gi | (np.int64(signs[k]) << 9))
        scales[ib] = scale
        max_scale = max_scale if max_scale > scale else scale
    if max_scale == _F0:
        for i in range(QK_K // 4):
            out[oo + 2 + i] = 0
        return True
    d = max_scale / F32(31)
    put_u16(out, oo, fp32_to_fp16(d))
    id_ = _F1 / d
    _put_nibbles(out, oo + IQ2XS_SCALES, id_, scales, QK_K // 16)
    for i in range(2 * (QK_K // 16)):
        put_u16(out, oo + 2 + 2 * i, q2[i])
    return True


@nb.njit(**JIT)
def _iq2_s_block(x, xo, qw, use_qw, out, oo, grid, kmap, nbrs, glev, lvt, d2, weight, waux, xval, L, Laux, on_grid, on_grid_aux,
                 scales, signs):
    """quantize_row_iq2_s_impl, one super-block: 16 x 16 values, 10-bit grid indices (qs byte +
    2 qh bits), explicit sign bytes, 4-bit scales; d stored times 0.9875."""
    kmax = 3
    for i in range(IQ2S_BYTES):
        out[oo + i] = 0
    max_scale = _F0
    sigma2 = F32(2) * _sumx2(x, xo) / _F_QK_K
    for ib in range(QK_K // 16):
        scale, status = _subblock(x, xo + 16 * ib, qw, use_qw, sigma2, 16, 8, 2, kmax, F32(0.1), -9, 9, True, False,
                                  False, True, _EPS_IQ2_S, grid, kmap, nbrs, glev, lvt, d2, weight, waux, xval, L, Laux,
                                  on_grid, on_grid_aux, signs)
        if status == 0:
            scales[ib] = _F0
            continue
        if status == 2:
            return False
        for k in range(2):
            gi = kmap[_code(L, 8 * k, 8, 2)]
            if gi < 0:
                return False
            i8 = 2 * ib + k
            out[oo + 2 + i8] = np.uint8(gi & 255)
            out[oo + IQ2S_QH + i8 // 4] |= np.uint8((gi >> 8) << (2 * (i8 % 4)))
            out[oo + IQ2S_SIGNS + i8] = signs[k]
        scales[ib] = scale
        max_scale = max_scale if max_scale > scale else scale
    if max_scale == _F0:
        return True
    d = max_scale / F32(31)
    put_u16(out, oo, fp32_to_fp16(d * _FUDGE_IQ2_S))
    id_ = _F1 / d
    _put_nibbles(out, oo + IQ2S_SCALES, id_, scales, QK_K // 16)
    return True


@nb.njit(**JIT)
def _iq3_xxs_block(x, xo, qw, use_qw, out, oo, grid, kmap, nbrs, glev, lvt, d2, weight, waux, xval, L, Laux, on_grid, on_grid_aux,
                   scales, signs, q3):
    """quantize_row_iq3_xxs_impl(256, ...), one super-block: 8 x 32 values, 8 grid bytes and a u32
    (4 x 7 sign bits, 4-bit scale) each; d stored times 1.0125."""
    kmax = 8
    for i in range(q3.size):
        q3[i] = 0
    put_u16(out, oo, fp32_to_fp16(_F0))
    max_scale = _F0
    sigma2 = F32(2) * _sumx2(x, xo) / _F_QK_K
    for ib in range(QK_K // 32):
        scale, status = _subblock(x, xo + 32 * ib, qw, use_qw, sigma2, 32, 4, 3, kmax, F32(0.2), -15, 15, True, False,
                                  True, False, _EPS_IQ3_XXS, grid, kmap, nbrs, glev, lvt, d2, weight, waux, xval, L, Laux,
                                  on_grid, on_grid_aux, signs)
        if status == 0:
            scales[ib] = _F0
            continue
        if status == 2:
            return False
        for k in range(8):
            gi = kmap[_code(L, 4 * k, 4, 3)]
            if gi < 0:
                return False
            q3[8 * ib + k] = np.uint8(gi)
        sas = (np.int64(signs[0]) | (np.int64(signs[1]) << 7) | (np.int64(signs[2]) << 14)
               | (np.int64(signs[3]) << 21))
        _put_u32(q3, IQ3XXS_SAS - 2 + 4 * ib, sas)
        scales[ib] = scale
        max_scale = max_scale if max_scale > scale else scale
    if max_scale == _F0:
        for i in range(IQ3XXS_BYTES - 2):
            out[oo + 2 + i] = 0
        return True
    d = max_scale / F32(31)
    put_u16(out, oo, fp32_to_fp16(d * _FUDGE_IQ3_XXS))
    id_ = _F1 / d
    for ib in range(QK_K // 32):
        q3[IQ3XXS_SAS - 2 + 4 * ib + 3] |= np.uint8(_scale_nibble(id_, scales[ib], 15) << 4)
    for i in range(IQ3XXS_BYTES - 2):
        out[oo + 2 + i] = q3[i]
    return True


@nb.njit(**JIT)
def _iq3_s_block(x, xo, qw, use_qw, out, oo, grid, kmap, nbrs, glev, lvt, d2, weight, waux, xval, L, Laux, on_grid, on_grid_aux,
                 scales, signs):
    """quantize_row_iq3_s_impl(32, ...), one super-block: 8 x 32 values, 9-bit grid indices (qs
    byte + qh bit), sign bytes, 4-bit odd scales; d stored times 1.033.

    ggml advances its qs and signs pointers only past sub-blocks it quantizes: after an all-zero
    sub-block (`if (!max) continue`) the next ones are written 8 (qs) / 4 (signs) bytes earlier
    and the block's last bytes stay zero. Reproduced with the running offsets qs_o / signs_o.
    """
    kmax = 8
    for i in range(IQ3S_BYTES):
        out[oo + i] = 0
    qs_o = oo + 2
    signs_o = oo + IQ3S_SIGNS
    max_scale = _F0
    sigma2 = F32(2) * _sumx2(x, xo) / _F_QK_K
    for ib in range(QK_K // 32):
        # eps 0: the C's `if (!max)`; its trials start off the grid and re-snap every group
        scale, status = _subblock(x, xo + 32 * ib, qw, use_qw, sigma2, 32, 4, 3, kmax, F32(0.2), -9, 9, False, True,
                                  False, False, _F0, grid, kmap, nbrs, glev, lvt, d2, weight, waux, xval, L, Laux,
                                  on_grid, on_grid_aux, signs)
        if status == 0:
            scales[ib] = _F0
            continue
        if status == 2:
            return False
        for k in range(8):
            gi = kmap[_code(L, 4 * k, 4, 3)]
            if gi < 0:
                return False
            out[qs_o + k] = np.uint8(gi & 255)
            out[oo + IQ3S_QH + ib] |= np.uint8((gi >> 8) << k)
        qs_o += 8
        for k in range(4):
            out[signs_o + k] = signs[k]
        signs_o += 4
        scales[ib] = scale
        max_scale = max_scale if max_scale > scale else scale
    if max_scale == _F0:
        return True
    d = max_scale / F32(31)
    put_u16(out, oo, fp32_to_fp16(d * _FUDGE_IQ3_S))
    id_ = _F1 / d
    _put_nibbles(out, oo + IQ3S_SCALES, id_, scales, QK_K // 32)
    return True


@nb.njit(**JIT)
def _sort_index(x, xo, n, idx):
    """idx = the order of x[xo:xo+n] ascending, ties in index order: glibc's qsort (a merge sort,
    stable, for arrays this small) with iq1_sort_helper, which compares the floats only."""
    for j in range(n):
        v = x[xo + j]
        p = j
        while p > 0 and v < x[xo + idx[p - 1]]:
            idx[p] = idx[p - 1]
            p -= 1
        idx[p] = j


@nb.njit(inline="always", **JIT)
def _iq1_neighbour2(nbrs, off, grid, x, xo, weight, wo, scale, xx, L, Lo, glev, lvt, d2):
    """iq1_find_best_neighbour2: the listed point with the least sum w*(scale*xx[l] - x)^2 (terms
    per coordinate and level shared by the list's points, as in _grid_neighbour).
    -1 where ggml would fall back to a scan of the whole grid (only for non-finite inputs; that
    scan reads past its block, so it is not reproduced)."""
    nl = NLEVELS_IQ2
    for lv in range(nl):
        sq = scale * xx[lv]
        for i in range(8):
            diff = sq - x[xo + i]
            d2[_U(8 * lv + i)] = weight[wo + i] * diff * diff
    gi = _list_argmin(nbrs, off, 8, d2, lvt, glev)
    if gi >= 0:
        for i in range(8):
            L[Lo + i] = glev[gi, i]
    return gi


@nb.njit(**JIT)
def _iq1_s_block(x, xo, qw, out, oo, grid, kmap, nbrs, glev, lvt, d2, weight, L, idx, sumx, sumw, index, scales, shifts, cand):
    """quantize_row_iq1_s_impl, one super-block: 8 x 32 values; per 32 the exhaustive search
    over the two boundaries splitting the sorted values into levels -1/0/+1 (shifted by +-delta),
    then the 4 groups of 8 snapped to the grid. d stored times 1.125. The imatrix is required."""
    bs = 32
    for i in range(IQ1S_BYTES):
        out[oo + i] = 0
    max_scale = _F0
    sigma2 = F32(2) * _sumx2(x, xo) / _F_QK_K
    for ib in range(QK_K // bs):
        xb = xo + bs * ib
        _imatrix_weights(x, xb, qw, True, sigma2, bs, weight, weight[:0], False)
        vmax = abs(x[xb])
        for i in range(1, bs):
            a = abs(x[xb + i])
            vmax = vmax if vmax > a else a
        if vmax < _EPS_IQ1_S:
            scales[ib] = _F0
            shifts[ib] = 1
            continue
        _sort_index(x, xb, bs, idx)
        sumx[0] = _F0
        sumw[0] = _F0
        for j in range(bs):
            i = idx[j]
            sumx[j + 1] = sumx[j] + weight[i] * x[xb + i]
            sumw[j + 1] = sumw[j] + weight[i]
        best_score = -_FLT_MAX
        scale = vmax
        besti1 = -1
        besti2 = -1
        best_shift = 0
        # The candidates of one i1 (all i2 >= i1) are computed together (elementwise, the C's
        # expressions), then scanned in the C's order (i2 ascending, +delta before -delta) with
        # its acceptance test: the same result, with the arithmetic vectorized.
        xp0, xp1, xp2 = _XP[0], _XP[1], _XP[2]
        xm0, xm1, xm2 = _XM[0], _XM[1], _XM[2]
        for i1 in range(bs + 1):
            a = sumx[i1] - sumx[0]
            wa = sumw[i1] - sumw[0]
            ap = a * xp0
            am = a * xm0
            wap = wa * xp0 * xp0
            wam = wa * xm0 * xm0
            m = bs + 1 - i1
            for j in range(m):
                i2 = i1 + j
                b = sumx[i2] - sumx[i1]
                c = sumx[bs] - sumx[i2]
                wb = sumw[i2] - sumw[i1]
                wc = sumw[bs] - sumw[i2]
                cand[j] = ap + b * xp1 + c * xp2
                cand[33 + j] = wap + wb * xp1 * xp1 + wc * xp2 * xp2
                cand[66 + j] = am + b * xm1 + c * xm2
                cand[99 + j] = wam + wb * xm1 * xm1 + wc * xm2 * xm2
            for j in range(m):
                sumqx = cand[j]
                sumq2 = cand[33 + j]
                if sumq2 > _F0 and sumqx * sumqx > best_score * sumq2:
                    scale = sumqx / sumq2
                    best_score = scale * sumqx
                    besti1 = i1
                    besti2 = i1 + j
                    best_shift = 1
                sumqx = cand[66 + j]
                sumq2 = cand[99 + j]
                if sumq2 > _F0 and sumqx * sumqx > best_score * sumq2:
                    scale = sumqx / sumq2
                    best_score = scale * sumqx
                    besti1 = i1
                    besti2 = i1 + j
                    best_shift = -1
        if besti1 < 0 or besti2 < 0 or best_shift == 0:
            scales[ib] = _F0
            shifts[ib] = 1
            continue
        for j in range(bs):
            L[idx[j]] = 0 if j < besti1 else (1 if j < besti2 else 2)
        if scale < _F0:
            for j in range(bs):
                L[j] = 2 - L[j]
            scale = -scale
            best_shift = -best_shift
        xx = _XP if best_shift == 1 else _XM
        all_on_grid = True
        for k in range(bs // 8):
            gi = kmap[_code(L, 8 * k, 8, 2)]
            if gi < 0:
                all_on_grid = False
                gi = _iq1_neighbour2(nbrs, -gi - 1, grid, x, xb + 8 * k, weight, 8 * k, scale, xx, L, 8 * k, glev, lvt, d2)
                if gi < 0:
                    return False
            index[k] = gi
        if not all_on_grid:
            sumqx = _F0
            sumq2 = _F0
            for k in range(bs // 8):
                for j in range(8):
                    w = weight[8 * k + j]
                    q = xx[(grid[index[k], j] - 1) // 2]
                    sumqx += w * q * x[xb + 8 * k + j]
                    sumq2 += w * q * q
            if sumqx > _F0 and sumq2 > _F0:
                scale = sumqx / sumq2
        h = 0
        for k in range(bs // 8):
            out[oo + 2 + (bs // 8) * ib + k] = np.uint8(index[k] & 255)
            h |= (index[k] >> 8) << (3 * k)
        put_u16(out, oo + IQ1S_QH + 2 * ib, np.uint16(h))
        scales[ib] = scale
        shifts[ib] = best_shift
        max_scale = max_scale if max_scale > scale else scale
    if max_scale == _F0:
        return True
    d = max_scale / F32(15)
    put_u16(out, oo, fp32_to_fp16(d * _FUDGE_IQ1_S))
    id_ = _F1 / d
    for ib in range(QK_K // bs):
        l = _scale_nibble(id_, scales[ib], 7)
        if shifts[ib] == -1:
            l |= 8
        h = np.int64(get_u16(out, oo + IQ1S_QH + 2 * ib)) | (l << 12)
        put_u16(out, oo + IQ1S_QH + 2 * ib, np.uint16(h & 0xFFFF))
    return True


@nb.njit(**JIT)
def _iq1_m_block(x, xo, qw, use_qw, out, oo, grid, kmap, nbrs, glev, lvt, d2, weight, L, idx, px, pw, index, scales, shifts, cand):
    """quantize_row_iq1_m_impl, one super-block: 16 x 16 values; the IQ1_S search with each half
    (8 values) free to take the +delta or -delta level set (4 combinations, via prefix sums per
    half), 3-bit scales, and a refitted fp16 d spread over the scale words' top nibbles."""
    bs = 16
    for i in range(IQ1M_BYTES):
        out[oo + i] = 0
    max_scale = _F0
    sigma2 = F32(2) * _sumx2(x, xo) / _F_QK_K
    p2 = _XP[2]
    m2 = _XM[2]
    cp1 = _XP[0] * _XP[0] - _XP[1] * _XP[1]
    cp2 = _XP[1] * _XP[1] - _XP[2] * _XP[2]
    cm1 = _XM[0] * _XM[0] - _XM[1] * _XM[1]
    cm2 = _XM[1] * _XM[1] - _XM[2] * _XM[2]
    for ib in range(QK_K // bs):
        xb = xo + bs * ib
        _imatrix_weights(x, xb, qw, use_qw, sigma2, bs, weight, weight[:0], False)
        vmax = abs(x[xb])
        for i in range(1, bs):
            a = abs(x[xb + i])
            vmax = vmax if vmax > a else a
        if vmax < _EPS_IQ1_M:
            scales[ib] = _F0
            shifts[ib] = 0
            continue
        _sort_index(x, xb, bs, idx)
        px[0, 0] = _F0
        px[1, 0] = _F0
        pw[0, 0] = _F0
        pw[1, 0] = _F0
        for j in range(bs):
            i = idx[j]
            h = 0 if i < bs // 2 else 1
            px[h, j + 1] = px[h, j] + weight[i] * x[xb + i]
            px[1 - h, j + 1] = px[1 - h, j]
            pw[h, j + 1] = pw[h, j] + weight[i]
            pw[1 - h, j + 1] = pw[1 - h, j]
        tx0, tx1 = px[0, bs], px[1, bs]
        tw0, tw1 = pw[0, bs], pw[1, bs]
        best_score = -_FLT_MAX
        scale = vmax
        besti1 = -1
        besti2 = -1
        best_k = -1
        # as in _iq1_s_block: the candidates of one i1 computed together, then scanned in order
        for i1 in range(bs + 1):
            m = bs + 1 - i1
            for j in range(m):
                i2 = i1 + j
                sx0 = px[0, i1] + px[0, i2]
                sx1 = px[1, i1] + px[1, i2]
                qxp0 = tx0 * p2 - sx0
                qxm0 = tx0 * m2 - sx0
                qxp1 = tx1 * p2 - sx1
                qxm1 = tx1 * m2 - sx1
                q2p0 = tw0 * p2 * p2 + pw[0, i1] * cp1 + pw[0, i2] * cp2
                q2m0 = tw0 * m2 * m2 + pw[0, i1] * cm1 + pw[0, i2] * cm2
                q2p1 = tw1 * p2 * p2 + pw[1, i1] * cp1 + pw[1, i2] * cp2
                q2m1 = tw1 * m2 * m2 + pw[1, i1] * cm1 + pw[1, i2] * cm2
                cand[j] = qxp0 + qxp1
                cand[17 + j] = qxp0 + qxm1
                cand[34 + j] = qxm0 + qxp1
                cand[51 + j] = qxm0 + qxm1
                cand[68 + j] = q2p0 + q2p1
                cand[85 + j] = q2p0 + q2m1
                cand[102 + j] = q2m0 + q2p1
                cand[119 + j] = q2m0 + q2m1
            for j in range(m):
                for k in range(4):
                    sqx = cand[17 * k + j]
                    sq2 = cand[68 + 17 * k + j]
                    if sq2 > _F0 and sqx * sqx > best_score * sq2:
                        scale = sqx / sq2
                        best_score = scale * sqx
                        besti1 = i1
                        besti2 = i1 + j
                        best_k = k
        if besti1 < 0 or besti2 < 0 or best_k < 0:
            scales[ib] = _F0
            shifts[ib] = 0
            continue
        for j in range(bs):
            L[idx[j]] = 0 if j < besti1 else (1 if j < besti2 else 2)
        if scale < _F0:
            for j in range(bs):
                L[j] = 2 - L[j]
            scale = -scale
            best_k = 3 - best_k
        all_on_grid = True
        for k in range(bs // 8):
            if k == 0:
                xx = _XP if best_k < 2 else _XM
            else:
                xx = _XP if best_k % 2 == 0 else _XM
            gi = kmap[_code(L, 8 * k, 8, 2)]
            if gi < 0:
                all_on_grid = False
                gi = _iq1_neighbour2(nbrs, -gi - 1, grid, x, xb + 8 * k, weight, 8 * k, scale, xx, L, 8 * k, glev, lvt, d2)
                if gi < 0:
                    return False
            index[k] = gi
        if not all_on_grid:
            sumqx = _F0
            sumq2 = _F0
            for k in range(bs // 8):
                if k == 0:
                    xx = _XP if best_k < 2 else _XM
                else:
                    xx = _XP if best_k % 2 == 0 else _XM
                for j in range(8):
                    w = weight[8 * k + j]
                    q = xx[(grid[index[k], j] - 1) // 2]
                    sumqx += w * q * x[xb + 8 * k + j]
                    sumq2 += w * q * q
            if sumqx > _F0 and sumq2 > _F0:
                scale = sumqx / sumq2
        out[oo + 2 * ib] = np.uint8(index[0] & 255)
        out[oo + 2 * ib + 1] = np.uint8(index[1] & 255)
        out[oo + IQ1M_QH + ib] = np.uint8((index[0] >> 8) | ((index[1] >> 8) << 4))
        scales[ib] = scale
        shifts[ib] = best_k
        max_scale = max_scale if max_scale > scale else scale
    if max_scale == _F0:
        return True
    d = max_scale / F32(15)
    id_ = _F1 / d
    sumqx = _F0
    sumq2 = _F0
    sc0 = 0
    sc1 = 0
    sc2 = 0
    sc3 = 0
    for ib in range(QK_K // bs):
        l = _scale_nibble(id_, scales[ib], 7)
        v = l << (3 * (ib % 4))
        if ib // 4 == 0:
            sc0 |= v
        elif ib // 4 == 1:
            sc1 |= v
        elif ib // 4 == 2:
            sc2 |= v
        else:
            sc3 |= v
        out[oo + IQ1M_QH + ib] |= _IQ1M_MASKS[shifts[ib]]
        xb = xo + bs * ib
        _imatrix_weights(x, xb, qw, use_qw, sigma2, bs, weight, weight[:0], False)
        qh = np.int64(out[oo + IQ1M_QH + ib])
        fl = F32(2 * l + 1)
        for k in range(bs // 8):
            if k == 0:
                xx = _XP if shifts[ib] < 2 else _XM
            else:
                xx = _XP if shifts[ib] % 2 == 0 else _XM
            g = np.int64(out[oo + 2 * ib + k]) + ((qh << (8 - 4 * k)) & 0x700)
            for j in range(8):
                w = weight[8 * k + j]
                q = xx[(grid[g, j] - 1) // 2] * fl
                sumqx += w * q * x[xb + 8 * k + j]
                sumq2 += w * q * q
    if sumq2 > _F0:
        d = sumqx / sumq2
    s = np.int64(fp32_to_fp16(d * _FUDGE_IQ1_M))
    sc0 |= (s & 0x000F) << 12
    sc1 |= (s & 0x00F0) << 8
    sc2 |= (s & 0x0F00) << 4
    sc3 |= s & 0xF000
    put_u16(out, oo + IQ1M_SCALES, np.uint16(sc0))
    put_u16(out, oo + IQ1M_SCALES + 2, np.uint16(sc1))
    put_u16(out, oo + IQ1M_SCALES + 4, np.uint16(sc2))
    put_u16(out, oo + IQ1M_SCALES + 6, np.uint16(sc3))
    return True


IQ2_XXS_ID, IQ2_XS_ID, IQ2_S_ID, IQ3_XXS_ID, IQ3_S_ID, IQ1_S_ID, IQ1_M_ID = (
    int(t) for t in (T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M))


@nb.njit(parallel=True, **JIT)
def _quantize_iq(x, qw, use_qw, out, type_id, block_bytes, grid, kmap, nbrs, glev, lvt, ok):
    """One parallel kernel for the grid family (prange over rows, dispatch on the type id, as
    kquants.py does): rows are independent, so the bytes do not depend on the thread count."""
    nrows, n = x.shape
    for r in nb.prange(nrows):
        weight = np.empty(32, np.float32)
        waux = np.empty(32, np.float32)
        xval = np.empty(32, np.float32)
        L = np.zeros(32, np.int8)
        Laux = np.zeros(32, np.int8)
        Lqp = np.zeros(32, np.uint8)
        on_grid = np.zeros(8, np.bool_)
        on_grid_aux = np.zeros(8, np.bool_)
        scales = np.zeros(16, np.float32)
        signs = np.zeros(8, np.uint8)
        q2 = np.zeros(16, np.uint32)
        q16 = np.zeros(32, np.uint16)
        q3 = np.zeros(IQ3XXS_BYTES - 2, np.uint8)
        work = np.empty(WORK_FLOATS, np.float32)
        idx = np.zeros(32, np.int64)
        sumx = np.zeros(33, np.float32)
        sumw = np.zeros(33, np.float32)
        px = np.zeros((2, 17), np.float32)
        pw = np.zeros((2, 17), np.float32)
        index = np.zeros(4, np.int64)
        shifts = np.zeros(16, np.int64)
        d2 = np.empty(8 * NLEVELS_IQ3 + 4096, np.float32)
        cand = np.empty(8 * 17 if 8 * 17 > 4 * 33 else 4 * 33, np.float32)  # IQ1_M: 8 x 17, IQ1_S: 4 x 33  # the terms, then the distances of a list
        xr = x[r]
        orow = out[r]
        good = True
        for i in range(n // QK_K):
            xo = i * QK_K
            oo = i * block_bytes
            if type_id == IQ2_XXS_ID:
                good = _iq2_xxs_block(xr, xo, qw, orow, oo, grid, kmap, nbrs, glev, lvt, d2, weight, waux, xval, L, Laux, Lqp,
                                      scales, signs, q2, work)
            elif type_id == IQ2_XS_ID:
                good = _iq2_xs_block(xr, xo, qw, orow, oo, grid, kmap, nbrs, glev, lvt, d2, weight, waux, xval, L, Laux,
                                     on_grid, on_grid_aux, scales, signs, q16)
            elif type_id == IQ2_S_ID:
                good = _iq2_s_block(xr, xo, qw, use_qw, orow, oo, grid, kmap, nbrs, glev, lvt, d2, weight, waux, xval, L, Laux,
                                    on_grid, on_grid_aux, scales, signs)
            elif type_id == IQ3_XXS_ID:
                good = _iq3_xxs_block(xr, xo, qw, use_qw, orow, oo, grid, kmap, nbrs, glev, lvt, d2, weight, waux, xval, L, Laux,
                                      on_grid, on_grid_aux, scales, signs, q3)
            elif type_id == IQ3_S_ID:
                good = _iq3_s_block(xr, xo, qw, use_qw, orow, oo, grid, kmap, nbrs, glev, lvt, d2, weight, waux, xval, L, Laux,
                                    on_grid, on_grid_aux, scales, signs)
            elif type_id == IQ1_S_ID:
                good = _iq1_s_block(xr, xo, qw, orow, oo, grid, kmap, nbrs, glev, lvt, d2, weight, L, idx, sumx, sumw, index,
                                    scales, shifts, cand)
            else:
                good = _iq1_m_block(xr, xo, qw, use_qw, orow, oo, grid, kmap, nbrs, glev, lvt, d2, weight, L, idx, px, pw,
                                    index, scales, shifts, cand)
            if not good:
                ok[r] = False
                break


# ggml_quantize_requires_imatrix (ggml.c): ggml_quantize_chunk asserts an imatrix for these.
REQUIRES_IMATRIX = frozenset({T.IQ2_XXS, T.IQ2_XS, T.IQ1_S})
_NO_QW = np.zeros(0, dtype=np.float32)


def _iq_quantizer(qtype):
    block, type_size = GGML_QUANT_SIZES[qtype]

    def quantize(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        nrows, n_per_row = x.shape
        if n_per_row % block:
            raise ValueError(f"{qtype.name}: n_per_row={n_per_row} is not a multiple of {block}")
        if imatrix is None and qtype in REQUIRES_IMATRIX:
            raise ValueError(f"{qtype.name} needs an importance matrix (ggml_quantize_requires_imatrix)")
        qw = _NO_QW if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if imatrix is not None and qw.size != n_per_row:
            raise ValueError(f"{qtype.name}: imatrix has {qw.size} values, expected {n_per_row}")
        tb = iqtables.tables(qtype)
        out = np.empty((nrows, n_per_row // block * type_size), dtype=np.uint8)
        ok = np.ones(nrows, dtype=np.bool_)
        _quantize_iq(x, qw, imatrix is not None, out, int(qtype), type_size, tb.grid, tb.kmap, tb.neighbours, tb.levels,
                     tb.lvt, ok)
        if not ok.all():
            bad = int(np.flatnonzero(~ok)[0])
            raise ValueError(
                f"{qtype.name}: row {bad} has values ggml cannot quantize (its search finds no grid point: "
                f"non-finite or overflowing values or weights); ggml_quantize_chunk aborts on such rows"
            )
        return out

    quantize.__name__ = f"quantize_{qtype.name.lower()}"
    return quantize


QUANTIZE = {t: _iq_quantizer(t) for t in (T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M)}
