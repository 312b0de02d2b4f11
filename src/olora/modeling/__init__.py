"""The ML library: embedded assets, base-model loading, device/dtype/threads, and PEFT's LoRA layers (OLoRA init, export)."""

import warnings

# Third-party noise known to be harmless here, silenced by exact message (our own calls raise none):
# - PEFT (0.21) reads transformers' deprecated `is_gradient_checkpointing` property whenever it wraps a
#   model; transformers 5 then warns about PEFT's call, not ours.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
# - PEFT looks up the base model's config.json by its name on every checkpoint the Trainer saves, to decide
#   whether to save embedding layers; an `embedded:` or offline name cannot be looked up. We adapt linear
#   layers only (never embeddings), so its assumption "the vocabulary was not modified" is right.
warnings.filterwarnings("ignore", message=r"Could not find a config file in .* will assume that the vocabulary was not modified",
                        category=UserWarning)
