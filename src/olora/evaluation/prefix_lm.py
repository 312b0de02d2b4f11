"""An lm-eval log-likelihood backend that encodes each shared prefix once (`--model olora-prefix`).

lm-eval's `hf` backend runs every (context, continuation) request as its own sequence: a
multiple-choice question with four answers encodes its context four times, and the logits of every
context position go through the vocabulary projection and a log-softmax only to be thrown away.
This backend is `hf` with one method replaced, `_loglikelihood_tokens`:

1. Requests are sorted by their input tokens (context + continuation, less the last token), so
   inputs that share a prefix are neighbours, and grouped greedily where sharing saves tokens: the
   choices of one question share its context; WinoGrande's two filled-in sentences share the words
   before the blank; BoolQ's one-token answers share everything. A group's prefix stops before the
   first position whose logits any member needs.
2. Groups of similar prefix length are batched: their prefixes are encoded together once
   (left-padded, with attention mask and position ids, `logits_to_keep=1`) into a KV cache; the
   cache rows are gathered per member and every member's distinct suffix (right-padded) is encoded
   on top of it in one forward pass. Only suffix logits are projected and log-softmaxed.
3. The answer per request is lm-eval's: (sum of the continuation's log-probabilities, whether the
   greedy tokens equal the continuation), stored through lm-eval's cache hook.

The per-request results equal `hf`'s up to float rounding of differently shaped matmuls
(tests/evaluation/test_prefix_lm.py: every decision equal on all seven offline tasks, log-likelihoods
within 1e-4; sums are accumulated in float64); `bench/bench_eval.py` measures the speed. lm-eval's
command line with this backend: `python -m olora.evaluation.prefix_lm run --model olora-prefix
--model_args pretrained=...`. Requests longer than the model's window
(lm-eval truncates them from the left), seq2seq models and `batch_size: auto` go to `hf`'s own code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from transformers import DynamicCache

GROUP_COST = 2
"""Token-equivalents charged for each group (its prefix row's padding and bookkeeping) when planning."""


@dataclass
class Group:
    """Requests encoded on one cached prefix: `prefix` tokens shared, one suffix row per distinct rest."""

    prefix: list[int]
    members: list[int] = field(default_factory=list)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def plan_groups(inputs: list[list[int]], starts: list[int], max_members: int, suffix_weight: float = 1.0) -> list[Group]:
    """Partition requests (input tokens, first position whose logits are needed) into prefix-sharing groups.

    Pure. Inputs sorted lexicographically put every set sharing a prefix side by side; a dynamic
    programme then cuts that order into runs of at most `max_members` that minimise the tokens
    encoded: a run's prefix p is the common prefix of its inputs (capped by each member's start, so
    all needed logits come from the suffix pass), and it costs p + w · Σ over its distinct inputs of
    (length − p) + GROUP_COST, w = `suffix_weight`, the cost of a suffix token (which also goes
    through the vocabulary projection) relative to a prefix token. Optimal among contiguous runs,
    O(n · max_members).
    """
    order = sorted(range(len(inputs)), key=lambda i: inputs[i])
    n = len(order)
    lcp = [0] + [_common_prefix(inputs[order[k - 1]], inputs[order[k]]) for k in range(1, n)]
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest plan of the first j sorted requests
    cut = [0] * (n + 1)
    for j in range(1, n + 1):  # the run order[i:j], grown leftwards from j-1
        p, distinct, total = len(inputs[order[j - 1]]), 0, 0
        for i in range(j - 1, max(j - 1 - max_members, -1), -1):
            x = order[i]
            p = min(p, starts[x]) if i == j - 1 else min(p, starts[x], lcp[i + 1])
            if i == j - 1 or inputs[x] != inputs[order[i + 1]]:
                distinct += 1
                total += len(inputs[x])
            cost = best[i] + p + suffix_weight * (total - distinct * p) + GROUP_COST
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[Group] = []
    j = n
    while j > 0:
        i = cut[j]
        members = order[i:j]
        p = min(min(starts[m] for m in members), min(lcp[k] for k in range(i + 1, j)) if j - i > 1 else len(inputs[members[0]]))
        groups.append(Group(prefix=list(inputs[members[0]][:p]), members=members))
        j = i
    return groups[::-1]


def split_sorted(lengths: list[int], budget: int, forward_cost: int) -> list[tuple[int, int]]:
    """Cut ascending row lengths into batches [a, b) minimising Σ (forward_cost + rows · longest).

    Pure. Each batch pads its rows to its longest and holds at most `budget` padded tokens (a row
    longer than the budget gets a batch of its own); `forward_cost` is the fixed cost of one forward
    pass in token-equivalents, so short rows are not split into many tiny passes. O(n · rows per batch).
    """
    n = len(lengths)
    best = [0] + [None] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[j - 1]
        for i in range(j - 1, -1, -1):
            rows = j - i
            if rows > 1 and rows * longest > budget:
                break
            cost = best[i] + forward_cost + rows * longest
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    spans, j = [], n
    while j > 0:
        spans.append((cut[j], j))
        j = cut[j]
    return spans[::-1]


@register_model("olora-prefix")
class PrefixCachedLM(HFLM):
    """lm-eval's `hf` backend whose log-likelihood requests share their common prefixes' KV cache."""

    forward_cost = 64
    """The fixed cost of one forward pass in token-equivalents, for batching (`split_sorted`)."""

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self.backend != "causal" or not isinstance(self.batch_size, int) or not self._packs_suffixes():
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        fits = [len(ctx) + len(cont) <= self.max_length + 1 for _, ctx, cont in requests]
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        long = [i for i, ok in enumerate(fits) if not ok]
        if long:  # lm-eval truncates these from the left: its own code does it
            answers = super()._loglikelihood_tokens([requests[i] for i in long], disable_tqdm, override_bs)
            for i, answer in zip(long, answers):
                results[i] = answer
        short = [i for i, ok in enumerate(fits) if ok]
        if short:
            for i, answer in zip(short, self._shared_prefix_loglikelihoods([requests[i] for i in short], disable_tqdm)):
                results[i] = answer
        return results

    def _packs_suffixes(self) -> bool:
        """Whether the model takes a custom 4-D attention mask (sdpa or eager) and attends over its whole window."""
        config = self.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return config._attn_implementation in ("sdpa", "eager") and not getattr(text, "sliding_window", None)

    def _suffix_weight(self) -> float:
        """A suffix token's cost relative to a prefix token's: 1 + the vocabulary projection's share."""
        model = self.model
        head = model.get_output_embeddings()
        embed = model.get_input_embeddings()
        total = sum(p.numel() for p in model.parameters())
        body = total - embed.weight.numel() - (0 if head.weight is embed.weight else head.weight.numel())
        return 1.0 + head.weight.numel() / max(body, 1)

    def _shared_prefix_loglikelihoods(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from tqdm import tqdm

        inputs = [(ctx + cont)[:-1] for _, ctx, cont in requests]
        conts = [cont for _, _, cont in requests]
        starts = [len(x) - len(c) for x, c in zip(inputs, conts)]
        groups = plan_groups(inputs, starts, max_members=self.batch_size, suffix_weight=self._suffix_weight())
        budget = self.batch_size * max(len(x) for x in inputs)  # the padded tokens of `hf`'s longest batch
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                        desc="Running loglikelihood requests (olora-prefix)")
        for window in windows(sorted(groups, key=lambda g: len(g.prefix)), budget):
            self._score_window(window, inputs, starts, conts, budget, results)
            progress.update(sum(len(g.members) for g in window))
        progress.close()
        for (request_str, _, _), answer in zip(requests, results):
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return results  # type: ignore[return-value]

    def _score_window(self, window: list[Group], inputs, starts, conts, budget: int, results: list) -> None:
        """Encode the window's prefixes (length-sorted passes), then its groups' packed suffixes on that cache."""
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
        ):
            prefix = self._encode_prefixes([g.prefix for g in window], budget)
            packed = [pack_suffixes(g, inputs) for g in window]
            order = sorted(range(len(window)), key=lambda i: len(packed[i].tokens))
            for a, b in split_sorted([len(packed[i].tokens) for i in order], budget, self.forward_cost):
                chosen = order[a:b]
                logprobs = self._encode_packed([packed[i] for i in chosen], prefix, chosen)
                for row, i in enumerate(chosen):
                    for m, offset in packed[i].offsets.items():
                        first = offset + starts[m] - len(window[i].prefix)
                        picked = logprobs[row, first : first + len(conts[m])]  # [continuation, vocab]
                        target = torch.tensor(conts[m], dtype=torch.long, device=picked.device)
                        greedy = bool((picked.argmax(dim=-1) == target).all())
                        results[m] = (float(picked.gather(1, target.unsqueeze(-1)).double().sum()), greedy)

    def _encode_prefixes(self, prefixes: list[list[int]], budget: int) -> CachedPrefixes | None:
        """The KV cache of the (length-sorted) prefixes, left-padded to the longest; None when they are empty."""
        width = len(prefixes[-1])
        if width == 0:
            return None
        layers: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        for a, b in split_sorted([len(p) for p in prefixes], budget, self.forward_cost):
            ids, mask = _left_padded(prefixes[a:b], width=len(prefixes[b - 1]))
            ids, mask = ids.to(self.device), mask.to(self.device)
            padded = bool((mask == 0).any())
            kwargs = {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)} if padded else {}
            cache = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs).cache
            grow = width - ids.shape[1]  # left-pad this pass's keys and values to the window's width
            layers.append([(F.pad(layer.keys, (0, 0, grow, 0)), F.pad(layer.values, (0, 0, grow, 0))) for layer in cache.layers])
        kv = [(torch.cat([p[i][0] for p in layers]), torch.cat([p[i][1] for p in layers])) for i in range(len(layers[0]))]
        _, mask = _left_padded(prefixes, width)
        return CachedPrefixes(kv=kv, mask=mask.to(self.device).bool(), lengths=torch.tensor([len(p) for p in prefixes], device=self.device))

    def _encode_packed(self, rows: list[Packed], prefix: CachedPrefixes | None, owners: list[int]) -> torch.Tensor:
        """Log-probabilities [row, position, vocab] of each group's packed suffixes on its cached prefix.

        One row per group: its distinct suffixes side by side, each attending to the group's prefix and
        causally to itself only (a 4-D mask), at the positions it would have after the prefix.
        """
        length = max(len(r.tokens) for r in rows)
        ids = torch.zeros((len(rows), length), dtype=torch.long)
        positions = torch.zeros((len(rows), length), dtype=torch.long)
        own = torch.eye(length, dtype=torch.bool).repeat(len(rows), 1, 1)  # padding attends to itself only
        for r, row in enumerate(rows):
            ids[r, : len(row.tokens)] = torch.tensor(row.tokens, dtype=torch.long)
            for a, b in row.spans:
                positions[r, a:b] = torch.arange(b - a)
                own[r, a:b, a:b] = torch.ones((b - a, b - a), dtype=torch.bool).tril()
        ids, positions, own = ids.to(self.device), positions.to(self.device), own.to(self.device)
        cache = None
        if prefix is None:
            allowed = own
        else:
            index = torch.tensor(owners, dtype=torch.long, device=self.device)
            width = int(prefix.lengths[index].max())  # the window is left-padded: its last `width` columns hold these prefixes
            real = torch.zeros((len(rows), length), dtype=torch.bool, device=self.device)
            for r, row in enumerate(rows):
                real[r, : len(row.tokens)] = True
            sees_prefix = prefix.mask[index, -width:].unsqueeze(1) & real.unsqueeze(2)
            allowed = torch.cat([sees_prefix, own], dim=2)
            positions = positions + prefix.lengths[index].unsqueeze(1)
            cache = DynamicCache(ddp_cache_data=[(k[index, :, -width:], v[index, :, -width:]) for k, v in prefix.kv])
        mask = allowed.unsqueeze(1)
        if self.model.config._attn_implementation != "sdpa":  # eager attention adds its mask
            mask = torch.zeros(mask.shape, dtype=self.model.dtype, device=self.device).masked_fill(~mask, torch.finfo(self.model.dtype).min)
        logits = self.model(input_ids=ids, position_ids=positions, attention_mask=mask, cache=cache, use_cache=cache is not None).logits
        return F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)


@dataclass
class CachedPrefixes:
    """A window's prefix KV cache, left-padded: per layer (keys, values) [group, heads, width, dim], its mask and lengths."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor
    lengths: torch.Tensor


@dataclass
class Packed:
    """A group's distinct suffixes side by side: `spans` [a, b) of each in `tokens`, `offsets` of each member's span."""

    tokens: list[int]
    spans: list[tuple[int, int]]
    offsets: dict[int, int]


def pack_suffixes(group: Group, inputs: list[list[int]]) -> Packed:
    """Pure. The group's members' inputs past its prefix, each distinct one once, concatenated."""
    tokens: list[int] = []
    spans: list[tuple[int, int]] = []
    at: dict[tuple[int, ...], int] = {}
    offsets = {}
    for m in group.members:
        rest = tuple(inputs[m][len(group.prefix) :])
        if rest not in at:
            at[rest] = len(tokens)
            spans.append((len(tokens), len(tokens) + len(rest)))
            tokens.extend(rest)
        offsets[m] = at[rest]
    return Packed(tokens=tokens, spans=spans, offsets=offsets)


def windows(groups: list[Group], budget: int) -> list[list[Group]]:
    """Pure. Cut groups sorted by prefix length into runs whose prefixes, padded to the run's longest, hold at most `budget` tokens.

    A window's cached prefixes are what its suffix passes attend to; bounding them by the budget keeps
    its KV cache within that of `hf`'s largest batch. Groups without a prefix form windows of their own.
    """
    out: list[list[Group]] = []
    for g in groups:
        last = out[-1] if out else None
        fits = last is not None and bool(last[0].prefix) == bool(g.prefix) and (len(last) + 1) * len(g.prefix) <= budget
        if fits:
            last.append(g)
        else:
            out.append([g])
    return out


def _left_padded(rows: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):  # left-padded: every row ends where its suffix starts
        if row:
            ids[r, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[r, width - len(row) :] = 1
    return ids, mask


if __name__ == "__main__":  # lm-eval's own command line, with `--model olora-prefix` registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
