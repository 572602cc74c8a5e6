#!/usr/bin/env bash
# On the GPU machine, one call: the CUDA op tests, then our training step and PEFT's back to back,
# and batch-1 decode beside transformers (the staged .gpu/ folder as in session.sh).
set -uo pipefail
OUT=${OUT:-/tmp/out}
source .gpu/device-env.sh
for f in .gpu/*.gz; do gunzip -kf "$f" && chmod +x "${f%.gz}"; done
./.gpu/ops cuda --test-threads 1 2>&1 | grep -E "^test |test result" > "$OUT/ops_tests.log"
tail -2 "$OUT/ops_tests.log"
python3 scripts/gpu/make-random-models.py /tmp/rand .gpu/bench > /dev/null 2>&1
for bs in "1 512" "8 512" "4 2048"; do
  set -- $bs
  .gpu/lorafuse bench train --model /tmp/rand/qwen05b --device cuda --dtype bf16 --batch-size $1 --seq-len $2 --rank 16 2>/dev/null | tee -a "$OUT/train_ours.jsonl"
done
(cd "$OUT" && timeout 240 python3 "$OLDPWD/.gpu/bench/peers_train.py" 2>&1 | grep impl)
for dt in bf16 f32; do
  .gpu/lorafuse bench decode --model /tmp/rand/smollm2 --device cuda --dtype $dt --repeat 3 2>/dev/null | tee -a "$OUT/decode_ours.jsonl"
done
(cd "$OUT" && timeout 200 python3 "$OLDPWD/.gpu/bench/peers_infer.py" 2>&1 | grep impl)
