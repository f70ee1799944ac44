"""`ggquant verify Q.gguf --source F.gguf [--imatrix I]`: is Q what quantizing F gives?

Provenance of a published quantization: every tensor of Q is re-derived from the source tensor of
the same name with ggquant's bit-exact quantizers (ggml_quantize_chunk; the imatrix where the type
uses one) into Q's own type, and compared byte for byte, one bounded row chunk at a time. A
tensor is "identical", "differs" (with the first differing row and the RMS of the value
difference, so a different imatrix shows as small noise and a different model as large), or
"missing" from the source / "shape" mismatched. The KV metadata is not compared: it names tools
and files, not weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ggquant.convert.gguf_to_gguf import requantized_chunks
from ggquant.errors import GGQuantError
from ggquant.imatrix import files as imatrix_files
from ggquant.quant import types as qtypes


@dataclass
class TensorCheck:
    name: str
    qtype: str
    status: str  # identical | differs | missing | shape | unsupported
    detail: str = ""

    def to_json(self) -> dict:
        return {"name": self.name, "type": self.qtype, "status": self.status, "detail": self.detail}


@dataclass
class Verification:
    quantized: str
    source: str
    imatrix: str | None
    tensors: list[TensorCheck] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def identical(self) -> bool:
        return all(t.status == "identical" for t in self.tensors)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.status] = out.get(t.status, 0) + 1
        return out

    def to_json(self) -> dict:
        return {"quantized": self.quantized, "source": self.source, "imatrix": self.imatrix,
                "identical": self.identical, "counts": self.counts(), "seconds": round(self.seconds, 3),
                "tensors": [t.to_json() for t in self.tensors]}


def _compare(q, s, dst: qtypes.GGMLType, vec) -> TensorCheck:
    n = q.shape[-1]
    row = 0
    for chunk in requantized_chunks(s, dst, vec):
        theirs = np.asarray(q.block_rows(row, row + chunk.shape[0])).view(np.uint8).reshape(chunk.shape)
        if not np.array_equal(chunk, theirs):
            bad = int(np.nonzero((chunk != theirs).any(axis=1))[0][0])
            a = dst.dequantize(np.ascontiguousarray(chunk), (chunk.shape[0], n)).astype(np.float64)
            b = dst.dequantize(np.ascontiguousarray(theirs), (chunk.shape[0], n)).astype(np.float64)
            rms = float(np.sqrt(np.mean((a - b) ** 2)) / max(np.sqrt(np.mean(b ** 2)), 1e-30))
            return TensorCheck(q.name, dst.qtype.name, "differs",
                               f"first at row {row + bad}; relative RMS difference {rms:.3g} in rows {row}-"
                               f"{row + chunk.shape[0] - 1}")
        row += chunk.shape[0]
    return TensorCheck(q.name, dst.qtype.name, "identical")


def verify_gguf(quantized, source, *, imatrix=None, progress: bool = False) -> Verification:
    from ggquant.formats.gguf import GGUFReader

    t0 = time.perf_counter()
    res = Verification(str(quantized), str(source), str(imatrix) if imatrix else None)
    with GGUFReader(quantized) as qr, GGUFReader(source) as sr:
        im_values = imatrix_files.load(imatrix).normalised() if imatrix else {}
        if imatrix:
            imatrix_files.check_against(im_values, [(t.name, t.shape) for t in sr.tensors], str(imatrix))
        by_name = {t.name: t for t in sr.tensors}
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(qr.tensors), unit="tensor", desc="verify", leave=False)
        for q in qr.tensors:
            s = by_name.get(q.name)
            dst = qtypes.REGISTRY.get(q.qtype)
            if s is None:
                check = TensorCheck(q.name, q.qtype.name, "missing", f"not in {source}")
            elif tuple(s.shape) != tuple(q.shape):
                check = TensorCheck(q.name, q.qtype.name, "shape",
                                    f"{list(q.shape)} here, {list(s.shape)} in the source")
            elif dst is None or dst.quantize_fn is None or qtypes.get(s.qtype).dequantize_fn is None:
                check = TensorCheck(q.name, q.qtype.name, "unsupported",
                                    f"ggquant cannot quantize to {q.qtype.name} from {s.qtype.name}")
            else:
                check = _compare(q, s, dst, im_values.get(q.name) if dst.uses_imatrix else None)
            res.tensors.append(check)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    if not res.tensors:
        raise GGQuantError(f"{quantized}: no tensors to verify")
    res.seconds = time.perf_counter() - t0
    return res
