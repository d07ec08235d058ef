"""Alignment: 5-point similarity transforms, aligned crops, and pasting results back.

Conventions used everywhere in deid:
- frame images are (H, W, 3) uint8 RGB;
- landmarks are (5, 2) float32 pixel coordinates in the order left eye, right eye,
  nose, left mouth corner, right mouth corner (SCRFD / ArcFace order);
- an affine `M` is a (2, 3) float32/64 matrix mapping frame pixels -> crop pixels.

The generator crop is the ArcFace 112x112 template scaled around the crop centre by
``1 / (1 + 2 * margin)``: the face occupies the same place as in an ArcFace crop, with
``margin`` (fraction of the ArcFace crop) of context on every side, so the blend edge
falls outside eyes, nose and mouth. Because both crops share one centre, the ArcFace
crop of the identity network is the central square of the generator crop
(see :func:`arcface_box`); training uses that to feed generator outputs to the
identity network without another warp.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from insightface.utils import face_align

#: ArcFace 5-point template for a 112x112 crop (from InsightFace's face_align).
ARCFACE_112 = np.asarray(face_align.arcface_dst, dtype=np.float32)

#: Default generator crop geometry (see module docstring).

CROP_SIZE = 128
CROP_MARGIN = 0.2


def crop_template(size: int = CROP_SIZE, margin: float = CROP_MARGIN) -> np.ndarray:
    """Landmark template (5, 2) float32 for a ``size`` x ``size`` crop with ``margin``."""
    unit = ARCFACE_112 / 112.0  # in [0, 1]
    scale = 1.0 / (1.0 + 2.0 * margin)
    return (((unit - 0.5) * scale + 0.5) * size).astype(np.float32)


def arcface_box(size: int = CROP_SIZE, margin: float = CROP_MARGIN) -> tuple[float, float]:
    """(offset, side) in crop pixels of the square that is the ArcFace 112 crop inside a
    generator crop: ``crop[off:off+side, off:off+side]`` resized to 112 is the ArcFace crop."""
    side = size / (1.0 + 2.0 * margin)
    return (size - side) / 2.0, side


def arcface_squares(crops, size: int = CROP_SIZE, margin: float = CROP_MARGIN) -> list[np.ndarray]:
    """The ArcFace crops inside generator crops: for each (S, S, 3) uint8 crop of ``crops``, its
    :func:`arcface_box` square resized to (112, 112, 3) uint8 (INTER_AREA), what the identity
    network is given (the pipeline's identity check, the calibration and check scripts)."""
    off, side = arcface_box(size, margin)
    a, b = int(round(off)), int(round(off + side))
    return [cv2.resize(c[a:b, a:b], (112, 112), interpolation=cv2.INTER_AREA) for c in crops]


def mouth_box(size: int = CROP_SIZE, margin: float = CROP_MARGIN, soften: int = 1) -> np.ndarray:
    """(size, size) float32 in [0, 1]: 1 over the mouth of an aligned crop, 0 elsewhere.

    The box on :func:`crop_template`: from 0.25 inter-ocular distances (IOD) left of the left mouth
    corner to as far right of the right one, from 0.3 IOD above the mouth-corner line to 0.55 below
    it (both lips and the gap between them over the range a talking mouth opens), box-blurred by
    ``soften`` px (odd; zero outside the crop)."""
    t = crop_template(size, margin)
    iod = float(abs(t[1, 0] - t[0, 0]))
    y_line = float(t[3:5, 1].mean())
    return soft_box(size, (float(t[3, 0]) - 0.25 * iod, y_line - 0.3 * iod,
                           float(t[4, 0]) + 0.25 * iod, y_line + 0.55 * iod), soften)


def eye_boxes(size: int = CROP_SIZE, margin: float = CROP_MARGIN, soften: int = 1, top: float = 0.5) -> np.ndarray:
    """(2, size, size) float32 in [0, 1]: 1 over each eye of an aligned crop with its brow (the
    :func:`crop_template` eye +-0.35 inter-ocular distances across, from ``top`` (0.5) above its
    centre to 0.2 below; ``top`` 0.25 leaves the brow out: lids and iris only), box-blurred by
    ``soften`` px."""
    t = crop_template(size, margin)
    iod = float(abs(t[1, 0] - t[0, 0]))
    return np.stack([soft_box(size, (float(x) - 0.35 * iod, float(y) - top * iod,
                                     float(x) + 0.35 * iod, float(y) + 0.2 * iod), soften) for x, y in t[:2]])


def eye_band(size: int = CROP_SIZE, margin: float = CROP_MARGIN) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), end-exclusive crop pixels: the band over both eyes and brows of an aligned
    crop (:func:`crop_template` eyes, 0.6 inter-ocular distances (IOD) beyond each, from 0.65 IOD
    above the eye line to 0.45 below), twice as wide as high, sides a multiple of 8 px. 64 x 32 at
    128, 128 x 64 at 256: what the training's eye discriminator looks at."""
    t = crop_template(size, margin)
    iod = float(abs(t[1, 0] - t[0, 0]))
    cx, cy = float(t[:2, 0].mean()), float(t[:2, 1].mean()) - 0.1 * iod
    w = max(8, int(round(2.2 * iod / 8)) * 8)
    x0, y0 = int(round(cx - w / 2)), int(round(cy - w / 4))
    return x0, y0, x0 + w, y0 + w // 2


def soft_box(size: int, box, soften: int = 1) -> np.ndarray:
    """(size, size) float32: 1 inside ``box`` (x0, y0, x1, y1 in crop pixels, rounded, inclusive),
    0 outside, box-blurred by ``soften`` px (odd; zero beyond the crop)."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    m = np.zeros((size, size), np.float32)
    m[y0:y1 + 1, x0:x1 + 1] = 1.0
    if soften > 1:
        p = soften // 2
        m = cv2.blur(np.pad(m, p), (soften, soften))[p:p + size, p:p + size]
    return m


def estimate_transform(kps: np.ndarray, size: int = CROP_SIZE, margin: float = CROP_MARGIN) -> np.ndarray:
    """Similarity transform (2, 3) float32 from frame pixels to the aligned crop.

    kps: (5, 2) landmarks in frame pixels. Least-squares similarity (Umeyama), the same
    estimator InsightFace's ``face_align.estimate_norm`` uses.
    """
    kps = np.asarray(kps, dtype=np.float32)
    assert kps.shape == (5, 2), kps.shape
    from skimage.transform import SimilarityTransform

    dst = crop_template(size, margin)
    if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
        tform = SimilarityTransform.from_estimate(kps, dst)
    else:
        tform = SimilarityTransform()
        tform.estimate(kps, dst)
    return tform.params[0:2, :].astype(np.float32)


def warp_crop(image: np.ndarray, M: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """Aligned crop (size, size, 3) uint8 of ``image`` (H, W, 3) uint8 under ``M`` (frame -> crop)."""
    assert image.ndim == 3 and image.dtype == np.uint8, (image.shape, image.dtype)
    return cv2.warpAffine(image, M, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def arcface_crop(image: np.ndarray, kps: np.ndarray) -> np.ndarray:
    """ArcFace-aligned 112x112 RGB uint8 crop (the identity network's input) via InsightFace."""
    import warnings

    with warnings.catch_warnings():  # InsightFace calls a scikit-image API deprecated in 0.26
        warnings.simplefilter("ignore", FutureWarning)
        return face_align.norm_crop(image, np.asarray(kps, dtype=np.float32), image_size=112)


def crop_box(M: np.ndarray, size: int, shape: tuple[int, ...]) -> tuple[int, int, int, int] | None:
    """Bounding box (x0, y0, x1, y1), clipped to the frame ``shape``, of the crop square mapped
    back into the frame; None if it lies outside the frame."""
    Minv = cv2.invertAffineTransform(M)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], dtype=np.float32)
    pts = corners @ Minv.T
    h, w = shape[:2]
    x0 = max(int(np.floor(pts[:, 0].min())) - 1, 0)
    y0 = max(int(np.floor(pts[:, 1].min())) - 1, 0)
    x1 = min(int(np.ceil(pts[:, 0].max())) + 2, w)
    y1 = min(int(np.ceil(pts[:, 1].max())) + 2, h)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def feather(mask: np.ndarray, size: int) -> np.ndarray:
    """Soften a crop mask (S, S) float32 in [0, 1] and force it to 0 at the crop border, so the
    pasted result has no seam and nothing outside the crop changes."""
    assert mask.ndim == 2, mask.shape
    border = max(2, size // 32)
    m = mask.copy()
    m[:border, :] = 0
    m[-border:, :] = 0
    m[:, :border] = 0
    m[:, -border:] = 0
    k = 2 * max(1, size // 40) + 1
    return cv2.GaussianBlur(m, (k, k), 0)


def paste(image: np.ndarray, crop: np.ndarray, mask: np.ndarray, M: np.ndarray,
          detail: int = 0) -> tuple[int, int, int, int] | None:
    """Blend ``crop`` (S, S, 3) uint8 into ``image`` (H, W, 3) uint8 in place, weighted by ``mask``
    (S, S) float32 in [0, 1] (already feathered), through the inverse of ``M``: writes
    :func:`pasted_region` into its rectangle and returns the rectangle (None: nothing to paste).
    """
    region = pasted_region(image, crop, mask, M, detail)
    return None if region is None else put_region(image, region)


def put_region(image: np.ndarray, region: tuple[tuple[int, int, int, int], np.ndarray]) -> tuple[int, int, int, int]:
    """Write a :func:`pasted_region` ``(box, pixels)`` into ``image`` in place; returns the box."""
    (x0, y0, x1, y1), pixels = region
    np.copyto(image[y0:y1, x0:x1], pixels)
    return region[0]


def pasted_region(image: np.ndarray, crop: np.ndarray, mask: np.ndarray, M: np.ndarray,
                  detail: int = 0) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
    """What :func:`paste` writes, ``image`` untouched: ``(box, pixels)``, the rectangle
    (x0, y0, x1, y1) in frame pixels and its new content (y1 - y0, x1 - x0, 3) uint8, or None if
    the crop falls outside the frame. ``crop`` (S, S, 3) uint8 is blended in weighted by ``mask``
    (S, S) float32 in [0, 1] (already feathered), through the inverse of ``M``.

    With ``detail`` D > 0, what is warped and added is the crop's *change*: crop and mask resized
    to D x D, minus the image's own D x D crop under the same alignment. The frame keeps what it
    holds finer than that D px crop (skin, lashes, glasses, lip edges of a face larger than S px,
    which the plain paste replaces with the upscaled, softer crop); coarser than that, the result
    is the plain paste's. A face smaller than D px in the frame gets (nearly) the plain paste.

    Only pixels where the warped mask is > 0 differ from the image's.
    """
    size = crop.shape[0]
    assert crop.shape == (size, size, 3) and crop.dtype == np.uint8, (crop.shape, crop.dtype)
    assert mask.shape == (size, size), mask.shape
    mask = mask.astype(np.float32, copy=False)
    if detail:
        k = detail / size  # crop pixel x -> (x + 0.5) * k - 0.5, as cv2.resize samples
        crop = cv2.resize(crop, (detail, detail), interpolation=cv2.INTER_LINEAR)
        mask = cv2.resize(mask, (detail, detail), interpolation=cv2.INTER_LINEAR)
        M = M.astype(np.float64) * k
        M[:, 2] += 0.5 * (k - 1)
        size = detail
    box = crop_box(M, size, image.shape)
    if box is None:
        return None
    x0, y0, x1, y1 = box
    Mroi = _from_origin(M, x0, y0)  # warp into the ROI only
    roi_size = (x1 - x0, y1 - y0)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    roi = image[y0:y1, x0:x1]
    if detail:
        # the image's own crop (warp_crop of the ROI, which holds every pixel the crop samples),
        # then roi + a * (crop - base), i.e. (1 - a) * roi + a * (roi + crop - base): the change
        # is weighted by the mask at crop resolution and then warped (one float warp, not two),
        # and added with rounding and saturation in one OpenCV pass
        base = cv2.warpAffine(roi, Mroi, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        delta = cv2.subtract(crop, base, dtype=cv2.CV_32F) * mask[..., None]
        w_delta = cv2.warpAffine(delta, Mroi, roi_size, flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        return box, cv2.add(roi, w_delta, dtype=cv2.CV_8U)
    w_crop = cv2.warpAffine(crop, Mroi, roi_size, flags=flags, borderMode=cv2.BORDER_REPLICATE)
    w_mask = cv2.warpAffine(mask, Mroi, roi_size, flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    # (1 - a) * roi + a * crop, rounded, in one OpenCV pass (9x faster than numpy in float32 on a
    # 448x448 ROI); where a == 0 the weights are (1, 0), and the division by their sum (+1e-5)
    # moves no value by half a grey level, so those pixels keep their exact value.
    return box, cv2.blendLinear(roi, w_crop, 1.0 - w_mask, w_mask)


def pasted_arcface(image: np.ndarray, crop: np.ndarray, mask: np.ndarray, M: np.ndarray, kps: np.ndarray,
                   detail: int = 0) -> np.ndarray:
    """The ArcFace 112 crop (:func:`arcface_crop` at ``kps``) of ``image`` as :func:`paste` with
    the same arguments would leave it: what an identity network looking at the output frame will
    see of the face, to the bit (:func:`region_arcface` of :func:`pasted_region`)."""
    return region_arcface(image, pasted_region(image, crop, mask, M, detail), kps)


def region_arcface(image: np.ndarray, region, kps: np.ndarray) -> np.ndarray:
    """The ArcFace 112 crop at ``kps`` of ``image`` with ``region`` (a :func:`pasted_region`, or
    None for none) written into it. ``image`` is written to for the crop and restored before this
    returns (so no other thread may read it meanwhile)."""
    if region is None:
        return arcface_crop(image, kps)
    x0, y0, x1, y1 = region[0]
    kept = image[y0:y1, x0:x1].copy()
    try:
        put_region(image, region)
        return arcface_crop(image, kps)
    finally:
        put_region(image, (region[0], kept))


def _from_origin(M: np.ndarray, x0: int, y0: int) -> np.ndarray:
    """``M`` (frame -> crop, 2 x 3) for the sub-image of the frame whose top-left corner is (x0, y0)."""
    Ms = M.astype(np.float64).copy()
    Ms[:, 2] += Ms[:, 0] * x0 + Ms[:, 1] * y0
    return Ms


def blend_crops(crops: np.ndarray, raw: np.ndarray, masks: Sequence[np.ndarray]) -> np.ndarray:
    """The crops (N, S, S, 3) uint8 as they will be pasted: ``mask * raw + (1 - mask) * crop``, with
    ``raw`` (N, S, S, 3) uint8 the generated faces and ``masks`` N (S, S) float32 in [0, 1]."""
    m = np.stack(masks)[..., None]
    return np.rint(m * raw + (1 - m) * crops.astype(np.float32)).clip(0, 255).astype(np.uint8)
