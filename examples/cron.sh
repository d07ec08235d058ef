#!/usr/bin/env bash
# A cron job for a GPU box: anonymize new uploads, one run at a time, with a time limit.
#   */10 * * * *  /opt/deid/examples/cron.sh /data/incoming /data/anonymized >>/var/log/deid.log 2>&1
# - flock: a run that is still going makes the next one exit at once;
# - timeout sends SIGTERM: deid removes the partial output and exits 130, the next run redoes the file;
# - finished outputs are skipped (no --overwrite), so each run only does new files.
set -uo pipefail
in=${1:?usage: cron.sh IN_DIR OUT_DIR}; out=${2:?usage: cron.sh IN_DIR OUT_DIR}
lock=${DEID_LOCK:-/tmp/deid-cron.lock}
exec 9>"$lock"
flock -n 9 || { echo "$(date -Is) previous run still active"; exit 0; }
timeout --signal=TERM "${DEID_TIMEOUT:-3000}" \
  deid anonymize "$in" "$out" --device "${DEID_DEVICE:-auto}" --json -q >"$out/.last-report.json.tmp" 2>>"$out/.errors.log"
rc=$?
mv -f "$out/.last-report.json.tmp" "$out/.last-report.json" 2>/dev/null
case $rc in
  0) echo "$(date -Is) ok" ;;
  1) echo "$(date -Is) some files failed; see $out/.last-report.json" ;;
  3) echo "$(date -Is) models missing: run 'deid models' / 'deid models download'" ;;
  124|130) echo "$(date -Is) stopped by the time limit; partial output removed" ;;
  *) echo "$(date -Is) exit $rc" ;;
esac
exit $rc
