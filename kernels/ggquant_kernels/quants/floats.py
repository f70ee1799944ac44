"""F32, F16 and BF16: the "unquantized" GGML types, bit-exact with ggml_quantize_chunk / to_float.

For these types a GGML "block" is one element, so a row of n_per_row values takes
n_per_row * itemsize bytes. What ggml does (ggml.c ggml_quantize_chunk and the type traits):

- F32:  memcpy both ways.
- F16:  ggml_fp32_to_fp16_row -> ggml_compute_fp32_to_fp16 (ggml-impl.h, software,
        round-to-nearest-even, every NaN -> 0x7E00 | sign) and ggml_fp16_to_fp32_row ->
        ggml_compute_fp16_to_fp32 (exact for numbers; a NaN leaves it quiet because the
        C multiplies the NaN by 2**-112, which sets the quiet bit on x86).
- BF16: ggml_fp32_to_bf16_row_ref (the chunk API calls the _ref row, never the AVX512-BF16
        one that flushes subnormals) -> ggml_compute_fp32_to_bf16: NaN -> (bits >> 16) | 64,
        else (bits + 0x7fff + ((bits >> 16) & 1)) >> 16 in uint32; and bf16 -> fp32 is a
        16-bit left shift.

The kernels work on the uint32 view of the float32 input and use integer arithmetic
(the F16 decoder adds one exact float product whose operand and result are normal numbers),
so they cannot be disturbed by FTZ/DAZ or fastmath. The F16 encoder is an integer
formulation of round-to-nearest-even that equals ggml's float-trick routine for all 2**32
inputs (checked exhaustively against libggml-base; tests check a random sample plus every
special class); the F16 decoder equals ggml_compute_fp16_to_fp32 for all 65536 inputs
(tested). The decoders are straight-line per element, so LLVM vectorizes them.
"""

import numba as nb
import numpy as np
from gguf import GGMLQuantizationType

from ..common import f32_bits

# --- bit-pattern constants (IEEE binary32 / binary16) ---------------------------------
_F32_ABS_MASK = np.uint32(0x7FFFFFFF)
_F32_INF = np.uint32(0x7F800000)
_F32_QUIET_BIT = np.uint32(0x00400000)
_F16_INF = np.uint32(0x7C00)
_F16_QNAN = np.uint32(0x7E00)  # ggml_compute_fp32_to_fp16's NaN (payload dropped)
# Smallest |x| (as binary32 bits) that rounds to fp16 infinity: 65520 = 65504 + half an ulp,
# a tie that round-to-nearest-even sends up to 65536.
_F32_BITS_F16_OVERFLOW = np.uint32(0x477FF000)
# 2**-14, the smallest normal fp16, as binary32 bits.
_F32_BITS_F16_MIN_NORMAL = np.uint32(0x38800000)
# Exponent rebias between 127 and 15 for normal numbers: (127 - 15) << 23.
_F32_TO_F16_REBIAS = np.uint32(0x38000000)
_BF16_NAN_QUIET = np.uint32(64)  # ggml_compute_fp32_to_bf16: "force to quiet"
_U32 = np.uint32
_F16_MIN_NORMAL = np.uint32(0x0400)  # exponent field 1 of binary16
_F16_SUBNORMAL_UNIT = np.float32(2.0**-24)  # value of the binary16 mantissa's last bit at exponent 0


@nb.njit(cache=True, inline="always")
def _f32_bits_to_f16(u):
    """Round-to-nearest-even binary32 -> binary16 on bit patterns; NaN -> 0x7E00 | sign.

    Same results as ggml-impl.h ggml_compute_fp32_to_fp16 (which gets there with float
    arithmetic on 2**112 / 2**-110 scalings).
    """
    sign = (u >> np.uint32(16)) & np.uint32(0x8000)
    a = u & _F32_ABS_MASK
    if a > _F32_INF:
        return np.uint16(sign | _F16_QNAN)
    if a >= _F32_BITS_F16_OVERFLOW:
        return np.uint16(sign | _F16_INF)
    if a >= _F32_BITS_F16_MIN_NORMAL:
        # Drop 13 mantissa bits with round-half-even; a mantissa carry bumps the exponent.
        h = (a - _F32_TO_F16_REBIAS + np.uint32(0x0FFF) + ((a >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13)
        return np.uint16(sign | h)
    # fp16 subnormal (unit 2**-24) or zero: value = m * 2**(e - 150) = (m >> (126 - e)) units.
    e = a >> np.uint32(23)
    if e < np.uint32(102):  # |x| < 2**-25: rounds to zero (2**-25 itself ties to even 0)
        return np.uint16(sign)
    m = (a & np.uint32(0x007FFFFF)) | np.uint32(0x00800000)
    shift = np.uint32(126) - e  # 14..24
    h = (m + (np.uint32(1) << (shift - np.uint32(1))) - np.uint32(1) + ((m >> shift) & np.uint32(1))) >> shift
    return np.uint16(sign | h)


@nb.njit(cache=True, inline="always")
def _f32_bits_to_bf16(u):
    """ggml-impl.h ggml_compute_fp32_to_bf16 (uint32 wrap-around is only reachable for NaN)."""
    if (u & _F32_ABS_MASK) > _F32_INF:
        return np.uint16((u >> np.uint32(16)) | _BF16_NAN_QUIET)
    return np.uint16((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16))


@nb.njit(parallel=True, cache=True)
def _f16_encode(src_u32, dst_u16):
    for i in nb.prange(src_u32.size):
        dst_u16[i] = _f32_bits_to_f16(src_u32[i])


@nb.njit(parallel=True, cache=True)
def _bf16_encode(src_u32, dst_u16):
    for i in nb.prange(src_u32.size):
        dst_u16[i] = _f32_bits_to_bf16(src_u32[i])


@nb.njit(cache=True, inline="always")
def _f16_bits_to_f32(h):
    """ggml-impl.h ggml_compute_fp16_to_fp32 on bit patterns: binary16 -> binary32 bits.

    Normal numbers rebias the exponent (15 -> 127) and move the mantissa up 13 bits; zero
    and subnormals are m * 2**-24, computed as a float32 product (exact, and both operands
    and the result are normal floats, so FTZ/DAZ cannot touch it); infinities and NaNs get
    the all-ones exponent, and a NaN gets the quiet bit, as the C's multiplication of the
    NaN by 2**-112 sets it on x86. Every step is cast back to uint32: numba widens uint32
    arithmetic to 64 bits, and the casts let LLVM keep 8 values per AVX2 vector.
    """
    sign = _U32((_U32(h) & _U32(0x8000)) << _U32(16))
    em = _U32(_U32(h) & _U32(0x7FFF))  # exponent and mantissa
    normal = _U32(_U32(em << _U32(13)) + _F32_TO_F16_REBIAS)  # rebias 15 -> 127
    special = _U32(_U32(em << _U32(13)) | _F32_INF)
    special = _U32(special | (_F32_QUIET_BIT if em > _F16_INF else _U32(0)))
    tiny = f32_bits(np.float32(np.int32(em)) * _F16_SUBNORMAL_UNIT)
    bits = tiny if em < _F16_MIN_NORMAL else (special if em >= _F16_INF else normal)
    return _U32(sign | bits)


@nb.njit(parallel=True, cache=True)
def _f16_decode(src_u16, dst_u32):
    for i in nb.prange(src_u16.size):
        dst_u32[i] = _f16_bits_to_f32(src_u16[i])


@nb.njit(parallel=True, cache=True)
def _bf16_decode(src_u16, dst_u32):
    # ggml_compute_bf16_to_fp32: the bf16 bits become the high half of the binary32.
    for i in nb.prange(src_u16.size):
        dst_u32[i] = np.uint32(src_u16[i]) << np.uint32(16)


# --- registry entry points -------------------------------------------------------------

def _rows_u32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint32)


def quantize_f32(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """float32 [n_rows, n] -> uint8 [n_rows, 4n]: ggml_quantize_chunk's memcpy (imatrix unused)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x.view(np.uint8).reshape(x.shape[0], x.shape[1] * 4).copy()


def dequantize_f32(data: np.ndarray, n_per_row: int) -> np.ndarray:
    data = np.ascontiguousarray(data, dtype=np.uint8)
    return data.view(np.float32).reshape(data.shape[0], n_per_row).copy()


def quantize_f16(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """float32 [n_rows, n] -> uint8 [n_rows, 2n]: ggml_fp32_to_fp16_row (imatrix unused)."""
    n_rows, n = x.shape
    out = np.empty((n_rows, 2 * n), dtype=np.uint8)
    _f16_encode(_rows_u32(x), out.reshape(-1).view(np.uint16))
    return out


def dequantize_f16(data: np.ndarray, n_per_row: int) -> np.ndarray:
    data = np.ascontiguousarray(data, dtype=np.uint8)
    out = np.empty((data.shape[0], n_per_row), dtype=np.float32)
    _f16_decode(data.reshape(-1).view(np.uint16), out.reshape(-1).view(np.uint32))
    return out


def quantize_bf16(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """float32 [n_rows, n] -> uint8 [n_rows, 2n]: ggml_fp32_to_bf16_row_ref (imatrix unused)."""
    n_rows, n = x.shape
    out = np.empty((n_rows, 2 * n), dtype=np.uint8)
    _bf16_encode(_rows_u32(x), out.reshape(-1).view(np.uint16))
    return out


def dequantize_bf16(data: np.ndarray, n_per_row: int) -> np.ndarray:
    data = np.ascontiguousarray(data, dtype=np.uint8)
    out = np.empty((data.shape[0], n_per_row), dtype=np.float32)
    _bf16_decode(data.reshape(-1).view(np.uint16), out.reshape(-1).view(np.uint32))
    return out


QUANTIZE = {
    GGMLQuantizationType.F32: quantize_f32,
    GGMLQuantizationType.F16: quantize_f16,
    GGMLQuantizationType.BF16: quantize_bf16,
}

DEQUANTIZE = {
    GGMLQuantizationType.F32: dequantize_f32,
    GGMLQuantizationType.F16: dequantize_f16,
    GGMLQuantizationType.BF16: dequantize_bf16,
}
