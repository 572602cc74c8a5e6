"""Side-by-side tables of the tuning sweeps that scripts/gpu/session5-sweep.sh writes.

Usage: python3 sweep-table.py OUT_DIR
Prints one row per (op, dtype, shape) with the time (us) under each config, then the LoRA full
layer under each chunk size beside the base GEMM alone, with the ratio.
"""
import glob
import json
import os
import sys


def load(path):
    with open(path) as f:
        return {(r["op"], r["dtype"], r["shape"]): r["us"] for r in json.load(f) if r["impl"] == "lorafuse"}


def main(out):
    norm = {os.path.basename(p)[5:-5]: load(p) for p in sorted(glob.glob(f"{out}/norm_*.json"))}
    if norm:
        tags = list(norm)
        keys = sorted(set().union(*[set(v) for v in norm.values()]))
        print("| op | dtype | shape | " + " | ".join(tags) + " |")
        print("|---|---|---|" + "---:|" * len(tags))
        for k in keys:
            cells = [f"{norm[t][k]:.1f}" if k in norm[t] else "-" for t in tags]
            print(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(cells) + " |")
    lora = {}
    for p in glob.glob(f"{out}/lora_chunk*.json"):
        lora[int(os.path.basename(p)[10:-5])] = load(p)
    base = load(f"{out}/base_gemm.json") if os.path.exists(f"{out}/base_gemm.json") else {}
    if lora:
        chunks = sorted(lora)
        print()
        print("| op | shape | base GEMM | " + " | ".join(f"chunk {c}" for c in chunks) + " |")
        print("|---|---|---:|" + "---:|" * len(chunks))
        keys = sorted(set().union(*[set(v) for v in lora.values()]))
        for k in keys:
            bshape = " ".join(k[2].split()[:2])
            bop = "base_gemm+bwd" if k[0].endswith("+bwd") else "base_gemm"
            b = base.get((bop, k[1], bshape))
            cells = []
            for c in chunks:
                v = lora[c].get(k)
                cells.append("-" if v is None else (f"{v:.1f} ({v / b:.2f}x)" if b else f"{v:.1f}"))
            bcell = f"{b:.1f}" if b else "-"
            print(f"| {k[0]} {k[1]} | {k[2]} | {bcell} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
