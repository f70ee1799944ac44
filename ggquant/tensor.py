"""THE record of the data flow (DESIGN.md): a named array, its encoding, and lazy access to its rows.

Every reader yields Tensors and every job consumes them; nothing is read until a row range is
asked for. The encoding says what the stored values are:

    Dense(dtype)           plain values: "F32", "F16", "BF16", "I32", ... (safetensors dtype names)
    Blocks(qtype)          GGML blocks of a GGMLQuantizationType, as in a GGUF file
    SourceQuant(record)    one logical weight of an already-quantized checkpoint (compressed-tensors,
                           GPTQ, MLX, GLQ, ...): codes + scales spread over several stored tensors,
                           read through the format's record (ggquant.formats.quantized)

and the source says where the bytes come from (a mapped file region, a dequantizing record, a
permuted view of another tensor). Rows are outer rows (shape[0]); `float_rows` decodes any
encoding to float32 exactly (the dequantization of the format), `release` hands the pages of a
finished range back to the OS so reading a model keeps resident memory at one chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ggquant.errors import GGQuantError


@dataclass(frozen=True)
class Dense:
    dtype: str  # safetensors dtype name, e.g. "BF16"

    @property
    def name(self) -> str:
        return self.dtype


@dataclass(frozen=True)
class Blocks:
    qtype: GGMLQuantizationType

    @property
    def name(self) -> str:
        return self.qtype.name


@dataclass(frozen=True)
class SourceQuant:
    record: Any  # a ggquant.formats.quantized QuantizedTensor (dequantize, blocks, encoding, bits, ...)
    float_dtype: str  # the checkpoint's float dtype, what --outtype auto reads for this weight

    @property
    def name(self) -> str:
        return self.record.encoding


Encoding = Dense | Blocks | SourceQuant


class Source(Protocol):
    """Where a tensor's bytes come from. `rows` returns raw outer rows in the tensor's encoding."""

    where: Path  # the file named in messages

    def rows(self, t: "Tensor", start: int, stop: int) -> np.ndarray: ...

    def release(self, t: "Tensor", start: int, stop: int) -> None: ...


def to_float32(raw: np.ndarray, dtype: str, what: str = "tensor") -> np.ndarray:
    """Decode raw storage of safetensors `dtype` to float32 (exact for F16/BF16/F32).

    BF16 -> F32 is a 16-bit left shift (the bf16 bits are the high half of the f32), which is
    what torch's bfloat16.to(float32) does, NaN payloads included.
    """
    if dtype == "F32":
        return raw if raw.dtype == np.float32 else raw.view(np.float32)
    if dtype == "BF16":
        out = np.empty(raw.shape, np.uint32)
        np.left_shift(raw, 16, out=out, dtype=np.uint32)  # one pass, no temporary
        return out.view(np.float32)
    if dtype == "F16":
        return raw.astype(np.float32)
    if dtype == "F64":
        return raw.astype(np.float32)
    raise GGQuantError(
        f"{what}: dtype {dtype} cannot be converted to a float GGUF tensor; ggquant reads F32, F16, "
        f"BF16 and F64 weights (dequantize FP8/int checkpoints first)"
    )


@dataclass(eq=False)
class Tensor:
    name: str
    shape: tuple[int, ...]  # numpy order, outermost first
    encoding: Encoding
    source: Source
    nbytes: int  # bytes stored (for SourceQuant: of all the stored tensors it is made of)

    # --- facts ---------------------------------------------------------------------------------
    @property
    def dtype(self) -> str:
        """The encoding's name; for a quantized checkpoint's weight, the checkpoint's float dtype."""
        enc = self.encoding
        return enc.float_dtype if isinstance(enc, SourceQuant) else enc.name

    @property
    def qtype(self) -> GGMLQuantizationType:
        if not isinstance(self.encoding, Blocks):
            raise GGQuantError(f"{self.file}: tensor '{self.name}' is {self.encoding.name}, not GGML blocks")
        return self.encoding.qtype

    @property
    def file(self) -> Path:
        return self.source.where

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def n_outer(self) -> int:
        """Rows along the outermost dimension (1 for a scalar)."""
        return self.shape[0] if self.shape else 1

    @property
    def outer_bytes(self) -> int:
        """Bytes of one outermost slice (a row of a matrix, a channel of a conv kernel)."""
        return self.nbytes // self.n_outer if self.n_outer else 0

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    # GGML block rows (the ggml sense: every dimension but the innermost)
    @property
    def n_rows(self) -> int:
        return math.prod(self.shape[:-1]) if self.shape else 1

    @property
    def row_bytes(self) -> int:
        """Bytes of one ggml row of a Blocks tensor (as stored; gguf's table for a tensor with no rows)."""
        if self.n_rows:
            return self.nbytes // self.n_rows
        block, size = GGML_QUANT_SIZES[self.qtype]
        return self.shape[-1] // block * size

    # --- payload -------------------------------------------------------------------------------
    def _check(self, start: int, stop: int, n: int) -> None:
        if not 0 <= start <= stop <= n:
            raise GGQuantError(f"{self.file}: tensor '{self.name}': rows [{start}, {stop}) outside [0, {n})")

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Raw outer rows [start, stop) in the stored encoding (often a read-only view; no copy).

        A scalar (shape ()) is returned with shape () for the range [0, 1)."""
        self._check(start, stop, self.n_outer)
        return self.source.rows(self, start, stop)

    def read(self) -> np.ndarray:
        return self.rows(0, self.n_outer)

    def float_rows(self, start: int, stop: int) -> np.ndarray:
        """Outer rows [start, stop) decoded to float32, exactly (read-only view for F32; treat as const)."""
        enc = self.encoding
        if isinstance(enc, SourceQuant):
            self._check(start, stop, self.n_outer)
            return enc.record.dequantize((start, stop))
        raw = self.rows(start, stop)
        if isinstance(enc, Blocks):
            from ggquant.quant import types as qtypes

            return qtypes.get(enc.qtype).dequantize(raw, (stop - start,) + self.shape[1:])
        return to_float32(raw, enc.dtype, f"{self.file}: tensor '{self.name}'")

    def release(self, start: int = 0, stop: int | None = None) -> None:
        """Drop the resident pages of rows [start, stop) (all rows by default)."""
        self.source.release(self, start, self.n_outer if stop is None else stop)

    # GGML blocks as ggml sees them
    def raw(self) -> np.ndarray:
        """uint8 [n_rows, row_bytes] of a Blocks tensor (a read-only view; no copy)."""
        return np.asarray(self.read()).view(np.uint8).reshape(self.n_rows, self.row_bytes)

    def block_rows(self, start: int, stop: int) -> np.ndarray:
        """uint8 ggml rows [start, stop) of a Blocks tensor, for streaming it in chunks."""
        self._check(start, stop, self.n_rows)
        return self.raw()[start:stop]


@dataclass
class MappedRegion:
    """A tensor stored C-contiguously at `offset` in a mapped file (`owner` maps it and releases pages)."""

    owner: Any  # has buffer() -> the read-only map, release(offset, nbytes)
    offset: int  # absolute offset of the first byte
    storage: np.dtype  # numpy dtype of one stored element (uint8 for GGML blocks)
    where: Path

    def rows(self, t: Tensor, start: int, stop: int) -> np.ndarray:
        count = (stop - start) * t.outer_bytes // self.storage.itemsize
        arr = np.frombuffer(self.owner.buffer(), dtype=self.storage, count=count,
                            offset=self.offset + start * t.outer_bytes)
        if isinstance(t.encoding, Blocks):
            return arr.reshape(stop - start, t.outer_bytes)  # bytes of each outer row (raw() regroups by ggml row)
        if not t.shape:
            return arr.reshape(())
        return arr.reshape((stop - start,) + t.shape[1:])

    def release(self, t: Tensor, start: int, stop: int) -> None:
        self.owner.release(self.offset + start * t.outer_bytes, (stop - start) * t.outer_bytes)


@dataclass
class Derived:
    """Rows computed from other tensors: a quantized weight's record, or a row permutation of a
    float tensor. `parts` are the stored tensors it reads (released whole: packed layouts are not
    row-aligned with the weight)."""

    parts: list[Tensor]
    where: Path
    perm: np.ndarray | None = None  # rows of parts[0] in this order (act-order permutation)

    def rows(self, t: Tensor, start: int, stop: int) -> np.ndarray:
        if self.perm is None:
            raise GGQuantError(f"{t.file}: tensor '{t.name}' is {t.encoding.name}: it has no raw "
                               f"{t.dtype} rows (use float_rows)")
        return np.ascontiguousarray(self.parts[0].read()[self.perm[start:stop]])

    def release(self, t: Tensor, start: int, stop: int) -> None:
        for p in self.parts:
            p.release(0, p.n_outer)


def permuted(t: Tensor, perm: np.ndarray) -> Tensor:
    """A float tensor with its outer rows reordered (w' = w[perm]), e.g. for the act-order trick."""
    return Tensor(t.name, t.shape, t.encoding, Derived([t], t.file, perm), t.nbytes)


def source_quant(record, float_dtype: str, parts: list[Tensor]) -> Tensor:
    """The logical weight of a quantized checkpoint, made of the stored tensors `parts`."""
    where = parts[0].file if parts else Path("?")
    return Tensor(record.name, tuple(record.shape), SourceQuant(record, float_dtype), Derived(parts, where),
                  sum(p.nbytes for p in parts))


@dataclass
class NoRows:
    """The source of a tensor that is facts only (name, shape, encoding), e.g. to ask an
    architecture hook what it would do with a tensor of that shape."""

    where: Path

    def rows(self, t: Tensor, start: int, stop: int) -> np.ndarray:
        raise GGQuantError(f"tensor '{t.name}' has no data here (shape only)")

    def release(self, t: Tensor, start: int, stop: int) -> None:
        pass


def shape_only(name: str, shape: tuple[int, ...], dtype: str = "F32") -> Tensor:
    return Tensor(name, tuple(shape), Dense(dtype), NoRows(Path(name)), 4 * math.prod(shape))


@dataclass
class InMemory:
    """Rows held in a numpy array (e.g. a tensor quantized in memory): uint8 [outer rows, bytes]
    for Blocks, the values for Dense."""

    data: np.ndarray
    where: Path

    def rows(self, t: Tensor, start: int, stop: int) -> np.ndarray:
        return self.data[start:stop]

    def release(self, t: Tensor, start: int, stop: int) -> None:
        pass


def in_memory_blocks(name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType, data: np.ndarray,
                     where: Path = Path("<memory>")) -> Tensor:
    """A Blocks tensor whose bytes are `data` (uint8 [n_rows, row_bytes])."""
    data = np.ascontiguousarray(data).view(np.uint8)
    n_outer = shape[0] if shape else 1
    return Tensor(name, tuple(shape), Blocks(qtype), InMemory(data.reshape(n_outer, -1), where), data.nbytes)

