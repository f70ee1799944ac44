"""GB/s of the Triton matvec kernels (kernels/ggquant_kernels/cuda/triton.py) for each tile config on the
matrix shapes of Gemma 4 E4B, timed as a CUDA graph of calls (no launch gaps) that cycle through
enough copies of each matrix to exceed the L2 cache (a decode step reads every weight cold), on a GPU:

    python bench/matvec_tune.py dense,q8_0,q4_k          (also iq4_xs, iq3_s, iq2_s)

Prints the best configs over all shapes; MV_CONFIG holds the chosen ones."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

from ggquant.kernels.cuda import triton as ck  # noqa: E402
from ggquant.runtime.cuda import repack  # noqa: E402

SHAPES = [(2048, 2560), (512, 2560), (10240, 2560), (2560, 10240), (2560, 4096), (262144, 2560), (256, 2560), (2560, 256)]
KIND = {"dense": T.BF16, "q8_0": T.Q8_0, "q4_k": T.Q4_K, "iq4_xs": T.IQ4_XS, "iq3_s": T.IQ3_S, "iq2_s": T.IQ2_S}
ROW = {"dense": lambda k: 2 * k, "q8_0": lambda k: k // 32 * 34, "q4_k": lambda k: k // 256 * 144,
       "iq4_xs": lambda k: k // 256 * 136, "iq3_s": lambda k: k // 256 * 110, "iq2_s": lambda k: k // 256 * 82}
SUPER = ("q4_k", "iq4_xs", "iq3_s", "iq2_s")  # configs: (rows, super-blocks per iteration, warps)


def time_calls(fn, n=20):
    fn(0)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(5):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / (5 * n) * 1e-3


def main():
    kinds = sys.argv[1].split(",") if len(sys.argv) > 1 else ["dense"]
    configs = [(bn, bk, w) for bn in (4, 8, 16, 32) for bk in (128, 256, 512) for w in (4, 8)]
    for kind in kinds:
        tot = {}
        for n, k in SHAPES:
            raw = torch.randint(0, 255, (n, ROW[kind](k)), dtype=torch.uint8, device="cuda")
            if kind == "dense":
                raw = (torch.randn(n, k, device="cuda") * 0.05).to(torch.bfloat16).view(torch.uint8)
            if kind == "q8_0":  # sane fp16 scales
                b = raw.view(n, k // 32, 34)
                b[..., 0:2] = torch.tensor([0x00, 0x20], dtype=torch.uint8, device="cuda")
            if kind == "q4_k":
                b = raw.view(n, k // 256, 144)
                b[..., 0:4] = torch.tensor([0x00, 0x20, 0x00, 0x20], dtype=torch.uint8, device="cuda")
            if kind.startswith("iq"):  # a sane fp16 d; every other byte pattern is a valid block
                raw.view(n, k // 256, -1)[..., 0:2] = torch.tensor([0x00, 0x20], dtype=torch.uint8, device="cuda")
            nbytes = n * ROW[kind](k)
            copies = []
            for _ in range(max(1, -(-(256 << 20) // nbytes))):  # > 50 MB of L2: every call reads from HBM
                copies.append(repack(torch, KIND[kind], raw.clone(), k))
            x = torch.randn(k, device="cuda")
            cfgs = [(bn, nsb, w) for bn in (4, 8, 16, 32) for nsb in (1, 2, 4) for w in (4, 8)] if kind in SUPER else configs
            best = None
            for cfg in cfgs + [None]:  # None: the shape-dependent choice matvec makes by itself
                try:
                    t = time_calls(lambda i: ck.matvec(torch, *copies[i % len(copies)], x, n, k, cfg),
                                   min(1000, max(20, len(copies))))
                except Exception as e:  # noqa: BLE001
                    print(kind, cfg, "failed", type(e).__name__, str(e)[:100])
                    continue
                tot.setdefault(cfg, 0.0)
                tot[cfg] += t
                if cfg is None:
                    print(f"{kind} {n}x{k} default: {t * 1e6:8.1f} us {nbytes / t / 1e9:7.0f} GB/s")
                else:
                    best = min(best or (t, cfg), (t, cfg))
            print(f"{kind} {n}x{k} best {best[1]}: {best[0] * 1e6:8.1f} us {nbytes / best[0] / 1e9:7.0f} GB/s")
        total_bytes = sum(n * ROW[kind](k) for n, k in SHAPES)
        best = sorted(((c, t) for c, t in tot.items() if c is not None), key=lambda kv: kv[1])[:6]
        for cfg, t in best:
            print(f"{kind} all shapes {cfg}: {t * 1e6:8.1f} us, {total_bytes / t / 1e9:7.0f} GB/s")
        print(f"{kind} default: {tot[None] * 1e6:8.1f} us, {total_bytes / tot[None] / 1e9:7.0f} GB/s")


if __name__ == "__main__":
    main()
