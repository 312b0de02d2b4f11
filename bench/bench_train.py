"""Benchmark: training throughput of the `train` stage against a minimal hand-written PEFT loop.

In one run, on the same model, data, micro-batch and sequence length, each case in its own
subprocess (so peak memory is its own; the initial adapters are made beforehand, in the parent):
- `stage-olora`: the train stage's library function (`olora.training.trainer.train_adapter`: transformers'
  Trainer, response-only loss, the stage's callbacks) with the OLoRA init;
- `stage-lora`: the same with PEFT's LoRA init (OLoRA's step should cost the same: same shapes);
- `hand-olora`: a minimal loop (PeftModel + torch's fused AdamW, as the Trainer's default: forward,
  backward, clip, step) on the same OLoRA-initialised adapter and the same tokenised rows;
- `default-olora`: the train stage as `dvc repro` runs it on the embedded default: params.yaml's own
  data (rows of every length, its max_seq_length and micro-batch) and batching (padding-free when
  params.yaml says so), the same model and OLoRA adapter. Its tokens/s counts real tokens only, so its
  ratio to `stage-olora` is the share of the unpadded rate the default run reaches.
In the first three, every example is exactly `--seq-len` tokens (rows that tokenise shorter are left out, longer
responses are cut), so every step of every case processes the same micro-batch x seq-len tokens
with no padding, whatever order each case draws the rows in. Steps are timed end to end (data
loading and logging included); the first `--warmup` are not counted. Model FLOP/s uses
4·N_linear + 6·N_adapter flops per token (forward and input-gradient through every frozen linear
layer including the LM head, plus weight gradients of the adapters; attention scores are left
out, so it is a lower bound) and is compared with this machine's matrix-product rate in the
model's dtype, measured in the same process.

    python bench/bench_train.py [--model embedded:SmolLM2-135M-Instruct] [--steps 8] [--warmup 2] [--seq-len 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import device_label, publish, run_case

REPO = Path(__file__).resolve().parents[1]
CASES = ["stage-olora", "stage-lora", "hand-olora", "default-olora"]


def build_config(args, init: str):
    from olora.config import load_config

    overrides = {
        "model.name": args.model,
        "adapter.init": init,
        "data.max_examples": args.max_examples,
        "data.max_seq_length": args.seq_len,
        "train.max_steps": args.steps + args.warmup,
        "train.eval_steps": (args.steps + args.warmup) * 100,  # no validation inside the timed window
        "train.save_steps": (args.steps + args.warmup) * 100,
        "train.warmup_steps": 1,
        "tracking.enabled": False,
    }
    if args.micro_batch:
        overrides["train.micro_batch_size"] = args.micro_batch
    return load_config(REPO / "params.yaml", overrides)


def default_config(args):
    """params.yaml as the embedded default runs it: only the model, the step count and the timing window set here."""
    from olora.config import load_config

    steps = args.steps + args.warmup
    return load_config(REPO / "params.yaml", {
        "model.name": args.model, "train.max_steps": steps, "train.eval_steps": steps * 100,
        "train.save_steps": steps * 100, "train.warmup_steps": 1, "tracking.enabled": False,
        **({"data.max_examples": args.default_max_examples} if args.default_max_examples else {}),
    })


def fixed_length_rows(data_dir: Path, tokenizer, length: int, needed: int) -> int:
    """Keep only the training rows that tokenise to exactly `length` tokens (with response tokens)."""
    from olora.data.templates import encode
    from olora.io import read_jsonl, write_jsonl_atomic

    keep = []
    for row in read_jsonl(data_dir / "train.jsonl"):
        encoded = encode(tokenizer, row["prompt"], row["response"], length)
        if encoded and len(encoded[0]) == length and any(x != -100 for x in encoded[1]):
            keep.append(row)
    if len(keep) < needed:
        sys.exit(f"only {len(keep)} prepared rows tokenise to {length} tokens, {needed} needed: "
                 "raise --max-examples or lower --seq-len")
    write_jsonl_atomic(data_dir, {"train.jsonl": keep, "validation.jsonl": read_jsonl(data_dir / "validation.jsonl")})
    return len(keep)


class StepTimer:
    """Wall time from one optimizer step's end to the next (data loading, logging and all) and its tokens."""

    def __init__(self):
        self.times: list[float] = []
        self.tokens: list[int] = []
        self._t = None

    def start(self):
        self._t = time.perf_counter()

    def mark(self, tokens: int, sync):
        sync()
        now = time.perf_counter()
        self.times.append(now - self._t)
        self.tokens.append(tokens)
        self._t = now

    def summary(self, warmup: int) -> dict:
        times, tokens = self.times[warmup:], self.tokens[warmup:]
        if not times:
            raise RuntimeError(f"no step was timed ({len(self.times)} steps ran, {warmup} warm-up)")
        return {"timed_steps": len(times), "seconds": round(sum(times), 3), "tokens": sum(tokens),
                "tokens_per_second": round(sum(tokens) / sum(times), 2), "step_seconds": [round(t, 3) for t in times]}


def flops_per_token(model) -> tuple[int, int]:
    """(N_linear of the frozen model incl. the LM head, N_adapter) for 4·N_linear + 6·N_adapter."""
    import torch

    frozen = adapter = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if "lora_" in name:
                adapter += module.weight.numel()
            else:
                frozen += module.weight.numel()
    return frozen, adapter


def matmul_rate(device: str, dtype, size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a square matrix product in `dtype` on this machine (best of `repeats`, after a warm-up)."""
    import torch

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


class StepProfile:
    """torch.profiler over the timed steps (`--profile`): where a step's host time goes, and how often the
    host reads a tensor's value. Every `.item()`/`float()`/`bool()` of a tensor runs `aten::_local_scalar_dense`;
    on CUDA a read of a device tensor blocks until the queued kernels finish, a read of a CPU-side tensor
    (torch.optim's per-tensor step counters) does not, so on CPU the count is an upper bound on the waits a
    GPU run would have; on CUDA the stream/device synchronisations themselves are counted."""

    SYNC_OPS = ("aten::_local_scalar_dense",)
    CUDA_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")

    def __init__(self, enabled: bool, cuda: bool):
        self.enabled, self.cuda, self.prof, self.steps = enabled, cuda, None, 0

    def start(self):
        if self.enabled and self.prof is None:
            import torch

            activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if self.cuda else [])
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()

    def step(self):
        if self.prof is not None:
            self.steps += 1

    def stop(self, timer_syncs_per_step: int) -> dict | None:
        """Per-step figures; `timer_syncs_per_step`: the benchmark's own device synchronisations, subtracted."""
        if self.prof is None:
            return None
        self.prof.__exit__(None, None, None)
        events = self.prof.key_averages()
        steps = max(self.steps, 1)
        total = sum(e.self_cpu_time_total for e in events) or 1
        count = {e.key: e.count for e in events}
        top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
        loader = sum(e.cpu_time_total for e in events if e.key.startswith("enumerate(DataLoader)"))
        optimizer = sum(e.cpu_time_total for e in events if e.key.startswith("Optimizer.step"))
        self.prof = None
        return {
            "profiled_steps": steps,
            "host_reads_per_step": round(sum(count.get(k, 0) for k in self.SYNC_OPS) / steps, 2),
            "cuda_syncs_per_step": round(sum(count.get(k, 0) for k in self.CUDA_SYNCS) / steps - timer_syncs_per_step, 2)
            if self.cuda else None,
            "ops_per_step": round(sum(e.count for e in events) / steps),
            "dataloader_share": round(loader / total, 4),
            "optimizer_share": round(optimizer / total, 4),
            "top_self_cpu": [(e.key, round(e.self_cpu_time_total / total, 4)) for e in top],
            "calls_per_step": {e.key: round(e.count / steps, 2) for e in sorted(events, key=lambda e: -e.count)[:60]},
        }


def measure_case(case: str, args, data_dir: Path, init_dir: Path) -> dict:
    import torch
    from transformers import TrainerCallback

    from olora.modeling import models
    from olora.modeling import peft_glue as adapters
    from olora.io import read_jsonl
    from olora.modeling.runtime import peak_memory_bytes, resolve_runtime, seed_everything
    from olora.training.checkpoints import run_fingerprint
    from olora.training.trainer import TrainPaths, tokenize_split, train_adapter

    kind, init = case.split("-")
    cfg = default_config(args) if kind == "default" else build_config(args, init)
    runtime = resolve_runtime(cfg.model)
    ref = models.resolve_model(cfg.model)
    sync = (lambda: torch.cuda.synchronize(runtime.device)) if runtime.is_cuda else (lambda: None)
    timer = StepTimer()
    profile = StepProfile(getattr(args, "profile", False), runtime.is_cuda)
    counts: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if kind in ("stage", "default"):
            class Timing(TrainerCallback):
                def on_train_begin(self, a, state, control, model=None, **kw):
                    counts["n_linear"], counts["n_adapter"] = flops_per_token(model)
                    self.seen = int(state.num_input_tokens_seen or 0)
                    timer.start()

                def on_step_end(self, a, state, control, **kw):
                    seen = int(state.num_input_tokens_seen or 0)
                    timer.mark(seen - self.seen, sync)
                    self.seen = seen
                    profile.step()  # counts only once started
                    if len(timer.times) == args.warmup:
                        profile.start()
                    elif len(timer.times) == args.warmup + args.steps:  # before the Trainer's end-of-training evaluation
                        counts["profile"] = profile.stop(1 if runtime.is_cuda else 0)

                def on_train_end(self, a, state, control, **kw):
                    counts["peak"] = peak_memory_bytes(runtime)  # before the stage's final evaluation and export

            paths = TrainPaths(data_dir, init_dir, tmp / "adapter", tmp / "exported", tmp / "checkpoints")
            result = train_adapter(cfg, ref, runtime, paths, run_fingerprint(cfg, data_dir, init_dir), callbacks=[Timing()])
            counts["padding_free"] = bool(result.metrics.get("padding_free"))
        else:
            from transformers import DataCollatorForSeq2Seq

            seed_everything(cfg.train.seed)
            tokenizer = models.load_tokenizer(ref)
            rows = tokenize_split(tokenizer, read_jsonl(data_dir / "train.jsonl"), cfg.data.max_seq_length)
            model = adapters.load_for_training(models.load_base(ref, runtime), init_dir, init)
            model.train()
            if cfg.train.gradient_checkpointing:
                model.gradient_checkpointing_enable()
                model.enable_input_require_grads()
            counts["n_linear"], counts["n_adapter"] = flops_per_token(model)
            collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
            loader = torch.utils.data.DataLoader(rows, batch_size=cfg.train.micro_batch_size, shuffle=True,
                                                 collate_fn=collate, generator=torch.Generator().manual_seed(cfg.train.seed))
            trainable = [p for p in model.parameters() if p.requires_grad]
            optim = torch.optim.AdamW(trainable, lr=cfg.train.learning_rate, weight_decay=0.0, fused=True)
            autocast = torch.autocast("cuda", dtype=runtime.dtype) if runtime.is_cuda and runtime.dtype != torch.float32 else None

            def batches():
                while True:  # epochs, as the Trainer does when steps outlast the data
                    yield from loader

            stream = batches()
            timer.start()
            for step in range(cfg.train.max_steps):
                if step == args.warmup:
                    profile.start()
                batch = {k: v.to(runtime.device) for k, v in next(stream).items()}
                if autocast:
                    with autocast:
                        loss = model(**batch).loss
                else:
                    loss = model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, cfg.train.max_grad_norm)
                optim.step()
                optim.zero_grad(set_to_none=True)
                float(loss)
                timer.mark(int(batch["attention_mask"].sum()), sync)
                profile.step()
            counts["profile"] = profile.stop(1 if runtime.is_cuda else 0)
            counts["peak"] = peak_memory_bytes(runtime)
    summary = timer.summary(args.warmup)
    flops = (4 * counts["n_linear"] + 6 * counts["n_adapter"]) * summary["tokens"]
    return {
        "case": case, **summary, "micro_batch": cfg.train.micro_batch_size,
        "seq_len": cfg.data.max_seq_length, "device": str(runtime.device), "dtype": runtime.dtype_name,
        "threads": torch.get_num_threads(), "model_gflops": round(flops / summary["seconds"] / 1e9, 2),
        "n_linear": counts["n_linear"], "n_adapter": counts["n_adapter"],
        "peak_memory_mb": round(counts["peak"] / 2**20, 1), "padding_free": counts.get("padding_free", False),
        "matmul_gflops": round(matmul_rate(str(runtime.device), runtime.dtype), 2),
        "profile": counts.get("profile"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:SmolLM2-135M-Instruct")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per case")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--micro-batch", type=int, default=0, help="0: params.yaml's train.micro_batch_size")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens in every example")
    parser.add_argument("--max-examples", type=int, default=2000, help="rows prepared, before keeping the --seq-len ones")
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per case (interleaved); the median is shown")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--default-max-examples", type=int, default=0,
                        help="default-olora: rows prepared (0: params.yaml's data.max_examples)")
    parser.add_argument("--profile", action="store_true",
                        help="also run torch.profiler over the timed steps: host syncs per step, dataloader and optimizer shares, top ops")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--init", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_case(args.one, args, Path(args.data), Path(args.init))))
        return 0

    from olora.modeling import models
    from olora.data.prepare import prepare_data as prepare
    from olora.modeling.initialise import init_adapter as initialise_adapter
    from olora.modeling.runtime import resolve_runtime

    cfg = build_config(args, "olora")
    ref = models.resolve_model(cfg.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = models.load_tokenizer(ref)
        prepare(cfg.data, tokenizer, tmp / "data")
        kept = fixed_length_rows(tmp / "data", tokenizer, args.seq_len, cfg.train.micro_batch_size * cfg.train.max_steps)
        print(f"  {kept} training rows of exactly {args.seq_len} tokens", file=sys.stderr)
        if "default-olora" in args.cases:  # the default's own data: params.yaml's rows, lengths and seq length
            default_cfg = default_config(args)
            prepare(default_cfg.data, tokenizer, tmp / "data-default")
        for init in sorted({case.split("-")[1] for case in args.cases}):
            init_cfg = build_config(args, init)
            initialise_adapter(init_cfg, ref, resolve_runtime(init_cfg.model), tmp / f"init-{init}")
        runs: dict[str, list[dict]] = {case: [] for case in args.cases}
        for repeat in range(args.repeats):  # interleaved, so slow drifts of a shared machine hit every case alike
            for case in args.cases:
                data = tmp / ("data-default" if case.startswith("default-") else "data")
                cmd = [sys.executable, __file__, "--one", case, "--data", str(data), "--init",
                       str(tmp / f"init-{case.split('-')[1]}"), "--model", args.model, "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--micro-batch", str(args.micro_batch), "--seq-len", str(args.seq_len),
                       "--max-examples", str(args.max_examples), "--default-max-examples", str(args.default_max_examples),
                       *(["--profile"] if args.profile else [])]
                row = run_case(cmd)
                if row is None:
                    return 1
                runs[case].append(row)
                print(f"  {repeat + 1}/{args.repeats} {case:<12} {row['tokens_per_second']:>9.1f} tokens/s", file=sys.stderr)
    for case, repeats in runs.items():  # the median process by throughput, with every process's figure kept
        ordered = sorted(repeats, key=lambda r: r["tokens_per_second"])
        rows.append({**ordered[len(ordered) // 2], "repeat_tokens_per_second": [r["tokens_per_second"] for r in repeats],
                     "repeat_seconds_per_token": [r["seconds"] / r["tokens"] for r in repeats]})

    by = {row["case"]: row for row in rows}
    first = rows[0]
    device = device_label(first["device"], first["dtype"], first["threads"])
    ref_row = by.get("hand-olora")
    lines = [
        f"Training throughput, {args.model}, micro-batch {first['micro_batch']} x {first['seq_len']} tokens (no padding), "
        f"{args.steps} timed steps after {args.warmup} warm-up, median of {args.repeats} fresh processes per case, {device}",
        "",
        "| case | tokens/s | per process | x hand loop | s/step (median) | model GFLOP/s | share of matmul rate | peak memory MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = row["tokens_per_second"] / ref_row["tokens_per_second"] if ref_row else float("nan")
        share = row["model_gflops"] / row["matmul_gflops"]
        spread = ", ".join(f"{x:.0f}" for x in row["repeat_tokens_per_second"])
        lines.append(f"| {row['case']} | {row['tokens_per_second']:.1f} | {spread} | {ratio:.2f} | {statistics.median(row['step_seconds']):.3f} | "
                     f"{row['model_gflops']:.1f} | {share:.2f} (of {row['matmul_gflops']:.0f}) | {row['peak_memory_mb']:.0f} |")
    if "stage-olora" in by and "stage-lora" in by:
        so, sl = by["stage-olora"], by["stage-lora"]
        per_tok = statistics.median(so["repeat_seconds_per_token"]) / statistics.median(sl["repeat_seconds_per_token"])
        lines += ["", f"OLoRA / LoRA time per token in the train stage (medians over processes): {per_tok:.3f}"]
    if "default-olora" in by and "stage-olora" in by:
        d = by["default-olora"]
        lines += ["", f"Embedded default train stage (params.yaml's data, up to {d['seq_len']} tokens per row, micro-batch "
                  f"{d['micro_batch']}, {'padding-free' if d['padding_free'] else 'padded'} batches) / the unpadded stage rate: "
                  f"{d['tokens_per_second'] / by['stage-olora']['tokens_per_second']:.2f}"]
    lines += ["", "Peak memory: CUDA max allocated on a GPU; on CPU the process's peak RSS (model, data and Python included)."]
    if args.profile:
        lines += profile_table(rows)
    tag = "train_" + first["device"].split(":")[0] + ("_profile" if args.profile else "")
    publish(args.out, tag, {"device": device, "model": args.model, "rows": rows}, "\n".join(lines))
    return 0


def profile_table(rows: list[dict]) -> list[str]:
    """The profile of each case's median process (the profiler's own overhead is in these runs' throughput)."""
    lines = ["", "Profile of the timed steps (torch.profiler, the median process of each case; its overhead is in the "
             "figures above). Tensor reads: tensor-to-Python reads (`aten::_local_scalar_dense`: `.item()`, `float()`, "
             "`bool()`); on CUDA those of device tensors wait for the device, those of CPU-side tensors (torch.optim's step "
             "counters, one per trainable tensor and step) do not, so on CPU this is an upper bound on a GPU run's waits. "
             "CUDA syncs: the waits themselves, on a GPU only. The hand loop reads the loss and the token count each "
             "step, as the stage's logging and token counting do.", "",
             "| case | tensor reads / step | CUDA syncs / step | ops / step | dataloader share | optimizer share | top ops by self CPU time |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        p = row.get("profile")
        if not p:
            continue
        top = ", ".join(f"`{name}` {share:.0%}" for name, share in p["top_self_cpu"][:4])
        cuda = "-" if p["cuda_syncs_per_step"] is None else f"{p['cuda_syncs_per_step']:.1f}"
        lines.append(f"| {row['case']} | {p['host_reads_per_step']:.1f} | {cuda} | {p['ops_per_step']} | "
                     f"{p['dataloader_share']:.1%} | {p['optimizer_share']:.1%} | {top} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
