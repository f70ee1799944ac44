"""llama.cpp's logits for a token sequence (llama-cpp-python, one batch, F32 KV cache)."""

from __future__ import annotations

import numpy as np


def llama_cpp_logits(path, ids: list[int], n_ctx: int = 64) -> np.ndarray:
    """float32 [len(ids), n_vocab]: the logits of every position of `ids`, evaluated in one batch."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, type_k=0, type_v=0,
                          flash_attn=False, n_threads=2, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()
