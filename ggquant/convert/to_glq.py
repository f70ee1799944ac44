"""`ggquant convert MODEL.gguf|HF_DIR --to glq`: the decoder Linears as GLQ e8_shell modules.

Every Linear weight glq can hold is quantized by glq's own per-layer function
(`glq.quantize_model.quantize_layer_e8_shell_rht`, glq 0.8.16; research note glq-format.md §6, §9),
with an identity Hessian (data-free: plain nearest-neighbour residual VQ after the random
Hadamard transforms) or, with --imatrix, the diagonal Hessian diag(in_sum2 / count) of that
weight's input. Everything else of the model passes through as in `--to hf` (GGUF source) or as
stored (Hugging Face folder source).

glq is GPL-3.0 and an optional dependency: it is imported only inside this writer, when a
conversion runs, never when ggquant is imported.

What is written (research note §2, §10, §11), per quantized Linear P with weight [m, n]:
  P.Qidxs, P.Qidxs2..4   I16 [m, n/8]   stage indices ((bpw + 1) // 2 stages)
  P.SU F16 [m], P.SV F16 [n]            +-1 signs of the random Hadamard transforms
  P.Wscale F32 []                       layer scale
  P.inv_resid_scale{,2,3} F32 []        cumulative residual scales; ALWAYS all three, 0 for a stage
                                        the layer does not use: glq's HF loader (transformers 5.x)
                                        leaves absent optional buffers uninitialised and then adds
                                        garbage (or NaN) stages
  P.bias                                kept (glq's own quantize() drops it)
config.json gets quantization_config {quant_method "glq", codebook "e8_shell", block_diagonal true,
codesz 8, bpw, layer_bpw {module: bpw} for every quantized Linear} - every key glq's HF loader
(GLQConfig) and its vLLM plugin (GLQvLLMConfig.from_config) read.

Kept float (and listed with the reason): embeddings, lm_head, vision/audio towers, Linears
outside the decoder layers (glq's quantize() walks the decoder layers only, e.g. Gemma 4's
per_layer_model_projection), and Linears with in_features % 8 != 0 (glq writes ceil(n/8) index
groups but its loader expects floor(n/8): such a layer cannot be loaded, research note §10.4).

Determinism: the sign vectors come from glq's fixed seed 42; the residual scale of the 256-entry
stage (3/5/7 bpw) is glq's random search (compute_paired_resid_scale, unseeded in glq, about 9 s
and 6 GB): it runs once per process under a fixed seed and is reused for every layer, so the
output is reproducible and identical to calling glq per layer with that seed.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ggquant.convert.encode import row_chunks
from ggquant.convert.gguf_to_hf import tensor_chunks
from ggquant.errors import GGQuantError
from ggquant.files import check_overwrite, output_folder

GLQ_PIN = "0.8.16"  # the last glq release installable on Python 3.11 (research note §0.1)
MISSING_GLQ = f"--to glq needs the optional glq package (GPL-3.0): pip install glq=={GLQ_PIN}"
DEFAULT_BPW = 4
BPW_CHOICES = range(2, 9)
CODESZ = 8  # E8: one codebook index per 8 consecutive input columns
SEED = 0  # torch seed for glq's random searches (codebook scales), per layer
STAGES = ("Qidxs", "Qidxs2", "Qidxs3", "Qidxs4")
STAGE_SCALES = ("inv_resid_scale", "inv_resid_scale2", "inv_resid_scale3")
_DECODER_LAYER = re.compile(r"(?:^|\.)layers\.\d+\.")
_TOWERS = ("vision_tower", "audio_tower", "vision_model", "embed_vision", "embed_audio", "multi_modal_projector")


def n_stages(bpw: int) -> int:
    """e8_shell recipe (research note §5.1): 2 bpw one 16-bit stage, each 2 more bpw one more
    stage; odd bpw end with an 8-bit (256-entry) stage stored as int16 too."""
    return (bpw + 1) // 2


def keep_float_reason(name: str, shape: tuple[int, ...]) -> str | None:
    """Why the 2-D Linear weight `name` [out, in] stays float, or None when glq quantizes it."""
    if any(t in name for t in _TOWERS):
        return "vision/audio tower"
    if "embed" in name:
        return "embedding"
    if name.startswith("lm_head") or ".lm_head." in name:
        return "lm_head"
    if not _DECODER_LAYER.search(name):
        return "outside the decoder layers (glq quantizes decoder-layer Linears only)"
    if shape[1] % CODESZ:
        return f"in_features {shape[1]} is not a multiple of {CODESZ} (glq's loader cannot load it)"
    return None


def module_entries(mod: str, shape: tuple[int, int], bpw: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """The safetensors entries (name, dtype, shape) of one GLQ Linear."""
    m, n = shape
    out = [(f"{mod}.{s}", "I16", (m, n // CODESZ)) for s in STAGES[:n_stages(bpw)]]
    out += [(f"{mod}.SU", "F16", (m,)), (f"{mod}.SV", "F16", (n,)), (f"{mod}.Wscale", "F32", ())]
    out += [(f"{mod}.{s}", "F32", ()) for s in STAGE_SCALES]
    return out


# =============================================================================================
# The library (GPL-3.0, optional): imported here only
# =============================================================================================


def import_glq():
    """glq's codebook class and per-layer quantizer, or GGQuantError naming the install command."""
    try:
        import glq  # noqa: F401
        from glq.codebook import E8ShellCodebook
        from glq.quantize_model import quantize_layer_e8_shell_rht
    except ImportError as e:
        raise GGQuantError(MISSING_GLQ) from e
    return E8ShellCodebook, quantize_layer_e8_shell_rht


@dataclass
class _Library:
    version: str
    codebook: object  # glq E8ShellCodebook (the bundled 65,536-entry table)
    quantize_layer: object


@functools.cache
def library() -> _Library:
    """glq, its bundled codebook (checked equal to the table ggquant's GLQ reader decodes with)
    and a per-process cache of the paired residual scale (see the module docstring)."""
    import torch

    from ggquant.formats.quantized.glq import e8_shell_codebook

    cb_cls, quantize_layer = import_glq()
    from importlib.metadata import version

    cb = cb_cls.build(device="cpu", verbose=False)
    if not np.array_equal(cb.codebook.numpy().astype(np.float32), e8_shell_codebook()):
        raise GGQuantError(f"glq {version('glq')}'s bundled E8 codebook differs from the e8_shell table GLQ "
                           f"checkpoints are decoded with; install glq=={GLQ_PIN}")
    paired = cb.compute_paired_resid_scale
    scales: dict = {}

    def paired_once(secondary, n_samples=8_000):
        # glq recomputes this constant for every 3/5/7-bpw layer from fresh random samples
        key = (int(secondary.codebook.shape[0]), n_samples)
        if key not in scales:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(SEED)
                scales[key] = paired(secondary, n_samples)
        return scales[key]

    cb.compute_paired_resid_scale = paired_once  # this instance only; glq's class is untouched
    return _Library(version("glq"), cb, quantize_layer)


def quantize_weight(w: np.ndarray, bpw: int, hdiag: np.ndarray | None = None):
    """One Linear weight float32 [m, n] -> (W_hat float32 [m, n], artifacts {suffix: ndarray}, metrics)
    through glq's quantize_layer_e8_shell_rht; H = I, or diag(hdiag) (imatrix)."""
    import torch

    lib = library()
    m, n = w.shape
    h = torch.eye(n) if hdiag is None else torch.diag(torch.from_numpy(np.ascontiguousarray(hdiag, np.float32)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        w_hat, art, metrics = lib.quantize_layer(torch.from_numpy(np.ascontiguousarray(w, np.float32)), h,
                                                 lib.codebook, bpw=bpw)
    out = {k: v.detach().cpu().numpy() for k, v in art.items()}
    for s in STAGE_SCALES:  # the zero scalars of the unused stages (research note §10.1)
        out.setdefault(s, np.zeros((), np.float32))
    want = {s: ("int16", (m, n // CODESZ)) for s in STAGES[:n_stages(bpw)]}
    want.update(SU=("float16", (m,)), SV=("float16", (n,)), Wscale=("float32", ()))
    want.update({s: ("float32", ()) for s in STAGE_SCALES})
    got = {k: (str(v.dtype), tuple(v.shape)) for k, v in out.items()}
    if got != want:
        raise GGQuantError(f"glq {lib.version} returned artifacts {got} for a [{m}, {n}] weight at {bpw} bpw, "
                           f"expected {want}; install glq=={GLQ_PIN}")
    return w_hat.detach().float().numpy(), out, {k: float(v) for k, v in metrics.items()}


# =============================================================================================
# The Linear hook (shared by the GGUF and the Hugging Face folder sources)
# =============================================================================================


@dataclass
class LayerResult:
    module: str
    shape: tuple[int, int]
    bpw: int
    hessian: str  # "identity" | "imatrix" | "identity (no imatrix entry)"
    sqnr_db: float | None = None  # glq's 10 log10(|W|^2 / |W - W_hat|^2)
    seconds: float | None = None

    def to_json(self) -> dict:
        return {"module": self.module, "shape": list(self.shape), "bpw": self.bpw, "hessian": self.hessian,
                "sqnr_db": None if self.sqnr_db is None else round(self.sqnr_db, 3),
                "seconds": None if self.seconds is None else round(self.seconds, 3)}


class GLQLinears:
    """export_hf's `linears` hook for --to glq: which tensors are written and how, plus the config.

    Each quantized module is quantized once, when the first of its tensors is written, and its
    artifacts are dropped once all of them are (safetensors order groups tensors by dtype).
    keep_reconstruction keeps glq's W_hat per module (tests)."""

    def __init__(self, bpw: int = DEFAULT_BPW, imatrix=None, keep_reconstruction: bool = False):
        if bpw not in BPW_CHOICES:
            raise GGQuantError(f"--bpw {bpw}: GLQ e8_shell supports 2..8 bits per weight")
        self.bpw = int(bpw)
        self.imatrix_path = Path(imatrix) if imatrix else None
        self._imatrix = None
        if self.imatrix_path is not None:
            from ggquant.imatrix import files as imatrix_files

            self._imatrix = imatrix_files.load(self.imatrix_path).normalised()
        self.keep_reconstruction = keep_reconstruction
        self.layers: dict[str, LayerResult] = {}  # quantized module -> result
        self.kept: dict[str, str] = {}  # Linear module left float -> why
        self.reconstruction: dict[str, np.ndarray] = {}
        self._weights: dict[str, object] = {}  # module -> source weight (export tensor)
        self._imatrix_names: dict[str, str] = {}  # module -> imatrix entry name (GGUF tensor name)
        self._pending: dict[str, dict[str, np.ndarray]] = {}
        self._left: dict[str, int] = {}

    # -- planning ---------------------------------------------------------------------------
    def plan(self, weights: list[tuple[str, tuple[int, ...], object, str | None]]) -> None:
        """weights: (tensor name, shape, source handle, imatrix entry name) of every 2-D `.weight`."""
        for name, shape, handle, im_name in weights:
            mod = name[:-len(".weight")]
            why = keep_float_reason(name, shape)
            if why is not None:
                self.kept[mod] = why
                continue
            hessian = "identity"
            if self._imatrix is not None:
                v = self._imatrix.get(im_name) if im_name else None
                if v is None:
                    hessian = "identity (no imatrix entry)"
                else:
                    if v.size != shape[1]:
                        raise GGQuantError(f"{self.imatrix_path}: imatrix entry {im_name} has {v.size} values but "
                                           f"{name} has {shape[1]} input columns; the imatrix was computed for "
                                           f"a different model")
                    if not np.all(np.isfinite(v)):
                        raise GGQuantError(f"{self.imatrix_path}: imatrix entry {im_name} has non-finite values")
                    hessian = "imatrix"
                    self._imatrix_names[mod] = im_name
            self.layers[mod] = LayerResult(mod, (int(shape[0]), int(shape[1])), self.bpw, hessian)
            self._weights[mod] = handle

    def module_of(self, tensor: str) -> str | None:
        """The quantized module a written tensor belongs to (None for a pass-through tensor)."""
        mod, _, suffix = tensor.rpartition(".")
        return mod if mod in self.layers and (suffix in STAGES or suffix in STAGE_SCALES
                                              or suffix in ("SU", "SV", "Wscale")) else None

    def replaced(self, tensor: str) -> bool:
        return tensor.endswith(".weight") and tensor[:-len(".weight")] in self.layers

    def entries_for(self, mod: str) -> list[tuple[str, str, tuple[int, ...]]]:
        e = module_entries(mod, self.layers[mod].shape, self.bpw)
        self._left[mod] = len(e)
        return e

    # -- writing ----------------------------------------------------------------------------
    def module_chunk(self, tensor: str, floats) -> np.ndarray:
        """The bytes of one GLQ tensor; `floats(handle)` gives the source weight as float32 [m, n]."""
        mod = self.module_of(tensor)
        assert mod is not None, tensor
        if mod not in self._pending:
            res = self.layers[mod]
            t0 = time.perf_counter()
            hdiag = self._imatrix[self._imatrix_names[mod]] if mod in self._imatrix_names else None
            w = floats(self._weights[mod])
            if not np.all(np.isfinite(w)):
                raise GGQuantError(f"{mod}.weight has non-finite values; GLQ cannot quantize it")
            w_hat, art, metrics = quantize_weight(w, self.bpw, hdiag)
            res.sqnr_db = metrics["sqnr"]
            res.seconds = time.perf_counter() - t0
            if self.keep_reconstruction:
                self.reconstruction[mod] = w_hat
            self._pending[mod] = art
        arr = self._pending[mod][tensor[len(mod) + 1:]]
        self._left[mod] -= 1
        if self._left[mod] == 0:
            del self._pending[mod]
        return arr

    # -- config and report -------------------------------------------------------------------
    def quantization_config(self) -> dict:
        # uniform bpw: glq writes the int (a mixed map would carry the weighted mean); layer_bpw is
        # written for every quantized Linear, as glq does: vLLM's plugin loads a Linear missing from
        # it as a plain float weight
        return {"quant_method": "glq", "codebook": "e8_shell", "block_diagonal": True, "codesz": CODESZ,
                "bpw": self.bpw, "layer_bpw": {m: self.bpw for m in sorted(self.layers)}}

    def config_json(self, data: bytes) -> bytes:
        cfg = json.loads(data)
        cfg["quantization_config"] = self.quantization_config()
        return (json.dumps(cfg, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

    @property
    def mean_sqnr_db(self) -> float | None:
        v = [r.sqnr_db for r in self.layers.values() if r.sqnr_db is not None]
        return sum(v) / len(v) if v else None

    def to_json(self) -> dict:
        m = self.mean_sqnr_db
        return {"codebook": "e8_shell", "bpw": self.bpw,
                "imatrix": str(self.imatrix_path) if self.imatrix_path else None,
                "mean_sqnr_db": None if m is None else round(m, 3),
                "quantized": [self.layers[k].to_json() for k in sorted(self.layers)],
                "kept_float": [{"module": k, "reason": v} for k, v in sorted(self.kept.items())]}


def _sorted_by_width(entries: list[tuple[str, str, tuple[int, ...]]]) -> list[tuple[str, str, tuple[int, ...]]]:
    """Widest dtype first (as safetensors' own serializer orders them): with mixed dtypes in one
    file, every tensor then starts at a multiple of its element size."""
    from ggquant.formats.hf_writer import DTYPE_BYTES

    return sorted(entries, key=lambda e: -DTYPE_BYTES[e[1]])


class _GGUFHook(GLQLinears):
    """The hook export_hf calls (entries / chunks / config_json) for a GGUF source."""

    def entries(self, export) -> list[tuple[str, str, tuple[int, ...]]]:
        self.plan([(t.name, tuple(t.shape), t, t.gguf_name) for t in export.tensors
                   if t.name.endswith(".weight") and len(t.shape) == 2])
        out = []
        for t in export.tensors:
            if self.replaced(t.name):
                out += self.entries_for(t.name[:-len(".weight")])
            else:
                out.append((t.name, export.dtype, t.shape))
        return _sorted_by_width(out)

    def chunks(self, p, export) -> Iterator[np.ndarray]:
        if self.module_of(p.name) is not None:
            yield self.module_chunk(p.name, _export_floats)
            return
        yield from tensor_chunks(next(t for t in export.tensors if t.name == p.name), export.dtype)


def _export_floats(t) -> np.ndarray:
    """An export tensor (GGUF source, HF layout after the inverse transform) as float32."""
    parts = [np.ascontiguousarray(c).reshape(-1).view(np.uint8) for c in tensor_chunks(t, "F32")]
    return np.concatenate(parts).view(np.float32).reshape(t.shape).copy()


# =============================================================================================
# Entry point
# =============================================================================================


@dataclass
class GLQExport:
    src: Path
    out: Path
    source_kind: str  # "gguf" | "hf"
    arch: str
    dtype: str  # float tensors: the safetensors dtype written ("as stored" for an HF folder)
    linears: GLQLinears
    files: list[str] = field(default_factory=list)
    tensors: list[tuple[str, str, tuple[int, ...]]] = field(default_factory=list)  # what is written
    glq_version: str | None = None
    seconds: float = 0.0
    written: bool = False

    def to_json(self) -> dict:
        return {"source": str(self.src), "source_kind": self.source_kind, "out": str(self.out),
                "architecture": self.arch, "dtype": self.dtype, "written": self.written, "files": self.files,
                "glq_version": self.glq_version, "seconds": round(self.seconds, 3),
                "glq": self.linears.to_json(),
                "tensors": [{"name": n, "dtype": d, "shape": list(s)} for n, d, s in self.tensors]}


def export_glq(src, *, outfile, bpw: int = DEFAULT_BPW, imatrix=None, dtype: str = "auto", mmproj=None,
               force: bool = False, dry_run: bool = False, threads: int | None = None, progress: bool = False,
               keep_reconstruction: bool = False) -> GLQExport:
    """A GGUF (+ mmproj) or a float Hugging Face folder -> a GLQ e8_shell checkpoint folder.

    Output appears only complete (a temporary folder renamed at the end); nothing is written on
    --dry-run or on any error."""
    t0 = time.perf_counter()
    if outfile is None:
        raise GGQuantError("--to glq needs --outfile DIR (the GLQ checkpoint folder to create)")
    version = None
    if not dry_run:
        import_glq()  # fail before planning or writing anything
        version = library().version
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    hook_args = dict(bpw=bpw, imatrix=imatrix, keep_reconstruction=keep_reconstruction)
    if Path(src).is_dir():
        if mmproj is not None:
            raise GGQuantError("--to glq from a Hugging Face folder: --mmproj does not apply (the towers in the "
                               "folder are kept as they are)")
        if dtype != "auto":
            raise GGQuantError("--to glq from a Hugging Face folder keeps the float tensors as stored; drop --dtype")
        res = _export_hf_folder(Path(src), Path(outfile), GLQLinears(**hook_args), force=force, dry_run=dry_run,
                                progress=progress)
    else:
        from ggquant.convert.gguf_to_hf import export_hf

        hook = _GGUFHook(**hook_args)
        e = export_hf(src, outfile=outfile, dtype=dtype, mmproj=mmproj, force=force, dry_run=dry_run,
                      threads=threads, progress=progress, linears=hook)
        res = GLQExport(e.src, e.out, "gguf", e.arch, e.dtype, hook, e.files, _written_tensors(e, hook),
                        written=e.written)
    res.glq_version = version
    res.seconds = time.perf_counter() - t0
    return res


def _written_tensors(e, hook: GLQLinears) -> list[tuple[str, str, tuple[int, ...]]]:
    out = []
    for t in e.tensors:
        if hook.replaced(t.name):
            out += module_entries(t.name[:-len(".weight")], hook.layers[t.name[:-len(".weight")]].shape, hook.bpw)
        else:
            out.append((t.name, e.dtype, tuple(t.shape)))
    return out


# --- a Hugging Face folder source ----------------------------------------------------------------


def _hf_imatrix_names(model_dir: Path, config: dict, ckpt) -> dict[str, str]:
    """HF tensor name -> GGUF tensor name (the imatrix's keys), through the arch's name tables."""
    from ggquant.arch import arch_class
    from ggquant.arch.base import TEXT
    from ggquant.formats.hf_folder import hf_architecture

    cls = arch_class(hf_architecture(config, model_dir / "config.json"), str(model_dir / "config.json"))
    arch = cls(model_dir, config, ckpt)
    out = {}
    for name, src in ckpt.tensors.items():
        if len(src.shape) != 2 or not arch.is_text_tensor(name):
            continue
        norm = arch.normalize_name(name)
        if arch.skip_tensor(norm, TEXT):
            continue
        out[name] = arch.map_tensor(norm, TEXT, src)[0]
    return out


def _export_hf_folder(model_dir: Path, out: Path, hook: GLQLinears, *, force: bool, dry_run: bool,
                      progress: bool) -> GLQExport:
    from ggquant.convert.gguf_to_hf import DEFAULT_MAX_SHARD_BYTES
    from ggquant.formats.hf_writer import DTYPE_BYTES, SafetensorsWriter
    from ggquant.formats.safetensors import FLOAT_DTYPES, open_checkpoint

    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise GGQuantError(f"{model_dir}: no config.json; pass a Hugging Face model folder or a GGUF file")
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    qc = config.get("quantization_config") or config.get("text_config", {}).get("quantization_config")
    if qc:
        raise GGQuantError(f"{model_dir}: already quantized (quant_method {qc.get('quant_method')!r}); --to glq "
                           f"quantizes float weights: convert it to GGUF first (ggquant convert {model_dir}) and "
                           f"convert that GGUF --to glq")
    check_overwrite([out], force)
    if out.exists() and not out.is_dir():
        raise GGQuantError(f"{out} exists and is not a folder; --to glq writes a folder")
    ckpt = open_checkpoint(model_dir)
    try:
        im_names = _hf_imatrix_names(model_dir, config, ckpt) if hook.imatrix_path else {}
        hook.plan([(n, t.shape, t, im_names.get(n)) for n, t in ckpt.tensors.items()
                   if n.endswith(".weight") and len(t.shape) == 2 and t.dtype in FLOAT_DTYPES])
        entries = []
        for name, t in ckpt.tensors.items():
            if hook.replaced(name):
                entries += hook.entries_for(name[:-len(".weight")])
            elif t.dtype not in DTYPE_BYTES:
                raise GGQuantError(f"{t.file}: tensor '{name}' has dtype {t.dtype}, which --to glq does not copy "
                                   f"(F32, F16, BF16, I16, I32, I64)")
            else:
                entries.append((name, t.dtype, t.shape))
        planned = list(entries)
        writer = SafetensorsWriter(out, _sorted_by_width(entries), DEFAULT_MAX_SHARD_BYTES)
        side = [p for p in sorted(model_dir.iterdir()) if p.is_file() and not p.name.endswith(".safetensors")
                and p.name != "model.safetensors.index.json"]
        res = GLQExport(model_dir, out, "hf", "/".join(config.get("architectures") or ["?"]), "as stored", hook,
                        sorted([p.name for p in side] + writer.file_names()), planned)
        if dry_run:
            return res
        with output_folder(out) as tmp:
            writer.folder = tmp
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=writer.total_bytes, unit="B", unit_scale=True, desc="glq", leave=False,
                           file=sys.stderr)

            def produce(p):
                if hook.module_of(p.name) is not None:
                    yield hook.module_chunk(p.name, lambda t: t.float_rows(0, t.n_outer).copy())
                    return
                t = ckpt[p.name]
                for a, b in row_chunks(t.n_outer, t.outer_bytes // 4):
                    yield t.rows(a, b) if t.shape else t.rows(0, 1)
                    t.release(a, b)

            try:
                writer.write(produce, progress=(lambda name, n: bar.update(n)) if bar is not None else None)
            finally:
                if bar is not None:
                    bar.close()
            for p in side:
                data = p.read_bytes()
                (tmp / p.name).write_bytes(hook.config_json(data) if p.name == "config.json" else data)
        res.written = True
        return res
    finally:
        ckpt.close()


# =============================================================================================
# Report
# =============================================================================================


def format_glq(r: GLQExport, dry_run: bool = False) -> str:
    lin = r.linears
    head = "would write" if dry_run else "wrote"
    lines = [f"{head} {r.out} (GLQ e8_shell {lin.bpw} bpw, {r.arch}, float tensors {r.dtype}; from {r.source_kind} "
             f"{r.src})"]
    lines.append(f"  {'module':<56} {'shape':<12} {'bpw':>3} {'hessian':<9} {'SQNR dB':>8}")
    for k in sorted(lin.layers):
        x = lin.layers[k]
        sq = "" if x.sqnr_db is None else f"{x.sqnr_db:8.2f}"
        lines.append(f"  {k:<56} {'x'.join(map(str, x.shape)):<12} {x.bpw:>3} {x.hessian.split()[0]:<9} {sq:>8}")
    for k, why in sorted(lin.kept.items()):
        lines.append(f"  {k:<56} kept float: {why}")
    m = lin.mean_sqnr_db
    tail = f"  {len(lin.layers)} Linears quantized, {len(lin.kept)} kept float"
    if m is not None:
        tail += f"; mean SQNR {m:.2f} dB"
    lines.append(tail)
    lines.append(f"  files: {', '.join(r.files)}")
    if not dry_run:
        lines.append(f"{r.src}: converted in {r.seconds:.1f} s (glq {r.glq_version})")
    return "\n".join(lines)


__all__ = ["BPW_CHOICES", "DEFAULT_BPW", "GLQExport", "GLQLinears", "MISSING_GLQ", "export_glq", "format_glq",
           "import_glq", "keep_float_reason", "library", "module_entries", "quantize_weight"]
