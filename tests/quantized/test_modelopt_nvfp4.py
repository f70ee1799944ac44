"""NVIDIA ModelOpt checkpoints (NVFP4, W4A16_NVFP4, MIXED_PRECISION with FP8 layers) and NVFP4
mixture-of-experts checkpoints (ModelOpt and compressed-tensors) through `ggquant convert`.

Fixtures: tests/quantized/nvfp4_fixtures.py (ModelOpt's layout from compressed-tensors' own NVFP4
quantization; a 26B-A4B-like Gemma 4 MoE with one NVFP4 Linear per expert).

- the ModelOpt reader's values are ModelOpt's dequantization (NVFP4QTensor.dequantize: e2m1 *
  (fp8 * weight_scale_2), FP8: fp8 * weight_scale) and its GGML blocks hold the same codes as the
  compressed-tensors checkpoint they came from;
- whole conversions equal llama.cpp's convert_hf_to_gguf.py: every tensor (order, names, types,
  bytes) and every metadata key but ggquant's provenance keys, for Gemma 4 (dense, W4A4 and W4A16
  with its prec_a4 tags), Llama 3 (q/k rows permuted for RoPE), MIXED_PRECISION (FP8 layers
  dequantized as the converter does) and the MoE (experts stacked per projection into
  ffn_{gate,up,down}_exps with [E] `.scale` / `.input_scale` vectors, router.per_expert_scale
  folded into down's scales);
- compressed-tensors' per-expert NVFP4 modules give the same tensors (llama.cpp's converter
  cannot read them for Gemma 4: Gemma4Model.filter_tensors appends ".weight" to weight_packed);
- llama.cpp runs the MoE GGUF and ggquant's runtime (per-expert gate / up / down scales) gives
  its logits bit for bit, close to llama.cpp's on the float32 dequantization;
- `--to hf` of the MoE GGUF folds every expert's factor into its rows (router.per_expert_scale
  written as ones), joins gate and up into gate_up_proj, streamed by chunks of experts, and
  transformers meets the float32 dequantized checkpoint; a bad factor vector or a missing up
  stack is refused;
- bad input (partial NVFP4 across a layer's experts, a missing weight_scale or weight_scale_2, an
  unknown quant_algo) is refused naming the tensor or key, nothing written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ggquant.convert import convert
from ggquant.errors import GGQuantError
from ggquant.formats.gguf import GGUFReader
from tests.convert.helpers import assert_same_tensors
from tests.oracles.llama_converter import cached_reference_ggufs
from tests.oracles.llama_logits import llama_cpp_logits
from tests.quantized import gemma4_quantized as G
from tests.quantized import nvfp4_fixtures as F
from tests.quantized.util import assert_runtime_equals_llama_cpp, assert_torch_backend_meets_dequantized, open_dir

pytest.importorskip("compressed_tensors")

PROVENANCE = "ggquant."  # ggquant's own metadata (ggquant.source.*): llama.cpp writes none
FP8_LAYERS = r"layers\.[01]\.(self_attn\.v_proj|mlp\.down_proj)"  # the MIXED_PRECISION fixture's FP8 modules
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)


def _fixture(kind: str, source: str = G.NVFP4_MODEL):
    if kind == "moe":
        return F.build_modelopt_nvfp4_moe()
    return F.build_modelopt_nvfp4(kind, source, fp8=FP8_LAYERS if kind == "MIXED_PRECISION" else "")


def _modelopt_dequantize(d, mod: str) -> np.ndarray:
    """ModelOpt's own dequantization of one module, written out from its NVFP4QTensor.dequantize
    (nvidia-modelopt 0.47.0 torch/quantization/qtensor/nvfp4_tensor.py: per-block scale =
    fp8.float() * weight_scale_2, times the e2m1 values) and dequant of FP8 (fp8.float() * scale)."""
    import torch
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "pt") as f:
        w, s = f.get_tensor(mod + ".weight"), f.get_tensor(mod + ".weight_scale")
        if s.ndim < 2:
            return (w.float() * s.float()).numpy()
        s2 = f.get_tensor(mod + ".weight_scale_2")
    codes = torch.stack([w & 0x0F, w >> 4], dim=-1).reshape(w.shape[0], -1).long()
    per_block = s.float() * s2
    vals = torch.from_numpy(E2M1)[codes].reshape(w.shape[0], -1, 16) * per_block.unsqueeze(-1)
    return vals.reshape(w.shape[0], -1).numpy()


@pytest.mark.parametrize("kind", ["NVFP4", "MIXED_PRECISION"])
def test_modelopt_records_hold_modelopt_values(kind):
    from gguf import GGMLQuantizationType as T

    d = _fixture(kind)
    model = open_dir(d)
    assert model.method == "modelopt" and len(model) == 41
    ct = open_dir(G.build_ct_nvfp4("NVFP4"))
    fp8 = 0
    for rec in model:
        mod = rec.name.removesuffix(".weight")
        want = _modelopt_dequantize(d, mod)
        assert np.array_equal(rec.dequantize().view(np.uint32), want.view(np.uint32)), rec.name
        if rec.format == "modelopt/fp8":
            fp8 += 1
            continue
        qtype, blocks = rec.exact_ggml()
        assert qtype == T.NVFP4
        # the same codes and fp8 scales as the compressed-tensors checkpoint the fixture renamed
        # (test_nvfp4.py: ggml dequantizes those blocks to compressed-tensors' e2m1 * fp8)
        assert np.array_equal(blocks, ct[rec.name].exact_ggml()[1]), rec.name
        comp = dict(rec.companions())
        assert comp[".scale"].tobytes() == rec.scale2.tobytes() == (np.float32(1) / ct[rec.name].global_scale).tobytes()
        assert comp[".input_scale"].tobytes() == (np.float32(1) / ct[rec.name].input_global_scale).tobytes()
    assert fp8 == (4 if kind == "MIXED_PRECISION" else 0)


def _metadata(path):
    with GGUFReader(path) as r:
        return [(k, f.type, f.item_type, str(f.value)) for k, f in r.fields.items() if not k.startswith(PROVENANCE)]


# (fixture, tiny source, outtypes)
CONVERSIONS = [("NVFP4", "gemma4_31b", ("f32", "f16", "bf16", "q8_0")), ("W4A16_NVFP4", "gemma4_31b", ("f16",)),
               ("NVFP4", "llama3", ("f16",)), ("MIXED_PRECISION", "gemma4_31b", ("f16", "q8_0")),
               ("moe", "", ("f32", "f16"))]


@pytest.mark.parametrize("kind, source, types", CONVERSIONS, ids=lambda v: v if isinstance(v, str) else "")
def test_modelopt_conversion_equals_llama_cpp_converter(tmp_path, kind, source, types):
    d = _fixture(kind, source)
    refs = cached_reference_ggufs([(d, t, False) for t in types])
    for t, ref in zip(types, refs):
        if isinstance(ref, Exception):
            raise ref
        ours = convert(d, outtype=t, outfile=tmp_path / f"{t}.gguf").written[0]
        assert_same_tensors(ref, ours)
        assert _metadata(ours) == _metadata(ref), t
        with GGUFReader(ours) as r:
            names = [x.name for x in r.tensors]
            nv = [x.name for x in r.tensors if x.qtype.name == "NVFP4"]
            assert r.get("general.file_type") == (7 if t == "q8_0" else 39)  # MOSTLY_Q8_0 / MOSTLY_NVFP4
            if kind == "moe":
                assert "blk.0.ffn_gate_exps.weight" in nv and "blk.0.ffn_gate_up_exps.weight" not in names
                assert r.tensor("blk.0.ffn_down_exps.scale").shape == (12,)
            if kind == "W4A16_NVFP4":
                assert r.get("general.tensor_extra.name") == sorted(nv)
                assert "blk.0.attn_q.input_scale" not in names
            if kind == "MIXED_PRECISION":
                assert r.tensor("blk.0.attn_v.weight").qtype.name == t.upper()


def test_modelopt_per_expert_scale_is_folded_into_the_down_experts_scales(tmp_path):
    """ffn_down_exps.scale = weight_scale_2 * router.per_expert_scale per expert (float32, as
    Gemma4Model._generate_nvfp4_tensors), gate / up keep their factors, and the router's scale
    is not written on its own."""
    from safetensors.torch import load_file

    d = _fixture("moe")
    sd = load_file(str(d / "model.safetensors"))
    gguf = convert(d, outtype="f32", outfile=tmp_path / "moe.gguf").written[0]
    p = "model.language_model.layers.3."
    r = sd[p + "router.per_expert_scale"].float().numpy()
    assert not np.allclose(r, 1.0)
    with GGUFReader(gguf) as g:
        for proj, gg in (("down_proj", "ffn_down_exps"), ("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps")):
            s2 = np.array([sd[f"{p}experts.{e}.{proj}.weight_scale_2"].item() for e in range(12)], dtype=np.float32)
            want = s2 * r if proj == "down_proj" else s2
            got = np.asarray(g.tensor(f"blk.3.{gg}.scale").raw()).view(np.float32)
            assert got.tobytes() == want.tobytes(), proj


def test_compressed_tensors_nvfp4_experts_give_the_same_tensors(tmp_path):
    """compressed-tensors' per-expert NVFP4 modules: the tensors llama.cpp's converter writes for
    the same codes in ModelOpt's layout (scale2 = float32(1/global scale))."""
    ref = cached_reference_ggufs([(_fixture("moe"), "f16", False)])[0]
    if isinstance(ref, Exception):
        raise ref
    ours = convert(F.build_ct_nvfp4_moe(), outtype="f16", outfile=tmp_path / "ct.gguf").written[0]
    assert_same_tensors(ref, ours)


def test_hf_quant_config_alone_is_read(tmp_path):
    """Older ModelOpt exports write hf_quant_config.json only: the same GGUF."""
    src = _fixture("NVFP4")
    old = tmp_path / src.name
    shutil.copytree(src, old)
    G._update_config(old, quantization_config=None)
    a = convert(src, outtype="f16", outfile=tmp_path / "a.gguf").written[0]
    b = convert(old, outtype="f16", outfile=tmp_path / "b.gguf").written[0]
    assert Path(a).read_bytes() == Path(b).read_bytes()


def test_nvfp4_moe_runs_in_llama_cpp_and_the_runtime_bit_for_bit(tmp_path):
    """The runtime applies ffn_{gate,up,down}_exps.scale per selected expert as build_moe_ffn
    does; llama.cpp's logits stay close to those of the float32 dequantization (router
    per_expert_scale kept apart there), Q8_0 activations apart. Measured: 37 of 40 positions
    within 1.2 % of the largest logit; 3 where a near-tie in the router picks another expert
    differ by up to 1.18 of 13.1; top-1 agrees everywhere. Without the per_expert_scale fold
    (the same weights, router factors 1) only 23 of 40 positions stay within 5 %."""
    d = _fixture("moe")
    nv = convert(d, outtype="f32", outfile=tmp_path / "moe.gguf").written[0]
    logits = assert_runtime_equals_llama_cpp(nv)
    ref = convert(G.dequantized_copy(d), outtype="f32", outfile=tmp_path / "ref.gguf").written[0]
    want = llama_cpp_logits(ref, [2] + list(range(40, 79)))
    close = np.abs(logits - want).max(1) <= 0.05 * np.abs(want).max()
    assert close.mean() >= 0.9
    assert (logits.argmax(1) == want.argmax(1)).mean() >= 0.9


def test_nvfp4_moe_torch_backend_equals_the_float32_dequantization(tmp_path):
    """The torch backend (CPU here; CUDA where present) dequantizes the NVFP4 experts to float32
    and applies their per-expert scales without quantizing activations: it meets the CPU runtime
    on the float32 dequantization (router per_expert_scale apart) within 1e-3 (measured 6.6e-4)."""
    pytest.importorskip("torch")
    assert_torch_backend_meets_dequantized(_fixture("moe"), tmp_path)


# --- back to Hugging Face (`--to hf`) ---------------------------------------------------------


@pytest.fixture(scope="module")
def moe_gguf(tmp_path_factory):
    return Path(convert(_fixture("moe"), outtype="f32",
                        outfile=tmp_path_factory.mktemp("nvhf") / "moe.gguf").written[0])


def test_nvfp4_moe_gguf_goes_back_to_hugging_face_with_the_expert_factors_folded_in(moe_gguf, tmp_path,
                                                                                     monkeypatch):
    """`--to hf` of the NVFP4 MoE GGUF (read in chunks of 3 experts): experts.gate_up_proj of
    expert e is ggml's dequantization of ffn_gate_exps[e] times ffn_gate_exps.scale[e], then that
    of ffn_up_exps[e] times its factor; experts.down_proj[e] is ffn_down_exps[e] times
    ffn_down_exps.scale[e] (weight_scale_2 * per_expert_scale, folded by the converter), and
    router.per_expert_scale is ones: float32 bit for bit. Against ModelOpt's own dequantization
    (re-fused; down times per_expert_scale) one or two float32 roundings apart, and transformers
    gives the logits of that dequantized checkpoint (measured: 4.8e-6 of 13.1 at most)."""
    import torch
    from safetensors.numpy import load_file
    from safetensors.torch import load_file as load_torch
    from transformers import AutoModelForCausalLM

    from ggquant.convert import encode
    from ggquant.convert.gguf_to_hf import export_hf
    from ggquant.quant import types as qt
    from ggquant.tensor import Tensor

    monkeypatch.setattr(encode, "CHUNK_BYTES", 3 * 128 * 64 * 4)  # 3 experts of gate_up_proj [12, 128, 64]
    read, float_rows = [], Tensor.float_rows
    monkeypatch.setattr(Tensor, "float_rows", lambda t, a, b: read.append((t.name, b - a)) or float_rows(t, a, b))
    hf = tmp_path / "hf"
    e = export_hf(moe_gguf, outfile=hf)
    # streamed: gate and up are read 3 experts at a time (the chunk of gate_up_proj), down 6
    assert {rows for n, rows in read if n.endswith(("ffn_gate_exps.weight", "ffn_up_exps.weight"))} == {3}
    assert {rows for n, rows in read if n.endswith("ffn_down_exps.weight")} == {6}
    assert e.arch == "Gemma4ForCausalLM" and e.dtype == "F32"
    plan = {t["name"]: t for t in e.to_json()["tensors"]}
    assert plan["model.layers.3.experts.gate_up_proj"]["source"] == \
        "blk.3.ffn_gate_exps.weight + blk.3.ffn_up_exps.weight"
    got = load_file(str(hf / "model.safetensors"))
    ref = {k.replace("model.language_model.", "model."): v.float().numpy()
           for k, v in load_torch(str(G.dequantized_copy(_fixture("moe")) / "model.safetensors")).items()
           if k.startswith("model.language_model.")}
    assert sorted(got) == sorted(ref)

    with GGUFReader(moe_gguf) as r:
        def folded(name):
            t = r.tensor(name + ".weight")
            w = qt.dequantize(np.asarray(t.raw()), t.qtype, t.shape).astype(np.float32)
            return w * np.asarray(r.tensor(name + ".scale").raw()).view(np.float32).reshape(-1, 1, 1)

        layers = sorted({int(t.name.split(".")[1]) for t in r.tensors if t.name.endswith("ffn_gate_exps.weight")})
        assert len(layers) == 8
        for il in layers:
            p, b = f"model.layers.{il}.", f"blk.{il}."
            gate_up = np.concatenate([folded(b + "ffn_gate_exps"), folded(b + "ffn_up_exps")], axis=1)
            assert np.array_equal(got[p + "experts.gate_up_proj"].view(np.uint32), gate_up.view(np.uint32)), il
            down = folded(b + "ffn_down_exps")
            assert np.array_equal(got[p + "experts.down_proj"].view(np.uint32), down.view(np.uint32)), il
            assert np.array_equal(got[p + "router.per_expert_scale"], np.ones(12, np.float32))
            np.testing.assert_allclose(got[p + "experts.gate_up_proj"], ref[p + "experts.gate_up_proj"],
                                       rtol=2.5e-7, atol=0)
            per_expert = ref[p + "router.per_expert_scale"]
            assert not np.allclose(per_expert, 1.0)
            np.testing.assert_allclose(got[p + "experts.down_proj"],
                                       ref[p + "experts.down_proj"] * per_expert[:, None, None], rtol=5e-7, atol=0)
    ids = torch.tensor([[2] + list(range(40, 79))])
    with torch.no_grad():
        model, info = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, output_loading_info=True)
        assert not {k: v for k, v in info.items() if v}
        a = model.eval()(ids).logits
        want = AutoModelForCausalLM.from_pretrained(G.dequantized_copy(_fixture("moe")),
                                                    dtype=torch.float32).eval()(ids).logits
    torch.testing.assert_close(a, want, rtol=1e-4, atol=1e-4)


def _edited_gguf(src: Path, dst: Path, edit) -> Path:
    """A copy of a GGUF with tensors changed: edit(name, raw) -> raw (None: dropped)."""
    from ggquant.formats.gguf import GGUFWriter, copy_field

    with GGUFReader(src) as r:
        w = GGUFWriter(dst)
        for f in r.fields.values():
            copy_field(w, f)
        for t in r.tensors:
            raw = edit(t.name, np.asarray(t.raw()))
            if raw is not None:
                shape = (raw.size // 4,) if t.qtype.name == "F32" and len(t.shape) == 1 else t.shape
                w.add_tensor(t.name, shape, t.qtype, lambda raw=raw: [raw])
        w.write()
    return dst


@pytest.mark.parametrize("edit, needles", [
    (lambda n, raw: raw[..., :44] if n == "blk.2.ffn_gate_exps.scale" else raw,
     ["'blk.2.ffn_gate_exps.scale' has shape [11]", "12 values expected"]),
    (lambda n, raw: None if n.startswith("blk.1.ffn_up_exps.") else raw,
     ["'blk.1.ffn_up_exps.weight' is missing", "blk.1.ffn_gate_exps.weight", "experts.gate_up_proj"]),
], ids=["factors-of-11-experts", "no-up-experts"])
def test_nvfp4_moe_bad_gguf_is_refused_by_to_hf(moe_gguf, tmp_path, edit, needles):
    """An [E] factor vector of the wrong length, or gate experts without their up half: an error
    naming the file and tensor, nothing written."""
    from ggquant.convert.gguf_to_hf import export_hf

    bad = _edited_gguf(moe_gguf, tmp_path / "bad.gguf", edit)
    with pytest.raises(GGQuantError) as err:
        export_hf(bad, outfile=tmp_path / "hf")
    for n in ["bad.gguf"] + needles:
        assert n in str(err.value), (n, str(err.value))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


# --- bad input ---------------------------------------------------------------------------------


def _edited(tmp_path, src, edit):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / src.name
    shutil.copytree(src, bad)
    sd = load_file(str(bad / "model.safetensors"))
    edit(sd)
    save_file(sd, str(bad / "model.safetensors"))
    return bad


def _refused(tmp_path, d, pattern):
    with pytest.raises(GGQuantError, match=pattern):
        convert(d, outfile=tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_partial_nvfp4_across_a_layers_experts_is_refused(tmp_path):
    """Expert 5's down_proj left in bf16 while the others are NVFP4 (llama.cpp's converter
    asserts "partial NVFP4 quantization across experts")."""
    import torch

    m = "model.language_model.layers.2.experts.5.down_proj"

    def edit(sd):
        for s in (".weight", ".weight_scale", ".weight_scale_2", ".input_scale"):
            del sd[m + s]
        sd[m + ".weight"] = torch.zeros(64, 64, dtype=torch.bfloat16)

    _refused(tmp_path, _edited(tmp_path, _fixture("moe"), edit),
             m.replace(".", r"\.") + r"\.weight' is not quantized like the other experts")


@pytest.mark.parametrize("suffix", [".weight_scale", ".weight_scale_2"])
def test_modelopt_missing_scale_names_it(tmp_path, suffix):
    gone = "model.language_model.layers.1.self_attn.q_proj" + suffix
    _refused(tmp_path, _edited(tmp_path, _fixture("NVFP4"), lambda sd: sd.pop(gone)), gone.replace(".", r"\."))


def test_modelopt_unknown_quant_algo_names_the_key(tmp_path):
    src = _fixture("NVFP4")
    bad = tmp_path / src.name
    shutil.copytree(src, bad)
    G._update_config(bad, quantization_config=None)
    hq = json.loads((bad / "hf_quant_config.json").read_text())
    hq["quantization"]["quant_algo"] = "W4A8_AWQ"
    (bad / "hf_quant_config.json").write_text(json.dumps(hq))
    _refused(tmp_path, bad, r"hf_quant_config\.json.*quant_algo 'W4A8_AWQ' is not supported")


@pytest.mark.parametrize("change, pattern", [
    (lambda hq, qc: hq.pop("producer"), r"hf_quant_config\.json: producer\.name is missing"),
    (lambda hq, qc: hq["quantization"]["quantized_layers"].update(
        {"model.language_model.layers.0.self_attn.q_proj": {"quant_algo": "INT4_AWQ"}}),
     r"quantized_layers\['model\.language_model\.layers\.0\.self_attn\.q_proj'\]\.quant_algo is 'INT4_AWQ'"),
    (lambda hq, qc: hq["quantization"]["quantized_layers"].update({"model.language_model.layers.9.mlp": {
        "quant_algo": "FP8"}}), r"quantized_layers entry 'model\.language_model\.layers\.9\.mlp' is not a module"),
    (lambda hq, qc: hq["quantization"]["quantized_layers"].update(
        {"model.language_model.layers.0.self_attn.v_proj": {"quant_algo": "NVFP4"}}),
     r"'model\.language_model\.layers\.0\.self_attn\.v_proj' is stored as FP8 .* says NVFP4"),
], ids=["no-producer", "unknown-layer-algo", "unknown-layer", "layer-algo-mismatch"])
def test_modelopt_bad_quantization_config_names_the_key(tmp_path, change, pattern):
    """hf_quant_config.json alone (config.json without quantization_config, older exports)."""
    src = _fixture("MIXED_PRECISION")
    bad = tmp_path / src.name
    shutil.copytree(src, bad)
    G._update_config(bad, quantization_config=None)
    hq = json.loads((bad / "hf_quant_config.json").read_text())
    change(hq, None)
    (bad / "hf_quant_config.json").write_text(json.dumps(hq))
    with pytest.raises(GGQuantError, match=pattern):
        open_dir(bad)
