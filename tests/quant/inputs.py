"""Test inputs of the byte-exact quantizer tests (legacy, k-quants, grid i-quants, ternary, FP4, sign
types), one generator: float32 [rows, n_per_row] matrices of a named family and imatrices of a named
kind. Deterministic per name."""

import numpy as np


def family(name: str, n_rows: int, *, few_rows: int | None = None, sub: int = 32) -> np.ndarray:
    """float32 [rows, n_per_row] (n_per_row 512 ... 4096). The wide and all-zero families have
    `few_rows` rows (default n_rows); mixed_blocks varies per `sub`-value sub-block."""
    few = n_rows if few_rows is None else few_rows
    rng = np.random.default_rng(sum(map(ord, name)))
    if name == "normal":
        x = rng.standard_normal((n_rows, 1024))
    elif name == "normal_wide":
        x = rng.standard_normal((few, 4096))
    elif name == "heavy_tailed":
        x = rng.standard_t(2, (n_rows, 1024)) * 10
    elif name == "zeros":
        x = np.zeros((few, 512))
    elif name == "constant":
        x = np.repeat(rng.standard_normal((n_rows, 1)) * 3, 512, axis=1)
    elif name == "outlier":
        x = rng.standard_normal((n_rows, 1024)) * 0.01
        x[np.arange(n_rows), rng.integers(0, 1024, n_rows)] = rng.choice([-1.0, 1.0], n_rows) * 100.0
    elif name in _SCALES:
        x = rng.standard_normal((n_rows, 512)) * _SCALES[name]
    elif name == "fp16_max":
        x = rng.standard_normal((n_rows, 512)) * 2e4
        x[:, ::37] = rng.choice([-65504.0, 65504.0, -6e4, 6e4], x[:, ::37].shape)
    elif name == "mixed_blocks":
        # per sub-block: zero, all-positive, all-negative, constant or normal (zero 32-value sub-blocks
        # shift IQ3_S's qs/signs pointers in ggml)
        x = rng.standard_normal((n_rows, 1024))
        kind = rng.integers(0, 5, (n_rows, 1024 // sub))
        xb = x.reshape(n_rows, -1, sub)
        xb[kind == 0] = 0.0
        xb[kind == 1] = np.abs(xb[kind == 1])
        xb[kind == 2] = -np.abs(xb[kind == 2])
        xb[kind == 3] = 0.7
    elif name == "powers_of_two":  # MXFP4's exponent floor(log2f(amax)) next to every boundary
        m = rng.choice([1.0, 1 - 2**-24, 1 + 2**-23, 1.5, 1.9999999], (n_rows, 512))
        x = 2.0 ** rng.integers(-30, 30, (n_rows, 512)) * rng.choice([-1, 1], (n_rows, 512)) * m
    elif name == "ties":  # exact halves: round-half-away-from-zero paths (lroundf, roundf)
        x = rng.integers(-8, 9, (n_rows, 512)) / 4.0
    elif name == "fp4_midpoints":
        # MXFP4 blocks of 32 whose largest value fixes the scale d = 2^(k-3) (amax in [8d, 16d)),
        # the others on the midpoints between its levels 0, d, 2d, 3d, 4d, 6d, 8d, 12d and on the
        # levels, exactly or 1-2 ulps off; k from denormal to near-overflow blocks
        k = rng.integers(-135, 121, (n_rows * 16, 1)).astype(np.float64)
        d = 2.0 ** (k - 3)
        on = np.array([0.5, 1.5, 2.5, 3.5, 5, 7, 10, 1, 2, 3, 4, 6, 8, 12])
        xb = (rng.choice(on, (n_rows * 16, 32)) * d).astype(np.float32)
        xb[:, 0] = (rng.choice([8, 12, 15.999999], n_rows * 16) * d[:, 0]).astype(np.float32)
        ulps = rng.integers(-2, 3, xb.shape).astype(np.int32) * (xb != 0)
        ulps[:, 0] = 0
        xb = (xb.view(np.int32) + ulps).view(np.float32) * rng.choice([-1, 1], xb.shape).astype(np.float32)
        x = xb.reshape(n_rows, 512)
    else:
        raise KeyError(name)
    return np.ascontiguousarray(x, dtype=np.float32)


_SCALES = {"tiny": 1e-30, "small": 1e-6, "large": 1e6, "huge": 1e30, "denormal": 1e-40}


def imatrix(kind, n: int, zero_prefix: int = 16):
    """None, or float32 [n] importance weights: random, some_zeros (30% zero and the first
    `zero_prefix` columns, a whole sub-block without weight) or all_equal."""
    if kind is None:
        return None
    rng = np.random.default_rng(n + len(kind))
    if kind == "random":
        return (rng.random(n) * 4 + 1e-3).astype(np.float32)
    if kind == "some_zeros":
        w = rng.random(n).astype(np.float32)
        w[rng.random(n) < 0.3] = 0.0
        w[:zero_prefix] = 0.0
        return w
    if kind == "all_equal":
        return np.full(n, 0.25, dtype=np.float32)
    raise KeyError(kind)
