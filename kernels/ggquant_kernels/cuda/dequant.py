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
    if kind in ("iq4_xs", "iq4_nl", "iq3_s", "iq3_xxs", "iq2_s", "iq2_xs"):
        return _dequantize_packed(torch, kind, parts)
    raise ValueError(f"unknown weight layout {kind!r}")


# --- low-bit types (issue 14): signed int8 codes with one float32 scale per group --------------
#
# Every one of these decodes as y = scale * code, with scale and code computed exactly as the C
# dequantize_row_<type> computes its factors (float32, same operation order, so torch gives the
# same bits): the grid i-quants db * (+-grid) with db = d * (0.5 + ls) * 0.25 (IQ2_*), * 0.5
# (IQ3_XXS), d * (1 + 2 ls) (IQ3_S); IQ1_S / IQ1_M dl * (grid +- 1/8) as (dl / 8) * (8 grid +- 1)
# (the same real product, rounded once); TQ*: (code - 1) * d; IQ4_NL / IQ4_XS: (d or d*(ls-32)) *
# kvalue; MXFP4 / NVFP4: kvalue * the E8M0 / UE4M3 scale (halved: kvalues are doubled E2M1); Q1_0
# +-d. The decoder multiplies them out; the repacker keeps them as the Triton matvec's "int8"
# layout (1 byte per weight + one scale per group: the generic path, not the packed bits).

def _lowbit_tables():
    import numpy as np

    from ..quants import iq4, iquants, lowbit

    return {
        "iq2xxs": iquants.IQ2XXS_GRID.astype(np.int8), "iq2xs": iquants.IQ2XS_GRID.astype(np.int8),
        "iq2s": iquants.IQ2S_GRID.astype(np.int8), "iq3xxs": iquants.IQ3XXS_GRID.astype(np.int8),
        "iq3s": iquants.IQ3S_GRID.astype(np.int8), "iq1s": iquants.IQ1S_GRID.astype(np.int8),
        "ksigns": iquants.KSIGNS_IQ2XS, "iq4nl": iq4.KVALUES_IQ4NL, "fp4": lowbit.KVALUES_MXFP4.astype(np.int8),
        "e8m0": lowbit.E8M0_TO_FP32_HALF, "ue4m3": lowbit.UE4M3_TO_FP32_HALF,
    }


_TABLES: dict = {}


def _tab(torch, name, device):
    key = (name, str(device))
    if key not in _TABLES:
        if not _TABLES.get("_np"):
            _TABLES["_np"] = _lowbit_tables()
        _TABLES[key] = torch.from_numpy(_TABLES["_np"][name]).to(device)
    return _TABLES[key]


def _u32(b):
    b = b.long()
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


def _signed(torch, vals, signs):
    """vals int32 [..., 8], sign bytes [...]: element j negated where bit j of the byte is set."""
    bits = (signs.long()[..., None] >> torch.arange(8, device=vals.device)) & 1
    return torch.where(bits.bool(), -vals, vals)


def _f32(torch, v):
    return torch.as_tensor(v, dtype=torch.float32)


def _codes_iq2_xxs(torch, raw, n):
    N = raw.shape[0]
    b = _blocks(_T.IQ2_XXS, raw, n)
    d = _fp16(torch, b[..., 0:2])  # [N, nsb]
    q = b[..., 2:].reshape(N, -1, 8, 8)  # per 32: 4 grid bytes, u32 aux
    aux = _u32(q[..., 4:8])  # [N, nsb, 8]
    ls = (aux >> 28).float()
    db = d[..., None] * (_f32(torch, 0.5) + ls) * _f32(torch, 0.25)
    g = _tab(torch, "iq2xxs", raw.device)[q[..., 0:4].long()].int()  # [N, nsb, 8, 4, 8]
    s = _tab(torch, "ksigns", raw.device)[(aux[..., None] >> (7 * torch.arange(4, device=raw.device))) & 127]
    return _signed(torch, g, s).reshape(N, n), db.reshape(N, -1)


def _codes_iq2_xs_s(torch, qtype, raw, n):
    N = raw.shape[0]
    b = _blocks(qtype, raw, n)
    d = _fp16(torch, b[..., 0:2])
    if qtype == _T.IQ2_XS:
        q = b[..., 2:66].contiguous().view(torch.int16).long() & 0xFFFF  # [N, nsb, 32]
        g = _tab(torch, "iq2xs", raw.device)[q & 511]
        s = _tab(torch, "ksigns", raw.device)[q >> 9]
        sc = b[..., 66:74].long()
    else:
        qs = b[..., 2:34].long()
        qh = b[..., 66:74].long()  # per 32: 2 bits of each of its 4 grid indices
        sh = 8 - 2 * torch.arange(4, device=raw.device)
        hi = ((qh[..., :, None] << sh) & 0x300).reshape(N, -1, 32)
        g = _tab(torch, "iq2s", raw.device)[qs | hi]
        s = b[..., 34:66]
        sc = b[..., 74:82].long()
    ls = torch.stack([sc & 15, sc >> 4], dim=-1).float()  # [N, nsb, 8, 2]: per 16
    db = d[..., None, None] * (_f32(torch, 0.5) + ls) * _f32(torch, 0.25)
    return _signed(torch, g.int(), s).reshape(N, n), db.reshape(N, -1)


def _codes_iq3(torch, qtype, raw, n):
    N = raw.shape[0]
    b = _blocks(qtype, raw, n)
    d = _fp16(torch, b[..., 0:2])
    qs = b[..., 2:66].long().reshape(N, -1, 8, 4, 2)  # per 32: 4 groups of 8 = 2 grid entries
    if qtype == _T.IQ3_XXS:
        aux = _u32(b[..., 66:98].reshape(N, -1, 8, 4))  # [N, nsb, 8]
        db = d[..., None] * (_f32(torch, 0.5) + (aux >> 28).float()) * _f32(torch, 0.5)
        s = _tab(torch, "ksigns", raw.device)[(aux[..., None] >> (7 * torch.arange(4, device=raw.device))) & 127]
        g = _tab(torch, "iq3xxs", raw.device)[qs]  # [N, nsb, 8, 4, 2, 4]
    else:
        qh = b[..., 66:74].long()  # [N, nsb, 8]
        l = torch.arange(4, device=raw.device)
        hi = torch.stack([(qh[..., None] << (8 - 2 * l)) & 256, (qh[..., None] << (7 - 2 * l)) & 256], dim=-1)
        g = _tab(torch, "iq3s", raw.device)[qs | hi]
        s = b[..., 74:106].reshape(N, -1, 8, 4)
        sc = b[..., 106:110].long()
        ls = torch.stack([sc & 15, sc >> 4], dim=-1).reshape(N, -1, 8)
        db = d[..., None] * (1 + 2 * ls).float()
    return _signed(torch, g.int().reshape(N, -1, 8, 4, 8), s).reshape(N, n), db.reshape(N, -1)


def _codes_iq1(torch, qtype, raw, n):
    """8 * grid + delta (delta = +-1) with scale dl / 8."""
    N = raw.shape[0]
    b = _blocks(qtype, raw, n)
    grid = _tab(torch, "iq1s", raw.device)
    l = torch.arange(4, device=raw.device)
    if qtype == _T.IQ1_S:
        d = _fp16(torch, b[..., 0:2])
        qh = b[..., 34:50].contiguous().view(torch.int16).long() & 0xFFFF  # [N, nsb, 8]
        dl = d[..., None] * (2 * ((qh >> 12) & 7) + 1).float()
        idx = b[..., 2:34].long().reshape(N, -1, 8, 4) | (((qh[..., None] >> (3 * l)) & 7) << 8)
        delta = torch.where((qh & 0x8000).bool(), -1, 1)[..., None, None]
        codes = 8 * grid[idx].long() + delta  # [N, nsb, 8, 4, 8]
        scale = dl * _f32(torch, 0.125)
    else:
        sc = b[..., 48:56].contiguous().view(torch.int16).long() & 0xFFFF  # [N, nsb, 4]
        h = (sc[..., 0] >> 12) | ((sc[..., 1] >> 8) & 0x00F0) | ((sc[..., 2] >> 4) & 0x0F00) | (sc[..., 3] & 0xF000)
        d = h.to(torch.int16).view(torch.float16).float()  # [N, nsb]
        s16 = sc.repeat_interleave(2, dim=-1)  # per 32: sc[ib // 2]
        sh = 6 * (torch.arange(8, device=raw.device) % 2)
        ls = torch.stack([(s16 >> sh) & 7, (s16 >> (sh + 3)) & 7], dim=-1)  # [N, nsb, 8, 2]
        dl = d[..., None, None] * (2 * ls + 1).float()
        qh = b[..., 32:48].long().reshape(N, -1, 8, 2)  # per 32: 2 bytes, each for 2 groups of 8
        qhl = qh.repeat_interleave(2, dim=-1)  # group l uses qh[l // 2]
        even = (l % 2 == 0)
        hi = torch.where(even, (qhl << 8) & 0x700, (qhl << 4) & 0x700)
        neg = torch.where(even, qhl & 0x08, qhl & 0x80).bool()
        idx = b[..., 0:32].long().reshape(N, -1, 8, 4) | hi
        codes = 8 * grid[idx].long() + torch.where(neg, -1, 1)[..., None]
        scale = dl * _f32(torch, 0.125)
    return codes.reshape(N, n), scale.reshape(N, -1)


def _codes_tq(torch, qtype, raw, n):
    N = raw.shape[0]
    b = _blocks(qtype, raw, n)
    if qtype == _T.TQ2_0:
        d = _fp16(torch, b[..., 64:66])
        qs = b[..., 0:64].long().reshape(N, -1, 2, 1, 32)
        q = (qs >> (2 * torch.arange(4, device=raw.device)).reshape(1, 1, 1, 4, 1)) & 3
    else:
        d = _fp16(torch, b[..., 52:54])
        pow3 = torch.tensor([1, 3, 9, 27, 81], device=raw.device)

        def trits(x, k):
            return (((x[..., None, :] * pow3[:k, None]) & 255) * 3) >> 8

        q = torch.cat([trits(b[..., 0:32].long(), 5).reshape(N, -1, 160),
                       trits(b[..., 32:48].long(), 5).reshape(N, -1, 80),
                       trits(b[..., 48:52].long(), 4).reshape(N, -1, 16)], dim=-1)
    return (q.reshape(N, n) - 1), d.reshape(N, -1)


def _codes_iq4(torch, qtype, raw, n):
    N = raw.shape[0]
    b = _blocks(qtype, raw, n)
    kv = _tab(torch, "iq4nl", raw.device)
    d = _fp16(torch, b[..., 0:2])
    if qtype == _T.IQ4_NL:
        qs = b[..., 2:18].long()
        return torch.cat([kv[qs & 15], kv[qs >> 4]], dim=-1).reshape(N, n).int(), d.reshape(N, -1)
    dl = d[..., None] * (_iq4_xs_scales(torch, b) - 32).float()
    qs = b[..., 8:136].long().reshape(N, -1, 8, 16)
    return torch.cat([kv[qs & 15], kv[qs >> 4]], dim=-1).reshape(N, n).int(), dl.reshape(N, -1)


def _iq4_xs_scales(torch, b):
    """IQ4_XS blocks [N, nsb, 136] -> the 6-bit scale ls of each 32 values, int64 [N, nsb, 8]
    (dequantize_row_iq4_xs: low 4 bits from scales_l, high 2 from scales_h)."""
    sh = b[..., 2:4].contiguous().view(torch.int16).squeeze(-1).long() & 0xFFFF  # [N, nsb]
    sl = b[..., 4:8].long()
    ib = torch.arange(8, device=b.device)
    return ((sl[..., ib // 2] >> (4 * (ib % 2))) & 15) | (((sh[..., None] >> (2 * ib)) & 3) << 4)


def _codes_fp4(torch, qtype, raw, n):
    N = raw.shape[0]
    b = _blocks(qtype, raw, n)
    kv = _tab(torch, "fp4", raw.device)
    if qtype == _T.MXFP4:
        scale = _tab(torch, "e8m0", raw.device)[b[..., 0].long()]
        qs = b[..., 1:17].long()
        return torch.cat([kv[qs & 15], kv[qs >> 4]], dim=-1).reshape(N, n).int(), scale.reshape(N, -1)
    scale = _tab(torch, "ue4m3", raw.device)[b[..., 0:4].long()]  # [N, nb, 4]: per 16
    qs = b[..., 4:36].long().reshape(N, -1, 4, 8)
    return torch.cat([kv[qs & 15], kv[qs >> 4]], dim=-1).reshape(N, n).int(), scale.reshape(N, -1)


def _codes_q1_0(torch, raw, n):
    N = raw.shape[0]
    b = _blocks(_T.Q1_0, raw, n)
    d = _fp16(torch, b[..., 0:2])
    bits = (b[..., 2:18].long()[..., None] >> torch.arange(8, device=raw.device)) & 1
    return (2 * bits - 1).reshape(N, n).int(), d.reshape(N, -1)


def _lowbit_type(codes):
    def dequantize(torch, raw, n_per_row: int):
        q, s = codes(torch, raw, n_per_row)
        N = q.shape[0]
        return (s[..., None] * q.reshape(N, s.shape[1], -1).float()).reshape(N, n_per_row)

    def repack(torch, raw, n_per_row: int):
        q, s = codes(torch, raw, n_per_row)
        return "int8", (q.to(torch.int8).contiguous(), s.float().contiguous())

    return dequantize, repack


# IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ4_NL, IQ4_XS also have a packed layout (PACKED below)
dequantize_iq2_xxs, repack_iq2_xxs = _lowbit_type(_codes_iq2_xxs)
dequantize_iq2_xs, repack_iq2_xs = _lowbit_type(lambda torch, r, n: _codes_iq2_xs_s(torch, _T.IQ2_XS, r, n))
dequantize_iq2_s, repack_iq2_s = _lowbit_type(lambda torch, r, n: _codes_iq2_xs_s(torch, _T.IQ2_S, r, n))
dequantize_iq3_xxs, repack_iq3_xxs = _lowbit_type(lambda torch, r, n: _codes_iq3(torch, _T.IQ3_XXS, r, n))
dequantize_iq3_s, repack_iq3_s = _lowbit_type(lambda torch, r, n: _codes_iq3(torch, _T.IQ3_S, r, n))
dequantize_iq1_s, repack_iq1_s = _lowbit_type(lambda torch, r, n: _codes_iq1(torch, _T.IQ1_S, r, n))
dequantize_iq1_m, repack_iq1_m = _lowbit_type(lambda torch, r, n: _codes_iq1(torch, _T.IQ1_M, r, n))
dequantize_tq1_0, repack_tq1_0 = _lowbit_type(lambda torch, r, n: _codes_tq(torch, _T.TQ1_0, r, n))
dequantize_tq2_0, repack_tq2_0 = _lowbit_type(lambda torch, r, n: _codes_tq(torch, _T.TQ2_0, r, n))
dequantize_iq4_nl, repack_iq4_nl = _lowbit_type(lambda torch, r, n: _codes_iq4(torch, _T.IQ4_NL, r, n))
dequantize_iq4_xs, repack_iq4_xs = _lowbit_type(lambda torch, r, n: _codes_iq4(torch, _T.IQ4_XS, r, n))
dequantize_mxfp4, repack_mxfp4 = _lowbit_type(lambda torch, r, n: _codes_fp4(torch, _T.MXFP4, r, n))
dequantize_nvfp4, repack_nvfp4 = _lowbit_type(lambda torch, r, n: _codes_fp4(torch, _T.NVFP4, r, n))
dequantize_q1_0, repack_q1_0 = _lowbit_type(_codes_q1_0)


# --- packed i-quant layouts (issue 14): each block's fields de-interleaved into per-field arrays
# at the block's own bits per weight (IQ4_XS: + 1/16 bit, its 6-bit scales stored one per byte),
# read by triton.py's _mv_iq4 / _mv_iq3 / _mv_iq2. Within a row every field keeps ggml's
# order, so each field's index is a plain function of the column (the comments give it).
# Not the default (CUDABackend(packed_iquants=True) picks them): on an H200 their matvec ran at
# 160-575 GB/s against the int8 layout's 1640-2700 GB/s, 1.7-5.3x the time for 2.3-4.3 bits read
# per weight instead of 9-10 (bench/matvec_cuda.py); they hold a model in 2-4x less GPU memory.

def repack_packed_iq4_xs(torch, raw, n_per_row: int):
    """block_iq4_xs (d | scales_h u16 | scales_l[4] | qs[128]) -> "iq4_xs": qs uint8 [N, K/2]
    (byte 16*b + l: column 32*b + l in its low nibble, 32*b + 16 + l in its high; b = the 32-value
    block), ls uint8 [N, K/32] (the 6-bit scale, 0..63), d fp16 [N, K/256]."""
    N = raw.shape[0]
    b = _blocks(_T.IQ4_XS, raw, n_per_row)
    return "iq4_xs", (b[..., 8:136].contiguous().reshape(N, n_per_row // 2),
                      _iq4_xs_scales(torch, b).to(torch.uint8).reshape(N, -1),
                      b[..., 0:2].contiguous().view(torch.float16).reshape(N, -1))


def repack_packed_iq4_nl(torch, raw, n_per_row: int):
    """block_iq4_nl (d | qs[16]) -> "iq4_nl": qs uint8 [N, K/2] (as IQ4_XS's), d fp16 [N, K/32]."""
    N = raw.shape[0]
    b = _blocks(_T.IQ4_NL, raw, n_per_row)
    return "iq4_nl", (b[..., 2:18].contiguous().reshape(N, n_per_row // 2),
                      b[..., 0:2].contiguous().view(torch.float16).reshape(N, -1))


def repack_packed_iq3_s(torch, raw, n_per_row: int):
    """block_iq3_s (d | qs[64] | qh[8] | signs[32] | scales[4]) -> "iq3_s": qs uint8 [N, K/4] (low 8
    bits of the iq3s_grid index of columns 4g..4g+3), qh uint8 [N, K/32] (bit g % 8 of byte g // 8:
    bit 8 of index g), signs uint8 [N, K/8] (bit c % 8 of byte c // 8: column c negated), scales uint8
    [N, K/64] (nibble (c // 32) % 2 of byte c // 64: ls, db = d * (1 + 2 ls)), d fp16 [N, K/256]."""
    N = raw.shape[0]
    b = _blocks(_T.IQ3_S, raw, n_per_row)
    f = lambda a, z: b[..., a:z].contiguous().reshape(N, -1)  # noqa: E731
    return "iq3_s", (f(2, 66), f(66, 74), f(74, 106), f(106, 110),
                     b[..., 0:2].contiguous().view(torch.float16).reshape(N, -1))


def repack_packed_iq2_s(torch, raw, n_per_row: int):
    """block_iq2_s (d | qs[32] | signs[32] | qh[8] | scales[8]) -> "iq2_s": qs uint8 [N, K/8] (low 8
    bits of the iq2s_grid index of columns 8g..8g+7), signs uint8 [N, K/8] (bit c % 8 of byte c // 8:
    column c negated), qh uint8 [N, K/32] (bits 2(g % 4), +1 of byte g // 4: bits 8-9 of index g),
    scales uint8 [N, K/32] (nibble (c // 16) % 2 of byte c // 32: ls, db = d * (0.5 + ls) * 0.25),
    d fp16 [N, K/256]."""
    N = raw.shape[0]
    b = _blocks(_T.IQ2_S, raw, n_per_row)
    f = lambda a, z: b[..., a:z].contiguous().reshape(N, -1)  # noqa: E731
    return "iq2_s", (f(2, 34), f(34, 66), f(66, 74), f(74, 82),
                     b[..., 0:2].contiguous().view(torch.float16).reshape(N, -1))


def repack_packed_iq3_xxs(torch, raw, n_per_row: int):
    """block_iq3_xxs (d | qs[64] | scales_and_signs u32[8]) -> "iq3_xxs": qs uint8 [N, K/4] (the
    iq3xxs_grid index of columns 4g..4g+3), aux int32 [N, K/32] (the u32 of each 32: bits 7l..7l+6
    index ksigns_iq2xs for columns 8l..8l+7 of the 32, bits 28-31 ls, db = d * (0.5 + ls) * 0.5),
    d fp16 [N, K/256]."""
    N = raw.shape[0]
    b = _blocks(_T.IQ3_XXS, raw, n_per_row)
    return "iq3_xxs", (b[..., 2:66].contiguous().reshape(N, -1), b[..., 66:98].contiguous().view(torch.int32).reshape(N, -1),
                       b[..., 0:2].contiguous().view(torch.float16).reshape(N, -1))


def repack_packed_iq2_xs(torch, raw, n_per_row: int):
    """block_iq2_xs (d | qs u16[32] | scales[8]) -> "iq2_xs": qs int16 [N, K/8] (columns 8g..8g+7: bits
    0-8 the iq2xs_grid index, 9-15 the ksigns_iq2xs index), scales uint8 [N, K/32] (as IQ2_S's),
    d fp16 [N, K/256]."""
    N = raw.shape[0]
    b = _blocks(_T.IQ2_XS, raw, n_per_row)
    return "iq2_xs", (b[..., 2:66].contiguous().view(torch.int16).reshape(N, -1), b[..., 66:74].contiguous().reshape(N, -1),
                      b[..., 0:2].contiguous().view(torch.float16).reshape(N, -1))


def grid_words(torch, kind: str, device):
    """The grid of an "iq3_s" / "iq3_xxs" / "iq2_s" / "iq2_xs" layout as int32 words on device (the
    same table the decoders use, viewed little-endian): one word per entry for the 4-value grids
    (iq3s_grid, iq3xxs_grid), two for the 8-value ones (iq2s_grid, iq2xs_grid)."""
    name = {"iq3_s": "iq3s", "iq3_xxs": "iq3xxs", "iq2_s": "iq2s", "iq2_xs": "iq2xs"}[kind]
    return _tab(torch, name, device).view(torch.int32).reshape(-1)


def tab_iq4nl(torch, device):
    """kvalues_iq4nl int8 [16] on device (the decoders' table)."""
    return _tab(torch, "iq4nl", device)


def _dequantize_packed(torch, kind: str, parts: tuple):
    """dequantize_parts for the packed i-quant layouts: ggml's factors in ggml's order (as the
    decoders above), so the values are bit-equal to dequantize_row_<type>."""
    dev = parts[0].device
    N = parts[0].shape[0]
    if kind in ("iq4_xs", "iq4_nl"):
        kv = _tab(torch, "iq4nl", dev)
        q = parts[0].long().reshape(N, -1, 16)
        v = torch.cat([kv[q & 15], kv[q >> 4]], dim=-1).float()  # [N, K/32, 32]
        if kind == "iq4_nl":
            dl = parts[1].float()
        else:
            dl = parts[2].float().repeat_interleave(8, dim=1) * (parts[1].long() - 32).float()
        return (dl[..., None] * v).reshape(N, -1)
    ksigns = _tab(torch, "ksigns", dev)
    if kind == "iq3_s":
        qs, qh, sg, sc, d = parts
        g = torch.arange(qs.shape[1], device=dev)
        idx = qs.long() | (((qh.long()[:, g // 8] >> (g % 8)) & 1) << 8)
        vals = _tab(torch, "iq3s", dev)[idx].int().reshape(N, -1, 8)  # [N, K/8, 8]
        ls = torch.stack([sc.long() & 15, sc.long() >> 4], dim=-1).reshape(N, -1)  # per 32
        db = d.float().repeat_interleave(8, dim=1) * (1 + 2 * ls).float()
    elif kind == "iq3_xxs":
        qs, aux, d = parts
        aux = aux.long() & 0xFFFFFFFF  # [N, K/32]
        vals = _tab(torch, "iq3xxs", dev)[qs.long()].int().reshape(N, -1, 8)
        sg = ksigns[(aux[..., None] >> (7 * torch.arange(4, device=dev))) & 127].reshape(N, -1)
        db = d.float().repeat_interleave(8, dim=1) * (_f32(torch, 0.5) + (aux >> 28).float()) * _f32(torch, 0.5)
    else:
        if kind == "iq2_s":
            qs, sg, qh, sc, d = parts
            g = torch.arange(qs.shape[1], device=dev)
            vals = _tab(torch, "iq2s", dev)[qs.long() | (((qh.long()[:, g // 4] >> (2 * (g % 4))) & 3) << 8)]
        else:
            qs, sc, d = parts
            q = qs.long() & 0xFFFF
            vals, sg = _tab(torch, "iq2xs", dev)[q & 511], ksigns[q >> 9]
        vals = vals.int()  # [N, K/8, 8]
        ls = torch.stack([sc.long() & 15, sc.long() >> 4], dim=-1).reshape(N, -1).float()  # per 16
        db = d.float().repeat_interleave(16, dim=1) * (_f32(torch, 0.5) + ls) * _f32(torch, 0.25)
    q = _signed(torch, vals, sg).reshape(N, db.shape[1], -1).float()
    return (db[..., None] * q).reshape(N, -1)


PACKED = {_T.IQ4_XS: repack_packed_iq4_xs, _T.IQ4_NL: repack_packed_iq4_nl, _T.IQ3_S: repack_packed_iq3_s,
          _T.IQ2_S: repack_packed_iq2_s, _T.IQ3_XXS: repack_packed_iq3_xxs, _T.IQ2_XS: repack_packed_iq2_xs}
