"""Garish faces: is an anonymized face a plausible face, or a painted mask?

``deid evaluate-video`` asks this of every output face next to exposure (:func:`assess`). The
generator sometimes turns small, dark, hazy or colour-cast faces into masks: black patches
over the eyes or nose, red-and-white or yellow paint under red light, pink and cyan paint under
blue light, white smears over the eyes. A face is judged on its input and output ArcFace crops
(112 x 112, same alignment: the input's landmarks) inside :func:`face_mask` (the inner face
ellipse, brows to chin), and for pixelation on the face box of both frames.

First each output face is classified:

unchanged
    the output crop is the input's (mean absolute difference < ``unchanged_mad``, 2.0 in
    evaluate_video): nothing was replaced (exposure counts these).
pixelated
    deid's fallback ``pixelate`` (or any mosaic): in the central part of the output face box
    the gradient energy sits on a few block-edge columns and rows (:func:`block_share` >=
    :data:`PIXELATED_BLOCK_SHARE`, the input's below it), and the mean colour is the input's.
blurred
    deid's fallback ``blur``: the output face has far less detail than the input's at the
    scale of the face (:func:`detail_ratio` < :data:`BLURRED_DETAIL_RATIO`), mean colour kept.
generated
    anything else.

A generated face is *garish* when any of these holds (the reasons):

colour
    its colours are not the input face's: more than :data:`FOREIGN_SHARE` of its pixels are
    farther than :data:`FOREIGN_DE` (CIELAB) from the input face's colours
    (:func:`foreign_share`: a yellow nose under red light, pink paint under blue light, white
    paint on a dark face), or the mean L* / (a*, b*) moved by more than :data:`COLOUR_DL` /
    :data:`COLOUR_DAB`.
blotch
    black or white patches: more than :data:`BLOTCH_SHARE` of the face is much darker (lighter)
    than the input at the same place and than (nearly) anything on the input face, or black
    (white) where the input is mid-grey, in patches that survive a small opening
    (:func:`blotch_shares`).
lost
    the face detector no longer finds a face in the output where it found one in the input with
    confidence (decided by evaluate_video; faces at least :data:`LOST_MIN_FACE` px high, not
    partly blurred, and not exposed: a face still verified as the input person was not replaced,
    whatever made the detector miss it).

A face another face of the same input frame hides in part (:func:`occluded_share`: the other
faces' boxes cover :data:`OCCLUDED_SHARE` of its box or more) is judged on what is its own: a
blurred one is blurred whatever its colour (the cover of the face in front lies over it), and it
is not lost (the detector loses a face half under its neighbour's cover for that).

Fallback faces (blurred, pixelated) are not judged: they keep the input's mean colour by
definition (a "fallback" that blackens a face is no fallback: it is classified generated, and
its colour makes it garish). Thresholds: see the comments at them.

Arrays: crops (112, 112, 3) uint8 RGB; regions (h, w, 3) uint8 RGB parts of the frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

import cv2
import numpy as np

from ..faces.blotch import BLOTCH_DROP, BLOTCH_OPEN, BLOTCH_SHARE, BRIGHT_L, DARK_L, MID_L, blotch_shares

CROP = 112
#: The inner face in the ArcFace 112 crop: ellipse centre and half axes (px). Brows to chin,
#: cheek to cheek, little hair or background on frontal faces.
ELLIPSE_CENTER = (56, 66)
ELLIPSE_AXES = (36, 44)

# -- thresholds -------------------------------------------------------------------------------
# Chosen on 27 input/output pairs (out/garish in the working tree when they were chosen): deid's
# default output of the stress mosaics (python -m deidcli.research.stress: mosaic2/3/4, mosaic3
# under red, blue, green light, dark, hazy, blurred, crf 35, crowd_lfw) and of 3 s of four shared
# clips, the same inputs through --method blur and --method pixelate, and plain re-encodes; by
# looking at contact sheets of input/output crops sorted by each figure. Checked on the outputs
# of the anonymizer as of commit 30ce703 (tone matching, calm fallback for small/dark faces) for
# 10 of these inputs. By-eye agreement: 86 of 90 faces (45 flagged, 45 not, shuffled, graded
# blind) on the first material, 81 of 90 (30 flagged at a 1.5% blotch share, 60 not) on the
# second.

#: Mean L* shift (0-100) and mean (a*, b*) shift of the face beyond which its colour is off
#: (deid matches the input's colour statistics, so its faces stay within |dL| 3, d(a*b*) 9 at the
#: 99th percentile; these only catch a failed colour match).
COLOUR_DL = 18.0
COLOUR_DAB = 14.0
#: Foreign colours: an output pixel whose CIELAB colour is farther than FOREIGN_DE (Euclidean,
#: L* a* b*) from the 3rd-nearest colour of the input face (both at FOREIGN_SIZE px, area-averaged)
#: is foreign; a face with more than FOREIGN_SHARE of them is garish. Chosen by a by-eye grading
#: of 48 borderline faces (red, blue, green light, crowd_lfw): tolerance 10 separated best
#: (ROC AUC 0.93; 12: 0.79, 8: 0.92), and at share 0.04 it agreed with the eye on 42 of 48. The
#: plain re-encodes and the four shared clips stay at 0 faces, normal-light mosaics at <= 1.5%.
FOREIGN_DE = 10.0
FOREIGN_SHARE = 0.04
FOREIGN_SIZE = 56
#: Blotches (deidcli/faces/blotch.py, shared with the anonymizer's own blotch guard): a face with
#: more than BLOTCH_SHARE of its area in dark or in bright blotches is garish. At 2% no face of a
#: plain re-encode or of the shared clips is flagged; dark eye sockets, black eye patches and
#: "sunglasses" on the hazy mosaic, dark noses on crowd_lfw and black eye holes under blue light
#: are. The figure is a continuum: between 1.5 and 2% the eye saw as many mild cases (a browner
#: nose, white brows) as garish ones (dark eye sockets); in two blind gradings of 90 faces each,
#: 2% agreed with the eye on 86 + 81, 1.5% on 86 + 76.
#: Blurred: fine detail of the output face over the input's (mean |Laplacian| of the grey ArcFace
#: crops brought down to DETAIL_SIZE px, i.e. at a scale tied to the face, inside the ellipse)
#: below this, colour kept. deid's blur gives <= 0.13 (95th percentile, faces >= 48 px; the rest
#: are faces it did not reach), its generated faces >= 0.82 (5th), a re-encode ~1; measured in
#: frame pixels instead, generated faces on noisy (dark) inputs fell to 0.44 (1st), so the
#: face-scaled measure is used.
BLURRED_DETAIL_RATIO = 0.3
DETAIL_SIZE = 32
#: Pixelated: share of the gradient energy of the output face box on block edges
#: (:func:`block_share`) at least this while the input's is below it, colour kept. deid's
#: pixelate gives >= 0.53 (5th percentile, faces >= 48 px; under 48 px its 2-5 px blocks are
#: smeared by the codec and some are missed: they count as generated, not garish), generated and
#: re-encoded faces <= 0.24.
PIXELATED_BLOCK_SHARE = 0.4
#: Fallback colour tolerance: a blurred/pixelated face keeps the input's mean colour within these
#: (deid's blur: |dL| <= 6.6, d(a*b*) <= 6.3 at the 99th percentile).
FALLBACK_DL = 8.0
FALLBACK_DAB = 8.0
#: Lost faces: only faces at least LOST_MIN_FACE px high (the detector misses small faces that
#: look fine) and whose detail ratio is at least LOST_MIN_DETAIL (generated faces are >= 0.78 at
#: the 1st percentile; below it a face is partly blurred, e.g. under a neighbour's blur ellipse,
#: and the detector loses it for that) count. On the material above, no generated face was lost
#: at audit_thresh 0.3 (only blurred or partly blurred ones), so the reason has not fired there.
LOST_MIN_FACE = 40
LOST_MIN_DETAIL = 0.6
#: Occluded: the share of a face's box that the boxes of the frame's other faces cover, from which
#: the face is judged as one another face hides in part (see the module docstring). The two garish
#: faces of the stress set's crowds at commit 939d1a8, both looked at on the frames, were of this
#: kind: on crowd_1080 a face 90% behind another, under the front face's lighter blur (classed
#: generated for its colour, a bright "blotch"); on crowd_4k a generated face 29% under the blur of
#: a face passing in front of it, which the detector then missed ("lost"). 589 of the three crowds'
#: 7,203 faces are covered this much (research/occluded_faces.py lists what the rule changes).
OCCLUDED_SHARE = 0.2
#: Central part of the face box (fraction of width and height) in which blocks are measured:
#: inside the anonymizer's face ellipse whatever the margin.
BOX_CENTRE = 0.6
#: Longest side (px) the box is brought down to before blocks are measured (cost).
BOX_MAX = 256

KINDS = ("unchanged", "blurred", "pixelated", "generated")
REASONS = ("colour", "blotch", "lost")
#: Face-size bins (box height, px): [lo, hi).
SIZE_BINS = ((0, 48), (48, 96), (96, 192), (192, None))


def _bin_name(lo: int, hi: Optional[int]) -> str:
    return f"<{hi}" if lo == 0 else (f">={lo}" if hi is None else f"{lo}-{hi}")


def size_bin(height: float) -> str:
    """Name of the size bin of a face box ``height`` px high ("<48", "48-96", "96-192", ">=192")."""
    for lo, hi in SIZE_BINS:
        if hi is None or height < hi:
            return _bin_name(lo, hi)
    raise AssertionError


def size_bin_names() -> list[str]:
    return [_bin_name(lo, hi) for lo, hi in SIZE_BINS]


@lru_cache(maxsize=4)
def face_mask(size: int = CROP) -> np.ndarray:
    """(size, size) bool: the inner face ellipse of an ArcFace crop (scaled from 112)."""
    m = np.zeros((CROP, CROP), np.uint8)
    cv2.ellipse(m, ELLIPSE_CENTER, ELLIPSE_AXES, 0, 0, 360, 1, thickness=-1)
    if size != CROP:
        m = cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST)
    return m.astype(bool)


def to_lab(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 CIELAB (L* 0-100, a*, b* about -128..127) of an RGB uint8 image."""
    return cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)


def mean_shift(lab_in: np.ndarray, lab_out: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(mean L* out - in, distance between the mean (a*, b*) of out and in) over ``mask``."""
    mi, mo = lab_in[mask].mean(0), lab_out[mask].mean(0)
    return float(mo[0] - mi[0]), float(np.hypot(*(mo[1:] - mi[1:])))


def _scaled(mask: np.ndarray, size: int) -> np.ndarray:
    if mask.shape[0] == size:
        return mask
    return cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)


def occluded_share(box: np.ndarray, others) -> float:
    """The share of ``box`` (4,) x0, y0, x1, y1 px that the union of the boxes ``others`` (each (4,))
    covers, 0-1 (counted on the whole-pixel grid of ``box``)."""
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    w, h = max(int(np.ceil(x1 - x0)), 1), max(int(np.ceil(y1 - y0)), 1)
    cover = np.zeros((h, w), bool)
    for o in others:
        a, b = max(int(np.floor(o[0] - x0)), 0), max(int(np.floor(o[1] - y0)), 0)
        c, d = min(int(np.ceil(o[2] - x0)), w), min(int(np.ceil(o[3] - y0)), h)
        if c > a and d > b:
            cover[b:d, a:c] = True
    return float(cover.mean())


def valid_mask(in112: np.ndarray, out112: np.ndarray) -> np.ndarray:
    """(112, 112) bool: :func:`face_mask` less the part of the crop outside the frame (exactly black
    in both crops: arcface_crop fills it with 0) and a 2 px band along it."""
    inside = ((in112.max(axis=2) > 0) | (out112.max(axis=2) > 0)).astype(np.uint8)
    return face_mask() & cv2.erode(inside, np.ones((5, 5), np.uint8), borderType=cv2.BORDER_REPLICATE).astype(bool)


def foreign_share(lab_in: np.ndarray, lab_out: np.ndarray, tol: float = FOREIGN_DE,
                  size: int = FOREIGN_SIZE, mask: Optional[np.ndarray] = None) -> float:
    """Share of the face pixels of ``lab_out`` whose CIELAB colour is farther than ``tol`` from the
    3rd-nearest colour among the input face's pixels (both area-averaged to ``size`` px, inside
    ``mask``, 112 px, default :func:`face_mask`): colours the input face does not have (the 3rd
    neighbour, not the 1st, so that a couple of stray input pixels do not make a colour the input's)."""
    from scipy.spatial import cKDTree

    m = _scaled(face_mask() if mask is None else mask, size)
    if m.sum() < 8:
        return 0.0
    a = cv2.resize(lab_in, (size, size), interpolation=cv2.INTER_AREA)[m]
    b = cv2.resize(lab_out, (size, size), interpolation=cv2.INTER_AREA)[m]
    d, _ = cKDTree(a).query(b, k=3)
    return float(np.mean(d[:, -1] > tol))


def detail(crop: np.ndarray, size: int = DETAIL_SIZE, mask: Optional[np.ndarray] = None) -> float:
    """Mean |Laplacian| (0-255 grey) of an ArcFace crop brought down to ``size`` px, inside ``mask``
    (112 px, default :func:`face_mask`)."""
    g = cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2GRAY).astype(np.float32)
    g = cv2.resize(g, (size, size), interpolation=cv2.INTER_AREA)
    m = _scaled(face_mask() if mask is None else mask, size)
    lap = np.abs(cv2.Laplacian(g, cv2.CV_32F, ksize=1))
    return float(lap[m].mean()) if m.any() else 0.0


def detail_ratio(in112: np.ndarray, out112: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """Detail of the output face over the input's (:func:`detail`; 0.5 grey levels added to both, so
    that two flat faces do not make a ratio)."""
    return (detail(out112, mask=mask) + 0.5) / (detail(in112, mask=mask) + 0.5)


def box_region(image: np.ndarray, box: np.ndarray, centre: float = BOX_CENTRE) -> Optional[np.ndarray]:
    """The central ``centre`` part of ``box`` (x0, y0, x1, y1) of ``image``, clipped to the frame;
    None when under 4 px either way."""
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * centre / 2, (y1 - y0) * centre / 2
    h, w = image.shape[:2]
    a, b = max(int(round(cx - hw)), 0), min(int(round(cx + hw)), w)
    c, d = max(int(round(cy - hh)), 0), min(int(round(cy + hh)), h)
    if b - a < 4 or d - c < 4:
        return None
    return image[c:d, a:b]


def block_share(region: np.ndarray) -> float:
    """How blocky an RGB region (frame pixels) is: the smaller, across and down, of the share of the
    gradient energy (mean |difference| of neighbouring columns, resp. rows) carried by the lines
    whose energy is above 3 times the median line's (+ 0.5). A mosaic puts nearly all of it on
    its block edges (about 0.5-0.95), a face spreads it (0-0.25)."""
    g = cv2.cvtColor(np.ascontiguousarray(region), cv2.COLOR_RGB2GRAY).astype(np.float32)
    s = BOX_MAX / max(g.shape)
    if s < 1:  # nearest keeps block edges sharp
        g = cv2.resize(g, (max(1, round(g.shape[1] * s)), max(1, round(g.shape[0] * s))),
                       interpolation=cv2.INTER_NEAREST)
    out = []
    for axis in (1, 0):
        p = np.abs(np.diff(g, axis=axis)).mean(axis=1 - axis)
        if len(p) < 4 or p.sum() < 1e-6:
            return 0.0
        out.append(float(p[p > 3.0 * np.median(p) + 0.5].sum() / p.sum()))
    return min(out)


@dataclass
class Verdict:
    """One output face: its kind (KINDS), whether it is garish and why (REASONS), and the figures."""

    kind: str
    garish: bool = False
    reasons: tuple = ()
    metrics: dict = field(default_factory=dict)

    @property
    def reason(self) -> str:
        return "+".join(self.reasons)

    def without(self, reason: str) -> "Verdict":
        """The same verdict less one reason (garish if any other is left)."""
        rest = tuple(r for r in self.reasons if r != reason)
        return Verdict(self.kind, bool(rest), rest, self.metrics)


def assess(in112: np.ndarray, out112: np.ndarray, region_in: Optional[np.ndarray] = None,
           region_out: Optional[np.ndarray] = None, mad: Optional[float] = None, unchanged_mad: float = 2.0,
           lost: Optional[bool] = None, height: float = 0.0, occluded: bool = False) -> Verdict:
    """Classify an output face and judge whether it is garish (see the module docstring).

    in112, out112: ArcFace crops of the input and output frame at the input's landmarks;
    region_in, region_out: the face box of both frames (:func:`box_region`; None: no block test,
    so no face is called pixelated); mad: mean |in112 - out112| (None: computed); lost: the input
    had a confident detection and the output none (None: not checked); height: face box height
    in px (for ``lost``); occluded: another face of the frame hides this one in part
    (:data:`OCCLUDED_SHARE`): blurred whatever its colour, never lost.
    """
    if mad is None:
        mad = float(np.mean(np.abs(in112.astype(np.int16) - out112.astype(np.int16))))
    mask = valid_mask(in112, out112)
    if mask.sum() < 0.1 * face_mask().sum():  # nearly all outside the frame: nothing to judge
        mask = face_mask()
    lab_in, lab_out = to_lab(in112), to_lab(out112)
    dl, dab = mean_shift(lab_in, lab_out, mask)
    m = {"mad": round(float(mad), 2), "dL": round(dl, 2), "dab": round(dab, 2)}
    if mad < unchanged_mad:
        return Verdict("unchanged", metrics=m)
    fg = foreign_share(lab_in, lab_out, mask=mask)
    dark, bright = blotch_shares(lab_in[..., 0], lab_out[..., 0], mask)
    dr = detail_ratio(in112, out112, mask)
    m.update({"foreign": round(fg, 4), "dark": round(dark, 4), "bright": round(bright, 4), "detail": round(dr, 3)})
    same_colour = abs(dl) <= FALLBACK_DL and dab <= FALLBACK_DAB
    kind = "generated"
    if region_in is not None and region_out is not None:
        bs, bs_in = block_share(region_out), block_share(region_in)
        m.update({"block": round(bs, 3), "block_in": round(bs_in, 3)})
        if same_colour and bs >= PIXELATED_BLOCK_SHARE > bs_in:
            kind = "pixelated"
    if kind == "generated" and (same_colour or occluded) and dr < BLURRED_DETAIL_RATIO:
        kind = "blurred"
    blotch = max(dark, bright) > BLOTCH_SHARE
    reasons = []
    if kind == "generated":
        if abs(dl) > COLOUR_DL or dab > COLOUR_DAB or fg > FOREIGN_SHARE:
            reasons.append("colour")
        if blotch:
            reasons.append("blotch")
        if lost and height >= LOST_MIN_FACE and dr >= LOST_MIN_DETAIL and not occluded:
            reasons.append("lost")
    return Verdict(kind, bool(reasons), tuple(reasons), m)


def settings() -> dict:
    """The thresholds, for a report's settings."""
    names = ("COLOUR_DL", "COLOUR_DAB", "FOREIGN_DE", "FOREIGN_SHARE", "FOREIGN_SIZE", "BLOTCH_DROP", "DARK_L",
             "BRIGHT_L", "MID_L", "BLOTCH_OPEN", "BLOTCH_SHARE", "BLURRED_DETAIL_RATIO", "DETAIL_SIZE",
             "PIXELATED_BLOCK_SHARE", "FALLBACK_DL", "FALLBACK_DAB", "LOST_MIN_FACE", "LOST_MIN_DETAIL",
             "OCCLUDED_SHARE")
    return {k.lower(): (list(v) if isinstance(v, tuple) else v) for k, v in ((n, globals()[n]) for n in names)}
