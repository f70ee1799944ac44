"""Batched products on the GPU (issue 17): one [T, K] activation block times an E4B-shaped weight,
per weight type and per way of computing it, timed and checked, so the backend's PREFILL_MODE and
triton.py's MM_CONFIG rest on measurements.

    python bench/prefill_matmul.py [--tokens 512] [--json out.json]

Ways (ggquant/runtime/cuda.py):
  f32     dequantize to float32 (dequantize_parts), float32 GEMM: the backend before issue 17
  cublas  dequant_half (one Triton pass: blocks -> fp16/bf16) + torch.mm, float32 accumulation
  cached  torch.mm on a kept fp16/bf16 copy (half_cache=True): cuBLAS alone, the floor of cublas
  triton  matmul_q: dequantized tiles into tl.dot, per MM_CONFIG candidate
Weights are random parts in each repacked layout (speed does not depend on the values; the
kernels' values are checked by tests/runtime/test_cuda_prefill.py); each result is also compared
with the f32 way: ||out - ref|| / ||ref|| (fp16 operands: ~1e-3). Times: triton.testing.do_bench
medians (CUDA events). TFLOP/s = 2 T N K / time; the bf16 ceiling is a large torch.mm measured here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# E4B's matrix shapes (N, K): gate/up, down, q (sliding / full), o (sliding / full), k/v, PLE proj
SHAPES = [(10240, 2560), (2560, 10240), (2048, 2560), (512, 2560)]
TYPES = ["bf16", "f16", "q8_0", "q4_k", "q6_k", "q4_0"]
CONFIGS = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4)]


def parts_for(torch, t, n, k, dev):
    """(kind, parts) of a random weight in the layout the backend keeps for type t."""
    g = torch.Generator(device=dev).manual_seed(n * 7 + k)
    if t in ("bf16", "f16"):
        dt = torch.bfloat16 if t == "bf16" else torch.float16
        return "dense", (torch.randn(n, k, device=dev, generator=g).mul_(0.02).to(dt),)
    if t in ("q8_0", "q4_0", "q6_k"):
        lo, hi, gs = {"q8_0": (-127, 128, 32), "q4_0": (-8, 8, 32), "q6_k": (-32, 32, 16)}[t]
        q = torch.randint(lo, hi, (n, k), device=dev, generator=g, dtype=torch.int8)
        s = (torch.rand(n, k // gs, device=dev, generator=g) * 1e-3 + 1e-4)
        return "int8", (q, s.to(torch.float16) if t != "q6_k" else s)
    if t == "q4_k":
        u8 = torch.uint8
        qs = torch.randint(0, 256, (n, k // 2), device=dev, generator=g, dtype=torch.int32).to(u8)
        sc = torch.randint(8, 16, (n, k // 32), device=dev, generator=g, dtype=torch.int32).to(u8)
        mn = torch.randint(30, 57, (n, k // 32), device=dev, generator=g, dtype=torch.int32).to(u8)
        d = torch.full((n, k // 256), 1e-3, device=dev, dtype=torch.float16)
        return "q4_k", (qs, sc, mn, d, (d.float() * 2).to(torch.float16))
    raise ValueError(t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[512])
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import torch
    import triton.testing as tt

    from ggquant.kernels.cuda import triton as ck
    from ggquant.kernels.cuda.dequant import dequantize_parts

    dev = torch.device("cuda")
    bench = lambda f: tt.do_bench(f, warmup=25, rep=100, return_mode="median")  # noqa: E731 (ms)
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    peak = 2 * 8192 ** 3 / bench(lambda: torch.mm(a, b)) / 1e9
    del a, b
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}; bf16 torch.mm 8192^3: {peak:.0f} TFLOP/s",
          flush=True)

    def mm32(xh, wh):
        try:
            return torch.mm(xh, wh.T, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            return torch.mm(xh, wh.T).float()

    rows = []
    for T in args.tokens:
        for t in args.types.split(","):
            for n, k in SHAPES:
                kind, parts = parts_for(torch, t, n, k, dev)
                dt = torch.bfloat16 if t == "bf16" else torch.float16
                x = torch.randn(T, k, device=dev) * 0.5
                xh = x.to(dt)
                flop = 2 * T * n * k
                w32 = dequantize_parts(torch, kind, parts)
                ref = (x.double() @ w32.double().T)
                nref = ref.norm().item()
                del w32
                res = {"tokens": T, "type": t, "n": n, "k": k}

                def record(name, f):
                    out = f()
                    err = ((out.double() - ref).norm() / nref).item()
                    ms = bench(f)
                    res[name] = {"ms": ms, "tflops": flop / ms / 1e9, "rel_err": err}

                record("f32", lambda: x @ dequantize_parts(torch, kind, parts).T)
                if kind == "dense":
                    record("cached", lambda: mm32(x.to(dt), parts[0]))
                else:
                    record("cublas", lambda: mm32(x.to(dt), ck.dequant_half(torch, kind, parts, n, k, dt)))
                    wh = ck.dequant_half(torch, kind, parts, n, k, dt)
                    record("cached", lambda: mm32(x.to(dt), wh))
                    del wh
                    if dt == torch.float16:
                        for c in CONFIGS:
                            try:
                                record("triton" + "_".join(map(str, c)),
                                       lambda: ck.matmul_q(torch, kind, parts, x.to(dt), n, k, config=c))
                            except Exception as e:  # a config that does not fit (shared memory)
                                res["triton" + "_".join(map(str, c))] = {"error": str(e)[:200]}
                rows.append(res)
                ways = {kk: v for kk, v in res.items() if isinstance(v, dict) and "ms" in v}
                best = min(ways, key=lambda kk: ways[kk]["ms"])
                print(f"T={T} {t:5} {n:5}x{k:5}  " + "  ".join(
                    f"{kk}={v['ms'] * 1e3:7.1f}us/{v['tflops']:5.0f}TF/e{v['rel_err']:.0e}" for kk, v in ways.items())
                      + f"  best {best}", flush=True)
                del parts, x, xh, ref
                torch.cuda.empty_cache()
    # per type, summed over the shapes: which way wins
    print("\nsummed over the shapes (us):")
    for T in args.tokens:
        for t in args.types.split(","):
            rs = [r for r in rows if r["type"] == t and r["tokens"] == T]
            ways = sorted({kk for r in rs for kk, v in r.items() if isinstance(v, dict) and "ms" in v})
            tot = {w: sum(r[w]["ms"] for r in rs if w in r and "ms" in r[w]) * 1e3 for w in ways
                   if all(w in r and "ms" in r[w] for r in rs)}
            print(f"  T={T} {t:5} " + "  ".join(f"{w}={v:8.1f}" for w, v in sorted(tot.items(), key=lambda kv: kv[1])))
    if args.json:
        args.json.write_text(json.dumps({"peak_bf16_tflops": peak, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
