"""The `ggquant` command line. Flag names follow llama.cpp's tools where the meaning is the same."""

import sys

import click

from ggquant.errors import GGQuantError


class _Group(click.Group):
    """Print GGQuantError as one readable line (no traceback) and exit 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GGQuantError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ggquant")
def main():
    """ggquant: move LLM weights into and out of GGUF, bit-exact with ggml, and prove it."""


from ggquant.cli.convert import convert_command  # noqa: E402
from ggquant.cli.imatrix import imatrix_command  # noqa: E402
from ggquant.cli.inspect import inspect_command  # noqa: E402
from ggquant.cli.quantize import quantize_command  # noqa: E402
from ggquant.cli.run import parity_command, run_command  # noqa: E402
from ggquant.cli.verify import verify_command  # noqa: E402

for _cmd in (convert_command, quantize_command, imatrix_command, run_command, parity_command, inspect_command,
             verify_command):
    main.add_command(_cmd)


if __name__ == "__main__":
    main()
