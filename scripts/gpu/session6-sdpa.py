"""SDPA (flash for bf16, its default f32 backend) at the attention bench shapes, in the same call as
ours: batch 4, 14 query heads, 2 KV heads, head dim 64, T = 512 and 2048; JSON lines of us."""
import sys, json
sys.path.insert(0, ".gpu/bench")
import torch, torch.nn.functional as F
from peers_ops import ev_time
for dt, tdt in (("bf16", torch.bfloat16), ("f32", torch.float32)):
    for T in (512, 2048):
        q = torch.randn(4, 14, T, 64, device="cuda", dtype=tdt, requires_grad=True)
        k = torch.randn(4, 2, T, 64, device="cuda", dtype=tdt, requires_grad=True)
        v = torch.randn(4, 2, T, 64, device="cuda", dtype=tdt, requires_grad=True)
        gy = torch.randn(4, 14, T, 64, device="cuda", dtype=tdt)
        att = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        def fb():
            att().backward(gy)
        print(json.dumps({"dtype": dt, "T": T, "fwd_us": ev_time(att, iters=200),
                          "fwd_bwd_us": ev_time(fb, iters=100)}))
