"""`ggquant quantize`: llama-quantize's presets and mixture rules on a GGUF (ggquant.convert.gguf_to_gguf)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ggquant.errors import GGQuantError
from ggquant.quant.presets import PRESETS
from ggquant.quant.types import QUANTIZE_TYPES


def _size(text: str | None) -> int | None:
    """llama.cpp's --split-max-size syntax: 500M, 2G, or plain bytes."""
    if text is None:
        return None
    mult = {"K": 1000, "M": 1000**2, "G": 1000**3}
    t = text.strip().upper()
    try:
        return int(float(t[:-1]) * mult[t[-1]]) if t[-1] in mult else int(t)
    except (ValueError, IndexError):
        raise GGQuantError(f"--split-max-size {text!r}: expected a size like 500M or 2G") from None


@click.command("quantize")
@click.argument("inp", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path), required=False)
@click.option("--outtype", required=True, help="Preset: " + " ".join(PRESETS))
@click.option("--imatrix", type=click.Path(path_type=Path), help="Importance matrix (GGUF or legacy .dat).")
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="REGEX=TYPE",
              help="Override the type of tensors whose name matches REGEX (first match wins). TYPE: "
                   + " ".join(t.name for t in QUANTIZE_TYPES) + ".")
@click.option("--token-embedding-type", metavar="TYPE", help="Type for token_embd (and per_layer_token_embd).")
@click.option("--output-tensor-type", metavar="TYPE", help="Type for output.weight.")
@click.option("--pure", is_flag=True, help="No mixture rules: every quantizable tensor gets the preset's type.")
@click.option("--allow-requantize", is_flag=True, help="Allow requantizing tensors that are already quantized.")
@click.option("--dry-run", is_flag=True, help="Print the per-tensor plan and sizes; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report on stdout.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--threads", "-t", type=int, help="Numba threads (default: all cores).")
@click.option("--split-max-size", help="Split the output into shards of at most this size (e.g. 2G).")
def quantize_command(inp, out, outtype, imatrix, tensor_types, token_embedding_type, output_tensor_type, pure,
             allow_requantize, dry_run, as_json, force, threads, split_max_size):
    """Quantize a GGUF with llama.cpp's presets and mixture rules (bit-exact with llama-quantize)."""
    from ggquant.convert.gguf_to_gguf import default_outfile, format_plan, quantize_gguf

    out = out or default_outfile(inp, outtype)
    res = quantize_gguf(inp, out, outtype, imatrix=imatrix, tensor_types=tensor_types, pure=pure,
                        allow_requantize=allow_requantize, token_embedding_type=token_embedding_type,
                        output_tensor_type=output_tensor_type, dry_run=dry_run, force=force, threads=threads,
                        progress=not as_json and sys.stderr.isatty(), split_max_size=_size(split_max_size))
    if as_json:
        click.echo(json.dumps(res.to_json(), indent=1))
    elif dry_run:
        click.echo(format_plan(res))
    else:
        changed = sum(c.converts for c in res.tensors)
        click.echo(f"{inp} -> {', '.join(res.written)}: {res.outtype}, {changed}/{len(res.tensors)} tensors "
                   f"converted, {res.bytes_in / 2**20:.2f} MiB -> {res.bytes_out / 2**20:.2f} MiB "
                   f"in {res.seconds:.1f} s")
