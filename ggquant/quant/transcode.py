"""Exact transcoding: move already-quantized integer weights into GGML blocks value for value.

A source weight row (one output channel) is described block by block as

    w[j] = d_b * u[j] + m_b        (j in block b of 32 consecutive input columns)

with integer codes u, a block scale d_b and an optional block offset m_b (float32 values exactly
as the source stores them). Integer formats (compressed-tensors, GPTQ, AWQ) give
u = q - zero_point and m = 0; MLX affine gives the stored unsigned codes and its `biases`.

GGML's legacy types hold exactly such blocks (ggml-common.h, ggml-quants.c dequantize_row_*):

    Q4_0: d*(q-8),  q in [0,15]     Q5_0: d*(q-16), q in [0,31]     Q8_0: d*q, q in [-128,127]
    Q4_1: d*q + m,  q in [0,15]     Q5_1: d*q + m,  q in [0,31]

with d and m stored as fp16. So a block is carried exactly when:

- d is an fp16 value (fp16(d) == d), and for Q4_1/Q5_1 the offset m' = m - c*d is one too;
- the codes fit: "symmetric" types (Q4_0/Q5_0/Q8_0) need m == -c*d for an integer c and
  u - c in range; "offset" types (Q4_1/Q5_1) need u + c in [0, 2^k - 1] for some integer c.

Why the values then match bit for bit: ggml computes x*d (+ m) in float32; x*d is an integer of
at most 9 bits times an 11-bit fp16 significand, so the product is exact, and the one rounding
of the sum is the same rounding the source's own float32 dequantization does (s*q + b). For
m = 0 the source computes the very same product (q - zp)*s. Every result is still checked
tensor by tensor (`verify=True`): the produced blocks are dequantized by ggquant's ggml-exact
kernels and compared with the source's dequantization as raw float32 bits (this also catches
the sign of zero, e.g. a negative scale with an offset type gives +0 where the source gives -0).

The layouts written here (ggml-common.h):
    block_q4_0 {fp16 d; u8 qs[16]}                  qs[j] = q[j] | q[j+16] << 4
    block_q4_1 {fp16 d, m; u8 qs[16]}
    block_q5_0 {fp16 d; u8 qh[4]; u8 qs[16]}        qh bit i = bit 4 of q[i]
    block_q5_1 {fp16 d, m; u8 qh[4]; u8 qs[16]}
    block_q8_0 {fp16 d; i8 qs[32]}
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from ggquant.quant import types as qtypes

__all__ = [
    "QK", "BLOCK_TYPES", "FLOAT_TYPES", "DEFAULT_CANDIDATES", "AffineBlocks", "Transcoded",
    "fp16_exact", "bf16_exact", "pack_q4_0", "pack_q5_0", "pack_q8_0", "pack_q4_1", "pack_q5_1",
    "transcode", "exact_float", "verify_blocks", "columns_to_blocks",
]

QK = GGML_QUANT_SIZES[T.Q4_0][0]  # 32 elements per block of every type handled here (QK4_0 == ... == QK8_0)

# The block types that can carry integer codes exactly: those whose registry entry declares the
# codes' range (ExactCodes: "sym" or "offset", lowest and highest code).
BLOCK_TYPES = tuple(t for t, e in qtypes.REGISTRY.items() if e.exact_codes is not None)
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
# Default preference: fewest bits per weight first (4.5, 5.0, 5.5, 6.0, 8.5).
DEFAULT_CANDIDATES = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)

FP16_MAX = 65504.0


def fp16_exact(x: np.ndarray) -> np.ndarray:
    """Elementwise: is this float32 value an fp16 value (so fp16 storage loses nothing)?"""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        h = x.astype(np.float16)
    return np.isfinite(h) & (h.astype(np.float32) == x)


def bf16_exact(x: np.ndarray) -> np.ndarray:
    """Elementwise: is this float32 value a bf16 value (low 16 bits zero, finite)?"""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return np.isfinite(x) & ((x.view(np.uint32) & np.uint32(0xFFFF)) == 0)


@dataclass
class AffineBlocks:
    """w[r, j] = d[r, j // 32] * u[r, j] + (m[r, j // 32] if m is not None else 0).

    u: int16 [rows, n] integer codes; d: float32 [rows, n // 32]; m: float32 [rows, n // 32] | None.
    """

    u: np.ndarray
    d: np.ndarray
    m: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.u.shape

    def dequantize(self) -> np.ndarray:
        """float32 [rows, n], computed as the source does: one product (and one sum) in float32."""
        rows, n = self.u.shape
        u = self.u.reshape(rows, n // QK, QK).astype(np.float32)
        w = u * self.d[:, :, None]
        if self.m is not None:
            w = w + self.m[:, :, None]
        return w.reshape(rows, n)


@dataclass
class Transcoded:
    qtype: T
    data: np.ndarray  # uint8 [rows, row_bytes]


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """float32 [rows, nb] (fp16-exact) -> uint8 [rows, nb, 2] little-endian fp16."""
    return x.astype("<f2").view(np.uint8).reshape(*x.shape, 2)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Unsigned codes [rows, nb, 32] -> qs [rows, nb, 16]: low nibble q[j], high nibble q[j+16]."""
    q = q.astype(np.uint8)
    return (q[..., :16] & 0x0F) | ((q[..., 16:] & 0x0F) << 4)


def _qh(q: np.ndarray) -> np.ndarray:
    """Unsigned 5-bit codes [rows, nb, 32] -> qh [rows, nb, 4]: bit i = bit 4 of q[i], little endian."""
    bits = ((q.astype(np.uint32) >> 4) & 1) << np.arange(QK, dtype=np.uint32)
    word = np.ascontiguousarray(np.bitwise_or.reduce(bits, axis=-1).astype("<u4"))
    return word.view(np.uint8).reshape(*q.shape[:-1], 4)


def _blocks(u: np.ndarray) -> np.ndarray:
    rows, n = u.shape
    return u.reshape(rows, n // QK, QK)


def pack_q4_0(k: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Signed codes k [rows, n] in [-8, 7], fp16-exact d [rows, n/32] -> Q4_0 rows (w = d*k)."""
    q = _blocks(k).astype(np.int16) + 8
    rows, nb, _ = q.shape
    out = np.empty((rows, nb, 18), dtype=np.uint8)
    out[..., 0:2] = _f16_bytes(d)
    out[..., 2:] = _nibbles(q)
    return out.reshape(rows, nb * 18)


def pack_q5_0(k: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Signed codes k in [-16, 15] -> Q5_0 rows (w = d*k)."""
    q = _blocks(k).astype(np.int16) + 16
    rows, nb, _ = q.shape
    out = np.empty((rows, nb, 22), dtype=np.uint8)
    out[..., 0:2] = _f16_bytes(d)
    out[..., 2:6] = _qh(q)
    out[..., 6:] = _nibbles(q)
    return out.reshape(rows, nb * 22)


def pack_q8_0(k: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Signed codes k in [-128, 127] -> Q8_0 rows (w = d*k; -128 is valid, see research note §5)."""
    q = _blocks(k).astype(np.int8)
    rows, nb, _ = q.shape
    out = np.empty((rows, nb, 34), dtype=np.uint8)
    out[..., 0:2] = _f16_bytes(d)
    out[..., 2:] = q.view(np.uint8)
    return out.reshape(rows, nb * 34)


def pack_q4_1(u: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Unsigned codes u in [0, 15], fp16-exact d and m -> Q4_1 rows (w = d*u + m)."""
    q = _blocks(u)
    rows, nb, _ = q.shape
    out = np.empty((rows, nb, 20), dtype=np.uint8)
    out[..., 0:2] = _f16_bytes(d)
    out[..., 2:4] = _f16_bytes(m)
    out[..., 4:] = _nibbles(q)
    return out.reshape(rows, nb * 20)


def pack_q5_1(u: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Unsigned codes u in [0, 31], fp16-exact d and m -> Q5_1 rows (w = d*u + m)."""
    q = _blocks(u)
    rows, nb, _ = q.shape
    out = np.empty((rows, nb, 24), dtype=np.uint8)
    out[..., 0:2] = _f16_bytes(d)
    out[..., 2:4] = _f16_bytes(m)
    out[..., 4:8] = _qh(q)
    out[..., 8:] = _nibbles(q)
    return out.reshape(rows, nb * 24)


_PACK_SYM = {T.Q4_0: pack_q4_0, T.Q5_0: pack_q5_0, T.Q8_0: pack_q8_0}
_PACK_OFFSET = {T.Q4_1: pack_q4_1, T.Q5_1: pack_q5_1}


def _first_bad(mask: np.ndarray) -> tuple[int, int]:
    r, b = np.argwhere(~mask)[0]
    return int(r), int(b)


def _try_sym(blocks: AffineBlocks, qtype: T) -> Transcoded | str:
    _, lo, hi = qtypes.REGISTRY[qtype].exact_codes
    u, d, m = blocks.u, blocks.d, blocks.m
    if m is None:
        k = u
    else:
        # w = d*u + m is d*(u - c) only when m == -c*d for an integer c (checked in float64,
        # where c*d is exact for the fp16/bf16 scales and codes in play).
        with np.errstate(divide="ignore", invalid="ignore"):
            c = np.where(d != 0, np.rint(-m.astype(np.float64) / d), 0.0)
        ok = np.isfinite(c) & (-c * d.astype(np.float64) == m.astype(np.float64)) & (np.abs(c) < 4096)
        if not ok.all():
            r, b = _first_bad(ok)
            return (f"the block offset m={float(m[r, b])!r} is not an integer multiple of the scale "
                    f"d={float(d[r, b])!r} (row {r}, block {b}), so {qtype.name} (no offset) cannot hold it")
        k = u - np.repeat(c.astype(np.int16), QK, axis=1)
    # Whole-array bounds first (fast, contiguous); per-block bounds only to name a failing block.
    if k.size and (int(k.min()) < lo or int(k.max()) > hi):
        kb = _blocks(k)
        kmin, kmax = kb.min(axis=-1), kb.max(axis=-1)
        fit = (kmin >= lo) & (kmax <= hi)
        r, b = _first_bad(fit)
        return (f"codes span [{int(kmin.min())}, {int(kmax.max())}], beyond {qtype.name}'s [{lo}, {hi}] "
                f"(first at row {r}, block {b})")
    return Transcoded(qtype, _PACK_SYM[qtype](k, d))


def _try_offset(blocks: AffineBlocks, qtype: T) -> Transcoded | str:
    _, lo, hi = qtypes.REGISTRY[qtype].exact_codes
    u, d = blocks.u, blocks.d
    m = blocks.m if blocks.m is not None else np.zeros_like(d)
    if u.size and int(u.min()) >= 0 and int(u.max()) <= hi and fp16_exact(m).all():
        # Fast path: the source's own codes and offsets fit as they are (MLX affine).
        return Transcoded(qtype, _PACK_OFFSET[qtype](u.astype(np.uint8), d, m))
    ub = _blocks(u)
    umin = ub.min(axis=-1).astype(np.int32)
    umax = ub.max(axis=-1).astype(np.int32)
    spread_ok = umax - umin <= hi
    if not spread_ok.all():
        r, b = _first_bad(spread_ok)
        return (f"a block's codes span {int((umax - umin).max()) + 1} levels, more than {qtype.name}'s "
                f"{hi + 1} (first at row {r}, block {b})")
    # Shift each block's codes by c (u + c in [0, hi]) and fold it into the offset: m' = m - c*d.
    # Any c in [-umin, hi - umax] keeps the codes in range; take the first whose m' is an fp16
    # value (computed in float64, where m - c*d is exact for these magnitudes).
    d64, m64 = d.astype(np.float64), m.astype(np.float64)
    chosen = np.full(d.shape, np.iinfo(np.int32).min, dtype=np.int32)
    m_new = np.zeros(d.shape, dtype=np.float32)
    # Try c = 0 first (the source's own offset), then the rest of the allowed range.
    for t in [None] + list(range(hi + 1)):
        c = np.zeros_like(umin) if t is None else -umin + t
        open_ = (chosen == np.iinfo(np.int32).min) & (c >= -umin) & (c <= hi - umax)
        if not open_.any():
            continue
        mm = m64 - c * d64
        mm32 = mm.astype(np.float32)
        good = open_ & (mm32.astype(np.float64) == mm) & fp16_exact(mm32)
        chosen[good] = c[good]
        m_new[good] = mm32[good]
        if (chosen != np.iinfo(np.int32).min).all():
            break
    found = chosen != np.iinfo(np.int32).min
    if not found.all():
        r, b = _first_bad(found)
        return (f"no block offset is an fp16 value for row {r}, block {b} (m={float(m[r, b])!r}, "
                f"d={float(d[r, b])!r}), so {qtype.name} would round it")
    q = u.astype(np.int32) + np.repeat(chosen, QK, axis=1)
    return Transcoded(qtype, _PACK_OFFSET[qtype](q.astype(np.uint8), d, m_new))


def _normalize_constant_blocks(blocks: AffineBlocks) -> AffineBlocks:
    """Blocks whose codes are all equal hold one value v; any scale can carry it.

    Such blocks often have scales fp16 cannot hold (mlx gives an all-zero group the scale
    -1e-7, float32-scale formats give it float32 eps). Rewrite each of them that has a non-fp16
    scale (or offset) as u = 1, d = v, m = 0 (u = 0, d = 0 when v == 0), provided v itself is an
    fp16 value; every other block is left as the source wrote it.
    """
    bad = ~fp16_exact(blocks.d)
    if blocks.m is not None:
        bad |= ~fp16_exact(blocks.m)
    if not bad.any():  # the common case: nothing to fix, skip the per-block scan
        return blocks
    ub = _blocks(blocks.u)
    const = ub.min(axis=-1) == ub.max(axis=-1)
    fix = const & bad
    if not fix.any():
        return blocks
    u0 = ub[..., 0].astype(np.float32)
    v = u0 * blocks.d
    if blocks.m is not None:
        v = v + blocks.m
    fix &= fp16_exact(v)
    if not fix.any():
        return blocks
    u = ub.copy()
    d = blocks.d.copy()
    m = None if blocks.m is None else blocks.m.copy()
    u[fix] = np.where(v[fix] != 0, 1, 0)[:, None]
    d[fix] = v[fix]
    if m is not None:
        m[fix] = 0
    return AffineBlocks(u.reshape(blocks.u.shape), d, m)


def transcode(blocks: AffineBlocks, candidates=DEFAULT_CANDIDATES) -> Transcoded | str:
    """The first candidate block type that holds `blocks` exactly, or a reason why none does.

    Only the value-structure is checked here (scales fp16, codes in range); `verify_blocks`
    checks the produced bytes against the source's dequantization.
    """
    rows, n = blocks.u.shape
    if n % QK:
        return f"rows of {n} elements are not a whole number of {QK}-element GGML blocks"
    blocks = _normalize_constant_blocks(blocks)
    bad_d = fp16_exact(blocks.d)
    if not bad_d.all():
        r, b = _first_bad(bad_d)
        return (f"the scale {float(blocks.d[r, b])!r} (row {r}, block {b}) is not an fp16 value "
                f"(fp16 holds [6e-8, 65504] with 11 significant bits), so GGML's fp16 block scale would round it")
    reasons = []
    for qtype in candidates:
        qtype = T(qtype)
        if qtype not in BLOCK_TYPES:
            continue
        kind = qtypes.REGISTRY[qtype].exact_codes.kind
        res = _try_sym(blocks, qtype) if kind == "sym" else _try_offset(blocks, qtype)
        if isinstance(res, Transcoded):
            return res
        reasons.append(f"{qtype.name}: {res}")
    if not reasons:
        names = ", ".join(T(c).name for c in candidates) or "none"
        return f"no exact block type among the candidates ({names}); exact types are " + \
            ", ".join(t.name for t in BLOCK_TYPES)
    return "; ".join(reasons)


def exact_float(w: np.ndarray, candidates) -> Transcoded | str:
    """Store float32 values in the first of F16/BF16/F32 (in candidate order) that holds them exactly."""
    reasons = []
    for qtype in candidates:
        qtype = T(qtype)
        if qtype == T.F32:
            return Transcoded(qtype, np.ascontiguousarray(w, dtype="<f4").view(np.uint8).reshape(w.shape[0], -1))
        if qtype == T.F16:
            ok = fp16_exact(w)
            if ok.all():
                return Transcoded(qtype, w.astype("<f2").view(np.uint8).reshape(w.shape[0], -1))
            reasons.append(f"F16: {int((~ok).sum())} of {w.size} values are not fp16 values")
        elif qtype == T.BF16:
            ok = bf16_exact(w)
            if ok.all():
                bits = (np.ascontiguousarray(w, dtype=np.float32).view(np.uint32) >> 16).astype("<u2")
                return Transcoded(qtype, bits.view(np.uint8).reshape(w.shape[0], -1))
            reasons.append(f"BF16: {int((~ok).sum())} of {w.size} values are not bf16 values")
    return "; ".join(reasons) if reasons else "no float type among the candidates"


def verify_blocks(res: Transcoded, expected: np.ndarray) -> str | None:
    """None if ggml's dequantization of `res` equals `expected` bit for bit, else a reason."""
    got = qtypes.get(res.qtype).dequantize(res.data, expected.shape)
    a = np.ascontiguousarray(got, dtype=np.float32).view(np.uint32)
    b = np.ascontiguousarray(expected, dtype=np.float32).view(np.uint32)
    if np.array_equal(a, b):
        return None
    bad = np.argwhere(a != b)
    r, c = (int(x) for x in bad[0])
    return (f"{res.qtype.name} blocks dequantize to {float(got[r, c])!r} at [{r}, {c}] where the source "
            f"gives {float(expected[r, c])!r} ({len(bad)} values differ)")


def columns_to_blocks(col: np.ndarray, what: str) -> np.ndarray | str:
    """Per-column values [rows, n] -> per-block [rows, n/32] if constant inside every block, else a reason."""
    rows, n = col.shape
    if n % QK:
        return f"rows of {n} elements are not a whole number of {QK}-element GGML blocks"
    cb = col.reshape(rows, n // QK, QK)
    first = cb[..., :1]
    same = (cb == first) | (np.isnan(cb) & np.isnan(first)) if cb.dtype.kind == "f" else (cb == first)
    ok = same.all(axis=-1)
    if not ok.all():
        r, b = _first_bad(ok)
        return (f"the {what} changes inside a {QK}-column block (row {r}, columns {b * QK}..{b * QK + QK - 1}), "
                f"so no GGML block (one scale per {QK} columns) can hold it")
    return np.ascontiguousarray(cb[..., 0])


def row_bytes(qtype, n: int) -> int:
    block, size = GGML_QUANT_SIZES[T(qtype)]
    return n // block * size
