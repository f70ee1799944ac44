"""safetensors: a validating, streaming reader for Hugging Face checkpoints.

File layout (https://github.com/huggingface/safetensors, "Format"), little endian:

    u64 N | N bytes of UTF-8 JSON header | data section
    header = {"__metadata__": {str: str}?, name: {"dtype": str, "shape": [int...],
                                                "data_offsets": [begin, end]}, ...}
    offsets are relative to the start of the data section; each tensor is C-contiguous.

A checkpoint folder is either one `model.safetensors` or shards listed by
`model.safetensors.index.json` ({"weight_map": {tensor name: shard file}}).

Everything is checked before a payload byte is trusted: header length against the file size,
JSON syntax, dtype, shape, that `end - begin` equals dtype size x elements, that tensors do not
overlap and that every tensor lies inside the file (a truncated shard fails here, naming the
file and the first tensor it cuts). Payloads are never read at open time: each tensor is a
ggquant.tensor.Tensor (Dense encoding) whose `rows()` is a view of a read-only mmap for an
outer-row range, and whose `release()` hands the pages of a finished range back to the kernel,
so reading a model keeps resident memory at one chunk.

Pickle checkpoints (`pytorch_model.bin`, `*.pt`, `*.pth`, `*.ckpt`) are refused: loading them
executes code from the file.

The tensor order of `Checkpoint.tensors` is what llama.cpp's converter uses
(conversion/base.py ModelBase.index_tensors + gguf-py SafetensorsLocal): shard files in sorted
order, and inside each shard the tensor names sorted.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np

from ggquant.errors import FormatError, GGQuantError
from ggquant.tensor import Dense, MappedRegion, Tensor

__all__ = ["DTYPES", "SafetensorsFile", "Checkpoint", "open_checkpoint", "PICKLE_SUFFIXES"]

# A header larger than this is not a real checkpoint header (the 262k-vocab Gemma 4 header is
# ~100 kB); refusing it early stops a crafted length from allocating gigabytes.
MAX_HEADER_BYTES = 100 * 1024 * 1024
INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_PAGE = mmap.PAGESIZE

# safetensors dtype string -> numpy storage dtype (bf16 and fp8 have no numpy dtype: their raw
# bits are stored as unsigned integers of the same width and decoded by ggquant.tensor.to_float32).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("u1"),
    "F8_E4M3": np.dtype("u1"),
    "F8_E5M2": np.dtype("u1"),
    "F8_E8M0": np.dtype("u1"),
}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


class SafetensorsFile:
    """The header of one .safetensors file, validated; the payload is mapped on first use."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._mm: mmap.mmap | None = None
        self._fd: Any = None
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise FormatError(f"{self.path}: file is {size} bytes; a safetensors file starts with an "
                                      f"8-byte header length (truncated or not a safetensors file)")
                n = int.from_bytes(head, "little")
                if n > MAX_HEADER_BYTES or n < 2:
                    raise FormatError(f"{self.path}: header length {n} is implausible (expected 2..{MAX_HEADER_BYTES}); "
                                      f"not a safetensors file, or it is corrupted")
                if 8 + n > size:
                    raise FormatError(f"{self.path}: header claims {n} bytes but the file has only {size - 8} after "
                                      f"the length field; the file is truncated")
                raw = f.read(n)
        except OSError as e:
            raise FormatError(f"{self.path}: cannot read: {e.strerror or e}") from None
        self.data_start = 8 + n
        self.file_size = size
        try:
            header = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise FormatError(f"{self.path}: header is not UTF-8 (byte {e.start}); the file is corrupted") from None
        except json.JSONDecodeError as e:
            raise FormatError(f"{self.path}: header is not valid JSON ({e.msg} at char {e.pos}); "
                              f"the file is corrupted or truncated") from None
        if not isinstance(header, dict):
            raise FormatError(f"{self.path}: header must be a JSON object, got {type(header).__name__}")
        meta = header.pop("__metadata__", None)
        if meta is not None and not isinstance(meta, dict):
            raise FormatError(f"{self.path}: __metadata__ must be an object of strings")
        self.metadata: dict[str, str] = dict(meta or {})
        self.tensors: dict[str, Tensor] = {}
        for name, info in header.items():
            self.tensors[name] = self._parse_entry(name, info)
        self._check_layout()

    def _parse_entry(self, name: str, info: Any) -> Tensor:
        what = f"{self.path}: tensor '{name}'"
        if not isinstance(info, dict):
            raise FormatError(f"{what}: header entry must be an object with dtype, shape, data_offsets")
        dtype = info.get("dtype")
        if dtype not in DTYPES:
            raise FormatError(f"{what}: unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise FormatError(f"{what}: shape must be a list of non-negative integers, got {shape!r}")
        offs = info.get("data_offsets")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise FormatError(f"{what}: data_offsets must be [begin, end], got {offs!r}")
        begin, end = offs
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if begin < 0 or end < begin:
            raise FormatError(f"{what}: data_offsets {offs} are not a valid byte range")
        if end - begin != nbytes:
            raise FormatError(f"{what}: {dtype} {shape} needs {nbytes} bytes but data_offsets {offs} span "
                              f"{end - begin}; the header is inconsistent")
        return Tensor(name, tuple(shape), Dense(dtype), MappedRegion(self, self.data_start + begin, DTYPES[dtype],
                                                                      self.path), nbytes)

    def _check_layout(self) -> None:
        spans = sorted((t.source.offset, t.source.offset + t.nbytes, t.name) for t in self.tensors.values() if t.nbytes)
        prev_end, prev_name = self.data_start, None
        for begin, end, name in spans:
            if begin < prev_end:
                raise FormatError(f"{self.path}: tensor '{name}' overlaps tensor '{prev_name}' in the data section; "
                                  f"the header is corrupted")
            prev_end, prev_name = end, name
        for begin, end, name in spans:
            if end > self.file_size:
                have = max(0, self.file_size - begin)
                raise FormatError(
                    f"{self.path}: tensor '{name}' needs bytes {begin - self.data_start}..{end - self.data_start} of "
                    f"the data section but the file ends after {self.file_size - self.data_start} "
                    f"({have} of its {end - begin} bytes present); the file is truncated - download it again"
                )

    # --- payload access ---------------------------------------------------------------------
    def buffer(self) -> mmap.mmap:
        if self._mm is None:
            if self.file_size == 0:
                raise FormatError(f"{self.path}: empty file")
            try:
                self._fd = open(self.path, "rb")
                self._mm = mmap.mmap(self._fd.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise FormatError(f"{self.path}: cannot map the file: {e}") from None
            if len(self._mm) < self.file_size:
                raise FormatError(f"{self.path}: the file shrank while being read (now {len(self._mm)} bytes)")
        return self._mm

    def release(self, offset: int, nbytes: int) -> None:
        if self._mm is None or nbytes <= 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = offset // _PAGE * _PAGE
        stop = min(len(self._mm), offset + nbytes)
        # Pages shared with the next tensor are dropped too; they are simply read again.
        if stop > start:
            self._mm.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view is still alive; the map closes when it is collected
                pass
            self._mm = None
        if self._fd is not None:
            self._fd.close()
            self._fd = None


class Checkpoint:
    """All safetensors shards of a Hugging Face model folder, as one name -> tensor mapping."""

    def __init__(self, model_dir: Path, files: list[SafetensorsFile], index: dict[str, str] | None):
        self.dir = model_dir
        self.files = files
        self.index = index
        self.tensors: dict[str, Tensor] = {}
        for f in files:
            for name in sorted(f.tensors):
                if name in self.tensors:
                    raise FormatError(f"{f.path}: tensor '{name}' also appears in {self.tensors[name].file.name}; "
                                      f"each tensor must be stored once")
                self.tensors[name] = f.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _refuse_pickles(model_dir: Path) -> None:
    pickles = sorted(p.name for p in model_dir.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES
                     and not p.name.startswith("training_args"))
    if pickles:
        raise GGQuantError(
            f"{model_dir}: has no safetensors weights, only pickle checkpoints ({', '.join(pickles[:4])}); "
            f"ggquant does not load pickles because loading them runs code from the file. Convert them to "
            f"safetensors first (e.g. transformers: model.save_pretrained(dir, safe_serialization=True))"
        )


def open_checkpoint(model_dir: str | os.PathLike[str]) -> Checkpoint:
    """Open every safetensors shard of `model_dir` (sharded with an index, or single-file)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise GGQuantError(f"{d}: not a folder; pass a Hugging Face model folder (config.json + *.safetensors)")
    index_path = d / INDEX_NAME
    index: dict[str, str] | None = None
    if index_path.is_file():
        try:
            doc = json.loads(index_path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise FormatError(f"{index_path}: not UTF-8 (byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise FormatError(f"{index_path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        wm = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
            raise FormatError(f"{index_path}: 'weight_map' must be an object mapping tensor names to shard files")
        index = wm
        names = sorted(set(wm.values()))
        for n in names:
            if Path(n).name != n or not n.endswith(".safetensors"):
                raise FormatError(f"{index_path}: weight_map points to {n!r}; shards must be *.safetensors files "
                                  f"in the same folder")
        missing = [n for n in names if not (d / n).is_file()]
        if missing:
            lost = sorted(k for k, v in wm.items() if v in missing)
            raise FormatError(f"{index_path}: shard file(s) {', '.join(missing)} are missing (they hold "
                              f"{len(lost)} tensors, e.g. '{lost[0]}'); download them again")
    else:
        # llama.cpp (ModelBase.get_model_part_names): files named model*.safetensors, sorted
        names = sorted(p.name for p in d.iterdir() if p.is_file() and p.name.startswith("model")
                       and p.name.endswith(".safetensors"))
        if not names:
            others = sorted(p.name for p in d.glob("*.safetensors"))
            if others:
                names = others
            else:
                _refuse_pickles(d)
                raise GGQuantError(f"{d}: no *.safetensors weights found (and no {INDEX_NAME})")
    files = [SafetensorsFile(d / n) for n in names]
    ckpt = Checkpoint(d, files, index)
    if index is not None:
        have = set(ckpt.tensors)
        listed = set(index)
        missing = sorted(listed - have)
        extra = sorted(have - listed)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise FormatError(f"{index_path}: tensor '{missing[0]}'{more} is listed in the index, in "
                              f"{index[missing[0]]}, but that shard does not contain it; the shards are incomplete "
                              f"or from another version of the model")
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise FormatError(f"{ckpt.tensors[extra[0]].file}: tensor '{extra[0]}'{more} is not listed in "
                              f"{INDEX_NAME}; the index and the shards disagree")
        for name, shard in index.items():
            if ckpt.tensors[name].file.name != shard:
                raise FormatError(f"{index_path}: tensor '{name}' is listed in {shard} but stored in "
                                  f"{ckpt.tensors[name].file.name}")
    return ckpt
