#!/usr/bin/env bash
# On the GPU machine: SmolLM2-135M-Instruct (the Q4_1 GGUF) on CUDA against the committed
# transformers fixture (CPU f32): per-record NLL and the two greedy chat cases, in f32 and bf16,
# with the fused decode step (default) and with Candle's per-op decode (LORAFUSE_FUSED_DECODE=0).
#   MODEL=/tmp/g/SmolLM2-135M-Instruct.Q4_1.gguf bash scripts/gpu/parity-smollm2.sh   (writes under $OUT)
set -uo pipefail
BIN=${BIN:-.gpu/lorafuse}
MODEL=${MODEL:-/tmp/g/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/parity" /tmp/parity
# transformers' own bf16 run on CUDA (needs the `gguf` package: PYTHONPATH with its wheel, if absent).
BF16_FX=""
if [ "${TRANSFORMERS_BF16:-1}" = 1 ]; then
  python3 scripts/fixtures/smollm2_reference.py --models-dir "$(dirname "$MODEL")" --device cuda --dtype bfloat16 \
    --out "$OUT/parity/transformers_cuda_bf16.json" > "$OUT/parity/transformers_bf16.log" 2>&1 \
    && BF16_FX="$OUT/parity/transformers_cuda_bf16.json"
fi
for dt in f32 bf16; do
  $BIN perplexity --model "$MODEL" --device cuda --dtype $dt --data crates/lorafuse/tests/data/ppl.jsonl --json \
    > "$OUT/parity/ppl_$dt.json"
  for mode in fused candle; do
    [ $mode = candle ] && export LORAFUSE_FUSED_DECODE=0 || unset LORAFUSE_FUSED_DECODE
    $BIN generate --model "$MODEL" --device cuda --dtype $dt --chat --system "You are a concise assistant." \
      --prompt "What is the capital of France? Answer in one sentence." --max-tokens 48 --json \
      > "/tmp/parity/system_and_user_${dt}_$mode.json"
    $BIN generate --model "$MODEL" --device cuda --dtype $dt --chat --prompt "Write a haiku about rust." \
      --max-tokens 48 --json > "/tmp/parity/user_only_${dt}_$mode.json"
  done
done
unset LORAFUSE_FUSED_DECODE
cp "$OUT"/parity/ppl_*.json /tmp/parity/
python3 scripts/gpu/compare-smollm2.py crates/lorafuse/tests/fixtures/smollm2_reference.json /tmp/parity $BF16_FX \
  | tee "$OUT/parity/summary.json"
