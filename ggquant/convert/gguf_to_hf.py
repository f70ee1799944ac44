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
  (HFTensor.scale), and activation scales (`.input_scale`) are dropped.
- NVFP4 experts (llama.cpp's converter stacks each projection on its own: ffn_gate_exps,
  ffn_up_exps, ffn_down_exps, each with [n_expert] `.scale` factors): every expert's rows are
  multiplied by its factor, gate and up are concatenated back per expert into the fused
  experts.gate_up_proj, one chunk of experts at a time (arch HF_EXPERT_JOINS,
  folded_expert_factors; Gemma 4's router.per_expert_scale, folded into down's factors by the
  converter, is written as ones).
- --dtype auto keeps the GGUF's float type when every matrix is BF16 (or F16) and writes F32
  otherwise, so the conversion is lossless; bf16/f16 round to nearest even.

Everything is checked before a byte is written; the output is written into a temporary folder
beside the target and renamed into place at the end.
"""

from __future__ import annotations

import json
import math
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
    # llama.cpp's output scale folded in (float32): [1] for the whole tensor, or one factor per
    # outer row (per expert of a stack), multiplied after the inverse transform
    scale: np.ndarray | None = None
    # a fused HF tensor made of these (same outer rows), concatenated along axis 1 of each outer row
    joined: tuple[HFTensor, ...] = ()

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def identity(self) -> bool:
        """The GGUF tensor's values as they are (no transform, scale or join)."""
        return self.inverse.identity and self.scale is None and not self.joined

    @property
    def sources(self) -> str:
        return " + ".join(p.gguf_name for p in self.joined) if self.joined else self.gguf_name

    @property
    def label(self) -> str:
        """What is done to the GGUF values, for --dry-run and --json."""
        if self.joined:
            return ", ".join(["joined per expert"] + list(dict.fromkeys(p.label for p in self.joined if p.label)))
        parts = [self.inverse.label]
        if self.scale is not None:
            parts.append(f"x {float(self.scale[0]):g}" if self.scale.size == 1 else "x per-expert factors")
        return ", ".join(p for p in parts if p)


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
                "tensors": [{"name": t.name, "shape": list(t.shape), "source": t.sources,
                             "source_type": t.gguf_type.name, "part": t.part,
                             "transform": t.label or "identity"} for t in self.tensors]}


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
            scales = _output_scales(source, arch, part)
            for gname, info in source.tensors.items():
                if part == TEXT and gname in arch.GENERATED or gname in scales["companions"]:
                    continue
                hf_norm, _ = arch.unmap_tensor(gname, part, str(source.path))
                inverse, hf_shape = arch.inverse_transform(hf_norm, gname, tuple(info.shape), part)
                if gname in scales["ones"]:
                    inverse = FOLDED
                name = arch.denormalize_name(hf_norm, part, conditional)
                part_tensors.append(HFTensor(name, hf_shape, gname, tuple(info.shape), info.qtype, part, source,
                                             inverse, scales["weights"].get(gname)))
            part_tensors = _join_experts(arch, part_tensors, source.path)
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


class Folded(Transform):
    """A per-expert output scale whose values were folded into the experts' weights (arch
    folded_expert_factors): written as ones, so the product is not applied twice."""

    label = "1 (folded into the experts)"

    def __call__(self, x, src_dtype):
        return np.ones_like(x, dtype=np.float32)


FOLDED = Folded()


def _output_scales(source: GGUFSource, arch: Arch, part: str) -> dict:
    """llama.cpp's output scales that Hugging Face has no place for, to be multiplied into their
    weights (llama_model::load_tensors' generic `<weight>.scale`, applied after the product by
    build_lora_mm / build_lora_mm_id): a matrix's [1] scale (an NVFP4 checkpoint's reciprocal
    global scale) and the [n_expert] factors of the expert stacks the arch names
    (folded_expert_factors), with the activation scales beside them (`.input_scale`, which no graph
    reads). {"weights": {weight name: float32 [1] or [n_expert]}, "companions": {names not
    written}, "ones": {folded factors the tables name an HF tensor, written as ones}}."""
    from ggquant.arch.base import unmap_name
    from ggquant.quant import types as qt

    per_expert = arch.folded_expert_factors(list(source.tensors))
    weights, companions, ones = {}, set(), set()
    for name, t in source.tensors.items():
        for suffix in (".scale", ".input_scale"):
            w = name.removesuffix(suffix) + ".weight"
            if not name.endswith(suffix) or w not in source.tensors:
                continue
            wshape, shape = tuple(source.tensors[w].shape), tuple(t.shape)
            folded = name.removesuffix(suffix) + ".scale" in per_expert
            if folded and shape != wshape[:1]:
                raise GGQuantError(f"{source.path}: tensor '{name}' has shape {list(shape)}, but it holds one "
                                   f"factor per expert of '{w}' {list(wshape)}: {wshape[0]} values expected; the "
                                   f"GGUF is damaged (llama.cpp would read the wrong factors)")
            if not folded and not (shape == (1,) and len(wshape) == 2):
                continue
            if suffix == ".scale":
                weights[w] = qt.dequantize(np.asarray(t.raw()), t.qtype, shape).reshape(-1).astype(np.float32)
            if suffix == ".scale" and folded and unmap_name(arch.tables(part), name) is not None:
                ones.add(name)
            else:
                companions.add(name)
    return {"weights": weights, "companions": companions, "ones": ones}


def _join_experts(arch: Arch, tensors: list[HFTensor], where: Path) -> list[HFTensor]:
    """Expert stacks stored per projection -> the fused HF tensor (arch HF_EXPERT_JOINS): each
    expert's rows of the parts, concatenated in order (Gemma 4: gate rows, then up rows, as
    transformers' Gemma4TextExperts chunks gate_up_proj and llama.cpp's converter split it)."""
    from ggquant.arch.base import map_name

    by_name = {t.name: t for t in tensors}
    out = list(tensors)
    for fused, endings in arch.HF_EXPERT_JOINS.items():
        heads = sorted({t.name[:-len(e)] for t in tensors for e in endings if t.name.endswith(e)})
        for head in heads:
            parts = [by_name.get(head + e) for e in endings]
            have = next(p for p in parts if p is not None)
            for p, e in zip(parts, endings):
                if p is None:
                    hit = map_name(arch.tables(have.part), arch.normalize_name(head + e))
                    gname = hit[0] if hit else head + e
                    raise GGQuantError(f"{where}: tensor '{gname}' is missing; '{have.gguf_name}' is there and "
                                       f"the two are the per-expert halves of '{head + fused}'")
            first = parts[0]
            if any(len(p.shape) != 3 or (p.shape[0], p.shape[2]) != (first.shape[0], first.shape[2])
                   or p.inverse.whole for p in parts):
                shapes = ", ".join(f"'{p.gguf_name}' {list(p.gguf_shape)}" for p in parts)
                raise GGQuantError(f"{where}: the expert stacks {shapes} cannot be joined into '{head + fused}': "
                                   f"they need the same number of experts and the same row width")
            shape = (first.shape[0], sum(p.shape[1] for p in parts), first.shape[2])
            for p in parts:
                out.remove(p)
            out.append(HFTensor(head + fused, shape, first.gguf_name, first.gguf_shape, first.gguf_type, first.part,
                                first.source, joined=tuple(parts)))
    return out


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
    """The HF bytes of one tensor, one bounded chunk of outer rows at a time (a joined tensor:
    the chunk of each part's rows, the same experts, written into one buffer)."""
    from ggquant.formats.hf_writer import encode_dtype

    if t.joined:
        inner = int(np.prod(t.shape[1:], dtype=np.int64))
        for a, b in row_chunks(t.shape[0], inner, math.lcm(*(p.inverse.row_block for p in t.joined))):
            out = np.empty((b - a,) + tuple(t.shape[1:]), dtype=np.float32)
            at = 0
            for p in t.joined:
                out[:, at:at + p.shape[1]] = _float_chunk(p, a, b)
                p.source.tensors[p.gguf_name].release(a, b)
                at += p.shape[1]
            yield encode_dtype(out, dtype)
            del out
        return
    src = t.source.tensors[t.gguf_name]
    gshape = t.gguf_shape if t.gguf_shape else (1,)
    inner = int(np.prod(gshape[1:], dtype=np.int64)) if len(gshape) > 1 else 1
    raw = t.identity and (t.gguf_type, dtype) in _RAW_OK
    # a vector goes whole (its inverse transform may need all of it)
    chunks = row_chunks(src.n_outer, inner, t.inverse.row_block) if len(gshape) > 1 else [(0, src.n_outer)]
    for a, b in chunks:
        yield src.rows(a, b) if raw else encode_dtype(_float_chunk(t, a, b), dtype)
        src.release(a, b)


def _float_chunk(t: HFTensor, a: int, b: int) -> np.ndarray:
    """HF rows [a, b) of a (not joined) tensor in float32: ggml's dequantization of the GGUF rows,
    the inverse transform, then the folded output scale (its factors for these rows). May be a
    view of the map: release the rows once it is used."""
    src = t.source.tensors[t.gguf_name]
    gshape = t.gguf_shape if t.gguf_shape else (1,)
    x = src.float_rows(a, b).reshape((b - a,) + tuple(gshape[1:]) if len(gshape) > 1 else gshape)
    y = t.inverse(x, "F32")
    if t.scale is None:
        return y
    s = t.scale if t.scale.size == 1 else t.scale[a:b]
    return np.asarray(y, dtype=np.float32) * s.reshape((-1,) + (1,) * (np.ndim(y) - 1))


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
        lines.append(f"  {t.name:<64} {str(list(t.shape)):<20} {t.sources:<28} {t.gguf_type.name:>6} "
                     f"{t.label:>12}")
    n = sum(t.n_elements for t in e.tensors)
    lines.append(f"  total: {len(e.tensors)} tensors, {n} parameters, {e.nbytes} bytes ({e.nbytes / 2**20:.2f} MiB)")
    lines.append(f"  files: {', '.join(e.files)}")
    return "\n".join(lines)
