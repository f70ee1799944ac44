"""Exact transcoding kernels: integer codes with one scale (and offset) per 32 values -> GGML
legacy blocks, checked against the values they must carry, in one pass per row.

Input is what ggquant.quant.transcode calls AffineBlocks: codes u int16 [rows, n], block scales
d float32 [rows, n/32] and, for the offset types, block offsets m float32 [rows, n/32], meaning
w = d*u (+ m). The kernels write ggml-common.h's layouts and then read every block back the way
ggml's dequantize_row_* does (ggml-quants.c) and compare it, as float32 bits, with the value the
source defines (float32(u) * d, + m): a block that does not hold its values exactly (a scale or
offset fp16 cannot store, a code out of range) is reported, never written silently.

    block_q4_0 {fp16 d; u8 qs[16]}               qs[j] = q[j] | q[j+16] << 4, w = d*(q-8)
    block_q5_0 {fp16 d; u8 qh[4]; u8 qs[16]}     qh bit j = bit 4 of q[j],   w = d*(q-16)
    block_q8_0 {fp16 d; i8 qs[32]}                                           w = d*q
    block_q4_1 {fp16 d, m; u8 qs[16]}                                        w = d*q + m
    block_q5_1 {fp16 d, m; u8 qh[4]; u8 qs[16]}                              w = d*q + m

Result per row: -1 when every block is exact, else the index of the first block that is not
(the caller then takes the general path in ggquant.quant.transcode, which can also fold offsets
and rewrite constant blocks). Rows are independent: deterministic for any thread count.
"""

import numba as nb
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as _T

from ..common import F32, JIT, f32_bits, fp16_to_fp32, fp32_to_fp16, get_u16, put_u16

QK = GGML_QUANT_SIZES[_T.Q4_0][0]  # 32, for all five types

# kind codes (entry-kernel argument): symmetric types store q = u + OFFSET; offset types q = u
Q4_0, Q5_0, Q8_0, Q4_1, Q5_1 = 0, 1, 2, 3, 4
KINDS = {_T.Q4_0: Q4_0, _T.Q5_0: Q5_0, _T.Q8_0: Q8_0, _T.Q4_1: Q4_1, _T.Q5_1: Q5_1}
_BYTES = np.array([GGML_QUANT_SIZES[t][1] for t in (_T.Q4_0, _T.Q5_0, _T.Q8_0, _T.Q4_1, _T.Q5_1)], dtype=np.int64)
_LO = np.array([-8, -16, -128, 0, 0], dtype=np.int64)  # allowed code range per kind
_HI = np.array([7, 15, 127, 15, 31], dtype=np.int64)
_HEAD = np.array([2, 6, 2, 4, 8], dtype=np.int64)  # bytes before qs


@nb.njit(cache=True, inline="always")
def _fp16_of(x):
    """(fp16 bits, True) when fp16 holds x exactly (GGML_FP32_TO_FP16 then back) and x is finite
    (a NaN scale would round-trip too: refused, as the general packer does), else (_, False)."""
    h = fp32_to_fp16(x)
    finite = (h & np.uint16(0x7C00)) != np.uint16(0x7C00)
    return h, finite and f32_bits(fp16_to_fp32(h)) == f32_bits(x)


@nb.njit(**JIT)
def _row_nibbles(u, d, m, kind, out):
    """Q4_0 / Q5_0 / Q4_1 / Q5_1: codes as nibbles (+ a fifth bit in qh); one pass per block that
    packs, then decodes the bytes just written as dequantize_row_* does and compares."""
    five = kind == Q5_0 or kind == Q5_1
    offset_type = kind >= Q4_1
    nbytes = _BYTES[kind]
    head = _HEAD[kind]
    lo = _LO[kind]
    span = _HI[kind] - lo  # q = u - lo must lie in [0, span]
    half = QK // 2
    for ib in range(u.size // QK):
        xo = ib * QK
        oo = ib * nbytes
        dv = d[ib]
        hd, ok = _fp16_of(dv)
        if not ok:
            return ib
        mv = F32(0.0)
        hm = np.uint16(0)
        if offset_type:
            mv = m[ib]
            hm, ok = _fp16_of(mv)
            if not ok:
                return ib
            put_u16(out, oo + 2, hm)
        put_u16(out, oo, hd)
        dd = fp16_to_fp32(get_u16(out, oo))  # read back as ggml reads the block
        mm = fp16_to_fp32(get_u16(out, oo + 2)) if offset_type else F32(0.0)
        qh = np.uint32(0)
        for j in range(half):
            c0 = np.int32(u[xo + j])
            c1 = np.int32(u[xo + j + half])
            q0 = c0 - np.int32(lo)
            q1 = c1 - np.int32(lo)
            if q0 < 0 or q0 > span or q1 < 0 or q1 > span:
                return ib
            out[oo + head + j] = np.uint8((q0 & 0x0F) | ((q1 & 0x0F) << 4))
            byte = np.int32(out[oo + head + j])
            # decode: low nibble (| bit 4 from qh) - 8/16 (sym) or q*d + m (offset)
            r0 = byte & 0x0F
            r1 = byte >> 4
            if five:
                qh |= np.uint32((q0 >> 4) & 1) << np.uint32(j)
                qh |= np.uint32((q1 >> 4) & 1) << np.uint32(j + half)
                r0 |= q0 & 0x10
                r1 |= q1 & 0x10
            if offset_type:
                v0 = F32(r0) * dd + mm
                v1 = F32(r1) * dd + mm
                s0 = F32(c0) * dv + mv
                s1 = F32(c1) * dv + mv
            else:
                v0 = F32(r0 + np.int32(lo)) * dd
                v1 = F32(r1 + np.int32(lo)) * dd
                s0 = F32(c0) * dv
                s1 = F32(c1) * dv
            if f32_bits(v0) != f32_bits(s0) or f32_bits(v1) != f32_bits(s1):
                return ib
        if five:
            hpos = oo + (2 if kind == Q5_0 else 4)
            for t in range(4):  # little-endian u32
                out[hpos + t] = np.uint8((qh >> np.uint32(8 * t)) & np.uint32(0xFF))
            # the qh bits were decoded from q0/q1 above; check the stored word round-trips
            back = np.uint32(0)
            for t in range(4):
                back |= np.uint32(out[hpos + t]) << np.uint32(8 * t)
            if back != qh:
                return ib
    return -1


@nb.njit(**JIT)
def _row_q8_0(u, d, out):
    """Q8_0: d, then the codes as int8; decode (int8 * d) and compare."""
    nbytes = _BYTES[Q8_0]
    for ib in range(u.size // QK):
        xo = ib * QK
        oo = ib * nbytes
        dv = d[ib]
        hd, ok = _fp16_of(dv)
        if not ok:
            return ib
        put_u16(out, oo, hd)
        dd = fp16_to_fp32(get_u16(out, oo))
        for j in range(QK):
            c = np.int32(u[xo + j])
            if c < -128 or c > 127:
                return ib
            out[oo + 2 + j] = np.uint8(c & 0xFF)
            v = F32(np.int8(out[oo + 2 + j])) * dd
            if f32_bits(v) != f32_bits(F32(c) * dv):
                return ib
    return -1


@nb.njit(parallel=True, **JIT)
def _pack(u, d, m, kind, out, bad):
    for r in nb.prange(u.shape[0]):
        if kind == Q8_0:
            bad[r] = _row_q8_0(u[r], d[r], out[r])
        else:
            bad[r] = _row_nibbles(u[r], d[r], m[r], kind, out[r])


def pack_exact(qtype, u: np.ndarray, d: np.ndarray, m: np.ndarray | None = None):
    """(uint8 [rows, row_bytes], bad int64 [rows]) for codes u, scales d (, offsets m); see module doc.

    Symmetric types take signed codes (w = d*u, no m); offset types unsigned codes (w = d*u + m,
    m = 0 when None). bad[r] is -1 or the first block of row r that is not exact (its bytes are
    then unspecified).
    """
    kind = KINDS[_T(qtype)]
    if m is not None and kind < Q4_1:
        raise ValueError("symmetric block types take no offsets")
    u = np.ascontiguousarray(u, dtype=np.int16)
    rows, n = u.shape
    if n % QK:
        raise ValueError(f"rows of {n} values are not whole {QK}-value blocks")
    d = np.ascontiguousarray(d, dtype=np.float32).reshape(rows, n // QK)
    if kind >= Q4_1 and m is None:
        m = np.zeros_like(d)
    m = np.ascontiguousarray(m if m is not None else np.zeros((rows, 1), np.float32), dtype=np.float32)
    out = np.empty((rows, n // QK * int(_BYTES[kind])), dtype=np.uint8)
    bad = np.empty(rows, dtype=np.int64)
    _pack(u, d, m, kind, out, bad)
    return out, bad
