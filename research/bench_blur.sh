#!/usr/bin/env bash
# Wall time of `deid anonymize --method blur` vs a plain re-encode (same decoder, encoder and
# settings, no face touched) on the given clips. Usage: research/bench_blur.sh CLIP... 
# Prints a markdown table. Needs DEID_MODELS_DIR (the Makefile sets it to ../shared/models).
set -euo pipefail
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "| clip | frames | plain re-encode s | deid blur s | blur fps | ratio |"
echo "|---|---|---|---|---|---|"
for clip in "$@"; do
  name=$(basename "$clip")
  t0=$(date +%s.%N)
  frames=$(python3 - "$clip" "$out/plain_$name" <<'PY'
import sys
from deidcli.media.transcode import transcode_video
from deidcli.options import EncodeOptions
s = transcode_video(sys.argv[1], sys.argv[2], lambda fr: ((f, f.image, []) for f in fr), EncodeOptions())
print(s["frames"])
PY
)
  t1=$(date +%s.%N)
  deid anonymize "$clip" "$out/blur_$name" --method blur -q
  t2=$(date +%s.%N)
  python3 - "$name" "$frames" "$t0" "$t1" "$t2" <<'PY'
import sys
name, n, t0, t1, t2 = sys.argv[1], int(sys.argv[2]), *map(float, sys.argv[3:])
plain, blur = t1 - t0, t2 - t1
print(f"| {name} | {n} | {plain:.1f} | {blur:.1f} | {n / blur:.1f} | {blur / plain:.2f}x |")
PY
done
