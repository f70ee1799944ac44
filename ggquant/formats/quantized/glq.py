"""GLQ checkpoints (E8 lattice codebook + randomized Hadamard transforms), codebook "e8_shell".

Facts from shared/research/glq-format.md (glq 0.8.16/0.8.31, measured); this module is written
from that spec and never imports glq (GPL-3.0), which only the tests use as an oracle.

config.json quantization_config: quant_method "glq", codebook "e8_shell" (others: "e8p" needs
CUDA kernels, "trellis"/"e8_relaxed" are other formats: refused), codesz 8, block_diagonal,
bpw, layer_bpw {module path: 2..8} (the nominal bpw; 3/5/7 look like 4/6/8 on disk).

Tensors per quantized Linear P (W [m, n]; m_pad = len(SU), n_pad = len(SV)):
  P.Qidxs, P.Qidxs2..4  I16 [m_pad, ceil(n_pad/8)]  stage indices (read as uint16), one per 8 columns
  P.SU F16 [m_pad], P.SV F16 [n_pad]                 +-1 row / column signs
  P.Wscale F32 []                                    layer scale
  P.inv_resid_scale, ...2, ...3 F32 []               c_2..c_4 (cumulative); absent or 0: no stage
  W_rht = Wscale * sum_s c_s * CB[Qidxs_s]          (c_1 = 1; every stage uses the same table)
  W     = diag(SU) . H_m . (W_rht . H_n) . diag(SV)  H_k block-diagonal Sylvester-Hadamard over the
                                                     binary expansion of k, largest block first,
                                                     each block normalised by 1/sqrt(block)
Block-diagonal checkpoints (glq >= 0.2.9) have m_pad = m, n_pad = n; legacy ones pad both to
powers of two (the record then has the padded shape: `cropped(m, n)` gives the true weight).
Quantized embeddings (Gemma 4 per-layer embeddings): per-row Wscale [vocab] (and per-row
inv_resid_scale), SV [n_pad] with n_pad a power of two, SU unused, right-side transform only:
row = (sum_s c_s * CB[idx_s]) * Wscale_row . H_n . diag(SV).
glq's quantizer drops the biases of quantized Linears; a P.bias that is present passes through.

The codebook: 65,536 E8 lattice vectors (shells 0-5 complete plus 8,655 of norm^2 12) in the
order torch's unstable argsort puts them: shipped as data (data/e8_shell_codebook.npz, int8 of
2*value, 171 kB) and checked by SHA-256; `derive_e8_shell_codebook` rebuilds it from the lattice.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from ggquant.errors import FormatError, GGQuantError
from ggquant.formats.quantized import reader
from ggquant.formats.quantized.records import QuantizedModel, QuantizedTensor, Source, rows_range

__all__ = ["read", "e8_shell_codebook", "derive_e8_shell_codebook", "GLQTensor", "CODEBOOK_SHA256",
           "SUGGESTED_TYPES", "block_sizes", "fht"]

CODEBOOK_FILE = Path(__file__).with_name("data") / "e8_shell_codebook.npz"
CODEBOOK_ROWS = 65536
# SHA-256 of the float32 little-endian [65536, 8] table (research note §4).
CODEBOOK_SHA256 = "c46821e43e5a573cc3431a06377121bc3b7d694e6ae0d20cb8e765c97b47cff7"
_STAGES = ("Qidxs", "Qidxs2", "Qidxs3", "Qidxs4")
_STAGE_SCALES = (None, "inv_resid_scale", "inv_resid_scale2", "inv_resid_scale3")
# GGML type for a GLQ layer by nominal bpw: at least one step above it (research note §11), since
# no GGML type holds GLQ values exactly and requantizing costs about 1.8 dB at equal bpw.
SUGGESTED_TYPES = {2: T.Q4_K, 3: T.Q5_K, 4: T.Q6_K, 5: T.Q6_K, 6: T.Q8_0, 7: T.Q8_0, 8: T.Q8_0}
_REFUSED_CODEBOOKS = {
    "e8p": "e8p packs indices for CUDA tensor-core kernels and has no CPU decoder",
    "trellis": "trellis (QTIP) is a different bitstream format",
    "e8_relaxed": "e8_relaxed is meant for the KV cache",
}


@functools.cache
def e8_shell_codebook() -> np.ndarray:
    """The 65536x8 float32 E8 codebook, verified against its SHA-256."""
    with np.load(CODEBOOK_FILE) as z:
        cb = z["codebook_x2"].astype(np.float32) / np.float32(2)
    digest = hashlib.sha256(np.ascontiguousarray(cb, dtype="<f4").tobytes()).hexdigest()
    if cb.shape != (CODEBOOK_ROWS, 8) or digest != CODEBOOK_SHA256:
        raise FormatError(f"{CODEBOOK_FILE}: the E8 codebook table is damaged (SHA-256 {digest}, expected "
                          f"{CODEBOOK_SHA256}); reinstall ggquant")
    cb.setflags(write=False)
    return cb


def derive_e8_shell_codebook() -> np.ndarray:
    """Rebuild the table from the lattice (needs torch for its sort; about 10 s).

    E8 = D8 u (D8 + 1/2). Every point with norm^2 <= 12.5 (117,361 of them) is written in the
    generator basis (2,0,..,0), (-1,1,0,..), .., (0,..,-1,1,0), (1/2,..,1/2); glq enumerates them
    with z_7 outermost and z_0 innermost, each ascending, i.e. in lexicographic (z_7, .., z_0)
    order; then torch's default (unstable) argsort of the float64 norms^2 gives the order and the
    first 65,536 rows are kept. numpy's stable sort gives a different table.
    """
    import torch

    basis = np.zeros((8, 8))
    basis[0, 0] = 2
    for i in range(1, 7):
        basis[i, i - 1], basis[i, i] = -1, 1
    basis[7, :] = 0.5
    pts = []
    for twice, lo, hi, step in ((False, -3, 3, 1), (True, -7, 7, 2)):
        axis = np.arange(lo, hi + 1, step, dtype=np.int8)
        grid = np.stack(np.meshgrid(*([axis] * 8), indexing="ij"), -1).reshape(-1, 8)
        sq = (grid.astype(np.int32) ** 2).sum(1)
        s = grid.astype(np.int32).sum(1)
        if twice:  # 2v with odd coordinates: v half-integer, norm^2 = sq/4, sum even <=> s % 4 == 0
            keep = (sq <= 50) & (s % 4 == 0)
            pts.append(grid[keep].astype(np.float64) / 2)
        else:
            keep = (sq <= 12) & (s % 2 == 0)
            pts.append(grid[keep].astype(np.float64))
    v = np.concatenate(pts)
    z = np.rint(v @ np.linalg.inv(basis)).astype(np.int64)
    z = z[np.lexsort(tuple(z[:, j] for j in range(8)))]
    v = z @ basis
    order = torch.from_numpy((v ** 2).sum(1)).argsort().numpy()
    return v[order][:CODEBOOK_ROWS].astype(np.float32)


def block_sizes(n: int) -> list[int]:
    """Binary expansion of n, largest power of two first (glq's block-diagonal Hadamard)."""
    out = []
    while n:
        p = 1 << (n.bit_length() - 1)
        out.append(p)
        n -= p
    return out


def fht(x: np.ndarray) -> np.ndarray:
    """Orthonormal Sylvester-Hadamard transform along the last axis (power-of-two length, natural
    order: H[i, j] = (-1)^popcount(i & j) / sqrt(n))."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    y = np.array(x, dtype=np.float64)
    h = 1
    while h < n:
        y = y.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = np.stack((a + b, a - b), axis=-2)
        h *= 2
    return y.reshape(*lead, n) / np.sqrt(n)


def _block_fht(x: np.ndarray, sizes: list[int]) -> np.ndarray:
    out = np.empty_like(x)
    o = 0
    for b in sizes:
        out[..., o:o + b] = fht(x[..., o:o + b])
        o += b
    return out


class GLQTensor(QuantizedTensor):
    """A GLQ e8_shell weight (Linear, or embedding when `embedding` is True)."""

    def __init__(self, name, shape, encoding, sources, bpw: int | None, src: Source, mod: str,
                 stages: list[tuple[str, str | None]], embedding: bool, padded: bool):
        super().__init__(name, shape, encoding, "glq/e8_shell", sources, bpw)
        self.bpw = bpw
        self.embedding = embedding
        self.padded = padded  # stored (padded) shape may exceed the true weight: see cropped()
        self.suggested_type = SUGGESTED_TYPES.get(bpw, T.Q8_0)
        self._src, self._mod, self._stages = src, mod, stages
        self._crop = shape

    def cropped(self, out: int, n: int) -> GLQTensor:
        """The true [out, n] weight of a padded (legacy pow2 or embedding) layout."""
        m_pad, n_pad = self._padded_shape()
        if not (0 < out <= m_pad and 0 < n <= n_pad):
            raise GGQuantError(f"{self.name}: cannot crop the stored [{m_pad}, {n_pad}] weight to [{out}, {n}]")
        new = GLQTensor(self.name, (out, n), self.encoding, self.sources, self.bpw, self._src, self._mod,
                        self._stages, self.embedding, False)
        return new

    def _padded_shape(self) -> tuple[int, int]:
        m_pad = self._src.shape(f"{self._mod}.Qidxs")[0]
        n_pad = self._src.shape(f"{self._mod}.SV")[0]
        return m_pad, n_pad

    def _decode(self, a: int, b: int) -> np.ndarray:
        """float64 sum_s c_s * CB[idx_s] for stored rows [a, b), [rows, n_pad]."""
        cb = e8_shell_codebook()
        n_pad = self._src.shape(f"{self._mod}.SV")[0]
        acc = None
        for idx_name, scale_name in self._stages:
            idx = self._src.ints(idx_name, (a, b), allowed=("I16",)).view(np.uint16)
            vals = cb[idx.astype(np.int64)].reshape(b - a, -1)[:, :n_pad].astype(np.float64)
            if scale_name is None:
                acc = vals
            else:
                c = self._src.floats(scale_name).astype(np.float64)
                c = c.reshape(-1)[a:b, None] if c.size > 1 else c.reshape(())
                acc = acc + c * vals
        return acc

    def dequantize(self, rows=None) -> np.ndarray:
        a, b = rows_range(rows, self.shape[0])
        m_pad, n_pad = self._padded_shape()
        src, mod = self._src, self._mod
        sv = src.floats(f"{mod}.SV").astype(np.float64)
        wscale = src.floats(f"{mod}.Wscale").astype(np.float64)
        if self.embedding:
            w = self._decode(a, b) * wscale.reshape(-1)[a:b, None]
            w = fht(w) * sv  # single power-of-two block (n_pad)
            return w[:, : self.shape[1]].astype(np.float32)
        if b == a:
            return np.zeros((0, self.shape[1]), dtype=np.float32)
        # The left transform mixes rows inside each of its blocks: decode the blocks that hold [a, b).
        sizes = block_sizes(m_pad)
        starts = np.cumsum([0] + sizes)
        i0 = int(np.searchsorted(starts, a, side="right")) - 1
        i1 = int(np.searchsorted(starts, b, side="left"))
        lo, hi = int(starts[i0]), int(starts[i1])
        w = self._decode(lo, hi) * float(wscale.reshape(()))
        w = _block_fht(w, block_sizes(n_pad)) * sv
        w = _block_fht(w.T, sizes[i0:i1]).T
        w = src.floats(f"{mod}.SU", (lo, hi)).astype(np.float64)[:, None] * w
        return w[a - lo: b - lo, : self.shape[1]].astype(np.float32)

    def blocks(self, rows=None):
        return ("GLQ values are E8 lattice vectors rotated by Hadamard transforms: no GGML block type "
                f"holds them (F32 does); suggested type {self.suggested_type.name}")


# Artifacts with one entry per output row, and those a row-split copy shares (quantize_model.py
# _ROW_ARTS / _SHARED_ARTS in glq 0.8.16).
_ROW_ARTS = ("SU",) + _STAGES
_SHARED_ARTS = ("SV", "Wscale") + tuple(sc for sc in _STAGE_SCALES if sc)
_ARRAY_TAGS = {np.dtype(np.int16): "I16", np.dtype(np.float16): "F16", np.dtype(np.float32): "F32"}


def joint_rows(name: str, parts: list[GLQTensor]) -> GLQTensor | None:
    """glq quantizes some matrices jointly and stores them split by rows: Gemma 4's experts
    (glq 0.8.16 quantize_model.quantize, the is_gemma4 branch, then _split_gate_up_arts): each
    expert's gate_up_proj [2F, H] is one GLQ matrix whose row artifacts (Qidxs*, SU) are split at F
    into experts.<e>.gate_proj / up_proj and whose shared ones (SV, Wscale, inv_resid_scale*) are
    duplicated. The left Hadamard transform mixes rows across the split, so such parts decode only
    together: the record `name` over their rows in order, or None when the parts were quantized
    apart (their shared artifacts differ) and each decodes on its own."""
    first = parts[0]
    src = first._src
    if len(parts) < 2 or any(p.embedding or p.padded or p.shape[1] != first.shape[1] for p in parts):
        return None
    if any([sc for _, sc in p._stages] != [sc and sc.replace(first._mod, p._mod, 1) for _, sc in first._stages]
           for p in parts[1:]):
        return None
    for k in _SHARED_ARTS:
        names = [f"{p._mod}.{k}" for p in parts]
        if any(n in src for n in names) and not all(
                n in src and np.array_equal(src.raw(n)[0], src.raw(names[0])[0]) for n in names):
            return None
    mod = name[: -len(".weight")]

    def get(n: str) -> np.ndarray:
        k = n[len(mod) + 1:]
        arrs = [src.raw(f"{p._mod}.{k}")[0] for p in (parts if k in _ROW_ARTS else parts[:1])]
        for a in arrs:
            if a.dtype not in _ARRAY_TAGS:  # (Source reads a numpy array's tag from its dtype)
                raise FormatError(f"GLQ tensor '{parts[0]._mod}.{k}' has numpy dtype {a.dtype}; expected "
                                  f"I16, F16 or F32")
        return np.concatenate(arrs) if k in _ROW_ARTS else arrs[0]

    keys = [k for k in _ROW_ARTS + _SHARED_ARTS if f"{first._mod}.{k}" in src]
    joint = Source([f"{mod}.{k}" for k in keys], get)
    stages = [(f"{mod}.{st[len(first._mod) + 1:]}", sc and f"{mod}.{sc[len(first._mod) + 1:]}")
              for st, sc in first._stages]
    rows = sum(p.shape[0] for p in parts)
    enc = f"{first.encoding}, quantized jointly and stored as {len(parts)} row blocks"
    return GLQTensor(name, (rows, first.shape[1]), enc, tuple(x for p in parts for x in p.sources), first.bpw,
                     joint, mod, stages, False, False)


@reader("glq")
def read(config: dict, src: Source, method: str) -> QuantizedModel:
    qc = config["quantization_config"]
    codebook = str(qc.get("codebook", "e8_shell"))
    if codebook != "e8_shell":
        why = _REFUSED_CODEBOOKS.get(codebook, "unknown codebook")
        raise GGQuantError(f"GLQ codebook {codebook!r} is not supported ({why}); ggquant reads e8_shell")
    codesz = int(qc.get("codesz", 8))
    if codesz != 8:
        raise GGQuantError(f"GLQ codesz {codesz} is not supported (e8_shell uses 8)")
    layer_bpw = qc.get("layer_bpw") or {}
    default_bpw = qc.get("bpw")
    tensors = {}
    consumed: set[str] = set()
    notes: list[str] = []
    for name in src.names:
        if not name.endswith(".Qidxs"):
            continue
        mod = name[: -len(".Qidxs")]
        where = f"module '{mod}' (GLQ e8_shell)"
        for need in ("SU", "SV", "Wscale"):
            if f"{mod}.{need}" not in src:
                raise FormatError(f"{where}: tensor '{mod}.{need}' is missing")
        qshape = src.shape(name)
        n_pad = src.shape(f"{mod}.SV")[0]
        su = src.shape(f"{mod}.SU")
        wscale_shape = src.shape(f"{mod}.Wscale")
        embedding = len(wscale_shape) == 1 and wscale_shape[0] == qshape[0] and qshape[0] > 1
        m_pad = qshape[0]
        if len(qshape) != 2 or qshape[1] != -(-n_pad // 8):
            raise FormatError(f"{where}: Qidxs has shape {list(qshape)}, expected [rows, ceil({n_pad}/8)]")
        if not embedding and su != (m_pad,):
            raise FormatError(f"{where}: SU has shape {list(su)}, expected [{m_pad}]")
        stages: list[tuple[str, str | None]] = []
        sources = [name, f"{mod}.SU", f"{mod}.SV", f"{mod}.Wscale"]
        for i, (st, sc) in enumerate(zip(_STAGES, _STAGE_SCALES)):
            sname = f"{mod}.{st}"
            scname = f"{mod}.{sc}" if sc else None
            if scname and scname in src:
                sources.append(scname)
            if sname not in src:
                continue
            sources.append(sname)
            if src.shape(sname) != qshape:
                raise FormatError(f"{where}: {st} has shape {list(src.shape(sname))}, expected {list(qshape)}")
            if i and (scname not in src or not np.any(src.floats(scname))):
                continue  # a stage without a (non-zero) scale contributes nothing (research note §3)
            stages.append((sname, scname))
        bpw = layer_bpw.get(mod, default_bpw if isinstance(default_bpw, int) else None)
        if bpw is not None:
            bpw = int(bpw)
            if not 2 <= bpw <= 8:
                raise GGQuantError(f"{where}: layer_bpw {bpw} is not supported (2..8)")
            if len(stages) != (bpw + 1) // 2:
                raise FormatError(f"{where}: layer_bpw says {bpw} bpw ({(bpw + 1) // 2} stages) but the checkpoint "
                                  f"stores {len(stages)} stage(s)")
        padded = embedding or (qc.get("block_diagonal") is False) or len(su) > m_pad
        enc = (f"GLQ e8_shell {bpw if bpw is not None else '?'} bpw, {len(stages)} stage(s)"
               + (" embedding" if embedding else ""))
        rec = GLQTensor(f"{mod}.weight", (m_pad, n_pad), enc, tuple(sources), bpw, src, mod, stages, embedding,
                        padded)
        tensors[rec.name] = rec
        consumed.update(sources)
    if any(t.padded for t in tensors.values()):
        notes.append("some GLQ tensors are stored padded to powers of two; crop them to the model's true "
                     "shapes (GLQTensor.cropped)")
    desc = f"GLQ e8_shell {qc.get('bpw', '?')} bpw ({len(tensors)} quantized tensors)"
    if tensors and not any(f"{n[: -len('.weight')]}.bias" in src for n in tensors):
        notes.append("no quantized layer has a bias: glq's quantizer drops them, so an architecture with "
                     "attention/MLP biases cannot be recovered from this checkpoint")
    return QuantizedModel("glq", desc, tensors, frozenset(consumed), notes, dict(qc))
