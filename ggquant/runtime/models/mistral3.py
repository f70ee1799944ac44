"""Ministral 3 / Mistral Small 3.x decoder (GGUF architecture `mistral3`), as llama.cpp runs it
(src/models/mistral3.cpp): the Llama graph of runtime/models/llama.py (NORM RoPE, optional llama3
frequency factors) with two additions:

- YaRN RoPE when rope.scaling.type is yarn: ggml_rope_ext with ext_factor 1 (llama_context: a
  negative, "unset" yarn_ext_factor becomes 1 for YaRN), attn_factor from llama_context
  (kernels ops.yarn_attn_factor: the log multiplier cancels YaRN's magnitude scaling), beta_fast /
  beta_slow from the GGUF and n_ctx_orig = rope.scaling.original_context_length;
- Llama 4 attention temperature when attention.temperature_scale != 0: after RoPE,
      q *= log(floor(pos / n_ctx_orig) + 1) * temperature_scale + 1
  (llm_graph_input_attn_temp::set_input, computed in double and stored as float; ggml_mul).

The MoE branch of the graph (experts in a mistral3 GGUF) is not run here: load_tensors refuses a
file with experts (the converter does not write them for these checkpoints)."""

from __future__ import annotations

import math

import numpy as np

from ggquant.arch.mistral3 import Mistral3Hparams
from ggquant.errors import GGQuantError
from ggquant.kernels.cpu import ops
from ggquant.runtime.models.llama import LlamaModel

F32 = np.float32
YARN = "yarn"
YARN_EXT_FACTOR = 1.0  # llama_context: yarn_ext_factor < 0 (unset) -> 1 for YaRN scaling


class Mistral3Model(LlamaModel):
    arch = "mistral3"
    hparams_class = Mistral3Hparams
    hp: Mistral3Hparams

    @property
    def graph_safe(self) -> bool:
        """A captured CUDA decode graph replays fixed inputs: the per-position temperature is not one."""
        return self.hp.attn_temp_scale == 0.0

    def load_tensors(self, ts):
        if any(n.startswith("blk.") and "_exps." in n for n in ts.by_name):
            raise GGQuantError(f"{self.hp.path}: a mistral3 GGUF with experts; the ggquant runtime runs the dense "
                               f"mistral3 graph only")
        super().load_tensors(ts)
        hp = self.hp
        self.yarn = None
        if hp.rope_scaling == YARN:
            low, high = ops.rope_yarn_corr_dims(hp.n_rot, hp.n_ctx_orig_yarn, F32(hp.rope_base),
                                                F32(hp.yarn_beta_fast), F32(hp.yarn_beta_slow))
            attn = ops.yarn_attn_factor(F32(hp.rope_freq_scale), F32(hp.yarn_log_mul), F32(hp.rope_attn_factor))
            self.yarn = (float(YARN_EXT_FACTOR), float(attn), float(low), float(high))
        elif hp.rope_attn_factor != 1.0:
            raise GGQuantError(f"{hp.path}: rope.scaling.attn_factor = {hp.rope_attn_factor} without YaRN; not "
                               f"supported by the ggquant runtime")

    def rope_args(self) -> dict:
        return dict(super().rope_args(), yarn=self.yarn)

    def scale_query(self, q, pos):
        hp = self.hp
        if hp.attn_temp_scale == 0.0:
            return q
        n = F32(hp.attn_temp_floor_scale)
        beta = float(F32(hp.attn_temp_scale))
        scale = np.array([math.log(float(math.floor(F32(p) / n)) + 1.0) * beta + 1.0 for p in np.asarray(pos)],
                         dtype=np.float32)  # double arithmetic, one rounding to float
        return q * self.backend.asarray(scale)[:, None, None]
