"""PEFT's side of `lorafuse bench train` on the CPU: LoRA training-step throughput of transformers + PEFT on
the real SmolLM2-135M-Instruct (the GGUF file, dequantized to f32), with the same shape and settings as ours:
rank r, alpha 2r, dropout 0, target q/k/v/o/gate/up/down, AdamW lr 1e-4, the same token ids as labels,
warm-up steps, then timed steps. Prints one JSON line.

Usage: python crates/lorafuse-cli/benches/train_peer.py [--model FILE.gguf] [--batch-size 4] [--seq-len 256]
       [--rank 8] [--steps 3] [--warmup 1] [--threads N]
"""

import argparse
import json
import os
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

ap = argparse.ArgumentParser()
ap.add_argument("--model", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
ap.add_argument("--batch-size", type=int, default=4)
ap.add_argument("--seq-len", type=int, default=256)
ap.add_argument("--rank", type=int, default=8)
ap.add_argument("--steps", type=int, default=3)
ap.add_argument("--warmup", type=int, default=1)
ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
args = ap.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

model = AutoModelForCausalLM.from_pretrained(
    os.path.dirname(os.path.abspath(args.model)),
    gguf_file=os.path.basename(args.model),
    torch_dtype=torch.float32,
)
lcfg = LoraConfig(
    r=args.rank,
    lora_alpha=2 * args.rank,
    lora_dropout=0.0,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
)
model = get_peft_model(model, lcfg)
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
vocab = model.config.vocab_size
n = args.batch_size * args.seq_len
# The same ids as bench train: i * 2654435761 mod vocab.
ids = torch.tensor([(i * 2654435761) % vocab for i in range(n)], dtype=torch.long).view(args.batch_size, args.seq_len)


def step():
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(out.loss)


for _ in range(args.warmup):
    step()
t = time.perf_counter()
for _ in range(args.steps):
    loss = step()
dt = time.perf_counter() - t
print(
    json.dumps(
        dict(
            impl="transformers+peft",
            torch=torch.__version__,
            device="cpu",
            dtype="f32",
            threads=torch.get_num_threads(),
            batch=args.batch_size,
            seq=args.seq_len,
            rank=args.rank,
            lora_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
            tokens_per_s=round(n * args.steps / dt, 1),
            step_ms=round(dt / args.steps * 1000, 1),
            loss=loss,
            load_average=open("/proc/loadavg").read().split()[0],
        )
    ),
    flush=True,
)
