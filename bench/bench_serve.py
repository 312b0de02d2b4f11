"""Benchmark: the registered model's generation, a batch of prompts in one padded `generate` vs one by one.

Runs the serving code path (`olora.tracking.pyfunc.generate` on base + exported adapter, prompts
rendered with the training template) in this process on the same 8 prompts, greedy, a fixed
number of new tokens, each case repeated; prints prompts/s for both and their ratio, and checks
that both return the same answers.

    python bench/bench_serve.py [--model embedded:SmolLM2-135M-Instruct] [--adapter models/exported]
                                [--template data/prepared/prompt_template.json] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import device_label, publish

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["What is the capital of France?", "Name a fruit that is yellow.", "What is 2 + 2?",
           "Name a colour of the sky.", "Who wrote Hamlet?", "What do bees make?",
           "What is the opposite of hot?", "Name an animal that barks."]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:SmolLM2-135M-Instruct")
    parser.add_argument("--adapter", default=str(REPO / "models/exported"))
    parser.add_argument("--template", default=str(REPO / "data/prepared/prompt_template.json"))
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()

    import torch
    from peft import PeftModel

    from olora.config import ModelConfig
    from olora.data.templates import PromptTemplate, render_prompt
    from olora.models import load_base, load_tokenizer, resolve_model
    from olora.runtime import resolve_runtime, set_threads
    from olora.tracking.pyfunc import generate

    set_threads()
    model_cfg = ModelConfig(name=args.model)
    ref, runtime = resolve_model(model_cfg), resolve_runtime(model_cfg)
    tokenizer = load_tokenizer(ref)
    model = PeftModel.from_pretrained(load_base(ref, runtime), args.adapter).eval()
    template = PromptTemplate.from_dict(json.loads(Path(args.template).read_text()))
    texts = [render_prompt(template, p, "", tokenizer) for p in PROMPTS]

    def batch():
        return generate(model, tokenizer, texts, args.max_new_tokens, template.stop)

    def one_by_one():
        return [generate(model, tokenizer, [t], args.max_new_tokens, template.stop)[0] for t in texts]

    batch()  # warm-up
    timings: dict[str, list[float]] = {"batch of 8": [], "one by one": []}
    answers = {}
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits both cases alike
        for name, fn in (("one by one", one_by_one), ("batch of 8", batch)):
            start = time.perf_counter()
            answers[name] = fn()
            timings[name].append(time.perf_counter() - start)
    rows = []
    for name, seconds in timings.items():
        median = statistics.median(seconds)
        rows.append({"case": name, "seconds": round(median, 3), "prompts_per_second": round(len(PROMPTS) / median, 2)})
    speedup = rows[0]["prompts_per_second"] / rows[1]["prompts_per_second"]
    same = answers["batch of 8"] == answers["one by one"]
    table = "\n".join([
        f"Serving: {len(PROMPTS)} prompts, greedy, up to {args.max_new_tokens} new tokens, {template.kind} template, "
        f"median of {args.repeats}, {device_label(str(runtime.device), runtime.dtype_name, torch.get_num_threads())}",
        "", "| case | seconds | prompts/s |", "|---|---|---|",
        *[f"| {r['case']} | {r['seconds']} | {r['prompts_per_second']} |" for r in rows], "",
        f"batch speed-up: **{speedup:.2f}×**; identical answers: {same}",
    ])
    publish(args.out, "serve", {"rows": rows, "speedup": round(speedup, 3), "identical_answers": same,
                                "answers": answers["batch of 8"], "prompts": PROMPTS}, table)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
