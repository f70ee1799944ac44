"""Gemma 4 assistant drafters (`gemma4_assistant`, gemma4-assistant GGUFs): convert, quantize,
inspect. (Whole files against llama.cpp's converter at f32/f16/bf16/q8_0: test_convert_parity.py.)

- the masked embedding is not converted (llama.cpp skips it), the target's hidden size and the
  layer count are recorded (embedding_length_out, nextn_predict_layers);
- llama-quantize presets equal llama_model_quantize of ggquant's F32 GGUF;
- `ggquant inspect` reads the file; the runtime refuses it with a clear message (a drafter runs
  inside its target's context in llama.cpp, which ggquant does not do);
- an assistant without its backbone's hidden size is refused, naming the key;
- GGUF -> HF: the drafter comes back as a Gemma4AssistantForCausalLM without its masked embedding
  (use_ordered_embeddings off): every other weight bit-equal, transformers computes the original's
  projected state and lm_head logits bit for bit (and the original's masked logits wherever its
  centroids select a token), converting back gives the same GGUF bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

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


def _drafter_outputs(model, seed: int = 0):
    """(projected hidden state, logits) of one draft step over a random target context."""
    import torch

    g = torch.Generator().manual_seed(seed)
    tc, n_ctx = model.config.get_text_config(), 9
    kv = {}
    for kind in ("full_attention", "sliding_attention"):  # K and V of the target's last layer of each kind
        c = tc.per_layer_config[tc.layer_types.index(kind)]
        kv[kind] = tuple(torch.randn(1, c.num_key_value_heads, n_ctx, c.head_dim, generator=g) for _ in "kv")
    emb = torch.randn(1, 1, 2 * model.config.backbone_hidden_size, generator=g)
    with torch.no_grad():
        out = model(inputs_embeds=emb, shared_kv_states=kv, position_ids=torch.tensor([[n_ctx]]))
    return out.last_hidden_state, out.logits


def test_drafter_goes_back_to_hugging_face(f32_gguf, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import Gemma4AssistantForCausalLM

    from ggquant.convert.gguf_to_hf import export_hf

    orig = tiny_model(MODEL)
    hf = tmp_path / "hf" / orig.name
    assert export_hf(f32_gguf, outfile=hf, dtype="bf16").arch == "Gemma4AssistantForCausalLM"
    want = {k: v for k, v in load_file(str(orig / "model.safetensors")).items() if not k.startswith("masked_embedding.")}
    got = load_file(str(hf / "model.safetensors"))
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k].view(torch.int16), want[k].view(torch.int16)) for k in want)

    def load(folder):
        m, info = Gemma4AssistantForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
        assert not {k: v for k, v in info.items() if v}
        return m.eval()

    ours, theirs = load(hf), load(orig)
    assert not ours.config.use_ordered_embeddings and theirs.config.use_ordered_embeddings
    state, logits = _drafter_outputs(ours)
    masked_state, masked = _drafter_outputs(theirs)
    theirs.config.use_ordered_embeddings = False  # the same checkpoint's lm_head logits
    dense_state, dense = _drafter_outputs(theirs)
    assert torch.equal(state, masked_state) and torch.equal(state, dense_state)
    assert torch.equal(logits, dense)
    picked = masked != masked.min()  # the tokens of the centroids the original selects
    assert picked.sum() == theirs.config.centroid_intermediate_top_k * 512 // theirs.config.num_centroids
    assert torch.equal(logits[picked], masked[picked])

    (tmp_path / "back").mkdir()
    again = convert(hf, outtype="f32", outfile=tmp_path / "back" / "a.gguf").written[0]
    assert Path(again).read_bytes() == f32_gguf.read_bytes()
