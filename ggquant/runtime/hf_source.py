"""A Hugging Face folder opened as the GGUF reader the runtime reads, without writing a GGUF.

    reader = open_hf_folder("gemma-3-270m/", outtype="f32")
    reader.get("general.architecture")      # "gemma3"
    reader.tensor("blk.0.attn_q.weight").raw()   # uint8 [n_rows, row_bytes], computed now

Everything comes from the converter (ggquant.convert.plan_conversion, text part only), so the
metadata, the tokenizer fields and every tensor's name, shape, type and bytes are exactly what
`ggquant convert SRC --outtype OUTTYPE` would write:

- metadata: the plan's key/values are encoded by GGUFWriter and parsed back by the GGUF reader's
  own parser (header bytes only, in memory), so `fields` holds the same `Field` objects, with
  the same value types and float32 rounding, as GGUFReader gives for the converted file;
- tensors: `raw()` computes the tensor's bytes when it is called, one tensor at a time, from the
  safetensors mmap (convert.tensor_chunks: widen, transform, encode). A tensor stored unchanged
  (same dtype, no transform: every bf16 matmul weight with the default outtype) is returned as a
  read-only view of the mmap, so opening and running a bf16 folder copies no weights at all.
  Nothing is cached: the runtime backends call raw() once per tensor and keep the result.

The default outtype (None) is the dtype the text weights are stored in: bf16 -> bf16, f16 -> f16,
f32 -> f32 (llama.cpp's `--outtype auto` turns f32 into f16; the runtime keeps f32). A quantized
checkpoint gets the converter's `auto` plan (its weights moved exactly into GGML blocks) when the
runtime has kernels for every type in it, else the float plan of its stored dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from ggquant.errors import GGQuantError
from ggquant.tensor import Blocks, Dense, Tensor

# --outtype values the runtime can run (the converter's own outtypes; every type they produce
# has CPU and CUDA kernels). llama-quantize presets would quantize the whole model at load time.
RUNTIME_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
_STORED_TO_OUTTYPE = {"BF16": "bf16", "F16": "f16", "F32": "f32"}
# (source dtype, GGUF type) pairs whose bytes the converter copies unchanged (convert.tensor_chunks)
_SAME_BYTES = {("F32", GGMLQuantizationType.F32), ("F16", GGMLQuantizationType.F16),
               ("BF16", GGMLQuantizationType.BF16)}
_SCAN_ROWS_BYTES = 32 << 20  # bf16 signalling-NaN scan: bounded temporaries per step


def stored_outtype(model_dir: Path) -> str:
    """bf16 / f16 / f32 from the dtype of the first 2-D text tensor (convert._auto_outtype's rule,
    except that f32 stays f32); "auto" when that tensor is not float (a quantized checkpoint)."""
    from ggquant.arch import arch_class
    from ggquant.formats.hf_folder import hf_architecture, load_config
    from ggquant.formats.safetensors import open_checkpoint

    config = load_config(model_dir)
    cls = arch_class(hf_architecture(config, model_dir / "config.json"), str(model_dir / "config.json"))
    with open_checkpoint(model_dir) as ckpt:
        arch = cls(model_dir, config, ckpt)
        for name, t in ckpt.tensors.items():
            if arch.is_text_tensor(name) and t.ndim >= 2:
                return _STORED_TO_OUTTYPE.get(t.dtype, "auto")
    return "auto"


class PlannedBytes:
    """The source of a tensor of the converted model: the bytes `ggquant convert` writes for it,
    computed from the checkpoint when asked for (Tensor.raw()), nothing cached."""

    def __init__(self, plan, reader: "HFFolderReader"):
        self.plan = plan
        self.reader = reader
        self.where = reader.path

    def rows(self, t: Tensor, start: int, stop: int) -> np.ndarray:
        if self.reader.closed:
            raise GGQuantError(f"{self.reader.path}: tensor '{t.name}': the folder was closed; open it again")
        out = _tensor_bytes(self.plan).reshape(t.n_outer, -1)[start:stop]
        out.flags.writeable = False  # like a view of a GGUF mmap (and the same numba array type)
        return out

    def release(self, t: Tensor, start: int, stop: int) -> None:
        pass


def _has_signalling_nan(bits: np.ndarray) -> bool:
    flat = bits.reshape(-1)
    step = max(1, _SCAN_ROWS_BYTES // 2)
    for a in range(0, flat.size, step):
        if ((flat[a:a + step] & 0x7FFF) > 0x7F80).any():
            return True
    return False


def _tensor_bytes(t) -> np.ndarray:
    """The whole tensor's bytes as a flat uint8 array, equal to what convert.tensor_chunks yields."""
    from ggquant.convert.encode import quiet_bf16_nans, tensor_chunks

    src = t.src
    if (src is not None and isinstance(src.encoding, Dense) and src.shape and t.generated is None and t.transform.identity
            and (src.dtype, t.qtype) in _SAME_BYTES):
        # Stored unchanged: one view of the whole (possibly trimmed) tensor instead of chunk copies.
        view = src.rows(0, t.n_outer)
        if src.dtype == "BF16" and _has_signalling_nan(view):
            view = quiet_bf16_nans(view)  # the converter writes quiet NaNs (a copy, rare)
        if not view.flags.aligned:  # the kernels view the bytes as f32/u16: keep numba's aligned array type
            view = view.copy()
        return view.reshape(-1).view(np.uint8)
    out = np.empty(t.nbytes, np.uint8)
    pos = 0
    for data, after in tensor_chunks(t):
        b = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        if pos + b.size > out.size:
            raise GGQuantError(f"tensor '{t.name}': the converter produced more than its {t.nbytes} bytes")
        out[pos:pos + b.size] = b
        pos += b.size
        del data, b
        if after is not None:
            after()
    if pos != out.size:
        raise GGQuantError(f"tensor '{t.name}': the converter produced {pos} of its {t.nbytes} bytes")
    return out


def _fields(kv, where: Path) -> dict:
    """The plan's metadata as GGUFReader parses it from the converted file (GGUFWriter.fields)."""
    from ggquant.formats.gguf import GGUFWriter

    w = GGUFWriter(where / "in-memory.gguf", force=True)  # write() is never called
    kv.write_to(w)
    return w.fields()


class HFFolderReader:
    """The text model of a Hugging Face folder, converted in memory: `path`, `fields`, `tensors`,
    `get`, `tensor`, `close`, as GGUFReader offers them."""

    def __init__(self, path: Path, outtype: str, conversion, arch, part):
        self.path = path
        self.outtype = outtype  # the outtype asked for (a converter outtype)
        self.label = part.outtype  # what the converted file's name would say, e.g. "BF16"
        self.conversion = conversion
        self._arch = arch
        self.closed = False
        self.fields = _fields(part.kv, path)
        self.tensors: list[Tensor] = [Tensor(t.name, tuple(int(d) for d in t.shape), Blocks(t.qtype),
                                             PlannedBytes(t, self), t.nbytes) for t in part.tensors]
        self._by_name = {t.name: t for t in self.tensors}

    @property
    def files(self) -> list[Path]:
        ckpt = self._arch.ckpt
        return [f.path for f in ckpt.files] if ckpt is not None else []

    def tensor(self, name: str) -> Tensor:
        try:
            return self._by_name[name]
        except KeyError:
            raise GGQuantError(f"{self.path}: no tensor named '{name}' in the converted model "
                               f"({len(self.tensors)} tensors)") from None

    def get(self, key: str, default: Any = None) -> Any:
        f = self.fields.get(key)
        return default if f is None else f.value

    def close(self) -> None:
        """Close the safetensors maps (arrays already returned by raw() stay valid)."""
        if not self.closed and self._arch.ckpt is not None:
            self._arch.ckpt.close()
        self.closed = True

    def __enter__(self) -> "HFFolderReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def weights_label(reader) -> str:
    """"GGUF" for a GGUF reader; "Hugging Face folder converted in memory to <TYPE>" for a folder."""
    return f"Hugging Face folder converted in memory to {reader.label}" if isinstance(reader, HFFolderReader) else "GGUF"


def open_hf_folder(path: str | Path, outtype: str | None = None) -> HFFolderReader:
    """Plan the conversion of the folder's text model to `outtype` and expose it as a reader.

    Every problem the converter would report (no config.json, an unsupported architecture,
    pickle-only weights, missing or misshapen tensors) is raised here, unchanged, before any
    tensor data is read."""
    from ggquant.convert.hf_to_gguf import plan_conversion

    path = Path(path)
    ot = stored_outtype(path) if outtype is None else outtype.strip().lower()
    if ot not in RUNTIME_OUTTYPES and ot != "auto":
        raise GGQuantError(f"--outtype {outtype!r}: a Hugging Face folder runs as one of "
                           f"{', '.join(RUNTIME_OUTTYPES)} (or auto); quantize to other types with "
                           f"`ggquant convert --outtype PRESET` and run the GGUF")
    conv, arch = plan_conversion(path, outtype=ot)
    if outtype is None and _has_quantized_weights(conv):
        conv, arch, ot = _prefer_exact_transcoding(path, conv, arch, ot)
    try:
        [part] = [f for f in conv.files if f.part == "text"]
        return HFFolderReader(path, ot, conv, arch, part)
    except BaseException:
        if arch.ckpt is not None:
            arch.ckpt.close()
        raise


def _has_quantized_weights(conv) -> bool:
    return any(t.source_quant for f in conv.files for t in f.tensors)


def _prefer_exact_transcoding(path: Path, conv, arch, ot: str):
    """A quantized checkpoint (GPTQ, compressed-tensors, ...): the converter's `auto` moves its
    weights exactly into GGML blocks (int4 sym -> Q4_0, ...). Use that plan when the runtime has
    kernels for every type it picks; otherwise keep the float plan (the weights dequantized as the
    converter does, stored in the checkpoint's float dtype)."""
    from ggquant.convert.hf_to_gguf import plan_conversion
    from ggquant.quant.types import CPU_TYPES as SUPPORTED

    conv2, arch2 = plan_conversion(path, outtype="auto")
    if all(len(t.shape) < 2 or t.qtype in SUPPORTED for f in conv2.files for t in f.tensors):
        if arch.ckpt is not None:
            arch.ckpt.close()
        return conv2, arch2, "auto"
    if arch2.ckpt is not None:
        arch2.ckpt.close()
    return conv, arch, ot

__all__ = ["HFFolderReader", "RUNTIME_OUTTYPES", "open_hf_folder", "stored_outtype", "weights_label"]
