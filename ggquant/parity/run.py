"""`ggquant parity`: run ggquant and a reference engine on the same token ids, chunk by chunk.

MODEL may be a GGUF or a Hugging Face folder. A folder runs in ggquant's runtime as its F32
conversion, built in memory (runtime/hf_source.py); llama.cpp cannot read a folder, so for
`--against llama.cpp` the folder is converted to a temporary F32 GGUF (the same bytes) in a
temporary directory that is removed when the comparison ends, whatever happens, and the result
says so.

Chunking follows llama-perplexity: the text is tokenized once (without BOS) and cut into chunks
of ctx positions; each chunk starts with BOS (when the vocabulary adds one) followed by the next
ctx - 1 text tokens, and each engine evaluates every chunk in a fresh context.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from dataclasses import dataclass, field
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
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"model": self.model, "reference": self.reference, "ctx": self.ctx, **self.stats.summary(),
                "kl_per_chunk": self.stats.per_chunk_kl(), "notes": list(self.notes)}


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
               progress: Callable[[int, int, ParityStats], None] | None = None,
               log: Callable[[str], None] | None = None) -> ParityResult:
    """Compare ggquant on MODEL (a GGUF or a Hugging Face folder) with `against`, chunk by chunk.

    log(message) is told about steps the user should know of (the temporary GGUF for llama.cpp);
    the same messages are kept in the result's notes."""
    from ggquant.runtime.tokenizer import Tokenizer

    from .engines import GgquantEngine, engine_kind, make_engine

    model_path = Path(model_path)
    if not model_path.exists():
        raise GGQuantError(f"{model_path}: no such GGUF file or Hugging Face folder")
    if ctx < 2:
        raise GGQuantError(f"--ctx must be at least 2, got {ctx}")
    kind = engine_kind(against)
    notes: list[str] = []

    def note(msg: str) -> None:
        notes.append(msg)
        if log is not None:
            log(msg)

    with contextlib.ExitStack() as stack:
        # transformers is the exact-math reference: compare with ggquant's exact GELU there
        ours = GgquantEngine(model_path, device=device, threads=threads, gelu="exact" if kind == "hf" else "ggml",
                             n_ctx=ctx)
        stack.callback(ours.close)
        tok = Tokenizer.from_gguf(ours.model.reader)
        ids = tok.encode(text, add_special=False)
        pieces = chunk_ids(ids, ctx, tok.bos_id if tok.add_bos else None, chunks)
        ref_model = model_path
        if kind == "llama.cpp" and model_path.is_dir():
            ref_model = _temporary_gguf(stack, model_path, note)
        ref = make_engine(against, ref_model, device, threads, ctx)
        stack.callback(ref.close)  # runs before the temporary folder is removed
        if ref_model != model_path:
            ref.name = f"llama.cpp on a temporary F32 GGUF of {model_path.name}"
        stats = ParityStats()
        for i, chunk in enumerate(pieces):
            a = ours.eval(chunk)
            b = ref.eval(chunk)
            stats.update(a, b, chunk)
            del a, b
            if progress is not None:
                progress(i + 1, len(pieces), stats)
        return ParityResult(str(model_path), ref.name, ctx, stats, notes)


def _temporary_gguf(stack: contextlib.ExitStack, folder: Path, note: Callable[[str], None]) -> Path:
    """Convert `folder` to an F32 GGUF in a temporary directory that `stack` removes on exit."""
    from ggquant.convert import convert

    from .engines import HF_FOLDER_OUTTYPE

    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ggquant-parity-")))
    note(f"llama.cpp reads GGUF files: {folder} was converted to a temporary {HF_FOLDER_OUTTYPE.upper()} GGUF "
         f"in {tmp} (ggquant convert --outtype {HF_FOLDER_OUTTYPE}), removed when the comparison ends")
    conv = convert(folder, outtype=HF_FOLDER_OUTTYPE, outfile=tmp / "model-{FTYPE}.gguf", progress=False)
    return Path(conv.written[0])


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
        *(f"note            {n}" for n in res.notes),
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
