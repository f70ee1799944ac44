"""The architecture layer: HF names -> GGUF names, hparams -> GGUF keys, and per-tensor rules.

One module per model family subclasses `Arch`, the generic text model (llama.cpp's TextModel),
and registers itself (ggquant/arch/__init__.py). A subclass is mostly data:

- `model_arch`: the GGUF architecture, a gguf.MODEL_ARCH;
- `TEXT_TENSORS` / `MMPROJ_TENSORS`: declarative `{bid}` name tables (`Rule`), one entry per HF
  tensor with a comment saying what it is, like gguf-py's tensor_mapping.py; the GGUF side is a
  gguf.MODEL_TENSOR;
- a few hooks: `transform` (norm shifts, reshapes, softplus: arch/transforms.py), `force_type`
  (tensors llama.cpp stores in a fixed type), `extra_tensors` (generated tensors such as
  `rope_freqs`), `validate_hparams`, `expected_layer_shapes`, and `text_metadata` /
  `mmproj_metadata` / `vocab` that fill an ordered `KV`;
- for the way back (GGUF -> HF, and the runtime): a `TextHparams` subclass that decodes the
  GGUF keys as llama.cpp reads them, and `hf_config`.

The rules that decide a tensor's GGUF type for the converter's own outtypes (f32, f16, bf16,
q8_0) follow llama.cpp conversion/base.py ModelBase.prepare_tensors, in this order:
  1. the arch's forced type (tensor_force_quant),
  2. 1-D tensors and names ending in `_norm.weight` -> F32 (overrides 1.),
  3. names that do not end in `.weight` -> F32 (when nothing was forced),
  4. otherwise the outtype; Q8_0 on a row length that is not a multiple of 32 falls back to F16.

Readers do not know GGUF names and writers do not know HF names: only this layer does.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, TENSOR_NAMES, GGMLQuantizationType, Keys

from ggquant.arch.transforms import IDENTITY, SCALAR_TO_1D, Transform
from ggquant.errors import GGQuantError
from ggquant.formats.gguf import KV
from ggquant.formats.hf_folder import hf_architecture, read_json
from ggquant.formats.safetensors import Checkpoint
from ggquant.tensor import Tensor, shape_only

T = GGMLQuantizationType
TEXT, MMPROJ = "text", "mmproj"
# transformers' layer types (config layer_types) and the keys of nested rope_parameters
SLIDING, FULL = "sliding_attention", "full_attention"

# --outtype -> (GGUF type for quantizable tensors, LlamaFileType value written as general.file_type)
# (gguf LlamaFileType: ALL_F32 0, MOSTLY_F16 1, MOSTLY_Q8_0 7, MOSTLY_BF16 32)
CONVERTER_OUTTYPES: dict[str, tuple[GGMLQuantizationType, int]] = {
    "f32": (T.F32, 0),
    "f16": (T.F16, 1),
    "bf16": (T.BF16, 32),
    "q8_0": (T.Q8_0, 7),
}


# =============================================================================================
# Declarative name tables
# =============================================================================================


@dataclass(frozen=True)
class Rule:
    """One HF tensor (base name, `{bid}` = layer) -> its GGUF tensor.

    The GGUF side is a `gguf.MODEL_TENSOR`: its name comes from gguf-py's TENSOR_NAMES
    (constants.py), so a GGUF name is declared once, and tests/arch/test_tables.py checks that
    the tensor is one of `gguf.MODEL_TENSORS[arch]` (gguf-py tensor_mapping.py filters its map
    the same way).

    `suffixes`: the endings the HF name may carry; the GGUF name gets the same ending. A rule
    with suffixes=("",) matches the HF name exactly; its GGUF name then ends in `gguf_suffix`
    (a buffer such as Gemma 4's layer_scalar is stored as `<name>.weight`).
    """

    hf: str
    tensor: MODEL_TENSOR | str  # a str: the GGUF base name of a tensor the pinned gguf does not declare yet
    note: str
    suffixes: tuple[str, ...] = (".weight", ".bias")
    gguf_suffix: str = ""
    gguf: str = field(init=False, compare=False)  # the GGUF base name, `{bid}` = layer
    regex: re.Pattern = field(init=False, repr=False, compare=False)
    gguf_regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        gguf = (self.tensor if isinstance(self.tensor, str) else TENSOR_NAMES[self.tensor]) + self.gguf_suffix
        object.__setattr__(self, "gguf", gguf)
        object.__setattr__(self, "regex", _bid_pattern(self.hf))
        object.__setattr__(self, "gguf_regex", _bid_pattern(gguf))

    def match(self, name: str) -> tuple[str, int | None] | None:
        """HF name -> (GGUF name + the same ending, layer)."""
        return _match(self.regex, self.gguf, self.suffixes, name)

    def unmatch(self, gguf_name: str) -> tuple[str, int | None] | None:
        """The inverse of match(): GGUF name -> (HF base name + the same ending, layer)."""
        return _match(self.gguf_regex, self.hf, self.suffixes, gguf_name)


def _bid_pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{bid}"), r"(\d+)") + "$")


def _match(pattern: re.Pattern, target: str, suffixes: tuple[str, ...], name: str) -> tuple[str, int | None] | None:
    for suf in suffixes:
        if suf and not name.endswith(suf):
            continue
        base = name[: len(name) - len(suf)] if suf else name
        m = pattern.match(base)
        if m:
            bid = int(m.group(1)) if m.groups() else None
            return target.format(bid=bid) + suf, bid
    return None


# =============================================================================================
# RoPE parameters: what transformers' config holds and what llama.cpp's TextModel folds into it
# =============================================================================================


def standard_rope_parameters(h: dict, default_theta: float = 10_000.0) -> dict:
    """transformers 5 RotaryEmbeddingConfigMixin (convert_rope_params_to_dict, then
    standardize_rope_params) for a config whose RoPE is not nested by layer type: the legacy
    `rope_scaling` dict (else `rope_parameters`) with rope_theta, partial_rotary_factor, rope_type
    and, for llama3/yarn/longrope, original_max_position_embeddings filled in. This is what
    AutoConfig(...).to_dict() hands llama.cpp's converter; `rope_theta` / `rope_scaling` are gone
    from the top level afterwards (the caller drops them)."""
    rs, rp = h.get("rope_scaling"), h.get("rope_parameters")
    out = dict(rs) if isinstance(rs, dict) and rs else (dict(rp) if isinstance(rp, dict) else {})
    theta = h.get("rope_theta", default_theta)
    prf = h.get("partial_rotary_factor")
    out.setdefault("rope_theta", theta)
    if prf is not None:
        out.setdefault("partial_rotary_factor", prf)
    out.setdefault("rope_type", out.get("type", "default"))
    if out["rope_type"] in ("llama3", "yarn", "longrope"):
        if "original_max_position_embeddings" in h:
            out["original_max_position_embeddings"] = h["original_max_position_embeddings"]
        elif h.get("max_position_embeddings") is not None:
            out.setdefault("original_max_position_embeddings", h["max_position_embeddings"])
    return out


def _first(h: dict, keys: tuple[str, ...]) -> Any:
    """llama.cpp ModelBase.find_hparam(keys, optional=True): the first key present (even if None)."""
    return next((h[k] for k in keys if k in h), None)


def fold_rope_parameters(h: dict) -> dict:
    """llama.cpp TextModel.__init__: rope_parameters (or rope_scaling), with the global keys of the
    config mirrored into it when it is not nested by layer type: rope_theta, a local theta as
    sliding_attention, rope_type from `type`, partial_rotary_factor and
    original_max_position_embeddings."""
    rp = h.get("rope_parameters", h.get("rope_scaling")) or {}
    rp = {k: dict(v) if isinstance(v, dict) else v for k, v in rp.items()}
    theta = _first(h, ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base"))
    local = _first(h, ("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta",
                       "rope_local_base_freq"))
    prf = _first(h, ("partial_rotary_factor", "rope_pct", "rope_percent"))
    omp = _first(h, ("original_max_position_embeddings",))
    if FULL not in rp and SLIDING not in rp:
        if local is not None:
            rp[SLIDING] = {"rope_theta": local}
        if "rope_theta" not in rp and theta is not None:
            rp["rope_theta"] = theta
        if "rope_type" not in rp and rp.get("type") is not None:
            rp["rope_type"] = rp["type"]
        if "partial_rotary_factor" not in rp and prf is not None:
            rp["partial_rotary_factor"] = prf
        if "original_max_position_embeddings" not in rp and omp is not None:
            rp["original_max_position_embeddings"] = omp
    return rp


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
# The architecture base class
# =============================================================================================


class Arch:
    """One HF architecture family: the generic text model every family inherits (llama.cpp
    conversion/base.py ModelBase + TextModel, and MmprojModel's generic part), in both
    directions. A family module sets `model_arch` and the name tables, registers the class with
    `@ggquant.arch.register(<HF architecture strings>)` and overrides the hooks it needs."""

    model_arch: MODEL_ARCH  # the GGUF architecture (gguf-py constants.py)
    gguf_arch: str = ""  # its name, general.architecture (set from model_arch)
    hf_architectures: tuple[str, ...] = ()  # config.json "architectures"[0] values (set by register)
    TEXT_TENSORS: tuple[Rule, ...] = ()
    MMPROJ_TENSORS: tuple[Rule, ...] = ()
    # config keys the text model cannot do without (checked by validate)
    REQUIRED_HPARAMS: tuple[str, ...] = ("num_hidden_layers", "hidden_size", "intermediate_size",
                                         "num_attention_heads", "num_key_value_heads", "vocab_size")
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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "model_arch" in cls.__dict__:
            cls.gguf_arch = MODEL_ARCH_NAMES[cls.model_arch]

    # --- hparams ---------------------------------------------------------------------------
    def text_hparams(self, config: dict) -> dict:
        """The text config with transformers' defaults, merged over the root (llama.cpp
        TextModel: {**hparams, **hparams["text_config"]})."""
        tc = config.get("text_config")
        if tc is not None and not isinstance(tc, dict):
            raise GGQuantError(f"{self.config_path}: 'text_config' must be an object")
        return {**config, **(tc or {})}

    def need(self, key: str, types: type | tuple = int) -> Any:
        """A config key the conversion cannot do without, of one of `types`."""
        v = self.hparams.get(key)
        if not _is_a(v, types):
            raise GGQuantError(f"{self.config_path}: key '{key}' is missing or has the wrong type "
                               f"(got {v!r}, expected {getattr(types, '__name__', types)})")
        return v

    @property
    def block_count(self) -> int:
        return self.need("num_hidden_layers")

    # --- hooks -----------------------------------------------------------------------------
    def validate(self, parts: tuple[str, ...]) -> None:
        """Refuse configs and checkpoints llama.cpp cannot load (before anything is written)."""
        for key in self.REQUIRED_HPARAMS:
            self.need(key)
        self.validate_hparams()
        if TEXT in parts:
            self.check_text_tensors()
            self.check_vocab_sizes()

    def validate_hparams(self) -> None:
        """The family's own checks of the config (layer patterns, features llama.cpp lacks)."""

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

    def quantized_expert_stacks(self, names: list[str], fuse_gate_up: bool = True) -> dict[str, list[list[str]]]:
        """Stacked expert weights of a quantized checkpoint that stores one module per expert:
        {the architecture's stacked HF name: per expert, the per-expert weights whose rows it
        stacks, in order}. Names not listed stay as they are. A family with stacked experts
        overrides this; missing experts are an error naming the tensor. fuse_gate_up=False: gate
        and up stacked apart even where the architecture fuses them (NVFP4 experts, which
        llama.cpp's converter writes as ffn_gate_exps / ffn_up_exps)."""
        return {}

    def expert_output_scales(self, stacks: list[str]) -> dict[str, str]:
        """{stacked expert weight: the checkpoint tensor [n_expert] scaling each expert's output},
        for the stacks (of `stacks`) whose per-expert factors llama.cpp folds into NVFP4 scales."""
        return {}

    def quantized_expert_concats(self, names: list[str]) -> dict[str, list[str]]:
        """Stacked expert weights of a quantized checkpoint that keeps experts stacked but split
        differently from the architecture's tensor (mlx-lm's switch_glu gate_proj / up_proj):
        {the architecture's stacked HF name: the stacked weights whose per-expert rows it
        concatenates, in order}. A family with stacked experts overrides this."""
        return {}

    def extra_tensors(self, part: str) -> list[tuple[str, np.ndarray]]:
        """Generated tensors, written before the checkpoint's (prepare_tensors order)."""
        return []

    def mmproj_metadata(self, kv: KV, file_type: int) -> None:
        raise GGQuantError(f"{self.config_path}: {self.hf_arch} has no vision/audio towers to write as an mmproj")

    def vocab(self, kv: KV) -> None:
        raise NotImplementedError

    def read_tokens(self) -> tuple[list[str], list[float], list[int]]:
        """(tokens, scores, types) of the tokenizer files, as the family's vocab writes them."""
        raise NotImplementedError

    def has_mmproj(self) -> bool:
        return False

    def no_mmproj_reason(self) -> str:
        """Why --mmproj cannot be written for this checkpoint (has_mmproj() is False)."""
        return f"this {self.hf_arch} checkpoint has no vision tower ('vision_config'), so there is no mmproj to write"

    # --- the generic text model (llama.cpp TextModel) --------------------------------------------
    def tokens(self) -> tuple[list[str], list[float], list[int]]:
        """(tokens, scores, types) as written to the GGUF; read once."""
        if not hasattr(self, "_tokens"):
            self._tokens = self.read_tokens()
        return self._tokens

    def text_metadata(self, kv: KV, file_type: int) -> None:
        """conversion/base.py TextModel.set_gguf_parameters, for the keys a llama-like config has
        (text_hparams must have filled `rope_parameters`, nested by layer type or flat)."""
        a, h = self.gguf_arch, self.hparams
        L, A, R = Keys.LLM, Keys.Attention, Keys.Rope
        kv.u32(L.BLOCK_COUNT.format(arch=a), self.block_count)
        kv.u32(L.CONTEXT_LENGTH.format(arch=a), h["max_position_embeddings"])
        kv.u32(L.EMBEDDING_LENGTH.format(arch=a), h["hidden_size"])
        kv.u32(L.FEED_FORWARD_LENGTH.format(arch=a), h["intermediate_size"])
        kv.u32(A.HEAD_COUNT.format(arch=a), h["num_attention_heads"])
        kv.u32(A.HEAD_COUNT_KV.format(arch=a), h["num_key_value_heads"])
        if h.get("is_causal") is False:
            kv.bool(A.CAUSAL.format(arch=a), False)
        rp = h["rope_parameters"]
        full = rp.get(FULL, rp)
        rtype, factor = full.get("rope_type"), full.get("factor")
        if rtype == "linear" and factor is not None:
            kv.string(R.SCALING_TYPE.format(arch=a), "linear")
            kv.f32(R.SCALING_FACTOR.format(arch=a), factor)
        elif rtype == "yarn" and factor is not None:
            kv.string(R.SCALING_TYPE.format(arch=a), "yarn")
            kv.f32(R.SCALING_FACTOR.format(arch=a), factor)
            kv.u32(R.SCALING_ORIG_CTX_LEN.format(arch=a), full["original_max_position_embeddings"])
            for key, names in ((R.SCALING_YARN_EXT_FACTOR, ("extrapolation_factor",)),
                               (R.SCALING_YARN_ATTN_FACTOR, ("attention_factor", "attn_factor")),
                               (R.SCALING_YARN_BETA_FAST, ("beta_fast",)), (R.SCALING_YARN_BETA_SLOW, ("beta_slow",))):
                v = next((full[n] for n in names if full.get(n) is not None), None)
                if v is not None:
                    kv.f32(key.format(arch=a), v)
        if full.get("rope_theta") is not None:
            kv.f32(R.FREQ_BASE.format(arch=a), full["rope_theta"])
        swa = rp.get(SLIDING, {}) if isinstance(rp.get(SLIDING), dict) else {}
        if swa.get("rope_theta") is not None:
            kv.f32(R.FREQ_BASE_SWA.format(arch=a), swa["rope_theta"])
        kv.f32(A.LAYERNORM_RMS_EPS.format(arch=a), h["rms_norm_eps"])
        n_exp = next((h[k] for k in ("num_local_experts", "num_experts", "n_routed_experts") if k in h), None)
        if n_exp is not None:
            kv.u32(L.EXPERT_COUNT.format(arch=a), n_exp)
        n_used = next((h[k] for k in ("num_experts_per_tok", "num_experts_per_token", "top_k_experts") if k in h), None)
        if n_used is not None:
            kv.u32(L.EXPERT_USED_COUNT.format(arch=a), n_used)
        if h.get("head_dim") is not None:
            kv.u32(A.KEY_LENGTH.format(arch=a), h["head_dim"])
            kv.u32(A.VALUE_LENGTH.format(arch=a), h["head_dim"])
        kv.u32(Keys.General.FILE_TYPE, file_type)

    def layer_dims(self, il: int) -> dict:
        """Sizes of layer il's tensors: head_dim, n_kv (heads), ffn; a family may add has_kv /
        has_v (False: the layer may lack its own k / v projections)."""
        h = self.hparams
        return dict(head_dim=h.get("head_dim") or h["hidden_size"] // h["num_attention_heads"],
                    n_kv=h["num_key_value_heads"], ffn=h["intermediate_size"])

    def expected_shapes(self) -> dict[str, tuple[tuple[int, ...], bool]]:
        """HF name (normalized) -> (shape, required) for the text decoder."""
        h = self.hparams
        H = h["hidden_size"]
        exp: dict[str, tuple[tuple[int, ...], bool]] = {
            "model.embed_tokens.weight": ((h["vocab_size"], H), True),
            "model.norm.weight": ((H,), True),
            "lm_head.weight": ((h["vocab_size"], H), not h.get("tie_word_embeddings", True)),
        }
        for il in range(self.block_count):
            exp.update(self.expected_layer_shapes(il))
        return exp

    def expected_layer_shapes(self, il: int) -> dict[str, tuple[tuple[int, ...], bool]]:
        """A llama-style decoder layer (transformers LlamaDecoderLayer); families add their own."""
        h = self.hparams
        H, nh = h["hidden_size"], h["num_attention_heads"]
        d = self.layer_dims(il)
        hd, nkv, ff = d["head_dim"], d["n_kv"], d["ffn"]
        kv_required = d.get("has_kv", True)
        p = f"model.layers.{il}."
        return {
            p + "input_layernorm.weight": ((H,), True),
            p + "self_attn.q_proj.weight": ((nh * hd, H), True),
            p + "self_attn.k_proj.weight": ((nkv * hd, H), kv_required),
            p + "self_attn.v_proj.weight": ((nkv * hd, H), kv_required and d.get("has_v", True)),
            p + "self_attn.o_proj.weight": ((H, nh * hd), True),
            p + "post_attention_layernorm.weight": ((H,), True),
            p + "mlp.gate_proj.weight": ((ff, H), True),
            p + "mlp.up_proj.weight": ((ff, H), True),
            p + "mlp.down_proj.weight": ((H, ff), True),
        }

    def check_text_tensors(self) -> None:
        """Missing tensors and wrong shapes, against what the config declares."""
        assert self.ckpt is not None
        present = {self.normalize_name(n): t for n, t in self.ckpt.tensors.items() if self.is_text_tensor(n)}
        nested = any(n.startswith("model.language_model.") for n in self.ckpt.tensors)
        for name, (shape, required) in self.expected_shapes().items():
            t = present.get(name)
            if t is None:
                if required:
                    stored = "model.language_model." + name[len("model."):] if nested and name.startswith(
                        "model.") else name
                    raise GGQuantError(
                        f"{self.dir}: tensor '{stored}' is missing from the checkpoint ({self.config_path.name} "
                        f"declares it); the download is incomplete or the config does not belong to these weights")
                continue
            if tuple(t.shape) != tuple(shape):
                raise GGQuantError(
                    f"{t.file}: tensor '{t.name}' has shape {list(t.shape)}, but {self.config_path.name} implies "
                    f"{list(shape)}; the config and the weights disagree")

    def check_vocab_sizes(self) -> None:
        """llama.cpp refuses a token_embd whose rows differ from the tokenizer's size."""
        n_tokens = len(self.tokens()[0])
        assert self.ckpt is not None
        for name, t in self.ckpt.tensors.items():
            norm = self.normalize_name(name)
            if norm == "model.embed_tokens.weight":
                rows = self.n_outer(norm, t, TEXT)
                if rows != n_tokens:
                    raise GGQuantError(
                        f"{t.file}: tensor '{name}' has {rows} rows but the tokenizer has {n_tokens} tokens "
                        f"(config vocab_size {self.hparams.get('vocab_size')}); llama.cpp would refuse to load "
                        f"the GGUF (token_embd has the wrong shape). Fix vocab_size or the tokenizer files")

    # --- the generic mmproj (llama.cpp MmprojModel) ----------------------------------------------
    def preprocessor(self) -> dict:
        """MmprojModel: preprocessor_config.json, then processor_config.json merged over it."""
        cfg: dict = {}
        p = read_json(self.dir / "preprocessor_config.json", "", required=False)
        if isinstance(p, dict):
            cfg.update({**p, **p["media_proc_cfg"]} if isinstance(p.get("media_proc_cfg"), dict) else p)
        q = read_json(self.dir / "processor_config.json", "", required=False)
        if isinstance(q, dict):
            cfg.update({**q, **q["image_processor"]} if isinstance(q.get("image_processor"), dict) else q)
        return cfg

    def mmproj_vision_common(self, kv: KV, file_type: int, vis: dict, image_size: int) -> None:
        """MmprojModel.set_gguf_parameters, vision part."""
        CV = Keys.ClipVision
        kv.u32(Keys.General.FILE_TYPE, file_type)
        kv.bool(Keys.Clip.HAS_VISION_ENCODER, True)
        kv.u32(CV.PROJECTION_DIM, self.hparams.get("hidden_size") or 0)
        kv.u32(CV.IMAGE_SIZE, image_size)
        kv.u32(CV.PATCH_SIZE, vis["patch_size"])
        kv.u32(CV.EMBEDDING_LENGTH, vis["hidden_size"])
        kv.u32(CV.FEED_FORWARD_LENGTH, vis["intermediate_size"])
        kv.u32(CV.BLOCK_COUNT, vis["num_hidden_layers"])
        kv.u32(CV.Attention.HEAD_COUNT, vis["num_attention_heads"])
        pp = self.preprocessor()
        for key, name in ((CV.IMAGE_MEAN, "image_mean"), (CV.IMAGE_STD, "image_std")):
            if not isinstance(pp.get(name), list):
                raise GGQuantError(f"{self.dir}: '{name}' not found in preprocessor_config.json or "
                                   f"processor_config.json; the mmproj needs the image normalisation")
            kv.array(key, pp[name], f"{self.dir}: {name}")

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
    # expert stacks the GGUF stores per projection where the HF model fuses them (llama.cpp's
    # NVFP4 path, ModelBase._flush_nvfp4_experts): {fused HF name ending: the HF name endings of
    # the stacks whose rows it concatenates per expert, in order}
    HF_EXPERT_JOINS: dict[str, tuple[str, ...]] = {}

    def folded_expert_factors(self, gguf_names: list[str]) -> set[str]:
        """GGUF names of [n_expert] `<stack>.scale` tensors (one factor per expert, which llama.cpp
        multiplies into that expert's product) that `--to hf` folds into the stack's rows. A
        folded factor that the tables also name an HF tensor is written there as ones."""
        return set()
    # tokenizer_config.json's tokenizer_class: transformers 5 runs tokenizer.json as written for this
    # one; a model's own class (GemmaTokenizer, LlamaTokenizer) may rebuild the pipeline its own way
    HF_TOKENIZER_CLASS = "PreTrainedTokenizerFast"

    @classmethod
    def export_class(cls, g: GGUFFacts, mm: GGUFFacts | None) -> type[Arch]:
        """The class that exports GGUF `g` (+ mmproj `mm`) when general.architecture alone does not
        tell (Gemma 4 Unified: a gemma4 text GGUF with a gemma4uv mmproj)."""
        return cls

    @classmethod
    def hf_config(cls, g: GGUFFacts, mm: GGUFFacts | None) -> dict:
        """config.json for the model in GGUF `g` (plus its mmproj `mm`, if given)."""
        raise NotImplementedError

    @classmethod
    def hf_generation_extra(cls, g: GGUFFacts) -> dict:
        """generation_config.json entries beyond the special token ids, from the GGUF metadata."""
        return {}

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


# =============================================================================================
# GGUF metadata, read back: one decoder per family (runtime and GGUF -> HF share it)
# =============================================================================================

REQUIRED = object()  # marks a metadata key llama.cpp requires (llama_model_loader::get_key(..., true))

# llama.cpp's defaults for optional keys (src/llama-hparams.h, llama_model_base::load_hparams)
ROPE_FREQ_BASE_DEFAULT = 10_000.0  # rope_freq_base_train
ROPE_FREQ_BASE_SWA_DEFAULT = 10_000.0  # rope_freq_base_train_swa
# the older name of rope.scaling.factor, still read by llama.cpp (llama-arch.cpp LLM_KV_ROPE_SCALE_LINEAR);
# gguf-py has no constant for it
ROPE_SCALE_LINEAR = "{arch}.rope.scale_linear"


class GGUFFacts:
    """What is read back from one GGUF file, without knowing the reader: metadata values,
    tensor shapes (numpy order) and the float32 values of small tensors."""

    def __init__(self, path: Path, fields: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                 values: Callable[[str], np.ndarray] | None = None):
        self.path = Path(path)
        self.fields = fields
        self.shapes = shapes
        self._values = values

    @classmethod
    def of(cls, reader: Any, values: Callable[[str], np.ndarray] | None = None) -> GGUFFacts:
        """The facts of an open reader with `path`, `fields` (name -> field with `.value`) and
        `tensors` (with `.name`, `.shape`): formats.gguf.GGUFReader or the runtime's HF folder."""
        return cls(reader.path, {k: f.value for k, f in reader.fields.items()},
                   {t.name: tuple(t.shape) for t in reader.tensors}, values)

    @property
    def arch(self) -> str:
        return str(self.fields.get(Keys.General.ARCHITECTURE, ""))

    def get(self, key: str, default: Any = None) -> Any:
        v = self.fields.get(key, default)
        return v.tolist() if isinstance(v, np.ndarray) else v

    def need(self, key: str, types: type | tuple = int, default: Any = REQUIRED) -> Any:
        """llama_model_loader::get_key: the value of `key`, of one of `types`; `default` when the
        key is absent and optional; an error naming the file and the key otherwise."""
        v = self.get(key)
        if v is None and default is not REQUIRED:
            return default
        if not _is_a(v, types):
            raise GGQuantError(f"{self.path}: metadata key '{key}' is missing or has the wrong type (got {v!r}); "
                               f"this is not a complete GGUF of this architecture")
        return v

    def per_layer(self, key: str, n_layer: int, types: type | tuple = int, default: Any = REQUIRED) -> list:
        """llama_model_loader::get_key_or_arr: an array of one value per layer, or a scalar for every
        layer; `default` (a scalar, or a list of one per layer) when the key is absent and optional."""
        v = self.get(key)
        if v is None and default is not REQUIRED:
            return list(default) if isinstance(default, list) else [default] * n_layer
        if isinstance(v, list):
            if len(v) != n_layer:
                raise GGQuantError(f"{self.path}: '{key}' has {len(v)} entries, expected one per layer ({n_layer})")
            if not all(_is_a(x, types) for x in v):
                raise GGQuantError(f"{self.path}: metadata key '{key}' has items of the wrong type ({v!r})")
            return v
        return [self.need(key, types)] * n_layer

    def values(self, name: str) -> np.ndarray:
        if self._values is None:
            raise GGQuantError(f"{self.path}: tensor values of '{name}' were not made readable")
        return self._values(name)


def _is_a(v: Any, types: type | tuple) -> bool:
    return v is not None and not (isinstance(v, bool) and types is not bool) and isinstance(v, types)


@dataclass
class TextHparams:
    """A text model's GGUF hyperparameters, decoded once for everything that reads a GGUF: the
    runtime (runtime/models/) and the GGUF -> HF direction (Arch.hf_config).

    The keys and their defaults are llama.cpp's: llama_model_base::load_hparams (src/llama-model.cpp)
    here, then the family's load_arch_hparams (src/models/<arch>.cpp) in its subclass, which
    extends `decode` (Gemma3Hparams in arch/gemma3.py). A key llama.cpp requires is an error naming
    the file and the key; an optional one takes llama.cpp's default. Per-layer values are lists.
    """

    path: Path
    arch: str  # general.architecture: the prefix of every key below
    n_layer: int  # block_count
    n_embd: int  # embedding_length
    n_ctx_train: int  # context_length
    n_head: list[int]  # attention.head_count, per layer
    n_head_kv: list[int]  # attention.head_count_kv, per layer (default: n_head)
    n_ff: list[int]  # feed_forward_length, per layer
    head_dim: int  # attention.key_length (default n_embd / n_head)
    head_dim_v: int  # attention.value_length (default n_embd / n_head)
    head_dim_swa: int  # attention.key_length_swa: sliding-window layers (default head_dim)
    head_dim_v_swa: int  # attention.value_length_swa (default head_dim_v)
    n_rot: int  # rope.dimension_count (default head_dim)
    n_rot_swa: int  # rope.dimension_count_swa (default n_rot)
    eps: float  # attention.layer_norm_rms_epsilon (the llama-like families all read it)
    causal: bool  # attention.causal (default true)
    rope_base: float  # rope.freq_base
    rope_base_swa: float  # rope.freq_base_swa (read by the families with sliding-window layers)
    rope_scaling: str | None  # rope.scaling.type as stored (llama.cpp reads a missing one as linear)
    rope_factor: float  # rope.scaling.factor, or the older rope.scale_linear; 0: no scaling
    n_ctx_orig_yarn: int  # rope.scaling.original_context_length (default n_ctx_train)
    yarn: dict[str, float]  # rope.scaling.yarn_* present in the file, by their Hugging Face names
    n_swa: int  # attention.sliding_window; 0: no sliding-window layers
    is_swa: list[bool]  # per layer: a sliding-window layer (the family decodes its pattern)
    final_softcap: float  # final_logit_softcapping; 0: none

    @classmethod
    def from_gguf(cls, g: GGUFFacts) -> Self:
        return cls(**cls.decode(g))

    @classmethod
    def decode(cls, g: GGUFFacts) -> dict[str, Any]:
        """llama_model_base::load_hparams, for the keys the llama-like families use."""
        a, L, A, R = g.arch, Keys.LLM, Keys.Attention, Keys.Rope
        n_layer = g.need(L.BLOCK_COUNT.format(arch=a))
        if n_layer < 1:
            raise GGQuantError(f"{g.path}: {L.BLOCK_COUNT.format(arch=a)} = {n_layer}; a model has at least one layer")
        n_embd = g.need(L.EMBEDDING_LENGTH.format(arch=a))
        n_head = g.per_layer(A.HEAD_COUNT.format(arch=a), n_layer)
        head_size = n_embd // n_head[0] if n_head[0] else 0  # llama.cpp: n_embd / n_head when not stored
        head_dim = g.need(A.KEY_LENGTH.format(arch=a), default=head_size)
        head_dim_v = g.need(A.VALUE_LENGTH.format(arch=a), default=head_size)
        n_rot = g.need(R.DIMENSION_COUNT.format(arch=a), default=head_dim)
        factor = g.need(R.SCALING_FACTOR.format(arch=a), (int, float),
                        default=g.need(ROPE_SCALE_LINEAR.format(arch=a), (int, float), default=0.0))
        n_ctx = g.need(L.CONTEXT_LENGTH.format(arch=a))
        yarn = {name: g.need(key.format(arch=a), (int, float)) for key, name in _YARN_KEYS
                if g.get(key.format(arch=a)) is not None}
        return dict(
            path=g.path, arch=a, n_layer=n_layer, n_embd=n_embd, n_ctx_train=n_ctx, n_head=n_head,
            n_head_kv=g.per_layer(A.HEAD_COUNT_KV.format(arch=a), n_layer, default=n_head),
            n_ff=g.per_layer(L.FEED_FORWARD_LENGTH.format(arch=a), n_layer),
            head_dim=head_dim, head_dim_v=head_dim_v,
            head_dim_swa=g.need(A.KEY_LENGTH_SWA.format(arch=a), default=head_dim),
            head_dim_v_swa=g.need(A.VALUE_LENGTH_SWA.format(arch=a), default=head_dim_v),
            n_rot=n_rot, n_rot_swa=g.need(R.DIMENSION_COUNT_SWA.format(arch=a), default=n_rot),
            eps=g.need(A.LAYERNORM_RMS_EPS.format(arch=a), (int, float)),
            causal=g.need(A.CAUSAL.format(arch=a), bool, default=True),
            rope_base=g.need(R.FREQ_BASE.format(arch=a), (int, float), default=ROPE_FREQ_BASE_DEFAULT),
            rope_base_swa=g.need(R.FREQ_BASE_SWA.format(arch=a), (int, float), default=ROPE_FREQ_BASE_SWA_DEFAULT),
            rope_scaling=g.need(R.SCALING_TYPE.format(arch=a), str, default=None), rope_factor=factor,
            n_ctx_orig_yarn=g.need(R.SCALING_ORIG_CTX_LEN.format(arch=a), default=n_ctx), yarn=yarn,
            n_swa=0, is_swa=[False] * n_layer,
            final_softcap=g.need(L.FINAL_LOGIT_SOFTCAPPING.format(arch=a), (int, float), default=0.0),
        )

    @property
    def rope_freq_scale(self) -> float:
        """1 / rope.scaling.factor in float32 (llama_model_base::load_hparams rope_freq_scale_train)."""
        return 1.0 if self.rope_factor == 0.0 else float(1.0 / np.float32(self.rope_factor))

    def layer_head_dim(self, il: int) -> int:
        return self.head_dim_swa if self.is_swa[il] else self.head_dim

    def layer_n_rot(self, il: int) -> int:
        return self.n_rot_swa if self.is_swa[il] else self.n_rot

    def single(self, values: list, key: str) -> Any:
        """The one value of a per-layer key, where a Hugging Face config holds one value."""
        if len(set(values)) != 1:
            raise GGQuantError(f"{self.path}: '{key.format(arch=self.arch)}' varies per layer ({values}); the "
                               f"Hugging Face configuration of {self.arch} has one value for every layer")
        return values[0]


LLAMA_MAX_EXPERTS = 512  # src/llama-hparams.h


def expert_counts(g: GGUFFacts, n_layer: int) -> tuple[int, list[int]]:
    """(n_expert, n_expert_used per layer) as llama_model_base::load_hparams reads them
    (expert_count, expert_used_count: both optional, 0 for a dense model), with its asserts
    turned into errors naming the file and the key."""
    L = Keys.LLM
    k_count, k_used = L.EXPERT_COUNT.format(arch=g.arch), L.EXPERT_USED_COUNT.format(arch=g.arch)
    n_expert = g.need(k_count, default=0)
    used = g.per_layer(k_used, n_layer, default=0)
    if n_expert > LLAMA_MAX_EXPERTS:
        raise GGQuantError(f"{g.path}: '{k_count}' = {n_expert} is above llama.cpp's maximum of {LLAMA_MAX_EXPERTS}")
    if max(used) > n_expert or (n_expert > 0 and max(used) == 0):
        raise GGQuantError(f"{g.path}: '{k_used}' = {max(used)} must be in [1, '{k_count}' = {n_expert}] "
                           f"(llama.cpp refuses this file)" if n_expert else
                           f"{g.path}: '{k_used}' = {max(used)} but the file has no experts ('{k_count}' is 0)")
    return n_expert, used


def swa_pattern(g: GGUFFacts, n_layer: int, default_period: int) -> list[bool]:
    """llama_model_base::load_swa_pattern: a bool array (true = sliding), or a period n whose layer
    il slides unless il % n == n - 1 (llama_hparams::set_swa_pattern; n = 0: every layer slides)."""
    key = Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=g.arch)
    if isinstance(g.get(key), list):
        pat = g.per_layer(key, n_layer, bool)
        return [bool(p) for p in pat]
    n = g.need(key, default=default_period)
    return [n == 0 or il % n < n - 1 for il in range(n_layer)]


# rope.scaling.yarn_* keys -> the Hugging Face rope_parameters names (TextModel.set_gguf_parameters)
_YARN_KEYS = ((Keys.Rope.SCALING_YARN_EXT_FACTOR, "extrapolation_factor"),
              (Keys.Rope.SCALING_YARN_ATTN_FACTOR, "attention_factor"),
              (Keys.Rope.SCALING_YARN_BETA_FAST, "beta_fast"), (Keys.Rope.SCALING_YARN_BETA_SLOW, "beta_slow"))


def hf_rope_parameters(hp: TextHparams) -> dict:
    """The global (full-attention) rope_parameters of a Hugging Face config from the GGUF: the
    inverse of TextModel.set_gguf_parameters' rope keys."""
    full: dict = {"rope_type": "default", "rope_theta": f32_value(hp.rope_base)}
    if hp.rope_scaling in ("linear", "yarn") and hp.rope_factor:
        full["rope_type"] = hp.rope_scaling
        full["factor"] = f32_value(hp.rope_factor)
    if hp.rope_scaling == "yarn":
        full["original_max_position_embeddings"] = hp.n_ctx_orig_yarn
        full.update({name: f32_value(v) for name, v in hp.yarn.items()})
    elif hp.rope_scaling not in (None, "none", "linear"):
        raise GGQuantError(f"{hp.path}: rope scaling type {hp.rope_scaling!r} has no Hugging Face {hp.arch} "
                           f"equivalent")
    return full


def hf_token_ids(g: GGUFFacts) -> dict:
    """bos/eos/pad ids of the GGUF tokenizer, as config.json carries them."""
    K = Keys.Tokenizer
    out = {}
    for key, name in ((K.BOS_ID, "bos_token_id"), (K.EOS_ID, "eos_token_id"), (K.PAD_ID, "pad_token_id")):
        if isinstance(g.get(key), int):
            out[name] = g.get(key)
    return out


def token_ids_by_text(g: GGUFFacts, **names: str) -> dict:
    """{config key: id} of tokens found by their text (multimodal marker tokens)."""
    tokens = g.get(Keys.Tokenizer.LIST) or []
    index = {t: i for i, t in enumerate(tokens)}
    return {k: index[t] for k, t in names.items() if t in index}


def f32_value(v: float) -> float:
    """A float32 metadata value as the shortest decimal that reads back as the same float32
    (1e-06, not 9.999999974752427e-07)."""
    return float(str(np.float32(v)))
