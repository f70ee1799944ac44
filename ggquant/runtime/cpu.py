"""CPU backend: numpy for the small operations, numba kernels (ggquant.kernels.cpu) for products and ops.

Every operation follows what ggml-cpu computes for llama.cpp's graph, in float32 unless the C
code says double, so that logits land within float rounding of llama.cpp on F32 models and the
quantized models see the same activation quantization (kernels/cpu/actquant.py). A weight's product
and activation type come from its registry entry (ggquant.quant.types: cpu_matmul, vec_dot_type):

- rms_norm: ops.cpp ggml_compute_forward_rms_norm_f32: sum of float32 squares in double,
  mean cast to float, scale = 1 / sqrtf(mean + eps), y = x * scale * w.
- gelu: vec.h ggml_vec_gelu_f32 / ggml_vec_geglu_f32 with GGML_GELU_FP16: the input is rounded to
  fp16 and looked up in a 65536-entry table of fp16(gelu_tanh(x)); |x| >= 10 pass through
  (x >= 10 -> x, x <= -10 -> 0). gelu="exact" uses the tanh formula in float32 instead (what
  transformers computes), for comparisons with Hugging Face.
- rope: ops.cpp ggml_rope_cache_init: theta starts at the position and is multiplied by
  theta_scale = powf(base, -2/n_dims) once per pair, in float32; freq factors divide theta.
  NeoX pairing (i, i + n_dims/2).
- rope "norm" (the llama architecture): the same cache, adjacent pairs (2i, 2i + 1).
- swiglu: vec.cpp ggml_vec_swiglu_f32: ggml_v_silu (8 or 16 lanes, ggml_v_expf) then the scalar
  x / (1 + expf(-x)) for the row's last n % lanes values, times up.
- softmax: ggml_compute_forward_soft_max_f32: expf(x - max) in float32, sum in double, scaled by
  (float)(1/sum). Masked keys are -inf.
- final softcap: ggml_scale(1/cap), ggml_tanh, ggml_scale(cap).
"""

from __future__ import annotations

import os

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ggquant.errors import GGQuantError
from ggquant.kernels.cpu import actquant, ops
from ggquant.kernels.cpu import matmul as mm
from ggquant.kernels.cpu.matmul import ISA
from ggquant.kernels.cpu.simd import KV_STEP
from ggquant.quant import types as qt

_T = GGMLQuantizationType
F32 = np.float32

# vec.h: GELU_COEF_A, SQRT_2_OVER_PI (float constants)
GELU_COEF_A = F32(0.044715)
SQRT_2_OVER_PI = F32(0.79788456080286535587989211986876)
KV_PAD = 256  # llama.cpp pads n_kv to a multiple of 256 (llama-kv-cache.cpp get_padding)


def _gelu_tanh_f32(x: np.ndarray) -> np.ndarray:
    """0.5 x (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2))) in float32 (what transformers computes)."""
    x = x.astype(np.float32, copy=False)
    inner = (SQRT_2_OVER_PI * x) * (F32(1.0) + (GELU_COEF_A * x) * x)
    return (F32(0.5) * x) * (F32(1.0) + np.tanh(inner))


def gelu_table() -> np.ndarray:
    """ggml-cpu.c ggml_cpu_init: table[i] = fp16(ggml_gelu_f32(fp16_to_fp32(i))), kept as float32.

    As the compiler builds vec.h ggml_gelu_f32: `1.0f + GELU_COEF_A*x*x` is contracted into one
    fused multiply-add (GCC's default -ffp-contract=fast), and tanhf is correctly rounded here
    (float64 tanh rounded once); this reproduces ggml's table entry for entry."""
    with np.errstate(all="ignore"):
        f = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
        ax = (GELU_COEF_A * f).astype(np.float64)
        poly = (ax * f.astype(np.float64) + 1.0).astype(np.float32)  # fma(A*x, x, 1): one rounding
        inner = (SQRT_2_OVER_PI * f) * poly
        th = np.tanh(inner.astype(np.float64)).astype(np.float32)
        return ((F32(0.5) * f) * (F32(1.0) + th)).astype(np.float16).astype(np.float32)


_GELU_TABLE: np.ndarray | None = None
_ONE = np.ones(1, np.float32)


def rope_cache(pos: np.ndarray, n_dims: int, base: float, freq_scale: float = 1.0,
               freq_factors: np.ndarray | None = None, yarn: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [T, n_dims/2] as ggml_rope_cache_init computes them. yarn: None (ext_factor 0,
    mscale 1) or (ext_factor, attn_factor, corr_low, corr_high) of ggml_rope_ext (YaRN)."""
    ext, mscale, low, high = yarn if yarn is not None else (0.0, 1.0, 0.0, 0.0)
    half = n_dims // 2
    pos = np.asarray(pos, dtype=np.int64)
    cos = np.empty((len(pos), half), np.float32)
    sin = np.empty((len(pos), half), np.float32)
    ff = np.empty(0, np.float32) if freq_factors is None else np.ascontiguousarray(freq_factors[:half], np.float32)
    ops.rope_cache(pos, half, ops.rope_theta_scale(F32(base), n_dims), F32(freq_scale), ff, F32(ext), F32(mscale),
                   F32(low), F32(high), cos, sin)
    return cos, sin


def rope_neox(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [T, H, D]: rotate pairs (i, i + n_dims/2) of the first n_dims dims; the rest pass through."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    ops.rope_neox(x, cos, sin, out)
    return out


def rope_norm(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [T, H, D]: rotate adjacent pairs (2i, 2i + 1) of the first n_dims dims (GGML_ROPE_TYPE_NORMAL)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    ops.rope_norm(x, cos, sin, out)
    return out


def check_weights(w: np.ndarray, qtype, K: int) -> None:
    """ValueError unless w holds rows of K values of a type the CPU runtime multiplies, as GGUF stores them."""
    if qtype not in qt.CPU_TYPES:
        raise ValueError(f"matmul: weights of type {qtype.name} are not supported "
                         f"(supported: {', '.join(t.name for t in qt.CPU_TYPES)})")
    block, size = GGML_QUANT_SIZES[qtype]
    if K % block:
        raise ValueError(f"matmul: row length {K} is not a multiple of the {qtype.name} block size {block}")
    if w.dtype != np.uint8 or w.ndim != 2 or w.shape[1] != K // block * size:
        raise ValueError(f"matmul: expected {qtype.name} weights as uint8 [N, {K // block * size}], "
                         f"got {w.dtype} {w.shape}")


def convert_activation(qtype, x: np.ndarray) -> tuple:
    """x converted to the vec_dot_type of weights of type qtype (what their product takes)."""
    return actquant.convert_activation(qt.REGISTRY[qtype].vec_dot_type, x)


def matmul_converted(w: np.ndarray, qtype, xc: tuple, out: np.ndarray | None = None,
                     check: bool = True) -> np.ndarray:
    """y = x @ W^T where xc = convert_activation(qtype, x) (share it between weights with one input).

    check=False skips the shape checks (for callers that validated w once, e.g. at model load)."""
    K = xc[0].shape[1]
    T = xc[0].shape[0]
    if check:
        check_weights(w, qtype, K)
    if out is None:
        out = np.empty((T, w.shape[0]), np.float32)
    qt.REGISTRY[qtype].cpu_matmul(w, xc, out)
    return out


def matmul(w: np.ndarray, qtype, x: np.ndarray, out: np.ndarray | None = None, check: bool = True) -> np.ndarray:
    """float32 x [T, K] times GGML weights w (uint8 [N, row_bytes] of type qtype), transposed: [T, N]."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if check:
        if x.ndim != 2:
            raise ValueError(f"matmul: x must be [T, K], got shape {x.shape}")
        check_weights(w, qtype, x.shape[1])
    return matmul_converted(w, qtype, convert_activation(qtype, x), out, check=False)


REPACK_ROWS = 8  # repack.cpp ggml_repack_get_optimal_repack_type: Q4_0 / Q4_K rows in groups of 8 (x86)
GEMV_TOKENS = 3  # the Q4_K product keeps the per-token gemv order for batches below 4 (tokens % 4)


def expert_product(w: np.ndarray, qtype, x: np.ndarray) -> np.ndarray:
    """One expert's rows of a MUL_MAT_ID: x [n, K] @ w [N, K]^T in the order ggml-cpu runs it
    (CPUBackend.mul_mat_id)."""
    n, N = x.shape[0], w.shape[0]
    out = np.empty((n, N), np.float32)
    if qtype in (_T.F32, _T.F16, _T.BF16):
        mm.matmul_float_vec(qtype, w, convert_activation(qtype, x)[0], out)
    elif qtype == _T.Q4_K and N % REPACK_ROWS == 0:
        for a in range(0, n, GEMV_TOKENS):  # gemv for each token, as the repacked MUL_MAT_ID does
            matmul(w, qtype, x[a:a + GEMV_TOKENS], out[a:a + GEMV_TOKENS], check=False)
    elif qtype == _T.IQ4_NL:
        # MUL_MAT_ID never goes through llamafile's tinyBLAS (MUL_MAT does for IQ4_NL batches of
        # >= 2 tokens): one token at a time keeps the vec_dot (or repacked gemv) order
        for a in range(n):
            matmul(w, qtype, x[a:a + 1], out[a:a + 1], check=False)
    else:
        matmul(w, qtype, x, out, check=False)
    return out


class CPULayerCache:
    """One layer's K/V in float32: k [n_ctx, Hkv, D] and V transposed, vt [Hkv, D, n_ctx rounded up
    to KV_STEP] (llama.cpp's v_trans layout for the non-flash path; zeros beyond the filled part)."""

    def __init__(self, n_ctx: int, h: int, d: int):
        self.k = np.zeros((n_ctx, h, d), np.float32)
        self.vt = np.zeros((h, d, (n_ctx + KV_STEP - 1) // KV_STEP * KV_STEP), np.float32)

    def store(self, pos0: int, k: np.ndarray, v: np.ndarray) -> None:
        t = k.shape[0]
        self.k[pos0:pos0 + t] = k
        self.vt[:, :, pos0:pos0 + t] = v.transpose(1, 2, 0)


class CPUWeight:
    """A GGUF tensor as the CPU backend uses it: the raw block rows, never converted."""

    __slots__ = ("name", "qtype", "shape", "raw", "scale")

    def __init__(self, name, qtype, shape, raw):
        self.name = name
        self.qtype = qtype
        self.shape = tuple(shape)  # numpy order, [N, K] for matrices
        self.raw = raw  # uint8 [n_rows, row_bytes] (a view of the GGUF mmap)
        self.scale = None  # float32 the product is multiplied by (TensorSet._attach_scale), or None


class CPUBackend:
    """numpy + numba. Arrays are float32 numpy arrays."""

    name = "cpu"
    types = qt.CPU_TYPES  # the weight types it multiplies by

    def __init__(self, threads: int | None = None, gelu: str = "ggml"):
        import numba

        if threads is not None:
            if threads < 1:
                raise GGQuantError(f"--threads must be at least 1, got {threads}")
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        self.threads = numba.get_num_threads()
        if gelu not in ("ggml", "exact"):
            raise GGQuantError(f"gelu must be 'ggml' or 'exact', got {gelu!r}")
        self.gelu_mode = gelu
        self._rope_memo: dict = {}

    # --- weights --------------------------------------------------------------------------
    def weight(self, info) -> CPUWeight:
        if len(info.shape) == 2 and info.qtype not in self.types:
            raise GGQuantError(
                f"{info.name}: tensor type {info.qtype.name} is not supported by the CPU runtime "
                f"(supported: {', '.join(t.name for t in qt.CPU_TYPES)}); requantize the model "
                f"with `ggquant quantize`")
        raw = info.raw()
        raw = raw.view(np.ndarray) if isinstance(raw, np.ndarray) else np.asarray(raw)  # plain view: cheaper calls
        if len(info.shape) == 2:
            try:
                check_weights(raw, info.qtype, info.shape[-1])
            except ValueError as e:
                raise GGQuantError(f"{info.name}: {e}") from None
        return CPUWeight(info.name, info.qtype, info.shape, raw)

    def dense(self, w: CPUWeight) -> np.ndarray:
        """The whole tensor dequantized to float32 (for norms, scalars and small tables)."""
        return qt.get(w.qtype).dequantize(w.raw, w.shape).astype(np.float32, copy=False)

    def rows(self, w: CPUWeight, ids: np.ndarray) -> np.ndarray:
        """ggml_get_rows: rows `ids` of w dequantized to float32 [len(ids), K]."""
        sel = np.ascontiguousarray(w.raw[np.asarray(ids, dtype=np.int64)])
        return qt.get(w.qtype).dequantize(sel, (len(ids), w.shape[-1])).astype(np.float32, copy=False)

    # --- arrays ---------------------------------------------------------------------------
    def asarray(self, x) -> np.ndarray:
        return np.asarray(x, dtype=np.float32)

    def to_numpy(self, x) -> np.ndarray:
        return np.asarray(x)

    def zeros(self, shape) -> np.ndarray:
        return np.zeros(shape, np.float32)

    # --- operations -----------------------------------------------------------------------
    def matmul(self, x: np.ndarray, w: CPUWeight) -> np.ndarray:
        """x [T, K] @ w[N, K]^T -> [T, N]."""
        if x.shape[-1] != w.shape[-1]:
            raise GGQuantError(f"{w.name}: input width {x.shape[-1]}, the weight expects {w.shape[-1]}")
        y = matmul(w.raw, w.qtype, x, check=False)
        return y if w.scale is None else y * w.scale

    def matmuls(self, x: np.ndarray, ws: list[CPUWeight]) -> list[np.ndarray]:
        """Several products of one input, converting the activation once per vec_dot_type."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        conv: dict = {}
        out = []
        for w in ws:
            vt = qt.REGISTRY[w.qtype].vec_dot_type
            if vt not in conv:
                conv[vt] = actquant.convert_activation(vt, x)
            y = matmul_converted(w.raw, w.qtype, conv[vt], check=False)
            out.append(y if w.scale is None else y * w.scale)
        return out

    def rms_norm(self, x, w, eps):
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty_like(x)
        n = x.shape[-1]
        x2, o2 = x.reshape(-1, n), out.reshape(-1, n)
        if w is None:
            ops.rms_norm(x2, _ONE, F32(eps), False, o2)
        else:
            ops.rms_norm(x2, np.ascontiguousarray(w, dtype=np.float32).reshape(-1), F32(eps), True, o2)
        return out

    def _gelu(self, x, gate):
        if self.gelu_mode == "exact":
            y = _gelu_tanh_f32(x)
            return y * gate if gate is not None else y
        global _GELU_TABLE
        if _GELU_TABLE is None:
            _GELU_TABLE = gelu_table()
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty_like(x)
        g = _ONE if gate is None else np.ascontiguousarray(gate, dtype=np.float32)
        ops.gelu_table_f16(x, _GELU_TABLE, g, gate is not None, out)
        return out

    def geglu(self, gate, up):
        return self._gelu(gate, up)

    def gelu(self, x):
        return self._gelu(x, None)

    def add_rms_norm(self, x, y, w, eps):
        """x + rms_norm(y, w): the residual add after a post-norm (one fused kernel on CUDA)."""
        return x + self.rms_norm(y, w, eps)

    def norm_rope(self, x, w, eps, pos, n_dims, base, freq_scale=1.0, freq_factors=None, mode="neox", yarn=None):
        """rope(rms_norm(x, w, eps), ...) (one fused kernel on CUDA)."""
        return self.rope(self.rms_norm(x, w, eps), pos, n_dims, base, freq_scale, freq_factors, mode, yarn)

    def rope(self, x, pos, n_dims, base, freq_scale=1.0, freq_factors=None, mode="neox", yarn=None):
        """RoPE on x [T, H, D]: mode "neox" rotates pairs (i, i + n_dims/2), "norm" (llama.cpp's
        LLAMA_ROPE_TYPE_NORM, the llama architecture) adjacent pairs (2i, 2i + 1); yarn: see rope_cache."""
        pos = np.asarray(pos)
        key = (int(pos[0]), len(pos), n_dims, float(base), float(freq_scale),
               None if freq_factors is None else id(freq_factors), yarn)
        tab = self._rope_memo.get(key)
        if tab is None:  # the same positions are rotated by every layer of a kind: compute once
            if len(self._rope_memo) > 64:
                self._rope_memo.clear()
            tab = self._rope_memo[key] = rope_cache(pos, n_dims, base, freq_scale, freq_factors, yarn)
        if mode == "norm":
            return rope_norm(x, *tab)
        return rope_neox(x, *tab)

    def swiglu(self, gate, up):
        """silu(gate) * up as ggml_vec_swiglu_f32 computes it on this host (kernels/cpu/ops.py)."""
        gate = np.ascontiguousarray(gate, dtype=np.float32)
        up = np.ascontiguousarray(up, dtype=np.float32)
        out = np.empty_like(gate)
        n = gate.shape[-1]
        ops.swiglu(gate.reshape(-1, n), up.reshape(-1, n), ISA.lanes, out.reshape(-1, n))
        return out

    def add_bias(self, x, b):
        """ggml_add of a bias row (float32)."""
        return x + b

    def kv_layer(self, n_ctx: int, h: int, d: int) -> CPULayerCache:
        return CPULayerCache(n_ctx, h, d)

    def attention(self, q, layer: CPULayerCache, n_kv: int, q_pos, window: int, scale: float = 1.0):
        """q [T, H, D] against the first n_kv cached positions -> [T, H * D] (kernels/cpu/ops.py
        attention: ggml's KQ / softmax / KQV order for this host's ISA; KQV as tinyBLAS when T >= 2)."""
        T, H, D = q.shape
        out = np.empty((T, H, D), np.float32)
        q = np.ascontiguousarray(q, dtype=np.float32)
        isa = ISA
        # KQV = v^T [D, n_kv] x softmax [n_kv, T]: n_kv is padded to KV_PAD, a multiple of every step
        pv_mode = isa.float_mode(_T.F32, T, D, KV_PAD)
        ops.attention(q, layer.k[:n_kv], layer.vt, np.asarray(q_pos, np.int64),
                           np.arange(n_kv, dtype=np.int64), int(window), np.float32(scale),
                           isa.kq_mode, pv_mode, isa.lanes, out)
        return out.reshape(T, H * D)

    # --- mixture of experts (llama-graph.cpp build_moe_ffn) -----------------------------------
    def softmax(self, x):
        """ggml_soft_max over the last axis (the router's expert probabilities)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty_like(x)
        ops.softmax_rows(x.reshape(-1, x.shape[-1]), ISA.lanes, out.reshape(-1, x.shape[-1]))
        return out

    def moe_top_k(self, probs, k: int, norm: bool = True):
        """(ids int32 [T, k], weights [T, k]): the k most probable experts per token, in
        descending order, and their probabilities renormalised to sum 1 (norm_w)."""
        probs = np.ascontiguousarray(probs, dtype=np.float32)
        T = probs.shape[0]
        ids = np.empty((T, k), np.int32)
        w = np.empty((T, k), np.float32)
        ops.moe_top_k(probs, k, ids, w, norm)
        return ids, w

    def mul_mat_id(self, x, w: CPUWeight, ids):
        """ggml_mul_mat_id: y[t, j] = x[t, j] @ W[ids[t, j]]^T for stacked experts W [E, N, K];
        x [T, K] (one input for every slot) or [T, k, K]; -> [T, k, N].

        As ggml-cpu.c ggml_compute_forward_mul_mat_id runs it: the rows routed to each expert
        are gathered and multiplied by that expert's matrix with vec_dot per row (float types in
        ggml_vec_dot order, never tinyBLAS), except where an expert's product is taken over by
        the repacked gemv (Q4_K / Q4_0 with rows % 8 == 0: repack.cpp forward_mul_mat_id, one
        token at a time) or the tiled k-quant kernel (>= 8 rows for that expert: tiled.cpp
        ggml_compute_forward_mul_mat_id_tiled) - the same kernels MUL_MAT uses for those batches."""
        E, N, K = w.shape
        ids = np.asarray(ids)
        T, k = ids.shape
        xs = np.ascontiguousarray(x, dtype=np.float32).reshape(T, -1, K)
        if xs.shape[1] not in (1, k):
            raise GGQuantError(f"{w.name}: {xs.shape[1]} inputs per token for {k} selected experts")
        out = np.empty((T, k, N), np.float32)
        for e in range(E):
            tok, slot = np.nonzero(ids == e)  # ggml groups rows by expert in (token, slot) order
            if len(tok) == 0:
                continue
            xe = np.ascontiguousarray(xs[tok, slot if xs.shape[1] > 1 else 0])
            out[tok, slot] = expert_product(w.raw[e * N:(e + 1) * N], w.qtype, xe)
        return out

    def softcap(self, x, cap):
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty_like(x)
        ops.softcap(x, F32(cap), out)
        return out

    def synchronize(self):
        pass


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


__all__ = ["CPUBackend", "CPUWeight", "check_weights", "convert_activation", "matmul", "matmul_converted",
           "rope_cache", "rope_neox", "rope_norm", "default_threads"]
