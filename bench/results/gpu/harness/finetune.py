"""A short fine-tune of the TinyLlama-shaped model through the pipeline's own stages (prepare, init, train),
tracking off, with the shipped params.yaml otherwise (unless overridden). Adds a step timer and the
bench_train FLOP count (4*N_linear + 6*N_adapter per non-padding token) to report steady-state
tokens/s and MFU against the measured bf16 matmul peak.

    python finetune.py MODEL_DIR WORK_DIR OUT_JSON PEAK_JSON [key=value ...]
"""
import json, statistics, sys, time
from pathlib import Path

import torch
import yaml
from transformers import TrainerCallback

G = Path(__file__).resolve().parents[1]  # the frozen snapshot (.gpucheck)
sys.path.insert(0, str(G / "bench"))
from bench_train import flops_per_token  # noqa: E402  the benchmark's own FLOP count

from olora import pipeline  # noqa: E402
from olora.config import apply_overrides, load_config  # noqa: E402

model_dir, work, out_json, peak_json = (Path(a) for a in sys.argv[1:5])
extra = dict(a.split("=", 1) for a in sys.argv[5:])
extra = {k: yaml.safe_load(v) for k, v in extra.items()}
overrides = {"model.name": str(model_dir), "tracking.enabled": False, **extra}
work.mkdir(parents=True, exist_ok=True)
values = apply_overrides(yaml.safe_load((G / "params.yaml").read_text()), overrides)
(work / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
cfg = load_config(work / "params.yaml")
layout = pipeline.Layout(work)
cuda = torch.cuda.is_available()
sync = torch.cuda.synchronize if cuda else (lambda: None)
WARMUP = 3


class Steps(TrainerCallback):
    """Per optimizer step: wall time, non-padding tokens, and whether an evaluation or save fell inside."""

    def __init__(self):
        self.rows, self.dirty, self.counts = [], False, {}

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.counts["n_linear"], self.counts["n_adapter"] = flops_per_token(model)
        self.seen = int(state.num_input_tokens_seen or 0)
        sync()
        self.t = time.perf_counter()

    def on_evaluate(self, *a, **kw):
        self.dirty = True

    def on_save(self, *a, **kw):
        self.dirty = True

    def on_step_end(self, args, state, control, **kw):
        sync()
        now = time.perf_counter()
        seen = int(state.num_input_tokens_seen or 0)
        self.rows.append({"step": state.global_step, "seconds": now - self.t, "tokens": seen - self.seen, "dirty": self.dirty})
        self.t, self.seen, self.dirty = now, seen, False


steps = Steps()
t0 = time.perf_counter()
prep = pipeline.stage_prepare(layout)
t1 = time.perf_counter()
init = pipeline.stage_init(layout)
t2 = time.perf_counter()
if cuda:
    torch.cuda.reset_peak_memory_stats()
train = pipeline.stage_train(layout, callbacks=[steps])
t3 = time.perf_counter()

clean = [r for r in steps.rows[WARMUP:] if not r["dirty"]]
secs, toks = sum(r["seconds"] for r in clean), sum(r["tokens"] for r in clean)
flop_per_tok = 4 * steps.counts["n_linear"] + 6 * steps.counts["n_adapter"]
peak = json.loads(peak_json.read_text())["matmul_bf16"]["tflops"] if peak_json.is_file() else None
steady_tps = toks / secs if secs else float("nan")
stage_tps = train["tokens_per_second"]
result = {
    "model": str(model_dir), "config": {k: values[k] for k in ("model", "data", "adapter", "train")},
    "prepare": prep, "init": {k: v for k, v in init.items() if k != "orthonormality_error_by_module"},
    "train": train, "stage_seconds": {"prepare": round(t1 - t0, 2), "init": round(t2 - t1, 2), "train": round(t3 - t2, 2)},
    "n_linear": steps.counts["n_linear"], "n_adapter": steps.counts["n_adapter"], "flops_per_token": flop_per_tok,
    "steady": {"steps": len(clean), "warmup_steps_left_out": WARMUP,
               "left_out_for_eval_or_save": sum(r["dirty"] for r in steps.rows[WARMUP:]),
               "tokens": toks, "seconds": round(secs, 3), "tokens_per_second": round(steady_tps, 1),
               "median_step_seconds": round(statistics.median(r["seconds"] for r in clean), 4) if clean else None,
               "model_tflops": round(flop_per_tok * steady_tps / 1e12, 2)},
    "stage_model_tflops": round(flop_per_tok * stage_tps / 1e12, 2),
    "matmul_bf16_peak_tflops": peak,
    "step_rows": [{**r, "seconds": round(r["seconds"], 4)} for r in steps.rows],
}
if peak:
    result["steady"]["mfu"] = round(result["steady"]["model_tflops"] / peak, 4)
    result["stage_mfu"] = round(result["stage_model_tflops"] / peak, 4)
out_json.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps({k: result[k] for k in ("train", "stage_seconds", "steady", "stage_model_tflops", "matmul_bf16_peak_tflops")}
                 | {"stage_mfu": result.get("stage_mfu")}, indent=2))
