"""CUDA backend (torch): the same model code on a GPU, in float32.

Weights stay in their GGUF block bytes on the GPU (uint8 [N, row_bytes]; with the Triton kernels
repacked once into the layout their matvec reads, see repack: Q4_K at its own bits, the other
block types as int8 codes + scales; the i-quants IQ4_XS/IQ4_NL/IQ3_S/IQ3_XXS/IQ2_S/IQ2_XS at their
own bits with packed_iquants) and are dequantized with torch ops
per block type (the layouts of ggml-common.h, as in ggml's dequantize_row_<type>) for batched
products; the float32 result is kept on the device while memory allows (cache_weights, see
CUDABackend). Activations are not quantized: the CPU backend reproduces llama.cpp's CPU
arithmetic, this one is plain float32, and both agree within 1e-2 on the tiny F32 models
(tests/runtime/test_cuda.py).

Batch-1 decode (the bandwidth-bound case) runs through Triton kernels (kernels/cuda/triton.py) that
read each weight byte once in its block format and fuse the per-row operations, and the whole
step is replayed as one CUDA graph (graph_step): the token id and position live in device
tensors, the attention covers the KV cache up to a multiple of GRAPH_KV_STEP positions with a
mask, so one captured graph serves GRAPH_KV_STEP consecutive positions. A batch of T > 1 tokens
(prefill) is replayed from a graph too once the same shape comes back (fixed-size chunks from
position 0: perplexity, parity, KL probes, benchmarks): a 512-token prefill of E4B is ~1,500
kernel launches whose host cost is 2.7x the GPU's work (bench/runtime_cuda.py --profile-prefill).

The class also runs on device="cpu" (TorchBackend("cpu")), which is how CI checks the
dequantizers and the model wiring without a GPU (without Triton: torch ops only).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from ggquant.errors import GGQuantError
from ggquant.kernels.cuda.dequant import dequantize_parts
from ggquant.quant import types as qt

_T = GGMLQuantizationType


def _torch():
    try:
        import torch
    except ImportError:
        raise GGQuantError("--device cuda needs torch (pip install torch)") from None
    return torch


class TorchWeight:
    """raw: uint8 [N, row_bytes] block bytes (None once repacked); kind/parts: the layout the
    Triton matvec reads (kernels/cuda/triton.py), None where the type has no kernel."""

    __slots__ = ("name", "qtype", "shape", "raw", "kind", "parts", "_dense", "_half", "scale")

    def __init__(self, name, qtype, shape, raw, kind=None, parts=()):
        self.name, self.qtype, self.shape, self.raw = name, qtype, tuple(shape), raw
        self.kind, self.parts = kind, parts
        self.scale = None  # float32 the product is multiplied by (TensorSet._attach_scale), or None
        self._dense = None
        self._half = None  # the fp16/bf16 copy batched products multiply with (half_cache)


def dequantize(torch, qtype, raw, n_per_row: int):
    """uint8 [N, row_bytes] torch tensor -> float32 [N, n_per_row] (ggml dequantize_row_<type>),
    through the type's registry entry (cuda_dequantize)."""
    fn = qt.REGISTRY[qtype].cuda_dequantize if qtype in qt.REGISTRY else None
    if fn is None:
        raise GGQuantError(f"the CUDA backend cannot dequantize {qtype.name} yet")
    return fn(torch, raw, n_per_row)


def repack(torch, qtype, raw, n_per_row: int, packed: bool = False) -> tuple[str, tuple]:
    """Block bytes uint8 [N, row_bytes] -> (kind, parts) in the layout the Triton matvec reads
    (kernels/cuda/triton.py docstring), through the type's registry entry (cuda_repack); packed:
    the i-quants' packed layout where there is one (kernels/cuda/dequant.py PACKED)."""
    from ggquant.kernels.cuda.dequant import PACKED

    fn = qt.REGISTRY[qtype].cuda_repack if qtype in qt.REGISTRY else None
    if packed and qtype in PACKED:
        fn = PACKED[qtype]
    if fn is None:
        raise GGQuantError(f"no repacked layout for {qtype.name}")
    return fn(torch, raw, n_per_row)


def _triton_kernels(device) -> object | None:
    """kernels/cuda/triton.py when Triton can run on this device (a GPU, or the CPU under TRITON_INTERPRET=1)."""
    import os

    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        from ggquant.kernels.cuda import triton
    except ImportError:  # torch without triton: the torch-op path
        return None
    return triton


# auto weight cache: keep this much device memory free after caching a dense float32 copy
CACHE_RESERVE_BYTES = 4 << 30
# batched products (T > 1) of non-F32 weights: "cublas" (dequantize to fp16/bf16, torch.mm with
# float32 accumulation: llama.cpp's own cuBLAS path for large batches), "triton"
# (kernels/cuda/triton.py matmul_q: dequantized tiles fed to tl.dot, no fp16 copy in memory;
# the layouts of triton.TILE_KINDS, others as "cublas") or "f32" (dequantize to float32, float32 GEMM: the
# products of the CPU-device tests). PREFILL_MODE is the default of CUDABackend(prefill=None) on
# CUDA. Measured on an H100 (bench/prefill_matmul.py, T=512, the four Gemma 4 E4B layer shapes
# summed): cublas 376 / 494 / 461 / 373 us for Q8_0 / Q4_K / Q6_K / Q4_0 against f32's 1708 /
# 2603 / 1672 / 1689 us and triton's best 2192 / 4347 / 3916 / 2196 us; the logits of every
# tiny reference model agree with the f32 mode within 7.4e-3 of max |logit| (bench/prefill_check.py).
# Its limit is llama.cpp's cuBLAS path's too: fp16 activations overflow above 65504.
PREFILL_MODE = "cublas"
ROPE_TABLE_MIN = 1024  # positions in a cached cos/sin table (grown by doubling)
GRAPH_KV_STEP = 256  # a captured graph attends over the cache rounded up to this many positions
# prefill graphs kept (most recent shapes): each holds its activations' memory while it is kept
PREFILL_GRAPHS = 2
# stacked-expert products of at most this many (token, expert) slots run as one matvec per slot
MOE_MATVEC_SLOTS = 64


class _Step:
    """Inputs of a captured step, in device memory: token ids and positions [T] int64 (rows of one
    [2, T] tensor), and the (static) number of cache positions the attention covers."""

    def __init__(self, inp, n_kv: int, n_ctx: int):
        self.inp, self.ids, self.pos, self.n_kv, self.n_ctx = inp, inp[0], inp[1], n_kv, n_ctx
        self.masks: dict = {}


class _Graph:
    __slots__ = ("graph", "out", "cache", "keep", "inp")


class CUDABackend:
    """torch, float32. device "cuda" (default) or "cpu" (for tests).

    cache_weights: keep each matrix's dequantized float32 copy on the device after its first
    batched product (True), never (False), or while at least CACHE_RESERVE_BYTES stay free (None,
    on CUDA; always on the CPU). The cached products are bit-identical (the same float32 values
    are multiplied). Batch-1 products never use the copy: the Triton matvec reads the blocks.

    kernels / graphs: use the Triton kernels and CUDA-graph decode (None: when available)."""

    types = qt.CUDA_TYPES  # the weight types it multiplies by

    def __init__(self, gelu: str = "ggml", device: str = "cuda", cache_weights: bool | None = None,
                 kernels: bool | None = None, graphs: bool | None = None, prefill: str | None = None,
                 half_cache: bool = False, packed_iquants: bool = False):
        torch = _torch()
        if device == "cuda" and not torch.cuda.is_available():
            raise GGQuantError("--device cuda: no CUDA GPU is available to torch (torch.cuda.is_available() is "
                               "False); use --device cpu")
        self.torch = torch
        self.device = torch.device(device)
        self.name = device
        if gelu not in ("ggml", "exact"):
            raise GGQuantError(f"gelu must be 'ggml' or 'exact', got {gelu!r}")
        self.gelu_mode = gelu
        self._gelu_table = None
        self.cache_weights = cache_weights
        self.kern = _triton_kernels(self.device) if kernels is not False else None
        if kernels and self.kern is None:
            raise GGQuantError("the Triton kernels need triton and a CUDA device (or TRITON_INTERPRET=1)")
        self.graphs = (self.device.type == "cuda" and self.kern is not None) if graphs is None else graphs
        self._rope_tables: dict = {}
        self._masks: dict = {}
        self._pos = None  # (positions' bytes, device positions, largest + 1) of the last forward
        self._step: _Step | None = None
        self._graph_cache: dict = {}
        self._keep: list = []  # device tensors a captured graph reads that were since replaced
        self._pool = None  # the captured graphs' memory pool (one for all: they run one at a time)
        self._prefill_seen: dict = {}  # prefill graph keys seen once (captured when seen again)
        self._stacks: dict = {}  # matmuls' stacked weights (see _stacked)
        # batched products: see PREFILL_MODE; on the CPU device (CI) "f32" unless asked
        self.prefill = prefill or (PREFILL_MODE if self.device.type == "cuda" else "f32")
        if self.prefill not in ("cublas", "triton", "f32"):
            raise GGQuantError(f"prefill must be 'cublas', 'triton' or 'f32', got {self.prefill!r}")
        # keep each weight's fp16/bf16 copy after its first batched product (memory: 2 bytes per
        # element more; prefill is then cuBLAS alone) instead of dequantizing it every time
        self.half_cache = half_cache
        # i-quant weights in their packed layouts: 2-4x less GPU memory, slower decode (dequant.py PACKED)
        self.packed_iquants = packed_iquants
        self._host_moe = False  # an expert stack without a kernel layout: T > 1 routing read on the host

    # --- weights ------------------------------------------------------------------------------
    def weight(self, info) -> TorchWeight:
        if info.qtype not in self.types:
            raise GGQuantError(f"{info.name}: tensor type {info.qtype.name} is not supported by the CUDA runtime "
                               f"(supported: {', '.join(t.name for t in qt.CUDA_TYPES)})")
        raw = self.torch.from_numpy(np.array(info.raw(), copy=True)).to(self.device)
        w = TorchWeight(info.name, info.qtype, info.shape, raw)
        if self.kern is not None and qt.REGISTRY[info.qtype].cuda_repack is not None:
            # stacked experts [E, N, K] too: their E * N rows repack like a matrix's (row-local layouts)
            w.kind, w.parts = repack(self.torch, info.qtype, raw, info.shape[-1], self.packed_iquants)
            if w.kind != "dense":
                w.raw = None  # the repacked parts hold every value
        elif len(info.shape) == 3:
            self._host_moe = True  # experts mul_mat_id groups on the host (see graph_step)
        return w

    def _dequant(self, w: TorchWeight, raw=None, parts=None):
        if w.raw is None:
            return dequantize_parts(self.torch, w.kind, parts if parts is not None else w.parts)
        return dequantize(self.torch, w.qtype, raw if raw is not None else w.raw, w.shape[-1])

    def _deq(self, w: TorchWeight):
        if w._dense is not None:
            return w._dense
        y = self._dequant(w)
        if self._may_cache(w, y):
            w._dense = y
        return y

    def _may_cache(self, w: TorchWeight, y) -> bool:
        if w.qtype == _T.F32 or self.cache_weights is True:  # F32: y is a view of raw, no extra memory
            return True
        if self.cache_weights is False:
            return False
        if self.device.type != "cuda":
            return True
        cuda = self.torch.cuda
        free, _ = cuda.mem_get_info(self.device)
        free += cuda.memory_reserved(self.device) - cuda.memory_allocated(self.device)  # torch's idle blocks
        return free >= CACHE_RESERVE_BYTES  # y is already allocated: keeping it costs nothing more now

    def dense(self, w: TorchWeight):
        return self._deq(w).reshape(w.shape)

    def rows(self, w: TorchWeight, ids):
        if self._step is not None:  # a captured step: the token ids are a device input
            idx = self._step.ids
        else:
            idx = self.torch.as_tensor(np.asarray(ids, dtype=np.int64), device=self.device)
        if w._dense is not None:  # the same float32 values as dequantizing the selected rows
            return w._dense.index_select(0, idx)
        if w.raw is None:
            return self._dequant(w, parts=tuple(p.index_select(0, idx) for p in w.parts))
        return self._dequant(w, raw=w.raw.index_select(0, idx))

    # --- arrays -------------------------------------------------------------------------------
    def asarray(self, x):
        return self.torch.as_tensor(np.asarray(x, dtype=np.float32), device=self.device)

    def to_numpy(self, x):
        return x.detach().float().cpu().numpy()

    def zeros(self, shape):
        return self.torch.zeros(shape, dtype=self.torch.float32, device=self.device)

    # --- operations ---------------------------------------------------------------------------
    def matmul(self, x, w: TorchWeight):
        y = self._product(x, w)
        return y if w.scale is None else y * float(w.scale)  # build_lora_mm's ggml_mul by <weight>.scale

    def _product(self, x, w: TorchWeight):
        x = x.reshape(-1, x.shape[-1])
        if x.shape[0] == 1 and w.kind is not None and self.kern is not None:  # decode: read the blocks once
            n, k = w.shape
            return self.kern.matvec(self.torch, w.kind, w.parts, x.reshape(k).contiguous(), n, k).reshape(1, n)
        if self.prefill != "f32" and w.qtype != _T.F32:
            return self._matmul_half(x, w)
        return x @ self._deq(w).T

    def _half_dtype(self, w: TorchWeight):
        """The tensor-core operand type: bf16 for BF16 weights (exact), fp16 otherwise (exact for
        F16; for block types the float32 dequantization rounded once, as llama.cpp's cuBLAS path
        does with ggml_get_to_fp16_cuda)."""
        return self.torch.bfloat16 if w.qtype == _T.BF16 else self.torch.float16

    def _half(self, w: TorchWeight):
        """The weight as fp16/bf16 [N, K]: the stored values for BF16/F16, else dequantized."""
        if w._half is not None:
            return w._half
        torch, dt = self.torch, self._half_dtype(w)
        if w.kind == "dense" and w.parts[0].dtype == dt:
            return w.parts[0]
        n, k = w.shape
        if self.kern is not None and w.kind in self.kern.TILE_KINDS and k % 64 == 0:
            y = self.kern.dequant_half(torch, w.kind, w.parts, n, k, dt)
        else:
            y = self._dequant(w).to(dt)
        if self.half_cache:
            w._half = y
        return y

    def _matmul_half(self, x, w: TorchWeight):
        """x float32 [T, K] times w^T on tensor cores (fp16/bf16 operands, float32 accumulation
        and result); see PREFILL_MODE."""
        torch = self.torch
        dt = self._half_dtype(w)
        xh = x.to(dt).contiguous()
        n, k = w.shape
        if (self.prefill == "triton" and self.kern is not None and w._half is None and w.kind in self.kern.TILE_KINDS
                and k % 64 == 0 and xh.dtype == torch.float16):
            return self.kern.matmul_q(torch, w.kind, w.parts, xh, n, k)
        wh = self._half(w)
        if self.device.type == "cuda":
            try:
                return torch.mm(xh, wh.T, out_dtype=torch.float32)  # cuBLAS, float32 output (torch >= 2.8)
            except (TypeError, RuntimeError):
                return torch.mm(xh, wh.T).float()
        return xh.float() @ wh.float().T  # CPU tensors: the same operands, float32 products

    def matmuls(self, x, ws):
        """x times each of ws (same input width). At batch 1 with kernels, one matvec over the
        weights' rows stacked (q/k/v, gate/up): one launch instead of several small ones."""
        x2 = x.reshape(-1, x.shape[-1])
        batched = x2.shape[0] > 1 and self.prefill != "f32" and all(w.qtype != _T.F32 for w in ws)
        if (x2.shape[0] == 1 or batched) and self.kern is not None and len(ws) > 1:
            fused = self._stacked(ws)  # batched too: one GEMM of N = the rows of all (q/k/v, gate/up)
            if fused is not None:
                y = CUDABackend.matmul(self, x2, fused)
                return [part if w.scale is None else part * float(w.scale)
                        for part, w in zip(y.split([w.shape[0] for w in ws], dim=1), ws)]
        # CUDABackend.matmul, not self.matmul: a hook on the instance's matmul (imatrix Collector)
        # must see each weight once, as it does on the CPU backend
        return [CUDABackend.matmul(self, x, w) for w in ws]

    def _stacked(self, ws) -> TorchWeight | None:
        """One weight whose rows are ws' rows in order, built on first use; each of ws then reads
        a row slice of it (views: no second copy is kept). None when the layouts differ."""
        key = tuple(id(w) for w in ws)
        hit = self._stacks.get(key)
        if hit is not None:
            return hit
        if len({(w.kind, w.qtype, w.shape[1]) for w in ws}) != 1 or ws[0].kind is None:
            return None
        torch = self.torch
        parts = tuple(torch.cat([w.parts[i] for w in ws]) for i in range(len(ws[0].parts)))
        n = sum(w.shape[0] for w in ws)
        fused = TorchWeight("+".join(w.name for w in ws), ws[0].qtype, (n, ws[0].shape[1]), None, ws[0].kind, parts)
        a = 0
        for w in ws:
            b = a + w.shape[0]
            w.parts, w.raw = tuple(p[a:b] for p in parts), None
            a = b
        self._stacks[key] = fused
        return fused

    def rms_norm(self, x, w, eps):
        if self.kern is not None:
            return self.kern.rms_norm(self.torch, x, w, eps)
        ms = (x.double() * x.double()).mean(dim=-1, keepdim=True).float()
        y = x * self.torch.rsqrt(ms + eps)
        return y * w if w is not None else y

    def add_rms_norm(self, x, y, w, eps):
        """x + rms_norm(y, w): the residual add after a post-norm, one kernel."""
        if self.kern is not None:
            return self.kern.rms_norm(self.torch, y, w, eps, residual=x)
        return x + self.rms_norm(y, w, eps)

    def _table(self):
        if self._gelu_table is None:
            from .cpu import gelu_table

            self._gelu_table = self.torch.from_numpy(gelu_table()).to(self.device)
        return self._gelu_table

    def gelu(self, x):
        return self.geglu(x, None)

    def geglu(self, gate, up):
        """gelu(gate) * up (up None: gelu(gate)); "ggml": the CPU's fp16-table GELU, "exact": tanh."""
        torch = self.torch
        table = self._table() if self.gelu_mode == "ggml" else None
        if self.kern is not None:  # (the MoE's gate / up are column slices of one product)
            return self.kern.geglu(torch, gate.contiguous(), up.contiguous() if up is not None else None, table)
        if table is None:
            y = torch.nn.functional.gelu(gate, approximate="tanh")
        else:
            y = table[gate.to(torch.float16).view(torch.int16).long() & 0xFFFF]
            y = torch.where(gate >= 10.0, gate, torch.where(gate <= -10.0, torch.zeros_like(gate), y))
        return y * up if up is not None else y

    def _rope_table(self, n_pos, n_dims, base, freq_scale, freq_factors, yarn=None):
        """Device cos/sin [>= n_pos, n_dims/2] for positions 0.. (rope_cache rows depend only on
        their own position), built on the host once per layer kind instead of every call."""
        from .cpu import rope_cache

        if self._step is not None:
            n_pos = max(n_pos, self._step.n_ctx)  # one table for every graph of this cache
        key = (n_dims, base, freq_scale, None if freq_factors is None else id(freq_factors), yarn)
        hit = self._rope_tables.get(key)
        if hit is not None and hit[0] is freq_factors and hit[1].shape[0] >= n_pos:
            return hit[1], hit[2]
        if hit is not None:
            self._keep.append(hit)  # a captured graph may still read the old table
        n = max(ROPE_TABLE_MIN, 1 << (max(n_pos, 1) - 1).bit_length())
        ff = None if freq_factors is None else self.to_numpy(freq_factors)
        cos, sin = rope_cache(np.arange(n), n_dims, base, freq_scale, ff, yarn)
        c, s = self.torch.from_numpy(cos).to(self.device), self.torch.from_numpy(sin).to(self.device)
        self._rope_tables[key] = (freq_factors, c, s)
        return c, s

    def _positions(self, pos):
        """(device int64 positions, largest position + 1): the step's input inside a captured graph."""
        if self._step is not None:
            return self._step.pos, self._step.n_kv
        pos = np.asarray(pos, dtype=np.int64)
        key = pos.tobytes()
        if self._pos is None or self._pos[0] != key:  # one host-to-device copy per forward, not per layer
            self._pos = (key, self.torch.as_tensor(pos, device=self.device), int(pos.max()) + 1)
        return self._pos[1], self._pos[2]

    def rope(self, x, pos, n_dims, base, freq_scale=1.0, freq_factors=None, mode="neox", yarn=None):
        return self.norm_rope(x, None, 0.0, pos, n_dims, base, freq_scale, freq_factors, norm=False, mode=mode,
                              yarn=yarn)

    def norm_rope(self, x, w, eps, pos, n_dims, base, freq_scale=1.0, freq_factors=None, norm=True, mode="neox",
                  yarn=None):
        """rope(rms_norm(x, w, eps), ...) of x [T, H, D] (one kernel with Triton for NeoX RoPE). mode
        "neox" rotates pairs (i, i + n_dims/2), "norm" (the llama architecture) pairs (2i, 2i + 1)."""
        pos_d, n_pos = self._positions(pos)
        ct, st = self._rope_table(n_pos, n_dims, base, freq_scale, freq_factors, yarn)
        if self.kern is not None and mode == "neox":
            return self.kern.norm_rope(self.torch, x, w, eps, pos_d, ct, st, norm=norm, rope=True)
        if norm:
            x = self.rms_norm(x, w, eps)
        c, s = ct.index_select(0, pos_d)[:, None, :], st.index_select(0, pos_d)[:, None, :]
        half = ct.shape[1]
        if mode == "norm":
            r = x[..., :2 * half].unflatten(-1, (half, 2))
            x0, x1 = r[..., 0], r[..., 1]
            rot = self.torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)
            return self.torch.cat([rot, x[..., 2 * half:]], dim=-1)
        x0, x1 = x[..., :half], x[..., half:2 * half]
        return self.torch.cat([x0 * c - x1 * s, x0 * s + x1 * c, x[..., 2 * half:]], dim=-1)

    def swiglu(self, gate, up):
        """silu(gate) * up, float32."""
        return self.torch.nn.functional.silu(gate) * up

    def add_bias(self, x, b):
        return x + b

    def kv_layer(self, n_ctx: int, h: int, d: int):
        return _TorchLayerCache(self, n_ctx, h, d)

    def attention(self, q, layer, n_kv: int, q_pos, window: int, scale: float = 1.0):
        """q [T, H, D] against cache positions 0 .. n_kv-1 -> [T, H*D]; query head h uses KV head
        h // (H / Hkv) (GQA), keys after the query or at least `window` behind it are masked. With
        the Triton kernels: flash decoding (T = 1) or flash attention (T > 1, fp16 operands); else
        the scores materialised (baddbmm with a float32 mask, softmax, bmm)."""
        torch = self.torch
        T, H, D = q.shape
        if self._step is not None:
            n_kv = self._step.n_kv
        if self.kern is not None:  # one kernel, the mask computed inside from the device positions
            pos_d, _ = self._positions(q_pos)
            if T == 1:  # decode: flash decoding
                return self.kern.attention_decode(torch, q.reshape(H, D).contiguous(), layer.k, layer.v, pos_d,
                                                  n_kv, window, scale).reshape(1, H * D)
            # prefill: flash attention (fp16 tensor-core operands, float32 softmax: triton.py)
            return self.kern.attention_prefill(torch, q.contiguous(), layer.k, layer.v, pos_d, n_kv, window,
                                               scale).reshape(T, H * D)
        hkv = layer.k.shape[0]
        g = H // hkv
        k, v = layer.k[:, :n_kv], layer.v[:, :n_kv]  # [Hkv, S, D]
        qg = q.permute(1, 0, 2).reshape(hkv, g * T, D)  # rows (head in group, token)
        bias = self._mask(q_pos, n_kv, window)  # [T, S] 0 / -inf
        s = torch.baddbmm(bias.repeat(g, 1)[None], qg, k.transpose(1, 2), alpha=scale)  # [Hkv, g*T, S]
        p = torch.softmax(s, dim=-1)
        return torch.bmm(p, v).reshape(H, T, D).permute(1, 0, 2).reshape(T, H * D)

    def _mask(self, q_pos, n_kv: int, window: int):
        """[T, S] float32, -inf where key j is hidden from query i (after it, or `window` or more
        behind it), else 0; the layers of one forward share a few masks, kept instead of rebuilt."""
        step = self._step
        if step is not None:
            masks, key = step.masks, (n_kv, window)
        else:
            q_pos = np.asarray(q_pos, dtype=np.int64)
            masks, key = self._masks, (q_pos.tobytes(), n_kv, window)
        m = masks.get(key)
        if m is None:
            torch = self.torch
            qp = (step.pos if step is not None else torch.as_tensor(q_pos, device=self.device))[:, None]
            kp = torch.arange(n_kv, device=self.device)[None, :]
            hide = kp > qp
            if window > 0:
                hide |= (qp - kp) >= window
            m = torch.zeros(hide.shape, dtype=torch.float32, device=self.device).masked_fill_(hide, float("-inf"))
            if step is None and len(masks) >= 4:
                masks.pop(next(iter(masks)))
            masks[key] = m
        return m

    def softcap(self, x, cap):
        return self.torch.tanh(x * (1.0 / cap)) * cap

    # --- mixture of experts ---------------------------------------------------------------------
    def softmax(self, x):
        return self.torch.softmax(x, dim=-1)

    def moe_top_k(self, probs, k: int, norm: bool = True):
        """(ids int64 [T, k], weights [T, k]): top k per token, renormalised (build_moe_ffn norm_w,
        the sum clamped below as llama.cpp does)."""
        from ggquant.kernels.cpu.ops import MOE_WEIGHTS_SUM_MIN

        w, ids = self.torch.topk(probs, k, dim=-1)
        if norm:
            w = w / w.double().sum(-1, keepdim=True).float().clamp_min(float(MOE_WEIGHTS_SUM_MIN))
        return ids, w

    def mul_mat_id(self, x, w: TorchWeight, ids):
        """y[t, j] = x[t, j] @ W[ids[t, j]]^T for stacked experts W [E, N, K]; x [T, K] or [T, k, K].

        With the Triton kernels (the stack repacked like a matrix): at most MOE_MATVEC_SLOTS slots
        (decode), one matvec launch over the slots, each reading its expert's blocks once; more
        (prefill), one grouped tensor-core product (kernels matmul_id: slots sorted by expert on
        the device, each expert's tiles dequantized in registers; float32 weights and the "f32"
        prefill mode keep the matvec). Neither reads the routing on the host, so both run inside
        captured CUDA graphs. Without them: few rows gather the selected
        experts' blocks and dequantize them, one batched product; otherwise grouped by expert on
        the host, each expert used dequantized once (or read from the cached float32 stack)."""
        torch = self.torch
        E, N, K = w.shape
        T, k = ids.shape
        xs = x.reshape(T, -1, K)
        xdiv = k if xs.shape[1] == 1 else 1  # gate/up read one row per token, down one per slot
        if self.kern is not None and w.kind is not None:
            slots = ids.reshape(-1).to(torch.int32)
            tiles = (w.kind == "dense" or w.kind in self.kern.TILE_KINDS) and K % 64 == 0  # whole BK tiles
            if T * k <= MOE_MATVEC_SLOTS or not tiles or self.prefill == "f32" or w.qtype == _T.F32:
                y = self.kern.matvec(torch, w.kind, w.parts, xs.reshape(-1, K).contiguous(), N, K, ids=slots,
                                     xdiv=xdiv)
            else:
                xh = xs.reshape(-1, K).to(self._half_dtype(w)).contiguous()
                y = self.kern.matmul_id(torch, w.kind, w.parts, xh, slots, xdiv, N, K, E)
            return y.view(T, k, N)
        if self._step is not None or T * k <= E:
            flat = ids.reshape(-1).long()
            if w._dense is not None:
                ws = w._dense.view(E, N, K).index_select(0, flat)
            else:
                raw = w.raw.view(E, N, -1).index_select(0, flat)
                ws = dequantize(torch, w.qtype, raw.reshape(-1, raw.shape[-1]), K).view(-1, N, K)
            xin = xs.expand(T, k, K) if xs.shape[1] == 1 else xs
            return torch.bmm(ws, xin.reshape(T * k, K, 1)).reshape(T, k, N)
        out = torch.empty((T, k, N), dtype=torch.float32, device=self.device)
        dense = self._deq(w).view(E, N, K) if w._dense is not None or self._may_cache_stack(w) else None
        for e in torch.unique(ids).tolist():
            tok, slot = (ids == e).nonzero(as_tuple=True)
            we = dense[e] if dense is not None else dequantize(torch, w.qtype, w.raw[e * N:(e + 1) * N], K)
            out[tok, slot] = xs[tok, slot if xs.shape[1] > 1 else 0] @ we.T
        return out

    def _may_cache_stack(self, w: TorchWeight) -> bool:
        """Dequantize a whole expert stack (and keep it) only where caching is allowed and the
        float32 copy is small enough to leave the reserve free."""
        return self.cache_weights is not False and (self.device.type != "cuda" or self.cache_weights is True)

    def synchronize(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    # --- a forward as one CUDA graph -----------------------------------------------------------
    def graph_step(self, model, ids, pos0: int, cache, logits: str):
        """model.forward of ids (T tokens from position pos0), replayed from a CUDA graph captured
        per cache, T, logits and GRAPH_KV_STEP-position window. Decode (T = 1) captures on the
        first call of a window; a prefill shape (T > 1) on its second call, since capturing costs
        two forwards and most prompts come once. Eager instead: graphs off, an operation hooked
        (imatrix Collector, profiler), a model that is not graph-safe, and T > 1 through experts
        without a kernel layout (mul_mat_id then groups them on the host)."""
        T = len(ids)
        if (not self.graphs or self._hooked() or not getattr(model, "graph_safe", True)
                or (T > 1 and self._host_moe)):
            return model.forward(ids, pos0, cache, logits)
        torch = self.torch
        n_kv = min(cache.n_ctx, -(-(pos0 + T) // GRAPH_KV_STEP) * GRAPH_KV_STEP)
        key = (id(cache), T, n_kv, logits)
        g = self._graph_cache.get(key)
        if g is None and T > 1:
            if self._prefill_seen.pop(key, None) is None:  # first sighting: eager, remembered
                self._prefill_seen[key] = True
                if len(self._prefill_seen) > 64:
                    self._prefill_seen.pop(next(iter(self._prefill_seen)))
                return model.forward(ids, pos0, cache, logits)
            prefill = [k for k in self._graph_cache if k[1] > 1]
            for old in prefill[:max(0, len(prefill) - PREFILL_GRAPHS + 1)]:
                del self._graph_cache[old]  # the oldest prefill shapes give their memory back
        inp = np.stack([np.asarray(ids, dtype=np.int64), np.arange(pos0, pos0 + T, dtype=np.int64)])
        if g is None:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            g = self._capture(model, inp, pos0, cache, logits, n_kv)
            self._graph_cache[key] = g
        else:
            g.inp.copy_(torch.from_numpy(inp))
        g.graph.replay()
        return g.out

    def _hooked(self) -> bool:
        """An operation replaced on the instance (imatrix Collector, profilers) must see every
        call: a replayed graph would skip it, so such a step runs eagerly."""
        return any(getattr(getattr(self, m), "__func__", None) is not getattr(CUDABackend, m)
                   for m in ("matmul", "matmuls", "rows", "mul_mat_id"))

    def _capture(self, model, inp, pos0, cache, logits, n_kv) -> _Graph:
        torch = self.torch
        ids = inp[0]
        g = _Graph()
        g.inp = torch.from_numpy(inp).to(self.device)
        self._step = _Step(g.inp, n_kv, cache.n_ctx)
        try:
            # warm-up on a side stream (compiles kernels, builds tables and masks); it computes
            # this very step, so the K/V it stores are the ones the replay stores again
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                model.forward(ids, pos0, cache, logits)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._step.masks = {}  # built from the positions: must be recomputed inside the graph
            g.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g.graph, pool=self._pool):
                g.out = model.forward(ids, pos0, cache, logits)
            g.cache, g.keep = cache, self._step.masks
        finally:
            self._step = None
        return g


class _TorchLayerCache:
    """K and V of one layer, [Hkv, n_ctx, D] each (a head's positions contiguous for the bmm)."""

    def __init__(self, be: CUDABackend, n_ctx: int, h: int, d: int):
        self.be = be
        self.k = be.zeros((h, n_ctx, d))
        self.v = be.zeros((h, n_ctx, d))

    def store(self, pos0: int, k, v) -> None:
        step = self.be._step
        if step is not None:  # a captured step: the positions are a device input
            self.k.index_copy_(1, step.pos, k.permute(1, 0, 2))
            self.v.index_copy_(1, step.pos, v.permute(1, 0, 2))
            return
        t = k.shape[0]
        self.k[:, pos0:pos0 + t] = k.permute(1, 0, 2)
        self.v[:, pos0:pos0 + t] = v.permute(1, 0, 2)


TorchBackend = CUDABackend
