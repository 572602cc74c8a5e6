#!/usr/bin/env bash
# Session 7: `generate --merge-adapters` (adapters folded into the weights in memory, so batch-1
# CUDA decoding takes the fused step). SmolLM2-135M-Instruct (the Q4_1 GGUF, carried in parts as
# in session7-parity.sh) with the main job's adapter (adapters/main-job, r=8 all-linear): no
# adapter, the live adapter (per-op decode), the merged adapter; f32 and bf16; greedy, 128 tokens,
# three runs each. Usage: session7-merge.sh part1|part2|run.
set -uo pipefail
source scripts/gpu/gguf-parts.sh
case "${1:-}" in
  part1 | part2) gguf_part "$1" ;;
  run)
    R=/tmp/s7merge
    source scripts/gpu/device-setup.sh
    gguf_join /tmp/g/m.gguf || exit 1
    P="Which city is the capital of Portugal?"
    for dt in f32 bf16; do
      for mode in none live merged; do
        extra=""
        [ $mode = live ] && extra="--adapter adapters/main-job"
        [ $mode = merged ] && extra="--adapter adapters/main-job --merge-adapters"
        for run in 1 2 3; do
          ./.gpu/lorafuse generate --model /tmp/g/m.gguf --device cuda --dtype $dt --chat --prompt "$P" \
            --max-tokens 128 --json $extra 2>/dev/null \
            | python3 -c "import json,sys; d=json.load(sys.stdin); print(json.dumps({'dtype': '$dt', 'mode': '$mode', 'run': $run, 'decode_tokens_per_s': round(d['decode_tokens_per_s'], 1), 'n': len(d['tokens']), 'tokens': d['tokens']}))" \
            | tee -a "$R/merge.jsonl" | cut -c1-120
        done
      done
    done
    tar czf "$OUT/s7merge.tgz" -C "$R" .
    ;;
  *) echo "usage: session7-merge.sh part1|part2|run" >&2; exit 2 ;;
esac
