"""Benchmark: adapter initialisation cost on a TinyLlama-1.1B-shaped model (random weights, no download).

Compares, in one run and on the same weights: our exact O(m·n·r) init (olora.core.olora), PEFT's
full-QR `init_lora_weights="olora"`, PEFT's default LoRA init, and the practical floor (plain matrix
products of the same 4·m·n·r flops); then every other `adapter.init` as the init stage runs it
(`olora.modeling.peft_glue.initialise`, which calls PEFT's own pissa, pissa_niter_4, orthogonal, eva,
corda and lora_ga: there is no second implementation of those to compare). The data-driven inits
(eva, corda, lora_ga) read a calibration sample of random tokens (--calibration BATCHES SIZE LENGTH);
their time includes its forward (and, for lora_ga, backward) passes. Each method runs in its own
subprocess so that its peak memory (growth of the process's high-water mark during the init) is
measured alone.

    python bench/bench_init.py [--ranks 32 64] [--layers 22] [--device cpu] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from common import publish, run_case

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ["ours", "peft_olora", "peft_lora", "matmul_floor"]
PIPELINE_INITS = ["pissa", "pissa_niter_4", "orthogonal", "eva", "corda", "lora_ga"]  # through peft_glue.initialise
IMPLEMENTATION = {"ours": "ours (olora)", "peft_olora": "PEFT (full QR)", "peft_lora": "PEFT", "matmul_floor": "-"}


def tinyllama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000)


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def calibration_sample(vocab: int, batches: int, size: int, length: int, device: str) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(batches):
        ids = torch.randint(0, vocab, (size, length), generator=g)
        labels = ids.clone()
        labels[:, : length // 8] = -100  # a prompt's share, masked as training masks it
        out.append({k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}.items()})
    return out


def run_one(method: str, r: int, layers: int, device: str, dtype: str, calibration=(8, 2, 64)) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from olora.modeling import peft_glue as adapters
    from olora.config import AdapterConfig

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    with torch.device(device):
        model = LlamaForCausalLM(tinyllama_config(layers)).to(dt)
    shapes = [tuple(m.weight.shape) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    failed = None
    calibration = calibration_sample(model.config.vocab_size, *calibration, device) if method in ("eva", "corda", "lora_ga") else None
    before = rss_peak_mb()
    sync()
    start = time.perf_counter()
    if method in PIPELINE_INITS:  # the init stage's call, with PEFT's init underneath
        from olora.errors import ConfigError

        init, _, niter = method.partition("_niter_")
        try:
            adapters.initialise(model, AdapterConfig(init=init, r=r, alpha=2.0 * r, target_modules=TARGETS,
                                                     pissa_niter=int(niter or 0)), calibration)
        except ConfigError as exc:  # EVA that does not converge on this sample stops, by design: a row says so
            failed = str(exc)
        sync()
        elapsed = time.perf_counter() - start
    elif method == "matmul_floor":  # two (m×r)·(r×n) products per layer = 4·m·n·r flops, allocation untimed
        elapsed = sum(_time_mm(m, n, r, device) for m, n in shapes)
    else:
        if method == "ours":  # the pipeline's init stage calls exactly this
            adapters.initialise(model, AdapterConfig(init="olora", r=r, alpha=2.0 * r, target_modules=TARGETS))
        else:
            init = {"peft_olora": "olora", "peft_lora": True}[method]
            get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=init))
        sync()
        elapsed = time.perf_counter() - start
    peak = {"peak_rss_growth_mb": round(rss_peak_mb() - before, 1)}
    if device.startswith("cuda"):
        peak["peak_cuda_growth_mb"] = round((torch.cuda.max_memory_allocated() - base_mem) / 2**20, 1)
    flops = sum(4 * m * n * r for m, n in shapes)
    return {"method": method, "r": r, "layers": len(shapes), "seconds": round(elapsed, 4), "gflop_4mnr": round(flops / 1e9, 2), **peak,
            **({"failed": failed} if failed else {})}


def _time_mm(m: int, n: int, r: int, device: str) -> float:
    import torch

    x = torch.randn(m, r, device=device)
    y = torch.randn(r, n, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    _ = x[:1] @ y  # warm-up (cuBLAS handles, kernels) outside the timing
    sync()
    t = time.perf_counter()
    a = x @ y
    b = x @ y
    sync()
    del a, b
    return time.perf_counter() - t


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--layers", type=int, default=22, help="decoder layers (TinyLlama has 22)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--methods", nargs="+", default=METHODS + PIPELINE_INITS, choices=METHODS + PIPELINE_INITS)
    parser.add_argument("--calibration", type=int, nargs=3, default=[8, 2, 64], metavar=("BATCHES", "SIZE", "LENGTH"),
                        help="calibration sample of eva, corda and lora_ga: batches of SIZE sequences of LENGTH random tokens")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "R"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.layers, args.device, args.dtype, tuple(args.calibration))))
        return 0

    rows = []
    for r in args.ranks:
        for method in args.methods:
            cmd = [sys.executable, __file__, "--one", method, str(r), "--layers", str(args.layers),
                   "--device", args.device, "--dtype", args.dtype, "--calibration", *map(str, args.calibration)]
            row = run_case(cmd)
            if row is None:
                return 1
            rows.append(row)
            print(f"  r={r:<3} {method:<13} {rows[-1]['seconds']:>9.3f} s", file=sys.stderr)

    import torch

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    lines = [
        f"Adapter init, TinyLlama-1.1B shapes ({args.layers} layers x 7 projections), {args.dtype}, {device_name}; "
        f"eva, corda, lora_ga on {args.calibration[0]} batches of {args.calibration[1]} x {args.calibration[2]} random tokens",
        "",
        "| r | method | implementation | seconds | x faster than peft_olora | x matmul floor | peak memory growth MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in args.ranks:
        by = {row["method"]: row for row in rows if row["r"] == r}
        for method in args.methods:
            row = by[method]
            speed = by["peft_olora"]["seconds"] / row["seconds"] if "peft_olora" in by else float("nan")
            floor = row["seconds"] / by["matmul_floor"]["seconds"] if "matmul_floor" in by else float("nan")
            mem = row.get("peak_cuda_growth_mb", row["peak_rss_growth_mb"])
            impl = IMPLEMENTATION.get(method, "PEFT, through the init stage")
            seconds = f"{row['seconds']:.3f}" + (" (stopped: did not converge)" if row.get("failed") else "")
            lines.append(f"| {r} | {method} | {impl} | {seconds} | {speed:.1f} | {floor:.2f} | {mem} |")
    table = "\n".join(lines)
    publish(args.out, f"init_{args.device.split(':')[0]}_{args.dtype}", {"device": device_name, "rows": rows}, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
