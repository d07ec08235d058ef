"""CPU time per thread of one `deid anonymize` run (Linux): where the cores go.

    DEID_MODELS_DIR=../shared/models python research/thread_cpu.py IN OUT [deid anonymize options...]

Samples /proc/self/task every 0.2 s while the run goes on in this process and prints, per thread
name (deid's stage threads: deid-decode, deid-detect, deid-generate, deid-process; MainThread
encodes and muxes; threads Python does not know, e.g. x264's, show as ``python``), the CPU
seconds it used (user + system), next to the wall time. Model loading is included (MainThread).
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    seen: dict[str, tuple[str, float]] = {}  # tid -> (name, CPU seconds)
    tick = os.sysconf("SC_CLK_TCK")

    def sample() -> None:
        while True:
            names = {str(t.native_id): t.name for t in threading.enumerate()}
            for tid in os.listdir("/proc/self/task"):
                try:
                    name = names.get(tid) or seen.get(tid, (None,))[0] or \
                        open(f"/proc/self/task/{tid}/comm").read().strip()
                    fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
                    seen[tid] = (name, (int(fields[11]) + int(fields[12])) / tick)
                except OSError:
                    pass  # the thread ended between listing and reading
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True, name="sampler").start()
    from deidcli.cli.main import main as deid

    sys.argv = ["deid", "anonymize", *sys.argv[1:3], "--overwrite", "-q", *sys.argv[3:]]
    t0 = time.perf_counter()
    try:
        deid()
    except SystemExit as e:
        if e.code:
            raise
    wall = time.perf_counter() - t0
    time.sleep(0.3)
    per = collections.Counter()
    for name, cpu in seen.values():
        per[name] += cpu
    print(f"wall {wall:.2f} s, CPU {sum(per.values()):.2f} s ({sum(per.values()) / wall:.2f} cores)")
    for name, cpu in per.most_common():
        print(f"  {name:20s} {cpu:6.2f} s")


if __name__ == "__main__":
    main()
