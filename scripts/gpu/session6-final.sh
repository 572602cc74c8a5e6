#!/usr/bin/env bash
# Session 6: the committed attention kernels (launch order, unrolled tile loads, the two-row-tile
# forward for large grids, fast exp2 in the backward). Every CUDA op test, then attention timed
# beside SDPA (flash backend) in the same call, twice, alternating.
# Staged: .gpu/{lorafuse.gz,ops.gz,device-env.sh,bench/}.
set -uo pipefail
OUT=${OUT:-/tmp/out}
R=/tmp/s6final
mkdir -p "$OUT" "$R"
source .gpu/device-env.sh > "$R/device.txt"
cat "$R/device.txt"
for f in .gpu/*.gz; do gunzip -kf "$f" && chmod +x "${f%.gz}"; done
./.gpu/ops cuda --test-threads 1 2>&1 | grep -E "^test |test result|panicked" > "$R/ops_tests.log"
tail -1 "$R/ops_tests.log"; grep -E "FAILED|panicked" "$R/ops_tests.log"
cat > "$R/sdpa.py" <<'PY'
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
PY
for round in 1 2; do
  ./.gpu/lorafuse bench ops --device cuda --dtypes bf16,f32 --only attention --fused-only \
    --json "$R/ours$round.json" > "$R/ours$round.log" 2>&1
  grep -E "lorafuse " "$R/ours$round.log" | sed "s/^/ours$round: /"
  python3 "$R/sdpa.py" | tee -a "$R/sdpa.jsonl"
done
tar czf "$OUT/s6final.tgz" -C "$R" .
