"""Measured sensitivity: how far the model's next-token distribution moves when one tensor alone is
replaced by its quantization to a given type, on calibration text (KL(reference || probed), mean
over positions). The reference is the model as loaded; every tensor is quantized whole, with the
same bit-exact quantizers (and imatrix) a real quantization uses, and swapped in for the forward
passes (`swapped`), so each probe costs one forward pass over the calibration chunks. A type the
backend has no product for runs as its dequantized numbers in F32. ggquant.quant.allocate turns these into per-tensor scales of its proxy error.
"""

from __future__ import annotations

import contextlib

import numpy as np

from gguf import GGMLQuantizationType as T

from ggquant.errors import GGQuantError
from ggquant.quant import types as qtypes
from ggquant.tensor import in_memory_blocks


@contextlib.contextmanager
def swapped(backend, w, info):
    """Within the block, backend weight `w` holds tensor `info` (same shape, any type) instead of
    its own: every attribute of the backend's weight record (CPUWeight, TorchWeight) is swapped, so
    each model layer that holds `w` -- the tied output too -- sees the new tensor."""
    new = backend.weight(info)
    if tuple(new.shape) != tuple(w.shape):
        raise GGQuantError(f"{w.name}: cannot replace shape {w.shape} by {new.shape}")
    slots = [k for k in type(w).__slots__ if k != "name"]
    old = {k: getattr(w, k) for k in slots}
    for k in slots:
        setattr(w, k, getattr(new, k))
    try:
        yield w
    finally:
        for k in slots:
            setattr(w, k, old[k])


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class KLProbe:
    def __init__(self, model, chunks: list[list[int]], imatrix: dict[str, np.ndarray] | None = None):
        if not chunks or not all(chunks):
            raise GGQuantError("calibration: no tokens to evaluate")
        self.model = model
        self.chunks = chunks
        self.imatrix = imatrix or {}
        self.ref = [log_softmax(self._logits(c)).astype(np.float32) for c in chunks]  # float32: memory
        self.evals = 0

    @classmethod
    def from_text(cls, model, text: str, ctx: int = 128, n_chunks: int = 2, imatrix=None) -> "KLProbe":
        """Chunks of `ctx` tokens of the text, the first token of each replaced by BOS (as llama-imatrix)."""
        from ggquant.runtime.tokenizer import Tokenizer

        tok = Tokenizer.from_gguf(model.reader)
        ids = tok.encode(text, add_special=True)
        n = min(n_chunks, len(ids) // ctx)
        if n < 1:
            raise GGQuantError(f"--calibration: the text has {len(ids)} tokens, fewer than one chunk of {ctx}; "
                               f"give a longer text or a smaller --ctx")
        chunks = []
        for c in range(n):
            chunk = list(ids[c * ctx:(c + 1) * ctx])
            chunk[0] = tok.bos_id
            chunks.append(chunk)
        return cls(model, chunks, imatrix)

    def _logits(self, ids: list[int]) -> np.ndarray:
        from ggquant.runtime.model import Session

        return np.asarray(Session(self.model, n_ctx=len(ids)).eval(ids, "all"))

    def kl(self, name: str, qtype) -> float:
        """Mean KL(reference || model with `name` quantized to qtype) over the calibration tokens."""
        w = self.model.weights.get(name)
        if w is None:
            raise GGQuantError(f"{name}: not a weight this model's forward pass uses")
        t = self.model.reader.tensor(name)
        src = qtypes.get(t.qtype)
        x = src.dequantize(np.ascontiguousarray(t.raw()), (t.n_rows, t.shape[-1]))
        dst = qtypes.get(qtype)
        vec = self.imatrix.get(name) if dst.uses_imatrix else None
        blocks = dst.quantize(x, vec, name)
        if dst.qtype in self.model.backend.types:
            q = in_memory_blocks(name, tuple(t.shape), dst.qtype, blocks)
        else:  # no product for this type here: its numbers as F32 (the weight error is all there;
            # only the activation rounding llama.cpp's product for the type adds is left out)
            y = dst.dequantize(blocks, x.shape).astype(np.float32)
            q = in_memory_blocks(name, tuple(t.shape), T.F32, y)
        total, n = 0.0, 0
        with swapped(self.model.backend, w, q):
            for ref, ids in zip(self.ref, self.chunks):
                lq = log_softmax(self._logits(ids))
                p = np.exp(ref.astype(np.float64))
                total += float(np.sum(p * (ref - lq)))
                n += len(ids)
        self.evals += 1
        return max(total / n, 0.0)
