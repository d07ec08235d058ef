"""Detect and align LFW with deid's own detector and alignment; cache one .npz per split.

Split "train" = the people of peopleDevTrain.txt, "test" = peopleDevTest.txt (identity
disjoint). Each cache file holds:
    crops     (N, S, S, 3) uint8 RGB   aligned generator crops (deidcli.faces.align geometry)
    labels    (N,) int32               person index into ``people``
    people    (P,) str                 person names
    names     (N,) str                 image names "Person/Person_0001.jpg"
    kps       (N, 5, 2) float32        SCRFD landmarks in image pixels
    crop_kps  (N, 5, 2) float32        the same landmarks in crop pixels
    scores    (N,) float32             detector score
    desc      (N, 128) float32         L2-normalised MobileFaceNet descriptor of the ArcFace
                                       square of the crop (align.arcface_box), resized to 112
    size, margin, fingerprint          crop params; sha256 of sorted names + crop params
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from ...faces.align import CROP_MARGIN, CROP_SIZE, estimate_transform, warp_crop

logger = logging.getLogger("deid.train")

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_LFW = REPO_ROOT.parent / "shared" / "data" / "lfw"
DEFAULT_CACHE = REPO_ROOT / "cache"
SPLIT_FILES = {"train": "peopleDevTrain.txt", "test": "peopleDevTest.txt"}
DETECTOR = "det_scrfd_2.5g_kps.onnx"


def read_people(path: Path) -> list[tuple[str, int]]:
    """[(name, n_images)] from an LFW people*.txt file (first line: count)."""
    lines = [ln.split() for ln in Path(path).read_text().splitlines()[1:] if ln.strip()]
    return [(p[0], int(p[1])) for p in lines]


def read_pairs(path: Path) -> list[tuple[str, str, bool]]:
    """[(image_a, image_b, same)] with names "Person/Person_0001.jpg" from pairsDev*.txt."""
    out = []
    for ln in Path(path).read_text().splitlines()[1:]:
        p = ln.split()
        if len(p) == 3:
            out.append((_img(p[0], int(p[1])), _img(p[0], int(p[2])), True))
        elif len(p) == 4:
            out.append((_img(p[0], int(p[1])), _img(p[2], int(p[3])), False))
    return out


def _img(person: str, idx: int) -> str:
    return f"{person}/{person}_{idx:04d}.jpg"


def fingerprint(names, size: int, margin: float) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"size": size, "margin": margin}, sort_keys=True).encode())
    for n in sorted(names):
        h.update(n.encode() + b"\n")
    return h.hexdigest()


def cache_path(split: str, size: int = CROP_SIZE, margin: float = CROP_MARGIN,
               cache_dir: Optional[Path] = None) -> Path:
    return Path(cache_dir or DEFAULT_CACHE) / f"lfw_{split}_{size}_m{margin:g}.npz"


def _models_dir(models_dir):
    return models_dir


def _central_face(dets, shape) -> Optional[int]:
    if len(dets) == 0:
        return None
    h, w = shape[:2]
    c = (dets.boxes[:, :2] + dets.boxes[:, 2:]) / 2.0
    d = np.hypot(c[:, 0] - w / 2.0, c[:, 1] - h / 2.0)
    return int(np.argmin(d))


def prepare_split(split: str, lfw_dir: Optional[Path] = None, cache_dir: Optional[Path] = None,
                  size: int = CROP_SIZE, margin: float = CROP_MARGIN, det_size: int = 320,
                  det_thresh: float = 0.3, models_dir: Optional[Path] = None,
                  limit_people: Optional[int] = None, device: str = "cpu",
                  workers: int = 2, force: bool = False) -> Path:
    """Build (or reuse) the cache file of one split; returns its path."""
    from ..measures import describe
    from ...faces.detect import Detector
    from ...generator.identity import load_identity_net, model_file

    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {list(SPLIT_FILES)}")
    lfw_dir = Path(lfw_dir or DEFAULT_LFW)
    out = cache_path(split, size, margin, cache_dir)
    if limit_people:
        out = out.with_name(out.stem + f"_p{limit_people}.npz")
    if out.exists() and not force:
        logger.info("cache %s exists; reusing", out)
        return out
    people = read_people(lfw_dir / SPLIT_FILES[split])
    if limit_people:
        people = people[:limit_people]
    names = [_img(p, i) for p, n in people for i in range(1, n + 1)]
    label_of = {p: k for k, (p, _) in enumerate(people)}
    det = Detector(model_file(DETECTOR, models_dir), det_thresh=det_thresh, det_size=det_size)
    img_root = lfw_dir / "lfw_deepfunneled"

    def work(name):
        img = cv2.imread(str(img_root / name), cv2.IMREAD_COLOR)
        if img is None:
            return None
        img = np.ascontiguousarray(img[:, :, ::-1])
        dets = det.detect(img)
        k = _central_face(dets, img.shape)
        if k is None:
            return None
        kps = dets.kps[k].astype(np.float32)
        M = estimate_transform(kps, size, margin)
        crop = warp_crop(img, M, size)
        ck = (np.concatenate([kps, np.ones((5, 1), np.float32)], 1) @ M.T).astype(np.float32)
        return name, crop, kps, ck, float(dets.scores[k])

    t0 = time.time()
    rows, missed = [], []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for i, (name, r) in enumerate(zip(names, pool.map(work, names))):
            if r is None:
                missed.append(name)
            else:
                rows.append(r)
            if (i + 1) % 1000 == 0:
                logger.info("%s: %d/%d images, %.0f s", split, i + 1, len(names), time.time() - t0)
    if not rows:
        raise RuntimeError(f"no faces found in {split}")
    kept = [r[0] for r in rows]
    crops = np.stack([r[1] for r in rows])
    desc = describe(load_identity_net(models_dir, device=device), crops, margin, device).astype(np.float32)
    labels = np.array([label_of[n.split("/")[0]] for n in kept], dtype=np.int32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".deid-tmp{os.getpid()}.npz")
    np.savez(tmp, crops=crops, labels=labels, people=np.array([p for p, _ in people]),
             names=np.array(kept), kps=np.stack([r[2] for r in rows]),
             crop_kps=np.stack([r[3] for r in rows]),
             scores=np.array([r[4] for r in rows], dtype=np.float32), desc=desc,
             size=np.int32(size), margin=np.float32(margin),
             fingerprint=np.array(fingerprint(kept, size, margin)),
             missed=np.array(missed))
    os.replace(tmp, out)
    logger.info("%s: %d faces (%d images without a face) -> %s in %.0f s", split, len(kept),
                len(missed), out, time.time() - t0)
    return out


def load_split(path: Path) -> dict:
    """The arrays of a cache file as a dict (crops stay uint8)."""
    with np.load(path, allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    d["fingerprint"] = str(d["fingerprint"])
    d["size"], d["margin"] = int(d["size"]), round(float(d["margin"]), 6)
    return d
