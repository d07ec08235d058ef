#!/usr/bin/env bash
# Anonymize every clip in a folder with default options (plus any extra deid options given),
# then evaluate the outputs with `deid evaluate-video` (exposure, identity, flicker, mouth).
#   research/evaluate_clips.sh ../shared/videos out/vid [deid anonymize options...]
# Writes OUT/<clip>.deid.mp4, OUT/<clip>.report.json, OUT/eval.json, OUT/eval.md, OUT/strip_<clip>.png.
set -euo pipefail
src=${1:?usage: $0 CLIPS_DIR OUT_DIR [options]}; out=${2:?usage: $0 CLIPS_DIR OUT_DIR [options]}; shift 2
mkdir -p "$out"
pairs=()
for clip in "$src"/*.mp4; do
  stem=$(basename "$clip" .mp4)
  deid anonymize "$clip" "$out/$stem.deid.mp4" --overwrite -q --report "$out/$stem.report.json" "$@"
  pairs+=("$clip" "$out/$stem.deid.mp4")
done
deid evaluate-video "${pairs[@]}" --json "$out/eval.json" --markdown "$out/eval.md" --strip "$out/strip.png" -q > /dev/null
cat "$out/eval.md"
