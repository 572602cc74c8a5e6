#!/usr/bin/env bash
# A record of calls 1-4 (bench-results/2026-11-26-h200-session6/call1..4), run on diagnostic
# builds: the LORAFUSE_ATT_FWD / LORAFUSE_ATT_BWD variants it names existed only in those builds
# (what was adopted is in attention.cu; the rest was removed). Each call's edits are listed below.
# Session 6, call 1: the attention launch order (heads in x, tiles in y) against the previous
# binary, diagnostic forward/backward variants (8 warps, 128-key tiles; the backward without its
# dQ atomics or without dQ), SDPA in the same call, and the Triton PTX of Liger's norm forwards.
# Call 2: the double-buffered forward (s2, s2b: 4 or 3 blocks an SM), 8-warp forms, the
# one-barrier backward (p, p2: 3 or 2 blocks an SM).
# Call 4: whole-tile fast path in load_tile. Call 3: load_tile unrolled (all variants), two 16-row tiles a warp (m2, m2s2, w2m2).
# Staged: .gpu/{lorafuse.gz,ops.gz,liger wheel,device-env.sh,bench/}.
set -uo pipefail
R=/tmp/s6att4
source scripts/gpu/device-setup.sh
# correctness of every variant that could be adopted
for v in "" s2 w8 m2 m2s2 w2m2; do
  LORAFUSE_ATT_FWD=$v ./.gpu/ops attention --test-threads 1 2>&1 | grep -E "^test |test result|panicked" > "$R/tests_fwd_$v.log"
  echo "fwd variant '$v': $(tail -1 "$R/tests_fwd_$v.log")"
done
for v in; do
  LORAFUSE_ATT_BWD=$v ./.gpu/ops attention --test-threads 1 2>&1 | grep -E "^test |test result|panicked" > "$R/tests_bwd_$v.log"
  echo "bwd variant '$v': $(tail -1 "$R/tests_bwd_$v.log")"
done
b() {  # label, binary, env...
  local label=$1 bin=$2; shift 2
  env "$@" "$bin" bench ops --device cuda --dtypes bf16 --only attention --fused-only \
    --json "$R/$label.json" > "$R/$label.log" 2>&1
  grep -E "lorafuse " "$R/$label.log" | sed "s/^/$label: /"
}
for round in 1 2; do
  b new$round ./.gpu/lorafuse
  for v in s2 w8 m2 m2s2 w2m2; do b ${v}_$round ./.gpu/lorafuse LORAFUSE_ATT_FWD=$v; done

done
cat > "$R/sdpa.py" <<'PY'
import sys, json
sys.path.insert(0, ".gpu/bench")
import torch, torch.nn.functional as F
from peers_ops import ev_time
for T in (512, 2048):
    q = torch.randn(4, 14, T, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(4, 2, T, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(4, 2, T, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(4, 14, T, 64, device="cuda", dtype=torch.bfloat16)
    att = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    def fb():
        att().backward(gy)
    print(json.dumps({"T": T, "fwd_us": ev_time(att, iters=200), "fwd_bwd_us": ev_time(fb, iters=100)}))
PY
for round in 1 2; do python3 "$R/sdpa.py" | tee -a "$R/sdpa.jsonl"; done
tar czf "$OUT/s6att4.tgz" -C "$R" .
