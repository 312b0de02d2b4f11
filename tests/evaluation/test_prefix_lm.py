"""The shared-prefix backend (`olora-prefix`) answers exactly as lm-eval's `hf` does, and plans its work soundly."""

from __future__ import annotations

import itertools
import math
import os
import random
import tempfile
from pathlib import Path

import pytest

from olora.config import PAPER_TASKS, EvaluateConfig
from olora.evaluation.prefix_lm import Group, pack_group, pack_rows, plan_groups, split_sorted

# --- the pure planning ---------------------------------------------------------------------------


def _requests(seed: int, n_docs: int = 30):
    """Multiple-choice-shaped token lists: per doc a context and 2-4 continuations; some docs share openings."""
    rng = random.Random(seed)
    openings = [[rng.randrange(50) for _ in range(rng.randrange(1, 6))] for _ in range(4)]
    inputs, starts = [], []
    for _ in range(n_docs):
        ctx = rng.choice(openings) + [rng.randrange(50) for _ in range(rng.randrange(1, 20))]
        for _ in range(rng.randrange(2, 5)):
            cont = [rng.randrange(50) for _ in range(rng.randrange(1, 6))]
            inputs.append((ctx + cont)[:-1])
            starts.append(len(ctx) - 1)
    return inputs, starts


@pytest.mark.parametrize("seed", range(5))
def test_groups_partition_the_requests_and_share_their_prefix(seed):
    inputs, starts = _requests(seed)
    groups = plan_groups(inputs, starts, max_members=6, suffix_weight=1.3)
    members = sorted(m for g in groups for m in g.members)
    assert members == list(range(len(inputs)))  # each request exactly once
    for g in groups:
        assert 1 <= len(g.members) <= 6
        for m in g.members:
            assert inputs[m][: len(g.prefix)] == g.prefix  # the prefix is shared by every member
        if len(g.members) > 1:  # ...and is their whole common prefix
            assert len(g.prefix) == len(os.path.commonprefix([inputs[m] for m in g.members]))


def test_the_choices_of_one_question_share_its_context():
    ctx = list(range(100, 140))
    other = list(range(200, 230))
    inputs = [(ctx + [1, 2, 3])[:-1], (ctx + [4, 5])[:-1], (ctx + [6])[:-1], (other + [7, 8])[:-1], (other + [9])[:-1]]
    starts = [len(ctx) - 1] * 3 + [len(other) - 1] * 2
    groups = plan_groups(inputs, starts, max_members=16)
    assert sorted(sorted(g.members) for g in groups) == [[0, 1, 2], [3, 4]]
    assert {tuple(g.prefix) for g in groups} == {tuple(ctx), tuple(other)}  # the logit of the context's last token: once


def test_unrelated_questions_that_share_a_first_word_stay_apart():
    """Merging them would move each context's tail into the (dearer) suffix pass for one saved token."""
    a, b = [5] + list(range(100, 150)), [5] + list(range(300, 350))
    inputs = [(a + [1])[:-1], (a + [2, 3])[:-1], (b + [1])[:-1], (b + [4])[:-1]]
    starts = [len(a) - 1] * 2 + [len(b) - 1] * 2
    groups = plan_groups(inputs, starts, max_members=16, suffix_weight=1.3)
    assert sorted(sorted(g.members) for g in groups) == [[0, 1], [2, 3]]


def _cost(lengths, spans, forward_cost, span):
    total = 0.0
    for a, b, width in spans:
        total += forward_cost + len(pack_rows(lengths[a:b], width)) * width * (1 + width / span)
    return total


def _fits(lengths, a, b, width, budget):
    rows = len(pack_rows(lengths[a:b], width))
    return rows == 1 or rows * width <= budget


@pytest.mark.parametrize("seed", range(20))
def test_batches_cover_the_groups_in_order_within_budget_at_least_cost(seed):
    rng = random.Random(seed)
    lengths = sorted(rng.randrange(1, 30) for _ in range(rng.randrange(1, 7)))
    budget, forward_cost, span, widths = rng.randrange(20, 120), rng.randrange(0, 40), rng.choice([10, 100, math.inf]), rng.randrange(1, 4)
    spans = split_sorted(lengths, budget, forward_cost, span, widths)
    assert [a for a, _, _ in spans] == [0] + [b for _, b, _ in spans[:-1]] and spans[-1][1] == len(lengths)
    assert all(_fits(lengths, a, b, width, budget) for a, b, width in spans)
    assert all(width in {lengths[b - 1] * k for k in range(1, widths + 1)} for a, b, width in spans)
    best = None  # brute force over every way to cut the sorted groups and every row width
    for cuts in itertools.product([False, True], repeat=len(lengths) - 1):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [len(lengths)]
        for ks in itertools.product(range(1, widths + 1), repeat=len(bounds) - 1):
            candidate = [(a, b, lengths[b - 1] * k) for (a, b), k in zip(zip(bounds, bounds[1:]), ks)]
            if all(_fits(lengths, a, b, width, budget) and (width == lengths[b - 1] or width <= budget) for a, b, width in candidate):
                cost = _cost(lengths, candidate, forward_cost, span)
                best = cost if best is None else min(best, cost)
                if ks == (1,) * len(ks) and all(b - a == 1 or (b - a) * lengths[b - 1] <= budget for a, b, _ in candidate):
                    unpacked = sum(forward_cost + (b - a) * w * (1 + w / span) for a, b, w in candidate)
                    assert cost <= unpacked  # packing several groups in a row never costs more than a row each
    assert _cost(lengths, spans, forward_cost, span) == pytest.approx(best)


def test_rows_are_packed_best_fit_decreasing_and_a_group_that_does_not_fit_opens_a_row():
    assert pack_rows([6, 5, 4, 3, 2], 8) == [[0, 4], [1, 3], [2]]  # 3 fills 5's row; 2 fills 6's; 4 fits no row's space
    assert pack_rows([3, 12, 2], 8) == [[1], [0, 2]]  # a group longer than the width gets a row of its own


@pytest.mark.parametrize("seed", range(10))
def test_every_group_is_in_one_row_within_its_width_and_no_two_rows_could_be_one(seed):
    rng = random.Random(seed)
    lengths = [rng.randrange(1, 40) for _ in range(rng.randrange(1, 30))]
    width = max(lengths)
    rows = pack_rows(lengths, width)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in row) for row in rows]
    assert max(loads) <= width
    assert all(a + b > width for a, b in itertools.combinations(loads, 2))


def test_a_group_packs_its_prefix_once_and_each_distinct_rest_once_at_its_own_positions():
    inputs = [[1, 2, 3, 4], [1, 2, 5], [1, 2, 3, 4], [1, 2, 6, 7, 8], [1, 2]]
    starts = [3, 1, 2, 4, 1]
    packed = pack_group(Group(prefix=[1, 2], members=[0, 1, 2, 3, 4]), inputs, starts)
    assert packed.tokens == [1, 2, 3, 4, 5, 6, 7, 8]  # the duplicate rest adds nothing, nor the empty one
    assert packed.segments == [0, 0, 1, 1, 2, 3, 3, 3]
    for m, needed in packed.needed.items():  # each needed position holds the request's token at its own position
        assert len(needed) == len(inputs[m]) - starts[m]
        segment = max(packed.segments[i] for i in needed)
        own = [i for i, s in enumerate(packed.segments) if s in (0, segment)]
        assert [packed.tokens[i] for i in own] == inputs[m]
        assert [packed.positions[i] for i in own] == list(range(len(inputs[m])))
        assert [own.index(i) for i in needed] == list(range(starts[m], len(inputs[m])))
    assert packed.needed[1][0] == packed.needed[4][0] == 1  # a logit in the prefix serves every member that needs it


def test_a_group_is_a_plain_value():
    assert Group(prefix=[1], members=[0]) == Group(prefix=[1], members=[0])


# --- against lm-eval's hf backend, on real lm-eval requests -------------------------------------


def _captured_requests(lm, tasks: list[str], limit: int):
    """The loglikelihood requests lm-eval builds for `tasks` (offline), captured from a real run."""
    from lm_eval import simple_evaluate

    from olora.evaluation.tasks import tasks_for

    captured = []
    original = type(lm).loglikelihood

    def capture(self, requests, *args, **kwargs):  # collect them; the scores of this run are not used
        captured.extend(requests)
        return [(0.0, False)] * len(requests)

    type(lm).loglikelihood = capture
    try:
        with tempfile.TemporaryDirectory() as folder:
            manager, names, _ = tasks_for("offline", tasks, Path(folder))
            simple_evaluate(model=lm, tasks=list(names.values()), task_manager=manager, num_fewshot=0, limit=limit, bootstrap_iters=0)
    finally:
        type(lm).loglikelihood = original
    return captured


def _compare(model, tokenizer, tasks, limit, batch_size=8, max_length=2048):
    from lm_eval.models.huggingface import HFLM

    from olora.evaluation.prefix_lm import PrefixCachedLM

    hf = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    prefix = PrefixCachedLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    requests = _captured_requests(hf, tasks, limit)
    expected = hf.loglikelihood(requests, disable_tqdm=True)
    got = prefix.loglikelihood(requests, disable_tqdm=True)
    return requests, expected, got


def _decisions(requests, results) -> dict:
    """Per question, the choice picked by log-likelihood and by length-normalised log-likelihood (acc, acc_norm)."""
    by_question: dict = {}
    for request, (loglikelihood, _) in zip(requests, results):
        by_question.setdefault((request.task_name, request.doc_id), []).append((request.idx, loglikelihood, len(request.arguments[1])))
    picked = {}
    for key, choices in by_question.items():
        choices.sort()
        picked[key] = (max(choices, key=lambda c: c[1])[0], max(choices, key=lambda c: c[1] / c[2])[0])
    return picked


def _tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_same_loglikelihoods_and_greedy_flags_as_hf_on_all_seven_tasks(tiny_model_dir):
    model, tokenizer = _tiny(tiny_model_dir)
    requests, expected, got = _compare(model, tokenizer, list(PAPER_TASKS), limit=6)
    assert {r.task_name.split("_olora")[0] for r in requests} == set(PAPER_TASKS)
    assert len(got) == len(expected) == len(requests)
    assert max(abs(a[0] - b[0]) for a, b in zip(expected, got)) < 1e-4
    assert [a[1] for a in expected] == [b[1] for b in got]
    assert _decisions(requests, expected) == _decisions(requests, got)


def test_requests_longer_than_the_window_are_truncated_as_hf_truncates_them(tiny_model_dir):
    model, tokenizer = _tiny(tiny_model_dir)
    requests, expected, got = _compare(model, tokenizer, ["boolq", "arc_easy"], limit=3, max_length=48)
    assert any(len(r.arguments[0]) > 200 for r in requests)  # BoolQ passages exceed 48 tokens
    assert max(abs(a[0] - b[0]) for a, b in zip(expected, got)) < 1e-4
    assert [a[1] for a in expected] == [b[1] for b in got]
    assert _decisions(requests, expected) == _decisions(requests, got)


def test_small_batches_split_questions_windows_and_passes_and_eager_attention_agrees(tiny_model_dir):
    """Batch 2: a 4-choice question spans two groups and every pass holds a few rows; the eager attention mask too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    requests, expected, got = _compare(model, AutoTokenizer.from_pretrained(tiny_model_dir), ["arc_easy", "hellaswag", "winogrande"], limit=3, batch_size=2)
    assert max(abs(a[0] - b[0]) for a, b in zip(expected, got)) < 1e-4
    assert [a[1] for a in expected] == [b[1] for b in got]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_several_groups_share_a_row_and_score_as_hf_does(tiny_model_dir, attention):
    """Four questions in one pass of three rows: the longest alone, two side by side, and one that fits no row's space.

    Each group's positions restart at 0 and its tokens see only their own prefix and rest (sdpa's boolean
    mask, eager attention's additive one).
    """
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from olora.evaluation.prefix_lm import PrefixCachedLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rng = random.Random(0)
    requests = []
    for n_ctx in (28, 18, 7, 5):  # packed groups of 31, 21, 10 and 8 tokens: rows [31], [21, 10], [8] at width 31
        ctx = [rng.randrange(100, 5000) for _ in range(n_ctx)]
        requests += [((str(n_ctx), str(k)), ctx, [rng.randrange(100, 5000) for _ in range(k)]) for k in (2, 3)]
    shapes = []
    forward = model.forward
    model.forward = lambda *a, **kw: shapes.append(tuple(kw["input_ids"].shape)) or forward(*a, **kw)
    ours = PrefixCachedLM(pretrained=model, tokenizer=tokenizer, batch_size=8)._loglikelihood_tokens(requests, disable_tqdm=True)
    model.forward = forward
    assert shapes == [(3, 31)]
    hf = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)._loglikelihood_tokens(requests, disable_tqdm=True)
    assert max(abs(a[0] - b[0]) for a, b in zip(hf, ours)) < 1e-4
    assert [a[1] for a in hf] == [b[1] for b in ours]


def test_one_token_contexts_share_nothing_and_still_score(tiny_model_dir):
    """A context of one token leaves no prefix to cache: those requests take the plain pass."""
    from lm_eval.models.huggingface import HFLM

    from olora.evaluation.prefix_lm import PrefixCachedLM

    model, tokenizer = _tiny(tiny_model_dir)
    requests = [(("a", "b"), [11], [12, 13]), (("a", "c"), [11], [14]), (("d", "e"), [21, 22, 23, 24], [25])]
    hf = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)._loglikelihood_tokens(requests, disable_tqdm=True)
    ours = PrefixCachedLM(pretrained=model, tokenizer=tokenizer, batch_size=4)._loglikelihood_tokens(requests, disable_tqdm=True)
    assert max(abs(a[0] - b[0]) for a, b in zip(hf, ours)) < 1e-5
    assert [a[1] for a in hf] == [b[1] for b in ours]


def test_a_model_with_sliding_window_attention_is_scored_by_hfs_own_code(tiny_model_dir):
    """The packed rows' 4-D mask would let every token see past the window: such models take `hf`'s path."""
    from lm_eval.models.huggingface import HFLM

    from olora.evaluation.prefix_lm import PrefixCachedLM

    model, tokenizer = _tiny(tiny_model_dir)
    requests = [(("a", "b"), [11, 12, 13], [14, 15]), (("a", "c"), [11, 12, 13], [16])]
    assert PrefixCachedLM(pretrained=model, tokenizer=tokenizer, batch_size=4)._packs_suffixes()
    model.config.sliding_window = 2  # as a Mistral-style config declares it
    ours = PrefixCachedLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    assert not ours._packs_suffixes()
    hf = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)._loglikelihood_tokens(requests, disable_tqdm=True)
    assert ours._loglikelihood_tokens(requests, disable_tqdm=True) == hf  # hf's own code: identical


def test_the_stage_gives_the_same_per_question_results_with_either_backend(tiny_model_dir):
    from olora.evaluation.harness import run_lm_eval

    model, tokenizer = _tiny(tiny_model_dir)
    runs = {b: run_lm_eval(model, tokenizer, EvaluateConfig(limit=4, batch_size=8, backend=b)) for b in ("hf", "prefix")}
    decided = ("task", "doc_id", "doc_hash", "acc", "acc_norm", "gold")  # the same decision on every question
    assert [[r[k] for k in decided] for r in runs["hf"].rows] == [[r[k] for k in decided] for r in runs["prefix"].rows]
    for a, b in zip(runs["hf"].rows, runs["prefix"].rows):  # and the log-likelihoods kept agree to the backend's tolerance
        for key in ("loglik", "loglik_norm"):
            assert (a[key] is None) == (b[key] is None)
            assert a[key] is None or max(abs(x - y) for x, y in zip(a[key], b[key])) < 2e-4
    assert runs["hf"].metrics.questions == runs["prefix"].metrics.questions  # the same questions asked
    assert runs["hf"].metrics.mean_acc == runs["prefix"].metrics.mean_acc


def test_registered_with_lm_eval_under_its_name():
    from lm_eval.api.registry import get_model

    from olora.evaluation.prefix_lm import PrefixCachedLM

    assert get_model("olora-prefix") is PrefixCachedLM


@pytest.mark.slow
def test_same_decisions_as_hf_with_the_embedded_model_on_all_seven_tasks():
    """The claim on the model the pipeline ships: every loglikelihood within 1e-4 and every greedy flag equal."""
    from olora.config import ModelConfig
    from olora.modeling import models
    from olora.modeling.runtime import resolve_runtime

    cfg = ModelConfig()
    ref = models.resolve_model(cfg)
    model, tokenizer = models.load_base(ref, resolve_runtime(cfg)), models.load_tokenizer(ref)
    requests, expected, got = _compare(model, tokenizer, list(PAPER_TASKS), limit=5, batch_size=16)
    assert {r.task_name.split("_olora")[0] for r in requests} == set(PAPER_TASKS)
    assert max(abs(a[0] - b[0]) for a, b in zip(expected, got)) < 1e-4
    assert [a[1] for a in expected] == [b[1] for b in got]
    assert _decisions(requests, expected) == _decisions(requests, got)
