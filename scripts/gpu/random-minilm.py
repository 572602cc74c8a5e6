"""On the GPU machine: an all-MiniLM-L6-v2-shaped sentence-transformers folder with seeded random
weights (BERT's N(0, 0.02) init, LayerNorm gains 1 and biases 0), built from the real folder's
config and tokenizer (which travel; the real weights are 91 MB, over a call's carry limit).
Speed does not depend on the weights' values, and parity is checked against sentence-transformers
running these same weights.
Usage: python3 random-minilm.py SRC_DIR_WITHOUT_WEIGHTS OUT_DIR"""
import shutil, sys
import torch
from transformers import BertConfig, BertModel

src, out = sys.argv[1], sys.argv[2]
shutil.copytree(src, out, dirs_exist_ok=True)
torch.manual_seed(0)
model = BertModel(BertConfig.from_pretrained(src))  # transformers' init: normal(0, 0.02)
model.save_pretrained(out, safe_serialization=True)
print(f"random MiniLM in {out}: {sum(p.numel() for p in model.parameters())} parameters")
