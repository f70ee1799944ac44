"""`ggquant inspect`: what is inside a GGUF file or a Hugging Face safetensors folder."""

import json
import struct
from pathlib import Path

import numpy as np

from ggquant.errors import FormatError, GGQuantError

ARRAY_PREVIEW = 8  # long arrays (vocabularies, scores) are summarised, not dumped


def _summarise(value):
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)) and len(value) > ARRAY_PREVIEW:
        return {"length": len(value), "head": list(value[:ARRAY_PREVIEW])}
    return value


def inspect_gguf(path) -> dict:
    from ggquant.formats.gguf import GGUFReader

    with GGUFReader(path) as r:
        meta = {}
        for f in r.fields.values():
            t = f.type.name if f.item_type is None else f"{f.type.name}[{f.item_type.name}]"
            meta[f.name] = {"type": t, "value": _summarise(f.value)}
        tensors = [
            {"name": t.name, "shape": list(t.shape), "type": t.qtype.name, "bytes": t.nbytes, "offset": t.source.offset}
            for t in r.tensors
        ]
        return {"path": str(path), "format": "gguf", "version": r.version, "alignment": r.alignment,
                "metadata": meta, "tensors": tensors, "total_bytes": sum(t["bytes"] for t in tensors)}


def _safetensors_header(path: Path) -> dict:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{path}: truncated safetensors file (no header length)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise FormatError(f"{path}: safetensors header length {n} runs past the end of the file ({size} bytes)")
        try:
            return json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{path}: safetensors header is not valid JSON ({e})") from None


def inspect_safetensors_dir(path) -> dict:
    path = Path(path)
    cfg_path = path / "config.json"
    config = {}
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{cfg_path}: not valid JSON ({e})") from None
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise GGQuantError(f"{path}: no *.safetensors files (only safetensors checkpoints are read)")
    tensors = []
    for f in files:
        for name, info in _safetensors_header(f).items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            tensors.append({"name": name, "shape": info["shape"], "type": info["dtype"], "bytes": end - begin,
                            "file": f.name})
    summary_keys = ("architectures", "model_type", "hidden_size", "num_hidden_layers", "vocab_size",
                    "torch_dtype", "dtype", "quantization_config")
    text_cfg = config.get("text_config", {})
    summary = {k: config.get(k, text_cfg.get(k)) for k in summary_keys if k in config or k in text_cfg}
    return {"path": str(path), "format": "safetensors", "config": summary, "tensors": tensors,
            "total_bytes": sum(t["bytes"] for t in tensors)}


def inspect(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise GGQuantError(f"{path}: no such file or folder")
    if path.is_file() and path.suffix == ".gguf":
        return inspect_gguf(path)
    if path.is_dir() or path.suffix == ".safetensors":
        return inspect_safetensors_dir(path)
    with open(path, "rb") as f:
        if f.read(4) == b"GGUF":
            return inspect_gguf(path)
    raise GGQuantError(f"{path}: not a GGUF file or a safetensors folder")


def format_report(rep: dict) -> str:
    lines = [f"{rep['path']}  ({rep['format']}"
             + (f" v{rep['version']}, alignment {rep['alignment']})" if rep["format"] == "gguf" else ")")]
    if rep["format"] == "gguf":
        lines.append(f"metadata ({len(rep['metadata'])} keys):")
        for k, v in rep["metadata"].items():
            val = v["value"]
            if isinstance(val, dict):
                val = f"[{val['length']} items] {val['head']} ..."
            lines.append(f"  {k:<45} {v['type']:<16} {val}")
    else:
        lines.append("config:")
        for k, v in rep["config"].items():
            lines.append(f"  {k:<30} {v}")
    lines.append(f"tensors ({len(rep['tensors'])}):")
    lines.append(f"  {'name':<48} {'shape':<24} {'type':<8} {'bytes':>12}" + (f" {'offset':>12}" if rep["format"] == "gguf" else ""))
    for t in rep["tensors"]:
        extra = f" {t['offset']:>12}" if "offset" in t else ""
        lines.append(f"  {t['name']:<48} {str(t['shape']):<24} {t['type']:<8} {t['bytes']:>12}{extra}")
    lines.append(f"total tensor bytes: {rep['total_bytes']} ({rep['total_bytes'] / 2**20:.2f} MiB)")
    return "\n".join(lines)
