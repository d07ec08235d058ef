"""Measures shared by the LFW and video evaluations (and training's validation): mouth and lip
opening, LFW descriptors and the FAR threshold, frames read upright, correlations."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LFW = REPO_ROOT.parent / "shared" / "data" / "lfw"

#: Cosine threshold of the identity network (rec_mobilefacenet.onnx through InsightFace's
#: ArcFace crop) at FAR = 0.1% on clean LFW: all 6000 pairs of ../shared/data/lfw/pairs.txt
#: (10 folds of 300 genuine + 300 impostor pairs), each 250x250 deep-funneled image detected
#: with SCRFD-2.5G at det_size 320, det_thresh 0.3 (face nearest the centre; all 7701 images
#: had one), aligned with align.arcface_crop and embedded with engine.IdentityEmbedder, as
#: video faces are here. With 3000 impostor pairs, FAR 0.1% = 3 accepted impostors, i.e. the
#: 3rd highest impostor score is the last one accepted. The four highest impostor scores are
#: 0.41223, 0.35353, 0.33561, 0.33514; evaluate.far_threshold returns the smallest float above
#: the 4th (0.3351381), rounded here to 0.33514: a face is verified when cosine >= it, which
#: accepts exactly the 3 highest. At it TAR = 98.2% of the 3000 genuine pairs; 10-fold LFW
#: accuracy of this pipeline 99.37% +- 0.27% (MobileFaceNet's authors: 99.48%).
#: Reproduce (about 6 min on 2 busy CPU cores; prints the numbers above as JSON):
#:     DEID_MODELS_DIR=../shared/models python -m deidcli.research.evaluate_video --lfw-threshold
VERIFY_THRESHOLD = 0.33514

#: Output ArcFace crops closer than this to the input's (mean absolute difference, 0-255 RGB)
#: count as "no replacement happened". A plain libx264 crf 18 re-encode stays near 1.
UNCHANGED_MAD = 2.0

#: The face region of an ArcFace 112 crop (centre, semi-axes in px): brows to chin, cheek to
#: cheek, leaving hair, ears and background. :func:`face_removed` fills it flat.
FACE_REMOVED_ELLIPSE = ((56, 64), (36, 46))


def face_removed(crop: np.ndarray) -> np.ndarray:
    """The ArcFace crop (112, 112, 3) uint8 RGB with its face region (:data:`FACE_REMOVED_ELLIPSE`)
    filled with the region's mean colour: the control for a verification. When the identity
    network matches this to the input face as closely as it matches the output, its match is
    made on what the crop holds besides the face (hair, background, a colour cast, haze) or on
    nothing at all, and says nothing about the face (evaluate_video: ``verified_context_only``)."""
    import cv2

    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8, (crop.shape, crop.dtype)
    (cx, cy), (ax, ay) = FACE_REMOVED_ELLIPSE
    m = np.zeros((112, 112), np.uint8)
    cv2.ellipse(m, (cx, cy), (ax, ay), 0, 0, 360, 255, -1)
    out = crop.copy()
    sel = m > 0
    out[sel] = np.rint(crop[sel].mean(0)).astype(np.uint8)
    return out


def face_filled(image: np.ndarray, box: np.ndarray, kps: np.ndarray | None, margin: float = 0.25) -> np.ndarray:
    """A copy of the frame ``image`` (H, W, 3) uint8 RGB with the face at ``box`` (4,) / ``kps``
    (5, 2) filled with its mean colour over deid's face ellipse at ``margin`` (the default
    --margin; faces.methods.ellipse_mask): the judge's control. dlib, aligning from the full frame,
    calls such an input the same person as the face for many faces under ~70 px of the stress
    set's crowd_1080 (distances 0.55-0.6, the ellipse grown to a 0.6 margin as well): there it
    reads hair, ears and background, and no cover of the face can move its call
    (evaluate_video: ``judge_same_context_frac``, a diagnostic)."""
    from ..faces.methods import ellipse_mask

    out = image.copy()
    em = ellipse_mask(out.shape, np.asarray(box, np.float32), kps, margin)
    if em is not None:
        (x0, y0, x1, y1), m = em
        roi = out[y0:y1, x0:x1]
        sel = m > 0
        roi[sel] = np.rint(roi[sel].mean(0)).astype(np.uint8)
    return out


def flat_patch(crop: np.ndarray) -> np.ndarray:
    """The ArcFace crop (112, 112, 3) uint8 RGB filled everywhere with its mean colour: a crop with
    no face in it at all. When the identity network verifies this against the input crop, it cannot
    read that input (faces of ~30-60 px, blurred, half hidden or cut by the frame's edge in the
    stress set's crowds) and would verify any featureless cover of it as well: evaluate_video
    counts such exposed faces in ``exposed_flat_verified`` (a diagnostic; they stay exposed)."""
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8, (crop.shape, crop.dtype)
    return np.broadcast_to(np.rint(crop.reshape(-1, 3).mean(0)).astype(np.uint8), crop.shape).copy()


# --------------------------------------------------------------------------------------
# Mouth opening proxy
#
# SCRFD gives 5 landmarks (mouth corners only) and no dense landmark model is available
# offline, so mouth opening is measured on the image, as the JAW DROP: how far the lower lip
# and chin have moved down, relative to the first face of the track, in the crop aligned to
# the 5 points (which pins the eyes, nose and mouth corners).
#   1. crop: MOUTH_CROP x MOUTH_CROP at align margin MOUTH_MARGIN (the ArcFace template scaled
#      by 1 / 1.8 about the crop centre: inter-ocular distance (IOD) 33.6 px, mouth-corner line
#      at row 130.6, room for 1.8 IOD below it);
#   2. profile: for every row from the mouth-corner line - 0.1 IOD to + 1.3 IOD (lower lip,
#      chin), the median over the columns between the mouth corners of CIELAB L and a*,
#      smoothed (Gaussian, sigma 1 row);
#   3. jaw drop: the vertical shift (rows, within +-MOUTH_MAX_SHIFT) that best matches the
#      profile to the track's first profile (least squares, refined to sub-row by a parabola),
#      divided by the IOD. Positive = lower face further down = mouth more open.
# Input and output are measured identically, each against its own first frame; the Pearson
# correlation across frames is invariant to that offset.
# Validation: 30 random frames of retalk_face4.mp4 (talking head) and 30 of lp_d6.mp4
# (grimaces) were graded 0-3 by eye for lip separation before any proxy value was looked at:
# Spearman rank correlation with the proxy 0.60 and 0.91 (the talking head opens its lips
# more than its jaw; crops sorted by the proxy run from closed to wide open on lp_d6, less
# cleanly on retalk_face4). Stability: against a crf 18
# re-encode of themselves, the proxy correlates >= 0.99 on 1 s of ghost_2person, lp_d12,
# retalk_face4 and sadtalker_WDA (an earlier proxy, the outer lip height from a* edges, agreed
# better with the grades on the talking head (0.82) but was unstable where the lips are
# barely redder than the skin: 0.42-0.58 on ghost_2person and lp_d12). Known limits: head
# pitch not removed by the 5-point alignment reads as jaw motion, lips opening without any
# jaw motion are missed, and over a still mouth the correlation is noise (so it is only
# reported when the input's proxy varies by at least MOUTH_MIN_STD).
MOUTH_CROP = 192
MOUTH_MARGIN = 0.4
MOUTH_MAX_SHIFT = 14  # rows (0.42 IOD)
MOUTH_ROWS = (-0.1, 1.3)  # profile rows, in IOD from the mouth-corner line
MOUTH_MIN_STD = 0.02  # IOD; below it the input mouth is considered still: no correlation


# --------------------------------------------------------------------------------------
# Inner-lip opening (the measure issue 4 names: inner-lip distance over face size)
#
# When the ``judge`` extra is installed (dlib-bin, face_recognition_models), dlib's 68-point
# shape predictor (iBUG 300-W layout; 60-67 are the inner lip) runs on a LIPS_CROP x LIPS_CROP
# crop aligned to the INPUT's 5 points (margin MOUTH_MARGIN: IOD 67 px, so dlib's integer
# pixel coordinates quantise the opening to 0.015 IOD), started from the ArcFace square of that
# crop, for the input and the output frame alike. Opening = mean of the three vertical
# inner-lip distances (61-67, 62-66, 63-65) / IOD. It sees the lips, not the jaw, but
# it needs the output's lips to still look like lips to dlib.
LIPS_CROP = 384
LIPS_PAIRS = ((61, 67), (62, 66), (63, 65))

# Eye opening, from the same dlib fit (no target in issue 4; it shows whether the generated
# eyes follow the input's blinks and squints, which is expression): mean of the four vertical
# lid distances (37-41, 38-40 right eye, 43-47, 44-46 left eye; iBUG 300-W layout) / IOD. Its
# correlation across frames is reported when the input's opening varies by at least
# EYES_MIN_STD (0.01 IOD: under 1 px of dlib's integer points at IOD 67 px; the tracks of the 8
# clips in ../shared/videos vary by 0.008-0.057). dlib's lid points jitter by about a pixel, so
# this floor is lower than the lips': against a plain re-encode 0.58-0.98 per track.
EYES_PAIRS = ((37, 41), (38, 40), (43, 47), (44, 46))
EYES_MIN_STD = 0.01


class LipOpening:
    """Inner-lip opening of a face, in IOD: ``LipOpening()(image, kps)``; image (H, W, 3) uint8
    RGB, kps (5, 2) float frame pixels of the face (the input's, for both input and output).
    ``openings(image, kps)``: (lips, eyes) in IOD from one dlib fit (EYES_PAIRS)."""

    def __init__(self):
        import dlib

        from ..faces.align import arcface_box, crop_template
        from .judges import JudgeUnavailable, _dlib_models

        path = _dlib_models() / "shape_predictor_68_face_landmarks.dat"
        if not path.is_file():
            raise JudgeUnavailable(f"{path} missing (pip install 'deid-video[judge]')")
        self.sp = dlib.shape_predictor(str(path))
        off, side = arcface_box(LIPS_CROP, MOUTH_MARGIN)
        self.rect = dlib.rectangle(*(int(round(v)) for v in (off, off, off + side, off + side)))
        t = crop_template(LIPS_CROP, MOUTH_MARGIN)
        self.iod = float(t[1, 0] - t[0, 0])

    def __call__(self, image: np.ndarray, kps: np.ndarray) -> float:
        return self.openings(image, kps)[0]

    def openings(self, image: np.ndarray, kps: np.ndarray) -> tuple[float, float]:
        from ..faces.align import estimate_transform, warp_crop

        crop = np.ascontiguousarray(warp_crop(image, estimate_transform(kps, LIPS_CROP, MOUTH_MARGIN), LIPS_CROP))
        shape = self.sp(crop, self.rect)

        def mean_dist(pairs):
            return float(np.mean([np.hypot(shape.part(a).x - shape.part(b).x, shape.part(a).y - shape.part(b).y)
                                  for a, b in pairs])) / self.iod

        return mean_dist(LIPS_PAIRS), mean_dist(EYES_PAIRS)


def _lip_opening() -> Optional[LipOpening]:
    """A LipOpening when dlib and its 68-point model are installed, else None (lips not measured)."""
    from ..errors import ModelError

    try:
        return LipOpening()
    except (ImportError, ModelError) as e:  # JudgeUnavailable is a ModelError
        log.info("inner-lip opening not measured: %s", e)
        return None


@dataclass(frozen=True)
class _MouthGeometry:
    iod: float  # px
    cols: tuple  # x0, x1 (exclusive)
    rows: tuple  # y0, y1 of the profile including the +-shift margin


def _mouth_geometry(size: int = MOUTH_CROP, margin: float = MOUTH_MARGIN) -> _MouthGeometry:
    from ..faces.align import crop_template

    t = crop_template(size, margin).astype(np.float64)
    iod = float(t[1, 0] - t[0, 0])
    my = float((t[3, 1] + t[4, 1]) / 2)
    y0 = int(round(my + MOUTH_ROWS[0] * iod)) - MOUTH_MAX_SHIFT
    y1 = int(round(my + MOUTH_ROWS[1] * iod)) + MOUTH_MAX_SHIFT
    assert 0 <= y0 and y1 <= size, (y0, y1, size)
    return _MouthGeometry(iod, (int(round(t[3, 0])), int(round(t[4, 0])) + 1), (y0, y1))


_GEOMETRY: Optional[_MouthGeometry] = None


def _geometry() -> _MouthGeometry:
    global _GEOMETRY
    if _GEOMETRY is None:
        _GEOMETRY = _mouth_geometry()
    return _GEOMETRY


def mouth_crop(image: np.ndarray, kps: np.ndarray) -> np.ndarray:
    """The (MOUTH_CROP, MOUTH_CROP, 3) uint8 RGB crop of ``image`` aligned to ``kps`` (5, 2)."""
    from ..faces.align import estimate_transform, warp_crop

    return warp_crop(image, estimate_transform(kps, MOUTH_CROP, MOUTH_MARGIN), MOUTH_CROP)


def mouth_profile(crop: np.ndarray) -> np.ndarray:
    """(R, 2) float32 CIELAB (L, a*) row profile of the lower face of a :func:`mouth_crop`."""
    import cv2

    g = _geometry()
    assert crop.shape == (MOUTH_CROP, MOUTH_CROP, 3) and crop.dtype == np.uint8, (crop.shape, crop.dtype)
    (x0, x1), (y0, y1) = g.cols, g.rows
    lab = cv2.cvtColor(np.ascontiguousarray(crop[y0:y1, x0:x1]), cv2.COLOR_RGB2LAB)
    prof = np.median(lab[:, :, :2].astype(np.float32), axis=1)  # (R, 2)
    return cv2.GaussianBlur(prof.reshape(-1, 1, 2), (1, 0), 1.0).reshape(-1, 2)


def jaw_drop(profile: np.ndarray, reference: np.ndarray) -> float:
    """Downward shift (in IOD) of ``profile`` relative to ``reference`` (both from mouth_profile)."""
    m = MOUTH_MAX_SHIFT
    n = len(reference)
    assert profile.shape == reference.shape, (profile.shape, reference.shape)
    core = reference[m:n - m]
    ssd = np.array([float(np.sum((profile[m + s:n - m + s] - core) ** 2)) for s in range(-m, m + 1)])
    return (_subpixel(ssd, int(np.argmin(ssd))) - m) / _geometry().iod


def _subpixel(v: np.ndarray, j: int) -> float:
    """Position of the extremum of ``v`` at ``j``, refined by a parabola through 3 samples."""
    if 0 < j < len(v) - 1:
        d = v[j - 1] - 2.0 * v[j] + v[j + 1]
        if abs(d) > 1e-9:
            return j + float(np.clip(0.5 * (v[j - 1] - v[j + 1]) / d, -0.5, 0.5))
    return float(j)


# --------------------------------------------------------------------------------------
# Verification threshold on LFW


def _lfw_pairs(lfw_dir: Path) -> list[tuple[str, str, bool, int]]:
    """(image_a, image_b, same, fold) for every pair of LFW's pairs.txt."""
    lines = [ln for ln in (lfw_dir / "pairs.txt").read_text().splitlines() if ln.strip()]
    n_folds, per = (int(v) for v in lines[0].split())
    name = lambda p, i: f"{p}/{p}_{int(i):04d}.jpg"  # noqa: E731
    pairs = []
    for i, ln in enumerate(lines[1:]):
        p = ln.split()
        fold = i // (2 * per)
        if len(p) == 3:
            pairs.append((name(p[0], p[1]), name(p[0], p[2]), True, fold))
        elif len(p) == 4:
            pairs.append((name(p[0], p[1]), name(p[2], p[3]), False, fold))
        else:
            raise ValueError(f"pairs.txt line {i + 2}: {ln!r}")
    if len(pairs) != 2 * per * n_folds:
        raise ValueError(f"pairs.txt: {len(pairs)} pairs, header says {2 * per * n_folds}")
    return pairs


def lfw_descriptors(names: Sequence[str], lfw_dir: Path, models_dir=None, det_size: int = 320,
                    det_thresh: float = 0.3) -> tuple[list[str], np.ndarray, list[str]]:
    """Embeddings of LFW images as evaluate_video computes them for video faces.

    Each image is detected with SCRFD-2.5G at ``det_size``; the face nearest the image centre
    is cropped with align.arcface_crop and embedded with engine.IdentityEmbedder.
    Returns (names found, (N, 128) float32 L2-normalised, names without a face).
    """
    import cv2

    from .. import weights
    from ..faces.align import arcface_crop
    from ..faces.detect import Detector
    from ..generator.embedder import IdentityEmbedder

    det = Detector(weights.model_path("det_scrfd_2.5g_kps.onnx", models_dir), det_thresh=det_thresh,
                   det_size=det_size)
    emb = IdentityEmbedder(weights.model_path("rec_mobilefacenet.onnx", models_dir))
    found, feats, missed, batch = [], [], [], []
    for i, name in enumerate(names):
        bgr = cv2.imread(str(lfw_dir / "lfw_deepfunneled" / name), cv2.IMREAD_COLOR)
        rgb = None if bgr is None else np.ascontiguousarray(bgr[:, :, ::-1])
        d = det.detect(rgb) if rgb is not None else None
        if d is None or len(d) == 0:
            missed.append(name)
            continue
        c = (d.boxes[:, :2] + d.boxes[:, 2:]) / 2.0
        k = int(np.argmin(np.hypot(c[:, 0] - rgb.shape[1] / 2, c[:, 1] - rgb.shape[0] / 2)))
        batch.append(arcface_crop(rgb, d.kps[k]))
        found.append(name)
        if len(batch) == 64:
            feats.append(emb.embed(batch))
            batch = []
        if (i + 1) % 1000 == 0:
            log.info("LFW: %d/%d images", i + 1, len(names))
    if batch:
        feats.append(emb.embed(batch))
    return found, np.concatenate(feats) if feats else np.zeros((0, 128), np.float32), missed


def lfw_far_threshold(far: float = 1e-3, lfw_dir: Optional[os.PathLike] = None, models_dir=None) -> dict:
    """The identity network's verification threshold at FAR ``far`` on clean LFW pairs.txt.

    The threshold comes from evaluate.far_threshold (accept when cosine >= threshold; with
    3000 impostor pairs and far 1e-3 it lies just above the 4th highest impostor score, so the
    3 highest are accepted). Also returns TAR there, the 3rd/4th highest impostor scores, and
    the usual 10-fold accuracy (best threshold on 9 folds, tested on the 10th) as a sanity check.
    """
    from .measures import far_threshold

    lfw_dir = Path(lfw_dir or DEFAULT_LFW)
    pairs = _lfw_pairs(lfw_dir)
    names = sorted({n for a, b, _, _ in pairs for n in (a, b)})
    found, desc, missed = lfw_descriptors(names, lfw_dir, models_dir)
    res = far_threshold(desc, found, [(a, b, s) for a, b, s, _ in pairs], far)
    idx = {n: i for i, n in enumerate(found)}
    ok = np.array([a in idx and b in idx for a, b, _, _ in pairs])
    same = np.array([s for _, _, s, _ in pairs])
    fold = np.array([f for _, _, _, f in pairs])
    score = np.array([float(desc[idx[a]] @ desc[idx[b]]) if k else np.nan
                      for (a, b, _, _), k in zip(pairs, ok)])
    imp = np.sort(score[ok & ~same])[::-1]
    accs = []
    for f in np.unique(fold):
        tr, te = ok & (fold != f), ok & (fold == f)
        cands = np.unique(score[tr])
        acc = [(np.mean((score[tr] >= t) == same[tr]), t) for t in cands]
        best = max(acc)[1]
        accs.append(float(np.mean((score[te] >= best) == same[te])))
    res.update({
        "impostor_top4": [float(v) for v in imp[:4]],
        "images": len(names), "images_without_face": missed,
        "accuracy_10fold": float(np.mean(accs)), "accuracy_10fold_std": float(np.std(accs)),
    })
    return res


# --------------------------------------------------------------------------------------
# Frames


def upright_frames(path: os.PathLike) -> Iterator[tuple[np.ndarray, Optional[float]]]:
    """(image (H, W, 3) uint8 RGB upright, time in seconds or None) of every frame, streamed.

    Same decoding and rotation as transcode_video: the frame's own colour matrix and
    range, display rotation applied.
    """
    from ..media.frames import _to_rgb
    from ..media.probe import _ff_reason, _open_input, _rotation, _video_stream

    p = Path(path)
    container = _open_input(p)
    try:
        vs = _video_stream(container, p.name)
        vs.thread_type = "AUTO"
        tb = vs.time_base
        try:
            for frame in container.decode(vs):
                rgb = _to_rgb(frame)
                k = _rotation(frame) // 90
                if k:
                    rgb = np.rot90(rgb, k)
                t = float(frame.pts * tb) if frame.pts is not None and tb else None
                yield np.ascontiguousarray(rgb), t
        except Exception as e:
            import av

            if isinstance(e, av.FFmpegError):
                from ..errors import InputError

                raise InputError(f"{p.name}: decoding failed ({_ff_reason(e)})") from e
            raise
    finally:
        container.close()


# --------------------------------------------------------------------------------------
# Accumulators


def _pearson(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if len(a) < 2 or a.std() < 1e-9 or b.std() < 1e-9:
        return None
    return float(np.corrcoef(a, b)[0, 1])


#: Block bootstrap of a correlation over a track's frames: blocks of about a second (neighbouring
#: frames are not independent), this many resamples, fixed seed (the same figures on a rerun).
CI_BLOCK_FRAMES = 25
CI_RESAMPLES = 1000


def _corr_ci90(a: Sequence[float], b: Sequence[float], block: int = CI_BLOCK_FRAMES,
               resamples: int = CI_RESAMPLES) -> Optional[list]:
    """[5th, 95th] percentile of the Pearson correlation of ``a`` and ``b`` (per-frame values of
    one track, in frame order) over moving-block bootstrap resamples: how far the figure moves
    with which frames happen to be in the clip. None below two blocks of frames."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    n = len(a)
    if n < 2 * block:
        return None
    rng = np.random.default_rng(0)
    k = -(-n // block)  # blocks per resample
    starts = rng.integers(0, n - block + 1, (resamples, k))
    idx = (starts[:, :, None] + np.arange(block)).reshape(resamples, -1)[:, :n]
    x, y = a[idx], b[idx]
    x = x - x.mean(1, keepdims=True)
    y = y - y.mean(1, keepdims=True)
    den = np.sqrt((x * x).sum(1) * (y * y).sum(1))
    r = (x * y).sum(1)[den > 1e-12] / den[den > 1e-12]
    return [float(v) for v in np.percentile(r, [5, 95])] if len(r) else None


def _mean(v) -> Optional[float]:
    return float(np.mean(v)) if len(v) else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return float(a / b) if a is not None and b else None


def _iod(kps: np.ndarray) -> float:
    return max(float(np.linalg.norm(kps[1] - kps[0])), 1e-6)


FAR = 1e-3


PAD = 64  # detector canvas padding around a crop


def describe(net, crops: np.ndarray, margin: float, device="cpu") -> np.ndarray:
    """L2-normalised descriptors (N, 128) of crops, through the ArcFace square of each crop."""
    import torch

    from ..generator.identity import crop_to_id_input, embed, to_input

    out = []
    with torch.no_grad():
        for i in range(0, len(crops), 256):
            x = crop_to_id_input(to_input(crops[i:i + 256]), margin)
            out.append(embed(net, x.to(device)))
    return torch.cat(out).numpy()


def far_threshold(desc: np.ndarray, names: Sequence[str], pairs, far: float = FAR) -> dict:
    """Threshold on cosine at FAR on the clean impostor pairs; TAR there on genuine pairs."""
    idx = {n: i for i, n in enumerate(names)}
    gen_s, imp_s = [], []
    for a, b, same in pairs:
        if a in idx and b in idx:
            s = float(desc[idx[a]] @ desc[idx[b]])
            (gen_s if same else imp_s).append(s)
    imp = np.sort(np.array(imp_s))
    # smallest threshold with (#impostors >= thr) / n <= far
    k = int(np.floor(far * len(imp)))
    thr = float(np.nextafter(imp[len(imp) - 1 - k], np.inf)) if k < len(imp) else -1.0
    tar = float(np.mean(np.array(gen_s) >= thr)) if gen_s else float("nan")
    return {"threshold": thr, "far": far, "tar_clean": tar, "n_genuine": len(gen_s),
            "n_impostor": len(imp_s)}
