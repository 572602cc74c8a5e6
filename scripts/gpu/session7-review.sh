#!/usr/bin/env bash
# Session 7, after the review clean-up (one launcher for the three tiled attention backward
# kernels, the f32 ones now taking the tensor-core kernel's arguments; the fused decode
# attention's output loop shared by both paths): every CUDA op test, then f32 attention and
# long-context decode as a check against the earlier calls' figures.
set -uo pipefail
R=/tmp/s7review
source scripts/gpu/device-setup.sh
python3 -c "import lzma, sys; open(sys.argv[2], 'wb').write(lzma.open(sys.argv[1]).read())" .gpu/ops.xz .gpu/ops
chmod +x .gpu/ops
./.gpu/ops cuda --test-threads 1 2>&1 | grep -E "^test |test result|panicked|fused decode" > "$R/ops_tests.log"
tail -1 "$R/ops_tests.log"; grep -E "FAILED|panicked" "$R/ops_tests.log"
./.gpu/lorafuse bench ops --device cuda --dtypes f32 --only attention --fused-only | grep "^lorafuse"
python3 scripts/gpu/make-random-models.py /tmp/rand .gpu/bench > "$R/make-random.log" 2>&1
./.gpu/lorafuse bench decode --model /tmp/rand/smollm2 --device cuda --dtype bf16 --prompt-tokens 2048 \
  --new-tokens 512 --repeat 3 2>/dev/null | tee "$R/decode.json" | cut -c1-300
tar czf "$OUT/s7review.tgz" -C "$R" .
