#!/usr/bin/env bash
# Second final session, first call: the CUDA op tests, A/B runs of the two-tile attention forward
# (LORAFUSE_ATTENTION_FWD_MT=1 is the one-tile kernel) and of 8 packs per thread in the row
# kernels (LORAFUSE_ROW_PACKS=8), then our full `bench ops` with the defaults, the persistent
# forwards turned off, and f32 LoRA with TF32. Leaves the executables in /tmp/keep for
# `session5-table.sh mlx-part` and `session5-table.sh peers`, run right after.
# Staged: .gpu/{lorafuse.gz,ops.gz,device-env.sh,bench/,liger*.whl}.
# Kept as the record of call 9. The two A/B switches it sets (LORAFUSE_ATTENTION_FWD_MT and
# LORAFUSE_ROW_PACKS=8) were removed afterwards: neither variant was faster (call9/ab.txt).
set -uo pipefail
OUT=${OUT:-/tmp/out}
R=/tmp/final2
mkdir -p "$OUT" "$R" /tmp/keep
source .gpu/device-env.sh > "$R/device.txt"
cat "$R/device.txt"
for f in .gpu/*.gz; do gunzip -kf "$f" && chmod +x "${f%.gz}"; done
cp -r .gpu/lorafuse .gpu/device-env.sh .gpu/bench .gpu/*.whl /tmp/keep/
./.gpu/ops cuda --test-threads 1 2>&1 | grep -E "^test |test result|panicked|Error" > "$R/ops_tests.log"
tail -1 "$R/ops_tests.log"; grep FAILED "$R/ops_tests.log"
LORAFUSE_ATTENTION_FWD_MT=1 ./.gpu/ops attention --test-threads 1 2>&1 \
  | grep -E "^test |test result|panicked" > "$R/ops_tests_att_mt1.log"
tail -1 "$R/ops_tests_att_mt1.log"
L() { ./.gpu/lorafuse bench ops --device cuda --fused-only "$@"; }
for rep in 1 2; do
  LORAFUSE_ATTENTION_FWD_MT=1 L --dtypes bf16 --only attention --json "$R/att_mt1_$rep.json" > /dev/null 2>&1
  L --dtypes bf16 --only attention --json "$R/att_mt2_$rep.json" > /dev/null 2>&1
done
for op in norm softmax; do
  LORAFUSE_ROW_PACKS=8 L --dtypes bf16,f32 --only $op --json "$R/rp8_$op.json" > /dev/null 2>&1
  LORAFUSE_ROWS_PERSISTENT=0 L --dtypes bf16,f32 --only $op --json "$R/rows_off_$op.json" > /dev/null 2>&1
done
./.gpu/lorafuse bench ops --device cuda --dtypes f32,bf16 --json "$R/ops.json" > "$R/ops.log" 2>&1
tail -1 "$R/ops.log"
for op in lora_full base_gemm; do
  LORAFUSE_TF32=1 L --dtypes f32 --only $op --json "$R/tf32_$op.json" > /dev/null 2>&1
done
python3 - "$R" <<'PY' | tee "$R/ab.txt"
import json, sys
r = sys.argv[1]
def load(p):
    return {(x["op"], x["dtype"], x["shape"]): x["us"] for x in json.load(open(f"{r}/{p}")) if x["impl"] == "lorafuse"}
m1 = [load(f"att_mt1_{i}.json") for i in (1, 2)]
m2 = [load(f"att_mt2_{i}.json") for i in (1, 2)]
for k in sorted(m1[0]):
    print("attention", k, "MT=1", [round(d[k], 1) for d in m1], "MT=2", [round(d[k], 1) for d in m2])
ours = load("ops.json")
for op in ("norm", "softmax"):
    rp8 = load(f"rp8_{op}.json")
    for k in sorted(rp8):
        if k in ours and "4096" in k[2] or "32000" in k[2]:
            print("rows", k, "default", round(ours.get(k, 0), 1), "packs8", round(rp8[k], 1))
PY
tar czf "$OUT/final2.tgz" -C "$R" .
