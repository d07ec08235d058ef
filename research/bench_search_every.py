"""`--search-every` values side by side, alternated: `deid bench` of each clip at each value.

    python research/bench_search_every.py CLIP ... [--values 1 4] [--rounds 3] [--config generate]
        [--config live] [--config reencode]

Each (round, clip, value) is one `deid bench CLIP --config ... --search-every N --json` (a fresh
process per configuration, wall time less model loading). The values alternate within a round so
that drifts of the machine hit all of them. Prints one markdown row per run (frames/s, x re-encode
where the re-encode ran, the detect stage's thread seconds, searches made; for live: dropped share
and latency p50/p95) and a median per clip, configuration and value. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(clip: str, configs: list, value: int) -> list:
    with tempfile.TemporaryDirectory(prefix="deid-search-") as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-c", "from deidcli.cli import main; main()", "bench", clip,
               "--search-every", str(value), "--json", str(out)]
        for c in configs:
            cmd += ["--config", c]
        subprocess.run(cmd, check=True, capture_output=True)
        return json.loads(out.read_text())["runs"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("clips", nargs="+")
    ap.add_argument("--values", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--config", dest="configs", action="append", default=None)
    a = ap.parse_args()
    configs = a.configs or ["reencode", "generate"]
    rows, by = [], {}
    print("| round | clip | config | --search-every | frames/s | x re-encode | detect s | searched | dropped | latency p50 / p95 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in range(a.rounds):
        for clip in a.clips:
            for v in a.values:
                runs = run(clip, configs, v)
                re = next((x for x in runs if x["config"] == "reencode"), None)
                for x in runs:
                    if x["config"] == "reencode":
                        continue
                    ratio = round(x["wall_s"] / re["wall_s"], 2) if re and x["config"] != "live" else "-"
                    lat = x.get("latency_ms") or {}
                    row = (r + 1, Path(clip).stem, x["config"], v, x.get("fps"), ratio,
                           x.get("stages", {}).get("detect", "-"), x.get("frames_searched", "-"),
                           f"{x['dropped_percent']}%" if "dropped_percent" in x else "-",
                           f"{lat.get('p50')} / {lat.get('p95')}" if lat else "-")
                    print("| " + " | ".join(str(c) for c in row) + " |", flush=True)
                    by.setdefault((Path(clip).stem, x["config"], v), []).append(x)
    print("\n| clip | config | --search-every | median frames/s | median dropped | median p95 ms |")
    print("|---|---|---|---|---|---|")
    for (clip, config, v), xs in by.items():
        fps = statistics.median(x["fps"] for x in xs)
        drop = statistics.median(x["dropped_percent"] for x in xs) if "dropped_percent" in xs[0] else "-"
        p95 = statistics.median(x["latency_ms"]["p95"] for x in xs) if "latency_ms" in xs[0] else "-"
        print(f"| {clip} | {config} | {v} | {fps} | {drop} | {p95} |")


if __name__ == "__main__":
    main()
