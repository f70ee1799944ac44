"""Runtime models are found by the GGUF's general.architecture: runtime/models/<arch>.py is
imported by name when a model is loaded, not registered by an import side effect."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ggquant.arch import gguf_arch_class
from ggquant.errors import GGQuantError
from ggquant.runtime.model import Model, model_class, supported_architectures


def test_each_model_module_defines_the_model_of_its_name():
    assert {"gemma3", "gemma4", "llama", "qwen2", "qwen3"} <= set(supported_architectures())
    for arch in supported_architectures():
        cls = model_class(arch)
        assert issubclass(cls, Model) and cls.arch == arch
        # the converter's family of the same GGUF architecture (or the family it extends) owns the
        # hyperparameter decoder
        family = gguf_arch_class(arch, "m.gguf")
        assert cls.hparams_class.__module__ in {c.__module__ for c in family.__mro__}


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(GGQuantError, match=r"m.gguf: architecture 'phi3' is not supported .*gemma3, gemma4, llama, mistral3, qwen2, qwen3"):
        model_class("phi3", "m.gguf")
    for bad in ("", "..", "__init__", None):
        with pytest.raises(GGQuantError, match="not supported"):
            model_class(bad)


def test_model_modules_load_on_first_lookup():
    code = ("import sys; import ggquant.runtime.model as m; "
            "assert not [n for n in sys.modules if n.startswith('ggquant.runtime.models.')]; "
            "m.model_class('gemma4'); assert 'ggquant.runtime.models.gemma4' in sys.modules; "
            "assert 'ggquant.runtime.models.gemma3' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
