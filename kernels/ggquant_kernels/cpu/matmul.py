"""Fused dequantize-dot kernels: y[T, N] = x[T, K] @ W[N, K]^T with W kept in its GGML block format.

This is what ggml-cpu's ggml_compute_forward_mul_mat does, and how it does it:

- The activation x is first converted to the weight type's ``vec_dot_type`` (actquant.py).
- Each weight block is then dotted with the matching activation block in integers (exact) and
  the integer sum is scaled in float32, as in ggml's ggml_vec_dot_<type>_q8_<0|K>. Integer
  parts are exact, so results differ from ggml only in the order of the float32 sums of the
  per-block terms (ggml's AVX2 paths keep 8 float lanes, tinyBLAS/repack use tiles).

Layout of the work: rows of W are processed in chunks of ROWS rows (prange over chunks, so
results do not depend on the thread count). A chunk's rows are unpacked once into int8
scratch (values in ggml's signed/unsigned quant range) plus per-block scales, then each of the
T activation rows is dotted with every row of the chunk while both sit in L1/L2. With T = 1
this is the matrix-vector product of token-by-token decoding.

One product per weight type, each ``matmul_<type>(w, xc, out)``: w uint8 [N, row_bytes] (GGUF
rows), xc the activation as actquant.convert_activation returns it for the type's vec_dot_type,
out float32 [T, N]. Which type uses which product and activation is declared once, in the type's
registry entry (ggquant.quant.types); the hot inner dots are the LLVM primitives of simd.py.
"""

from __future__ import annotations

import os

import numba as nb
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..common import FP16_TO_FP32, JIT, get_u16
from ..qsearch import get_scale_min_k4
from .simd import (
    DOT_BF16_DP,
    DOT_BF16_VEC8,
    DOT_BF16_VEC16,
    DOT_GEMM,
    DOT_GEMM16,
    DOT_GEMM_DP,
    DOT_VEC,
    DOT_VEC16,
    DOT_VEC16_F16,
    DOT_VEC_F16,
    Q4_0_BYTES,
    Q5_0_BYTES,
    Q8_0_BYTES,
    QK8_0,
    QK_K,
    dot_blocks_q8,
    dot_f32,
    dot_i16_i8,
    dot_kqv_s,
    dot_kqv_u,
    dot_q6k_lanes,
    dot_row_q4_0,
    dot_row_q5_0,
    dot_row_q8_0,
    fmaf,
    host_has,
    store_splat16,
    unpack32_kq,
    unpack32_q0,
)

_T = GGMLQuantizationType
F32 = np.float32

Q4_K_BYTES = GGML_QUANT_SIZES[_T.Q4_K][1]  # d | dmin | scales[12] | qs[128]
Q5_K_BYTES = GGML_QUANT_SIZES[_T.Q5_K][1]  # d | dmin | scales[12] | qh[32] | qs[128]
Q6_K_BYTES = GGML_QUANT_SIZES[_T.Q6_K][1]  # ql[128] | qh[64] | scales[16] int8 | d

ROWS = 16  # weight rows per parallel work item (unpacked together, reused for all T tokens)

FLOAT_KIND = {_T.F32: 0, _T.F16: 1, _T.BF16: 2}  # _mm_float's kind argument


class CpuIsa:
    """Which of ggml-cpu's x86 kernels llama.cpp runs, by the ISA its CPU backend was compiled for.

    llama-cpp-python builds ggml for the machine it is installed on (GGML_NATIVE), so the host's
    features decide: AVX-512F switches ggml_vec_dot_f32/f16 to 4 x 16 lanes (simd-mappings.h),
    tinyBLAS to __m512 (llamafile/sgemm.cpp) and the softmax to 16-lane ggml_v_expf (vec.cpp);
    AVX512_BF16 switches BF16 products to vdpbf16ps. The quantized kernels give the same results on
    AVX2 and AVX-512 hosts (their integer parts are exact and their float order is per lane:
    quants.c, arch/x86/repack.cpp, tiled/tiled-kernel.cpp, checked by tests/runtime/test_matmul.py
    against ggml's own graph), but for the scalar tail of the IQ4_NL vec_dot (b32matmul). Not emulated: AVX512_FP16 hosts (native fp16 F16 products) and AMX
    hosts (the AMX buffer type takes Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K/IQ4_XS products); see `unmatched`.
    """

    def __init__(self, avx512: bool, avx512_bf16: bool = False, avx512_fp16: bool = False, amx: bool = False):
        self.avx512 = avx512
        self.avx512_bf16 = avx512_bf16 and avx512
        self.lanes = 16 if avx512 else 8  # softmax chunks (AVX-512F with AVX-512DQ, which every AVX-512 x86 has)
        self.kq_mode = DOT_VEC16 if avx512 else DOT_VEC
        self.unmatched = ([] if not avx512_fp16 else ["F16 products (AVX512_FP16 arithmetic)"]) + (
            [] if not amx else ["Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K/IQ4_XS products (AMX tiles)"])

    @classmethod
    def host(cls) -> "CpuIsa":
        """This host's kernels, or those named by $GGQUANT_CPU_ISA (avx2 | avx512 | avx512-bf16):
        to check the emulation of another build of llama.cpp (e.g. an AVX2 libggml-cpu) here."""
        forced = os.environ.get("GGQUANT_CPU_ISA", "").lower()
        if forced:
            if forced not in ("avx2", "avx512", "avx512-bf16"):
                raise ValueError(f"GGQUANT_CPU_ISA={forced!r}: expected avx2, avx512 or avx512-bf16")
            return cls(forced != "avx2", forced == "avx512-bf16")
        return cls(host_has("avx512f"), host_has("avx512bf16"), host_has("avx512fp16"), host_has("amx-int8"))

    @property
    def name(self) -> str:
        return "AVX-512" + (" + BF16" if self.avx512_bf16 else "") if self.avx512 else "AVX2"

    def float_mode(self, qtype, T: int, N: int, K: int) -> int:
        """The dot mode of a float product (weights [N, K] of qtype, T tokens): ggml_vec_dot, or
        tinyBLAS where llamafile_sgemm takes it (T >= 2, K a multiple of its vector step, N of 4:
        tinyBLAS::matmul)."""
        if qtype == _T.BF16 and self.avx512_bf16:
            vec, gemm, step = DOT_BF16_DP, DOT_GEMM_DP, 32
        elif self.avx512:
            vec = {_T.F32: DOT_VEC16, _T.F16: DOT_VEC16_F16, _T.BF16: DOT_BF16_VEC16}[qtype]
            gemm, step = DOT_GEMM16, 16
        else:
            vec = {_T.F32: DOT_VEC, _T.F16: DOT_VEC_F16, _T.BF16: DOT_BF16_VEC8}[qtype]
            gemm, step = DOT_GEMM, 8
        return gemm if T >= 2 and K % step == 0 and N % 4 == 0 else vec


ISA = CpuIsa.host()


# =============================================================================================
# Matrix products per weight type. w: uint8 [N, row_bytes] (GGUF rows); out: float32 [T, N].
# =============================================================================================


@nb.njit(parallel=True, **JIT)
def _mm_float(w, x, out, kind, mode):
    """Float weights times float activations, one ggml_vec_dot / tinyBLAS order (`mode`) for all.

    kind 0: F32 weights (w float32 [N, K]); 1: F16 (w uint16, x already rounded to fp16);
    2: BF16 (w uint16, x already rounded to bf16). Rows are widened to float32 per chunk."""
    N, K = w.shape
    T = x.shape[0]
    for c in nb.prange((N + ROWS - 1) // ROWS):
        r0 = c * ROWS
        r1 = min(N, r0 + ROWS)
        wf = np.empty((ROWS if kind != 0 else 0, K), np.float32)
        wb = wf.view(np.uint32)
        for r in range(r0, r1):
            for k in range(K if kind != 0 else 0):
                if kind == 1:
                    wf[r - r0, k] = FP16_TO_FP32[w[r, k]]
                else:
                    wb[r - r0, k] = np.uint32(w[r, k]) << np.uint32(16)
        for t in range(T):
            xt = x[t]
            for r in range(r0, r1):
                row = w[r].view(np.float32) if kind == 0 else wf[r - r0]
                out[t, r] = dot_f32(row, 0, xt, 0, K, mode)


@nb.njit(parallel=True, **JIT)
def _mm_q8_0(w, xq, xd, out):
    """Q8_0 x Q8_0 (ggml_vec_dot_q8_0_q8_0), dotted in place: no unpacking."""
    N = w.shape[0]
    T, K = xq.shape
    nb_ = K // QK8_0
    if T == 1:  # decode: every weight byte is used once, read the blocks in place
        for c in nb.prange((N + ROWS - 1) // ROWS):
            for r in range(c * ROWS, min(N, c * ROWS + ROWS)):
                out[0, r] = dot_row_q8_0(w[r], 0, xq[0], 0, xd[0], 0, nb_)
        return
    for c in nb.prange((N + ROWS - 1) // ROWS):
        r0 = c * ROWS
        r1 = min(N, r0 + ROWS)
        dw = np.empty((ROWS, nb_), np.float32)
        for r in range(r0, r1):
            for b in range(nb_):
                dw[r - r0, b] = FP16_TO_FP32[get_u16(w[r], b * Q8_0_BYTES)]
        for t in range(T):
            xt = xq[t]
            xdt = xd[t]
            for r in range(r0, r1):
                out[t, r] = dot_blocks_q8(w[r], 2, Q8_0_BYTES, xt, 0, dw[r - r0], 0, xdt, 0, nb_)


@nb.njit(**JIT)
def _dot_q0_rows(q, dw, xq, xd, out, r0, r1):
    """Shared tail of Q4_0 / Q5_0: unpacked int8 quants q [ROWS, K] x Q8_0 activations."""
    T, K = xq.shape
    nb_ = K // QK8_0
    for t in range(T):
        xt = xq[t]
        xdt = xd[t]
        for r in range(r0, r1):
            out[t, r] = dot_blocks_q8(q[r - r0], 0, QK8_0, xt, 0, dw[r - r0], 0, xdt, 0, nb_)


@nb.njit(parallel=True, **JIT)
def _mm_q4_0(w, xq, xd, out):
    """Q4_0 x Q8_0: quants (nibble - 8).

    With a multiple of 8 rows llama.cpp repacks the weights (CPU_REPACK, q4_0_8x8:
    arch/x86/repack.cpp gemv/gemm_q4_b32_8x8_q8_0_lut_avx): each output is one float lane,
    acc = fma(float(sum of a block's 32 products), d_w * d_x, acc) block after block. Otherwise
    ggml_vec_dot_q4_0_q8_0 (8 lanes per block, dot_blocks_q8)."""
    N = w.shape[0]
    T, K = xq.shape
    nb_ = K // QK8_0
    repacked = N % 8 == 0
    if T == 1 and not repacked:
        for c in nb.prange((N + ROWS - 1) // ROWS):
            for r in range(c * ROWS, min(N, c * ROWS + ROWS)):
                out[0, r] = dot_row_q4_0(w[r], 0, xq[0], 0, xd[0], 0, nb_)
        return
    for c in nb.prange((N + ROWS - 1) // ROWS):
        r0 = c * ROWS
        r1 = min(N, r0 + ROWS)
        q = np.empty((ROWS, K), np.int8)
        dw = np.empty((ROWS, nb_), np.float32)
        for r in range(r0, r1):
            wr = w[r]
            for b in range(nb_):
                o = b * Q4_0_BYTES
                dw[r - r0, b] = FP16_TO_FP32[get_u16(wr, o)]
                unpack32_q0(wr, o + 2, 0, 8, q[r - r0], b * QK8_0)
        if not repacked:
            _dot_q0_rows(q, dw, xq, xd, out, r0, r1)
            continue
        for t in range(T):
            for r in range(r0, r1):
                acc = F32(0.0)
                for b in range(nb_):
                    isum = dot_i16_i8(q[r - r0], b * QK8_0, xq[t], b * QK8_0, QK8_0)
                    acc = fmaf(F32(isum), dw[r - r0, b] * xd[t, b], acc)
                out[t, r] = acc


@nb.njit(parallel=True, **JIT)
def _mm_q5_0(w, xq, xd, out):
    """Q5_0 x Q8_0 (ggml_vec_dot_q5_0_q8_0): quants (nibble | qh bit << 4) - 16."""
    N = w.shape[0]
    T, K = xq.shape
    nb_ = K // QK8_0
    if T == 1:
        for c in nb.prange((N + ROWS - 1) // ROWS):
            for r in range(c * ROWS, min(N, c * ROWS + ROWS)):
                out[0, r] = dot_row_q5_0(w[r], 0, xq[0], 0, xd[0], 0, nb_)
        return
    for c in nb.prange((N + ROWS - 1) // ROWS):
        r0 = c * ROWS
        r1 = min(N, r0 + ROWS)
        q = np.empty((ROWS, K), np.int8)
        dw = np.empty((ROWS, nb_), np.float32)
        for r in range(r0, r1):
            wr = w[r]
            for b in range(nb_):
                o = b * Q5_0_BYTES
                dw[r - r0, b] = FP16_TO_FP32[get_u16(wr, o)]
                qh = (np.uint32(wr[o + 2]) | (np.uint32(wr[o + 3]) << np.uint32(8)) |
                      (np.uint32(wr[o + 4]) << np.uint32(16)) | (np.uint32(wr[o + 5]) << np.uint32(24)))
                unpack32_q0(wr, o + 6, qh, 16, q[r - r0], b * QK8_0)
        _dot_q0_rows(q, dw, xq, xd, out, r0, r1)


Q4_1_BYTES = GGML_QUANT_SIZES[_T.Q4_1][1]  # d | m | qs[16]
Q5_1_BYTES = GGML_QUANT_SIZES[_T.Q5_1][1]  # d | m | qh[4] | qs[16]


@nb.njit(parallel=True, **JIT)
def _mm_q41_51(w, xq, xd, xs, out, is_q5):
    """Q4_1 / Q5_1 x Q8_1 (arch/x86/quants.c ggml_vec_dot_q4_1_q8_1 / _q5_1_q8_1, AVX2 branch; no
    repack or tinyBLAS takes these types, so every token runs the vec_dot): per block, 8 int32
    lanes of 4 consecutive products of the unsigned quants (nibble, | qh bit << 4 for Q5_1) with
    the Q8_1 quants, converted to float and fused-multiply-added by d_w * d_x into 8 float lanes
    (dot_blocks_q8); the offsets go into one float, summs = fma(m_w, s_x, summs) block by block;
    the result is hsum_float_8(acc) + summs."""
    N = w.shape[0]
    T, K = xq.shape
    nb_ = K // QK8_0
    bb = Q5_1_BYTES if is_q5 else Q4_1_BYTES
    qoff = 8 if is_q5 else 4
    for c in nb.prange((N + ROWS - 1) // ROWS):
        r0 = c * ROWS
        r1 = min(N, r0 + ROWS)
        q = np.empty((ROWS, K), np.int8)
        dw = np.empty((ROWS, nb_), np.float32)
        mw = np.empty((ROWS, nb_), np.float32)
        for r in range(r0, r1):
            wr = w[r]
            for b in range(nb_):
                o = b * bb
                dw[r - r0, b] = FP16_TO_FP32[get_u16(wr, o)]
                mw[r - r0, b] = FP16_TO_FP32[get_u16(wr, o + 2)]
                qh = np.uint32(0)
                if is_q5:
                    qh = (np.uint32(wr[o + 4]) | (np.uint32(wr[o + 5]) << np.uint32(8)) |
                          (np.uint32(wr[o + 6]) << np.uint32(16)) | (np.uint32(wr[o + 7]) << np.uint32(24)))
                unpack32_q0(wr, o + qoff, qh, 0, q[r - r0], b * QK8_0)
        for t in range(T):
            xt = xq[t]
            xdt = xd[t]
            for r in range(r0, r1):
                summs = F32(0.0)
                for b in range(nb_):
                    summs = fmaf(mw[r - r0, b], xs[t, b], summs)
                out[t, r] = dot_blocks_q8(q[r - r0], 0, QK8_0, xt, 0, dw[r - r0], 0, xdt, 0, nb_) + summs


TILED_MIN_BATCH = 8  # tiled/tiled.cpp ggml_tiled_min_batch: the tiled k-quant kernel takes batches >= 8


@nb.njit(**JIT)
def _dot_k_rows(q, sv, mn, dw, dmw, xq, xd, xbs, out, r0, r1, repacked, is_q5):
    """Q4_K / Q5_K rows (unsigned quants q, scales expanded to 16 int16 per 32 quants in sv, 6-bit
    mins mn per 32) x Q8_K activations.

    Integers are exact: S1 = sum_k sc(k) q_k x_k, S2 = sum_j m_j (bsum_2j + bsum_2j+1) over a
    super-block, or over one pair of sub-blocks (64 quants). The float combination follows the
    kernel llama.cpp runs (xbs: the 16 bsums of each super-block of token t):

    repacked (Q4_K with a multiple of 8 rows, arch/x86/repack.cpp): tokens in groups of four go
        through ggml_gemm_q4_K_8x8_q8_K, which accumulates per pair of sub-blocks,
            acc = fma(float(S1_pair), d_w * d_x, acc);  acc_m = fma(float(S2_pair), dmin_w * d_x, acc_m)
        and the T % 4 last tokens through ggml_gemv_q4_K_8x8_q8_K, the same per super-block;
        the result is acc - acc_m.
    batches of >= 8 tokens (tiled/tiled-kernel.cpp, AVX2 and AVX512-VNNI microtiles alike):
        res = fnmadd(dmin_w, float(S2), d_w * float(S1));  acc = fma(res, d_x, acc)
    smaller batches (arch/x86/quants.c ggml_vec_dot_q4_K_q8_K / q5_K_q8_K): S1 in 8 int32 lanes per
        super-block, fused-multiply-added by d = d_x * d_w into 8 float lanes (hsum_float_8 at the
        end); the mins term -d_x * dmin_w * S2 in 4 float lanes (Q4_K: products of pairs of mins,
        movehl-summed) or in one float added per super-block (Q5_K).
    """
    T, K = xq.shape
    nsb = K // QK_K
    n_gemm = T - T % 4
    tiled = T >= TILED_MIN_BATCH
    zero_corr = np.zeros(nsb * 8, np.int32)
    dsc = np.empty(nsb, np.float32)
    for t in range(T):
        xt = xq[t]
        for r in range(r0, r1):
            i = r - r0
            qr = q[i]
            sr = sv[i]
            if not repacked and not tiled:
                acc_m = np.zeros(4, np.float32)
                summs = F32(0.0)
                for s in range(nsb):
                    dsc[s] = xd[t, s] * dw[i, s]
                    dmin = -xd[t, s] * dmw[i, s]
                    isum = 0
                    for l in range(4):
                        p = 0
                        for j in range(2 * l, 2 * l + 2):
                            p += np.int32(mn[i, s * 8 + j]) * (xbs[t, s * 16 + 2 * j] + xbs[t, s * 16 + 2 * j + 1])
                        acc_m[l] = fmaf(dmin, F32(p), acc_m[l])
                        isum += p
                    summs = fmaf(dmin, F32(isum), summs)
                mins = summs if is_q5 else (acc_m[0] + acc_m[2]) + (acc_m[1] + acc_m[3])
                out[t, r] = dot_q6k_lanes(qr, 0, xt, 0, sr, 0, zero_corr, 0, dsc, 0, nsb) + mins
                continue
            acc = F32(0.0)
            acc_m = F32(0.0)
            for s in range(nsb):
                o = s * QK_K
                if repacked and t < n_gemm:
                    for p in range(4):
                        sumi = dot_kqv_u(qr, o + 64 * p, xt, o + 64 * p, sr, (s * 8 + 2 * p) * 16, 2)
                        summs = 0
                        for j in range(2 * p, 2 * p + 2):
                            bsum = np.int64(xbs[t, s * 16 + 2 * j]) + np.int64(xbs[t, s * 16 + 2 * j + 1])
                            summs += np.int64(mn[i, s * 8 + j]) * bsum
                        acc = fmaf(F32(sumi), dw[i, s] * xd[t, s], acc)
                        acc_m = fmaf(F32(summs), dmw[i, s] * xd[t, s], acc_m)
                    continue
                sumi = dot_kqv_u(qr, o, xt, o, sr, s * 128, 8)
                summs = 0
                for j in range(8):
                    bsum = np.int64(xbs[t, s * 16 + 2 * j]) + np.int64(xbs[t, s * 16 + 2 * j + 1])
                    summs += np.int64(mn[i, s * 8 + j]) * bsum
                if repacked:
                    acc = fmaf(F32(sumi), dw[i, s] * xd[t, s], acc)
                    acc_m = fmaf(F32(summs), dmw[i, s] * xd[t, s], acc_m)
                else:
                    res = fmaf(-dmw[i, s], F32(summs), dw[i, s] * F32(sumi))
                    acc = fmaf(res, xd[t, s], acc)
            out[t, r] = acc - acc_m


@nb.njit(**JIT)
def _unpack_k45(wr, q, sv, mn, dw, dmw, i, nsb, qs_off, has_qh, block_bytes):
    """One Q4_K / Q5_K row into unsigned quants, expanded scales and mins (get_scale_min_k4)."""
    for s in range(nsb):
        o = s * block_bytes
        dw[i, s] = FP16_TO_FP32[get_u16(wr, o)]
        dmw[i, s] = FP16_TO_FP32[get_u16(wr, o + 2)]
        for j in range(8):
            sc, m = get_scale_min_k4(j, wr, o + 4)
            store_splat16(sv[i], s * 128 + 16 * j, sc)
            mn[i, s * 8 + j] = m
        qh = o + 16
        for j in range(4):  # 32 bytes of qs: low nibbles -> sub-block 2j, high -> 2j+1 (+ qh bits 2j, 2j+1)
            src = o + qs_off + 32 * j
            if has_qh:
                unpack32_kq(wr, src, 0, qh, 2 * j, 1, q[i], s * QK_K + 64 * j)
                unpack32_kq(wr, src, 4, qh, 2 * j + 1, 1, q[i], s * QK_K + 64 * j + 32)
            else:
                unpack32_kq(wr, src, 0, src, 0, 0, q[i], s * QK_K + 64 * j)
                unpack32_kq(wr, src, 4, src, 0, 0, q[i], s * QK_K + 64 * j + 32)


@nb.njit(parallel=True, **JIT)
def _mm_q45_K(w, xq, xd, xbs, out, is_q5):
    N = w.shape[0]
    K = xq.shape[1]
    nsb = K // QK_K
    block_bytes = Q5_K_BYTES if is_q5 else Q4_K_BYTES
    qs_off = 48 if is_q5 else 16
    repacked = (not is_q5) and N % 8 == 0  # llama.cpp repacks Q4_K (q4_K_8x8) on AVX2, not Q5_K
    for c in nb.prange((N + ROWS - 1) // ROWS):
        r0 = c * ROWS
        r1 = min(N, r0 + ROWS)
        q = np.empty((ROWS, K), np.uint8)
        sv = np.empty((ROWS, K // 2), np.int16)
        mn = np.empty((ROWS, nsb * 8), np.int32)
        dw = np.empty((ROWS, nsb), np.float32)
        dmw = np.empty((ROWS, nsb), np.float32)
        for r in range(r0, r1):
            _unpack_k45(w[r], q, sv, mn, dw, dmw, r - r0, nsb, qs_off, is_q5, block_bytes)
        _dot_k_rows(q, sv, mn, dw, dmw, xq, xd, xbs, out, r0, r1, repacked, is_q5)


@nb.njit(parallel=True, **JIT)
def _mm_q6_K(w, xq, xd, xbs, out):
    """Q6_K x Q8_K. Batches of fewer than 8 tokens: the lane order of ggml_vec_dot_q6_K_q8_K (AVX2),
    unsigned quants (0..63) times their int8 scales and the -32 offset subtracted through the bsums
    per lane; larger batches: the tiled kernel's order (tiled_run_microtile_avx2 without mins,
    acc = fma(d_w * float(S1), d_x, acc), S1 exact over the super-block with signed quants)."""
    N = w.shape[0]
    T, K = xq.shape
    nsb = K // QK_K
    tiled = T >= TILED_MIN_BATCH
    for c in nb.prange((N + ROWS - 1) // ROWS):
        r0 = c * ROWS
        r1 = min(N, r0 + ROWS)
        q = np.empty((ROWS, K), np.uint8)
        sv = np.empty((ROWS, K // 2), np.int16)
        scl = np.empty((ROWS, nsb * 16), np.int64)
        dw = np.empty((ROWS, nsb), np.float32)
        corr = np.empty(nsb * 8, np.int32)
        dsc = np.empty(nsb, np.float32)
        for r in range(r0, r1):
            i = r - r0
            wr = w[r]
            for s in range(nsb):
                o = s * Q6_K_BYTES
                dw[i, s] = FP16_TO_FP32[get_u16(wr, o + 208)]
                for g in range(16):
                    v = np.int8(wr[o + 192 + g])
                    scl[i, s * 16 + g] = v
                    # chunk g // 2 holds scales g (bytes 0..15) and g + 1 (16..31): 8 int16 lanes each
                    for k in range(8):
                        sv[i, s * 128 + 8 * g + k] = v
                for h in range(2):  # two halves of 128 values: ql[64], qh[32] each
                    ql = o + 64 * h
                    qh = o + 128 + 32 * h
                    for g in range(4):  # ql byte half g // 2, qh bits 2g..2g+1
                        unpack32_kq(wr, ql + 32 * (g % 2), 4 * (g // 2), qh, 2 * g, 3, q[i], s * QK_K + 128 * h + 32 * g)
            if tiled:
                for k in range(K):  # signed quants (q - 32), as bytes
                    q[i, k] = q[i, k] - np.uint8(32)
        for t in range(T):
            xt = xq[t]
            for r in range(r0, r1):
                i = r - r0
                if tiled:
                    acc = F32(0.0)
                    for s in range(nsb):
                        sumi = dot_kqv_s(q[i], s * QK_K, xt, s * QK_K, sv[i], s * 128, 8)
                        acc = fmaf(dw[i, s] * F32(sumi), xd[t, s], acc)
                    out[t, r] = acc
                    continue
                for s in range(nsb):
                    dsc[s] = xd[t, s] * dw[i, s]  # y.d * GGML_CPU_FP16_TO_FP32(x.d)
                    for m in range(8):
                        v = (np.int64(xbs[t, s * 16 + 2 * m]) * scl[i, s * 16 + 2 * m] +
                             np.int64(xbs[t, s * 16 + 2 * m + 1]) * scl[i, s * 16 + 2 * m + 1])
                        corr[s * 8 + m] = v * 32
                out[t, r] = dot_q6k_lanes(q[i], 0, xt, 0, sv[i], 0, corr, 0, dsc, 0, nsb)


# =============================================================================================
# One entry point per weight type: matmul_<type>(w, xc, out) with xc the activation converted to
# the type's vec_dot_type (actquant.convert_activation); the registry entry names it.
# =============================================================================================


def _float_product(qtype):
    kind = FLOAT_KIND[qtype]
    view = np.uint32 if kind == 0 else np.uint16

    def product(w, xc, out):
        x = xc[0]
        _mm_float(w.view(view), x, out, kind, ISA.float_mode(qtype, x.shape[0], w.shape[0], x.shape[1]))

    product.__name__ = f"matmul_{qtype.name.lower()}"
    product.__doc__ = (f"{qtype.name} weights times the activation rounded to {qtype.name}, in the order of the "
                       "ggml_vec_dot / tinyBLAS kernel CpuIsa.float_mode picks.")
    return product


def matmul_float_vec(qtype, w, x, out):
    """Float weights [N, K] of qtype times x [T, K] (already rounded to qtype) in ggml_vec_dot's
    order for every token, whatever T: the product ggml-cpu.c ggml_compute_forward_mul_mat_id
    runs for one expert of a MUL_MAT_ID (vec_dot per row and token, never tinyBLAS)."""
    kind = FLOAT_KIND[qtype]
    _mm_float(w.view(np.uint32 if kind == 0 else np.uint16), x, out, kind,
              ISA.float_mode(qtype, 1, w.shape[0], x.shape[1]))


matmul_f32 = _float_product(_T.F32)
matmul_f16 = _float_product(_T.F16)
matmul_bf16 = _float_product(_T.BF16)


def matmul_q8_0(w, xc, out):
    _mm_q8_0(w, xc[0], xc[1], out)


def matmul_q4_0(w, xc, out):
    _mm_q4_0(w, xc[0], xc[1], out)


def matmul_q5_0(w, xc, out):
    _mm_q5_0(w, xc[0], xc[1], out)


def matmul_q4_1(w, xc, out):
    _mm_q41_51(w, xc[0], xc[1], xc[2], out, False)


def matmul_q5_1(w, xc, out):
    _mm_q41_51(w, xc[0], xc[1], xc[2], out, True)


def matmul_q4_k(w, xc, out):
    _mm_q45_K(w, xc[0], xc[1], xc[2], out, False)


def matmul_q5_k(w, xc, out):
    _mm_q45_K(w, xc[0], xc[1], xc[2], out, True)


def matmul_q6_k(w, xc, out):
    _mm_q6_K(w, xc[0], xc[1], xc[2], out)
