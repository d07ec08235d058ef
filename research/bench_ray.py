"""What `deid anonymize --ray` costs and gains on one machine: a folder run through a local Ray
cluster against the plain folder run, and the overhead Ray adds per run and per file.

    python research/bench_ray.py [SRC_DIR] [--method generate] [--workers 2] [--rounds 1]
                                 [--tiny 4,32] [--skip-folder] [--skip-tiny] [--calls 200]

1. The folder (default ../shared/videos): `deid anonymize SRC OUT --method M` and the same with
   `--ray --ray-workers W` (a local cluster started by deid for the run), alternated for
   ``--rounds`` rounds, each into a fresh folder. Prints the wall time of each, the Ray run's
   start (connecting + the first worker's models loaded) and each file's worker and seconds.
2. The overhead: N copies of a 0.5 s clip cut from the folder's first video, for each N in
   ``--tiny``, plain and with one Ray worker (`--method blur`: little work per file). The slope of
   wall time against N is the cost of one file; the Ray slope minus the plain one is what Ray adds
   per file (driver probe, scheduling, a round trip), the difference at N = 0 what it adds per run
   (starting and stopping the cluster and its worker processes). CPU time too: on a busy machine
   wall times mostly measure the other jobs.
3. Per file, directly (``--calls``): the driver's header read of each video, and one file's
   round trip to a real worker and back (an output that exists: every step but the work),
   through Ray against in-process.

Wall times come from the `deid` process as a user runs it (imports, model loading included).
The figures in docs/cluster.md come from this script.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEID = [sys.executable, "-m", "deidcli.cli"]


def deid(*args) -> tuple[float, float, dict]:
    """(wall seconds, CPU seconds, report) of one `deid ... --json`. The CPU time is that of the
    deid process and the processes it waited for (with a local cluster: those Ray's shutdown
    waits for), plus, for a --ray run, each worker's own (``cpu_seconds`` in the report: the
    workers are not deid's children)."""
    t, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run([*DEID, *map(str, args), "--json"], capture_output=True, text=True,
                       env=dict(os.environ, RAY_DISABLE_USAGE_STATS="1"))
    wall, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        sys.exit(f"deid {' '.join(map(str, args))}: exit {p.returncode}\n{p.stderr[-3000:]}")
    rep = json.loads(p.stdout)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    cpu += sum(w.get("cpu_seconds", 0.0) for w in (rep.get("cluster") or {}).get("workers", []))
    return wall, cpu, rep


def cut(src: Path, dst: Path, seconds: float) -> None:
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        vin = inp.streams.video[0]
        ostream = out.add_stream_from_template(vin)
        for pkt in inp.demux(vin):
            if pkt.dts is None or pkt.pts is None:
                continue
            if float(pkt.pts * pkt.time_base) >= seconds:
                break
            pkt.stream = ostream
            out.mux(pkt)


def folder(src: Path, method: str, workers: int, rounds: int, tmp: Path) -> None:
    print(f"## {src} (--method {method}); plain vs --ray --ray-workers {workers} (local cluster)\n")
    for r in range(rounds):
        for mode in ("plain", "ray"):
            out = tmp / f"{mode}{r}"
            extra = ["--ray", "--ray-workers", str(workers)] if mode == "ray" else []
            load = os.getloadavg()[0]
            wall, cpu, rep = deid("anonymize", src, out, "--method", method, *extra)
            frames = sum(f["frames"] for f in rep["files"])
            line = (f"round {r + 1} {mode:5s}: wall {wall:6.1f} s, {frames} frames, {frames / wall:5.1f} frames/s, "
                    f"CPU {cpu:6.1f} s ({cpu / frames * 1000:.0f} ms/frame), "
                    f"sum of file seconds {sum(f['seconds'] for f in rep['files']):6.1f}, "
                    f"load_seconds {rep['load_seconds']}, load average before {load:.2f}")
            if mode == "ray":
                line += f", start {rep['cluster']['start_seconds']} s"
            print(line)
            if mode == "ray":
                for f in rep["files"]:
                    print(f"    {Path(f['input']).name:34s} {f['frames']:5d} frames {f['seconds']:6.1f} s "
                          f"on {f['worker']} (attempts {f['attempts']})")
            shutil.rmtree(out)
    print()


def tiny(src: Path, counts: list[int], tmp: Path) -> None:
    first = sorted(p for p in src.iterdir() if p.suffix == ".mp4")[0]
    clip = tmp / "tiny.mp4"
    cut(first, clip, 0.5)
    print(f"## overhead: N copies of 0.5 s of {first.name} (--method blur), plain vs --ray --ray-workers 1\n")
    walls: dict = {"plain": {}, "ray": {}}
    for n in counts:
        d = tmp / f"tiny{n}"
        d.mkdir()
        for i in range(n):
            shutil.copy(clip, d / f"t{i:03d}.mp4")
        for mode in ("plain", "ray"):
            out = tmp / f"tiny{n}_{mode}"
            extra = ["--ray", "--ray-workers", "1"] if mode == "ray" else []
            load = os.getloadavg()[0]
            wall, cpu, rep = deid("anonymize", d, out, "--method", "blur", *extra)
            walls[mode][n] = wall
            secs = sum(f["seconds"] for f in rep["files"])
            start = f", start {rep['cluster']['start_seconds']} s" if mode == "ray" else ""
            print(f"N={n:3d} {mode:5s}: wall {wall:6.1f} s, CPU {cpu:6.1f} s, sum of file seconds {secs:5.1f}, "
                  f"load_seconds {rep['load_seconds']}{start}, load average before {load:.2f}")
            shutil.rmtree(out)
    if len(counts) >= 2:
        a, b = counts[0], counts[-1]
        slope = {m: (walls[m][b] - walls[m][a]) / (b - a) for m in walls}
        at0 = {m: walls[m][a] - slope[m] * a for m in walls}
        print(f"\nper file: plain {slope['plain']:.3f} s, ray {slope['ray']:.3f} s -> Ray adds "
              f"{slope['ray'] - slope['plain']:+.3f} s per file")
        print(f"per run (N = 0): plain {at0['plain']:.1f} s, ray {at0['ray']:.1f} s -> Ray adds "
              f"{at0['ray'] - at0['plain']:+.1f} s per run")
    print()


def round_trip(src: Path, tmp: Path, n: int) -> None:
    """Ray's own cost per file, measured directly (wall-time slopes drown in a busy machine's
    noise): the driver's header read of each video, and a file's round trip to a real deid worker
    (an actor, models loaded) and back, on an output that exists (the worker checks the marker and
    stale files, then skips it: everything but the work), against the same call in-process."""
    import ray

    from deidcli.options import AnonymizeOptions
    from deidcli.pipeline.cluster import Worker, _estimate, _Job

    videos = sorted(p for p in src.iterdir() if p.suffix == ".mp4")
    t = time.perf_counter()
    for _ in range(5):
        for v in videos:
            _estimate(_Job(0, v, v, str(v), str(v)))
    probe_ms = (time.perf_counter() - t) / (5 * len(videos)) * 1000
    out = tmp / "rt"
    out.mkdir()
    (out / "done.mp4").write_bytes(b"x")
    (out / ".deid-ray-bench").write_text("token")
    check = {"marker": str(out / ".deid-ray-bench"), "token": "token", "samples": []}
    args = (str(videos[0]), str(out / "done.mp4"), time.time())
    local = Worker(AnonymizeOptions(method="blur"), check, 1)
    local._factory()  # (ready() would start Ray: it asks for this node's id)
    t = time.perf_counter()
    for _ in range(n):
        assert local.process(*args)["result"]["status"] == "skipped"
    local_ms = (time.perf_counter() - t) / n * 1000
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=100 * 2**20,
             log_to_driver=False, logging_level="ERROR")
    try:
        actor = ray.remote(Worker).options(max_concurrency=4, num_cpus=1).remote(
            AnonymizeOptions(method="blur"), check, 1)
        ray.get(actor.ready.remote())
        for _ in range(10):  # warm up
            ray.get(actor.process.remote(*args))
        t = time.perf_counter()
        for _ in range(n):
            ray.get(actor.process.remote(*args))
        ray_ms = (time.perf_counter() - t) / n * 1000
    finally:
        ray.shutdown()
    print(f"## per file, measured directly ({n} calls; load average {os.getloadavg()[0]:.2f})\n")
    print(f"driver's header read (order, frame total): {probe_ms:.1f} ms per video ({len(videos)} videos x 5)")
    print(f"a file's call, in-process: {local_ms:.2f} ms; through Ray to a worker and back: {ray_ms:.2f} ms "
          f"-> Ray adds {ray_ms - local_ms:.2f} ms per file, {ray_ms - local_ms + probe_ms:.1f} ms with the header read")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", nargs="?", type=Path, default=ROOT.parent / "shared" / "videos")
    ap.add_argument("--method", default="generate")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--tiny", default="4,32", help="file counts of the overhead runs")
    ap.add_argument("--skip-folder", action="store_true")
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--calls", type=int, default=200, help="round trips timed (0: skip that part)")
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPUs; nice {os.nice(0)}\n")
    with tempfile.TemporaryDirectory(prefix="bench_ray_") as t:
        tmp = Path(t)
        if not args.skip_folder:
            folder(args.src, args.method, args.workers, args.rounds, tmp)
        if not args.skip_tiny:
            tiny(args.src, [int(x) for x in args.tiny.split(",")], tmp)
        if args.calls:
            round_trip(args.src, tmp, args.calls)


if __name__ == "__main__":
    main()
