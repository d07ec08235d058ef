#!/usr/bin/env bash
# Prepare, on a machine without a GPU, what research/gpu_check.sh needs on a lent GPU machine,
# which has PyTorch with CUDA but no network, no ../shared, no PyAV and no InsightFace:
#   .whl/  PyAV and InsightFace wheels for its Python (3.12, x86-64)
#   .kit/  the model files anonymize needs, the three clips the test fixtures cut from, and a
#          1920x1080 single-face clip (ghost_obama_short.mp4 scaled up, played 3 times: 624 frames)
# Both folders are ignored by git and never committed (../shared stays the only copy of its data);
# the device tool carries them: run(command="bash research/gpu_check.sh", carry=[".whl", ".kit"]).
# About 55 MB with the working tree (the tool's limit is 64 MiB).
#
#   bash research/gpu_kit.sh [SHARED]        (default ../shared; PY=.venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${1:-../shared}
PY=${PY:-.venv/bin/python}
mkdir -p .whl .kit/models .kit/videos

# Same versions as here, for CPython 3.12 on manylinux x86-64 (av's wheel is abi3, insightface's pure Python).
AV=$("$PY" -c "import importlib.metadata as m; print(m.version('av'))")
IF=$("$PY" -c "import importlib.metadata as m; print(m.version('insightface'))")
rm -f .whl/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "av==$AV" "insightface==$IF"

for f in det_scrfd_2.5g_kps.onnx rec_mobilefacenet.onnx; do cp "$SHARED/models/$f" .kit/models/; done
for f in ghost_2person.mp4 lp_d12.mp4 lp_d13.mp4; do cp "$SHARED/videos/$f" .kit/videos/; done
[ -s .kit/face1080.mp4 ] || "$PY" research/scale_clip.py "$SHARED/videos/ghost_obama_short.mp4" .kit/face1080.mp4 \
  --size 1920x1080 --repeat 3
du -sh .whl .kit
git ls-files -z | du -cb --files0-from=- | tail -1 | awk '{printf "tracked files: %.1f MB\n", $1 / 1e6}'
