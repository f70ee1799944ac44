"""The plan of a conversion and its report: what each output file will hold, decided before any
payload is computed, and the same record rendered for --json and --dry-run by every job.

    Conversion          one run: its source, architecture and output files
      OutFile           one GGUF: part (text / mmproj), path, metadata (KV), tensors
        TensorPlan      one tensor: GGUF name, shape, type, why, where its rows come from
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, MODEL_TENSOR, TENSOR_NAMES, GGMLQuantizationType

from ggquant.arch.base import TEXT, Arch
from ggquant.arch.transforms import IDENTITY, Transform
from ggquant.errors import GGQuantError
from ggquant.formats.gguf import KV
from ggquant.formats.safetensors import FLOAT_DTYPES
from ggquant.tensor import SourceQuant, Tensor

T = GGMLQuantizationType

# GGUF metadata of every file holding a quantized checkpoint's weights (ggquant.convert.quantized)
KEY_METHOD = "ggquant.source.quantization"
KEY_DESC = "ggquant.source.quantization_desc"
KEY_EXACT = "ggquant.source.exact_tensors"
KEY_REQUANTIZED = "ggquant.source.requantized_tensors"




@dataclass
class TensorPlan:
    """One tensor of the output GGUF, decided before any payload is computed."""

    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order, as written
    qtype: GGMLQuantizationType
    reason: str  # why this type
    src: Tensor | None = None  # None for generated tensors
    hf_name: str | None = None
    n_outer: int = 1  # source outer rows read (fewer than src.n_outer when trimmed)
    transform: Transform = IDENTITY
    generated: np.ndarray | None = None  # float32 payload of a generated tensor
    # a quantized checkpoint's weight (src.encoding is SourceQuant): decided by the plan
    exact: bool | None = None  # its values are the source's, bit for bit
    why: str = ""  # how its type was chosen / why it is not exact
    sqnr: float | None = None  # dB, of a lossy one, measured while encoding (or by --dry-run)

    @property
    def source_quant(self) -> bool:
        return self.src is not None and isinstance(self.src.encoding, SourceQuant)

    @property
    def src_dtype(self) -> str:
        return self.src.dtype if self.src is not None else "generated"

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


# ModelBase.prepare_tensors: "Some tensor types are always in float32" when the arch forces
# nothing (the subset of its list with a {bid} name or a fixed name that ggquant's families can
# produce; the match is on `<name>.weight`, as match_model_tensor_name's default suffix)
ALWAYS_F32 = tuple(re.compile("^" + re.escape(TENSOR_NAMES[t]).replace(re.escape("{bid}"), r"\d+") + r"\.weight$")
                   for t in (MODEL_TENSOR.FFN_GATE_INP, MODEL_TENSOR.FFN_GATE_INP_SHEXP, MODEL_TENSOR.POS_EMBD,
                             MODEL_TENSOR.TOKEN_TYPES))


def choose_type(arch: Arch, hf_name: str, gguf_name: str, shape: tuple[int, ...],
                outtype: GGMLQuantizationType, part: str) -> tuple[GGMLQuantizationType, str]:
    """llama.cpp ModelBase.prepare_tensors type rules for the converter outtypes."""
    n_dims = len(shape)
    forced = arch.force_type(hf_name, gguf_name, n_dims, outtype, part)
    if n_dims <= 1 or gguf_name.endswith("_norm.weight"):
        return T.F32, "1-D or norm -> F32"
    if forced is not None:
        qt, why = forced, f"forced {forced.name}"
    elif not gguf_name.endswith(".weight"):
        return T.F32, "not a .weight -> F32"
    elif part == TEXT and any(p.match(gguf_name) for p in ALWAYS_F32):
        return T.F32, "always F32 (router / position table)"
    else:
        qt, why = outtype, "outtype"
    block = GGML_QUANT_SIZES[qt][0]
    if shape[-1] % block:
        # gguf-py quants raise QuantError; the converter falls back to F16 with a warning
        return T.F16, f"{qt.name} needs rows divisible by {block}, row is {shape[-1]} -> F16"
    return qt, why


def plan_part(arch: Arch, part: str, outtype: GGMLQuantizationType) -> list[TensorPlan]:
    """Every tensor of one output file (text or mmproj), in llama.cpp's order."""
    ckpt = arch.ckpt
    assert ckpt is not None
    plans: list[TensorPlan] = []
    seen: dict[str, str] = {}
    for gname, data in arch.extra_tensors(part):
        data = np.ascontiguousarray(data, dtype=np.float32)
        qt, why = choose_type(arch, gname, gname, data.shape, outtype, part)
        plans.append(TensorPlan(gname, data.shape, qt, "generated; " + why, generated=data))
        seen[gname] = "(generated)"
    for name, src in ckpt.tensors.items():
        belongs = arch.is_text_tensor(name) if part == TEXT else arch.is_mmproj_tensor(name)
        if not belongs:
            continue
        norm = arch.normalize_name(name)
        if arch.skip_tensor(norm, part):
            continue
        if src.dtype not in FLOAT_DTYPES:
            raise GGQuantError(f"{src.file}: tensor '{name}' has dtype {src.dtype}; ggquant converts float "
                               f"checkpoints (F32/F16/BF16) - dequantize it first")
        gname, _ = arch.map_tensor(norm, part, src)
        if gname in seen:
            raise GGQuantError(f"{src.file}: tensors '{seen[gname]}' and '{name}' both map to GGUF tensor '{gname}'")
        seen[gname] = name
        tr = arch.transform(norm, gname, src, part)
        n_outer = arch.n_outer(norm, src, part)
        src_shape = src.shape if src.shape else ()
        shape = tr.shape(((n_outer,) + src_shape[1:]) if src_shape else ())
        qt, why = choose_type(arch, norm, gname, shape, outtype, part)
        plans.append(TensorPlan(gname, tuple(shape), qt, why, src=src, hf_name=name, n_outer=n_outer, transform=tr))
    return plans


@dataclass
class OutFile:
    part: str  # "text" or "mmproj"
    path: Path
    outtype: str  # what the file's name says, e.g. "BF16", "Q4_K_M"
    kv: KV
    tensors: list[TensorPlan]
    imatrix: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def to_json(self) -> dict:
        return {
            "part": self.part, "path": str(self.path), "outtype": self.outtype, "bytes": self.nbytes,
            "tensors": [{"name": t.name, "shape": list(t.shape), "src_dtype": t.src_dtype, "type": t.qtype.name,
                         "bytes": t.nbytes, "source": t.hf_name, "reason": t.reason} | tensor_json(t)
                        for t in self.tensors],
        } | file_json(self)


@dataclass
class Conversion:
    src: Path
    arch: str
    files: list[OutFile]
    seconds: float = 0.0
    written: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"source": str(self.src), "architecture": self.arch, "seconds": round(self.seconds, 3),
                "written": self.written, "files": [f.to_json() for f in self.files]}


def fill_template(name: str, output_type: str) -> str:
    """gguf-py fill_templated_filename: {ftype}/{outtype} lower case, {FTYPE}/{OUTTYPE} upper."""
    if "{" not in name:
        return name
    lo, up = output_type.lower(), output_type.upper()
    try:
        return name.format(lo, outtype=lo, ftype=lo, OUTTYPE=up, FTYPE=up)
    except (KeyError, IndexError, ValueError):
        raise GGQuantError(f"--outfile {name!r}: unknown template field; use {{ftype}} or {{FTYPE}}") from None


def tensor_json(t: TensorPlan) -> dict:
    """Extra --json fields of a tensor that comes from a quantized weight."""
    if not t.source_quant:
        return {}
    rec = t.src.encoding.record
    d: dict[str, Any] = {"source_format": rec.format, "source_encoding": rec.encoding,
                         "source_tensor": t.src.name, "exact": bool(t.exact)}
    if t.sqnr is not None:
        d["sqnr_db"] = round(t.sqnr, 3)
    return d


def file_json(f) -> dict:
    plans = [t for t in f.tensors if t.source_quant]
    if not plans:
        return {}
    return {"source_quantization": f.kv.get(KEY_METHOD), "source_quantization_desc": f.kv.get(KEY_DESC),
            "exact_tensors": sum(1 for t in plans if t.exact),
            "requantized_tensors": sum(1 for t in plans if not t.exact)}


def plan_lines(f) -> list[str]:
    """--dry-run: per quantized weight, its source encoding, GGUF type, exact or lossy (SQNR)."""
    plans = [t for t in f.tensors if t.source_quant]
    if not plans:
        return []
    n_exact = sum(1 for t in plans if t.exact)
    lines = [f"  quantized source: {f.kv.get(KEY_DESC)}: {n_exact} exact, {len(plans) - n_exact} lossy",
             f"  {'tensor':<44} {'source encoding':<52} {'to':>7}  result"]
    for t in plans:
        if t.exact:
            res = "exact"
        else:
            res = "lossy" + (f" (SQNR {t.sqnr:.2f} dB)" if t.sqnr is not None else "")
            res += f": {t.why}"
        lines.append(f"  {t.name:<44} {t.src.encoding.record.encoding:<52} {t.qtype.name:>7}  {res}")
    return lines
