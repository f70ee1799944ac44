"""Triton kernels for batch-1 decode on the torch/CUDA backend (ggquant/runtime/cuda.py).

A decode step multiplies every weight matrix by one activation row: it is bound by the bytes
of weight read. torch's path for a quantized matrix (dequantize to float32, then a GEMM) reads
the blocks, writes and re-reads a float32 copy - or keeps that copy, 4-8x the bytes of the
blocks. These kernels read each weight byte once, in the (repacked) block format, and also fuse
the small per-row operations (RMS norm, norm + RoPE, GELU * up) into one launch each, because
at batch 1 a step is ~40 kernels per layer and their launch/tail cost dominates otherwise
(research note anchor-cuda-h100.md: llama.cpp spends 2.7-3.8 ms per token outside weight
streaming on E4B).

Layouts (built once at load by dequant.py's repack_<type>; each holds exactly ggml's values; the
bytes read per token are the GGUF's own for Q8_0, plus 1/8 bit per element for Q4_K; Q4_0/Q5_0/
Q6_K widen their codes to int8 (legacy types: 8.5 bits, Q6_K: 10 bits per element, still ~3x
fewer bytes than a float32 copy)):
  int8  q int8 [N, K] with scale [N, K/G]: Q8_0, Q4_0, Q5_0 (q = the block's signed codes,
        fp16 d, G = 32) and Q6_K (q in [-32, 31], float32 d*sc per 16 columns, exact: an
        fp16 times a 6-bit int)
  Q4_K  qs uint8 [N, K/2] (the 128 qs bytes of each super-block, in order), sc, mn uint8
        [N, K/32] (the 6-bit scales/mins of get_scale_min_k4, unpacked), d, dmin fp16 [N, K/256]
  i-quants (issue 14): each block's fields de-interleaved into one array per field (dequant.py
        repack_<type> docstrings), read at the GGUF's own bits per weight: iq4_xs 4.3125 (its
        6-bit scales one per byte: +1/16), iq4_nl 4.5, iq3_s 3.4375, iq3_xxs 3.0625, iq2_s 2.5625,
        iq2_xs 2.3125 - instead of the int8 layout's 9 (8 + a float32 scale per 32) or 10 (per 16).
        Grid types gather their grid entries (iq3s/iq3xxs/iq2s/iq2xs_grid, dequant.grid_words)
        from the L1-resident table; kvalues_iq4nl and ksigns_iq2xs are computed in registers.
Products accumulate in float32 (ggml-cuda's mmvq dots also differ from the CPU's order).

Set TRITON_INTERPRET=1 to run them on CPU tensors (how they are developed off the GPU).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .dequant import grid_words, tab_iq4nl


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# --- matrix x vector --------------------------------------------------------------------------
@triton.jit
def _slot(ids_ptr, x_ptr, y_ptr, N, K, XDIV, IDS: tl.constexpr):
    """(first weight row, x row, y row) of program_id(1). IDS: a stacked-experts product (MUL_MAT_ID
    at decode): slot s multiplies expert ids[s] (rows ids[s] * N ..) by x row s // XDIV into y row
    s; otherwise one matrix, one x, one y (the grid's second axis is 1)."""
    s = tl.program_id(1)
    e = s * 0
    if IDS:
        e = tl.load(ids_ptr + s)
    return e.to(tl.int64) * N, x_ptr + (s // XDIV).to(tl.int64) * K, y_ptr + s.to(tl.int64) * N


@triton.jit
def _mv_dense(w_ptr, x_ptr, y_ptr, ids_ptr, XDIV, N, K, IDS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    e0, x_ptr, y_ptr = _slot(ids_ptr, x_ptr, y_ptr, N, K, XDIV, IDS)
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < N
    base = (rows.to(tl.int64) + e0) * K
    acc = tl.zeros((BN, BK), tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        cmask = cols < K
        w = tl.load(w_ptr + base[:, None] + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        x = tl.load(x_ptr + cols, mask=cmask, other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    tl.store(y_ptr + rows, tl.sum(acc, axis=1), mask=rmask)


@triton.jit
def _mv_int8(q_ptr, s_ptr, x_ptr, y_ptr, ids_ptr, XDIV, N, K, G: tl.constexpr, IDS: tl.constexpr, BN: tl.constexpr,
             BK: tl.constexpr):
    # int8 codes with one scale per G columns (fp16 d of Q8_0/Q4_0/Q5_0, G = 32; float32 d*sc of
    # Q6_K, G = 16): y = sum over groups of scale * (q . x)
    e0, x_ptr, y_ptr = _slot(ids_ptr, x_ptr, y_ptr, N, K, XDIV, IDS)
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < N
    r64 = rows.to(tl.int64) + e0
    nb = K // G
    acc = tl.zeros((BN, BK // G), tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        cmask = cols < K
        q = tl.load(q_ptr + r64[:, None] * K + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0)
        x = tl.load(x_ptr + cols, mask=cmask, other=0.0)
        blk = k0 // G + tl.arange(0, BK // G)
        d = tl.load(s_ptr + r64[:, None] * nb + blk[None, :], mask=rmask[:, None] & (blk < nb)[None, :], other=0.0)
        p = tl.reshape(q.to(tl.float32) * x[None, :], (BN, BK // G, G))
        acc += tl.sum(p, axis=2) * d.to(tl.float32)
    tl.store(y_ptr + rows, tl.sum(acc, axis=1), mask=rmask)


@triton.jit
def _mv_q4_k(qs_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, x_ptr, y_ptr, ids_ptr, XDIV, N, K, QS_ROW, SC_ROW,
             IDS: tl.constexpr, BN: tl.constexpr, NSB: tl.constexpr):
    # NSB super-blocks (256 columns, 128 qs bytes each) per iteration. Byte j of the tile:
    # chunk c = j // 32 (super-block c // 4), l = j % 32; its low nibble is column 64c + l
    # (sub-block 2c), its high nibble column 64c + 32 + l (sub-block 2c + 1) (ggml-common.h
    # block_q4_K, dequantize_row_q4_K: y = d*sc*q - dmin*m); sc/mn hold 8 entries per
    # super-block, so sub-block 2c of the tile is entry 8*sb0 + 2c. Dots per sub-block first,
    # then the scales (gathering the scales per byte instead measured 3x slower on the H100).
    # QS_ROW = K / 2 and SC_ROW = K / 32 come as arguments, not computed here: Triton then knows
    # they are multiples of 16 and loads a row's bytes 16 at a time.
    e0, x_ptr, y_ptr = _slot(ids_ptr, x_ptr, y_ptr, N, K, XDIV, IDS)
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < N
    r64 = rows.to(tl.int64) + e0
    nsb = K // 256
    j = tl.arange(0, 128 * NSB)
    xo = (j // 32) * 64 + j % 32
    c = tl.arange(0, 4 * NSB)
    acc = tl.zeros((BN, 4 * NSB), tl.float32)
    for sb0 in range(0, nsb, NSB):
        jm = (sb0 + j // 128) < nsb
        cm = (sb0 + c // 4) < nsb
        q = tl.load(qs_ptr + r64[:, None] * QS_ROW + sb0 * 128 + j[None, :], mask=rmask[:, None] & jm[None, :],
                    other=0)
        xlo = tl.load(x_ptr + sb0 * 256 + xo, mask=jm, other=0.0)
        xhi = tl.load(x_ptr + sb0 * 256 + 32 + xo, mask=jm, other=0.0)
        lo = tl.sum(tl.reshape((q & 15).to(tl.float32) * xlo[None, :], (BN, 4 * NSB, 32)), axis=2)
        hi = tl.sum(tl.reshape((q >> 4).to(tl.float32) * xhi[None, :], (BN, 4 * NSB, 32)), axis=2)
        slo = tl.sum(tl.reshape(xlo, (4 * NSB, 32)), axis=1)
        shi = tl.sum(tl.reshape(xhi, (4 * NSB, 32)), axis=1)
        so = r64[:, None] * SC_ROW + sb0 * 8 + 2 * c[None, :]
        m2 = rmask[:, None] & cm[None, :]
        sc_lo = tl.load(sc_ptr + so, mask=m2, other=0).to(tl.float32)
        sc_hi = tl.load(sc_ptr + so + 1, mask=m2, other=0).to(tl.float32)
        mn_lo = tl.load(mn_ptr + so, mask=m2, other=0).to(tl.float32)
        mn_hi = tl.load(mn_ptr + so + 1, mask=m2, other=0).to(tl.float32)
        do = r64[:, None] * nsb + sb0 + c[None, :] // 4
        d = tl.load(d_ptr + do, mask=m2, other=0.0).to(tl.float32)
        dm = tl.load(dm_ptr + do, mask=m2, other=0.0).to(tl.float32)
        acc += d * (sc_lo * lo + sc_hi * hi) - dm * (mn_lo * slo[None, :] + mn_hi * shi[None, :])
    tl.store(y_ptr + rows, tl.sum(acc, axis=1), mask=rmask)


@triton.jit
def _kv_iq4nl(q, w0, w1, w2, w3):
    # kvalues_iq4nl[q] for q int32 in [0, 16) as float32, from the table's 16 bytes held in 4 int32
    # words (little-endian, byte q % 4 of word q // 4): selects and a shift, no memory access
    w = tl.where(q < 8, tl.where(q < 4, w0, w1), tl.where(q < 12, w2, w3))
    return (w >> ((q & 3) * 8)).to(tl.int8).to(tl.float32)


@triton.jit
def _mv_iq4(qs_ptr, ls_ptr, d_ptr, x_ptr, y_ptr, ids_ptr, XDIV, N, K, w0, w1, w2, w3, XS: tl.constexpr,
            IDS: tl.constexpr, BN: tl.constexpr, NB: tl.constexpr):
    # NB blocks of 32 columns (16 qs bytes each) per iteration. Byte j of the tile: block c = j // 16,
    # l = j % 16; low nibble column 32c + l, high nibble 32c + 16 + l; y = scale * kvalues_iq4nl[q]
    # with scale d * (ls - 32) (XS: dequantize_row_iq4_xs, one d per 8 blocks) or d (IQ4_NL:
    # dequantize_row_iq4_nl, ls_ptr unused). Dots per block, then the scales.
    e0, x_ptr, y_ptr = _slot(ids_ptr, x_ptr, y_ptr, N, K, XDIV, IDS)
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < N
    r64 = rows.to(tl.int64) + e0
    nblk = K // 32
    j = tl.arange(0, 16 * NB)
    xo = (j // 16) * 32 + j % 16
    c = tl.arange(0, NB)
    acc = tl.zeros((BN, NB), tl.float32)
    for b0 in range(0, nblk, NB):
        jm = (b0 + j // 16) < nblk
        cm = (b0 + c) < nblk
        q = tl.load(qs_ptr + r64[:, None] * (K // 2) + b0 * 16 + j[None, :], mask=rmask[:, None] & jm[None, :],
                    other=0).to(tl.int32)
        xlo = tl.load(x_ptr + b0 * 32 + xo, mask=jm, other=0.0)
        xhi = tl.load(x_ptr + b0 * 32 + 16 + xo, mask=jm, other=0.0)
        p = _kv_iq4nl(q & 15, w0, w1, w2, w3) * xlo[None, :] + _kv_iq4nl(q >> 4, w0, w1, w2, w3) * xhi[None, :]
        dot = tl.sum(tl.reshape(p, (BN, NB, 16)), axis=2)
        m2 = rmask[:, None] & cm[None, :]
        if XS:
            ls = tl.load(ls_ptr + r64[:, None] * nblk + b0 + c[None, :], mask=m2, other=32).to(tl.float32)
            d = tl.load(d_ptr + r64[:, None] * (K // 256) + (b0 + c[None, :]) // 8, mask=m2, other=0.0).to(tl.float32)
            acc += d * (ls - 32.0) * dot
        else:
            acc += tl.load(d_ptr + r64[:, None] * nblk + b0 + c[None, :], mask=m2, other=0.0).to(tl.float32) * dot
    tl.store(y_ptr + rows, tl.sum(acc, axis=1), mask=rmask)


@triton.jit
def _ksigns(s7):
    # ksigns_iq2xs[s7] (ggml-common.h): the 7 sign bits with their parity as bit 7, computed
    p = s7 ^ (s7 >> 4)
    p = p ^ (p >> 2)
    p = p ^ (p >> 1)
    return s7 | ((p & 1) << 7)


@triton.jit
def _mv_iq3(p0, p1, p2, p3, p4, grid_ptr, x_ptr, y_ptr, ids_ptr, XDIV, N, K, XXS: tl.constexpr, IDS: tl.constexpr,
            BN: tl.constexpr, NSB: tl.constexpr):
    # NSB super-blocks per iteration, one lane per grid entry g (4 bytes: columns 4g..4g+3, byte b
    # negated where bit 4 (g % 2) + b of the sign byte of columns 8 (g // 2).. is set), then one
    # scale per 32 columns. IQ3_S (dequantize_row_iq3_s): p0..p4 = qs, qh, signs, scales, d (dequant.py
    # repack_iq3_s), index qs | qh bit << 8 into iq3s_grid, y = d * (1 + 2 ls) * grid * sign.
    # IQ3_XXS (dequantize_row_iq3_xxs): p0 = qs, p1 = aux (u32 per 32: 4 x 7-bit ksigns indices,
    # scale << 28), p2 = d; index qs into iq3xxs_grid, y = d * (0.5 + ls) * 0.5 * grid * sign.
    e0, x_ptr, y_ptr = _slot(ids_ptr, x_ptr, y_ptr, N, K, XDIV, IDS)
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < N
    r64 = rows.to(tl.int64) + e0
    nsb = K // 256
    g = tl.arange(0, 64 * NSB)
    c = tl.arange(0, 8 * NSB)
    acc = tl.zeros((BN, 8 * NSB), tl.float32)
    for sb0 in range(0, nsb, NSB):
        gm = (sb0 + g // 64) < nsb
        cm = (sb0 + c // 8) < nsb
        m = rmask[:, None] & gm[None, :]
        q = tl.load(p0 + r64[:, None] * (K // 4) + sb0 * 64 + g[None, :], mask=m, other=0).to(tl.int32)
        if XXS:
            a = tl.load(p1 + r64[:, None] * (K // 32) + sb0 * 8 + g[None, :] // 8, mask=m, other=0)
            s = _ksigns((a >> (7 * ((g[None, :] % 8) // 2))) & 127)
            e = tl.load(grid_ptr + q)
        else:
            h = tl.load(p1 + r64[:, None] * (K // 32) + sb0 * 8 + g[None, :] // 8, mask=m, other=0).to(tl.int32)
            e = tl.load(grid_ptr + (q | (((h >> (g[None, :] % 8)) & 1) << 8)))
            s = tl.load(p2 + r64[:, None] * (K // 8) + sb0 * 32 + g[None, :] // 2, mask=m, other=0).to(tl.int32)
        s = s >> ((g[None, :] % 2) * 4)
        p = tl.zeros((BN, 64 * NSB), tl.float32)
        for b in tl.static_range(4):
            v = ((e >> (8 * b)) & 255).to(tl.float32)
            xb = tl.load(x_ptr + sb0 * 256 + 4 * g + b, mask=gm, other=0.0)
            p += tl.where(((s >> b) & 1) != 0, -v, v) * xb[None, :]
        dot = tl.sum(tl.reshape(p, (BN, 8 * NSB, 8)), axis=2)
        m2 = rmask[:, None] & cm[None, :]
        if XXS:
            a = tl.load(p1 + r64[:, None] * (K // 32) + sb0 * 8 + c[None, :], mask=m2, other=0)
            d = tl.load(p2 + r64[:, None] * nsb + sb0 + c[None, :] // 8, mask=m2, other=0.0).to(tl.float32)
            acc += d * (0.5 + ((a >> 28) & 15).to(tl.float32)) * 0.5 * dot
        else:
            sc = tl.load(p3 + r64[:, None] * (K // 64) + sb0 * 4 + c[None, :] // 2, mask=m2, other=0).to(tl.int32)
            ls = (sc >> ((c[None, :] % 2) * 4)) & 15
            d = tl.load(p4 + r64[:, None] * nsb + sb0 + c[None, :] // 8, mask=m2, other=0.0).to(tl.float32)
            acc += d * (1 + 2 * ls).to(tl.float32) * dot
    tl.store(y_ptr + rows, tl.sum(acc, axis=1), mask=rmask)


@triton.jit
def _mv_iq2(p0, p1, p2, p3, p4, grid_ptr, x_ptr, y_ptr, ids_ptr, XDIV, N, K, XS: tl.constexpr, IDS: tl.constexpr,
            BN: tl.constexpr, NSB: tl.constexpr):
    # NSB super-blocks per iteration, one lane per grid entry g (8 bytes = int32 words 2 idx,
    # 2 idx + 1: columns 8g..8g+7, byte b negated where bit b of sign byte g is set), then one
    # scale per 16 columns, y = d * (0.5 + ls) * 0.25 * grid * sign. IQ2_S (dequantize_row_iq2_s):
    # p0..p4 = qs, signs, qh, scales, d (dequant.py repack_iq2_s), index qs | 2 qh bits << 8 into
    # iq2s_grid. IQ2_XS (dequantize_row_iq2_xs): p0 = qs int16 (9-bit iq2xs_grid index | 7-bit
    # ksigns index << 9), p1 = scales, p2 = d.
    e0, x_ptr, y_ptr = _slot(ids_ptr, x_ptr, y_ptr, N, K, XDIV, IDS)
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < N
    r64 = rows.to(tl.int64) + e0
    nsb = K // 256
    g = tl.arange(0, 32 * NSB)
    c = tl.arange(0, 16 * NSB)
    acc = tl.zeros((BN, 16 * NSB), tl.float32)
    for sb0 in range(0, nsb, NSB):
        gm = (sb0 + g // 32) < nsb
        cm = (sb0 + c // 16) < nsb
        m = rmask[:, None] & gm[None, :]
        q = tl.load(p0 + r64[:, None] * (K // 8) + sb0 * 32 + g[None, :], mask=m, other=0).to(tl.int32)
        if XS:
            q = q & 0xFFFF
            idx = 2 * (q & 511)
            s = _ksigns(q >> 9)
        else:
            h = tl.load(p2 + r64[:, None] * (K // 32) + sb0 * 8 + g[None, :] // 4, mask=m, other=0).to(tl.int32)
            idx = 2 * (q | (((h >> (2 * (g[None, :] % 4))) & 3) << 8))
            s = tl.load(p1 + r64[:, None] * (K // 8) + sb0 * 32 + g[None, :], mask=m, other=0).to(tl.int32)
        lo = tl.load(grid_ptr + idx)
        hi = tl.load(grid_ptr + idx + 1)
        p = tl.zeros((BN, 32 * NSB), tl.float32)
        for b in tl.static_range(8):
            if b < 4:
                v = ((lo >> (8 * b)) & 255).to(tl.float32)
            else:
                v = ((hi >> (8 * (b - 4))) & 255).to(tl.float32)
            xb = tl.load(x_ptr + sb0 * 256 + 8 * g + b, mask=gm, other=0.0)
            p += tl.where(((s >> b) & 1) != 0, -v, v) * xb[None, :]
        dot = tl.sum(tl.reshape(p, (BN, 16 * NSB, 2)), axis=2)
        m2 = rmask[:, None] & cm[None, :]
        so = r64[:, None] * (K // 32) + sb0 * 8 + c[None, :] // 2
        do = r64[:, None] * nsb + sb0 + c[None, :] // 16
        if XS:
            sc = tl.load(p1 + so, mask=m2, other=0).to(tl.int32)
            d = tl.load(p2 + do, mask=m2, other=0.0).to(tl.float32)
        else:
            sc = tl.load(p3 + so, mask=m2, other=0).to(tl.int32)
            d = tl.load(p4 + do, mask=m2, other=0.0).to(tl.float32)
        ls = ((sc >> ((c[None, :] % 2) * 4)) & 15).to(tl.float32)
        acc += d * (0.5 + ls) * 0.25 * dot
    tl.store(y_ptr + rows, tl.sum(acc, axis=1), mask=rmask)


_IQ4NL_WORDS: list = []


def _iq4nl_words() -> list:
    """kvalues_iq4nl (ggquant's table) as 4 signed int32 words, for _kv_iq4nl."""
    if not _IQ4NL_WORDS:
        import numpy as np

        from ..quants.iq4 import KVALUES_IQ4NL

        _IQ4NL_WORDS.extend(int(w) for w in np.frombuffer(KVALUES_IQ4NL.tobytes(), "<i4"))
    return _IQ4NL_WORDS


def _block_rows(n: int, target_programs: int = 528) -> int:
    """Rows per program: enough programs to fill the GPU (132 SMs x 4 on the H100), at most 64."""
    bn = 64
    while bn > 1 and (n + bn - 1) // bn < target_programs:
        bn //= 2
    return bn


# (rows per program at most, columns per iteration (q4_k, iq3_*, iq2_*: super-blocks of 256; iq4_xs,
# iq4_nl: blocks of 32), num_warps): the best
# over E4B's matrix shapes on the H100, weights read cold from HBM (bench/matvec_tune.py):
# bf16 2990 GB/s, Q8_0 2630 GB/s, Q4_K 1460 GB/s
MV_CONFIG = {"dense": (16, 512, 4), "int8": (16, 512, 4), "q4_k": (16, 2, 4),
             "iq4_xs": (16, 16, 4), "iq4_nl": (16, 16, 4), "iq3_s": (16, 2, 4), "iq3_xxs": (16, 2, 4),
             "iq2_s": (16, 2, 4), "iq2_xs": (16, 2, 4)}


def matvec(torch, kind: str, parts: tuple, x, n: int, k: int, config=None, ids=None, xdiv: int = 1):
    """x float32 [k] (contiguous) -> float32 [n]: the product of the weight (parts in the layout
    of `kind`) with x. ids (int32 [S] on the device): the weight holds stacked experts of n rows
    each, and slot s multiplies expert ids[s] by x row s // xdiv (x [S / xdiv, k]) -> [S, n]
    (ggml_mul_mat_id at decode: the routing stays on the device)."""
    slots = 1 if ids is None else ids.numel()
    y = torch.empty((n,) if ids is None else (slots, n), dtype=torch.float32, device=x.device)
    bn_max, bk, warps = config or MV_CONFIG[kind]
    bn = min(bn_max, _block_rows(n * slots))
    if kind == "q4_k" and config is None:
        # per shape, the best of bench/matvec_tune.py on an H200 (E4B's shapes, weights cold):
        # rows of up to 4096 want 4 super-blocks per step and at least 4 rows per program
        # (2560x10240: 15.8 us vs 22.7 at (4, 2); 2048x2560: 5.7 vs 7.4), the tied output one
        bn, bk = (max(4, bn), 4) if n <= 4096 else ((32, 1) if n >= 65536 else (bn, bk))
    grid = ((n + bn - 1) // bn, slots)
    slot = (x if ids is None else ids, xdiv, n, k)
    kw = dict(IDS=ids is not None, BN=bn, num_warps=warps)
    if kind == "dense":
        _mv_dense[grid](parts[0], x, y, *slot, BK=bk, **kw)
    elif kind == "int8":
        _mv_int8[grid](parts[0], parts[1], x, y, *slot, G=k // parts[1].shape[1], BK=bk, **kw)
    elif kind == "q4_k":
        _mv_q4_k[grid](*parts, x, y, *slot, k // 2, k // 32, NSB=bk, **kw)
    elif kind == "iq4_xs":
        _mv_iq4[grid](*parts, x, y, *slot, *_iq4nl_words(), XS=True, NB=bk, **kw)
    elif kind == "iq4_nl":
        _mv_iq4[grid](parts[0], parts[0], parts[1], x, y, *slot, *_iq4nl_words(), XS=False, NB=bk, **kw)
    elif kind in ("iq3_s", "iq3_xxs", "iq2_s", "iq2_xs"):
        p = tuple(parts) + (parts[0],) * (5 - len(parts))
        fn, flag = {"iq3_s": (_mv_iq3, False), "iq3_xxs": (_mv_iq3, True), "iq2_s": (_mv_iq2, False),
                    "iq2_xs": (_mv_iq2, True)}[kind]
        fn[grid](*p, grid_words(torch, kind, x.device), x, y, *slot, flag, NSB=bk, **kw)
    else:
        raise ValueError(kind)
    return y


# --- row-wise operations ----------------------------------------------------------------------
@triton.jit
def _rms_norm(x_ptr, w_ptr, r_ptr, y_ptr, D, eps, HAS_W: tl.constexpr, HAS_R: tl.constexpr,
              BD: tl.constexpr):
    """y = (r +) x / sqrt(mean(x^2) + eps) (* w), one row per program (ggml_rms_norm, then the
    graph's mul by the norm weight and add of the residual)."""
    row = tl.program_id(0).to(tl.int64) * D
    i = tl.arange(0, BD)
    m = i < D
    x = tl.load(x_ptr + row + i, mask=m, other=0.0)
    s = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    y = x * s
    if HAS_W:
        y = y * tl.load(w_ptr + i, mask=m, other=0.0)
    if HAS_R:
        y = y + tl.load(r_ptr + row + i, mask=m, other=0.0)
    tl.store(y_ptr + row + i, y, mask=m)


def rms_norm(torch, x, w, eps: float, residual=None):
    """x [..., D] float32 -> same shape; w [D] or None; residual (same shape as x) added after."""
    x = x.contiguous()
    D = x.shape[-1]
    y = torch.empty_like(x)
    rows = x.numel() // D
    r = residual.contiguous() if residual is not None else x
    _rms_norm[(rows,)](x, w if w is not None else x, r, y, D, float(eps), HAS_W=w is not None,
                       HAS_R=residual is not None, BD=_pow2(D))
    return y


@triton.jit
def _norm_rope(x_ptr, w_ptr, pos_ptr, cos_ptr, sin_ptr, y_ptr, H, D, HALF, eps,
               NORM: tl.constexpr, HAS_W: tl.constexpr, ROPE: tl.constexpr, BD: tl.constexpr):
    """One head of one token: optional RMS norm over its D values (times w), then NeoX RoPE of
    the first 2*HALF dims at the token's position (ggml_rope_ext, mode NEOX: pairs i, i+HALF)."""
    pid = tl.program_id(0)
    t = pid // H
    row = pid.to(tl.int64) * D
    i = tl.arange(0, BD)
    m = i < D
    x = tl.load(x_ptr + row + i, mask=m, other=0.0)
    if ROPE:
        partner = tl.where(i < HALF, i + HALF, tl.where(i < 2 * HALF, i - HALF, i))
        xp = tl.load(x_ptr + row + partner, mask=m, other=0.0)
    if NORM:
        s = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        x = x * s
        if HAS_W:
            x = x * tl.load(w_ptr + i, mask=m, other=0.0)
        if ROPE:
            xp = xp * s
            if HAS_W:
                xp = xp * tl.load(w_ptr + partner, mask=m, other=0.0)
    if ROPE:
        p = tl.load(pos_ptr + t).to(tl.int64)
        rot = i < 2 * HALF
        f = tl.where(i < HALF, i, i - HALF)
        c = tl.load(cos_ptr + p * HALF + f, mask=m & rot, other=1.0)
        sn = tl.load(sin_ptr + p * HALF + f, mask=m & rot, other=0.0)
        x = tl.where(i < HALF, x * c - xp * sn, tl.where(rot, xp * sn + x * c, x))
    tl.store(y_ptr + row + i, x, mask=m)


def norm_rope(torch, x, w, eps, pos, cos, sin, norm: bool, rope: bool):
    """x [T, H, D] float32; pos int64 [T] on the device; cos/sin [P, HALF] -> new [T, H, D]."""
    x = x.contiguous()
    T, H, D = x.shape
    y = torch.empty_like(x)
    half = cos.shape[1] if rope else 0
    _norm_rope[(T * H,)](x, w if w is not None else x, pos if rope else x, cos if rope else x,
                         sin if rope else x, y, H, D, half, float(eps), NORM=norm,
                         HAS_W=w is not None, ROPE=rope, BD=_pow2(D))
    return y


@triton.jit
def _geglu(g_ptr, u_ptr, t_ptr, y_ptr, n, TABLE: tl.constexpr, HAS_U: tl.constexpr, B: tl.constexpr):
    """y = gelu(g) (* u). TABLE: ggml's CPU GELU (vec.h, GGML_GELU_FP16: 0 below -10, x above 10,
    else the table entry at fp16(x)), which the CPU backend reproduces; otherwise the tanh
    formula of ggml-cuda's op_gelu: 0.5 x (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2)))."""
    i = tl.program_id(0).to(tl.int64) * B + tl.arange(0, B)
    m = i < n
    g = tl.load(g_ptr + i, mask=m, other=0.0)
    if TABLE:
        bits = g.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        y = tl.load(t_ptr + bits, mask=m, other=0.0)
        y = tl.where(g >= 10.0, g, tl.where(g <= -10.0, 0.0, y))
    else:
        z = 0.7978845608028654 * g * (1.0 + 0.044715 * g * g)
        th = 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)  # tanh(z), saturating to +-1 without inf/inf
        y = 0.5 * g * (1.0 + th)
    if HAS_U:
        y = y * tl.load(u_ptr + i, mask=m, other=0.0)
    tl.store(y_ptr + i, y, mask=m)


def geglu(torch, g, u, table):
    """gelu(g) * u (u None: gelu(g)); table: ggml's fp16 GELU table as float32 [65536], or None
    for the tanh formula."""
    g = g.contiguous()
    u = u.contiguous() if u is not None else g
    y = torch.empty_like(g)
    n = g.numel()
    _geglu[((n + 1023) // 1024,)](g, u, table if table is not None else g, y, n, TABLE=table is not None,
                                  HAS_U=u is not g, B=1024)
    return y


# --- attention of one query token (flash decoding) ----------------------------------------------
ATTN_SPLIT = 32  # cache positions per program (parallelism at short contexts); merged by _attn_merge


@triton.jit
def _attn_decode(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, pm_ptr, pl_ptr, n_kv, kv_stride, window, scale, G, D,
                 NS, SPLIT: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, FINAL: tl.constexpr):
    """Query head h against cache positions [sp*SPLIT, (sp+1)*SPLIT) of KV head h // G, with an
    online softmax; positions after the query's, or `window` (> 0) or more behind it, are
    masked. FINAL: one split, write softmax(s) v; else the unnormalised partial (acc, max, sum)."""
    h = tl.program_id(0)
    sp = tl.program_id(1)
    kvh = h // G
    p = tl.load(pos_ptr)
    d = tl.arange(0, BD)
    dm = d < D
    q = tl.load(q_ptr + h * D + d, mask=dm, other=0.0)
    base = kvh.to(tl.int64) * kv_stride
    m_i = -1.0e30
    l_i = 0.0
    acc = tl.zeros((BD,), tl.float32)
    end = tl.minimum(sp * SPLIT + SPLIT, n_kv)
    for s0 in range(sp * SPLIT, end, BS):
        j = s0 + tl.arange(0, BS)
        inside = j < end
        ok = inside & (j <= p) & ((window == 0) | (p - j < window))
        off = base + j[:, None].to(tl.int64) * D + d[None, :]
        kb = tl.load(k_ptr + off, mask=inside[:, None] & dm[None, :], other=0.0)
        s = tl.where(ok, tl.sum(kb * q[None, :], axis=1) * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        e = tl.exp(s - m_new)
        vb = tl.load(v_ptr + off, mask=inside[:, None] & dm[None, :], other=0.0)
        l_i = l_i * alpha + tl.sum(e, axis=0)
        acc = acc * alpha + tl.sum(e[:, None] * vb, axis=0)
        m_i = m_new
    if FINAL:
        tl.store(o_ptr + h * D + d, acc / l_i, mask=dm)
    else:
        tl.store(o_ptr + (h * NS + sp) * D + d, acc, mask=dm)
        tl.store(pm_ptr + h * NS + sp, m_i)
        tl.store(pl_ptr + h * NS + sp, l_i)


@triton.jit
def _attn_merge(a_ptr, pm_ptr, pl_ptr, o_ptr, NS, D, BN: tl.constexpr, BD: tl.constexpr):
    h = tl.program_id(0)
    i = tl.arange(0, BN)
    d = tl.arange(0, BD)
    m = tl.load(pm_ptr + h * NS + i, mask=i < NS, other=-1.0e30)
    l = tl.load(pl_ptr + h * NS + i, mask=i < NS, other=0.0)
    w = tl.exp(m - tl.max(m, axis=0))
    a = tl.load(a_ptr + (h * NS + i[:, None]) * D + d[None, :], mask=(i < NS)[:, None] & (d < D)[None, :], other=0.0)
    tl.store(o_ptr + h * D + d, tl.sum(w[:, None] * a, axis=0) / tl.sum(w * l, axis=0), mask=d < D)


def attention_decode(torch, q, k, v, pos, n_kv: int, window: int, scale: float):
    """q [H, D] float32; k, v [Hkv, n_ctx, D] (the cache); pos int64 [1] on the device -> [H, D]."""
    H, D = q.shape
    hkv, n_ctx, _ = k.shape
    bd = _pow2(D)
    bs = max(1, min(ATTN_SPLIT, 8192 // bd))
    ns = -(-n_kv // ATTN_SPLIT)
    out = torch.empty((H, D), dtype=torch.float32, device=q.device)
    args = (n_kv, n_ctx * D, int(window), float(scale), H // hkv, D, ns)
    if ns == 1:
        _attn_decode[(H, 1)](q, k, v, pos, out, out, out, *args, SPLIT=ATTN_SPLIT, BS=bs, BD=bd, FINAL=True,
                             num_warps=8)
        return out
    part = torch.empty((H, ns, D), dtype=torch.float32, device=q.device)
    pm = torch.empty((H, ns), dtype=torch.float32, device=q.device)
    pl = torch.empty((H, ns), dtype=torch.float32, device=q.device)
    _attn_decode[(H, ns)](q, k, v, pos, part, pm, pl, *args, SPLIT=ATTN_SPLIT, BS=bs, BD=bd, FINAL=False,
                          num_warps=8)
    _attn_merge[(H,)](part, pm, pl, out, ns, D, BN=_pow2(ns), BD=bd)
    return out


# --- batched products (prefill, T > 1): tensor cores on dequantized tiles ------------------------
# Two ways to multiply T activation rows by a block-format weight (issue 17, measured against each
# other by bench/prefill_matmul.py):
#   dequant_half + cuBLAS: the weight dequantized to fp16 (bf16 for BF16 weights) in one pass, then
#     torch.mm with float32 accumulation; this is llama.cpp's own large-batch path for types
#     without MMQ (ggml-cuda.cu ggml_cuda_op_mul_mat_cublas: src0 converted with
#     ggml_get_to_fp16_cuda, src1 to fp16, cublasGemmEx with float32 compute);
#   matmul_q: one Triton kernel that dequantizes each [BN, BK] weight tile in registers and feeds
#     tl.dot, so the fp16 copy never goes through device memory.
# The values fed to the tensor cores are the float32 dequantization (ggml's dequantize_row_<type>,
# the same arithmetic as dequantize_parts) rounded once to fp16; products accumulate in float32.
@triton.jit
def _w_tile(p0, p1, p2, p3, p4, tab, rows, cols, rmask, K, KIND: tl.constexpr, G: tl.constexpr):
    """float32 [BN, BK] values of the weight at rows x cols (cols < K everywhere) from its repacked
    parts. KIND 0: int8 codes q [N, K] with scale [N, K/G] (y = s * q); KIND 1: Q4_K (qs, sc, mn,
    d, dmin, triton.py's layout docstring; y = d*sc*q - dmin*m, dequantize_row_q4_K); KIND 2..7:
    IQ4_XS, IQ3_S, IQ2_S, IQ4_NL, IQ3_XXS, IQ2_XS (dequant.py repack_<type>; tab: kvalues_iq4nl int8 /
    grid_words); KIND 8: the stored values of a dense weight. Each value as ggml's factors in ggml's
    order (dequantize_parts)."""
    r64 = rows.to(tl.int64)[:, None]
    m = rmask[:, None]
    if KIND == 2 or KIND == 5:
        byte = (cols // 32) * 16 + cols % 16
        b = tl.load(p0 + r64 * (K // 2) + byte[None, :], mask=m, other=0).to(tl.int32)
        kv = tl.load(tab + tl.where(((cols // 16) % 2 == 1)[None, :], b >> 4, b & 15)).to(tl.float32)
        if KIND == 5:
            return tl.load(p1 + r64 * (K // 32) + (cols // 32)[None, :], mask=m, other=0.0).to(tl.float32) * kv
        else:
            ls = tl.load(p1 + r64 * (K // 32) + (cols // 32)[None, :], mask=m, other=32).to(tl.int32)
            d = tl.load(p2 + r64 * (K // 256) + (cols // 256)[None, :], mask=m, other=0.0).to(tl.float32)
            return (d * (ls - 32).to(tl.float32)) * kv
    elif KIND == 3 or KIND == 6:  # IQ3_S, IQ3_XXS
        g = (cols // 4)[None, :]
        q = tl.load(p0 + r64 * (K // 4) + g, mask=m, other=0).to(tl.int32)
        if KIND == 6:
            a = tl.load(p1 + r64 * (K // 32) + (cols // 32)[None, :], mask=m, other=0)
            e = tl.load(tab + q)
            s = _ksigns((a >> (7 * ((cols // 8) % 4))[None, :]) & 127)
        else:
            h = tl.load(p1 + r64 * (K // 32) + (cols // 32)[None, :], mask=m, other=0).to(tl.int32)
            e = tl.load(tab + (q | (((h >> (g % 8)) & 1) << 8)))
            s = tl.load(p2 + r64 * (K // 8) + (cols // 8)[None, :], mask=m, other=0).to(tl.int32)
        v = (e >> (8 * (cols % 4))[None, :]) & 255
        v = tl.where(((s >> (cols % 8)[None, :]) & 1) != 0, -v, v).to(tl.float32)
        if KIND == 6:
            d = tl.load(p2 + r64 * (K // 256) + (cols // 256)[None, :], mask=m, other=0.0).to(tl.float32)
            return ((d * (0.5 + ((a >> 28) & 15).to(tl.float32))) * 0.5) * v
        else:
            sc = tl.load(p3 + r64 * (K // 64) + (cols // 64)[None, :], mask=m, other=0).to(tl.int32)
            ls = (sc >> (4 * ((cols // 32) % 2))[None, :]) & 15
            d = tl.load(p4 + r64 * (K // 256) + (cols // 256)[None, :], mask=m, other=0.0).to(tl.float32)
            return (d * (1 + 2 * ls).to(tl.float32)) * v
    elif KIND == 4 or KIND == 7:  # IQ2_S, IQ2_XS
        g = (cols // 8)[None, :]
        q = tl.load(p0 + r64 * (K // 8) + g, mask=m, other=0).to(tl.int32)
        if KIND == 7:
            q = q & 0xFFFF
            idx = q & 511
            s = _ksigns(q >> 9)
            sc = tl.load(p1 + r64 * (K // 32) + (cols // 32)[None, :], mask=m, other=0).to(tl.int32)
            d = tl.load(p2 + r64 * (K // 256) + (cols // 256)[None, :], mask=m, other=0.0).to(tl.float32)
        else:
            h = tl.load(p2 + r64 * (K // 32) + (cols // 32)[None, :], mask=m, other=0).to(tl.int32)
            idx = q | (((h >> (2 * (g % 4))) & 3) << 8)
            s = tl.load(p1 + r64 * (K // 8) + g, mask=m, other=0).to(tl.int32)
            sc = tl.load(p3 + r64 * (K // 32) + (cols // 32)[None, :], mask=m, other=0).to(tl.int32)
            d = tl.load(p4 + r64 * (K // 256) + (cols // 256)[None, :], mask=m, other=0.0).to(tl.float32)
        e = tl.load(tab + 2 * idx + ((cols % 8) // 4)[None, :])
        v = (e >> (8 * (cols % 4))[None, :]) & 255
        v = tl.where(((s >> (cols % 8)[None, :]) & 1) != 0, -v, v).to(tl.float32)
        ls = ((sc >> (4 * ((cols // 16) % 2))[None, :]) & 15).to(tl.float32)
        return ((d * (0.5 + ls)) * 0.25) * v
    elif KIND == 8:  # dense (F32 / F16 / BF16 stored values)
        return tl.load(p0 + r64 * K + cols[None, :], mask=m, other=0.0).to(tl.float32)
    elif KIND == 0:
        q = tl.load(p0 + r64 * K + cols[None, :], mask=m, other=0).to(tl.float32)
        s = tl.load(p1 + r64 * (K // G) + (cols // G)[None, :], mask=m, other=0.0).to(tl.float32)
        return s * q
    else:
        # column k: super-block k // 256, chunk c = (k % 256) // 64 of 32 bytes, byte l = k % 32,
        # low nibble for the first 32 columns of the chunk, high nibble for the next 32
        kk = cols % 256
        byte = (cols // 256) * 128 + (kk // 64) * 32 + kk % 32
        b = tl.load(p0 + r64 * (K // 2) + byte[None, :], mask=m, other=0).to(tl.int32)
        q = tl.where(((kk // 32) % 2 == 1)[None, :], b >> 4, b & 15).to(tl.float32)
        sub = r64 * (K // 32) + (cols // 32)[None, :]
        sc = tl.load(p1 + sub, mask=m, other=0).to(tl.float32)
        mn = tl.load(p2 + sub, mask=m, other=0).to(tl.float32)
        sb = r64 * (K // 256) + (cols // 256)[None, :]
        d = tl.load(p3 + sb, mask=m, other=0.0).to(tl.float32)
        dm = tl.load(p4 + sb, mask=m, other=0.0).to(tl.float32)
        return (d * sc) * q - (dm * mn)


@triton.jit
def _dequant_half(p0, p1, p2, p3, p4, tab, y_ptr, N, K, KIND: tl.constexpr, G: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    rmask = rows < N
    w = _w_tile(p0, p1, p2, p3, p4, tab, rows, cols, rmask, K, KIND, G)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], w.to(y_ptr.dtype.element_ty),
             mask=rmask[:, None])


@triton.jit
def _dequant_half_q4_k(qs_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, y_ptr, N, K, QS_ROW, SC_ROW, BN: tl.constexpr):
    # one super-block column (256 values) of BN rows per program: its 128 qs bytes load
    # contiguously (16 at a time, see _mv_q4_k), byte j's nibbles go to columns 64*(j // 32) +
    # j % 32 (low) and that + 32 (high); the same float32 arithmetic as _w_tile's KIND 1
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    sb = tl.program_id(1)
    m = (rows < N)[:, None]
    r64 = rows.to(tl.int64)[:, None]
    j = tl.arange(0, 128)[None, :]
    b = tl.load(qs_ptr + r64 * QS_ROW + sb * 128 + j, mask=m, other=0).to(tl.int32)
    sub = r64 * SC_ROW + sb * 8 + 2 * (j // 32)
    d = tl.load(d_ptr + r64 * (K // 256) + sb, mask=m, other=0.0).to(tl.float32)
    dm = tl.load(dm_ptr + r64 * (K // 256) + sb, mask=m, other=0.0).to(tl.float32)
    out = y_ptr + r64 * K + sb * 256 + (j // 32) * 64 + j % 32
    for h in tl.static_range(2):
        sc = tl.load(sc_ptr + sub + h, mask=m, other=0).to(tl.float32)
        mn = tl.load(mn_ptr + sub + h, mask=m, other=0).to(tl.float32)
        q = ((b >> (4 * h)) & 15).to(tl.float32)
        tl.store(out + 32 * h, ((d * sc) * q - (dm * mn)).to(y_ptr.dtype.element_ty), mask=m)


_KINDS = {"int8": 0, "q4_k": 1, "iq4_xs": 2, "iq3_s": 3, "iq2_s": 4, "iq4_nl": 5, "iq3_xxs": 6, "iq2_xs": 7}
TILE_KINDS = tuple(_KINDS)  # the layouts dequant_half / matmul_q read


def _parts5(torch, kind, parts):
    """The kernels' (p0..p4, tab) arguments and G for a layout."""
    p = tuple(parts) + (parts[0],) * (5 - len(parts))
    g = 0
    if kind == "int8":
        g = parts[0].shape[1] // parts[1].shape[1]
    if kind in ("iq4_xs", "iq4_nl"):
        tab = tab_iq4nl(torch, parts[0].device)
    elif kind in ("iq3_s", "iq3_xxs", "iq2_s", "iq2_xs"):
        tab = grid_words(torch, kind, parts[0].device)
    else:
        tab = parts[0]
    return p + (tab,), g


def dequant_half(torch, kind: str, parts: tuple, n: int, k: int, dtype=None):
    """The weight (a TILE_KINDS layout) as fp16 (or dtype) [n, k]: float32 dequantization rounded once.
    k must be a multiple of 64 (every block type's rows are: 32 or 256 values per block)."""
    y = torch.empty((n, k), dtype=dtype or torch.float16, device=parts[0].device)
    if kind == "q4_k":
        bn = 16
        _dequant_half_q4_k[((n + bn - 1) // bn, k // 256)](*parts, y, n, k, k // 2, k // 32, BN=bn, num_warps=4)
        return y
    p, g = _parts5(torch, kind, parts)
    bn, bk = 32, 64
    _dequant_half[((n + bn - 1) // bn, k // bk)](*p, y, n, k, KIND=_KINDS[kind], G=g, BN=bn, BK=bk, num_warps=4)
    return y


@triton.jit
def _mm_q(x_ptr, p0, p1, p2, p3, p4, tab, y_ptr, M, N, K, KIND: tl.constexpr, G: tl.constexpr, BM: tl.constexpr,
          BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    """y [M, N] float32 = x [M, K] (fp16) @ W^T, W dequantized tile by tile (_w_tile) to fp16."""
    pid = tl.program_id(0)
    nm = tl.cdiv(M, BM)
    nn = tl.cdiv(N, BN)
    # grouped ordering: GROUP weight-column tiles share their x tiles in L2 (Triton's matmul tutorial)
    per = GROUP * nm
    g0 = (pid // per) * GROUP
    gs = tl.minimum(nn - g0, GROUP)
    pn = g0 + (pid % per) % gs
    pm = (pid % per) // gs
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    mmask = rm < M
    nmask = rn < N
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * K + cols[None, :], mask=mmask[:, None], other=0.0)
        w = _w_tile(p0, p1, p2, p3, p4, tab, rn, cols, nmask, K, KIND, G).to(x_ptr.dtype.element_ty)
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], acc, mask=mmask[:, None] & nmask[None, :])


# (BM, BN, BK, num_warps, num_stages): bench/prefill_matmul.py picks among these on the GPU
MM_CONFIG = {"int8": (128, 128, 64, 8, 3), "q4_k": (128, 128, 64, 8, 3), "iq4_xs": (128, 128, 64, 8, 3),
             "iq3_s": (128, 128, 64, 8, 3), "iq2_s": (128, 128, 64, 8, 3), "iq4_nl": (128, 128, 64, 8, 3),
             "iq3_xxs": (128, 128, 64, 8, 3), "iq2_xs": (128, 128, 64, 8, 3)}


def matmul_q(torch, kind: str, parts: tuple, x, n: int, k: int, config=None):
    """x fp16 [M, k] (contiguous) times the weight (a TILE_KINDS layout, [n, k]) transposed ->
    float32 [M, n]. k must be a multiple of BK (64)."""
    M = x.shape[0]
    y = torch.empty((M, n), dtype=torch.float32, device=x.device)
    p, g = _parts5(torch, kind, parts)
    bm, bn, bk, warps, stages = config or MM_CONFIG[kind]
    grid = (triton.cdiv(M, bm) * triton.cdiv(n, bn),)
    _mm_q[grid](x, *p, y, M, n, k, KIND=_KINDS[kind], G=g, BM=bm, BN=bn, BK=bk, GROUP=8, num_warps=warps,
                num_stages=stages)
    return y


# --- stacked experts (ggml_mul_mat_id) for T > 1: one grouped product per expert stack ------------
@triton.jit
def _mm_id(x_ptr, p0, p1, p2, p3, p4, tab, y_ptr, te_ptr, tr_ptr, tn_ptr, order_ptr, N, K, XDIV,
           KIND: tl.constexpr, G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Tile t of the routed slots sorted by expert: expert te[t], its slots order[tr[t] ..
    tr[t] + tn[t]) (tn[t] <= BM; 0 for the spare tiles of the upper-bound grid); slot s reads x row
    s // XDIV (fp16/bf16) and writes y row s (float32) = x @ W[e]^T, W[e] dequantized tile by tile
    (_w_tile) at rows e * N .."""
    t = tl.program_id(0)
    e = tl.load(te_ptr + t).to(tl.int64)
    n_rows = tl.load(tn_ptr + t)
    i = tl.arange(0, BM)
    valid = i < n_rows
    slot = tl.load(order_ptr + tl.load(tr_ptr + t) + i, mask=valid, other=0).to(tl.int64)
    xrow = slot // XDIV
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    nmask = rn < N
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, tl.where(n_rows > 0, K, 0), BK):  # spare tiles skip the loop
        cols = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + xrow[:, None] * K + cols[None, :], mask=valid[:, None], other=0.0)
        w = _w_tile(p0, p1, p2, p3, p4, tab, e * N + rn, cols, nmask, K, KIND, G).to(x_ptr.dtype.element_ty)
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(y_ptr + slot[:, None] * N + rn[None, :], acc, mask=valid[:, None] & nmask[None, :])


# (BN, BK, num_warps, num_stages); BM follows the rows per expert (matmul_id)
MM_ID_CONFIG = (64, 64, 4, 3)


def matmul_id(torch, kind: str, parts: tuple, x, ids, xdiv: int, n: int, k: int, n_expert: int, config=None):
    """Stacked experts W [n_expert * n, k] (a TILE_KINDS layout or "dense") times routed rows:
    y[s] = x[s // xdiv] @ W[ids[s]]^T for the S slots of ids (int [S] on the device); x fp16/bf16
    [S / xdiv, k] -> float32 [S, n]. The slots are sorted by expert and cut into tiles of BM rows
    with torch ops on the device (no host synchronisation: capturable in a CUDA graph); the grid
    has room for the worst case, sum over experts of ceil(rows / BM) <= S / BM + min(E, S)."""
    S = ids.numel()
    flat = ids.reshape(-1).long()
    bn, bk, warps, stages = config or MM_ID_CONFIG
    bm = 64 if S >= 48 * n_expert else (32 if S >= 24 * n_expert else 16)  # the rows an expert gets on average
    dev = x.device
    order = torch.argsort(flat, stable=True).to(torch.int32)
    counts = torch.zeros(n_expert, dtype=torch.int64, device=dev)  # (torch.bincount reads its max on the host)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    tiles = (counts + bm - 1) // bm
    tile_end = torch.cumsum(tiles, 0)
    t = torch.arange(S // bm + min(n_expert, S) + 1, device=dev)
    te = torch.searchsorted(tile_end, t, right=True).clamp_(max=n_expert - 1)  # spare tiles: any expert
    local = t - (tile_end - tiles)[te]
    tr = ((torch.cumsum(counts, 0) - counts)[te] + local * bm).to(torch.int32)
    tn = (counts[te] - local * bm).clamp_(0, bm).to(torch.int32)  # 0 past the expert's rows
    y = torch.empty((S, n), dtype=torch.float32, device=dev)
    if kind == "dense":
        p, g, kid = (parts[0],) * 6, 0, 8
    else:
        p, g = _parts5(torch, kind, parts)
        kid = _KINDS[kind]
    _mm_id[(t.numel(), triton.cdiv(n, bn))](x, *p, y, te.to(torch.int32), tr, tn, order, n, k, xdiv, KIND=kid, G=g,
                                            BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages)
    return y


# --- attention of a batch of queries (prefill, T > 1): flash attention -----------------------------
# One program per (block of BM query rows, KV head, slice of BV output dims). A KV head's G query
# heads share its rows (row = token * G + head in the group), so each key/value block loaded from
# the cache serves G heads, as the torch path's grouped bmm does. The keys the rows can see are
# streamed in blocks of BN with an online softmax (FlashAttention-2's forward: Dao 2023,
# arXiv:2307.08691), so the [T, n_kv] scores never go through device memory as they do on the
# torch path (baddbmm + float32 mask + softmax + bmm); key blocks hidden from every row (after
# the last row's position, or `window` or more behind the first's) are not visited.
# Large heads (Gemma 4: D = 256, 512) would not fit a [BM, D] accumulator plus the float32 k/v tiles
# in registers: q.k is summed over D in chunks of BK (q re-read per chunk, L1-resident), and the
# output dims are split over programs in slices of BV (each recomputes the scores: cheaper than
# spilling).
# Precision: q (times the scale), k, the softmax weights p and v enter tl.dot as fp16, products
# accumulate in float32, and the running max / sum / rescaling stay float32. fp16 (10-bit
# mantissa) rather than bf16 (7): attention activations stay far inside fp16's range (Gemma's q
# and k are RMS-normed), so fp16 rounds 8x finer at the same tensor-core speed. llama.cpp's CUDA
# prefill attention rounds the same operands: its K/V cache is F16 by default (common.h
# cache_type_k/v), and its flash attention converts Q to half and scales it (fattn-mma-f16.cuh:
# tile_Q = scale_h2 * make_half2(...)). p in [0, 1] loses only absolute 2^-25 below fp16's normal
# range. The sum l is taken over the rounded p, so the output is an exact convex combination of
# the fp16 v values (one rounding per weight): tests/runtime/test_cuda_kernels.py bounds the
# difference from float64 by these roundings. The limit is fp16's range: a scaled q or a k/v
# element above 65504 overflows (as in llama.cpp's F16 cache).
@triton.jit
def _attn_q(q_ptr, qrow, rm, d, D, scale):
    """fp16 [BM, len(d)] tile of q * scale (rows qrow of q viewed as [T*H, D])."""
    x = tl.load(q_ptr + qrow[:, None] * D + d[None, :], mask=rm[:, None] & (d < D)[None, :], other=0.0)
    return (x * scale).to(tl.float16)


@triton.jit
def _attn_prefill(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, T, H, n_kv, kv_stride, window, scale, G, D,
                  BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """o[t, h, dims of this slice] = softmax over the visible keys j (j <= pos[t] and
    pos[t] - j < window; no window: a window longer than any context) of q[t, h] . k[j] times
    v[j], for the query heads h = kvh * G .. kvh * G + G - 1 of KV head kvh."""
    blk = tl.num_programs(0) - 1 - tl.program_id(0)  # the last rows (the most keys) start first
    kvh = tl.program_id(1)
    r = blk * BM + tl.arange(0, BM)
    rm = r < T * G
    t = r // G
    qrow = t * H + kvh * G + r % G  # int32 offsets from per-program base pointers
    p = tl.load(pos_ptr + t, mask=rm, other=0).to(tl.int32)
    pmax = tl.max(tl.where(rm, p, -1), axis=0)
    pmin = tl.min(tl.where(rm, p, pmax), axis=0)
    hi = tl.minimum(pmax + 1, n_kv)
    lo = tl.maximum(pmin - window + 1, 0)
    k_ptr += kvh.to(tl.int64) * kv_stride
    v_ptr += kvh.to(tl.int64) * kv_stride
    dk = tl.arange(0, BK)
    dv = tl.program_id(2) * BV + tl.arange(0, BV)
    if BK == BD:
        q = _attn_q(q_ptr, qrow, rm, dk, D, scale)
    m_i = tl.full((BM,), -1.0e30, tl.float32)  # finite: a row with nothing visible yet gets weights 0, not NaN
    l_i = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, BV), tl.float32)
    for s0 in range(lo, hi, BN):
        j = s0 + tl.arange(0, BN)
        inside = j < hi
        if BK == BD:
            kb = tl.load(k_ptr + j[:, None] * D + dk[None, :], mask=inside[:, None] & (dk < D)[None, :], other=0.0)
            s = tl.dot(q, tl.trans(kb.to(tl.float16)))  # [BM, BN] float32
        else:
            s = tl.zeros((BM, BN), tl.float32)
            for c in tl.static_range(BD // BK):
                d = c * BK + dk
                kb = tl.load(k_ptr + j[:, None] * D + d[None, :], mask=inside[:, None] & (d < D)[None, :], other=0.0)
                s = tl.dot(_attn_q(q_ptr, qrow, rm, d, D, scale), tl.trans(kb.to(tl.float16)), s)
        ok = inside[None, :] & (j[None, :] <= p[:, None]) & (p[:, None] - j[None, :] < window)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        e = tl.exp(s - m_new[:, None]).to(tl.float16)
        l_i = l_i * alpha + tl.sum(e.to(tl.float32), axis=1)
        vb = tl.load(v_ptr + j[:, None] * D + dv[None, :], mask=inside[:, None] & (dv < D)[None, :], other=0.0)
        acc = tl.dot(e, vb.to(tl.float16), acc * alpha[:, None])
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # l = 0 only in the padding rows (not stored)
    tl.store(o_ptr + qrow[:, None] * D + dv[None, :], out, mask=rm[:, None] & (dv < D)[None, :])


# (BM, BN, BK, BV, num_warps, num_stages) per head dimension rounded up to a power of 2: chosen so
# that the kernel compiles for sm_90 without register spills (ptxas -v on the PTX Triton 3.6
# generates: bench/attention_cuda.py --compile-only) and, for E4B's prefill (T = 512, H = 8, Hkv = 2),
# gives ~128 programs for an H100's 132 SMs; bench/attention_cuda.py times candidates on the GPU.
ATTN_PREFILL_CONFIG = {16: (128, 64, 16, 16, 8, 2), 32: (128, 64, 32, 32, 8, 2), 64: (128, 64, 64, 64, 8, 2),
                       128: (128, 32, 64, 128, 8, 2), 256: (64, 32, 64, 128, 4, 2), 512: (64, 32, 128, 256, 8, 2)}


def attention_prefill(torch, q, k, v, pos, n_kv: int, window: int, scale: float, config=None):
    """q [T, H, D] float32 (contiguous); k, v [Hkv, n_ctx, D] float32 (the cache); pos int64 [T]
    on the device (the queries' positions) -> [T, H, D] float32, attending over cache positions
    0 .. n_kv-1 (query head h uses KV head h // (H / Hkv)). No host synchronisation: capturable
    in a CUDA graph."""
    T, H, D = q.shape
    hkv, n_ctx, _ = k.shape
    bd = max(16, _pow2(D))  # tl.dot needs K >= 16
    # heads above 512 (no supported model has one): one stage, 147 KB of shared memory at D = 1024
    bm, bn, bk, bv, warps, stages = config or ATTN_PREFILL_CONFIG.get(bd, (64, 32, 128, 256, 8, 1))
    bk, bv = min(bk, bd), min(bv, bd)
    out = torch.empty((T, H, D), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(T * (H // hkv), bm), hkv, bd // bv)
    win = int(window) if window > 0 else 1 << 30
    _attn_prefill[grid](q, k, v, pos, out, T, H, n_kv, n_ctx * D, win, float(scale), H // hkv, D,
                        BM=bm, BN=bn, BD=bd, BK=bk, BV=bv, num_warps=warps, num_stages=stages)
    return out
