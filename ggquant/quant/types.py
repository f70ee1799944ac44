"""The GGML type registry: one GGMLType per GGMLQuantizationType, declaring everything ggquant does with it.

An entry gathers what ggml spreads over its trait tables (ggml.c type_traits: to_float and
from_float_ref; ggml-cpu.c type_traits_cpu: vec_dot and vec_dot_type; the ggml-cuda
dequantizers) and llama-quant.cpp's per-type rules, next to ggquant's own capabilities:

    quantize_fn(x: float32[n_rows, n_per_row], imatrix: float32[n_per_row] | None)
        -> uint8[n_rows, row_bytes]            bit-exact with ggml_quantize_chunk
    dequantize_fn(data: uint8[n_rows, row_bytes], n_per_row: int)
        -> float32[n_rows, n_per_row]          bit-exact with ggml's to_float
    uses_imatrix    the quantizer reads ggml_quantize_chunk's quant_weights (research note
                    imatrix-and-quants.md §1.4)
    requires_imatrix
                    ggml_quantize_chunk asserts an imatrix (ggml.c ggml_quantize_requires_imatrix:
                    IQ2_XXS, IQ2_XS, IQ1_S); llama-quantize's wider rule (IQ3_XXS, IQ2_S, IQ1_M,
                    Q2_K in Q2_K_S files) is ggquant.quant.presets'
    row_fallback    the type llama-quantize falls back to for rows that are not whole blocks
                    (llama-quant.cpp tensor_type_fallback)
    vec_dot_type, cpu_matmul
                    the CPU product (ggquant.kernels.cpu.matmul) and the type its activation is
                    converted to first (type_traits_cpu[t].vec_dot_type; kernels.cpu.actquant)
    cuda_dequantize, cuda_repack
                    the torch block decoder and the layout the Triton matvec reads
                    (ggquant.kernels.cuda.dequant)
    exact_codes     the integer codes a block holds under its free scale, for exact transcoding
                    of quantized checkpoints (ggquant.quant.transcode)
    file_type       general.file_type of an `--outtype auto` conversion whose quantized weights
                    are mostly of this type (ggquant.convert_quantized)

A capability left None is one ggquant does not have for the type. Block size and bytes per block
always come from gguf's GGML_QUANT_SIZES.

Adding a type: its quantize and dequantize side by side in its family's kernel module
(ggquant.kernels.quants.<family>, listed in that module's QUANTIZE / DEQUANTIZE), one _register
call below, and a bit-exactness test; ggquant.quant.presets too if it is a llama-quantize preset.
"""

from dataclasses import dataclass, field, replace
from typing import Callable, NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType as F

from ggquant.errors import GGQuantError
from ggquant.kernels.cpu import b32matmul, iqmatmul
from ggquant.kernels.cpu import matmul as cpu
from ggquant.kernels.cuda import dequant as cuda
from ggquant.kernels.quants import floats, iq4, iquants, kquants, legacy, lowbit


class ExactCodes(NamedTuple):
    """The integer codes of a block: "sym": w = d*code, the code stored offset by -lo (Q4_0/Q5_0)
    or as int8 (Q8_0); "offset": w = d*code + m."""

    kind: str
    lo: int
    hi: int


@dataclass(frozen=True)
class GGMLType:
    qtype: T
    quantize_fn: Callable | None = None
    dequantize_fn: Callable | None = None
    uses_imatrix: bool = False
    requires_imatrix: bool = False
    row_fallback: T | None = None
    vec_dot_type: T | None = None
    cpu_matmul: Callable | None = None
    cuda_dequantize: Callable | None = None
    cuda_repack: Callable | None = None
    exact_codes: ExactCodes | None = None
    file_type: F | None = None
    block_size: int = field(init=False)  # elements per block (gguf GGML_QUANT_SIZES)
    type_size: int = field(init=False)  # bytes per block

    def __post_init__(self):
        block, size = GGML_QUANT_SIZES[self.qtype]
        object.__setattr__(self, "block_size", block)
        object.__setattr__(self, "type_size", size)

    @property
    def name(self) -> str:
        return self.qtype.name

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
        if imatrix is None and self.requires_imatrix:
            raise GGQuantError(
                f"{what}: quantizing to {self.name} needs an importance matrix (ggml_quantize_requires_imatrix); "
                f"pass --imatrix FILE (make one with `ggquant imatrix`)"
            )
        try:
            return self.quantize_fn(x2, imatrix)
        except ValueError as e:  # the kernels' refusals (rows ggml would abort on)
            raise GGQuantError(f"{what}: {e}") from None

    def dequantize(self, data: np.ndarray, shape) -> np.ndarray:
        """uint8 raw bytes of a tensor with numpy shape `shape` -> float32 array of that shape."""
        if self.dequantize_fn is None:
            raise GGQuantError(f"dequantizing {self.name} is not supported")
        n_per_row = int(shape[-1])
        rows = np.ascontiguousarray(data).view(np.uint8).reshape(-1, self.row_bytes(n_per_row))
        return self.dequantize_fn(rows, n_per_row).reshape(shape)


REGISTRY: dict[T, GGMLType] = {}


def _register(qtype: T, kernels, **capabilities) -> None:
    """The entry of `qtype`, whose quantize/dequantize are in the kernel module `kernels`."""
    assert qtype not in REGISTRY, qtype
    REGISTRY[qtype] = GGMLType(qtype, kernels.QUANTIZE.get(qtype), kernels.DEQUANTIZE[qtype], **capabilities)


def _lowbit_runtime(qtype: T, vec_dot_type: T, cpu_module) -> dict:
    """The runtime capabilities of a low-bit type (issue 14): its CPU product (kernels.cpu.iqmatmul /
    b32matmul) and its torch decoder + int8 repack for the CUDA backend (kernels.cuda.dequant)."""
    name = qtype.name.lower()
    return dict(vec_dot_type=vec_dot_type, cpu_matmul=getattr(cpu_module, f"matmul_{name}"),
                cuda_dequantize=getattr(cuda, f"dequantize_{name}"), cuda_repack=getattr(cuda, f"repack_{name}"))


# --- floats
_register(T.F32, floats, vec_dot_type=T.F32, cpu_matmul=cpu.matmul_f32,
          cuda_dequantize=cuda.dequantize_f32, cuda_repack=cuda.repack_f32, file_type=F.ALL_F32)
_register(T.F16, floats, vec_dot_type=T.F16, cpu_matmul=cpu.matmul_f16,
          cuda_dequantize=cuda.dequantize_f16, cuda_repack=cuda.repack_f16, file_type=F.MOSTLY_F16)
_register(T.BF16, floats, vec_dot_type=T.BF16, cpu_matmul=cpu.matmul_bf16,
          cuda_dequantize=cuda.dequantize_bf16, cuda_repack=cuda.repack_bf16, file_type=F.MOSTLY_BF16)
# --- legacy quants (32-element blocks); quantize_q8_0 ignores the imatrix
_register(T.Q4_0, legacy, uses_imatrix=True, vec_dot_type=T.Q8_0, cpu_matmul=cpu.matmul_q4_0,
          cuda_dequantize=cuda.dequantize_q4_0, cuda_repack=cuda.repack_q4_0,
          exact_codes=ExactCodes("sym", -8, 7), file_type=F.MOSTLY_Q4_0)
_register(T.Q4_1, legacy, uses_imatrix=True, cuda_dequantize=cuda.dequantize_q4_1,
          exact_codes=ExactCodes("offset", 0, 15), file_type=F.MOSTLY_Q4_1)
_register(T.Q5_0, legacy, uses_imatrix=True, vec_dot_type=T.Q8_0, cpu_matmul=cpu.matmul_q5_0,
          cuda_dequantize=cuda.dequantize_q5_0, cuda_repack=cuda.repack_q5_0,
          exact_codes=ExactCodes("sym", -16, 15), file_type=F.MOSTLY_Q5_0)
_register(T.Q5_1, legacy, uses_imatrix=True, cuda_dequantize=cuda.dequantize_q5_1,
          exact_codes=ExactCodes("offset", 0, 31), file_type=F.MOSTLY_Q5_1)
_register(T.Q8_0, legacy, vec_dot_type=T.Q8_0, cpu_matmul=cpu.matmul_q8_0,
          cuda_dequantize=cuda.dequantize_q8_0, cuda_repack=cuda.repack_q8_0,
          exact_codes=ExactCodes("sym", -128, 127), file_type=F.MOSTLY_Q8_0)
# --- k-quants (256-element super-blocks)
_register(T.Q2_K, kquants, uses_imatrix=True, row_fallback=T.Q4_0)
_register(T.Q3_K, kquants, uses_imatrix=True, row_fallback=T.Q4_0)
_register(T.Q4_K, kquants, uses_imatrix=True, row_fallback=T.Q5_0, vec_dot_type=T.Q8_K, cpu_matmul=cpu.matmul_q4_k,
          cuda_dequantize=cuda.dequantize_q4_k, cuda_repack=cuda.repack_q4_k, file_type=F.MOSTLY_Q4_K_M)
_register(T.Q5_K, kquants, uses_imatrix=True, row_fallback=T.Q5_1, vec_dot_type=T.Q8_K, cpu_matmul=cpu.matmul_q5_k,
          cuda_dequantize=cuda.dequantize_q5_k, file_type=F.MOSTLY_Q5_K_M)
_register(T.Q6_K, kquants, uses_imatrix=True, row_fallback=T.Q8_0, vec_dot_type=T.Q8_K, cpu_matmul=cpu.matmul_q6_k,
          cuda_dequantize=cuda.dequantize_q6_k, cuda_repack=cuda.repack_q6_k, file_type=F.MOSTLY_Q6_K)
# --- non-linear 4-bit quants
_register(T.IQ4_NL, iq4, uses_imatrix=True, **_lowbit_runtime(T.IQ4_NL, T.Q8_0, b32matmul))
_register(T.IQ4_XS, iq4, uses_imatrix=True, row_fallback=T.IQ4_NL, **_lowbit_runtime(T.IQ4_XS, T.Q8_K, iqmatmul))
# --- grid i-quants (ggml's IQ quantizers read the imatrix; IQ2_XXS, IQ2_XS and IQ1_S need one)
for _t in (T.IQ2_XXS, T.IQ2_XS, T.IQ3_XXS, T.IQ1_S, T.IQ3_S, T.IQ2_S, T.IQ1_M):
    _register(_t, iquants, uses_imatrix=True, requires_imatrix=_t in iquants.REQUIRES_IMATRIX,
              row_fallback=T.IQ4_NL, **_lowbit_runtime(_t, T.Q8_K, iqmatmul))
# --- ternary, FP4 and sign types: their ggml quantizers ignore the imatrix. Q2_0 (ggml type 42)
# has kernels (lowbit.quantize_q2_0) but no entry: gguf 0.19.0's GGMLQuantizationType lacks it.
for _t in (T.TQ1_0, T.TQ2_0):
    _register(_t, lowbit, row_fallback=T.Q4_0, **_lowbit_runtime(_t, T.Q8_K, iqmatmul))
for _t in (T.MXFP4, T.NVFP4, T.Q1_0):
    _register(_t, lowbit, **_lowbit_runtime(_t, T.Q8_0, b32matmul))
# an NVFP4 checkpoint's weights keep their type (ggquant.convert.quantized; llama.cpp's MOSTLY_NVFP4)
REGISTRY[T.NVFP4] = replace(REGISTRY[T.NVFP4], file_type=F.MOSTLY_NVFP4)

# CPU products of the offset legacy quants: Q8_1 activations (ggml_vec_dot_q4_1_q8_1 / _q5_1_q8_1)
for _t, _mm in ((T.Q4_1, cpu.matmul_q4_1), (T.Q5_1, cpu.matmul_q5_1)):
    REGISTRY[_t] = replace(REGISTRY[_t], vec_dot_type=T.Q8_1, cpu_matmul=_mm)

# ggml's enum order (F32, F16, Q4_0, ...) for every listing derived from the registry
REGISTRY = dict(sorted(REGISTRY.items()))

QUANTIZE_TYPES = tuple(t for t, e in REGISTRY.items() if e.quantize_fn is not None)  # what --tensor-type takes
CPU_TYPES = tuple(t for t, e in REGISTRY.items() if e.cpu_matmul is not None)  # the CPU runtime's weight types
CUDA_TYPES = tuple(t for t, e in REGISTRY.items() if e.cuda_dequantize is not None)  # the CUDA runtime's


def get(qtype) -> GGMLType:
    """Look a type up by GGMLQuantizationType, int id or name ('Q4_K', 'q8_0')."""
    try:
        if isinstance(qtype, str):
            qtype = T[qtype.upper()]
        else:
            qtype = T(int(qtype))
    except (KeyError, ValueError):
        raise GGQuantError(f"unknown GGML type {qtype!r}; known: {', '.join(t.name for t in REGISTRY)}") from None
    if qtype not in REGISTRY:
        raise GGQuantError(f"GGML type {qtype.name} is not supported by ggquant yet")
    return REGISTRY[qtype]


def quantize(x: np.ndarray, qtype, imatrix: np.ndarray | None = None) -> np.ndarray:
    return get(qtype).quantize(x, imatrix)


def dequantize(data: np.ndarray, qtype, shape) -> np.ndarray:
    return get(qtype).dequantize(data, shape)
