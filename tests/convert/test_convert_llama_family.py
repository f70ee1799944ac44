"""Llama / Mistral / Qwen2 / Qwen3 / Ministral 3 (mistral3) conversion beyond the byte-identity cases of test_convert_parity.py:
what the converter reads (tokenizer paths, pre-tokenizer identification, llama3 frequency factors) and
the inputs it refuses before writing anything, each naming the file and the key or tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ggquant.fixtures import tiny_model
from ggquant.formats.gguf import GGUFReader
from tests.convert.test_convert_bad_input import _edit_config, _edit_tensors, fails


@pytest.fixture
def model(tmp_path):
    def make(name: str) -> Path:
        dst = tmp_path / "src" / name
        shutil.copytree(tiny_model(name), dst)
        return dst

    return make


def test_pre_tokenizers_and_tokenizer_models(reference_gguf):
    want = {"llama3": ("gpt2", "llama-bpe"), "qwen2": ("gpt2", "qwen2"), "qwen3": ("gpt2", "qwen2"),
            "mistral": ("llama", "default")}
    for name, (model, pre) in want.items():
        with GGUFReader(reference_gguf(name, "f32")) as r:
            assert (r.get("tokenizer.ggml.model"), r.get("tokenizer.ggml.pre")) == (model, pre)


def test_llama3_rope_freqs_generated(reference_gguf):
    """rope_freqs is written first, F32, with all three regimes of the llama3 table present."""
    with GGUFReader(reference_gguf("llama3", "f32")) as r:
        t = r.tensors[0]
        assert t.name == "rope_freqs.weight" and t.qtype.name == "F32" and tuple(t.shape) == (8,)
        f = np.asarray(t.raw()).reshape(-1).view(np.float32)
        assert f[0] == 1.0 and f[-1] == 32.0 and ((f > 1) & (f < 32)).any()


def test_unknown_pre_tokenizer_is_refused(model, tmp_path):
    src = model("qwen2")
    p = src / "tokenizer.json"
    tj = json.loads(p.read_text(encoding="utf-8"))
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\S+"
    p.write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    fails(src, tmp_path, "tokenizer.json", "pre-tokenizer is not one llama.cpp knows")


def test_tokenizer_without_merges_is_refused(model, tmp_path):
    src = model("qwen2")
    p = src / "tokenizer.json"
    tj = json.loads(p.read_text(encoding="utf-8"))
    tj["model"]["merges"] = []
    p.write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    fails(src, tmp_path, "tokenizer.json", "model.merges")


@pytest.mark.parametrize("rope", [{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
                                  {"rope_type": "longrope", "long_factor": [1.0], "short_factor": [1.0]},
                                  {"rope_type": "dynamic", "factor": 2.0}])
def test_unsupported_rope_scaling_is_refused(model, tmp_path, rope):
    src = model("qwen2")
    _edit_config(src, lambda c: c.update(rope_scaling=dict(rope, rope_theta=1e6)))
    fails(src, tmp_path, "config.json", "rope_type", rope["rope_type"])


def test_legacy_rope_scaling_type_key_is_read(model, tmp_path):
    """rope_scaling {"type": "yarn"} (the pre-4.45 spelling) is the same refusal."""
    src = model("llama3")
    _edit_config(src, lambda c: c.update(rope_scaling={"type": "yarn", "factor": 4.0,
                                                       "original_max_position_embeddings": 8192}))
    fails(src, tmp_path, "config.json", "yarn")


def test_fused_qkv_is_refused(model, tmp_path):
    """A Phi-3 style qkv_proj under LlamaForCausalLM: not a Llama tensor, named with its file."""
    src = model("llama3")

    def fuse(t):
        q, k, v = (t.pop(f"model.layers.0.self_attn.{x}_proj.weight") for x in "qkv")
        t["model.layers.0.self_attn.qkv_proj.weight"] = np.concatenate([np.asarray(q.float()), np.asarray(k.float()),
                                                                        np.asarray(v.float())])

    _edit_tensors(src, fuse)
    fails(src, tmp_path, "model.safetensors", "qkv_proj")


def test_non_silu_activation_is_refused(model, tmp_path):
    src = model("mistral")
    _edit_config(src, lambda c: c.update(hidden_act="gelu"))
    fails(src, tmp_path, "config.json", "hidden_act")


def test_mistral_sliding_window_is_refused(model, tmp_path):
    src = model("mistral")
    _edit_config(src, lambda c: c.update(sliding_window=4096))
    fails(src, tmp_path, "config.json", "sliding_window")


def test_mistral3_keys_and_permuted_qk(reference_gguf):
    """Both Mistral 3 architectures give GGUF mistral3 with yarn, the log multiplier (mscale_all_dim)
    and the attention temperature (llama_4_scaling_beta); the vision tower stays out of the text GGUF."""
    for name in ("ministral3", "mistral3"):
        with GGUFReader(reference_gguf(name, "f32")) as r:
            assert r.get("general.architecture") == "mistral3"
            assert r.get("mistral3.rope.scaling.type") == "yarn"
            assert r.get("mistral3.rope.scaling.original_context_length") == 16
            assert r.get("mistral3.rope.scaling.yarn_log_multiplier") == 1.0
            assert r.get("mistral3.attention.temperature_scale") == np.float32(0.1)
            assert not any("v." in t.name[:2] or "mm." in t.name for t in r.tensors)


def test_ministral3_without_yarn_is_refused(model, tmp_path):
    """Ministral3Model.set_gguf_parameters asserts rope_type yarn (an AssertionError there)."""
    src = model("ministral3")
    _edit_config(src, lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    fails(src, tmp_path, "config.json", "rope_type", "yarn")


def test_ministral3_without_llama4_beta_is_refused(model, tmp_path):
    src = model("ministral3")
    _edit_config(src, lambda c: c["rope_parameters"].pop("llama_4_scaling_beta"))
    fails(src, tmp_path, "config.json", "llama_4_scaling_beta")


def test_mistral3_text_sliding_window_is_refused(model, tmp_path):
    """Mistral Small 3.1's text_config (model_type mistral) with a window: the mistral3 graph has none."""
    src = model("mistral3_small")
    _edit_config(src, lambda c: c["text_config"].update(sliding_window=4096))
    fails(src, tmp_path, "config.json", "sliding_window")


def test_mistral3_mmproj_is_refused_naming_the_tower(model, tmp_path):
    """llama.cpp writes the Pixtral tower with --mmproj (conversion/llava.py); ggquant does not yet."""
    src = model("mistral3")
    fails(src, tmp_path, "--mmproj", "Pixtral", "without --mmproj", extra=["--mmproj"])


def test_mistral3_gguf_to_hf_is_refused(reference_gguf, tmp_path):
    """No exporter writes the yarn / temperature keys back yet: refused, naming the file, nothing written."""
    from tests.convert.test_to_hf_bad_input import fails as fails_to_hf

    fails_to_hf(tmp_path, [str(reference_gguf("ministral3", "f32"))], "ministral3-f32", "mistral3", "not supported")


def test_mistral4_text_model_is_refused(model, tmp_path):
    src = model("mistral3")
    _edit_config(src, lambda c: c["text_config"].update(model_type="mistral4"))
    fails(src, tmp_path, "config.json", "mistral4")


def test_qwen3_reranker_is_refused(model, tmp_path):
    src = model("qwen3")
    (src / "README.md").write_text("# Qwen3-Reranker-0.6B\n", encoding="utf-8")
    fails(src, tmp_path, "reranker")


def test_vocab_size_below_tokenizer_ids_is_refused(model, tmp_path):
    src = model("qwen2")
    _edit_config(src, lambda c: c.update(vocab_size=151000))
    fails(src, tmp_path, "vocab_size")
