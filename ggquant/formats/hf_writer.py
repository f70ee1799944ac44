"""A streaming safetensors writer: one file or shards + model.safetensors.index.json.

Layout (https://github.com/huggingface/safetensors, "Format"): u64 header length N, N bytes of
JSON header padded with spaces to a multiple of 8, then the tensors back to back, C order,
little endian. safetensors requires the data section to be covered exactly, without gaps or
overlaps, in header-offset order; every tensor here has the same dtype, so each one starts
aligned to its element size.

The whole plan (names, shapes, shard of each tensor, offsets) is fixed before a byte is
written; then each tensor's bytes arrive chunk by chunk from a producer and are written and
dropped, so memory stays at one chunk whatever the tensor's size. Shards are named like
transformers' save_pretrained (model-00001-of-00003.safetensors), a single file
model.safetensors. The writer writes into a folder it is given; atomicity (a temporary folder
renamed at the end) is the caller's business.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ggquant.errors import GGQuantError

DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8, "I16": 2}  # ints: compressed-tensors, GLQ
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
HEADER_ALIGN = 8


@dataclass
class PlannedTensor:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    shard: int = 0
    begin: int = 0  # offset in the shard's data section

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


class SafetensorsWriter:
    """Plan shards for `tensors` (in the given order) and stream their bytes into `folder`."""

    def __init__(self, folder: Path, tensors: Iterable[tuple[str, str, tuple[int, ...]]],
                 max_shard_bytes: int, metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.tensors = [PlannedTensor(n, d, tuple(int(x) for x in s)) for n, d, s in tensors]
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise GGQuantError(f"tensor '{dup}' would be written twice")
        for t in self.tensors:
            if t.dtype not in DTYPE_BYTES:
                raise GGQuantError(f"tensor '{t.name}': dtype {t.dtype} is not written by ggquant")
        # greedy shards, like transformers' shard_checkpoint: a new shard when the next tensor
        # would overflow a non-empty one
        shard, size = 0, 0
        for t in self.tensors:
            if size and size + t.nbytes > max_shard_bytes:
                shard, size = shard + 1, 0
            t.shard, t.begin = shard, size
            size += t.nbytes
        self.n_shards = shard + 1 if self.tensors else 1

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def shard_name(self, i: int) -> str:
        if self.n_shards == 1:
            return SINGLE_NAME
        return f"model-{i + 1:05d}-of-{self.n_shards:05d}.safetensors"

    def file_names(self) -> list[str]:
        names = [self.shard_name(i) for i in range(self.n_shards)]
        return names + ([INDEX_NAME] if self.n_shards > 1 else [])

    def _header(self, shard: int) -> bytes:
        head: dict = {"__metadata__": self.metadata}
        for t in self.tensors:
            if t.shard == shard:
                head[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.begin, t.begin + t.nbytes]}
        raw = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % HEADER_ALIGN)
        return struct.pack("<Q", len(raw)) + raw

    def write(self, produce: Callable[[PlannedTensor], Iterable[np.ndarray]],
              progress: Callable[[str, int], None] | None = None) -> list[Path]:
        """produce(t) yields t's bytes (arrays whose raw bytes are written in order)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        written = []
        for shard in range(self.n_shards):
            path = self.folder / self.shard_name(shard)
            with open(path, "wb") as f:
                f.write(self._header(shard))
                for t in self.tensors:
                    if t.shard != shard:
                        continue
                    n = 0
                    for chunk in produce(t):
                        b = memoryview(np.ascontiguousarray(chunk)).cast("B")
                        f.write(b)
                        n += len(b)
                        if progress is not None:
                            progress(t.name, len(b))
                    if n != t.nbytes:
                        raise GGQuantError(f"tensor '{t.name}': produced {n} bytes, expected {t.nbytes} "
                                           f"({t.dtype} {list(t.shape)})")
            written.append(path)
        if self.n_shards > 1:
            by_name = sorted(self.tensors, key=lambda t: t.name)
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {t.name: self.shard_name(t.shard) for t in by_name}}
            path = self.folder / INDEX_NAME
            path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
            written.append(path)
        return written


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even; NaN -> 0x7FC0, as torch's
    c10::BFloat16 conversion (round_to_nearest_even) does."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    out = ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype(np.uint16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():
        out[nan] = np.uint16(0x7FC0)
    return out


def encode_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> the storage array of safetensors dtype `dtype`."""
    if dtype == "F32":
        return np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "F16":
        with np.errstate(over="ignore"):  # beyond 65504 is inf, as in torch
            return np.ascontiguousarray(x, dtype=np.float32).astype(np.float16)
    if dtype == "BF16":
        return f32_to_bf16(x)
    raise GGQuantError(f"dtype {dtype} is not written by ggquant")
