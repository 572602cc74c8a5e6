#!/usr/bin/env bash
# Session 7: the whole op table from one GPU session, over three calls made back to back while
# the machine stays warm (it keeps /tmp between them).
#   ours       carry .gpu: every CUDA op test, then our `bench ops` (fused and stock Candle, f32
#              and bf16), and the f32 LoRA/base GEMM rows with TF32 allowed (for MLX's default).
#              Keeps the executables in /tmp/keep.
#   mlx-part   carry .whl/a (the first half of the mlx-cuda-13 wheel): kept in /tmp.
#   peers      carry .whl/b (the second half, the mlx wheels, Liger): joins and installs MLX, then
#              `peers_ops.py torch compile liger mlx bwd`, and MLX again with MLX_ENABLE_TF32=0
#              (full f32, the like-for-like rows).
set -uo pipefail
OUT=${OUT:-/tmp/out}
K=/tmp/keep
mkdir -p "$OUT" "$K"
mode=${1:-}
case "$mode" in
  ours)
    R=$OUT/ours
    source scripts/gpu/device-setup.sh
    cp -r .gpu/lorafuse .gpu/device-env.sh .gpu/bench "$K/"
    ./.gpu/ops cuda --test-threads 1 2>&1 | grep -E "^test |test result|panicked|Error" > "$R/ops_tests.log"
    tail -1 "$R/ops_tests.log"; grep -E "FAILED|panicked" "$R/ops_tests.log"
    ./.gpu/lorafuse bench ops --device cuda --dtypes f32,bf16 --json "$R/ops.json" > "$R/ops.log" 2>&1
    tail -1 "$R/ops.log"
    for op in lora_full base_gemm; do
      LORAFUSE_TF32=1 ./.gpu/lorafuse bench ops --device cuda --dtypes f32 --only $op --fused-only \
        --json "$R/tf32_$op.json" > "$R/tf32_$op.log" 2>&1
    done
    ;;
  mlx-part)
    source "$K/device-env.sh" > /dev/null
    cp .whl/a/part_aa /tmp/mlx_part_aa && ls -la /tmp/mlx_part_aa
    ;;
  peers)
    R=$OUT/peers
    mkdir -p "$R"
    source "$K/device-env.sh" > "$R/device.txt"
    cat "$R/device.txt"
    whl=/tmp/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl
    cat /tmp/mlx_part_aa .whl/b/part_ab > "$whl"
    tag=$(python3 -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      "$whl" .whl/b/mlx-0.32.4-$tag-*.whl .whl/b/liger*.whl > "$R/pip.log" 2>&1
    tail -3 "$R/pip.log"
    export PYTHONPATH=/tmp/site
    # MLX's CUDA libraries (cuDNN, cuBLAS, NVRTC, ...) are the ones PyTorch brought.
    nv=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia"))')
    for d in "$nv"/*/lib "$nv"/cu13/lib; do [ -d "$d" ] && LD_LIBRARY_PATH=$d:$LD_LIBRARY_PATH; done
    export LD_LIBRARY_PATH
    python3 -c "import mlx.core as mx; a = mx.ones((4,)); print('mlx', mx.__version__, mx.default_device(), (a + 1).tolist())" \
      2>&1 | tail -3 | tee "$R/mlx_check.log"
    python3 -c "import torch, liger_kernel; print('torch', torch.__version__)" 2>&1 | tail -1 | tee "$R/versions.log"
    (cd "$R" && timeout 420 python3 "$K/bench/peers_ops.py" torch compile liger mlx bwd > peers_ops.log 2>&1)
    grep -c . "$R/peers_ops.log"
    mkdir -p "$R/mlx_fp32"
    (cd "$R/mlx_fp32" && MLX_ENABLE_TF32=0 timeout 120 python3 "$K/bench/peers_ops.py" mlx > peers_ops.log 2>&1)
    grep -c . "$R/mlx_fp32/peers_ops.log"
    python3 scripts/gpu/session6-sdpa.py > "$R/sdpa.jsonl" 2>&1; cat "$R/sdpa.jsonl"
    ;;
  *)
    echo "usage: session7-table.sh ours|mlx-part|peers" >&2
    exit 2
    ;;
esac
tar czf "$OUT/$mode.tgz" -C "$OUT" --exclude='*.tgz' .
