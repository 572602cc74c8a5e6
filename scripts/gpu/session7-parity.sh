#!/usr/bin/env bash
# Session 7: SmolLM2 parity on CUDA after the session's attention and RoPE changes, with the
# 98 MB GGUF carried in three calls to one warm machine (the carry limit is 64 MiB a call):
#   part1 (carry .p1), part2 (carry .p2): copy a part to /tmp/g;
#   run (carry .p3 .gpu): join, check the checksum, run scripts/gpu/parity-smollm2.sh.
set -uo pipefail
source scripts/gpu/gguf-parts.sh
case "${1:-}" in
  part1 | part2) gguf_part "$1" ;;
  run)
    R=/tmp/s7parity
    source scripts/gpu/device-setup.sh
    gguf_join /tmp/g/SmolLM2-135M-Instruct.Q4_1.gguf || exit 1
    TRANSFORMERS_BF16=0 OUT=$R bash scripts/gpu/parity-smollm2.sh > "$R/parity.log" 2>&1
    python3 -c "import json; d=json.load(open('$R/parity/summary.json')); print({k: (v.get('identical'), v.get('matching_prefix'), v.get('decode_tokens_per_s')) if 'identical' in v else v for k, v in d.items()})"
    tar czf "$OUT/s7parity.tgz" -C "$R" .
    ;;
  *) echo "usage: session7-parity.sh part1|part2|run" >&2; exit 2 ;;
esac
