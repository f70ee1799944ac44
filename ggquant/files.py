"""Outputs appear only complete, and never replace a file silently.

Every job writes to a temporary file or folder beside its target and renames it into place when
it is complete (GGUFWriter for files, `output_folder` for Hugging Face / compressed-tensors / GLQ
folders), so an interrupted run leaves nothing half-written; an existing output is replaced only
with --force.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ggquant.errors import GGQuantError


def check_overwrite(paths, force: bool) -> None:
    """Refuse to replace existing outputs unless --force."""
    if force:
        return
    for p in paths:
        if Path(p).exists():
            raise GGQuantError(f"{p} already exists; pass --force to overwrite it (or choose another --outfile)")


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an existing one (--force) is moved aside first and
    deleted only after the rename succeeded."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.rmdir(old)
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def output_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out`, renamed to `out` when the block completes, removed if it fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
