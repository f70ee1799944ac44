"""`ggquant convert`: one command for every direction; each --to dispatches to its job in
ggquant.convert (HF folder -> GGUF, GGUF -> HF / compressed-tensors, GGUF or HF -> GLQ)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ggquant.convert import convert, export_hf
from ggquant.convert.hf_to_gguf import format_plan
from ggquant.arch.base import CONVERTER_OUTTYPES
from ggquant.errors import GGQuantError
from ggquant.quant.presets import PRESETS
from ggquant.quant.types import QUANTIZE_TYPES

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
                   "llama-quantize preset: "
                   + " ".join(p for p in PRESETS if p.lower() not in CONVERTER_OUTTYPES) + ".")
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
              help="With a preset: type for tensors whose name matches REGEX (first match wins). TYPE: "
                   + " ".join(t.name for t in QUANTIZE_TYPES) + ".")
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
        from ggquant.convert.to_glq import DEFAULT_BPW, export_glq, format_glq  # glq is an optional package

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
        from ggquant.convert.gguf_to_hf import format_export
        from ggquant.convert.to_compressed_tensors import CompressedTensorsLinears

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
