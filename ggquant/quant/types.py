"""The GGML type registry: one entry per GGMLQuantizationType, backed by numba kernels.

Kernel modules (ggquant.kernels.*) each export two dicts keyed by GGMLQuantizationType:

    QUANTIZE[t](x: float32[n_rows, n_per_row], imatrix: float32[n_per_row] | None)
        -> uint8[n_rows, row_bytes]            bit-exact with ggml_quantize_chunk
    DEQUANTIZE[t](data: uint8[n_rows, row_bytes], n_per_row: int)
        -> float32[n_rows, n_per_row]          bit-exact with ggml's to_float

Block size and bytes per block always come from gguf's GGML_QUANT_SIZES.
"""

from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ggquant.errors import GGQuantError
from ggquant.kernels import floats, iq4, iqdequant, kquants, legacy

_KERNEL_MODULES = (floats, legacy, kquants, iq4, iqdequant)

# ggml-quants.c: which quantizers read the `quant_weights` (imatrix) argument of
# ggml_quantize_chunk (research note imatrix-and-quants.md §1.4).
IMATRIX_TYPES = frozenset(
    GGMLQuantizationType[n]
    for n in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS",
              "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M")
)


@dataclass(frozen=True)
class GGMLType:
    qtype: GGMLQuantizationType
    block_size: int  # elements per block (gguf GGML_QUANT_SIZES)
    type_size: int  # bytes per block
    quantize_fn: Callable | None
    dequantize_fn: Callable | None

    @property
    def name(self) -> str:
        return self.qtype.name

    @property
    def uses_imatrix(self) -> bool:
        return self.qtype in IMATRIX_TYPES

    def row_bytes(self, n_per_row: int) -> int:
        return n_per_row // self.block_size * self.type_size

    def nbytes(self, shape) -> int:
        """Bytes of a tensor of numpy shape (..., n_per_row) in this type."""
        n_rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        return n_rows * self.row_bytes(int(shape[-1]))

    def check_row(self, n_per_row: int, what: str = "tensor") -> None:
        if n_per_row % self.block_size:
            raise GGQuantError(
                f"{what}: rows of {n_per_row} elements cannot be stored as {self.name}, whose blocks "
                f"hold {self.block_size}; pick a type whose block size divides {n_per_row}"
            )

    def quantize(self, x: np.ndarray, imatrix: np.ndarray | None = None, what: str = "tensor") -> np.ndarray:
        """float32 [..., n_per_row] -> uint8 [n_rows, row_bytes]."""
        if self.quantize_fn is None:
            raise GGQuantError(f"{what}: quantizing to {self.name} is not supported yet (dequantizing is)")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not x.flags.writeable:  # mmap views: one numba specialisation for all inputs
            x = x.copy()
        n_per_row = x.shape[-1]
        self.check_row(n_per_row, what)
        x2 = x.reshape(-1, n_per_row)
        if imatrix is not None and self.uses_imatrix:
            imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
            if imatrix.shape != (n_per_row,):
                raise GGQuantError(
                    f"{what}: importance matrix has {imatrix.size} values, expected one per column ({n_per_row})"
                )
        else:
            imatrix = None
        return self.quantize_fn(x2, imatrix)

    def dequantize(self, data: np.ndarray, shape) -> np.ndarray:
        """uint8 raw bytes of a tensor with numpy shape `shape` -> float32 array of that shape."""
        if self.dequantize_fn is None:
            raise GGQuantError(f"dequantizing {self.name} is not supported")
        n_per_row = int(shape[-1])
        rows = np.ascontiguousarray(data).view(np.uint8).reshape(-1, self.row_bytes(n_per_row))
        return self.dequantize_fn(rows, n_per_row).reshape(shape)


def _build_registry() -> dict[GGMLQuantizationType, GGMLType]:
    reg = {}
    for qtype in GGMLQuantizationType:
        q = d = None
        for mod in _KERNEL_MODULES:
            q = q or mod.QUANTIZE.get(qtype)
            d = d or mod.DEQUANTIZE.get(qtype)
        if q is None and d is None:
            continue
        block, size = GGML_QUANT_SIZES[qtype]
        reg[qtype] = GGMLType(qtype, block, size, q, d)
    return reg


REGISTRY = _build_registry()


def get(qtype) -> GGMLType:
    """Look a type up by GGMLQuantizationType, int id or name ('Q4_K', 'q8_0')."""
    try:
        if isinstance(qtype, str):
            qtype = GGMLQuantizationType[qtype.upper()]
        else:
            qtype = GGMLQuantizationType(int(qtype))
    except (KeyError, ValueError):
        raise GGQuantError(f"unknown GGML type {qtype!r}; known: {', '.join(t.name for t in REGISTRY)}") from None
    if qtype not in REGISTRY:
        raise GGQuantError(f"GGML type {qtype.name} is not supported by ggquant yet")
    return REGISTRY[qtype]


def quantize(x: np.ndarray, qtype, imatrix: np.ndarray | None = None) -> np.ndarray:
    return get(qtype).quantize(x, imatrix)


def dequantize(data: np.ndarray, qtype, shape) -> np.ndarray:
    return get(qtype).dequantize(data, shape)
