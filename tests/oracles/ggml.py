"""The reference: ggml's own quantizers and dequantizers, called through ctypes.

libggml-base is installed by llama-cpp-python (llama_cpp/lib). Entry points per
shared/research/imatrix-and-quants.md §4: ggml_quantize_chunk (what llama-quantize runs,
including the imatrix path) and the type traits' to_float.
"""

import ctypes
import functools
import os
import pathlib

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


class _TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


def lib_dir() -> pathlib.Path:
    """llama-cpp-python's libggml*, or $GGML_LIB_DIR (another build of ggml, e.g. for AVX2 with
    GGQUANT_CPU_ISA=avx2 on an AVX-512 host)."""
    if os.environ.get("GGML_LIB_DIR"):
        return pathlib.Path(os.environ["GGML_LIB_DIR"])
    import llama_cpp

    return pathlib.Path(llama_cpp.__file__).parent / "lib"


@functools.cache
def libggml_base():
    lib = ctypes.CDLL(str(lib_dir() / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(ctypes.c_float),
    ]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def _fptr(a):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_float)) if a is not None else None


def quantize(qtype: GGMLQuantizationType, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """ggml_quantize_chunk over a float32 [n_rows, n_per_row] matrix -> uint8 [n_rows, row_bytes]."""
    lib = libggml_base()
    x = np.ascontiguousarray(x, dtype=np.float32)
    nrows, n_per_row = x.shape
    row_bytes = lib.ggml_row_size(int(qtype), n_per_row)
    out = np.zeros((nrows, row_bytes), dtype=np.uint8)
    imatrix = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    lib.ggml_quantize_init(int(qtype))
    n = lib.ggml_quantize_chunk(int(qtype), _fptr(x), out.ctypes.data, 0, nrows, n_per_row, _fptr(imatrix))
    assert n == out.nbytes, (n, out.nbytes)
    return out


def dequantize(qtype: GGMLQuantizationType, data: np.ndarray, n_per_row: int) -> np.ndarray:
    """The type traits' to_float over uint8 [n_rows, row_bytes] -> float32 [n_rows, n_per_row]."""
    lib = libggml_base()
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if qtype == GGMLQuantizationType.F32:
        return data.view(np.float32).reshape(data.shape[0], n_per_row).copy()
    traits = lib.ggml_get_type_traits(int(qtype)).contents
    to_float = _TO_FLOAT(traits.to_float)
    out = np.empty((data.shape[0], n_per_row), dtype=np.float32)
    to_float(data.ctypes.data, _fptr(out), out.size)
    return out


def random_blocks(qtype: GGMLQuantizationType, n_rows: int, n_per_row: int, seed: int = 0) -> np.ndarray:
    """Random block bytes with finite fp16 scales, for dequantize tests of any type."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n_rows, n_per_row // block * type_size), dtype=np.uint8)


def llama_quantize(inp, out, ftype: int, imatrix: dict[str, np.ndarray] | None = None,
                   tensor_types=(), pure: bool = False, allow_requantize: bool = False, nthread: int = 2) -> None:
    """llama_model_quantize through llama-cpp-python: the whole-file reference.

    `imatrix` holds the already-normalised vectors (what llama-quantize passes to libllama).
    """
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = nthread
    params.ftype = int(ftype)
    params.pure = pure
    params.allow_requantize = allow_requantize
    keep = []
    if imatrix:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, v) in enumerate(sorted(imatrix.items())):
            v = np.ascontiguousarray(v, dtype=np.float32)
            keep.append(v)
            arr[i].name = name.encode()
            arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = v.size
        arr[len(imatrix)].name = None
        keep.append(arr)
        params.imatrix = arr
    if tensor_types:
        tt = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (pattern, qtype) in enumerate(tensor_types):
            tt[i].pattern = pattern.encode()
            tt[i].type = int(qtype)
        tt[len(tensor_types)].pattern = None
        keep.append(tt)
        params.tt_overrides = tt
    rc = llama_cpp.llama_model_quantize(str(inp).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc}) for {inp}")
