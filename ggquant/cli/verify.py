"""`ggquant verify`: is a quantized GGUF what quantizing its source gives? (ggquant.convert.verify)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


@click.command("verify")
@click.argument("quantized", type=click.Path(path_type=Path))
@click.option("--source", required=True, type=click.Path(path_type=Path),
              help="The GGUF it was quantized from (F32, F16 or BF16).")
@click.option("--imatrix", type=click.Path(path_type=Path), help="The importance matrix it was quantized with.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report on stdout.")
def verify_command(quantized, source, imatrix, as_json):
    """Re-derive every tensor of QUANTIZED from --source and compare byte for byte (exit 0 only if
    all are identical)."""
    from ggquant.convert.verify import verify_gguf

    res = verify_gguf(quantized, source, imatrix=imatrix, progress=not as_json and sys.stderr.isatty())
    if as_json:
        click.echo(json.dumps(res.to_json(), indent=1))
    else:
        for t in res.tensors:
            if t.status != "identical":
                click.echo(f"{t.name:<40} {t.qtype:<8} {t.status}: {t.detail}")
        counts = ", ".join(f"{n} {k}" for k, n in sorted(res.counts().items()))
        verdict = "IDENTICAL" if res.identical else "NOT IDENTICAL"
        click.echo(f"{quantized}: {verdict} to quantizing {source}"
                   f"{' with ' + str(imatrix) if imatrix else ''} ({counts}; {res.seconds:.1f} s)")
    sys.exit(0 if res.identical else 1)
