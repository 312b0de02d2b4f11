"""An exported (plain LoRA) adapter merged into its base: what evaluation and serving run.

Neither trains, so the adapter is folded in once (W + s·B·A, PEFT's `merge_and_unload`) and each
forward pass runs only the base's layers. Kept apart from `peft_glue` so that the stages which
only merge do not depend on the OLoRA initialisation code.
"""

from __future__ import annotations

from pathlib import Path


def merged(base, adapter_dir: Path | str):
    """`base` with the adapter in `adapter_dir` merged into its weights, in eval mode."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()
