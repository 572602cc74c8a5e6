#!/usr/bin/env bash
# Session 6, call 6 (a diagnostic build): the 8-warp, 128-key attention backward
# (LORAFUSE_ATT_BWD=w8, that build only) against the 4-warp, 64-key one, same call.
set -uo pipefail
R=/tmp/s6bwd
source scripts/gpu/device-setup.sh
for v in "" w8; do
  LORAFUSE_ATT_BWD=$v ./.gpu/ops attention --test-threads 1 2>&1 | grep -E "^test |test result|panicked" > "$R/tests_bwd_$v.log"
  echo "bwd variant '$v': $(tail -1 "$R/tests_bwd_$v.log")"
done
b() {  # label, env...
  local label=$1; shift
  env "$@" ./.gpu/lorafuse bench ops --device cuda --dtypes bf16 --only attention --fused-only \
    --json "$R/$label.json" > "$R/$label.log" 2>&1
  grep -E "lorafuse " "$R/$label.log" | sed "s/^/$label: /"
}
for round in 1 2 3; do
  b base$round
  b w8_$round LORAFUSE_ATT_BWD=w8
done
tar czf "$OUT/s6bwd.tgz" -C "$R" .
