"""ggquant's imatrix statistics against llama.cpp's own collection (cb_eval), and the CLI."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from ggquant.cli import main
from ggquant.imatrix.collect import collect_imatrix
from ggquant.formats.gguf import GGUFReader
from ggquant.imatrix.files import load
from ggquant.convert.gguf_to_gguf import quantize_gguf
from tests.oracles import real_text
from tests.oracles import llama_imatrix
from tests.oracles.llama_imatrix import chunks_like_llama_imatrix
from tests.oracles.real_models import gemma3_270m_gguf


def assert_same_statistics(ours, ref):
    """Same entries, counts and sums, float32 bits equal: the runtime's matmul inputs are
    llama.cpp's on this host's ISA bit for bit, and both sum them token by token in float32."""
    assert sorted(ours.entries) == sorted(ref)
    for name, (sums, count) in ref.items():
        e = ours.entries[name]
        assert e.counts.tolist() == [count], name
        assert np.array_equal(e.sums[0], sums), f"{name}: max relative error " \
            f"{np.max(np.abs(e.sums[0] - sums)) / np.max(np.abs(sums)):.2e}"


@pytest.mark.parametrize("name", ["gemma4_e4b", "gemma4_e2b"])
def test_tiny_gemma4_statistics_equal_llama_cpp(reference_gguf, tmp_path, name):
    model = reference_gguf(name, "f32")
    text = real_text.calibration_text()[:20000]
    ctx, n = 64, 3
    im, stats = collect_imatrix(model, real_text.write(tmp_path / "cal.txt", text), ctx=ctx, chunks=n,
                                progress=False)
    ref = llama_imatrix.collect(model, chunks_like_llama_imatrix(model, text, ctx, n), ctx)
    assert stats["chunks"] == n and im.chunk_size == ctx and im.chunk_count == n
    assert_same_statistics(im, ref)


@pytest.fixture(scope="module")
def gemma3_f32(tmp_path_factory):
    out = tmp_path_factory.mktemp("g3") / "gemma3-270m-F32.gguf"
    quantize_gguf(gemma3_270m_gguf(), out, "F32", allow_requantize=True, progress=False)
    return out


def test_real_gemma3_statistics_equal_llama_cpp(gemma3_f32, tmp_path):
    text = real_text.calibration_text()[:40000]
    ctx, n = 128, 2
    im, _ = collect_imatrix(gemma3_f32, real_text.write(tmp_path / "cal.txt", text), ctx=ctx, chunks=n,
                            progress=False)
    ref = llama_imatrix.collect(gemma3_f32, chunks_like_llama_imatrix(gemma3_f32, text, ctx, n), ctx)
    assert len(ref) == 18 * 7
    assert_same_statistics(im, ref)


def test_cli_collects_merges_and_refuses_bad_text(reference_gguf, tmp_path):
    model = reference_gguf("gemma4_e4b", "f32")
    cal = real_text.write(tmp_path / "cal.txt", real_text.calibration_text()[:8000])
    run = CliRunner().invoke
    r = run(main, ["imatrix", str(model), "-f", cal, "-o", str(tmp_path / "a.gguf"), "--ctx", "32",
                   "--chunks", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["chunks"] == 2
    r = run(main, ["imatrix", str(model), "-f", cal, "-o", str(tmp_path / "b.dat"), "--ctx", "32", "--chunks", "2",
                   "--in-file", str(tmp_path / "a.gguf"), "--output-format", "dat"])
    assert r.exit_code == 0, r.output
    assert load(tmp_path / "b.dat").legacy
    short = real_text.write(tmp_path / "short.txt", "too short")
    r = run(main, ["imatrix", str(model), "-f", short, "-o", str(tmp_path / "c.gguf")])
    assert r.exit_code == 1 and "at least 2 chunks" in r.output and not (tmp_path / "c.gguf").exists()
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    r = run(main, ["imatrix", str(model), "-f", str(tmp_path / "bin.txt"), "-o", str(tmp_path / "d.gguf")])
    assert r.exit_code == 1 and "UTF-8" in r.output
    (tmp_path / "empty.txt").write_text("")
    r = run(main, ["imatrix", str(model), "-f", str(tmp_path / "empty.txt"), "-o", str(tmp_path / "e.gguf")])
    assert r.exit_code == 1 and "empty" in r.output


@pytest.mark.parametrize("preset_name", ["Q4_K_M", "IQ4_XS"])
def test_ggquant_imatrix_file_quantizes_like_llama(reference_gguf, tmp_path, preset_name):
    """An imatrix GGUF collected and written by ggquant, given to llama_model_quantize, gives the
    same tensor bytes as ggquant's own imatrix-weighted quantization of the same model."""
    from ggquant.imatrix.files import save_gguf
    from ggquant.quant import presets
    from tests.oracles import ggml as ggml_oracle
    from tests.quant.test_quantize_gguf import assert_same_model

    model = reference_gguf("gemma4_e2b", "f32")
    cal = real_text.write(tmp_path / "cal.txt", real_text.calibration_text()[:20000])
    im, _ = collect_imatrix(model, cal, ctx=64, chunks=3, progress=False)
    im_file = save_gguf(im, tmp_path / "imatrix.gguf")
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    quantize_gguf(model, ours, preset_name, imatrix=im_file, progress=False)
    ggml_oracle.llama_quantize(model, ref, presets.PRESETS[preset_name], imatrix=load(im_file).normalised())
    assert_same_model(ours, ref)


def test_imatrix_lowers_kl_on_real_gemma3(tmp_path):
    """Quality: Q3_K_M with a ggquant imatrix is closer to the F32 model than without one."""
    from tests.oracles.imatrix_quality import measure

    [(_, res)] = measure(tmp_path, ["Q3_K_M"], ctx=128, cal_chunks=4, eval_chunks_n=2, log=lambda *_: None)
    assert res["with"]["kl_mean"] < 0.8 * res["without"]["kl_mean"], res


def test_torch_backend_collects_each_matmul_input_once(reference_gguf):
    """Regression: the torch backend's fused `matmuls` must not route through the hooked
    `matmul` (which counted q/k/v and gate/up inputs twice)."""
    from ggquant.imatrix.collect import Collector
    from ggquant.runtime.cuda import CUDABackend
    from ggquant.runtime.model import ARCHITECTURES, Session, load_model

    path = reference_gguf("gemma4_e4b", "f32")
    ids = [2] + list(range(30, 61))
    cols = {}
    for kind in ("cpu", "torch"):
        if kind == "cpu":
            model = load_model(path, threads=2)
        else:
            r = GGUFReader(path)
            model = ARCHITECTURES[r.get("general.architecture")](r, CUDABackend(device="cpu"))
        col = Collector(len(ids))
        col.attach(model.backend)
        Session(model, len(ids), n_batch=len(ids)).eval(ids, "none")
        cols[kind] = col
    assert cols["torch"].counts == cols["cpu"].counts == {n: len(ids) for n in cols["cpu"].counts}
    for n, s in cols["cpu"].sums.items():  # plain fp32 torch vs ggml-emulating CPU arithmetic
        assert np.max(np.abs(cols["torch"].sums[n] - s)) <= 1e-3 * np.max(np.abs(s)), n


def test_cli_on_a_hf_folder_writes_the_same_file_as_on_the_converted_f32_gguf(tiny_model_dir, tmp_path):
    """`ggquant imatrix HF_DIR` runs the folder as its F32 conversion (built in memory, bf16 weights
    widened): the file equals, byte for byte, the one collected on the F32 GGUF `ggquant convert`
    writes."""
    from ggquant.convert import convert

    folder = tiny_model_dir("gemma4_e4b")
    gguf = convert(folder, outtype="f32", outfile=tmp_path / "m-{FTYPE}.gguf").written[0]
    cal = real_text.write(tmp_path / "cal.txt", real_text.calibration_text()[:8000])
    outs, stats = {}, {}
    for key, model in (("folder", folder), ("gguf", gguf)):
        outs[key] = tmp_path / f"{key}.gguf"
        r = CliRunner().invoke(main, ["imatrix", str(model), "-f", cal, "-o", str(outs[key]), "--ctx", "32",
                                      "--chunks", "2", "--threads", "2", "--json"])
        assert r.exit_code == 0, r.output
        stats[key] = json.loads(r.output)
        assert stats[key]["chunks"] == 2 and stats[key]["entries"] > 0
    assert stats["folder"]["weights"] == "Hugging Face folder converted in memory to F32"
    assert stats["gguf"]["weights"] == "GGUF"
    assert outs["folder"].read_bytes() == outs["gguf"].read_bytes()
    r = CliRunner().invoke(main, ["imatrix", str(gguf), "-f", cal, "-o", str(tmp_path / "x.gguf"), "--outtype", "f32"])
    assert r.exit_code == 1 and "--outtype applies to a Hugging Face folder" in r.output


def test_moe_statistics_per_expert_equal_llama_cpp(reference_gguf, tmp_path):
    """26B-A4B-like mixture of experts: the stacked experts' statistics (MUL_MAT_ID) are one row of
    sums and one count per expert, equal to llama.cpp's collection bit for bit; the dense
    matrices (the shared MLP, attention, the router) as before."""
    model = reference_gguf("gemma4_a4b", "f32")
    text = real_text.calibration_text()[:20000]
    ctx, n = 32, 2
    im, _ = collect_imatrix(model, real_text.write(tmp_path / "cal.txt", text), ctx=ctx, chunks=n, progress=False)
    ref = llama_imatrix.collect(model, chunks_like_llama_imatrix(model, text, ctx, n), ctx)
    experts = [k for k in ref if "_exps." in k]
    assert len(experts) == 2 * 8 and sorted(im.entries) == sorted(ref)
    for name, (sums, count) in ref.items():
        e = im.entries[name]
        assert e.counts.tolist() == np.atleast_1d(count).tolist(), name
        assert np.array_equal(e.sums, sums.reshape(e.sums.shape)), name
    e = im.entries["blk.0.ffn_down_exps.weight"]
    assert e.sums.shape == (12, 32) and e.counts.sum() == 3 * ctx * n  # top-3 of 12 experts per token


def test_moe_experts_never_routed_to_keep_count_zero_and_quantize_like_llama(reference_gguf, tmp_path):
    """A batch too short to reach every expert (5 tokens, top 3 of 12): the expert entries are
    collected anyway (no minimum batch for MUL_MAT_ID, while the dense ones need 16 tokens), the
    unused experts keep count 0 and zero sums, equal to llama.cpp's collection; saved as
    llama-imatrix saves partial entries, llama-quantize's normalisation gives those experts 1.0,
    and quantizing with the file equals llama_model_quantize."""
    from ggquant.imatrix.collect import Collector
    from ggquant.imatrix.files import save_gguf
    from ggquant.quant import presets
    from ggquant.runtime.model import Session, load_model
    from tests.oracles import ggml as ggml_oracle
    from tests.quant.test_quantize_gguf import assert_same_model

    model = reference_gguf("gemma4_a4b", "f32")
    ids = [2, 40, 41, 300, 7]
    m = load_model(model, threads=2)
    col = Collector(len(ids))
    col.attach(m.backend)
    Session(m, 16, n_batch=16).eval(ids, "none")
    im = col.to_imatrix(["short.txt"])
    ref = llama_imatrix.collect(model, [ids], 16)
    assert sorted(im.entries) == sorted(ref) and all("_exps." in k for k in ref)
    for name, (sums, counts) in ref.items():
        assert im.entries[name].counts.tolist() == counts.tolist() and np.array_equal(im.entries[name].sums, sums)
    e = im.entries["blk.3.ffn_gate_up_exps.weight"]
    unused = e.counts == 0
    assert unused.any() and not np.any(e.sums[unused]) and e.counts.sum() == 3 * len(ids)
    f = save_gguf(im, tmp_path / "partial.gguf")
    vec = load(f).normalised()["blk.3.ffn_gate_up_exps.weight"].reshape(12, -1)
    assert np.all(vec[unused] == 1.0)
    ours, ref_q = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    quantize_gguf(model, ours, "IQ4_XS", imatrix=f, progress=False)
    ggml_oracle.llama_quantize(model, ref_q, presets.PRESETS["IQ4_XS"], imatrix=load(f).normalised())
    assert_same_model(ours, ref_q)


def test_device_expert_sums_equal_the_host_collection():
    """observe_experts_device (the CUDA path: index_add_ on the device, no host copy per product)
    gives imatrix.cpp's per-expert sums and counts, as observe_experts does, up to float32 order:
    both input layouts (gate/up: one row per token; down: one per slot), experts never routed to."""
    import torch

    from ggquant.imatrix.collect import Collector

    rng = np.random.default_rng(4)
    E, K, T, k = 7, 48, 37, 3
    ids = np.stack([rng.permutation(E - 1)[:k] for _ in range(T)])  # expert E - 1: never routed to
    host, dev = Collector(T), Collector(T)
    for name, x in (("blk.0.ffn_gate_up_exps.weight", rng.standard_normal((T, K))),
                    ("blk.0.ffn_down_exps.weight", rng.standard_normal((T, k, K)) * 3)):
        x = x.astype(np.float32)
        for _ in range(2):  # two batches into the same accumulators
            host.observe_experts(name, E, x, ids)
            dev.observe_experts_device(name, E, torch.from_numpy(x), torch.from_numpy(ids))
    assert dev.chunk_count == host.chunk_count
    hs, ds = host.sums, dev.sums
    assert set(ds) == set(hs)
    for n in hs:
        assert np.array_equal(dev.counts[n], host.counts[n]) and dev.counts[n][-1] == 0, n
        assert np.allclose(ds[n], hs[n], rtol=1e-5, atol=0), n
