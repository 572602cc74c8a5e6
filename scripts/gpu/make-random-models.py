"""On the GPU machine: random-weight model folders with the peers' shapes, so that our benchmarks
run on exactly what ../shared/bench/peers_train.py and peers_infer.py time (speed depends on shapes,
not values). Usage: python3 make-random-models.py OUT_DIR BENCH_DIR
  OUT_DIR/qwen05b   Qwen2.5-0.5B-shaped decoder (bf16 safetensors, SmolLM2's tokenizer.json: ids fit)
  OUT_DIR/minilm    all-MiniLM-L6-v2-shaped sentence-transformers folder (random BERT weights)
  OUT_DIR/smollm2   SmolLM2-135M-shaped decoder (bf16, the config and tokenizer of BENCH_DIR), for decode timing"""
import json
import os, shutil, sys
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

out, bench = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
q = os.path.join(out, "qwen05b")
cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                  tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1e6)
Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(q)
shutil.copy(os.path.join(bench, "smollm2-tokenizer", "tokenizer.json"), q)
m = os.path.join(out, "minilm")
shutil.copytree(os.path.join(bench, "minilm-meta"), m, dirs_exist_ok=True)
BertModel(BertConfig.from_pretrained(m)).save_pretrained(m)
s = os.path.join(out, "smollm2")
scfg = json.load(open(os.path.join(bench, "smollm2-135m-config.json")))
scfg.pop("rope_parameters", None); scfg["rope_theta"] = 100000.0
LlamaForCausalLM(LlamaConfig(**scfg)).to(torch.bfloat16).save_pretrained(s)
shutil.copy(os.path.join(bench, "smollm2-tokenizer", "tokenizer.json"), s)
print("made", q, m, s, flush=True)
