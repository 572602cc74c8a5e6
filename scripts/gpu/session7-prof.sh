#!/usr/bin/env bash
# Session 7: the first CUPTI PC-sampling run (scripts/gpu/pcsamp/): the tool's self-test, the
# CUDA op tests, then stall-reason samples of the bf16 attention kernels and the bf16 RMSNorm
# forward (the two rows furthest behind their peers).
set -uo pipefail
R=/tmp/s7prof
source scripts/gpu/device-setup.sh
./.gpu/ops cuda --test-threads 1 2>&1 | grep -E "^test |test result|panicked|max rel" > "$R/ops_tests.log"
tail -1 "$R/ops_tests.log"; grep -E "FAILED|panicked" "$R/ops_tests.log"
timeout 120 bash scripts/gpu/pcsamp/run.sh "$R/pcs-self" selftest 300 > "$R/pcs-self.log" 2>&1
tail -5 "$R/pcs-self.log"
PCSAMP_KERNEL=attention_ timeout 240 bash scripts/gpu/pcsamp/run.sh "$R/pcs-att" -- \
  ./.gpu/lorafuse bench ops --device cuda --dtypes bf16 --only attention --fused-only > "$R/pcs-att.log" 2>&1
tail -5 "$R/pcs-att.log"
PCSAMP_KERNEL=rms_norm timeout 120 bash scripts/gpu/pcsamp/run.sh "$R/pcs-rms" -- \
  ./.gpu/lorafuse bench ops --device cuda --dtypes bf16 --only rms_norm --fused-only > "$R/pcs-rms.log" 2>&1
tail -5 "$R/pcs-rms.log"
tar czf "$OUT/s7prof.tgz" -C "$R" .
