"""Prompt processing in batches, then token-by-token decoding with the KV cache."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ggquant.errors import GGQuantError

from .model import Session
from .sampling import Sampler
from .tokenizer import Tokenizer


@dataclass
class Generation:
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)  # generated tokens
    text: str = ""
    stop: str = ""  # "eog", "length", "context"
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    prompt_logits: np.ndarray | None = None  # [n_prompt, n_vocab] when asked for

    @property
    def prompt_tps(self) -> float:
        return len(self.prompt_ids) / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        return len(self.ids) / self.decode_seconds if self.decode_seconds else 0.0


def generate(session: Session, tokenizer: Tokenizer | None, prompt_ids: list[int], n_predict: int,
             sampler: Sampler, on_text: Callable[[str], None] | None = None, all_logits: bool = False,
             stop_at_eog: bool = True) -> Generation:
    """Evaluate the prompt (one pass over batches of session.n_batch), then sample n_predict tokens."""
    if not prompt_ids:
        raise GGQuantError("the prompt is empty: nothing to condition on")
    if len(prompt_ids) > session.n_ctx:
        raise GGQuantError(f"the prompt has {len(prompt_ids)} tokens but the context holds {session.n_ctx}; "
                           f"shorten the prompt or raise --ctx-size (the model was trained with "
                           f"{session.model.n_ctx_train})")
    gen = Generation(prompt_ids=list(prompt_ids))
    dec = tokenizer.stream_decoder() if tokenizer is not None else None
    t0 = time.perf_counter()
    logits = session.eval(prompt_ids, "all" if all_logits else "last")
    gen.prompt_seconds = time.perf_counter() - t0
    if all_logits:
        gen.prompt_logits = logits
    last = logits[-1]
    t0 = time.perf_counter()
    eog = tokenizer.eog_ids if (tokenizer is not None and stop_at_eog) else set()
    suppress = np.asarray(tokenizer.suppress_ids if tokenizer is not None else [], dtype=np.int64)
    for _ in range(n_predict):
        if suppress.size:  # common/sampling.cpp: the model's suppress tokens get logit bias -inf
            last = np.array(last, dtype=np.float32)
            last[suppress] = -np.inf
        tid = sampler(last)
        if tid in eog:
            gen.stop = "eog"
            break
        gen.ids.append(tid)
        if dec is not None:
            piece = dec.push(tid)
            gen.text += piece
            if on_text is not None and piece:
                on_text(piece)
        if len(gen.ids) == n_predict:
            gen.stop = "length"
            break
        if session.n_past >= session.n_ctx:
            gen.stop = "context"
            break
        last = session.eval([tid], "last")[-1]
    else:
        gen.stop = gen.stop or "length"
    if dec is not None:
        tail = dec.flush()
        if tail:
            gen.text += tail
            if on_text is not None:
                on_text(tail)
    gen.decode_seconds = time.perf_counter() - t0
    return gen


def run(model, prompt: str = "", n_predict: int = 128, *, temp: float = 0.0, top_k: int = 40, top_p: float = 0.95,
        min_p: float = 0.05, seed: int | None = None, device: str = "cpu", threads: int | None = None,
        ctx: int | None = None, n_batch: int = 512, add_bos: bool = True, special: bool = False,
        outtype: str | None = None, all_logits: bool = False,
        on_text: Callable[[str], None] | None = None) -> tuple[Generation, object, list[int]]:
    """`ggquant run`: load MODEL (a GGUF, or a Hugging Face folder converted in memory), tokenize
    the prompt, evaluate it and sample n_predict tokens. Returns (generation, model, prompt ids)."""
    from .model import load_model

    if n_predict < 0:
        raise GGQuantError(f"-n must be >= 0, got {n_predict}")
    sampler = Sampler(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    m = load_model(model, device=device, threads=threads, outtype=outtype)
    tok = Tokenizer.from_gguf(m.reader)
    ids = tok.encode(prompt, add_special=add_bos, parse_special=special)
    if not ids:
        raise GGQuantError("the prompt is empty (and no BOS is added): give --prompt")
    if ctx is None:
        ctx = min(m.n_ctx_train, len(ids) + max(n_predict, 1))
    if ctx > m.n_ctx_train:
        raise GGQuantError(f"--ctx-size {ctx} exceeds the model's training context {m.n_ctx_train}")
    if len(ids) > ctx:
        raise GGQuantError(f"the prompt has {len(ids)} tokens but the context holds {ctx} "
                           f"(the model's training context is {m.n_ctx_train}); shorten the prompt or raise --ctx-size")
    gen = generate(Session(m, n_ctx=ctx, n_batch=n_batch), tok, ids, n_predict, sampler, on_text=on_text,
                   all_logits=all_logits)
    return gen, m, ids

