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
import importlib.util
import json
import os
import sys

_spec = importlib.util.spec_from_file_location(
    "ops_table", os.path.join(os.path.dirname(os.path.abspath(__file__)), "ops-table.py"))
ops_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ops_table)

base = sys.argv[1] if len(sys.argv) > 1 else "bench-results/2026-11-26-h200-session5"

ours = json.load(open(f"{base}/call6/ops.json"))
# The bf16 softmax rows below 32000 columns: the persistent form off (the kernel now taken).
off = {ops_table.key(r): r for r in json.load(open(f"{base}/call6/rows_off_softmax.json"))
       if r["impl"] == "lorafuse"}
ours = [off.get(ops_table.key(r), r)
        if r["impl"] == "lorafuse" and r["op"] == "softmax" and r["dtype"] == "bf16"
        and "32000" not in r["shape"] else r
        for r in ours]
peers = [r for r in json.load(open(f"{base}/call8/peers_ops_torch_compile_liger_mlx_bwd.json"))
         if not (r["impl"] == "mlx-cuda" and r["dtype"] == "f32")]
peers += [r for r in json.load(open(f"{base}/call8/peers_ops_mlx.json")) if r["dtype"] == "f32"]
print("\n".join(ops_table.table(ours, peers)))
