#!/usr/bin/env bash
# Anonymize one video (or image). Usage: examples/one_file.sh IN OUT [extra deid options]
# Exit status is deid's: 0 ok, 1 failed, 2 usage, 3 models missing, 130/143 interrupted (SIGINT/SIGTERM).
set -euo pipefail
in=${1:?usage: one_file.sh IN OUT [options]}; out=${2:?usage: one_file.sh IN OUT [options]}; shift 2
exec deid anonymize "$in" "$out" "$@"
