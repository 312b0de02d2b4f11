"""The ML library: embedded assets, base-model loading, device/dtype/threads, and PEFT's LoRA layers (OLoRA init, export)."""
