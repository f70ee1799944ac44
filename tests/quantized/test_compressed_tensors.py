"""compressed-tensors checkpoints: ggquant's dequantization equals the library's, and every exact
mapping (research note §5) gives GGML blocks whose ggml dequantization equals it bit for bit.

Checkpoints are made at test time by compressed-tensors itself (fixtures/quantized.py); the
formats the installed library no longer writes (act-order g_idx, legacy per-word packing) are
hand-packed with a float32 oracle computed from their ground-truth codes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from ggquant.errors import GGQuantError
from ggquant.formats.quantized import detect, open_quantized
from tests.oracles import ggml as ggml_oracle
from tests.quantized.util import assert_bits_equal, open_dir

ct = pytest.importorskip("compressed_tensors")
torch = pytest.importorskip("torch")
pytest.importorskip("llama_cpp")

from ggquant.fixtures.quantized import build_compressed_tensors, build_ct_act_order, build_ct_legacy  # noqa: E402


def _w(**kw):
    return [{"targets": ["Linear"], "weights": kw}]


W8A8_INPUT = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True, "symmetric": True}
FP8_TOKEN = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True}

# id -> (builder kwargs, acceptable exact types (None = not exact), phrase the reason must contain)
CASES = {
    "w4a16": (dict(groups=_w(num_bits=4, strategy="group", group_size=128)), {T.Q4_0}, None),
    "w4a16_fp16": (dict(groups=_w(num_bits=4, strategy="group", group_size=128), dtype="float16"), {T.Q4_0}, None),
    "w4a16_asym": (dict(groups=_w(num_bits=4, strategy="group", group_size=128, symmetric=False)), {T.Q5_0}, None),
    "w4_g32": (dict(groups=_w(num_bits=4, strategy="group", group_size=32)), {T.Q4_0}, None),
    "w4_channel": (dict(groups=_w(num_bits=4, strategy="channel")), {T.Q4_0}, None),
    "w4_tensor": (dict(groups=_w(num_bits=4, strategy="tensor")), {T.Q4_0}, None),
    "w4_g16": (dict(groups=_w(num_bits=4, strategy="group", group_size=16)), None, "inside a 32-column block"),
    "w2a16": (dict(groups=_w(num_bits=2, strategy="group", group_size=128)), {T.Q4_0}, None),
    "w3a16": (dict(groups=_w(num_bits=3, strategy="group", group_size=128)), {T.Q4_0}, None),
    "w5a16": (dict(groups=_w(num_bits=5, strategy="group", group_size=128)), {T.Q5_0}, None),
    "w6a16": (dict(groups=_w(num_bits=6, strategy="group", group_size=128)), {T.Q8_0}, None),
    "w7a16": (dict(groups=_w(num_bits=7, strategy="group", group_size=128)), {T.Q8_0}, None),
    "w8a16": (dict(groups=_w(num_bits=8, strategy="group", group_size=128)), {T.Q8_0}, None),
    "w8_channel": (dict(groups=_w(num_bits=8, strategy="channel")), {T.Q8_0}, None),
    "w3_asym": (dict(groups=_w(num_bits=3, strategy="group", group_size=128, symmetric=False)), {T.Q4_0}, None),
    "w5_asym": (dict(groups=_w(num_bits=5, strategy="group", group_size=64, symmetric=False)), {T.Q5_1, T.Q8_0}, None),
    "w7_asym": (dict(groups=_w(num_bits=7, strategy="channel", symmetric=False)), {T.Q8_0}, None),
    "w8_asym": (dict(groups=_w(num_bits=8, strategy="group", group_size=128, symmetric=False)), None, "Q8_0"),
    "w8a8": (dict(groups=[{"targets": ["Linear"], "weights": {"num_bits": 8, "strategy": "channel"},
                           "input_activations": W8A8_INPUT}]), {T.Q8_0}, None),
    "naive_w4": (dict(groups=_w(num_bits=4, strategy="group", group_size=128),
                      quantization_format="naive-quantized"), {T.Q4_0}, None),
    "fp8_channel": (dict(groups=[{"targets": ["Linear"], "input_activations": FP8_TOKEN,
                                  "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}]),
                    None, "FP8"),
    "fp8_block": (dict(groups=[{"targets": ["Linear"], "input_activations": FP8_TOKEN,
                                "weights": {"num_bits": 8, "type": "float", "strategy": "block",
                                            "block_structure": [128, 128]}}]), None, "FP8"),
    # Mixed precision: attention W8A8 (int-quantized, regex target) and MLP W4A16 (class target).
    "mixed": (dict(groups=[
        {"targets": ["re:.*self_attn.*"], "weights": {"num_bits": 8, "strategy": "channel"},
         "input_activations": W8A8_INPUT},
        {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "group", "group_size": 128}}]),
        {T.Q8_0, T.Q4_0}, None),
}


@pytest.fixture(scope="session")
def ct_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    return {k: build_compressed_tensors(root / k, **kw) for k, (kw, _, _) in CASES.items()}


def _group_of(qc: dict, module: str) -> dict:
    """The config group that wrote `module` (regex targets win over class names)."""
    import re

    groups = list(qc["config_groups"].values())
    for g in groups:
        if any(t.startswith("re:") and re.match(t[3:], module) for t in g["targets"]):
            return g
    return next(g for g in groups if "Linear" in g["targets"])


def library_decompress(d, float32_scales: bool) -> dict[str, "torch.Tensor"]:
    """compressed-tensors' own compressor.decompress() of every quantized module (the oracle)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    tensors = load_file(str(d / "model.safetensors"))
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_scale")})
    out = {}
    for module in modules:
        g = _group_of(qc, module)
        scheme = QuantizationScheme.model_validate(
            {k: g[k] for k in ("targets", "weights", "input_activations", "output_activations", "format") if k in g})
        comp = BaseCompressor.get_value_from_registry(g.get("format") or qc["format"])
        sd = {k[len(module) + 1:]: v for k, v in tensors.items() if k.startswith(module + ".")}
        if float32_scales:
            sd["weight_scale"] = sd["weight_scale"].float()
        out[module + ".weight"] = comp.decompress(sd, scheme)["weight"]
    return out


@pytest.mark.parametrize("case", CASES)
def test_dequantize_equals_library(ct_dirs, case):
    d = ct_dirs[case]
    model = open_dir(d)
    assert model.method == "compressed-tensors"
    assert len(model) == 7
    exact, rounded = library_decompress(d, True), library_decompress(d, False)
    assert sorted(exact) == sorted(r.name for r in model)
    for rec in model:
        ours = rec.dequantize()
        # With float32 scales the library computes the exact products: equal bit for bit.
        assert_bits_equal(ours, exact[rec.name].numpy(), f"{case} {rec.name}")
        # Its default output (scale dtype) is that value rounded once.
        lib = rounded[rec.name]
        assert_bits_equal(torch.from_numpy(ours).to(lib.dtype).float().numpy(), lib.float().numpy(),
                          f"{case} {rec.name} in {lib.dtype}")


@pytest.mark.parametrize("case", CASES)
def test_exact_transcode_equals_ggml(ct_dirs, case):
    _, types, phrase = CASES[case]
    model = open_dir(ct_dirs[case])
    for rec in model:
        res = rec.exact_ggml_or_reason()
        if types is None:
            assert isinstance(res, str), f"{case} {rec.name}: expected no exact mapping, got {res[0].name}"
            assert phrase in res and rec.name in res, res
            assert rec.exact_ggml() is None and rec.not_exact_reason == res
            continue
        assert not isinstance(res, str), res
        qtype, data = res
        assert qtype in types, (case, rec.name, qtype.name)
        assert data.dtype == np.uint8 and data.shape[0] == rec.shape[0]
        # ggml's own to_float (libggml-base through ctypes) is the judge.
        assert_bits_equal(ggml_oracle.dequantize(qtype, data, rec.shape[1]), rec.dequantize(),
                          f"{case} {rec.name} {qtype.name}")
        # The metadata-only prediction (for --dry-run) names an exact type without reading data.
        predicted, why = rec.expected_exact_type()
        assert predicted in types, (case, rec.name, predicted, why)


def test_mixed_precision_per_module_types(ct_dirs):
    model = open_dir(ct_dirs["mixed"])
    assert "int-quantized" in model.description and "pack-quantized" in model.description
    for rec in model:
        qtype, _ = rec.exact_ggml()
        assert qtype == (T.Q8_0 if "self_attn" in rec.name else T.Q4_0), rec.name
        assert ("int-quantized" in rec.encoding) == ("self_attn" in rec.name)


def test_row_ranges(ct_dirs):
    model = open_dir(ct_dirs["w4a16_asym"])
    rec = model["model.layers.0.mlp.gate_proj.weight"]
    full = rec.dequantize()
    qtype, data = rec.exact_ggml()
    for a, b in ((0, 1), (5, 77), (300, 512), (17, 17)):
        assert_bits_equal(rec.dequantize(rows=(a, b)), full[a:b], f"rows {a}:{b}")
        if b > a:
            # A chunk may fit a smaller type than the whole tensor: chunked writers pass the
            # type chosen for the tensor.
            qa, da = rec.exact_ggml([qtype], rows=(a, b))
            assert qa == qtype and np.array_equal(da, data[a:b])
    with pytest.raises(GGQuantError):
        rec.dequantize(rows=(10, 600))


def test_ignored_and_consumed(ct_dirs):
    model = open_dir(ct_dirs["w4a16"])
    assert "lm_head.weight" not in model and "lm_head.weight" not in model.consumed
    assert "model.embed_tokens.weight" not in model.consumed
    mod = "model.layers.0.self_attn.q_proj"
    assert {f"{mod}.weight_packed", f"{mod}.weight_scale", f"{mod}.weight_shape"} <= model.consumed
    assert model[f"{mod}.weight"].encoding == "compressed-tensors pack-quantized int4 sym group128"


def test_numpy_storage_getter(ct_dirs):
    """Raw storage arrays (BF16 as uint16 bits) read the same as torch tensors."""
    for case in ("w4a16_asym", "w8a8", "fp8_block"):
        a, b = open_dir(ct_dirs[case]), open_dir(ct_dirs[case], via="numpy")
        for rec in a:
            assert_bits_equal(b[rec.name].dequantize(), rec.dequantize(), f"{case} {rec.name}")


def test_ggquant_safetensors_reader(ct_dirs):
    """Plugs into ggquant's own streaming reader: get = checkpoint[name] (SafeTensor)."""
    st = pytest.importorskip("ggquant.formats.safetensors")
    if not hasattr(st, "open_checkpoint"):
        pytest.skip("ggquant.formats.safetensors.open_checkpoint not available")
    d = ct_dirs["w4a16"]
    cfg = json.loads((d / "config.json").read_text())
    with st.open_checkpoint(d) as ck:
        model = open_quantized(cfg, list(ck.tensors), lambda n: ck[n])
        ref = open_dir(d)
        for rec in model:
            assert_bits_equal(rec.dequantize(rows=(3, 40)), ref[rec.name].dequantize()[3:40], rec.name)
            assert np.array_equal(rec.exact_ggml()[1], ref[rec.name].exact_ggml()[1])


# --------------------------------------------------------------------------------------------
# Layouts the installed library no longer writes


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_act_order_g_idx(tmp_path, symmetric):
    d = build_ct_act_order(tmp_path / "ao", bits=4, group_size=128, symmetric=symmetric)
    oracle = np.load(d / "oracle.npz")
    model = open_dir(d)
    for rec in model:
        assert "act-order" in rec.encoding
        assert_bits_equal(rec.dequantize(), oracle[rec.name], rec.name)
        # A random g_idx mixes groups inside 32-column blocks: no exact block type...
        res = rec.exact_ggml_or_reason()
        assert isinstance(res, str) and "32-column block" in res
        # ...until the columns are sorted by group (the down_proj trick: the producer's rows are
        # permuted the same way, which leaves the MLP's function unchanged).
        perm = rec.act_order_perm()
        view = rec.permuted(cols=perm)
        assert_bits_equal(view.dequantize(), oracle[rec.name][:, perm], rec.name + " permuted")
        qtype, data = view.exact_ggml()
        assert qtype == (T.Q4_0 if symmetric else T.Q5_0)
        assert_bits_equal(ggml_oracle.dequantize(qtype, data, rec.shape[1]), oracle[rec.name][:, perm], rec.name)


def test_act_order_rows_permutation_is_free(tmp_path):
    d = build_ct_act_order(tmp_path / "ao", bits=4, group_size=128, symmetric=True)
    rec = open_dir(d)["model.layers.0.mlp.gate_proj.weight"]
    perm = np.random.default_rng(0).permutation(rec.shape[0])
    assert_bits_equal(rec.permuted(rows=perm).dequantize(), rec.dequantize()[perm], "row permutation")


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_legacy_per_word_3bit(tmp_path, symmetric):
    """ct <= 0.17 packs 10 three-bit codes per int32; ct >= 0.18 reads such files wrongly."""
    d = build_ct_legacy(tmp_path / "legacy", bits=3, symmetric=symmetric)
    oracle = np.load(d / "oracle.npz")
    model = open_dir(d)
    for rec in model:
        assert "legacy" in rec.encoding
        assert_bits_equal(rec.dequantize(), oracle[rec.name], rec.name)
        qtype, data = rec.exact_ggml()
        assert qtype == T.Q4_0
        assert_bits_equal(ggml_oracle.dequantize(qtype, data, rec.shape[1]), oracle[rec.name], rec.name)


# --------------------------------------------------------------------------------------------
# Refusals


def _qc(**over):
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "group_size": 128}}}}
    qc.update(over)
    return {"quantization_config": qc}


@pytest.mark.parametrize("config, phrase", [
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, "'bitsandbytes'"),
    ({"quantization_config": {"quant_method": "hqq"}}, "'hqq'"),
    (_qc(format="mxfp4-pack-quantized"), "mxfp4-pack-quantized"),
    (_qc(format="nvfp4-pack-quantized"), "NVFP4 is nvfp4-pack-quantized with fp4 e2m1"),  # int4 weights
    (_qc(format="some-new-format"), "some-new-format"),
    (_qc(transform_config={"config_groups": {"u": {}}}), "transform_config"),
    (_qc(quantization_status="frozen"), "frozen"),
    (_qc(config_groups={"g": {"targets": ["Linear"], "format": "pack-quantized",
                              "weights": {"num_bits": 12, "group_size": 128}}}), "int12"),
    (_qc(config_groups={"g": {"targets": ["Linear"], "format": "pack-quantized",
                              "weights": {"num_bits": 4, "type": "floatx"}}}), "floatx"),
])
def test_refuses_unknown(config, phrase):
    with pytest.raises(GGQuantError, match=".*".join(map(__import__("re").escape, [phrase]))):
        open_quantized(config, [], lambda n: None)


def test_detect():
    assert detect({}) is None
    assert detect({"quantization_config": {"quant_method": "compressed-tensors"}}) == "compressed-tensors"
    assert detect({"quantization": {"group_size": 64, "bits": 4}}) == "mlx"
