"""Padding-free batches: whether a model keeps packed examples apart, and whether packing pays.

transformers builds a block-diagonal causal mask from restarting position ids (with no attention
mask and no cache); `DataCollatorWithFlattening` packs each micro-batch into one such sequence.
"""

from __future__ import annotations

import random

import torch

PACKING_MIN_WASTE = 0.1  # below this, packing's longer attention costs more than the padding it saves


def packing_is_exact(model, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the model keeps packed examples apart: the same logits for two sequences packed as one by one."""
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    a, b = torch.randint(0, vocab, (7,), generator=generator), torch.randint(0, vocab, (5,), generator=generator)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            one = [model(input_ids=x[None].to(device), use_cache=False).logits[0].float() for x in (a, b)]
            position_ids = torch.cat([torch.arange(7), torch.arange(5)])[None].to(device)
            packed = model(input_ids=torch.cat([a, b])[None].to(device), position_ids=position_ids, use_cache=False)
    finally:
        model.train(was_training)
    reference = torch.cat(one)
    error = float((packed.logits[0].float() - reference).norm() / reference.norm().clamp_min(1e-12))
    return error < (1e-4 if dtype == torch.float32 else 3e-2)


def padding_waste(lengths: list[int], micro_batch: int, samples: int = 64, seed: int = 0) -> float:
    """Expected share of a padded micro-batch that is padding, over random micro-batches of these lengths."""
    if not lengths or micro_batch <= 1:
        return 0.0
    rng = random.Random(seed)
    real = padded = 0
    for _ in range(samples):
        batch = rng.sample(lengths, min(micro_batch, len(lengths)))
        real += sum(batch)
        padded += max(batch) * len(batch)
    return 1.0 - real / padded
