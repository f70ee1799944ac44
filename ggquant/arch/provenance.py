"""general.* provenance of a converted GGUF, and its default file name: gguf-py's own code.

llama.cpp's converter (conversion/base.py ModelBase.prepare_metadata) runs gguf.Metadata.load on
the model folder (README.md front matter, config.json `_name_or_path`, the folder name,
generation_config.json), falls back to the folder name for general.name, sizes the model with
gguf.size_label and writes everything with Metadata.set_gguf_meta_model; the file name is
gguf.naming_convention. ggquant calls the same functions of the pinned gguf. What it adds, each
for a reason given where it is done:
- the folder is resolved first (README: `convert .` gets the folder's name, not an empty one);
- a broken README front matter or a file that is not UTF-8 is an error naming the file;
- the `repetition_penalty` fallback of llama.cpp's own gguf-py (metadata.py:86), which gguf
  0.19.0 lacks;
- the values gguf-py hands to a GGUFWriter are collected into ggquant's ordered KV.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import yaml
from gguf import GGUFValueType, Keys

from ggquant.formats.gguf import KV
from ggquant.formats.hf_folder import read_json, read_text
from ggquant.errors import GGQuantError

# gguf.utility.model_weight_count_rounded_notation: "270M", "4.5B" (plans and reports use it too)
weight_count_label = gguf.model_weight_count_rounded_notation


class General(gguf.Metadata):
    """The general.* values gguf-py's Metadata.load derives (without a --metadata override file)."""

    @classmethod
    def derive(cls, model_dir: Path, total_params: int | tuple[int, int, int, int]) -> General:
        """`total_params`: the total, or parameter_counts() of the tensors (an MoE's size label
        is <n_expert>x<shared + one expert>)."""
        counts = total_params if isinstance(total_params, tuple) else (total_params, total_params, 0, 0)
        total_params = counts[0]
        model_dir = Path(model_dir).resolve()
        _check_readable(model_dir)
        md = gguf.Metadata.load(None, model_dir, None, total_params)
        g = cls(**vars(md))
        # llama.cpp's gguf-py (0c1e570, metadata.py:86) also reads generation_config.json's
        # repetition_penalty; the converter the tests compare against runs that gguf-py
        gen = gguf.Metadata.load_generation_config(model_dir)
        if "penalty_repeat" not in gen and "repetition_penalty" in gen:
            g.sampling_penalty_repeat = gen["repetition_penalty"]
        if g.name is None:  # ModelBase.prepare_metadata
            g.name = model_dir.name
        if g.size_label is None and total_params > 0:
            g.size_label = gguf.size_label(*counts)
        return g

    def write(self, kv: KV) -> None:
        """Metadata.set_gguf_meta_model into kv: gguf-py fills a GGUFWriter that is never written
        (its general.architecture, set by the constructor, is not copied)."""
        w = gguf.GGUFWriter(None, "")
        self.set_gguf_meta_model(w)
        for key, v in w.kv_data[0].items():
            if key == Keys.General.ARCHITECTURE:
                continue
            if v.type == GGUFValueType.ARRAY:
                kv.array(key, list(v.value))
            else:
                kv.set(key, v.value, v.type)


def parameter_counts(tensors) -> tuple[int, int, int, int]:
    """(total, shared, expert, expert count) of (GGUF name, shape) pairs: gguf-py
    GGUFWriter.get_total_parameter_count (an `_exps.` tensor of 3+ dims counts one expert's
    parameters, its outer dimension is the expert count, averaged over such tensors)."""
    total = shared = expert = expert_sum = n_expert_tensors = 0
    for name, shape in tensors:
        size = math.prod(shape)
        if "_exps." in name and len(shape) >= 3:
            n = shape[-2 if ".bias" in name else -3]
            expert += size // n
            expert_sum += n
            n_expert_tensors += 1
        else:
            shared += size
        total += size
    return total, shared, expert, (expert_sum // n_expert_tensors) if n_expert_tensors else 0


def _check_readable(model_dir: Path) -> None:
    """gguf-py ignores a generation_config.json that is not JSON and stops with a bare YAML or
    Unicode error on a broken model card; ggquant names the file and the fix instead."""
    read_json(model_dir / "generation_config.json", "", required=False)
    card = model_dir / "README.md"
    if not card.is_file():
        return
    lines = read_text(card).splitlines()
    if not lines or lines[0] != "---":
        return
    front = lines[1:lines.index("---", 1)] if "---" in lines[1:] else lines[1:]
    try:
        yaml.safe_load("\n".join(front).replace("\t", "  "))
    except yaml.YAMLError as e:
        raise GGQuantError(f"{card}: the YAML front matter is invalid ({e})") from None


def naming_convention(g: General, size_label: str | None, output_type: str) -> str:
    """The default file name: <basename|name>-<size>-<finetune>-<version>-<TYPE> (gguf-py)."""
    return gguf.naming_convention(g.name, g.basename, g.finetune, g.version, size_label, output_type)
