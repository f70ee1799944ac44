"""GPTQ / AutoRound / AWQ checkpoints: ggquant's dequantization equals auto-round's own kernels,
and the exact mappings give GGML blocks that ggml dequantizes to the same float32 bits.

Checkpoints come from auto-round 0.16.1 itself (RTN, iters=0) where it exports the format; the
layouts it no longer writes (act-order g_idx, arithmetic v1 zero points of 0, the auto-round
0.15 model-free mislabel) are hand-packed or relabelled in fixtures/quantized.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from ggquant.errors import GGQuantError
from ggquant.formats.quantized import open_quantized
from tests.oracles import ggml as ggml_oracle
from tests.quantized.util import assert_bits_equal, open_dir

torch = pytest.importorskip("torch")
pytest.importorskip("llama_cpp")
pytest.importorskip("auto_round")

from ggquant.fixtures.cache import cached_build  # noqa: E402
from ggquant.fixtures.quantized import (  # noqa: E402
    build_auto_round, build_auto_round_model_free, build_gptq, relabel_as_autoround_015_model_free,
)

# case id -> (auto-round format, bits, sym, expected description prefix, exact type)
CASES = {
    "gptq_v1_asym4": ("auto_gptq", 4, False, "GPTQ v1 int4 asym", T.Q5_0),
    "ar_awq_asym4": ("auto_round", 4, False, "AutoRound auto_round:auto_awq int4 asym", T.Q5_0),
    "awq_asym4": ("auto_awq", 4, False, "AWQ gemm int4 asym", T.Q5_0),
    "ar_gptqmodel_asym4": ("auto_round:gptqmodel", 4, False, "AutoRound auto_round:gptqmodel int4 asym", T.Q5_0),
    "gptq_v1_sym4": ("auto_gptq", 4, True, "GPTQ v1 int4 sym", T.Q4_0),
    "ar_gptq_sym4": ("auto_round", 4, True, "AutoRound auto_round:auto_gptq int4 sym", T.Q4_0),
    "ar_gptq_sym3": ("auto_round", 3, True, "AutoRound auto_round:auto_gptq int3 sym", T.Q4_0),
    "gptq_v1_sym8": ("auto_gptq", 8, True, "GPTQ v1 int8 sym", T.Q8_0),
    "ar_awq_asym6": ("auto_round:auto_awq", 6, False, "AutoRound auto_round:auto_awq int6 asym", T.Q8_0),
    # auto-round's AWQ export with sym=True: zero_point false, qzeros all 2^(bits-1)
    "awq_sym4": ("auto_awq", 4, True, "AWQ gemm int4 sym", T.Q4_0),
    "ar_awq_sym6": ("auto_round:auto_awq", 6, True, "AutoRound auto_round:auto_awq int6 sym", T.Q8_0),
}


@pytest.fixture(scope="session")
def ar_dirs():
    import auto_round

    return {case: cached_build(f"autoround_{case}", build_auto_round, fmt=fmt, bits=bits, sym=sym,
                               autoround_version=auto_round.__version__)
            for case, (fmt, bits, sym, _, _) in CASES.items()}


def _library_weights(d) -> dict[str, np.ndarray]:
    """auto-round's own dequantization, float32 [out, in] per module: its torch QuantLinear forward
    on the identity (GPTQ layout; qlinear_torch_zp for zero-minus-one checkpoints) or AWQ's
    dequantize_gemm, with the fp16 scales widened to float32 so the products stay exact."""
    from safetensors.torch import load_file

    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    t = load_file(str(d / "model.safetensors"))
    bits, gs = qc["bits"], qc["group_size"]
    awq = qc["quant_method"] == "awq" or qc.get("packing_format") == "auto_round:auto_awq"
    v1 = qc["quant_method"] == "gptq" or qc.get("packing_format") == "auto_round:auto_gptq"
    out = {}
    for name in t:
        if not name.endswith(".qweight"):
            continue
        mod = name[: -len(".qweight")]
        scales = t[f"{mod}.scales"].float()
        if awq:
            from auto_round.export.export_to_awq.utils import dequantize_gemm

            w = dequantize_gemm(t[name], t[f"{mod}.qzeros"], scales, bits, gs)  # [in, out]
            out[mod + ".weight"] = w.T.float().numpy()
            continue
        if v1:
            from auto_round_extension.torch.qlinear_torch_zp import QuantLinear
        else:
            from auto_round_extension.torch.qlinear_torch import QuantLinear
        n, o = t[name].shape[0] * 32 // bits, scales.shape[1]
        ql = QuantLinear(bits, gs, n, o, bias=False)
        ql.qweight, ql.qzeros, ql.scales = t[name], t[f"{mod}.qzeros"], scales
        with torch.no_grad():
            out[mod + ".weight"] = ql(torch.eye(n, dtype=torch.float32)).T.contiguous().numpy()
    return out


@pytest.mark.parametrize("case", CASES)
def test_dequantize_equals_library_and_exact(ar_dirs, case):
    _, _, _, desc, qtype = CASES[case]
    d = ar_dirs[case]
    model = open_dir(d)
    assert model.description.startswith(desc), model.description
    lib = _library_weights(d)
    assert sorted(lib) == sorted(r.name for r in model)
    for rec in model:
        ours = rec.dequantize()
        # The identity matmul turns -0.0 (q == zero under auto-round's signed scales) into +0.0;
        # adding +0.0 does the same to ours (and to AWQ's dequantize_gemm) and changes nothing else.
        assert_bits_equal(ours + np.float32(0), lib[rec.name] + np.float32(0), f"{case} {rec.name}")
        got = rec.exact_ggml()
        assert got is not None, rec.not_exact_reason
        assert got[0] == qtype, (case, rec.name, got[0].name)
        assert_bits_equal(ggml_oracle.dequantize(got[0], got[1], rec.shape[1]), ours, f"{case} {rec.name} {qtype.name}")
    # lm_head, embeddings and norms stay for the converter to pass through.
    assert not any(n.startswith(("lm_head", "model.embed_tokens", "model.norm")) for n in model.consumed)


def test_autoround_015_model_free_mislabel(ar_dirs, tmp_path):
    """Zero points stored minus one under the 'auto_round' (v2) label are read as v1."""
    src = ar_dirs["gptq_v1_asym4"]
    d = relabel_as_autoround_015_model_free(src, tmp_path / "ar015")
    model = open_dir(d)
    assert any("0.15" in n for n in model.notes)
    ref = open_dir(src)
    for rec in model:
        assert_bits_equal(rec.dequantize(), ref[rec.name].dequantize(), rec.name)
    # Without the signature (say auto-round 0.16), the label is trusted: every weight moves one step.
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["autoround_version"] = "0.16.1"
    (d / "config.json").write_text(json.dumps(cfg))
    shifted = open_dir(d)
    assert not shifted.notes
    rec = shifted["model.layers.0.mlp.up_proj.weight"]
    assert not np.array_equal(rec.dequantize(), ref[rec.name].dequantize())


@pytest.mark.parametrize("bits, zeros_format, qtype", [
    (4, "gptq", T.Q5_0), (4, "gptq_v2", T.Q5_0), (2, "gptq", T.Q4_0),
    (3, "gptq_v2", T.Q4_0), (6, "gptq_v2", T.Q8_0), (7, "gptq_v2", T.Q8_0),
])
def test_hand_packed_asym(tmp_path, bits, zeros_format, qtype):
    """Asymmetric GPTQ layouts auto-round does not export, with zero points of 0 (a v1 word then
    borrows from its neighbour and is restored word-wise) and bit-stream widths 3/6/7."""
    d = build_gptq(tmp_path / "g", bits=bits, sym=False, zeros_format=zeros_format)
    oracle = np.load(d / "oracle.npz")
    for rec in open_dir(d):
        assert_bits_equal(rec.dequantize(), oracle[rec.name], rec.name)
        got = rec.exact_ggml()
        assert got is not None, rec.not_exact_reason
        qtype_got, data = got
        assert qtype_got == qtype
        assert_bits_equal(ggml_oracle.dequantize(qtype, data, rec.shape[1]), oracle[rec.name], rec.name)


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_act_order_down_proj_permutation(tmp_path, sym):
    """desc_act g_idx: not exact as stored; exact after sorting columns by group (down_proj trick)."""
    d = build_gptq(tmp_path / "g", bits=4, sym=sym, act_order=True, zeros_format="gptq_v2")
    oracle = np.load(d / "oracle.npz")
    model = open_dir(d)
    down = model["model.layers.0.mlp.down_proj.weight"]
    assert "act-order" in down.encoding
    assert_bits_equal(down.dequantize(), oracle[down.name], down.name)
    assert down.exact_ggml() is None and "32-column block" in down.not_exact_reason
    assert down.expected_exact_type()[0] is None
    perm = down.act_order_perm()
    qtype, data = down.permuted(cols=perm).exact_ggml()
    assert qtype == (T.Q4_0 if sym else T.Q5_0)
    assert_bits_equal(ggml_oracle.dequantize(qtype, data, down.shape[1]), oracle[down.name][:, perm], down.name)
    # The MLP computes the same function with gate/up rows permuted alike (float64 check).
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, model["model.layers.0.mlp.gate_proj.weight"].shape[1]))
    g, u = (model[f"model.layers.0.mlp.{p}_proj.weight"] for p in ("gate", "up"))

    def mlp(gw, uw, dw):
        h = x @ gw.T.astype(np.float64)
        return ((h / (1 + np.exp(-h))) * (x @ uw.T.astype(np.float64))) @ dw.T.astype(np.float64)

    ref = mlp(g.dequantize(), u.dequantize(), down.dequantize())
    got = mlp(g.permuted(rows=perm).dequantize(), u.permuted(rows=perm).dequantize(),
              down.permuted(cols=perm).dequantize())
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("qc, phrase", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "'marlin'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "'gemv'"),
    ({"quant_method": "auto-round", "bits": 4, "group_size": 128, "packing_format": "auto_round:fp8"},
     "auto_round:fp8"),
    ({"quant_method": "auto-round", "bits": 4, "group_size": 128, "data_type": "mx_fp"}, "mx_fp"),
])
def test_refusals(qc, phrase):
    with pytest.raises(GGQuantError, match=phrase):
        open_quantized({"quantization_config": qc}, [], lambda n: None)


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_model_free_padded_widths_are_cropped_to_config(tmp_path, sym):
    """auto-round's model-free export pads 160/288-wide inputs to 256/384 (group 128): the GGUF has
    config.json's widths, each weight bit-equal to auto-round's own dequantization cropped, its
    padding zero; a crop into real columns is refused by name."""
    import auto_round

    from ggquant.convert.hf_to_gguf import convert
    from ggquant.formats.gguf import GGUFReader

    d = cached_build(f"autoround_model_free_{'sym' if sym else 'asym'}4", build_auto_round_model_free, sym=sym,
                     autoround_version=auto_round.__version__)
    lib = _library_weights(d)
    model = open_dir(d)
    widths = {"q_proj": 160, "k_proj": 160, "v_proj": 160, "o_proj": 160, "gate_proj": 160, "up_proj": 160,
              "down_proj": 288}
    gguf_names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                  "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for rec in model:
        assert rec.padded and rec.shape[1] == {160: 256, 288: 384}[widths[rec.name.split(".")[-2]]]
    out = tmp_path / "mf.gguf"
    convert(d, outfile=out)  # llama.cpp's q/k row permutation makes those two requantized, not exact
    qtype = T.Q4_0 if sym else T.Q5_0
    with GGUFReader(out) as r:
        for rec in model:
            short = rec.name.split(".")[-2]
            n = widths[short]
            g = r.tensor(f"blk.0.{gguf_names[short]}.weight")
            assert tuple(g.shape)[-1] == n, (rec.name, g.shape)
            if short in ("q_proj", "k_proj"):
                continue
            assert g.qtype == qtype, (rec.name, g.qtype)
            got = ggml_oracle.dequantize(qtype, np.ascontiguousarray(g.raw()).view(np.uint8).reshape(rec.shape[0], -1), n)
            want = lib[rec.name]
            assert not want[:, n:].any()
            assert_bits_equal(got.reshape(rec.shape[0], n) + np.float32(0), want[:, :n] + np.float32(0), rec.name)
    rec = model["model.layers.0.mlp.down_proj.weight"]
    with pytest.raises(GGQuantError, match=r"down_proj\.weight: stored \[160, 384\], .*\[160, 200\], but padding "
                                           r"column \d+ of row \d+ is not zero"):
        rec.cropped(160, 200)
