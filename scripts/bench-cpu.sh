#!/usr/bin/env bash
# CPU benchmarks, ours and the peers back to back on this machine (the figures in BENCHMARKS.md's CPU
# section): decode (transformers generate via ../shared/bench/peers_infer.py --cpu), LoRA training
# (transformers + PEFT), embeddings (sentence-transformers). Needs the release build and Python with
# torch, transformers, peft, sentence-transformers and gguf. Writes JSON lines under $OUT.
#   PY=python3 OUT=bench-results/cpu bash scripts/bench-cpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-bench-results/cpu}
THREADS=${THREADS:-$(nproc)}
BIN=target/release/lorafuse
GGUF=models/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$OUT"
[ -n "${SKIP_BUILD:-}" ] || cargo build --release -p lorafuse-cli --bins --benches >&2
# The newest `embed-*` may be the tests/embed.rs test binary: take the one that is the bench.
EMBED_BENCH=
for f in $(ls -t target/release/deps/embed-* | grep -v '\.d$'); do
  if "$f" --help 2>&1 | grep -q -- '--sizes'; then EMBED_BENCH=$f; break; fi
done
[ -n "$EMBED_BENCH" ] || { echo "bench-cpu: no embed bench binary; build with --benches" >&2; exit 1; }
echo "load before: $(cat /proc/loadavg)" >&2
# Decode, batch 1, greedy, 32-token prompt, 128 new tokens.
for q in none q8_0 q4_1; do
  args=(); [ "$q" != none ] && args=(--quantize "$q")
  $BIN bench decode --model $GGUF --device cpu --dtype f32 "${args[@]}" --prompt-tokens 32 --new-tokens 128 \
    --repeat 3 >> "$OUT/decode_ours.jsonl"
done
$PY -c "import torch; torch.set_num_threads($THREADS); import runpy, sys; sys.argv=['peers_infer.py','--cpu']; runpy.run_path('../shared/bench/peers_infer.py', run_name='__main__')" \
  >> "$OUT/peers_infer_cpu.jsonl" 2>/dev/null
# LoRA training step, SmolLM2-135M, r=8 on all linear layers, batch 4 x 256, f32.
$BIN bench train --model $GGUF --device cpu --dtype f32 --batch-size 4 --seq-len 256 --rank 8 --steps 3 \
  --warmup 1 >> "$OUT/train_ours.jsonl"
$PY crates/lorafuse-cli/benches/train_peer.py --model $GGUF --threads "$THREADS" --steps 3 --warmup 1 \
  >> "$OUT/train_peft.jsonl" 2>/dev/null
# Embeddings, real all-MiniLM-L6-v2, documents of ~29 and ~53 tokens.
# Ours dense f32, ours with int16 projections, then sentence-transformers, back to back.
for rep in 1 2; do
  $EMBED_BENCH --device cpu --repeat $rep >> "$OUT/embed_ours.jsonl"
  $EMBED_BENCH --device cpu --repeat $rep --quantize i16 >> "$OUT/embed_ours.jsonl"
  $PY crates/lorafuse-cli/benches/embed_peer.py --cpu --threads "$THREADS" --repeat $rep >> "$OUT/embed_st.jsonl" 2>/dev/null
done
echo "load after: $(cat /proc/loadavg)" >&2
