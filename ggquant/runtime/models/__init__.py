"""Reference forward passes, one module per GGUF architecture, named after general.architecture
(gemma3.py runs "gemma3"): ggquant.runtime.model.model_class imports the module by that name, as
mlx-lm imports mlx_lm.models.<model_type>. A module defines one Model subclass whose `arch` is
its name and whose hyperparameters come from the family's decoder in ggquant.arch."""
