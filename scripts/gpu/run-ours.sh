#!/usr/bin/env bash
# On the GPU machine (see ../shared/gpu/README.md): parity of a staged CUDA build against the
# committed transformers fixture, and our benchmarks. Writes JSON under $OUT.
#   BIN=.gpu/lorafuse MODEL=/tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf bash scripts/gpu/run-ours.sh
set -uo pipefail
BIN=${BIN:-.gpu/lorafuse}
MODEL=${MODEL:-/tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
DATA=crates/lorafuse/tests/data/ppl.jsonl
for dt in f32 bf16; do
  $BIN perplexity --model "$MODEL" --device cuda --dtype $dt --data $DATA --json > "$OUT/ppl_cuda_$dt.json"
  $BIN generate --model "$MODEL" --device cuda --dtype $dt --chat --system "You are a concise assistant." \
    --prompt "What is the capital of France? Answer in one sentence." --max-tokens 48 --json > "$OUT/gen1_cuda_$dt.json"
  $BIN generate --model "$MODEL" --device cuda --dtype $dt --chat --prompt "Write a haiku about rust." \
    --max-tokens 48 --json > "$OUT/gen2_cuda_$dt.json"
done
for dt in bf16 f32; do
  $BIN bench decode --model "$MODEL" --device cuda --dtype $dt --prompt-tokens 32 --new-tokens 128 --json "$OUT/decode_$dt.json"
done
$BIN bench decode --model "$MODEL" --device cuda --dtype bf16 --kernels reference --prompt-tokens 32 --new-tokens 128 --json "$OUT/decode_bf16_reference.json"
