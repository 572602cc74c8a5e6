"""Liger and torch eager at the bf16 norm forwards behind Liger in the session-7 table
(16384x4096 and 16384x32000), in the same call as ours; JSON lines of us."""
import sys, json
sys.path.insert(0, ".gpu/bench")
import torch, torch.nn.functional as F
from peers_ops import ev_time
from liger_kernel.ops.rms_norm import LigerRMSNormFunction
from liger_kernel.ops.layer_norm import LigerLayerNormFunction
for r, c in ((16384, 4096), (16384, 32000)):
    x = torch.randn(r, c, device="cuda", dtype=torch.bfloat16)
    g = torch.ones(c, device="cuda", dtype=torch.bfloat16)
    b = torch.zeros(c, device="cuda", dtype=torch.bfloat16)
    rows = {
        "liger rms_norm": lambda: LigerRMSNormFunction.apply(x, g, 1e-5),
        "liger layer_norm": lambda: LigerLayerNormFunction.apply(x, g, b, 1e-5),
        "torch rms_norm": lambda: F.rms_norm(x, (c,), g, 1e-5),
    }
    for name, fn in rows.items():
        print(json.dumps({"impl": name, "shape": f"{r}x{c}", "us": round(ev_time(fn, iters=300), 2)}))
