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
# Embeddings and training on random-weight models of the peers' shapes (speed depends on shape).
python3 scripts/gpu/make-random-models.py /tmp/rand "${BENCH:-.gpu1/bench}" > "$OUT/make-random.log" 2>&1
TEXTS=crates/lorafuse/tests/data/embed_texts.jsonl
for dt in f32 bf16; do
  $BIN embed --model /tmp/rand/minilm --device cuda --dtype $dt --input $TEXTS --json > "/tmp/embed_$dt.json"
  $BIN bench embed --model /tmp/rand/minilm --device cuda --dtype $dt --json "$OUT/embed_bench_$dt.json"
done
python3 scripts/gpu/compare-embed.py /tmp/rand/minilm $TEXTS /tmp/embed_f32.json /tmp/embed_bf16.json > "$OUT/embed_parity.json"
for bs in "1 512" "8 512" "4 2048"; do
  set -- $bs
  $BIN bench train --model /tmp/rand/qwen05b --device cuda --dtype bf16 --batch-size $1 --seq-len $2 --rank 16 --json "$OUT/train_${1}x${2}.json"
done
$BIN bench ops --device cuda --dtypes f32,bf16 --json "$OUT/ops.json" > "$OUT/ops.log" 2>&1
