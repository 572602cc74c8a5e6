#!/usr/bin/env bash
# A record of call 8, run on a diagnostic build: LORAFUSE_ATT_LAZY=1 picked forwards whose
# running max moves only when a tile's exceeds it by 2^8 (no rescale of the accumulators in most
# tiles), against the committed forwards, same call, three rounds alternating.
set -uo pipefail
R=/tmp/s6lazy
source scripts/gpu/device-setup.sh
for v in 0 1; do
  LORAFUSE_ATT_LAZY=$v ./.gpu/ops attention --test-threads 1 2>&1 | grep -E "^test |test result|panicked" > "$R/tests_lazy$v.log"
  echo "lazy=$v: $(tail -1 "$R/tests_lazy$v.log")"
done
b() {  # label, env...
  local label=$1; shift
  env "$@" ./.gpu/lorafuse bench ops --device cuda --dtypes bf16 --only attention --fused-only \
    --json "$R/$label.json" > "$R/$label.log" 2>&1
  grep -E "lorafuse " "$R/$label.log" | grep -v bwd | sed "s/^/$label: /"
}
for round in 1 2 3; do
  b base$round
  b lazy$round LORAFUSE_ATT_LAZY=1
done
tar czf "$OUT/s6lazy.tgz" -C "$R" .
