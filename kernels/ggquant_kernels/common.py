"""Scalar helpers shared by every quantizer, ported bit for bit from ggml.

Numba pitfalls (see DESIGN.md): a float32 mixed with a Python float literal or an int64
promotes to float64, so every constant here is wrapped in np.float32 and every product
that ggml computes in float is kept in float32. fastmath stays off.
"""

import numba as nb
import numpy as np
from numba.core import types
from numba.extending import intrinsic

F32 = np.float32

# numba options of every kernel function that ports C arithmetic: cache the compiled code, and
# IEEE division (1/0 = inf, 0/0 = NaN) as in C instead of Python's ZeroDivisionError.
JIT = dict(cache=True, error_model="numpy")

# ggml-quants.c: GROUP_MAX_EPS
GROUP_MAX_EPS = F32(1e-15)
# nearest_int's magic: 1.5 * 2**23 (ggml-quants.c nearest_int)
ROUND_MAGIC = F32(12582912.0)


@intrinsic
def _bitcast(typingctx, x, to):
    """Reinterpret a scalar's bits (C memcpy) as the type of `to`, without allocating."""
    dst = to.instance_type if isinstance(to, types.NumberClass) else to
    if x.bitwidth != dst.bitwidth:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(dst))

    return dst(x, to), codegen


@nb.njit(cache=True, inline="always")
def f32_bits(x):
    return _bitcast(np.float32(x), np.uint32)


@nb.njit(cache=True, inline="always")
def f32_as_i32(x):
    return _bitcast(np.float32(x), np.int32)


@nb.njit(cache=True, inline="always")
def bits_f32(u):
    return _bitcast(np.uint32(u), np.float32)


@nb.njit(cache=True, inline="always")
def nearest_int(fval):
    """ggml-quants.c nearest_int: float32 add of 1.5*2**23, then read the mantissa.

    Round-half-to-even for |fval| <= 4194303; beyond that it returns the same defined
    garbage as ggml (its assert is compiled out), which we reproduce on purpose.
    """
    val = F32(fval) + ROUND_MAGIC
    i = f32_as_i32(val)
    return (i & np.int32(0x007FFFFF)) - np.int32(0x00400000)


@nb.njit(cache=True, inline="always")
def fp32_to_fp16(f):
    """ggml-impl.h ggml_compute_fp32_to_fp16 (software round-to-nearest-even, NaN -> 0x7E00)."""
    f = F32(f)
    scale_to_inf = bits_f32(np.uint32(0x77800000))   # 0x1.0p+112f
    scale_to_zero = bits_f32(np.uint32(0x08800000))  # 0x1.0p-110f
    base = (F32(abs(f)) * scale_to_inf) * scale_to_zero
    w = f32_bits(f)
    shl1_w = np.uint32(w + w)
    sign = w & np.uint32(0x80000000)
    bias = shl1_w & np.uint32(0xFF000000)
    if bias < np.uint32(0x71000000):
        bias = np.uint32(0x71000000)
    base = bits_f32(np.uint32((bias >> np.uint32(1)) + np.uint32(0x07800000))) + base
    bits = f32_bits(base)
    exp_bits = (bits >> np.uint32(13)) & np.uint32(0x00007C00)
    mantissa_bits = bits & np.uint32(0x00000FFF)
    nonsign = exp_bits + mantissa_bits
    if shl1_w > np.uint32(0xFF000000):
        nonsign = np.uint32(0x7E00)
    return np.uint16((sign >> np.uint32(16)) | nonsign)


def _fp16_table():
    # fp16 -> fp32 is exact, so numpy's conversion equals ggml_compute_fp16_to_fp32.
    return np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


FP16_TO_FP32 = _fp16_table()


@nb.njit(cache=True, inline="always")
def fp16_to_fp32(h):
    return FP16_TO_FP32[np.uint16(h)]


@nb.njit(cache=True, inline="always")
def put_u16(out, pos, h):
    """Store a little-endian uint16 at out[pos:pos+2] (out is a uint8 row)."""
    out[pos] = np.uint8(h & np.uint16(0xFF))
    out[pos + 1] = np.uint8(h >> np.uint16(8))


@nb.njit(cache=True, inline="always")
def get_u16(buf, pos):
    return np.uint16(buf[pos]) | (np.uint16(buf[pos + 1]) << np.uint16(8))


def dequantize_buffers(name: str, block: int, type_size: int, data, n_per_row: int):
    """The checked uint8 [n_rows, row_bytes] input of a dequantizer and its float32 [n_rows, n_per_row]
    output buffer; a row that is not whole blocks, or bytes of the wrong width, raise ValueError."""
    if n_per_row % block:
        raise ValueError(f"{name}: rows of {n_per_row} elements are not a whole number of {block}-element blocks")
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != n_per_row // block * type_size:
        raise ValueError(
            f"{name}: expected uint8 [n_rows, {n_per_row // block * type_size}] for rows of {n_per_row} "
            f"elements, got shape {data.shape}"
        )
    return data, np.empty((data.shape[0], n_per_row), dtype=np.float32)
