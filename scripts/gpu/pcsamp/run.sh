#!/usr/bin/env bash
# Runs a command under CUPTI PC sampling (libpcsamp.so, staged by build.sh into .gpu/pcsamp/).
#
#   bash scripts/gpu/pcsamp/run.sh OUTDIR [-- ] COMMAND [ARGS...]
#   bash scripts/gpu/pcsamp/run.sh OUTDIR selftest [ITERATIONS]      # the bundled test program
#
# Run it from the repository root on the GPU machine. It unpacks the staged libcupti (once), sources
# .gpu/device-env.sh when present (libcuda + the CUDA libraries our binaries need), puts the staged
# CUPTI first on LD_LIBRARY_PATH, sets CUDA_INJECTION64_PATH and PCSAMP_OUT=OUTDIR, runs the command
# and lists what was written. PCSAMP_* variables set by the caller (PCSAMP_KERNEL, PCSAMP_PERIOD, ...)
# pass through; see README.md. Exits with the command's status.
set -uo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,11p' "$0" >&2
  exit 2
fi
OUT=$1; shift
[ "${1:-}" = "--" ] && shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
STAGE=${PCSAMP_STAGE:-$ROOT/.gpu/pcsamp}
[ -f "$STAGE/libpcsamp.so" ] || { echo "run.sh: no $STAGE/libpcsamp.so (run scripts/gpu/pcsamp/build.sh and carry .gpu)" >&2; exit 2; }

# unpack gzipped libraries next to libpcsamp.so (its rpath is $ORIGIN)
for gz in "$STAGE"/*.so*.gz; do
  [ -e "$gz" ] || continue
  lib=${gz%.gz}
  if [ ! -s "$lib" ] || [ "$gz" -nt "$lib" ]; then
    gunzip -c "$gz" > "$lib.tmp.$$" && mv -f "$lib.tmp.$$" "$lib" || { echo "run.sh: cannot unpack $gz" >&2; exit 2; }
  fi
done
if [ -f "$STAGE/SHA256SUMS" ] && command -v sha256sum >/dev/null; then
  (cd "$STAGE" && sha256sum -c --quiet SHA256SUMS) || echo "run.sh: WARNING: libcupti checksum mismatch" >&2
fi

if [ "${1:-}" = "selftest" ]; then
  shift
  set -- "$STAGE/pcsamp-selftest" "$@"
fi

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# outputs of an earlier run in the same folder would mix with this one's
rm -rf "$OUT"/.owner "$OUT"/pid[0-9]* "$OUT"/samples.tsv "$OUT"/summary.txt "$OUT"/modules.tsv \
       "$OUT"/stall_reasons.tsv "$OUT"/getdata.tsv "$OUT"/pcsamp.log "$OUT"/cubin_*.cubin "$OUT"/.cubins.*

if [ -f "$ROOT/.gpu/device-env.sh" ]; then
  # shellcheck disable=SC1091
  source "$ROOT/.gpu/device-env.sh" > "$OUT/device.txt" 2>&1 || true
  cat "$OUT/device.txt"
fi
export LD_LIBRARY_PATH=$STAGE${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export CUDA_INJECTION64_PATH=$STAGE/libpcsamp.so
export PCSAMP_OUT=$OUT
{
  echo "command: $*"
  echo "date: $(date -u +%FT%TZ)"
  env | grep -E '^PCSAMP_|^CUDA_INJECTION64_PATH=' | sort
  echo "ldd libpcsamp.so:"; ldd "$STAGE/libpcsamp.so" 2>&1 | sed 's/^/  /'
} > "$OUT/run-info.txt"
grep -q 'libcupti.so.13 => not found' "$OUT/run-info.txt" && echo "run.sh: WARNING: libcupti.so.13 does not resolve (see $OUT/run-info.txt)" >&2

echo "run.sh: PC sampling -> $OUT: $*" >&2
start=$(date +%s)
"$@"
rc=$?
echo "run.sh: exit status $rc after $(( $(date +%s) - start )) s" >&2
unset CUDA_INJECTION64_PATH

echo "== $OUT"
ls -la "$OUT"
for d in "$OUT"/pid[0-9]*; do [ -d "$d" ] && { echo "== $d (another process)"; ls -la "$d"; }; done
if [ -f "$OUT/summary.txt" ]; then
  echo "== summary.txt (head)"
  head -n 60 "$OUT/summary.txt"
else
  echo "run.sh: no summary.txt: the program did not exit normally or sampling never started; pcsamp.log:" >&2
  cat "$OUT/pcsamp.log" 2>/dev/null | tail -n 30 >&2
fi
exit $rc
