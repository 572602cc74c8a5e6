#!/usr/bin/env bash
# Builds the PC-sampling tool and stages it into .gpu/pcsamp/ (git-ignored, carried to the GPU machine):
#   libpcsamp.so        the CUPTI injection library (rpath $ORIGIN, static libstdc++)
#   libcupti.so.13.gz   CUPTI 13.0 from the nvidia-cuda-cupti wheel (run.sh gunzips it on first use)
#   pcsamp-selftest     a small sm_90 CUDA program to check the tool with (run.sh selftest)
# and fetches nvdisasm for pcsamp-report.py into $PCSAMP_TOOLS (default /tmp/pcsamp-tools).
# Needs: g++, python3 + pip (PyPI), unzip, gzip; the pinned CUDA 13.0 toolkit from
# ../shared/gpu/cuda-env.sh (for cuda.h and nvcc). Run from anywhere.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
STAGE=${PCSAMP_STAGE:-$ROOT/.gpu/pcsamp}
TOOLS=${PCSAMP_TOOLS:-/tmp/pcsamp-tools}
BUILD=${PCSAMP_BUILD:-/tmp/pcsamp-build}
CUPTI_SPEC=${CUPTI_SPEC:-nvidia-cuda-cupti==13.0.*}      # newest 13.0.x (13.0.85 when written)
NVDISASM_SPEC=${NVDISASM_SPEC:-nvidia-cuda-nvdisasm==13.2.86}  # no 13.0 wheel exists; any 13.x reads sm_90
mkdir -p "$TOOLS" "$BUILD" "$STAGE"

# --- the CUDA 13.0 toolkit (cuda.h, nvcc)
CUDA_ENV=$ROOT/../shared/gpu/cuda-env.sh
[ -f "$CUDA_ENV" ] || CUDA_ENV=/work/shared/gpu/cuda-env.sh
# shellcheck disable=SC1090
source "$CUDA_ENV"
CUDA_INC=$CUDA_ROOT/include
[ -f "$CUDA_INC/cuda.h" ] || { echo "build.sh: no cuda.h in $CUDA_INC" >&2; exit 1; }

# --- CUPTI 13.0 (headers + libcupti.so.13) from its wheel
fetch_wheel() {  # spec dest
  local spec=$1 dest=$2
  if ! ls "$dest"/*.whl >/dev/null 2>&1; then
    python3 -m pip download -q --no-deps "$spec" -d "$dest"
  fi
  local whl
  whl=$(ls "$dest"/*.whl | sort -V | tail -1)
  if [ ! -f "$dest/x/.unpacked-$(basename "$whl")" ]; then
    rm -rf "$dest/x"; mkdir -p "$dest/x"
    unzip -q -o "$whl" -d "$dest/x"
    touch "$dest/x/.unpacked-$(basename "$whl")"
  fi
  echo "build.sh: $(basename "$whl")" >&2
}
fetch_wheel "$CUPTI_SPEC" "$TOOLS/cupti"
CUPTI=$TOOLS/cupti/x/nvidia/cu13
[ -f "$CUPTI/include/cupti_pcsampling.h" ] && [ -f "$CUPTI/lib/libcupti.so.13" ] || {
  echo "build.sh: unexpected layout of the CUPTI wheel under $TOOLS/cupti/x" >&2; exit 1; }

# --- nvdisasm for the report (runs here, not on the GPU machine)
fetch_wheel "$NVDISASM_SPEC" "$TOOLS/nvdisasm"
chmod +x "$TOOLS/nvdisasm/x/nvidia/cu13/bin/nvdisasm"
ln -sf "$TOOLS/nvdisasm/x/nvidia/cu13/bin/nvdisasm" "$TOOLS/nvdisasm-bin"

# --- libpcsamp.so (exports InitializeInjection only; libstdc++ linked in and hidden)
printf '{ global: InitializeInjection; local: *; };\n' > "$BUILD/exports.map"
g++ -std=c++17 -O2 -g -fPIC -shared -Wall -Wextra -Wno-missing-field-initializers \
    -fvisibility=hidden -I"$CUPTI/include" -I"$CUDA_INC" \
    "$HERE/pcsamp.cpp" -o "$BUILD/libpcsamp.so" \
    -L"$CUPTI/lib" -l:libcupti.so.13 -ldl -lpthread \
    -static-libstdc++ \
    -Wl,--exclude-libs,ALL -Wl,-Bsymbolic -Wl,--version-script,"$BUILD/exports.map" \
    -Wl,--disable-new-dtags,-rpath,'$ORIGIN' -Wl,-z,defs -Wl,--as-needed
strip --strip-debug -o "$STAGE/libpcsamp.so" "$BUILD/libpcsamp.so"

# --- CUPTI itself (gzip: run.sh unpacks it)
gzip -9 -c "$CUPTI/lib/libcupti.so.13" > "$STAGE/libcupti.so.13.gz"
# libnvperf_host.so: CUPTI names it (for the profiling/metric APIs); PC sampling does not need it (session 7
# ran on an H100 and an H200 without it), so it stays out unless PCSAMP_NVPERF=1 (~7 MB gzipped)
rm -f "$STAGE/libcupti.so.13" "$STAGE/libnvperf_host.so"  # stale unpacked copies would shadow rebuilt .gz
if [ "${PCSAMP_NVPERF:-0}" != 0 ]; then
  gzip -9 -c "$CUPTI/lib/libnvperf_host.so" > "$STAGE/libnvperf_host.so.gz"
  (cd "$CUPTI/lib" && sha256sum libcupti.so.13 libnvperf_host.so) > "$STAGE/SHA256SUMS"
else
  rm -f "$STAGE/libnvperf_host.so.gz"
  (cd "$CUPTI/lib" && sha256sum libcupti.so.13) > "$STAGE/SHA256SUMS"
fi

# --- the self-test: kernels compiled to sm_90 SASS (runtime API) plus one loaded from PTX through
#     cuModuleLoadData (JIT by the driver, as our Rust binaries do)
nvcc -arch=compute_90 -ptx -DPCSAMP_PTX_ONLY "$HERE/selftest.cu" -o "$BUILD/selftest_jit.ptx"
python3 - "$BUILD/selftest_jit.ptx" "$BUILD/selftest_jit_ptx.h" <<'PY'
import sys
ptx = open(sys.argv[1]).read()
with open(sys.argv[2], "w") as f:
    f.write("static const char kJitPtx[] =\n")
    for line in ptx.splitlines():
        f.write('"' + line.replace("\\", "\\\\").replace('"', '\\"') + '\\n"\n')
    f.write(";\n")
PY
nvcc -O2 -std=c++17 -gencode arch=compute_90,code=sm_90 -lineinfo -I"$BUILD" \
     -Xcompiler -static-libstdc++ -cudart static \
     "$HERE/selftest.cu" -o "$STAGE/pcsamp-selftest" -L"$CUDA_ROOT/lib" -ldl

# --- checks
echo "== nm -D libpcsamp.so (InitializeInjection)"; nm -D --defined-only "$STAGE/libpcsamp.so" | grep -w InitializeInjection
echo "== readelf -d (NEEDED, RPATH)"; readelf -d "$STAGE/libpcsamp.so" | grep -E 'NEEDED|RPATH|RUNPATH'
echo "== ldd (libcupti must resolve through \$ORIGIN)"
gunzip -kf "$STAGE/libcupti.so.13.gz"
LDD=$(ldd "$STAGE/libpcsamp.so"); echo "$LDD"
grep -q "libcupti.so.13 => $STAGE/libcupti.so.13" <<<"$LDD" || { echo "build.sh: libcupti did not resolve via rpath" >&2; exit 1; }
rm -f "$STAGE/libcupti.so.13"
echo "== glibc versions required (the GPU machine runs binaries needing GLIBC_2.34)"
objdump -T "$STAGE/libpcsamp.so" "$STAGE/pcsamp-selftest" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1
echo "== staged: $STAGE"; ls -la "$STAGE"; du -sh "$STAGE"
