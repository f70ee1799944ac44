"""`ggquant convert MODEL.gguf|HF_DIR --to glq`: GLQ e8_shell checkpoints through glq's own per-layer
quantizer (glq 0.8.16, GPL-3.0: imported by the writer only when it runs, and by these tests).

On the tiny Gemma 4 fixtures:
- ggquant's own GLQ reader reads the written checkpoint back and its dequantization equals the
  W_hat glq's quantize_layer_e8_shell_rht returned (<= 1e-6);
- glq's own Hugging Face loader (transformers 5.x, CPU) loads it: finite logits equal to a dense
  model built from ggquant's dequantization (the writer emits the zero scalars of unused stages and
  every buffer glq would otherwise leave uninitialised), and close to the float model's;
- the result converts back to GGUF (`convert --to gguf` reads GLQ) with the SQNR reported;
- --imatrix uses diag(in_sum2 / count) as glq's Hessian (HF folder source, names mapped to GGUF);
- bad input: glq missing, in_features % 8, existing output without --force, failure mid-write.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ggquant.cli import main
from ggquant.convert import convert
from ggquant.errors import GGQuantError
from ggquant.convert import to_glq as W
from tests.quantized.util import open_dir

glq = pytest.importorskip("glq")
torch = pytest.importorskip("torch")

TOL = 1e-6
GLQ_TENSOR_SUFFIXES = ("Qidxs", "Qidxs2", "Qidxs3", "Qidxs4", "SU", "SV", "Wscale", "inv_resid_scale",
                       "inv_resid_scale2", "inv_resid_scale3")
# glq's loader vs a dense model from ggquant's dequantization: measured 5.4e-6 / 5.9e-6 (|logit| <= 12.6)
LOADER_LOGIT_TOL = 1e-4


def _cli(*args) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output + (str(r.exception) if r.exception and not isinstance(r.exception, SystemExit) else "")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("to_glq")


@pytest.fixture(scope="module")
def e4b_gguf(tiny_gemma4_e4b, root) -> Path:
    return convert(tiny_gemma4_e4b, outtype="f32", outfile=root / "e4b.gguf").written[0]


@pytest.fixture(scope="module")
def e2b_gguf(tiny_gemma4_e2b, root) -> Path:
    return convert(tiny_gemma4_e2b, outtype="f32", outfile=root / "e2b.gguf").written[0]


@pytest.fixture(scope="module")
def e4b_glq2(e4b_gguf, root):
    """E4B (non-power-of-two MLP width 96: block-diagonal Hadamard transforms), 2 bpw, through the API."""
    return W.export_glq(e4b_gguf, outfile=root / "e4b-glq2", bpw=2, keep_reconstruction=True)


@pytest.fixture(scope="module")
def e2b_glq3(e2b_gguf, root):
    """E2B (every dim a power of two), 3 bpw (a 65,536-entry and a 256-entry stage), through the CLI."""
    d = root / "e2b-glq3"
    code, out = _cli("convert", e2b_gguf, "--to", "glq", "--bpw", "3", "--outfile", d, "--json")
    assert code == 0, out
    return d, json.loads(out)


def _float_export(gguf: Path, out: Path) -> Path:
    """The same GGUF as a plain float HF folder (the float model the GLQ one approximates)."""
    from ggquant.convert.gguf_to_hf import export_hf

    if not out.exists():
        export_hf(gguf, outfile=out)
    return out


def _dense_copy(glq_dir: Path, out: Path) -> Path:
    """The GLQ folder with every GLQ module replaced by ggquant's float32 dequantization."""
    from safetensors.torch import load_file, save_file

    if out.exists():
        return out
    model = open_dir(glq_dir)
    shutil.copytree(glq_dir, out)
    sd = {k: v for k, v in load_file(str(glq_dir / "model.safetensors")).items()
          if k.rsplit(".", 1)[1] not in GLQ_TENSOR_SUFFIXES}
    for rec in model:
        sd[rec.name] = torch.from_numpy(np.ascontiguousarray(rec.dequantize()))
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    del cfg["quantization_config"]
    (out / "config.json").write_text(json.dumps(cfg))
    return out


IDS = torch.tensor([[2, 17, 91, 300, 45, 7, 123, 9, 250, 64, 31, 400]])


def _assert_near_float(got: np.ndarray, flt: np.ndarray, rel: float, mean_cos: float) -> None:
    """Logits of the quantized model against the float model's: relative error and mean cosine per
    position (for scale: two unrelated random models give a relative error near 1.4)."""
    err = np.linalg.norm(got - flt) / np.linalg.norm(flt)
    cos = (got * flt).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(flt, axis=1)
    assert err < rel and cos.mean() > mean_cos, (err, cos.mean())


def _logits(d: Path) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    with torch.no_grad():
        return m(IDS).logits[0].numpy()


# --- (1) ggquant's reader reads it back, equal to glq's W_hat ---------------------------------------


def test_reader_equals_glq_reconstruction(e4b_glq2):
    r = e4b_glq2
    lin = r.linears
    assert r.written and r.glq_version == "0.8.16"
    model = open_dir(r.out)
    assert model.method == "glq"
    assert sorted(rec.name[:-len(".weight")] for rec in model) == sorted(lin.layers) == sorted(lin.reconstruction)
    assert len(lin.layers) == 96  # 12 layers x (q, o, gate, up, down, PLE gate, PLE projection) + 6 x (k, v)
    for mod, res in lin.layers.items():
        rec = model[f"{mod}.weight"]
        assert rec.bpw == 2 and rec.shape == res.shape and not rec.padded
        np.testing.assert_allclose(rec.dequantize(), lin.reconstruction[mod], rtol=0, atol=TOL, err_msg=mod)
        assert 9 < res.sqnr_db < 12, (mod, res.sqnr_db)  # 2 bpw: ~10.4 dB on Gaussian weights
    assert lin.kept == {"model.embed_tokens": "embedding", "model.embed_tokens_per_layer": "embedding",
                        "model.per_layer_model_projection": W.keep_float_reason("model.per_layer_model_projection.w",
                                                                                (96, 64))}


def test_layout_and_config(e4b_glq2, e4b_gguf):
    """Exactly the tensors, dtypes and config keys of the research note's §2; zero scalars for the
    stages a layer does not use; every other tensor as `--to hf` writes it."""
    from safetensors import safe_open

    from ggquant.convert import gguf_to_hf as ex

    r = e4b_glq2
    cfg = json.loads((r.out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc == {"quant_method": "glq", "codebook": "e8_shell", "block_diagonal": True, "codesz": 8, "bpw": 2,
                  "layer_bpw": {m: 2 for m in sorted(r.linears.layers)}}
    # glq's own config class takes it as is
    from glq.hf_integration import GLQConfig

    assert GLQConfig(**qc).to_dict() == {k: qc[k] for k in ("quant_method", "codebook", "codesz", "bpw", "layer_bpw")}
    plan, sources = ex.plan_export(e4b_gguf, outfile=r.out)
    with safe_open(str(r.out / "model.safetensors"), "np") as f:
        names = set(f.keys())
        for mod, res in r.linears.layers.items():
            m, n = res.shape
            assert f"{mod}.weight" not in names
            assert f.get_slice(f"{mod}.Qidxs").get_dtype() == "I16" and f.get_slice(f"{mod}.Qidxs").get_shape() == [
                m, n // 8]
            assert f"{mod}.Qidxs2" not in names
            assert f.get_slice(f"{mod}.SU").get_dtype() == "F16" and f.get_slice(f"{mod}.SV").get_shape() == [n]
            assert f.get_slice(f"{mod}.Wscale").get_dtype() == "F32" and f.get_slice(f"{mod}.Wscale").get_shape() == []
            for s in ("inv_resid_scale", "inv_resid_scale2", "inv_resid_scale3"):
                assert f.get_tensor(f"{mod}.{s}").shape == () and f.get_tensor(f"{mod}.{s}") == 0
        for t in plan.tensors:  # the rest: unchanged names, the export's float32 values
            if t.name[:-len(".weight")] not in r.linears.layers:
                assert t.name in names
                if t.name.endswith("norm.weight"):
                    want = np.concatenate(list(ex.tensor_chunks(t, "F32"))).view(np.float32).reshape(t.shape)
                    assert np.array_equal(f.get_tensor(t.name).view(np.uint32), want.view(np.uint32)), t.name
    for s in sources:
        s.close()
    assert r.files == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                       "tokenizer_config.json"]
    assert sorted(p.name for p in r.out.iterdir()) == r.files
    assert not [p for p in r.out.parent.iterdir() if p.name.startswith(".e4b-glq2")]  # no temporary left


def test_sqnr_report_human(e4b_glq2):
    text = W.format_glq(e4b_glq2)
    lin = e4b_glq2.linears
    for mod, res in lin.layers.items():
        line = next(x for x in text.splitlines() if x.split()[:1] == [mod])
        assert line.split()[-1] == f"{res.sqnr_db:.2f}"
    assert "model.per_layer_model_projection" in text and "kept float" in text
    assert f"mean SQNR {lin.mean_sqnr_db:.2f} dB" in text


# --- (2) glq's own loader ---------------------------------------------------------------------------


def test_glq_loader_power_of_two_model(e2b_glq3, e2b_gguf, root):
    """glq's HF loader, unpatched: E2B's dims are all powers of two, so its block-diagonal detector
    (which looks at one Qidxs only) cannot pick the wrong layout."""
    import glq.hf_integration  # noqa: F401  (registers quant_method "glq" with transformers)

    d, _ = e2b_glq3
    got = _logits(d)
    dense = _logits(_dense_copy(d, root / "e2b-glq3-dense"))
    flt = _logits(_float_export(e2b_gguf, root / "e2b-hf"))
    assert np.isfinite(got).all() and np.abs(flt).max() > 5
    assert np.abs(got - dense).max() <= LOADER_LOGIT_TOL
    # 3 bpw (~15 dB per layer on random weights, errors compounding over 10 layers)
    _assert_near_float(got, flt, rel=0.5, mean_cos=0.9)  # measured 0.37 and 0.93 (max |diff| 4.5 of 11.2)


def test_glq_loader_block_diagonal_model(e4b_glq2, e4b_gguf, root, monkeypatch):
    """E4B has 96-wide MLPs. glq 0.8.16's loader decides block-diagonal vs power-of-two padding from
    the first Qidxs alone (64 rows here: a power of two) and then fails on the 96-row layers (research
    note §10.3, a glq bug: its own quantize() writes the same layout). With the detector answering
    what quantization_config says (block_diagonal: true), it loads and matches."""
    import glq.hf_integration as hf

    d = e4b_glq2.out
    with pytest.raises(RuntimeError):
        _logits(d)
    monkeypatch.setattr(hf, "_detect_block_diagonal", lambda path: True)
    got = _logits(d)
    dense = _logits(_dense_copy(d, root / "e4b-glq2-dense"))
    flt = _logits(_float_export(e4b_gguf, root / "e4b-hf"))
    assert np.isfinite(got).all()
    assert np.abs(got - dense).max() <= LOADER_LOGIT_TOL
    _assert_near_float(got, flt, rel=0.85, mean_cos=0.65)  # measured 0.71 and 0.75: 2 bpw is coarse


def test_cli_json_and_reproducible(e2b_glq3, e2b_gguf):
    """--json reports per-tensor SQNR; recomputing a layer with glq's function (same seed) gives the
    same bytes, and ggquant's reader equals that W_hat."""
    from safetensors import safe_open

    from ggquant.convert import gguf_to_hf as ex

    d, rep = e2b_glq3
    g = rep["glq"]
    assert rep["written"] and g["bpw"] == 3 and len(g["quantized"]) == 80 and g["imatrix"] is None
    assert all(13 < t["sqnr_db"] < 18 and t["hessian"] == "identity" for t in g["quantized"]), g["quantized"]
    assert g["mean_sqnr_db"] == pytest.approx(np.mean([t["sqnr_db"] for t in g["quantized"]]), abs=1e-3)
    assert {k["module"] for k in g["kept_float"]} == {"model.embed_tokens", "model.embed_tokens_per_layer",
                                                      "model.per_layer_model_projection"}
    plan, sources = ex.plan_export(e2b_gguf, outfile=d)
    try:
        by = {t.name: t for t in plan.tensors}
        model = open_dir(d)
        with safe_open(str(d / "model.safetensors"), "np") as f:
            for mod in ("model.layers.0.self_attn.q_proj", "model.layers.3.mlp.down_proj"):
                w = np.concatenate(list(ex.tensor_chunks(by[mod + ".weight"], "F32"))).view(np.float32)
                w_hat, art, metrics = W.quantize_weight(w.reshape(by[mod + ".weight"].shape), 3)
                for k, v in art.items():
                    stored = f.get_tensor(f"{mod}.{k}")
                    assert stored.dtype == v.dtype and stored.tobytes() == v.tobytes(), (mod, k)
                assert f.get_tensor(f"{mod}.inv_resid_scale") == np.float32(0.5)  # 1 / glq's paired scale 2.0
                np.testing.assert_allclose(model[mod + ".weight"].dequantize(), w_hat, rtol=0, atol=TOL)
                assert metrics["sqnr"] == pytest.approx(next(t["sqnr_db"] for t in g["quantized"]
                                                             if t["module"] == mod), abs=1e-3)
    finally:
        for s in sources:
            s.close()


# --- (3) round trip back to GGUF ---------------------------------------------------------------------


def test_round_trip_to_gguf(e4b_glq2, root):
    """GLQ -> GGUF: every GLQ Linear becomes a GGML type above its bpw, with its SQNR reported
    (against ggquant's dequantization of the GLQ weights), recomputed here from the GGUF."""
    from ggquant.formats.gguf import GGUFReader
    from ggquant.quant import types as qtypes

    out = root / "rt.gguf"
    code, text = _cli("convert", e4b_glq2.out, "--outfile", out, "--json")
    assert code == 0, text
    rows = {t["name"]: t for t in json.loads(text)["files"][0]["tensors"] if "source_format" in t}
    assert len(rows) == 96
    conv = convert(e4b_glq2.out, dry_run=True)
    plans = {t.name: t for t in conv.files[0].tensors if t.source_quant}
    with GGUFReader(out) as r:
        for name, row in rows.items():
            assert row["source_format"] == "glq/e8_shell" and row["exact"] is False
            assert row["sqnr_db"] > 20, row  # one GGML step above 2 bpw (Q5_0/Q4_K here) on ~10 dB weights
            g = r.tensor(name)
            got = qtypes.get(g.qtype).dequantize(g.raw(), g.shape)
            want = plans[name].src.encoding.record.dequantize()
            sqnr = 10 * np.log10((want.astype(np.float64) ** 2).sum() / ((got - want).astype(np.float64) ** 2).sum())
            assert sqnr == pytest.approx(row["sqnr_db"], abs=1e-3), name


# --- --imatrix, from a Hugging Face folder ---------------------------------------------------------


def test_imatrix_hessian_from_hf_folder(tiny_gemma4_e4b, e4b_gguf, e4b_glq2, root):
    """HF folder source with --imatrix: each Linear's Hessian is diag(imatrix) (its GGUF name through
    the arch tables); the imatrix-weighted error is below the identity Hessian's (same weights)."""
    from ggquant.formats.gguf import GGUFReader
    from ggquant.imatrix.files import Entry, Imatrix, save_gguf

    rng = np.random.default_rng(5)
    entries = {}
    with GGUFReader(e4b_gguf) as r:
        for t in r.tensors:
            if t.name.startswith("blk.") and len(t.shape) == 2:
                v = rng.lognormal(0, 2, (1, t.shape[-1])).astype(np.float32)
                v[0, ::7] = 0  # columns never activated
                entries[t.name] = Entry(v * 100, np.array([100]))
    im_path = save_gguf(Imatrix(entries, ["synthetic"], 1, 512), root / "im.gguf")
    res = W.export_glq(tiny_gemma4_e4b, outfile=root / "hf-glq2", bpw=2, imatrix=im_path, keep_reconstruction=True)
    lin = res.linears
    assert res.source_kind == "hf" and len(lin.layers) == 96
    assert {x.hessian for x in lin.layers.values()} == {"imatrix"}
    assert {k for k, v in lin.kept.items() if "tower" in v} and "model.language_model.per_layer_model_projection" \
        in lin.kept
    # the source's float tensors are copied as stored (bf16), the side files byte for byte
    from safetensors import safe_open

    src_cfg = json.loads((tiny_gemma4_e4b / "config.json").read_text())
    cfg = json.loads((res.out / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if k != "quantization_config"} == src_cfg
    assert (res.out / "tokenizer.json").read_bytes() == (tiny_gemma4_e4b / "tokenizer.json").read_bytes()
    with safe_open(str(tiny_gemma4_e4b / "model.safetensors"), "pt") as a, \
            safe_open(str(res.out / "model.safetensors"), "pt") as b:
        norm = "model.language_model.layers.0.input_layernorm.weight"
        assert a.get_tensor(norm).dtype == torch.bfloat16 and torch.equal(a.get_tensor(norm), b.get_tensor(norm))
        w = a.get_tensor("model.language_model.layers.0.mlp.down_proj.weight").float().numpy()
    im = {n: e.sums[0] / 100 for n, e in entries.items()}
    mod = "model.language_model.layers.0.mlp.down_proj"
    w_hat, _, _ = W.quantize_weight(w, 2, im["blk.0.ffn_down.weight"])
    np.testing.assert_allclose(lin.reconstruction[mod], w_hat, rtol=0, atol=0)
    model, identity = open_dir(res.out), open_dir(e4b_glq2.out)
    ratios = []
    for m in lin.layers:
        flat = m.replace("model.language_model.", "model.", 1)  # the GGUF export's (text model) name
        got = model[m + ".weight"].dequantize()
        np.testing.assert_allclose(got, lin.reconstruction[m], rtol=0, atol=TOL)
        v = _im_for(flat, im)
        src = _hf_weight(tiny_gemma4_e4b, m)
        e_im = (((src - got) ** 2) * v).sum()
        e_id = (((src - identity[flat + ".weight"].dequantize()) ** 2) * v).sum()
        ratios.append(e_im / e_id)
    ratios = np.array(ratios)
    # measured: median 0.42; the in=8 PLE projections (one column group, nothing to feed back) are equal
    assert np.median(ratios) < 0.6 and (ratios <= 1 + 1e-6).all(), ratios


_GGUF_OF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down", "per_layer_input_gate": "inp_gate", "per_layer_projection": "proj"}


def _im_for(flat_mod: str, im: dict) -> np.ndarray:
    _, _, bid, rest = flat_mod.split(".", 3)
    return im[f"blk.{bid}.{_GGUF_OF[rest]}.weight"]


def _hf_weight(d: Path, mod: str) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "pt") as f:
        return f.get_tensor(mod + ".weight").float().numpy()


# --- (4) bad input -----------------------------------------------------------------------------------


def test_core_does_not_import_glq():
    code = "import sys, ggquant.cli, ggquant.convert, ggquant.convert.to_glq; " \
           "print([m for m in sys.modules if m == 'glq' or m.startswith('glq.')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"


def test_missing_glq(e4b_gguf, tmp_path, monkeypatch):
    for m in ("glq", "glq.codebook", "glq.quantize_model"):
        monkeypatch.setitem(sys.modules, m, None)  # `import glq` raises ImportError
    code, out = _cli("convert", e4b_gguf, "--to", "glq", "--outfile", tmp_path / "x")
    assert code == 1 and W.MISSING_GLQ in out and not (tmp_path / "x").exists()
    assert "pip install glq==0.8.16" in W.MISSING_GLQ and "GPL-3.0" in W.MISSING_GLQ
    # planning needs no glq
    code, out = _cli("convert", e4b_gguf, "--to", "glq", "--outfile", tmp_path / "x", "--dry-run", "--json")
    assert code == 0, out
    assert len(json.loads(out)["glq"]["quantized"]) == 96 and not (tmp_path / "x").exists()


def test_in_features_not_multiple_of_8_stays_float():
    lin = W.GLQLinears(bpw=2)
    lin.plan([("model.layers.0.mlp.down_proj.weight", (64, 100), None, None),
              ("model.layers.0.mlp.up_proj.weight", (100, 64), None, None),
              ("model.layers.0.self_attn.q_proj.weight", (64, 4), None, None),
              ("lm_head.weight", (512, 64), None, None),
              ("model.vision_tower.encoder.layers.0.mlp.fc1.weight", (64, 64), None, None)])
    assert sorted(lin.layers) == ["model.layers.0.mlp.up_proj"]  # out_features need not be a multiple of 8
    assert "in_features 100 is not a multiple of 8" in lin.kept["model.layers.0.mlp.down_proj"]
    assert "in_features 4" in lin.kept["model.layers.0.self_attn.q_proj"]
    assert lin.kept["lm_head"] == "lm_head" and "tower" in lin.kept["model.vision_tower.encoder.layers.0.mlp.fc1"]
    assert lin.quantization_config()["layer_bpw"] == {"model.layers.0.mlp.up_proj": 2}


def test_existing_output_needs_force(e4b_gguf, tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    code, out = _cli("convert", e4b_gguf, "--to", "glq", "--outfile", d)
    assert code == 1 and "already exists; pass --force" in out
    assert sorted(p.name for p in d.iterdir()) == ["keep.txt"]


def test_failure_leaves_nothing(e4b_gguf, tmp_path, monkeypatch):
    """An error in the middle of quantizing: no output folder, no temporary folder left behind, and an
    existing output (with --force) is left as it was."""
    real, calls = W.quantize_weight, []

    def failing(w, bpw, hdiag=None):
        calls.append(1)
        if len(calls) == 3:
            raise GGQuantError("boom")
        return real(w, bpw, hdiag)

    monkeypatch.setattr(W, "quantize_weight", failing)
    code, out = _cli("convert", e4b_gguf, "--to", "glq", "--bpw", "2", "--outfile", tmp_path / "new")
    assert code == 1 and "boom" in out and len(calls) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    calls.clear()
    code, out = _cli("convert", e4b_gguf, "--to", "glq", "--bpw", "2", "--outfile", old, "--force")
    assert code == 1 and "boom" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"] and (old / "config.json").read_text() == "{}"


@pytest.mark.parametrize("args,msg", [
    (["--exact"], "--exact does not apply to --to glq (GLQ is lossy by design)"),
    (["--outtype", "q8_0"], "--outtype does not apply to --to glq"),
    (["--group-size", "128"], "--group-size does not apply to --to glq"),
    (["--bpw", "9"], "9 is not in the range 2<=x<=8"),
])
def test_refused_flags(e4b_gguf, tmp_path, args, msg):
    code, out = _cli("convert", e4b_gguf, "--to", "glq", "--outfile", tmp_path / "x", *args)
    assert code != 0 and msg in out and not (tmp_path / "x").exists()


def test_bpw_only_with_glq(e4b_gguf, tmp_path):
    code, out = _cli("convert", e4b_gguf, "--to", "hf", "--bpw", "3", "--outfile", tmp_path / "x")
    assert code == 1 and "--bpw applies to --to glq, not --to hf" in out


def test_quantized_hf_folder_refused(tmp_path):
    d = tmp_path / "q"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "glq"}}))
    with pytest.raises(GGQuantError, match="already quantized .quant_method 'glq'"):
        W.export_glq(d, outfile=tmp_path / "out", dry_run=True)
