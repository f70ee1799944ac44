"""ggml-cpu's own activation converters and dot products, called through ctypes.

libggml-cpu (installed by llama-cpp-python) exports ggml_get_type_traits_cpu(type): the
from_float that converts an activation row to the weight's vec_dot_type (the AVX2 code this
machine runs inside llama.cpp) and the vec_dot that multiplies one weight row by it. These are
the reference for kernels/cpu (actquant.py, matmul.py): activation blocks must match byte for byte, dot products
to float32 rounding (the order of the per-block float sums differs).
"""

import ctypes
import functools

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tests.oracles.ggml import lib_dir

_FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
# void vec_dot(int n, float * s, size_t bs, const void * x, size_t bx, const void * y, size_t by, int nrc)
_VEC_DOT = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t,
                            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class _TraitsCpu(ctypes.Structure):
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p),
                ("vec_dot_type", ctypes.c_int), ("nrows", ctypes.c_int64)]


@functools.cache
def libggml_cpu():
    ctypes.CDLL(str(lib_dir() / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(str(lib_dir() / "libggml-cpu.so"))
    lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_TraitsCpu)
    lib.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    lib.ggml_cpu_init()
    return lib


def traits(qtype: GGMLQuantizationType) -> _TraitsCpu:
    return libggml_cpu().ggml_get_type_traits_cpu(int(qtype)).contents


def row_bytes(qtype, n: int) -> int:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(int(qtype))]
    return n // block * size


def from_float(vec_dot_type: GGMLQuantizationType, x: np.ndarray) -> np.ndarray:
    """Rows of float32 x converted by ggml-cpu's from_float of vec_dot_type -> uint8 [T, bytes]."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    fn = _FROM_FLOAT(traits(vec_dot_type).from_float)
    out = np.zeros((x.shape[0], row_bytes(vec_dot_type, x.shape[1])), np.uint8)
    for t in range(x.shape[0]):
        fn(x[t].ctypes.data, out[t].ctypes.data, x.shape[1])
    return out


def mul_mat(qtype: GGMLQuantizationType, w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """y[t, n] = vec_dot(w[n], from_float(x[t])) with ggml-cpu's own functions."""
    tr = traits(qtype)
    vdt = GGMLQuantizationType(tr.vec_dot_type)
    xq = from_float(vdt, x) if vdt != GGMLQuantizationType.F32 else np.ascontiguousarray(x, np.float32)
    fn = _VEC_DOT(tr.vec_dot)
    w = np.ascontiguousarray(w)
    K = x.shape[1]
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    s = ctypes.c_float()
    for t in range(x.shape[0]):
        for n in range(w.shape[0]):
            fn(K, ctypes.byref(s), 0, w[n].ctypes.data, 0, xq[t].ctypes.data, 0, 1)
            out[t, n] = s.value
    return out
