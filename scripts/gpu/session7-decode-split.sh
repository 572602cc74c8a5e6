#!/usr/bin/env bash
# Session 7: the fused decode step's attention split over 8 blocks a head past 256 positions.
# The fused-decode tests (their long-context case crosses the split) and every CUDA op test, then
# batch-1 bf16 decode (random SmolLM2-135M and Qwen2.5-0.5B shapes) at short and long contexts
# with the build before (.gpu-ab/lorafuse-base.gz) and this one, alternating, two rounds.
set -uo pipefail
R=/tmp/s7split
source scripts/gpu/device-setup.sh
# (xz: the ops binary and the base build travel xz-compressed, half the gzip size)
for f in .gpu/ops.xz .gpu-ab/lorafuse-base.xz; do
  python3 -c "import lzma, sys; open(sys.argv[2], 'wb').write(lzma.open(sys.argv[1]).read())" "$f" "${f%.xz}"
  chmod +x "${f%.xz}"
done
./.gpu/ops fused_decode --test-threads 1 --nocapture 2>&1 | grep -E "fused decode|test result|panicked|assert" | tee "$R/fused_decode_tests.log"
./.gpu/ops cuda --test-threads 1 2>&1 | grep -E "^test |test result|panicked" > "$R/ops_tests.log"
tail -1 "$R/ops_tests.log"; grep -E "FAILED|panicked" "$R/ops_tests.log"
python3 scripts/gpu/make-random-models.py /tmp/rand .gpu/bench > "$R/make-random.log" 2>&1
for round in 1 2; do
  for which in base new; do
    bin=./.gpu/lorafuse; [ $which = base ] && bin=./.gpu-ab/lorafuse-base
    for cfg in "smollm2 32 128" "smollm2 512 512" "smollm2 2048 512" "qwen05b 32 128" "qwen05b 2048 512"; do
      set -- $cfg
      $bin bench decode --model /tmp/rand/$1 --device cuda --dtype bf16 --prompt-tokens $2 \
        --new-tokens $3 --repeat 3 2>/dev/null \
        | python3 -c "import sys,json; d=json.loads(sys.stdin.read()); print(json.dumps({'build': '$which', 'round': $round, 'model': '$1', 'prompt': $2, 'new': $3, 'path': d['decode_path'], 'tokens_per_s': round(d['tokens_per_s'], 1), 'runs': [round(x) for x in d['runs_tokens_per_s']]}))" \
        | tee -a "$R/decode.jsonl"
    done
  done
done
tar czf "$OUT/s7split.tgz" -C "$R" .
