"""The session-5 op table in BENCHMARKS.md, from the final GPU session's raw files.

Usage: python3 scripts/gpu/session5-ops-table.py bench-results/2026-11-26-h200-session5

- Ours: call6/ops.json (`bench ops`, fused and stock Candle). The bf16 softmax rows narrower than
  512-thread blocks come from call6/rows_off_softmax.json instead (same call, persistent form
  off): after this session the code takes the persistent softmax only for long rows, so those
  rows are the kernel it now runs.
- Peers: call8 (torch eager, torch.compile, Liger, MLX on CUDA; forward and backward), with MLX's
  f32 rows taken from its MLX_ENABLE_TF32=0 run (call8/peers_ops_mlx.json): MLX runs f32 matmuls
  as TF32 by default, which is compared separately with our LORAFUSE_TF32=1 figures.
"""
import json
import sys

base = sys.argv[1] if len(sys.argv) > 1 else "bench-results/2026-11-26-h200-session5"


def key(r):
    return (r["op"], r["dtype"], r["shape"])


ours_rows = json.load(open(f"{base}/call6/ops.json"))
fused = {key(r): r["us"] for r in ours_rows if r["impl"] == "lorafuse"}
ref = {key(r): r["us"] for r in ours_rows if r["impl"] == "candle-reference"}
for r in json.load(open(f"{base}/call6/rows_off_softmax.json")):
    k = key(r)
    if r["impl"] == "lorafuse" and k[0] == "softmax" and k[1] == "bf16" and "32000" not in k[2]:
        fused[k] = r["us"]
peers = [r for r in json.load(open(f"{base}/call8/peers_ops_torch_compile_liger_mlx_bwd.json"))
         if not (r["impl"] == "mlx-cuda" and r["dtype"] == "f32")]
peers += [r for r in json.load(open(f"{base}/call8/peers_ops_mlx.json")) if r["dtype"] == "f32"]
best = {}
for r in peers:
    k = key(r)
    if k not in best or r["us"] < best[k][0]:
        best[k] = (r["us"], r["impl"])
print("| op | dtype | shape | lorafuse (us) | stock Candle (us) | best peer (us, who) | peer/ours |")
print("|---|---|---|---:|---:|---|---:|")
for k in sorted(fused, key=lambda k: (k[1], k[0], k[2])):
    us = fused[k]
    r = ref.get(k)
    b = best.get(k)
    peer = f"{b[0]:.1f} ({b[1]})" if b else "-"
    ratio = f"{b[0] / us:.2f}x" if b else "-"
    print(f"| {k[0]} | {k[1]} | {k[2]} | {us:.1f} | {'-' if r is None else f'{r:.1f}'} | {peer} | {ratio} |")
