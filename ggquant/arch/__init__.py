"""Model families, one module per family in this package, each registering itself.

A family class registers with `@register("Gemma3ForCausalLM", ...)` on the Hugging Face
architecture strings it converts (config.json "architectures"[0]) and is also found by its GGUF
architecture (general.architecture, from its `model_arch`), as llama.cpp's converter does with
`@ModelBase.register(...)`. The modules of this package are imported once, on the first lookup
(llama.cpp conversion/__init__.py load_all_models), so adding a family means adding its module:
there is no list to edit here.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from ggquant.arch.base import Arch
from ggquant.errors import GGQuantError

_BY_HF: dict[str, type[Arch]] = {}
_BY_GGUF: dict[str, type[Arch]] = {}
_loaded = False


def register(*hf_architectures: str):
    """Class decorator: the family converts these HF architectures; its GGUF architecture is the
    class's `model_arch` (one family per GGUF architecture, so GGUF -> HF knows whom to ask)."""

    def deco(cls: type[Arch]) -> type[Arch]:
        cls.hf_architectures = tuple(hf_architectures)
        for name in hf_architectures:
            if name in _BY_HF and _BY_HF[name] is not cls:
                raise TypeError(f"{name} is registered twice ({_BY_HF[name].__name__}, {cls.__name__})")
            _BY_HF[name] = cls
        other = _BY_GGUF.setdefault(cls.gguf_arch, cls)
        # a variant of a family (Gemma 4 Unified) writes the family's GGUF architecture: the GGUF
        # is read back by the family class registered first
        if other is not cls and not issubclass(cls, other):
            raise TypeError(f"GGUF architecture {cls.gguf_arch!r} is registered twice ({other.__name__}, "
                            f"{cls.__name__})")
        return cls

    return deco


def _load_all() -> None:
    """Import every module of the package once; their @register decorators fill the tables."""
    global _loaded
    if not _loaded:
        for m in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{m.name}")
        _loaded = True


def families() -> list[type[Arch]]:
    """Every registered family class, once each."""
    _load_all()
    return list(dict.fromkeys(_BY_HF.values()))


def arch_class(hf_arch: str, where: str = "config.json") -> type[Arch]:
    """The family that converts Hugging Face architecture `hf_arch`."""
    _load_all()
    try:
        return _BY_HF[hf_arch]
    except KeyError:
        raise GGQuantError(
            f"{where}: architecture {hf_arch!r} is not supported; ggquant converts {', '.join(sorted(_BY_HF))}"
        ) from None


def gguf_arch_class(gguf_arch: str, path: Path) -> type[Arch]:
    """The family of a GGUF whose general.architecture is `gguf_arch` (GGUF -> HF)."""
    _load_all()
    try:
        return _BY_GGUF[gguf_arch]
    except KeyError:
        raise GGQuantError(f"{path}: general.architecture = {gguf_arch!r} is not supported; ggquant converts "
                           f"{', '.join(sorted(_BY_GGUF))} GGUFs to Hugging Face") from None


__all__ = ["arch_class", "families", "gguf_arch_class", "register"]
