"""`ggquant quantize`: the llama-quantize job, GGUF in, GGUF out, streamed.

Mirrors llama_model_quantize_impl (src/llama-quant.cpp): metadata copied in file order with
split.* removed, then general.quantization_version and general.file_type re-set (gguf_set_val
removes and appends, so both move to the end), then the quantize.imatrix.* keys llama-quantize
adds as KV overrides; tensors in the loader's order; each tensor either copied as is (same
type) or dequantized to float32 and quantized to its target type, block-row chunk by chunk.
"""

import time
from dataclasses import dataclass, field
from pathlib import Path

import numba
import numpy as np
from gguf import GGML_QUANT_VERSION, GGUFValueType

from ggquant.convert import mix as mix_job
from ggquant.convert.encode import CHUNK_BYTES, expert_imatrix
from ggquant.errors import GGQuantError
from ggquant.imatrix import files as imatrix_files
from ggquant.quant import presets
from ggquant.quant.presets import (DROPPED_KEYS, KEY_IMATRIX_DATASET, KEY_IMATRIX_FILE, KEY_IMATRIX_N_CHUNKS,
                                   KEY_IMATRIX_N_ENTRIES)
from ggquant.quant import types as qtypes


@dataclass
class Result:
    input: str
    output: str | None
    outtype: str
    tensors: list[presets.Choice]
    bytes_in: int
    bytes_out: int
    imatrix: str | None = None
    seconds: float = 0.0
    written: list[str] = field(default_factory=list)
    allocation: dict | None = None  # --target-bpw / --target-size: what was allocated and why

    def to_json(self) -> dict:
        return {
            "input": self.input, "output": self.output, "outtype": self.outtype, "imatrix": self.imatrix,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "seconds": round(self.seconds, 3),
            "files": self.written, "allocation": self.allocation,
            "tensors": [
                {"name": c.name, "shape": list(c.shape), "src_type": c.src_type.name, "dst_type": c.dst_type.name,
                 "reason": c.reason, "bytes": qtypes.get(c.dst_type).nbytes(c.shape)}
                for c in self.tensors
            ],
        }


def chunk_rows(n_per_row: int, n_rows: int) -> int:
    return max(1, min(n_rows, CHUNK_BYTES // (4 * n_per_row)))


def encode_rows(rows_u8: np.ndarray, src: qtypes.GGMLType, dst: qtypes.GGMLType, n_per_row: int,
                imatrix: np.ndarray | None, what: str) -> np.ndarray:
    """Raw rows in `src` -> raw rows in `dst` (through float32 unless the types are equal)."""
    if src.qtype == dst.qtype:
        return rows_u8
    x = src.dequantize(rows_u8, (rows_u8.shape[0], n_per_row))
    return dst.quantize(x, imatrix, what)


def requantized_chunks(t, dst: qtypes.GGMLType, imatrix: np.ndarray | None):
    """Generator of output byte chunks for reader tensor `t`, one bounded row range at a time.

    3-D (expert) tensors use their own imatrix slice per expert, and chunks never cross an
    expert boundary (llama_tensor_quantize_impl's `imatrix_for_row`).
    """
    src = qtypes.get(t.qtype)
    n_per_row = t.shape[-1]
    n_rows = int(np.prod(t.shape[:-1], dtype=np.int64)) if len(t.shape) > 1 else 1
    rows_per_expert = t.shape[-2] if len(t.shape) >= 2 else 1
    step = chunk_rows(n_per_row, n_rows) if src.qtype != dst.qtype else max(1, CHUNK_BYTES // max(1, src.row_bytes(n_per_row)))
    start = 0
    while start < n_rows:
        expert = start // rows_per_expert
        stop = min(n_rows, start + step, (expert + 1) * rows_per_expert)
        im = expert_imatrix(imatrix, expert, n_per_row)
        yield encode_rows(t.block_rows(start, stop), src, dst, n_per_row, im, t.name)
        start = stop


def quantize_gguf(inp, out, outtype: str | None = None, *, imatrix=None, tensor_types=(), tensor_type_file=None,
                  pure=False, allow_requantize=False, token_embedding_type=None, output_tensor_type=None,
                  dry_run=False, force=False, threads: int | None = None, progress: bool = True,
                  split_max_size: int | None = None, mix=None, like=None, recipe_out=None) -> Result:
    """Quantize GGUF `inp` to `out` with llama.cpp preset `outtype` (e.g. 'Q4_K_M').

    tensor_types / tensor_type_file: llama-quantize's --tensor-type / --tensor-type-file rules (first
    match wins; a recipe file must name only tensors of this model, in types their rows can hold).
    like: a template GGUF whose types every quantizable tensor takes (default outtype: its file
    type). mix (ggquant.convert.mix.Mix): allocate the types under a size budget (default outtype:
    the file type of the type holding the most bytes). User rules win over both. recipe_out: write
    the per-tensor types as a --tensor-type-file that reproduces `out` (with the same outtype and
    imatrix, in ggquant and in llama-quantize)."""
    from ggquant.formats.gguf import GGUFReader, GGUFWriter

    t0 = time.perf_counter()
    ftype = presets.preset(outtype) if outtype else None  # a misspelt preset fails before any reading
    rules = [r if isinstance(r, presets.Rule) else presets.Rule.parse(r) for r in tensor_types]
    emb_type = qtypes.get(token_embedding_type).qtype if token_embedding_type else None
    out_type = qtypes.get(output_tensor_type).qtype if output_tensor_type else None
    if outtype is None and mix is None and like is None and tensor_type_file is None:
        raise GGQuantError("give --outtype (a llama.cpp preset), or --target-bpw/--target-size, --like or "
                           "--tensor-type-file")
    if threads:
        numba.set_num_threads(int(threads))
    reader = GGUFReader(inp)
    try:
        im = imatrix_files.load(imatrix) if imatrix else None
        im_values = im.normalised() if im else {}
        shapes = [(t.name, t.shape) for t in reader.tensors]
        if im:
            imatrix_files.check_against(im_values, shapes, str(imatrix))
        if tensor_type_file is not None:
            rules = rules + mix_job.read_tensor_type_file(tensor_type_file, reader)
        if like is not None:
            like_rules, like_ftype = mix_job.like_rules(reader, like)
            rules = rules + like_rules
            ftype = like_ftype if ftype is None else ftype  # (ALL_F32 is 0: no `or`)
        if mix is not None:
            extra, alloc = mix_job.plan_mix(inp, reader, im_values, mix, rules, progress)
            rules = rules + extra
            ftype = mix_job.main_file_type(alloc.sizes()) if ftype is None else ftype
        if ftype is None:  # a recipe alone: any quantized preset lets its rules apply
            ftype = presets.preset("Q8_0")
        outtype = presets.preset_name(ftype)
        info = presets.ModelInfo.from_fields(reader.get)
        mixture = presets.Mixture(ftype, info, rules, pure=pure, has_imatrix=im is not None,
                                  token_embedding_type=emb_type, output_tensor_type=out_type)
        plan = mixture.plan([(t.name, t.shape, t.qtype) for t in reader.tensors])
        if mix is not None:
            mix_job.explain(plan, alloc)
        _check_plan(plan, im_values, allow_requantize, inp)
        bytes_in = sum(t.nbytes for t in reader.tensors)
        bytes_out = sum(qtypes.get(c.dst_type).nbytes(c.shape) for c in plan)
        result = Result(str(inp), None if dry_run else str(out), outtype.upper(), plan, bytes_in, bytes_out,
                        str(imatrix) if imatrix else None)
        result.allocation = mix_job.report_json(mix) if mix is not None else None
        if recipe_out is not None and not dry_run:
            mix_job.write_recipe(plan, recipe_out, force)
        if dry_run:
            result.seconds = time.perf_counter() - t0
            return result

        writer = GGUFWriter(out, force=force, split_max_size=split_max_size, alignment=reader.alignment)
        for f in reader.fields.values():
            if f.name not in DROPPED_KEYS:
                writer.add_field(f.name, f.value, f.type, f.item_type)
        writer.add_field("general.quantization_version", GGML_QUANT_VERSION, GGUFValueType.UINT32)
        writer.add_field("general.file_type", int(ftype), GGUFValueType.UINT32)
        if im:
            writer.add_field(KEY_IMATRIX_FILE, str(imatrix)[:127], GGUFValueType.STRING)
            if im.datasets:
                writer.add_field(KEY_IMATRIX_DATASET, im.datasets[0][:127], GGUFValueType.STRING)
            writer.add_field(KEY_IMATRIX_N_ENTRIES, len(im_values), GGUFValueType.UINT32)
            if im.chunk_count > 0:
                writer.add_field(KEY_IMATRIX_N_CHUNKS, im.chunk_count, GGUFValueType.UINT32)

        bar = _progress_bar(bytes_out, progress)
        for c in plan:
            t = reader.tensor(c.name)
            dst = qtypes.get(c.dst_type)
            vec = im_values.get(c.name) if dst.uses_imatrix else None
            writer.add_tensor(c.name, c.shape, c.dst_type, _counted(requantized_chunks, bar, t, dst, vec))
        writer.write()
        if bar is not None:
            bar.close()
        result.written = [str(p) for p in getattr(writer, "paths", [out])]
        result.seconds = time.perf_counter() - t0
        return result
    finally:
        reader.close()


def _counted(fn, bar, *args):
    def produce():
        for chunk in fn(*args):
            if bar is not None:
                bar.update(chunk.nbytes)
            yield chunk

    return produce


def _progress_bar(total, enabled):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="quantize", leave=False)


def _check_plan(plan, im_values, allow_requantize, inp):
    for c in plan:
        if not c.converts:
            continue
        src = qtypes.get(c.src_type)
        if src.block_size > 1 and not allow_requantize:
            raise GGQuantError(
                f"{inp}: tensor {c.name} is already {c.src_type.name}; requantizing it to {c.dst_type.name} "
                f"loses precision twice. Pass --allow-requantize to do it anyway"
            )
        if src.dequantize_fn is None:
            raise GGQuantError(f"{inp}: tensor {c.name}: cannot read type {c.src_type.name}")
        if c.requires_imatrix and c.name not in im_values:
            raise GGQuantError(
                f"tensor {c.name}: {c.dst_type.name} needs an importance matrix; pass --imatrix FILE "
                f"(make one with `ggquant imatrix`)"
            )
        qtypes.get(c.dst_type).check_row(c.shape[-1], c.name)


def format_plan(result: Result) -> str:
    """The --dry-run table: every tensor, its type change and size, then totals."""
    lines = [f"{'tensor':<40} {'shape':<22} {'from':>7} {'to':>7} {'MiB':>9}  why"]
    for c in result.tensors:
        size = qtypes.get(c.dst_type).nbytes(c.shape) / 2**20
        lines.append(f"{c.name:<40} {str(list(c.shape)):<22} {c.src_type.name:>7} {c.dst_type.name:>7} "
                     f"{size:9.3f}  {c.reason}")
    lines.append(f"total: {result.bytes_in / 2**20:.2f} MiB -> {result.bytes_out / 2**20:.2f} MiB "
                 f"({len(result.tensors)} tensors)")
    return "\n".join(lines)


def default_outfile(inp: Path, outtype: str) -> Path:
    stem = inp.name[:-5] if inp.name.endswith(".gguf") else inp.name
    return inp.with_name(f"{stem}-{outtype.upper()}.gguf")


