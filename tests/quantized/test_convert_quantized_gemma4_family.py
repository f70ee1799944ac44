"""Quantized checkpoints of the larger Gemma 4 models through `ggquant convert`:

- 26B-A4B-like mixture of experts with one Linear per expert and projection (llmcompressor's
  layout), quantized by compressed-tensors itself: int8 per channel weight-only (Google's 26B-A4B
  QAT scheme) -> Q8_0 and int4 group 32 (W4A16) -> Q4_0, every text matrix exact; the per-expert
  modules are stacked into llama.cpp's ffn_gate_up_exps / ffn_down_exps (gate rows, then up rows);
  the F32 conversion equals the conversion of the exact float32 dequantization; llama.cpp runs the
  exact Q4_0 file and ggquant's runtime gives its logits bit for bit;
- the same with GPTQ (one Linear per expert): sym -> exact Q4_0, act-order -> lossy Q8_0 one expert
  at a time (SQNR reported) where --outtype q8_0 asks for it;
- a 31B-like QAT W4A16 checkpoint (int4 sym group 32) -> Q4_0, exact;
- a per-expert checkpoint missing an expert, or declaring none, is refused naming the tensor;
- mlx-lm's stacked SwitchGLU experts (4-bit affine) -> exact Q4_1, run by llama.cpp and the runtime
  bit for bit; a missing switch_glu projection is refused naming it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ggquant.convert import convert
from ggquant.errors import GGQuantError
from ggquant.fixtures import cached_build, tiny_model
from ggquant.formats.gguf import GGUFReader
from ggquant.quant import types as qt
from tests.quantized import gemma4_quantized as G
from tests.quantized.util import assert_runtime_equals_llama_cpp

pytest.importorskip("compressed_tensors")

MOE_CASES = {"int8-channel": (8, -1, "Q8_0"), "int4-group32": (4, 32, "Q4_0")}


def _values(t) -> np.ndarray:
    raw = np.asarray(t.raw())
    if t.qtype.name == "F32":
        return raw.view(np.float32).reshape(-1)
    return qt.dequantize(raw, t.qtype, t.shape).astype(np.float32).reshape(-1)


def _assert_equals_reference(tmp_path, q, ref_dir, conv):
    """q's F32 conversion equals the F32 conversion of its float32 dequantization (ref_dir) byte for
    byte, and every tensor of `conv` (q at its exact types) dequantizes to the same floats."""
    ref = convert(ref_dir, outtype="f32", outfile=tmp_path / "ref.gguf")
    f32 = convert(q, outtype="f32", outfile=tmp_path / "f32.gguf")
    with GGUFReader(ref.written[0]) as r, GGUFReader(f32.written[0]) as a, GGUFReader(conv.written[0]) as b:
        assert [(t.name, t.shape) for t in a.tensors] == [(t.name, t.shape) for t in r.tensors]
        for t in r.tensors:
            assert np.array_equal(a.tensor(t.name).raw(), t.raw()), t.name
            assert np.array_equal(_values(b.tensor(t.name)).view(np.uint32), _values(t).view(np.uint32)), t.name


@pytest.mark.parametrize("case", list(MOE_CASES))
def test_moe_per_expert_checkpoint_converts_exactly(tmp_path, case):
    bits, group, want = MOE_CASES[case]
    q = G.build_ct_moe(bits, group)
    conv = convert(q, outfile=tmp_path / "auto.gguf")  # --outtype auto: the exact block type
    text = conv.files[0]
    quant = [t for t in text.tensors if t.source_quant]
    assert {t.qtype.name for t in quant} == {want} and all(t.exact for t in quant)
    stacked = [t.name for t in quant if t.name.endswith("_exps.weight")]
    assert len(stacked) == 2 * 8  # ffn_gate_up_exps and ffn_down_exps of every layer
    _assert_equals_reference(tmp_path, q, G.dequantized_copy(q), conv)
    with GGUFReader(conv.written[0]) as b:
        assert set(stacked) <= set(b.get("ggquant.source.exact_tensors"))


def test_moe_gptq_per_expert_checkpoint(tmp_path):
    """GPTQ (hand-packed v1 layout) with one Linear per expert: sym int4 group 32 -> exact Q4_0;
    act-order (random g_idx, its own per expert) to q8_0 -> the stacked gate_up experts requantized
    from their exact dequantization one expert at a time, SQNR reported; their F32 equals the
    dequantized reference."""
    exact = convert(G.build_gptq(source=G.MOE_MODEL), outfile=tmp_path / "exact.gguf").files[0]
    stacked = [t for t in exact.tensors if t.name.endswith("_exps.weight")]
    assert stacked and all(t.exact and t.qtype.name == "Q4_0" for t in stacked)
    q = G.build_gptq(source=G.MOE_MODEL, act_order=True)
    lossy = convert(q, outtype="q8_0", outfile=tmp_path / "lossy.gguf").files[0]
    gate_up = [t for t in lossy.tensors if t.name.endswith("ffn_gate_up_exps.weight")]
    assert gate_up and all(not t.exact and t.qtype.name == "Q8_0" and t.sqnr > 30 for t in gate_up)
    # down_proj's 32 input columns are one group whatever g_idx says: still exact
    assert all(t.exact for t in lossy.tensors if t.name.endswith("ffn_down_exps.weight"))
    f32 = convert(q, outtype="f32", outfile=tmp_path / "f32.gguf")
    ref = convert(G.dequantized_copy(q), outtype="f32", outfile=tmp_path / "ref.gguf")
    with GGUFReader(ref.written[0]) as r, GGUFReader(f32.written[0]) as a:
        # (the dense MLP's intermediate dimension is permuted by the act-order trick; the
        # stacked experts are not)
        for t in r.tensors:
            if "_exps." in t.name:
                assert np.array_equal(a.tensor(t.name).raw(), t.raw()), t.name


def test_exact_q4_0_moe_runs_in_llama_cpp_and_the_runtime_bit_for_bit(tmp_path):
    out = tmp_path / "q4.gguf"
    convert(G.build_ct_moe(4, 32), outfile=out)
    assert_runtime_equals_llama_cpp(out)


def test_31b_qat_w4a16_converts_to_exact_q4_0(tmp_path):
    q = G.build_ct(source="gemma4_31b")
    conv = convert(q, outfile=tmp_path / "auto.gguf")
    quant = [t for t in conv.files[0].tensors if t.source_quant]
    assert quant and {t.qtype.name for t in quant} == {"Q4_0"} and all(t.exact for t in quant)
    assert conv.files[0].outtype == "Q4_0"


@pytest.fixture
def moe_ct(tmp_path):
    dst = tmp_path / "src" / "gemma4_ct_moe"
    shutil.copytree(G.build_ct_moe(8, -1), dst)
    return dst


def _drop(src, prefix):
    from safetensors.torch import load_file, save_file

    p = src / "model.safetensors"
    sd = load_file(str(p))
    save_file({k: v for k, v in sd.items() if not k.startswith(prefix)}, str(p))


def test_moe_checkpoint_missing_an_expert_names_it(moe_ct, tmp_path):
    _drop(moe_ct, "model.language_model.layers.3.experts.7.up_proj.")
    with pytest.raises(GGQuantError, match=r"layers\.3\.experts\.7\.up_proj\.weight' is missing"):
        convert(moe_ct, outfile=tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_per_expert_weights_without_experts_in_the_config_are_refused(moe_ct, tmp_path):
    cfg = json.loads((moe_ct / "config.json").read_text())
    cfg["text_config"]["enable_moe_block"] = False
    (moe_ct / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GGQuantError, match="declares no experts"):
        convert(moe_ct, outfile=tmp_path / "x.gguf")


# --- MLX: mlx-lm's stacked SwitchGLU experts ------------------------------------------------------

_DIGEST = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
# mlx-lm's Gemma 4 quant_predicate: the router's projection at 8 bits, group 64
MLX_ROUTER = {"group_size": 64, "bits": 8}


def _switch_glu(layer: str, proj: str) -> str:
    return f"{layer}experts.switch_glu.{proj}.weight"


MLX_DROPPED = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")


def _build_mlx_moe(out: Path, bits: int, group_size: int, digest: str) -> Path:
    """The 26B-A4B-like model as mlx-lm saves it (models/gemma4.py sanitize: the towers dropped,
    model.language_model.* renamed language_model.model.*; models/gemma4_text.py sanitize: the
    fused gate_up_proj split into stacked switch_glu.gate_proj / up_proj [E, F, H], down_proj as
    switch_glu.down_proj), every text Linear, the experts (QuantizedSwitchLinear) and the router
    quantized by mlx itself."""
    import mlx.core as mx

    src = tiny_model(G.MOE_MODEL)
    t = {k.replace("model.language_model.", "language_model.model."): v
         for k, v in mx.load(str(src / "model.safetensors")).items() if not k.startswith(MLX_DROPPED)}
    for k in [k for k in t if G._FUSED_EXPERTS.match(k)]:
        m = G._FUSED_EXPERTS.match(k)
        v = t.pop(k)
        if m["proj"] == "gate_up_proj":
            f = v.shape[1] // 2
            t[_switch_glu(m["layer"], "gate_proj")], t[_switch_glu(m["layer"], "up_proj")] = v[:, :f], v[:, f:]
        else:
            t[_switch_glu(m["layer"], "down_proj")] = v
    quant: dict = {"group_size": group_size, "bits": bits, "mode": "affine"}
    for key in sorted(t):
        router = key.endswith("router.proj.weight")
        if not (G._TEXT_LINEAR.match(key.replace("language_model.model.", "model.language_model.")) or
                ".switch_glu." in key or router):
            continue
        mod = key[: -len(".weight")]
        o = MLX_ROUTER if router else {"group_size": group_size, "bits": bits}
        t[key], t[f"{mod}.scales"], t[f"{mod}.biases"] = mx.quantize(t[key], mode="affine", **o)
        if router:
            quant[mod] = dict(o)
    mx.eval(t)
    G._copy_side_files(src, out)
    mx.save_safetensors(str(out / "model.safetensors"), t, metadata={"format": "mlx"})
    G._update_config(out, quantization=quant, quantization_config=quant)
    return out


def _mlx_reference(out: Path, qdir: str, digest: str) -> Path:
    """mlx's own float32 dequantization of every quantized module, the experts fused back into
    Hugging Face's gate_up_proj / down_proj, no quantization config."""
    import torch
    from safetensors.torch import load_file

    from ggquant.fixtures.quantized import mlx_dequantize

    q = Path(qdir)
    deq = mlx_dequantize(q)
    sd = {k: v for k, v in load_file(str(q / "model.safetensors")).items()
          if not k.endswith((".scales", ".biases")) and k not in deq}
    sd.update({k: torch.from_numpy(v) for k, v in deq.items()})
    for k in [k for k in sd if k.endswith("switch_glu.gate_proj.weight")]:
        layer = k[: -len("experts.switch_glu.gate_proj.weight")]
        sd[layer + "experts.gate_up_proj"] = torch.cat([sd.pop(k), sd.pop(_switch_glu(layer, "up_proj"))], dim=1)
        sd[layer + "experts.down_proj"] = sd.pop(_switch_glu(layer, "down_proj"))
    G._copy_side_files(q, out)
    G._save(out, sd)
    G._update_config(out, quantization=None, quantization_config=None)
    return out


def build_mlx_moe(bits: int = 4, group_size: int = 32) -> Path:
    return cached_build("gemma4_mlx_moe", _build_mlx_moe, bits=bits, group_size=group_size, digest=_DIGEST)


def test_mlx_switch_glu_experts_convert_exactly(tmp_path):
    """mlx-lm's stacked experts: gate_proj + up_proj concatenated per expert into ffn_gate_up_exps,
    down_proj into ffn_down_exps, 4-bit group 32 -> exact Q4_1 (d = scale, m = bias); the 8-bit
    router -> F32 exactly; the F32 conversion equals the conversion of mlx's own float32
    dequantization; llama.cpp runs the Q4_1 experts and the runtime gives its logits bit for bit."""
    pytest.importorskip("mlx.core")
    q = build_mlx_moe()
    conv = convert(q, outfile=tmp_path / "auto.gguf")
    quant = {t.name: t for t in conv.files[0].tensors if t.source_quant}
    stacked = [n for n in quant if n.endswith("_exps.weight")]
    assert len(stacked) == 2 * 8 and all(quant[n].exact and quant[n].qtype.name == "Q4_1" for n in stacked)
    assert all(t.exact and t.qtype.name == "F32" for n, t in quant.items() if n.endswith("ffn_gate_inp.weight"))
    ref = cached_build("gemma4_mlx_moe_f32", _mlx_reference, qdir=str(q), digest=_DIGEST)
    _assert_equals_reference(tmp_path, q, ref, conv)
    assert_runtime_equals_llama_cpp(conv.written[0])


def test_mlx_switch_glu_without_up_proj_names_it(tmp_path):
    pytest.importorskip("mlx.core")
    import mlx.core as mx

    dst = tmp_path / "src" / "gemma4_mlx_moe"
    shutil.copytree(build_mlx_moe(), dst)
    t = mx.load(str(dst / "model.safetensors"))
    mod = "language_model.model.layers.2.experts.switch_glu.up_proj"
    mx.save_safetensors(str(dst / "model.safetensors"), {k: v for k, v in t.items() if not k.startswith(mod + ".")},
                        metadata={"format": "mlx"})
    with pytest.raises(GGQuantError, match=r"layers\.2\.experts\.switch_glu\.up_proj\.weight' is missing"):
        convert(dst, outfile=tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
