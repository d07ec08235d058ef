#!/usr/bin/env bash
# A cron job for a GPU box: anonymize new uploads, one run at a time, with a time limit.
#   */10 * * * *  /opt/deid/examples/cron.sh /data/incoming /data/anonymized >>/var/log/deid.log 2>&1
# - flock: a run that is still going makes the next one exit at once (overlapping runs would be
#   safe anyway: deid locks each output, see docs/pipelines.md "Several runs at once", but would
#   compete);
# - timeout sends SIGTERM: deid removes the partial output, writes the report and exits 143
#   (timeout itself then exits 124); the next run redoes the file. After a kill -9 the next run
#   removes the dead run's temporary file first;
# - finished outputs are skipped (no --overwrite), so each run only does new files;
# - --report writes the JSON report atomically, also when the run is stopped.
set -uo pipefail
in=${1:?usage: cron.sh IN_DIR OUT_DIR}; out=${2:?usage: cron.sh IN_DIR OUT_DIR}
lock=${DEID_LOCK:-/tmp/deid-cron.lock}
exec 9>"$lock"
flock -n 9 || { echo "$(date -Is) previous run still active"; exit 0; }
mkdir -p "$out"
timeout --signal=TERM "${DEID_TIMEOUT:-3000}" \
  deid anonymize "$in" "$out" --device "${DEID_DEVICE:-auto}" --report "$out/.last-report.json" -q 2>>"$out/.errors.log"
rc=$?
case $rc in
  0) echo "$(date -Is) ok" ;;
  1) echo "$(date -Is) some files failed; see $out/.last-report.json" ;;
  3) echo "$(date -Is) models missing: run 'deid models' / 'deid models download'" ;;
  124|130|143) echo "$(date -Is) stopped by the time limit; partial output removed" ;;
  *) echo "$(date -Is) exit $rc" ;;
esac
exit $rc
