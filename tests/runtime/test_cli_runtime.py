"""`ggquant run` / `ggquant parity` on the tiny fixtures, and the errors a user can run into."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from ggquant.cli import main
from ggquant.runtime.model import Session, load_model


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_run_streams_text_and_saves_prompt_logits(reference_gguf, tmp_path):
    path = reference_gguf("gemma4_e4b", "f32")
    out = tmp_path / "l.npy"
    r = _invoke("run", path, "--prompt", "The robot bought honey", "-n", "5", "--threads", "2", "--logits-out", out)
    assert r.exit_code == 0, r.output
    assert r.output.startswith("The robot bought honey")
    logits = np.load(out)
    m = load_model(path, threads=2)
    from ggquant.runtime.tokenizer import Tokenizer

    ids = Tokenizer.from_gguf(m.reader).encode("The robot bought honey")
    assert logits.shape == (len(ids), m.n_vocab)
    assert np.array_equal(logits, Session(m, 64).eval(ids, "all"))


def test_run_greedy_is_deterministic_and_seeded_sampling_repeats(reference_gguf):
    path = reference_gguf("gemma3_text", "f32")
    runs = [json.loads(_invoke("run", path, "-p", "hello", "-n", "8", "--json", "--temp", t, "--seed", "7").output)
            for t in ("0", "0", "0.8", "0.8")]
    assert runs[0]["ids"] == runs[1]["ids"] and runs[2]["ids"] == runs[3]["ids"]


def test_prompt_longer_than_context_is_a_clear_error(reference_gguf):
    r = _invoke("run", reference_gguf("gemma3_text", "f32"), "-p", "word " * 50, "-c", "16", "-n", "1")
    assert r.exit_code == 1
    assert "the prompt has" in r.output and "the context holds 16" in r.output


def test_logits_out_is_not_overwritten_silently(reference_gguf, tmp_path):
    out = tmp_path / "x.npy"
    out.write_bytes(b"keep")
    r = _invoke("run", reference_gguf("gemma3_text", "f32"), "-p", "hi", "-n", "1", "--logits-out", out)
    assert r.exit_code == 1 and "--force" in r.output and out.read_bytes() == b"keep"


def _write_gguf(path, arch, tensors: dict[str, np.ndarray], **keys):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for k, v in keys.items():
        w.add_uint32(f"{arch}.{k}", v) if isinstance(v, int) else w.add_float32(f"{arch}.{k}", v)
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_architecture_is_named(tmp_path):
    p = _write_gguf(tmp_path / "m.gguf", "phi3", {"token_embd.weight": np.zeros((8, 32), np.float32)})
    r = _invoke("run", p, "-p", "x", "-n", "1")
    assert r.exit_code == 1 and "'phi3'" in r.output and "gemma3" in r.output


def test_missing_tensors_are_listed(tmp_path):
    p = _write_gguf(tmp_path / "m.gguf", "gemma3", {"token_embd.weight": np.zeros((8, 32), np.float32),
                                                     "output_norm.weight": np.ones(32, np.float32)},
                    block_count=2, embedding_length=32, feed_forward_length=64, **{
                        "attention.head_count": 2, "attention.head_count_kv": 1,
                        "attention.layer_norm_rms_epsilon": 1e-6, "context_length": 64})
    with pytest.raises(Exception) as e:
        load_model(p)
    msg = str(e.value)
    assert "missing tensors" in msg and "blk.0.attn_q.weight" in msg and "blk.1.ffn_down.weight" in msg


def test_cuda_without_gpu_is_a_clear_error(reference_gguf):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = _invoke("run", reference_gguf("gemma3_text", "f32"), "-p", "x", "-n", "1", "--device", "cuda")
    assert r.exit_code == 1 and "CUDA" in r.output


def test_parity_against_itself_and_json(reference_gguf):
    path = reference_gguf("gemma4_e2b", "f32")
    r = _invoke("parity", path, "--against", path, "--ctx", "32", "--chunks", "2", "--json", "--threads", "2")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{"):])
    assert res["chunks"] == 2 and res["positions"] == 64
    assert res["kl_max"] == 0.0 and res["top1_agreement"] == 1.0 and res["nmse"] == 0.0


def test_parity_q8_0_against_f32_reports_a_small_distance(reference_gguf, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The robot bought honey at the café. " * 20)
    r = _invoke("parity", reference_gguf("gemma4_e4b", "q8_0"), "--against", reference_gguf("gemma4_e4b", "f32"),
                "--text", text, "--ctx", "64", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{"):])
    assert 0 < res["kl_mean"] < 0.05 and res["top1_agreement"] > 0.8


def test_parity_plot_without_matplotlib_is_a_clear_error(reference_gguf, tmp_path):
    try:
        import matplotlib  # noqa: F401
        pytest.skip("matplotlib is installed")
    except ImportError:
        pass
    path = reference_gguf("gemma3_text", "f32")
    r = _invoke("parity", path, "--against", path, "--plot", tmp_path / "p.png")
    assert r.exit_code == 1 and "matplotlib" in r.output


def test_parity_bad_against_is_named(reference_gguf):
    r = _invoke("parity", reference_gguf("gemma3_text", "f32"), "--against", "/no/such/thing")
    assert r.exit_code == 1 and "/no/such/thing" in r.output


def test_run_on_a_hf_folder_equals_run_on_its_converted_gguf(tiny_model_dir, tmp_path):
    """`ggquant run HF_DIR` (bf16 weights, run as stored) generates the same ids and prompt logits as
    `ggquant run` on the BF16 GGUF that `ggquant convert` writes for the folder."""
    from ggquant.convert import convert

    folder = tiny_model_dir("gemma4_e4b")
    gguf = convert(folder, outtype="bf16", outfile=tmp_path / "m-{FTYPE}.gguf").written[0]
    args = ["-p", "The robot bought honey", "-n", "6", "--threads", "2", "--json"]
    runs = {}
    for key, model in (("folder", folder), ("gguf", gguf)):
        r = _invoke("run", model, *args, "--logits-out", tmp_path / f"{key}.npy")
        assert r.exit_code == 0, r.output
        runs[key] = json.loads(r.output[r.output.index("{"):])
    assert runs["folder"]["ids"] == runs["gguf"]["ids"] and runs["folder"]["text"] == runs["gguf"]["text"]
    assert runs["folder"]["weights"] == "Hugging Face folder converted in memory to BF16"
    assert runs["gguf"]["weights"] == "GGUF"
    a, b = np.load(tmp_path / "folder.npy"), np.load(tmp_path / "gguf.npy")
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    r = _invoke("run", folder, "-p", "hi", "-n", "2", "--outtype", "f32", "--threads", "2")
    assert r.exit_code == 0 and r.output.startswith("hi") and "converted in memory to F32" in r.output


def test_run_on_a_folder_that_is_not_a_model_fails_with_the_converters_message(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    r = _invoke("run", tmp_path, "-p", "x", "-n", "1")
    assert r.exit_code == 1
    assert f"{tmp_path / 'config.json'}: not found; a Hugging Face model folder needs config.json" in r.output
    (tmp_path / "config.json").write_text('{"architectures": ["Phi3ForCausalLM"]}')
    r = _invoke("run", tmp_path, "-p", "x", "-n", "1")
    assert r.exit_code == 1 and "architecture 'Phi3ForCausalLM' is not supported" in r.output
