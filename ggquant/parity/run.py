"""`ggquant parity`: run ggquant and a reference engine on the same token ids, chunk by chunk.

Chunking follows llama-perplexity: the text is tokenized once (without BOS) and cut into chunks
of ctx positions; each chunk starts with BOS (when the vocabulary adds one) followed by the next
ctx - 1 text tokens, and each engine evaluates every chunk in a fresh context.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ggquant.errors import GGQuantError

from .stats import ParityStats


@dataclass
class ParityResult:
    model: str
    reference: str
    ctx: int
    stats: ParityStats

    def to_json(self) -> dict:
        return {"model": self.model, "reference": self.reference, "ctx": self.ctx, **self.stats.summary(),
                "kl_per_chunk": self.stats.per_chunk_kl()}


def chunk_ids(text_ids: list[int], ctx: int, bos: int | None, chunks: int | None) -> list[list[int]]:
    step = ctx - 1 if bos is not None else ctx
    if step < 1:
        raise GGQuantError(f"--ctx {ctx} is too small")
    out = []
    for s in range(0, len(text_ids), step):
        body = text_ids[s:s + step]
        if len(body) < 2:
            break
        out.append(([bos] if bos is not None else []) + body)
        if chunks is not None and len(out) >= chunks:
            break
    if not out:
        raise GGQuantError(f"the text has {len(text_ids)} tokens: too short for a comparison")
    return out


def run_parity(model_path: str | Path, against: str, text: str, ctx: int = 512, chunks: int | None = None,
               device: str = "cpu", threads: int | None = None,
               progress: Callable[[int, int, ParityStats], None] | None = None) -> ParityResult:
    from ggquant.formats.gguf import GGUFReader
    from ggquant.runtime.tokenizer import Tokenizer

    from .engines import GgquantEngine, HFEngine, make_engine

    model_path = Path(model_path)
    if not model_path.is_file():
        raise GGQuantError(f"{model_path}: no such GGUF file")
    if ctx < 2:
        raise GGQuantError(f"--ctx must be at least 2, got {ctx}")
    tok = Tokenizer.from_gguf(GGUFReader(model_path))
    ids = tok.encode(text, add_special=False)
    pieces = chunk_ids(ids, ctx, tok.bos_id if tok.add_bos else None, chunks)
    ref = make_engine(against, model_path, device, threads, ctx)
    # transformers is the exact-math reference: compare with ggquant's exact GELU there
    gelu = "exact" if isinstance(ref, HFEngine) else "ggml"
    ours = GgquantEngine(model_path, device=device, threads=threads, gelu=gelu, n_ctx=ctx)
    stats = ParityStats()
    for i, chunk in enumerate(pieces):
        a = ours.eval(chunk)
        b = ref.eval(chunk)
        stats.update(a, b, chunk)
        del a, b
        if progress is not None:
            progress(i + 1, len(pieces), stats)
    ref.close()
    return ParityResult(str(model_path), ref.name, ctx, stats)


def format_result(res: ParityResult) -> str:
    s = res.stats.summary()
    return "\n".join([
        f"model      {res.model}",
        f"reference  {res.reference}",
        f"positions  {s['positions']} in {s['chunks']} chunk(s) of up to {res.ctx}",
        f"KL(ref||model)  mean {s['kl_mean']:.3e}   p99 {s['kl_p99']:.3e}   max {s['kl_max']:.3e}",
        f"top-1 agreement {100 * s['top1_agreement']:.2f}%",
        f"NMSE            {s['nmse']:.3e}   max |dlogit| {s['max_abs_logit_diff']:.3e}",
        f"perplexity      model {s['ppl_model']:.4f}   reference {s['ppl_reference']:.4f}",
    ])


def plot(res: ParityResult, out: str | Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise GGQuantError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from None
    import numpy as np

    out = Path(out)
    kl = np.asarray(res.stats.kl)
    fig, axes = plt.subplots(2, 1, figsize=(10, 6), constrained_layout=True)
    axes[0].plot(np.arange(len(kl)), np.maximum(kl, 1e-12), lw=0.6)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("position (all chunks)")
    axes[0].set_ylabel("KL(ref || model)")
    axes[0].set_title(f"{Path(res.model).name} vs {res.reference}")
    per = res.stats.per_chunk_kl()
    axes[1].bar(np.arange(len(per)), per)
    axes[1].set_xlabel("chunk")
    axes[1].set_ylabel("mean KL")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def read_text(path: str | Path | None) -> str:
    if path is None or str(path) == "-":
        return sys.stdin.read()
    p = Path(path)
    if not p.is_file():
        raise GGQuantError(f"--text {p}: no such file")
    return p.read_text(encoding="utf-8", errors="replace")
