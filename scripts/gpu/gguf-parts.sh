# Sourced by the session scripts that need the SmolLM2 GGUF on the GPU machine. The file (98 MB)
# is over one call's carry limit (64 MiB), so it travels in three parts to one warm machine:
#   gguf_part part1|part2   (carry .p1, then .p2): copies that part to /tmp/g;
#   gguf_join FILE          (carry .p3 with the run): joins the parts into FILE, checks the sha256.
# Parts made here with: split -b 40000000 models/SmolLM2-135M-Instruct.Q4_1.gguf gguf.part_
# (part_aa to .p1/, part_ab to .p2/, part_ac and the file's sha256 to .p3/).
mkdir -p /tmp/g
gguf_part() {
  case "$1" in
    part1) cp .p1/* /tmp/g/ ;;
    part2) cp .p2/* /tmp/g/ ;;
  esac
  ls -la /tmp/g
}
gguf_join() {
  cat /tmp/g/gguf.part_aa /tmp/g/gguf.part_ab .p3/gguf.part_ac > "$1"
  echo "$(cat .p3/sha256)  $1" | sha256sum -c -
}
