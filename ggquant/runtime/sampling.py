"""Choosing the next token from logits: greedy at temperature 0, otherwise llama.cpp's default
chain in spirit (top-k, top-p, min-p, temperature, then a draw from a seeded generator)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ggquant.errors import GGQuantError


@dataclass
class Sampler:
    temp: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int | None = None

    def __post_init__(self):
        if self.temp < 0:
            raise GGQuantError(f"--temp must be >= 0, got {self.temp}")
        if not 0.0 < self.top_p <= 1.0:
            raise GGQuantError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p < 1.0:
            raise GGQuantError(f"--min-p must be in [0, 1), got {self.min_p}")
        self.rng = np.random.default_rng(self.seed)

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, dtype=np.float64).reshape(-1)
        if self.temp == 0.0:
            return int(np.argmax(logits))  # ties: the lowest id, like llama.cpp's greedy sampler
        order = np.argsort(-logits, kind="stable")
        if self.top_k > 0:
            order = order[:self.top_k]
        z = logits[order] / self.temp
        p = np.exp(z - z.max())
        p /= p.sum()
        keep = np.cumsum(p) - p < self.top_p  # smallest prefix reaching top_p
        if self.min_p > 0:
            keep &= p >= self.min_p * p[0]
        keep[0] = True
        order, p = order[keep], p[keep]
        return int(order[self.rng.choice(len(p), p=p / p.sum())])
