#!/usr/bin/env bash
# After the session-5 row-kernel changes: the CUDA op tests on the committed kernels, then our
# LoRA training step and PEFT's back to back (as scripts/gpu/verify-train.sh), in one call.
# Staged: .gpu/{lorafuse.gz,ops.gz,device-env.sh,bench/}.
set -uo pipefail
OUT=${OUT:-/tmp/out}
R=/tmp/train5
mkdir -p "$OUT" "$R"
source .gpu/device-env.sh > "$R/device.txt"
cat "$R/device.txt"
for f in .gpu/*.gz; do gunzip -kf "$f" && chmod +x "${f%.gz}"; done
./.gpu/ops cuda --test-threads 1 2>&1 | grep -E "^test |test result|panicked" > "$R/ops_tests.log"
tail -1 "$R/ops_tests.log"
python3 scripts/gpu/make-random-models.py /tmp/rand .gpu/bench > "$R/make-random.log" 2>&1
for bs in "1 512" "8 512" "4 2048"; do
  set -- $bs
  .gpu/lorafuse bench train --model /tmp/rand/qwen05b --device cuda --dtype bf16 --batch-size $1 \
    --seq-len $2 --rank 16 2>/dev/null | tee -a "$R/train_ours.jsonl"
done
(cd "$R" && OUT="$R" timeout 300 python3 "$OLDPWD/.gpu/bench/peers_train.py" > peers_train.log 2>&1)
grep impl "$R/peers_train.log"
tar czf "$OUT/train5.tgz" -C "$R" .
