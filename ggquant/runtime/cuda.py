"""CUDA backend (torch): the same model code on a GPU, in float32.

Weights stay in their GGUF block bytes on the GPU (uint8 [N, row_bytes]) and are dequantized
with torch ops per block type (the layouts of ggml-common.h, as in ggml's dequantize_row_<type>)
the first time they are multiplied; the float32 result is kept on the device while memory allows
(cache_weights, see CUDABackend), otherwise it is recomputed for every product. Products are
float32. Activations are not quantized: the
CPU backend reproduces llama.cpp's CPU arithmetic, this one is plain float32, and both agree
within 1e-2 on the tiny F32 models (tests/runtime/test_cuda.py).

The class also runs on device="cpu" (TorchBackend("cpu")), which is how CI checks the
dequantizers and the model wiring without a GPU.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ggquant.errors import GGQuantError

_T = GGMLQuantizationType
SUPPORTED = (_T.F32, _T.F16, _T.BF16, _T.Q8_0, _T.Q4_0, _T.Q5_0, _T.Q4_K, _T.Q5_K, _T.Q6_K)


def _torch():
    try:
        import torch
    except ImportError:
        raise GGQuantError("--device cuda needs torch (pip install torch)") from None
    return torch


class TorchWeight:
    __slots__ = ("name", "qtype", "shape", "raw", "_dense")

    def __init__(self, name, qtype, shape, raw):
        self.name, self.qtype, self.shape, self.raw = name, qtype, tuple(shape), raw
        self._dense = None


def _fp16(torch, b):
    """[..., 2] uint8 -> float32 [...] (little-endian fp16)."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _scale_min_k4(torch, s):
    """get_scale_min_k4 for all 8 sub-blocks: s uint8 [..., 12] -> (scales, mins) int32 [..., 8]."""
    s = s.int()
    lo = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)], dim=-1)
    mn = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], dim=-1)
    return lo, mn


def dequantize(torch, qtype, raw, n_per_row: int):
    """uint8 [N, row_bytes] torch tensor -> float32 [N, n_per_row] (ggml dequantize_row_<type>)."""
    N = raw.shape[0]
    if qtype == _T.F32:
        return raw.contiguous().view(torch.float32).reshape(N, n_per_row)
    if qtype == _T.F16:
        return raw.contiguous().view(torch.float16).reshape(N, n_per_row).float()
    if qtype == _T.BF16:
        return raw.contiguous().view(torch.bfloat16).reshape(N, n_per_row).float()
    block, size = GGML_QUANT_SIZES[qtype]
    b = raw.reshape(N, n_per_row // block, size)
    if qtype == _T.Q8_0:  # d fp16 | qs[32] int8
        return (_fp16(torch, b[..., 0:2])[..., None] * b[..., 2:].contiguous().view(torch.int8).float()).reshape(N, -1)
    if qtype in (_T.Q4_0, _T.Q5_0):
        d = _fp16(torch, b[..., 0:2])
        qs = b[..., -16:].int()
        q = torch.cat([qs & 0xF, qs >> 4], dim=-1)  # element j: low nibble, j + 16: high nibble
        if qtype == _T.Q5_0:  # qh u32: bit j is bit 4 of element j
            qh = b[..., 2:6].int()
            qh = qh[..., 0] | (qh[..., 1] << 8) | (qh[..., 2] << 16) | (qh[..., 3] << 24)
            bits = (qh[..., None] >> torch.arange(32, device=raw.device, dtype=torch.int32)) & 1
            q = (q | (bits << 4)) - 16
        else:
            q = q - 8
        return (d[..., None] * q.float()).reshape(N, -1)
    if qtype in (_T.Q4_K, _T.Q5_K):
        d, dmin = _fp16(torch, b[..., 0:2]), _fp16(torch, b[..., 2:4])
        sc, mn = _scale_min_k4(torch, b[..., 4:16])
        qs = b[..., -128:].int().reshape(N, -1, 4, 32)  # 4 chunks of 32 bytes
        q = torch.stack([qs & 0xF, qs >> 4], dim=3)  # [N, nsb, 4, 2, 32]: sub-block 2j, 2j+1
        if qtype == _T.Q5_K:
            qh = b[..., 16:48].int()  # bit 2j / 2j+1 of qh[l] -> +16 in sub-block 2j / 2j+1
            sh = torch.arange(8, device=raw.device, dtype=torch.int32).reshape(4, 2)
            q = q + 16 * ((qh[:, :, None, None, :] >> sh[None, None, :, :, None]) & 1)
        q = q.reshape(N, -1, 8, 32).float()
        y = (d[..., None] * sc.float())[..., None] * q - (dmin[..., None] * mn.float())[..., None]
        return y.reshape(N, -1)
    if qtype == _T.Q6_K:  # ql[128] | qh[64] | scales[16] int8 | d fp16
        d = _fp16(torch, b[..., 208:210])
        sc = b[..., 192:208].contiguous().view(torch.int8).float()
        ql = b[..., 0:128].int().reshape(N, -1, 2, 2, 32)  # [half, ql lo/hi 32, l]
        qh = b[..., 128:192].int().reshape(N, -1, 2, 1, 32)
        lo = ql & 0xF
        hi = ql >> 4
        # per half: [q1 | q2 | q3 | q4] = [ql[l]&F, ql[l+32]&F, ql[l]>>4, ql[l+32]>>4] with qh bits 0,2,4,6
        nib = torch.cat([lo, hi], dim=3)  # [N, nsb, 2, 4, 32]
        sh = torch.arange(0, 8, 2, device=raw.device, dtype=torch.int32).reshape(1, 1, 1, 4, 1)
        q = (nib | (((qh >> sh) & 3) << 4)) - 32
        y = q.float().reshape(N, -1, 16, 16) * (d[..., None] * sc)[..., None]
        return y.reshape(N, -1)
    raise GGQuantError(f"the CUDA backend cannot dequantize {qtype.name} yet")


# auto weight cache: keep this much device memory free after caching a dense float32 copy
CACHE_RESERVE_BYTES = 4 << 30
ROPE_TABLE_MIN = 1024  # positions in a cached cos/sin table (grown by doubling)


class CUDABackend:
    """torch, float32. device "cuda" (default) or "cpu" (for tests).

    cache_weights: keep each matrix's dequantized float32 copy on the device after its first
    product (True), never (False), or while at least CACHE_RESERVE_BYTES stay free (None, on CUDA;
    always on the CPU). Dequantizing every matrix for every decode step costs several times the
    weight bytes in device traffic and, for k-quants, dozens of kernels per matrix; the cached
    products are bit-identical (the same float32 values are multiplied)."""

    def __init__(self, gelu: str = "ggml", device: str = "cuda", cache_weights: bool | None = None):
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
        self._rope_tables: dict = {}
        self._masks: dict = {}

    # --- weights ------------------------------------------------------------------------------
    def weight(self, info) -> TorchWeight:
        if info.qtype not in SUPPORTED:
            raise GGQuantError(f"{info.name}: tensor type {info.qtype.name} is not supported by the CUDA runtime "
                               f"(supported: {', '.join(t.name for t in SUPPORTED)})")
        raw = self.torch.from_numpy(np.array(info.raw(), copy=True)).to(self.device)
        return TorchWeight(info.name, info.qtype, info.shape, raw)

    def _deq(self, w: TorchWeight):
        if w._dense is not None:
            return w._dense
        y = dequantize(self.torch, w.qtype, w.raw, w.shape[-1])
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
        idx = self.torch.as_tensor(np.asarray(ids, dtype=np.int64), device=self.device)
        if w._dense is not None:  # the same float32 values as dequantizing the selected rows
            return w._dense.index_select(0, idx)
        return dequantize(self.torch, w.qtype, w.raw.index_select(0, idx), w.shape[-1])

    # --- arrays -------------------------------------------------------------------------------
    def asarray(self, x):
        return self.torch.as_tensor(np.asarray(x, dtype=np.float32), device=self.device)

    def to_numpy(self, x):
        return x.detach().float().cpu().numpy()

    def zeros(self, shape):
        return self.torch.zeros(shape, dtype=self.torch.float32, device=self.device)

    # --- operations ---------------------------------------------------------------------------
    def matmul(self, x, w: TorchWeight):
        return x.reshape(-1, x.shape[-1]) @ self._deq(w).T

    def matmuls(self, x, ws):
        # CUDABackend.matmul, not self.matmul: a hook on the instance's matmul (imatrix Collector)
        # must see each weight once, as it does on the CPU backend
        return [CUDABackend.matmul(self, x, w) for w in ws]

    def rms_norm(self, x, w, eps):
        ms = (x.double() * x.double()).mean(dim=-1, keepdim=True).float()
        y = x * self.torch.rsqrt(ms + eps)
        return y * w if w is not None else y

    def gelu(self, x):
        torch = self.torch
        if self.gelu_mode == "exact":
            return torch.nn.functional.gelu(x, approximate="tanh")
        if self._gelu_table is None:
            from .cpu import _gelu_table

            self._gelu_table = torch.from_numpy(_gelu_table()).to(self.device)
        idx = x.to(torch.float16).view(torch.int16).long() & 0xFFFF
        y = self._gelu_table[idx]
        y = torch.where(x >= 10.0, x, y)
        return torch.where(x <= -10.0, torch.zeros_like(x), y)

    def geglu(self, gate, up):
        return self.gelu(gate) * up

    def _rope_table(self, n_pos, n_dims, base, freq_scale, freq_factors):
        """Device cos/sin [>= n_pos, n_dims/2] for positions 0.. (rope_cache rows depend only on
        their own position), built on the host once per layer kind instead of every call."""
        from .cpu import rope_cache

        key = (n_dims, base, freq_scale, None if freq_factors is None else id(freq_factors))
        hit = self._rope_tables.get(key)
        if hit is not None and hit[0] is freq_factors and hit[1].shape[0] >= n_pos:
            return hit[1], hit[2]
        n = max(ROPE_TABLE_MIN, 1 << (max(n_pos, 1) - 1).bit_length())
        ff = None if freq_factors is None else self.to_numpy(freq_factors)
        cos, sin = rope_cache(np.arange(n), n_dims, base, freq_scale, ff)
        c, s = self.torch.from_numpy(cos).to(self.device), self.torch.from_numpy(sin).to(self.device)
        self._rope_tables[key] = (freq_factors, c, s)
        return c, s

    def rope(self, x, pos, n_dims, base, freq_scale=1.0, freq_factors=None):
        pos = np.asarray(pos, dtype=np.int64)
        ct, st = self._rope_table(int(pos.max()) + 1, n_dims, base, freq_scale, freq_factors)
        p0 = int(pos[0])
        if np.array_equal(pos, np.arange(p0, p0 + len(pos))):  # contiguous: a slice, no index upload
            c, s = ct[p0:p0 + len(pos), None, :], st[p0:p0 + len(pos), None, :]
        else:
            idx = self.torch.as_tensor(pos, device=self.device)
            c, s = ct.index_select(0, idx)[:, None, :], st.index_select(0, idx)[:, None, :]
        half = ct.shape[1]
        x0, x1 = x[..., :half], x[..., half:2 * half]
        return self.torch.cat([x0 * c - x1 * s, x0 * s + x1 * c, x[..., 2 * half:]], dim=-1)

    def kv_layer(self, n_ctx: int, h: int, d: int):
        return _TorchLayerCache(self, n_ctx, h, d)

    def attention(self, q, layer, n_kv: int, q_pos, window: int, scale: float = 1.0):
        torch = self.torch
        T, H, D = q.shape
        k, v = layer.k[:n_kv], layer.v[:n_kv]  # [S, Hkv, D]
        g = H // k.shape[1]
        masked = self._mask(q_pos, n_kv, window)
        kk = k.repeat_interleave(g, dim=1).permute(1, 2, 0)  # [H, D, S]
        vv = v.repeat_interleave(g, dim=1).permute(1, 0, 2)  # [H, S, D]
        s = torch.matmul(q.permute(1, 0, 2), kk) * scale  # [H, T, S]
        s = s.masked_fill(masked[None], float("-inf"))
        p = torch.softmax(s, dim=-1)
        return torch.matmul(p, vv).permute(1, 0, 2).reshape(T, H * D)

    def _mask(self, q_pos, n_kv: int, window: int):
        """[T, S] bool, True where key j is hidden from query i; the layers of one forward share a
        few masks, so the last ones are kept instead of rebuilt (and uploaded) per layer."""
        q_pos = np.asarray(q_pos, dtype=np.int64)
        key = (q_pos.tobytes(), n_kv, window)
        m = self._masks.get(key)
        if m is None:
            torch = self.torch
            qp = torch.as_tensor(q_pos, device=self.device)[:, None]
            kp = torch.arange(n_kv, device=self.device)[None, :]
            m = kp > qp
            if window > 0:
                m |= (qp - kp) >= window
            if len(self._masks) >= 4:
                self._masks.pop(next(iter(self._masks)))
            self._masks[key] = m
        return m

    def softcap(self, x, cap):
        return self.torch.tanh(x * (1.0 / cap)) * cap

    def synchronize(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


class _TorchLayerCache:
    def __init__(self, be: CUDABackend, n_ctx: int, h: int, d: int):
        self.k = be.zeros((n_ctx, h, d))
        self.v = be.zeros((n_ctx, h, d))

    def store(self, pos0: int, k, v) -> None:
        t = k.shape[0]
        self.k[pos0:pos0 + t] = k
        self.v[pos0:pos0 + t] = v


TorchBackend = CUDABackend
