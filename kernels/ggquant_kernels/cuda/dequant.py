"""GGML blocks on a torch device: per-type decoders and the repacked layouts the Triton matvec reads.

Each decoder ports ggml's dequantize_row_<type> (the block layouts of ggml-common.h) to torch
ops on a whole tensor of block bytes: raw uint8 [N, row_bytes] -> float32 [N, n_per_row]. Each
repacker turns the same bytes into (kind, parts), the layout triton.py's matvec reads (its
docstring); every value of ggml's blocks is kept, only de-interleaved, and dequantize_parts
reads it back. Which type uses which decoder and repacker is declared once, in the type's
registry entry (ggquant.quant.types). torch is passed in, so importing this module needs no torch.
"""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_T = GGMLQuantizationType


def _fp16(torch, b):
    """[..., 2] uint8 -> float32 [...] (little-endian fp16)."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _scale_min_k4(torch, s):
    """get_scale_min_k4 for all 8 sub-blocks: s uint8 [..., 12] -> (scales, mins) int32 [..., 8]."""
    s = s.int()
    lo = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)], dim=-1)
    mn = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], dim=-1)
    return lo, mn


def _blocks(qtype, raw, n_per_row: int):
    """uint8 [N, row_bytes] -> [N, blocks per row, bytes per block]."""
    block, size = GGML_QUANT_SIZES[qtype]
    return raw.reshape(raw.shape[0], n_per_row // block, size)


# --- float types: the row bytes are the values --------------------------------------------------

def _float_type(dtype: str):
    def dequantize(torch, raw, n_per_row: int):
        return raw.contiguous().view(getattr(torch, dtype)).reshape(raw.shape[0], n_per_row).float()

    def repack(torch, raw, n_per_row: int):
        return "dense", (raw.view(getattr(torch, dtype)).reshape(raw.shape[0], n_per_row),)

    return dequantize, repack


dequantize_f32, repack_f32 = _float_type("float32")
dequantize_f16, repack_f16 = _float_type("float16")
dequantize_bf16, repack_bf16 = _float_type("bfloat16")


# --- Q8_0: d fp16 | qs[32] int8 -----------------------------------------------------------------

def dequantize_q8_0(torch, raw, n_per_row: int):
    b = _blocks(_T.Q8_0, raw, n_per_row)
    return (_fp16(torch, b[..., 0:2])[..., None] * b[..., 2:].contiguous().view(torch.int8).float()).reshape(
        raw.shape[0], -1)


def repack_q8_0(torch, raw, n_per_row: int):
    N = raw.shape[0]
    b = _blocks(_T.Q8_0, raw, n_per_row)
    d = b[..., 0:2].contiguous().view(torch.float16).reshape(N, -1)
    return "int8", (b[..., 2:].contiguous().view(torch.int8).reshape(N, n_per_row), d)


# --- signed codes with one scale per group: Q4_0, Q5_0 (32 values, fp16 d), Q6_K (16, d*sc) -----

def _q0_codes(torch, qtype, raw, n_per_row: int):
    """Q4_0 (d | qs[16]: nibble - 8) and Q5_0 (d | qh u32 | qs[16]: (nibble | qh bit << 4) - 16):
    (codes int32 [N, blocks, 32], d float32 [N, blocks])."""
    b = _blocks(qtype, raw, n_per_row)
    d = _fp16(torch, b[..., 0:2])
    qs = b[..., -16:].int()
    q = torch.cat([qs & 0xF, qs >> 4], dim=-1)  # element j: low nibble, j + 16: high nibble
    if qtype == _T.Q5_0:  # qh u32: bit j is bit 4 of element j
        qh = b[..., 2:6].int()
        qh = qh[..., 0] | (qh[..., 1] << 8) | (qh[..., 2] << 16) | (qh[..., 3] << 24)
        bits = (qh[..., None] >> torch.arange(32, device=raw.device, dtype=torch.int32)) & 1
        return (q | (bits << 4)) - 16, d
    return q - 8, d


def _q6_k_codes(torch, raw, n_per_row: int):
    """Q6_K (ql[128] | qh[64] | scales[16] int8 | d fp16): (codes int32 [N, super-blocks, 2, 4, 32]
    in [-32, 31], d float32 [N, super-blocks], scales float32 [N, super-blocks, 16])."""
    N = raw.shape[0]
    b = _blocks(_T.Q6_K, raw, n_per_row)
    d = _fp16(torch, b[..., 208:210])
    sc = b[..., 192:208].contiguous().view(torch.int8).float()
    ql = b[..., 0:128].int().reshape(N, -1, 2, 2, 32)  # [half, ql lo/hi 32, l]
    qh = b[..., 128:192].int().reshape(N, -1, 2, 1, 32)
    lo = ql & 0xF
    hi = ql >> 4
    # per half: [q1 | q2 | q3 | q4] = [ql[l]&F, ql[l+32]&F, ql[l]>>4, ql[l+32]>>4] with qh bits 0,2,4,6
    nib = torch.cat([lo, hi], dim=3)  # [N, nsb, 2, 4, 32]
    sh = torch.arange(0, 8, 2, device=raw.device, dtype=torch.int32).reshape(1, 1, 1, 4, 1)
    return (nib | (((qh >> sh) & 3) << 4)) - 32, d, sc


def _q0_type(qtype):
    def dequantize(torch, raw, n_per_row: int):
        q, d = _q0_codes(torch, qtype, raw, n_per_row)
        return (d[..., None] * q.float()).reshape(raw.shape[0], -1)

    def repack(torch, raw, n_per_row: int):
        # the codes as int8 with their exact fp16 scales (G = 32)
        q, d = _q0_codes(torch, qtype, raw, n_per_row)
        return "int8", (q.to(torch.int8).reshape(raw.shape[0], n_per_row), d.to(torch.float16))

    return dequantize, repack


dequantize_q4_0, repack_q4_0 = _q0_type(_T.Q4_0)
dequantize_q5_0, repack_q5_0 = _q0_type(_T.Q5_0)


# --- unsigned codes with a scale and an offset per 32 values: Q4_1, Q5_1 -------------------------

def _q1_type(qtype):
    """Q4_1 (d | m | qs[16]) and Q5_1 (d | m | qh u32 | qs[16]): y = q * d + m, q unsigned (nibble,
    with Q5_1's qh bit 4); ggml's dequantize_row_q4_1 / _q5_1 round the product, then the sum."""
    def dequantize(torch, raw, n_per_row: int):
        b = _blocks(qtype, raw, n_per_row)
        d, m = _fp16(torch, b[..., 0:2]), _fp16(torch, b[..., 2:4])
        qs = b[..., -16:].int()
        q = torch.cat([qs & 0xF, qs >> 4], dim=-1)
        if qtype == _T.Q5_1:
            qh = b[..., 4:8].int()
            qh = qh[..., 0] | (qh[..., 1] << 8) | (qh[..., 2] << 16) | (qh[..., 3] << 24)
            q = q | (((qh[..., None] >> torch.arange(32, device=raw.device, dtype=torch.int32)) & 1) << 4)
        y = q.float() * d[..., None]
        return (y + m[..., None]).reshape(raw.shape[0], -1)

    return dequantize


dequantize_q4_1 = _q1_type(_T.Q4_1)
dequantize_q5_1 = _q1_type(_T.Q5_1)


def dequantize_q6_k(torch, raw, n_per_row: int):
    N = raw.shape[0]
    q, d, sc = _q6_k_codes(torch, raw, n_per_row)
    y = q.float().reshape(N, -1, 16, 16) * (d[..., None] * sc)[..., None]
    return y.reshape(N, -1)


def repack_q6_k(torch, raw, n_per_row: int):
    """The codes as int8 with float32 d*sc per 16 columns (exact: an fp16 times a 6-bit int)."""
    N = raw.shape[0]
    q, d, sc = _q6_k_codes(torch, raw, n_per_row)
    return "int8", (q.to(torch.int8).reshape(N, n_per_row), (d[..., None] * sc).reshape(N, -1))


# --- Q4_K / Q5_K: d | dmin | scales[12] (| qh[32] for Q5_K) | qs[128] ----------------------------

def _k45_type(qtype):
    def dequantize(torch, raw, n_per_row: int):
        N = raw.shape[0]
        b = _blocks(qtype, raw, n_per_row)
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

    return dequantize


dequantize_q4_k = _k45_type(_T.Q4_K)
dequantize_q5_k = _k45_type(_T.Q5_K)


def repack_q4_k(torch, raw, n_per_row: int):
    N = raw.shape[0]
    b = _blocks(_T.Q4_K, raw, n_per_row)
    d = b[..., 0:2].contiguous().view(torch.float16).reshape(N, -1)
    dmin = b[..., 2:4].contiguous().view(torch.float16).reshape(N, -1)
    sc, mn = _scale_min_k4(torch, b[..., 4:16])
    u8 = torch.uint8
    return "q4_k", (b[..., 16:].contiguous().reshape(N, n_per_row // 2), sc.to(u8).reshape(N, -1),
                    mn.to(u8).reshape(N, -1), d, dmin)


def dequantize_parts(torch, kind: str, parts: tuple):
    """The float32 values of a repacked weight: equal to the type's decoder of its block bytes."""
    if kind == "dense":
        return parts[0].float()
    if kind == "int8":
        q, d = parts
        N, K = q.shape
        return (d.float()[..., None] * q.reshape(N, d.shape[1], -1).float()).reshape(N, K)
    if kind == "q4_k":
        qs, sc, mn, d, dmin = parts
        N = qs.shape[0]
        q = qs.int().reshape(N, -1, 4, 32)
        q = torch.stack([q & 0xF, q >> 4], dim=3).reshape(N, -1, 8, 32).float()
        y = (d.float()[..., None] * sc.reshape(N, -1, 8).float())[..., None] * q \
            - (dmin.float()[..., None] * mn.reshape(N, -1, 8).float())[..., None]
        return y.reshape(N, -1)
    raise ValueError(f"unknown weight layout {kind!r}")
