#!/usr/bin/env bash
# A record of call 7: the LORAFUSE_NORM_EARLY kernel existed only in that diagnostic build.
# Session 6, call 7 (a diagnostic build): the bf16 rms_norm forward at 16384x4096 in Liger's
# shape (256 threads a row, 2 packs a thread, the weight loaded with x before the reduction:
# LORAFUSE_NORM_EARLY=1 in that build only) against our default and the same shape without the
# early weight, with Liger timed in the same call.
set -uo pipefail
R=/tmp/s6norm
source scripts/gpu/device-setup.sh
LORAFUSE_ROW_PACKS=2 LORAFUSE_ROWS_PERSISTENT=0 LORAFUSE_NORM_EARLY=1 ./.gpu/ops rms_norm --test-threads 1 2>&1 | grep -E "^test |test result|panicked" > "$R/tests_early.log"
echo "early: $(tail -1 "$R/tests_early.log")"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  .gpu/liger_kernel-0.8.5-py3-none-any.whl > "$R/pip.log" 2>&1
cat > "$R/liger.py" <<'PY'
import sys, json
sys.path.insert(0, ".gpu/bench")
import torch
from peers_ops import ev_time
from liger_kernel.ops.rms_norm import LigerRMSNormFunction
x = torch.randn(16384, 4096, device="cuda", dtype=torch.bfloat16)
g = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
print(json.dumps({"op": "liger rms_norm bf16 16384x4096", "us": ev_time(lambda: LigerRMSNormFunction.apply(x, g, 1e-5), iters=500)}))
PY
b() {  # label, env...
  local label=$1; shift
  env "$@" ./.gpu/lorafuse bench ops --device cuda --dtypes bf16 --only rms_norm --fused-only \
    --json "$R/$label.json" > "$R/$label.log" 2>&1
  grep -E "lorafuse .*(16384x4096|4096x4096)" "$R/$label.log" | grep -v bwd | sed "s/^/$label: /"
}
for round in 1 2 3; do
  b default$round
  b p2_$round LORAFUSE_ROW_PACKS=2 LORAFUSE_ROWS_PERSISTENT=0
  b early$round LORAFUSE_ROW_PACKS=2 LORAFUSE_ROWS_PERSISTENT=0 LORAFUSE_NORM_EARLY=1
  PYTHONPATH=/tmp/site python3 "$R/liger.py" | tee -a "$R/liger.jsonl"
done
tar czf "$OUT/s6norm.tgz" -C "$R" .
