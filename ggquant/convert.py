"""`ggquant convert SRC --to gguf`: a Hugging Face folder -> GGUF (text, and the mmproj sidecar).

(`--to hf`, the reverse direction, lives in ggquant.export_hf; this module's command dispatches.)

The data flow of DESIGN.md, one streaming pass:

    formats.safetensors (reader) -> arch (names, transforms, metadata) -> plan (types)
        -> encode (row chunks: widen to f32, transform, quantize) -> formats.gguf (writer)

For --outtype f32/f16/bf16/q8_0 the result is byte-identical to llama.cpp's
convert_hf_to_gguf.py (same tensors, order, names, shapes, types, data and metadata; the
deliberate differences are listed in the README). For a llama-quantize preset (Q4_K_M, ...)
the result equals `llama_model_quantize` applied to ggquant's own F32 GGUF of the model: the F32
plan and metadata are built, llama-quantize's mixture rules (ggquant.quant.presets) choose each
tensor's type, and every tensor is encoded straight from the safetensors rows.

Everything that can be wrong with the input is checked before the first byte is written, and
outputs appear only complete (temporary file + rename); a failure removes what this run wrote.

Deliberate differences from convert_hf_to_gguf.py (everything else is byte-identical):
- general.* provenance comes from the resolved folder name (llama.cpp uses the path as typed,
  so `convert .` names the model ""); llama.cpp's --metadata override file and --model-name
  are not supported.
- tokenizer.chat_templates (two or more named extra templates): gguf-py lists the names in
  Python-set order, which changes from run to run; ggquant keeps the files' (sorted) order.
- inputs llama.cpp converts into GGUFs it cannot load (vocab sizes that disagree, a KV-sharing
  layout whose last two unshared layers are not sliding-then-full, missing tensors, shapes that
  contradict config.json, a Gemma 4 tokenizer without merges) are refused instead.
- q8_0 is the converter's Q8_0; the llama-quantize presets (Q4_K_M, ...) quantize an F32 plan,
  and the mmproj of a preset conversion is written as F16 (llama-quantize does not quantize it).
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, Keys, LlamaFileType

from ggquant.arch import arch_class
from ggquant.arch.base import (CONVERTER_OUTTYPES, KV, MMPROJ, TEXT, Arch, TensorPlan, hf_architecture, load_config,
                               plan_part)
from ggquant.arch.provenance import General, naming_convention, weight_count_label
from ggquant.errors import GGQuantError
from ggquant.convert_quantized import (QuantizedSourceTensor, attach_quantized, file_json, finish_plan, measure_lossy,
                                       plan_lines, tensor_json)
from ggquant.formats.safetensors import open_checkpoint

T = GGMLQuantizationType
CHUNK_BYTES = 32 << 20  # float32 working set of one chunk
MMPROJ_TYPE_FOR_PRESETS = "f16"  # llama-quantize does not quantize mmproj files; f16 is the usual choice


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


# =============================================================================================
# Planning
# =============================================================================================


def _auto_outtype(arch: Arch) -> str:
    """llama.cpp --outtype auto: the dtype of the first 2-D+ text tensor (bf16 or f16), else f16."""
    assert arch.ckpt is not None
    for name, t in arch.ckpt.tensors.items():
        if arch.is_text_tensor(name) and t.ndim >= 2:
            return {"BF16": "bf16", "F16": "f16"}.get(t.dtype, "f16")
    return "f16"


def _fill_template(name: str, output_type: str) -> str:
    """gguf-py fill_templated_filename: {ftype}/{outtype} lower case, {FTYPE}/{OUTTYPE} upper."""
    if "{" not in name:
        return name
    lo, up = output_type.lower(), output_type.upper()
    try:
        return name.format(lo, outtype=lo, ftype=lo, OUTTYPE=up, FTYPE=up)
    except (KeyError, IndexError, ValueError):
        raise GGQuantError(f"--outfile {name!r}: unknown template field; use {{ftype}} or {{FTYPE}}") from None


def _text_file(arch: Arch, outtype: str, preset: LlamaFileType | None, rules, imatrix_path, outfile) -> OutFile:
    base = T.F32 if preset is not None else CONVERTER_OUTTYPES[outtype][0]
    file_type = 0 if preset is not None else CONVERTER_OUTTYPES[outtype][1]
    tensors = plan_part(arch, TEXT, base)
    total = sum(t.n_elements for t in tensors)
    general = General.derive(arch.dir, total)
    kv = KV()
    kv.string(Keys.General.ARCHITECTURE, arch.gguf_arch)
    kv.string(Keys.General.TYPE, "model")
    general.write(kv)
    arch.text_metadata(kv, file_type)
    kv.u32(Keys.General.QUANTIZATION_VERSION, GGML_QUANT_VERSION)
    arch.vocab(kv)
    name_type = CONVERTER_LABELS[outtype] if preset is None else outtype.upper()
    im: dict[str, np.ndarray] = {}
    if preset is not None:
        tensors, kv, im = _apply_preset(arch, tensors, kv, preset, rules, imatrix_path)
    if outfile is None:
        path = arch.dir / f"{naming_convention(general, general.size_label, name_type)}.gguf"
    elif outfile.is_dir():
        path = outfile / f"{naming_convention(general, general.size_label, name_type)}.gguf"
    else:
        path = outfile.parent / _fill_template(outfile.name, name_type)
    return OutFile(TEXT, path, name_type, kv, tensors, im)


CONVERTER_LABELS = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}


def _apply_preset(arch: Arch, tensors: list[TensorPlan], kv: KV, ftype: LlamaFileType, rules, imatrix_path):
    """llama_model_quantize on the F32 plan: types from the mixture rules, tensors in the
    loader's order, metadata re-keyed as llama-quantize does (requantize.quantize_gguf)."""
    from ggquant.imatrix import files as imatrix_files
    from ggquant.quant import presets
    from ggquant.quant import types as qtypes
    from ggquant.quant.requantize import (_DROPPED_KEYS, KEY_IMATRIX_DATASET, KEY_IMATRIX_FILE,
                                          KEY_IMATRIX_N_CHUNKS, KEY_IMATRIX_N_ENTRIES)

    im = imatrix_files.load(imatrix_path) if imatrix_path else None
    im_values = im.normalised() if im else {}
    if im:
        imatrix_files.check_against(im_values, [(t.name, t.shape) for t in tensors], str(imatrix_path))
    info = presets.ModelInfo.from_fields(kv.get)
    mixture = presets.Mixture(ftype, info, rules, has_imatrix=im is not None)
    by_name = {t.name: t for t in tensors}
    choices = mixture.plan([(t.name, t.shape, t.qtype) for t in tensors])
    out = []
    for c in choices:
        t = by_name[c.name]
        if c.requires_imatrix and c.name not in im_values:
            raise GGQuantError(f"tensor {c.name}: {c.dst_type.name} needs an importance matrix; pass --imatrix FILE")
        qtypes.get(c.dst_type).check_row(c.shape[-1], c.name)
        t.qtype = c.dst_type
        t.reason = f"{ftype.name}: {c.reason}"
        out.append(t)
    q = KV()
    for key, item in kv.items.items():
        if key not in _DROPPED_KEYS:
            q.items[key] = item
    q.u32(Keys.General.QUANTIZATION_VERSION, GGML_QUANT_VERSION)
    q.u32(Keys.General.FILE_TYPE, int(ftype))
    if im:
        q.string(KEY_IMATRIX_FILE, str(imatrix_path)[:127])
        if im.datasets:
            q.string(KEY_IMATRIX_DATASET, im.datasets[0][:127])
        q.u32(KEY_IMATRIX_N_ENTRIES, len(im_values))
        if im.chunk_count > 0:
            q.u32(KEY_IMATRIX_N_CHUNKS, im.chunk_count)
    vectors = {n: v for n, v in im_values.items() if n in by_name}
    return out, q, vectors


def _mmproj_file(arch: Arch, outtype: str, text_out: Path | None, text_label: str | None,
                 explicit: Path | None) -> OutFile:
    """explicit: the mmproj's own --outfile. Else, beside an explicit text --outfile: its name
    with "mmproj-" in front ({ftype} filled with the mmproj's type; a text file of another type
    gives the default name instead). Else llama.cpp's default name mmproj-<name>-<TYPE>.gguf."""
    qt, file_type = CONVERTER_OUTTYPES[outtype]
    tensors = plan_part(arch, MMPROJ, qt)
    if not tensors:
        raise GGQuantError(f"{arch.dir}: no vision/audio tower tensors found for the mmproj")
    total = sum(t.n_elements for t in tensors)
    general = General.derive(arch.dir, total)
    kv = KV()
    kv.string(Keys.General.ARCHITECTURE, "clip")
    kv.string(Keys.General.TYPE, "mmproj")
    general.write(kv)
    arch.mmproj_metadata(kv, file_type)
    kv.u32(Keys.General.QUANTIZATION_VERSION, GGML_QUANT_VERSION)
    label = CONVERTER_LABELS[outtype]
    default = f"mmproj-{naming_convention(general, None, label)}.gguf"
    if explicit is not None:
        path = explicit / default if explicit.is_dir() else explicit.parent / _fill_template(explicit.name, label)
    elif text_out is not None and text_out.is_dir():
        path = text_out / default
    elif text_out is not None and ("{" in text_out.name or text_label == label):
        path = text_out.parent / f"mmproj-{_fill_template(text_out.name, label)}"
    elif text_out is not None:
        path = text_out.parent / default
    else:
        path = arch.dir / default
    return OutFile(MMPROJ, path, label, kv, tensors)


def plan_conversion(src, *, outtype: str = "auto", outfile=None, mmproj: bool = False, mmproj_only: bool = False,
                    imatrix=None, tensor_types=(), mmproj_outfile=None, exact: bool = False) -> tuple[Conversion, Arch]:
    """Read and check everything, decide every output tensor; write nothing."""
    from ggquant.quant import presets

    model_dir = Path(src)
    if not model_dir.is_dir():
        if model_dir.is_file() and model_dir.suffix == ".gguf":
            raise GGQuantError(f"{model_dir}: a GGUF file; `--to gguf` converts a Hugging Face folder")
        raise GGQuantError(f"{model_dir}: not a folder; pass a Hugging Face model folder (config.json + *.safetensors)")
    config = load_config(model_dir)
    cls = arch_class(hf_architecture(config, model_dir / "config.json"), str(model_dir / "config.json"))
    ckpt = open_checkpoint(model_dir)
    try:
        arch = cls(model_dir, config, ckpt)
        qsrc = attach_quantized(arch)  # a quantized checkpoint: packed tensors -> logical weights
        want_mmproj = mmproj or mmproj_only
        parts = ((TEXT,) if not mmproj_only else ()) + ((MMPROJ,) if want_mmproj else ())
        if want_mmproj and not arch.has_mmproj():
            raise GGQuantError(f"{model_dir / 'config.json'}: --mmproj: this {arch.hf_arch} checkpoint has no "
                               f"vision tower ('vision_config'), so there is no mmproj to write")
        ot = outtype.strip().lower()
        if ot == "auto":
            ot = _auto_outtype(arch)
        preset = None
        if ot not in CONVERTER_OUTTYPES:
            preset = presets.preset(ot)
        elif tensor_types or imatrix:
            raise GGQuantError(
                f"--imatrix and --tensor-type apply to llama-quantize presets (Q4_K_M, Q6_K, ...); --outtype {ot} "
                f"uses llama.cpp's converter rules, which take neither")
        rules = [presets.Rule.parse(r) for r in tensor_types]
        arch.validate(parts)
        files: list[OutFile] = []
        text_label = None
        if TEXT in parts:
            f = _text_file(arch, ot, preset, rules, imatrix, Path(outfile) if outfile else None)
            files.append(f)
            text_label = f.outtype
        if MMPROJ in parts:
            mm_type = ot if preset is None else MMPROJ_TYPE_FOR_PRESETS
            explicit = Path(mmproj_outfile) if mmproj_outfile else (Path(outfile) if mmproj_only and outfile else None)
            text_out = Path(outfile) if outfile and not mmproj_only else None
            files.append(_mmproj_file(arch, mm_type, text_out, text_label, explicit))
        finish_plan(files, arch, qsrc, auto=outtype.strip().lower() == "auto", preset=preset, rules=rules,
                    exact=exact, outfile=outfile)  # quantized weights: exact or requantized; --exact
        paths = [f.path for f in files]
        if len(set(paths)) != len(paths):
            raise GGQuantError(f"the text and mmproj outputs would both be {paths[0]}; choose another --outfile")
        return Conversion(model_dir, arch.hf_arch, files), arch
    except BaseException:
        ckpt.close()
        raise


# =============================================================================================
# Encoding
# =============================================================================================


def _quiet_bf16_nans(raw: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_bf16 (and gguf-py's BF16) turn a signalling NaN quiet: bf16 -> f32
    -> bf16 is the identity except for that bit."""
    nan = (raw & 0x7FFF) > 0x7F80
    if not nan.any():
        return raw
    out = raw.copy()
    out[nan] |= 0x0040
    return out


def encode(x: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None, what: str) -> np.ndarray:
    """float32 rows -> bytes of `qtype` (registry kernels, bit-exact with ggml)."""
    from ggquant.quant import types as qtypes

    if qtype == T.F32:
        return np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[-1] if x.ndim else 1
    return qtypes.get(qtype).quantize(x.reshape(-1, n), imatrix, what)


def tensor_chunks(t: TensorPlan, imatrix: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, Callable | None]]:
    """(bytes, after) for one planned tensor, one bounded chunk of outer rows at a time.

    `after` (or None) must be called once the bytes are written: a chunk copied unchanged is a
    view of the mmapped checkpoint, whose pages are handed back only then."""
    if t.generated is not None:
        yield encode(t.generated, t.qtype, imatrix, t.name), None
        return
    src = t.src
    assert src is not None
    if isinstance(src, QuantizedSourceTensor):  # a quantized checkpoint's weight: transcoded or requantized
        yield from src.encode_chunks(t, imatrix)
        return
    inner = max(1, int(np.prod(src.shape[1:], dtype=np.int64))) if src.shape else 1
    step = max(1, CHUNK_BYTES // (4 * inner))
    raw_ok = t.transform.identity and (src.dtype, t.qtype) in (("F32", T.F32), ("F16", T.F16), ("BF16", T.BF16))
    for a in range(0, t.n_outer, step):
        b = min(t.n_outer, a + step)
        if raw_ok:
            raw = src.rows(a, b) if src.shape else src.rows(0, 1).reshape(1)
            yield (_quiet_bf16_nans(raw) if src.dtype == "BF16" else raw), (lambda a=a, b=b: src.release(a, b))
        else:
            x = src.float_rows(a, b)
            y = t.transform(x, src.dtype)
            if y.ndim == 0:
                y = y.reshape(1)
            if not y.flags.writeable:  # an F32 source is a view of the read-only map; kernels want writable input
                y = y.copy()
            out = encode(y, t.qtype, imatrix, f"tensor '{t.name}'")
            del x, y
            src.release(a, b)  # the source rows were copied: drop their pages now
            yield out, None


class Pipeline:
    """Computes the chunks of a file's tensors, in file order, in one thread ahead of the writer.

    The writer asks for tensor i's chunks when it reaches it (GGUFWriter calls produce() in
    order); meanwhile this thread has already read, widened and quantized the next chunks, so
    reading and encoding overlap with writing. At most `depth` finished chunks wait in the queue,
    which bounds memory. An exception in the thread is raised in the writer."""

    _END = object()

    def __init__(self, jobs: list[Callable[[], Iterator[tuple[np.ndarray, Callable | None]]]], depth: int = 2):
        self.jobs = jobs
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for i, job in enumerate(self.jobs):
                for chunk in job():
                    if not self._put((i, chunk)):
                        return
                if not self._put((i, self._END)):
                    return
        except BaseException as e:  # handed to the writer
            self._put((None, e))

    def chunks(self, i: int) -> Iterator[np.ndarray]:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="ggquant-convert", daemon=True)
            self.thread.start()
        while True:
            j, item = self.q.get()
            if j is None:
                raise item
            if j != i:  # cannot happen: the writer consumes tensors in order
                raise RuntimeError(f"pipeline out of order: got tensor {j}, expected {i}")
            if item is self._END:
                return
            data, after = item
            yield data
            del data, item
            if after is not None:  # the writer has written these bytes
                after()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            while self.thread.is_alive():
                try:
                    self.q.get_nowait()
                except queue.Empty:
                    self.thread.join(0.05)


# =============================================================================================
# Running
# =============================================================================================


def convert(src, *, outtype: str = "auto", outfile=None, mmproj: bool = False, mmproj_only: bool = False,
            imatrix=None, tensor_types=(), dry_run: bool = False, force: bool = False, threads: int | None = None,
            progress: bool = False, mmproj_outfile=None, exact: bool = False) -> Conversion:
    """Convert a Hugging Face folder to GGUF; returns what was (or, with dry_run, would be) written."""
    from ggquant.formats.gguf import GGUFWriter
    from ggquant.quant import types as qtypes

    t0 = time.perf_counter()
    if threads:
        import numba

        numba.set_num_threads(int(threads))
    conv, arch = plan_conversion(src, outtype=outtype, outfile=outfile, mmproj=mmproj, mmproj_only=mmproj_only,
                                 imatrix=imatrix, tensor_types=tensor_types, mmproj_outfile=mmproj_outfile,
                                 exact=exact)
    try:
        if dry_run:
            measure_lossy(conv)  # SQNR of requantized quantized-source weights
            conv.seconds = time.perf_counter() - t0
            return conv
        if not force:
            for f in conv.files:
                if f.path.exists():
                    raise GGQuantError(f"{f.path} already exists; pass --force to overwrite it (or choose --outfile)")
        existed = {f.path: f.path.exists() for f in conv.files}
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(f.nbytes for f in conv.files), unit="B", unit_scale=True, desc="convert",
                       leave=False, file=sys.stderr)
        done: list[Path] = []
        try:
            for f in conv.files:
                w = GGUFWriter(f.path, force=force)
                f.kv.write_to(w)
                jobs = []
                for t in f.tensors:
                    vec = f.imatrix.get(t.name) if qtypes.get(t.qtype).uses_imatrix else None
                    jobs.append(lambda t=t, vec=vec: tensor_chunks(t, vec))
                pipe = Pipeline(jobs)
                for i, t in enumerate(f.tensors):
                    w.add_tensor(t.name, t.shape, t.qtype, lambda i=i: pipe.chunks(i))
                try:
                    w.write(progress=(lambda name, n: bar.update(n)) if bar is not None else None)
                finally:
                    pipe.close()
                done.append(f.path)
        except BaseException:
            for p in done:  # all-or-nothing across the text and mmproj files
                if not existed.get(p):
                    p.unlink(missing_ok=True)
            raise
        finally:
            if bar is not None:
                bar.close()
        conv.written = [str(p) for p in done]
        conv.seconds = time.perf_counter() - t0
        return conv
    finally:
        if arch.ckpt is not None:
            arch.ckpt.close()


def format_plan(conv: Conversion) -> str:
    lines = []
    for f in conv.files:
        lines.append(f"{f.part}: {f.path} ({f.outtype})")
        lines.append(f"  {'tensor':<44} {'shape':<20} {'from':>5} {'to':>7} {'bytes':>12}")
        for t in f.tensors:
            lines.append(f"  {t.name:<44} {str(list(t.shape)):<20} {t.src_dtype.replace('generated', 'gen'):>5} "
                         f"{t.qtype.name:>7} {t.nbytes:>12}")
        n = sum(t.n_elements for t in f.tensors)
        lines.append(f"  total: {len(f.tensors)} tensors, {weight_count_label(n)} parameters, {f.nbytes} bytes "
                     f"({f.nbytes / 2**20:.2f} MiB)")
        lines.extend(plan_lines(f))
    return "\n".join(lines)


# =============================================================================================
# Command line
# =============================================================================================


MMPROJ_FLAG = "\0flag"  # --mmproj given without a value


@click.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--to", "to", type=click.Choice(["gguf", "hf", "compressed-tensors", "glq"]), default="gguf",
              show_default=True, help="Target format: gguf (SRC is a Hugging Face folder), hf or compressed-tensors "
              "(SRC is a GGUF file; compressed-tensors: Linear weights as W4A16 from Q4_0 / W8A16 from Q8_0, exact, "
              "other types requantized to int4 group 32, lossy), glq (SRC is a GGUF file or a float Hugging Face "
              "folder; decoder Linears quantized by glq's E8 lattice quantizer: needs the optional glq package).")
@click.option("--outtype", default="auto", show_default=True,
              help="f32, f16, bf16, q8_0 (llama.cpp converter rules), auto (bf16/f16 as the weights), or a "
                   "llama-quantize preset: Q6_K Q5_K_M Q5_K_S Q4_K_M Q4_K_S Q3_K_L Q3_K_M Q3_K_S Q2_K IQ4_XS IQ4_NL "
                   "Q4_0 Q4_1 Q5_0 Q5_1.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "bf16", "f16", "f32"]),
              help="--to hf: safetensors dtype; auto keeps BF16/F16 GGUFs as they are and writes F32 otherwise "
                   "(lossless for quantized GGUFs).")
@click.option("--outfile", type=click.Path(path_type=Path),
              help="Output file (or folder); {ftype} in the name is replaced. Default: llama.cpp's name in SRC. "
                   "With --to hf: the folder to create.")
@click.option("--mmproj", "mmproj", is_flag=False, flag_value=MMPROJ_FLAG, default=None, metavar="[MMPROJ.gguf]",
              help="--to gguf: also write the vision/audio towers as the mmproj sidecar GGUF. --to hf: the mmproj "
                   "GGUF whose towers go into the checkpoint (the conditional-generation model).")
@click.option("--mmproj-only", is_flag=True, help="Write only the mmproj (like llama.cpp's --mmproj).")
@click.option("--imatrix", type=click.Path(path_type=Path), help="Importance matrix for a quantization preset.")
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="REGEX=TYPE",
              help="With a preset: type for tensors whose name matches REGEX (first match wins).")
@click.option("--dry-run", is_flag=True, help="Print the per-tensor plan and sizes; write nothing.")
@click.option("--exact", is_flag=True, help="Refuse every lossy step (quantized checkpoints: only exact transcoding).")
@click.option("--group-size", type=click.Choice(["32", "128"]), default="32", show_default=True,
              help="--to compressed-tensors: 32 (exact from Q4_0/Q8_0) or 128 (int4, requantized: lossy).")
@click.option("--bpw", type=click.IntRange(2, 8), help="--to glq: bits per weight of every quantized Linear "
              "(2..8, default 4).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report on stdout.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@click.option("--threads", "-t", type=int, help="Numba threads (default: all cores).")
def convert_command(src, to, outtype, dtype, outfile, mmproj, mmproj_only, imatrix, tensor_types, dry_run, as_json,
                    force, threads, exact, group_size, bpw):
    """Convert a Hugging Face model folder to GGUF (Gemma 4, Gemma 3), identical to llama.cpp's converter,
    or a GGUF (and its mmproj) back to a Hugging Face folder (--to hf), its Linear weights optionally
    int4/int8 pack-quantized (--to compressed-tensors; --exact refuses the lossy requantization)."""
    progress = not as_json and sys.stderr.isatty()
    group_size = int(group_size)
    if bpw is not None and to != "glq":
        raise GGQuantError(f"--bpw applies to --to glq, not --to {to}")
    if to == "glq":
        from ggquant.formats.glq_writer import DEFAULT_BPW, export_glq, format_glq

        for flag, used in (("--outtype", outtype != "auto"), ("--mmproj-only", mmproj_only),
                           ("--tensor-type", tensor_types), ("--group-size", group_size != 32),
                           ("--exact", exact)):
            if used:
                why = " (GLQ is lossy by design)" if flag == "--exact" else ""
                raise GGQuantError(f"{flag} does not apply to --to glq{why}; it takes --bpw, --imatrix, --dtype, "
                                   f"--outfile and --mmproj")
        if mmproj == MMPROJ_FLAG:
            raise GGQuantError("--to glq: --mmproj needs the mmproj GGUF file (--mmproj MMPROJ.gguf)")
        r = export_glq(src, outfile=outfile, bpw=bpw or DEFAULT_BPW, imatrix=imatrix, dtype=dtype, mmproj=mmproj,
                       force=force, dry_run=dry_run, threads=threads, progress=progress)
        click.echo(json.dumps(r.to_json(), indent=1) if as_json else format_glq(r, dry_run))
        return
    if to in ("hf", "compressed-tensors"):
        from ggquant.export_hf import export_hf, format_export
        from ggquant.formats.ct_writer import CompressedTensorsLinears

        linears = CompressedTensorsLinears(exact=exact, group_size=group_size) if to == "compressed-tensors" else None
        if group_size != 32 and linears is None:
            raise GGQuantError("--group-size applies to --to compressed-tensors")

        for flag, used in (("--outtype", outtype != "auto"), ("--mmproj-only", mmproj_only),
                           ("--imatrix", imatrix), ("--tensor-type", tensor_types),
                           ("--exact", exact and linears is None)):
            if used:
                raise GGQuantError(f"{flag} applies to --to gguf; --to {to} takes --dtype, --outfile and --mmproj")
        if mmproj == MMPROJ_FLAG:
            raise GGQuantError(f"--to {to}: --mmproj needs the mmproj GGUF file (--mmproj MMPROJ.gguf)")
        e = export_hf(src, outfile=outfile, dtype=dtype, mmproj=mmproj, force=force, dry_run=dry_run,
                      threads=threads, progress=progress, linears=linears)
        for note in getattr(linears, "notes", []):
            click.echo(f"note: {note}", err=True)
        if linears is not None and linears.lossy:
            click.echo(f"lossy: {len(linears.lossy)} Linear weights requantized to int group {linears.group} "
                       f"(not Q4_0/Q8_0 in the GGUF): {', '.join(linears.lossy[:4])}"
                       f"{' ...' if len(linears.lossy) > 4 else ''}", err=True)
        if as_json:
            click.echo(json.dumps(e.to_json(), indent=1))
        elif dry_run:
            click.echo(format_export(e))
        else:
            click.echo(f"wrote {e.out} ({e.arch}, {e.dtype}, {len(e.tensors)} tensors, {e.nbytes / 2**20:.2f} MiB: "
                       f"{', '.join(e.files)})")
            click.echo(f"{e.src}: converted in {e.seconds:.1f} s")
        return
    if dtype != "auto":
        raise GGQuantError("--dtype applies to --to hf; --to gguf takes --outtype")
    if group_size != 32:
        raise GGQuantError("--group-size applies to --to compressed-tensors; --to gguf takes --outtype")
    if mmproj not in (None, MMPROJ_FLAG):
        raise GGQuantError(f"--to gguf: --mmproj takes no value (got {mmproj!r}); it writes the towers of SRC")
    conv = convert(src, outtype=outtype, outfile=outfile, mmproj=mmproj is not None, mmproj_only=mmproj_only,
                   imatrix=imatrix, tensor_types=tensor_types, dry_run=dry_run, force=force, threads=threads,
                   progress=progress, exact=exact)
    if as_json:
        click.echo(json.dumps(conv.to_json(), indent=1))
    elif dry_run:
        click.echo(format_plan(conv))
    else:
        for f in conv.files:
            click.echo(f"wrote {f.path} ({f.part}, {f.outtype}, {len(f.tensors)} tensors, "
                       f"{f.nbytes / 2**20:.2f} MiB)")
        click.echo(f"{conv.src}: {conv.arch} converted in {conv.seconds:.1f} s")
