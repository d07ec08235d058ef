"""Compare the int8 detector with the fp32 one on every frame of every clip in ../shared/videos.

    python research/check_detector_int8.py                          # the shipped calibration
    python research/check_detector_int8.py --calibration /tmp/c.json --clips lp_d6.mp4 --json out.json

Both detectors run as the pipeline runs them (deidcli.faces.detect.Detector, default det_size 640 and
min_face 0, one ONNX Runtime session each with the pipeline's thread settings, score threshold
0.3 = min(--det-thresh 0.5, --keep-thresh 0.3)). Per clip, on all frames:

- recall: fp32 faces with score >= 0.5 matched by an int8 face with score >= 0.5 at IoU >= 0.5
  (one-to-one, Hungarian on 1 - IoU); "keep" the same with int8 faces down to 0.3 (the
  threshold that keeps a tracked face anonymized);
- precision: the same the other way round (int8 faces >= 0.5 matched by fp32 faces >= 0.5);
- for fp32 faces >= 0.5 matched at IoU >= 0.5 by any int8 face (>= 0.3): median and 95th
  percentile of the landmark difference (mean over the 5 points of the distance, in % of the
  fp32 inter-ocular distance), median box IoU, mean |score difference|;
- tracked recall: the faces the pipeline would anonymize (deidcli.faces.track.Tracker with the default
  TrackOptions, tracks started at 0.5 and kept down to 0.3, gaps filled) from the fp32 detections,
  matched per frame at IoU >= 0.5 by those from the int8 detections; "tracked extra" the faces
  of the int8 run not matched the other way;
- ms/frame of Detector.detect (pre-processing, network, decoding) for each, measured on the same
  frames alternately.

Prints a markdown table on stdout; --json also writes the numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deidcli import weights  # noqa: E402
from deidcli.faces.detect import Detections, Detector, box_iou  # noqa: E402
from deidcli.faces.track import Tracker  # noqa: E402
from deidcli.options import TrackOptions  # noqa: E402

VIDEOS = ROOT.parent / "shared" / "videos"
SCORE = 0.5  # a face that starts a track (--det-thresh)
KEEP = 0.3  # a face that keeps a track going (--keep-thresh): what the pipeline's detector reports
MATCH_IOU = 0.5


def frames(path: Path):
    import av

    with av.open(str(path)) as c:
        for f in c.decode(c.streams.video[0]):
            yield f.to_ndarray(format="rgb24")


def match(a: Detections, b: Detections) -> list[tuple[int, int]]:
    """One-to-one pairs (i in a, j in b) with IoU >= MATCH_IOU, maximising total IoU."""
    if not len(a) or not len(b):
        return []
    from scipy.optimize import linear_sum_assignment

    iou = box_iou(a.boxes, b.boxes)
    rows, cols = linear_sum_assignment(1.0 - iou)
    return [(i, j) for i, j in zip(rows, cols) if iou[i, j] >= MATCH_IOU]


class Tally:
    def __init__(self):
        self.n32 = self.n8 = self.rec = self.rec_keep = self.prec = 0
        self.lmk, self.iou, self.dscore = [], [], []
        self.ms32, self.ms8 = [], []
        self.frames = 0
        self.seq32, self.seq8 = [], []  # detections per frame, for the tracker
        self.tracked32 = self.tracked_rec = self.tracked8 = self.tracked_prec = 0

    def add(self, d32: Detections, d8: Detections):
        self.frames += 1
        self.seq32.append(d32)
        self.seq8.append(d8)
        s32, s8 = d32.select(d32.scores >= SCORE), d8.select(d8.scores >= SCORE)
        self.n32 += len(s32)
        self.n8 += len(s8)
        self.rec += len(match(s32, s8))
        self.prec += len(match(s8, s32))
        pairs = match(s32, d8)
        self.rec_keep += len(pairs)
        for i, j in pairs:
            k32, k8 = s32.kps[i].astype(np.float64), d8.kps[j].astype(np.float64)
            iod = max(float(np.linalg.norm(k32[1] - k32[0])), 1.0)
            self.lmk.append(100.0 * float(np.mean(np.linalg.norm(k8 - k32, axis=1))) / iod)
            self.iou.append(float(box_iou(s32.boxes[i], d8.boxes[j])[0, 0]))
            self.dscore.append(abs(float(s32.scores[i]) - float(d8.scores[j])))

    def track(self, fps: float):
        """Run the pipeline's tracker over both detection sequences and compare what it outputs."""

        def tracked(seq):
            tracker, out = Tracker(TrackOptions(), fps=fps, start_thresh=SCORE), []
            for i, d in enumerate(seq):
                out += tracker.push(i, d)
            out += tracker.flush()
            return [Detections(np.array([f.box for f in faces]), np.ones(len(faces)),
                               np.array([f.kps for f in faces])) if faces else Detections.empty()
                    for _, faces in sorted(out, key=lambda x: x[0])]

        for a, b in zip(tracked(self.seq32), tracked(self.seq8)):
            self.tracked32 += len(a)
            self.tracked8 += len(b)
            self.tracked_rec += len(match(a, b))
            self.tracked_prec += len(match(b, a))
        self.seq32, self.seq8 = [], []

    def row(self) -> dict:
        pct = lambda a, b: round(100.0 * a / b, 2) if b else None  # noqa: E731
        q = lambda v, p: round(float(np.percentile(v, p)), 2) if v else None  # noqa: E731
        return {
            "frames": self.frames, "faces_fp32": self.n32, "faces_int8": self.n8,
            "recall_pct": pct(self.rec, self.n32), "recall_keep_pct": pct(self.rec_keep, self.n32),
            "precision_pct": pct(self.prec, self.n8),
            "tracked_fp32": self.tracked32, "tracked_recall_pct": pct(self.tracked_rec, self.tracked32),
            "tracked_extra_pct": pct(self.tracked8 - self.tracked_prec, self.tracked8),
            "lmk_median_pct_iod": q(self.lmk, 50), "lmk_p95_pct_iod": q(self.lmk, 95),
            "box_iou_median": round(float(np.median(self.iou)), 4) if self.iou else None,
            "score_abs_diff_mean": round(float(np.mean(self.dscore)), 4) if self.dscore else None,
            "ms_fp32": round(1000 * float(np.mean(self.ms32)), 1) if self.ms32 else None,
            "ms_int8": round(1000 * float(np.mean(self.ms8)), 1) if self.ms8 else None,
        }

    def merge(self, o: "Tally"):
        for k in ("n32", "n8", "rec", "rec_keep", "prec", "frames", "tracked32", "tracked8", "tracked_rec",
                  "tracked_prec"):
            setattr(self, k, getattr(self, k) + getattr(o, k))
        for k in ("lmk", "iou", "dscore", "ms32", "ms8"):
            getattr(self, k).extend(getattr(o, k))


COLUMNS = [("clip", "clip"), ("res", "res"), ("frames", "frames"), ("faces_fp32", "fp32 faces>=0.5"),
           ("recall_pct", "recall %"), ("recall_keep_pct", "recall int8>=0.3 %"), ("precision_pct", "precision %"),
           ("tracked_recall_pct", "tracked recall %"), ("tracked_extra_pct", "tracked extra %"),
           ("lmk_median_pct_iod", "lmk median %IOD"), ("lmk_p95_pct_iod", "lmk p95 %IOD"),
           ("box_iou_median", "box IoU median"), ("score_abs_diff_mean", "mean |dscore|"),
           ("ms_fp32", "fp32 ms/frame"), ("ms_int8", "int8 ms/frame")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--detector", type=Path, default=None, help="fp32 SCRFD ONNX (default: the registry's default)")
    p.add_argument("--calibration", type=Path, default=None, help="int8 calibration JSON (default: the shipped one)")
    p.add_argument("--clips", nargs="*", default=None, help="clip names in ../shared/videos (default: all in MANIFEST)")
    p.add_argument("--max-frames", type=int, default=0, help="per clip (0: all)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)

    detector = a.detector or weights.model_path("det_scrfd_2.5g_kps.onnx")
    det32 = Detector(detector, det_thresh=KEEP, precision="fp32")
    det8 = Detector(detector, det_thresh=KEEP, precision="int8", calibration=a.calibration)
    if det8.precision != "int8":
        print("the int8 detector could not be built (see the warning above)", file=sys.stderr)
        return 1
    with open(VIDEOS / "MANIFEST.tsv") as f:
        manifest = {r["file"]: r for r in csv.DictReader(f, delimiter="\t")}
    clips = a.clips or list(manifest)
    rows, total = [], Tally()
    for name in clips:
        t = Tally()
        for i, rgb in enumerate(frames(VIDEOS / name)):
            if a.max_frames and i >= a.max_frames:
                break
            t0 = time.perf_counter()
            d32 = det32.detect(rgb)
            t1 = time.perf_counter()
            d8 = det8.detect(rgb)
            t2 = time.perf_counter()
            if i:  # the first call of each size builds caches
                t.ms32.append(t1 - t0)
                t.ms8.append(t2 - t1)
            t.add(d32, d8)
        fps = float(Fraction(manifest.get(name, {}).get("fps") or "30"))
        t.track(fps)
        rows.append({"clip": name, "res": manifest.get(name, {}).get("res", "?"), **t.row()})
        total.merge(t)
        print(f"{name}: {rows[-1]}", file=sys.stderr)
    rows.append({"clip": "all", "res": "", **total.row()})
    print("| " + " | ".join(h for _, h in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in rows:
        print("| " + " | ".join("-" if r.get(k) is None else str(r.get(k)) for k, _ in COLUMNS) + " |")
    if a.json:
        a.json.write_text(json.dumps({"calibration": str(a.calibration or "shipped"), "rows": rows}, indent=2))
    worst = min((r["recall_pct"] for r in rows if r["recall_pct"] is not None), default=100.0)
    print(f"lowest recall: {worst}%", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
