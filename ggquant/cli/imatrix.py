"""`ggquant imatrix`: collect (llama-imatrix), show and convert importance matrices."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

from ggquant.errors import GGQuantError
from ggquant.files import check_overwrite


class _ImatrixGroup(click.Group):
    """`ggquant imatrix MODEL -f TEXT ...` collects; `imatrix show|convert ...` are subcommands."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["collect", *args]
        return super().parse_args(ctx, args)


@click.group("imatrix", cls=_ImatrixGroup)
def imatrix_command():
    """Importance matrices: collect (ggquant imatrix MODEL -f TEXT -o OUT), show, convert."""


@imatrix_command.command("collect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-f", "--file", "text_file", type=click.Path(path_type=Path), required=True,
              help="Calibration text (UTF-8).")
@click.option("-o", "--output-file", "out", type=click.Path(path_type=Path), default=Path("imatrix.gguf"),
              show_default=True)
@click.option("--output-format", type=click.Choice(["gguf", "dat"]), default="gguf", show_default=True)
@click.option("-c", "--ctx", type=int, default=512, show_default=True, help="Tokens per chunk.")
@click.option("--chunks", type=int, help="Process at most this many chunks.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("-t", "--threads", type=int, help="CPU threads (default: all cores; with --devices: per CPU worker).")
@click.option("--devices", metavar="D1,D2,...",
              help="Data parallel: one model replica per device (cuda:0,cuda:1,... or cpu,cpu), chunks spread over "
                   "them; the file is the same for any number of devices (each chunk's sums merged in chunk order).")
@click.option("--in-file", "in_files", multiple=True, type=click.Path(path_type=Path),
              help="Earlier imatrix files (GGUF or .dat) to merge with the new statistics.")
@click.option("--process-output", is_flag=True, help="Also collect output.weight (untied models).")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"], case_sensitive=False), default=None,
              help="MODEL is a Hugging Face folder: the type its weights are converted to in memory, as "
                   "`ggquant convert --outtype` writes them [default: f32].")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary on stdout.")
@click.option("--force", is_flag=True, help="Overwrite the output file if it exists.")
def imatrix_collect(model, text_file, out, output_format, ctx, chunks, device, threads, devices, in_files,
                    process_output, outtype, as_json, force):
    """Collect an importance matrix for MODEL (a GGUF, or a Hugging Face folder run as its F32 conversion,
    built in memory) from a calibration text, like llama-imatrix."""
    from ggquant.imatrix.collect import collect_imatrix
    from ggquant.imatrix.files import load, merge, save_dat, save_gguf

    check_overwrite([out], force)
    previous = [load(p) for p in in_files]  # read (and validate) before the long run
    if devices is not None:
        devices = [d.strip() for d in devices.split(",") if d.strip()]
        if not devices:
            raise GGQuantError("--devices: give one or more of cpu, cuda, cuda:N separated by commas")
    im, stats = collect_imatrix(model, text_file, ctx=ctx, chunks=chunks, device=device, threads=threads,
                                process_output=process_output, progress=not as_json and sys.stderr.isatty(),
                                outtype=outtype, devices=devices)
    if previous:
        im = merge([*previous, im])
    (save_gguf if output_format == "gguf" else save_dat)(im, out, force=force)
    stats.update(output=str(out), format=output_format, merged=[str(p) for p in in_files])
    if as_json:
        click.echo(json.dumps(stats, indent=1))
    else:
        where = "" if stats["weights"] == "GGUF" else f" ({stats['weights']})"
        click.echo(f"{model}{where}: {stats['entries']} entries from {stats['chunks']} chunks x {ctx} tokens "
                   f"({stats['tokens_per_s']:.1f} tokens/s) -> {out}")


@imatrix_command.command("show")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--top", type=int, default=5, help="Columns with the largest mean squared activation to list.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report on stdout.")
def imatrix_show(path, top, as_json):
    """Entries, counts and top columns of a GGUF or legacy .dat imatrix."""
    from ggquant.imatrix.files import load

    im = load(path)
    norm = im.normalised()
    rows = []
    for name, e in sorted(im.entries.items()):
        v = norm[name]
        idx = np.argsort(-v, kind="stable")[:top]
        rows.append({"name": name, "n_mat": int(e.counts.size), "n_in": int(e.sums.shape[-1]),
                     "counts": e.counts.tolist(), "top_columns": [[int(i), float(v[i])] for i in idx]})
    rep = {"path": str(path), "format": "dat" if im.legacy else "gguf", "datasets": im.datasets,
           "chunk_count": im.chunk_count, "chunk_size": im.chunk_size, "entries": rows}
    if as_json:
        click.echo(json.dumps(rep, indent=1))
        return
    click.echo(f"{path} ({rep['format']}): {len(rows)} entries, {im.chunk_count} chunks of {im.chunk_size}, "
               f"datasets {im.datasets}")
    for r in rows:
        tops = ", ".join(f"{i}:{v:.4g}" for i, v in r["top_columns"])
        cnt = r["counts"][0] if r["n_mat"] == 1 else f"{r['n_mat']} experts, {sum(r['counts'])} total"
        click.echo(f"  {r['name']:<40} n_in {r['n_in']:>6}  count {cnt}  top {tops}")


@imatrix_command.command("convert")
@click.argument("inp", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--output-format", type=click.Choice(["gguf", "dat"]), required=True)
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def imatrix_convert(inp, out, output_format, force):
    """Convert an imatrix between llama.cpp's GGUF and legacy .dat layouts."""
    from ggquant.imatrix.files import load, save_dat, save_gguf

    im = load(inp)
    (save_gguf if output_format == "gguf" else save_dat)(im, out, force=force)
    click.echo(f"{inp} -> {out} ({output_format}, {len(im.entries)} entries)")
