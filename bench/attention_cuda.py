"""Prefill attention on the GPU (issue 17): the torch path (baddbmm of q against the cache window
with a float32 mask, softmax, bmm: CUDABackend.attention without kernels) against the Triton
flash-attention kernel (kernels/cuda/triton.py attention_prefill), for Gemma 4 E4B-like shapes:
H = 8 query heads on Hkv = 2 KV heads, D = 256 (sliding layers) and 512 (full layers), T = 512
queries at the end of n_kv cached positions (a prefill chunk after a cached prefix), window 512
(the sliding layers) and 0.

    python bench/attention_cuda.py                 # the table, then candidate configs (< 60 s on an H100)
    python bench/attention_cuda.py --compile-only  # no GPU needed: ptxas's shared memory / registers /
                                                   # spills of each candidate config for sm_90

Times: CUDA-event medians (ms) over --reps calls after warm-up calls (which compile the kernel and
build the torch path's mask, as the layers of one forward share it). q, k, v: unit normals, scale
1/sqrt(D) (scores of unit variance). diff: max |kernel - torch| (fp16 operands: ~1e-3 here).
TFLOP/s: 4 * D * H * (visible query-key pairs) per time, the kernel's useful work (the torch path
also multiplies the masked pairs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

H, HKV, T = 8, 2, 512
DIMS, N_KV, WINDOWS = (256, 512), (512, 4096, 8192), (512, 0)
TUNE_N_KV = 4096  # the shape candidate configs are timed on (no window)
# (BM, BN, BK, BV, num_warps, num_stages) tried besides ATTN_PREFILL_CONFIG, per head dimension
CANDIDATES = {256: [(64, 32, 128, 256, 8, 2), (128, 32, 64, 128, 8, 2), (32, 32, 256, 256, 4, 2)],
              512: [(64, 32, 64, 128, 4, 2), (64, 32, 128, 128, 8, 2), (32, 32, 128, 256, 4, 2)]}


def compile_only(configs: dict) -> None:
    """Compile _attn_prefill for sm_90 (no GPU needed) and print ptxas -v's figures per config."""
    import os
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ggquant.kernels.cuda import triton as ck

    sig = {"q_ptr": "*fp32", "k_ptr": "*fp32", "v_ptr": "*fp32", "pos_ptr": "*i64", "o_ptr": "*fp32", "T": "i32",
           "H": "i32", "n_kv": "i32", "kv_stride": "i32", "window": "i32", "scale": "fp32", "G": "i32", "D": "i32",
           "BM": "constexpr", "BN": "constexpr", "BD": "constexpr", "BK": "constexpr", "BV": "constexpr"}
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    for bd, cfgs in configs.items():
        for bm, bn, bk, bv, warps, stages in cfgs:
            src = ASTSource(ck._attn_prefill, sig, constexprs={"BM": bm, "BN": bn, "BD": bd, "BK": bk, "BV": bv})
            name = f"D={bd} BM={bm} BN={bn} BK={bk} BV={bv} warps={warps} stages={stages}"
            try:
                kern = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": warps, "num_stages": stages})
            except Exception as e:  # noqa: BLE001 (out of resources, ...: reported, the next config goes on)
                print(f"{name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                f.write(kern.asm["ptx"])
            r = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
            os.unlink(f.name)
            info = "; ".join(line.split("info    : ")[-1].strip() for line in r.stderr.splitlines()
                             if "registers" in line or "spill" in line)
            mma = "wgmma" if "wgmma" in kern.asm["ptx"] else "mma.sync"
            print(f"{name}: shared {kern.metadata.shared} B, {mma}; {info}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--compile-only", action="store_true")
    args = ap.parse_args(argv)

    from ggquant.kernels.cuda import triton as ck

    configs = {d: [ck.ATTN_PREFILL_CONFIG[d]] + CANDIDATES[d] for d in DIMS}
    if args.compile_only:
        compile_only(configs)
        return 0

    import numpy as np
    import torch
    from types import SimpleNamespace

    from ggquant.runtime.cuda import CUDABackend

    dev = torch.device("cuda")
    old = CUDABackend(device="cuda", kernels=False, graphs=False)
    new = CUDABackend(device="cuda", graphs=False)
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}; H={H} Hkv={HKV} T={T}", flush=True)

    def timed(f) -> float:
        for _ in range(2):
            f()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(args.reps)]
        for a, b in ev:
            a.record()
            f()
            b.record()
        torch.cuda.synchronize()
        return float(np.median([a.elapsed_time(b) for a, b in ev]))

    def case(D, n_kv, window):
        g = torch.Generator(device=dev).manual_seed(D + n_kv)
        q = torch.randn(T, H, D, device=dev, generator=g)
        layer = SimpleNamespace(k=torch.randn(HKV, n_kv, D, device=dev, generator=g),
                                v=torch.randn(HKV, n_kv, D, device=dev, generator=g))
        pos = np.arange(n_kv - T, n_kv)
        j = np.arange(n_kv)
        vis = (j[None, :] <= pos[:, None]) & ((window == 0) | (pos[:, None] - j[None, :] < window))
        flop = 4.0 * D * H * float(vis.sum())
        return q, layer, pos, flop

    print(f"{'D':>4} {'n_kv':>5} {'window':>6} {'torch ms':>9} {'kernel ms':>9} {'speedup':>8} {'TFLOP/s':>8} "
          f"{'max|diff|':>10}", flush=True)
    for D in DIMS:
        for n_kv in N_KV:
            for window in WINDOWS:
                q, layer, pos, flop = case(D, n_kv, window)
                scale = D ** -0.5
                ref = old.attention(q, layer, n_kv, pos, window, scale)
                got = new.attention(q, layer, n_kv, pos, window, scale)
                diff = (got - ref).abs().max().item()
                t_old = timed(lambda: old.attention(q, layer, n_kv, pos, window, scale))
                t_new = timed(lambda: new.attention(q, layer, n_kv, pos, window, scale))
                print(f"{D:>4} {n_kv:>5} {window:>6} {t_old:>9.3f} {t_new:>9.3f} {t_old / t_new:>7.2f}x "
                      f"{flop / t_new / 1e9:>8.1f} {diff:>10.2e}", flush=True)
                del q, layer, ref, got
        old._masks.clear()

    # candidate configs (the first: ATTN_PREFILL_CONFIG) on one shape per head dimension
    n_kv, window = TUNE_N_KV, 0
    for D in DIMS:
        q, layer, pos, flop = case(D, n_kv, window)
        pos_d = torch.as_tensor(pos, device=dev)
        scale = D ** -0.5
        ref = old.attention(q, layer, n_kv, pos, window, scale).reshape(T, H, D)
        for cfg in configs[D]:
            f = lambda: ck.attention_prefill(torch, q, layer.k, layer.v, pos_d, n_kv, window, scale, cfg)  # noqa: E731
            try:
                diff = (f() - ref).abs().max().item()
                ms = timed(f)
            except Exception as e:  # noqa: BLE001 (a config that does not compile: reported)
                print(f"D={D} n_kv={n_kv} config {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            print(f"D={D} n_kv={n_kv} window={window} config (BM, BN, BK, BV, warps, stages) {cfg}: {ms:.3f} ms, "
                  f"{flop / ms / 1e9:.1f} TFLOP/s, max|diff| {diff:.2e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
