"""The --keep / --only split rule's cosines on real tracks (docs/keep_only.md, "Identity changes").

    DEID_MODELS_DIR=../shared/models python -m deidcli.research.split_rates [VIDEO ...]

Each clip (default: every .mp4 in ../shared/videos) is detected and tracked as a run does
(default options), every detected face embedded (MobileFaceNet fp32, ArcFace crop). A
segment's anchor is the normalised mean of DECIDE_FACES consecutive faces of a track (every
block of them, the way a split segment is decided); every later face of the same track is
"same person", every face of the other tracks of the clip and of the other clips "another
person". Prints JSON: per kind, the count, quantiles, and the rate at or above / below
people.SPLIT_THRESHOLD (another person at or above it is missed face by face; the same person
below it is a needless split).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np

from ..pipeline.people import DECIDE_FACES, SPLIT_THRESHOLD

DEFAULT_VIDEOS = Path(__file__).resolve().parents[2].parent / "shared" / "videos"


def track_embeddings(path: Path, models_dir=None) -> list[np.ndarray]:
    """Per track of ``path`` (a run's detection and tracking), its detected faces' embeddings in
    frame order, (n, 128) float32 L2-normalised each; tracks with fewer than 2 * DECIDE_FACES left out."""
    from .. import weights
    from ..faces.align import arcface_crop
    from ..faces.detect import Detector
    from ..faces.track import Tracker
    from ..generator.embedder import IdentityEmbedder
    from ..media.reader import VideoReader
    from ..options import DetectOptions, TrackOptions

    d, t = DetectOptions(), TrackOptions()
    det = Detector(weights.model_path(d.detector, models_dir), det_thresh=min(d.det_thresh, t.keep_thresh),
                   det_size=d.det_size, rescore_below=d.det_thresh)
    emb = IdentityEmbedder(weights.model_path("rec_mobilefacenet.onnx", models_dir))
    tracker = Tracker(t, start_thresh=d.det_thresh)
    pending: dict = {}
    crops: dict = {}

    def take(final):
        for idx, faces in final:
            img = pending.pop(idx)
            for f in faces:
                if not f.held and not f.interpolated:
                    crops.setdefault(f.track_id, []).append(arcface_crop(img, f.kps))

    for vf in VideoReader(path):
        if tracker.frame_size is None:
            tracker.frame_size = (vf.image.shape[1], vf.image.shape[0])
        pending[vf.index] = vf.image
        take(tracker.push(vf.index, det.detect(vf.image, tracker.predicted_boxes(vf.index))))
    take(tracker.flush())
    out = []
    for tid in sorted(crops):
        if len(crops[tid]) >= 2 * DECIDE_FACES:
            e = emb.embed(crops[tid])
            out.append(e / np.linalg.norm(e, axis=1, keepdims=True))
    return out


def _anchors(e: np.ndarray) -> list[tuple[int, np.ndarray]]:
    out = []
    for k in range(0, len(e) - DECIDE_FACES, DECIDE_FACES):
        a = e[k:k + DECIDE_FACES].mean(0)
        out.append((k + DECIDE_FACES, a / np.linalg.norm(a)))
    return out


def _summary(cos: np.ndarray, below: bool) -> dict:
    n = int((cos < SPLIT_THRESHOLD).sum() if below else (cos >= SPLIT_THRESHOLD).sum())
    qs = np.quantile(cos, [0.001, 0.01, 0.05, 0.5, 0.95, 0.99, 0.999])
    return {"count": int(len(cos)), "rate": round(n / max(len(cos), 1), 6), "n": n,
            "quantiles_0.1_1_5_50_95_99_99.9%": [round(float(q), 4) for q in qs]}


def main(argv=None) -> None:
    logging.basicConfig(level=logging.WARNING)
    argv = sys.argv[1:] if argv is None else argv
    videos = [Path(a) for a in argv] or sorted(DEFAULT_VIDEOS.glob("*.mp4"))
    tracks = []  # (clip, track index, embeddings)
    for v in videos:
        for k, e in enumerate(track_embeddings(v)):
            tracks.append((v.name, k, e))
            print(f"{v.name} track {k}: {len(e)} faces", file=sys.stderr)
    same, other, per_clip = [], [], {}
    for clip, k, e in tracks:
        for start, a in _anchors(e):
            c = e[start:] @ a
            same.append(c)
            per_clip.setdefault(clip, []).append(c)
            for clip2, k2, e2 in tracks:
                if (clip2, k2) != (clip, k):
                    other.append(e2 @ a)
    same, other = np.concatenate(same), np.concatenate(other)
    print(json.dumps({"split_threshold": SPLIT_THRESHOLD, "tracks": [(c, k, len(e)) for c, k, e in tracks],
                      "same_person_below": _summary(same, True), "another_person_at_or_above": _summary(other, False),
                      "same_person_min_per_clip": {c: round(float(np.concatenate(v).min()), 4)
                                                   for c, v in per_clip.items()}}, indent=1))


if __name__ == "__main__":
    main()
