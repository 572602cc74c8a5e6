#!/usr/bin/env bash
# Session 7: the bf16 norm forwards behind Liger (16384x4096, 16384x32000). PC sampling of ours at
# 16384x4096, then ours under the launch knobs (persistent form off; 1, 2, 4 packs a thread)
# beside Liger and torch, twice.
set -uo pipefail
R=/tmp/s7norm
source scripts/gpu/device-setup.sh
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/liger*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/site
for op in rms_norm layer_norm; do
  PCSAMP_KERNEL=${op}_fwd timeout 120 bash scripts/gpu/pcsamp/run.sh "$R/pcs-$op" -- \
    ./.gpu/lorafuse bench ops --device cuda --dtypes bf16 --only $op --shape 16384x4096 --fused-only \
    > "$R/pcs-$op.log" 2>&1
  tail -2 "$R/pcs-$op.log"
done
for round in 1 2; do
  for env in "" LORAFUSE_ROWS_PERSISTENT=0 LORAFUSE_ROW_PACKS=1 LORAFUSE_ROW_PACKS=2; do
    for op in rms_norm layer_norm; do
      env $env ./.gpu/lorafuse bench ops --device cuda --dtypes bf16 --only $op --shape 16384x --fused-only \
        | grep -E "^lorafuse +(rms|layer)_norm " | sed "s/^/r$round ${env:-default}: /" | tee -a "$R/ours.log"
    done
  done
  python3 scripts/gpu/session7-norm-liger.py | tee -a "$R/peers.jsonl"
done
tar czf "$OUT/s7norm.tgz" -C "$R" .
