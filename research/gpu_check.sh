#!/usr/bin/env bash
# Every GPU measurement of issue 4 and deid's CUDA tests in one call on a lent GPU machine, from
# what research/gpu_kit.sh prepared (.whl, .kit). From the device tool:
#   run(command="bash research/gpu_check.sh", carry=[".whl", ".kit"], timeout_s=480)
# Writes 7 files to $OUT (default out/gpu_check; the tool brings back at most 8): gpu_check.log
# (everything printed, the markdown tables included), bench_{1080p,1080p_nvenc,gen256,2person}.json,
# face1080.deid.mp4 and its report (evaluate it afterwards on the CPU machine:
# `deid evaluate-video .kit/face1080.mp4 OUT/face1080.deid.mp4`).
# Each step runs on when an earlier one fails: one call should bring back everything it can.
# On a CPU machine DEVICE=cpu rehearses the script (no --fp16, and the CUDA tests skip).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TEE=$!
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
FP16=$([ "$DEVICE" = cpu ] || echo --fp16)
export PYTHONUNBUFFERED=1
step() { echo; echo "== $(date +%T) $*"; }
deid() { "$PY" -m deidcli.cli "$@"; }

step "environment"
if ls .whl/*.whl >/dev/null 2>&1 && ! "$PY" -c "import av, insightface" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ ! -e ../shared ] && [ -d .kit ]; then  # the tests look for ../shared beside the checkout
  mkdir -p ../shared/models ../shared/videos
  cp .kit/models/* ../shared/models/ && cp .kit/videos/* ../shared/videos/
fi
export DEID_MODELS_DIR=${DEID_MODELS_DIR:-$(cd ../shared/models && pwd)}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
nproc
"$PY" - <<'EOF'
import av, insightface, numpy, onnxruntime, torch
print(f"torch {torch.__version__} cuda {torch.version.cuda} available {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
print(f"av {av.__version__}, insightface {insightface.__version__}, onnxruntime {onnxruntime.__version__} "
      f"{onnxruntime.get_available_providers()}, numpy {numpy.__version__}")
EOF
deid doctor

step "CUDA tests (tests/test_cuda.py)"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py

CLIP=.kit/face1080.mp4
step "bench, 1920x1080 single face, $DEVICE $FP16, batch 64, libx264 medium (the default encoder)"
deid bench "$CLIP" --device "$DEVICE" $FP16 --batch-size 64 --json "$OUT/bench_1080p.json"

step "bench, 1920x1080, generate with --codec h264_nvenc (the encoder on the GPU), and the generator at batch 256"
deid bench "$CLIP" --device "$DEVICE" $FP16 --batch-size 64 --codec h264_nvenc --config reencode --config generate \
  --json "$OUT/bench_1080p_nvenc.json"
deid bench "$CLIP" --device "$DEVICE" $FP16 --batch-size 256 --config generator --json "$OUT/bench_gen256.json"

step "bench, ghost_2person (1280x720, two faces), as on the CPU"
deid bench ../shared/videos/ghost_2person.mp4 --device "$DEVICE" $FP16 --batch-size 64 \
  --json "$OUT/bench_2person.json"

step "anonymize the 1080p clip on $DEVICE $FP16 (output and report come back)"
deid anonymize "$CLIP" "$OUT/face1080.deid.mp4" --device "$DEVICE" $FP16 --overwrite \
  --report "$OUT/face1080.report.json" --quiet
echo "exit $?"
ls -la "$OUT"
exec 1>&- 2>&-  # let tee write the end of the log before the tool collects $OUT
wait "$TEE" 2>/dev/null
