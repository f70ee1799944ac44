"""Streaming comparison statistics of two engines' logits, chunk by chunk.

For each position the reference distribution P (the --against engine) and the model's Q are
softmaxes of the logits in float64. Per position: KL(P || Q) = sum P (log P - log Q) (the
direction llama-perplexity's --kl-divergence uses), whether the argmaxes agree, and the squared
logit error. Per engine: the log-probability of the next token of the text (perplexity).
Only per-position scalars are kept, never the logits themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

ROWS = 64  # rows per float64 block, to bound temporaries at 64 x n_vocab x 8 bytes


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass
class ParityStats:
    kl: list[float] = field(default_factory=list)  # per position
    chunk_of: list[int] = field(default_factory=list)
    top1_same: int = 0
    n: int = 0
    sq_err: float = 0.0  # sum (model - ref)^2
    sq_ref: float = 0.0  # sum ref^2
    max_abs: float = 0.0
    nll_model: float = 0.0  # sum -log Q(next token)
    nll_ref: float = 0.0
    n_next: int = 0
    chunks: int = 0

    def update(self, model: np.ndarray, ref: np.ndarray, ids: list[int]) -> None:
        """Add one chunk: logits [n, V] of both engines on the token ids of that chunk."""
        if model.shape != ref.shape:
            raise ValueError(f"logit shapes differ: model {model.shape}, reference {ref.shape} "
                             f"(do the two models have the same vocabulary?)")
        n = model.shape[0]
        for s in range(0, n, ROWS):
            m = model[s:s + ROWS]
            r = ref[s:s + ROWS]
            lq, lp = _log_softmax(m), _log_softmax(r)
            p = np.exp(lp)
            kl = np.sum(p * (lp - lq), axis=-1)
            self.kl.extend(np.maximum(kl, 0.0).tolist())
            self.chunk_of.extend([self.chunks] * len(kl))
            self.top1_same += int(np.sum(np.argmax(m, -1) == np.argmax(r, -1)))
            d = m.astype(np.float64) - r
            self.sq_err += float(np.sum(d * d))
            self.sq_ref += float(np.sum(r.astype(np.float64) ** 2))
            self.max_abs = max(self.max_abs, float(np.max(np.abs(d))) if d.size else 0.0)
            for i in range(len(kl)):
                pos = s + i
                if pos + 1 < len(ids):
                    nxt = ids[pos + 1]
                    self.nll_model -= float(lq[i, nxt])
                    self.nll_ref -= float(lp[i, nxt])
                    self.n_next += 1
        self.n += n
        self.chunks += 1

    def summary(self) -> dict:
        kl = np.asarray(self.kl, dtype=np.float64)
        return {
            "positions": self.n,
            "chunks": self.chunks,
            "kl_mean": float(kl.mean()) if kl.size else 0.0,
            "kl_p99": float(np.percentile(kl, 99)) if kl.size else 0.0,
            "kl_max": float(kl.max()) if kl.size else 0.0,
            "top1_agreement": self.top1_same / self.n if self.n else 0.0,
            "nmse": self.sq_err / self.sq_ref if self.sq_ref else 0.0,
            "max_abs_logit_diff": self.max_abs,
            "ppl_model": math.exp(self.nll_model / self.n_next) if self.n_next else float("nan"),
            "ppl_reference": math.exp(self.nll_ref / self.n_next) if self.n_next else float("nan"),
        }

    def per_chunk_kl(self) -> list[float]:
        kl = np.asarray(self.kl)
        ch = np.asarray(self.chunk_of)
        return [float(kl[ch == c].mean()) for c in range(self.chunks)]
