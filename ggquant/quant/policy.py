"""The precision policy as data: ordered (regex -> floor) entries for tensors known to be sensitive.

A mixed-precision allocation (ggquant.quant.allocate) gives a tensor matched here no type below its
floor (bits per weight, or an explicit type list) -- unless it measures the model (--calibration)
and finds the tensor no more sensitive than a typical one just below the floor
(allocate.calibrate). First match wins, like llama-quantize's --tensor-type. `--dry-run` shows the
floor each tensor respected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGMLQuantizationType as T


@dataclass(frozen=True)
class Floor:
    pattern: str  # re.search on the GGUF tensor name
    min_bpw: float  # candidate types below this many bits per weight are not tried
    why: str
    only: tuple = ()  # when given, the only types tried (e.g. BF16 where F16 overflows)

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None

    def allows(self, qtype: T, bpw: float) -> bool:
        return bpw >= self.min_bpw and (not self.only or qtype in self.only)


# llama.cpp itself never quantizes MoE routers (ffn_gate_inp), Gemma 4's per_layer_model_proj,
# altup/laurel or norms (llama-quant.cpp tensor_allows_quantization; presets.allows_quantization),
# so they need no entry here.
DEFAULT_POLICY: tuple[Floor, ...] = (
    # Gemma 4 E2B/E4B per-layer embeddings: E4B collapses under Q4_K_M (perplexity 7.1 -> 23.1,
    # Q3_K_M -> 919; llama.cpp#22407)
    Floor(r"^per_layer_token_embd\.weight$", 8.0, "Gemma 4 per-layer embedding table (llama.cpp#22407)"),
    Floor(r"^blk\.\d+\.(inp_gate|proj)\.weight$", 8.0,
          "Gemma 4 per-layer input gate / projection (llama.cpp#22407)"),
    # the audio tower of an mmproj overflows F16 (llama.cpp#21421): BF16 or F32 only
    Floor(r"^a\.", 16.0, "audio encoder: BF16 (F16 overflows, llama.cpp#21421)", only=(T.BF16, T.F32)),
    # the output matrix (or the tied embedding that serves as it) sees every logit
    Floor(r"^output\.weight$", 4.5, "output matrix"),
    Floor(r"^token_embd\.weight$", 4.5, "token embeddings (the output matrix when tied)"),
)


def floor_for(name: str, policy: tuple[Floor, ...] = DEFAULT_POLICY) -> Floor | None:
    for f in policy:
        if f.matches(name):
            return f
    return None


# Types an allocation tries by default: every type llama.cpp's CPU and CUDA backends multiply by,
# but IQ1_S/IQ1_M (below 2 bpw: useful only for whole-model presets) and TQ1_0/TQ2_0 (ternary
# models only). Those llama-quantize needs an imatrix for (presets.REQUIRES_IMATRIX) are skipped
# without one (allocate.candidate_types).
DEFAULT_CANDIDATES = (T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.Q2_K, T.IQ3_XXS, T.IQ3_S, T.Q3_K, T.IQ4_XS, T.Q4_K,
                      T.Q4_0, T.Q4_1, T.IQ4_NL, T.Q5_K, T.Q5_0, T.Q5_1, T.Q6_K, T.Q8_0, T.F16, T.BF16)
