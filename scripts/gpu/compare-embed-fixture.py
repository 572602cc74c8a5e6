"""On the GPU machine: our `lorafuse embed --json` outputs for the texts of the committed
sentence-transformers fixture (crates/lorafuse/tests/fixtures/minilm_reference.json, ST f32 on CPU),
against that fixture and against sentence-transformers run live on this GPU in f32.
Usage: python3 compare-embed-fixture.py texts MODEL_DIR OUT.jsonl        (writes the texts)
       python3 compare-embed-fixture.py compare MODEL_DIR OURS_JSON...   (prints one JSON line each)"""
import json, sys
import torch

FIXTURE = "crates/lorafuse/tests/fixtures/minilm_reference.json"
cases = json.load(open(FIXTURE))["cases"]
texts = [c["text"] for c in cases]
if sys.argv[1] == "texts":
    with open(sys.argv[3], "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    sys.exit(0)
from sentence_transformers import SentenceTransformer
fixture = torch.tensor([c["embedding"] for c in cases], dtype=torch.float64)
live = torch.tensor(SentenceTransformer(sys.argv[2], device="cuda").encode(texts, batch_size=8), dtype=torch.float64)
cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=1)
print(json.dumps({"st_cuda_f32_vs_fixture_min_cosine": cos(live, fixture).min().item()}), flush=True)
for path in sys.argv[3:]:
    got = torch.tensor(json.load(open(path))["embeddings"], dtype=torch.float64)
    print(json.dumps({"ours": path, "n": len(texts),
                      "min_cosine_vs_fixture": cos(got, fixture).min().item(),
                      "min_cosine_vs_st_cuda": cos(got, live).min().item(),
                      "max_abs_diff_vs_fixture": (got - fixture).abs().max().item()}), flush=True)
