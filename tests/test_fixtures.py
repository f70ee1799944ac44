"""The tiny-model fixtures: deterministic, convertible by llama.cpp, and faithful enough that
llama.cpp's float32 logits match transformers' (research note gemma4-architecture-and-parity.md
§0 and §7 for the procedure and the expected error sizes).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from ggquant.fixtures import TINY_MODELS, tiny_model
from ggquant.fixtures import tokenizer as tk
from tests.conftest import DEFAULT_REFERENCE_CONVERSIONS

N_TOKENS = 40  # BOS + 39 random ordinary tokens; longer than the sliding window (8)
F32_LOGIT_TOL = 1e-2  # note §0: 0.0056 measured at |logit| <= 23; ggml's fp16 GELU table dominates
Q8_0_LOGIT_TOL = 1.0  # note §0: 0.41; half from weight rounding, half from Q8_0 activations
LLAMA_THREADS = 2


def _family(name: str) -> str:
    return "gemma4" if name.startswith("gemma4") else "gemma3"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- tokenizer ------------------------------------------------------------------------------

SAMPLES = (
    "The robot bought honey at the café.",
    "Numbers: 3.14 and 2026, then an emoji 🙂 and a tab\tend.",
    "Two lines\nsecond line with  double  spaces ",
    "Zebra quokka xylophone (unseen words)",
)


@pytest.mark.parametrize("family", ["gemma4", "gemma3"])
def test_vocab_layout(family):
    v = tk.build_vocab(family)
    specials = tk.GEMMA4_SPECIALS if family == "gemma4" else tk.GEMMA3_SPECIALS
    assert v.size == tk.DEFAULT_VOCAB_SIZE
    assert v.tokens[: len(specials)] == specials
    assert (v.id("<pad>"), v.id("<eos>"), v.id("<bos>"), v.id("<unk>"), v.id("<mask>")) == (0, 1, 2, 3, 4)
    assert v.tokens[len(specials): len(specials) + 256] == tk.BYTE_PIECES
    assert len(set(v.tokens)) == v.size
    known = set(v.tokens)
    assert all(a in known and b in known and a + b in known for a, b in v.merges)
    assert not any(c.isdigit() for p in v.tokens[v.first_trained_id:] if len(p) > 1 for c in p)
    assert tk.build_vocab(family) == v  # the trainer is deterministic


@pytest.mark.parametrize("family", ["gemma4", "gemma3"])
def test_tokenizer_loads_fast_and_round_trips(tmp_path, family):
    from transformers import AutoTokenizer

    v = tk.write_tokenizer(tmp_path, family)
    tok = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert tok.is_fast and len(tok) == v.size == tok.vocab_size
    # every special is a special id, so gguf-py's LlamaHfVocab types them CONTROL
    assert set(tok.all_special_ids) == set(range(len(v.specials)))
    for text in SAMPLES + tk.CORPUS[:3]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tk.BOS_ID and tk.UNK_ID not in ids
        assert tok.decode(ids[1:]) == text
    # unseen characters fall back to byte pieces
    assert tok("🙂", add_special_tokens=False)["input_ids"] == [v.id(f"<0x{b:02X}>") for b in "🙂".encode()]


def test_sentencepiece_model_matches_tokenizer_json(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from transformers import AutoTokenizer

    v = tk.write_tokenizer(tmp_path, "gemma3")
    sp = spm.SentencePieceProcessor()
    sp.LoadFromFile(str(tmp_path / "tokenizer.model"))
    assert sp.vocab_size() == v.size
    assert [sp.IdToPiece(i) for i in range(v.size)] == list(v.tokens)
    assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert all(sp.IsByte(i) for i in range(len(v.specials), v.first_trained_id))
    assert sp.IsControl(tk.BOS_ID) and sp.IsUnknown(tk.UNK_ID)
    tok = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for text in SAMPLES + tk.CORPUS:
        assert sp.encode(text) == tok(text, add_special_tokens=False)["input_ids"], text


@pytest.mark.parametrize("variant", tk.CHAT_TEMPLATE_VARIANTS)
def test_chat_template_variants(tmp_path, variant):
    from transformers import AutoTokenizer

    tk.write_tokenizer(tmp_path, "gemma4", chat_template=variant)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert ("chat_template" in config) == variant.startswith("config")
    assert (tmp_path / "chat_template.jinja").is_file() == variant.startswith("jinja")
    assert (tmp_path / "additional_chat_templates").is_dir() == (variant == "jinja_multi")
    assert (tmp_path / "chat_template.json").is_file() == (variant == "json")
    if variant == "none":
        assert tk.expected_chat_template("gemma4", variant) is None
        return
    if variant == "json":  # the processors' file: transformers' tokenizer does not read it
        saved = json.loads((tmp_path / "chat_template.json").read_text(encoding="utf-8"))
        assert saved == {"chat_template": tk.expected_chat_template("gemma4", variant)}
        return
    tok = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<bos><|turn>user\nHi<turn|>\n<|turn>model\nHello<turn|>\n<|turn>model\n"


# --- builders -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gemma4_e4b", "gemma4_e2b", "gemma3_vision"])
def test_builder_is_deterministic(tmp_path, name):
    """A fresh build is byte-identical to the cached one (built earlier, maybe in another process)."""
    builder, kwargs = TINY_MODELS[name]
    fresh = builder(tmp_path / name, **kwargs)
    cached = tiny_model(name)
    a, b = _files(fresh), _files(cached)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []


def _tensors(folder: Path) -> dict[str, "np.ndarray"]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: v.float().numpy() for k, v in load_file(str(f)).items()})
    return out


@pytest.mark.parametrize("multi, text_only, prefix_multi, prefix_text", [
    ("gemma4_e4b", "gemma4_e4b_text", "model.language_model.", "model."),
    ("gemma3_vision", "gemma3_text", "language_model.model.", "model."),
])
def test_text_weights_do_not_depend_on_towers(multi, text_only, prefix_multi, prefix_text):
    a, b = _tensors(tiny_model(multi)), _tensors(tiny_model(text_only))
    text_a = {k[len(prefix_multi):]: v for k, v in a.items() if k.startswith(prefix_multi)}
    text_b = {k[len(prefix_text):]: v for k, v in b.items() if k.startswith(prefix_text)}
    assert sorted(text_a) == sorted(text_b)
    assert all(np.array_equal(text_a[k], text_b[k]) for k in text_a)


@pytest.mark.parametrize("name", ["gemma4_e4b", "gemma4_e2b"])
def test_gemma4_checkpoint_features(name):
    folder = tiny_model(name)
    cfg = json.loads((folder / "config.json").read_text())
    text = cfg["text_config"]
    assert cfg["architectures"] == ["Gemma4ForConditionalGeneration"]
    assert text["vocab_size"] == text["vocab_size_per_layer_input"] == tk.DEFAULT_VOCAB_SIZE
    n, shared, lt = text["num_hidden_layers"], text["num_kv_shared_layers"], text["layer_types"]
    first = n - shared
    assert lt[first - 1] == "full_attention" and lt[first - 2] == "sliding_attention" and lt[-1] == "full_attention"
    assert text["rope_parameters"]["full_attention"]["rope_type"] == "proportional"
    assert cfg["vision_config"]["use_clipped_linears"] and cfg["audio_config"]["use_clipped_linears"]
    assert json.loads((folder / "preprocessor_config.json").read_text())["image_std"] == [1.0, 1.0, 1.0]
    w = _tensors(folder)
    p = "model.language_model."
    # KV-shared layers carry no k/v (transformers 5 does not save them)
    assert f"{p}layers.{first - 1}.self_attn.k_proj.weight" in w and f"{p}layers.{first}.self_attn.k_proj.weight" not in w
    scalars = np.array([w[f"{p}layers.{i}.layer_scalar"][0] for i in range(n)])
    assert np.all(scalars != 1.0)
    assert w[f"{p}norm.weight"].std() > 0.1 and w[f"{p}layers.0.self_attn.q_norm.weight"].std() > 0.05
    if name == "gemma4_e2b":
        assert text["use_double_wide_mlp"] and text["global_head_dim"] == 32
        assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("model-*.safetensors"))) > 1
        assert w[f"{p}layers.{first}.mlp.up_proj.weight"].shape[0] == 2 * text["intermediate_size"]
    else:
        assert "global_head_dim" not in text and (folder / "model.safetensors").is_file()


# --- llama.cpp's converter -------------------------------------------------------------------

def _gguf_fields(path: Path) -> dict:
    from gguf import GGUFReader

    r = GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return fields | {"__tensors__": {t.name: t.tensor_type.name for t in r.tensors}}


@pytest.mark.parametrize("name, outtype, mmproj", DEFAULT_REFERENCE_CONVERSIONS,
                         ids=[f"{n}-{o}{'-mmproj' if m else ''}" for n, o, m in DEFAULT_REFERENCE_CONVERSIONS])
def test_reference_converter(reference_gguf, name, outtype, mmproj):
    f = _gguf_fields(reference_gguf(name, outtype, mmproj))
    tensors = f["__tensors__"]
    family = _family(name)
    if mmproj:
        assert f["general.architecture"] == "clip"
        assert f["clip.has_vision_encoder"] is True
        assert f.get("clip.has_audio_encoder", False) is (family == "gemma4")
        assert not any(t.startswith(("blk.", "token_embd")) for t in tensors)
        return
    assert f["general.architecture"] == family
    assert f["tokenizer.ggml.bos_token_id"] == tk.BOS_ID and f["tokenizer.ggml.add_bos_token"] is True
    assert len(f["tokenizer.ggml.tokens"]) == tk.DEFAULT_VOCAB_SIZE
    assert f["tokenizer.ggml.model"] == ("gemma4" if family == "gemma4" else "llama")
    assert not any(t.startswith(("v.", "a.", "mm.")) for t in tensors)
    variant = TINY_MODELS[name][1]["chat_template"]
    expected = tk.expected_chat_template(family, variant)
    if isinstance(expected, list):  # named templates: default + one key per name
        assert f["tokenizer.chat_template"] == expected[0]["template"]
        for t in expected[1:]:
            assert f[f"tokenizer.chat_template.{t['name']}"] == t["template"]
    else:
        assert f.get("tokenizer.chat_template") == expected
    if family == "gemma4":
        assert tensors["rope_freqs.weight"] == "F32"
        assert f["gemma4.attention.sliding_window"] == 8
    if outtype == "q8_0":
        assert tensors["token_embd.weight"] == "Q8_0" and tensors["blk.0.attn_q.weight"] == "Q8_0"
    if outtype == "f32":
        assert set(tensors.values()) == {"F32"}


# --- llama.cpp runtime vs transformers -----------------------------------------------------

def _prompt_ids(name: str) -> list[int]:
    v = tk.build_vocab(_family(name))
    rng = np.random.default_rng(20260101)
    return [tk.BOS_ID] + [int(i) for i in rng.choice(v.normal_ids(), N_TOKENS - 1)]


@cache
def _hf_logits(name: str) -> np.ndarray:
    """transformers float32 eager logits for the prompt (llama.cpp's Llama.eval adds no BOS)."""
    import torch
    import transformers

    folder = tiny_model(name)
    arch = json.loads((folder / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, arch).from_pretrained(folder, dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor([_prompt_ids(name)])).logits[0].float().numpy()


def _llama(path: Path, **kw):
    llama_cpp = pytest.importorskip("llama_cpp")
    params = dict(n_ctx=128, n_batch=128, n_ubatch=128, logits_all=True, flash_attn=False,
                  type_k=0, type_v=0,  # F32 KV cache (GGML_TYPE_F32 = 0)
                  seed=0, n_threads=LLAMA_THREADS, verbose=False)
    return llama_cpp.Llama(str(path), **(params | kw))


def _llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    llm = _llama(path)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def _check_argmax(ref: np.ndarray, got: np.ndarray, tol: float) -> None:
    """Argmax must agree wherever HF's top-2 margin exceeds twice the tolerance."""
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * tol
    assert clear.sum() >= len(ref) // 2
    assert np.array_equal(ref.argmax(1)[clear], got.argmax(1)[clear])


TEXT_MODELS = ["gemma4_e4b", "gemma4_e2b", "gemma4_e4b_text", "gemma3_text", "gemma3_vision"]


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_f32_gguf_logits_match_transformers(reference_gguf, name):
    path = reference_gguf(name, "f32")
    got = _llama_logits(path, _prompt_ids(name))
    ref = _hf_logits(name)
    assert np.abs(ref).max() > 5  # the model is not degenerate
    diff = np.abs(got - ref).max()
    assert diff <= F32_LOGIT_TOL, f"max |llama.cpp - transformers| = {diff}"
    _check_argmax(ref, got, F32_LOGIT_TOL)


@pytest.mark.parametrize("name", ["gemma4_e4b", "gemma4_e2b"])
def test_q8_0_gguf_logits_close_to_transformers(reference_gguf, name):
    got = _llama_logits(reference_gguf(name, "q8_0"), _prompt_ids(name))
    ref = _hf_logits(name)
    assert np.abs(got - ref).max() <= Q8_0_LOGIT_TOL
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.995  # worst row; measured 0.998 (note §0: 0.9995)


@pytest.mark.parametrize("name", ["gemma4_e4b", "gemma3_text"])
def test_llama_cpp_tokenizes_like_transformers(reference_gguf, name):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model(name), local_files_only=True)
    llm = _llama(reference_gguf(name, "f32"), vocab_only=True)
    try:
        for text in SAMPLES[:2] + tk.CORPUS:
            assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok(text)["input_ids"], text
    finally:
        llm.close()


WITH_AUDIO = ("gemma4_e4b", "gemma4_e2b", "gemma4_unified")  # 26B-A4B / 31B (like Gemma 3) have no audio


@pytest.mark.parametrize("name", ["gemma4_e4b", "gemma4_e2b", "gemma3_vision", "gemma4_a4b", "gemma4_31b",
                                  "gemma4_unified"])
def test_mmproj_loads_in_libmtmd(reference_gguf, name):
    pytest.importorskip("llama_cpp")
    import llama_cpp.mtmd_cpp as mtmd

    llm = _llama(reference_gguf(name, "f32"))
    try:
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = False
        params.n_threads = LLAMA_THREADS
        params.warmup = False
        ctx = mtmd.mtmd_init_from_file(str(reference_gguf(name, "f16", mmproj=True)).encode(), llm.model, params)
        assert ctx, "mtmd_init_from_file returned NULL"
        try:
            assert mtmd.mtmd_support_vision(ctx)
            assert mtmd.mtmd_support_audio(ctx) == (name in WITH_AUDIO)
        finally:
            mtmd.mtmd_free(ctx)
    finally:
        llm.close()
