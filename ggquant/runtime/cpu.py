"""CPU backend: numpy for the small operations, numba kernels (kernels/matmul.py) for products.

Every operation follows what ggml-cpu computes for llama.cpp's graph, in float32 unless the C
code says double, so that logits land within float rounding of llama.cpp on F32 models and the
quantized models see the same activation quantization (kernels/matmul.py):

- rms_norm: ops.cpp ggml_compute_forward_rms_norm_f32: sum of float32 squares in double,
  mean cast to float, scale = 1 / sqrtf(mean + eps), y = x * scale * w.
- gelu: vec.h ggml_vec_gelu_f32 / ggml_vec_geglu_f32 with GGML_GELU_FP16: the input is rounded to
  fp16 and looked up in a 65536-entry table of fp16(gelu_tanh(x)); |x| >= 10 pass through
  (x >= 10 -> x, x <= -10 -> 0). gelu="exact" uses the tanh formula in float32 instead (what
  transformers computes), for comparisons with Hugging Face.
- rope: ops.cpp ggml_rope_cache_init: theta starts at the position and is multiplied by
  theta_scale = powf(base, -2/n_dims) once per pair, in float32; freq factors divide theta.
  NeoX pairing (i, i + n_dims/2).
- softmax: ggml_compute_forward_soft_max_f32: expf(x - max) in float32, sum in double, scaled by
  (float)(1/sum). Masked keys are -inf.
- final softcap: ggml_scale(1/cap), ggml_tanh, ggml_scale(cap).
"""

from __future__ import annotations

import os

import numpy as np
from gguf import GGMLQuantizationType

from ggquant.errors import GGQuantError

_T = GGMLQuantizationType
F32 = np.float32

# vec.h: GELU_COEF_A, SQRT_2_OVER_PI (float constants)
GELU_COEF_A = F32(0.044715)
SQRT_2_OVER_PI = F32(0.79788456080286535587989211986876)
GELU_PASS = F32(10.0)  # vec.h: inputs at or beyond +-10 bypass the fp16 table
KV_PAD = 256  # llama.cpp pads n_kv to a multiple of 256 (llama-kv-cache.cpp get_padding)


def _gelu_tanh_f32(x: np.ndarray) -> np.ndarray:
    """0.5 x (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2))) in float32 (what transformers computes)."""
    x = x.astype(np.float32, copy=False)
    inner = (SQRT_2_OVER_PI * x) * (F32(1.0) + (GELU_COEF_A * x) * x)
    return (F32(0.5) * x) * (F32(1.0) + np.tanh(inner))


def _gelu_table() -> np.ndarray:
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


def gelu(x: np.ndarray, mode: str = "ggml") -> np.ndarray:
    if mode == "exact":
        return _gelu_tanh_f32(x)
    global _GELU_TABLE
    if _GELU_TABLE is None:
        _GELU_TABLE = _gelu_table()
    with np.errstate(over="ignore"):
        idx = x.astype(np.float16).view(np.uint16)
    y = _GELU_TABLE[idx]
    y = np.where(x >= GELU_PASS, x, y)
    return np.where(x <= -GELU_PASS, F32(0.0), y).astype(np.float32, copy=False)


def rms_norm(x: np.ndarray, w: np.ndarray | None, eps: float) -> np.ndarray:
    """RMS norm over the last axis; w broadcast over the last axis (or None)."""
    sq = (x * x).astype(np.float64)
    mean = (sq.sum(axis=-1, keepdims=True) / x.shape[-1]).astype(np.float32)
    scale = F32(1.0) / np.sqrt(mean + F32(eps))
    y = x * scale
    return y * w if w is not None else y


def rope_cache(pos: np.ndarray, n_dims: int, base: float, freq_scale: float = 1.0,
               freq_factors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [T, n_dims/2] as ggml_rope_cache_init computes them (ext_factor 0, mscale 1)."""
    from ggquant.kernels import matmul as mm

    half = n_dims // 2
    pos = np.asarray(pos, dtype=np.int64)
    cos = np.empty((len(pos), half), np.float32)
    sin = np.empty((len(pos), half), np.float32)
    ff = np.empty(0, np.float32) if freq_factors is None else np.ascontiguousarray(freq_factors[:half], np.float32)
    mm.rope_cache(pos, half, mm.rope_theta_scale(F32(base), n_dims), F32(freq_scale), ff, cos, sin)
    return cos, sin


def rope_neox(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [T, H, D]: rotate pairs (i, i + n_dims/2) of the first n_dims dims; the rest pass through."""
    from ggquant.kernels import matmul as mm

    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    mm.rope_neox(x, cos, sin, out)
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, k_pos: np.ndarray,
              window: int, scale: float = 1.0) -> np.ndarray:
    """Causal (optionally sliding-window) grouped-query attention in plain numpy (a reference).

    q [T, H, D], k/v [S, Hkv, D] -> [T, H * D]. Key j is visible to query i when
    k_pos[j] <= q_pos[i] and, with window > 0, q_pos[i] - k_pos[j] < window
    (llama-hparams.h is_masked_swa, LLAMA_SWA_TYPE_STANDARD).
    """
    T, H, D = q.shape
    S, Hkv, Dv = v.shape
    group = H // Hkv
    masked = k_pos[None, :] > q_pos[:, None]
    if window > 0:
        masked |= (q_pos[:, None] - k_pos[None, :]) >= window
    bias = np.where(masked, F32(-np.inf), F32(0.0)).astype(np.float32)
    out = np.empty((T, H, Dv), np.float32)
    for h in range(Hkv):
        qh = np.ascontiguousarray(q[:, h * group:(h + 1) * group, :].transpose(1, 0, 2))  # [g, T, D]
        s = qh @ np.ascontiguousarray(k[:, h, :]).T * F32(scale) + bias[None]  # [g, T, S]
        e = np.exp(s - s.max(axis=-1, keepdims=True))
        p = e * (1.0 / e.sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)
        out[:, h * group:(h + 1) * group, :] = (p @ np.ascontiguousarray(v[:, h, :])).transpose(1, 0, 2)
    return out.reshape(T, H * Dv)


class CPULayerCache:
    """One layer's K/V in float32: k [n_ctx, Hkv, D] and V transposed, vt [Hkv, D, n_ctx rounded up
    to KV_STEP] (llama.cpp's v_trans layout for the non-flash path; zeros beyond the filled part)."""

    def __init__(self, n_ctx: int, h: int, d: int):
        self.k = np.zeros((n_ctx, h, d), np.float32)
        from ggquant.kernels.matmul import KV_STEP

        self.vt = np.zeros((h, d, (n_ctx + KV_STEP - 1) // KV_STEP * KV_STEP), np.float32)

    def store(self, pos0: int, k: np.ndarray, v: np.ndarray) -> None:
        t = k.shape[0]
        self.k[pos0:pos0 + t] = k
        self.vt[:, :, pos0:pos0 + t] = v.transpose(1, 2, 0)


class CPUWeight:
    """A GGUF tensor as the CPU backend uses it: the raw block rows, never converted."""

    __slots__ = ("name", "qtype", "shape", "raw")

    def __init__(self, name, qtype, shape, raw):
        self.name = name
        self.qtype = qtype
        self.shape = tuple(shape)  # numpy order, [N, K] for matrices
        self.raw = raw  # uint8 [n_rows, row_bytes] (a view of the GGUF mmap)


class CPUBackend:
    """numpy + numba. Arrays are float32 numpy arrays."""

    name = "cpu"

    def __init__(self, threads: int | None = None, gelu: str = "ggml"):
        import numba

        from ggquant.kernels import matmul as mm

        if threads is not None:
            if threads < 1:
                raise GGQuantError(f"--threads must be at least 1, got {threads}")
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        self.threads = numba.get_num_threads()
        if gelu not in ("ggml", "exact"):
            raise GGQuantError(f"gelu must be 'ggml' or 'exact', got {gelu!r}")
        self.gelu_mode = gelu
        self._mm = mm
        self._rope_memo: dict = {}

    # --- weights --------------------------------------------------------------------------
    def weight(self, info) -> CPUWeight:
        if len(info.shape) == 2 and info.qtype not in self._mm.SUPPORTED:
            raise GGQuantError(
                f"{info.name}: tensor type {info.qtype.name} is not supported by the CPU runtime "
                f"(supported: {', '.join(t.name for t in self._mm.SUPPORTED)}); requantize the model "
                f"with `ggquant quantize`")
        raw = info.raw()
        raw = raw.view(np.ndarray) if isinstance(raw, np.ndarray) else np.asarray(raw)  # plain view: cheaper calls
        if len(info.shape) == 2:
            try:
                self._mm._check(raw, info.qtype, info.shape[-1])
            except ValueError as e:
                raise GGQuantError(f"{info.name}: {e}") from None
        return CPUWeight(info.name, info.qtype, info.shape, raw)

    def dense(self, w: CPUWeight) -> np.ndarray:
        """The whole tensor dequantized to float32 (for norms, scalars and small tables)."""
        from ggquant.quant import types as qt

        return qt.get(w.qtype).dequantize(w.raw, w.shape).astype(np.float32, copy=False)

    def rows(self, w: CPUWeight, ids: np.ndarray) -> np.ndarray:
        """ggml_get_rows: rows `ids` of w dequantized to float32 [len(ids), K]."""
        from ggquant.quant import types as qt

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
        return self._mm.matmul(w.raw, w.qtype, x, check=False)

    def matmuls(self, x: np.ndarray, ws: list[CPUWeight]) -> list[np.ndarray]:
        """Several products of one input, converting the activation once per vec_dot_type."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        conv: dict = {}
        out = []
        for w in ws:
            vt = self._mm.VEC_DOT_TYPE.get(w.qtype)
            if vt not in conv:
                conv[vt] = self._mm.convert_activation(w.qtype, x)
            out.append(self._mm.matmul_converted(w.raw, w.qtype, conv[vt], check=False))
        return out

    def rms_norm(self, x, w, eps):
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty_like(x)
        n = x.shape[-1]
        x2, o2 = x.reshape(-1, n), out.reshape(-1, n)
        if w is None:
            self._mm.rms_norm(x2, _ONE, F32(eps), False, o2)
        else:
            self._mm.rms_norm(x2, np.ascontiguousarray(w, dtype=np.float32).reshape(-1), F32(eps), True, o2)
        return out

    def _gelu(self, x, gate):
        if self.gelu_mode == "exact":
            y = _gelu_tanh_f32(x)
            return y * gate if gate is not None else y
        global _GELU_TABLE
        if _GELU_TABLE is None:
            _GELU_TABLE = _gelu_table()
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty_like(x)
        g = _ONE if gate is None else np.ascontiguousarray(gate, dtype=np.float32)
        self._mm.gelu_table_f16(x, _GELU_TABLE, g, gate is not None, out)
        return out

    def geglu(self, gate, up):
        return self._gelu(gate, up)

    def gelu(self, x):
        return self._gelu(x, None)

    def add_rms_norm(self, x, y, w, eps):
        """x + rms_norm(y, w): the residual add after a post-norm (one fused kernel on CUDA)."""
        return x + self.rms_norm(y, w, eps)

    def norm_rope(self, x, w, eps, pos, n_dims, base, freq_scale=1.0, freq_factors=None):
        """rope(rms_norm(x, w, eps), ...) (one fused kernel on CUDA)."""
        return self.rope(self.rms_norm(x, w, eps), pos, n_dims, base, freq_scale, freq_factors)

    def rope(self, x, pos, n_dims, base, freq_scale=1.0, freq_factors=None):
        pos = np.asarray(pos)
        key = (int(pos[0]), len(pos), n_dims, float(base), float(freq_scale),
               None if freq_factors is None else id(freq_factors))
        tab = self._rope_memo.get(key)
        if tab is None:  # the same positions are rotated by every layer of a kind: compute once
            if len(self._rope_memo) > 64:
                self._rope_memo.clear()
            tab = self._rope_memo[key] = rope_cache(pos, n_dims, base, freq_scale, freq_factors)
        return rope_neox(x, *tab)

    def kv_layer(self, n_ctx: int, h: int, d: int) -> CPULayerCache:
        return CPULayerCache(n_ctx, h, d)

    def attention(self, q, layer: CPULayerCache, n_kv: int, q_pos, window: int, scale: float = 1.0):
        """q [T, H, D] against the first n_kv cached positions -> [T, H * D] (kernels/matmul.py
        attention: ggml's KQ / softmax / KQV order for this host's ISA; KQV as tinyBLAS when T >= 2)."""
        T, H, D = q.shape
        out = np.empty((T, H, D), np.float32)
        q = np.ascontiguousarray(q, dtype=np.float32)
        isa = self._mm.ISA
        # KQV = v^T [D, n_kv] x softmax [n_kv, T]: n_kv is padded to KV_PAD, a multiple of every step
        pv_mode = isa.float_mode(_T.F32, T, D, KV_PAD)
        self._mm.attention(q, layer.k[:n_kv], layer.vt, np.asarray(q_pos, np.int64),
                           np.arange(n_kv, dtype=np.int64), int(window), np.float32(scale),
                           isa.kq_mode, pv_mode, isa.lanes, out)
        return out.reshape(T, H * D)

    def softcap(self, x, cap):
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty_like(x)
        self._mm.softcap(x, F32(cap), out)
        return out

    def synchronize(self):
        pass


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


__all__ = ["CPUBackend", "CPUWeight", "attention", "gelu", "rms_norm", "rope_cache", "rope_neox",
           "default_threads"]
