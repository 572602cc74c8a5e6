#!/usr/bin/env bash
# Last check of the session on the committed kernels: the CUDA op tests (fused decode included)
# and the row ops' timings, to confirm that a host-side refactor left the launches as measured.
# Staged: .gpu/{lorafuse.gz,ops.gz,device-env.sh}.
set -uo pipefail
OUT=${OUT:-/tmp/out}
R=/tmp/check5
mkdir -p "$OUT" "$R"
source .gpu/device-env.sh > "$R/device.txt"
cat "$R/device.txt"
for f in .gpu/*.gz; do gunzip -kf "$f" && chmod +x "${f%.gz}"; done
./.gpu/ops cuda --test-threads 1 2>&1 | grep -E "^test |test result|panicked" > "$R/ops_tests.log"
tail -1 "$R/ops_tests.log"; grep FAILED "$R/ops_tests.log"
for op in norm softmax; do
  ./.gpu/lorafuse bench ops --device cuda --dtypes bf16,f32 --only $op --fused-only \
    --json "$R/$op.json" > "$R/$op.log" 2>&1
done
grep -hE "lorafuse .*(16384x|4096x4096)" "$R"/norm.log "$R"/softmax.log | grep -v "+bwd"
tar czf "$OUT/check5.tgz" -C "$R" .
