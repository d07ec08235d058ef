#!/usr/bin/env bash
# The noise floor of `deid evaluate-video`: every clip against its own plain re-encode.
# A re-encode with deid's encoder settings touches no face, so what evaluate-video reports for
# it is measurement noise (landmark jitter, the integer dlib lip points, compression flicker);
# read an anonymized clip's figures against it (evaluate_clips.sh writes the same table).
#   research/reencode_floor.sh ../shared/videos out/floor
# Writes OUT/<clip>.reenc.mp4, OUT/eval.json, OUT/eval.md.
set -euo pipefail
src=${1:?usage: $0 CLIPS_DIR OUT_DIR}; out=${2:?usage: $0 CLIPS_DIR OUT_DIR}
mkdir -p "$out"
pairs=()
for clip in "$src"/*.mp4; do
  dst="$out/$(basename "$clip" .mp4).reenc.mp4"
  python - "$clip" "$dst" <<'PY'
import sys
from pathlib import Path
from deidcli.media.images import atomic_output
from deidcli.media.transcode import reencode
from deidcli.options import EncodeOptions
src, dst = sys.argv[1], Path(sys.argv[2])
with atomic_output(dst) as tmp:
    reencode(src, tmp, EncodeOptions())
PY
  pairs+=("$clip" "$dst")
done
deid evaluate-video "${pairs[@]}" --json "$out/eval.json" --markdown "$out/eval.md" -q > /dev/null
cat "$out/eval.md"
