"""The plan of a conversion and its report: what each output file will hold, decided before any
payload is computed, and the same record rendered for --json and --dry-run by every job.

    Conversion          one run: its source, architecture and output files
      OutFile           one GGUF: part (text / mmproj), path, metadata (KV), tensors
        TensorPlan      one tensor: GGUF name, shape, type, why, where its rows come from
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ggquant.arch.base import KV, TensorPlan
from ggquant.errors import GGQuantError

# GGUF metadata of every file holding a quantized checkpoint's weights (ggquant.convert.quantized)
KEY_METHOD = "ggquant.source.quantization"
KEY_DESC = "ggquant.source.quantization_desc"
KEY_EXACT = "ggquant.source.exact_tensors"
KEY_REQUANTIZED = "ggquant.source.requantized_tensors"


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
