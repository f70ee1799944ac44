"""CPU products of the grid i-quants (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M) with Q8_K
activations, in the float order of the kernel llama.cpp's CPU backend runs on x86:

batches of fewer than 8 tokens: ggml_vec_dot_<type>_q8_K (arch/x86/quants.c, the AVX2 path, which
    AVX-512 builds run too). Per super-block the signed grid values v (grid magnitude times its sign
    bit) times the int8 activations, times the sub-block scale (2*l + 1, or 1 + 2*l for IQ3_S) form
    8 int32 lanes (lane m: elements 4m .. 4m+3 of every 32-value chunk: _mm256_maddubs_epi16, then
    _mm256_madd_epi16 with the scales); the lanes are converted to float and fused-multiply-added by
    d = fp16(d_w) * d_x into 8 float lanes; the row's result is c * hsum_float_8(acc) with
    c = 0.125 (IQ2_*), 0.25 (IQ3_XXS), 1 (IQ3_S). IQ1_S / IQ1_M add their +-delta term: IQ1_S from
    the activation's bsums in one scalar per super-block (accum1 = fma(d, sumi1, accum1)), IQ1_M in
    a second set of 8 lanes; the row's result is hsum(acc) + 0.125 * (that term).
batches of 8 or more: the tiled kernel (tiled/tiled.cpp unpackers, tiled-kernel.cpp microtiles,
    AVX2 and AVX512-VNNI alike): per super-block the exact S1 = sum_sub scale * sum v * x
    (IQ1: v = 8 * grid + delta), then acc = fma(d0 * float(S1), d_x, acc) with
    d0 = fp16(d_w) * c (c folded into d before the product: 0.125 for IQ2_* and IQ1, 0.25 IQ3_XXS).

The integer parts are exact, so only these float orders matter; tests/runtime/test_matmul.py checks
every type, shape and batch size against ggml's own mul_mat graph bit for bit.

Work layout as in matmul.py: rows of W in chunks of ROWS (prange over chunks), unpacked once per chunk
into int8 values, int16 per-pair scales and per-super-block d, then dotted with every token.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from gguf import GGMLQuantizationType

from ..common import FP16_TO_FP32, JIT, get_u16
from ..quants import iq4
from ..quants import iquants as iq
from ..quants import lowbit
from .matmul import ROWS, TILED_MIN_BATCH
from .simd import QK_K, dot_kqv_s, dot_lanes_s, dot_q6k_lanes, fmaf

_T = GGMLQuantizationType
F32 = np.float32

# The grids as the integer bytes ggml keeps (ggml-common.h iq*_grid), from the dequantizer's tables.
GRID_IQ2XXS = iq.IQ2XXS_GRID.astype(np.int8)
GRID_IQ2XS = iq.IQ2XS_GRID.astype(np.int8)
GRID_IQ2S = iq.IQ2S_GRID.astype(np.int8)
GRID_IQ3XXS = iq.IQ3XXS_GRID.astype(np.int8)
GRID_IQ3S = iq.IQ3S_GRID.astype(np.int8)
GRID_IQ1S = iq.IQ1S_GRID.astype(np.int8)
KSIGNS = iq.KSIGNS_IQ2XS
POW3 = lowbit.TQ1_POW3.astype(np.int64)

IQ2_XXS_ID, IQ2_XS_ID, IQ2_S_ID, IQ3_XXS_ID, IQ3_S_ID, IQ1_S_ID, IQ1_M_ID, IQ4_XS_ID, TQ1_0_ID, TQ2_0_ID = (
    int(t) for t in (_T.IQ2_XXS, _T.IQ2_XS, _T.IQ2_S, _T.IQ3_XXS, _T.IQ3_S, _T.IQ1_S, _T.IQ1_M, _T.IQ4_XS,
                     _T.TQ1_0, _T.TQ2_0))
KVALUES_IQ4NL = iq4.KVALUES_IQ4NL
# c of the module docstring: vec_dot's final factor and the tiled unpackers' factor on d
_FACTOR = {IQ2_XXS_ID: 0.125, IQ2_XS_ID: 0.125, IQ2_S_ID: 0.125, IQ3_XXS_ID: 0.25, IQ3_S_ID: 1.0,
           IQ1_S_ID: 0.125, IQ1_M_ID: 0.125, IQ4_XS_ID: 1.0, TQ1_0_ID: 1.0, TQ2_0_ID: 1.0}
IQ1_DELTA = F32(0.125)  # IQ1S_DELTA == IQ1M_DELTA


@nb.njit(**JIT)
def _u32(b, pos):
    return (np.int64(b[pos]) | (np.int64(b[pos + 1]) << 8) | (np.int64(b[pos + 2]) << 16)
            | (np.int64(b[pos + 3]) << 24))


@nb.njit(**JIT)
def _put8(v, o, grid, g, s):
    """v[o:o+8] = grid[g] with element j negated where bit j of the sign byte s is set."""
    for j in range(8):
        gv = np.int64(grid[g, j])
        v[o + j] = -gv if (s >> j) & 1 else gv


@nb.njit(**JIT)
def _put4(v, o, grid, g, s, j0):
    for j in range(4):
        gv = np.int64(grid[g, j])
        v[o + j] = -gv if (s >> (j0 + j)) & 1 else gv


@nb.njit(**JIT)
def _scales(sv, o, lo, hi):
    """Per-pair scales of one 32-chunk: pairs 0..7 (first 16 values) lo, 8..15 hi."""
    for k in range(8):
        sv[o + k] = lo
        sv[o + 8 + k] = hi


@nb.njit(**JIT)
def _unpack_tq(tid, b, o, v, e, sv, dw, i):
    """A TQ1_0 / TQ2_0 super-block at b[o:] -> codes 0..2 (value + 1, as dequantize_row_tq*_0 reads
    them) at v[e:e+256], unit scales, dw[i] = fp16 d (the last field of both blocks)."""
    if tid == TQ2_0_ID:
        dw[i] = FP16_TO_FP32[get_u16(b, o + 64)]
        for j in range(0, 64, 32):
            for l in range(4):
                for m in range(32):
                    v[e + j * 4 + 32 * l + m] = (b[o + j + m] >> (2 * l)) & 3
    else:
        dw[i] = FP16_TO_FP32[get_u16(b, o + 52)]
        k = e
        for n in range(5):  # qs[0:32], one trit per power of 3
            for m in range(32):
                v[k + m] = ((np.int64(b[o + m]) * POW3[n]) & 255) * 3 >> 8
            k += 32
        for n in range(5):  # qs[32:48]
            for m in range(16):
                v[k + m] = ((np.int64(b[o + 32 + m]) * POW3[n]) & 255) * 3 >> 8
            k += 16
        for n in range(4):  # qh[4]
            for j in range(4):
                v[k + j] = ((np.int64(b[o + 48 + j]) * POW3[n]) & 255) * 3 >> 8
            k += 4
    for j in range(QK_K // 2):
        sv[e // 2 + j] = 1


@nb.njit(**JIT)
def _unpack_row(tid, b, v, v8, dl, sv, dw, dsg, grid, ksigns):
    """One weight row -> v int8 [K] (signed grid values), sv int16 [K/2] (scale per byte pair),
    dw float32 [nsb] (the fp16 d as stored). IQ1: v is the grid (-1, 0, 1), v8 = 8 * grid + delta
    (the tiled codes), dl the delta sign per value (IQ1_M's second set of lanes) and dsg the delta
    sign per 32 (IQ1_S's bsums term)."""
    nbytes = 0
    if tid == IQ2_XXS_ID:
        nbytes = 66
    elif tid == IQ2_XS_ID:
        nbytes = 74
    elif tid == IQ2_S_ID:
        nbytes = 82
    elif tid == IQ3_XXS_ID:
        nbytes = 98
    elif tid == IQ3_S_ID:
        nbytes = 110
    elif tid == IQ1_S_ID:
        nbytes = 50
    elif tid == IQ1_M_ID:
        nbytes = 56
    elif tid == IQ4_XS_ID:
        nbytes = 136
    elif tid == TQ1_0_ID:
        nbytes = 54
    else:
        nbytes = 66
    for i in range(b.size // nbytes):
        if tid == TQ1_0_ID or tid == TQ2_0_ID:
            _unpack_tq(tid, b, i * nbytes, v, i * QK_K, sv, dw, i)
            continue
        o = i * nbytes
        e = i * QK_K
        if tid == IQ1_M_ID:
            sc0 = np.int64(get_u16(b, o + 48))
            sc1 = np.int64(get_u16(b, o + 50))
            sc2 = np.int64(get_u16(b, o + 52))
            sc3 = np.int64(get_u16(b, o + 54))
            dw[i] = FP16_TO_FP32[(sc0 >> 12) | ((sc1 >> 8) & 0x00F0) | ((sc2 >> 4) & 0x0F00) | (sc3 & 0xF000)]
        else:
            dw[i] = FP16_TO_FP32[get_u16(b, o)]
        for ib in range(8):
            eo = e + 32 * ib
            so = eo // 2
            if tid == IQ2_XXS_ID:
                p = o + 2 + 8 * ib
                aux = _u32(b, p + 4)
                sc = 2 * (aux >> 28) + 1
                _scales(sv, so, sc, sc)
                for l in range(4):
                    _put8(v, eo + 8 * l, grid, np.int64(b[p + l]), ksigns[(aux >> (7 * l)) & 127])
            elif tid == IQ2_XS_ID:
                s = np.int64(b[o + 66 + ib])
                _scales(sv, so, 2 * (s & 15) + 1, 2 * (s >> 4) + 1)
                for l in range(4):
                    q = np.int64(get_u16(b, o + 2 + 2 * (4 * ib + l)))
                    _put8(v, eo + 8 * l, grid, q & 511, ksigns[q >> 9])
            elif tid == IQ2_S_ID:
                s = np.int64(b[o + 74 + ib])
                _scales(sv, so, 2 * (s & 15) + 1, 2 * (s >> 4) + 1)
                qh = np.int64(b[o + 66 + ib])
                for l in range(4):
                    g = np.int64(b[o + 2 + 4 * ib + l]) | ((qh << (8 - 2 * l)) & 0x300)
                    _put8(v, eo + 8 * l, grid, g, b[o + 34 + 4 * ib + l])
            elif tid == IQ3_XXS_ID:
                aux = _u32(b, o + 66 + 4 * ib)
                sc = 2 * (aux >> 28) + 1
                _scales(sv, so, sc, sc)
                for l in range(4):
                    s = ksigns[(aux >> (7 * l)) & 127]
                    _put4(v, eo + 8 * l, grid, np.int64(b[o + 2 + 8 * ib + 2 * l]), s, 0)
                    _put4(v, eo + 8 * l + 4, grid, np.int64(b[o + 2 + 8 * ib + 2 * l + 1]), s, 4)
            elif tid == IQ3_S_ID:
                s = np.int64(b[o + 106 + ib // 2])
                sc = 1 + 2 * ((s >> (4 * (ib % 2))) & 15)
                _scales(sv, so, sc, sc)
                qh = np.int64(b[o + 66 + ib])
                for l in range(4):
                    sg = b[o + 74 + 4 * ib + l]
                    g1 = np.int64(b[o + 2 + 8 * ib + 2 * l]) | ((qh << (8 - 2 * l)) & 256)
                    g2 = np.int64(b[o + 2 + 8 * ib + 2 * l + 1]) | ((qh << (7 - 2 * l)) & 256)
                    _put4(v, eo + 8 * l, grid, g1, sg, 0)
                    _put4(v, eo + 8 * l + 4, grid, g2, sg, 4)
            elif tid == IQ4_XS_ID:
                sh = np.int64(get_u16(b, o + 2))
                lo = (np.int64(b[o + 4 + ib // 2]) >> (4 * (ib % 2))) & 15
                ls = (lo | (((sh >> (2 * ib)) & 3) << 4)) - 32
                _scales(sv, so, ls, ls)
                for j in range(16):
                    q = b[o + 8 + 16 * ib + j]
                    v[eo + j] = KVALUES_IQ4NL[q & 15]
                    v[eo + 16 + j] = KVALUES_IQ4NL[q >> 4]
            elif tid == IQ1_S_ID:
                qh = np.int64(get_u16(b, o + 34 + 2 * ib))
                sc = 2 * ((qh >> 12) & 7) + 1
                _scales(sv, so, sc, sc)
                delta = -1 if qh & 0x8000 else 1
                dsg[i * 8 + ib] = delta
                for l in range(4):
                    g = np.int64(b[o + 2 + 4 * ib + l]) | (((qh >> (3 * l)) & 7) << 8)
                    for j in range(8):
                        gv = np.int64(grid[g, j])
                        v[eo + 8 * l + j] = gv
                        v8[eo + 8 * l + j] = 8 * gv + delta
                        dl[eo + 8 * l + j] = delta
            else:  # IQ1_M
                s16 = np.int64(get_u16(b, o + 48 + 2 * (ib // 2)))
                sh = 6 * (ib % 2)
                _scales(sv, so, 2 * ((s16 >> sh) & 7) + 1, 2 * ((s16 >> (sh + 3)) & 7) + 1)
                for l in range(4):
                    qh = np.int64(b[o + 32 + 2 * ib + l // 2])
                    if l % 2 == 0:
                        g = np.int64(b[o + 4 * ib + l]) | ((qh << 8) & 0x700)
                        delta = -1 if qh & 0x08 else 1
                    else:
                        g = np.int64(b[o + 4 * ib + l]) | ((qh << 4) & 0x700)
                        delta = -1 if qh & 0x80 else 1
                    for j in range(8):
                        gv = np.int64(grid[g, j])
                        v[eo + 8 * l + j] = gv
                        v8[eo + 8 * l + j] = 8 * gv + delta
                        dl[eo + 8 * l + j] = delta


@nb.njit(parallel=True, **JIT)
def _mm_iq(w, xq, xd, xbs, out, tid, factor, grid, ksigns):
    N = w.shape[0]
    T, K = xq.shape
    nsb = K // QK_K
    tiled = T >= TILED_MIN_BATCH and tid != TQ1_0_ID and tid != TQ2_0_ID  # the TQ types have no tiled kernel
    is_iq1 = tid == IQ1_S_ID or tid == IQ1_M_ID
    for c in nb.prange((N + ROWS - 1) // ROWS):
        r0 = c * ROWS
        r1 = min(N, r0 + ROWS)
        v = np.zeros((ROWS, K), np.int8)
        v8 = np.zeros((ROWS, K if is_iq1 else 0), np.int8)
        dl = np.zeros((ROWS, K if is_iq1 else 0), np.int8)
        sv = np.empty((ROWS, K // 2), np.int16)
        dw = np.empty((ROWS, nsb), np.float32)
        dsg = np.zeros((ROWS, nsb * 8), np.int64)
        dsc = np.empty(nsb, np.float32)
        corr = np.empty(nsb * 8, np.int32)
        for r in range(r0, r1):
            i = r - r0
            _unpack_row(tid, w[r], v[i], v8[i], dl[i], sv[i], dw[i], dsg[i], grid, ksigns)
        for t in range(T):
            xt = xq[t]
            for r in range(r0, r1):
                i = r - r0
                if tiled:  # tiled-kernel.cpp: S1 exact per super-block, acc = fma(d0 * S1, d_x, acc)
                    q = v8[i] if is_iq1 else v[i]
                    acc = F32(0.0)
                    for s in range(nsb):
                        sumi = dot_kqv_s(q, s * QK_K, xt, s * QK_K, sv[i], s * 128, 8)
                        acc = fmaf((dw[i, s] * factor) * F32(sumi), xd[t, s], acc)
                    out[t, r] = acc
                    continue
                for s in range(nsb):
                    dsc[s] = dw[i, s] * xd[t, s]  # GGML_CPU_FP16_TO_FP32(x[i].d) * y[i].d
                if tid == TQ1_0_ID or tid == TQ2_0_ID:
                    # ggml_vec_dot_tq*_0_q8_K: codes (0..2) times x in the usual 8 lanes, minus the
                    # activation's bsums 2m, 2m+1 in lane m (the -1 of the ternary values, folded per
                    # lane), times d, accumulated in 8 float lanes
                    for s in range(nsb):
                        for m in range(8):
                            corr[s * 8 + m] = xbs[t, s * 16 + 2 * m] + xbs[t, s * 16 + 2 * m + 1]
                    out[t, r] = dot_q6k_lanes(v[i].view(np.uint8), 0, xt, 0, sv[i], 0, corr, 0, dsc, 0, nsb)
                    continue
                h = dot_lanes_s(v[i], 0, xt, 0, sv[i], 0, dsc, 0, nsb)
                if tid == IQ1_S_ID:
                    # sumi1 = sum over 32-chunks of (bsum pair) * delta sign * ls; accum1 += d * sumi1
                    accum1 = F32(0.0)
                    for s in range(nsb):
                        sumi1 = 0
                        for ib in range(8):
                            bs = np.int64(xbs[t, s * 16 + 2 * ib]) + np.int64(xbs[t, s * 16 + 2 * ib + 1])
                            sumi1 += bs * dsg[i, s * 8 + ib] * np.int64(sv[i, s * 128 + 16 * ib])
                        accum1 = fmaf(dsc[s], F32(sumi1), accum1)
                    out[t, r] = fmaf(IQ1_DELTA, accum1, h)
                elif tid == IQ1_M_ID:
                    h2 = dot_lanes_s(dl[i], 0, xt, 0, sv[i], 0, dsc, 0, nsb)
                    out[t, r] = fmaf(IQ1_DELTA, h2, h)
                else:
                    out[t, r] = factor * h


def _product(qtype, grid):
    tid = int(qtype)
    factor = F32(_FACTOR[tid])

    def product(w, xc, out):
        _mm_iq(w, xc[0], xc[1], xc[2], out, tid, factor, grid, KSIGNS)

    product.__name__ = f"matmul_{qtype.name.lower()}"
    product.__doc__ = f"{qtype.name} weights times Q8_K activations (module docstring: vec_dot < 8 tokens, tiled >= 8)."
    return product


matmul_iq2_xxs = _product(_T.IQ2_XXS, GRID_IQ2XXS)
matmul_iq2_xs = _product(_T.IQ2_XS, GRID_IQ2XS)
matmul_iq2_s = _product(_T.IQ2_S, GRID_IQ2S)
matmul_iq3_xxs = _product(_T.IQ3_XXS, GRID_IQ3XXS)
matmul_iq3_s = _product(_T.IQ3_S, GRID_IQ3S)
matmul_iq1_s = _product(_T.IQ1_S, GRID_IQ1S)
matmul_iq1_m = _product(_T.IQ1_M, GRID_IQ1S)
matmul_iq4_xs = _product(_T.IQ4_XS, GRID_IQ1S)  # (no grid)
matmul_tq1_0 = _product(_T.TQ1_0, GRID_IQ1S)
matmul_tq2_0 = _product(_T.TQ2_0, GRID_IQ1S)
