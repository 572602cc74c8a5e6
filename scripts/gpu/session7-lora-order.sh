#!/usr/bin/env bash
# Session 7: LoRA layer GEMM order A/B. The low-rank GEMM first (writes y, beta = 0) and the base
# GEMM accumulating onto it (beta = 1), against the old order (LORAFUSE_LORA_BASE_FIRST=1: base
# GEMM, then the low-rank one re-reading and rewriting y). The lora tests first, then three
# alternating rounds of lora_full and base_gemm.
# (Its LORAFUSE_LORA_BASE_FIRST switch was removed after this A/B: the low-rank GEMM now always runs
# first.)
set -uo pipefail
R=/tmp/s7lora
source scripts/gpu/device-setup.sh
./.gpu/ops lora --test-threads 1 2>&1 | grep -E "^test |test result|panicked|max rel" > "$R/ops_tests.log"
tail -1 "$R/ops_tests.log"; grep -E "FAILED|panicked" "$R/ops_tests.log"
for round in 1 2 3; do
  for order in new old; do
    env=""; [ "$order" = old ] && env="LORAFUSE_LORA_BASE_FIRST=1"
    for op in lora_full base_gemm; do
      env $env ./.gpu/lorafuse bench ops --device cuda --dtypes bf16,f32 --only $op --fused-only \
        --json "$R/${order}_${op}_$round.json" > "$R/${order}_${op}_$round.log" 2>&1
      grep -E "lorafuse .*(t=8192|t=2048)" "$R/${order}_${op}_$round.log" | sed "s/^/$order$round: /"
    done
  done
done
tar czf "$OUT/s7lora.tgz" -C "$R" .
