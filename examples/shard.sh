#!/usr/bin/env bash
# One folder split over N workers with --shard I/N (0-based: 0/N ... N-1/N). Each input goes to
# shard sha1(its path relative to IN_DIR) mod N: the split does not depend on listing order, on
# the machine or on which outputs exist, so the N workers cover the folder exactly once, and a
# worker that is restarted (or rerun after a kill) finishes its own remaining files.
#
# Usage: examples/shard.sh IN_DIR OUT_DIR [extra deid options]
#   Shard from the environment: DEID_SHARD=I/N, or a scheduler's index (below), default 0/1.
#
# Slurm job array of 8 tasks (a contiguous range; --array=1-8 works too, the minimum is subtracted):
#   sbatch --array=0-7 --gres=gpu:1 --wrap 'examples/shard.sh /data/in /data/out'
#   i.e. deid anonymize IN OUT --shard $((SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN))/$SLURM_ARRAY_TASK_COUNT
# Kubernetes indexed Job (completionMode: Indexed, completions: 8, parallelism: 8): each pod
#   gets JOB_COMPLETION_INDEX=0..7; set DEID_SHARDS=8 in the pod spec and run this script.
# GNU parallel, 4 local workers ({#} is 1-based):
#   parallel -j4 'DEID_SHARD=$(({#} - 1))/4 examples/shard.sh /data/in /data/out' ::: 1 2 3 4
#
# Exit status is deid's (0 ok, 1 some failed, 3 models, 130/143 interrupted); each worker
# writes its own report next to the outputs: OUT_DIR/.deid-report-shard-I-of-N.json.
set -uo pipefail
in=${1:?usage: shard.sh IN_DIR OUT_DIR [options]}; out=${2:?usage: shard.sh IN_DIR OUT_DIR [options]}; shift 2
if [[ -n "${DEID_SHARD:-}" ]]; then
  shard=$DEID_SHARD
elif [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
  shard=$((SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0}))/${SLURM_ARRAY_TASK_COUNT:?}
elif [[ -n "${JOB_COMPLETION_INDEX:-}" ]]; then
  shard=$JOB_COMPLETION_INDEX/${DEID_SHARDS:?set DEID_SHARDS to the number of completions}
else
  shard=0/1
fi
mkdir -p "$out"
i=${shard%/*}; n=${shard#*/}
exec deid anonymize "$in" "$out" --shard "$shard" --report "$out/.deid-report-shard-$i-of-$n.json" -q "$@"
