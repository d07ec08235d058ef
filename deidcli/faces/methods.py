"""Anonymization methods behind one interface.

Classic methods (blur, pixelate, solid) change the pixels inside an ellipse around each
tracked face (box enlarged by ``margin``, turned with the eye line). The learned method
(generate) replaces the face through the generator (see deidcli/generator/engine.py) and pastes it back
under its predicted mask.

All functions take and modify frame images (H, W, 3) uint8 RGB in place and return the
rectangles (x0, y0, x1, y1) they touched.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from .detect import rects_meet

Rect = tuple[int, int, int, int]

#: The blur shrinks a face to this many pixels across, blurs it there (sigma 1.5) and enlarges it
#: back, then gives the face's centre its own mean colour back (a blur this strong draws the
#: surroundings into a small face). 8 and colour kept, rather than 12 (until 2026-12-07): over the
#: stress set and the shared clips (2,315 faces each blurred alone, research/fallback_strength.py
#: --judge dlib) dlib still called 8 blurred faces the same person against 24, deid's identity
#: network verified 29 against 33, and the garish measure classes every one a blur.
BLUR_ACROSS = 8.0

#: The blur of a face under this many pixels (the box's larger side) keeps :data:`SMALL_KEEP` of
#: its contrast about the face's own mean colour. On the stress set (research/fallback_strength.py,
#: 2026-12-07: 501 faces under 96 px of crowd_lfw, mosaic3_haze, mosaic3_blur, mosaic4 and
#: mosaic3_dark, each blurred alone), dlib called 8 of the 8 px blurs the same person and none of
#: these. Blurring them over a wider ellipse as well (margin + 0.25) halved what the audit's network
#: verified under 48 px (26 -> 14 of 127), but in a crowd it laid the flat patch over the chins of
#: generated neighbours (crowd_lfw: 2 garish faces against 0), so the ellipse is ``margin``'s; and
#: a face whose ellipse reaches into another face's box keeps the plain blur (a flat patch of its
#: colour on the face in front of it read as paint there). Nor is a held face's (faces.track: a box
#: kept before a track's first detection or moved on past its last): it is where the face may be,
#: and its colour there can be the background's (crowd_lfw: a 23 px face held at its first box
#: beside where the face was, a flat patch over the background the garish measure classed
#: "colour").
SMALL_FACE = 96.0
SMALL_KEEP = 0.25


def face_ellipse(box: np.ndarray, kps: np.ndarray | None, margin: float) -> tuple[tuple[float, float], tuple[float, float], float]:
    """Ellipse ((cx, cy), (half_w, half_h), angle_deg) covering a face box with ``margin``.

    box: (4,) x0, y0, x1, y1; kps: (5, 2) landmarks or None (then the ellipse is upright).
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    angle = 0.0
    if kps is not None:
        (lx, ly), (rx, ry) = kps[0], kps[1]
        angle = float(np.degrees(np.arctan2(ry - ly, rx - lx)))
    half = (w / 2 * (1 + margin), h / 2 * (1 + margin))
    return (cx, cy), half, angle


def ellipse_mask(shape: Sequence[int], box: np.ndarray, kps: np.ndarray | None, margin: float) -> tuple[Rect, np.ndarray] | None:
    """Rectangle (clipped to the frame) and a uint8 {0, 255} mask of the face ellipse inside it."""
    (cx, cy), (hw, hh), angle = face_ellipse(box, kps, margin)
    r = float(np.hypot(hw, hh))
    h, w = shape[:2]
    x0, y0 = max(int(cx - r) - 1, 0), max(int(cy - r) - 1, 0)
    x1, y1 = min(int(cx + r) + 2, w), min(int(cy + r) + 2, h)
    if x1 <= x0 or y1 <= y0:
        return None
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.ellipse(mask, (round(cx - x0), round(cy - y0)), (max(round(hw), 1), max(round(hh), 1)),
                angle, 0, 360, 255, thickness=-1, lineType=cv2.LINE_8)
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    # tighten the rectangle to the ellipse
    tx0, ty0, tx1, ty1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return (x0 + tx0, y0 + ty0, x0 + tx1, y0 + ty1), mask[ty0:ty1, tx0:tx1]


def centre_colour_kept(roi: np.ndarray, out: np.ndarray, keep: float = 1.0,
                       centre: tuple[slice, slice] | None = None) -> np.ndarray:
    """``out`` (h, w, 3) uint8 RGB, an obscured ``roi`` (same shape), shifted so that ``centre`` (by
    default its central half each way: the face inside its ellipse) has ``roi``'s mean colour
    there. With ``keep`` < 1 the shift is made in CIELAB (the mean L*, a*, b* of ``roi`` there, which
    a flattened face keeps where a kept mean RGB would lighten a face of dark eyes and hair), and
    the variation about that colour is scaled by ``keep`` (0: filled flat with it)."""
    h, w = roi.shape[:2]
    c = centre or (slice(h // 4, h - h // 4), slice(w // 4, w - w // 4))
    if keep == 1.0:
        shift = roi[c].reshape(-1, 3).mean(0) - out[c].reshape(-1, 3).mean(0)
        return np.clip(np.rint(out + shift), 0, 255).astype(np.uint8)
    lab_in = cv2.cvtColor(roi[c].astype(np.float32) / 255, cv2.COLOR_RGB2LAB)
    lab = cv2.cvtColor(out.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)
    mean = lab_in.reshape(-1, 3).mean(0)
    lab = mean + keep * (lab - lab[c].reshape(-1, 3).mean(0))
    rgb = cv2.cvtColor(lab.astype(np.float32), cv2.COLOR_LAB2RGB)
    return np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)


def _obscured(roi: np.ndarray, face_px: float, method: str,
              flat_centre: tuple[slice, slice] | None = None) -> np.ndarray:
    """The obscured version of a region (h, w, 3) uint8 for a face about ``face_px`` wide;
    ``flat_centre``: the face's central region in ``roi`` where a blur is flattened to
    :data:`SMALL_KEEP` of its contrast about that region's colour (None: a plain blur, its colour
    kept over the central half each way)."""
    h, w = roi.shape[:2]
    if method == "pixelate":
        # ~8 blocks across the face
        block = max(face_px / 8.0, 2.0)
        sw, sh = max(1, round(w / block)), max(1, round(h / block))
        small = cv2.resize(roi, (sw, sh), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
    if method == "blur":
        # Downscale so the face is BLUR_ACROSS px across, blur there, upscale: a very strong blur
        # at a cost independent of face size.
        f = min(1.0, BLUR_ACROSS / max(face_px, 1.0))
        sw, sh = max(1, round(w * f)), max(1, round(h * f))
        small = cv2.resize(roi, (sw, sh), interpolation=cv2.INTER_AREA)
        small = cv2.GaussianBlur(small, (0, 0), sigmaX=1.5, borderType=cv2.BORDER_REPLICATE)
        keep = 1.0 if flat_centre is None else SMALL_KEEP
        return centre_colour_kept(roi, cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR), keep, flat_centre)
    if method == "solid":
        return np.zeros_like(roi)
    raise ValueError(f"not a classic method: {method}")


def _face_centre(box: np.ndarray, kps: np.ndarray | None, rect: Rect) -> tuple[slice, slice]:
    """5/8 of a face ``box`` each way (the central half of its ellipse's rectangle at margin 0.25)
    about the mean of its landmarks ``kps`` (5, 2) (the box's centre without them; a turned face's
    landmarks sit off its box's centre, where the identity network and the audit look), as (rows,
    columns) of the region ``rect``, at least one pixel inside it."""
    x0, y0, x1, y1 = rect
    bx0, by0, bx1, by1 = (float(v) for v in box)
    cx, cy = np.asarray(kps, np.float64).mean(0) if kps is not None else ((bx0 + bx1) / 2, (by0 + by1) / 2)

    def span(c: float, size: float, n: int) -> slice:
        q = size * 5 / 16
        a = min(max(int(c - q), 0), n - 1)
        return slice(a, max(min(int(np.ceil(c + q)), n), a + 1))

    return span(cy - y0, by1 - by0, y1 - y0), span(cx - x0, bx1 - bx0, x1 - x0)


def classic_region(image: np.ndarray, face, method: str, margin: float,
                   others: Sequence[np.ndarray] = ()) -> tuple[Rect, np.ndarray] | None:
    """What :func:`apply_classic` writes for one face, ``image`` untouched: ``(rect, pixels)``, the
    rectangle (x0, y0, x1, y1) and its new (y1 - y0, x1 - x0, 3) uint8 content, or None where the
    face ellipse falls outside the frame (the form of align.pasted_region). ``others``: the boxes
    (4,) of the frame's other faces (a small face's blur is flattened only clear of them, and only
    where the face was seen: not a held one)."""
    face_px = float(max(face.box[2] - face.box[0], face.box[3] - face.box[1]))
    em = ellipse_mask(image.shape, face.box, getattr(face, "kps", None), margin)
    if em is None:
        return None
    (x0, y0, x1, y1), mask = em
    roi = image[y0:y1, x0:x1].copy()
    centre = None
    if (method == "blur" and face_px < SMALL_FACE and not getattr(face, "held", False)
            and not any(rects_meet((x0, y0, x1, y1), b) for b in others)):
        centre = _face_centre(face.box, getattr(face, "kps", None), (x0, y0, x1, y1))
    out = _obscured(roi, face_px, method, centre)
    sel = mask > 0
    roi[sel] = out[sel]
    return (x0, y0, x1, y1), roi


def apply_classic(image: np.ndarray, faces: Sequence, method: str, margin: float,
                  others: Sequence[np.ndarray] = ()) -> list[Rect]:
    """Blur / pixelate / fill each face ellipse of ``image`` (H, W, 3) uint8 RGB in place.

    faces: objects with ``box`` (4,) and ``kps`` (5, 2) attributes (e.g. faces.Face); others: the
    boxes (4,) of the frame's faces not in ``faces`` (see :func:`classic_region`).
    """
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8, (image.shape, image.dtype)
    rects: list[Rect] = []
    for face in faces:
        near = [g.box for g in faces if g is not face] + list(others)
        region = classic_region(image, face, method, margin, near)
        if region is None:
            continue
        (x0, y0, x1, y1), px = region
        image[y0:y1, x0:x1] = px
        rects.append((x0, y0, x1, y1))
    return rects
