"""ggml's own graph, computed by the CPU backend llama.cpp runs, through ctypes.

tests/oracles/ggml_cpu.py calls one type's vec_dot row by row; llama.cpp instead runs
ggml_compute_forward_mul_mat, which picks per weight type, batch size and host ISA between
vec_dot, llamafile's tinyBLAS, the tiled k-quant kernels and the repacked layouts of the
CPU_REPACK buffer (weights that llama.cpp loads into it: Q4_0, Q4_K, IQ4_NL on x86). This oracle
builds the same one-op graph — the weight in CPU_REPACK where llama.cpp would put it, the
activation in a plain CPU buffer — so a test sees exactly the kernel llama.cpp's model sees.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np
from gguf import GGMLQuantizationType

from tests.oracles.ggml import lib_dir

_p = ctypes.c_void_p


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", _p), ("no_alloc", ctypes.c_bool)]


@functools.cache
def _lib():
    ctypes.CDLL(str(lib_dir() / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    ctypes.CDLL(str(lib_dir() / "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(str(lib_dir() / "libggml.so"), mode=ctypes.RTLD_GLOBAL)
    cpu = ctypes.CDLL(str(lib_dir() / "libggml-cpu.so"))
    sig = {
        "ggml_init": (_p, [_InitParams]),
        "ggml_free": (None, [_p]),
        "ggml_tensor_overhead": (ctypes.c_size_t, []),
        "ggml_graph_overhead": (ctypes.c_size_t, []),
        "ggml_new_tensor_2d": (_p, [_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]),
        "ggml_mul_mat": (_p, [_p, _p, _p]),
        "ggml_new_tensor_3d": (_p, [_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]),
        "ggml_mul_mat_id": (_p, [_p, _p, _p, _p]),
        "ggml_new_graph": (_p, [_p]),
        "ggml_build_forward_expand": (None, [_p, _p]),
        "ggml_nbytes": (ctypes.c_size_t, [_p]),
        "ggml_backend_dev_by_type": (_p, [ctypes.c_int]),
        "ggml_backend_dev_backend_reg": (_p, [_p]),
        "ggml_backend_reg_get_proc_address": (_p, [_p, ctypes.c_char_p]),
        "ggml_backend_buft_name": (ctypes.c_char_p, [_p]),
        "ggml_backend_cpu_buffer_type": (_p, []),
        "ggml_backend_alloc_ctx_tensors_from_buft": (_p, [_p, _p]),
        "ggml_backend_buffer_free": (None, [_p]),
        "ggml_backend_tensor_set": (None, [_p, _p, ctypes.c_size_t, ctypes.c_size_t]),
        "ggml_backend_tensor_get": (None, [_p, _p, ctypes.c_size_t, ctypes.c_size_t]),
        "ggml_backend_graph_compute": (ctypes.c_int, [_p, _p]),
        "ggml_backend_free": (None, [_p]),
        "ggml_backend_dev_supports_op": (ctypes.c_bool, [_p, _p]),
    }
    for name, (res, args) in sig.items():
        f = getattr(lib, name)
        f.restype, f.argtypes = res, args
    cpu.ggml_backend_cpu_init.restype = _p
    cpu.ggml_backend_cpu_set_n_threads.argtypes = [_p, ctypes.c_int]
    return lib, cpu


@functools.cache
def _repack_buft():
    """The CPU device's extra buffer type named CPU_REPACK (None where this build has none)."""
    lib, _ = _lib()
    dev = lib.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    reg = lib.ggml_backend_dev_backend_reg(dev)
    fn = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    if not fn:
        return None
    bufts = ctypes.CFUNCTYPE(ctypes.POINTER(_p), _p)(fn)(dev)
    i = 0
    while bufts[i]:
        if lib.ggml_backend_buft_name(bufts[i]) == b"CPU_REPACK":
            return bufts[i]
        i += 1
    return None


def mul_mat(qtype: GGMLQuantizationType, w: np.ndarray, x: np.ndarray, threads: int = 2,
            repack: bool = True) -> np.ndarray:
    """y [T, N] = ggml_mul_mat(W, X) for W the GGUF rows w (uint8 [N, row_bytes], or float32 /
    uint16 for F32 / F16 / BF16) and float32 x [T, K], computed by the CPU backend.

    repack: put W in CPU_REPACK when that buffer type takes the op (llama.cpp's choice for weights,
    llama-model.cpp weight_buft_supported)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    w = np.ascontiguousarray(w)
    buft = _repack_buft() if repack else None
    if buft is not None:
        out = _compute(qtype, w, x, threads, buft)
        if out is not None:
            return out
    return _compute(qtype, w, x, threads, _lib()[0].ggml_backend_cpu_buffer_type())


def _compute(qtype, w, x, threads, buft):
    """The graph with W allocated in buft; None when the CPU device does not take the op there."""
    T, K = x.shape
    N = w.shape[0]
    F32 = int(GGMLQuantizationType.F32)
    return _run_op(buft, threads, (int(qtype), (K, N)), w, [(F32, (K, T), x)], (T, N),
                   lambda lib, ctx, W, X: lib.ggml_mul_mat(ctx, W, X))


def _new_tensor(lib, ctx, qtype: int, ne: tuple):
    return lib.ggml_new_tensor_2d(ctx, qtype, *ne) if len(ne) == 2 else lib.ggml_new_tensor_3d(ctx, qtype, *ne)


def _run_op(buft, threads, w_type_ne, w, inputs, out_shape, build):
    """One op's graph: the weight (type, ggml ne) from bytes w allocated in buft, the inputs
    [(type, ne, array)] in a plain CPU buffer, Y = build(lib, ctx, W, *inputs) computed by the
    CPU backend and returned as float32 out_shape; None when the CPU device does not take the op
    with the weight in buft."""
    lib, cpu = _lib()
    meta = 8 * lib.ggml_tensor_overhead() + lib.ggml_graph_overhead()
    ctx_w = lib.ggml_init(_InitParams(meta, None, True))
    ctx_x = lib.ggml_init(_InitParams(meta, None, True))
    backend = None
    bufs = []
    try:
        W = _new_tensor(lib, ctx_w, *w_type_ne)
        xs = [_new_tensor(lib, ctx_x, t, ne) for t, ne, _ in inputs]
        Y = build(lib, ctx_x, W, *xs)
        gf = lib.ggml_new_graph(ctx_x)
        lib.ggml_build_forward_expand(gf, Y)
        bufs.append(lib.ggml_backend_alloc_ctx_tensors_from_buft(ctx_w, buft))
        bufs.append(lib.ggml_backend_alloc_ctx_tensors_from_buft(ctx_x, lib.ggml_backend_cpu_buffer_type()))
        if not lib.ggml_backend_dev_supports_op(lib.ggml_backend_dev_by_type(0), Y):
            return None
        assert lib.ggml_nbytes(W) == w.nbytes, (lib.ggml_nbytes(W), w.nbytes)
        lib.ggml_backend_tensor_set(W, w.ctypes.data, 0, w.nbytes)
        for X, (_, _, a) in zip(xs, inputs):
            lib.ggml_backend_tensor_set(X, a.ctypes.data, 0, a.nbytes)
        backend = cpu.ggml_backend_cpu_init()
        cpu.ggml_backend_cpu_set_n_threads(backend, threads)
        assert lib.ggml_backend_graph_compute(backend, gf) == 0
        out = np.empty(out_shape, np.float32)
        lib.ggml_backend_tensor_get(Y, out.ctypes.data, 0, out.nbytes)
        return out
    finally:
        for b in bufs:
            if b:
                lib.ggml_backend_buffer_free(b)
        if backend:
            lib.ggml_backend_free(backend)
        lib.ggml_free(ctx_w)
        lib.ggml_free(ctx_x)


def mul_mat_id(qtype: GGMLQuantizationType, w: np.ndarray, x: np.ndarray, ids: np.ndarray, threads: int = 2,
               repack: bool = True) -> np.ndarray:
    """y [T, k, N] = ggml_mul_mat_id(W, X, ids) (llama.cpp's expert products, build_moe_ffn): W the
    stacked experts' GGUF rows (uint8 [E, N, row_bytes], or float32 / uint16 [E, N, K]), x float32
    [T, 1, K] (one input for every selected expert) or [T, k, K], ids int32 [T, k]; W in CPU_REPACK
    where llama.cpp would put it."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    w = np.ascontiguousarray(w)
    ids = np.ascontiguousarray(ids, dtype=np.int32)
    buft = _repack_buft() if repack else None
    if buft is not None:
        out = _compute_id(qtype, w, x, ids, threads, buft)
        if out is not None:
            return out
    return _compute_id(qtype, w, x, ids, threads, _lib()[0].ggml_backend_cpu_buffer_type())


def _compute_id(qtype, w, x, ids, threads, buft):
    T, S, K = x.shape
    E, N = w.shape[:2]
    k = ids.shape[1]
    inputs = [(int(GGMLQuantizationType.F32), (K, S, T), x), (int(GGMLQuantizationType.I32), (k, T), ids)]
    return _run_op(buft, threads, (int(qtype), (K, N, E)), w, inputs, (T, k, N),
                   lambda lib, ctx, W, X, ID: lib.ggml_mul_mat_id(ctx, W, X, ID))
