"""Mixed precision (`ggquant quantize --target-bpw/--target-size`, --tensor-type-file, --like, verify).

The allocation's recipe must make llama.cpp's own llama_model_quantize write the very same file;
--like must reproduce a llama.cpp-quantized template byte for byte; verify must tell a file
quantized from its source from one that is not.
"""

import itertools

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as T

from ggquant.cli import main as cli
from ggquant.convert.gguf_to_gguf import quantize_gguf
from ggquant.convert.mix import Mix
from ggquant.convert.verify import verify_gguf
from ggquant.errors import GGQuantError
from ggquant.imatrix.files import load as load_imatrix
from ggquant.quant import allocate as al
from ggquant.quant import presets
from tests.oracles import ggml as ggml_oracle
from tests.quant.test_quantize_gguf import _random_imatrix, assert_same_model
from tests.toy_models import build_toy_llama


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from tests.imatrix_util import write_imatrix_gguf

    d = tmp_path_factory.mktemp("alloc")
    src = build_toy_llama(d / "toy.gguf", n_embd=320, tied=False, n_head_kv=4, seed=3)
    im = _random_imatrix(src, seed=3)
    im_file = write_imatrix_gguf(d / "imatrix.gguf", {k: v * 64 for k, v in im.items()}, {k: 64 for k in im})
    n = sum(int(t.n_elements) for t in gguf.GGUFReader(src).tensors)
    return {"src": src, "imatrix": im_file, "n": n, "dir": d}


def _bytes(path) -> int:
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


# --- the solvers, on synthetic items -------------------------------------------------------------


def _items(seed, n=6):
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        sizes = np.sort(rng.integers(10, 200, 4))
        errs = np.sort(rng.random(4) * 10)[::-1]
        opts = [al.Option(q, int(b), float(e), float(e)) for q, b, e in zip((T.Q2_K, T.Q3_K, T.Q4_K, T.Q8_0), sizes, errs)]
        items.append(al.Item(f"t{i}", (1, 256), opts))
    return items


@pytest.mark.parametrize("method", sorted(al.METHODS))
@pytest.mark.parametrize("seed", range(5))
def test_solver_never_exceeds_the_budget_and_is_near_optimal(method, seed):
    items = _items(seed)
    lo, hi = sum(it.options[0].nbytes for it in items), sum(it.options[-1].nbytes for it in items)
    for budget in np.linspace(lo, hi, 9).astype(int):
        a = al.allocate(items, int(budget), method)
        assert a.nbytes <= budget
        # against the exhaustive optimum (4^6 mixes): a heuristic, but never far off
        best = min(sum(o.cost for o in c) for c in itertools.product(*(it.options for it in items))
                   if sum(o.nbytes for o in c) <= budget)
        assert a.cost <= best * 1.25 + 1e-9
        assert al.allocate(items, int(budget), method).choice == a.choice  # deterministic
    assert al.allocate(items, hi, method).cost == sum(it.options[-1].cost for it in items)


def test_lagrange_closes_the_gap_of_a_big_tensor():
    """Gemma 3's case: one big tensor (the tied embedding) whose only upgrade is a large step, small
    tensors already near zero cost. Upgrading it and trimming the small ones beats leaving it: the
    relaxation alone cannot see that (it moves the big one whole, the fill only upgrades)."""
    def item(name, opts):
        return al.Item(name, (1, 256), [al.Option(q, b, e, e) for q, b, e in opts])

    big = item("embd", [(T.Q5_1, 600, 1.0), (T.Q8_0, 850, 0.0)])
    # per byte the small upgrades gain more (0.1 / 20 > 1.0 / 250), in all the big one gains more
    small = [item(f"t{i}", [(T.Q4_K, 40, 0.1), (T.Q6_K, 60, 0.0)]) for i in range(8)]
    items = [big, *small]
    budget = 850 + 8 * 60 - 3 * 20  # the big upgrade fits only if 3 small tensors step down
    a = al.allocate(items, budget, "lagrange")
    assert a.nbytes <= budget and a.choice["embd"] == T.Q8_0
    assert a.cost == pytest.approx(3 * 0.1)  # the exhaustive optimum; leaving the big one costs 1.0
    assert al.allocate(items, budget, "greedy").choice["embd"] == T.Q5_1  # greedy keeps the gap


def test_proxy_is_the_weighted_error_relative_to_the_weighted_energy():
    """Scale-free: a tensor times 2^k (exact in every block scale) has the same proxy errors; the
    value is sum a (w - q)^2 / sum a w^2 over the sampled rows, and 0 for an all-zero tensor."""
    from ggquant.quant import types as qtypes
    from ggquant.tensor import in_memory_blocks

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 64)).astype(np.float32)
    a = rng.random(64) + 0.5
    types = [T.Q4_0, T.Q8_0]

    def errs(w):
        return al.proxy_errors(in_memory_blocks("t", w.shape, T.F32, w), types, a, sample=16)

    base = errs(x)
    assert errs(x * 1024) == base and errs(np.zeros_like(x)) == {q: 0.0 for q in types}
    rows = al._sample_rows(40, 16)
    xs = x[rows].astype(np.float64)
    q = qtypes.get(T.Q4_0)
    d = xs - q.dequantize(q.quantize(x[rows], a, "t"), xs.shape)
    assert base[T.Q4_0] == pytest.approx(float((d ** 2 @ a).sum() / (xs ** 2 @ a).sum()), rel=1e-12)


def test_budget_below_the_smallest_mix_is_refused():
    items = _items(0)
    with pytest.raises(GGQuantError, match="below the smallest mix"):
        al.allocate(items, sum(it.options[0].nbytes for it in items) - 1)


# --- the whole job on a toy model, against llama.cpp ---------------------------------------------


@pytest.mark.parametrize("preset", ["Q4_K_M", "Q3_K_M"])
def test_target_size_fits_and_recipe_reproduces_in_ggquant_and_llama_cpp(toy, tmp_path, preset):
    src, im = toy["src"], toy["imatrix"]
    pre = tmp_path / "preset.gguf"
    quantize_gguf(src, pre, preset, imatrix=im, progress=False)
    budget = _bytes(pre)
    out, recipe = tmp_path / "mix.gguf", tmp_path / "recipe.txt"
    res = quantize_gguf(src, out, imatrix=im, mix=Mix(target_size=budget), recipe_out=recipe, progress=False)
    assert res.bytes_out == _bytes(out) <= budget
    assert res.allocation["bytes"] == res.bytes_out
    types = {t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert len(types & set(al.DEFAULT_CANDIDATES)) >= 3, "a mix, not one type"
    # the recipe, in ggquant...
    again = tmp_path / "again.gguf"
    quantize_gguf(src, again, res.outtype, imatrix=im, tensor_type_file=recipe, progress=False)
    assert again.read_bytes() == out.read_bytes()
    # ...and in llama.cpp (llama_model_quantize with the same rules, preset and imatrix)
    rules = [presets.Rule.parse(line) for line in recipe.read_text().split()]
    ref = tmp_path / "ref.gguf"
    ggml_oracle.llama_quantize(src, ref, presets.preset(res.outtype), imatrix=load_imatrix(im).normalised(),
                               tensor_types=[(r.pattern, r.qtype) for r in rules])
    assert_same_model(out, ref)


def test_allocation_is_deterministic_and_respects_the_policy(toy, tmp_path):
    src = toy["src"]
    budget_bpw = 5.5
    a = quantize_gguf(src, tmp_path / "a.gguf", mix=Mix(target_bpw=budget_bpw), dry_run=True, progress=False)
    b = quantize_gguf(src, tmp_path / "b.gguf", mix=Mix(target_bpw=budget_bpw), dry_run=True, progress=False)
    assert [(c.name, c.dst_type) for c in a.tensors] == [(c.name, c.dst_type) for c in b.tensors]
    assert 8 * a.bytes_out / toy["n"] <= budget_bpw
    by = {c.name: c for c in a.tensors}
    # the per-layer embedding table and the per-layer gates/projections keep >= 8 bpw (quant/policy.py)
    for name in ("per_layer_token_embd.weight", "blk.0.inp_gate.weight", "blk.3.proj.weight"):
        assert al.bpw(by[name].dst_type) >= 8.0, by[name]
        assert "floor 8 bpw" in by[name].reason
    assert not (tmp_path / "a.gguf").exists()


def test_greedy_and_lagrange_both_fit(toy):
    for method in al.METHODS:
        res = quantize_gguf(toy["src"], toy["dir"] / "x.gguf", mix=Mix(target_bpw=5.5, allocator=method),
                            dry_run=True, progress=False)
        assert 8 * res.bytes_out / toy["n"] <= 5.5
        assert res.allocation["method"] == method


def test_like_reproduces_a_llama_cpp_template(toy, tmp_path):
    src, im = toy["src"], toy["imatrix"]
    template = tmp_path / "template.gguf"
    ggml_oracle.llama_quantize(src, template, presets.preset("Q3_K_M"), imatrix=load_imatrix(im).normalised(),
                               tensor_types=[("ffn_down", T.Q6_K), ("attn_q", T.IQ4_XS)])
    ours = tmp_path / "like.gguf"
    res = quantize_gguf(src, ours, like=template, imatrix=im, progress=False)
    assert res.outtype == "Q3_K_M"  # the template's file type
    assert_same_model(ours, template)


def test_verify_tells_provenance(toy, tmp_path):
    src, im = toy["src"], toy["imatrix"]
    q = tmp_path / "q.gguf"
    ggml_oracle.llama_quantize(src, q, presets.preset("Q4_K_M"), imatrix=load_imatrix(im).normalised())
    ok = verify_gguf(q, src, imatrix=im)
    assert ok.identical and ok.counts() == {"identical": len(gguf.GGUFReader(q).tensors)}
    bad = verify_gguf(q, src)  # without the imatrix it was made with: the imatrix-using types differ
    assert not bad.identical
    differ = [t for t in bad.tensors if t.status == "differs"]
    assert differ and all("relative RMS" in t.detail for t in differ)
    other = build_toy_llama(tmp_path / "other.gguf", n_embd=320, tied=False, n_head_kv=4, seed=4)
    assert all(t.status != "identical" for t in verify_gguf(q, other, imatrix=im).tensors if t.qtype != "F32")
    r = CliRunner().invoke(cli, ["verify", str(q), "--source", str(src), "--imatrix", str(im)])
    assert r.exit_code == 0, r.output
    assert "IDENTICAL" in r.output
    r = CliRunner().invoke(cli, ["verify", str(q), "--source", str(src)])
    assert r.exit_code == 1 and "NOT IDENTICAL" in r.output


def test_cli_target_bpw_json_and_recipe(toy, tmp_path):
    import json

    out, recipe = tmp_path / "o.gguf", tmp_path / "r.txt"
    r = CliRunner().invoke(cli, ["quantize", str(toy["src"]), str(out), "--target-bpw", "5.5", "--imatrix",
                                 str(toy["imatrix"]), "--recipe-out", str(recipe), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["allocation"]["bpw"] <= 5.5 and rep["allocation"]["method"] == "lagrange"
    assert len(recipe.read_text().split()) == sum(
        presets.allows_quantization(t["name"], len(t["shape"])) for t in rep["tensors"])


# --- bad input: a clear error, nothing written ----------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    (dict(mix=Mix(target_bpw=0.5)), "below the smallest mix"),
    (dict(mix=Mix(target_bpw=40.0)), "above the model in F32"),
    (dict(mix=Mix(target_bpw=5.5, types=(T.Q4_K,))), "none of the candidate types"),
])
def test_bad_budgets(toy, tmp_path, kw, match):
    out, recipe = tmp_path / "o.gguf", tmp_path / "r.txt"
    with pytest.raises(GGQuantError, match=match):
        quantize_gguf(toy["src"], out, recipe_out=recipe, progress=False, **kw)
    assert not out.exists() and not recipe.exists()


@pytest.mark.parametrize("text, match", [
    ("^blk\\.99\\.attn_q\\.weight$=q4_k\n", "matches no quantizable tensor"),
    ("^output_norm\\.weight$=q4_k\n", "matches no quantizable tensor"),
    ("attn_q=q4_k attn_k\n", "expected REGEX=TYPE"),
    ("attn_q=q9_z\n", "q9_z"),
    ("attn_q=q4_k\n", "do not divide"),
    ("", "no REGEX=TYPE entries"),
])
def test_bad_recipes(toy, tmp_path, text, match):
    recipe, out = tmp_path / "r.txt", tmp_path / "o.gguf"
    recipe.write_text(text)
    with pytest.raises(GGQuantError, match=match):
        quantize_gguf(toy["src"], out, "Q4_K_M", tensor_type_file=recipe, progress=False)
    assert not out.exists()


def test_template_of_another_model_is_refused(toy, tmp_path):
    other = build_toy_llama(tmp_path / "other.gguf", n_embd=128, seed=5)
    out = tmp_path / "o.gguf"
    with pytest.raises(GGQuantError, match="not a quantization of this model"):
        quantize_gguf(toy["src"], out, like=other, progress=False)
    assert not out.exists()
    r = CliRunner().invoke(cli, ["quantize", str(toy["src"]), str(out), "--like", str(other)])
    assert r.exit_code == 1 and "error:" in r.output and not out.exists()


# --- the measured mode: KL through the runtime on a tiny Gemma 3 -------------------------------------


@pytest.fixture(scope="module")
def gemma3(reference_gguf, tmp_path_factory):
    from tests.oracles import real_text

    d = tmp_path_factory.mktemp("measured")
    text = real_text.calibration_text()[:20000]
    return {"src": reference_gguf("gemma3_text", "f32"), "text": text, "dir": d}


def test_kl_probe_is_zero_for_the_stored_type_and_positive_for_a_lossy_one(gemma3):
    from ggquant.runtime.model import load_model
    from ggquant.runtime.probe import KLProbe

    model = load_model(gemma3["src"])
    probe = KLProbe.from_text(model, gemma3["text"], ctx=32, n_chunks=1)
    name = "blk.0.ffn_down.weight"
    assert probe.kl(name, T.F32) == 0.0
    lossy = probe.kl(name, T.Q4_0)
    assert lossy > 0 and probe.kl(name, T.Q8_0) < lossy
    assert probe.kl(name, T.Q4_0) == lossy  # the weights come back after each probe


def test_kl_probe_runs_a_type_without_a_product_in_the_runtime_as_its_numbers(gemma3, monkeypatch):
    """Q2_K/Q3_K/... have no CPU product in the runtime: the probe multiplies by their dequantized
    values in F32, which differs from the real product only by the activation rounding."""
    from ggquant.runtime.model import load_model
    from ggquant.runtime.probe import KLProbe

    model = load_model(gemma3["src"])
    probe = KLProbe.from_text(model, gemma3["text"], ctx=32, n_chunks=1)
    name = "blk.0.ffn_down.weight"
    native = probe.kl(name, T.Q4_0)
    monkeypatch.setattr(type(model.backend), "types", tuple(t for t in model.backend.types if t != T.Q4_0))
    as_numbers = probe.kl(name, T.Q4_0)
    assert as_numbers > 0 and abs(as_numbers / native - 1) < 0.25, (as_numbers, native)


def test_measured_mode_fits_resumes_from_state_and_matches_on_ray(gemma3, tmp_path, monkeypatch):
    from ggquant.runtime import probe as probe_mod

    src = gemma3["src"]
    calls = []
    real_kl = probe_mod.KLProbe.kl
    monkeypatch.setattr(probe_mod.KLProbe, "kl", lambda self, n, q: calls.append((n, q)) or real_kl(self, n, q))
    state = tmp_path / "state.json"
    mix = dict(target_bpw=6.0, calibration=gemma3["text"], ctx=32, chunks=1, state=str(state))
    a = quantize_gguf(src, tmp_path / "a.gguf", mix=Mix(**mix), dry_run=True, progress=False)
    assert a.allocation["measured"] and a.allocation["cost_unit"] == "KL"
    assert a.allocation["bpw"] <= 6.0
    n_probes = len(calls)
    assert n_probes >= len(a.allocation["tensors"])  # every tensor measured at least once
    # resumed: nothing measured again, the same allocation
    b = quantize_gguf(src, tmp_path / "b.gguf", mix=Mix(**mix), dry_run=True, progress=False)
    assert len(calls) == n_probes
    assert [(c.name, c.dst_type) for c in a.tensors] == [(c.name, c.dst_type) for c in b.tensors]
    # a state file of other measurements is refused
    with pytest.raises(GGQuantError, match="measured with another ctx"):
        quantize_gguf(src, tmp_path / "c.gguf", mix=Mix(**{**mix, "ctx": 16}), dry_run=True, progress=False)
    # on a local Ray with 2 workers: the same measurements, so the same allocation
    pytest.importorskip("ray")
    ray_state = tmp_path / "ray-state.json"
    r = quantize_gguf(src, tmp_path / "r.gguf", mix=Mix(**{**mix, "state": str(ray_state)}, ray="local", workers=2),
                      dry_run=True, progress=False)
    import json

    assert json.loads(ray_state.read_text())["kl"] == json.loads(state.read_text())["kl"]
    assert [(c.name, c.dst_type) for c in r.tensors] == [(c.name, c.dst_type) for c in a.tensors]


@pytest.mark.parametrize("fmt", ["mlx", "glq"])
def test_like_another_tools_checkpoint(tmp_path, fmt):
    """--like an MLX (per-module bits) or GLQ (layer_bpw) checkpoint: every tensor of the float model
    gets the type `ggquant convert --outtype auto` gives that checkpoint's layer."""
    from ggquant.convert.hf_to_gguf import convert, plan_conversion
    from tests.quantized import gemma4_quantized as g4q

    if fmt == "mlx":
        qdir = g4q.build_mlx(bits=4, overrides={"model.language_model.layers.0.mlp.down_proj": {"bits": 8}})
    else:
        qdir = g4q.build_glq(layer=0)
    f32 = tmp_path / "f32.gguf"
    convert(g4q.dequantized_copy(qdir), outtype="f32", outfile=f32)
    out = tmp_path / "like.gguf"
    quantize_gguf(f32, out, like=qdir, progress=False)
    conv, _ = plan_conversion(qdir, outtype="auto")
    want = {t.name: t.qtype for t in conv.files[0].tensors}
    got = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    checked = [t.name for t in gguf.GGUFReader(out).tensors if presets.allows_quantization(t.name, len(t.shape))]
    assert len(checked) > 10
    assert {n: got[n] for n in checked} == {n: want[n] for n in checked}
    if fmt == "mlx":
        assert got["blk.0.ffn_down.weight"] != got["blk.1.ffn_down.weight"]  # the 8-bit module kept its bits
