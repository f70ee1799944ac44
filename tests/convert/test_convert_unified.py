"""Gemma 4 Unified (`gemma4_unified`): what the other Gemma 4 models do not have. (Whole files
against llama.cpp's converter, text and the gemma4uv / gemma4ua mmproj: test_convert_parity.py.)

- the mmproj's patch projection is reordered to ggml's im2col order (CHW) and the position table
  transposed, whatever the chunk size;
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
