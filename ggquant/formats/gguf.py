"""GGUF: a validating, zero-copy mmap reader and a streaming writer.

File layout (ggml/src/gguf.cpp, gguf_init_from_reader; gguf-py gguf_writer.py), little endian:

    u32 magic "GGUF" | u32 version | i64 n_tensors | i64 n_kv
    n_kv      x  string key, i32 value type, value
    n_tensors x  string name, u32 n_dims, n_dims x i64 ne (innermost first), i32 ggml type, u64 offset
    zero padding up to a multiple of `alignment` (a file offset), then the data section;
    tensor i lives at data_start + offset_i, and every offset is a multiple of `alignment`.

    string = u64 byte length + UTF-8 bytes (no terminator)
    array  = i32 item type + u64 count + count items (no nested arrays)

The reader applies every check of ggml's C parser before it trusts a number from the file, and
checks each length against the bytes left *before* allocating anything, so a crafted header
(2^63 tensors, a 2^60-byte string) fails at once with a FormatError naming the file, the field
and the byte offset. Tensor payloads are never read: each tensor is a ggquant.tensor.Tensor (Blocks encoding) whose
`raw()` is a view of the mmap.

The writer follows DESIGN.md "Writers stream": the header, every key/value and every tensor
info are laid out first, then each tensor's payload is produced chunk by chunk, written and
dropped, so peak memory is one chunk. Output goes to a temporary file beside the target and is
renamed only when every shard is complete. Offsets and padding equal gguf-py's GGUFWriter for
the same fields and tensors, so both produce identical bytes.

Shapes are in numpy order everywhere in this module (outermost first), i.e. ggml's `ne` reversed.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGUF_VERSION,
    GGMLQuantizationType,
    GGUFValueType,
    Keys,
)
from gguf.gguf_writer import SHARD_NAME_FORMAT

from ggquant.errors import FormatError, GGQuantError
from ggquant.files import check_overwrite
from ggquant.tensor import Blocks, MappedRegion, Tensor

__all__ = [
    "Field",
    "KV",
    "GGUFReader",
    "GGUFWriter",
    "PlannedTensor",
    "TensorNotFoundError",
    "copy_field",
    "tensor_nbytes",
    "BLOCK_SIZES",
]

# --- limits of ggml's own parser (ggml/src/gguf.cpp, ggml/include/ggml.h) -------------------
GGUF_MAX_STRING_LENGTH = 1024 * 1024 * 1024  # gguf.cpp GGUF_MAX_STRING_LENGTH
GGUF_MAX_ARRAY_ELEMENTS = 1024 * 1024 * 1024  # gguf.cpp GGUF_MAX_ARRAY_ELEMENTS
GGML_MAX_DIMS = 4  # ggml.h: tensors have at most 4 dimensions
GGML_MAX_NAME = 64  # ggml.h: tensor names are stored in char[64] including the NUL
INT64_MAX = (1 << 63) - 1
SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit counts and was dropped by ggml; v2 and v3 share a layout

# (elements per block, bytes per block) of each GGML type: gguf-py's table, except Q8_1, which
# gguf-py 0.19 lists as 40 bytes (two f32) while ggml stores two f16: 36 bytes
# (ggml-common.h, static_assert(sizeof(block_q8_1) == 2*sizeof(ggml_half) + QK8_1)). The file
# layout must agree with ggml, which computes every offset from its own size.
BLOCK_SIZES: dict[GGMLQuantizationType, tuple[int, int]] = {
    **GGML_QUANT_SIZES,
    GGMLQuantizationType.Q8_1: (32, 2 * 2 + 32),
}

# Smallest possible encodings, used to refuse counts that cannot fit in the bytes left.
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a non-empty key, value type, a 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, ggml type, offset

# The keys the writer manages itself (llama.cpp gguf-split, gguf-py add_shard_kv_data).
_SPLIT_NO = Keys.Split.LLM_KV_SPLIT_NO
_SPLIT_COUNT = Keys.Split.LLM_KV_SPLIT_COUNT
_SPLIT_TENSORS_COUNT = Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT
_SPLIT_KEYS = (_SPLIT_NO, _SPLIT_COUNT, _SPLIT_TENSORS_COUNT)
_ALIGNMENT_KEY = Keys.General.ALIGNMENT

# Little-endian numpy dtype of each fixed-size GGUF value type (gguf.cpp GGUF_TYPE_SIZE).
_NUMPY_OF: dict[GGUFValueType, np.dtype] = {
    GGUFValueType.UINT8: np.dtype("<u1"),
    GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"),
    GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"),
    GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"),
    GGUFValueType.BOOL: np.dtype("<u1"),  # stored as one byte; ggml reads any non-zero as true
    GGUFValueType.UINT64: np.dtype("<u8"),
    GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}
# struct formats with standard sizes ("<"): numpy's dtype.char is platform-sized, so spell them out.
_STRUCT_OF: dict[GGUFValueType, struct.Struct] = {
    GGUFValueType.UINT8: struct.Struct("<B"),
    GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.UINT16: struct.Struct("<H"),
    GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: struct.Struct("<I"),
    GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.FLOAT32: struct.Struct("<f"),
    GGUFValueType.BOOL: struct.Struct("<B"),
    GGUFValueType.UINT64: struct.Struct("<Q"),
    GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT64: struct.Struct("<d"),
}
assert all(_STRUCT_OF[t].size == _NUMPY_OF[t].itemsize for t in _NUMPY_OF)
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_SHARD_RE = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def _value_type(t: Any) -> GGUFValueType | None:
    try:
        return GGUFValueType(int(t))
    except (ValueError, TypeError):
        return None


def _ggml_type(t: Any) -> GGMLQuantizationType | None:
    try:
        qt = GGMLQuantizationType(int(t))
    except (ValueError, TypeError):
        return None
    return qt if qt in BLOCK_SIZES else None


def tensor_nbytes(shape: Sequence[int], qtype: GGMLQuantizationType) -> int:
    """Bytes of a tensor of `shape` (numpy order) in `qtype` (ggml_nbytes for contiguous rows)."""
    block_size, type_size = BLOCK_SIZES[qtype]
    return math.prod(shape) // block_size * type_size


def _pad(n: int, alignment: int) -> int:
    """GGML_PAD: round n up to a multiple of alignment."""
    return (n + alignment - 1) // alignment * alignment


# =============================================================================================
# Reader
# =============================================================================================


@dataclass
class Field:
    """One metadata key/value, with its exact GGUF type so that a copy round-trips byte for byte.

    value: int / float / bool / str for scalars; for arrays a list of str (item_type STRING) or
    a 1-D numpy array (numeric and bool item types). offset: where the key starts in the file.
    """

    name: str
    type: GGUFValueType
    value: Any
    item_type: GGUFValueType | None = None
    offset: int = field(default=-1, compare=False)


class _Map:
    """One GGUF file's read-only map, as the tensors' MappedRegion owner: buffer() for views,
    release() to hand finished pages back (MADV_DONTNEED), close() when the reader closes."""

    def __init__(self, path: Path, buf: Any):
        self.path = path
        self.buf = buf

    def buffer(self) -> Any:
        if self.buf is None:
            raise GGQuantError(f"{self.path}: the reader was closed; reopen the file")
        return self.buf

    def release(self, offset: int, nbytes: int) -> None:
        if self.buf is None or nbytes <= 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = offset // mmap.PAGESIZE * mmap.PAGESIZE
        stop = min(len(self.buf), offset + nbytes)
        if stop > start:
            self.buf.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def close(self) -> None:
        buf, self.buf = self.buf, None
        try:
            buf.close()
        except BufferError:
            pass  # a raw() view is still alive: the mapping goes away when the last view does


def _tensor(name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType, offset: int, nbytes: int,
            owner: _Map) -> Tensor:
    """A tensor of the file: GGML blocks at `offset`, read as views of the map (Tensor.raw())."""
    return Tensor(name, shape, Blocks(qtype), MappedRegion(owner, offset, np.dtype(np.uint8), owner.path), nbytes)


class TensorNotFoundError(GGQuantError, KeyError):
    """A tensor name that the file does not contain (also a KeyError, for `in`-style code)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class _Cursor:
    """Bounds-checked little-endian reads from one mmap; every failure is a FormatError."""

    def __init__(self, buf: Any, size: int, path: Path):
        self.buf = buf
        self.size = size
        self.path = path
        self.pos = 0

    def fail(self, what: str, offset: int, expected: str) -> FormatError:
        return FormatError(f"{self.path}: {what} at byte offset {offset}: {expected}")

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.remaining:
            raise self.fail(
                what, self.pos, f"needs {n} bytes but only {self.remaining} remain in the file (truncated or corrupt)"
            )

    def unpack(self, st: struct.Struct, what: str) -> Any:
        self.need(st.size, what)
        (v,) = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return v

    def string(self, what: str) -> str:
        start = self.pos
        n = self.unpack(_U64, f"{what} (string length)")
        if n > GGUF_MAX_STRING_LENGTH:
            raise self.fail(what, start, f"string length {n} exceeds ggml's maximum {GGUF_MAX_STRING_LENGTH}")
        if n > self.remaining:
            raise self.fail(
                what, start, f"string length {n} runs past the end of the file ({self.remaining} bytes remain)"
            )
        raw = self.buf[self.pos : self.pos + n]
        try:
            s = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(what, start, f"expected UTF-8 text, found invalid byte at position {e.start}") from None
        self.pos += n
        return s


class _ParsedFile:
    def __init__(self, path: Path, buf: _Map, version: int, alignment: int, fields: dict[str, Field],
                 tensors: list[Tensor], data_offset: int):
        self.path = path
        self.buf = buf
        self.version = version
        self.alignment = alignment
        self.fields = fields
        self.tensors = tensors
        self.data_offset = data_offset


def _read_value(cur: _Cursor, vtype: GGUFValueType, what: str) -> Any:
    if vtype == GGUFValueType.STRING:
        return cur.string(what)
    v = cur.unpack(_STRUCT_OF[vtype], what)
    if vtype == GGUFValueType.BOOL:
        return v != 0  # gguf.cpp read(bool&): int8 != 0
    return v


def _read_array(cur: _Cursor, key: str, start: int) -> tuple[GGUFValueType, Any]:
    item_off = cur.pos
    raw_item = cur.unpack(_I32, f"key '{key}' (array item type)")
    item_type = _value_type(raw_item)
    if item_type is None or item_type == GGUFValueType.ARRAY:
        raise cur.fail(
            f"key '{key}' (array item type)", item_off,
            f"expected a GGUF value type 0..12 other than ARRAY (9), got {raw_item}",
        )
    count_off = cur.pos
    n = cur.unpack(_U64, f"key '{key}' (array length)")
    min_item = 8 if item_type == GGUFValueType.STRING else _NUMPY_OF[item_type].itemsize
    if n > GGUF_MAX_ARRAY_ELEMENTS:
        raise cur.fail(f"key '{key}' (array length)", count_off,
                       f"array length {n} exceeds ggml's maximum {GGUF_MAX_ARRAY_ELEMENTS}")
    if n * min_item > cur.remaining:
        raise cur.fail(
            f"key '{key}' (array length)", count_off,
            f"{n} items of {item_type.name} need at least {n * min_item} bytes but only {cur.remaining} remain",
        )
    if item_type == GGUFValueType.STRING:
        out = []
        for i in range(n):
            out.append(cur.string(f"key '{key}' item {i}"))
        return item_type, out
    dt = _NUMPY_OF[item_type]
    arr = np.frombuffer(cur.buf, dtype=dt, count=n, offset=cur.pos).copy()  # copy: never pin the mmap
    cur.pos += n * dt.itemsize
    if item_type == GGUFValueType.BOOL:
        arr = arr != 0
    return item_type, arr


def _parse_file(path: Path) -> _ParsedFile:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise GGQuantError(f"{path}: no such file") from None
    if size == 0:
        raise FormatError(f"{path}: file is empty, expected a GGUF file starting with the magic 'GGUF'")
    with open(path, "rb") as f:
        owner = _Map(path, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    try:
        return _parse_buf(path, owner, size)
    except BaseException:
        owner.close()
        raise


def _parse_buf(path: Path, owner: _Map, size: int) -> _ParsedFile:
    buf = owner.buf
    cur = _Cursor(buf, size, path)

    # --- header ---------------------------------------------------------------------------
    magic = cur.unpack(_U32, "magic")
    if magic != GGUF_MAGIC:
        got = bytes(buf[0:4])
        raise cur.fail("magic", 0, f"expected b'GGUF', got {got!r}: not a GGUF file")
    version = cur.unpack(_U32, "version")
    if version == 0:
        raise cur.fail("version", 4, "expected GGUF version 2 or 3, got 0")
    if version == 1:
        raise cur.fail("version", 4, "GGUF v1 is no longer supported by ggml; re-convert the model")
    if version & 0xFFFF == 0:
        raise cur.fail("version", 4, f"version {version:#x} looks byte-swapped: a big-endian GGUF is not supported")
    if version not in SUPPORTED_VERSIONS:
        raise cur.fail("version", 4, f"expected GGUF version 2 or 3, got {version}")
    n_tensors = cur.unpack(_I64, "tensor count")
    n_kv = cur.unpack(_I64, "key/value count")
    if n_tensors < 0 or n_tensors * _MIN_TENSOR_INFO_BYTES > cur.remaining:
        raise cur.fail("tensor count", 8,
                       f"{n_tensors} tensors cannot fit in the {cur.remaining} bytes after the header")
    if n_kv < 0 or n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > cur.remaining:
        raise cur.fail("key/value count", 16,
                       f"{n_kv} key/value pairs cannot fit in the {cur.remaining} bytes after the header")

    # --- key/value pairs ------------------------------------------------------------------
    fields: dict[str, Field] = {}
    for i in range(n_kv):
        start = cur.pos
        key = cur.string(f"key #{i}")
        if not key:
            raise cur.fail(f"key #{i}", start, "expected a non-empty key")
        if key in fields:
            raise cur.fail(f"key '{key}'", start,
                           f"duplicate key (first at byte offset {fields[key].offset}); keys must be unique")
        type_off = cur.pos
        raw_type = cur.unpack(_I32, f"key '{key}' (value type)")
        vtype = _value_type(raw_type)
        if vtype is None:
            raise cur.fail(f"key '{key}' (value type)", type_off, f"expected a GGUF value type 0..12, got {raw_type}")
        if vtype == GGUFValueType.ARRAY:
            item_type, value = _read_array(cur, key, start)
        else:
            item_type, value = None, _read_value(cur, vtype, f"key '{key}' (value)")
        fields[key] = Field(key, vtype, value, item_type, start)

    # --- alignment (gguf.cpp: must be u32 and a power of two) -------------------------------
    alignment = GGUF_DEFAULT_ALIGNMENT
    af = fields.get(_ALIGNMENT_KEY)
    if af is not None:
        if af.type != GGUFValueType.UINT32:
            raise cur.fail(f"key '{_ALIGNMENT_KEY}'", af.offset, f"expected type UINT32, got {af.type.name}")
        if af.value == 0 or af.value & (af.value - 1):
            raise cur.fail(f"key '{_ALIGNMENT_KEY}'", af.offset, f"expected a power of two, got {af.value}")
        alignment = af.value

    # --- tensor infos ---------------------------------------------------------------------
    if n_tensors * _MIN_TENSOR_INFO_BYTES > cur.remaining:
        raise cur.fail("tensor count", 8,
                       f"{n_tensors} tensor infos cannot fit in the {cur.remaining} bytes after the metadata")
    infos: list[tuple[str, tuple[int, ...], GGMLQuantizationType, int, int, int]] = []
    seen: dict[str, int] = {}
    for i in range(n_tensors):
        start = cur.pos
        name = cur.string(f"tensor #{i} name")
        what = f"tensor '{name}'"
        if len(name.encode("utf-8")) >= GGML_MAX_NAME:
            raise cur.fail(what, start, f"name is {len(name.encode())} bytes, ggml allows at most {GGML_MAX_NAME - 1}")
        if name in seen:
            raise cur.fail(what, start, f"duplicate tensor name (first at byte offset {seen[name]})")
        seen[name] = start
        dims_off = cur.pos
        n_dims = cur.unpack(_U32, f"{what} (n_dims)")
        if n_dims > GGML_MAX_DIMS:
            raise cur.fail(f"{what} (n_dims)", dims_off, f"expected at most {GGML_MAX_DIMS} dimensions, got {n_dims}")
        ne = []
        for j in range(n_dims):
            ne_off = cur.pos
            d = cur.unpack(_I64, f"{what} (ne[{j}])")
            if d < 0:
                raise cur.fail(f"{what} (ne[{j}])", ne_off, f"expected a non-negative dimension, got {d}")
            ne.append(d)
        n_el = math.prod(ne)
        if n_el > INT64_MAX:
            raise cur.fail(f"{what} (shape)", dims_off, f"element count of ne={ne} overflows int64")
        type_off = cur.pos
        raw_type = cur.unpack(_I32, f"{what} (ggml type)")
        qtype = _ggml_type(raw_type)
        if qtype is None:
            raise cur.fail(f"{what} (ggml type)", type_off,
                           f"expected a ggml type id known to gguf-py (e.g. 0=F32, 8=Q8_0), got {raw_type}")
        block_size, type_size = BLOCK_SIZES[qtype]
        ne0 = ne[0] if ne else 1
        if ne0 % block_size:
            raise cur.fail(f"{what} (shape)", dims_off,
                           f"row of {ne0} elements is not a multiple of the {qtype.name} block size {block_size}")
        off_pos = cur.pos
        rel = cur.unpack(_U64, f"{what} (data offset)")
        if rel % alignment:
            raise cur.fail(f"{what} (data offset)", off_pos,
                           f"data offset {rel} is not a multiple of the alignment {alignment}")
        nbytes = n_el // block_size * type_size
        infos.append((name, tuple(reversed(ne)), qtype, rel, nbytes, off_pos))

    # --- data section: starts at the next multiple of the alignment (only if tensors exist) --
    data_offset = _pad(cur.pos, alignment) if n_tensors > 0 else cur.pos
    if data_offset > size:
        raise cur.fail("data section", cur.pos, f"padding to alignment {alignment} runs past the end of the file ({size} bytes)")
    tensors = []
    for name, shape, qtype, rel, nbytes, off_pos in infos:
        if data_offset + rel + nbytes > size:
            raise cur.fail(
                f"tensor '{name}' (data offset)", off_pos,
                f"data [{data_offset + rel}, {data_offset + rel + nbytes}) runs past the end of the file ({size} bytes)",
            )
        tensors.append(_tensor(name, shape, qtype, data_offset + rel, nbytes, owner))
    by_offset = sorted((t for t in tensors if t.nbytes), key=lambda t: t.source.offset)  # empty ones occupy nothing
    for a, b in zip(by_offset, by_offset[1:]):
        ao, bo = a.source.offset, b.source.offset
        if bo < ao + a.nbytes:
            raise FormatError(
                f"{path}: tensor '{b.name}' (data offset) data at byte offset {bo} overlaps tensor "
                f"'{a.name}' [{ao}, {ao + a.nbytes}); expected disjoint tensors"
            )
    return _ParsedFile(path, owner, version, alignment, fields, tensors, data_offset)


class GGUFReader:
    """A GGUF file (or all shards of a split model) opened read-only through mmap.

    path: a .gguf file, or the first shard "<prefix>-00001-of-0000N.gguf" of a split model, in
    which case all N shards are loaded as one model (llama-model-loader.cpp does the same).
    fields: the first file's metadata in file order (shards 2..N only carry split.* keys).
    tensors: in file order across shards.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        first = _parse_file(self.path)
        self._parsed = [first]
        try:
            self._load_shards(first)
        except BaseException:
            self.close()
            raise
        self.version = first.version
        self.alignment = first.alignment
        self.fields: dict[str, Field] = first.fields
        self.tensors: list[Tensor] = [t for p in self._parsed for t in p.tensors]
        self._by_name = {t.name: t for t in self.tensors}

    def _load_shards(self, first: _ParsedFile) -> None:
        count_f = first.fields.get(_SPLIT_COUNT)
        if count_f is None:
            return
        n_split = self._split_int(first, _SPLIT_COUNT, GGUFValueType.UINT16)
        if n_split <= 1:
            return
        split_no = self._split_int(first, _SPLIT_NO, GGUFValueType.UINT16)
        if split_no != 0:
            raise GGQuantError(
                f"{self.path}: this is shard {split_no + 1} of {n_split}; open the first shard "
                f"(…-00001-of-{n_split:05d}.gguf) to load the whole model"
            )
        m = _SHARD_RE.match(self.path.name)
        if m is None or int(m["no"]) != 1 or int(m["count"]) != n_split:
            raise FormatError(
                f"{self.path}: metadata says split.count={n_split}, so the file name must end with "
                f"'-00001-of-{n_split:05d}.gguf' (gguf-split naming) to find the other shards"
            )
        total = self._split_int(first, _SPLIT_TENSORS_COUNT, GGUFValueType.INT32)
        names = {t.name for t in first.tensors}
        for i in range(1, n_split):
            shard_path = self.path.with_name(SHARD_NAME_FORMAT.format(m["prefix"], i + 1, n_split))
            if not shard_path.exists():
                raise GGQuantError(f"{self.path}: shard {i + 1} of {n_split} is missing: {shard_path}")
            p = _parse_file(shard_path)
            self._parsed.append(p)
            if self._split_int(p, _SPLIT_NO, GGUFValueType.UINT16) != i:
                raise FormatError(f"{shard_path}: key '{_SPLIT_NO}' is {p.fields[_SPLIT_NO].value}, expected {i}")
            if self._split_int(p, _SPLIT_COUNT, GGUFValueType.UINT16) != n_split:
                raise FormatError(
                    f"{shard_path}: key '{_SPLIT_COUNT}' is {p.fields[_SPLIT_COUNT].value}, expected {n_split}"
                )
            for t in p.tensors:
                if t.name in names:
                    raise FormatError(f"{shard_path}: tensor '{t.name}' also appears in an earlier shard")
                names.add(t.name)
        if len(names) != total:
            raise FormatError(
                f"{self.path}: key '{_SPLIT_TENSORS_COUNT}' says {total} tensors but the {n_split} shards hold {len(names)}"
            )

    @staticmethod
    def _split_int(p: _ParsedFile, key: str, vtype: GGUFValueType) -> int:
        f = p.fields.get(key)
        if f is None:
            raise FormatError(f"{p.path}: key '{key}' is missing; every shard of a split model needs it")
        if f.type != vtype:
            raise FormatError(f"{p.path}: key '{key}' at byte offset {f.offset}: expected type {vtype.name}, got {f.type.name}")
        return f.value

    @property
    def files(self) -> list[Path]:
        return [p.path for p in self._parsed]

    def tensor(self, name: str) -> Tensor:
        try:
            return self._by_name[name]
        except KeyError:
            raise TensorNotFoundError(f"{self.path}: no tensor named '{name}' ({len(self.tensors)} tensors in the file)") from None

    def get(self, key: str, default: Any = None) -> Any:
        f = self.fields.get(key)
        return default if f is None else f.value

    def close(self) -> None:
        """Release the mmaps. Views returned by raw() stay valid; their mapping is freed with them."""
        for p in getattr(self, "_parsed", []):
            p.buf.close()
        self._parsed = []

    def __enter__(self) -> GGUFReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# =============================================================================================
# Metadata to write: ordered, with gguf-py's duplicate semantics
# =============================================================================================


class KV:
    """Ordered GGUF key/values. Setting an existing key keeps its position and replaces the value
    and type: what gguf-py GGUFWriter.add_key_value does (llama.cpp's converter writes several
    keys twice, e.g. Gemma 3's context_length, and the file keeps the first position)."""

    def __init__(self) -> None:
        self.items: dict[str, tuple[GGUFValueType, Any, GGUFValueType | None]] = {}

    def set(self, key: str, value: Any, vtype: GGUFValueType, item_type: GGUFValueType | None = None) -> None:
        self.items[key] = (vtype, value, item_type)

    def remove(self, key: str) -> None:
        self.items.pop(key, None)

    def move_after(self, anchor: str, keys: list[str]) -> None:
        """Move `keys` (already set) right after `anchor`, in that order (a key llama.cpp's
        converter writes later than ggquant's planning sets it)."""
        if anchor not in self.items:
            return
        moved = {k: self.items.pop(k) for k in keys if k in self.items}
        items = {}
        for k, v in self.items.items():
            items[k] = v
            if k == anchor:
                items.update(moved)
        self.items = items

    def get(self, key: str, default: Any = None) -> Any:
        return self.items[key][1] if key in self.items else default

    def __contains__(self, key: str) -> bool:
        return key in self.items

    # typed helpers, named after gguf-py's add_* methods they mirror
    def u32(self, key: str, value: int) -> None:
        self.set(key, int(value), GGUFValueType.UINT32)

    def i32(self, key: str, value: int) -> None:
        self.set(key, int(value), GGUFValueType.INT32)

    def f32(self, key: str, value: float) -> None:
        self.set(key, float(value), GGUFValueType.FLOAT32)

    def bool(self, key: str, value: bool) -> None:
        self.set(key, bool(value), GGUFValueType.BOOL)

    def string(self, key: str, value: str) -> None:
        if value:  # gguf-py add_string drops empty strings
            self.set(key, value, GGUFValueType.STRING)

    def array(self, key: str, values: list, what: str = "") -> None:
        """An array whose item type follows gguf-py GGUFValueType.get_type of the first item."""
        if len(values) == 0:  # gguf-py add_array drops empty arrays
            return
        item = python_value_type(values[0], what or key)
        for v in values:
            if python_value_type(v, what or key) != item:
                raise GGQuantError(f"{what or key}: all items of a GGUF array must have the same type, got {values!r}")
        self.set(key, list(values), GGUFValueType.ARRAY, item)

    def write_to(self, writer: Any) -> None:
        for key, (vtype, value, item) in self.items.items():
            writer.add_field(key, value, vtype, item)


def python_value_type(v: Any, what: str) -> GGUFValueType:
    """gguf-py GGUFValueType.get_type: str -> STRING, float -> FLOAT32, bool -> BOOL, int -> INT32."""
    if isinstance(v, (str, bytes, bytearray)):
        return GGUFValueType.STRING
    if isinstance(v, float):
        return GGUFValueType.FLOAT32
    if isinstance(v, bool):
        return GGUFValueType.BOOL
    if isinstance(v, int):
        return GGUFValueType.INT32
    raise GGQuantError(f"{what}: cannot store {v!r} ({type(v).__name__}) in GGUF metadata")


# =============================================================================================
# Writer
# =============================================================================================


@dataclass(frozen=True)
class PlannedTensor:
    """Where a tensor will land: shard file, absolute data offset, size (for --dry-run)."""

    shard: Path
    shard_index: int
    name: str
    shape: tuple[int, ...]  # numpy order
    qtype: GGMLQuantizationType
    nbytes: int
    offset: int  # absolute file offset in `shard`


@dataclass
class _PendingTensor:
    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    nbytes: int
    produce: Callable[[], Iterable[Any]]


def _encode_string(s: Any, what: str) -> bytes:
    if isinstance(s, str):
        try:
            b = s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise GGQuantError(f"{what}: string is not encodable as UTF-8 ({e.reason})") from None
    elif isinstance(s, (bytes, bytearray, memoryview)):
        b = bytes(s)
        try:
            b.decode("utf-8")
        except UnicodeDecodeError:
            raise GGQuantError(f"{what}: bytes are not valid UTF-8; GGUF strings are UTF-8") from None
    else:
        raise GGQuantError(f"{what}: expected a str, got {type(s).__name__}")
    return _U64.pack(len(b)) + b


def _encode_scalar(value: Any, vtype: GGUFValueType, what: str) -> bytes:
    if vtype == GGUFValueType.STRING:
        return _encode_string(value, what)
    if vtype == GGUFValueType.BOOL:
        if not isinstance(value, (bool, np.bool_)):
            raise GGQuantError(f"{what}: expected a bool for type BOOL, got {value!r}")
        return bytes([1 if value else 0])
    is_float = vtype in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64)
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, np.integer, float, np.floating) if is_float else (int, np.integer)
    ):
        raise GGQuantError(f"{what}: expected {'a number' if is_float else 'an integer'} for type {vtype.name}, got {value!r}")
    try:
        return _STRUCT_OF[vtype].pack(float(value) if is_float else int(value))
    except (struct.error, OverflowError):
        raise GGQuantError(f"{what}: value {value!r} does not fit in {vtype.name}") from None


def _encode_numeric_array(value: Any, item: GGUFValueType, what: str) -> bytes:
    dt = _NUMPY_OF[item]
    if isinstance(value, (bytes, bytearray)) and item == GGUFValueType.UINT8:
        return bytes(value)
    try:
        arr = np.asarray(value)
    except (ValueError, OverflowError) as e:
        raise GGQuantError(f"{what}: cannot read the array as numbers ({e})") from None
    if arr.size == 0:
        return b""
    if arr.ndim != 1:
        raise GGQuantError(f"{what}: expected a 1-D array, got shape {arr.shape} (nested arrays are not supported)")
    kind = arr.dtype.kind
    if item == GGUFValueType.BOOL:
        if kind != "b" and not (kind in "iu" and np.isin(arr, (0, 1)).all()):
            raise GGQuantError(f"{what}: expected bools for an array of BOOL, got dtype {arr.dtype}")
        return (arr != 0).astype(dt).tobytes()
    if item in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
        if kind not in "iuf":
            raise GGQuantError(f"{what}: expected numbers for an array of {item.name}, got dtype {arr.dtype}")
        return arr.astype(dt).tobytes()
    if kind not in "iu":
        raise GGQuantError(f"{what}: expected integers for an array of {item.name}, got dtype {arr.dtype}")
    info = np.iinfo(dt)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < info.min or hi > info.max:
        raise GGQuantError(f"{what}: values in [{lo}, {hi}] do not fit in {item.name} [{info.min}, {info.max}]")
    return arr.astype(dt).tobytes()


def _encode_value(value: Any, vtype: GGUFValueType, item_type: GGUFValueType | None, what: str) -> bytes:
    """The bytes after the key: i32 type, then the value (gguf-py _pack_val, add_vtype=True)."""
    if vtype != GGUFValueType.ARRAY:
        if item_type is not None:
            raise GGQuantError(f"{what}: item_type is only meaningful for ARRAY, got type {vtype.name}")
        return _I32.pack(vtype) + _encode_scalar(value, vtype, what)
    if item_type is None or item_type == GGUFValueType.ARRAY:
        raise GGQuantError(f"{what}: an ARRAY needs an item_type that is not ARRAY (nested arrays are not supported)")
    if isinstance(value, (str, dict)) or not isinstance(value, (Sequence, np.ndarray, bytes, bytearray)):
        raise GGQuantError(f"{what}: expected a list or 1-D array for an ARRAY, got {type(value).__name__}")
    if item_type == GGUFValueType.STRING:
        body = b"".join(_encode_string(s, f"{what} item {i}") for i, s in enumerate(value))
    else:
        body = _encode_numeric_array(value, item_type, what)
    return _I32.pack(GGUFValueType.ARRAY) + _I32.pack(item_type) + _U64.pack(len(value)) + body


class GGUFWriter:
    """Streaming GGUF writer: plan everything, then produce, write and drop one chunk at a time.

        w = GGUFWriter("out.gguf")
        w.add_field("general.architecture", "gemma3", GGUFValueType.STRING)
        w.add_tensor("token_embd.weight", (262144, 640), GGMLQuantizationType.Q8_0, produce)
        w.write()

    produce() returns an iterable of arrays (any dtype, C order) whose bytes, concatenated, are
    exactly the tensor's nbytes; it is called only when that tensor is written.
    split_max_size / split_max_tensors split the output like gguf-py (and llama.cpp's
    gguf-split): shards "<stem>-00001-of-0000N.gguf", all metadata in the first shard, split.no
    (u16), split.count (u16) and split.tensors.count (i32) in every shard.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        force: bool = False,
        split_max_size: int | None = None,
        split_max_tensors: int | None = None,
        alignment: int | None = None,
    ):
        self.path = Path(path)
        self.force = force
        self.split_max_size = split_max_size or 0
        self.split_max_tensors = split_max_tensors or 0
        if alignment is not None and (alignment <= 0 or alignment & (alignment - 1)):
            raise GGQuantError(f"{self.path}: alignment must be a positive power of two, got {alignment}")
        self._alignment_arg = alignment
        self.alignment = alignment or GGUF_DEFAULT_ALIGNMENT
        self._fields: dict[str, tuple[GGUFValueType, bytes]] = {}
        self._tensors: dict[str, _PendingTensor] = {}
        self._written = False
        self.paths: list[Path] = []  # the files written, set by write()
        if not self.path.parent.is_dir():
            raise GGQuantError(f"{self.path}: output folder {self.path.parent} does not exist; create it first")
        if not force:
            existing = [self.path] if self.path.exists() else []
            if self.split_max_size or self.split_max_tensors:
                existing += sorted(self.path.parent.glob(f"{_glob_escape(self.path.stem)}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].gguf"))
            check_overwrite(existing[:1], False)

    # --- metadata -------------------------------------------------------------------------
    def add_field(
        self, name: str, value: Any, type: GGUFValueType, item_type: GGUFValueType | None = None, *,
        replace: bool = False,
    ) -> None:
        """Add one key/value with its exact GGUF type (written in the order added).

        Empty strings and empty arrays are written (gguf-py silently drops them). A reader Field
        can be passed straight through: add_field(f.name, f.value, f.type, f.item_type).
        replace=True overwrites an existing key in place; otherwise a duplicate is an error.
        """
        what = f"{self.path}: key '{name}'"
        if not isinstance(name, str) or not name:
            raise GGQuantError(f"{self.path}: keys must be non-empty strings, got {name!r}")
        if name in _SPLIT_KEYS:
            raise GGQuantError(
                f"{what}: the writer sets split keys itself from split_max_size; do not add them "
                f"(copy_field skips them)"
            )
        vtype = _value_type(type)
        if vtype is None:
            raise GGQuantError(f"{what}: unknown GGUF value type {type!r}")
        itype = None if item_type is None else _value_type(item_type)
        if item_type is not None and itype is None:
            raise GGQuantError(f"{what}: unknown GGUF item type {item_type!r}")
        if name in self._fields and not replace:
            raise GGQuantError(f"{what}: added twice; pass replace=True to overwrite it")
        if name == _ALIGNMENT_KEY:
            self._set_alignment_from_field(value, vtype, what)
        self._fields[name] = (vtype, _encode_value(value, vtype, itype, what))

    def _set_alignment_from_field(self, value: Any, vtype: GGUFValueType, what: str) -> None:
        if vtype != GGUFValueType.UINT32:
            raise GGQuantError(f"{what}: must have type UINT32 (ggml refuses other types), got {vtype.name}")
        if not isinstance(value, (int, np.integer)) or value <= 0 or value & (value - 1):
            raise GGQuantError(f"{what}: must be a positive power of two, got {value!r}")
        if self._alignment_arg is not None and int(value) != self._alignment_arg:
            raise GGQuantError(f"{what}: is {value} but the writer was created with alignment={self._alignment_arg}")
        self.alignment = int(value)

    # --- tensors --------------------------------------------------------------------------
    def add_tensor(
        self, name: str, shape: Sequence[int], qtype: GGMLQuantizationType,
        produce: Callable[[], Iterable[Any]],
    ) -> None:
        """Declare a tensor (shape in numpy order); its bytes come from produce() at write time."""
        what = f"{self.path}: tensor '{name}'"
        if self._written:
            raise GGQuantError(f"{what}: the file was already written")
        if not isinstance(name, str):
            raise GGQuantError(f"{self.path}: tensor names must be strings, got {name!r}")
        if len(name.encode("utf-8")) >= GGML_MAX_NAME:
            raise GGQuantError(f"{what}: name is {len(name.encode())} bytes; ggml allows at most {GGML_MAX_NAME - 1}")
        if name in self._tensors:
            raise GGQuantError(f"{what}: added twice; tensor names must be unique")
        qt = _ggml_type(qtype)
        if qt is None:
            raise GGQuantError(f"{what}: unknown GGML type {qtype!r}")
        shape_t = tuple(int(d) for d in shape)
        if len(shape_t) > GGML_MAX_DIMS or any(d < 0 for d in shape_t):
            raise GGQuantError(f"{what}: shape {shape_t} must have at most {GGML_MAX_DIMS} non-negative dimensions")
        if math.prod(shape_t) > INT64_MAX:
            raise GGQuantError(f"{what}: shape {shape_t} has more than 2^63-1 elements")
        block_size = BLOCK_SIZES[qt][0]
        ne0 = shape_t[-1] if shape_t else 1
        if ne0 % block_size:
            raise GGQuantError(
                f"{what}: row length {ne0} is not a multiple of the {qt.name} block size {block_size}; "
                f"choose another type for this tensor"
            )
        if not callable(produce):
            raise GGQuantError(f"{what}: produce must be a callable returning an iterable of arrays")
        self._tensors[name] = _PendingTensor(name, shape_t, qt, tensor_nbytes(shape_t, qt), produce)

    @property
    def total_bytes(self) -> int:
        """Tensor payload bytes to be written (unpadded), e.g. for a progress bar's total."""
        return sum(t.nbytes for t in self._tensors.values())

    # --- layout ---------------------------------------------------------------------------
    def _shards(self) -> list[list[_PendingTensor]]:
        """gguf-py add_tensor_info: start a new shard when the current one is non-empty and the
        next tensor would exceed split_max_tensors or (unpadded bytes) split_max_size."""
        shards: list[list[_PendingTensor]] = [[]]
        size = 0
        for t in self._tensors.values():
            cur = shards[-1]
            if cur and (
                (self.split_max_tensors and len(cur) >= self.split_max_tensors)
                or (self.split_max_size and size + t.nbytes > self.split_max_size)
            ):
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += t.nbytes
        return shards

    def _shard_paths(self, n: int) -> list[Path]:
        if n == 1:
            return [self.path]
        return [self.path.with_name(SHARD_NAME_FORMAT.format(self.path.stem, i + 1, n)) for i in range(n)]

    def _kv_for_shard(self, index: int, n_shards: int, n_total: int) -> list[tuple[str, bytes]]:
        kv: list[tuple[str, bytes]] = []
        if index == 0:
            kv = [(k, enc) for k, (_, enc) in self._fields.items()]
            if self.alignment != GGUF_DEFAULT_ALIGNMENT and _ALIGNMENT_KEY not in self._fields:
                kv.append((_ALIGNMENT_KEY, _I32.pack(GGUFValueType.UINT32) + _U32.pack(self.alignment)))
        elif self.alignment != GGUF_DEFAULT_ALIGNMENT:
            # Each shard is parsed on its own by ggml, which pads to general.alignment (default 32):
            # a shard without the key would be read with the wrong data offset.
            kv.append((_ALIGNMENT_KEY, _I32.pack(GGUFValueType.UINT32) + _U32.pack(self.alignment)))
        if n_shards > 1:
            kv.append((_SPLIT_NO, _I32.pack(GGUFValueType.UINT16) + _STRUCT_OF[GGUFValueType.UINT16].pack(index)))
            kv.append((_SPLIT_COUNT, _I32.pack(GGUFValueType.UINT16) + _STRUCT_OF[GGUFValueType.UINT16].pack(n_shards)))
            kv.append((_SPLIT_TENSORS_COUNT, _I32.pack(GGUFValueType.INT32) + _STRUCT_OF[GGUFValueType.INT32].pack(n_total)))
        return kv

    def _header(self, index: int, n_shards: int, tensors: list[_PendingTensor]) -> tuple[bytes, list[int]]:
        """Header bytes of one shard, padded to the alignment, and each tensor's relative offset."""
        kv = self._kv_for_shard(index, n_shards, len(self._tensors))
        parts = [_U32.pack(GGUF_MAGIC), _U32.pack(GGUF_VERSION), _U64.pack(len(tensors)), _U64.pack(len(kv))]
        for key, enc in kv:
            parts.append(_encode_string(key, key))
            parts.append(enc)
        offsets = []
        rel = 0
        for t in tensors:
            parts.append(_encode_string(t.name, t.name))
            parts.append(_U32.pack(len(t.shape)))
            parts.extend(_U64.pack(d) for d in reversed(t.shape))  # ne: innermost first
            parts.append(_U32.pack(t.qtype))
            parts.append(_U64.pack(rel))
            offsets.append(rel)
            rel += _pad(t.nbytes, self.alignment)
        header = b"".join(parts)
        # gguf-py write_tensors_to_file pads the header even when there are no tensors
        header += bytes(_pad(len(header), self.alignment) - len(header))
        return header, offsets

    def fields(self) -> dict[str, Field]:
        """The metadata added so far as a reader parses it back from the file this writer would
        write (encoded and parsed in memory; nothing is written): same value types, same float32
        rounding as GGUFReader.fields of that file."""
        header, _ = self._header(0, 1, [])
        return _parse_buf(self.path, _Map(self.path, header), len(header)).fields

    def plan(self) -> list[PlannedTensor]:
        """Every tensor's shard, absolute offset and size, computed without producing any data."""
        shards = self._shards()
        paths = self._shard_paths(len(shards))
        out = []
        for i, (p, tensors) in enumerate(zip(paths, shards)):
            header, offsets = self._header(i, len(shards), tensors)
            for t, rel in zip(tensors, offsets):
                out.append(PlannedTensor(p, i, t.name, t.shape, t.qtype, t.nbytes, len(header) + rel))
        return out

    def output_paths(self) -> list[Path]:
        return self._shard_paths(len(self._shards()))

    # --- writing --------------------------------------------------------------------------
    def write(self, progress: Callable[[str, int], None] | None = None) -> list[Path]:
        """Write all shards; returns their paths. progress(tensor_name, nbytes) is called per chunk.

        On any exception every temporary file is removed and no output file exists.
        """
        if self._written:
            raise GGQuantError(f"{self.path}: write() was already called")
        self._written = True
        shards = self._shards()
        finals = self._shard_paths(len(shards))
        check_overwrite(finals, self.force)
        temps = [p.with_name(f".{p.name}.tmp-{os.getpid()}") for p in finals]
        renamed: list[Path] = []
        try:
            for i, (tmp, tensors) in enumerate(zip(temps, shards)):
                header, _ = self._header(i, len(shards), tensors)
                with open(tmp, "wb") as f:
                    f.write(header)
                    for t in tensors:
                        self._write_payload(f, t, progress)
            for tmp, final in zip(temps, finals):
                if not self.force and final.exists():
                    raise GGQuantError(f"{final} appeared while writing; pass --force to overwrite it")
                os.replace(tmp, final)
                renamed.append(final)
        except BaseException:
            for p in temps + renamed:
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
            raise
        self.paths = finals
        return finals

    def _write_payload(self, f: Any, t: _PendingTensor, progress: Callable[[str, int], None] | None) -> None:
        what = f"{self.path}: tensor '{t.name}'"
        written = 0
        for chunk in t.produce():
            if isinstance(chunk, (bytes, bytearray, memoryview)):
                data: Any = memoryview(chunk).cast("B")
            else:
                arr = np.asarray(chunk)
                if arr.dtype.byteorder == ">":  # GGUF here is little endian: same values, LE bytes
                    arr = arr.astype(arr.dtype.newbyteorder("<"))
                if arr.dtype.hasobject:
                    raise GGQuantError(f"{what}: produce() yielded an object array; expected numeric data")
                data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
            n = len(data)
            if written + n > t.nbytes:
                raise GGQuantError(
                    f"{what}: produce() yielded more than the {t.nbytes} bytes of shape {t.shape} in "
                    f"{t.qtype.name} (at least {written + n})"
                )
            f.write(data)
            written += n
            del data, chunk
            if progress is not None:
                progress(t.name, n)
        if written != t.nbytes:
            raise GGQuantError(
                f"{what}: produce() yielded {written} bytes, expected {t.nbytes} for shape {t.shape} in {t.qtype.name}"
            )
        f.write(bytes(_pad(t.nbytes, self.alignment) - t.nbytes))


def _glob_escape(s: str) -> str:
    """Escape glob metacharacters in a literal file-name part."""
    return re.sub(r"([*?\[])", r"[\1]", s)


def copy_field(writer: GGUFWriter, f: Field) -> bool:
    """Copy a reader Field to a writer with its exact type. Split keys are skipped (the writer
    sets them from its own split settings); returns whether the field was copied."""
    if f.name in _SPLIT_KEYS:
        return False
    writer.add_field(f.name, f.value, f.type, f.item_type)
    return True
