"""Gemma 4 assistant drafters (`gemma4_assistant`, gemma4-assistant GGUFs): convert, quantize,
inspect. (Whole files against llama.cpp's converter at f32/f16/bf16/q8_0: test_convert_parity.py.)

- the masked embedding is not converted (llama.cpp skips it), the target's hidden size and the
  layer count are recorded (embedding_length_out, nextn_predict_layers);
- llama-quantize presets equal llama_model_quantize of ggquant's F32 GGUF;
- `ggquant inspect` reads the file; the runtime refuses it with a clear message (a drafter runs
  inside its target's context in llama.cpp, which ggquant does not do);
- an assistant without its backbone's hidden size is refused, naming the key.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ggquant.cli import main
from ggquant.convert import convert
from ggquant.errors import GGQuantError
from ggquant.fixtures import tiny_model
from ggquant.fixtures.gemma4 import ASSISTANT_BACKBONE_HIDDEN
from ggquant.formats.gguf import GGUFReader
from ggquant.quant import presets
from tests.convert.helpers import assert_identical
from tests.convert.test_convert_bad_input import _edit_config, fails, model  # noqa: F401 (fixture)
from tests.oracles import ggml as ggml_oracle

MODEL = "gemma4_assistant"


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory):
    out = tmp_path_factory.mktemp("assistant") / "assistant-f32.gguf"
    convert(tiny_model(MODEL), outtype="f32", outfile=out)
    return out


def test_drafter_keys_and_tensors(f32_gguf):
    with GGUFReader(f32_gguf) as r:
        assert r.get("general.architecture") == "gemma4-assistant"
        assert r.get("gemma4-assistant.embedding_length_out") == ASSISTANT_BACKBONE_HIDDEN
        assert r.get("gemma4-assistant.nextn_predict_layers") == r.get("gemma4-assistant.block_count") == 4
        names = {t.name for t in r.tensors}
    assert {"nextn.pre_projection.weight", "nextn.post_projection.weight"} <= names
    assert not any("masked" in n or "attn_k" in n or "attn_v" in n for n in names)


@pytest.mark.parametrize("preset", ["Q4_K_M", "Q6_K", "Q4_0"])
def test_drafter_preset_equals_llama_model_quantize(f32_gguf, tmp_path, preset):
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    convert(tiny_model(MODEL), outtype=preset, outfile=ours)
    ggml_oracle.llama_quantize(f32_gguf, ref, presets.PRESETS[preset])
    assert_identical(ref, ours)


def test_drafter_inspects_and_the_runtime_says_it_does_not_run_drafters(f32_gguf):
    from ggquant.runtime.model import load_model

    res = CliRunner().invoke(main, ["inspect", str(f32_gguf), "--json"])
    assert res.exit_code == 0, res.output
    meta = json.loads(res.output)["metadata"]
    assert meta["gemma4-assistant.embedding_length_out"]["value"] == ASSISTANT_BACKBONE_HIDDEN
    with pytest.raises(GGQuantError, match="gemma4-assistant"):
        load_model(f32_gguf)


def test_assistant_without_its_backbone_config_is_refused(model, tmp_path):
    assistant = model(MODEL)
    _edit_config(assistant, lambda c: c.pop("backbone_hidden_size"))
    fails(assistant, tmp_path, "backbone_hidden_size", "backbone")


def test_assistant_with_its_own_kv_is_refused(model, tmp_path):
    assistant = model(MODEL)
    _edit_config(assistant, lambda c: c["text_config"].update(num_kv_shared_layers=2))
    fails(assistant, tmp_path, "num_kv_shared_layers = 2")
