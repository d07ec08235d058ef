#!/usr/bin/env python3
"""A fast screen of generator checkpoints against the independent judge, and where its leak sits.

    DEID_MODELS_DIR=../shared/models python research/eye_leak.py W [W ...] [--clips lp_d13,lp_d12]
        [--every 5] [--regions] [--json F]

For every ``--every``-th frame of each clip in ``../shared/videos`` (default: lp_d13 and lp_d12,
the two sharp frontal clips where dlib re-identifies most), the largest face is aligned as the
pipeline aligns it (SCRFD-2.5G, 5-point similarity, the checkpoint's crop) and each checkpoint W
generates its face, conditioned on one descriptor per clip (the mean of the frames' own, as the
pipeline fixes one per track) with colours matched. Per checkpoint and clip it prints the
fraction of faces dlib calls the input's person (descriptor distance < 0.6, on the crops: no
paste-back, no identity check, no tracking), the mean distance and MobileFaceNet's cosine.

It is not a substitute for `deid evaluate-video --judge dlib` (the pipeline on the two clips,
`/tmp`-scripted as anonymize + evaluate-video, takes about 3 minutes): dlib's chip of a crop sees
no hair, ears or head outline, which the video keeps unchanged and dlib uses. It ordered steps
36,500 and 42,078 as the video does (24% / 8% here against 32% / 8% there; 38% / 27% against
72% / 22%), but gave 11% / 3% to a checkpoint that measured 32% / 14% on video
(weights/MODEL_CARD.md, Schedule, 2026-11-30). Use it to compare parts of the face (--regions)
and to reject checkpoints, not to accept them.

``--regions`` also pastes parts of the *input* into each output: its brows, its lids and iris,
the lids at 1/4 and 1/8 resolution (the output's fine detail with the input's coarse
luminance), the lids' vertical luminance profile alone (each row's mean across the eye,
minus its mean: how open the eye is, without the lid contour), and the lids' fine detail alone
(the input minus its 1/2 or 1/4 resolution copy, over the output's coarser picture: what
sharpening the output's eyes with the input's own lashes and lid lines would let through).
How much each raises dlib's figure says how much identity that part carries: what a loss that
keeps it from the input lets through. Needs ``pip install 'deid-video[judge]'`` (dlib).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VIDEOS = ROOT.parent / "shared" / "videos"


def clip_crops(path: Path, every: int, size: int, margin: float, models_dir) -> np.ndarray:
    """(N, size, size, 3) uint8 RGB: the largest face of every ``every``-th frame, aligned."""
    from deidcli import weights
    from deidcli.faces.align import estimate_transform, warp_crop
    from deidcli.research.measures import upright_frames
    from deidcli.faces.detect import Detector

    det = Detector(weights.model_path("det_scrfd_2.5g_kps.onnx", models_dir), det_thresh=0.5, det_size=640)
    crops = []
    for i, (img, _) in enumerate(upright_frames(path)):  # the pipeline's decoding and rotation
        if i % every:
            continue
        d = det.detect(img)
        if len(d.boxes):
            j = int(np.argmax(d.boxes[:, 2] - d.boxes[:, 0]))
            crops.append(warp_crop(img, estimate_transform(d.kps[j], size, margin), size))
    if not crops:
        raise SystemExit(f"no face found in {path}")
    return np.stack(crops)


def region_boxes(size: int, margin: float) -> dict:
    """Per part, the two eyes' boxes (x0, y0, x1, y1) in crop pixels, end-exclusive: ``brows``
    from 0.65 to 0.2 inter-ocular distances (IOD) above each eye's centre, ``lids`` from 0.2 above
    to 0.25 below (lids and iris), both +-0.45 IOD across."""
    from deidcli.faces.align import crop_template

    t = crop_template(size, margin)
    iod = float(t[1, 0] - t[0, 0])

    def boxes(top, bottom):
        return [(int(round(x - 0.45 * iod)), int(round(y + top * iod)), int(round(x + 0.45 * iod)) + 1,
                 int(round(y + bottom * iod)) + 1) for x, y in t[:2]]

    return {"brows": boxes(-0.65, -0.2), "lids": boxes(-0.2, 0.25)}


def _lowpass(a: np.ndarray, factor: int) -> np.ndarray:
    import cv2

    s = a.shape[1]
    return np.stack([cv2.resize(cv2.resize(x, (s // factor, s // factor), interpolation=cv2.INTER_AREA),
                                (s, s), interpolation=cv2.INTER_LINEAR) for x in a])


def composites(out: np.ndarray, inp: np.ndarray, size: int, margin: float) -> dict:
    """float32 (N, S, S, 3) images: ``out`` with parts of ``inp`` pasted in (see the module doc)."""
    rb = region_boxes(size, margin)
    lum = np.array([0.299, 0.587, 0.114], np.float32)
    res = {}
    for part in ("brows", "lids"):
        y = out.copy()
        for x0, y0, x1, y1 in rb[part]:
            y[:, y0:y1, x0:x1] = inp[:, y0:y1, x0:x1]
        res[f"input {part}"] = y
    for f in (4, 8):
        d = _lowpass(inp, f) - _lowpass(out, f)
        y = out.copy()
        for x0, y0, x1, y1 in rb["lids"]:
            y[:, y0:y1, x0:x1] += d[:, y0:y1, x0:x1]
        res[f"input lids at 1/{f}"] = y
    y = out.copy()
    for x0, y0, x1, y1 in rb["lids"]:
        p = (inp[:, y0:y1, x0:x1] @ lum).mean(2) - (out[:, y0:y1, x0:x1] @ lum).mean(2)  # (N, rows)
        y[:, y0:y1, x0:x1] += (p - p.mean(1, keepdims=True))[:, :, None, None]
    res["input lids' row profile"] = y
    for f in (2, 4):
        d = (inp - _lowpass(inp, f)) - (out - _lowpass(out, f))
        y = out.copy()
        for x0, y0, x1, y1 in rb["lids"]:
            y[:, y0:y1, x0:x1] += d[:, y0:y1, x0:x1]
        res[f"input lids' detail finer than 1/{f}"] = y
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("weights", nargs="+", help="generator checkpoints (weights/deid_generator_128.pt, runs/NAME/generator.pt)")
    ap.add_argument("--clips", default="lp_d13,lp_d12", help="stems of clips in ../shared/videos")
    ap.add_argument("--every", type=int, default=5, help="every n-th frame")
    ap.add_argument("--regions", action="store_true", help="also paste parts of the input into each output")
    ap.add_argument("--json", type=Path, help="write the figures here")
    a = ap.parse_args(argv)

    import torch

    from deidcli.faces.align import arcface_box
    from deidcli.research.measures import describe
    from deidcli.research.evaluate import generate_on_crops
    from deidcli.generator.identity import load_identity_net
    from deidcli.research.judges import DLIB_SAME_DISTANCE, DlibJudge
    from deidcli.generator.model import load_generator

    torch.set_num_threads(int(os.environ.get("DEID_THREADS", "2")))
    models_dir = os.environ.get("DEID_MODELS_DIR")
    gens = [(w, load_generator(w)) for w in a.weights]
    size, margin = int(gens[0][1].config["size"]), float(gens[0][1].config["margin"])
    if any(int(g.config["size"]) != size or float(g.config["margin"]) != margin for _, g in gens):
        raise SystemExit("all checkpoints must use the same crop size and margin")
    net, judge = load_identity_net(models_dir), DlibJudge()
    off, side = arcface_box(size, margin)
    box = (off, off, off + side, off + side)
    rows = []
    for stem in a.clips.split(","):
        crops = clip_crops(VIDEOS / f"{stem}.mp4", a.every, size, margin, models_dir)
        own = describe(net, crops, margin)
        d_in = judge.describe(crops, box)
        fixed = own.mean(0)
        fixed = np.repeat((fixed / np.linalg.norm(fixed))[None], len(crops), 0).astype(np.float32)

        def measure(w, step, what, img):
            img8 = np.clip(np.round(img), 0, 255).astype(np.uint8)
            dist = np.linalg.norm(judge.describe(img8, box) - d_in, axis=1)
            r = {"clip": stem, "faces": len(crops), "weights": str(w), "step": step, "image": what,
                 "dlib_same": float(np.mean(dist < DLIB_SAME_DISTANCE)), "dlib_dist": float(dist.mean()),
                 "cos": float((describe(net, img8, margin) * own).sum(1).mean())}
            rows.append(r)
            print(f"{stem:10s} {r['faces']:4d} {str(step):>7s} {what:34s} dlib same {100 * r['dlib_same']:5.1f}%"
                  f"  distance {r['dlib_dist']:.3f}  cos {r['cos']:+.3f}", flush=True)

        for w, g in gens:
            out = generate_on_crops(g, crops, fixed)[0].astype(np.float32)
            step = g.meta.get("steps")
            measure(w, step, "output", out)
            if a.regions:
                for what, img in composites(out, crops.astype(np.float32), size, margin).items():
                    measure(w, step, what, img)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
