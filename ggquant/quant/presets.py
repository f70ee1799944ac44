"""llama.cpp's quantization presets and mixture rules, as `llama_model_quantize` applies them.

Ported from src/llama-quant.cpp (llama.cpp vendored in llama-cpp-python 0.3.36):
`tensor_allows_quantization`, `tensor_get_category`, `llama_tensor_get_type{,_impl}`,
`tensor_type_fallback`, `tensor_requires_imatrix`, `llama_ftype_get_default_type`.
The visiting order (and therefore the running counters such as i_attention_wv) is the
loader's `weight_name_comparer`: non-block tensors first, then by layer, then by name.

The user's precision policy is data: an ordered list of (regex, type) rules (`--tensor-type`),
first match wins, exactly like llama-quantize's `tt_overrides` (std::regex_search).
"""

import re
from dataclasses import dataclass, field

from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as F

from ggquant.errors import GGQuantError
from ggquant.quant import types as qtypes

# The file types ggquant quantizes to: llama-quantize's preset name (tools/quantize/quantize.cpp
# QUANT_OPTIONS), the file type, and its default tensor type (llama_ftype_get_default_type).
# `--outtype` lists the presets in this order. Every QUANT_OPTIONS entry is here but Q2_0 (its
# ftype 41 and tensor type 42 are missing from gguf 0.19.0's LlamaFileType / GGMLQuantizationType)
# and COPY (only_copy: no quantization); NVFP4 has a file type but no preset in this llama.cpp
# (llama_ftype_get_default_type has no case for it).
_PRESET_TABLE = (
    ("Q8_0", F.MOSTLY_Q8_0, T.Q8_0), ("Q6_K", F.MOSTLY_Q6_K, T.Q6_K),
    ("Q5_K_M", F.MOSTLY_Q5_K_M, T.Q5_K), ("Q5_K_S", F.MOSTLY_Q5_K_S, T.Q5_K),
    ("Q4_K_M", F.MOSTLY_Q4_K_M, T.Q4_K), ("Q4_K_S", F.MOSTLY_Q4_K_S, T.Q4_K),
    ("Q3_K_L", F.MOSTLY_Q3_K_L, T.Q3_K), ("Q3_K_M", F.MOSTLY_Q3_K_M, T.Q3_K), ("Q3_K_S", F.MOSTLY_Q3_K_S, T.Q3_K),
    ("Q2_K", F.MOSTLY_Q2_K, T.Q2_K), ("Q2_K_S", F.MOSTLY_Q2_K_S, T.Q2_K),
    ("IQ4_XS", F.MOSTLY_IQ4_XS, T.IQ4_XS), ("IQ4_NL", F.MOSTLY_IQ4_NL, T.IQ4_NL),
    ("IQ3_M", F.MOSTLY_IQ3_M, T.IQ3_S), ("IQ3_S", F.MOSTLY_IQ3_S, T.IQ3_S),
    ("IQ3_XS", F.MOSTLY_IQ3_XS, T.IQ3_S), ("IQ3_XXS", F.MOSTLY_IQ3_XXS, T.IQ3_XXS),
    ("IQ2_M", F.MOSTLY_IQ2_M, T.IQ2_S), ("IQ2_S", F.MOSTLY_IQ2_S, T.IQ2_XS),
    ("IQ2_XS", F.MOSTLY_IQ2_XS, T.IQ2_XS), ("IQ2_XXS", F.MOSTLY_IQ2_XXS, T.IQ2_XXS),
    ("IQ1_M", F.MOSTLY_IQ1_M, T.IQ1_M), ("IQ1_S", F.MOSTLY_IQ1_S, T.IQ1_S),
    ("TQ2_0", F.MOSTLY_TQ2_0, T.TQ2_0), ("TQ1_0", F.MOSTLY_TQ1_0, T.TQ1_0),
    ("MXFP4_MOE", F.MOSTLY_MXFP4_MOE, T.MXFP4), ("Q1_0", F.MOSTLY_Q1_0, T.Q1_0),
    ("Q4_0", F.MOSTLY_Q4_0, T.Q4_0), ("Q4_1", F.MOSTLY_Q4_1, T.Q4_1),
    ("Q5_0", F.MOSTLY_Q5_0, T.Q5_0), ("Q5_1", F.MOSTLY_Q5_1, T.Q5_1),
    ("F16", F.MOSTLY_F16, T.F16), ("BF16", F.MOSTLY_BF16, T.BF16), ("F32", F.ALL_F32, T.F32),
)
# QUANT_OPTIONS' aliases ("alias for Q3_K_M", ...)
_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
FTYPE_Q2_0 = 41  # LLAMA_FTYPE_MOSTLY_Q2_0 (llama.h), not in gguf 0.19.0's LlamaFileType
DEFAULT_TYPE = {ftype: qtype for _, ftype, qtype in _PRESET_TABLE}  # llama_ftype_get_default_type
PRESETS = {name: ftype for name, ftype, _ in _PRESET_TABLE}  # `--outtype`'s names
PRESETS.update({alias: PRESETS[name] for alias, name in _ALIASES.items()})


def preset_name(ftype: F) -> str:
    """`--outtype`'s name for a file type (llama-quantize's; the enum name for one it has no name for)."""
    return next((name for name, ft, _ in _PRESET_TABLE if ft == ftype and name is not None), F(ftype).name)


def preset(name: str) -> F:
    try:
        return PRESETS[name.upper()]
    except KeyError:
        raise GGQuantError(f"unknown --outtype {name!r}; choose one of: {', '.join(PRESETS)}") from None


# tensor_allows_quantization: substrings that are never quantized (the arch-specific
# GLM5-next list and BERT position/token-type names are not relevant to ggquant's models
# but the generic ones are kept so any GGUF gets llama.cpp's answer).
_NEVER_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.",
    "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
    "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
)
_NEVER_QUANTIZED_EXACT = ("position_embd.weight", "token_types.weight")


# Keys llama-quantize writes when given an imatrix (tools/quantize/quantize.cpp), and the input's
# keys llama_model_quantize does not copy (it writes its own)
KEY_IMATRIX_FILE = "quantize.imatrix.file"
KEY_IMATRIX_DATASET = "quantize.imatrix.dataset"
KEY_IMATRIX_N_ENTRIES = "quantize.imatrix.entries_count"
KEY_IMATRIX_N_CHUNKS = "quantize.imatrix.chunks_count"
DROPPED_KEYS = ("split.no", "split.count", "split.tensors.count",
                "general.quantization_version", "general.file_type")

# Types quantized only with an importance matrix: ggml_quantize_requires_imatrix (IQ2_XXS, IQ2_XS,
# IQ1_S) and llama-quantize's own check (IQ3_XXS, IQ2_S, IQ1_M; tools/quantize/quantize.cpp)
REQUIRES_IMATRIX = frozenset({T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S})


def allows_quantization(name: str, ndim: int, quantize_output: bool = True) -> bool:
    if ndim < 2 or not name.endswith("weight"):
        return False
    if name == "output.weight" and not quantize_output:
        return False
    if name in _NEVER_QUANTIZED_EXACT:
        return False
    return not any(s in name for s in _NEVER_QUANTIZED)


# tensor_get_category (substring match, first hit wins)
OUTPUT, TOKEN_EMBD, ATTN_QKV, ATTN_KV_B, ATTN_V, ATTN_K, ATTN_Q, ATTN_OUTPUT = (
    "output", "token_embd", "attn_qkv", "attn_kv_b", "attn_v", "attn_k", "attn_q", "attn_output")
FFN_UP, FFN_GATE, FFN_DOWN, OTHER = "ffn_up", "ffn_gate", "ffn_down", "other"
_CATEGORIES = (
    ("attn_qkv.weight", ATTN_QKV), ("attn_kv_b.weight", ATTN_KV_B), ("attn_v.weight", ATTN_V),
    ("attn_k.weight", ATTN_K), ("attn_q.weight", ATTN_Q), ("attn_output.weight", ATTN_OUTPUT),
    ("ffn_up", FFN_UP), ("ffn_gate", FFN_GATE), ("ffn_down", FFN_DOWN),
)


def category(name: str) -> str:
    if name == "output.weight":
        return OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return TOKEN_EMBD
    for sub, cat in _CATEGORIES:
        if sub in name:
            return cat
    return OTHER


def _is_attn_v(cat):
    return cat in (ATTN_V, ATTN_QKV, ATTN_KV_B)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    # C integer division; i_layer - n/8 is never negative when the first clause is false
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


_LAYER_RE = re.compile(r"^blk\.(-?\d+)\.")


def layer_of(name: str) -> int:
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else -1


def loader_order(names):
    """llama_model_loader::weight_name_comparer: by `blk.%d.` layer (-1 first), then name."""
    return sorted(names, key=lambda n: (layer_of(n), n.encode()))


@dataclass
class ModelInfo:
    """The hparams the mixture rules read (from GGUF metadata)."""

    arch: str
    n_layer: int
    n_head: int = 1
    n_head_kv: int = 1
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        # llama-model.cpp: LLM_ARCH_LLAMA with 80 layers and GQA is LLM_TYPE_70B
        return self.arch == "llama" and self.n_layer == 80 and self.n_head != self.n_head_kv

    @classmethod
    def from_fields(cls, get) -> "ModelInfo":
        """`get(key, default)` reads a GGUF metadata value (e.g. GGUFReader.get)."""
        arch = get("general.architecture", "")

        def first(v, default):
            if v is None:
                return default
            try:
                return int(v[0])  # per-layer arrays: llama.cpp's n_head()/n_head_kv() read layer 0
            except (TypeError, IndexError):
                return int(v)

        n_layer = first(get(f"{arch}.block_count", None), 0)
        return cls(
            arch=arch,
            n_layer=n_layer,
            n_head=first(get(f"{arch}.attention.head_count", None), 1),
            n_head_kv=first(get(f"{arch}.attention.head_count_kv", None), first(get(f"{arch}.attention.head_count", None), 1)),
            n_expert=first(get(f"{arch}.expert_count", None), 0),
        )


@dataclass
class Rule:
    """One precision-policy rule: tensors whose name matches `pattern` (re.search) get `qtype`."""

    pattern: str
    qtype: T
    regex: re.Pattern = field(init=False, repr=False)

    def __post_init__(self):
        try:
            self.regex = re.compile(self.pattern)
        except re.error as e:
            raise GGQuantError(f"--tensor-type {self.pattern!r}: not a valid regular expression ({e})") from None

    @classmethod
    def parse(cls, text: str) -> "Rule":
        """llama-quantize's `--tensor-type REGEX=TYPE`: split at the first '=', the pattern lower-cased
        (tools/quantize/quantize.cpp parse_tensor_type)."""
        pattern, sep, tname = text.partition("=")
        if not sep or not pattern or not tname:
            raise GGQuantError(f"--tensor-type {text!r}: expected REGEX=TYPE, e.g. 'attn_v=q8_0'")
        return cls(pattern.lower(), qtypes.get(tname).qtype)

    @classmethod
    def exact(cls, name: str, qtype: T) -> "Rule":
        """The rule naming one tensor only (dots literal, anchored), as a recipe writes it."""
        return cls("^" + name.replace(".", "\\.") + "$", qtype)

    def __str__(self) -> str:
        return f"{self.pattern}={self.qtype.name.lower()}"


@dataclass
class Choice:
    name: str
    shape: tuple
    src_type: T
    dst_type: T
    reason: str  # why this type: "preset", "rule <regex>", "fallback", "kept"
    requires_imatrix: bool = False

    @property
    def converts(self) -> bool:
        return self.src_type != self.dst_type


class Mixture:
    """Per-tensor target types for one preset, in llama-quantize's visiting order."""

    def __init__(self, ftype: F, info: ModelInfo, rules=(), *, pure=False, has_imatrix=False,
                 token_embedding_type: T | None = None, output_tensor_type: T | None = None):
        if ftype not in DEFAULT_TYPE:
            raise GGQuantError(f"file type {ftype.name} is not supported by ggquant quantize")
        self.ftype, self.info, self.rules, self.pure = ftype, info, list(rules), pure
        self.has_imatrix = has_imatrix
        self.token_embedding_type, self.output_tensor_type = token_embedding_type, output_tensor_type
        self.default_type = DEFAULT_TYPE[ftype]

    def plan(self, tensors) -> list[Choice]:
        """`tensors`: iterable of (name, numpy shape, current GGMLQuantizationType)."""
        by_name = {n: (tuple(s), t) for n, s, t in tensors}
        names = loader_order(by_name)
        cats = {n: category(n) for n in names}
        # init_quantize_state_counters
        self.n_attention_wv = sum(_is_attn_v(c) for c in cats.values())
        self.tied = OUTPUT not in cats.values()
        self.i_attention_wv = self.i_ffn_down = self.i_ffn_gate = self.i_ffn_up = 0
        out = []
        for n in names:
            shape, cur = by_name[n]
            if allows_quantization(n, len(shape)):
                dst, reason = self._get_type(n, shape, cats[n])
            else:
                dst, reason = cur, "kept"
            out.append(Choice(n, shape, cur, dst, reason, self._requires_imatrix(n, dst)))
        return out

    # llama_tensor_get_type
    def _get_type(self, name, shape, cat):
        if self.token_embedding_type is not None and cat == TOKEN_EMBD:
            named = name == "per_layer_token_embd.weight" and any(r.regex.search(name) for r in self.rules)
            if not named:
                return self.token_embedding_type, "--token-embedding-type"
        if self.output_tensor_type is not None and cat == OUTPUT:
            return self.output_tensor_type, "--output-tensor-type"
        new = self.default_type
        reason = "preset"
        if qtypes.get(new).block_size > 1:  # ggml_is_quantized
            manual = False
            for r in self.rules:
                if r.regex.search(name):
                    new, reason, manual = r.qtype, f"rule {r.pattern}", True
                    break
            if not manual and not self.pure:
                new = self._impl(new, name, shape, cat)
            fb = self._fallback(shape, new, name)
            if fb != new:
                new, reason = fb, f"fallback from {new.name}"
        return new, reason

    def _requires_imatrix(self, name, dst):
        if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
            return False
        if dst in REQUIRES_IMATRIX:
            return True
        return dst == T.Q2_K and self.ftype == F.MOSTLY_Q2_K_S

    @staticmethod
    def _fallback(shape, target, name="tensor"):
        """tensor_type_fallback: the type's registry row_fallback, then F16."""
        ncols = shape[-1]
        entry = qtypes.get(target)
        if ncols % entry.block_size == 0:
            return target
        if entry.row_fallback is None and entry.block_size > 32:
            # llama-quant.cpp: "no tensor type fallback is defined for type ..." (Q1_0, NVFP4)
            raise GGQuantError(
                f"{name}: rows of {ncols} elements cannot be stored as {target.name} (blocks of "
                f"{entry.block_size}) and llama.cpp defines no fallback type for {target.name}; pick another "
                f"type for it with --tensor-type")
        ret = entry.row_fallback or target
        if ncols % qtypes.get(ret).block_size != 0:
            ret = T.F16  # "must use F16 due to unusual shape"
        return ret

    def _layer(self, counter, name):
        """layer_info: the running counter for dense models, the name's layer for MoE."""
        n_layer = self.info.n_layer
        if max(1, self.info.n_expert) > 1:
            i = layer_of(name)
            if not 0 <= i < n_layer:
                raise GGQuantError(f"{name}: cannot determine its layer (must be in [0, {n_layer}))")
            return i, n_layer
        return counter, n_layer

    # llama_tensor_get_type_impl, branch by branch (same order, same conditions)
    def _impl(self, new, name, shape, cat):
        ft, info = self.ftype, self.info
        falcon = info.arch == "falcon"
        iq12 = (F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ1_S, F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M, F.MOSTLY_IQ1_M)
        iq2_sm = ft in (F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M)
        if info.arch == "glm5-next" and any(s in name for s in ("attn_q_a", "attn_q_b", "nextn.eh_proj")):
            if new not in (T.F32, T.BF16, T.F16):
                return T.Q8_0  # "don't let these tensors be quantized below Q8_0"
        if cat == OUTPUT or (self.tied and cat == TOKEN_EMBD):
            if self.output_tensor_type is not None:  # reached by tied token_embd only
                new = self.output_tensor_type
            elif ft == F.MOSTLY_MXFP4_MOE:
                new = T.Q8_0
            elif falcon or shape[-1] % qtypes.get(new).block_size != 0:
                new = T.Q8_0
            elif ft in (F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ3_XXS, F.MOSTLY_IQ1_S, F.MOSTLY_IQ2_S,
                        F.MOSTLY_IQ2_M, F.MOSTLY_IQ1_M):
                new = T.Q5_K
            elif new != T.Q8_0:
                new = T.Q6_K
        elif ft == F.MOSTLY_MXFP4_MOE:
            # expert tensors (3-D, more than one expert) -> MXFP4, everything else -> Q8_0
            expert_role = cat in (FFN_UP, FFN_GATE, FFN_DOWN)
            if len(shape) == 3 and shape[0] > 1 and (info.arch != "bailingmoe3" or expert_role):
                new = T.MXFP4
            else:
                new = T.Q8_0
        elif cat == TOKEN_EMBD:
            if self.token_embedding_type is not None:
                new = self.token_embedding_type
            elif ft in (F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ1_S, F.MOSTLY_IQ1_M):
                new = T.Q2_K
            elif iq2_sm or ft == F.MOSTLY_IQ3_XXS:
                new = T.IQ3_S
            elif ft in (F.MOSTLY_TQ1_0, F.MOSTLY_TQ2_0) or int(ft) == FTYPE_Q2_0:
                new = T.Q4_K
        elif ft in iq12:
            if _is_attn_v(cat):
                if info.n_gqa >= 4 or info.n_expert >= 4:
                    new = T.Q4_K
                else:
                    new = T.IQ3_S if iq2_sm else T.Q2_K
                self.i_attention_wv += 1
            elif info.n_expert == 8 and cat == ATTN_K:
                new = T.Q4_K
            elif cat == FFN_DOWN:
                # the running counter, even for MoE models (this branch does not call layer_info)
                if self.i_ffn_down < info.n_layer // 8:
                    new = T.IQ3_S if iq2_sm else T.Q2_K
                self.i_ffn_down += 1
            elif cat == ATTN_OUTPUT:
                if info.n_expert == 8:
                    new = T.Q5_K
                elif ft in (F.MOSTLY_IQ1_S, F.MOSTLY_IQ1_M):
                    new = T.IQ2_XXS
                elif iq2_sm:
                    new = T.IQ3_S
        elif _is_attn_v(cat):
            if ft == F.MOSTLY_Q2_K:
                new = T.Q4_K if info.n_gqa >= 4 else T.Q3_K
            elif ft == F.MOSTLY_Q2_K_S and info.n_gqa >= 4:
                new = T.Q4_K
            elif ft == F.MOSTLY_IQ3_XXS:
                new = T.Q4_K if info.n_gqa >= 4 else T.IQ3_S if not self.has_imatrix else T.IQ3_XXS
            elif ft in (F.MOSTLY_IQ3_XS, F.MOSTLY_IQ3_S) and info.n_gqa >= 4:
                new = T.Q4_K
            elif ft == F.MOSTLY_IQ3_M:
                new = T.Q4_K
            elif ft == F.MOSTLY_Q3_K_M:
                new = T.Q5_K if self.i_attention_wv < 2 else T.Q4_K
            elif ft == F.MOSTLY_Q3_K_L:
                new = T.Q5_K
            elif ft in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS) and info.n_gqa >= 4:
                new = T.Q5_K
            elif ft in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and use_more_bits(self.i_attention_wv, self.n_attention_wv):
                new = T.Q6_K
            elif ft == F.MOSTLY_Q4_K_S and self.i_attention_wv < 4:
                new = T.Q5_K
            if info.is_70b and new in (T.Q3_K, T.Q4_K):
                new = T.Q5_K
            if info.n_expert == 8:
                new = T.Q8_0
            self.i_attention_wv += 1
        elif cat == ATTN_K:
            if info.n_expert == 8:
                new = T.Q8_0
            elif ft == F.MOSTLY_IQ3_XS:
                new = T.IQ3_XXS
            elif ft == F.MOSTLY_IQ3_XXS:
                new = T.IQ2_S
        elif cat == ATTN_Q:
            if ft == F.MOSTLY_IQ3_XS:
                new = T.IQ3_XXS
            elif ft == F.MOSTLY_IQ3_XXS:
                new = T.IQ2_S
        elif cat == FFN_DOWN:
            i_layer, n_layer = self._layer(self.i_ffn_down, name)
            if ft == F.MOSTLY_Q2_K:
                new = T.Q3_K
            elif ft == F.MOSTLY_Q2_K_S:
                if i_layer < n_layer // 8:
                    new = T.Q4_K
            elif ft == F.MOSTLY_IQ3_XXS and not self.has_imatrix:
                new = T.Q4_K if i_layer < n_layer // 8 else T.Q3_K
            elif ft == F.MOSTLY_Q3_K_M:
                new = (T.Q5_K if i_layer < n_layer // 16
                       else T.Q4_K if not falcon or use_more_bits(i_layer, n_layer) else T.Q3_K)
            elif ft == F.MOSTLY_IQ3_M and (i_layer < n_layer // 8
                                           or (info.n_expert == 8 and use_more_bits(i_layer, n_layer))):
                new = T.Q4_K
            elif ft == F.MOSTLY_Q3_K_L:
                new = T.Q4_K if falcon else T.Q5_K
            elif ft == F.MOSTLY_Q4_K_M:
                if falcon:
                    new = (T.Q6_K if i_layer < n_layer // 16
                           else T.Q5_K if use_more_bits(i_layer, n_layer) else T.Q4_K)
                elif use_more_bits(i_layer, n_layer):
                    new = T.Q6_K
            elif i_layer < n_layer // 8 and ft in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS) and not self.has_imatrix:
                new = T.Q5_K
            elif ft == F.MOSTLY_Q5_K_M and use_more_bits(i_layer, n_layer):
                new = T.Q6_K
            elif ft == F.MOSTLY_Q4_K_S and not falcon and i_layer < n_layer // 8:
                new = T.Q5_K
            elif ft in (F.MOSTLY_Q4_0, F.MOSTLY_Q5_0) and self.has_imatrix and i_layer < n_layer // 8:
                # guard against craziness in the first ffn_down layers (llama-quant.cpp)
                new = T.Q4_1 if ft == F.MOSTLY_Q4_0 else T.Q5_1
            self.i_ffn_down += 1
        elif cat == ATTN_OUTPUT:
            if not falcon:
                if info.n_expert == 8:
                    if ft in (F.MOSTLY_Q2_K, F.MOSTLY_IQ3_XS, F.MOSTLY_IQ3_XXS, F.MOSTLY_Q3_K_S, F.MOSTLY_Q3_K_M,
                              F.MOSTLY_IQ4_NL, F.MOSTLY_Q4_K_S, F.MOSTLY_Q4_K_M, F.MOSTLY_IQ3_S, F.MOSTLY_IQ3_M,
                              F.MOSTLY_IQ4_XS):
                        new = T.Q5_K
                elif ft == F.MOSTLY_Q2_K:
                    new = T.Q3_K
                elif ft == F.MOSTLY_IQ3_XXS:
                    new = T.IQ3_S
                elif ft == F.MOSTLY_Q3_K_M:
                    new = T.Q4_K
                elif ft == F.MOSTLY_Q3_K_L:
                    new = T.Q5_K
                elif ft == F.MOSTLY_IQ3_M:
                    new = T.Q4_K
            elif ft == F.MOSTLY_Q3_K_L:
                new = T.Q4_K
        # (the ATTENTION_QKV branch of the C is unreachable: attn_qkv takes the attn_v-like branch)
        elif cat == FFN_GATE:
            i_layer, n_layer = self._layer(self.i_ffn_gate, name)
            if ft == F.MOSTLY_IQ3_XS and n_layer // 8 <= i_layer < 7 * n_layer // 8:
                new = T.IQ3_XXS
            self.i_ffn_gate += 1
        elif cat == FFN_UP:
            i_layer, n_layer = self._layer(self.i_ffn_up, name)
            if ft == F.MOSTLY_IQ3_XS and n_layer // 8 <= i_layer < 7 * n_layer // 8:
                new = T.IQ3_XXS
            self.i_ffn_up += 1
        return new
