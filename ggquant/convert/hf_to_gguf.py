"""`ggquant convert SRC --to gguf`: a Hugging Face folder -> GGUF (text, and the mmproj sidecar).

(`--to hf`, the reverse direction, is ggquant.convert.gguf_to_hf; ggquant.cli.convert dispatches.)

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

import sys
import time
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, Keys, LlamaFileType

from ggquant.arch import arch_class
from ggquant.arch.base import CONVERTER_OUTTYPES, MMPROJ, TEXT, Arch
from ggquant.convert.plan import TensorPlan, plan_part
from ggquant.formats.gguf import KV
from ggquant.formats.hf_folder import hf_architecture, load_config
from ggquant.arch.provenance import General, naming_convention, parameter_counts, weight_count_label
from ggquant.convert.encode import Pipeline, tensor_chunks
from ggquant.convert.plan import Conversion, OutFile, fill_template, plan_lines
from ggquant.convert.quantized import attach_quantized, finish_plan, measure_lossy
from ggquant.errors import GGQuantError
from ggquant.files import check_overwrite
from ggquant.formats.safetensors import open_checkpoint

T = GGMLQuantizationType
MMPROJ_TYPE_FOR_PRESETS = "f16"  # llama-quantize does not quantize mmproj files; f16 is the usual choice


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


def _text_file(arch: Arch, outtype: str, preset: LlamaFileType | None, rules, imatrix_path, outfile) -> OutFile:
    base = T.F32 if preset is not None else CONVERTER_OUTTYPES[outtype][0]
    file_type = 0 if preset is not None else CONVERTER_OUTTYPES[outtype][1]
    tensors = plan_part(arch, TEXT, base)
    general = General.derive(arch.dir, parameter_counts((t.name, t.shape) for t in tensors))
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
        path = outfile.parent / fill_template(outfile.name, name_type)
    return OutFile(TEXT, path, name_type, kv, tensors, im)


CONVERTER_LABELS = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}


def _apply_preset(arch: Arch, tensors: list[TensorPlan], kv: KV, ftype: LlamaFileType, rules, imatrix_path):
    """llama_model_quantize on the F32 plan: types from the mixture rules, tensors in the
    loader's order, metadata re-keyed as llama-quantize does (as convert.gguf_to_gguf.quantize_gguf)."""
    from ggquant.imatrix import files as imatrix_files
    from ggquant.quant import presets
    from ggquant.quant import types as qtypes
    from ggquant.quant.presets import (DROPPED_KEYS, KEY_IMATRIX_DATASET, KEY_IMATRIX_FILE,
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
        if key not in DROPPED_KEYS:
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
        path = explicit / default if explicit.is_dir() else explicit.parent / fill_template(explicit.name, label)
    elif text_out is not None and text_out.is_dir():
        path = text_out / default
    elif text_out is not None and ("{" in text_out.name or text_label == label):
        path = text_out.parent / f"mmproj-{fill_template(text_out.name, label)}"
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
            raise GGQuantError(f"{model_dir / 'config.json'}: --mmproj: {arch.no_mmproj_reason()}")
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
        finish_plan(files, qsrc, auto=outtype.strip().lower() == "auto", preset=preset, rules=rules,
                    exact=exact, outfile=outfile)  # quantized weights: exact or requantized; --exact
        paths = [f.path for f in files]
        if len(set(paths)) != len(paths):
            raise GGQuantError(f"the text and mmproj outputs would both be {paths[0]}; choose another --outfile")
        return Conversion(model_dir, arch.hf_arch, files), arch
    except BaseException:
        ckpt.close()
        raise


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
        check_overwrite([f.path for f in conv.files], force)
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
