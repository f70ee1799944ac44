"""Model families: one module per family, looked up by the Hugging Face architecture string
(config.json "architectures"[0]), as llama.cpp's converter does."""

from __future__ import annotations

from ggquant.arch.base import Arch
from ggquant.arch.gemma3 import Gemma3
from ggquant.arch.gemma4 import Gemma4
from ggquant.errors import GGQuantError

ARCHITECTURES: dict[str, type[Arch]] = {}
for _cls in (Gemma3, Gemma4):
    for _name in _cls.hf_architectures:
        ARCHITECTURES[_name] = _cls


def arch_class(hf_arch: str, where: str = "config.json") -> type[Arch]:
    try:
        return ARCHITECTURES[hf_arch]
    except KeyError:
        raise GGQuantError(
            f"{where}: architecture {hf_arch!r} is not supported; ggquant converts "
            f"{', '.join(sorted(ARCHITECTURES))}"
        ) from None
