"""The `ggquant` command line: exit codes, --json, --dry-run, readable errors."""

import json

from click.testing import CliRunner

from ggquant.cli import main
from tests.toy_models import build_toy_llama


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_quantize_dry_run_json_lists_every_tensor(tmp_path):
    src = build_toy_llama(tmp_path / "toy.gguf")
    res = run("quantize", src, tmp_path / "out.gguf", "--outtype", "q4_k_m", "--dry-run", "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["output"] is None and not (tmp_path / "out.gguf").exists()
    types = {t["name"]: t["dst_type"] for t in rep["tensors"]}
    assert types["token_embd.weight"] == "Q6_K" and types["blk.0.attn_norm.weight"] == "F32"


def test_quantize_then_inspect(tmp_path):
    src = build_toy_llama(tmp_path / "toy.gguf")
    out = tmp_path / "toy-Q8_0.gguf"
    res = run("quantize", src, "--outtype", "Q8_0")  # default outfile name: <stem>-<TYPE>.gguf
    assert res.exit_code == 0, res.output
    assert out.exists()
    rep = json.loads(run("inspect", out, "--json").output)
    assert rep["metadata"]["general.file_type"]["value"] == 7
    assert {t["type"] for t in rep["tensors"]} == {"Q8_0", "F32", "F16"}
    text = run("inspect", out).output
    assert "token_embd.weight" in text and "general.file_type" in text


def test_errors_are_one_line_and_exit_nonzero(tmp_path):
    res = run("quantize", tmp_path / "missing.gguf", "--outtype", "Q8_0")
    assert res.exit_code == 1 and "error:" in res.output and "Traceback" not in res.output
    res = run("quantize", tmp_path / "missing.gguf", "--outtype", "Q9_9")
    assert res.exit_code == 1 and "Q4_K_M" in res.output
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16)
    res = run("inspect", bad)
    assert res.exit_code == 1 and "bad.gguf" in res.output
    res = run("quantize", build_toy_llama(tmp_path / "t.gguf"), "--outtype", "Q4_K_M", "--tensor-type", "attn_v")
    assert res.exit_code == 1 and "REGEX=TYPE" in res.output


def test_help_lists_what_the_registry_holds():
    """Presets and --tensor-type types in `quantize` / `convert` help come from the registry (issue 14:
    the IQ, ternary, FP4 and Q1_0 types and their presets included)."""
    import re

    from ggquant.quant.presets import PRESETS
    from ggquant.quant.types import QUANTIZE_TYPES

    for verb in ("quantize", "convert"):
        res = run(verb, "--help")
        assert res.exit_code == 0, res.output
        words = set(re.findall(r"[A-Z0-9_]+", res.output))
        assert {t.name for t in QUANTIZE_TYPES} <= words, verb
        assert {p for p in PRESETS if p not in ("F32", "F16", "BF16", "Q8_0")} <= words, verb
    assert {"IQ2_M", "IQ1_S", "TQ2_0", "MXFP4_MOE", "Q1_0"} <= set(PRESETS)
    assert {"IQ3_S", "NVFP4", "Q1_0"} <= {t.name for t in QUANTIZE_TYPES}


def test_quantize_takes_the_type_after_out_like_llama_quantize(tmp_path):
    src = build_toy_llama(tmp_path / "toy.gguf")
    res = run("quantize", src, tmp_path / "a.gguf", "Q8_0")
    assert res.exit_code == 0, res.output
    res = run("quantize", src, tmp_path / "b.gguf", "--outtype", "Q8_0")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    res = run("quantize", src, tmp_path / "c.gguf", "Q4_0", "--outtype", "Q8_0")
    assert res.exit_code == 1 and "given twice" in res.output and not (tmp_path / "c.gguf").exists()
