"""Gemma 4 Unified's suppress tokens: generation_config.json's suppress_tokens reach the GGUF
(tokenizer.ggml.suppress_tokens, an INT32 array llama.cpp loads), the runtime's tokenizer reads
them as llama-vocab.cpp does (ids outside the vocabulary dropped), and generation never samples
them (common/sampling.cpp gives them logit bias -inf)."""

import ctypes

import numpy as np

from ggquant.fixtures.gemma4 import UNIFIED_SUPPRESS_TOKENS
from ggquant.formats.gguf import GGUFReader
from ggquant.runtime.generate import generate
from ggquant.runtime.sampling import Sampler
from ggquant.runtime.tokenizer import Tokenizer


def test_llama_cpp_and_the_runtime_read_the_suppress_tokens(reference_gguf):
    import llama_cpp

    path = reference_gguf("gemma4_unified", "f32")
    with GGUFReader(path) as r:
        assert Tokenizer.from_gguf(r).suppress_ids == UNIFIED_SUPPRESS_TOKENS
    llm = llama_cpp.Llama(str(path), n_ctx=32, verbose=False)
    try:
        n = ctypes.c_int32(0)
        ids = llama_cpp.llama_vocab_get_suppress_tokens(llama_cpp.llama_model_get_vocab(llm.model), ctypes.byref(n))
        assert [ids[i] for i in range(n.value)] == UNIFIED_SUPPRESS_TOKENS
    finally:
        llm.close()


class _Logits:
    """A session stub whose next-token logits always favour one token."""

    def __init__(self, n_vocab, best):
        self.n_ctx, self.n_past = 64, 0
        self.logits = np.zeros((1, n_vocab), np.float32)
        self.logits[0, best] = 10.0
        self.logits[0, best + 1] = 5.0

    def eval(self, ids, logits="last"):
        self.n_past += len(ids)
        return self.logits.copy()


def test_generation_never_samples_a_suppressed_token(reference_gguf):
    with GGUFReader(reference_gguf("gemma4_unified", "f32")) as r:
        tok = Tokenizer.from_gguf(r)
    best = UNIFIED_SUPPRESS_TOKENS[0]
    gen = generate(_Logits(tok.n_vocab, best), tok, [2, 100], 3, Sampler(temp=0.0), stop_at_eog=False)
    assert gen.ids == [best + 1] * 3  # the suppressed favourite is skipped, the runner-up taken
    tok.suppress_ids = []
    gen = generate(_Logits(tok.n_vocab, best), tok, [2, 100], 3, Sampler(temp=0.0), stop_at_eog=False)
    assert gen.ids == [best] * 3
