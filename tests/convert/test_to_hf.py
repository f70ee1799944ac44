"""`ggquant convert MODEL.gguf --to hf` on the tiny fixtures: HF -> GGUF f32 -> HF round trips.

For each fixture (E4B-like with vision + audio, E2B-like sharded f32 with the double-wide MLP,
a text-only Gemma4ForCausalLM, 26B-A4B-like mixture of experts, 31B-like dense with K = V on full
layers, a Gemma 4 Unified with its gemma4uv / gemma4ua embedders (Gemma4UnifiedForConditionalGeneration),
Gemma 3 text, Gemma 3 with SigLIP; with and without --mmproj):
- the weights come back bit-equal (the one exception is softplus-stored per_dim_scale of an
  f32 checkpoint, which float32 cannot invert: there, softplus of both values is equal);
- transformers loads the folder (no missing or unexpected keys) and computes the same logits,
  and the same image / audio features, as on the original checkpoint;
- converting the exported folder back to GGUF gives the first GGUF again (metadata, tokenizer
  keys and tensors), which pins config.json and the tokenizer files;
- the tokenizer gives the original tokenizer's ids and carries the chat template unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from click.testing import CliRunner

from ggquant.fixtures import tiny_model
from ggquant.fixtures.tokenizer import CORPUS
from ggquant.cli import main
from ggquant.convert import convert
from ggquant.convert.gguf_to_hf import export_hf
from ggquant.formats.gguf import GGUFReader

# name -> (fixture, --dtype, with --mmproj)
CASES = {
    "e4b_mm": ("gemma4_e4b", "bf16", True),
    "e2b_mm": ("gemma4_e2b", "f32", True),
    "e4b_text": ("gemma4_e4b_text", "bf16", False),
    "e4b_no_mm": ("gemma4_e4b", "bf16", False),  # a conditional checkpoint exported as its causal LM
    "g3_text": ("gemma3_text", "bf16", False),
    "g3_vision_mm": ("gemma3_vision", "bf16", True),
    "a4b_mm": ("gemma4_a4b", "bf16", True),  # mixture of experts (router, stacked experts), K = V
    "31b_mm": ("gemma4_31b", "f16", True),  # dense, K = V on full layers, fewer global KV heads
    "unified_mm": ("gemma4_unified", "bf16", True),  # encoder-free vision and audio embedders (gemma4uv/ua)
}
# tensors a float32 checkpoint cannot get back bit for bit: the converter stores softplus(x)
LOSSY_IN_F32 = ("per_dim_scale",)


class RoundTrip:
    def __init__(self, case: str, root: Path):
        self.case = case
        self.fixture, self.dtype, self.mm = CASES[case]
        self.orig = tiny_model(self.fixture)
        self.dir = root / case
        self.dir.mkdir(parents=True)
        conv = convert(self.orig, outtype="f32", outfile=self.dir / "a.gguf", mmproj=self.mm)
        self.gguf = [Path(p) for p in conv.written]
        # the folder keeps the checkpoint's name: general.name (and the GGUF) derive from it
        self.hf = self.dir / "hf" / self.orig.name
        # E4B with towers goes through tiny row chunks: every inverse transform (norm shift,
        # conv reshapes, softplus) then works on many partial chunks
        from ggquant.convert import encode

        with mock.patch.object(encode, "CHUNK_BYTES", 256 if case == "e4b_mm" else encode.CHUNK_BYTES):
            self.export = export_hf(self.gguf[0], outfile=self.hf, dtype=self.dtype,
                                    mmproj=self.gguf[1] if self.mm else None)


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    root = tmp_path_factory.mktemp("to_hf")
    done: dict[str, RoundTrip] = {}

    def get(case: str) -> RoundTrip:
        if case not in done:
            done[case] = RoundTrip(case, root)
        return done[case]

    return get


def _state(folder: Path) -> dict:
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            for k in s.keys():
                out[k] = s.get_tensor(k)
    return out


def _bits(t):
    import torch

    return t.contiguous().view({torch.float32: torch.int32, torch.bfloat16: torch.int16,
                                torch.float16: torch.int16}[t.dtype])


def _text_only(name: str) -> str:
    """Name of a conditional checkpoint's text tensor in the causal-LM layout."""
    return name.replace("model.language_model.", "model.")


@pytest.mark.parametrize("case", list(CASES))
def test_weights_come_back_bit_equal(round_trip, case):
    import torch

    rt = round_trip(case)
    a, b = _state(rt.orig), _state(rt.hf)
    if case == "e4b_no_mm":
        a = {_text_only(k): v for k, v in a.items() if k.startswith("model.language_model.")}
    assert sorted(a) == sorted(b)
    for k in a:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype and x.shape == y.shape, (k, x.dtype, y.dtype, x.shape, y.shape)
        if torch.equal(_bits(x), _bits(y)):
            continue
        assert rt.dtype == "f32" and any(s in k for s in LOSSY_IN_F32), f"{k} differs"
        sp = torch.nn.functional.softplus
        assert torch.equal(_bits(sp(x)), _bits(sp(y))), f"{k}: softplus differs, so the GGUF would"
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-7), k


def _load(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"{folder}: {problems}"
    return model.eval()


def _features(model) -> dict:
    """Logits on a token sequence, plus image and audio features of the towers present."""
    import torch

    g = torch.Generator().manual_seed(0)
    out = {}
    with torch.no_grad():
        out["logits"] = model(torch.tensor([[2] + list(range(300, 340))])).logits
        cfg = model.config
        unified = cfg.model_type == "gemma4_unified"
        if getattr(cfg, "vision_config", None) is not None:
            if unified:  # raw merged patches of model_patch_size^2 * 3 pixels
                n, p = 12, cfg.vision_config.model_patch_size
                pos = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(n), indexing="xy"), -1).reshape(1, -1, 2)
                out["image"] = model.get_image_features(torch.rand(1, n * n, 3 * p * p, generator=g), pos).pooler_output
            elif cfg.model_type == "gemma4":
                n, p = 12, cfg.vision_config.patch_size
                pos = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(n), indexing="xy"), -1).reshape(1, -1, 2)
                out["image"] = model.get_image_features(torch.rand(1, n * n, 3 * p * p, generator=g), pos).pooler_output
            else:
                s = cfg.vision_config.image_size
                out["image"] = model.get_image_features(torch.rand(1, 3, s, s, generator=g)).pooler_output
        if getattr(cfg, "audio_config", None) is not None:
            # Unified: raw waveform frames of audio_embed_dim samples; else 128 mel bins
            feats = torch.randn(1, 64, cfg.audio_config.audio_embed_dim if unified else 128, generator=g)
            out["audio"] = model.model.get_audio_features(feats, torch.ones(1, 64, dtype=torch.bool)).pooler_output
    return {k: v if torch.is_tensor(v) else torch.cat(list(v)) for k, v in out.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_computes_the_same(round_trip, case):
    import torch

    rt = round_trip(case)
    new = _load(rt.hf)
    assert type(new).__name__ == rt.export.arch
    want = _features(_load(rt.orig))
    got = _features(new)
    if case == "e4b_no_mm":
        want = {"logits": want["logits"]}
    assert sorted(want) == sorted(got)
    for k in want:
        if rt.dtype == "f32" and k == "audio":  # per_dim_scale: equal up to float32's softplus inverse
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(got[k], want[k]), f"{k}: max |d| {(got[k] - want[k]).abs().max().item()}"


def _same_gguf(a: Path, b: Path) -> str | None:
    """None when both files hold the same metadata (keys, order, types, values) and the same
    tensors (name, shape, type, bytes); tensor order may differ (shards are read in order)."""
    ra, rb = GGUFReader(a), GGUFReader(b)
    try:
        if list(ra.fields) != list(rb.fields):
            return f"keys: {sorted(set(ra.fields) ^ set(rb.fields))} (or their order) differ"
        for k, fa in ra.fields.items():
            fb = rb.fields[k]
            va, vb = fa.value, fb.value
            same = va == vb if isinstance(va, (str, list)) else np.array_equal(np.asarray(va), np.asarray(vb))
            if (fa.type, fa.item_type) != (fb.type, fb.item_type) or not same:
                return f"key {k}: {str(va)[:100]!r} vs {str(vb)[:100]!r}"
        ta = {t.name: t for t in ra.tensors}
        tb = {t.name: t for t in rb.tensors}
        if sorted(ta) != sorted(tb):
            return f"tensors: {sorted(set(ta) ^ set(tb))[:5]}"
        for n, t in ta.items():
            u = tb[n]
            if (t.shape, t.qtype) != (u.shape, u.qtype) or not np.array_equal(t.raw(), u.raw()):
                return f"tensor {n} differs"
        return None
    finally:
        ra.close()
        rb.close()


@pytest.mark.parametrize("case", ["e4b_mm", "e2b_mm", "e4b_text", "g3_text", "g3_vision_mm", "a4b_mm", "31b_mm",
                                  "unified_mm"])
def test_converting_back_gives_the_same_gguf(round_trip, case):
    rt = round_trip(case)
    again = convert(rt.hf, outtype="f32", outfile=rt.dir / "b.gguf", mmproj=rt.mm)
    for first, second in zip(rt.gguf, again.written):
        assert _same_gguf(first, Path(second)) is None, f"{Path(second).name}: {_same_gguf(first, Path(second))}"
    if case != "e2b_mm":  # the sharded source lists its tensors shard by shard
        assert [p.read_bytes() for p in rt.gguf] == [Path(p).read_bytes() for p in again.written]


@pytest.mark.parametrize("case", ["e4b_mm", "e4b_text", "g3_text", "g3_vision_mm"])
def test_tokenizer_and_chat_template(round_trip, case):
    from transformers import AutoTokenizer

    rt = round_trip(case)
    ours = AutoTokenizer.from_pretrained(rt.hf)
    theirs = AutoTokenizer.from_pretrained(rt.orig)
    for text in CORPUS + ("  two spaces,\n\nnew lines\tand a tab", "<bos>specials<eos> inside"):
        assert ours(text).input_ids == theirs(text).input_ids, text
    r = GGUFReader(rt.gguf[0])
    try:
        stored = r.get("tokenizer.chat_template")
    finally:
        r.close()
    cfg = json.loads((rt.hf / "tokenizer_config.json").read_bytes().decode("utf-8"))
    tmpl = cfg.get("chat_template")
    default = next(t["template"] for t in tmpl if t["name"] == "default") if isinstance(tmpl, list) else tmpl
    assert default == stored and stored is not None
    assert default.encode("utf-8") == stored.encode("utf-8")


# q8_0, and a low-bit preset (issue 14): the fixture's rows (96, 192) are too short for 256-blocks, so
# IQ3_M falls back to IQ4_NL / Q4_0 / Q5_0 as llama.cpp does; ffn_up is made MXFP4 (32-blocks)
@pytest.mark.parametrize("outtype, tensor_types, qtype", [("q8_0", (), "Q8_0"), ("iq3_m", ("ffn_up=mxfp4",), "MXFP4")])
def test_quantized_gguf_dequantizes_in_chunks(tiny_gemma4_e4b, tmp_path, monkeypatch, outtype, tensor_types, qtype):
    """A quantized GGUF comes back as F32 (--dtype auto: lossless), every tensor equal to ggml's
    dequantization, also when read in many small row chunks."""
    from ggquant.convert import encode
    from ggquant.quant import types as qtypes

    text = convert(tiny_gemma4_e4b, outtype=outtype, outfile=tmp_path / "q.gguf", tensor_types=tensor_types).written[0]
    with GGUFReader(text) as r:
        assert qtype in {t.qtype.name for t in r.tensors}
    monkeypatch.setattr(encode, "CHUNK_BYTES", 512)
    e = export_hf(text, outfile=tmp_path / "hf")
    assert e.dtype == "F32"
    state = _state(tmp_path / "hf")
    r = GGUFReader(text)
    try:
        for t in e.tensors:
            if t.inverse.label:  # only plain copies here; the transforms are checked by the round trips
                continue
            info = r.tensor(t.gguf_name)
            want = qtypes.get(info.qtype).dequantize(info.raw(), info.shape).reshape(t.shape)
            got = state[t.name].numpy()
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), t.name
    finally:
        r.close()


def test_sharded_output_loads(tiny_gemma4_e4b, tmp_path):
    gguf = convert(tiny_gemma4_e4b, outtype="f32", outfile=tmp_path / "m.gguf").written[0]
    e = export_hf(gguf, outfile=tmp_path / "hf", dtype="bf16", max_shard_bytes=200_000)
    shards = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(t.name for t in e.tensors)
    assert index["metadata"]["total_size"] == e.nbytes
    _load(tmp_path / "hf")


def test_cli_json_and_dry_run(tiny_gemma3_text, tmp_path):
    gguf = convert(tiny_gemma3_text, outtype="bf16", outfile=tmp_path / "m.gguf").written[0]
    out = tmp_path / "hf"
    res = CliRunner().invoke(main, ["convert", gguf, "--to", "hf", "--outfile", str(out), "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)
    assert plan["written"] is False and not out.exists()
    assert plan["dtype"] == "BF16" and plan["architecture"] == "Gemma3ForCausalLM"  # --dtype auto keeps BF16
    norm = next(t for t in plan["tensors"] if t["name"] == "model.norm.weight")
    assert norm["source"] == "output_norm.weight" and norm["transform"] == "-1"
    res = CliRunner().invoke(main, ["convert", gguf, "--to", "hf", "--outfile", str(out)])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in out.iterdir()) == plan["files"]


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_dtype_rounds_like_torch(tiny_gemma3_text, tmp_path, dtype):
    """--dtype bf16/f16 from an F32 GGUF: round to nearest even, as torch's .to() does."""
    import torch

    gguf = convert(tiny_gemma3_text, outtype="f32", outfile=tmp_path / "m.gguf").written[0]
    f32 = _state(Path(export_hf(gguf, outfile=tmp_path / "f32", dtype="f32").out))
    low = _state(Path(export_hf(gguf, outfile=tmp_path / dtype, dtype=dtype).out))
    tdt = {"bf16": torch.bfloat16, "f16": torch.float16}[dtype]
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.4e38, 65520.0, 1e-40, -0.0,
                            1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 6e-8, -2.0**-25])
    for k, v in f32.items():
        assert low[k].dtype == tdt and torch.equal(_bits(low[k]), _bits(v.to(tdt))), k
    # ties, overflow, subnormals, NaN and signed zero round like torch too
    from ggquant.formats.hf_writer import encode_dtype

    want = special.to(tdt)
    got = torch.from_numpy(encode_dtype(special.numpy(), dtype.upper()).view(np.int16))
    # NaN: torch's scalar and vectorised casts disagree on the payload; any NaN will do
    assert torch.isnan(got[:1].view(tdt)).all()
    assert torch.equal(got[1:], _bits(want)[1:]), (got, _bits(want))


MEMORY_SCRIPT = r'''
import os, resource, sys
import numpy as np
from gguf import GGMLQuantizationType as T, GGUFValueType as V
from ggquant.convert.gguf_to_hf import GGUFSource, HFTensor, tensor_chunks
from ggquant.formats.gguf import GGUFWriter
from ggquant.formats.hf_writer import SafetensorsWriter
from ggquant.quant import types as qt

folder, rows, cols = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
qt.get(T.Q8_0).dequantize(np.zeros((2, cols // 32 * 34), np.uint8), (2, cols))  # compile first
path = os.path.join(folder, "big.gguf")
w = GGUFWriter(path)
w.add_field("general.architecture", "test", V.STRING)
block = qt.get(T.Q8_0).quantize(np.random.default_rng(0).standard_normal((256, cols), dtype=np.float32))
w.add_tensor("w", (rows, cols), T.Q8_0, lambda: (block for _ in range(rows // 256)))
w.write()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
src = GGUFSource(path)
t = HFTensor("w", (rows, cols), "w", (rows, cols), T.Q8_0, "text", src)
SafetensorsWriter(os.path.join(folder, "hf"), [("w", "F32", (rows, cols))], 1 << 40).write(
    lambda p: tensor_chunks(t, "F32"))
src.close()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
'''


def test_peak_memory_is_a_chunk_not_a_tensor(tmp_path):
    """A 512 MiB (as float32) Q8_0 tensor is dequantized and written chunk by chunk: the peak
    RSS grows by far less than the tensor (whole-tensor code needs at least its f32 size)."""
    import subprocess
    import sys

    rows, cols = 8192, 16384
    res = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path), str(rows), str(cols)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    growth = int(res.stdout.split()[-1])
    f32_mib = rows * cols * 4 // 2**20
    assert growth < f32_mib // 4, f"peak RSS grew by {growth} MiB writing a {f32_mib} MiB tensor"


def test_untied_output_becomes_lm_head(tiny_gemma3_text, tmp_path):
    """A GGUF with its own output.weight: lm_head.weight, tie_word_embeddings false."""
    import torch

    from ggquant.formats.gguf import GGUFWriter, copy_field

    src = convert(tiny_gemma3_text, outtype="f32", outfile=tmp_path / "m.gguf").written[0]
    r = GGUFReader(src)
    try:
        w = GGUFWriter(tmp_path / "untied.gguf")
        for f in r.fields.values():
            copy_field(w, f)
        for t in r.tensors:
            w.add_tensor(t.name, t.shape, t.qtype, lambda t=t: [t.raw()])
        emb = r.tensor("token_embd.weight")
        w.add_tensor("output.weight", emb.shape, emb.qtype, lambda: [(emb.raw().view(np.float32) * 0.5)])
        w.write()
    finally:
        r.close()
    e = export_hf(tmp_path / "untied.gguf", outfile=tmp_path / "hf", dtype="f32")
    assert e.config["tie_word_embeddings"] is False
    model = _load(tmp_path / "hf")
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight * 0.5)


def _config_dict(folder: Path) -> dict:
    from transformers import AutoConfig

    d = AutoConfig.from_pretrained(folder).to_dict()
    for k in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        d.pop(k, None)
    return d


@pytest.mark.parametrize("case", list(CASES))
def test_config_reloads_identically(round_trip, case):
    """config.json written from the GGUF metadata is the original configuration, every field,
    once transformers has filled in its defaults."""
    rt = round_trip(case)
    want, got = _config_dict(rt.orig), _config_dict(rt.hf)
    if case == "e4b_no_mm":  # the conditional model's text config, as a causal LM
        text = {k: v for k, v in want["text_config"].items() if k not in ("dtype", "torch_dtype", "_name_or_path")}
        got = {k: v for k, v in got.items() if k in text}
        want = {**text, "architectures": None}
        got["architectures"] = None
    assert got == want
