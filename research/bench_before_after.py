"""Same-day speed of `deid anonymize` from two source trees, alternated: before/after a change.

    git worktree add /tmp/before 45de7c1          # the tree to compare against (any commit)
    python research/bench_before_after.py /tmp/before [--after .] [--rounds 4] \
        [--clip ../shared/videos/ghost_2person.mp4] [--weights FILE] [--models-dir ../shared/models]

Each run is a fresh process that imports ``deidcli`` from its tree, builds the pipeline once
(imports, caches), then measures a second build (model loading) and one ``anonymize()`` of the
clip with that tree's defaults and the same generator checkpoint (``--weights``, default: the
working tree's shipped one; old trees take it through ``AnonymizeOptions(weights=)``). Reported
per run: frames/s of wall time and CPU seconds (user + system, every thread) per frame, both
less the model loading. The two trees alternate, ``--rounds`` times, so that drifts of a shared
machine hit both; the summary gives each tree's median and the median of the per-round ratios.
Prints markdown on stdout. Nothing is written outside a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(tree: Path, clip: Path, weights: Path, out: Path) -> dict:
    """In this process: one measured run of ``tree`` (called through ``--one``)."""
    sys.path.insert(0, str(tree))
    os.chdir(tree)
    from deidcli.pipeline.pipeline import Pipeline
    from deidcli.pipeline.anonymize import anonymize
    from deidcli.options import AnonymizeOptions

    opts = AnonymizeOptions(weights=weights, overwrite=True)
    Pipeline(opts)  # imports and caches, not measured
    c0, t0 = os.times(), time.perf_counter()
    Pipeline(opts)
    c1, t1 = os.times(), time.perf_counter()
    load_cpu, load_wall = (c1.user + c1.system) - (c0.user + c0.system), t1 - t0
    c0, t0 = os.times(), time.perf_counter()
    rep = anonymize(clip, out, opts)  # builds its own pipeline: load_* is taken off below
    c1, t1 = os.times(), time.perf_counter()
    f = rep["files"][0]
    if f.get("status", "ok") != "ok":
        raise SystemExit(f"{tree}: {f.get('error')}")
    wall = t1 - t0 - load_wall
    cpu = (c1.user + c1.system) - (c0.user + c0.system) - load_cpu
    return {"tree": str(tree), "frames": f["frames"], "fps": round(f["frames"] / wall, 2),
            "cpu_ms_per_frame": round(1000 * cpu / f["frames"], 1), "cores": round(cpu / wall, 2),
            "load_s": round(load_wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("before", type=Path, help="source tree to compare against (e.g. a git worktree)")
    ap.add_argument("--after", type=Path, default=ROOT, help="source tree measured against it (default: this one)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--clip", type=Path, default=ROOT.parent / "shared" / "videos" / "ghost_2person.mp4")
    ap.add_argument("--weights", type=Path, default=ROOT / "weights" / "deid_generator_128.pt")
    ap.add_argument("--models-dir", type=Path,
                    default=Path(os.environ.get("DEID_MODELS_DIR") or ROOT.parent / "shared" / "models"),
                    help="detector and identity model files (given to both trees as DEID_MODELS_DIR)")
    ap.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one.resolve(), a.clip.resolve(), a.weights.resolve(), a.out)))
        return
    for p in (a.before, a.after, a.clip, a.weights, a.models_dir):
        if not p.exists():
            sys.exit(f"not found: {p}")
    env = {**os.environ, "DEID_MODELS_DIR": str(a.models_dir.resolve())}
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="deid-ab-") as tmp:
        for r in range(a.rounds):
            for name, tree in (("before", a.before), ("after", a.after)):
                p = subprocess.run([sys.executable, __file__, str(a.before), "--one", str(tree), "--clip", str(a.clip),
                                    "--weights", str(a.weights), "--out", str(Path(tmp) / f"{name}{r}.mp4")],
                                   capture_output=True, text=True, env=env)
                if p.returncode:
                    last = (p.stderr.strip().splitlines() or ["no output"])[-1]
                    sys.exit(f"{name} run ({tree}) failed: {last}")
                runs[name].append(json.loads(p.stdout.strip().splitlines()[-1]))
                print(f"round {r + 1} {name}: {runs[name][-1]}", file=sys.stderr)
    print(f"`{a.clip.name}`, {a.rounds} rounds alternated; wall time and CPU less model loading\n")
    print("| round | before frames/s | after frames/s | ratio | before CPU ms/frame | after CPU ms/frame | CPU ratio |")
    print("|---|---|---|---|---|---|---|")
    ratios, cpu_ratios = [], []
    for r, (b, f) in enumerate(zip(runs["before"], runs["after"])):
        ratios.append(f["fps"] / b["fps"])
        cpu_ratios.append(b["cpu_ms_per_frame"] / f["cpu_ms_per_frame"])
        print(f"| {r + 1} | {b['fps']} | {f['fps']} | {ratios[-1]:.2f} | {b['cpu_ms_per_frame']} | "
              f"{f['cpu_ms_per_frame']} | {cpu_ratios[-1]:.2f} |")
    med = {k: statistics.median(x["fps"] for x in v) for k, v in runs.items()}
    print(f"| median | {med['before']:.2f} | {med['after']:.2f} | {statistics.median(ratios):.2f} | "
          f"{statistics.median(x['cpu_ms_per_frame'] for x in runs['before']):.1f} | "
          f"{statistics.median(x['cpu_ms_per_frame'] for x in runs['after']):.1f} | {statistics.median(cpu_ratios):.2f} |")


if __name__ == "__main__":
    main()
