"""Bad input: each case fails with one clear line naming the file and the tensor or key, exits
non-zero through the CLI, and leaves nothing at the output path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ggquant.fixtures import tiny_model
from ggquant.cli import main
from ggquant.errors import GGQuantError


@pytest.fixture
def model(tmp_path):
    """A private copy of a tiny checkpoint, to break."""

    def make(name: str = "gemma4_e4b") -> Path:
        dst = tmp_path / "src" / name
        shutil.copytree(tiny_model(name), dst)
        return dst

    return make


def fails(src: Path, tmp_path: Path, *needles: str, extra=()) -> str:
    """Run the CLI; it must exit 1 with every needle in its message and write nothing."""
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / "x.gguf"
    res = CliRunner().invoke(main, ["convert", str(src), "--outtype", "f16", "--outfile", str(out), *extra])
    assert res.exit_code == 1, f"exit {res.exit_code}: {res.output}\n{res.exception!r}"
    msg = res.output
    assert msg.startswith("error: ") and "Traceback" not in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    assert list(out_dir.iterdir()) == [], "something was left at the output path"
    return msg


def _edit_config(src: Path, fn) -> None:
    p = src / "config.json"
    cfg = json.loads(p.read_text())
    fn(cfg)
    p.write_text(json.dumps(cfg, indent=2))


def _edit_tensors(src: Path, fn) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    p = src / "model.safetensors"
    t = load_file(p)
    fn(t)
    save_file({k: torch.as_tensor(v) for k, v in t.items()}, p, metadata={"format": "pt"})


# --- config.json ----------------------------------------------------------------------------

def test_missing_config(model, tmp_path):
    src = model()
    (src / "config.json").unlink()
    fails(src, tmp_path, "config.json", "not found")


def test_garbled_config(model, tmp_path):
    src = model()
    (src / "config.json").write_text('{"architectures": ["Gemma4ForConditionalGeneration"],,}')
    fails(src, tmp_path, "config.json", "not valid JSON", "line 1")


def test_config_not_utf8(model, tmp_path):
    src = model()
    raw = (src / "config.json").read_bytes()
    (src / "config.json").write_bytes(raw.replace(b'"gemma4"', b'"gemma\xff4"', 1))
    fails(src, tmp_path, "config.json", "not UTF-8")


def test_unknown_architecture(model, tmp_path):
    src = model()
    _edit_config(src, lambda c: c.update(architectures=["Phi3ForCausalLM"]))
    fails(src, tmp_path, "config.json", "'Phi3ForCausalLM'", "not supported")


def test_missing_architectures_key(model, tmp_path):
    src = model()
    _edit_config(src, lambda c: c.pop("architectures"))
    fails(src, tmp_path, "config.json", "'architectures'")


def test_wrong_typed_key(model, tmp_path):
    src = model("gemma3_text")
    _edit_config(src, lambda c: c.update(num_hidden_layers="six"))
    fails(src, tmp_path, "config.json", "'num_hidden_layers'")


# --- configs llama.cpp would crash on -------------------------------------------------------

def test_kv_sharing_layout_llama_cpp_cannot_load(model, tmp_path):
    """With 5 shared layers of 12, layers 5 and 6 keep their own KV and must be sliding, full;
    here they are full, sliding: llama.cpp would GGML_ASSERT (killing the process) at load."""
    src = model()
    _edit_config(src, lambda c: c["text_config"].update(num_kv_shared_layers=5))
    fails(src, tmp_path, "config.json", "num_kv_shared_layers = 5", "layers 5 and 6", "abort")


def test_vocab_size_per_layer_input_disagrees(model, tmp_path):
    src = model()
    _edit_config(src, lambda c: c["text_config"].update(vocab_size_per_layer_input=520))
    fails(src, tmp_path, "config.json", "vocab_size_per_layer_input = 520", "vocab_size = 512")


def test_tokenizer_smaller_than_embedding(model, tmp_path):
    src = model()
    tok = json.loads((src / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    last = max(vocab, key=vocab.get)
    del vocab[last]
    tok["model"]["merges"] = [m for m in tok["model"]["merges"] if "".join(m) != last]
    (src / "tokenizer.json").write_text(json.dumps(tok))
    fails(src, tmp_path, "model.language_model.embed_tokens.weight", "512 rows", "511 tokens")


def test_gemma3_embedding_rows_disagree_with_config(model, tmp_path):
    src = model("gemma3_text")
    _edit_config(src, lambda c: c.update(vocab_size=600))  # tokenizer.model padded to 600 tokens
    fails(src, tmp_path, "model.embed_tokens.weight")


# --- tensors ----------------------------------------------------------------------------------

def test_missing_tensor(model, tmp_path):
    src = model()
    _edit_tensors(src, lambda t: t.pop("model.language_model.layers.3.mlp.up_proj.weight"))
    fails(src, tmp_path, "'model.language_model.layers.3.mlp.up_proj.weight'", "missing")


def test_extra_tensor(model, tmp_path):
    src = model()
    _edit_tensors(src, lambda t: t.update({"model.language_model.layers.3.mlp.extra_proj.weight":
                                           np.zeros((4, 64), np.float32)}))
    fails(src, tmp_path, "model.safetensors", "'model.language_model.layers.3.mlp.extra_proj.weight'")


def test_tensor_for_a_layer_the_config_does_not_have(model, tmp_path):
    src = model()
    _edit_tensors(src, lambda t: t.update({"model.language_model.layers.12.input_layernorm.weight":
                                           np.ones(64, np.float32)}))
    fails(src, tmp_path, "layers.12.input_layernorm.weight", "layer 12", "12 layers")


def test_wrong_shape(model, tmp_path):
    src = model()
    name = "model.language_model.layers.2.self_attn.q_proj.weight"
    _edit_tensors(src, lambda t: t.update({name: t[name][:32]}))
    fails(src, tmp_path, "model.safetensors", f"'{name}'", "[32, 64]", "[64, 64]")


def test_integer_tensor_refused(model, tmp_path):
    src = model("gemma3_text")
    name = "model.layers.0.input_layernorm.weight"
    _edit_tensors(src, lambda t: t.update({name: np.ones(64, np.int32)}))
    fails(src, tmp_path, f"'{name}'", "I32")


def test_truncated_safetensors(model, tmp_path):
    src = model()
    p = src / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-1000])
    fails(src, tmp_path, "model.safetensors", "truncated", "tensor '")


def test_garbled_safetensors_header(model, tmp_path):
    src = model()
    p = src / "model.safetensors"
    raw = bytearray(p.read_bytes())
    raw[8:9] = b"["  # the JSON header no longer parses as an object
    p.write_bytes(bytes(raw))
    fails(src, tmp_path, "model.safetensors", "header")


def test_shard_missing(model, tmp_path):
    src = model("gemma4_e2b")
    shards = sorted(src.glob("model-*.safetensors"))
    shards[-1].unlink()
    fails(src, tmp_path, "model.safetensors.index.json", shards[-1].name, "missing")


def test_index_lists_a_tensor_no_shard_has(model, tmp_path):
    src = model("gemma4_e2b")
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    first_shard = sorted(set(idx["weight_map"].values()))[0]
    idx["weight_map"]["model.language_model.layers.0.ghost.weight"] = first_shard
    (src / "model.safetensors.index.json").write_text(json.dumps(idx))
    fails(src, tmp_path, "model.safetensors.index.json", "'model.language_model.layers.0.ghost.weight'")


def test_pickle_checkpoint_refused(model, tmp_path):
    src = model("gemma3_text")
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    fails(src, tmp_path, "pytorch_model.bin", "pickle", "safetensors")


def test_not_a_folder(tmp_path):
    fails(tmp_path / "nope", tmp_path, "not a folder")


# --- tokenizer files ------------------------------------------------------------------------

@pytest.mark.parametrize("name,file,needle", [
    ("gemma4_e4b", "tokenizer.json", b"<bos>"), ("gemma4_e4b", "tokenizer_config.json", b"<bos>"),
    ("gemma3_vision", "chat_template.jinja", b"role"), ("gemma3_text", "chat_template.json", b"role")])
def test_tokenizer_file_not_utf8(model, tmp_path, name, file, needle):
    src = model(name)
    raw = (src / file).read_bytes()
    i = raw.index(needle)
    (src / file).write_bytes(raw[:i + 1] + b"\xe9" + raw[i + 2:])
    fails(src, tmp_path, file, "not UTF-8", f"offset {i + 1}")


def test_gemma4_tokenizer_must_be_byte_fallback_bpe(model, tmp_path):
    src = model()
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["model"]["byte_fallback"] = False
    (src / "tokenizer.json").write_text(json.dumps(tok))
    fails(src, tmp_path, "tokenizer.json", "byte_fallback")


def test_gemma3_needs_a_tokenizer(model, tmp_path):
    src = model("gemma3_text")
    (src / "tokenizer.model").unlink()
    (src / "tokenizer.json").unlink()
    fails(src, tmp_path, "neither tokenizer.model nor tokenizer.json")


def test_gemma3_tokenizer_json_must_be_a_sentencepiece_bpe(model, tmp_path):
    src = model("gemma3_text")
    (src / "tokenizer.model").unlink()
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
    (src / "tokenizer.json").write_text(json.dumps(tok))
    fails(src, tmp_path, "tokenizer.json", "pre_tokenizer", "tokenizer.model")


def test_mmproj_needs_a_vision_tower(tmp_path):
    fails(tiny_model("gemma4_e4b_text"), tmp_path, "--mmproj", "vision", extra=("--mmproj",))


def test_mmproj_needs_image_normalisation(model, tmp_path):
    src = model()
    (src / "preprocessor_config.json").unlink()
    fails(src, tmp_path, "image_mean", "preprocessor_config.json", extra=("--mmproj",))


# --- failures while writing -----------------------------------------------------------------

def test_failure_while_writing_leaves_nothing(monkeypatch, tmp_path):
    """All or nothing across the text and mmproj files: an error in the second file's payload
    removes the first file too, and no temporary file stays behind."""
    from ggquant import convert as conv
    from ggquant.convert import encode as enc

    real = enc.encode

    def boom(x, qtype, imatrix, what):
        if "v.blk.1" in what:
            raise GGQuantError(f"{what}: simulated failure")
        return real(x, qtype, imatrix, what)

    monkeypatch.setattr(enc, "encode", boom)
    out = tmp_path / "m.gguf"
    with pytest.raises(GGQuantError, match="simulated"):
        conv.convert(tiny_model("gemma4_e4b"), outtype="q8_0", outfile=out, mmproj=True)
    assert list(tmp_path.iterdir()) == []
