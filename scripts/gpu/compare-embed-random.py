"""On the GPU machine: our `lorafuse embed --json` outputs (CPU f32 first, then CUDA runs) for the
fixture's texts on a random-weight MiniLM folder, against each other and against
sentence-transformers on this GPU in f32 with the same weights. One JSON line per output.
Usage: python3 compare-embed-random.py MODEL_DIR OURS_CPU_JSON OURS_JSON..."""
import json, sys
import torch
from sentence_transformers import SentenceTransformer

FIXTURE = "crates/lorafuse/tests/fixtures/minilm_reference.json"
texts = [c["text"] for c in json.load(open(FIXTURE))["cases"]]
st = SentenceTransformer(sys.argv[1], device="cuda")
live = torch.tensor(st.encode(texts, batch_size=8), dtype=torch.float64)
cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=1)
load = lambda p: torch.tensor(json.load(open(p))["embeddings"], dtype=torch.float64)
cpu = load(sys.argv[2])
for path in sys.argv[2:]:
    got = load(path)
    print(json.dumps({"ours": path, "n": len(texts),
                      "min_cosine_vs_st_cuda_f32": cos(got, live).min().item(),
                      "min_cosine_vs_ours_cpu_f32": cos(got, cpu).min().item(),
                      "max_abs_diff_vs_st_cuda_f32": (got - live).abs().max().item()}), flush=True)
