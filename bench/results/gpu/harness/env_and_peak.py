"""Versions, the card, and the measured bf16 matmul peak (CUDA events, median of timed products on random data)."""
import json, sys, time, importlib.metadata as md
import torch

out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda_runtime": torch.version.cuda}
for pkg in ["transformers", "peft", "accelerate", "datasets", "tokenizers", "huggingface_hub", "safetensors",
            "bitsandbytes", "pyarrow", "numpy", "pytest"]:
    try:
        out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
        out[pkg] = None
import transformers, peft, datasets  # the imported copies (the carried ones must win)
out["paths"] = {m.__name__: m.__file__ for m in (transformers, peft, datasets)}
dev = "cuda" if torch.cuda.is_available() else "cpu"
size = int(sys.argv[2]) if len(sys.argv) > 2 else 8192
if dev == "cuda":
    p = torch.cuda.get_device_properties(0)
    out.update(device=torch.cuda.get_device_name(), sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
dt = torch.bfloat16
rows = []
for trial in range(2):
    a = [torch.randn(size, size, device=dev, dtype=dt) for _ in range(3)]
    b = [torch.randn(size, size, device=dev, dtype=dt) for _ in range(3)]
    for i in range(3):
        a[i] @ b[i]
    times = []
    for i in range(20 if dev == "cuda" else 2):
        if dev == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(); a[i % 3] @ b[i % 3]; e.record(); torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t = time.perf_counter(); a[i % 3] @ b[i % 3]; times.append(time.perf_counter() - t)
    times.sort()
    rows.append(2 * size**3 / times[len(times) // 2] / 1e12)
out["matmul_bf16"] = {"size": size, "tflops_median_per_trial": [round(x, 1) for x in rows], "tflops": round(max(rows), 1)}
json.dump(out, open(sys.argv[1], "w"), indent=2)
print(json.dumps(out, indent=2))
