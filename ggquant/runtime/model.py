"""Loading a GGUF (or a Hugging Face folder) into a runnable model, the KV cache, and an
evaluation session.

    model = load_model("gemma-3-270m-Q4_K_M.gguf", device="cpu", threads=2)
    model = load_model("gemma-3-270m/", outtype="f32")   # HF folder, converted in memory
    sess = Session(model, n_ctx=1024)
    logits = sess.eval(ids, logits="all")     # float32 numpy [len(ids), n_vocab]

An architecture module (models/gemma3.py, models/gemma4.py) subclasses Model: it takes its
hyperparameters from its family's GGUF decoder in ggquant.arch (the keys as llama.cpp's
llama-model.cpp loads them; the GGUF -> HF exporter reads them through the same decoder),
declares its tensors through a TensorSet (every missing tensor is reported at once, by name),
and implements forward(). The module is found by the GGUF's general.architecture (model_class).
The arithmetic goes through a backend (cpu.py, cuda.py) with one small interface, so the model
files read like the llama.cpp graphs they follow.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ggquant.arch.base import GGUFFacts, TextHparams
from ggquant.errors import GGQuantError

MODELS_PACKAGE = "ggquant.runtime.models"


class MissingTensorsError(GGQuantError):
    pass


class TensorSet:
    """Tensors a model asks for, checked together so an error names every missing one."""

    def __init__(self, reader, backend):
        self.reader = reader
        self.backend = backend
        self.by_name = {t.name: t for t in reader.tensors}
        self.missing: list[str] = []
        self.bad_shape: list[str] = []
        self.used: set[str] = set()
        self.loaded: dict[str, object] = {}  # name -> backend weight, every matrix handed out

    def has(self, name: str) -> bool:
        return name in self.by_name

    def get(self, name: str, shape: tuple[int, ...] | None = None, required: bool = True):
        info = self.by_name.get(name)
        if info is None:
            if required:
                self.missing.append(name)
            return None
        if shape is not None and tuple(info.shape) != tuple(shape):
            self.bad_shape.append(f"{name}: shape {tuple(info.shape)} (numpy order), expected {tuple(shape)}")
            return None
        self.used.add(name)
        w = self.loaded[name] = self.backend.weight(info)
        self._attach_scale(name, w)
        return w

    def _attach_scale(self, name: str, w) -> None:
        """A matrix's per-tensor output scale `<base>.scale` of shape [1] (NVFP4's reciprocal
        global scale): llama_model::load_tensors' generic pass loads it for every matrix and
        build_lora_mm multiplies the product by it (ggml_mul), which every backend's matmul does."""
        sname = name.removesuffix(".weight") + ".scale"
        info = self.by_name.get(sname)
        if not name.endswith(".weight") or info is None or tuple(info.shape) != (1,) or len(w.shape) != 2:
            return
        from ggquant.quant import types as qt

        self.used.add(sname)
        w.scale = np.float32(qt.dequantize(np.asarray(info.raw()), info.qtype, (1,)).reshape(-1)[0])

    def n_vocab(self) -> int:
        """Rows of token_embd (or the vocabulary size when the table is missing, so the
        missing-tensor error is the one the user sees)."""
        emb = self.by_name.get("token_embd.weight")
        return emb.shape[0] if emb is not None else len(self.reader.get("tokenizer.ggml.tokens", []))

    def vector(self, name: str, shape: tuple[int, ...] | None = None, required: bool = True):
        """A small tensor (norm weight, scalar) as a dense float32 backend array."""
        w = self.get(name, shape, required)
        return None if w is None else self.backend.dense(w)

    def check(self, what: str) -> None:
        problems = []
        if self.missing:
            shown = ", ".join(self.missing[:40]) + (f" and {len(self.missing) - 40} more" if len(self.missing) > 40 else "")
            problems.append(f"missing tensors: {shown}")
        if self.bad_shape:
            problems.append("wrong shapes: " + "; ".join(self.bad_shape[:6]))
        if problems:
            raise MissingTensorsError(f"{self.reader.path}: not a complete {what} model: " + " | ".join(problems))


class KVCache:
    """Per-layer K/V in float32 (like llama.cpp with type_k = type_v = F32), all positions kept
    (llama-cpp-python's full-size SWA cache); sliding-window layers mask by distance instead.
    The layout of each layer belongs to the backend (backend.kv_layer)."""

    def __init__(self, backend, n_ctx: int, shapes: dict[int, tuple[int, int]]):
        self.n_ctx = n_ctx
        self.layers = {il: backend.kv_layer(n_ctx, h, d) for il, (h, d) in shapes.items()}
        self.n = 0  # positions 0 .. n-1 are filled

    def store(self, il: int, pos0: int, k, v) -> None:
        """Write k/v [T, H, D] at positions pos0 .. pos0 + T - 1 of layer il."""
        self.layers[il].store(pos0, k, v)


class Model:
    """Base of the architecture modules."""

    arch = ""  # general.architecture: also the name of the module in runtime/models/
    hparams_class: type[TextHparams] = TextHparams  # the family's GGUF decoder (ggquant.arch.<family>)
    n_vocab: int
    n_ctx_train: int
    hp: TextHparams  # the decoded hyperparameters (head() reads eps and final_softcap)
    tok_embd: Any  # token_embd [n_vocab, n_embd]
    output_norm: Any  # [n_embd]
    output: Any  # the output matrix [n_vocab, n_embd] (the token embedding when tied)

    def __init__(self, reader, backend):
        self.reader = reader
        self.backend = backend
        self.hp = self.hparams_class.from_gguf(GGUFFacts.of(reader))
        self.n_ctx_train = self.hp.n_ctx_train
        ts = TensorSet(reader, backend)
        self.n_vocab = n_vocab = ts.n_vocab()
        H = self.hp.n_embd
        # the two ends every llama-like graph has (llama.cpp load_arch_tensors): the token
        # embeddings, and the output norm and matrix (the tied embedding when there is none)
        self.tok_embd = ts.get("token_embd.weight", (n_vocab, H))
        self.output_norm = ts.vector("output_norm.weight", (H,))
        self.output = ts.get("output.weight", (n_vocab, H), required=False) or self.tok_embd
        self.load_tensors(ts)
        ts.check(self.arch)
        self.weights = ts.loaded  # name -> backend weight (e.g. to swap one for a quantized copy)

    def load_tensors(self, ts: TensorSet) -> None:
        """The architecture's own tensors (llama_model_<arch>::load_arch_tensors), asked of ts."""
        raise NotImplementedError

    def new_cache(self, n_ctx: int) -> KVCache:
        raise NotImplementedError

    def head(self, x, logits: str):
        """The logits of the final hidden states x [T, H] as `forward` returns them: output norm,
        output matrix (the tied embedding when there is none), final softcap when set."""
        if logits == "none":
            return None
        if logits == "last":
            x = x[-1:]
        be, hp = self.backend, self.hp
        out = be.matmul(be.rms_norm(x, self.output_norm, hp.eps), self.output)  # [T, V]
        if hp.final_softcap:
            out = be.softcap(out, hp.final_softcap)
        return out

    def forward(self, ids: np.ndarray, pos0: int, cache: KVCache, logits: str = "last"):
        """Run tokens ids (positions pos0 ..) through the model, appending to cache.

        logits: "last" -> [1, n_vocab], "all" -> [len(ids), n_vocab], "none" -> None.
        """
        raise NotImplementedError


def f32(x: float) -> float:
    """x rounded to float32, as a Python float (numpy and torch both treat it as a weak float32 scalar)."""
    return float(np.float32(x))


def sqrtf(x: float) -> float:
    return float(np.sqrt(np.float32(x)))


def open_reader(path: str | Path, outtype: str | None = None):
    """A GGUF file (GGUFReader) or a Hugging Face folder converted in memory (hf_source: the same
    fields and tensor bytes `ggquant convert --outtype OUTTYPE` would write, computed lazily).

    outtype applies to folders only; None keeps the dtype the weights are stored in."""
    from ggquant.formats.gguf import GGUFReader

    path = Path(path)
    if not path.exists():
        raise GGQuantError(f"{path}: no such file or folder")
    if path.is_dir():
        from .hf_source import open_hf_folder

        return open_hf_folder(path, outtype)
    if outtype is not None:
        raise GGQuantError(f"{path}: --outtype applies to a Hugging Face folder; a GGUF runs as its tensors are "
                           f"stored (requantize it with `ggquant quantize`)")
    return GGUFReader(path)


def supported_architectures() -> list[str]:
    """The GGUF architectures with a module in runtime/models/."""
    models = importlib.import_module(MODELS_PACKAGE)
    return sorted(m.name for m in pkgutil.iter_modules(models.__path__) if not m.name.startswith("_"))


def model_class(arch: Any, where: str | Path = "") -> type[Model]:
    """The Model subclass of GGUF architecture `arch`, from runtime/models/<arch>.py, imported by
    name (mlx-lm utils._get_classes: importlib.import_module(f"mlx_lm.models.{model_type}"))."""
    name = arch.replace("-", "_") if isinstance(arch, str) else ""
    known = name.isidentifier() and not name.startswith("_") and \
        importlib.util.find_spec(f"{MODELS_PACKAGE}.{name}") is not None
    if not known:
        raise GGQuantError(f"{f'{where}: ' if where else ''}architecture {arch!r} is not supported by the ggquant "
                           f"runtime (supported: {', '.join(supported_architectures())})")
    module = importlib.import_module(f"{MODELS_PACKAGE}.{name}")
    for cls in vars(module).values():
        if isinstance(cls, type) and issubclass(cls, Model) and cls.__module__ == module.__name__ and cls.arch == arch:
            return cls
    raise GGQuantError(f"{module.__file__}: defines no Model subclass with arch = {arch!r}")


class _ModelsByArch(Mapping):
    """general.architecture -> Model subclass, looked up in runtime/models/ on use (model_class)."""

    def __getitem__(self, arch: str) -> type[Model]:
        return model_class(arch)

    def __contains__(self, arch: object) -> bool:
        return isinstance(arch, str) and arch.replace("-", "_") in supported_architectures()

    def __iter__(self) -> Iterator[str]:
        return iter(supported_architectures())

    def __len__(self) -> int:
        return len(supported_architectures())


ARCHITECTURES: Mapping[str, type[Model]] = _ModelsByArch()


def load_model(path: str | Path, device: str = "cpu", threads: int | None = None, gelu: str = "ggml",
               outtype: str | None = None) -> Model:
    """Open a GGUF (or a Hugging Face folder, see open_reader) and build the model of its
    general.architecture on the chosen backend."""
    path = Path(path)
    reader = open_reader(path, outtype)
    cls = model_class(reader.get("general.architecture"), path)
    backend = make_backend(device, threads=threads, gelu=gelu)
    return cls(reader, backend)


def make_backend(device: str, threads: int | None = None, gelu: str = "ggml"):
    if device == "cpu":
        from .cpu import CPUBackend

        return CPUBackend(threads=threads, gelu=gelu)
    if device == "cuda":
        from .cuda import CUDABackend

        return CUDABackend(gelu=gelu)
    raise GGQuantError(f"unknown device {device!r}: expected cpu or cuda")


class Session:
    """A model plus its KV cache: evaluates token batches and continues from where it stopped."""

    def __init__(self, model: Model, n_ctx: int | None = None, n_batch: int = 512):
        self.model = model
        if n_ctx is None:
            n_ctx = min(model.n_ctx_train, 4096)
        if n_ctx < 1:
            raise GGQuantError(f"context size must be at least 1, got {n_ctx}")
        self.n_ctx = n_ctx
        self.n_batch = max(1, n_batch)
        self.cache = model.new_cache(n_ctx)
        self.n_past = 0

    def reset(self) -> None:
        self.n_past = 0
        self.cache.n = 0

    def eval(self, ids, logits: str = "last") -> np.ndarray | None:
        """Append ids to the context; logits "last" [1, V], "all" [len(ids), V] (numpy float32) or "none"."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0:
            raise GGQuantError("nothing to evaluate: the token list is empty")
        if self.n_past + len(ids) > self.n_ctx:
            raise GGQuantError(
                f"{len(ids)} tokens do not fit: {self.n_past} of the context's {self.n_ctx} positions are "
                f"used (raise the context size, at most the model's {self.model.n_ctx_train})")
        bad = (ids < 0) | (ids >= self.model.n_vocab)
        if bad.any():
            raise GGQuantError(f"token id {int(ids[bad][0])} is outside the vocabulary (0..{self.model.n_vocab - 1})")
        outs = []
        for s in range(0, len(ids), self.n_batch):
            chunk = ids[s:s + self.n_batch]
            last = s + self.n_batch >= len(ids)
            want = logits if logits == "all" else (logits if last else "none")
            if hasattr(self.model.backend, "graph_step"):  # CUDA: replayed graphs where they pay
                out = self.model.backend.graph_step(self.model, chunk, self.n_past, self.cache, want)
            else:
                out = self.model.forward(chunk, self.n_past, self.cache, want)
            self.n_past += len(chunk)
            self.cache.n = self.n_past
            if out is not None:
                outs.append(self.model.backend.to_numpy(out))
        if logits == "none":
            return None
        return np.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]


__all__ = ["ARCHITECTURES", "KVCache", "MissingTensorsError", "Model", "Session", "TensorSet", "f32", "load_model",
           "make_backend", "model_class", "open_reader", "sqrtf", "supported_architectures"]
