"""The activation of a CPU product, converted as ggml-cpu converts it (ggml-cpu.c type_traits_cpu).

ggml_compute_forward_mul_mat first converts the activation x to the weight type's
``vec_dot_type`` (the registry entry's vec_dot_type, ggquant.quant.types): Q8_0 blocks for
Q4_0 / Q5_0 / Q8_0 weights, Q8_1 blocks (with s = d * sum of quants) for Q4_1 / Q5_1, Q8_K blocks for the k-quants, fp16 for F16, bf16 for BF16,
unchanged for F32. The Q8 quantizers are ports of the x86 code that runs on AVX2 machines
(arch/x86/quants.c quantize_row_q8_0, ggml-quants.c quantize_row_q8_K_ref), so the activation
quants equal ggml's byte for byte. This matters: on a 4-bit model the activation rounding moves
logits about as much as the weight rounding.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from gguf import GGMLQuantizationType

from ..common import FP16_TO_FP32, JIT, ROUND_MAGIC, fp32_to_fp16
from .simd import QK8_0, QK_K

_T = GGMLQuantizationType
F32 = np.float32

@nb.njit(inline="always", **JIT)
def _round_small(v):
    """ggml nearest_int (round half to even) for |v| < 2**22, without its bit cast: adding and
    subtracting 1.5 * 2**23 in float32 leaves exactly the integer nearest_int reads back."""
    return np.int32((v + ROUND_MAGIC) - ROUND_MAGIC)


@nb.njit(**JIT)
def _quantize_q8_0(x, qs, d):
    """arch/x86/quants.c quantize_row_q8_0 (AVX2 branch), per 32-block of each row.

    d = amax / 127 stored as fp16; the multiplier is 127 / amax (not 1/d); products are
    rounded half to even (_mm256_round_ps _MM_ROUND_NEAREST) and saturated by the packs.
    d here is the fp16 value read back as float32, as ggml's dot products read it.
    """
    T, K = x.shape
    for t in range(T):
        for b in range(K // QK8_0):
            o = b * QK8_0
            amax = F32(0.0)
            for j in range(QK8_0):
                v = abs(x[t, o + j])
                if v > amax:  # _mm256_max_ps: the order of equal maxima does not matter
                    amax = v
            dd = amax / F32(127.0)
            d[t, b] = FP16_TO_FP32[fp32_to_fp16(dd)]  # GGML_CPU_FP32_TO_FP16: round to nearest even
            idd = F32(127.0) / amax if amax != F32(0.0) else F32(0.0)
            for j in range(QK8_0):
                q = _round_small(x[t, o + j] * idd)
                qs[t, o + j] = max(-128, min(127, q))


@nb.njit(**JIT)
def _quantize_q8_K(x, qs, d, bsums):
    """ggml-quants.c quantize_row_q8_K_ref (what x86 runs): per 256-block of each row.

    max = the first element of largest |x|; iscale = -127 / max; q = min(127, nearest_int(iscale
    * x)); d = 1 / iscale in float32; bsums[j] = sum of quants j*16 .. j*16+15.
    """
    T, K = x.shape
    for t in range(T):
        for b in range(K // QK_K):
            o = b * QK_K
            amax = F32(0.0)
            mx = F32(0.0)
            for j in range(QK_K):
                ax = abs(x[t, o + j])
                if ax > amax:
                    amax = ax
                    mx = x[t, o + j]
            if amax == F32(0.0):
                d[t, b] = F32(0.0)
                for j in range(QK_K):
                    qs[t, o + j] = 0
                for j in range(QK_K // 16):
                    bsums[t, b * 16 + j] = 0
                continue
            iscale = F32(-127.0) / mx
            for j in range(QK_K):
                v = _round_small(iscale * x[t, o + j])
                qs[t, o + j] = min(127, v)
            for j in range(QK_K // 16):
                s = 0
                for i in range(16):
                    s += np.int64(qs[t, o + j * 16 + i])
                bsums[t, b * 16 + j] = s
            d[t, b] = F32(1.0) / iscale


@nb.njit(**JIT)
def _quantize_q8_1(x, qs, d, s):
    """arch/x86/quants.c quantize_row_q8_1 (AVX2 branch): the quants and d of quantize_row_q8_0,
    and s = fp16(d * sum of the block's quants) with d the float32 amax / 127 before its fp16
    rounding (both read back as float32 here)."""
    T, K = x.shape
    _quantize_q8_0(x, qs, d)
    for t in range(T):
        for b in range(K // QK8_0):
            o = b * QK8_0
            amax = F32(0.0)
            for j in range(QK8_0):
                v = abs(x[t, o + j])
                if v > amax:
                    amax = v
            dd = amax / F32(127.0)
            tot = 0
            for j in range(QK8_0):
                tot += np.int32(qs[t, o + j])
            s[t, b] = FP16_TO_FP32[fp32_to_fp16(dd * F32(tot))]


def quantize_q8_1(x: np.ndarray):
    """float32 [T, K] -> (qs int8 [T, K], d float32 [T, K/32], s float32 [T, K/32]) as Q8_1 blocks."""
    T, K = x.shape
    qs = np.empty((T, K), np.int8)
    d = np.empty((T, K // QK8_0), np.float32)
    s = np.empty((T, K // QK8_0), np.float32)
    _quantize_q8_1(x, qs, d, s)
    return qs, d, s


def quantize_q8_0(x: np.ndarray):
    """float32 [T, K] -> (qs int8 [T, K], d float32 [T, K/32])."""
    T, K = x.shape
    qs = np.empty((T, K), np.int8)
    d = np.empty((T, K // QK8_0), np.float32)
    _quantize_q8_0(x, qs, d)
    return qs, d


def quantize_q8_K(x: np.ndarray):
    """float32 [T, K] -> (qs int8 [T, K], d float32 [T, K/256], bsums int32 [T, K/16])."""
    T, K = x.shape
    qs = np.empty((T, K), np.int8)
    d = np.empty((T, K // QK_K), np.float32)
    bs = np.empty((T, K // 16), np.int32)
    _quantize_q8_K(x, qs, d, bs)
    return qs, d, bs


def round_f16(x: np.ndarray) -> np.ndarray:
    """Activation as ggml_cpu_fp32_to_fp16 leaves it (round to nearest even), read back."""
    with np.errstate(over="ignore"):  # beyond fp16 range -> inf, as ggml
        return x.astype(np.float16).astype(np.float32)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_bf16 (round to nearest even; NaN kept quiet), read back as float32."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    r = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    r = np.where(nan, (u >> np.uint32(16)) | np.uint32(64), r)
    return (r.astype(np.uint32) << np.uint32(16)).view(np.float32)


def convert_activation(vec_dot_type, x: np.ndarray):
    """x as ggml-cpu's from_float of `vec_dot_type` leaves it (a tuple the products take)."""
    vt = vec_dot_type
    x = np.ascontiguousarray(x, dtype=np.float32)
    if vt == _T.Q8_0:
        return quantize_q8_0(x)
    if vt == _T.Q8_1:
        return quantize_q8_1(x)
    if vt == _T.Q8_K:
        return quantize_q8_K(x)
    if vt == _T.F16:
        return (round_f16(x),)
    if vt == _T.BF16:
        return (round_bf16(x),)
    return (x,)
