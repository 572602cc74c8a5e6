#!/usr/bin/env bash
# Session 7: the tiled f32 attention backward. Every CUDA op test, then f32 and bf16 attention
# from `bench ops` and SDPA (f32: its memory-efficient backend) in the same call, twice.
set -uo pipefail
R=/tmp/s7f32
source scripts/gpu/device-setup.sh
./.gpu/ops cuda --test-threads 1 2>&1 | grep -E "^test |test result|panicked|max rel" > "$R/ops_tests.log"
tail -1 "$R/ops_tests.log"; grep -E "FAILED|panicked|max rel" "$R/ops_tests.log"
LORAFUSE_ATTENTION_KERNEL=simple ./.gpu/ops attention --test-threads 1 2>&1 | grep -E "test result|panicked" > "$R/ops_tests_simple.log"
cat "$R/ops_tests_simple.log"
for round in 1 2; do
  ./.gpu/lorafuse bench ops --device cuda --dtypes f32,bf16 --only attention --fused-only \
    --json "$R/ours$round.json" > "$R/ours$round.log" 2>&1
  grep -E "lorafuse " "$R/ours$round.log" | sed "s/^/ours$round: /"
  python3 scripts/gpu/session6-sdpa.py | tee -a "$R/sdpa.jsonl"
done
tar czf "$OUT/s7f32.tgz" -C "$R" .
