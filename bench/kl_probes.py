"""Speed of the measured mode's KL probes: in this process vs on a local Ray with 1..N workers.

    .venv/bin/python bench/kl_probes.py [--probes 12] [--workers 1,2] [--ctx 64] [--device cpu]

Times the same (tensor, type) probes on the real Gemma 3 270M (F32 from the PyPI Q4_K_M model)
and checks that every way of running them gives the same KL values, bit for bit.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gguf import GGMLQuantizationType as T  # noqa: E402

from ggquant.convert.gguf_to_gguf import quantize_gguf  # noqa: E402
from ggquant.convert.kl_probes import measure_kl  # noqa: E402
from ggquant.convert.mix import Mix  # noqa: E402
from tests.oracles import real_text  # noqa: E402
from tests.oracles.real_models import gemma3_270m_gguf  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--probes", type=int, default=12)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parent.parent / ".cache" / "bench-allocation" / "gemma3")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    f32 = a.work / "F32.gguf"  # shared with bench/allocation.py --model gemma3
    if not f32.exists():
        quantize_gguf(gemma3_270m_gguf(), f32, "F32", allow_requantize=True, progress=False)
    names = [f"blk.{i}.{t}.weight" for i in range(18) for t in ("attn_q", "ffn_down", "ffn_up")][: a.probes]
    pairs = [(n, T.Q4_0) for n in names]
    mix = Mix(calibration=real_text.calibration_text(), ctx=a.ctx, chunks=1, device=a.device)
    t = time.perf_counter()
    base = measure_kl(f32, pairs, mix, {})
    serial = time.perf_counter() - t
    print(f"{len(pairs)} probes of {a.ctx} tokens, {a.device}: in process {serial:.1f} s "
          f"({serial / len(pairs):.2f} s/probe, model load included)")
    for w in (int(x) for x in a.workers.split(",")):
        mix.ray, mix.workers = "local", w
        t = time.perf_counter()
        got = measure_kl(f32, pairs, mix, {})
        secs = time.perf_counter() - t
        same = got == base
        print(f"  Ray, {w} worker(s): {secs:.1f} s (x{serial / secs:.2f} vs in process; Ray start and a model "
              f"load per worker included); same KL values: {same}")
        if not same:
            sys.exit("Ray results differ from the in-process ones")


if __name__ == "__main__":
    main()
