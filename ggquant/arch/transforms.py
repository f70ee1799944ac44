"""Per-tensor transforms between an HF tensor and its GGUF tensor, each with its exact inverse
(`ggquant convert --to hf` reads the GGUF back through it).

A transform maps a float32 chunk of source outer rows to the same outer rows of the target, so
a tensor is converted chunk by chunk. The family modules pick one per tensor in their
`transform` hook (Gemma's norm shift, Gemma 4's softplus and conv reshapes, ...).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

class Transform:
    """Maps a float32 chunk of source outer rows to the same outer rows of the GGUF tensor."""

    identity = False
    whole = False  # True: maps the whole tensor at once (it moves values between outer rows)
    label = ""
    row_block = 1  # chunks of source rows must be multiples of this (a permutation within heads)

    def shape(self, src_shape: tuple[int, ...]) -> tuple[int, ...]:
        return src_shape

    def __call__(self, x: np.ndarray, src_dtype: str) -> np.ndarray:
        raise NotImplementedError

    def inverse(self, hf_shape: tuple[int, ...]) -> Transform:
        """The transform that maps GGUF outer rows (float32) back to the HF tensor of shape
        `hf_shape` (`ggquant convert --to hf`); inverse(s).shape(self.shape(s)) == s."""
        raise NotImplementedError(f"{type(self).__name__} has no inverse")

    def row_permutation(self, n_rows: int) -> np.ndarray | None:
        """perm when the transform only reorders whole outer rows (out = x[perm]), else None: a
        quantized checkpoint's weight is then permuted as integer codes and stays exact."""
        return None


class Identity(Transform):
    identity = True

    def __call__(self, x, src_dtype):
        return x

    def inverse(self, hf_shape):
        return self


IDENTITY = Identity()


class AddConstant(Transform):
    """w + c, e.g. Gemma's RMSNorm stores gain-1 (llama.cpp Gemma3Model.norm_shift).

    llama.cpp adds in torch after widening only bf16 to f32 (ModelBase.prepare_tensors keeps
    f16 and f32 as they are), so an f16 source is added in f16 precision: round to f16 after.
    """

    def __init__(self, c: float):
        self.c = np.float32(c)
        self.label = f"{c:+g}"

    def __call__(self, x, src_dtype):
        y = x + self.c
        if src_dtype == "F16":
            y = y.astype(np.float16).astype(np.float32)
        return y

    def inverse(self, hf_shape):
        """y - c in float32. Exact whenever the forward sum was (a bf16 or f16 weight plus 1,
        |w| >= 2**-16), and in every case adding c again gives y back bit for bit (Sterbenz:
        y - 1 is exact for y in [0.5, 2], the range of Gemma norm gains), so GGUF -> HF -> GGUF
        reproduces the GGUF."""
        return AddConstant(-float(self.c))


class Softplus(Transform):
    """log(1 + exp(x)) exactly as torch.nn.functional.softplus computes it in float32 (llama.cpp
    Gemma4VisionAudioModel stores softplus(per_dim_scale)); torch is imported only here."""

    label = "softplus"

    def __call__(self, x, src_dtype):
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a dependency; numpy is a close fallback
            y = np.where(x > 20, x, np.log1p(np.exp(x.astype(np.float64)))).astype(np.float32)
            return y
        t = torch.from_numpy(np.array(x, dtype=np.float32, copy=True))
        if src_dtype == "F16":
            t = t.to(torch.float16)
        return torch.nn.functional.softplus(t).to(torch.float32).numpy()

    def inverse(self, hf_shape):
        return SoftplusInverse()


class SoftplusInverse(Transform):
    """x with softplus(x) == y: log(expm1(y)) in float64, rounded to float32, then moved by a
    few ulps until torch's float32 softplus maps it back to y exactly (Softplus above).

    Softplus loses information in float32 (its slope is below 1, so several x share one y):
    a float32 source comes back as the x nearest to the exact inverse among those that give
    the same GGUF value, and GGUF -> HF -> GGUF is byte-identical. A bf16 or f16 source comes
    back exactly once the HF tensor is rounded to its dtype (the float32 error is far below
    half a bf16/f16 ulp)."""

    label = "softplus^-1"
    MAX_STEPS = 64

    def __call__(self, y, src_dtype):
        y = np.asarray(y, dtype=np.float32)
        y64 = y.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            # softplus(x) = x for x > 20 in torch (threshold); below, log(expm1(y)) is exact math
            x = np.where(y64 > 20.0, y64, np.log(np.expm1(y64))).astype(np.float32)
        fwd = Softplus()
        for _ in range(self.MAX_STEPS):
            got = fwd(x, "F32")
            bad = got.view(np.uint32) != y.view(np.uint32)
            bad &= np.isfinite(y) & (y > 0)
            if not bad.any():
                break
            # step one ulp towards the value whose softplus is y (softplus is increasing)
            x = np.where(bad, np.nextafter(x, np.where(got < y, np.float32(np.inf), np.float32(-np.inf))), x)
            x = x.astype(np.float32)
        return x


class Reshape(Transform):
    """A reshape that keeps the outer dimension (e.g. depthwise conv [C, 1, K] -> [C, K],
    a scalar [] -> [1])."""

    def __init__(self, inner: Callable[[tuple[int, ...]], tuple[int, ...]], label: str):
        self.inner = inner
        self.label = label

    def shape(self, src_shape):
        return self.inner(src_shape)

    def __call__(self, x, src_dtype):
        if x.ndim == 0:
            return x.reshape(1)
        return x.reshape((x.shape[0],) + self.inner(x.shape)[1:])

    def inverse(self, hf_shape):
        return ReshapeTo(tuple(hf_shape))


class ReshapeTo(Transform):
    """Outer rows reshaped back to the HF layout `hf_shape` (the inverse of a Reshape)."""

    def __init__(self, hf_shape: tuple[int, ...]):
        self.hf_shape = hf_shape
        self.label = f"-> {list(hf_shape)}"

    def shape(self, src_shape):
        return self.hf_shape

    def __call__(self, x, src_dtype):
        if not self.hf_shape:
            return x.reshape(())
        return x.reshape((x.shape[0],) + self.hf_shape[1:])


SCALAR_TO_1D = Reshape(lambda s: s if s else (1,), "[] -> [1]")
