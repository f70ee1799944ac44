"""CPU products of the low-bit types whose activation is Q8_0 (32-value blocks): IQ4_NL, MXFP4, NVFP4, Q1_0,
in the float order of the kernel llama.cpp's CPU backend runs on x86 for each batch and row count:

IQ4_NL, MXFP4 with a multiple of 8 rows: CPU_REPACK (iq4_nl_8x8 / mxfp4_8x8: arch/x86/repack.cpp
    gemv/gemm_q4_b32_8x8_q8_0_lut_avx, the Q4_0 template with another value table): each output is
    one float lane, acc = fma(float(sum of a block's 32 products), d_w * d_x, acc) block after block.
IQ4_NL otherwise: batches of >= 2 tokens through llamafile's tinyBLAS_Q0_AVX (8 int32 lanes per block
    fused-multiply-added by d_w * d_x into 8 float lanes, one hsum: matmul.dot_blocks_q8), one token
    through ggml_vec_dot_iq4_nl_q8_0: blocks in pairs, the even ones into accum1 and the odd ones into
    accum2 (lanes times d_x * d_w), hsum_float_8(accum1 + accum2), then a scalar fma for an odd last
    block. MXFP4 otherwise: ggml_vec_dot_mxfp4_q8_0 (the same pair order), whatever the batch.
NVFP4: ggml_vec_dot_nvfp4_q8_0: per 64 values two Q8_0 blocks, lanes 0-3 and 4-7 of each scaled by
    their own UE4M3 scale times d_x, one accumulator.
Q1_0: ggml_vec_dot_q1_0_q8_0: per 128 values the four Q8_0 blocks of +-x (the weight's sign bits)
    combined as d_x0 * S_0 then fma(d_xk, S_k, .), then fma(d_w, that, acc).

Values are unpacked once per chunk of ROWS weight rows to signed int8 (kvalues_iq4nl / kvalues_fp4 /
+-1) plus float scales, as in matmul.py; tests/runtime/test_matmul.py checks every type, shape and
batch size against ggml's own mul_mat graph bit for bit.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from gguf import GGMLQuantizationType

from ..common import FP16_TO_FP32, JIT, get_u16
from ..quants import iq4, lowbit
from .matmul import ISA, ROWS
from .simd import QK8_0, dot_b32_halves, dot_b32_pairs, dot_b32_q1_0, dot_blocks_q8, dot_i16_i8, fmaf

_T = GGMLQuantizationType
F32 = np.float32

KVALUES_IQ4NL = iq4.KVALUES_IQ4NL  # int8 [16]
KVALUES_FP4 = lowbit.KVALUES_MXFP4.astype(np.int8)  # ggml-common.h kvalues_fp4 (doubled E2M1)
E8M0_HALF = lowbit.E8M0_TO_FP32_HALF
UE4M3_HALF = lowbit.UE4M3_TO_FP32_HALF

IQ4_NL_ID, MXFP4_ID, NVFP4_ID, Q1_0_ID = (int(t) for t in (_T.IQ4_NL, _T.MXFP4, _T.NVFP4, _T.Q1_0))


@nb.njit(**JIT)
def _unpack_row(tid, b, v, dw):
    """One weight row -> v int8 [K] (the values) and dw float32 (IQ4_NL / MXFP4: per 32; NVFP4: per
    16; Q1_0: per 128)."""
    if tid == IQ4_NL_ID or tid == MXFP4_ID:
        nbytes = 18 if tid == IQ4_NL_ID else 17
        qo = 2 if tid == IQ4_NL_ID else 1
        for i in range(b.size // nbytes):
            o = i * nbytes
            if tid == IQ4_NL_ID:
                dw[i] = FP16_TO_FP32[get_u16(b, o)]
            else:
                dw[i] = E8M0_HALF[b[o]]
            for j in range(16):
                q = b[o + qo + j]
                if tid == IQ4_NL_ID:
                    v[32 * i + j] = KVALUES_IQ4NL[q & 15]
                    v[32 * i + 16 + j] = KVALUES_IQ4NL[q >> 4]
                else:
                    v[32 * i + j] = KVALUES_FP4[q & 15]
                    v[32 * i + 16 + j] = KVALUES_FP4[q >> 4]
    elif tid == NVFP4_ID:
        for i in range(b.size // 36):
            o = i * 36
            for s in range(4):
                dw[4 * i + s] = UE4M3_HALF[b[o + s]]
                for j in range(8):
                    q = b[o + 4 + 8 * s + j]
                    v[64 * i + 16 * s + j] = KVALUES_FP4[q & 15]
                    v[64 * i + 16 * s + 8 + j] = KVALUES_FP4[q >> 4]
    else:  # Q1_0
        for i in range(b.size // 18):
            o = i * 18
            dw[i] = FP16_TO_FP32[get_u16(b, o)]
            for j in range(128):
                v[128 * i + j] = 1 if (b[o + 2 + j // 8] >> (j % 8)) & 1 else -1


@nb.njit(parallel=True, **JIT)
def _mm_b32(w, xq, xd, out, tid, repacked, fused_tail):
    N = w.shape[0]
    T, K = xq.shape
    nb_ = K // QK8_0
    nscale = K // 16 if tid == NVFP4_ID else (K // 128 if tid == Q1_0_ID else nb_)
    for c in nb.prange((N + ROWS - 1) // ROWS):
        r0 = c * ROWS
        r1 = min(N, r0 + ROWS)
        v = np.empty((ROWS, K), np.int8)
        dw = np.empty((ROWS, nscale), np.float32)
        sc = np.empty(2 * nb_, np.float32)
        for r in range(r0, r1):
            _unpack_row(tid, w[r], v[r - r0], dw[r - r0])
        for t in range(T):
            xt = xq[t]
            for r in range(r0, r1):
                i = r - r0
                if tid == IQ4_NL_ID or tid == MXFP4_ID:
                    if repacked:
                        acc = F32(0.0)
                        for b in range(nb_):
                            isum = dot_i16_i8(v[i], b * QK8_0, xt, b * QK8_0, QK8_0)
                            acc = fmaf(F32(isum), dw[i, b] * xd[t, b], acc)
                        out[t, r] = acc
                    elif tid == IQ4_NL_ID and T >= 2:  # llamafile tinyBLAS_Q0_AVX
                        out[t, r] = dot_blocks_q8(v[i], 0, QK8_0, xt, 0, dw[i], 0, xd[t], 0, nb_)
                    else:  # ggml_vec_dot_{iq4_nl,mxfp4}_q8_0
                        for b in range(nb_):
                            sc[2 * b] = xd[t, b] * dw[i, b]
                        npair = nb_ - nb_ % 2
                        res = dot_b32_pairs(v[i], 0, xt, 0, sc, 0, npair)
                        if nb_ % 2:
                            b = nb_ - 1
                            isum = dot_i16_i8(v[i], b * QK8_0, xt, b * QK8_0, QK8_0)
                            # `sumf += d * (sumi1 + sumi2)`: GCC contracts it to an fma in the AVX2
                            # build, not in the AVX-512 one (measured against both builds' graphs)
                            if fused_tail:
                                res = fmaf(sc[2 * b], F32(isum), res)
                            else:
                                res = res + sc[2 * b] * F32(isum)
                        out[t, r] = res
                elif tid == NVFP4_ID:
                    for b in range(nb_):  # Q8_0 block b: NVFP4 sub-blocks 2b, 2b+1
                        sc[2 * b] = dw[i, 2 * b] * xd[t, b]
                        sc[2 * b + 1] = dw[i, 2 * b + 1] * xd[t, b]
                    out[t, r] = dot_b32_halves(v[i], 0, xt, 0, sc, 0, nb_)
                else:  # Q1_0
                    for b in range(nb_):
                        sc[2 * b] = xd[t, b]
                        if b % 4 == 0:
                            sc[2 * b + 1] = dw[i, b // 4]
                    out[t, r] = dot_b32_q1_0(v[i], 0, xt, 0, sc, 0, nb_)


def _product(qtype):
    tid = int(qtype)
    repack = qtype in (_T.IQ4_NL, _T.MXFP4)  # CPU_REPACK 8x8 on AVX2 hosts, for a multiple of 8 rows

    def product(w, xc, out):
        _mm_b32(w, xc[0], xc[1], out, tid, repack and w.shape[0] % 8 == 0, not ISA.avx512)

    product.__name__ = f"matmul_{qtype.name.lower()}"
    product.__doc__ = f"{qtype.name} weights times Q8_0 activations (module docstring for the kernel per batch)."
    return product


matmul_iq4_nl = _product(_T.IQ4_NL)
matmul_mxfp4 = _product(_T.MXFP4)
matmul_nvfp4 = _product(_T.NVFP4)
matmul_q1_0 = _product(_T.Q1_0)
