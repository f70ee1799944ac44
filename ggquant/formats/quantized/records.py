"""The record every quantized-checkpoint reader yields (QuantizedTensor and its kinds), the raw
tensor access the readers share (Source), and the bit unpacking of their packed layouts.

The registry and detection live in ggquant.formats.quantized (this package's __init__)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from gguf import GGMLQuantizationType as T

from ggquant.errors import FormatError, GGQuantError
from ggquant.quant.transcode import (
    BLOCK_TYPES, DEFAULT_CANDIDATES, FLOAT_TYPES, QK, AffineBlocks, columns_to_blocks,
    exact_float, transcode, verify_blocks,
)

__all__ = [
    "Source", "QuantizedTensor", "IntCodes", "IntQuantTensor", "AffineQuantTensor", "QuantizedModel",
    "StackedIntQuantTensor", "StackedAffineQuantTensor", "StackedDequantTensor", "FloatQuantTensor", "NVFP4Tensor", "E2M1_TO_F32", "FP8_E4M3_TO_F32",
    "rows_range", "unpack_stream", "unpack_per_word",
]

# --------------------------------------------------------------------------------------------
# Raw tensor access


_NP_TAGS = {
    np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("float64"): "F64",
    np.dtype("uint16"): "BF16",  # ggquant.formats.safetensors stores BF16 as its uint16 bits
    np.dtype("int64"): "I64", np.dtype("int32"): "I32", np.dtype("int16"): "I16", np.dtype("int8"): "I8",
    np.dtype("uint64"): "U64", np.dtype("uint32"): "U32", np.dtype("uint8"): "U8", np.dtype("bool"): "BOOL",
}


def torch_to_numpy(t) -> tuple[np.ndarray, str]:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint16), "BF16"
    fp8 = {getattr(torch, n, None): tag for n, tag in
           (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("float8_e8m0fnu", "F8_E8M0"))}
    if t.dtype in fp8:
        return t.contiguous().view(torch.uint8).numpy(), fp8[t.dtype]
    arr = t.contiguous().numpy()
    return arr, _NP_TAGS.get(arr.dtype, str(arr.dtype))


def rows_range(rows, n_rows: int) -> tuple[int, int]:
    """Normalise rows=None | (start, stop) | slice to a checked (start, stop)."""
    if rows is None:
        return 0, n_rows
    if isinstance(rows, slice):
        start, stop, step = rows.indices(n_rows)
        if step != 1:
            raise GGQuantError(f"row ranges must be contiguous, got step {step}")
    else:
        start, stop = (int(x) for x in rows)
    if not 0 <= start <= stop <= n_rows:
        raise GGQuantError(f"rows [{start}, {stop}) outside [0, {n_rows})")
    return start, stop


class Source:
    """The checkpoint's raw tensors: the set of names and a getter (see module docstring)."""

    def __init__(self, names: Iterable[str], get: Callable[[str], Any]):
        self.names = list(names)
        self._names = set(self.names)
        self._get = get

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def raw(self, name: str, rows: tuple[int, int] | None = None) -> tuple[np.ndarray, str]:
        """(numpy storage array, safetensors dtype tag), optionally only outer rows [start, stop)."""
        if name not in self._names:
            raise FormatError(f"tensor '{name}' is missing from the checkpoint")
        obj = self._get(name)
        if isinstance(obj, np.ndarray):
            arr, tag = obj, _NP_TAGS.get(obj.dtype, str(obj.dtype))
            return (arr if rows is None or arr.ndim == 0 else arr[rows[0]:rows[1]]), tag
        if type(obj).__module__.startswith("torch"):
            if rows is not None and obj.ndim > 0:
                obj = obj[rows[0]:rows[1]]
            return torch_to_numpy(obj)
        if isinstance(getattr(obj, "dtype", None), str) and hasattr(obj, "read"):
            if rows is not None and hasattr(obj, "rows") and len(getattr(obj, "shape", ())) > 0:
                return obj.rows(*rows), obj.dtype
            arr = obj.read()
            return (arr if rows is None or arr.ndim == 0 else arr[rows[0]:rows[1]]), obj.dtype
        raise GGQuantError(f"tensor '{name}': the getter returned {type(obj).__name__}; expected a numpy "
                           f"array, a torch tensor or a safetensors tensor")

    def dtype(self, name: str) -> str:
        obj = self._get(name)
        if isinstance(getattr(obj, "dtype", None), str):
            return obj.dtype
        return self.raw(name)[1]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(x) for x in self._get(name).shape)

    def floats(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """float32 values (exact for F32/F16/BF16)."""
        arr, tag = self.raw(name, rows)
        return to_float32(arr, tag, name)

    def ints(self, name: str, rows: tuple[int, int] | None = None, allowed=("I32",)) -> np.ndarray:
        arr, tag = self.raw(name, rows)
        if tag not in allowed:
            raise FormatError(f"tensor '{name}' has dtype {tag}; expected {' or '.join(allowed)}")
        return np.asarray(arr)


def to_float32(arr: np.ndarray, tag: str, what: str) -> np.ndarray:
    if tag == "F32":
        return np.asarray(arr, dtype=np.float32)
    if tag == "BF16":
        return (np.asarray(arr).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if tag == "F16":
        return np.asarray(arr).view(np.float16).astype(np.float32)
    if tag == "F64":
        return np.asarray(arr, dtype=np.float64).astype(np.float32)
    raise FormatError(f"tensor '{what}' has dtype {tag}; expected a float (F32, F16, BF16)")


# --------------------------------------------------------------------------------------------
# Bit unpacking shared by the readers (little-endian words, as every format here stores them)


def _le_bytes(words: np.ndarray) -> np.ndarray:
    """int32/uint32 [R, W] -> uint8 [R, 4W], the words' bytes in little-endian order."""
    w = np.ascontiguousarray(words)
    w = w.view(np.uint32) if w.dtype == np.int32 else w.astype(np.uint32, copy=False)
    return w.astype("<u4", copy=False).view(np.uint8).reshape(w.shape[0], 4 * w.shape[1])


def unpack_stream(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Codes of a dense little-endian bit stream per row -> uint8 [R, n].

    Code i of a row occupies stream bits [i*bits, i*bits + bits), word w supplying stream bits
    32w..32w+31, least significant first; codes may straddle words (compressed-tensors >= 0.18
    pack_to_int32, GPTQ 3-bit, MLX 3/5/6-bit). For bits in {1, 2, 4, 8} this is also the
    per-word layout (32/bits codes per word at bits*j).
    """
    b = _le_bytes(words)
    R, nbytes = b.shape
    if n * bits > nbytes * 8:
        raise FormatError(f"{nbytes * 8} packed bits cannot hold {n} codes of {bits} bits")
    if bits == 8:
        return b[:, :n].copy()
    if 8 % bits == 0:
        per = 8 // bits
        out = np.empty((R, nbytes, per), dtype=np.uint8)
        mask = (1 << bits) - 1
        for j in range(per):
            out[:, :, j] = (b >> (bits * j)) & mask
        return out.reshape(R, nbytes * per)[:, :n]
    # General width: a 16-bit little-endian window starting at the code's first byte covers
    # bit offset (<= 7) + width (<= 8).
    start = np.arange(n, dtype=np.int64) * bits
    byte = start >> 3
    shift = (start & 7).astype(np.uint16)
    padded = np.concatenate([b, np.zeros((R, 1), dtype=np.uint8)], axis=1)
    win = padded[:, byte].astype(np.uint16) | (padded[:, byte + 1].astype(np.uint16) << 8)
    return ((win >> shift) & ((1 << bits) - 1)).astype(np.uint8)


def unpack_per_word(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Codes packed 32//bits per word at bits*j, spare high bits unused -> uint8 [R, n].

    compressed-tensors <= 0.17 pack_to_int32 (the legacy layout; differs from the dense stream
    for bit widths that do not divide 32).
    """
    w = np.ascontiguousarray(words)
    w = w.view(np.uint32) if w.dtype == np.int32 else w.astype(np.uint32, copy=False)
    per = 32 // bits
    if n > w.shape[1] * per:
        raise FormatError(f"{w.shape[1]} words of {per} codes cannot hold {n} codes")
    shifts = (np.arange(per, dtype=np.uint32) * bits)
    out = (w[:, :, None] >> shifts) & np.uint32((1 << bits) - 1)
    return out.reshape(w.shape[0], w.shape[1] * per)[:, :n].astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Small floats


def _e4m3fn_table() -> np.ndarray:
    """float32 value of every FP8 e4m3fn byte (OCP FP8: bias 7, no infinities, 0x7F/0xFF NaN)."""
    b = np.arange(256, dtype=np.uint32)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp = (b >> 3) & 0xF
    man = (b & 7).astype(np.float64)
    val = np.where(exp == 0, man / 8.0 * 2.0 ** -6, (1.0 + man / 8.0) * 2.0 ** (exp.astype(np.float64) - 7))
    val = sign * val
    val[(b & 0x7F) == 0x7F] = np.nan
    return val.astype(np.float32)


FP8_E4M3_TO_F32 = _e4m3fn_table()
# FP4 e2m1 code (sign bit 3, then 2 exponent bits and 1 mantissa bit) -> value: compressed-tensors
# kE2M1ToFloat with the sign; ggml's kvalues_mxfp4 holds twice these, in the same code order.
E2M1_TO_F32 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                       dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Records


def _qtypes(candidates) -> list[T]:
    return [T(c) if not isinstance(c, str) else T[c.upper()] for c in
            (DEFAULT_CANDIDATES if candidates is None else candidates)]


class QuantizedTensor:
    """One logical weight of a quantized checkpoint (base class; see module docstring)."""

    def __init__(self, name: str, shape: tuple[int, int], encoding: str, fmt: str,
                 sources: tuple[str, ...], bits: int | None = None):
        self.name = name
        self.shape = (int(shape[0]), int(shape[1]))
        self.encoding = encoding  # human description of the source quantization
        self.format = fmt  # machine id, e.g. "compressed-tensors/pack-quantized"
        self.sources = tuple(sources)  # raw tensor names this record is made of
        self.bits = bits

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, shape={self.shape}, {self.encoding!r})"

    # Subclasses implement these two.
    def dequantize(self, rows=None) -> np.ndarray:
        """float32 [rows, in]: the source's exact dequantization of output rows [start, stop)."""
        raise NotImplementedError

    def blocks(self, rows=None) -> AffineBlocks | str:
        """The weight as integer codes with one scale (and offset) per 32 columns, or why not."""
        return f"{self.encoding} values are not integer codes with a per-32-column scale"

    def exact_ggml_or_reason(self, candidates=None, rows=None, verify: bool = True) -> tuple[T, np.ndarray] | str:
        """The first candidate GGML type whose ggml dequantization equals `dequantize()` bit for bit.

        candidates: GGML types in order of preference (default Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, i.e.
        fewest bits first); F16/BF16/F32 may be listed too and are taken when every value fits.
        verify: dequantize the produced bytes with ggquant's ggml-exact kernels and compare.
        Returns (qtype, uint8 [rows, row_bytes]) or a reason naming the tensor.
        """
        rr = rows_range(rows, self.shape[0])
        cands = _qtypes(candidates)
        reasons: list[str] = []
        blocks: AffineBlocks | str | None = None
        expected: np.ndarray | None = None
        for qtype in cands:
            if qtype in BLOCK_TYPES:
                if blocks is None:
                    blocks = self.blocks(rr)
                if isinstance(blocks, str):
                    reasons.append(f"{qtype.name}: {blocks}")
                    continue
                res = transcode(blocks, [qtype])
            elif qtype in FLOAT_TYPES:
                if expected is None:
                    expected = self.dequantize(rr)
                res = exact_float(expected, [qtype])
            else:
                reasons.append(f"{qtype.name}: not a type ggquant transcodes into exactly")
                continue
            if isinstance(res, str):
                reasons.append(res if res.startswith(qtype.name) else f"{qtype.name}: {res}")
                continue
            if verify and qtype in BLOCK_TYPES:
                if expected is None:
                    expected = self.dequantize(rr)
                bad = verify_blocks(res, expected)
                if bad is not None:
                    reasons.append(f"{qtype.name}: {bad}")
                    continue
            return res.qtype, res.data
        if not reasons:
            reasons.append("no candidate types")
        return f"{self.name}: no exact GGML encoding ({'; '.join(reasons)})"

    def exact_ggml(self, candidates=None, rows=None, verify: bool = True) -> tuple[T, np.ndarray] | None:
        """Like exact_ggml_or_reason, but None when nothing is exact (`not_exact_reason` says why)."""
        res = self.exact_ggml_or_reason(candidates, rows, verify)
        if isinstance(res, str):
            self.not_exact_reason = res
            return None
        self.not_exact_reason = None
        return res

    def expected_exact_type(self, candidates=None) -> tuple[T | None, str]:
        """Metadata-only prediction (no payload read) for planning and --dry-run.

        Returns (type, "") when the format makes `type` exact unless the data breaks a condition
        that only the payload shows (a scale outside fp16, an offset that fp16 rounds), else
        (None, reason). exact_ggml is the authority.
        """
        return None, f"{self.encoding} has no exact GGML block type"


@dataclass
class IntCodes:
    """Integer weight rows: w[r, c] = (q[r, c] - zero[r, g(c)]) * scale[r, g(c)].

    q: int16 [rows, n] codes as the format defines them (signed for compressed-tensors, unsigned
    for GPTQ/AWQ); scale: float32 [rows, G] exact source values; zero: int16 [rows, G] or None;
    group: int [n], the group of each column (g_idx, or column // group_size).
    """

    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray | None
    group: np.ndarray
    group_size: int | None = None  # set when group == arange(n) // group_size

    def k(self) -> np.ndarray:
        if self.zero is None:
            return self.q
        return self.q - self.zero[:, self.group]

    def col_scale(self) -> np.ndarray:
        return self.scale[:, self.group]

    def dequantize(self) -> np.ndarray:
        rows, n = self.q.shape
        gs = self.group_size
        if gs and n % gs == 0 and self.scale.shape[1] == n // gs:
            k = self.k().reshape(rows, n // gs, gs).astype(np.float32)
            return (k * self.scale[:, :, None]).reshape(rows, n)
        return self.k().astype(np.float32) * self.col_scale()

    def blocks(self) -> AffineBlocks | str:
        rows, n = self.q.shape
        if n % QK:
            return f"rows of {n} elements are not a whole number of {QK}-element GGML blocks"
        gs = self.group_size
        if gs and gs % QK == 0 and self.scale.shape[1] * gs >= n:
            d = np.repeat(self.scale, gs // QK, axis=1)[:, : n // QK]
        else:
            # g_idx (act-order) or a group size that is not a multiple of 32: exact only where
            # each 32-column block happens to share one scale. Zero points may still differ
            # per column: k = q - zero stays an integer per column.
            d = columns_to_blocks(self.col_scale(), "scale")
            if isinstance(d, str):
                return d
        return AffineBlocks(self.k().astype(np.int16), np.ascontiguousarray(d, dtype=np.float32))


class IntQuantTensor(QuantizedTensor):
    """An integer-quantized weight (compressed-tensors int, GPTQ, AutoRound, AWQ)."""

    def __init__(self, name, shape, encoding, fmt, sources, bits: int, symmetric: bool,
                 load: Callable[[tuple[int, int]], IntCodes], group_size: int | None, act_order: bool = False,
                 qrange: tuple[int, int] | None = None):
        super().__init__(name, shape, encoding, fmt, sources, bits)
        self.symmetric = symmetric
        self.group_size = group_size  # columns per scale (in for channel/tensor), None with g_idx
        self.act_order = act_order
        self._load = load
        self._perm_rows: np.ndarray | None = None
        self._perm_cols: np.ndarray | None = None
        # Range of k = q - zero that the format allows (for the metadata-only prediction).
        self.qrange = qrange
        # The stored input width may exceed the weight's (auto-round's model-free export pads it
        # with zero weights to a multiple of the group size): see cropped().
        self.padded = False

    def cropped(self, out: int, n: int) -> IntQuantTensor:
        """The true [out, n] weight of a record stored with its input width padded; the padding
        must dequantize to zeros."""
        if out != self.shape[0] or not 0 < n <= self.shape[1]:
            raise GGQuantError(f"{self.name}: cannot crop the stored {list(self.shape)} weight to [{out}, {n}]")
        step = max(1, (1 << 22) // self.shape[1])
        for a in range(0, out, step):
            b = min(out, a + step)
            k = self._load((a, b)).k()[:, n:]
            if k.any():
                r, c = (int(x[0]) for x in np.nonzero(k))
                raise GGQuantError(f"{self.name}: stored {list(self.shape)}, the model's weight is [{out}, {n}], but "
                                   f"padding column {n + c} of row {a + r} is not zero (code {int(k[r, c])}); the "
                                   f"checkpoint does not match config.json")
        load = self._load

        def crop(rr) -> IntCodes:
            c = load(rr)
            return IntCodes(np.ascontiguousarray(c.q[:, :n]), c.scale, c.zero, c.group[:n], c.group_size)

        return IntQuantTensor(self.name, (out, n), self.encoding, self.format, self.sources, self.bits, self.symmetric,
                              crop, self.group_size, self.act_order, self.qrange)

    def codes(self, rows=None) -> IntCodes:
        rr = rows_range(rows, self.shape[0])
        if self._perm_rows is None:
            c = self._load(rr)
        else:
            idx = self._perm_rows[rr[0]:rr[1]]
            full = self._load((0, self.shape[0]))
            c = IntCodes(full.q[idx], full.scale[idx], None if full.zero is None else full.zero[idx],
                         full.group, full.group_size)
        if self._perm_cols is not None:
            c = IntCodes(c.q[:, self._perm_cols], c.scale, c.zero, c.group[self._perm_cols], None)
        return c

    def dequantize(self, rows=None) -> np.ndarray:
        return self.codes(rows).dequantize()

    def blocks(self, rows=None) -> AffineBlocks | str:
        return self.codes(rows).blocks()

    def permuted(self, rows: np.ndarray | None = None, cols: np.ndarray | None = None) -> IntQuantTensor:
        """A view with output rows and/or input columns reordered (w' = w[rows][:, cols]).

        Row permutations are always harmless. A column permutation is only valid when the
        producer of this layer's input is permuted the same way (the act-order `down_proj`
        trick: permute `down_proj` columns and `gate_proj`/`up_proj` rows by `act_order_perm`).
        """
        new = IntQuantTensor(self.name, self.shape, self.encoding, self.format, self.sources, self.bits,
                             self.symmetric, self._load, self.group_size, self.act_order, self.qrange)
        pr = self._perm_rows
        if rows is not None:
            rows = np.asarray(rows, dtype=np.intp)
            pr = rows if pr is None else pr[rows]
        pc = self._perm_cols
        if cols is not None:
            cols = np.asarray(cols, dtype=np.intp)
            pc = cols if pc is None else pc[cols]
        new._perm_rows, new._perm_cols = pr, pc
        if cols is not None:
            new.encoding = self.encoding + " (columns permuted)"
        return new

    def act_order_perm(self) -> np.ndarray | None:
        """Stable argsort of g_idx when it is not the trivial column // group_size, else None."""
        if not self.act_order:
            return None
        c = self._load((0, min(1, self.shape[0])))
        return np.argsort(c.group, kind="stable")

    def expected_exact_type(self, candidates=None) -> tuple[T | None, str]:
        n = self.shape[1]
        if n % QK:
            return None, f"rows of {n} elements are not a whole number of {QK}-element blocks"
        if self.act_order:
            return None, "act-order g_idx: 32-column blocks mix quantization groups (unless permuted)"
        if self.group_size is not None and self.group_size % QK:
            return None, f"group size {self.group_size} is not a multiple of {QK}"
        lo, hi = self.qrange
        offset_fallback = None
        for qtype in _qtypes(candidates):
            if qtype in (T.Q4_0, T.Q5_0, T.Q8_0):
                a, b = {T.Q4_0: (-8, 7), T.Q5_0: (-16, 15), T.Q8_0: (-128, 127)}[qtype]
                if a <= lo and hi <= b:
                    return qtype, ""
            elif qtype in (T.Q4_1, T.Q5_1) and offset_fallback is None:
                # Offset types need m = -c*s in fp16, which bf16-derived scales break in about 1 %
                # of blocks (research note §0): predicted only when no symmetric type fits.
                span = 15 if qtype == T.Q4_1 else 31
                if hi - lo <= 2 * span + 1 and (1 << self.bits) - 1 <= span:
                    offset_fallback = qtype
            elif qtype == T.F32:
                return qtype, ""
        if offset_fallback is not None:
            return offset_fallback, ""
        return None, f"int{self.bits} {'sym' if self.symmetric else 'asym'} codes span [{lo}, {hi}], wider than the candidates"


class AffineQuantTensor(QuantizedTensor):
    """w = scale * u + bias per group of columns, u unsigned (MLX affine)."""

    def __init__(self, name, shape, encoding, fmt, sources, bits: int, group_size: int,
                 load: Callable[[tuple[int, int]], tuple[np.ndarray, np.ndarray, np.ndarray]],
                 expert_rows: int | None = None):
        super().__init__(name, shape, encoding, fmt, sources, bits)
        self.group_size = group_size
        self._load = load  # rows -> (u uint8/int16 [R, n], scales f32 [R, G], biases f32 [R, G])
        # stacked experts: each row is one expert's matrix of expert_rows rows, flattened
        self.expert_rows = expert_rows
        self._perm_rows: np.ndarray | None = None

    def _rows(self, rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rr = rows_range(rows, self.shape[0])
        if self._perm_rows is None:
            return self._load(rr)
        idx = self._perm_rows[rr[0]:rr[1]]
        u, s, b = self._load((0, self.shape[0]))
        return u[idx], s[idx], b[idx]

    def permuted(self, rows: np.ndarray) -> AffineQuantTensor:
        """A view with output rows reordered (w' = w[rows]): each row keeps its codes and groups."""
        new = AffineQuantTensor(self.name, self.shape, self.encoding, self.format, self.sources, self.bits,
                                self.group_size, self._load, self.expert_rows)
        rows = np.asarray(rows, dtype=np.intp)
        new._perm_rows = rows if self._perm_rows is None else self._perm_rows[rows]
        return new

    def dequantize(self, rows=None) -> np.ndarray:
        u, s, b = self._rows(rows)
        r, n = u.shape
        g = self.group_size
        w = u.reshape(r, n // g, g).astype(np.float32) * s[:, :, None] + b[:, :, None]
        return w.reshape(r, n)

    def blocks(self, rows=None) -> AffineBlocks | str:
        u, s, b = self._rows(rows)
        n = u.shape[1]
        g = self.group_size
        if n % QK:
            return f"rows of {n} elements are not a whole number of {QK}-element GGML blocks"
        if g % QK:
            return f"group size {g} is not a multiple of {QK}"
        rep = g // QK
        return AffineBlocks(u.astype(np.int16), np.repeat(s, rep, axis=1), np.repeat(b, rep, axis=1))

    def expected_exact_type(self, candidates=None) -> tuple[T | None, str]:
        if self.shape[1] % QK or self.group_size % QK:
            return None, f"group size {self.group_size} is not a multiple of {QK}"
        for qtype in _qtypes(candidates):
            if qtype == T.Q4_1 and self.bits <= 4 or qtype == T.Q5_1 and self.bits <= 5:
                return qtype, ""
            if qtype == T.F32:
                return qtype, ""
        return None, (f"{self.bits}-bit affine codes need an offset type with {1 << self.bits} levels; "
                      f"Q4_1 holds 16 and Q5_1 32")


@dataclass
class QuantizedModel:
    """All quantized weights of one checkpoint, plus which raw tensors they replace."""

    method: str  # "compressed-tensors", "gptq", "auto-round", "awq", "mlx", "glq"
    description: str  # one line for logs and GGUF metadata
    tensors: dict[str, QuantizedTensor]  # logical weight name -> record, in checkpoint order
    consumed: frozenset[str]  # raw names the records are made of; never pass these through
    notes: list[str] = field(default_factory=list)  # things the user should know (dropped scales, fixes)
    config: dict = field(default_factory=dict)  # the quantization config as read

    def __iter__(self) -> Iterator[QuantizedTensor]:
        return iter(self.tensors.values())

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> QuantizedTensor:
        return self.tensors[name]

    def metadata(self) -> dict[str, str]:
        """Provenance for GGUF metadata (the converter adds which tensors went exact)."""
        return {"ggquant.source.quantization": self.method, "ggquant.source.quantization_desc": self.description}


def flatten_codes(c: IntCodes) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """An expert's codes [r, n] as one row of r*n (q, scale, zero, column group), its groups
    renumbered row after row, for stacking experts."""
    r, n = c.q.shape
    G = c.scale.shape[1]
    group = (np.arange(r, dtype=np.intp)[:, None] * G + np.asarray(c.group, dtype=np.intp)[None, :]).reshape(-1)
    zero = None if c.zero is None else c.zero.reshape(1, r * G)
    return c.q.reshape(1, r * n), c.scale.reshape(1, r * G), zero, group



def _expert_rows(name: str, parts: list[list[QuantizedTensor]], layout, how: str) -> int:
    """Rows per expert of per-expert records to be stacked into `name`: every part must have the
    layout (a tuple of its attributes) of the first, every expert as many rows as the first."""
    first = parts[0][0]
    rows = [sum(p.shape[0] for p in expert) for expert in parts]
    for e, expert in enumerate(parts):
        for p in expert:
            if layout(p) != layout(first):
                raise FormatError(f"'{p.name}' ({p.encoding}, {list(p.shape)}) is not {how} like "
                                  f"'{first.name}' ({first.encoding}, {list(first.shape)}); the experts "
                                  f"stacked into '{name}' must share one layout")
        if rows[e] != rows[0]:
            raise FormatError(f"expert {e} of '{name}' has {rows[e]} rows, expert 0 has {rows[0]}")
    return rows[0]

class StackedIntQuantTensor(IntQuantTensor):
    """Stacked experts made of per-expert integer-quantized Linears (llmcompressor and GPTQ write a
    mixture of experts as `experts.<e>.<proj>` modules): the logical weight [E, R, n] of the
    architecture (e.g. Gemma 4's fused gate_up_proj: each expert's gate_proj rows, then its
    up_proj rows), as a record of E rows of R*n values: row e is expert e's matrices flattened,
    with every child's scales kept (a 32-column block of the flat row is one block of one
    child's row, since n is a multiple of 32). `parts[e]` lists expert e's records in row order."""

    def __init__(self, name: str, parts: list[list[IntQuantTensor]]):
        first = parts[0][0]
        n = first.shape[1]
        self.parts = parts
        self.rows_per_expert = _expert_rows(name, parts, lambda p: (
            p.shape[1], p.bits, p.symmetric, p.group_size, p.act_order, p.format), "quantized")
        self.row_width = n
        gs = first.group_size if first.group_size and n % first.group_size == 0 else None
        encoding = first.encoding + f" ({len(parts)} per-expert modules stacked)"
        sources = tuple(s for expert in parts for p in expert for s in p.sources)
        super().__init__(name, (len(parts), self.rows_per_expert * n), encoding, first.format, sources, first.bits,
                         first.symmetric, self._load_experts, gs, first.act_order, first.qrange)

    def _load_experts(self, rr) -> IntCodes:
        qs, ss, zs, gs = [], [], [], []
        for e in range(rr[0], rr[1]):
            q_e, s_e, z_e, g_e, base = [], [], [], [], 0
            for p in self.parts[e]:
                q, s, z, g = flatten_codes(p.codes())
                q_e.append(q)
                s_e.append(s)
                z_e.append(z)
                g_e.append(g + base)
                base += s.shape[1]
            qs.append(np.concatenate(q_e, axis=1))
            ss.append(np.concatenate(s_e, axis=1))
            zs.append(None if z_e[0] is None else np.concatenate(z_e, axis=1))
            gs.append(np.concatenate(g_e))
        if any(not np.array_equal(g, gs[0]) for g in gs[1:]):
            # act-order: each expert has its own g_idx; one scale (and zero) per column instead
            ss = [s_e[:, g] for s_e, g in zip(ss, gs)]
            zs = [None if z_e is None else z_e[:, g] for z_e, g in zip(zs, gs)]
            gs = [np.arange(len(gs[0]), dtype=np.intp)]
        zero = None if zs[0] is None else np.concatenate(zs, axis=0)
        return IntCodes(np.concatenate(qs, axis=0), np.concatenate(ss, axis=0), zero, gs[0], self.group_size)

    def blocks(self, rows=None) -> AffineBlocks | str:
        if self.row_width % QK:
            return f"rows of {self.row_width} elements are not a whole number of {QK}-element GGML blocks"
        return super().blocks(rows)

    def expected_exact_type(self, candidates=None) -> tuple[T | None, str]:
        if self.row_width % QK:
            return None, f"rows of {self.row_width} elements are not a whole number of {QK}-element blocks"
        return super().expected_exact_type(candidates)

    def permuted(self, rows=None, cols=None):
        raise GGQuantError(f"'{self.name}': stacked experts cannot be permuted")


class StackedDequantTensor(QuantizedTensor):
    """Stacked experts made of per-expert records that no GGML block type holds (GLQ): the logical
    weight [E, R, n] as E rows of R*n values, row e = expert e's records (`parts[e]`, in row order)
    dequantized and flattened. Converted lossy, one expert at a time; the type suggested for the
    most bits among the parts (GLQTensor.suggested_type) carries over."""

    def __init__(self, name: str, parts: list[list[QuantizedTensor]]):
        first = parts[0][0]
        n = first.shape[1]
        self.parts = parts
        self.rows_per_expert = _expert_rows(name, parts, lambda p: (p.shape[1], p.format), "stored")
        self.row_width = n
        every = [p for expert in parts for p in expert]
        most = max(every, key=lambda p: p.bits or 0)
        if hasattr(most, "suggested_type"):
            self.suggested_type = most.suggested_type
        super().__init__(name, (len(parts), self.rows_per_expert * n), first.encoding + f" ({len(parts)} per-expert modules "
                         f"stacked)", first.format, tuple(x for p in every for x in p.sources), most.bits)

    def dequantize(self, rows=None) -> np.ndarray:
        a, b = rows_range(rows, self.shape[0])
        out = np.empty((b - a, self.shape[1]), dtype=np.float32)
        for i, e in enumerate(range(a, b)):
            out[i] = np.concatenate([p.dequantize().reshape(-1) for p in self.parts[e]])
        return out

    def blocks(self, rows=None) -> AffineBlocks | str:
        return self.parts[0][0].blocks()


class StackedAffineQuantTensor(AffineQuantTensor):
    """Stacked affine-quantized experts whose per-expert rows the architecture concatenates (mlx-lm
    keeps Gemma 4's experts as switch_glu.gate_proj and up_proj [E, F, H]; the fused HF parameter
    experts.gate_up_proj [E, 2F, H] holds each expert's gate rows, then its up rows): row e of the
    record is expert e of every part, flattened in order. `parts` are stacked records
    (expert_rows set) with one expert count, bit width, group size and row width."""

    def __init__(self, name: str, parts: list[AffineQuantTensor]):
        first = parts[0]
        for p in parts:
            if p.expert_rows is None:
                raise FormatError(f"'{p.name}' ({p.encoding}, {list(p.shape)}) is not a stack of experts; "
                                  f"'{name}' stacks experts")
            layout = (p.shape[0], p.shape[1] // p.expert_rows, p.bits, p.group_size, p.format)
            if layout != (first.shape[0], first.shape[1] // first.expert_rows, first.bits, first.group_size,
                          first.format):
                raise FormatError(f"'{p.name}' ({p.encoding}, {p.shape[0]} experts of {p.expert_rows} x "
                                  f"{p.shape[1] // p.expert_rows}) is not quantized like '{first.name}' "
                                  f"({first.encoding}, {first.shape[0]} experts of {first.expert_rows} x "
                                  f"{first.shape[1] // first.expert_rows}); the experts stacked into '{name}' "
                                  f"must share one layout")
        self.parts = parts
        self.row_width = first.shape[1] // first.expert_rows
        self.rows_per_expert = sum(p.expert_rows for p in parts)
        super().__init__(name, (first.shape[0], sum(p.shape[1] for p in parts)),
                         first.encoding + (f" ({len(parts)} stacks concatenated)" if len(parts) > 1 else ""),
                         first.format, tuple(s for p in parts for s in p.sources), first.bits, first.group_size,
                         self._load_parts, self.rows_per_expert)

    def _load_parts(self, rr):
        loads = [p._load(rr) for p in self.parts]
        return tuple(np.concatenate([part[i] for part in loads], axis=1) for i in range(3))



class FloatQuantTensor(QuantizedTensor):
    """FP8 e4m3 weight times a per-tensor, per-channel, per-group or per-block scale (compressed-tensors
    float-quantized, ModelOpt FP8)."""

    def __init__(self, name, shape, encoding, fmt, sources, load):
        super().__init__(name, shape, encoding, fmt, sources, 8)
        self._load = load  # rows -> (fp8 bytes uint8 [R, n], per-element-broadcastable scale float32)

    def dequantize(self, rows=None) -> np.ndarray:
        x, s = self._load(rows_range(rows, self.shape[0]))
        return FP8_E4M3_TO_F32[x] * s

    def blocks(self, rows=None):
        return ("FP8 e4m3 values are floats (4 significant bits over 16 exponents), not integer codes "
                "under one scale per 32 columns; F32 holds them exactly, F16 holds most")


NVFP4_GROUP = 16  # values per fp8 scale (compressed-tensors group_size 16, ggml QK_NVFP4_SUB)


def nvfp4_shape(src, where: str, codes: str, scales: str) -> tuple[int, int]:
    """(rows, values per row) of an NVFP4 weight stored as codes U8 [out, in/2] (two e2m1 codes a
    byte) with scales F8_E4M3 [out, in/16], as compressed-tensors and ModelOpt both store it;
    FormatError naming the tensor otherwise."""
    short = codes.rsplit(".", 1)[-1]
    if src.dtype(codes) != "U8":
        raise FormatError(f"{where}: {short} has dtype {src.dtype(codes)}, expected U8 (two fp4 codes a byte)")
    if src.dtype(scales) not in ("F8_E4M3", "U8"):
        raise FormatError(f"{where}: weight_scale has dtype {src.dtype(scales)}, expected F8_E4M3")
    pshape, sshape = src.shape(codes), src.shape(scales)
    if len(pshape) != 2:
        raise FormatError(f"{where}: {short} has shape {list(pshape)}; only 2-D weights are supported")
    out, n = pshape[0], pshape[1] * 2
    if n % NVFP4_GROUP or list(sshape) != [out, n // NVFP4_GROUP]:
        raise FormatError(f"{where}: weight_scale has shape {list(sshape)}; {out} rows of {n} fp4 values in groups "
                          f"of {NVFP4_GROUP} need [{out}, {n // NVFP4_GROUP}]")
    return out, n
NVFP4_SUBS = 4  # fp8 scales per GGML NVFP4 block of 64 values (block_nvfp4.d[4])
UE4M3_ZERO_ALIAS = 0x7F  # ggml_ue4m3_to_fp32 reads it as 0 (it is NaN in e4m3)


class NVFP4Tensor(QuantizedTensor):
    """An NVFP4 weight: fp4 e2m1 codes, one fp8 e4m3 scale per 16 values and a float32 factor per
    tensor, `scale2` (ModelOpt's weight_scale_2; compressed-tensors stores its reciprocal, the global
    scale g, and dequantizes w = e2m1 * (fp8 / g), the division in float32 as compressed_tensors'
    _dequantize computes it; ModelOpt's w = e2m1 * fp8 * weight_scale_2).

    GGML's NVFP4 block (block_nvfp4: 4 UE4M3 sub-scales, then 16 bytes of codes per 64 values)
    holds the same codes and the same scale bytes: ggml dequantizes it to e2m1 * fp8 exactly. The
    factor has no place in the block (folding it into the fp8 scales is exact only for a power of
    two whose shifted scales stay fp8 values); llama.cpp's converter writes it as a separate F32
    tensor `<name>.scale` that its graph multiplies into the matmul output (ModelBase._repack_nvfp4,
    build_lora_mm's w_s), and `companions()` gives it the same, with `.input_scale` beside it.

    Stacked experts (`stack`): the record is [E, R*n], row e = expert e's matrix flattened (n is
    whole 64-value blocks, so each flat row is whole GGML blocks), with one factor per expert:
    `.scale` / `.input_scale` become [E] vectors (ModelBase._flush_nvfp4_experts).

    load(rows) -> (packed uint8 [R, n/2], element 2i in the low nibble of byte i;
                   fp8 scale bytes uint8 [R, n/16])
    """

    def __init__(self, name, shape, encoding, fmt, sources, load, scale2, input_scale=None, *,
                 global_scale=None, input_global_scale=None, per_row: bool = False, row_width: int | None = None,
                 a16: bool = False):
        super().__init__(name, shape, encoding, fmt, sources, 4)
        self.a16 = a16  # weight-only (ModelOpt W4A16_NVFP4): llama.cpp must not use 4-bit activations
        self._load = load
        self.per_row = per_row  # one factor per row (stacked experts), else one for the tensor
        self.row_width = int(row_width or shape[1])  # values per row of the logical matrix
        self.scale2 = np.asarray(scale2, dtype=np.float32).reshape(-1)
        self.input_scale = None if input_scale is None else np.asarray(input_scale, dtype=np.float32).reshape(-1)
        # compressed-tensors' divisors (scale2 = 1 / g): dequantize() divides as the library does
        self.global_scale = None if global_scale is None else np.float32(global_scale)
        self.input_global_scale = None if input_global_scale is None else np.float32(input_global_scale)
        self._perm_rows: np.ndarray | None = None

    def _copy(self, **changes) -> NVFP4Tensor:
        kw = dict(scale2=self.scale2, input_scale=self.input_scale, global_scale=self.global_scale,
                  input_global_scale=self.input_global_scale, per_row=self.per_row, row_width=self.row_width,
                  a16=self.a16)
        kw.update(changes)
        return NVFP4Tensor(self.name, self.shape, self.encoding, self.format, self.sources, self._load, **kw)

    def permuted(self, rows: np.ndarray) -> NVFP4Tensor:
        """A view with output rows reordered (w' = w[rows]): each row keeps its codes and fp8
        scales (Llama's q/k RoPE layout; LlamaModel._repack_nvfp4 permutes weight and scale alike)."""
        if self.per_row:
            raise GGQuantError(f"'{self.name}': stacked experts cannot be permuted")
        new = self._copy()
        rows = np.asarray(rows, dtype=np.intp)
        new._perm_rows = rows if self._perm_rows is None else self._perm_rows[rows]
        return new

    @classmethod
    def stack(cls, name: str, experts: list[NVFP4Tensor]) -> NVFP4Tensor:
        """One NVFP4 module per expert -> the stacked [E, R*n] record (see the class docstring). An
        expert without an input scale counts as 1, as llama.cpp's converter does."""
        first = experts[0]
        for e, p in enumerate(experts):
            if not isinstance(p, NVFP4Tensor) or p.per_row:
                raise FormatError(f"'{p.name}' ({p.encoding}) is not an NVFP4 module; every expert stacked into "
                                  f"'{name}' must be (partial NVFP4 quantization across experts)")
            if p.shape != first.shape:
                raise FormatError(f"expert {e} of '{name}' ('{p.name}') has shape {list(p.shape)}, expert 0 "
                                  f"has {list(first.shape)}")
        R, n = first.shape
        loads = [p._rows for p in experts]

        def load(rr):
            got = [loads[e](None) for e in range(rr[0], rr[1])]
            return (np.stack([g[0].reshape(-1) for g in got]), np.stack([g[1].reshape(-1) for g in got]))

        ins = None
        if any(p.input_scale is not None for p in experts):
            ins = np.array([1.0 if p.input_scale is None else p.input_scale[0] for p in experts], dtype=np.float32)
        return cls(name, (len(experts), R * n), first.encoding + f" ({len(experts)} per-expert modules stacked)",
                   first.format, tuple(s for p in experts for s in p.sources), load,
                   np.concatenate([p.scale2 for p in experts]), ins, per_row=True, row_width=n,
                   a16=all(p.a16 for p in experts))

    def folded(self, factors: np.ndarray) -> NVFP4Tensor:
        """Stacked experts whose outputs the model scales per expert (Gemma 4's
        router.per_expert_scale): the factors multiplied into `scale2` in float32
        (Gemma4Model._generate_nvfp4_tensors folds them into each expert's weight_scale_2)."""
        factors = np.asarray(factors, dtype=np.float32).reshape(-1)
        if not self.per_row or factors.shape != self.scale2.shape:
            raise GGQuantError(f"'{self.name}': {factors.size} per-expert factors for "
                               f"{self.scale2.size if self.per_row else 'no'} stacked experts")
        return self._copy(scale2=self.scale2 * factors, global_scale=None, input_global_scale=None)

    def _rows(self, rows) -> tuple[np.ndarray, np.ndarray]:
        rr = rows_range(rows, self.shape[0])
        if self._perm_rows is None:
            return self._load(rr)
        idx = self._perm_rows[rr[0]:rr[1]]
        packed, scales = self._load((0, self.shape[0]))
        return packed[idx], scales[idx]

    def _codes(self, rows) -> tuple[np.ndarray, np.ndarray]:
        packed, scales = self._rows(rows)
        codes = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.uint8)
        codes[:, 0::2] = packed & 0x0F
        codes[:, 1::2] = packed >> 4
        return codes, scales

    def dequantize(self, rows=None) -> np.ndarray:
        codes, scales = self._codes(rows)
        if self.global_scale is not None:
            s = FP8_E4M3_TO_F32[scales] / self.global_scale  # float32 / float32: one rounding, as the library
        elif self.per_row:
            a, b = rows_range(rows, self.shape[0])
            s = FP8_E4M3_TO_F32[scales] * self.scale2[a:b, None]
        else:
            s = FP8_E4M3_TO_F32[scales] * self.scale2[0]  # ModelOpt: fp8 * weight_scale_2
        r, n = codes.shape
        w = E2M1_TO_F32[codes].reshape(r, n // NVFP4_GROUP, NVFP4_GROUP) * s[:, :, None]
        return w.reshape(r, n)

    def blocks(self, rows=None):
        return "fp4 e2m1 values under fp8 scales per 16 columns are not integer codes with a per-32-column scale"

    def companions(self) -> list[tuple[str, np.ndarray]]:
        """(suffix, float32) tensors llama.cpp's converter writes beside the NVFP4 weight: the factor
        as `.scale` and the input scale as `.input_scale`, each [1] and left out when it is 1
        (ModelBase._write_scale_tensor), or for stacked experts [E] and left out when every one is
        1 within np.allclose(atol=1e-6) (ModelBase._write_scales_tensor)."""
        out = []
        for suffix, v in ((".scale", self.scale2), (".input_scale", self.input_scale)):
            if v is None:
                continue
            trivial = np.allclose(v, 1.0, atol=1e-6) if self.per_row else abs(float(v[0]) - 1.0) < 1e-6
            if not trivial:
                out.append((suffix, v.astype(np.float32)))
        return out

    def _nvfp4_or_reason(self, rows, verify: bool) -> np.ndarray | str:
        n = self.shape[1]
        if self.row_width % (NVFP4_GROUP * NVFP4_SUBS):
            return (f"NVFP4: rows of {self.row_width} values are not whole {NVFP4_GROUP * NVFP4_SUBS}-value GGML blocks "
                    f"(llama.cpp's converter cannot repack them either)")
        packed, scales = self._rows(rows)
        bad = (scales & 0x80) | ((scales & 0x7F) == UE4M3_ZERO_ALIAS)
        if bad.any():
            r, c = (int(x[0]) for x in np.nonzero(bad))
            return (f"NVFP4: fp8 scale {c} of row {r} is 0x{int(scales[r, c]):02x} (negative or NaN); GGML's "
                    f"unsigned UE4M3 cannot hold it")
        r = packed.shape[0]
        nb = n // (NVFP4_GROUP * NVFP4_SUBS)
        # block_nvfp4: d[4] then qs[32]; qs[8s + j] = value j (low nibble) and value j + 8 (high)
        # of sub-block s (dequantize_row_nvfp4), while the source packs values 2i, 2i+1 in byte i.
        codes = np.empty((r, n), dtype=np.uint8)
        codes[:, 0::2] = packed & 0x0F
        codes[:, 1::2] = packed >> 4
        sub = codes.reshape(r, nb * NVFP4_SUBS, NVFP4_GROUP)
        qs = (sub[:, :, :8] | (sub[:, :, 8:] << 4)).reshape(r, nb, 32)
        out = np.concatenate([scales.reshape(r, nb, NVFP4_SUBS), qs], axis=2).reshape(r, nb * 36)
        if verify:
            from ggquant.quant import types as qtypes

            got = qtypes.get(T.NVFP4).dequantize(out, (r, n)).astype(np.float32)
            want = (E2M1_TO_F32[codes].reshape(r, n // NVFP4_GROUP, NVFP4_GROUP)
                    * FP8_E4M3_TO_F32[scales][:, :, None]).reshape(r, n)
            # equal as numbers: code 8 (e2m1 -0) is +0 in ggml's kvalues_mxfp4, the only bit difference
            if not np.array_equal(got, want):
                return "NVFP4: ggml's dequantization of the repacked blocks differs from e2m1 * fp8"
        return out

    def exact_ggml_or_reason(self, candidates=None, rows=None, verify: bool = True):
        """NVFP4 (the default candidate) holds the codes and fp8 scales bit for bit; the global
        scale travels in `companions()`. Other candidates: the base rule on `dequantize()`."""
        cands = [T.NVFP4] if candidates is None else _qtypes(candidates)
        reasons = []
        if T.NVFP4 in cands:
            res = self._nvfp4_or_reason(rows, verify)
            if not isinstance(res, str):
                return T.NVFP4, res
            reasons.append(res)
        rest = [c for c in cands if c != T.NVFP4]
        if rest:
            res = super().exact_ggml_or_reason(rest, rows, verify)
            if not isinstance(res, str):
                return res
            reasons.append(res)
        return f"{self.name}: no exact GGML encoding ({'; '.join(reasons) or 'no candidate types'})"

    def expected_exact_type(self, candidates=None) -> tuple[T | None, str]:
        if candidates is not None and T.NVFP4 not in _qtypes(candidates):
            return None, f"{self.encoding}: only NVFP4 holds fp4 codes under fp8 scales"
        if self.row_width % (NVFP4_GROUP * NVFP4_SUBS):
            return None, f"rows of {self.row_width} values are not whole 64-value NVFP4 blocks"
        return T.NVFP4, ""
