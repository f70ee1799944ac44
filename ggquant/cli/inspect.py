"""`ggquant inspect`: a GGUF's or a safetensors folder's metadata and tensors."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report on stdout.")
def inspect_command(path, as_json):
    """Show a GGUF's metadata and tensors, or a safetensors folder's config and tensors."""
    from ggquant.formats.inspect import format_report
    from ggquant.formats.inspect import inspect as do_inspect

    rep = do_inspect(path)
    click.echo(json.dumps(rep, indent=1) if as_json else format_report(rep))
