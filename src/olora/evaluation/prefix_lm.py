"""An lm-eval log-likelihood backend that encodes each shared prefix once (`--model olora-prefix`).

lm-eval's `hf` backend runs every (context, continuation) request as its own sequence: a
multiple-choice question with four answers encodes its context four times, and the logits of every
context position go through the vocabulary projection and a log-softmax only to be thrown away.
This backend is `hf` with one method replaced, `_loglikelihood_tokens`:

1. Requests are sorted by their input tokens (context + continuation, less the last token), so
   inputs that share a prefix are neighbours, and grouped where sharing saves tokens (`plan_groups`):
   the choices of one question share its context, and the logit of its last token, which predicts
   every choice's first, is computed once; WinoGrande's two filled-in sentences share the words
   before the blank; BoolQ's one-token answers share everything.
2. Each group is packed (`pack_group`): its prefix, then each distinct rest of its members' inputs
   once, every token at the position it has in its own request, each rest attending to the prefix
   and causally to itself only. Groups are sorted by length and cut into batches (`split_sorted`)
   within the padded tokens of `hf`'s largest batch, one forward pass each, no KV cache; within a
   batch several groups share a row (`pack_rows`, best-fit decreasing) instead of padding, under a
   block-diagonal 4-D attention mask (sdpa or eager attention). A profile on the embedded model put
   86 % of the time in the linear layers, so the work is the tokens encoded, padding included, and
   the size of each pass. Only the positions some request needs are projected onto the vocabulary
   (a boolean `logits_to_keep`) and log-softmaxed.
3. The answer per request is lm-eval's: (sum of the continuation's log-probabilities, whether the
   greedy tokens equal the continuation), stored through lm-eval's cache hook.

The per-request results equal `hf`'s up to float rounding of differently shaped matmuls
(tests/evaluation/test_prefix_lm.py: every decision equal on all seven offline tasks, log-likelihoods
within 1e-4; sums are accumulated in float64); `bench/bench_eval.py` measures the speed. lm-eval's
command line with this backend: `python -m olora.evaluation.prefix_lm run --model olora-prefix
--model_args pretrained=...`. Requests longer than the model's window
(lm-eval truncates them from the left), seq2seq models, `batch_size: auto`, models with sliding-window
attention or an attention kernel that takes no 4-D mask go to `hf`'s own code.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

GROUP_COST = 2
"""Token-equivalents charged for each group (its row's padding and bookkeeping) when planning."""


@dataclass
class Group:
    """Requests encoded on one shared prefix: `prefix` tokens once, then each distinct rest of `members`' inputs."""

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
    encoded: a run's prefix p is the common prefix of its inputs (the logits of a needed position in it,
    such as the context's last token that predicts every choice's first, are computed once for all
    members), and it costs p + (w − 1) · (p − s)⁺ + w · Σ over its distinct inputs of (length − p)
    + GROUP_COST, s the members' least start and w = `suffix_weight`, the cost of a token that also goes
    through the vocabulary projection relative to one that does not (a rest's tokens are charged as
    projected). Optimal among contiguous runs, O(n · max_members).
    """
    order = sorted(range(len(inputs)), key=lambda i: inputs[i])
    n = len(order)
    lcp = [0] + [_common_prefix(inputs[order[k - 1]], inputs[order[k]]) for k in range(1, n)]
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest plan of the first j sorted requests
    cut = [0] * (n + 1)
    for j in range(1, n + 1):  # the run order[i:j], grown leftwards from j-1
        p, distinct, total, least = len(inputs[order[j - 1]]), 0, 0, starts[order[j - 1]]
        for i in range(j - 1, max(j - 1 - max_members, -1), -1):
            x = order[i]
            p, least = (p, least) if i == j - 1 else (min(p, lcp[i + 1]), min(least, starts[x]))
            if i == j - 1 or inputs[x] != inputs[order[i + 1]]:
                distinct += 1
                total += len(inputs[x])
            cost = best[i] + p + (suffix_weight - 1) * max(p - least, 0) + suffix_weight * (total - distinct * p) + GROUP_COST
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[Group] = []
    j = n
    while j > 0:
        i = cut[j]
        members = order[i:j]
        p = min(lcp[k] for k in range(i + 1, j)) if j - i > 1 else len(inputs[members[0]])
        groups.append(Group(prefix=list(inputs[members[0]][:p]), members=members))
        j = i
    return groups[::-1]


def _best_fit(free: list[tuple[int, int]], length: int, width: int) -> int:
    """Place `length` in the open row with the least free space that holds it, else a new row; return the row.

    `free` holds (free space, row) pairs in ascending order and is updated in place.
    """
    k = bisect.bisect_left(free, (length, -1))
    if k == len(free):
        row = len(free)
        free.insert(bisect.bisect_left(free, (width - length, row)), (width - length, row))
        return row
    space, row = free.pop(k)
    bisect.insort(free, (space - length, row))
    return row


def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """Pure. Best-fit decreasing: the indices of `lengths` in rows of at most `width` tokens (a longer one alone)."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = _best_fit(free, lengths[i], max(width, lengths[i]))
        if row == len(rows):
            rows.append([])
        rows[row].append(i)
    return rows


def split_sorted(lengths: list[int], budget: int, forward_cost: int, attention_span: float = math.inf,
                 widths: int = 1) -> list[tuple[int, int, int]]:
    """Cut ascending group lengths into batches (a, b, width) minimising Σ (forward_cost + rows · row cost).

    Pure. A batch's groups [a, b) are packed into rows of `width` tokens (`pack_rows`: best-fit
    decreasing, so short groups fill the space beside long ones instead of padding), the width being
    1 to `widths` times its longest group; it holds at most `budget` tokens of rows (one row longer than
    the budget gets a batch of its own). A row of w tokens costs w · (1 + w / `attention_span`): its
    tokens, plus attention, whose work per token grows with the row's width; `forward_cost` is the fixed
    cost of one forward pass in token-equivalents, so short rows are not split into many tiny passes.
    Optimal among contiguous cuts for that packing, O(n · widths · groups per batch · log rows).
    """
    n = len(lengths)
    best = [0.0] + [math.inf] * n
    cut = [(0, 0)] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[j - 1]
        for width in [longest * k for k in range(1, widths + 1) if k == 1 or longest * k <= budget]:
            free: list[tuple[int, int]] = []
            row_cost = width * (1 + width / attention_span)
            for i in range(j - 1, -1, -1):  # groups added longest first: best-fit decreasing, incrementally
                _best_fit(free, lengths[i], width)
                rows = len(free)
                if rows > 1 and rows * width > budget:
                    break
                cost = best[i] + forward_cost + rows * row_cost
                if cost < best[j]:
                    best[j], cut[j] = cost, (i, width)
    spans, j = [], n
    while j > 0:
        i, width = cut[j]
        spans.append((i, j, width))
        j = i
    return spans[::-1]


@register_model("olora-prefix")
class PrefixCachedLM(HFLM):
    """lm-eval's `hf` backend whose log-likelihood requests encode their common prefixes once, packed in shared rows."""

    widths = 4
    """The widest row `split_sorted` may pack, in multiples of the batch's longest group (1: as wide as it)."""

    forward_cost = 64
    """The fixed cost of one forward pass in token-equivalents, for batching (`split_sorted`): chosen before rows
    were packed (64 encoded the fewest tokens at fewer than 50 passes for the bench's 1,100 requests; 25 passes now)."""

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
        return 1.0 + self.model.get_output_embeddings().weight.numel() / max(self._body_parameters(), 1)

    def _body_parameters(self) -> int:
        """The parameters a token goes through: all but the input embeddings and the vocabulary projection."""
        head, embed = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        total = sum(p.numel() for p in self.model.parameters())
        return total - embed.weight.numel() - (0 if head.weight is embed.weight else head.weight.numel())

    def _attention_span(self) -> float:
        """The row width at which attention's work per token equals the linear layers' (for `split_sorted`).

        Per token and layer, the linear layers do about 2 · (the layer's parameters) multiply-adds and
        attention about 4 · width · heads · head_dim (scores and values), dense over the packed row.
        """
        config = self.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return self._body_parameters() / (2 * text.num_hidden_layers * heads * head_dim)

    def _shared_prefix_loglikelihoods(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from tqdm import tqdm

        inputs = [(ctx + cont)[:-1] for _, ctx, cont in requests]
        conts = [cont for _, _, cont in requests]
        starts = [len(x) - len(c) for x, c in zip(inputs, conts)]
        groups = plan_groups(inputs, starts, max_members=self.batch_size, suffix_weight=self._suffix_weight())
        packed = [pack_group(g, inputs, starts) for g in groups]
        budget = self.batch_size * max(len(x) for x in inputs)  # the padded tokens of `hf`'s longest batch
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                        desc="Running loglikelihood requests (olora-prefix)")
        order = sorted(range(len(groups)), key=lambda i: len(packed[i].tokens))
        lengths = [len(packed[i].tokens) for i in order]
        for a, b, width in split_sorted(lengths, budget, self.forward_cost, self._attention_span(), self.widths):
            rows = [[packed[order[a + k]] for k in row] for row in pack_rows(lengths[a:b], width)]
            logprobs, where = self._forward_packed(rows, max(sum(len(g.tokens) for g in row) for row in rows))
            for r, row in enumerate(rows):
                offset = 0
                for group in row:
                    for m, at in group.needed.items():
                        picked = logprobs[where[r, [offset + k for k in at]]]  # [continuation, vocab]
                        target = torch.tensor(conts[m], dtype=torch.long, device=picked.device)
                        greedy = bool((picked.argmax(dim=-1) == target).all())
                        results[m] = (float(picked.gather(1, target.unsqueeze(-1)).double().sum()), greedy)
                    progress.update(len(group.needed))
                    offset += len(group.tokens)
        progress.close()
        for (request_str, _, _), answer in zip(requests, results):
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return results  # type: ignore[return-value]

    def _forward_packed(self, rows: list[list[Packed]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities [needed position, vocab] of rows of packed groups, and each (row, column)'s index in them.

        A row holds several groups side by side, then right padding: each group's prefix, then its
        distinct rests, each rest attending to its group's prefix and causally to itself only (a 4-D
        mask), every token at the position it has in its own request. Only the positions some request
        needs are projected onto the vocabulary (`logits_to_keep` as a boolean mask).
        """
        shape = (len(rows), width)
        ids = torch.zeros(shape, dtype=torch.long)
        positions = torch.zeros(shape, dtype=torch.long)
        segment = torch.full(shape, -1, dtype=torch.long)  # unique per prefix and per rest in a row; -1 padding
        prefix = torch.full(shape, -1, dtype=torch.long)  # the segment of each token's group's prefix
        keep = torch.zeros(shape, dtype=torch.bool)
        for r, row in enumerate(rows):
            offset, base = 0, 0
            for group in row:
                end = offset + len(group.tokens)
                ids[r, offset:end] = torch.tensor(group.tokens, dtype=torch.long)
                positions[r, offset:end] = torch.tensor(group.positions, dtype=torch.long)
                segment[r, offset:end] = torch.tensor(group.segments, dtype=torch.long) + base
                prefix[r, offset:end] = base
                for at in group.needed.values():
                    keep[r, [offset + k for k in at]] = True
                offset, base = end, base + group.segments[-1] + 1
        where = keep.flatten().cumsum(0).view(shape) - 1  # (row, column) -> its index among the kept positions
        ids, positions, segment, prefix = (t.to(self.device) for t in (ids, positions, segment, prefix))
        causal = torch.ones((width, width), dtype=torch.bool, device=self.device).tril()
        mask = (causal & ((segment.unsqueeze(2) == segment.unsqueeze(1)) | (segment.unsqueeze(1) == prefix.unsqueeze(2)))).unsqueeze(1)
        if self.model.config._attn_implementation != "sdpa":  # eager attention adds its mask
            dtype = self.model.dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=self.device).masked_fill(~mask, torch.finfo(dtype).min)
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
        ):
            logits = self.model(input_ids=ids, position_ids=positions, attention_mask=mask,
                                logits_to_keep=keep.to(self.device), use_cache=False).logits
        return F.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1, dtype=self.softmax_dtype), where


@dataclass
class Packed:
    """One group in one row: `tokens` (prefix, then each distinct rest once), each token's `positions`
    (its place in its own request) and `segments` (0 prefix, k the k-th rest); `needed` maps each member
    to the indices in `tokens` of the positions whose logits it needs, in order (in the prefix, then in
    its rest)."""

    tokens: list[int]
    positions: list[int]
    segments: list[int]
    needed: dict[int, list[int]]


def pack_group(group: Group, inputs: list[list[int]], starts: list[int]) -> Packed:
    """Pure. The group's prefix, then its members' inputs past the prefix, each distinct rest once."""
    p = len(group.prefix)
    tokens, positions, segments = list(group.prefix), list(range(p)), [0] * p
    at: dict[tuple[int, ...], int] = {}
    needed = {}
    for m in group.members:
        rest = tuple(inputs[m][p:])
        if rest not in at:
            at[rest] = len(tokens)
            tokens.extend(rest)
            positions.extend(range(p, p + len(rest)))
            segments.extend([len(at)] * len(rest))
        needed[m] = list(range(starts[m], p)) + [at[rest] + k - p for k in range(max(starts[m], p), len(inputs[m]))]
    return Packed(tokens=tokens, positions=positions, segments=segments, needed=needed)


if __name__ == "__main__":  # lm-eval's own command line, with `--model olora-prefix` registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
