"""`ggquant convert --outtype <llama-quantize preset>` equals llama_model_quantize applied to
ggquant's own F32 GGUF of the same checkpoint: same tensor order, types, bytes and metadata,
with and without an importance matrix and with --tensor-type overrides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from ggquant.fixtures import tiny_model
from ggquant.convert import convert
from ggquant.errors import GGQuantError
from ggquant.formats.gguf import GGUFReader
from ggquant.quant import presets
from tests.oracles import ggml as ggml_oracle
from tests.convert.helpers import assert_identical, assert_same_tensors

IMATRIX_KEYS = ("quantize.imatrix.file", "quantize.imatrix.dataset", "quantize.imatrix.entries_count",
                "quantize.imatrix.chunks_count")


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory):
    """ggquant's F32 GGUFs of the fixtures: the input llama_model_quantize gets."""
    d = tmp_path_factory.mktemp("f32")
    out = {}
    for name in ("gemma4_e4b", "gemma4_e2b", "gemma3_text", "llama3", "qwen3"):
        out[name] = d / f"{name}.gguf"
        convert(tiny_model(name), outtype="f32", outfile=out[name])
    return out


CASES = ([("gemma4_e4b", p) for p in ("Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K", "IQ4_XS", "Q4_0", "Q5_1")]
         + [("gemma4_e2b", p) for p in ("Q4_K_M", "Q2_K", "IQ4_NL")]
         + [("gemma3_text", p) for p in ("Q4_K_M", "Q6_K", "Q3_K_L")])


@pytest.mark.parametrize("model,preset", CASES)
def test_preset_equals_llama_model_quantize_of_f32(f32_gguf, tmp_path, model, preset):
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    convert(tiny_model(model), outtype=preset, outfile=ours)
    ggml_oracle.llama_quantize(f32_gguf[model], ref, presets.PRESETS[preset])
    assert_identical(ref, ours)


def _imatrix_file(path, f32_path, seed=0):
    """A llama-imatrix style file with random activations for every matmul of the model."""
    from tests.imatrix_util import write_imatrix_gguf

    rng = np.random.default_rng(seed)
    sums, counts = {}, {}
    with GGUFReader(f32_path) as r:
        for t in r.tensors:
            if len(t.shape) == 2 and t.name.startswith("blk."):
                v = rng.gamma(1.0, 1.0, t.shape[-1]).astype(np.float32)
                v[rng.random(v.size) < 0.05] = 0  # some columns never active
                sums[t.name], counts[t.name] = v * 32, 32
    return write_imatrix_gguf(path, sums, counts)


def _assert_equal_but_imatrix_keys(ours, ref, im):
    """Tensors, types, bytes and metadata equal; llama-quantize (the tool) records the imatrix as KV
    overrides, llama_model_quantize alone does not, so ggquant's quantize.imatrix.* keys are extra."""
    from ggquant.imatrix.files import load

    with GGUFReader(ours) as a, GGUFReader(ref) as b:
        assert [k for k in a.fields if k not in IMATRIX_KEYS] == list(b.fields)
        assert a.get("quantize.imatrix.entries_count") == len(load(im).normalised())
        for k, f in b.fields.items():
            assert (a.fields[k].type, str(a.fields[k].value)) == (f.type, str(f.value)), k
    assert_same_tensors(ref, ours)


@pytest.mark.parametrize("preset", ["Q4_K_M", "IQ4_XS", "Q3_K_S", "Q4_0"])
def test_preset_with_imatrix_equals_llama_model_quantize(f32_gguf, tmp_path, preset):
    from ggquant.imatrix.files import load

    model = "gemma4_e4b"
    im = _imatrix_file(tmp_path / "imatrix.gguf", f32_gguf[model])
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    convert(tiny_model(model), outtype=preset, outfile=ours, imatrix=im)
    ggml_oracle.llama_quantize(f32_gguf[model], ref, presets.PRESETS[preset], imatrix=load(im).normalised())
    _assert_equal_but_imatrix_keys(ours, ref, im)
    # and the imatrix really changed something
    plain = tmp_path / "plain.gguf"
    convert(tiny_model(model), outtype=preset, outfile=plain)
    with GGUFReader(ours) as a, GGUFReader(plain) as p:
        assert any(not np.array_equal(a.tensor(t.name).raw(), t.raw()) for t in p.tensors if t.qtype != T.F32)


# issue 14: the low-bit presets through `convert --outtype`, with an imatrix (most of them need one), on
# Gemma 4 (rows of 96 and 192: the IQ4_NL / Q4_0 / Q5_0 fallbacks), Gemma 3 and the llama-like families
LOW_BIT_CASES = [("gemma4_e4b", "IQ2_M"), ("gemma4_e4b", "IQ1_M"), ("gemma4_e2b", "TQ2_0"),
                 ("gemma3_text", "IQ3_XXS"), ("gemma3_text", "Q2_K_S"), ("llama3", "IQ2_XS"),
                 ("llama3", "IQ3_M"), ("qwen3", "IQ1_S"), ("qwen3", "MXFP4_MOE")]


@pytest.mark.parametrize("model,preset", LOW_BIT_CASES)
def test_low_bit_preset_with_imatrix_equals_llama_model_quantize(f32_gguf, tmp_path, model, preset):
    from ggquant.imatrix.files import load

    im = _imatrix_file(tmp_path / "imatrix.gguf", f32_gguf[model])
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    convert(tiny_model(model), outtype=preset.lower(), outfile=ours, imatrix=im)
    ggml_oracle.llama_quantize(f32_gguf[model], ref, presets.PRESETS[preset], imatrix=load(im).normalised())
    _assert_equal_but_imatrix_keys(ours, ref, im)


def test_tensor_type_overrides_equal_llama(f32_gguf, tmp_path):
    rules = [("attn_v", T.Q8_0), (r"blk\.[0-3]\.ffn_down", T.Q5_K), ("per_layer_token_embd", T.Q6_K)]
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    convert(tiny_model("gemma4_e4b"), outtype="q4_k_m", outfile=ours,
            tensor_types=[f"{p}={t.name}" for p, t in rules])
    ggml_oracle.llama_quantize(f32_gguf["gemma4_e4b"], ref, presets.PRESETS["Q4_K_M"], tensor_types=rules)
    assert_identical(ref, ours)
    with GGUFReader(ours) as r:
        assert r.tensor("blk.0.attn_v.weight").qtype == T.Q8_0
        # rows of 96 cannot hold 256-wide K blocks: llama.cpp's fallback turns Q5_K into Q5_1
        assert r.tensor("blk.2.ffn_down.weight").qtype == T.Q5_1


def test_preset_mmproj_is_f16_and_named_so(tmp_path):
    """llama-quantize does not touch mmproj files: with a preset the sidecar is written as F16."""
    out = tmp_path / "m.gguf"
    conv = convert(tiny_model("gemma4_e4b"), outtype="Q4_K_M", outfile=out, mmproj=True)
    assert [f.outtype for f in conv.files] == ["Q4_K_M", "F16"]
    mm = Path(conv.written[1])
    assert mm.parent == tmp_path and mm.name.startswith("mmproj-") and mm.name.endswith("-F16.gguf")
    with GGUFReader(conv.written[1]) as r:
        assert r.get("general.file_type") == 1


def test_imatrix_and_tensor_type_need_a_preset(tmp_path):
    with pytest.raises(GGQuantError, match="presets"):
        convert(tiny_model("gemma3_text"), outtype="q8_0", outfile=tmp_path / "x.gguf", tensor_types=["attn_v=q8_0"])
    with pytest.raises(GGQuantError, match="unknown --outtype"):
        convert(tiny_model("gemma3_text"), outtype="q7_k", outfile=tmp_path / "x.gguf")
    assert not any(tmp_path.iterdir())
