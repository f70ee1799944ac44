"""`ggquant convert MODEL.gguf --to hf` on bad input: a clear error naming the problem, a
non-zero exit code, and nothing left at (or beside) the output path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType, GGUFValueType

from ggquant.cli import main
from ggquant.convert import convert
from ggquant.errors import GGQuantError
from ggquant.formats.gguf import GGUFReader, GGUFWriter, copy_field


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    """f32 GGUFs of the tiny Gemma 4 E4B (text + mmproj) and Gemma 3 text."""
    from ggquant.fixtures import tiny_model

    root = tmp_path_factory.mktemp("bad_hf")
    text, mm = convert(tiny_model("gemma4_e4b"), outtype="f32", outfile=root / "g4.gguf", mmproj=True).written
    g3 = convert(tiny_model("gemma3_text"), outtype="f32", outfile=root / "g3.gguf").written[0]
    return {"g4": Path(text), "g4_mmproj": Path(mm), "g3": Path(g3)}


def _rewrite(src: Path, dst: Path, drop: str | None = None, fields: dict | None = None) -> Path:
    """A copy of a GGUF without tensor `drop` and with some metadata values replaced."""
    r = GGUFReader(src)
    try:
        w = GGUFWriter(dst)
        for f in r.fields.values():
            if fields and f.name in fields:
                w.add_field(f.name, fields[f.name], GGUFValueType.STRING)
            else:
                copy_field(w, f)
        for t in r.tensors:
            if t.name != drop:
                w.add_tensor(t.name, t.shape, t.qtype, lambda t=t: [t.raw()])
        w.write()
    finally:
        r.close()
    return dst


def fails(tmp_path: Path, args: list[str], *needles: str) -> str:
    """Run the CLI, expect a non-zero exit with every needle in the message and no output."""
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["convert", *args, "--to", "hf", "--outfile", str(out)])
    assert res.exit_code != 0, res.output
    msg = res.output + (str(res.exception) if res.exception and not isinstance(res.exception, SystemExit) else "")
    for n in needles:
        assert n in msg, f"{n!r} not in: {msg}"
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], "temporary folder left behind"
    return msg


def test_unsupported_architecture(ggufs, tmp_path):
    bad = _rewrite(ggufs["g3"], tmp_path / "phi3.gguf", fields={"general.architecture": "phi3"})
    fails(tmp_path, [str(bad)], "phi3.gguf", "'phi3' is not supported", "gemma3")


def test_missing_tensor_is_named(ggufs, tmp_path):
    bad = _rewrite(ggufs["g4"], tmp_path / "m.gguf", drop="blk.3.attn_q.weight")
    fails(tmp_path, [str(bad)], "m.gguf", "blk.3.attn_q.weight", "missing")


def test_missing_tower_tensor_is_named(ggufs, tmp_path):
    bad = _rewrite(ggufs["g4_mmproj"], tmp_path / "mm.gguf", drop="a.blk.1.attn_k_rel.weight")
    fails(tmp_path, [str(ggufs["g4"]), "--mmproj", str(bad)], "mm.gguf", "a.blk.1.attn_k_rel.weight", "missing")


def test_unknown_tensor_is_named(ggufs, tmp_path):
    r = GGUFReader(ggufs["g3"])
    try:
        w = GGUFWriter(tmp_path / "x.gguf")
        for f in r.fields.values():
            copy_field(w, f)
        for t in r.tensors:
            w.add_tensor(t.name, t.shape, t.qtype, lambda t=t: [t.raw()])
        w.add_tensor("blk.0.mystery.weight", (4, 32), GGMLQuantizationType.F32, lambda: [np.zeros((4, 32), np.float32)])
        w.write()
    finally:
        r.close()
    fails(tmp_path, [str(tmp_path / "x.gguf")], "blk.0.mystery.weight", "x.gguf")


def test_missing_metadata_key_is_named(ggufs, tmp_path):
    r = GGUFReader(ggufs["g3"])
    try:
        w = GGUFWriter(tmp_path / "k.gguf")
        for f in r.fields.values():
            if f.name != "gemma3.embedding_length":
                copy_field(w, f)
        for t in r.tensors:
            w.add_tensor(t.name, t.shape, t.qtype, lambda t=t: [t.raw()])
        w.write()
    finally:
        r.close()
    fails(tmp_path, [str(tmp_path / "k.gguf")], "gemma3.embedding_length", "k.gguf")


def test_wrong_files(ggufs, tmp_path):
    fails(tmp_path, [str(ggufs["g4_mmproj"])], "mmproj", "--mmproj")
    fails(tmp_path, [str(ggufs["g4"]), "--mmproj", str(ggufs["g3"])], "--mmproj", "clip")
    fails(tmp_path, [str(ggufs["g4"]), "--mmproj"], "--mmproj needs the mmproj GGUF")
    fails(tmp_path, [str(tmp_path / "nope.gguf")], "nope.gguf", "not found")
    fails(tmp_path, [str(ggufs["g4"]), "--outtype", "q8_0"], "--outtype applies to --to gguf")


def test_mmproj_of_another_model(ggufs, tmp_path):
    fails(tmp_path, [str(ggufs["g3"]), "--mmproj", str(ggufs["g4_mmproj"])], "gemma4v", "not Gemma 3")


def test_existing_output_needs_force(ggufs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = CliRunner().invoke(main, ["convert", str(ggufs["g3"]), "--to", "hf", "--outfile", str(out)])
    assert res.exit_code != 0 and "already exists" in res.output and "--force" in res.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    res = CliRunner().invoke(main, ["convert", str(ggufs["g3"]), "--to", "hf", "--outfile", str(out), "--force"])
    assert res.exit_code == 0, res.output
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or moved-aside folder


def test_failure_while_writing_leaves_nothing(ggufs, tmp_path, monkeypatch):
    from ggquant.convert import gguf_to_hf as ex

    real = ex.tensor_chunks

    def boom(t, dtype):
        if t.gguf_name == "blk.2.ffn_up.weight":
            raise GGQuantError("simulated failure")
        return real(t, dtype)

    monkeypatch.setattr(ex, "tensor_chunks", boom)
    with pytest.raises(GGQuantError, match="simulated"):
        ex.export_hf(ggufs["g4"], outfile=tmp_path / "out", mmproj=ggufs["g4_mmproj"])
    assert list(tmp_path.iterdir()) == []


def test_failure_while_writing_keeps_the_old_folder(ggufs, tmp_path, monkeypatch):
    """--force replaces the folder only once the new one is complete."""
    from ggquant.convert import gguf_to_hf as ex

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    monkeypatch.setattr(ex, "tensor_chunks", lambda t, dtype: (_ for _ in ()).throw(GGQuantError("simulated")))
    with pytest.raises(GGQuantError, match="simulated"):
        ex.export_hf(ggufs["g3"], outfile=out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "keep.txt").read_text() == "mine"


def test_vocabulary_must_match_the_embeddings(ggufs, tmp_path):
    r = GGUFReader(ggufs["g3"])
    try:
        w = GGUFWriter(tmp_path / "v.gguf")
        for f in r.fields.values():
            if f.name in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
                w.add_field(f.name, f.value[:-1], f.type, f.item_type)
            else:
                copy_field(w, f)
        for t in r.tensors:
            w.add_tensor(t.name, t.shape, t.qtype, lambda t=t: [t.raw()])
        w.write()
    finally:
        r.close()
    fails(tmp_path, [str(tmp_path / "v.gguf")], "v.gguf", "511 tokens", "512 rows")
