#!/usr/bin/env bash
# The final op table of the session, first call: the CUDA op tests, our `bench ops` (fused and
# stock Candle), the row kernels with their persistent form turned off (the A/B), and f32 LoRA
# and base GEMM with TF32 allowed. Leaves the executables in /tmp/keep for
# `session5-table.sh mlx-part` and `session5-table.sh peers`, run right after while the machine
# is warm. Staged: .gpu/{lorafuse.gz,ops.gz,device-env.sh,bench/,liger*.whl}.
set -uo pipefail
OUT=${OUT:-/tmp/out}
R=/tmp/final
mkdir -p "$OUT" "$R" /tmp/keep
source .gpu/device-env.sh > "$R/device.txt"
cat "$R/device.txt"
for f in .gpu/*.gz; do gunzip -kf "$f" && chmod +x "${f%.gz}"; done
cp -r .gpu/lorafuse .gpu/device-env.sh .gpu/bench .gpu/*.whl /tmp/keep/
./.gpu/ops cuda --test-threads 1 2>&1 | grep -E "^test |test result|panicked|Error" > "$R/ops_tests.log"
tail -1 "$R/ops_tests.log"; grep FAILED "$R/ops_tests.log"
./.gpu/ops fused_decode --test-threads 1 --nocapture 2>&1 \
  | grep -E "fused decode|test result|panicked" > "$R/fused_decode.log"
tail -1 "$R/fused_decode.log"
./.gpu/lorafuse bench ops --device cuda --dtypes f32,bf16 --json "$R/ops.json" > "$R/ops.log" 2>&1
tail -1 "$R/ops.log"
for op in norm softmax; do
  LORAFUSE_ROWS_PERSISTENT=0 ./.gpu/lorafuse bench ops --device cuda --dtypes bf16,f32 --only $op \
    --fused-only --json "$R/rows_off_$op.json" > "$R/rows_off_$op.log" 2>&1
done
for op in lora_full base_gemm; do
  LORAFUSE_TF32=1 ./.gpu/lorafuse bench ops --device cuda --dtypes f32 --only $op --fused-only \
    --json "$R/tf32_$op.json" > "$R/tf32_$op.log" 2>&1
done
tar czf "$OUT/final.tgz" -C "$R" .
