"""The best faces of each track, and the contact sheet of a video's tracks (``deid faces``,
faces_index.py). Pure: images in, images and numbers out; no file is read or written here.

Array contract: frames are (H, W, 3) uint8 RGB; boxes (4,) x0, y0, x1, y1 and landmarks (5, 2)
float pixels in SCRFD order (faces.track.Face); ArcFace crops (112, 112, 3) uint8 RGB
(align.arcface_crop), the identity network's input.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

#: The best faces of a track whose embeddings are averaged into its identity descriptor (the
#: anonymize pipeline averages the first 5: pipeline/descriptors.DESCRIPTOR_FACES).
BEST_FACES = 5
#: quality(): a face turned this far (routing.yaw, eye distances; 0.3 is about 30 degrees) counts half.
YAW_HALF = 0.3
#: quality(): faces this high (px) and higher count fully for size (the ArcFace crop is 112 px).
FULL_HEIGHT = 112.0
#: quality(): faces this light (mean CIELAB L*, 0-255) and lighter count fully for light.
FULL_LIGHT = 50.0
#: quality(): sharpness counts up to this multiple of a sharp face of the same size.
SHARP_CAP = 1.5
#: The context crop: the face box grown to a square this many times its larger side, at most
#: CONTEXT_MAX px (scaled down, never up).
CONTEXT_SCALE = 2.0
CONTEXT_MAX = 256


@dataclass
class FaceMeasures:
    """What is measured of one detected face (routing.measure and routing.yaw on its generator crop)."""

    frame: int
    time: Optional[float]
    box: np.ndarray  # (4,) float, frame pixels
    kps: np.ndarray  # (5, 2) float, frame pixels
    score: float  # detector score
    yaw: float  # routing.yaw: 0 frontal, ~0.3 at 30 degrees, 1+ in profile
    lightness: float  # mean CIELAB L* of the face ellipse, 0-255
    sharpness: float  # routing.measure: contrast-free detail of the 128 px crop
    height: float  # box height, px
    inside: float  # share of the box inside the frame (an edge-cut face is a poor picture)
    quality: float = 0.0

    def to_dict(self) -> dict:
        return {"frame": self.frame, "time": _round(self.time, 3), "box": [round(float(v), 1) for v in self.box],
                "score": round(self.score, 4), "yaw": round(self.yaw, 3), "sharpness": round(self.sharpness, 2),
                "lightness": round(self.lightness, 1), "height": round(self.height, 1),
                "quality": round(self.quality, 4)}


def quality(m: FaceMeasures) -> float:
    """How good a picture of the person a face is, in [0, ~1.5]: the product of the detector
    score, sharpness relative to a sharp face of its size (routing.expected_sharpness, capped at
    :data:`SHARP_CAP`), frontality (1 / (1 + (yaw / YAW_HALF)^2)), size (height / FULL_HEIGHT, at
    most 1), light (L* / FULL_LIGHT, at most 1) and the share of the box inside the frame."""
    from .routing import expected_sharpness

    sharp = min(m.sharpness / expected_sharpness(m.height), SHARP_CAP) if math.isfinite(m.sharpness) else 1.0
    frontal = 1.0 / (1.0 + (m.yaw / YAW_HALF) ** 2) if math.isfinite(m.yaw) else 0.0
    size = min(m.height / FULL_HEIGHT, 1.0)
    light = min(m.lightness / FULL_LIGHT, 1.0)
    return max(m.score, 0.0) * max(sharp, 0.0) * frontal * max(size, 0.0) * max(light, 0.0) * m.inside


def measure_face(image: np.ndarray, frame: int, time: Optional[float], box, kps, score: float) -> FaceMeasures:
    """The measures and :func:`quality` of one detected face of ``image``."""
    from ..faces.align import estimate_transform, warp_crop
    from .routing import face_height, measure, yaw

    box = np.asarray(box, np.float64)
    kps = np.asarray(kps, np.float64)
    light, sharp = measure(warp_crop(image, estimate_transform(kps)), sharpness=True)
    h, w = image.shape[:2]
    area = max((box[2] - box[0]) * (box[3] - box[1]), 1e-6)
    ix = max(min(box[2], w) - max(box[0], 0), 0) * max(min(box[3], h) - max(box[1], 0), 0)
    m = FaceMeasures(frame, time, box, kps, float(score), yaw(kps), light, sharp, face_height(box),
                     float(min(ix / area, 1.0)))
    m.quality = quality(m)
    return m


def context_crop(image: np.ndarray, box) -> tuple[np.ndarray, list[float]]:
    """The face with some of its surroundings: a square :data:`CONTEXT_SCALE` times the box's
    larger side around its centre, clipped to the frame, at most :data:`CONTEXT_MAX` px a side;
    and the face's box in that crop's pixels (a crowd's neighbours show in it too)."""
    import cv2

    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy, s = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * CONTEXT_SCALE
    h, w = image.shape[:2]
    X0, Y0 = int(max(cx - s / 2, 0)), int(max(cy - s / 2, 0))
    X1, Y1 = int(min(cx + s / 2, w)), int(min(cy + s / 2, h))
    crop = image[Y0:max(Y1, Y0 + 1), X0:max(X1, X0 + 1)]
    k = min(CONTEXT_MAX / max(crop.shape[:2]), 1.0)
    if k < 1:
        crop = cv2.resize(crop, (max(1, round(crop.shape[1] * k)), max(1, round(crop.shape[0] * k))),
                          interpolation=cv2.INTER_AREA)
    inner = [round((x0 - X0) * k, 1), round((y0 - Y0) * k, 1), round((x1 - X0) * k, 1), round((y1 - Y0) * k, 1)]
    return np.ascontiguousarray(crop), inner


@dataclass
class TrackFaces:
    """One track while its video is read: counts, first and last detected face, and only its
    :data:`BEST_FACES` best faces' ArcFace crops plus the best one's context crop (bounded memory,
    however long the track)."""

    track_id: int
    faces: int = 0  # detected faces (not those the tracker filled in)
    first: Optional[tuple[int, Optional[float]]] = None  # (frame, time) of the first detected face
    last: Optional[tuple[int, Optional[float]]] = None
    best: list = field(default_factory=list)  # min-heap of (quality, frame, FaceMeasures, arcface crop)
    context: Optional[np.ndarray] = None  # the best face's context crop
    context_box: Optional[list] = None  # the best face's box in the context crop's pixels
    done: bool = False  # finished: crops written and dropped

    def add(self, image: np.ndarray, m: FaceMeasures) -> None:
        """Count a detected face; keep its crops if it is among the track's best so far."""
        from ..faces.align import arcface_crop

        self.faces += 1
        if self.first is None:
            self.first = (m.frame, m.time)
        self.last = (m.frame, m.time)
        if self.done:
            return
        if len(self.best) >= BEST_FACES and m.quality <= self.best[0][0]:
            return
        top = self.best_face()
        item = (m.quality, -m.frame, m, arcface_crop(image, m.kps))  # ties: the earlier frame wins
        if len(self.best) < BEST_FACES:
            heapq.heappush(self.best, item)
        else:
            heapq.heapreplace(self.best, item)
        if top is None or m.quality > top.quality:
            self.context, self.context_box = context_crop(image, m.box)

    def best_face(self) -> Optional[FaceMeasures]:
        return max(self.best, key=lambda it: (it[0], it[1]))[2] if self.best else None

    def best_crops(self) -> list[np.ndarray]:
        """The kept ArcFace crops, best first (the first is the best face's)."""
        return [it[3] for it in sorted(self.best, key=lambda it: (it[0], it[1]), reverse=True)]


def sheet(tiles: Sequence[tuple], title: str = "", tile: int = 128, per_row: int = 6) -> np.ndarray:
    """(H, W, 3) uint8 RGB: ``tiles`` (image (h, w, 3) uint8 RGB, lines of text, box or None) in a
    grid, each image fitted into a ``tile`` px square, the box (x0, y0, x1, y1 in the image's
    pixels) outlined on it, its lines written under it; ``title`` on top."""
    import cv2

    font, scale, line = cv2.FONT_HERSHEY_SIMPLEX, 0.4, 14
    n_lines = max((len(t[1]) for t in tiles), default=0)
    cell_w, cell_h = tile + 8, tile + 6 + n_lines * line
    cols = max(1, min(per_row, len(tiles)))
    rows = max(1, (len(tiles) + cols - 1) // cols)
    head = 22 if title else 0
    img = np.full((head + rows * cell_h + 4, max(cols * cell_w + 4, 320), 3), 24, np.uint8)
    if title:
        cv2.putText(img, title, (6, 15), font, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    if not tiles:
        cv2.putText(img, "no faces", (6, head + 20), font, 0.45, (200, 200, 200), 1, cv2.LINE_AA)
    for k, (im, lines, box) in enumerate(tiles):
        r, c = divmod(k, cols)
        y, x = head + r * cell_h + 4, c * cell_w + 4
        s = tile / max(im.shape[:2])
        fit = cv2.resize(im, (max(1, round(im.shape[1] * s)), max(1, round(im.shape[0] * s))),
                         interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
        oy, ox = (tile - fit.shape[0]) // 2, (tile - fit.shape[1]) // 2
        img[y + oy:y + oy + fit.shape[0], x + ox:x + ox + fit.shape[1]] = fit
        if box is not None:
            p0 = (x + ox + int(box[0] * s), y + oy + int(box[1] * s))
            p1 = (x + ox + min(int(box[2] * s), fit.shape[1] - 1), y + oy + min(int(box[3] * s), fit.shape[0] - 1))
            cv2.rectangle(img, p0, p1, (255, 255, 0), 1, cv2.LINE_AA)
        for j, text in enumerate(lines):
            cv2.putText(img, text, (x, y + tile + 4 + (j + 1) * line - 3), font, scale,
                        (255, 255, 0) if j == 0 else (230, 230, 230), 1, cv2.LINE_AA)
    return img


def clock(t: Optional[float]) -> str:
    """Seconds as m:ss.s (h:mm:ss past an hour); '?' for None."""
    if t is None:
        return "?"
    t = max(t, 0.0)
    h, rest = divmod(t, 3600)
    m, s = divmod(rest, 60)
    return f"{int(h)}:{int(m):02d}:{s:04.1f}" if h else f"{int(m)}:{s:04.1f}"


def _round(v: Optional[float], n: int) -> Optional[float]:
    return None if v is None else round(float(v), n)
