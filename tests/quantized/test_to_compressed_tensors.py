"""`ggquant convert MODEL.gguf --to compressed-tensors`: Q4_0 -> W4A16 and Q8_0 -> W8A16 exactly.

A tiny Gemma 4 is converted to GGUF and quantized (--pure) to Q4_0 and Q8_0; the export is
decompressed by compressed-tensors 0.20 itself (its pack-quantized compressor, per module) and
must equal ggml's dequantization of the GGUF blocks bit for bit in float32; the config must
equal, key by key, what the library's ModelCompressor.update_config writes.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as T

from ggquant.cli import main
from ggquant.convert import convert
from ggquant.formats.gguf import GGUFReader
from ggquant.quant import types as qtypes
from ggquant.convert.gguf_to_gguf import quantize_gguf

ct = pytest.importorskip("compressed_tensors")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def exported(tiny_gemma4_e4b, tmp_path_factory):
    root = tmp_path_factory.mktemp("to_ct")
    f32 = convert(tiny_gemma4_e4b, outtype="f32", outfile=root / "m.gguf").written[0]
    out = {}
    for qt in ("Q4_0", "Q8_0", "Q5_0", "MXFP4_MOE"):
        g = root / f"m-{qt}.gguf"
        quantize_gguf(f32, g, qt, pure=True)
        d = root / f"ct-{qt}"
        res = CliRunner().invoke(main, ["convert", str(g), "--to", "compressed-tensors", "--outfile", str(d)])
        assert res.exit_code == 0, res.output
        try:
            err = res.stderr
        except ValueError:  # older click: stderr mixed into output
            err = ""
        out[qt] = (g, d, res.output + err)
    return out


def _library_decompress(d, float32_scales: bool = False):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    g = qc["config_groups"]["group_0"]
    scheme = QuantizationScheme.model_validate({k: g[k] for k in ("targets", "weights", "format")})
    comp = BaseCompressor.get_value_from_registry(qc["format"])
    tensors = load_file(str(d / "model.safetensors"))
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_packed")})
    out = {}
    for m in modules:
        sd = {k[len(m) + 1:]: v for k, v in tensors.items() if k.startswith(m + ".")}
        if float32_scales:
            sd["weight_scale"] = sd["weight_scale"].float()
        out[m + ".weight"] = comp.decompress(sd, scheme)["weight"]
    return out, tensors


def _ggml(gguf):
    r = GGUFReader(gguf)
    try:
        return {t.name: qtypes.get(t.qtype).dequantize(t.raw(), t.shape) for t in r.tensors}, \
               {t.name: t.qtype.name for t in r.tensors}
    finally:
        r.close()


@pytest.mark.parametrize("qt,bits", [("Q4_0", 4), ("Q8_0", 8)])
def test_exact_equals_ggml(exported, qt, bits):
    from ggquant.convert import gguf_to_hf as ex

    g, d, _ = exported[qt]
    plan, sources = ex.plan_export(g, outfile=d)
    for s in sources:
        s.close()
    want, types = _ggml(g)
    got, tensors = _library_decompress(d)
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["num_bits"] == bits
    by_hf = {t.name: t for t in plan.tensors}
    assert len(got) >= 7 * 2  # every attention/MLP projection of the tiny model, at least
    for name, w in got.items():
        t = by_hf[name]
        assert types[t.gguf_name] == qt
        assert w.dtype == torch.float32  # scales stored in float32: the product is exact
        ref = want[t.gguf_name].reshape(t.shape)
        assert np.array_equal(w.numpy().view(np.uint32), ref.view(np.uint32)), name
        m = name[:-len(".weight")]
        assert tensors[m + ".weight_packed"].dtype == torch.int32
        assert tensors[m + ".weight_packed"].shape == (t.shape[0], t.shape[1] * bits // 32)
        assert tensors[m + ".weight_shape"].dtype == torch.int64
        assert tensors[m + ".weight_shape"].tolist() == list(t.shape)
        # in bf16, as a model would run it: the same single rounding
        lib16 = w.to(torch.bfloat16)
        comp16 = torch.from_numpy(ref).to(torch.bfloat16)
        assert torch.equal(lib16.view(torch.int16), comp16.view(torch.int16))
    # every float tensor of the plain export is still there, unchanged in name
    for t in plan.tensors:
        if t.name not in got:
            assert t.name in tensors
    # every tensor starts at a multiple of its element size
    raw = (d / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    size = {"I64": 8, "I32": 4, "F32": 4, "F16": 2, "BF16": 2}
    for k, v in json.loads(raw[8:8 + n]).items():
        if k != "__metadata__":
            assert (8 + n + v["data_offsets"][0]) % size[v["dtype"]] == 0, k
    ignore = set(qc["ignore"])
    assert "lm_head" in ignore and not ignore & {n[:-len(".weight")] for n in got}


@pytest.mark.parametrize("qt", ["Q5_0", "MXFP4_MOE"])  # MXFP4_MOE --pure: every matrix MXFP4 (issue 14)
def test_lossy_requantizes_other_types(exported, qt):
    g, d, output = exported[qt]
    assert "lossy" in output
    got, _ = _library_decompress(d)
    want, types = _ggml(g)
    assert qt[:5] in set(types.values())
    from ggquant.convert import gguf_to_hf as ex

    plan, sources = ex.plan_export(g, outfile=d)
    for s in sources:
        s.close()
    by_hf = {t.name: t for t in plan.tensors}
    for name, w in got.items():
        ref = want[by_hf[name].gguf_name].reshape(w.shape)
        q4 = qtypes.get(T.Q4_0)
        expect = q4.dequantize(q4.quantize(ref), ref.shape)  # ggml Q4_0 of ggml's dequantization
        assert np.array_equal(w.numpy().view(np.uint32), expect.view(np.uint32)), name


def test_exact_refuses_lossy(exported, tmp_path):
    g = exported["Q5_0"][0]
    res = CliRunner().invoke(main, ["convert", str(g), "--to", "compressed-tensors", "--exact",
                                    "--outfile", str(tmp_path / "x")])
    assert res.exit_code != 0 and "Q5_0" in str(res.exception) + res.output and not (tmp_path / "x").exists()
    g = exported["Q4_0"][0]
    res = CliRunner().invoke(main, ["convert", str(g), "--to", "compressed-tensors", "--exact",
                                    "--outfile", str(tmp_path / "y")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "y" / "model.safetensors").exists()


def test_config_matches_library(exported):
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    for qt, bits in (("Q4_0", 4), ("Q8_0", 8)):
        d = exported[qt][1]
        ours = json.loads((d / "config.json").read_text())
        qc = QuantizationConfig(
            config_groups={"group_0": QuantizationScheme(
                targets=["Linear"], format="pack-quantized",
                weights=QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=32))},
            format="pack-quantized", ignore=ours["quantization_config"]["ignore"], quantization_status="compressed")
        lib_dir = d.parent / f"lib-{qt}"
        lib_dir.mkdir()
        (lib_dir / "config.json").write_text(json.dumps({k: v for k, v in ours.items() if k != "quantization_config"}))
        ModelCompressor(quantization_config=qc).update_config(str(lib_dir))
        lib = json.loads((lib_dir / "config.json").read_text())
        assert lib == ours
        # the library parses it back to the same config
        assert QuantizationConfig.model_validate(ours["quantization_config"]) == qc


def test_transformers_loads_and_decompresses(exported):
    """transformers' compressed-tensors quantizer loads the folder (dequantize=True) and its
    weights equal ggml's dequantization bit for bit, quantized and float tensors alike."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from ggquant.convert import gguf_to_hf as ex

    g, d, _ = exported["Q4_0"]
    plan, sources = ex.plan_export(g, outfile=d)
    for s in sources:
        s.close()
    want, types = _ggml(g)
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    sd = model.state_dict()
    n_q = 0
    for t in plan.tensors:
        if not t.inverse.identity:
            continue
        ref = want[t.gguf_name].reshape(t.shape)
        got = sd[t.name].detach().numpy()
        assert np.array_equal(got.view(np.uint32), ref.view(np.uint32)), t.name
        n_q += types[t.gguf_name] == "Q4_0"
    assert n_q >= 14
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_bf16_export_keeps_exact_fp16_scales(exported, tmp_path):
    """--dtype bf16: the float tensors are bf16, the scales fp16 (the d of each block, stored
    exactly); decompressed with float32 scales the weights are still ggml's bit for bit."""
    from ggquant.convert.gguf_to_hf import export_hf
    from ggquant.convert.to_compressed_tensors import CompressedTensorsLinears

    g = exported["Q4_0"][0]
    lin = CompressedTensorsLinears()
    e = export_hf(g, outfile=tmp_path / "ct", dtype="bf16", linears=lin)
    assert e.dtype == "BF16" and lin.scale_dtype == "F16" and not lin.lossy
    got, tensors = _library_decompress(tmp_path / "ct", float32_scales=True)
    want, _ = _ggml(g)
    by_hf = {t.name: t for t in e.tensors}
    assert got
    for name, w in got.items():
        assert tensors[name[:-len(".weight")] + ".weight_scale"].dtype == torch.float16
        ref = want[by_hf[name].gguf_name].reshape(w.shape)
        assert np.array_equal(w.numpy().view(np.uint32), ref.view(np.uint32)), name


def test_group_128_is_compressed_tensors_own_int4(exported, tmp_path):
    """--group-size 128: int4 sym g128 computed by compressed-tensors' rule from ggml's
    dequantization; the codes equal the library's own quantize() with the same scales, and
    its decompression equals code * scale."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    from ggquant.convert import gguf_to_hf as ex

    g = exported["Q4_0"][0]
    d = tmp_path / "ct"
    res = CliRunner().invoke(main, ["convert", str(g), "--to", "compressed-tensors", "--group-size", "128",
                                    "--outfile", str(d)])
    assert res.exit_code == 0, res.output
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 128
    got, tensors = _library_decompress(d)
    want, _ = _ggml(g)
    plan, sources = ex.plan_export(g, outfile=d)
    for s in sources:
        s.close()
    by_hf = {t.name: t for t in plan.tensors}
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128)
    assert got
    for name, w in got.items():
        x = torch.from_numpy(want[by_hf[name].gguf_name].reshape(w.shape).copy())
        xg = x.reshape(x.shape[0], -1, 128)
        scale, zp = calculate_qparams(xg.amin(dim=2), xg.amax(dim=2), args)
        m = name[:-len(".weight")]
        assert torch.equal(tensors[m + ".weight_scale"].view(torch.int32), scale.view(torch.int32)), name
        q = quantize(x, scale, zp, args, dtype=torch.int8)
        expect = q.float() * scale.repeat_interleave(128, dim=1)
        assert torch.equal(w.view(torch.int32), expect.view(torch.int32)), name


@pytest.mark.parametrize("kind", ["normal", "heavy", "zeros", "outlier", "tiny", "huge"])
def test_int4_g128_rule_equals_library(kind):
    """quantize_int4_sym against compressed-tensors' calculate_qparams + quantize on hard inputs."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    from ggquant.convert.to_compressed_tensors import quantize_int4_sym

    rng = np.random.default_rng(7)
    x = rng.standard_normal((16, 512)).astype(np.float32)
    if kind == "heavy":
        x = (rng.standard_t(2, (16, 512)) * 10).astype(np.float32)
    elif kind == "zeros":
        x[::2] = 0
    elif kind == "outlier":
        x[:, 5] = 1e4
    elif kind == "tiny":
        x *= np.float32(1e-30)
    elif kind == "huge":
        x *= np.float32(6e4)
    words, scale = quantize_int4_sym(x, 128)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128)
    xt = torch.from_numpy(x)
    xg = xt.reshape(16, -1, 128)
    s, zp = calculate_qparams(xg.amin(dim=2), xg.amax(dim=2), args)
    assert np.array_equal(scale.view(np.uint32), s.numpy().view(np.uint32))
    q = quantize(xt, s, zp, args, dtype=torch.int8).numpy().astype(np.int64)
    codes = (words.view(np.uint32)[:, :, None] >> (np.arange(8, dtype=np.uint32) * 4)) & 0xF
    assert np.array_equal(codes.reshape(16, 512).astype(np.int64) - 8, q)


# --- mixed precision: Q4_0 and Q8_0 Linears -> two exact config groups ------------------------------

MIX_RULES = ("ffn_(gate|up)=q8_0", "attn_v=q8_0")


@pytest.fixture(scope="module")
def mixed(exported):
    """A GGUF quantized to Q4_0 with `--tensor-type` overrides to Q8_0 (gate, up and v projections),
    exported with --exact (both groups are exact)."""
    g4 = exported["Q4_0"][0]
    g = g4.parent / "m-mix.gguf"
    quantize_gguf(g4.parent / "m.gguf", g, "Q4_0", pure=True, tensor_types=MIX_RULES)
    d = g4.parent / "ct-mix"
    res = CliRunner().invoke(main, ["convert", str(g), "--to", "compressed-tensors", "--exact", "--outfile", str(d)])
    assert res.exit_code == 0, res.output
    return g, d


def test_mixed_q4_0_q8_0_two_exact_groups(mixed):
    """group_0 int4 / group_1 int8 with the exact module names as targets: compressed-tensors'
    own apply_quantization_config assigns every Linear the scheme of its GGUF type, its compressor
    decompresses each module with that scheme to ggml's dequantization bit for bit, and the config
    is the one ModelCompressor.update_config writes for those two schemes."""
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from ggquant.convert import gguf_to_hf as ex

    g, d = mixed
    plan, sources = ex.plan_export(g, outfile=d)
    for s in sources:
        s.close()
    want, types = _ggml(g)
    by_hf = {t.name: t for t in plan.tensors}
    bits_of = {t.name[:-len(".weight")]: {"Q4_0": 4, "Q8_0": 8}[types[t.gguf_name]] for t in plan.tensors
               if types[t.gguf_name] in ("Q4_0", "Q8_0") and len(t.shape) == 2 and "embed" not in t.name}
    # vLLM fuses q/k/v and gate/up and needs one scheme per fused module: with v in Q8_0, q and k
    # (Q4_0) are written as int8 with the same codes and scales
    fused = {}
    for m in bits_of:
        parent, leaf = m.rsplit(".", 1)
        if leaf in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            fused.setdefault((parent, leaf in ("gate_proj", "up_proj")), []).append(m)
    widened = [m for ms in fused.values() if len({bits_of[x] for x in ms}) > 1 for m in ms if bits_of[m] == 4]
    assert widened and all(m.endswith(("q_proj", "k_proj")) for m in widened)
    bits_of.update({m: 8 for m in widened})
    assert all(len({bits_of[x] for x in ms}) == 1 for ms in fused.values())
    assert sorted(set(bits_of.values())) == [4, 8]
    cfg = json.loads((d / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["format"] == "pack-quantized" and sorted(qc["config_groups"]) == ["group_0", "group_1"]
    for name, bits in (("group_0", 4), ("group_1", 8)):
        grp = qc["config_groups"][name]
        assert grp["weights"]["num_bits"] == bits and grp["weights"]["group_size"] == 32
        assert grp["targets"] == sorted(m for m, b in bits_of.items() if b == bits)
    assert any(m.endswith("mlp.down_proj") for m in qc["config_groups"]["group_0"]["targets"])
    assert any(m.endswith("self_attn.v_proj") for m in qc["config_groups"]["group_1"]["targets"])

    # the library's matching of those targets, on the model itself
    lib_qc = QuantizationConfig.model_validate(qc)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(d)))
    apply_quantization_config(model, lib_qc)
    schemes = {n: m.quantization_scheme for n, m in model.named_modules()
               if getattr(m, "quantization_scheme", None) is not None}
    assert {n: s.weights.num_bits for n, s in schemes.items()} == bits_of

    # its compressor, module by module, with the scheme the library assigned
    comp = BaseCompressor.get_value_from_registry(qc["format"])
    tensors = load_file(str(d / "model.safetensors"))
    for m, scheme in schemes.items():
        sd = {k[len(m) + 1:]: v for k, v in tensors.items() if k.startswith(m + ".")}
        w = comp.decompress(sd, scheme)["weight"]
        t = by_hf[m + ".weight"]
        assert tensors[m + ".weight_packed"].shape == (t.shape[0], t.shape[1] * bits_of[m] // 32)
        ref = want[t.gguf_name].reshape(t.shape)
        assert np.array_equal(w.numpy().view(np.uint32), ref.view(np.uint32)), m

    # the config ModelCompressor writes for the same two schemes
    def scheme(bits, targets):
        return QuantizationScheme(targets=targets, format="pack-quantized", weights=QuantizationArgs(
            num_bits=bits, type="int", symmetric=True, strategy="group", group_size=32))

    lib = QuantizationConfig(config_groups={
        "group_0": scheme(4, qc["config_groups"]["group_0"]["targets"]),
        "group_1": scheme(8, qc["config_groups"]["group_1"]["targets"])},
        format="pack-quantized", ignore=qc["ignore"], quantization_status="compressed")
    lib_dir = d.parent / "lib-mix"
    lib_dir.mkdir()
    (lib_dir / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "quantization_config"}))
    ModelCompressor(quantization_config=lib).update_config(str(lib_dir))
    assert json.loads((lib_dir / "config.json").read_text()) == cfg
    assert lib_qc == lib


def test_mixed_loads_in_transformers(mixed):
    """transformers' compressed-tensors loader (its default path: apply_quantization_config, the
    modules decompressed by compressed-tensors on the first forward) gives every Linear, int4 and
    int8 groups alike, and every float tensor, ggml's dequantization of the source GGUF bit for bit.

    (transformers 5.23's `dequantize=True` path is not used: its dense-module converter decompresses
    every dense module with the first config group's scheme (integrations/compressed_tensors.py
    get_dense_scheme), so it misreads the int8 group of any multi-group checkpoint.)"""
    from transformers import AutoModelForCausalLM

    from ggquant.convert import gguf_to_hf as ex

    g, d = mixed
    plan, sources = ex.plan_export(g, outfile=d)
    for s in sources:
        s.close()
    want, types = _ggml(g)
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()  # decompresses the modules
    sd = model.state_dict()
    seen = {"Q4_0": 0, "Q8_0": 0}
    for t in plan.tensors:
        if not t.inverse.identity:
            continue
        ref = want[t.gguf_name].reshape(t.shape)
        assert np.array_equal(sd[t.name].detach().numpy().view(np.uint32), ref.view(np.uint32)), t.name
        if types[t.gguf_name] in seen:
            seen[types[t.gguf_name]] += 1
    assert seen["Q4_0"] >= 12 and seen["Q8_0"] >= 12, seen


def test_q8_0_with_other_types_keeps_q8_0_exact(exported, tmp_path):
    """Q8_0 next to a type int4/int8 cannot hold (Q5_0): the Q8_0 Linears stay exact int8 (group_1),
    only the Q5_0 ones are requantized to int4 (group_0)."""
    from ggquant.convert.gguf_to_hf import export_hf
    from ggquant.convert.to_compressed_tensors import CompressedTensorsLinears

    g5 = exported["Q5_0"][0]
    g = tmp_path / "m-q5-q8.gguf"
    quantize_gguf(g5.parent / "m.gguf", g, "Q5_0", pure=True, tensor_types=("ffn_down=q8_0",))
    lin = CompressedTensorsLinears()
    export_hf(g, outfile=tmp_path / "ct", linears=lin, dry_run=True)
    assert lin.bits is None and lin.lossy and all(m.endswith("down_proj") == (b == 8) for m, b in lin.bits_of.items())
    assert not [m for m in lin.lossy if m.endswith("down_proj")]
    groups = lin.quantization_config()["config_groups"]
    assert groups["group_1"]["targets"] == sorted(m for m in lin.bits_of if m.endswith("down_proj"))
