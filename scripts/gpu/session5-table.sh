#!/usr/bin/env bash
# The op table of one GPU session, over calls made back to back while the machine stays warm
# (it keeps /tmp between them). scripts/gpu/session5-sweep.sh ran first and left the executables
# in /tmp/keep.
#   mlx-part   carry .whlA (the first half of the mlx-cuda-13 wheel): kept in /tmp.
#   peers      carry .whlB (the second half and the mlx wheel): joins and installs MLX, then the
#              peers' table: torch eager, torch.compile, Liger, MLX (CUDA), forward and backward.
#   ours ENV.. our `bench ops` (fused and stock Candle), with the tuning switches ENV chosen from
#              the sweep.
set -uo pipefail
OUT=${OUT:-/tmp/out}
K=/tmp/keep
mkdir -p "$OUT"
mode=${1:-}
shift || true
source "$K/device-env.sh" > "$OUT/device.txt"
cat "$OUT/device.txt"
case "$mode" in
  mlx-part)
    cp .whlA/part_aa /tmp/mlx_part_aa && ls -la /tmp/mlx_part_aa
    ;;
  peers)
    whl=/tmp/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl
    cat /tmp/mlx_part_aa .whlB/part_ab > "$whl"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      "$whl" .whlB/mlx-*.whl "$K"/liger*.whl > "$OUT/pip.log" 2>&1
    tail -3 "$OUT/pip.log"
    export PYTHONPATH=/tmp/site
    # MLX's CUDA libraries (cuDNN, cuBLAS, NVRTC, ...) are the ones PyTorch brought.
    nv=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia"))')
    for d in "$nv"/*/lib "$nv"/cu13/lib; do [ -d "$d" ] && LD_LIBRARY_PATH=$d:$LD_LIBRARY_PATH; done
    export LD_LIBRARY_PATH
    python3 -c "import mlx.core as mx; a = mx.ones((4,)); print('mlx', mx.__version__, mx.default_device(), (a + 1).tolist())" \
      2>&1 | tail -3 | tee "$OUT/mlx_check.log"
    (cd "$OUT" && timeout 420 python3 "$K/bench/peers_ops.py" torch compile liger mlx bwd > peers_ops.log 2>&1)
    grep -c . "$OUT/peers_ops.log"
    grep -m3 -i "mlx" "$OUT/peers_ops.log"
    # MLX's f32 matmuls use TF32 by default; its full-f32 figures too, for the like-for-like rows.
    mkdir -p "$OUT/mlx_fp32"
    (cd "$OUT/mlx_fp32" && MLX_ENABLE_TF32=0 timeout 120 python3 "$K/bench/peers_ops.py" mlx > peers_ops.log 2>&1)
    grep -c . "$OUT/mlx_fp32/peers_ops.log"
    ;;
  ours)
    env "$@" "$K/lorafuse" bench ops --device cuda --dtypes f32,bf16 --json "$OUT/ops.json" \
      > "$OUT/ops.log" 2>&1
    echo "env: $*" > "$OUT/ops_env.txt"
    tail -2 "$OUT/ops.log"
    ;;
  *)
    echo "usage: session5-table.sh mlx-part|peers|ours [ENV=VALUE ...]" >&2
    exit 2
    ;;
esac
