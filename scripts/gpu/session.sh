#!/usr/bin/env bash
# One GPU session in three calls on the same warm machine (each within the 10-minute limit), ours and
# the peers back to back. Staged beforehand here: .gpu/{lorafuse.gz,ops.gz,device-env.sh,liger*.whl,
# bench/ (a copy of ../shared/bench), minilm/ (the real all-MiniLM-L6-v2 folder without its weights)}
# and the weights' gzip split in three parts, .gpu-m1/ (call ops), .gpu-m2/ and .gpu-m3/ (call models).
#   bash scripts/gpu/session.sh ops|models|decode      (writes under $OUT)
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
source .gpu/device-env.sh
for f in .gpu/*.gz; do [ -x "${f%.gz}" ] || { gunzip -kf "$f" && chmod +x "${f%.gz}"; }; done
BIN=.gpu/lorafuse
peers_env() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/*.whl \
    && export PYTHONPATH=/tmp/site
}
case "$1" in
ops)
  mkdir -p /tmp/m && cp .gpu-m1/* /tmp/m/
  ./.gpu/ops cuda --test-threads 1 2>&1 | tee "$OUT/ops_tests.log" | tail -5
  $BIN bench ops --device cuda --dtypes f32,bf16 --json "$OUT/ops.json" > "$OUT/ops.log" 2>&1
  peers_env
  (cd "$OUT" && timeout 300 python3 "$OLDPWD/.gpu/bench/peers_ops.py" torch compile liger bwd > peers_ops.log 2>&1)
  tail -3 "$OUT/peers_ops.log"
  ;;
models)
  mkdir -p /tmp/minilm && cp -r .gpu/minilm/. /tmp/minilm/
  cat /tmp/m/* .gpu-m2/* .gpu-m3/* | gunzip > /tmp/minilm/model.safetensors
  sha256sum /tmp/minilm/model.safetensors | tee "$OUT/minilm.sha256"
  python3 scripts/gpu/compare-embed-fixture.py texts /tmp/minilm /tmp/texts.jsonl
  for dt in f32 bf16; do
    $BIN embed --model /tmp/minilm --device cuda --dtype $dt --input /tmp/texts.jsonl --json > "/tmp/embed_$dt.json"
    for rep in 1 2; do
      $BIN bench embed --model /tmp/minilm --device cuda --dtype $dt --repeat $rep --json "$OUT/embed_bench_${dt}_x$rep.json"
    done
  done
  python3 scripts/gpu/compare-embed-fixture.py compare /tmp/minilm /tmp/embed_f32.json /tmp/embed_bf16.json | tee "$OUT/embed_parity.jsonl"
  for rep in 1 2; do
    python3 crates/lorafuse-cli/benches/embed_peer.py --model /tmp/minilm --repeat $rep | tee -a "$OUT/embed_st.jsonl"
  done
  python3 scripts/gpu/make-random-models.py /tmp/rand .gpu/bench > "$OUT/make-random.log" 2>&1
  for bs in "1 512" "8 512" "4 2048"; do
    set -- $bs
    $BIN bench train --model /tmp/rand/qwen05b --device cuda --dtype bf16 --batch-size $1 --seq-len $2 --rank 16 --json "$OUT/train_${1}x${2}.json"
  done
  peers_env
  (cd "$OUT" && timeout 240 python3 "$OLDPWD/.gpu/bench/peers_train.py" > peers_train.log 2>&1)
  cat "$OUT/peers_train.log" | grep impl
  ;;
decode)
  [ -d /tmp/rand/smollm2 ] || python3 scripts/gpu/make-random-models.py /tmp/rand .gpu/bench > "$OUT/make-random.log" 2>&1
  for dt in bf16 f32; do
    $BIN bench decode --model /tmp/rand/smollm2 --device cuda --dtype $dt --prompt-tokens 32 --new-tokens 128 --repeat 3 --json "$OUT/decode_$dt.json"
    # The same without the fused step (Candle's per-op decode), for A/B.
    LORAFUSE_FUSED_DECODE=0 $BIN bench decode --model /tmp/rand/smollm2 --device cuda --dtype $dt --prompt-tokens 32 --new-tokens 128 --repeat 3 --json "$OUT/decode_${dt}_candle.json"
  done
  (cd "$OUT" && timeout 300 python3 "$OLDPWD/.gpu/bench/peers_infer.py" > peers_infer.log 2>&1)
  grep impl "$OUT/peers_infer.log"
  ;;
esac
