#!/usr/bin/env bash
# Second sweep of the session (after session5-sweep.sh): the CUDA op tests after the register-fit
# fix, the persistent forward norms (LORAFUSE_ROWS_PERSISTENT=1) against the default, and f32 LoRA
# with TF32 allowed (LORAFUSE_TF32=1), as MLX does by default. Results go into one tarball
# (a run returns at most 8 files). Staged: .gpu/{lorafuse.gz,ops.gz,device-env.sh}.
set -uo pipefail
OUT=${OUT:-/tmp/out}
R=/tmp/sweep2
mkdir -p "$OUT" "$R"
source .gpu/device-env.sh > "$R/device.txt"
cat "$R/device.txt"
for f in .gpu/*.gz; do gunzip -kf "$f" && chmod +x "${f%.gz}"; done
./.gpu/ops cuda --test-threads 1 2>&1 | grep -E "^test |test result|panicked|Error" > "$R/ops_tests.log"
tail -1 "$R/ops_tests.log"; grep FAILED "$R/ops_tests.log"
LORAFUSE_ROWS_PERSISTENT=1 ./.gpu/ops norms --test-threads 1 2>&1 \
  | grep -E "^test |test result|panicked|Error" > "$R/ops_tests_fwd_rows.log"
tail -1 "$R/ops_tests_fwd_rows.log"
B() { # tag, then env assignments
  local tag=$1; shift
  env "$@" ./.gpu/lorafuse bench ops --device cuda --dtypes bf16,f32 --only norm --fused-only \
    --json "$R/norm_$tag.json" > "$R/norm_$tag.log" 2>&1
}
B default LORAFUSE_ROWS_PERSISTENT=0
B fwdrows LORAFUSE_ROWS_PERSISTENT=1
B default_again LORAFUSE_ROWS_PERSISTENT=0
B fwdrows_again LORAFUSE_ROWS_PERSISTENT=1
for tf in 0 1; do
  LORAFUSE_TF32=$tf ./.gpu/lorafuse bench ops --device cuda --dtypes f32 --only lora_full --fused-only \
    --json "$R/lora_f32_tf32_$tf.json" > "$R/lora_f32_tf32_$tf.log" 2>&1
  LORAFUSE_TF32=$tf ./.gpu/lorafuse bench ops --device cuda --dtypes f32 --only base_gemm --fused-only \
    --json "$R/base_f32_tf32_$tf.json" > "$R/base_f32_tf32_$tf.log" 2>&1
done
python3 scripts/gpu/sweep-table.py "$R" | tee "$R/sweep.txt"
for tf in 0 1; do
  python3 - "$R" "$tf" <<'PY'
import json, sys
r, tf = sys.argv[1], sys.argv[2]
rows = json.load(open(f"{r}/lora_f32_tf32_{tf}.json")) + json.load(open(f"{r}/base_f32_tf32_{tf}.json"))
for x in rows:
    if x["impl"] == "lorafuse" and "4096" in x["shape"]:
        print(f"tf32={tf} {x['op']:14s} {x['shape']:22s} {x['us']:10.1f} us")
PY
done | tee "$R/tf32.txt"
tar czf "$OUT/sweep2.tgz" -C "$R" .
