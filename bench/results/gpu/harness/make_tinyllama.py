"""Build the TinyLlama-1.1B-shaped model with random weights on the GPU (bf16) and save it as a model folder."""
import shutil, sys, time
from pathlib import Path
import torch
from transformers import AutoConfig, LlamaForCausalLM

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
layers = int(sys.argv[3]) if len(sys.argv) > 3 else 0
t = time.perf_counter()
cfg = AutoConfig.from_pretrained(src)
if layers:  # CPU rehearsal only
    cfg.num_hidden_layers = layers
torch.manual_seed(0)
dev = "cuda" if torch.cuda.is_available() else "cpu"
with torch.device(dev):
    model = LlamaForCausalLM(cfg)
model = model.to(torch.bfloat16)
n = sum(p.numel() for p in model.parameters())
model.save_pretrained(dst)
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(src / f, dst / f)
print(f"TinyLlama-shaped model: {n / 1e9:.3f} B parameters, {cfg.num_hidden_layers} layers, saved bf16 to {dst} "
      f"in {time.perf_counter() - t:.1f} s")
