#!/usr/bin/env bash
# A/B of streaming (evict-first) loads and stores in the norms' persistent forwards
# (LORAFUSE_ROWS_STREAM=1) against the default, alternated, with Liger's forward in the same call.
# Staged: .gpu/{lorafuse.gz,device-env.sh,bench/,liger*.whl}.
# Kept as the record of call 13. Streaming hints won 1-8% on rms_norm at 4096 columns and lost
# 3-6% at 32000 and on layer_norm (call13-stream-ab/summary.txt); the switch was removed.
set -uo pipefail
OUT=${OUT:-/tmp/out}
R=/tmp/stream5
mkdir -p "$OUT" "$R"
source .gpu/device-env.sh > "$R/device.txt"
cat "$R/device.txt"
gunzip -kf .gpu/lorafuse.gz && chmod +x .gpu/lorafuse
for rep in 1 2; do
  for tag in default stream; do
    s=0; [ $tag = stream ] && s=1
    LORAFUSE_ROWS_STREAM=$s ./.gpu/lorafuse bench ops --device cuda --dtypes bf16 --only norm \
      --fused-only --json "$R/${tag}_$rep.json" > /dev/null 2>&1
  done
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/*.whl \
  > /dev/null 2>&1 && export PYTHONPATH=/tmp/site
(cd "$R" && OUT="$R" timeout 200 python3 "$OLDPWD/.gpu/bench/peers_ops.py" liger > peers_liger.log 2>&1)
python3 - "$R" <<'PY' | tee "$R/summary.txt"
import json, sys, glob, os
r = sys.argv[1]
def load(p):
    return {(x["op"], x["dtype"], x["shape"]): x["us"] for x in json.load(open(p)) if x["impl"] == "lorafuse"}
runs = {os.path.basename(p)[:-5]: load(p) for p in sorted(glob.glob(f"{r}/*_[12].json"))}
lig = {}
for p in glob.glob(f"{r}/peers_ops_*.json"):
    lig.update({(x["op"], x["dtype"], x["shape"]): x["us"] for x in json.load(open(p)) if x["impl"] == "liger"})
for k in sorted(next(iter(runs.values()))):
    if "+bwd" in k[0]: continue
    print(k, {t: round(v[k], 1) for t, v in runs.items()}, "liger", lig.get(k))
PY
tar czf "$OUT/stream5.tgz" -C "$R" .
