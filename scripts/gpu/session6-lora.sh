#!/usr/bin/env bash
# Session 6, calls 9-10: the one-launch LoRA forward for decode-sized inputs (lora_linear.cu),
# also taken by the frozen linear layers at those sizes. Every CUDA op test; `bench ops --only
# lora` and torch eager's rows (peers_ops.py torch) in the same call; then decode with Candle's
# per-op path (LORAFUSE_FUSED_DECODE=0: every projection a linear-layer op at one token) on a
# random SmolLM2-shaped model, this build against the one before the kernel (lorafuse-before),
# alternating. Staged: .gpu/{lorafuse.gz,lorafuse-before.gz,ops.gz,device-env.sh,bench/}.
set -uo pipefail
R=/tmp/s6lora
source scripts/gpu/device-setup.sh
./.gpu/ops cuda --test-threads 1 2>&1 | grep -E "^test |test result|panicked" > "$R/ops_tests.log"
tail -1 "$R/ops_tests.log"; grep -E "FAILED|panicked" "$R/ops_tests.log"
for round in 1 2; do
  ./.gpu/lorafuse bench ops --device cuda --dtypes bf16,f32 --only lora \
    --json "$R/ours$round.json" > "$R/ours$round.log" 2>&1
  grep -E "lorafuse .*t=1 " "$R/ours$round.log" | grep -v bwd | sed "s/^/ours$round: /"
  (cd "$R" && OUT=$R timeout 300 python3 "$OLDPWD/.gpu/bench/peers_ops.py" torch > "peers$round.log" 2>&1)
  grep -E "lora.*t=1 " "$R/peers$round.log" | grep -v bwd | sed "s/^/torch$round: /"
done
python3 scripts/gpu/make-random-models.py /tmp/rand .gpu/bench > "$R/make-random.log" 2>&1
for round in 1 2; do
  for bin in lorafuse-before lorafuse; do
    LORAFUSE_FUSED_DECODE=0 ./.gpu/$bin bench decode --device cuda --model /tmp/rand/smollm2 --dtype bf16 \
      --prompt-tokens 32 --new-tokens 128 --repeat 3 --json "$R/decode_candle_${bin}_$round.json" > /dev/null 2>&1
    python3 -c "import json; d=json.load(open('$R/decode_candle_${bin}_$round.json')); print('$bin', d['decode_path'], round(d['tokens_per_s'],1))"
  done
done
tar czf "$OUT/s6lora.tgz" -C "$R" .
