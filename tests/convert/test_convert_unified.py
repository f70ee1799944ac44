"""Gemma 4 Unified (`gemma4_unified`): what the other Gemma 4 models do not have. (Whole files
against llama.cpp's converter, text and the gemma4uv / gemma4ua mmproj: test_convert_parity.py.)

- the mmproj's patch projection is reordered to ggml's im2col order (CHW) and the position table
  transposed, whatever the chunk size;
- the text GGUF alone goes back to Hugging Face as a Gemma4ForCausalLM: weights bit-equal,
  transformers computes the original's logits, suppress_tokens back in generation_config.json
  (with its mmproj: Gemma4UnifiedForConditionalGeneration, tests/convert/test_to_hf.py "unified_mm");
- bad input (no audio_config for the mmproj, a patch projection of the wrong width, malformed
  suppress_tokens) fails with one line naming the key or tensor, and writes nothing.
"""

from __future__ import annotations

import json
from unittest import mock


from ggquant.arch.gemma4 import chw_permutation
from ggquant.convert import convert
from ggquant.fixtures import tiny_model
from ggquant.formats.gguf import GGUFReader
from tests.convert.helpers import assert_identical
from tests.convert.test_convert_bad_input import _edit_config, _edit_tensors, fails, model  # noqa: F401 (fixture)

MODEL = "gemma4_unified"


def test_chw_permutation_reorders_rgb_interleaved_columns():
    """Column i of the GGUF tensor is the checkpoint's (row, col, channel) column of ggml im2col's
    (channel, row, col) position i."""
    p = 2
    hwc = [(r, c, ch) for r in range(p) for c in range(p) for ch in range(3)]  # checkpoint order
    perm = chw_permutation(p)
    assert [hwc[j] for j in perm] == [(r, c, ch) for ch in range(3) for r in range(p) for c in range(p)]


def test_mmproj_is_the_same_in_tiny_chunks(tmp_path):
    from ggquant.convert import encode

    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    convert(tiny_model(MODEL), outtype="f32", outfile=a, mmproj_only=True)
    with mock.patch.object(encode, "CHUNK_BYTES", 64):
        convert(tiny_model(MODEL), outtype="f32", outfile=b, mmproj_only=True)
    assert_identical(a, b)
    with GGUFReader(a) as r:
        assert r.tensor("v.position_embd.weight").shape == (2, 64, 32)
        assert r.get("clip.vision.projector_type") == "gemma4uv" and r.get("clip.audio.projector_type") == "gemma4ua"


def test_text_gguf_goes_back_to_hugging_face(tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ggquant.convert.gguf_to_hf import export_hf

    orig = tiny_model(MODEL)
    gguf = convert(orig, outtype="f32", outfile=tmp_path / "u.gguf").written[0]
    hf = tmp_path / "hf"
    assert export_hf(gguf, outfile=hf).arch == "Gemma4ForCausalLM"
    want = {k.replace("model.language_model.", "model."): v
            for k, v in load_file(str(orig / "model.safetensors")).items() if k.startswith("model.language_model.")}
    got = load_file(str(hf / "model.safetensors"))
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k].view(torch.int32), want[k].float().view(torch.int32)) for k in want)
    gen = json.loads((orig / "generation_config.json").read_text())
    assert json.loads((hf / "generation_config.json").read_text())["suppress_tokens"] == gen["suppress_tokens"]
    ids = torch.tensor([[2] + list(range(300, 340))])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(orig, dtype=torch.float32).eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()(ids).logits
    assert torch.equal(a, b)


def test_mmproj_without_audio_config_is_refused(model, tmp_path):
    unified = model(MODEL)
    _edit_config(unified, lambda c: c.pop("audio_config"))
    fails(unified, tmp_path, "audio_config", extra=["--mmproj"])


def test_patch_projection_of_the_wrong_width_names_the_tensor(model, tmp_path):
    unified = model(MODEL)

    def cut(t):
        k = "model.vision_embedder.patch_dense.weight"
        t[k] = t[k][:, :400].clone()

    _edit_tensors(unified, cut)
    fails(unified, tmp_path, "model.vision_embedder.patch_dense.weight", "432", extra=["--mmproj"])


def test_malformed_suppress_tokens_are_refused(model, tmp_path):
    unified = model(MODEL)
    p = unified / "generation_config.json"
    gen = json.loads(p.read_text())
    gen["suppress_tokens"] = ["<pad>"]
    p.write_text(json.dumps(gen))
    fails(unified, tmp_path, "generation_config.json", "suppress_tokens")
