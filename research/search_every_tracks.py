"""What `--search-every N` changes in the faces deid follows, against searching every frame.

    DEID_MODELS_DIR=../shared/models python research/search_every_tracks.py CLIP ... [--every 4]

For each clip, detection and tracking only (`Pipeline.detect_and_track`, as `deid anonymize` runs
them, no rendering) with `--search-every 1` and with `--every`; prints per clip and value: faces
and tracks, frames searched, early searches (lost, cut, crowded), faces found looking back, the
landmark jitter of the tracks (mean and 95th percentile of the second difference of the smoothed
landmarks over consecutive frames, in % of the inter-ocular distance), the faces of the every-frame
run with no face at IoU >= 0.5 in the other, and how far apart the landmarks of the same face are
(median and 95th percentile, % IOD). Also the detection stage's time alone (one process, in turn).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np


def track(pipeline, frames):
    from deidcli.pipeline.report import FileResult

    res = FileResult(input="", output="")
    t = time.perf_counter()
    out = [faces for _, faces in pipeline.detect_and_track(iter(frames), res, 30.0)]
    return out, res, time.perf_counter() - t


def jitter(out) -> np.ndarray:
    tracks: dict = {}
    for faces in out:
        for f in faces:
            tracks.setdefault(f.track_id, []).append(f.kps)
    js = []
    for seq in tracks.values():
        if len(seq) < 10:
            continue
        k = np.array(seq)
        iod = np.linalg.norm(k[:, 0] - k[:, 1], axis=1)
        d2 = k[2:] - 2 * k[1:-1] + k[:-2]
        js.append(np.linalg.norm(d2, axis=2).mean(1) / iod[1:-1] * 100)
    return np.concatenate(js) if js else np.zeros(1)


def main() -> None:
    import av

    from deidcli.faces.detect import box_iou
    from deidcli.options import AnonymizeOptions, DetectOptions
    from deidcli.pipeline.pipeline import Pipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("clips", nargs="+")
    ap.add_argument("--every", type=int, default=4)
    a = ap.parse_args()
    models = Path(os.environ.get("DEID_MODELS_DIR", "../shared/models"))
    pipes = {n: Pipeline(AnonymizeOptions(method="blur", models_dir=models, detect=DetectOptions(search_every=n)),
                         render=False) for n in (1, a.every)}
    print("| clip | --search-every | faces | tracks | searched | lost / cut / crowded | found back | detect s "
          "| jitter mean / p95 % IOD | faces missing | landmarks apart median / p95 % IOD |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for clip in a.clips:
        with av.open(clip) as c:
            frames = [SimpleNamespace(index=i, image=f.to_ndarray(format="rgb24"))
                      for i, f in enumerate(c.decode(video=0))]
        runs = {n: track(p, frames) for n, p in pipes.items()}
        ref = runs[1][0]
        for n, (out, res, secs) in runs.items():
            j = jitter(out)
            missing, apart = 0, []
            for a_faces, b_faces in zip(ref, out):
                boxes = np.array([f.box for f in b_faces], np.float32).reshape(-1, 4)
                for f in a_faces:
                    iou = box_iou(f.box[None], boxes)[0] if len(boxes) else np.zeros(1)
                    if iou.max() < 0.5:
                        missing += 1
                        continue
                    g = b_faces[int(iou.argmax())]
                    apart.append(np.linalg.norm(g.kps - f.kps, axis=1).mean()
                                 / max(np.linalg.norm(f.kps[0] - f.kps[1]), 1e-6) * 100)
            apart = np.array(apart or [0.0])
            print(f"| {Path(clip).stem} | {n} | {sum(len(f) for f in out)} | {res.tracks} | {res.frames_searched} "
                  f"| {res.searches_lost} / {res.searches_cut} / {res.searches_crowded} | {res.faces_found_back} "
                  f"| {secs:.2f} | {j.mean():.2f} / {np.percentile(j, 95):.2f} | {missing} "
                  f"| {np.median(apart):.2f} / {np.percentile(apart, 95):.2f} |", flush=True)


if __name__ == "__main__":
    main()
