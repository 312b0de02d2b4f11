"""Local, once: the TinyLlama-1.1B-shaped config and a 32,000-token tokenizer (SmolLM2's BPE cut to its first
32,000 ids and the merges among them), so that token ids fit TinyLlama's vocab of 32,000."""
import json, shutil, sys
from pathlib import Path

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
tok = json.loads((src / "tokenizer.json").read_text())
V = 32000
vocab = {k: v for k, v in tok["model"]["vocab"].items() if v < V}
merges = [m for m in tok["model"]["merges"] if m[0] in vocab and m[1] in vocab and (m[0] + m[1]) in vocab]
tok["model"]["vocab"], tok["model"]["merges"] = vocab, merges
assert all(a["id"] < V for a in tok["added_tokens"])
(dst / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
shutil.copy(src / "tokenizer_config.json", dst / "tokenizer_config.json")
from transformers import LlamaConfig, AutoTokenizer
t = AutoTokenizer.from_pretrained(dst)
cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                  num_key_value_heads=4, vocab_size=V, max_position_embeddings=2048, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id,
                  pad_token_id=t.pad_token_id)
cfg.save_pretrained(dst)
print(len(vocab), len(merges), len(t), t("Hello world, the capital of France is Paris.")["input_ids"])
