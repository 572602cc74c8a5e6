#!/usr/bin/env bash
# Session 6: the committed attention kernels (launch order, unrolled tile loads, the two-row-tile
# forward for large grids, fast exp2 in the backward). Every CUDA op test, then attention timed
# beside SDPA (flash backend) in the same call, twice, alternating.
# Staged: .gpu/{lorafuse.gz,ops.gz,device-env.sh,bench/}.
set -uo pipefail
R=/tmp/s6final
source scripts/gpu/device-setup.sh
./.gpu/ops cuda --test-threads 1 2>&1 | grep -E "^test |test result|panicked" > "$R/ops_tests.log"
tail -1 "$R/ops_tests.log"; grep -E "FAILED|panicked" "$R/ops_tests.log"
for round in 1 2; do
  ./.gpu/lorafuse bench ops --device cuda --dtypes bf16,f32 --only attention --fused-only \
    --json "$R/ours$round.json" > "$R/ours$round.log" 2>&1
  grep -E "lorafuse " "$R/ours$round.log" | sed "s/^/ours$round: /"
  python3 scripts/gpu/session6-sdpa.py | tee -a "$R/sdpa.jsonl"
done
tar czf "$OUT/s6final.tgz" -C "$R" .
