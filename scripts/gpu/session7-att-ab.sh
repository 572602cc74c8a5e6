#!/usr/bin/env bash
# Session 7: the attention changes from the first PC-sampling run (the forward's row maxima as
# trees with the shuffles of all rows together; the backward's dQ lane swaps all before the
# vector reductions) against the build before them (.gpu-ab/lorafuse-base.gz), alternating,
# with SDPA in the same call; then the CUDA op tests and PC sampling of the new kernels.
# (R=/tmp/DIR sets the results folder; session7-att-ab2.sh reuses it.)
set -uo pipefail
R=${R:-/tmp/s7ab}
source scripts/gpu/device-setup.sh
gunzip -kf .gpu-ab/lorafuse-base.gz && chmod +x .gpu-ab/lorafuse-base
./.gpu/ops attention --test-threads 1 2>&1 | grep -E "^test |test result|panicked|max rel" > "$R/ops_tests_att.log"
tail -1 "$R/ops_tests_att.log"; grep -E "FAILED|panicked" "$R/ops_tests_att.log"
for round in 1 2 3; do
  for which in base new; do
    bin=./.gpu/lorafuse; [ $which = base ] && bin=./.gpu-ab/lorafuse-base
    $bin bench ops --device cuda --dtypes bf16 --only attention --fused-only \
      --json "$R/${which}$round.json" > "$R/${which}$round.log" 2>&1
    grep -E "lorafuse " "$R/${which}$round.log" | sed "s/^/${which}$round: /"
  done
done
python3 scripts/gpu/session6-sdpa.py | tee "$R/sdpa.jsonl"
PCSAMP_KERNEL=attention_ timeout 240 bash scripts/gpu/pcsamp/run.sh "$R/pcs-att" -- \
  ./.gpu/lorafuse bench ops --device cuda --dtypes bf16 --only attention --fused-only > "$R/pcs-att.log" 2>&1
tail -3 "$R/pcs-att.log"
./.gpu/ops cuda --test-threads 1 2>&1 | grep -E "^test |test result|panicked|max rel" > "$R/ops_tests.log"
tail -1 "$R/ops_tests.log"; grep -E "FAILED|panicked" "$R/ops_tests.log"
tar czf "$OUT/$(basename "$R").tgz" -C "$R" .
