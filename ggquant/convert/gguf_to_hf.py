"""`ggquant convert MODEL.gguf --to hf`: a GGUF (and its mmproj) -> a Hugging Face folder.

The data flow of DESIGN.md run backwards, one streaming pass:

    formats.gguf (reader) -> arch (tables read backwards, inverse transforms, config.json,
        tokenizer files) -> dequantize row chunks (quant registry) -> formats.hf_writer

- config.json comes from the GGUF metadata (arch hf_config); the model is the causal LM
  (Gemma3ForCausalLM / Gemma4ForCausalLM), or the conditional-generation class with its
  vision/audio towers when --mmproj gives the sidecar GGUF (a gemma4uv mmproj makes it
  Gemma4UnifiedForConditionalGeneration: arch export_class); a gemma4-assistant GGUF becomes a
  Gemma4AssistantForCausalLM without its masked embedding (not in the GGUF).
- every tensor goes through the arch layer's name tables backwards and the inverse of the
  converter's transform (Gemma 3's norm +1, Gemma 4's softplus and conv reshapes, ...);
  generated tensors (rope_freqs) are dropped, tied embeddings stay tied.
- payloads are dequantized chunk by chunk (bit-exact with ggml's to_float), so memory holds
  one chunk, whatever the size of the largest tensor; a matrix's per-tensor output scale
  (`<weight>.scale` [1], an NVFP4 checkpoint's reciprocal global scale) is multiplied into it
  (ScaledBy), and activation scales (`.input_scale`) are dropped.
- --dtype auto keeps the GGUF's float type when every matrix is BF16 (or F16) and writes F32
  otherwise, so the conversion is lossless; bf16/f16 round to nearest even.

Everything is checked before a byte is written; the output is written into a temporary folder
beside the target and renamed into place at the end.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, Keys

from ggquant.arch import gguf_arch_class
from ggquant.arch.base import IDENTITY, MMPROJ, TEXT, Arch, GGUFFacts, Transform
from ggquant.convert.encode import row_chunks
from ggquant.errors import GGQuantError
from ggquant.files import check_overwrite, output_folder

T = GGMLQuantizationType
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' historical save_pretrained default ("5GB")
DTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
_RAW_OK = {(T.F32, "F32"), (T.F16, "F16"), (T.BF16, "BF16")}


# =============================================================================================
# Reading
# =============================================================================================


class GGUFSource:
    """A GGUF opened for the reverse direction: its tensors (Tensor records, Blocks encoding, read
    as views of the map and released chunk by chunk) and its facts for the architecture."""

    def __init__(self, path: Path):
        from ggquant.formats.gguf import GGUFReader

        self.path = Path(path)
        if not self.path.is_file():
            raise GGQuantError(f"{self.path}: not found; pass a .gguf file")
        self.reader = GGUFReader(self.path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.facts = GGUFFacts.of(self.reader, lambda name: self.tensors[name].float_rows(0, self.tensors[name].n_outer)
                                  .reshape(-1))

    def close(self) -> None:
        self.reader.close()


# =============================================================================================
# Planning
# =============================================================================================


@dataclass
class HFTensor:
    """One tensor of the HF checkpoint, decided before any payload is read."""

    name: str  # as stored in the safetensors file
    shape: tuple[int, ...]  # HF shape
    gguf_name: str
    gguf_shape: tuple[int, ...]
    gguf_type: GGMLQuantizationType
    part: str
    source: GGUFSource = field(repr=False)
    inverse: Transform = IDENTITY

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass
class Export:
    src: Path
    mmproj: Path | None
    out: Path
    arch: str  # the HF class written
    dtype: str  # safetensors dtype
    tensors: list[HFTensor]
    config: dict
    files: list[str] = field(default_factory=list)  # file names inside `out`
    seconds: float = 0.0
    written: bool = False
    model: Arch | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(t.n_elements for t in self.tensors) * {"F32": 4, "F16": 2, "BF16": 2}[self.dtype]

    def to_json(self) -> dict:
        return {"source": str(self.src), "mmproj": str(self.mmproj) if self.mmproj else None, "out": str(self.out),
                "architecture": self.arch, "dtype": self.dtype, "bytes": self.nbytes, "written": self.written,
                "files": self.files, "seconds": round(self.seconds, 3),
                "tensors": [{"name": t.name, "shape": list(t.shape), "source": t.gguf_name,
                             "source_type": t.gguf_type.name, "part": t.part,
                             "transform": t.inverse.label or "identity"} for t in self.tensors]}


def _auto_dtype(sources: list[GGUFSource]) -> str:
    """BF16/F16 when every matrix of the GGUF(s) is stored so (lossless), else F32."""
    kinds = {t.qtype for s in sources for t in s.reader.tensors if len(t.shape) >= 2}
    if kinds == {T.BF16}:
        return "BF16"
    if kinds == {T.F16}:
        return "F16"
    return "F32"


def _check_layers(tensors: list[HFTensor], arch: Arch, part: str, where: Path) -> None:
    """Missing tower tensors: the mmproj has no shape table, so every per-layer tensor kind
    must exist in every layer of its stack (a stack: the rules sharing a name prefix before
    the layer number, e.g. 'v.blk.')."""
    rules = arch.tables(part)
    kinds: dict[tuple[int, str], set[int]] = {}
    for t in tensors:
        for i, rule in enumerate(rules):
            hit = rule.unmatch(t.gguf_name)
            if hit is not None and hit[1] is not None:
                ending = t.gguf_name[len(rule.gguf.format(bid=hit[1])):]
                kinds.setdefault((i, ending), set()).add(hit[1])
                break
    stacks: dict[str, set[int]] = {}
    for (i, _), bids in kinds.items():
        stacks.setdefault(rules[i].gguf.split("{bid}")[0], set()).update(bids)
    for (i, ending), bids in sorted(kinds.items()):
        missing = sorted(stacks[rules[i].gguf.split("{bid}")[0]] - bids)
        if missing:
            name = rules[i].gguf.format(bid=missing[0]) + ending
            raise GGQuantError(f"{where}: tensor '{name}' is missing (the other layers have it); the GGUF is "
                               f"incomplete")


def plan_export(src, *, outfile, dtype: str = "auto", mmproj=None) -> tuple[Export, list[GGUFSource]]:
    src = Path(src)
    if src.is_dir():
        raise GGQuantError(f"{src}: a folder; `--to hf` converts a GGUF file (use `--to gguf` for a Hugging Face "
                           f"folder)")
    if outfile is None:
        raise GGQuantError("--to hf needs --outfile DIR (the Hugging Face folder to create)")
    out = Path(outfile)
    sources: list[GGUFSource] = []
    try:
        text = GGUFSource(src)
        sources.append(text)
        g = text.facts
        if g.arch == "clip":
            raise GGQuantError(f"{src}: an mmproj (general.architecture = clip); pass the text GGUF as MODEL and the "
                               f"mmproj with --mmproj")
        cls = gguf_arch_class(g.arch, src)
        mm = None
        if mmproj is not None:
            mm_src = GGUFSource(Path(mmproj))
            sources.append(mm_src)
            mm = mm_src.facts
            if mm.arch != "clip":
                raise GGQuantError(f"{mm.path}: general.architecture = {mm.arch!r}; --mmproj takes the mmproj GGUF "
                                   f"(general.architecture = clip)")
        cls = cls.export_class(g, mm)
        config = cls.hf_config(g, mm)
        n_tokens = len(g.get(Keys.Tokenizer.LIST) or [])
        emb = g.shapes.get("token_embd.weight")
        if emb is not None and n_tokens != emb[0]:
            raise GGQuantError(f"{src}: the vocabulary has {n_tokens} tokens but token_embd.weight has {emb[0]} rows; "
                               f"llama.cpp refuses such a GGUF and a Hugging Face model would index past its "
                               f"embeddings")
        conditional = mm is not None
        arch = cls(out, config, None)
        if dtype == "auto":
            st_dtype = _auto_dtype(sources)
        elif dtype in DTYPES:
            st_dtype = DTYPES[dtype]
        else:
            raise GGQuantError(f"--dtype {dtype!r}: choose one of auto, {', '.join(DTYPES)}")

        tensors: list[HFTensor] = []
        for part, source in ((TEXT, text),) + (((MMPROJ, sources[1]),) if conditional else ()):
            part_tensors = []
            scales = _output_scales(source)
            for gname, info in source.tensors.items():
                if part == TEXT and gname in arch.GENERATED or gname in scales["companions"]:
                    continue
                hf_norm, _ = arch.unmap_tensor(gname, part, str(source.path))
                inverse, hf_shape = arch.inverse_transform(hf_norm, gname, tuple(info.shape), part)
                if gname in scales["weights"]:
                    inverse = ScaledBy(inverse, scales["weights"][gname])
                name = arch.denormalize_name(hf_norm, part, conditional)
                part_tensors.append(HFTensor(name, hf_shape, gname, tuple(info.shape), info.qtype, part, source,
                                             inverse))
            if part == TEXT:
                _check_text(arch, part_tensors, source.path)
            else:
                _check_layers(part_tensors, arch, part, source.path)
            tensors.extend(part_tensors)
        tensors.sort(key=lambda t: t.name)
        hf_class = config["architectures"][0]
        return Export(src, Path(mmproj) if mmproj else None, out, hf_class, st_dtype, tensors, config,
                      model=arch), sources
    except BaseException:
        for s in sources:
            s.close()
        raise


class ScaledBy(Transform):
    """`inner`, then times a per-tensor scale: an NVFP4 weight's `<weight>.scale` (the float32
    reciprocal of the source's global scale, which llama.cpp multiplies into the product) folded
    into the weight, the one Hugging Face tensor that can carry it."""

    def __init__(self, inner: Transform, scale: np.float32):
        self.inner, self.scale = inner, np.float32(scale)
        self.whole, self.row_block = inner.whole, inner.row_block
        self.label = f"{inner.label + ', ' if inner.label else ''}x {float(self.scale):g}"

    def shape(self, src_shape):
        return self.inner.shape(src_shape)

    def __call__(self, x, src_dtype):
        return np.asarray(self.inner(x, src_dtype), dtype=np.float32) * self.scale


def _output_scales(source: GGUFSource) -> dict:
    """The per-tensor output scales of a GGUF (llama_model::load_tensors' generic `<weight>.scale`
    of shape [1]) and the activation scales beside them (`.input_scale`, which no graph reads and
    Hugging Face has no place for): {"weights": {weight name: float32}, "companions": {names}}."""
    from ggquant.quant import types as qt

    weights, companions = {}, set()
    for name, t in source.tensors.items():
        for suffix in (".scale", ".input_scale"):
            w = name.removesuffix(suffix) + ".weight"
            if name.endswith(suffix) and tuple(t.shape) == (1,) and w in source.tensors and \
                    len(source.tensors[w].shape) == 2:
                companions.add(name)
                if suffix == ".scale":
                    weights[w] = np.float32(qt.dequantize(np.asarray(t.raw()), t.qtype, (1,)).reshape(-1)[0])
    return {"weights": weights, "companions": companions}


def _check_text(arch: Arch, tensors: list[HFTensor], where: Path) -> None:
    """The text tensors against the shapes config.json implies (Gemma3.expected_shapes)."""
    from ggquant.arch.base import map_name

    have = {}
    for t in tensors:
        norm = arch.normalize_name(t.name)
        have[norm] = t
    for name, (shape, required) in arch.expected_shapes().items():
        t = have.get(name)
        if t is None:
            if required:
                hit = map_name(arch.tables(TEXT), name)
                gname = hit[0] if hit else name
                raise GGQuantError(f"{where}: tensor '{gname}' is missing; the GGUF's metadata declares it (it is "
                                   f"'{name}' in the Hugging Face model)")
            continue
        if tuple(t.shape) != tuple(shape):
            raise GGQuantError(f"{where}: tensor '{t.gguf_name}' has shape {list(t.gguf_shape)}, but the GGUF's "
                               f"metadata implies {list(shape)} for '{name}'")


# =============================================================================================
# Encoding and writing
# =============================================================================================


def tensor_chunks(t: HFTensor, dtype: str) -> Iterator[np.ndarray]:
    """The HF bytes of one tensor, one bounded chunk of outer rows at a time."""
    from ggquant.formats.hf_writer import encode_dtype

    src = t.source.tensors[t.gguf_name]
    gshape = t.gguf_shape if t.gguf_shape else (1,)
    inner = int(np.prod(gshape[1:], dtype=np.int64)) if len(gshape) > 1 else 1
    raw = t.inverse.identity and (t.gguf_type, dtype) in _RAW_OK
    # a vector goes whole (its inverse transform may need all of it)
    chunks = row_chunks(src.n_outer, inner, t.inverse.row_block) if len(gshape) > 1 else [(0, src.n_outer)]
    for a, b in chunks:
        if raw:
            yield src.rows(a, b)
        else:
            x = src.float_rows(a, b).reshape((b - a,) + tuple(gshape[1:]) if len(gshape) > 1 else gshape)
            yield encode_dtype(t.inverse(x, "F32"), dtype)
            del x
        src.release(a, b)


def _hf_generation_config(config: dict, cls: type[Arch], g: GGUFFacts) -> dict:
    text = config.get("text_config", config)
    out = {k: text[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in text}
    out.update(cls.hf_generation_extra(g))
    return out


def _side_files(export: Export, cls: type[Arch], g: GGUFFacts, mm: GGUFFacts | None) -> dict[str, bytes]:
    from ggquant.arch import vocab_hf

    text_cfg = export.config.get("text_config", export.config)
    cfg = dict(export.config)
    cfg["dtype"] = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[export.dtype]
    files = {"config.json": (json.dumps(cfg, indent=2, ensure_ascii=False) + "\n").encode("utf-8"),
             "generation_config.json": (json.dumps(_hf_generation_config(export.config, cls, g), indent=2)
                                                + "\n").encode()}
    files.update(vocab_hf.tokenizer_files(g, visible_specials=getattr(cls, "VISIBLE_TOKENS", ()),
                                          named_extra=cls.hf_named_tokens(),
                                          tokenizer_class=cls.HF_TOKENIZER_CLASS,
                                          model_max_length=text_cfg.get("max_position_embeddings")))
    if mm is not None:
        files["preprocessor_config.json"] = (json.dumps(cls.hf_preprocessor(export.config, mm), indent=2)
                                             + "\n").encode()
    return files


def export_hf(src, *, outfile, dtype: str = "auto", mmproj=None, force: bool = False, dry_run: bool = False,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, threads: int | None = None,
              progress: bool = False, linears=None) -> Export:
    """Convert a GGUF (+ mmproj) to a Hugging Face folder; returns what was (or would be) written.
    `linears`: a hook that writes the Linear weights in a quantized layout (entries, chunks,
    config_json; convert.to_compressed_tensors.CompressedTensorsLinears for --to compressed-tensors)."""
    from ggquant.formats.hf_writer import SafetensorsWriter

    t0 = time.perf_counter()
    if threads:
        import numba

        numba.set_num_threads(int(threads))
    export, sources = plan_export(src, outfile=outfile, dtype=dtype, mmproj=mmproj)
    try:
        out = export.out
        check_overwrite([out], force)
        if out.exists() and not out.is_dir():
            raise GGQuantError(f"{out} exists and is not a folder; --to hf writes a folder")
        cls = type(export.model)
        entries = (linears.entries(export) if linears is not None
                   else [(t.name, export.dtype, t.shape) for t in export.tensors])
        writer = SafetensorsWriter(out, entries, max_shard_bytes)
        mm = sources[1].facts if len(sources) > 1 else None
        side_names = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
        side_names += ["tokenizer.model"] if sources[0].facts.get(Keys.Tokenizer.MODEL) == "llama" else []
        side_names += ["preprocessor_config.json"] if mm is not None else []
        export.files = sorted(side_names + writer.file_names())
        if dry_run:
            export.seconds = time.perf_counter() - t0
            return export
        side = _side_files(export, cls, sources[0].facts, mm)  # before any tensor: tokenizer errors first
        assert sorted(side) == sorted(side_names), (sorted(side), side_names)
        if linears is not None:
            side["config.json"] = linears.config_json(side["config.json"])
        with output_folder(out) as tmp:
            writer.folder = tmp
            by_name = {t.name: t for t in export.tensors}
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=writer.total_bytes, unit="B", unit_scale=True, desc="convert", leave=False,
                           file=sys.stderr)
            try:
                writer.write((lambda p: linears.chunks(p, export)) if linears is not None
                             else (lambda p: tensor_chunks(by_name[p.name], export.dtype)),
                             progress=(lambda name, n: bar.update(n)) if bar is not None else None)
            finally:
                if bar is not None:
                    bar.close()
            for name, data in side.items():
                (tmp / name).write_bytes(data)
        export.written = True
        export.seconds = time.perf_counter() - t0
        return export
    finally:
        for s in sources:
            s.close()


def format_export(e: Export) -> str:
    lines = [f"hf: {e.out} ({e.arch}, {e.dtype})",
             f"  {'tensor':<64} {'shape':<20} {'from':<28} {'type':>6} {'transform':>12}"]
    for t in e.tensors:
        lines.append(f"  {t.name:<64} {str(list(t.shape)):<20} {t.gguf_name:<28} {t.gguf_type.name:>6} "
                     f"{t.inverse.label or '':>12}")
    n = sum(t.n_elements for t in e.tensors)
    lines.append(f"  total: {len(e.tensors)} tensors, {n} parameters, {e.nbytes} bytes ({e.nbytes / 2**20:.2f} MiB)")
    lines.append(f"  files: {', '.join(e.files)}")
    return "\n".join(lines)
