"""`ggquant convert` of already-quantized Gemma 4 checkpoints (compressed-tensors, GPTQ, MLX, GLQ).

For each format a tiny Gemma 4 E4B (tests/quantized/gemma4_quantized.py) is converted and
- the exactly transcoded tensors dequantize in ggml (libggml-base, through ctypes) to the
  source's exact dequantization bit for bit;
- llama.cpp (llama-cpp-python) loads the GGUF and its logits equal those of the same model
  dequantized to F32 and converted by ggquant as a plain HF checkpoint, within what the types
  allow (exact weights: only llama.cpp's Q8_0 activation rounding in Q4_0/Q5_0/Q4_1 matmuls);
- the plan (types, exact/lossy, SQNR), the GGUF metadata, --exact and --dry-run behave as the
  module docstring of ggquant.convert.quantized says.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType

from ggquant.cli import main
from ggquant.convert import convert
from ggquant.convert.plan import KEY_DESC, KEY_EXACT, KEY_METHOD, KEY_REQUANTIZED
from ggquant.errors import GGQuantError
from ggquant.formats.gguf import GGUFReader
from tests.oracles import ggml as ggml_oracle
from tests.quantized import gemma4_quantized as G
from tests.quantized.util import assert_bits_equal

llama_cpp = pytest.importorskip("llama_cpp")

N_TOKENS = 40  # longer than the sliding window (8), as tests/test_fixtures.py
EXACT_LOGIT_TOL = 0.6  # measured 0.15-0.30 (|logit| <= 11.5): llama.cpp's Q8_0 activations in Q4_0/Q5_0/Q4_1 dots
LOSSY_LOGIT_TOL = 1.0  # with some weights requantized (Q8_0/Q5_x) on top
N_TEXT_LINEARS = 72  # 12 layers x (q, o, gate, up, down) + 6 unshared layers x (k, v)
PLE = ("per_layer_token_embd.weight", "per_layer_model_proj.weight")
MLX_8BIT = {"model.language_model.layers.1.mlp.down_proj": {"bits": 8}}


# --- helpers ---------------------------------------------------------------------------------


def _quantized_plans(conv, part: int = 0):
    return [t for t in conv.files[part].tensors if t.source_quant]


def _types(conv, part: int = 0) -> dict[str, str]:
    return {t.name: t.qtype.name for t in conv.files[part].tensors}


def assert_exact_tensors_bit_equal(conv, path: Path) -> int:
    """ggml's to_float of every exactly transcoded tensor == the source's exact dequantization."""
    n = 0
    with GGUFReader(path) as r:
        for t in _quantized_plans(conv):
            if not t.exact:
                continue
            g = r.tensor(t.name)
            assert g.qtype == t.qtype
            got = ggml_oracle.dequantize(t.qtype, np.ascontiguousarray(g.raw()).view(np.uint8).reshape(t.shape[0], -1),
                                         t.shape[-1])
            want = t.src.encoding.record.dequantize((0, t.n_outer))
            assert_bits_equal(got.reshape(want.shape), want, t.name)
            n += 1
    return n


def _prompt() -> list[int]:
    rng = np.random.default_rng(20260101)
    return [2] + [int(i) for i in rng.integers(20, 500, N_TOKENS - 1)]


def _logits(path: Path) -> np.ndarray:
    llm = llama_cpp.Llama(str(path), n_ctx=128, n_batch=128, n_ubatch=128, logits_all=True, flash_attn=False,
                          type_k=0, type_v=0, seed=0, n_threads=2, verbose=False)
    try:
        ids = _prompt()
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def assert_logits_close(path: Path, qdir: Path, tmp: Path, tol: float) -> None:
    """llama.cpp on `path` vs llama.cpp on ggquant's F32 GGUF of the dequantized checkpoint."""
    ref_path = tmp / f"{qdir.name}-dequantized-f32.gguf"
    convert(G.dequantized_copy(qdir), outtype="f32", outfile=ref_path)
    got, ref = _logits(path), _logits(ref_path)
    assert np.abs(ref).max() > 5  # not a degenerate model
    diff = np.abs(got - ref).max()
    assert diff <= tol, f"max |logit - dequantized F32 logit| = {diff}"
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.998, cos.min()
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * tol
    assert np.array_equal(ref.argmax(1)[clear], got.argmax(1)[clear])


def _cli(*args) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output + (str(r.exception) if r.exception and not isinstance(r.exception, SystemExit) else "")


# --- compressed-tensors W4A16 -------------------------------------------------------------------


@pytest.fixture(scope="module")
def ct_dir() -> Path:
    return G.build_ct()


@pytest.fixture(scope="module")
def ct_gguf(ct_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("ct")
    conv = convert(ct_dir, outfile=d / "model-{ftype}.gguf", mmproj=True)
    return conv, d


def test_ct_w4a16_gemma4_is_exact_q4_0_and_runs(ct_dir, ct_gguf):
    conv, d = ct_gguf
    text, mmproj = (Path(p) for p in conv.written)
    assert text.name == "model-q4_0.gguf"  # --outtype auto names the file after the quantized weights
    types = _types(conv)
    plans = _quantized_plans(conv)
    assert len(plans) == N_TEXT_LINEARS and all(t.exact and t.qtype == T.Q4_0 for t in plans)
    # the seed's ignore list: PLE and the towers stay bf16 (norms F32, as llama.cpp converts them)
    for name in PLE + ("token_embd.weight", "blk.0.inp_gate.weight", "blk.0.proj.weight"):
        assert types[name] == "BF16", name
    assert assert_exact_tensors_bit_equal(conv, text) == N_TEXT_LINEARS
    with GGUFReader(text) as r:
        assert r.get("general.file_type") == LlamaFileType.MOSTLY_Q4_0
        assert r.get(KEY_METHOD) == "compressed-tensors"
        assert r.get(KEY_DESC) == "compressed-tensors pack-quantized int4 sym group32 (v0.20.0)"
        assert sorted(r.get(KEY_EXACT)) == sorted(t.name for t in plans)
        assert KEY_REQUANTIZED not in r.fields
    with GGUFReader(mmproj) as r:  # the vision/audio towers were in the ignore list: nothing quantized there
        assert KEY_METHOD not in r.fields
        assert {t.qtype.name for t in r.tensors} <= {"F32", "BF16", "F16"}
    assert_logits_close(text, ct_dir, d, EXACT_LOGIT_TOL)


def test_ct_float_outtypes_are_exact_dequantizations(ct_dir, tmp_path):
    # int4 codes x bf16 scales need at most 11 significant bits: F16 holds them, BF16 does not
    for outtype, qtype in (("f32", T.F32), ("f16", T.F16)):
        conv = convert(ct_dir, outtype=outtype, outfile=tmp_path / f"{outtype}.gguf", exact=outtype == "f32")
        assert {t.qtype for t in _quantized_plans(conv)} == {qtype}
        assert assert_exact_tensors_bit_equal(conv, tmp_path / f"{outtype}.gguf") == N_TEXT_LINEARS
    with pytest.raises(GGQuantError, match=r"--exact: .*blk\.\d+\.\w+\.weight: compressed-tensors pack-quantized "
                                           r"int4 sym group32 -> BF16: \d+ of \d+ values are not BF16 values"):
        convert(ct_dir, outtype="bf16", dry_run=True, exact=True)


def test_ct_preset_keeps_int4_exact_and_honours_tensor_type(ct_dir, tmp_path):
    path = tmp_path / "q4km.gguf"
    conv = convert(ct_dir, outtype="Q4_K_M", outfile=path, tensor_types=["attn_q=q8_0"])
    plans = _quantized_plans(conv)
    # never requantize an int4 weight to a >= 4-bit type through float: Q4_0 keeps its values
    assert {t.qtype for t in plans if ".attn_q." not in t.name} == {T.Q4_0}
    # an explicit --tensor-type is honoured, and int4 codes fit Q8_0 exactly too
    assert {t.qtype for t in plans if ".attn_q." in t.name} == {T.Q8_0}
    assert all(t.exact for t in plans)
    assert _types(conv)["token_embd.weight"] not in ("BF16", "F32")  # the preset still quantizes bf16 tensors
    assert assert_exact_tensors_bit_equal(conv, path) == N_TEXT_LINEARS
    with GGUFReader(path) as r:
        assert r.get("general.file_type") == LlamaFileType.MOSTLY_Q4_K_M
    # a preset quantizes the bf16 tensors: --exact refuses it, naming them
    with pytest.raises(GGQuantError, match=r"--exact: .*token_embd\.weight: BF16 -> \w+ rounds"):
        convert(ct_dir, outtype="Q4_K_M", dry_run=True, exact=True)


def test_ct_dry_run_cli_lists_source_and_exactness(ct_dir, tmp_path):
    out = tmp_path / "never.gguf"
    code, text = _cli("convert", ct_dir, "--dry-run", "--outfile", out)
    assert code == 0, text
    assert not out.exists()
    assert "quantized source: compressed-tensors pack-quantized int4 sym group32 (v0.20.0): 72 exact, 0 lossy" in text
    line = next(x for x in text.splitlines() if x.strip().startswith("blk.0.attn_q.weight ") and "exact" in x)
    assert "compressed-tensors pack-quantized int4 sym group32" in line and "Q4_0" in line
    code, text = _cli("convert", ct_dir, "--dry-run", "--json", "--exact", "--outfile", out)
    assert code == 0, text
    f = json.loads(text)["files"][0]
    assert (f["source_quantization"], f["exact_tensors"], f["requantized_tensors"]) == ("compressed-tensors", 72, 0)
    t = next(t for t in f["tensors"] if t["name"] == "blk.0.attn_q.weight")
    assert t["exact"] is True and t["type"] == "Q4_0" and t["source_format"] == "compressed-tensors/pack-quantized"
    assert t["source_tensor"] == "model.language_model.layers.0.self_attn.q_proj.weight"


def test_ct_mixed_precision_groups_int4_and_int8(tmp_path):
    # two config groups (llama.cpp's converter refuses these): int4 g32 attention, int8 channel MLP
    qdir = G.build_ct(mlp_int8=True)
    path = tmp_path / "mixed.gguf"
    conv = convert(qdir, outfile=path, exact=True)
    types = {t.name: t.qtype for t in _quantized_plans(conv)}
    assert {q for n, q in types.items() if ".ffn_" in n} == {T.Q8_0}
    assert {q for n, q in types.items() if ".attn_" in n} == {T.Q4_0}
    assert assert_exact_tensors_bit_equal(conv, path) == N_TEXT_LINEARS
    assert_logits_close(path, qdir, tmp_path, EXACT_LOGIT_TOL)


# --- GPTQ (hand-packed v1 layout) ---------------------------------------------------------------


@pytest.mark.parametrize("sym, qtype", [(True, T.Q4_0), (False, T.Q5_0)], ids=["sym", "asym"])
def test_gptq_int4_is_exact_and_runs(tmp_path, sym, qtype):
    qdir = G.build_gptq(sym=sym)
    path = tmp_path / "gptq.gguf"
    conv = convert(qdir, outfile=path, exact=True)
    plans = _quantized_plans(conv)
    assert len(plans) == N_TEXT_LINEARS and {t.qtype for t in plans} == {qtype}
    assert assert_exact_tensors_bit_equal(conv, path) == N_TEXT_LINEARS
    with GGUFReader(path) as r:
        assert r.get(KEY_METHOD) == "gptq"
    assert_logits_close(path, qdir, tmp_path, EXACT_LOGIT_TOL)


def test_gptq_act_order_down_proj_permuted_exact_rest_f16(tmp_path):
    # bf16-derived scales: the act-order layers are exact in F16; down_proj becomes exact Q4_0
    # by sorting its columns by group (and permuting gate/up rows alike)
    qdir = G.build_gptq(act_order=True)
    path = tmp_path / "act.gguf"
    conv = convert(qdir, outfile=path, exact=True)
    types = {t.name: t.qtype for t in _quantized_plans(conv)}
    assert {q for n, q in types.items() if "ffn_down" in n} == {T.Q4_0}
    assert {q for n, q in types.items() if "ffn_down" not in n} == {T.F16}
    assert assert_exact_tensors_bit_equal(conv, path) == N_TEXT_LINEARS
    assert_logits_close(path, qdir, tmp_path, EXACT_LOGIT_TOL)


def test_gptq_act_order_fp16_scales_is_lossy_and_exact_refuses(tmp_path):
    qdir = G.build_gptq(act_order=True, fp16_scales=True)
    with pytest.raises(GGQuantError, match=r"--exact: these tensors cannot be written exactly: blk\.0\.\w+\.weight: "
                                           r"GPTQ v1 int4 sym group32 act-order g_idx -> Q8_0: no exact block type"):
        convert(qdir, exact=True, dry_run=True)
    code, text = _cli("convert", qdir, "--dry-run", "--json")
    assert code == 0, text
    f = json.loads(text)["files"][0]
    assert (f["exact_tensors"], f["requantized_tensors"]) == (12, 60)
    for t in f["tensors"]:
        if "source_format" in t:
            assert t["exact"] == ("ffn_down" in t["name"]), t
            assert ("sqnr_db" in t) != t["exact"] and t.get("sqnr_db", 99) > 40, t  # Q8_0 of int4: ~46 dB
    path = tmp_path / "lossy.gguf"
    conv = convert(qdir, outfile=path)
    with GGUFReader(path) as r:
        assert len(r.get(KEY_REQUANTIZED)) == 60 and len(r.get(KEY_EXACT)) == 12
    assert assert_exact_tensors_bit_equal(conv, path) == 12
    assert all(t.sqnr > 40 for t in _quantized_plans(conv) if not t.exact)
    assert_logits_close(path, qdir, tmp_path, LOSSY_LOGIT_TOL)


def test_lossy_requantization_uses_the_imatrix(tmp_path):
    from ggquant.imatrix.files import load
    from ggquant.quant import types as qtypes
    from tests.imatrix_util import write_imatrix_gguf

    qdir = G.build_gptq(act_order=True, fp16_scales=True)
    plan = convert(qdir, outtype="Q4_K_M", dry_run=True)
    rng = np.random.default_rng(3)
    sums = {t.name: rng.gamma(1.0, 1.0, t.shape[-1]).astype(np.float32) * 32
            for t in plan.files[0].tensors if len(t.shape) == 2 and t.name.startswith("blk.")}
    im = write_imatrix_gguf(tmp_path / "imatrix.gguf", sums, {n: 32 for n in sums})
    path = tmp_path / "q4km.gguf"
    conv = convert(qdir, outtype="Q4_K_M", imatrix=im, outfile=path)
    vectors = load(im).normalised()
    checked = differs = 0
    with GGUFReader(path) as r:
        for t in _quantized_plans(conv):
            if t.exact or not qtypes.get(t.qtype).uses_imatrix:
                continue
            w = t.src.encoding.record.dequantize()
            got = np.ascontiguousarray(r.tensor(t.name).raw()).view(np.uint8).reshape(t.shape[0], -1)
            assert np.array_equal(got, ggml_oracle.quantize(t.qtype, w, vectors[t.name])), t.name
            differs += not np.array_equal(got, ggml_oracle.quantize(t.qtype, w))
            checked += 1
    assert checked >= 12 and differs == checked


# --- MLX affine ---------------------------------------------------------------------------------


def test_mlx_affine_q4_1_exact_8bit_lossy(tmp_path):
    qdir = G.build_mlx(overrides=MLX_8BIT)
    path = tmp_path / "mlx.gguf"
    conv = convert(qdir, outfile=path)
    types = {t.name: (t.qtype, t.exact) for t in _quantized_plans(conv)}
    assert types.pop("blk.1.ffn_down.weight") == (T.Q8_0, False)  # 256 levels: no exact GGML type
    # the other text Linears, per_layer_model_proj and both embeddings (token_embd, per_layer_token_embd)
    assert len(types) == N_TEXT_LINEARS - 1 + 3
    assert types["token_embd.weight"] == types[PLE[0]] == (T.Q4_1, True)
    assert set(types.values()) == {(T.Q4_1, True)}
    assert assert_exact_tensors_bit_equal(conv, path) == len(types)
    assert_logits_close(path, qdir, tmp_path, LOSSY_LOGIT_TOL)
    with pytest.raises(GGQuantError, match=r"--exact: these tensors cannot be written exactly: "
                                           r"blk\.1\.ffn_down\.weight: MLX affine 8-bit group32 -> Q8_0"):
        convert(qdir, exact=True, dry_run=True)


def test_mlx_affine_6bit_lossy_target_in_the_plan():
    # 6-bit codes: requantized to Q6_K (measured to stay within MLX's own error, test_mlx.py), or
    # Q6_K's row fallback Q8_0 for rows that are not whole 256-element super-blocks; --dry-run says so
    qdir = G.build_mlx(overrides={"model.language_model.layers.1.mlp.down_proj": {"bits": 6}})
    conv = convert(qdir, dry_run=True)
    (t,) = [t for t in _quantized_plans(conv) if t.name == "blk.1.ffn_down.weight"]
    assert not t.exact and t.qtype == (T.Q6_K if t.shape[-1] % 256 == 0 else T.Q8_0), (t.qtype, t.shape)
    assert f"MLX affine 6-bit group32 -> {t.qtype.name}" in t.reason, t.reason
    assert ("measured" if t.qtype == T.Q6_K else "Q6_K's fallback") in t.reason, t.reason
    assert t.sqnr is not None and t.sqnr > 30, t.sqnr


def test_mlx_affine_6bit_llama_plans_q6_k(tmp_path):
    # rows of 256 and 512: every 6-bit Linear of a tiny Llama (its q/k rows permuted as codes) is
    # planned as Q6_K, lossy, with its SQNR in --dry-run; 8-bit ones as Q8_0
    import json

    import mlx.core as mx

    from ggquant.fixtures.quantized import _tiny_llama3_folder

    d = _tiny_llama3_folder(tmp_path / "mlx", 256, 512, 4, 64, 8)
    tensors = mx.load(str(d / "model.safetensors"))
    quant = {"group_size": 64, "bits": 6, "mode": "affine",
             "model.layers.0.mlp.down_proj": {"group_size": 32, "bits": 8}}
    for key in [k for k in tensors if k.startswith("model.layers.") and k.endswith("_proj.weight")]:
        mod = key[: -len(".weight")]
        o = quant.get(mod, quant)
        wq, scales, biases = mx.quantize(tensors[key], group_size=o["group_size"], bits=o["bits"], mode="affine")
        tensors.update({key: wq, f"{mod}.scales": scales, f"{mod}.biases": biases})
    mx.eval(tensors)
    mx.save_safetensors(str(d / "model.safetensors"), tensors, metadata={"format": "mlx"})
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "quantization": quant, "quantization_config": quant}))
    conv = convert(d, dry_run=True)
    plans = {t.name: t for t in _quantized_plans(conv)}
    assert len(plans) == 7
    for name, t in plans.items():
        assert not t.exact and t.sqnr is not None, name
        assert t.qtype == (T.Q8_0 if name == "blk.0.ffn_down.weight" else T.Q6_K), (name, t.qtype)
        assert t.sqnr > (45 if t.qtype == T.Q8_0 else 30), (name, t.sqnr)


# --- GLQ ----------------------------------------------------------------------------------------


def test_glq_types_above_bpw_with_sqnr(tmp_path):
    pytest.importorskip("glq")
    qdir = G.build_glq()
    code, text = _cli("convert", qdir, "--dry-run", "--json")
    assert code == 0, text
    rows = {t["name"]: t for t in json.loads(text)["files"][0]["tensors"] if "source_format" in t}
    assert len(rows) == len(G.GLQ_BPW)
    # one step above the bpw (Q4_K / Q5_K / Q6_K for 2 / 3 / 4-5 bpw); rows of 64 are no whole
    # 256-element super-block, so llama-quantize's 32-element fallbacks apply: Q5_0 / Q5_1 / Q8_0
    assert rows["blk.0.attn_q.weight"]["type"] == "Q5_0" and rows["blk.0.attn_k.weight"]["type"] == "Q5_1"
    assert {rows[n]["type"] for n in rows if n not in ("blk.0.attn_q.weight", "blk.0.attn_k.weight")} == {"Q8_0"}
    for t in rows.values():
        assert t["exact"] is False and t["source_format"] == "glq/e8_shell"
        assert t["sqnr_db"] > (40 if t["type"] == "Q8_0" else 22), t
    path = tmp_path / "glq.gguf"
    conv = convert(qdir, outfile=path)
    real = {t.name: t.sqnr for t in _quantized_plans(conv)}
    assert real == pytest.approx({n: t["sqnr_db"] for n, t in rows.items()}, abs=1e-3)  # dry run = real run
    assert_logits_close(path, qdir, tmp_path, LOSSY_LOGIT_TOL)


# --- what the converter's one-pass exact kernel checks against -----------------------------------


@pytest.mark.parametrize("build", [G.build_ct, G.build_gptq, lambda: G.build_gptq(sym=False),
                                   lambda: G.build_gptq(act_order=True), lambda: G.build_mlx(overrides=MLX_8BIT)],
                         ids=["ct", "gptq-sym", "gptq-asym", "gptq-act-order", "mlx"])
def test_source_blocks_dequantize_like_the_source(build):
    # convert.encode.exact_chunk compares ggml's reading of the packed bytes with the blocks'
    # float32(u) * d (+ m); those equal the reader's exact dequantization bit for bit
    conv = convert(build(), dry_run=True)
    n = 0
    for t in _quantized_plans(conv):
        blocks = t.src.encoding.record.blocks()
        if isinstance(blocks, str):
            continue
        assert_bits_equal(blocks.dequantize(), t.src.encoding.record.dequantize(), t.name)
        n += 1
    assert n >= 12


def test_unknown_quantization_method_is_refused_by_name(ct_dir, tmp_path):
    import shutil

    d = tmp_path / "bnb"
    shutil.copytree(ct_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GGQuantError, match=r"quant_method is 'bitsandbytes', which ggquant does not read"):
        convert(d, dry_run=True)
