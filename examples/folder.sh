#!/usr/bin/env bash
# Anonymize every video and image below IN_DIR into OUT_DIR (mirrored), skipping outputs that
# already exist, and print the files that failed (from the JSON report).
# Usage: examples/folder.sh IN_DIR OUT_DIR [extra deid options]
set -uo pipefail
in=${1:?usage: folder.sh IN_DIR OUT_DIR}; out=${2:?usage: folder.sh IN_DIR OUT_DIR}; shift 2
report=$(mktemp)
trap 'rm -f "$report"' EXIT
deid anonymize "$in" "$out" --json -q "$@" >"$report"
rc=$?
python3 - "$report" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
if "files" not in r:
    sys.exit(f"deid: {r.get('error')}")
print(f"{r['ok']} ok, {r['skipped']} skipped, {r['failed']} failed")
for f in r["files"]:
    if f["status"] == "failed":
        print(f"FAILED {f['input']}: {f['error']}")
PY
exit $rc
