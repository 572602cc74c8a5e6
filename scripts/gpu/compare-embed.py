"""On the GPU machine: sentence-transformers (f32, CUDA) against our `lorafuse embed --json` output
for the same folder and texts. Usage: python3 compare-embed.py MODEL_DIR TEXTS_JSONL OURS_JSON..."""
import json, sys
import torch
from sentence_transformers import SentenceTransformer

model, texts_path, ours = sys.argv[1], sys.argv[2], sys.argv[3:]
texts = [json.loads(l)["text"] for l in open(texts_path) if l.strip()]
ref = torch.tensor(SentenceTransformer(model, device="cuda").encode(texts, batch_size=8))
for path in ours:
    got = torch.tensor(json.load(open(path))["embeddings"])
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=1)
    print(json.dumps({"ours": path, "min_cosine": cos.min().item(), "max_abs_diff": (got - ref).abs().max().item(), "n": len(texts)}), flush=True)
