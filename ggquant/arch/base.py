"""The architecture layer: HF names -> GGUF names, hparams -> GGUF keys, and per-tensor rules.

One module per model family subclasses `Arch`. A subclass is mostly data:

- `TEXT_TENSORS` / `MMPROJ_TENSORS`: declarative `{bid}` name tables (`Rule`), one entry per HF
  tensor with a comment saying what it is, like gguf-py's tensor_mapping.py;
- a few hooks: `transform` (norm shifts, reshapes, softplus), `force_type` (tensors llama.cpp
  stores in a fixed type), `extra_tensors` (generated tensors such as `rope_freqs`), `validate`,
  and `text_metadata` / `mmproj_metadata` / `vocab` that fill an ordered `KV`.

The rules that decide a tensor's GGUF type for the converter's own outtypes (f32, f16, bf16,
q8_0) follow llama.cpp conversion/base.py ModelBase.prepare_tensors, in this order:
  1. the arch's forced type (tensor_force_quant),
  2. 1-D tensors and names ending in `_norm.weight` -> F32 (overrides 1.),
  3. names that do not end in `.weight` -> F32 (when nothing was forced),
  4. otherwise the outtype; Q8_0 on a row length that is not a multiple of 32 falls back to F16.

Readers do not know GGUF names and writers do not know HF names: only this layer does.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, Keys

from ggquant.errors import GGQuantError
from ggquant.formats.safetensors import FLOAT_DTYPES, Checkpoint
from ggquant.tensor import SourceQuant, Tensor, shape_only

T = GGMLQuantizationType
TEXT, MMPROJ = "text", "mmproj"

# --outtype -> (GGUF type for quantizable tensors, LlamaFileType value written as general.file_type)
# (gguf LlamaFileType: ALL_F32 0, MOSTLY_F16 1, MOSTLY_Q8_0 7, MOSTLY_BF16 32)
CONVERTER_OUTTYPES: dict[str, tuple[GGMLQuantizationType, int]] = {
    "f32": (T.F32, 0),
    "f16": (T.F16, 1),
    "bf16": (T.BF16, 32),
    "q8_0": (T.Q8_0, 7),
}


# =============================================================================================
# Ordered metadata with gguf-py's duplicate semantics
# =============================================================================================


class KV:
    """Ordered GGUF key/values. Setting an existing key keeps its position and replaces the value
    and type: what gguf-py GGUFWriter.add_key_value does (llama.cpp's converter writes several
    keys twice, e.g. Gemma 3's context_length, and the file keeps the first position)."""

    def __init__(self) -> None:
        self.items: dict[str, tuple[GGUFValueType, Any, GGUFValueType | None]] = {}

    def set(self, key: str, value: Any, vtype: GGUFValueType, item_type: GGUFValueType | None = None) -> None:
        self.items[key] = (vtype, value, item_type)

    def remove(self, key: str) -> None:
        self.items.pop(key, None)

    def get(self, key: str, default: Any = None) -> Any:
        return self.items[key][1] if key in self.items else default

    def __contains__(self, key: str) -> bool:
        return key in self.items

    # typed helpers, named after gguf-py's add_* methods they mirror
    def u32(self, key: str, value: int) -> None:
        self.set(key, int(value), GGUFValueType.UINT32)

    def i32(self, key: str, value: int) -> None:
        self.set(key, int(value), GGUFValueType.INT32)

    def f32(self, key: str, value: float) -> None:
        self.set(key, float(value), GGUFValueType.FLOAT32)

    def bool(self, key: str, value: bool) -> None:
        self.set(key, bool(value), GGUFValueType.BOOL)

    def string(self, key: str, value: str) -> None:
        if value:  # gguf-py add_string drops empty strings
            self.set(key, value, GGUFValueType.STRING)

    def array(self, key: str, values: list, what: str = "") -> None:
        """An array whose item type follows gguf-py GGUFValueType.get_type of the first item."""
        if len(values) == 0:  # gguf-py add_array drops empty arrays
            return
        item = python_value_type(values[0], what or key)
        for v in values:
            if python_value_type(v, what or key) != item:
                raise GGQuantError(f"{what or key}: all items of a GGUF array must have the same type, got {values!r}")
        self.set(key, list(values), GGUFValueType.ARRAY, item)

    def write_to(self, writer: Any) -> None:
        for key, (vtype, value, item) in self.items.items():
            writer.add_field(key, value, vtype, item)


def python_value_type(v: Any, what: str) -> GGUFValueType:
    """gguf-py GGUFValueType.get_type: str -> STRING, float -> FLOAT32, bool -> BOOL, int -> INT32."""
    if isinstance(v, (str, bytes, bytearray)):
        return GGUFValueType.STRING
    if isinstance(v, float):
        return GGUFValueType.FLOAT32
    if isinstance(v, bool):
        return GGUFValueType.BOOL
    if isinstance(v, int):
        return GGUFValueType.INT32
    raise GGQuantError(f"{what}: cannot store {v!r} ({type(v).__name__}) in GGUF metadata")


# =============================================================================================
# Declarative name tables
# =============================================================================================


@dataclass(frozen=True)
class Rule:
    """One HF tensor (base name, `{bid}` = layer) -> its GGUF name.

    `suffixes`: the endings the HF name may carry; the GGUF name gets the same ending. A rule
    with suffixes=("",) matches the HF name exactly and `gguf` is the complete GGUF name.
    """

    hf: str
    gguf: str
    note: str
    suffixes: tuple[str, ...] = (".weight", ".bias")
    regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pat = "^" + re.escape(self.hf).replace(re.escape("{bid}"), r"(\d+)") + "$"
        object.__setattr__(self, "regex", re.compile(pat))

    def match(self, name: str) -> tuple[str, int | None] | None:
        for suf in self.suffixes:
            if suf and not name.endswith(suf):
                continue
            base = name[: len(name) - len(suf)] if suf else name
            m = self.regex.match(base)
            if m:
                bid = int(m.group(1)) if m.groups() else None
                return self.gguf.format(bid=bid) + suf, bid
        return None


    def unmatch(self, gguf_name: str) -> tuple[str, int | None] | None:
        """The inverse of match(): GGUF name -> (HF base name + the same ending, layer)."""
        pat = getattr(self, "_gguf_regex", None)
        if pat is None:
            pat = re.compile("^" + re.escape(self.gguf).replace(re.escape("{bid}"), r"(\d+)") + "$")
            object.__setattr__(self, "_gguf_regex", pat)
        for suf in self.suffixes:
            if suf and not gguf_name.endswith(suf):
                continue
            base = gguf_name[: len(gguf_name) - len(suf)] if suf else gguf_name
            m = pat.match(base)
            if m:
                bid = int(m.group(1)) if m.groups() else None
                return self.hf.format(bid=bid) + suf, bid
        return None


def map_name(rules: tuple[Rule, ...], name: str) -> tuple[str, int | None] | None:
    for r in rules:
        hit = r.match(name)
        if hit is not None:
            return hit
    return None


def unmap_name(rules: tuple[Rule, ...], gguf_name: str) -> tuple[str, int | None] | None:
    """GGUF name -> (normalized HF name, layer) through the same tables, read backwards."""
    for r in rules:
        hit = r.unmatch(gguf_name)
        if hit is not None:
            return hit
    return None


# =============================================================================================
# Per-tensor transforms (applied chunk by chunk along the outermost dimension)
# =============================================================================================


class Transform:
    """Maps a float32 chunk of source outer rows to the same outer rows of the GGUF tensor."""

    identity = False
    label = ""

    def shape(self, src_shape: tuple[int, ...]) -> tuple[int, ...]:
        return src_shape

    def __call__(self, x: np.ndarray, src_dtype: str) -> np.ndarray:
        raise NotImplementedError

    def inverse(self, hf_shape: tuple[int, ...]) -> Transform:
        """The transform that maps GGUF outer rows (float32) back to the HF tensor of shape
        `hf_shape` (`ggquant convert --to hf`); inverse(s).shape(self.shape(s)) == s."""
        raise NotImplementedError(f"{type(self).__name__} has no inverse")


class Identity(Transform):
    identity = True

    def __call__(self, x, src_dtype):
        return x

    def inverse(self, hf_shape):
        return self


IDENTITY = Identity()


class AddConstant(Transform):
    """w + c, e.g. Gemma's RMSNorm stores gain-1 (llama.cpp Gemma3Model.norm_shift).

    llama.cpp adds in torch after widening only bf16 to f32 (ModelBase.prepare_tensors keeps
    f16 and f32 as they are), so an f16 source is added in f16 precision: round to f16 after.
    """

    def __init__(self, c: float):
        self.c = np.float32(c)
        self.label = f"{c:+g}"

    def __call__(self, x, src_dtype):
        y = x + self.c
        if src_dtype == "F16":
            y = y.astype(np.float16).astype(np.float32)
        return y

    def inverse(self, hf_shape):
        """y - c in float32. Exact whenever the forward sum was (a bf16 or f16 weight plus 1,
        |w| >= 2**-16), and in every case adding c again gives y back bit for bit (Sterbenz:
        y - 1 is exact for y in [0.5, 2], the range of Gemma norm gains), so GGUF -> HF -> GGUF
        reproduces the GGUF."""
        return AddConstant(-float(self.c))


class Softplus(Transform):
    """log(1 + exp(x)) exactly as torch.nn.functional.softplus computes it in float32 (llama.cpp
    Gemma4VisionAudioModel stores softplus(per_dim_scale)); torch is imported only here."""

    label = "softplus"

    def __call__(self, x, src_dtype):
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a dependency; numpy is a close fallback
            y = np.where(x > 20, x, np.log1p(np.exp(x.astype(np.float64)))).astype(np.float32)
            return y
        t = torch.from_numpy(np.array(x, dtype=np.float32, copy=True))
        if src_dtype == "F16":
            t = t.to(torch.float16)
        return torch.nn.functional.softplus(t).to(torch.float32).numpy()

    def inverse(self, hf_shape):
        return SoftplusInverse()


class SoftplusInverse(Transform):
    """x with softplus(x) == y: log(expm1(y)) in float64, rounded to float32, then moved by a
    few ulps until torch's float32 softplus maps it back to y exactly (Softplus above).

    Softplus loses information in float32 (its slope is below 1, so several x share one y):
    a float32 source comes back as the x nearest to the exact inverse among those that give
    the same GGUF value, and GGUF -> HF -> GGUF is byte-identical. A bf16 or f16 source comes
    back exactly once the HF tensor is rounded to its dtype (the float32 error is far below
    half a bf16/f16 ulp)."""

    label = "softplus^-1"
    MAX_STEPS = 64

    def __call__(self, y, src_dtype):
        y = np.asarray(y, dtype=np.float32)
        y64 = y.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            # softplus(x) = x for x > 20 in torch (threshold); below, log(expm1(y)) is exact math
            x = np.where(y64 > 20.0, y64, np.log(np.expm1(y64))).astype(np.float32)
        fwd = Softplus()
        for _ in range(self.MAX_STEPS):
            got = fwd(x, "F32")
            bad = got.view(np.uint32) != y.view(np.uint32)
            bad &= np.isfinite(y) & (y > 0)
            if not bad.any():
                break
            # step one ulp towards the value whose softplus is y (softplus is increasing)
            x = np.where(bad, np.nextafter(x, np.where(got < y, np.float32(np.inf), np.float32(-np.inf))), x)
            x = x.astype(np.float32)
        return x


class Reshape(Transform):
    """A reshape that keeps the outer dimension (e.g. depthwise conv [C, 1, K] -> [C, K],
    a scalar [] -> [1])."""

    def __init__(self, inner: Callable[[tuple[int, ...]], tuple[int, ...]], label: str):
        self.inner = inner
        self.label = label

    def shape(self, src_shape):
        return self.inner(src_shape)

    def __call__(self, x, src_dtype):
        if x.ndim == 0:
            return x.reshape(1)
        return x.reshape((x.shape[0],) + self.inner(x.shape)[1:])

    def inverse(self, hf_shape):
        return ReshapeTo(tuple(hf_shape))


class ReshapeTo(Transform):
    """Outer rows reshaped back to the HF layout `hf_shape` (the inverse of a Reshape)."""

    def __init__(self, hf_shape: tuple[int, ...]):
        self.hf_shape = hf_shape
        self.label = f"-> {list(hf_shape)}"

    def shape(self, src_shape):
        return self.hf_shape

    def __call__(self, x, src_dtype):
        if not self.hf_shape:
            return x.reshape(())
        return x.reshape((x.shape[0],) + self.hf_shape[1:])


SCALAR_TO_1D = Reshape(lambda s: s if s else (1,), "[] -> [1]")


# =============================================================================================
# The plan
# =============================================================================================


@dataclass
class TensorPlan:
    """One tensor of the output GGUF, decided before any payload is computed."""

    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order, as written
    qtype: GGMLQuantizationType
    reason: str  # why this type
    src: Tensor | None = None  # None for generated tensors
    hf_name: str | None = None
    n_outer: int = 1  # source outer rows read (fewer than src.n_outer when trimmed)
    transform: Transform = IDENTITY
    generated: np.ndarray | None = None  # float32 payload of a generated tensor
    # a quantized checkpoint's weight (src.encoding is SourceQuant): decided by the plan
    exact: bool | None = None  # its values are the source's, bit for bit
    why: str = ""  # how its type was chosen / why it is not exact
    sqnr: float | None = None  # dB, of a lossy one, measured while encoding (or by --dry-run)

    @property
    def source_quant(self) -> bool:
        return self.src is not None and isinstance(self.src.encoding, SourceQuant)

    @property
    def src_dtype(self) -> str:
        return self.src.dtype if self.src is not None else "generated"

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


# =============================================================================================
# Config reading
# =============================================================================================


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


# =============================================================================================
# The architecture base class
# =============================================================================================


class Arch:
    """One HF architecture family. Subclasses set the tables and override the hooks."""

    hf_architectures: tuple[str, ...] = ()
    gguf_arch: str = ""
    TEXT_TENSORS: tuple[Rule, ...] = ()
    MMPROJ_TENSORS: tuple[Rule, ...] = ()
    # HF name fragments of multimodal towers, skipped in the text GGUF (llama.cpp
    # TextModel.filter_tensors, the subset that can occur in Gemma checkpoints)
    TOWER_MARKERS: tuple[str, ...] = ("vision.", "audio.", "vision_", "audio_", "projector.",
                                      "patch_embed", "patch_embedding", "multi_modal_projector")

    def __init__(self, model_dir: Path, config: dict, ckpt: Checkpoint | None):
        self.dir = model_dir
        self.config_path = model_dir / "config.json"
        self.raw = config
        self.ckpt = ckpt
        self.hf_arch = hf_architecture(config, self.config_path)
        self.hparams = self.text_hparams(config)

    # --- hparams ---------------------------------------------------------------------------
    def text_hparams(self, config: dict) -> dict:
        """The text config with transformers' defaults, merged over the root (llama.cpp
        TextModel: {**hparams, **hparams["text_config"]})."""
        tc = config.get("text_config")
        if tc is not None and not isinstance(tc, dict):
            raise GGQuantError(f"{self.config_path}: 'text_config' must be an object")
        return {**config, **(tc or {})}

    def need(self, key: str, types: type | tuple = int, where: dict | None = None, section: str = "") -> Any:
        h = self.hparams if where is None else where
        v = h.get(key)
        if v is None or isinstance(v, bool) and types is not bool or not isinstance(v, types):
            loc = f"{section}.{key}" if section else key
            raise GGQuantError(f"{self.config_path}: key '{loc}' is missing or has the wrong type "
                               f"(got {v!r}, expected {getattr(types, '__name__', types)})")
        return v

    @property
    def block_count(self) -> int:
        return self.need("num_hidden_layers")

    # --- hooks -----------------------------------------------------------------------------
    def validate(self, parts: tuple[str, ...]) -> None:
        """Refuse configs llama.cpp cannot load (before anything is written)."""

    def is_text_tensor(self, name: str) -> bool:
        return not any(m in name for m in self.TOWER_MARKERS)

    def is_mmproj_tensor(self, name: str) -> bool:
        return "language_model." not in name and not self.is_text_tensor(name)

    def normalize_name(self, name: str) -> str:
        """llama.cpp ModelBase.filter_tensors: 'language_model.' is dropped from names."""
        return name.replace("language_model.", "")

    def skip_tensor(self, name: str, part: str) -> bool:
        """Tensors llama.cpp does not convert at all."""
        return name.endswith((".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq"))

    def transform(self, hf_name: str, gguf_name: str, src: Tensor, part: str) -> Transform:
        return SCALAR_TO_1D if not src.shape else IDENTITY

    def force_type(self, hf_name: str, gguf_name: str, n_dims: int, ftype: GGMLQuantizationType,
                   part: str) -> GGMLQuantizationType | None:
        return None

    def n_outer(self, hf_name: str, src: Tensor, part: str) -> int:
        """Outer rows of the source that are written (llama.cpp trims some embedding tables)."""
        return src.n_outer

    def extra_tensors(self, part: str) -> list[tuple[str, np.ndarray]]:
        """Generated tensors, written before the checkpoint's (prepare_tensors order)."""
        return []

    def text_metadata(self, kv: KV, file_type: int) -> None:
        raise NotImplementedError

    def mmproj_metadata(self, kv: KV, file_type: int) -> None:
        raise GGQuantError(f"{self.config_path}: {self.hf_arch} has no vision/audio towers to write as an mmproj")

    def vocab(self, kv: KV) -> None:
        raise NotImplementedError

    def has_mmproj(self) -> bool:
        return False

    # --- planning --------------------------------------------------------------------------
    def tables(self, part: str) -> tuple[Rule, ...]:
        return self.TEXT_TENSORS if part == TEXT else self.MMPROJ_TENSORS

    def map_tensor(self, name: str, part: str, src: Tensor | None = None) -> tuple[str, int | None]:
        """HF name (already normalized) -> GGUF name; unknown names are an error naming the
        file and the tensor as stored (`src`)."""
        where = f"{src.file}: tensor '{src.name}'" if src is not None else f"{self.dir}: tensor '{name}'"
        hit = map_name(self.tables(part), name)
        if hit is None:
            raise GGQuantError(
                f"{where} is not part of a {self.hf_arch} checkpoint as ggquant knows it (llama.cpp's converter "
                f"would stop with 'Can not map tensor'); remove it or check that config.json matches the weights"
            )
        gname, bid = hit
        if bid is not None and not 0 <= bid < self.block_count_for(part):
            raise GGQuantError(f"{where} is for layer {bid}, but {self.config_path.name} declares "
                               f"{self.block_count_for(part)} layers")
        return gname, bid

    def block_count_for(self, part: str) -> int:
        return self.block_count

    # --- GGUF -> HF (`ggquant convert MODEL.gguf --to hf`) --------------------------------------
    # The reverse direction reads the same tables backwards and inverts the same transforms;
    # only what the forward direction throws away is new knowledge here: the HF shape of
    # reshaped tensors (hf_shape), the stored names (denormalize_name) and config.json
    # (hf_config, from the GGUF metadata).
    GENERATED: tuple[str, ...] = ()  # GGUF names of generated tensors: no HF counterpart

    @classmethod
    def hf_config(cls, g: GGUFFacts, mm: GGUFFacts | None) -> dict:
        """config.json for the model in GGUF `g` (plus its mmproj `mm`, if given)."""
        raise NotImplementedError

    def unmap_tensor(self, gguf_name: str, part: str, where: str) -> tuple[str, int | None]:
        """GGUF name -> (normalized HF name, layer); unknown names are an error naming the file."""
        hit = unmap_name(self.tables(part), gguf_name)
        if hit is None:
            raise GGQuantError(f"{where}: tensor '{gguf_name}' is not part of a {self.gguf_arch} "
                               f"{'model' if part == TEXT else 'mmproj'} as ggquant knows it; cannot name it in "
                               f"the Hugging Face checkpoint")
        return hit

    def hf_shape(self, hf_name: str, gguf_shape: tuple[int, ...], part: str) -> tuple[int, ...]:
        """The HF shape of a tensor whose GGUF shape (numpy order) is `gguf_shape`."""
        return tuple(gguf_shape)

    def inverse_transform(self, hf_name: str, gguf_name: str, gguf_shape: tuple[int, ...],
                          part: str) -> tuple[Transform, tuple[int, ...]]:
        """(transform GGUF rows -> HF rows, HF shape): the inverse of the forward `transform`
        hook, chosen by asking that hook what it would do to an HF tensor of that shape."""
        hf_shape = self.hf_shape(hf_name, gguf_shape, part)
        stub = shape_only(hf_name, tuple(hf_shape))
        fwd = self.transform(hf_name, gguf_name, stub, part)
        if tuple(fwd.shape(tuple(hf_shape))) != tuple(gguf_shape):
            raise GGQuantError(f"tensor '{gguf_name}': shape {list(gguf_shape)} is not what {self.gguf_arch} stores "
                               f"for '{hf_name}' {list(hf_shape)}")
        return fwd.inverse(tuple(hf_shape)), tuple(hf_shape)

    def denormalize_name(self, name: str, part: str, conditional: bool) -> str:
        """Normalized HF name -> the name transformers stores (inverse of normalize_name)."""
        return name


class GGUFFacts:
    """What the GGUF -> HF direction reads from one GGUF file, without knowing the reader:
    metadata values, tensor shapes (numpy order) and the float32 values of small tensors."""

    def __init__(self, path: Path, fields: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                 values: Callable[[str], np.ndarray]):
        self.path = Path(path)
        self.fields = fields
        self.shapes = shapes
        self._values = values

    @property
    def arch(self) -> str:
        return str(self.fields.get(Keys.General.ARCHITECTURE, ""))

    def get(self, key: str, default: Any = None) -> Any:
        v = self.fields.get(key, default)
        return v.tolist() if isinstance(v, np.ndarray) else v

    def need(self, key: str, types: type | tuple = int) -> Any:
        v = self.get(key)
        if v is None or isinstance(v, bool) and types is not bool or not isinstance(v, types):
            raise GGQuantError(f"{self.path}: metadata key '{key}' is missing or has the wrong type (got {v!r}); "
                               f"this is not a complete GGUF of this architecture")
        return v

    def values(self, name: str) -> np.ndarray:
        return self._values(name)


def f32_value(v: float) -> float:
    """A float32 metadata value as the shortest decimal that reads back as the same float32
    (1e-06, not 9.999999974752427e-07)."""
    return float(str(np.float32(v)))


def choose_type(arch: Arch, hf_name: str, gguf_name: str, shape: tuple[int, ...],
                outtype: GGMLQuantizationType, part: str) -> tuple[GGMLQuantizationType, str]:
    """llama.cpp ModelBase.prepare_tensors type rules for the converter outtypes."""
    n_dims = len(shape)
    forced = arch.force_type(hf_name, gguf_name, n_dims, outtype, part)
    if n_dims <= 1 or gguf_name.endswith("_norm.weight"):
        return T.F32, "1-D or norm -> F32"
    if forced is not None:
        qt, why = forced, f"forced {forced.name}"
    elif not gguf_name.endswith(".weight"):
        return T.F32, "not a .weight -> F32"
    else:
        qt, why = outtype, "outtype"
    block = GGML_QUANT_SIZES[qt][0]
    if shape[-1] % block:
        # gguf-py quants raise QuantError; the converter falls back to F16 with a warning
        return T.F16, f"{qt.name} needs rows divisible by {block}, row is {shape[-1]} -> F16"
    return qt, why


def plan_part(arch: Arch, part: str, outtype: GGMLQuantizationType) -> list[TensorPlan]:
    """Every tensor of one output file (text or mmproj), in llama.cpp's order."""
    ckpt = arch.ckpt
    assert ckpt is not None
    plans: list[TensorPlan] = []
    seen: dict[str, str] = {}
    for gname, data in arch.extra_tensors(part):
        data = np.ascontiguousarray(data, dtype=np.float32)
        qt, why = choose_type(arch, gname, gname, data.shape, outtype, part)
        plans.append(TensorPlan(gname, data.shape, qt, "generated; " + why, generated=data))
        seen[gname] = "(generated)"
    for name, src in ckpt.tensors.items():
        belongs = arch.is_text_tensor(name) if part == TEXT else arch.is_mmproj_tensor(name)
        if not belongs:
            continue
        norm = arch.normalize_name(name)
        if arch.skip_tensor(norm, part):
            continue
        if src.dtype not in FLOAT_DTYPES:
            raise GGQuantError(f"{src.file}: tensor '{name}' has dtype {src.dtype}; ggquant converts float "
                               f"checkpoints (F32/F16/BF16) - dequantize it first")
        gname, _ = arch.map_tensor(norm, part, src)
        if gname in seen:
            raise GGQuantError(f"{src.file}: tensors '{seen[gname]}' and '{name}' both map to GGUF tensor '{gname}'")
        seen[gname] = name
        tr = arch.transform(norm, gname, src, part)
        n_outer = arch.n_outer(norm, src, part)
        src_shape = src.shape if src.shape else ()
        shape = tr.shape(((n_outer,) + src_shape[1:]) if src_shape else ())
        qt, why = choose_type(arch, norm, gname, shape, outtype, part)
        plans.append(TensorPlan(gname, tuple(shape), qt, why, src=src, hf_name=name, n_outer=n_outer, transform=tr))
    return plans


# =============================================================================================
# general.* provenance, as gguf-py Metadata derives it
# =============================================================================================


def _id_to_title(s: str) -> str:
    """gguf-py Metadata.id_to_title: '-' -> ' ', lower-case words title-cased unless versions."""
    words = s.strip().replace("-", " ").split()
    return " ".join(w.title() if w.islower() and not re.match(r"^(v\d+(?:\.\d+)*|\d.*)$", w) else w for w in words)


def model_id_components(model_id: str | None, total_params: int) -> tuple:
    """(name, org, basename, finetune, version, size_label) parsed from 'org/Model-7B-Instruct-v1'
    with the heuristics of gguf-py Metadata.get_model_id_components."""
    if model_id is None:
        return None, None, None, None, None, None
    if " " in model_id:
        return model_id, None, None, None, None, None
    if "/" in model_id:
        org, full = model_id.split("/", 1)
    else:
        org, full = None, model_id
    if org is not None and org.startswith("."):
        org = None
    parts = [p for p in full.split("-") if p]
    kinds: list[set[str]] = [set() for _ in parts]
    for i, part in enumerate(parts):
        if re.fullmatch(r"(v|iter)?\d+([.]\d+)*", part, re.IGNORECASE):
            kinds[i].add("version")
        elif re.fullmatch(r"i?q\d(_\w)*|b?fp?(16|32)", part, re.IGNORECASE):
            kinds[i].add("type")
            parts[i] = part.upper()
        elif i > 0 and re.fullmatch(r"(([A]|\d+[x])?\d+([._]\d+)?[KMBT][\d]?|small|mini|medium|large|x?xl)", part,
                                    re.IGNORECASE):
            part = part.replace("_", ".")
            if part[-1].isdecimal():  # bloom-7b1 -> 7.1B
                part = part[:-2] + "." + part[-1] + part[-2]
            if len(part) > 1 and part[-2].isdecimal() and part[-1] in "kmbt":
                part = part[:-1] + part[-1].upper()
            if total_params != 0:
                try:
                    label = float(part[:-1]) * pow(1000, " KMBT".find(part[-1]))
                    if (total_params < 0 and label < abs(total_params) // 8) or (
                            total_params > 0 and abs(label - total_params) > 7 * total_params // 8):
                        kinds[i].add("finetune")  # likely a context length
                        part = part[:-1] + part[-1].lower()
                except ValueError:
                    pass
            if not kinds[i]:
                kinds[i].add("size_label")
            parts[i] = part
        elif i > 0 and re.fullmatch(r"chat|instruct|vision|lora", part, re.IGNORECASE):
            kinds[i].add("type" if total_params < 0 and part.lower() == "lora" else "finetune")
    if any(c.isdecimal() for n, t in zip(parts, kinds) if "size_label" in t for c in n):
        for n, t in zip(parts, kinds):
            if "size_label" in t and all(c.isalpha() for c in n):
                t.remove("size_label")
    at_start = True
    for part, t in zip(parts, kinds):
        if at_start and ((not t and part[0].isalpha()) or "version" in t):
            t.add("basename")
        else:
            at_start = False
            if not t:
                t.add("finetune")
    for part, t in zip(reversed(parts), reversed(kinds)):
        if "basename" in t and len(t) > 1:
            t.remove("basename")
        else:
            break
    basename = "-".join(n for n, t in zip(parts, kinds) if "basename" in t) or None
    size_label = "-".join(dict.fromkeys(s for s, t in zip(parts, kinds) if "size_label" in t)) or None
    finetune = "-".join(f for f, t in zip(parts, kinds) if "finetune" in t) or None
    version = "-".join(v for v, t in zip(parts, kinds) if "version" in t and "basename" not in t) or None
    if size_label is None and finetune is None and version is None:
        basename = None
    return full, org, basename, finetune, version, size_label


def weight_count_label(n: int, min_digits: int = 2) -> str:
    """gguf-py model_weight_count_rounded_notation."""
    if n > 1e12:
        scaled, suffix = n * 1e-12, "T"
    elif n > 1e9:
        scaled, suffix = n * 1e-9, "B"
    elif n > 1e6:
        scaled, suffix = n * 1e-6, "M"
    else:
        scaled, suffix = n * 1e-3, "K"
    fix = max(min_digits - len(str(round(scaled)).lstrip("0")), 0)
    return f"{scaled:.{fix}f}{suffix}"


@dataclass
class General:
    """The general.* values gguf-py's Metadata.load derives (without a --metadata override file)."""

    name: str | None = None
    organization: str | None = None
    basename: str | None = None
    finetune: str | None = None
    version: str | None = None
    size_label: str | None = None
    card: dict = field(default_factory=dict)
    sampling: dict = field(default_factory=dict)
    base_models: list[dict] | None = None
    datasets: list[dict] | None = None

    @classmethod
    def derive(cls, model_dir: Path, config: dict, total_params: int) -> General:
        g = cls()
        g.card = _model_card(model_dir)
        for attr, keys in (("name", ("name", "model_name")), ("version", ("version", "model_version")),
                           ("organization", ("organization", "model_organization")),
                           ("finetune", ("finetune", "model_finetune")),
                           ("basename", ("basename", "model_basename", "model_type")),
                           ("size_label", ("size_label", "model_size_label"))):
            for k in keys:
                if getattr(g, attr) is None and isinstance(g.card.get(k), str):
                    setattr(g, attr, g.card[k])
        sources = []
        nop = config.get("_name_or_path")
        if isinstance(nop, str) and nop.count("/") <= 1:
            sources.append(nop)
        sources.append(model_dir.resolve().name)
        for model_id in sources:
            full, org, base, fine, ver, size = model_id_components(model_id, total_params)
            if g.name is None and full is not None:
                g.name = _id_to_title(full)
            if g.organization is None and org is not None:
                g.organization = _id_to_title(org)
            g.basename = g.basename if g.basename is not None else base
            g.finetune = g.finetune if g.finetune is not None else fine
            g.version = g.version if g.version is not None else ver
            g.size_label = g.size_label if g.size_label is not None else size
        g.base_models = _card_sources(g.card, ("base_model", "base_models", "base_model_sources"), total_params)
        g.datasets = _card_sources(g.card, ("datasets", "dataset", "dataset_sources"), total_params)
        if g.size_label is None and total_params > 0:
            g.size_label = weight_count_label(total_params)
        gen = read_json(model_dir / "generation_config.json", "", required=False) if (
            model_dir / "generation_config.json").is_file() else None
        if isinstance(gen, dict):
            g.sampling = gen
        return g

    def write(self, kv: KV) -> None:
        """Metadata.set_gguf_meta_model, for the fields ggquant derives (see README: the model
        card's base_models/datasets lists are not copied)."""
        G = Keys.General
        s = self.sampling
        for key, attr, kind in (
            (G.SAMPLING_SEQUENCE, "sequence", "str"), (G.SAMPLING_TOP_K, "top_k", "i32"),
            (G.SAMPLING_TOP_P, "top_p", "f32"), (G.SAMPLING_MIN_P, "min_p", "f32"),
            (G.SAMPLING_XTC_PROBABILITY, "xtc_probability", "f32"), (G.SAMPLING_XTC_THRESHOLD, "xtc_threshold", "f32"),
            (G.SAMPLING_TEMP, "temperature", "f32"), (G.SAMPLING_PENALTY_LAST_N, "penalty_last_n", "i32"),
            (G.SAMPLING_PENALTY_REPEAT, ("penalty_repeat", "repetition_penalty"), "f32"),
            (G.SAMPLING_MIROSTAT, "mirostat", "i32"), (G.SAMPLING_MIROSTAT_TAU, "mirostat_tau", "f32"),
            (G.SAMPLING_MIROSTAT_ETA, "mirostat_eta", "f32"),
        ):
            names = attr if isinstance(attr, tuple) else (attr,)
            v = next((s[n] for n in names if s.get(n) is not None), None)
            if v is None:
                continue
            if kind == "str":
                kv.string(key, v)
            elif kind == "i32":
                kv.i32(key, v)
            else:
                kv.f32(key, v)
        kv.string(G.NAME, self.name or "")
        for key, v in ((G.AUTHOR, self.card.get("author") or self.card.get("model_author") or self.card.get("model_creator")),
                       (G.VERSION, self.version), (G.ORGANIZATION, self.organization),
                       (G.FINETUNE, self.finetune), (G.BASENAME, self.basename),
                       (G.DESCRIPTION, self.card.get("description") or self.card.get("model_description")),
                       (G.SIZE_LABEL, self.size_label)):
            if isinstance(v, str):
                kv.string(key, v)
        lic = self.card.get("license")
        if isinstance(lic, list):
            kv.string(G.LICENSE, ",".join(str(x) for x in lic))
        elif isinstance(lic, str):
            kv.string(G.LICENSE, lic)
        for key, ck in ((G.LICENSE_NAME, "license_name"), (G.LICENSE_LINK, "license_link")):
            if isinstance(self.card.get(ck), str):
                kv.string(key, self.card[ck])
        for key, cks in ((G.SOURCE_URL, ("url", "model_url")), (G.SOURCE_DOI, ("doi", "model_doi")),
                         (G.SOURCE_UUID, ("uuid", "model_uuid")), (G.SOURCE_REPO_URL, ("repo_url", "model_repo_url"))):
            v = next((self.card[k] for k in cks if isinstance(self.card.get(k), str)), None)
            if v is not None:
                kv.string(key, v)
        for entries, count_key, prefix in ((self.base_models, G.BASE_MODEL_COUNT, "general.base_model"),
                                           (self.datasets, G.DATASET_COUNT, "general.dataset")):
            if entries is None:
                continue
            kv.u32(count_key, len(entries))
            for i, e in enumerate(entries):
                for field_ in ("name", "author", "version", "organization", "description", "url", "doi", "uuid",
                               "repo_url"):
                    if isinstance(e.get(field_), str):
                        kv.string(f"{prefix}.{i}.{field_}", e[field_])
        tags = _card_list(self.card, ("tags", "pipeline_tag"))
        if tags:
            kv.array(G.TAGS, tags)
        langs = _card_list(self.card, ("languages", "language"))
        if langs:
            kv.array(G.LANGUAGES, langs)


def _card_sources(card: dict, keys: tuple[str, ...], total_params: int) -> list[dict] | None:
    """Model card base_model / datasets entries as gguf-py Metadata.apply_metadata_heuristic
    describes them: a Hugging Face id or URL becomes name, organization, version, repo_url."""
    if not any(k in card for k in keys):
        return None
    value = next((card[k] for k in keys if k in card), None)
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, list) else []
    out = []
    for item in items:
        entry: dict = {}
        if isinstance(item, dict):
            entry = item
        elif isinstance(item, str):
            model_id = item
            if item.startswith(("http://", "https://", "ssh://")):
                entry["repo_url"] = item
                m = re.match(r"https?://huggingface.co/([^/]+/[^/]+)$", item) if "huggingface.co" in item else None
                model_id = m.group(1) if m else None
            if model_id is not None:
                full, org, _, _, ver, _ = model_id_components(model_id, total_params)
                if full is not None:
                    entry["name"] = _id_to_title(full)
                if org is not None:
                    entry["organization"] = _id_to_title(org)
                if ver is not None:
                    entry["version"] = ver
                if "repo_url" not in entry and org is not None and full is not None:
                    entry["repo_url"] = f"https://huggingface.co/{org}/{full}"
        out.append(entry)
    return out


def _card_list(card: dict, keys: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for k in keys:
        v = card.get(k)
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, list):
            out.extend(str(x) for x in v)
    return out


def _model_card(model_dir: Path) -> dict:
    """README.md YAML front matter (gguf-py Metadata.load_model_card)."""
    path = model_dir / "README.md"
    if not path.is_file():
        return {}
    lines = read_text(path).splitlines()
    if not lines or lines[0] != "---":
        return {}
    body = []
    for line in lines[1:]:
        if line == "---":
            break
        body.append(line)
    text = ("\n".join(body) + "\n").replace("- no\n", '- "no"\n').replace("\t", "  ")
    try:
        import yaml
    except ImportError:  # pragma: no cover
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise GGQuantError(f"{path}: the YAML front matter is invalid ({e})") from None
    return data if isinstance(data, dict) else {}


def naming_convention(g: General, size_label: str | None, output_type: str) -> str:
    """gguf-py naming_convention: <basename|name>-<size>-<finetune>-<version>-<TYPE>."""
    if g.basename is not None:
        name = g.basename.strip().replace(" ", "-").replace("/", "-")
    elif g.name is not None:
        name = g.name.strip().replace(" ", "-").replace("/", "-")
    else:
        name = "ggml-model"
    parts = [name]
    if size_label is not None:
        parts.append(size_label)
    if g.finetune is not None:
        parts.append(g.finetune.strip().replace(" ", "-"))
    if g.version is not None:
        parts.append(g.version.strip().replace(" ", "-"))
    parts.append(output_type.strip().replace(" ", "-").upper())
    return "-".join(parts)
