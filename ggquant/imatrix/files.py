"""Importance-matrix files: llama.cpp's GGUF imatrix and the legacy .dat, read and normalised.

Facts from common/imatrix-loader.cpp and tools/quantize/quantize.cpp (llama.cpp in
llama-cpp-python 0.3.36), summarised in shared/research/imatrix-and-quants.md §1.2-§1.4:

- GGUF: tensors `<name>.in_sum2` (F32, [n_mat, n_in]) and `<name>.counts` (F32, [n_mat]);
  keys imatrix.datasets (string array), imatrix.chunk_count and imatrix.chunk_size (uint32).
  llama-quantize normalises per expert: e = in_sum2 / (float)lround(count), or 1.0 where
  the count is 0, all in float32.
- .dat: int32 n_entries; per entry int32 len, name, int32 ncall, int32 nval, float32[nval]
  holding (sum/count)*ncall; optional trailer int32 chunk count, int32 len, dataset.
  Normalised as values / ncall (float32), or the values as they are if ncall <= 0.
"""

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from ggquant.errors import FormatError, GGQuantError
from ggquant.files import check_overwrite

KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUFFIX_SUMS = ".in_sum2"
SUFFIX_COUNTS = ".counts"


@dataclass
class Entry:
    sums: np.ndarray  # float32 [n_mat, n_in]: raw sums of squared activations (legacy: (sum/count)*ncall)
    counts: np.ndarray  # int64 [n_mat]: tokens seen per matrix (legacy: one ncall)


@dataclass
class Imatrix:
    entries: dict[str, Entry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False
    path: Path | None = None

    def normalised(self) -> dict[str, np.ndarray]:
        """The float32 vectors llama-quantize hands to llama_model_quantize (one per tensor)."""
        out = {}
        for name, e in self.entries.items():
            if self.legacy:
                ncall = int(e.counts[0]) if e.counts.size else 0
                v = e.sums.reshape(-1) / np.float32(ncall) if ncall > 0 else e.sums.reshape(-1).copy()
            else:
                cnt = e.counts.astype(np.float32)[:, None]
                with np.errstate(divide="ignore", invalid="ignore"):
                    v = np.where(cnt > 0, e.sums / np.where(cnt > 0, cnt, np.float32(1)), np.float32(1))
                v = v.reshape(-1)
            out[name] = np.ascontiguousarray(v, dtype=np.float32)
        return out


def load(path) -> Imatrix:
    """Read a GGUF or legacy .dat imatrix (format detected like llama.cpp: GGUF first)."""
    path = Path(path)
    if not path.is_file():
        raise GGQuantError(f"{path}: imatrix file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    return _load_gguf(path) if magic == b"GGUF" else _load_dat(path)


def _load_gguf(path: Path) -> Imatrix:
    from ggquant.formats.gguf import GGUFReader

    with GGUFReader(path) as r:
        missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if k not in r.fields]
        if missing:
            raise FormatError(
                f"{path}: not an imatrix GGUF llama-quantize accepts: missing key(s) {', '.join(missing)}"
            )
        datasets = [str(d) for d in (r.get(KEY_DATASETS) or [])]
        pairs: dict[str, dict] = {}
        for t in r.tensors:
            for suffix, slot in ((SUFFIX_SUMS, "sums"), (SUFFIX_COUNTS, "counts")):
                if t.name.endswith(suffix):
                    if t.qtype != GGMLQuantizationType.F32:
                        raise FormatError(f"{path}: tensor {t.name} must be F32, found {t.qtype.name}")
                    pairs.setdefault(t.name[: -len(suffix)], {})[slot] = t
        entries = {}
        for name, p in sorted(pairs.items()):
            if set(p) != {"sums", "counts"}:
                raise FormatError(f"{path}: imatrix entry {name} has {SUFFIX_SUMS} or {SUFFIX_COUNTS} but not both")
            c = np.asarray(p["counts"].raw()).view(np.float32).reshape(-1).astype(np.float64)
            counts = (np.sign(c) * np.floor(np.abs(c) + 0.5)).astype(np.int64)  # C lround
            sums = np.array(p["sums"].raw()).view(np.float32).reshape(counts.size, -1)
            entries[name] = Entry(sums, counts)
        if not entries:
            raise FormatError(f"{path}: imatrix GGUF holds no .in_sum2/.counts entries")
        return Imatrix(entries, datasets, int(r.get(KEY_CHUNK_COUNT)), int(r.get(KEY_CHUNK_SIZE)), False, path)


def _load_dat(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(n, what):
        nonlocal pos
        if n < 0 or pos + n > len(data):
            raise FormatError(
                f"{path}: truncated or not an imatrix file: {what} at offset {pos} needs {n} bytes, "
                f"{len(data) - pos} left (expected a GGUF imatrix or llama.cpp's legacy .dat)"
            )
        b = data[pos : pos + n]
        pos += n
        return b

    def i32(what):
        return struct.unpack("<i", take(4, what))[0]

    n_entries = i32("entry count")
    if n_entries < 1:
        raise FormatError(f"{path}: legacy imatrix declares {n_entries} entries (expected at least 1)")
    entries = {}
    for i in range(n_entries):
        name = take(i32(f"name length of entry {i}"), f"name of entry {i}").decode("utf-8", "replace")
        ncall = i32(f"ncall of {name}")
        nval = i32(f"value count of {name}")
        if nval < 1:
            raise FormatError(f"{path}: entry {name} has {nval} values (expected at least 1)")
        vals = np.frombuffer(take(4 * nval, f"values of {name}"), dtype="<f4").astype(np.float32)
        entries[name] = Entry(vals.reshape(1, -1), np.array([ncall], dtype=np.int64))
    chunk_count, datasets = 0, []
    if pos < len(data):  # the trailer is optional
        chunk_count = i32("chunk count")
        if pos + 4 <= len(data):
            n = i32("dataset name length")
            if n > 0 and pos + n <= len(data):
                datasets.append(take(n, "dataset name").decode("utf-8", "replace"))
    return Imatrix(entries, datasets, chunk_count, 0, True, path)


def check_against(imatrix_values: dict[str, np.ndarray], tensors, source: str) -> None:
    """Refuse an imatrix that does not belong to the model (llama_model_quantize's size check).

    `tensors`: iterable of (name, numpy shape). An entry's size must be n_per_row * n_expert.
    """
    shapes = {n: tuple(s) for n, s in tensors}
    for name, v in imatrix_values.items():
        if name not in shapes:
            continue  # llama.cpp ignores entries without a tensor (e.g. after pruning)
        shape = shapes[name]
        want = shape[-1] * (shape[0] if len(shape) == 3 else 1)
        if v.size != want and name not in ("token_embd.weight", "per_layer_token_embd.weight"):
            raise GGQuantError(
                f"{source}: imatrix entry {name} has {v.size} values but the tensor {name} of shape "
                f"{list(shape)} needs {want}; the imatrix was computed for a different model"
            )
        if not np.all(np.isfinite(v)):
            raise GGQuantError(f"{source}: imatrix entry {name} contains non-finite values")


def save_gguf(im: Imatrix, path, *, force=False) -> Path:
    """Write `im` exactly as llama-imatrix's save_imatrix lays it out (research note §1.2).

    No general.architecture key; keys general.type, imatrix.datasets, imatrix.chunk_count and
    imatrix.chunk_size (UINT32, which llama-quantize asserts); then per entry, in byte-wise
    sorted name order, `<name>.in_sum2` [n_mat, n_in] and `<name>.counts` [n_mat], F32, with
    trailing unit dims dropped as ggml_n_dims does (dense entries are 1-D).
    """
    from gguf import GGUFValueType as V

    from ggquant.formats.gguf import GGUFWriter

    w = GGUFWriter(path, force=force)
    w.add_field("general.type", "imatrix", V.STRING)
    w.add_field(KEY_DATASETS, list(im.datasets), V.ARRAY, V.STRING)
    w.add_field(KEY_CHUNK_COUNT, int(im.chunk_count), V.UINT32)
    w.add_field(KEY_CHUNK_SIZE, int(im.chunk_size), V.UINT32)
    for name in sorted(im.entries, key=str.encode):
        e = im.entries[name]
        sums = np.ascontiguousarray(e.sums, dtype=np.float32)
        counts = np.ascontiguousarray(e.counts, dtype=np.float32).reshape(-1)
        n_mat = counts.size
        sums_shape = (sums.shape[-1],) if n_mat == 1 else (n_mat, sums.shape[-1])
        counts_shape = (1,) if n_mat == 1 else (n_mat, 1)
        w.add_tensor(name + SUFFIX_SUMS, sums_shape, GGMLQuantizationType.F32, lambda s=sums: [s])
        w.add_tensor(name + SUFFIX_COUNTS, counts_shape, GGMLQuantizationType.F32, lambda c=counts: [c])
    return w.write()[0]


def save_dat(im: Imatrix, path, *, force=False) -> Path:
    """Write the legacy .dat as save_imatrix_legacy does (research note §1.3).

    Entries whose counts are all zero are skipped; values are (sum/count)*ncall per matrix with
    ncall = ceil(max(count)/chunk_size); an expert with count 0 stores (1/1)*ncall.
    """
    path = Path(path)
    check_overwrite([path], force)
    chunk = im.chunk_size or 1
    parts = []
    names = [n for n in sorted(im.entries, key=str.encode) if np.any(im.entries[n].counts > 0)]
    parts.append(struct.pack("<i", len(names)))
    for name in names:
        e = im.entries[name]
        if im.legacy:
            ncall, vals = int(e.counts[0]), e.sums.reshape(-1).astype(np.float32)
        else:
            ncall = -(-int(e.counts.max()) // chunk)
            cnt = e.counts.astype(np.float32)[:, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                per = np.where(cnt > 0, e.sums / np.where(cnt > 0, cnt, np.float32(1)), np.float32(1))
            vals = (per * np.float32(ncall)).astype(np.float32).reshape(-1)
        b = name.encode()
        parts += [struct.pack("<i", len(b)), b, struct.pack("<ii", ncall, vals.size), vals.astype("<f4").tobytes()]
    dataset = (im.datasets[-1] if im.datasets else "").encode()
    parts += [struct.pack("<i", int(im.chunk_count)), struct.pack("<i", len(dataset)), dataset]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(b"".join(parts))
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def merge(imatrices: list[Imatrix]) -> Imatrix:
    """Sum several collections (llama-imatrix --in-file): sums and counts add, datasets append.

    A legacy file is re-imported as sums*chunk_size with count ncall*chunk_size, as llama-imatrix
    does, so it can be merged with GGUF data of the same chunk size.
    """
    if not imatrices:
        raise GGQuantError("nothing to merge")
    chunk_size = next((m.chunk_size for m in imatrices if m.chunk_size), 0)
    entries: dict[str, Entry] = {}
    datasets: list[str] = []
    for m in imatrices:
        datasets += m.datasets
        for name, e in m.entries.items():
            sums, counts = e.sums.astype(np.float32), e.counts.astype(np.int64)
            if m.legacy:
                cs = chunk_size or 1
                sums, counts = sums * np.float32(cs), counts * cs
            if name in entries:
                old = entries[name]
                if old.sums.shape != sums.shape:
                    raise GGQuantError(
                        f"imatrix entry {name}: shape {list(sums.shape)} in {m.path} does not match "
                        f"{list(old.sums.shape)} from an earlier file; they come from different models"
                    )
                entries[name] = Entry(old.sums + sums, old.counts + counts)
            else:
                entries[name] = Entry(sums, counts)
    chunk_count = max(int(e.counts.max()) for e in entries.values()) // chunk_size if chunk_size else 0
    return Imatrix(entries, datasets, chunk_count, chunk_size, False)
