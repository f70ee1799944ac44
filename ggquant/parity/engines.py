"""The engines `ggquant parity` compares: each evaluates one chunk of token ids in a fresh context
and returns the float32 logits of every position [n, n_vocab].

- GgquantEngine: ggquant's own runtime on a GGUF, or on a Hugging Face folder converted in memory
  (runtime/hf_source.py; F32 unless told otherwise, the tightest comparison) (CPU or CUDA backend).
- LlamaCppEngine: llama.cpp through llama-cpp-python, configured for tight comparisons: an F32
  KV cache (type_k = type_v = 0), flash attention off, the whole chunk in one batch
  (n_batch = n_ubatch = n_ctx), logits for every position. llama.cpp adds no BOS in eval; the
  chunk's ids are passed exactly as given.
- HFEngine: transformers on a Hugging Face folder, float32, eager attention.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from ggquant.errors import GGQuantError


HF_FOLDER_OUTTYPE = "f32"  # a Hugging Face folder is compared as its F32 conversion
LLAMA_CPP_NAMES = ("llama.cpp", "llamacpp", "llama-cpp")


class GgquantEngine:
    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None, gelu: str = "ggml",
                 n_ctx: int = 512, outtype: str | None = None):
        from ggquant.runtime.model import Session, load_model

        path = Path(path)
        if path.is_dir() and outtype is None:
            outtype = HF_FOLDER_OUTTYPE
        self.model = load_model(path, device=device, threads=threads, gelu=gelu, outtype=outtype)
        label = getattr(self.model.reader, "label", None)
        self.name = f"ggquant ({device}) {path.name}" + (f" (Hugging Face folder as {label})" if label else "")
        self.session = Session(self.model, n_ctx=n_ctx, n_batch=n_ctx)
        self.n_vocab = self.model.n_vocab

    def eval(self, ids: list[int]) -> np.ndarray:
        self.session.reset()
        return self.session.eval(ids, "all")

    def close(self):
        pass


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp prints its load log on fd 2 even with verbose=False for some messages."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


class LlamaCppEngine:
    def __init__(self, path: str | Path, n_ctx: int = 512, threads: int | None = None, kv_f32: bool = True):
        try:
            from llama_cpp import Llama
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise GGQuantError("--against llama.cpp needs llama-cpp-python (pip install llama-cpp-python)") from e
        self.name = f"llama.cpp {Path(path).name}"
        kw = dict(n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, flash_attn=False,
                  verbose=False, seed=0)
        if kv_f32:
            kw.update(type_k=0, type_v=0)
        if threads:
            kw.update(n_threads=threads, n_threads_batch=threads)
        try:
            with _quiet_stderr():
                self.llm = Llama(str(path), **kw)
        except (ValueError, RuntimeError) as e:
            raise GGQuantError(f"llama.cpp could not load {path}: {e}") from e
        self.n_ctx = n_ctx
        self.n_vocab = self.llm.n_vocab()

    def eval(self, ids: list[int]) -> np.ndarray:
        if len(ids) > self.n_ctx:
            raise GGQuantError(f"chunk of {len(ids)} tokens exceeds llama.cpp's n_ctx {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)

    def close(self):
        self.llm.close()


class HFEngine:
    def __init__(self, folder: str | Path, threads: int | None = None):
        try:
            import torch
            import transformers
        except ImportError as e:  # pragma: no cover
            raise GGQuantError("--against HF_DIR needs torch and transformers") from e
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise GGQuantError(f"{folder}: not a Hugging Face model folder (no config.json)")
        if threads:
            torch.set_num_threads(threads)
        cfg = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        arch = (getattr(cfg, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        if cls is None:
            cls = transformers.AutoModelForCausalLM
        self.model = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                         local_files_only=True).eval()
        self.torch = torch
        self.name = f"transformers {folder.name}"
        self.n_vocab = None

    def eval(self, ids: list[int]) -> np.ndarray:
        torch = self.torch
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([list(ids)], dtype=torch.long), use_cache=False)
        return out.logits[0].float().numpy()

    def close(self):
        pass


def engine_kind(against: str) -> str:
    """--against llama.cpp -> "llama.cpp", a folder -> "hf" (transformers), a file -> "gguf"."""
    if against in LLAMA_CPP_NAMES:
        return "llama.cpp"
    p = Path(against)
    if p.is_dir():
        return "hf"
    if p.is_file():
        return "gguf"
    raise GGQuantError(f"--against {against!r}: expected llama.cpp, a Hugging Face folder or a GGUF file "
                       f"(no such file or folder)")


def make_engine(against: str, model_path: Path, device: str, threads: int | None, n_ctx: int):
    """--against llama.cpp | HF_DIR | OTHER.gguf. For llama.cpp, model_path must be a GGUF."""
    kind = engine_kind(against)
    if kind == "llama.cpp":
        return LlamaCppEngine(model_path, n_ctx=n_ctx, threads=threads)
    if kind == "hf":
        return HFEngine(Path(against), threads=threads)
    return GgquantEngine(Path(against), device=device, threads=threads, n_ctx=n_ctx)
