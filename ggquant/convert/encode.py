"""Encode: a planned tensor's source rows -> the bytes of its GGML type, one bounded chunk at a time.

Shared by every job that writes GGML blocks (HF -> GGUF, GGUF -> GGUF): the chunk generator
(`tensor_chunks`) and the thread that computes chunks ahead of the writer (`Pipeline`). Peak
memory is one chunk of CHUNK_BYTES of float32 per tensor being encoded, not the model.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator

import numpy as np
from gguf import GGMLQuantizationType

from ggquant.errors import GGQuantError
from ggquant.tensor import MappedRegion, Tensor

T = GGMLQuantizationType
CHUNK_BYTES = 32 << 20  # float32 working set of one chunk


def row_chunks(n_rows: int, inner: int, multiple: int = 1) -> Iterator[tuple[int, int]]:
    """[a, b) ranges of outer rows whose float32 working set (rows x inner values) fits CHUNK_BYTES;
    every boundary but the end is a multiple of `multiple` (a transform that permutes rows within
    blocks, e.g. the q/k heads of a Llama, sees whole blocks)."""
    step = max(1, CHUNK_BYTES // (4 * max(1, inner)))
    step = max(multiple, step // multiple * multiple)
    for a in range(0, n_rows, step):
        yield a, min(n_rows, a + step)


def quiet_bf16_nans(raw: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_bf16 (and gguf-py's BF16) turn a signalling NaN quiet: bf16 -> f32
    -> bf16 is the identity except for that bit."""
    nan = (raw & 0x7FFF) > 0x7F80
    if not nan.any():
        return raw
    out = raw.copy()
    out[nan] |= 0x0040
    return out


def encode(x: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None, what: str) -> np.ndarray:
    """float32 rows -> bytes of `qtype` (registry kernels, bit-exact with ggml)."""
    from ggquant.quant import types as qtypes

    if qtype == T.F32:
        return np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[-1] if x.ndim else 1
    return qtypes.get(qtype).quantize(x.reshape(-1, n), imatrix, what)


def tensor_chunks(t, imatrix: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, Callable | None]]:
    """(bytes, after) for one planned tensor, one bounded chunk of outer rows at a time.

    `after` (or None) must be called once the bytes are written: a chunk copied unchanged is a
    view of the mmapped checkpoint, whose pages are handed back only then."""
    if t.generated is not None:
        yield encode(t.generated, t.qtype, imatrix, t.name), None
        return
    src = t.src
    assert src is not None
    if t.source_quant:  # a quantized checkpoint's weight: transcoded or requantized
        yield from _source_quant_chunks(t, imatrix)
        return
    if src.ndim >= 3 and t.transform.identity and t.n_outer == src.n_outer and isinstance(src.source, MappedRegion):
        yield from _expert_chunks(t, imatrix)
        return
    inner = max(1, int(np.prod(src.shape[1:], dtype=np.int64))) if src.shape else 1
    raw_ok = t.transform.identity and (src.dtype, t.qtype) in (("F32", T.F32), ("F16", T.F16), ("BF16", T.BF16))
    chunks = [(0, t.n_outer)] if t.transform.whole else row_chunks(t.n_outer, inner, t.transform.row_block)
    for a, b in chunks:
        if raw_ok:
            raw = src.rows(a, b) if src.shape else src.rows(0, 1).reshape(1)
            yield (quiet_bf16_nans(raw) if src.dtype == "BF16" else raw), (lambda a=a, b=b: src.release(a, b))
        else:
            x = src.float_rows(a, b)
            y = t.transform(x, src.dtype)
            if y.ndim == 0:
                y = y.reshape(1)
            if not y.flags.writeable:  # an F32 source is a view of the read-only map; kernels want writable input
                y = y.copy()
            out = encode(y, t.qtype, imatrix, f"tensor '{t.name}'")
            del x, y
            src.release(a, b)  # the source rows were copied: drop their pages now
            yield out, None


def expert_ranges(n_expert: int, rows_per_expert: int, n_per_row: int) -> Iterator[tuple[int, int, int]]:
    """(expert, first ggml row, stop row) chunks of a stacked-expert tensor [E, R, n] seen as
    E*R rows: bounded by CHUNK_BYTES and never crossing an expert (llama.cpp
    llama_tensor_quantize_impl: each expert quantizes with its own imatrix slice)."""
    for e in range(n_expert):
        for a, b in row_chunks(rows_per_expert, n_per_row):
            yield e, e * rows_per_expert + a, e * rows_per_expert + b


def expert_imatrix(imatrix: np.ndarray | None, e: int, n_per_row: int) -> np.ndarray | None:
    """Expert e's slice of an imatrix of n_expert * n_per_row values (llama-imatrix stores one
    in_sum2 row per expert); a single row's vector applies to every expert."""
    if imatrix is None or imatrix.size <= n_per_row:
        return imatrix
    return imatrix[e * n_per_row:(e + 1) * n_per_row]


def _expert_chunks(t, imatrix: np.ndarray | None):
    """A 3-D (or higher) tensor copied without a transform, e.g. the stacked experts of an MoE
    [n_expert, rows, n]: read as its ggml rows (a view over the same mapped bytes), so a chunk
    is a bounded range of rows within one expert, however large one expert is."""
    src = t.src
    n = src.shape[-1]
    flat = Tensor(src.name, (src.n_rows, n), src.encoding, src.source, src.nbytes)
    rows_per_expert = src.n_rows // src.shape[0]
    raw_ok = (src.dtype, t.qtype) in (("F32", T.F32), ("F16", T.F16), ("BF16", T.BF16))
    for e, a, b in expert_ranges(src.shape[0], rows_per_expert, n):
        if raw_ok:
            raw = flat.rows(a, b)
            yield (quiet_bf16_nans(raw) if src.dtype == "BF16" else raw), (lambda a=a, b=b: flat.release(a, b))
        else:
            x = flat.float_rows(a, b)
            if not x.flags.writeable:
                x = x.copy()
            out = encode(x, t.qtype, expert_imatrix(imatrix, e, n), f"tensor '{t.name}'")
            del x
            flat.release(a, b)
            yield out, None


def _source_quant_chunks(t, imatrix: np.ndarray | None):
    """A quantized checkpoint's weight (t.src.encoding is SourceQuant), planned exact or lossy."""
    rec = t.src.encoding.record
    inner = math.prod(t.shape[1:])  # a record row: one outer row (one expert of stacked experts)
    if t.exact:
        for a, b in row_chunks(t.n_outer, inner):
            res = exact_chunk(rec, t.qtype, (a, b))
            if isinstance(res, str):  # planned exact from the metadata and scales; the payload disagrees
                raise GGQuantError(f"tensor '{t.name}' was planned as an exact {t.qtype.name} copy of "
                                   f"{t.src.name}, but rows [{a}, {b}) are not: {res}")
            yield res, None
    else:
        yield from ((out, None) for out in _lossy_chunks(t, imatrix))
    t.src.release()


def exact_chunk(rec, qtype: T, rows: tuple[int, int]) -> np.ndarray | str:
    """Rows [start, stop) of a quantized checkpoint's record as exact `qtype` bytes, or why they
    cannot be.

    Block types first take the one-pass kernel (ggquant.kernels.quants.transcode: pack, read back as
    ggml does, compare with float32(u)*d (+ m), the source's own dequantization of its blocks);
    anything it reports goes through the general packer (offset folding, constant blocks) with
    verify=True, as do the float types.
    """
    from ggquant.quant.transcode import BLOCK_TYPES

    if qtype in BLOCK_TYPES:
        from ggquant.kernels.quants.transcode import pack_exact

        blocks = rec.blocks(rows)
        if not isinstance(blocks, str) and not (blocks.m is not None and qtype in (T.Q4_0, T.Q5_0, T.Q8_0)):
            out, bad = pack_exact(qtype, blocks.u, blocks.d, blocks.m)
            if (bad < 0).all():
                return out
    res = rec.exact_ggml_or_reason([qtype], rows=rows, verify=True)
    return res if isinstance(res, str) else res[1]


def _lossy_chunks(t, imatrix: np.ndarray | None) -> Iterator[np.ndarray]:
    """The exact dequantization of a lossy quantized weight, quantized to t.qtype chunk by chunk;
    sets t.sqnr = 10 log10(|w|^2 / |w - ggml(w)|^2) in dB against that dequantization."""
    from ggquant.quant import types as qtypes

    rec = t.src.encoding.record
    sig = noise = 0.0
    n = t.shape[-1]
    for a, b in row_chunks(t.n_outer, math.prod(t.shape[1:]), t.transform.row_block):
        y = np.ascontiguousarray(t.transform(rec.dequantize((a, b)), t.src.dtype), dtype=np.float32).reshape(-1, n)
        if len(t.shape) >= 3:  # stacked experts: each with its own imatrix slice
            per = len(y) // (b - a)
            out = np.concatenate([encode(y[i * per:(i + 1) * per], t.qtype, expert_imatrix(imatrix, a + i, n),
                                         f"tensor '{t.name}'").reshape(per, -1) for i in range(b - a)])
        else:
            out = encode(y, t.qtype, imatrix, f"tensor '{t.name}'")
        if t.qtype != T.F32:
            back = qtypes.get(t.qtype).dequantize(out, y.shape).astype(np.float64)
            y64 = y.astype(np.float64)
            sig += float(np.sum(y64 * y64))
            noise += float(np.sum((y64 - back) ** 2))
        yield out
    t.sqnr = None if noise == 0 else (10 * math.log10(sig / noise) if sig > 0 else float("-inf"))


def measure_sqnr(t, imatrix: np.ndarray | None) -> None:
    """The SQNR of a lossy quantized weight without writing anything (--dry-run)."""
    for _ in _lossy_chunks(t, imatrix):
        pass
    t.src.release()


class Pipeline:
    """Computes the chunks of a file's tensors, in file order, in one thread ahead of the writer.

    The writer asks for tensor i's chunks when it reaches it (GGUFWriter calls produce() in
    order); meanwhile this thread has already read, widened and quantized the next chunks, so
    reading and encoding overlap with writing. At most `depth` finished chunks wait in the queue,
    which bounds memory. An exception in the thread is raised in the writer."""

    _END = object()

    def __init__(self, jobs: list[Callable[[], Iterator[tuple[np.ndarray, Callable | None]]]], depth: int = 2):
        self.jobs = jobs
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for i, job in enumerate(self.jobs):
                for chunk in job():
                    if not self._put((i, chunk)):
                        return
                if not self._put((i, self._END)):
                    return
        except BaseException as e:  # handed to the writer
            self._put((None, e))

    def chunks(self, i: int) -> Iterator[np.ndarray]:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="ggquant-convert", daemon=True)
            self.thread.start()
        while True:
            j, item = self.q.get()
            if j is None:
                raise item
            if j != i:  # cannot happen: the writer consumes tensors in order
                raise RuntimeError(f"pipeline out of order: got tensor {j}, expected {i}")
            if item is self._END:
                return
            data, after = item
            yield data
            del data, item
            if after is not None:  # the writer has written these bytes
                after()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            while self.thread.is_alive():
                try:
                    self.q.get_nowait()
                except queue.Empty:
                    self.thread.join(0.05)
