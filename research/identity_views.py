#!/usr/bin/env python3
"""Where does an anonymized clip still carry the person? MobileFaceNet on other views vs dlib.

    DEID_MODELS_DIR=../shared/models python research/identity_views.py IN OUT [--every 5] [--json F]

For every ``--every``-th frame of the input clip IN and its anonymized output OUT (same frames,
as `deid anonymize` writes them), the face the detector finds first in the input is cut from
both frames at the same landmarks in several views, and MobileFaceNet's cosine between the
input's and the output's descriptor is taken per view: the ArcFace crop the identity check
uses (``std``), flipped, zoomed out (the landmarks scaled by 0.8 about their centre: more head,
hair and outline in the crop) and in (1.2), and blurred. dlib's descriptor distance (the
independent judge of `deid evaluate-video --judge dlib`; < 0.6 = same person) is taken on the
same face. Prints, per view, the mean cosine over all faces, over those dlib still calls the same
person and over the others, and its correlation with -distance: whether a check on that view
would single out the faces dlib re-identifies. Needs ``pip install 'deid-video[judge]'`` (dlib).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def views(img: np.ndarray, kps: np.ndarray) -> dict:
    """112x112 RGB crops of one face: the ArcFace crop and its variants (see the module doc)."""
    import cv2

    from deidcli.faces.align import arcface_crop

    out = {"std": arcface_crop(img, kps)}
    out["flip"] = np.ascontiguousarray(out["std"][:, ::-1])
    c = kps.mean(0)
    for s in (0.8, 1.2):
        out[f"zoom{s}"] = arcface_crop(img, (kps - c) * s + c)
    out["blur"] = cv2.GaussianBlur(out["std"], (5, 5), 1.2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--json", help="write the per-face rows here")
    a = ap.parse_args()

    from deidcli import weights
    from deidcli.generator.embedder import IdentityEmbedder
    from deidcli.research.measures import upright_frames
    from deidcli.faces.detect import Detector
    from deidcli.research.judges import DlibJudge

    models = os.environ.get("DEID_MODELS_DIR")
    det = Detector(weights.model_path("det_scrfd_2.5g_kps.onnx", models))
    emb = IdentityEmbedder(weights.model_path("rec_mobilefacenet.onnx", models))
    judge = DlibJudge()
    rows = []
    for i, ((fa, _), (fb, _)) in enumerate(zip(upright_frames(a.input), upright_frames(a.output))):
        if i % a.every:
            continue
        d = det.detect(fa)
        if not len(d):
            continue
        kps, box = d.kps[0], d.boxes[0]
        va, vb = views(fa, kps), views(fb, kps)
        ea, eb = emb.embed(list(va.values())), emb.embed(list(vb.values()))
        dist = float(np.linalg.norm(judge.describe_boxes(fa, [box])[0] - judge.describe_boxes(fb, [box])[0]))
        rows.append({"frame": i, "dlib": dist, **{k: float(ea[j] @ eb[j]) for j, k in enumerate(va)}})
    if not rows:
        sys.exit("no face found in the input")
    if a.json:
        Path(a.json).write_text(json.dumps(rows))
    dist = np.array([r["dlib"] for r in rows])
    same = dist < 0.6
    print(f"{len(rows)} faces, dlib same person {same.mean():.1%}")
    print("| view | cos mean | max | dlib same | dlib not | corr with -distance |")
    print("|---|---|---|---|---|---|")
    nan = float("nan")
    for k in (k for k in rows[0] if k not in ("frame", "dlib")):
        v = np.array([r[k] for r in rows])
        corr = float(np.corrcoef(v, -dist)[0, 1]) if len(v) > 2 else nan
        print(f"| {k} | {v.mean():.3f} | {v.max():.3f} | {v[same].mean() if same.any() else nan:.3f} "
              f"| {v[~same].mean() if (~same).any() else nan:.3f} | {corr:.2f} |")


if __name__ == "__main__":
    main()
