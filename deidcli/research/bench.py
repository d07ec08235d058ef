"""`deid bench`: throughput of the whole pipeline, per stage, against a plain re-encode.

Each configuration runs in a fresh child process, so its peak memory (max RSS) and its
timings are its own. Configurations:
- ``reencode``: decode + encode with the same encoder settings, no face touched (the floor);
- ``blur``: detection, tracking and blurring (the cost of finding the faces);
- ``generate``: the full de-identification pipeline;
- the generator alone on random crops at ``--batch-size`` (faces/s);
- ``live`` (not in the default set): ``deid live CLIP --realtime`` into a file, the clip played at
  its own frame rate, with deid live's encoder settings: frames dropped, latency p50/p95/max
  (a real-time run: its frames/s is at most the clip's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import click

from ..cli.main import _generator_options
from ..errors import EXIT_FAILED, EXIT_OK
from ..options import DETECTOR_PRECISIONS

STAGE_ORDER = ("decode", "detect", "track", "identity", "align", "generate", "blend", "encode")


def default_search(config: str) -> int:
    """The --search-every a configuration runs with unless told (deid live's own for live)."""
    from ..options import LIVE_SEARCH_EVERY, DetectOptions

    return LIVE_SEARCH_EVERY if config == "live" else DetectOptions.search_every


def _peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def run_one(config: str, clip: str, opts: dict) -> dict:
    """Run one configuration in this process; returns its measurements."""
    import tempfile

    from ..options import AnonymizeOptions, DetectOptions, EncodeOptions, TrackOptions, large_passes_or_default
    from ..stages import Stages

    detect_opts = dict(opts.pop("detect", {}))
    detect_opts.setdefault("search_every", default_search(config))
    detect = DetectOptions(**detect_opts)
    opts["large_passes"] = large_passes_or_default(opts.get("large_passes"), opts.get("max_passes", 4),
                                                   live=config == "live")  # deid live's own for live
    track = TrackOptions(**opts.pop("track", {}))
    encode = EncodeOptions(**opts.pop("encode", {}))
    if "weights" in opts and opts["weights"]:
        opts["weights"] = Path(opts["weights"])
    out: dict = {"config": config, "clip": Path(clip).name}
    with tempfile.TemporaryDirectory(prefix="deid-bench-") as tmp:
        dst = Path(tmp) / ("out" + Path(clip).suffix)
        if config == "reencode":
            from ..media.transcode import reencode

            stages = Stages()
            t = time.perf_counter()
            st = reencode(clip, dst, encode, stages=stages)
            wall = time.perf_counter() - t
            out.update(frames=st["frames"], faces=0, wall_s=round(wall, 3), stages=stages.as_dict(),
                       device="cpu", dtype=None, load_s=0.0)
        elif config == "generator":
            out.update(_generator_only(opts))
        elif config == "live":
            out.update(_live(clip, dst, opts, detect, track))
        else:
            from ..pipeline.anonymize import anonymize

            o = AnonymizeOptions(method=config, detect=detect, track=track, encode=encode, overwrite=True, **opts)
            t = time.perf_counter()
            rep = anonymize(clip, dst, o)
            wall = time.perf_counter() - t
            f = rep["files"][0]
            if f["status"] != "ok":
                raise RuntimeError(f"{config}: {f['error']}")
            out.update(frames=f["frames"], faces=f["faces_anonymized"], wall_s=round(wall - rep["load_seconds"], 3),
                       load_s=rep["load_seconds"], stages=f["stages"], device=rep["device"], dtype=rep["dtype"],
                       interpolated=f["faces_interpolated"], frames_not_detected=f["frames_not_detected"],
                       detect_every=detect.detect_every, search_every=detect.search_every,
                       frames_searched=f["frames_searched"],
                       detector_precision=rep.get("detector_precision"), check_precision=rep.get("check_precision"))
    if out.get("frames"):
        out["fps"] = round(out["frames"] / out["wall_s"], 2)
        out["faces_per_s"] = round(out["faces"] / out["wall_s"], 2)
    out["peak_rss_mb"] = _peak_rss_mb()
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.max_memory_allocated():
            out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    except ImportError:
        pass
    return out


def _live(clip: str, dst: Path, opts: dict, detect, track) -> dict:
    """deid live on ``clip`` played at its frame rate (--realtime) into ``dst``, with deid live's
    own encoder settings (pipeline/live.py LIVE_ENCODE)."""
    from ..options import AnonymizeOptions, LiveOptions
    from ..pipeline.live import LIVE_ENCODE, live

    o = AnonymizeOptions(detect=detect, track=track, encode=LIVE_ENCODE, overwrite=True, **opts)
    rep = live(clip, dst, o, LiveOptions(realtime=True))
    return {"frames": rep["frames_out"], "frames_in": rep["frames_in"], "faces": rep["faces"],
            "dropped_percent": rep["dropped_percent"], "frames_covered": rep["frames_covered"],
            "latency_ms": rep["latency_ms"], "wall_s": rep["seconds"], "device": rep.get("device"),
            "dtype": rep.get("dtype"), "stages": {}, "search_every": detect.search_every}


def _generator_only(opts: dict, n_batches: int = 10) -> dict:
    """Generator throughput on random crops: faces/s at the given batch size (after warm-up)."""
    import numpy as np

    from .. import weights
    from ..generator.engine import GeneratorRunner, resolve_runtime
    from ..generator.model import load_generator

    rt = resolve_runtime(opts.get("device", "auto"), opts.get("fp16", False))
    gen = load_generator(weights.generator_path(opts.get("weights")), device="cpu")
    bs = int(opts.get("batch_size", 32))
    runner = GeneratorRunner(gen, rt, bs)
    S = runner.size
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (bs, S, S, 3), dtype=np.uint8)
    desc = rng.normal(size=(bs, gen.config["id_dim"])).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    runner.run(crops, desc)  # warm-up
    t = time.perf_counter()
    for _ in range(n_batches):
        runner.run(crops, desc)
    wall = time.perf_counter() - t
    n = bs * n_batches
    return {"frames": 0, "faces": n, "wall_s": round(wall, 3), "faces_per_s": round(n / wall, 1), "batch_size": bs,
            "network_batch": runner.network_batch, "device": rt.device, "dtype": rt.dtype, "backend": runner.backend,
            "stages": {"generate": round(wall, 4)}}


def bench(clip: str, configs: Sequence[str] = ("reencode", "blur", "generate", "generator"),
          options: Optional[dict] = None) -> dict:
    """Run each configuration in a child process; return {"runs": [...], "clip": ...}."""
    runs = []
    for c in configs:
        cmd = [sys.executable, "-m", "deidcli.research.bench", c, str(clip), json.dumps(options or {})]
        p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if p.returncode != 0:
            err = (p.stderr.strip().splitlines() or ["failed"])[-1]
            runs.append({"config": c, "error": err})
            continue
        runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    base = next((r for r in runs if r.get("config") == "reencode" and "wall_s" in r), None)
    for r in runs:
        if base and r.get("frames") and r is not base:
            r["x_reencode"] = round(r["wall_s"] / base["wall_s"], 2)
    return {"clip": str(clip), "cpu_count": os.cpu_count(), "runs": runs}


def to_markdown(result: dict) -> str:
    stages = [s for s in STAGE_ORDER if any(s in r.get("stages", {}) for r in result["runs"])]
    head = ["config", "frames", "wall s", "frames/s", "faces/s", "x re-encode"] + [f"{s} s" for s in stages] + \
        ["peak RSS MB", "device"]
    lives = [r for r in result["runs"] if r.get("config") == "live" and "error" not in r]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {r['config']} | error: {r['error']} |")
            continue
        name = r["config"]
        if r["config"] == "generator":
            nb = r.get("network_batch", r["batch_size"])
            name += f" (batch {r['batch_size']}" + (f", {nb} per network call)" if nb != r["batch_size"] else ")")
        if r.get("detect_every", 1) > 1:
            name += f" (detect every {r['detect_every']}: {r['frames_not_detected']} frames by tracking)"
        if r.get("search_every", default_search(r["config"])) != default_search(r["config"]):
            searched = f": {r['frames_searched']} frames searched" if "frames_searched" in r else ""
            name += f" (search every {r['search_every']}{searched})"
        row = [name, r.get("frames") or "-", r["wall_s"], r.get("fps", "-"), r.get("faces_per_s", "-"),
               r.get("x_reencode", "-")]
        row += [r.get("stages", {}).get(s, "-") for s in stages]
        device = f"{r.get('device')} {r.get('dtype') or ''}".strip()
        if r.get("detector_precision"):
            device += f", detector {r['detector_precision']}"
        if r.get("check_precision"):
            device += f", check {r['check_precision']}"
        row += [r.get("peak_rss_mb", "-"), device]
        lines.append("| " + " | ".join(str(x) for x in row) + " |")
    if lives:
        lines += ["", "| live | frames in | out | dropped | covered | latency p50 / p95 / max ms |", "|---|---|---|---|---|---|"]
        for r in lives:
            lat = r["latency_ms"]
            lines.append(f"| {r['clip']} | {r['frames_in']} | {r['frames']} | {r['dropped_percent']}% | "
                         f"{r['frames_covered']} | {lat['p50']} / {lat['p95']} / {lat['max']} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ command line (deid bench)

@click.command("bench")
@click.argument("clip", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--config", "configs", multiple=True,
              type=click.Choice(["reencode", "blur", "generate", "generator", "live"]),
              help="What to run (repeatable; default: all but live).")
@_generator_options
@click.option("--codec", default="libx264", help="Video encoder, for every configuration.")
@click.option("--preset", default="veryfast", help="Encoder speed preset.")
@click.option("--crf", type=click.IntRange(0, 63), default=18, help="Encoder quality.")
@click.option("--detect-every", type=click.IntRange(1, 9), default=1,
              help="Detect on every Nth frame only.")
@click.option("--search-every", type=click.IntRange(min=1), default=None,
              help="Search whole frames every Nth frame (default: deid's).")
@click.option("--detector-precision", type=click.Choice(DETECTOR_PRECISIONS), default="auto",
              help="Detector arithmetic (auto: CPU int8).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the results as JSON here.")
def bench_command(clip, configs, weights, device, fp16, batch_size, passes, large_passes, identity_check, check_thresh,
                  check_precision, max_passes, small_max_passes, fallback, min_generate, max_yaw, min_light, soft_fraction, colour_match,
                  first_pass_mouth, eye_pass, keep_detail, pass_hold, codec, preset, crf,
                  detect_every, search_every,
                  detector_precision, json_path):
    """Frames/s on CLIP per stage, next to a plain re-encode.

    Throughput of deid on CLIP, per stage, next to a plain re-encode and blur.

    Prints a markdown table on stdout. Each configuration runs in its own process (its peak
    memory is its own).
    """

    if passes > max_passes:
        raise click.UsageError(f"--passes {passes} is above --max-passes {max_passes}")
    opts = {"device": device, "fp16": fp16, "batch_size": batch_size, "passes": passes, "large_passes": large_passes,
            "identity_check": identity_check, "check_thresh": check_thresh, "check_precision": check_precision,
            "max_passes": max_passes, "colour_match": colour_match, "first_pass_mouth": first_pass_mouth,
            "small_max_passes": small_max_passes, "fallback": fallback, "min_generate": min_generate,
            "max_yaw": max_yaw, "min_light": min_light, "soft_fraction": soft_fraction,
            "eye_pass": eye_pass, "keep_detail": keep_detail, "pass_hold": pass_hold,
            "weights": str(weights) if weights else None,
            "encode": {"codec": codec, "preset": preset, "crf": crf}, "detect": {"detect_every": detect_every,
                                                                                 "precision": detector_precision}}
    if search_every is not None:
        opts["detect"]["search_every"] = search_every
    res = bench(str(clip), configs or ("reencode", "blur", "generate", "generator"), opts)
    res["options"] = opts
    if json_path:
        json_path.write_text(json.dumps(res, indent=2))
    click.echo(to_markdown(res))
    sys.exit(EXIT_FAILED if any("error" in r for r in res["runs"]) else EXIT_OK)


if __name__ == "__main__":  # child process: python -m deidcli.research.bench CONFIG CLIP OPTIONS_JSON
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    print(json.dumps(run_one(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))))
