"""`ggquant parity HF_DIR`: the folder runs in ggquant's runtime as its F32 conversion, built in
memory; against transformers on the same folder, and against llama.cpp on a temporary F32 GGUF
that is always removed. Targets (issue 4, tiny Gemma 4 F32): vs transformers max |dlogit| <= 1e-3,
vs llama.cpp <= 1e-2 with top-1 100%."""

from __future__ import annotations

import json
import tempfile

import pytest
from click.testing import CliRunner

from ggquant.cli import main
from ggquant.errors import GGQuantError
from ggquant.parity import engines
from ggquant.parity.run import run_parity

TEXT = "The robot bought honey at the café, then walked home through the rain. " * 12


def _parity(*args):
    r = CliRunner().invoke(main, ["parity", *[str(a) for a in args]])
    return r, (json.loads(r.output[r.output.index("{"):]) if r.exit_code == 0 and "{" in r.output else None)


def test_folder_against_transformers_on_the_same_folder(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("gemma4_e4b")
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    r, res = _parity(folder, "--against", folder, "--text", text, "--ctx", "32", "--chunks", "2", "--threads", "2",
                     "--json")
    assert r.exit_code == 0, r.output
    assert res["positions"] == 64 and res["reference"] == "transformers gemma4_e4b"
    assert res["max_abs_logit_diff"] <= 1e-3 and res["top1_agreement"] == 1.0


def test_folder_against_llama_cpp_uses_a_temporary_f32_gguf_that_is_removed(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    folder = tiny_model_dir("gemma4_e2b")
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    r, res = _parity(folder, "--against", "llama.cpp", "--text", text, "--ctx", "32", "--chunks", "2",
                     "--threads", "2", "--json")
    assert r.exit_code == 0, r.output
    assert res["max_abs_logit_diff"] <= 1e-2 and res["top1_agreement"] == 1.0
    assert res["reference"] == "llama.cpp on a temporary F32 GGUF of gemma4_e2b"
    [note] = res["notes"]
    assert "temporary F32 GGUF" in note and "removed" in note and str(tmp) in note
    assert list(tmp.iterdir()) == []
    r = CliRunner().invoke(main, ["parity", str(folder), "--against", "llama.cpp", "--text", str(text), "--ctx", "32",
                                  "--chunks", "1", "--threads", "2"])
    assert r.exit_code == 0 and "note            llama.cpp reads GGUF files" in r.output
    assert list(tmp.iterdir()) == []


def test_temporary_gguf_is_removed_when_llama_cpp_fails(tiny_model_dir, tmp_path, monkeypatch):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    seen = []

    class Failing:
        def __init__(self, path, **kw):
            seen.append(path)
            assert path.is_file()
            raise GGQuantError(f"llama.cpp could not load {path}: simulated")

    monkeypatch.setattr(engines, "LlamaCppEngine", Failing)
    with pytest.raises(GGQuantError, match="simulated"):
        run_parity(tiny_model_dir("gemma3_text"), "llama.cpp", TEXT, ctx=32, chunks=1, threads=2)
    assert len(seen) == 1 and seen[0].parent.parent == tmp
    assert list(tmp.iterdir()) == []
