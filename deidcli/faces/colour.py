"""Colour and tone: match a generated crop to the frame (match_colour), bring a crop into the
trained tone range (normalise_tone), detail measure, the face ellipse mask."""

from __future__ import annotations

import functools

import cv2
import numpy as np

from .align import CROP_SIZE

#: ArcFace 5-point template for a 112x112 crop (from InsightFace's face_align).

#: Default generator crop geometry (see module docstring).

#: match_colour: the input's own chroma is low-passed with this sigma, in fractions of the crop
#: size (4 px at 128), so the generated face gets the input's skin tone, light and tint but not
#: its finest colour detail (iris, lid lines).
CHROMA_SIGMA = 1.0 / 32
#: match_colour: generated lightness is kept within the input's own local range (the darkest and
#: brightest input pixel within ENVELOPE_RADIUS of the crop size, 6 px at 128) widened by
#: ENVELOPE_SLACK L* units (of 255), or half the input face's lightness spread where that is less
#: (a hazy or flat face): no black or white blotch where the input face is mid-grey.
ENVELOPE_RADIUS = 1.0 / 21
ENVELOPE_SLACK = 16.0
#: match_colour: the least envelope slack (L* units) and lightness gain (output spread / the
#: generator's) for a flat face. Lower ones (4 and 0.2) let the paste of a hazy face differ from
#: the input by less than deid evaluate-video's "unchanged" (stress set mosaic3_haze: 78 exposed
#: faces, 32 with these).
SLACK_FLOOR = 6.0
GAIN_FLOOR = 0.35
#: match_colour: the generated lightness is low-passed (the least of DETAIL_SIGMAS, px at the 128
#: crop, that does it) until its detail (mean |Laplacian| over the face) is at most DETAIL_RATIO
#: times the input's: a small, blurred or compressed face gets the softness of its surroundings
#: instead of sharp drawn strokes over a soft face.
DETAIL_RATIO = 1.15
DETAIL_SIGMAS = (0.6, 0.9, 1.2, 1.6, 2.0, 2.6, 3.2, 4.0)


def detail(L: np.ndarray, size: int) -> float:
    """Mean |Laplacian| of a lightness image (S, S) float32 over the face ellipse."""
    return float(cv2.mean(np.abs(cv2.Laplacian(L, cv2.CV_32F, ksize=3)), mask=_face_u8(size))[0])


def match_colour(raw: np.ndarray, crop: np.ndarray, mask: np.ndarray, min_weight: float = 1.0,
                 mode: str = "tone") -> np.ndarray:
    """``raw`` (S, S, 3) uint8 RGB with, where ``mask`` (S, S) float in [0, 1] uses it, the
    colours of ``crop`` (S, S, 3) uint8 RGB. Returns ``raw`` itself when the mask weighs less
    than ``min_weight`` pixels.

    mode ``tone`` (the pipeline's): the generated face keeps only its lightness (CIELAB L*), its
    mask-weighted mean and spread moved to the input's (gain clipped to [GAIN_FLOOR, 2]) and then kept
    inside the input's own local lightness range (:data:`ENVELOPE_RADIUS`,
    :data:`ENVELOPE_SLACK`); its chroma (a*, b*) is the input's, low-passed
    (:data:`CHROMA_SIGMA`). So no colour the input face does not have can appear: under stage
    light, low light or a colour cast the generator's own tints (a yellow-green nose bridge, red
    and white patches, black eye holes) used to come out as painted masks. The lightness is also
    softened to the input's level of detail (:data:`DETAIL_RATIO`): no sharp strokes drawn on a
    small or blurred face. Shapes, and so the new identity, are the generator's.

    mode ``stats``: per CIELAB channel, the mask-weighted mean and standard deviation of raw are
    moved to those of the input crop (gain clipped to [0.5, 2]); the generator's own tints stay,
    scaled. The generator alone lightens faces (LFW DevTest, 400 faces: mean |dL*| under the
    mask 9.4 at one pass and 15.6 at two; 0.6 and 1.0 matched)."""
    if mode not in ("tone", "stats"):
        raise ValueError(f"mode must be tone or stats, not {mode!r}")
    w = cv2.resize(np.asarray(mask, np.float32), (32, 32), interpolation=cv2.INTER_AREA)[..., None]
    total = float(w.sum()) * mask.shape[0] * mask.shape[1] / (32 * 32)
    if total < min_weight:
        return raw
    w = w / w.sum()
    lab_raw, lab_crop = cv2.cvtColor(raw, cv2.COLOR_RGB2LAB), cv2.cvtColor(crop, cv2.COLOR_RGB2LAB)
    stats = []  # (mean, std) per channel, mask-weighted, from 32 x 32 (plenty for two moments)
    for lab in (lab_raw, lab_crop):
        x = cv2.resize(lab, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
        m = (x * w).sum((0, 1))
        stats.append((m, np.sqrt((np.square(x - m) * w).sum((0, 1))) + 1e-3))
    (ma, sa), (mb, sb) = stats
    g = np.clip(sb / sa, 0.5, 2.0)
    if mode == "stats":
        # per channel v -> (v - ma) * g + mb as three 256-entry tables (8-bit CIELAB)
        v = np.arange(256, dtype=np.float32)[:, None]
        lut = np.clip((v - ma) * g + mb, 0, 255).round().astype(np.uint8)[None]  # (1, 256, 3)
        return cv2.cvtColor(cv2.LUT(lab_raw, lut), cv2.COLOR_LAB2RGB)
    size = raw.shape[0]
    # the lightness gain may go down to GAIN_FLOOR: normalise_tone stretched a flat (hazy, dark)
    # face's contrast for the generator, and this takes most of the stretch back
    L = (lab_raw[..., 0].astype(np.float32) - ma[0]) * float(np.clip(sb[0] / sa[0], GAIN_FLOOR, 2.0)) + mb[0]
    Lc = lab_crop[..., 0]
    r = max(1, int(round(size * ENVELOPE_RADIUS)))
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    slack = min(ENVELOPE_SLACK, max(SLACK_FLOOR, 0.5 * float(sb[0])))
    lo = cv2.erode(Lc, k).astype(np.float32) - slack
    hi = cv2.dilate(Lc, k).astype(np.float32) + slack
    budget = DETAIL_RATIO * detail(Lc.astype(np.float32), size)
    if detail(L, size) > budget:
        scale = size / 128.0

        def soften(k):
            return cv2.GaussianBlur(L, (0, 0), DETAIL_SIGMAS[k] * scale, borderType=cv2.BORDER_REPLICATE)

        lo_k, hi_k = 0, len(DETAIL_SIGMAS) - 1  # the least sigma that does it (detail falls with sigma)
        while lo_k < hi_k:
            mid = (lo_k + hi_k) // 2
            if detail(soften(mid), size) <= budget:
                hi_k = mid
            else:
                lo_k = mid + 1
        L = soften(lo_k)
    out = np.empty_like(lab_crop)
    out[..., 0] = np.clip(np.rint(np.minimum(np.maximum(L, lo), hi)), 0, 255)
    sigma = max(0.5, size * CHROMA_SIGMA)
    out[..., 1:] = cv2.GaussianBlur(lab_crop[..., 1:], (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
    return cv2.cvtColor(out, cv2.COLOR_LAB2RGB)


#: normalise_tone: the range of CIELAB (8-bit) statistics of faces the generator was trained on:
#: mean and spread of L*, a*, b* over the face ellipse (:func:`face_ellipse_mask`) of 300 LFW
#: DevTrain generator crops, each statistic's mean +- 2 standard deviations across the faces
#: (L* mean 128 +- 22, spread 45 +- 10; a* 140 +- 5, spread 6 +- 2; b* 145 +- 7, spread 7 +- 3).
TRAINED_MEAN_RANGE = ((84.0, 172.0), (129.0, 151.0), (132.0, 158.0))
TRAINED_STD_RANGE = ((25.0, 65.0), (2.0, 10.5), (1.0, 13.5))
_MEAN_LO, _MEAN_HI = np.asarray(TRAINED_MEAN_RANGE, np.float32).T
_STD_LO, _STD_HI = np.asarray(TRAINED_STD_RANGE, np.float32).T


@functools.lru_cache(maxsize=8)
def face_ellipse_mask(size: int = CROP_SIZE) -> np.ndarray:
    """(S, S) bool: the face (brows to chin, cheek to cheek) in a generator crop of ``size``
    (cached: do not write into it)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return ((xx - 0.5 * size) / (0.30 * size)) ** 2 + ((yy - 0.55 * size) / (0.39 * size)) ** 2 < 1.0


@functools.lru_cache(maxsize=8)
def _face_u8(size: int) -> np.ndarray:
    return face_ellipse_mask(size).astype(np.uint8)


def normalise_tone(crop: np.ndarray) -> np.ndarray:
    """The crop (S, S, 3) uint8 RGB with its face's colour statistics brought into the range the
    generator was trained on (:data:`TRAINED_MEAN_RANGE`, :data:`TRAINED_STD_RANGE`): a face
    under red stage light, in low light or in haze is fed to the generator as the nearest
    ordinary photo would be (one affine map per CIELAB channel); a face already in range is
    returned unchanged. :func:`match_colour` gives the result the input's own colours back."""
    size = crop.shape[0]
    lab = cv2.cvtColor(crop, cv2.COLOR_RGB2LAB)
    m, sd = cv2.meanStdDev(lab, mask=_face_u8(size))
    m, sd = m[:, 0].astype(np.float32), sd[:, 0].astype(np.float32) + 1e-3
    tm = np.minimum(np.maximum(m, _MEAN_LO), _MEAN_HI)
    ts = np.minimum(np.maximum(sd, _STD_LO), _STD_HI)
    if not (np.abs(tm - m).max() > 1e-3 or np.abs(ts - sd).max() > 1e-3):
        return crop
    x = np.arange(256, dtype=np.float32)[:, None]
    lut = np.clip((x - m) * (ts / sd) + tm, 0, 255).round().astype(np.uint8)[None]  # (1, 256, 3)
    return cv2.cvtColor(cv2.LUT(lab, lut), cv2.COLOR_LAB2RGB)
