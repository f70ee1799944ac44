"""The GGML type registry (ggquant.quant.types) is the one place a type's kernels are named: every kernel a
family module lists is its type's entry, and the runtime capabilities an entry declares are complete."""

import numpy as np
import pytest

from ggquant.kernels.cpu import actquant
from ggquant.kernels.quants import floats, iq4, iquants, kquants, legacy, lowbit
from ggquant.quant import types as qt

FAMILIES = (floats, legacy, kquants, iq4, iquants, lowbit)


def test_every_family_kernel_is_its_types_registry_entry():
    listed = set()
    for mod in FAMILIES:
        for t, fn in mod.QUANTIZE.items():
            assert qt.REGISTRY[t].quantize_fn is fn, t.name
        for t, fn in mod.DEQUANTIZE.items():
            assert qt.REGISTRY[t].dequantize_fn is fn, t.name
            listed.add(t)
    assert listed == set(qt.REGISTRY)


@pytest.mark.parametrize("qtype", qt.CPU_TYPES, ids=lambda t: t.name)
def test_cpu_types_declare_a_product_and_an_activation_ggquant_converts_to(qtype):
    entry = qt.get(qtype)
    assert entry.cpu_matmul is not None and entry.vec_dot_type is not None
    x = np.ones((1, 256), np.float32)  # whole blocks of every activation type
    assert actquant.convert_activation(entry.vec_dot_type, x)[0].shape[0] == 1


def test_runtime_capabilities_come_in_pairs():
    for t, e in qt.REGISTRY.items():
        assert (e.cpu_matmul is None) == (e.vec_dot_type is None), t.name
        assert e.cuda_repack is None or e.cuda_dequantize is not None, t.name
        assert e.exact_codes is None or e.block_size == 32, t.name  # exact transcoding fills 32-element blocks
