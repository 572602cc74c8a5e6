"""Joins `lorafuse bench ops --json` with peers_ops.py's JSON (same GPU session) into a markdown
table: our fused time, stock Candle (reference), the best peer and who, and best peer / ours.
Usage: python3 ops-table.py OURS.json PEERS.json [PEERS.json ...]
`table` is also imported by scripts that adjust the rows first (session5-ops-table.py)."""
import json, sys


def key(r):
    return (r["op"], r["dtype"], r["shape"])


def table(ours, peers):
    """The markdown lines: `ours` are `bench ops` rows, `peers` peers_ops.py rows."""
    fused = {key(r): r["us"] for r in ours if r["impl"] == "lorafuse"}
    ref = {key(r): r["us"] for r in ours if r["impl"] == "candle-reference"}
    best = {}
    for r in peers:
        k = key(r)
        if k not in best or r["us"] < best[k][0]:
            best[k] = (r["us"], r["impl"])
    lines = ["| op | dtype | shape | lorafuse (us) | stock Candle (us) | best peer (us, who) | peer/ours |",
             "|---|---|---|---:|---:|---|---:|"]
    for k in sorted(fused, key=lambda k: (k[1], k[0], k[2])):
        us = fused[k]
        r = ref.get(k)
        b = best.get(k)
        peer = f"{b[0]:.1f} ({b[1]})" if b else "-"
        ratio = f"{b[0] / us:.2f}x" if b else "-"
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {us:.1f} | {'-' if r is None else f'{r:.1f}'} | {peer} | {ratio} |")
    return lines


if __name__ == "__main__":
    ours = json.load(open(sys.argv[1]))
    peers = [r for p in sys.argv[2:] for r in json.load(open(p))]
    print("\n".join(table(ours, peers)))
