"""`ggquant quantize`: llama-quantize's presets and mixture rules on a GGUF (ggquant.convert.gguf_to_gguf)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ggquant.errors import GGQuantError
from ggquant.quant.presets import PRESETS
from ggquant.quant.types import QUANTIZE_TYPES


def _size(text: str | None, flag: str = "--split-max-size") -> int | None:
    """llama.cpp's --split-max-size syntax: 500M, 2G, or plain bytes."""
    if text is None:
        return None
    mult = {"K": 1000, "M": 1000**2, "G": 1000**3}
    t = text.strip().upper()
    try:
        return int(float(t[:-1]) * mult[t[-1]]) if t[-1] in mult else int(t)
    except (ValueError, IndexError):
        raise GGQuantError(f"{flag} {text!r}: expected a size like 500M or 2G") from None


def _types(text: str | None):
    from ggquant.quant import types as qtypes

    if text is None:
        return None
    return tuple(qtypes.get(t.strip()).qtype for t in text.split(",") if t.strip())


@click.command("quantize")
@click.argument("inp", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path), required=False)
@click.argument("type_", metavar="[TYPE]", required=False)
@click.option("--outtype", help="Preset: " + " ".join(PRESETS) + ". Optional with --target-bpw/--target-size "
              "(default: the file type of the type holding the most bytes), --like (the template's) or "
              "--tensor-type-file.")
@click.option("--imatrix", type=click.Path(path_type=Path), help="Importance matrix (GGUF or legacy .dat).")
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="REGEX=TYPE",
              help="Override the type of tensors whose name matches REGEX (first match wins). TYPE: "
                   + " ".join(t.name for t in QUANTIZE_TYPES) + ".")
@click.option("--tensor-type-file", type=click.Path(path_type=Path), metavar="FILE",
              help="REGEX=TYPE rules from a file (llama-quantize's; what --recipe-out writes).")
@click.option("--token-embedding-type", metavar="TYPE", help="Type for token_embd (and per_layer_token_embd).")
@click.option("--output-tensor-type", metavar="TYPE", help="Type for output.weight.")
@click.option("--pure", is_flag=True, help="No mixture rules: every quantizable tensor gets the preset's type.")
@click.option("--allow-requantize", is_flag=True, help="Allow requantizing tensors that are already quantized.")
@click.option("--target-bpw", type=float, help="Mixed precision: the types that minimise the predicted damage "
              "within this many bits per weight (whole file, as llama.cpp reports it; never above).")
@click.option("--target-size", help="Mixed precision within this file size (bytes, or 500M / 2G).")
@click.option("--calibration", type=click.Path(path_type=Path), metavar="TEXT",
              help="With --target-*: measure each tensor's KL on this text through the runtime (else the "
              "imatrix-weighted proxy alone).")
@click.option("--ctx", type=int, default=128, show_default=True, help="--calibration chunk length (tokens).")
@click.option("--chunks", type=int, default=2, show_default=True, help="--calibration chunks.")
@click.option("--state", type=click.Path(path_type=Path), metavar="FILE",
              help="With --calibration: keep the measurements here; a rerun resumes from them.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="With --calibration: measure on Ray (a local runtime, or the cluster at ADDRESS).")
@click.option("--workers", type=int, help="Ray workers (default: one per CPU, or per GPU with --device cuda).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="The runtime that measures --calibration KL.")
@click.option("--types", "types", metavar="T1,T2,...", help="Candidate types for --target-* (default: "
              "Q2_K..F16, those llama.cpp's CPU and CUDA backends run).")
@click.option("--allocator", type=click.Choice(["lagrange", "greedy"]), default="lagrange", show_default=True,
              help="Solver for --target-*.")
@click.option("--recipe-out", type=click.Path(path_type=Path), metavar="FILE",
              help="Write the per-tensor types as a --tensor-type-file that reproduces OUT.")
@click.option("--like", type=click.Path(path_type=Path), metavar="TEMPLATE.gguf",
              help="Every tensor gets the template's type (a quantization of the same model).")
@click.option("--plot", type=click.Path(path_type=Path), metavar="PNG",
              help="With --target-*: predicted damage vs bpw, allocations at several budgets and the presets.")
@click.option("--dry-run", is_flag=True, help="Print the per-tensor plan and sizes; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report on stdout.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--threads", "-t", type=int, help="Numba threads (default: all cores).")
@click.option("--split-max-size", help="Split the output into shards of at most this size (e.g. 2G).")
def quantize_command(inp, out, type_, outtype, imatrix, tensor_types, tensor_type_file, token_embedding_type,
                     output_tensor_type, pure, allow_requantize, target_bpw, target_size, calibration, ctx, chunks,
                     state, ray_address, workers, device, types, allocator, recipe_out, like, plot, dry_run, as_json, force, threads, split_max_size):
    """Quantize a GGUF with llama.cpp's presets and mixture rules (bit-exact with llama-quantize), or
    with per-tensor types allocated under a size budget (--target-bpw / --target-size).

    TYPE may follow OUT as in llama-quantize (`ggquant quantize IN.gguf OUT.gguf Q4_K_M`); it is
    --outtype by another name."""
    from ggquant.convert.gguf_to_gguf import default_outfile, format_plan, quantize_gguf
    from ggquant.convert.mix import Mix, plot_pareto

    if type_ is not None:
        if outtype is not None and outtype.upper() != type_.upper():
            raise GGQuantError(f"the type is given twice: {type_} after OUT and --outtype {outtype}; give one")
        outtype = type_
    mix = None
    if target_bpw is not None or target_size is not None:
        text = None
        if calibration is not None:
            try:
                text = Path(calibration).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise GGQuantError(f"--calibration {calibration}: cannot read it as UTF-8 text ({e})") from None
        mix = Mix(target_bpw=target_bpw, target_size=_size(target_size, "--target-size"), allocator=allocator,
                  calibration=text, ctx=ctx, chunks=chunks, threads=threads, device=device,
                  state=str(state) if state else None, ray=ray_address, workers=workers)
        if types:
            mix.types = _types(types)
    elif calibration is not None or types or plot is not None:
        raise GGQuantError("--calibration, --types and --plot go with --target-bpw or --target-size")
    if (state or ray_address) and calibration is None:
        raise GGQuantError("--state and --ray go with --calibration (they hold and spread its measurements)")
    if out is None:
        if outtype is None:
            raise GGQuantError("give OUT (the output file) when there is no --outtype to name it after")
        out = default_outfile(inp, outtype)
    res = quantize_gguf(inp, out, outtype, imatrix=imatrix, tensor_types=tensor_types,
                        tensor_type_file=tensor_type_file, pure=pure, allow_requantize=allow_requantize,
                        token_embedding_type=token_embedding_type, output_tensor_type=output_tensor_type,
                        dry_run=dry_run, force=force, threads=threads, progress=not as_json and sys.stderr.isatty(),
                        split_max_size=_size(split_max_size), mix=mix, like=like, recipe_out=recipe_out)
    if plot is not None:
        plot_pareto(plot, inp, mix, imatrix is not None, force)
    if as_json:
        click.echo(json.dumps(res.to_json(), indent=1))
    elif dry_run:
        click.echo(format_plan(res))
    else:
        changed = sum(c.converts for c in res.tensors)
        click.echo(f"{inp} -> {', '.join(res.written)}: {res.outtype}, {changed}/{len(res.tensors)} tensors "
                   f"converted, {res.bytes_in / 2**20:.2f} MiB -> {res.bytes_out / 2**20:.2f} MiB "
                   f"in {res.seconds:.1f} s")
        if res.allocation:
            a = res.allocation
            click.echo(f"allocation ({a['method']}, {'measured KL' if a['measured'] else 'proxy'}): "
                       f"{a['bpw']:.3f} bpw, {a['bytes']} of {a['budget_bytes']} bytes")
        if recipe_out is not None:
            im = f" --imatrix {imatrix}" if imatrix else ""
            click.echo(f"recipe: {recipe_out} (ggquant quantize {inp} OUT --tensor-type-file {recipe_out} "
                       f"--outtype {res.outtype}{im}; llama-quantize --tensor-type-file {recipe_out}{im} "
                       f"{inp} OUT {res.outtype})")
