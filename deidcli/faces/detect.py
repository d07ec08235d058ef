"""Face detection: SCRFD through InsightFace, five landmarks a face, and a zoomed second look
at weak detections. Tracking is faces/track.py; one frame through both::

    detector = Detector(models_dir / "det_scrfd_2.5g_kps.onnx", det_thresh=0.5)
    tracker = Tracker(TrackOptions(), fps=29.97)
    for index, rgb in enumerate(frames):          # (H, W, 3) uint8 RGB
        for final_index, faces in tracker.push(index, detector.detect(rgb)):
            ...                                    # faces of frame `final_index`, final
    for final_index, faces in tracker.flush():
        ...

Coordinates are pixels of the image given to the detector, x to the right, y down.
Boxes are (x0, y0, x1, y1) and may reach past the image edges. Landmarks are the five
SCRFD points in InsightFace order: left eye, right eye, nose, left mouth corner, right
mouth corner (left/right as seen in the image).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import ModelError
from ..options import DET_SIZE_AUTO as AUTO
from ..options import DETECTOR_PRECISIONS as PRECISIONS
from ..stages import ort_session_options


def rects_meet(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two rectangles or boxes (x0, y0, x1, y1) share a pixel (positive overlap)."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of every box in `a` (N, 4) with every box in `b` (M, 4).

    Boxes are x0, y0, x1, y1. Returns (N, M) float64 in [0, 1].
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0.0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0.0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0.0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


logger = logging.getLogger(__name__)

__all__ = ["Detections", "Detector", "box_iou"]


# --------------------------------------------------------------------------------------
# Detection


@dataclass
class Detections:
    """The faces found in one image.

    boxes:  (N, 4) float32, x0, y0, x1, y1 in pixels of the image (x0 < x1, y0 < y1).
    scores: (N,) float32, detector confidence in [0, 1].
    kps:    (N, 5, 2) float32, x, y in pixels: left eye, right eye, nose, left mouth
            corner, right mouth corner.
    Arrays given in another float dtype are converted to float32.
    """

    boxes: np.ndarray
    scores: np.ndarray
    kps: np.ndarray

    def __post_init__(self):
        self.boxes = np.ascontiguousarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.scores = np.ascontiguousarray(self.scores, dtype=np.float32).reshape(-1)
        self.kps = np.ascontiguousarray(self.kps, dtype=np.float32).reshape(-1, 5, 2)
        n = len(self.boxes)
        assert self.scores.shape == (n,), f"scores {self.scores.shape} for {n} boxes"
        assert self.kps.shape == (n, 5, 2), f"kps {self.kps.shape} for {n} boxes"

    def __len__(self) -> int:
        return len(self.boxes)

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 4)), np.zeros((0,)), np.zeros((0, 5, 2)))

    def select(self, keep: np.ndarray) -> "Detections":
        """The detections where the boolean mask or index array `keep` selects."""
        return Detections(self.boxes[keep], self.scores[keep], self.kps[keep])


#: Detector.zoom_score: the zoomed look's input side (px) and the face's height in it.
ZOOM_SIDE = 160
ZOOM_FACE = 64
#: Detector.detect_near: the square looked at around each box (px), the box's height in it, and
#: the squares side by side in one detector input. 48 px faces: the landmarks differ from the
#: frame-sized look's by 3.5% of the inter-ocular distance (median; ghost_2person, mosaic3), as
#: much as at 64 or 96 px, for 3.6 ms a square (int8, one core) against 4.5 and 8.3. Larger
#: squares for fewer faces were tried (2026-12-06) and left: two 720p faces in 192 px squares ran
#: ghost_2person at 28-31 frames/s (33 in 128 px); one face in 192 px sent 27 of
#: ghost_obama_short's 208 faces to the fallback (none in 128 px); lp_d12 in 320 px: lip-opening
#: agreement r 0.79 (0.73 in 128 px, 0.88 searched every frame).
NEAR_SIDE = 128
NEAR_RATIO = 2.5  # the square's side over the box's longer side: the box is 51.2 px high in it
NEAR_PER_CALL = 5
#: A face smaller than NEAR_SIDE / NEAR_RATIO at the search's scale is looked at in a SMALL_SIDE px
#: square of the search's own input, cut on the network's 32 px grid (Detector.detect_near). The
#: network sees far beyond a face: for a 45 px face in motion blur (stress set mosaic3_blur) the
#: landmarks of such a square were 2.5-6.3% of the inter-ocular distance from the search's at 128
#: px, 1.9-5.2% at 192 and 0.3-3.7% at 256 (frames 58-89, median 1.2%).
SMALL_SIDE = 256
#: Detector.near_cost: each detector call's fixed cost in pixels of input (2.1 ms at 0.0875 ms a
#: 1,000 px on the 2-core machine the figures above come from).
CALL_PIXELS = 24_000
#: Detector.detect: a weak detection overlapping a tracked face's box this much continues it and
#: is not looked at again zoomed (lp_d6: 319 second looks at its one face in 336 frames before).
TRACKED_IOU = 0.5
#: det_size AUTO: the whole-image search looks at an image shrunk AUTO_DOWNSCALE times at most (its
#: longer side to AUTO_MIN px at least). A fixed 640 px look misses small faces in large frames: on
#: a frame of the stress set's crowd_lfw tiled 3x3 into 3840x2160, it found 4 of the ~100 faces
#: that 1920 px found (its faces 20-80 px, 3-13 px once shrunk six times); tiled 2x2 into 2560x1440,
#: 23 against 58. Up to 1280 px frames AUTO is 640, as before.
AUTO_MIN, AUTO_DOWNSCALE = 640, 2.0
#: Detector.detect, large faces: SCRFD finds a face up to about 460 px high in its input, less
#: surely up to 490, and none much larger (the shared clips' largest, the SadTalker clip at 443-460
#: px: 0.64-0.70; lp_d6 at 443-486 px: 0.43-0.70, the weak ones raised by the zoomed second look;
#: the 720x1280 selfie lp_d13 scaled 2x, 517 px: 0.22 for a part of it, nothing for the zoomed look
#: to raise; scaled 3x, a 2160x3840 phone video, 774 px: nothing, so the face went out as it was).
#: Where a face as tall as the frame would be over COARSE_FROM px at the search's scale, the search
#: also looks at the frame shrunk to COARSE_SIDE px on its longer side; its detections at least
#: COARSE_FROM px high at the search's scale count, each in place of the search's detections of the
#: same face unless one of those scored COARSE_OVER or more (the search's box and landmarks are the
#: finer ones). Faces the search sees, up to 500 px, are left to it and to its zoomed second look. By the detector's pixels
#: (CALL_PIXELS included), a 1080p search costs about 16% more, a 4K one 4%; 1280x720 frames none.
COARSE_SIDE, COARSE_FROM, COARSE_OVER = 320, 500, 0.5
#: The least score of a detection that may start a face (a tentative track, faces/track.py; a zoomed
#: second look, Detector.detect; a weak face covered live, pipeline/live.py). Weaker ones, down to
#: the detector's threshold (--keep-thresh, 0.2), only continue a face already followed: on the
#: stress set's crowd_4k a half-hidden 50 px face moving 12 px a frame scored 0.21-0.29 over 14
#: frames (zoomed 0.5-0.63), its track ended at 0.3 and the face went out as it was.
WEAK_MIN = 0.3


def auto_side(long_side: int) -> int:
    """The detector input's longer side (px, a multiple of 32) for an image whose longer side is
    ``long_side`` px, under det_size AUTO."""
    return max(AUTO_MIN, int(math.ceil(long_side / AUTO_DOWNSCALE / 32.0)) * 32)


class Detector:
    """SCRFD face detector with five landmarks, loaded from an ONNX file by path.

    model_path: an InsightFace SCRFD ``*_kps.onnx`` model (dynamic or fixed input size).
    det_thresh: score threshold. det_size: the detector input's longer side, a multiple of 32, or
    :data:`AUTO` (0): half the image's longer side, at least :data:`AUTO_MIN` (:func:`auto_side`),
    so that the smallest face found is the same number of image pixels at any resolution; a
    model with a fixed input size (det_scrfd_500m_kps_640.onnx: 640x640) uses its own and
    says so when `det_size` differs. min_face: faces whose box has a shorter side below
    this many pixels are dropped and counted in ``n_small``. providers: ONNX Runtime
    execution providers (default CPU only). precision: fp32 (the default here, so that tools
    measuring faces keep the reference model; the anonymize pipeline passes
    DetectOptions.precision, default auto), int8 (statically quantized at load from this file and
    the calibration shipped for it, see deidcli/quantize.py; CPU provider only), or auto (int8 on
    the CPU provider alone, fp32 with any other). Where int8 cannot be had the detector says why
    in one warning and runs fp32; ``precision`` after loading says what runs ("int8" or "fp32").
    calibration: the int8 calibration JSON (default: the one shipped for this detector,
    deidcli/data/<model stem>.calib.json). rescore_below: a detection scored under this (and at
    det_thresh and :data:`WEAK_MIN` or above) is looked at again, zoomed (:meth:`zoom_score`), and
    keeps the higher of its two scores; 0 (the default) does not.
    """

    def __init__(
        self,
        model_path: str | Path,
        det_thresh: float = 0.5,
        det_size: int = 640,
        min_face: int = 0,
        providers: Optional[Sequence[str]] = None,
        precision: str = "fp32",
        calibration: Optional[str | Path] = None,
        rescore_below: float = 0.0,
    ):
        model_path = Path(model_path)
        if not model_path.is_file():
            raise ModelError(f"face detector model not found: {model_path}")
        if det_size < 0 or det_size % 32:
            raise ValueError(f"det_size must be a positive multiple of 32 or 0 (auto), not {det_size}")
        if not 0.0 <= det_thresh <= 1.0:
            raise ValueError(f"det_thresh must be in [0, 1], not {det_thresh}")
        if min_face < 0:
            raise ValueError(f"min_face must be >= 0, not {min_face}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        providers = list(providers or ["CPUExecutionProvider"])

        import insightface  # heavy: imported on first use

        from ..quantize import int8_session

        # time taken to build the int8 model (None: fp32)
        int8, self.build_seconds = int8_session(model_path, precision, providers, "detector", logger,
                                                ort_session_options(), calibration)
        try:
            # InsightFace reports what it loads on stdout, which carries only our report.
            with contextlib.redirect_stdout(sys.stderr):
                if int8 is not None:
                    # No model_file: every input size runs this session (InsightFace would build
                    # its per-size sessions from the fp32 file).
                    from insightface.model_zoo.scrfd import SCRFD

                    model = SCRFD(model_file=None, session=int8)
                else:
                    model = insightface.model_zoo.get_model(str(model_path), providers=providers,
                                                            sess_options=ort_session_options())
        except Exception as e:  # onnxruntime raises its own, undocumented exception types
            raise ModelError(f"cannot load face detector {model_path}: {e}") from e
        if model is None or getattr(model, "taskname", None) != "detection":
            raise ModelError(f"{model_path} is not a face detection model")
        if not getattr(model, "use_kps", False):
            raise ModelError(f"{model_path} has no landmark outputs (need an SCRFD *_kps model)")

        # A model exported with a fixed input size can only run at that size.
        shape = model.session.get_inputs()[0].shape
        if all(isinstance(v, int) and v > 0 for v in shape[2:4]):
            fixed = (int(shape[3]), int(shape[2]))
            if det_size and fixed != (det_size, det_size):
                logger.warning(
                    "%s has a fixed %dx%d input: det_size %d ignored",
                    model_path.name, fixed[0], fixed[1], det_size,
                )
            self.input_size = fixed
            self.fixed_size = True
        else:
            self.input_size = (det_size or AUTO_MIN,) * 2
            self.fixed_size = False
        self.det_size = det_size
        ctx_id = -1 if all(p == "CPUExecutionProvider" for p in providers) else 0
        with contextlib.redirect_stdout(sys.stderr):
            model.prepare(ctx_id=ctx_id, det_thresh=det_thresh, input_size=self.input_size)

        self.model = model
        self.model_path = model_path
        self.det_thresh = float(det_thresh)
        self.min_face = int(min_face)
        self.providers = list(model.session.get_providers())
        self.precision = "int8" if int8 is not None else "fp32"  # what runs
        self.n_images = 0  # images seen
        self.n_faces = 0  # faces returned
        self.n_small = 0  # faces dropped by min_face
        self.rescore_below = float(rescore_below)
        self.n_rescored = 0  # detections looked at again, zoomed (rescore_below)
        self.n_raised = 0  # of those, the ones the zoomed look scored at rescore_below or above

    def search_scale(self, shape: Sequence[int]) -> float:
        """Detector input pixels per image pixel when :meth:`detect` looks at an image of ``shape``."""
        w, h = self.input_size_for(shape)
        return min(w / shape[1], h / shape[0])

    def input_size_for(self, shape: Sequence[int]) -> tuple[int, int]:
        """Detector input (width, height) for an image of ``shape``: the longer side is scaled to
        det_size (:func:`auto_side` when det_size is AUTO) and the shorter side to the next
        multiple of 32 that holds it, so a 16:9 frame is not padded to a square (same resolution
        on the face, ~40% less computation)."""
        if self.fixed_size:
            return self.input_size
        h, w = int(shape[0]), int(shape[1])
        long_side, short_side = max(h, w), min(h, w)
        side = self.det_size or auto_side(long_side)
        short = int(math.ceil(side * short_side / long_side / 32.0)) * 32
        return (side, short) if w >= h else (short, side)

    def detect(self, image: np.ndarray, tracked: Optional[np.ndarray] = None) -> Detections:
        """Faces in one image.

        image: (H, W, 3) uint8 RGB. It is converted to BGR, the order InsightFace takes.
        tracked: (T, 4) boxes of faces already followed (a tracker's predictions); a weak detection
        on one of them (IoU >= TRACKED_IOU) continues it as it is and is not looked at again
        zoomed (``rescore_below``): only weak detections that could start a face are.
        Returns Detections in pixels of `image`, in decreasing score order.
        """
        assert image.ndim == 3 and image.shape[2] == 3, f"need (H, W, 3), got {image.shape}"
        assert image.dtype == np.uint8, f"need uint8, got {image.dtype}"
        det, kps = self._with_coarse(image, *self._detect(image, self.input_size_for(image.shape)))
        if self.rescore_below > 0:
            weak = (det[:, 4] < self.rescore_below) & (det[:, 4] >= WEAK_MIN)
            if tracked is not None and len(tracked) and weak.any():
                weak &= box_iou(det[:, :4], tracked).max(axis=1) < TRACKED_IOU
            if weak.any():
                z = np.array([self.zoom_score(image, b) for b in det[weak, :4]], np.float32)
                self.n_rescored += len(z)
                self.n_raised += int(np.count_nonzero(z >= self.rescore_below))
                det[weak, 4] = np.maximum(det[weak, 4], z)
                order = np.argsort(-det[:, 4], kind="stable")
                det, kps = det[order], kps[order]
        dets = Detections(det[:, :4], det[:, 4], kps)
        self.n_images += 1
        if self.min_face > 0 and len(dets):
            w = dets.boxes[:, 2] - dets.boxes[:, 0]
            h = dets.boxes[:, 3] - dets.boxes[:, 1]
            keep = np.minimum(w, h) >= self.min_face
            self.n_small += int(np.count_nonzero(~keep))
            dets = dets.select(keep)
        self.n_faces += len(dets)
        return dets

    def coarse_size(self, shape: Sequence[int]) -> Optional[tuple[int, int]]:
        """The detector input (width, height) of :meth:`detect`'s coarse look at an image of
        ``shape`` (COARSE_SIDE), or None where it makes none: a face as tall as the image would be
        at most COARSE_FROM px at the search's scale, or the model's input size is fixed."""
        if self.fixed_size or shape[0] * self.search_scale(shape) <= COARSE_FROM:
            return None
        h, w = int(shape[0]), int(shape[1])
        short = int(math.ceil(COARSE_SIDE * min(h, w) / max(h, w) / 32.0)) * 32
        return (COARSE_SIDE, short) if w >= h else (short, COARSE_SIDE)

    def _with_coarse(self, image: np.ndarray, det: np.ndarray, kps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The search's ``det`` (N, 5), ``kps`` (N, 5, 2) with the large faces of the coarse look
        (:meth:`coarse_size`, COARSE_FROM, COARSE_OVER), highest score first."""
        size = self.coarse_size(image.shape)
        if size is None:
            return det, kps
        cdet, ckps = self._detect(image, size)
        big = (cdet[:, 3] - cdet[:, 1]) * self.search_scale(image.shape) >= COARSE_FROM
        if not big.any():
            return det, kps
        cdet, ckps = cdet[big], ckps[big]
        add, drop = [], set()
        for c in range(len(cdet)):
            # the search's detections of this face: mostly inside its box (a 4K talking head's
            # search found a part of the face, 850 px of 1,290, at 0.42-0.46)
            x0, y0 = np.maximum(det[:, 0], cdet[c, 0]), np.maximum(det[:, 1], cdet[c, 1])
            x1, y1 = np.minimum(det[:, 2], cdet[c, 2]), np.minimum(det[:, 3], cdet[c, 3])
            inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
            area = np.maximum((det[:, 2] - det[:, 0]) * (det[:, 3] - det[:, 1]), 1e-6)
            same = np.flatnonzero(inter / area > 0.5)
            if len(same) and det[same, 4].max() >= COARSE_OVER:
                continue
            add.append(c)
            drop.update(int(j) for j in same)
        if not add:
            return det, kps
        keep = [j for j in range(len(det)) if j not in drop]
        det, kps = np.concatenate([det[keep], cdet[add]]), np.concatenate([kps[keep], ckps[add]])
        order = np.argsort(-det[:, 4], kind="stable")
        return det[order], kps[order]

    def look(self, image: np.ndarray) -> Detections:
        """Faces in one image (H, W, 3) uint8 RGB as :meth:`detect` first sees them: the frame-sized
        look alone, without the zoomed second look, ``min_face``'s filter or the counters."""
        det, kps = self._detect(image, self.input_size_for(image.shape))
        return Detections(det[:, :4], det[:, 4], kps)

    def look_around(self, image: np.ndarray, boxes: np.ndarray) -> Detections:
        """:meth:`look` where only the faces near ``boxes`` (T, 4) matter: the search's own input
        (the frame resized and letterboxed as :meth:`look` does it) is cut, on the network's 32 px
        grid, into squares of at least SMALL_SIDE px (three times a box's longer side, if more)
        around the boxes, overlapping squares merged into their bounding rectangle, and each
        rectangle is looked at alone, at the search's scale. Where the rectangles would cost as
        much as the frame (CALL_PIXELS a call), the frame is looked at whole. Returns Detections in
        pixels of ``image``, highest score first (a face on the line between two rectangles seen
        twice, IoU > 0.5, is kept once).

        On the outputs of the stress set (commit 939d1a8, every other frame, the faces under 96 px
        the input's look scored 0.4 or more: 3,000 faces of mosaic3 and the three crowds), found or
        not at 0.35 and IoU 0.3 as face_check.lost_faces asks, this agreed with the frame's look on
        every face but one (crowd_4k: 0.51 in the frame, 0.27 here), the scores 0.04 apart at most
        for 95% of them; on crowd_4k it cost 119 ms a frame against 208 (mosaic3: 16 against 28)."""
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        in_w, in_h = self.input_size_for(image.shape)
        scale = _letterbox_size(image.shape, (in_w, in_h))[1] / image.shape[0]  # as _search_input's
        rects = []
        for b in boxes:
            side = max(SMALL_SIDE, int(math.ceil(max(b[2] - b[0], b[3] - b[1]) * scale * 3 / 32.0)) * 32)
            x0, y0 = _on_grid(b, scale, side, (in_h, in_w))
            rects.append((x0, y0, min(x0 + side, in_w), min(y0 + side, in_h)))
        rects = _merged(rects)
        if sum((x1 - x0) * (y1 - y0) + CALL_PIXELS for x0, y0, x1, y1 in rects) >= in_w * in_h + CALL_PIXELS:
            return self.look(image)
        searched, scale = self._search_input(image)
        dets, kpss = [], []
        for x0, y0, x1, y1 in rects:
            det, kps = self._detect(searched[y0:y1, x0:x1], (x1 - x0, y1 - y0))
            det[:, :4] = (det[:, :4] + np.array([x0, y0, x0, y0], np.float32)) / scale
            kpss.append((kps + np.array([x0, y0], np.float32)) / scale)
            dets.append(det)
        return _once(dets, kpss)

    def _search_input(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """(the search's input for ``image``: (in_h, in_w, 3) uint8 RGB, the frame resized and
        letterboxed at the top left as :meth:`_detect` does it; input pixels per image pixel)."""
        import cv2

        in_w, in_h = self.input_size_for(image.shape)
        new_w, new_h = _letterbox_size(image.shape, (in_w, in_h))
        searched = np.zeros((in_h, in_w, 3), np.uint8)
        searched[:new_h, :new_w] = cv2.resize(image, (new_w, new_h))
        return searched, float(new_h) / image.shape[0]

    def zoom_score(self, image: np.ndarray, box: np.ndarray) -> float:
        """The detector's score for the face in ``box`` (4,) of ``image`` looked at again, zoomed:
        a square of ZOOM_SIDE / ZOOM_FACE times the box's longer side around it (the frame's edge
        repeated beyond it) scaled to ZOOM_SIDE px, so the face is ZOOM_FACE px high there. 0.0
        where no detection there overlaps the box (IoU > 0.3).

        Small faces are where the frame-sized look fails: SCRFD (int8 more than fp32) scores a
        20-50 px face 0.3-0.5 in frame after frame, and the same face zoomed 0.55-0.9; what is not
        a face stays low (stress set crowd_lfw: 43 detections under 0.5 on 15 frames, every one
        0.55-0.89 zoomed; lp_d6: a hair tie at the head's top, 0.30-0.33, 0.0 zoomed)."""
        zoomed, (X0, Y0, scale) = _square_around(image, box, ZOOM_SIDE / ZOOM_FACE, ZOOM_SIDE)
        if zoomed is None:
            return 0.0
        det, _ = self._detect(zoomed, (ZOOM_SIDE, ZOOM_SIDE))
        if not len(det):
            return 0.0
        back = det[:, :4] * scale + np.array([X0, Y0, X0, Y0], np.float32)
        iou = box_iou(np.asarray(box[:4])[None], back)[0]
        return float(det[int(iou.argmax()), 4]) if iou.max() > 0.3 else 0.0

    def detect_near(self, image: np.ndarray, boxes: np.ndarray) -> Detections:
        """Faces looked for only around ``boxes`` (T, 4) (where a tracker expects its faces), in
        NEAR_SIDE px squares, up to NEAR_PER_CALL of them side by side in one detector input.
        Returns Detections in pixels of ``image`` (overlapping squares may see a face twice:
        duplicates, IoU > 0.5, are dropped), highest score first, without ``min_face``'s filter and
        without a zoomed second look (these are zoomed already).

        - A face at least NEAR_SIDE / NEAR_RATIO px high at the search's scale: a square of
          NEAR_RATIO times the box's longer side around it, scaled to NEAR_SIDE px (the face is
          51.2 px high there).
        - A smaller face is looked at as the search sees it: the SMALL_SIDE px square of the
          search's own detector input (the frame resized and letterboxed as :meth:`detect` does)
          around it, cut on the network's 32 px grid, so that the network computes what it
          computes there in a search, up to what lies beyond the square. Its landmarks then agree
          with the search's, and the identity check and the audit of ``deid evaluate-video`` align
          it alike (45 px faces of the stress set's mosaic3 and mosaic3_blur: 4.4-4.8% of the
          inter-ocular distance apart, median, in a 128 px square around each at the search's
          scale; a 45 px track in motion blur was checked at 0.19-0.30 on the near looks'
          landmarks and verified at 0.61-0.65 by the audit).

        Cost: about NEAR_SIDE^2 (SMALL_SIDE^2 for a small face) pixels of detector input a box, and
        24,000 a call, against the frame's input plus 24,000 (:meth:`near_cost`; the 24,000 is each
        call's fixed cost, measured with the int8 detector on this project's 2-core machine: 3.6
        ms for one 128 px square, 23.7 for a 640x384 frame)."""
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8, image.shape
        small = self._small(boxes, image.shape)
        groups = []  # (side, tiles (side, side, 3) RGB or None, places (X0, Y0, image px per tile px))
        tiles, places = [], []
        for box in boxes[~small]:
            sq, place = _square_around(image, box, NEAR_RATIO, NEAR_SIDE, fast=True)
            tiles.append(sq)
            places.append(place)
        groups.append((NEAR_SIDE, tiles, places))
        if small.any():
            searched, scale = self._search_input(image)
            tiles, places = [], []
            for box in boxes[small]:
                ox, oy = _on_grid(box, scale, SMALL_SIDE, searched.shape)
                sq = np.zeros((SMALL_SIDE, SMALL_SIDE, 3), np.uint8)
                part = searched[oy:oy + SMALL_SIDE, ox:ox + SMALL_SIDE]
                sq[:part.shape[0], :part.shape[1]] = part
                tiles.append(sq)
                places.append((ox / scale, oy / scale, 1.0 / scale))
            groups.append((SMALL_SIDE, tiles, places))
        dets, kpss = [], []
        for side, tiles, places in groups:
            for start in range(0, len(tiles), NEAR_PER_CALL):
                part = tiles[start:start + NEAR_PER_CALL]
                canvas = np.zeros((side, side * len(part), 3), np.uint8)
                for i, sq in enumerate(part):
                    if sq is not None:
                        canvas[:, i * side:(i + 1) * side] = sq
                det, kps = self._detect(canvas, (canvas.shape[1], side))
                tile = np.clip(((det[:, 0] + det[:, 2]) / 2 // side).astype(int), 0, len(part) - 1)
                X0, Y0, sc = (v[:, None] for v in np.array(places[start:start + NEAR_PER_CALL], np.float64)
                              .reshape(-1, 3)[tile].T)
                off = tile[:, None] * side  # the tile's left edge in the canvas
                det[:, 0:4:2] = (det[:, 0:4:2] - off) * sc + X0
                det[:, 1:4:2] = det[:, 1:4:2] * sc + Y0
                kps[:, :, 0] = (kps[:, :, 0] - off) * sc + X0
                kps[:, :, 1] = kps[:, :, 1] * sc + Y0
                dets.append(det)
                kpss.append(kps)
        return _once(dets, kpss)

    def detect_around(self, image: np.ndarray, box: np.ndarray) -> Detections:
        """Faces in the square of NEAR_RATIO times ``box``'s longer side around it, at
        the scale :meth:`detect` would look at ``image`` (so the boxes and landmarks are those a
        search would give), in pixels of ``image``, highest score first. For looking back for a
        face a search found (faces/looks.py): rare, so the cost of the larger input does not matter."""
        longer = max(float(box[2] - box[0]), float(box[3] - box[1]), 1.0)
        side = max(32, int(math.ceil(longer * NEAR_RATIO * self.search_scale(image.shape) / 32.0)) * 32)
        sq, (X0, Y0, s) = _square_around(image, box, NEAR_RATIO, side)
        if sq is None:
            return Detections.empty()
        det, kps = self._detect(sq, (side, side))
        return Detections(det[:, :4] * s + np.array([X0, Y0, X0, Y0], np.float32), det[:, 4],
                          kps * s + np.array([X0, Y0], np.float32))

    def _small(self, boxes: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """(T,) bool: the boxes (T, 4) under NEAR_SIDE / NEAR_RATIO px at the search's scale, which
        :meth:`detect_near` looks at in SMALL_SIDE px squares of the search's input."""
        longer = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        return longer * self.search_scale(shape) < NEAR_SIDE / NEAR_RATIO

    def near_cost(self, boxes: np.ndarray, shape: Sequence[int]) -> tuple[int, int]:
        """(pixels for :meth:`detect_near` of ``boxes`` (T, 4), pixels for :meth:`detect` of an
        image of ``shape``, its coarse look included), each with every call's fixed cost
        (CALL_PIXELS) added."""
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        w, h = self.input_size_for(shape)
        n_small = int(np.count_nonzero(self._small(boxes, shape)))
        cost = 0
        for n, side in ((len(boxes) - n_small, NEAR_SIDE), (n_small, SMALL_SIDE)):
            cost += n * side * side + (n + NEAR_PER_CALL - 1) // NEAR_PER_CALL * CALL_PIXELS
        coarse = self.coarse_size(shape)
        return cost, w * h + CALL_PIXELS + (0 if coarse is None else coarse[0] * coarse[1] + CALL_PIXELS)

    def _detect(self, image: np.ndarray, input_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """InsightFace's ``SCRFD.detect(bgr, input_size, max_num=0)`` for an RGB image, with the same
        result to the bit (tests/test_faces.py checks it): the frame is resized first and only the
        detector-sized picture is put in BGR order, instead of a BGR copy of the whole frame
        (720p: ~3 ms a frame, a tenth of the detector's time on the CPU). The network, its
        decoding and the NMS are InsightFace's (``forward``, ``nms``); this repeats the steps
        between them (``SCRFD._detect_candidates``): letterbox at the top left, scale back, order.
        Returns det (N, 5) float32 [x0, y0, x1, y1, score], kps (N, 5, 2) float32, in pixels of
        ``image``, highest score first.

        A model with a fixed input size runs only at that size: the picture, at the scale
        ``input_size`` asks for, is put at the top left of the model's input (where it fits; else
        it is shrunk into it), so the looks that cut the frame into squares (:meth:`detect_near`,
        :meth:`look_around`, :meth:`zoom_score`) work with it too. Until 2026-12-07 they raised
        with det_scrfd_500m_kps_640.onnx, and `deid anonymize --detector` with it failed on every
        file."""
        import cv2

        m = self.model
        h = image.shape[0]
        in_w, in_h = input_size
        new_w, new_h = _letterbox_size(image.shape, input_size)
        if self.fixed_size:
            in_w, in_h = self.input_size
            if new_w > in_w or new_h > in_h:
                new_w, new_h = _letterbox_size(image.shape, self.input_size)
        scale = float(new_h) / h
        det_img = np.zeros((in_h, in_w, 3), np.uint8)
        det_img[:new_h, :new_w] = cv2.resize(image, (new_w, new_h))[:, :, ::-1]
        scores, boxes, kpss = m.forward(det_img, getattr(m, "det_thresh", 0.5))
        if sum(x.size for x in scores) == 0:
            return np.empty((0, 5), np.float32), np.empty((0, 5, 2), np.float32)
        order = np.argsort(-np.vstack(scores).ravel(), kind="stable")
        pre = np.hstack((np.vstack(boxes) / scale, np.vstack(scores))).astype(np.float32, copy=False)[order]
        kps = (np.vstack(kpss) / scale)[order]
        keep = m.nms(pre)
        return pre[keep], kps[keep]


def _once(dets: list, kpss: list) -> Detections:
    """The detections of several looks (lists of det (N, 5) and kps (N, 5, 2) arrays, image pixels)
    as one Detections, highest score first, a face two looks saw (IoU > 0.5) kept once."""
    if not dets:
        return Detections.empty()
    det, kps = np.concatenate(dets), np.concatenate(kpss)
    order = np.argsort(-det[:, 4], kind="stable")
    det, kps = det[order], kps[order]
    keep = []
    for j in range(len(det)):
        if not keep or box_iou(det[j:j + 1, :4], det[keep, :4]).max() <= 0.5:
            keep.append(j)
    return Detections(det[keep, :4], det[keep, 4], kps[keep])


def _on_grid(box, scale: float, side: int, shape: Sequence[int]) -> tuple[int, int]:
    """Top-left corner (x, y) in the search's input (of ``shape`` (in_h, in_w)) of the ``side`` px
    square around ``box`` (image pixels, ``scale`` input pixels each), on the network's 32 px grid
    and inside the input where it fits."""
    cx, cy = (box[0] + box[2]) / 2 * scale, (box[1] + box[3]) / 2 * scale
    in_h, in_w = shape[:2]
    return (int(min(max(round((cx - side / 2) / 32) * 32, 0), max(in_w - side, 0))),
            int(min(max(round((cy - side / 2) / 32) * 32, 0), max(in_h - side, 0))))


def _merged(rects: list) -> list:
    """Rectangles (x0, y0, x1, y1), those that overlap replaced by their bounding rectangle until
    none overlaps."""
    rects = list(rects)
    merged = True
    while merged:
        merged = False
        for i in range(len(rects)):
            for j in range(i + 1, len(rects)):
                a, b = rects[i], rects[j]
                if rects_meet(a, b):
                    rects[i] = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
                    del rects[j]
                    merged = True
                    break
            if merged:
                break
    return rects


def _letterbox_size(shape: Sequence[int], input_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) an image of ``shape`` is resized to inside a detector input of
    ``input_size`` (width, height), letterboxed at the top left: InsightFace's SCRFD.detect."""
    h, w = shape[:2]
    in_w, in_h = input_size
    if h / w > in_h / in_w:
        return int(in_h / (h / w)), in_h
    return in_w, int(in_w * (h / w))


def _square_around(image: np.ndarray, box, ratio: float, side_out: int, fast: bool = False):
    """(square, (X0, Y0, scale)): the square of ``ratio`` times ``box``'s longer side centred on it
    (the frame's edge repeated beyond the image) resized to ``side_out`` px, and where it lies:
    top-left corner in image pixels and image pixels per square pixel. The square is None where it
    misses the image entirely. ``fast``: a square more than twice ``side_out`` is first shrunk by
    a whole factor (OpenCV's area resize is 3x faster so: 0.4 against 1.4 ms for 625 px), then
    bilinearly by less than 2."""
    import cv2

    x0, y0, x1, y1 = (float(v) for v in box[:4])
    half = max(x1 - x0, y1 - y0) * ratio / 2
    side = max(int(round(2 * half)), 1)
    X0, Y0 = int(round((x0 + x1) / 2 - half)), int(round((y0 + y1) / 2 - half))
    h, w = image.shape[:2]
    ix0, iy0, ix1, iy1 = max(X0, 0), max(Y0, 0), min(X0 + side, w), min(Y0 + side, h)
    place = (X0, Y0, side / side_out)
    if ix1 <= ix0 or iy1 <= iy0:
        return None, place
    crop = cv2.copyMakeBorder(image[iy0:iy1, ix0:ix1], iy0 - Y0, Y0 + side - iy1, ix0 - X0,
                              X0 + side - ix1, cv2.BORDER_REPLICATE)
    k = side // side_out
    if fast and k >= 2:
        small = cv2.resize(crop[:side // k * k, :side // k * k], (side // k, side // k), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (side_out, side_out), interpolation=cv2.INTER_LINEAR), (X0, Y0, k * (side // k) / side_out)
    return cv2.resize(crop, (side_out, side_out),
                      interpolation=cv2.INTER_CUBIC if side < side_out else cv2.INTER_AREA), place


# --------------------------------------------------------------------------------------
# Geometry
