"""The session-7 op tables in BENCHMARKS.md, from that GPU session's raw files (one H100).

Usage: python3 scripts/gpu/session7-ops-table.py [bench-results/2026-11-26-h100-session7]

- Ours: call6-table-ours/ours/ops.json (`bench ops`, fused and stock Candle, f32 and bf16).
- Peers: call8-table-peers (torch eager, torch.compile, Liger, MLX on CUDA; forward and backward),
  with MLX's f32 rows from its MLX_ENABLE_TF32=0 run (peers_ops_mlx.json): MLX runs f32 matmuls as
  TF32 by default, which is compared separately with our LORAFUSE_TF32=1 figures (the last table).
"""
import importlib.util
import json
import os
import sys

_spec = importlib.util.spec_from_file_location(
    "ops_table", os.path.join(os.path.dirname(os.path.abspath(__file__)), "ops-table.py"))
ops_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ops_table)

base = sys.argv[1] if len(sys.argv) > 1 else "bench-results/2026-11-26-h100-session7"
ours_dir = f"{base}/call6-table-ours/ours"
peers_dir = f"{base}/call8-table-peers"
ours = json.load(open(f"{ours_dir}/ops.json"))
main = json.load(open(f"{peers_dir}/peers_ops_torch_compile_liger_mlx_bwd.json"))
peers = [r for r in main if not (r["impl"] == "mlx-cuda" and r["dtype"] == "f32")]
peers += [r for r in json.load(open(f"{peers_dir}/peers_ops_mlx.json")) if r["dtype"] == "f32"]
for dt in ("bf16", "f32"):
    print(f"\n#### Fused ops, {dt}\n")
    lines = ops_table.table([r for r in ours if r["dtype"] == dt],
                            [r for r in peers if r["dtype"] == dt])
    print("\n".join(lines))

print("\n#### LoRA full layer and base GEMM, f32 with TF32 on both sides (MLX's default)\n")
tf32 = {ops_table.key(r): r["us"]
        for f in ("tf32_lora_full.json", "tf32_base_gemm.json")
        for r in json.load(open(f"{ours_dir}/{f}")) if r["impl"] == "lorafuse"}
mlx_tf32 = {ops_table.key(r): r["us"] for r in main
            if r["impl"] == "mlx-cuda" and r["dtype"] == "f32"}
print("| op | shape | lorafuse TF32 (us) | MLX TF32 (us) | MLX/ours |")
print("|---|---|---:|---:|---:|")
for k in sorted(tf32):
    m = mlx_tf32.get(k)
    ratio = f"{m / tf32[k]:.2f}x" if m else "-"
    print(f"| {k[0]} | {k[2]} | {tf32[k]:.1f} | {'-' if m is None else f'{m:.1f}'} | {ratio} |")

print("\n#### Rows behind their best peer\n")
fused = {ops_table.key(r): r["us"] for r in ours if r["impl"] == "lorafuse"}
best = {}
for r in peers:
    k = ops_table.key(r)
    if k not in best or r["us"] < best[k][0]:
        best[k] = (r["us"], r["impl"])
for k in sorted(fused, key=lambda k: (k[1], k[0], k[2])):
    if k in best and best[k][0] < fused[k]:
        print(f"- {k[0]} {k[1]} {k[2]}: {fused[k]:.1f} against {best[k][0]:.1f} ({best[k][1]}), "
              f"{best[k][0] / fused[k]:.2f}x")
