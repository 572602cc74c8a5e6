"""The sentence-transformers half of ../shared/bench/peers_infer.py on the real all-MiniLM-L6-v2 weights, with
the same documents, batch sizes and timing as benches/embed.rs (warm-up, then at least `--min-reps` passes and
200 documents). Prints one JSON line per size.

Usage: python crates/lorafuse-cli/benches/embed_peer.py [--model DIR] [--cpu] [--repeat R] [--threads N]
"""

import argparse
import json
import os
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

ap = argparse.ArgumentParser()
ap.add_argument("--model", default=os.path.join(ROOT, "models", "all-MiniLM-L6-v2"))
ap.add_argument("--cpu", action="store_true")
ap.add_argument("--repeat", type=int, default=1)
ap.add_argument("--sizes", default="1,32,1000")
ap.add_argument("--min-reps", type=int, default=3)
ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
args = ap.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

dev = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
dt = torch.float32 if dev == "cpu" else torch.bfloat16
st = SentenceTransformer(args.model, device=dev)
if dev == "cuda":
    st = st.to(dtype=dt)


def sync():
    if dev == "cuda":
        torch.cuda.synchronize()


doc = "Low-rank adaptation freezes the pretrained weights and trains small matrices in each layer, which makes fine-tuning cheap. "
docs = [doc * args.repeat + str(i) for i in range(1000)]
tokens = len(st.tokenizer(docs[0])["input_ids"])
for n in [int(s) for s in args.sizes.split(",")]:
    bs = min(n, 256)
    st.encode(docs[:n], batch_size=bs)
    sync()
    reps = max(args.min_reps, 200 // n)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        st.encode(docs[:n], batch_size=bs)
        sync()
        times.append(time.perf_counter() - t)
    mean = sum(times) / reps
    r = dict(impl="sentence-transformers", model="all-MiniLM-L6-v2", device=dev, dtype=str(dt), docs=n,
             tokens_per_doc=tokens, reps=reps, threads=torch.get_num_threads(), ms=round(mean * 1000, 2),
             best_ms=round(min(times) * 1000, 2), docs_per_s=round(n / mean, 1))
    print(json.dumps(r), flush=True)
