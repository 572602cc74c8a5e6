#!/usr/bin/env bash
# On the GPU machine, one call: the CUDA op tests, a decode check of the fused decode step, then
# A/B sweeps of the tuning switches of the row kernels and the LoRA forward, each config timed by
# our own `bench ops` (synchronised, after warm-up). Leaves the executables in /tmp/keep for the
# calls that follow while the machine stays warm (see scripts/gpu/session5-table.sh).
# Staged beforehand: .gpu/{lorafuse.gz,ops.gz,device-env.sh,bench/}.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
source .gpu/device-env.sh > "$OUT/device.txt"
cat "$OUT/device.txt"
for f in .gpu/*.gz; do gunzip -kf "$f" && chmod +x "${f%.gz}"; done
mkdir -p /tmp/keep && cp -r .gpu/lorafuse .gpu/device-env.sh .gpu/bench .gpu/*.whl scripts /tmp/keep/

./.gpu/ops cuda --test-threads 1 2>&1 | grep -E "^test |test result|panicked|Error" > "$OUT/ops_tests.log"
tail -1 "$OUT/ops_tests.log"
./.gpu/ops fused_decode --test-threads 1 --nocapture 2>&1 \
  | grep -E "fused decode|test result|panicked" > "$OUT/fused_decode.log"
tail -1 "$OUT/fused_decode.log"

python3 scripts/gpu/make-random-models.py /tmp/rand .gpu/bench > "$OUT/make-random.log" 2>&1
D() {
  ./.gpu/lorafuse bench decode --device cuda --prompt-tokens 32 --new-tokens 128 --repeat 3 "$@" 2>/dev/null \
    | python3 -c "import sys,json; d=json.loads(sys.stdin.read()); print(d['dtype'], d['decode_path'], round(d['tokens_per_s'],1))"
}
D --model /tmp/rand/smollm2 --dtype bf16 --json "$OUT/decode_bf16.json"
D --model /tmp/rand/smollm2 --dtype f32 --json "$OUT/decode_f32.json"

# Row kernels: forward block size and early weight loads; backward path and packs per thread.
B() { # tag, then env assignments
  local tag=$1; shift
  env "$@" ./.gpu/lorafuse bench ops --device cuda --dtypes bf16,f32 --only norm --fused-only \
    --json "$OUT/norm_$tag.json" > "$OUT/norm_$tag.log" 2>&1
}
B p4 LORAFUSE_ROW_PACKS=4
B p4ew LORAFUSE_ROW_PACKS=4 LORAFUSE_NORM_EARLY_WEIGHT=1
B p2 LORAFUSE_ROW_PACKS=2
B p2ew LORAFUSE_ROW_PACKS=2 LORAFUSE_NORM_EARLY_WEIGHT=1
B bwd_old LORAFUSE_NORM_BWD_ROWS=0
B bwd4 LORAFUSE_NORM_BWD_PACKS=4
B p4_again LORAFUSE_ROW_PACKS=4

# LoRA forward: y chunked by rows so the low-rank GEMM finds it in L2.
for c in 0 1024 2048 4096; do
  LORAFUSE_LORA_CHUNK_ROWS=$c ./.gpu/lorafuse bench ops --device cuda --dtypes bf16 --only lora_full \
    --fused-only --json "$OUT/lora_chunk$c.json" > "$OUT/lora_chunk$c.log" 2>&1
done
./.gpu/lorafuse bench ops --device cuda --dtypes bf16 --only base_gemm --fused-only \
  --json "$OUT/base_gemm.json" > "$OUT/base_gemm.log" 2>&1
python3 scripts/gpu/sweep-table.py "$OUT" | tee "$OUT/sweep.txt"
