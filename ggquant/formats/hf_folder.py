"""A Hugging Face model folder's side files: config.json and other JSON/text, read with errors
that name the file and what to do (safetensors weights: ggquant.formats.safetensors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ggquant.errors import GGQuantError



def read_json(path: Path, what: str, required: bool = True) -> Any:
    if not path.is_file():
        if required:
            raise GGQuantError(f"{path}: not found; {what}")
        return None
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GGQuantError(f"{path}: not UTF-8 (invalid byte 0x{raw[e.start]:02x} at offset {e.start}); "
                           f"re-save it as UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise GGQuantError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GGQuantError(f"{path}: not UTF-8 (invalid byte 0x{raw[e.start]:02x} at offset {e.start}); "
                           f"re-save it as UTF-8") from None


def load_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    cfg = read_json(path, "a Hugging Face model folder needs config.json (it names the architecture)")
    if not isinstance(cfg, dict):
        raise GGQuantError(f"{path}: must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def hf_architecture(config: dict, path: Path) -> str:
    arches = config.get("architectures")
    if not isinstance(arches, list) or not arches or not isinstance(arches[0], str):
        raise GGQuantError(f"{path}: key 'architectures' is missing or empty; expected e.g. "
                           f"[\"Gemma4ForConditionalGeneration\"]")
    return arches[0]


def with_defaults(cfg: dict, defaults: dict) -> dict:
    """transformers' config defaults for keys the config.json leaves out (what AutoConfig's
    to_dict() gives llama.cpp's converter)."""
    out = dict(defaults)
    out.update({k: v for k, v in cfg.items()})
    return out
