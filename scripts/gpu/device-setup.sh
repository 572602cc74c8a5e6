# Sourced by the session scripts on the GPU machine once they have set R (their results folder):
# makes $OUT and $R, loads .gpu/device-env.sh (its GPU line goes to $R/device.txt and stdout) and
# unpacks the staged .gz executables.
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" "$R"
source .gpu/device-env.sh > "$R/device.txt"
cat "$R/device.txt"
for f in .gpu/*.gz; do gunzip -kf "$f" && chmod +x "${f%.gz}"; done
