"""`ggquant convert --to gguf` against llama.cpp's convert_hf_to_gguf.py: identical files.

Every comparison is of the whole file (header, metadata order and types, tensor infos, padding
and data), for the text GGUF and the --mmproj sidecar, on the tiny fixtures: Gemma 4 E4B-like
(bf16, one file) and E2B-like (f32, sharded, double-wide MLP), 26B-A4B-like (mixture of experts)
and 31B-like (dense, K = V on full layers), a Gemma 4 Unified (suppress_tokens; the encoder-free
gemma4uv / gemma4ua mmproj), a Gemma 4 assistant drafter (gemma4-assistant), a text-only
Gemma4ForCausalLM,
Gemma 3 text and Gemma 3 with a SigLIP tower, plus float16 checkpoints (Gemma 3's norm +1 is
then added in f16, and Gemma 4's softplus runs on f16 input).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from ggquant.fixtures import build_gemma3, build_gemma4, build_llama, cached_build, tiny_model
from ggquant.cli import main
from ggquant.convert import convert, plan_conversion
from ggquant.formats.gguf import GGUFReader
from tests.convert.helpers import assert_identical

# (model, outtype, mmproj): what is compared with llama.cpp
CASES = (
    [("gemma4_e4b", t, m) for t in ("f32", "f16", "bf16", "q8_0") for m in (False, True)]
    + [("gemma4_e2b", t, False) for t in ("f32", "f16", "bf16", "q8_0")]
    + [("gemma4_e2b", t, True) for t in ("f16", "q8_0")]
    + [("gemma4_e4b_text", t, False) for t in ("f32", "bf16")]
    + [("gemma3_text", t, False) for t in ("f32", "f16", "bf16", "q8_0")]
    + [("gemma3_vision", "f32", False), ("gemma3_vision", "q8_0", False),
       ("gemma3_vision", "f32", True), ("gemma3_vision", "f16", True)]
    + [("f16_gemma3", t, False) for t in ("f32", "f16", "q8_0")]
    + [("f16_gemma4", "f32", False), ("f16_gemma4", "f32", True), ("f16_gemma4", "f16", True)]
    + [("card_gemma3", "f32", False), ("vision_only_gemma4", "f16", True)]
    + [("gemma4_a4b", t, False) for t in ("f32", "f16", "bf16", "q8_0")] + [("gemma4_a4b", "f16", True)]
    + [("gemma4_31b", t, False) for t in ("f32", "f16", "bf16", "q8_0")] + [("gemma4_31b", "q8_0", True)]
    + [("gemma4_unified", t, m) for t in ("f32", "f16", "q8_0") for m in (False, True)]
    + [("gemma4_unified", "bf16", True)]
    + [("gemma4_assistant", t, False) for t in ("f32", "f16", "bf16", "q8_0")]
    # Llama family (fixtures/llama.py): llama3 RoPE + q/k permutation + Llama 3 BPE, Mistral (SPM, f16
    # source, untied), Qwen2 (biases, qwen2 BPE), Qwen3 (q/k norms, f32 source), and a Llama with
    # permuted q/k biases and linear RoPE scaling; Ministral3ForCausalLM and the text part of
    # Mistral3ForConditionalGeneration (GGUF mistral3: yarn keys, log multiplier, attention temperature),
    # and a Mistral Small 3.1-like Mistral3ForConditionalGeneration (text model_type mistral: none of those)
    + [(n, t, False) for n in ("llama3", "mistral", "qwen2", "qwen3", "ministral3", "mistral3", "mistral3_small")
       for t in ("f32", "f16", "bf16", "q8_0")]
    + [("llama_bias_linear", "f32", False), ("llama_bias_linear", "q8_0", False)]
)

MODEL_CARD = """---
license: gemma
pipeline_tag: text-generation
tags:
- gemma3
- tiny
language:
- en
- no
base_model: google/gemma-3-270m
datasets:
- HuggingFaceFW/fineweb
- https://example.org/corpus
---
# A tiny test model
"""


def _card_model(out_dir, **kw):
    """A Gemma 3 with provenance: a README front matter, a hub-style _name_or_path, sampling
    defaults in generation_config.json, and a folder name that parses as name/size/finetune/
    version (general.* come from all of these)."""
    build_gemma3(out_dir, **kw)
    (out_dir / "README.md").write_text(MODEL_CARD, encoding="utf-8")
    cfg = json.loads((out_dir / "config.json").read_text())
    cfg["_name_or_path"] = "google/gemma-3-270m-it"
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = json.loads((out_dir / "generation_config.json").read_text())
    gen.update(top_k=64, top_p=0.95, temperature=1.0, repetition_penalty=1.1)
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out_dir

# float16 checkpoints, built here (the shared fixtures are bf16 and f32)
EXTRA_MODELS = {
    "f16_gemma3": lambda: cached_build("conv_f16_gemma3", build_gemma3, dtype="float16", chat_template="config"),
    "f16_gemma4": lambda: cached_build("conv_f16_gemma4", build_gemma4, variant="e4b", dtype="float16",
                                       chat_template="json"),
    "vision_only_gemma4": lambda: cached_build("conv_gemma4_vision_only", build_gemma4, variant="e2b",
                                               dtype="bfloat16", with_audio=False),
    "card_gemma3": lambda: cached_build("gemma-3-270m-it-v2", _card_model, dtype="bfloat16"),
    "llama_bias_linear": lambda: cached_build(
        "conv_llama_bias_linear", build_llama, variant="llama3", dtype="float32", chat_template="jinja",
        config_overrides=dict(attention_bias=True, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                    "rope_theta": 10000.0})),
}


def model_dir(name: str) -> Path:
    return EXTRA_MODELS[name]() if name in EXTRA_MODELS else tiny_model(name)


@pytest.fixture(scope="module")
def references():
    """All reference GGUFs of CASES, converted by llama.cpp in one process (cached on disk)."""
    from tests.oracles.llama_converter import cached_reference_ggufs

    paths = cached_reference_ggufs([(model_dir(n), t, m) for n, t, m in CASES])
    return dict(zip(CASES, paths))


def _ref(references, case) -> Path:
    r = references[case]
    if isinstance(r, Exception):
        raise r
    return r


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}{'-mmproj' if c[2] else ''}")
def test_identical_to_llama_cpp_converter(references, tmp_path, case):
    name, outtype, mmproj = case
    out = tmp_path / "out.gguf"
    conv = convert(model_dir(name), outtype=outtype, outfile=out, mmproj_only=mmproj)
    assert conv.written == [str(out)]
    assert_identical(_ref(references, case), out)


def test_one_command_writes_text_and_mmproj(references, tmp_path):
    """--mmproj writes both files (mmproj-<name> beside the text file) and says so."""
    out = tmp_path / "e4b-{ftype}.gguf"
    res = CliRunner().invoke(main, ["convert", str(tiny_model("gemma4_e4b")), "--outtype", "f16",
                                    "--outfile", str(out), "--mmproj"])
    assert res.exit_code == 0, res.output
    text, mm = tmp_path / "e4b-f16.gguf", tmp_path / "mmproj-e4b-f16.gguf"
    assert f"wrote {text}" in res.output and f"wrote {mm}" in res.output
    assert_identical(_ref(references, ("gemma4_e4b", "f16", False)), text)
    assert_identical(_ref(references, ("gemma4_e4b", "f16", True)), mm)


def _linked_copy(src: Path, dst: Path) -> Path:
    """The checkpoint under the same folder name (general.name comes from it), files symlinked."""
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).symlink_to(p.resolve(), target_is_directory=p.is_dir())
    return dst


def test_default_outfile_follows_llama_cpp_naming(references, tmp_path):
    """Without --outfile the files land in SRC, named <Name>-<size>-<TYPE>.gguf and
    mmproj-<Name>-<TYPE>.gguf (gguf-py naming_convention), as llama.cpp names them."""
    src = tiny_model("gemma4_e4b")
    copy = _linked_copy(src, tmp_path / src.name)
    conv = convert(copy, outtype="q8_0", mmproj=True)
    with GGUFReader(_ref(references, ("gemma4_e4b", "q8_0", False))) as r:
        name, size = r.get("general.name"), r.get("general.size_label")
    assert [Path(p).name for p in conv.written] == [f"{name.replace(' ', '-')}-{size}-Q8_0.gguf",
                                                    f"mmproj-{name.replace(' ', '-')}-Q8_0.gguf"]
    assert_identical(_ref(references, ("gemma4_e4b", "q8_0", False)), Path(conv.written[0]))
    assert_identical(_ref(references, ("gemma4_e4b", "q8_0", True)), Path(conv.written[1]))


def test_auto_outtype_picks_bf16_for_bf16_weights(references, tmp_path):
    out = tmp_path / "auto.gguf"
    conv = convert(tiny_model("gemma3_text"), outfile=out)  # --outtype auto is the default
    assert conv.files[0].outtype == "BF16"
    assert_identical(_ref(references, ("gemma3_text", "bf16", False)), out)


def test_dry_run_prints_the_plan_and_writes_nothing(references, tmp_path):
    out = tmp_path / "plan.gguf"
    res = CliRunner().invoke(main, ["convert", str(tiny_model("gemma4_e4b")), "--outtype", "q8_0", "--outfile",
                                    str(out), "--mmproj", "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    assert not any(tmp_path.iterdir())
    plan = json.loads(res.output)
    assert plan["written"] == [] and [f["part"] for f in plan["files"]] == ["text", "mmproj"]
    with GGUFReader(_ref(references, ("gemma4_e4b", "q8_0", False))) as r:
        want = [(t.name, list(t.shape), t.qtype.name, t.nbytes) for t in r.tensors]
    got = [(t["name"], t["shape"], t["type"], t["bytes"]) for t in plan["files"][0]["tensors"]]
    assert got == want
    assert plan["files"][0]["bytes"] == sum(w[3] for w in want)
    assert {t["src_dtype"] for t in plan["files"][0]["tensors"]} == {"BF16", "generated"}
    # the human-readable form: one line per tensor and a total
    res = CliRunner().invoke(main, ["convert", str(tiny_model("gemma4_e4b")), "--outtype", "q8_0", "--outfile",
                                    str(out), "--dry-run"])
    assert res.exit_code == 0 and "per_layer_token_embd.weight" in res.output and "total:" in res.output
    assert not out.exists()


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep me")
    res = CliRunner().invoke(main, ["convert", str(tiny_model("gemma3_text")), "--outtype", "f32", "--outfile",
                                    str(out)])
    assert res.exit_code == 1 and "--force" in res.output
    assert out.read_bytes() == b"keep me"
    res = CliRunner().invoke(main, ["convert", str(tiny_model("gemma3_text")), "--outtype", "f32", "--outfile",
                                    str(out), "--force"])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:4] == b"GGUF"


def test_plan_matches_written_file(tmp_path):
    """The plan's sizes are the file's: what --dry-run reports is what gets written."""
    conv, arch = plan_conversion(tiny_model("gemma4_e2b"), outtype="bf16", outfile=tmp_path / "x.gguf")
    arch.ckpt.close()
    out = tmp_path / "x.gguf"
    convert(tiny_model("gemma4_e2b"), outtype="bf16", outfile=out)
    with GGUFReader(out) as r:
        assert [(t.name, t.qtype, t.nbytes) for t in r.tensors] == [
            (t.name, t.qtype, t.nbytes) for t in conv.files[0].tensors]


def test_sharded_checkpoint_reads_like_one_file(tmp_path):
    """A sharded checkpoint (index + shards) converts to the same tensors and metadata as its
    merged copy; only the order differs (shard by shard, names sorted within each, as llama.cpp)."""
    src = tiny_model("gemma4_e2b")
    assert (src / "model.safetensors.index.json").is_file()
    merged = tmp_path / src.name
    merged.mkdir()
    for p in src.iterdir():
        if not p.name.startswith("model"):
            (merged / p.name).symlink_to(p.resolve(), target_is_directory=p.is_dir())
    from safetensors.numpy import load_file, save_file

    tensors = {}
    for p in sorted(src.glob("model-*.safetensors")):
        tensors.update(load_file(p))
    save_file(tensors, merged / "model.safetensors")
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    convert(src, outtype="f16", outfile=a)
    convert(merged, outtype="f16", outfile=b)
    with GGUFReader(a) as ra, GGUFReader(b) as rb:
        assert [(f.name, f.type, str(f.value)) for f in ra.fields.values()] == [
            (f.name, f.type, str(f.value)) for f in rb.fields.values()]
        assert sorted(t.name for t in ra.tensors) == sorted(t.name for t in rb.tensors)
        for t in ra.tensors:
            u = rb.tensor(t.name)
            assert (t.shape, t.qtype) == (u.shape, u.qtype) and t.raw().tobytes() == u.raw().tobytes()
    shutil.rmtree(merged)
