"""Already-quantized Hugging Face checkpoints: detection and the record every reader yields.

Readers (one module each in this package, registered by `@reader(method, ...)`): compressed-tensors
(`compressed_tensors.py`), NVIDIA ModelOpt (`modelopt.py`), GPTQ / AutoRound / AWQ (`gptq.py`), MLX
affine (`mlx.py`) and GLQ (`glq.py`); the record they yield is in `records.py`. A new format is one module here with
`@reader("<quant_method>")` on its `read(config, src, method)`. Facts about the layouts are in
shared/research/compressed-tensors-gptq-gguf-mapping.md and glq-format.md.

Entry point:

    model = open_quantized(config, names, get, directory)   # None for an unquantized checkpoint
    for rec in model:                              # one record per quantized logical weight
        rec.name        # "model.layers.0.self_attn.q_proj.weight" (checkpoint naming)
        rec.shape       # (out, in), numpy order of the float weight
        rec.encoding    # "compressed-tensors pack-quantized int4 sym group128"
        rec.dequantize(rows=None)           -> float32 [rows, in], the source's exact dequantization
        rec.exact_ggml(candidates=None)     -> (GGMLQuantizationType, uint8 [rows, row_bytes]) | None
        rec.exact_ggml_or_reason(...)       -> the same tuple, or a str saying why nothing is exact
    model.consumed      # raw tensor names the records replace (weight_packed, scales, qzeros, ...)

`config` is the parsed config.json (completed from ModelOpt's hf_quant_config.json in `directory`,
see quantization_config); `names` every tensor name in the checkpoint; `get(name)`
returns a raw tensor: a numpy array (BF16 as uint16 bits and FP8 as uint8 bits, the storage
convention of ggquant.formats.safetensors), a torch tensor, or a ggquant.tensor.Tensor of a
Dense encoding (`dtype`, `read()`, `rows(start, stop)`).
Nothing is read until a record's payload is asked for; `rows=(start, stop)` reads only those
output rows where the layout allows it.

"Exact dequantization" means the float32 value the source format defines, computed with one
rounding: (q - zero) * scale for integer formats (always exactly representable), scale * q + bias
for MLX affine (one rounding of the sum, as mlx's float32 kernels do), fp8 * scale for FP8, and
glq's own reconstruction for GLQ. Libraries that return bf16/fp16 round this value once more.

Unknown quantization methods, formats, codebooks and bit widths are refused with an error that
names them: ggquant never guesses a layout.
"""

from __future__ import annotations

import functools
import importlib
import json
import pkgutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ggquant.errors import GGQuantError
from ggquant.formats.quantized.records import QuantizedModel, Source

# quant_method (lower-cased) -> the method name its reader registered
_READERS: dict[str, Callable[[dict, Source, str], QuantizedModel]] = {}
_ALIASES = {"compressed_tensors": "compressed-tensors", "auto_round": "auto-round", "autoround": "auto-round",
            "intel/auto-round": "auto-round"}  # spellings found in the wild
MLX = "mlx"  # MLX writes no quant_method: a "quantization" dict with bits / group_size
HF_QUANT_CONFIG = "hf_quant_config.json"  # NVIDIA ModelOpt's export writes its quantization here
# the keys of hf_quant_config.json's "quantization" that llama.cpp's converter reads (plus ModelOpt's
# exclude_modules and group_size, which ggquant reports)
_HF_QUANT_KEYS = ("quant_algo", "quant_method", "format", "config_groups", "quantized_layers", "exclude_modules",
                  "group_size")


def reader(*methods: str):
    """Register `read(config, src, method) -> QuantizedModel` for the quant_method names `methods`."""

    def deco(fn):
        for m in methods:
            _READERS[m] = fn
        return fn

    return deco


@functools.cache
def _readers() -> dict[str, Callable]:
    """Every reader module of this package, imported once: they register themselves."""
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "records":
            importlib.import_module(f"{__name__}.{mod.name}")
    return _READERS


def supported_methods() -> list[str]:
    return sorted(_readers())


def detect(config: dict) -> str | None:
    """The quantization method of a parsed config.json, None when the weights are not quantized.

    Raises GGQuantError for a quantization method ggquant does not read, naming it.
    """
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and "quant_method" in qc:
        raw = str(qc["quant_method"])
        method = _ALIASES.get(raw.lower(), raw.lower())
        if method not in _readers():
            raise GGQuantError(
                f"config.json quantization_config.quant_method is {raw!r}, which ggquant does not read; "
                f"supported: {', '.join(supported_methods())}. Convert the checkpoint to bf16 first."
            )
        return method
    mlx_cfg = config.get("quantization")
    if isinstance(mlx_cfg, dict) and ("bits" in mlx_cfg or "group_size" in mlx_cfg):
        return MLX
    if isinstance(qc, dict) and ("bits" in qc and "group_size" in qc):
        return MLX  # mlx-lm writes the same dict as "quantization" and "quantization_config"
    if isinstance(qc, dict) and qc:
        raise GGQuantError(
            f"config.json has a quantization_config without quant_method (keys: {', '.join(sorted(qc))}); "
            f"ggquant cannot tell which format it is"
        )
    return None


def with_hf_quant_config(config: dict, directory: str | Path | None) -> dict:
    """config.json with its quantization_config completed from ModelOpt's hf_quant_config.json, as
    llama.cpp's converter reads it (ModelBase.prepare_tensors): when quant_algo or
    quantized_layers is missing and the file exists, its producer.name (lower-cased) is the
    quant_method unless config.json names one, and its "quantization" keys replace config.json's."""
    if directory is None or not (path := Path(directory) / HF_QUANT_CONFIG).is_file():
        return config
    qc = config.get("quantization_config")
    qc = dict(qc) if isinstance(qc, dict) else {}
    if qc.get("quant_algo") and qc.get("quantized_layers"):
        return config
    try:
        hq = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GGQuantError(f"{path}: cannot be read as JSON ({e})") from e
    quant = hq.get("quantization") if isinstance(hq, dict) else None
    if not isinstance(quant, dict):
        raise GGQuantError(f"{path}: no \"quantization\" object; ggquant cannot tell how the weights are quantized")
    if "quant_method" not in qc:
        producer = str((hq.get("producer") or {}).get("name") or "").lower()
        if not producer:
            raise GGQuantError(f"{path}: producer.name is missing; ggquant cannot tell which tool wrote the "
                               f"checkpoint (NVIDIA ModelOpt writes \"modelopt\")")
        qc["quant_method"] = producer
    qc.update({k: quant[k] for k in _HF_QUANT_KEYS if k in quant})
    return {**config, "quantization_config": qc}


def open_quantized(config: dict, names: Iterable[str], get: Callable[[str], Any],
                   directory: str | Path | None = None) -> QuantizedModel | None:
    """Read the quantized weights of a checkpoint (see module docstring); None if not quantized.
    `directory`: the checkpoint's folder, for ModelOpt's hf_quant_config.json."""
    config = with_hf_quant_config(config, directory)
    method = detect(config)
    if method is None:
        return None
    return _readers()[method](config, Source(names, get), method)
