#!/usr/bin/env bash
# Training step A/B for the session-5 row kernels, one call: the default build against the same
# binary with the persistent forwards and the register-row norm backward turned off (the kernels
# of session 4), alternated, on the Qwen2.5-0.5B-shaped model of verify-train.sh.
# Staged: .gpu/{lorafuse.gz,device-env.sh,bench/}.
set -uo pipefail
OUT=${OUT:-/tmp/out}
R=/tmp/trainab
mkdir -p "$OUT" "$R"
source .gpu/device-env.sh > "$R/device.txt"
cat "$R/device.txt"
gunzip -kf .gpu/lorafuse.gz && chmod +x .gpu/lorafuse
python3 scripts/gpu/make-random-models.py /tmp/rand .gpu/bench > "$R/make-random.log" 2>&1
T() { # tag, then env assignments
  local tag=$1; shift
  for bs in "1 512" "8 512" "4 2048"; do
    read -r b s <<< "$bs"
    env "$@" .gpu/lorafuse bench train --model /tmp/rand/qwen05b --device cuda --dtype bf16 \
      --batch-size "$b" --seq-len "$s" --rank 16 2>/dev/null \
      | python3 -c "import sys,json; d=json.loads(sys.stdin.read()); d['tag']='$tag'; print(json.dumps(d))" \
      | tee -a "$R/train_ab.jsonl"
  done
}
for rep in 1 2; do
  T new
  T old LORAFUSE_ROWS_PERSISTENT=0 LORAFUSE_NORM_BWD_ROWS=0
done
python3 - "$R" <<'PY' | tee "$R/summary.txt"
import json, sys, collections
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/train_ab.jsonl")]
by = collections.defaultdict(list)
for r in rows:
    by[(r["batch"], r["seq"], r["tag"])].append(round(r["tokens_per_s"]))
for k in sorted(by):
    print(k, by[k])
PY
tar czf "$OUT/trainab.tgz" -C "$R" .
