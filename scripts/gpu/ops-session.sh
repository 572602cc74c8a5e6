#!/usr/bin/env bash
# On the GPU machine, one call: the CUDA op tests, our op table (`bench ops`, fused and stock
# Candle), then the peers' op table (torch eager, torch.compile, Liger; forward and backward) in
# the same session. Staged beforehand: .gpu/{lorafuse.gz,ops.gz,device-env.sh,liger*.whl,bench/}.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
source .gpu/device-env.sh
for f in .gpu/*.gz; do gunzip -kf "$f" && chmod +x "${f%.gz}"; done
./.gpu/ops cuda --test-threads 1 2>&1 | grep -E "^test |test result" > "$OUT/ops_tests.log"
tail -1 "$OUT/ops_tests.log"
./.gpu/lorafuse bench ops --device cuda --dtypes f32,bf16 --json "$OUT/ops.json" > "$OUT/ops.log" 2>&1
tail -2 "$OUT/ops.log"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/*.whl \
  && export PYTHONPATH=/tmp/site
(cd "$OUT" && timeout 330 python3 "$OLDPWD/.gpu/bench/peers_ops.py" torch compile liger bwd > peers_ops.log 2>&1)
tail -2 "$OUT/peers_ops.log"
