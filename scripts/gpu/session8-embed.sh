#!/usr/bin/env bash
# Session 8, one call: sentence embeddings on the GPU after the CPU encoder changes (the encoder's
# attention now goes through lorafuse_ops::encoder_attention, whose CUDA path is the stock
# composition). On an all-MiniLM-shaped folder with seeded random weights (random-minilm.py):
# our CUDA f32 and bf16 embeddings of the fixture's texts against our CPU f32 ones and against
# sentence-transformers on this GPU with the same weights; then docs/s, ours and
# sentence-transformers back to back.
set -uo pipefail
R=$OUT
source scripts/gpu/device-setup.sh
BIN=.gpu/lorafuse
python3 scripts/gpu/random-minilm.py .gpu/minilm /tmp/rminilm 2>&1 | tail -1 | tee "$OUT/random-minilm.log"
python3 scripts/gpu/compare-embed-fixture.py texts /tmp/rminilm /tmp/texts.jsonl
$BIN embed --model /tmp/rminilm --device cpu --dtype f32 --input /tmp/texts.jsonl --json > /tmp/embed_cpu_f32.json
for dt in f32 bf16; do
  $BIN embed --model /tmp/rminilm --device cuda --dtype $dt --input /tmp/texts.jsonl --json > "/tmp/embed_cuda_$dt.json"
done
python3 scripts/gpu/compare-embed-random.py /tmp/rminilm /tmp/embed_cpu_f32.json /tmp/embed_cuda_f32.json \
  /tmp/embed_cuda_bf16.json | tee "$OUT/embed_parity.jsonl"
for rep in 1 2; do
  for dt in f32 bf16; do
    $BIN bench embed --model /tmp/rminilm --device cuda --dtype $dt --repeat $rep | tee -a "$OUT/embed_ours.jsonl"
  done
  python3 crates/lorafuse-cli/benches/embed_peer.py --model /tmp/rminilm --repeat $rep 2>/dev/null | tee -a "$OUT/embed_st.jsonl"
done
