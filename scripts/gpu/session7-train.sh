#!/usr/bin/env bash
# Session 7: RoPE tables cast to the model's dtype once at load (they were cast on every RoPE
# call: four casts a layer). The bf16 rope op rows, then the LoRA training step (Qwen2.5-0.5B
# shape, random weights, bf16, r=16) with the build before (.gpu-ab/lorafuse-base.gz) and this
# one alternating, then PEFT's step in the same call (../shared/bench/peers_train.py).
set -uo pipefail
R=/tmp/s7train
source scripts/gpu/device-setup.sh
gunzip -kf .gpu-ab/lorafuse-base.gz && chmod +x .gpu-ab/lorafuse-base
for which in base new; do
  bin=./.gpu/lorafuse; [ $which = base ] && bin=./.gpu-ab/lorafuse-base
  $bin bench ops --device cuda --dtypes bf16,f32 --only rope --fused-only | grep -E "^lorafuse " | sed "s/^/$which: /" | tee -a "$R/rope.log"
done
python3 scripts/gpu/make-random-models.py /tmp/rand .gpu/bench > "$R/make-random.log" 2>&1
for round in 1 2; do
  for which in base new; do
    bin=./.gpu/lorafuse; [ $which = base ] && bin=./.gpu-ab/lorafuse-base
    for bs in "1 512" "8 512" "4 2048"; do
      set -- $bs
      $bin bench train --model /tmp/rand/qwen05b --device cuda --dtype bf16 --batch-size $1 \
        --seq-len $2 --rank 16 2>/dev/null | sed "s/^/{\"build\": \"$which\", \"round\": $round, \"row\": /; s/$/}/" \
        | tee -a "$R/train_ours.jsonl"
    done
  done
done
(cd "$R" && OUT="$R" timeout 300 python3 "$OLDPWD/.gpu/bench/peers_train.py" > peers_train.log 2>&1)
grep impl "$R/peers_train.log"
tar czf "$OUT/s7train.tgz" -C "$R" .
