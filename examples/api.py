"""Use deid as a library: the same call the CLI makes.

    python examples/api.py IN OUT [method]
"""

import json
import sys

from deidcli import AnonymizeOptions, anonymize

src, dst = sys.argv[1], sys.argv[2]
method = sys.argv[3] if len(sys.argv) > 3 else "generate"
report = anonymize(src, dst, AnonymizeOptions(method=method, overwrite=True))
print(json.dumps({k: report[k] for k in ("ok", "skipped", "failed", "device", "dtype")}))
sys.exit(1 if report["failed"] else 0)
