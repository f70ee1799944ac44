"""Does a ggquant imatrix make quantization better? Measured on the real Gemma 3 270M.

    .venv/bin/python bench/imatrix_quality.py [--ctx 256] [--cal-chunks 8] [--eval-chunks 4]

See tests/imatrix/quality.py for the method (reference: the F32 dequantization of the PyPI
Q4_K_M model; calibration and evaluation on disjoint halves of Python's reference docs).
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.oracles.imatrix_quality import measure  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--cal-chunks", type=int, default=8)
    ap.add_argument("--eval-chunks", type=int, default=4)
    ap.add_argument("--presets", default="Q4_K_M,IQ4_XS,Q3_K_M")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent.parent / ".cache") as d:
        measure(Path(d), a.presets.split(","), a.ctx, a.cal_chunks, a.eval_chunks)


if __name__ == "__main__":
    main()
